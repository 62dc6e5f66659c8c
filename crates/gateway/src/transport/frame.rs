//! Server frames in wire form (RFC 6455 §5.2). A server frame is unmasked, so its bytes do
//! not depend on the recipient: a chat message is framed once per instance and the same
//! [`Bytes`] sit in every recipient's outbox. Reading client frames is tungstenite's job.

use bytes::{BufMut, Bytes, BytesMut};

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const FIN: u8 = 0x80;

/// A server ping with an empty payload.
pub const PING: Bytes = Bytes::from_static(&[FIN | OP_PING, 0]);

fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(FIN | opcode);
    match u16::try_from(len) {
        Ok(short) if short < 126 => buf.put_u8(short as u8),
        Ok(medium) => {
            buf.put_u8(126);
            buf.put_u16(medium);
        }
        Err(_) => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

/// The wire form of a text frame carrying `payload` (which must be UTF-8).
pub fn text(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut buf, OP_TEXT, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// The wire form of a binary frame carrying `payload`. The chat protocol sends none; the
/// transport's conformance test (the Autobahn echo server in `chat-testkit`) does.
pub fn binary(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut buf, OP_BINARY, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// The wire form of a close frame with `code` and a short `reason` (cut to fit a control
/// frame, at a character boundary).
pub fn close(code: u16, reason: &str) -> Bytes {
    // A control frame's payload is at most 125 bytes: 2 for the code, the rest reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut buf = BytesMut::with_capacity(4 + reason.len());
    put_header(&mut buf, OP_CLOSE, 2 + reason.len());
    buf.put_u16(code);
    buf.extend_from_slice(reason);
    buf.freeze()
}

#[cfg(test)]
pub(crate) mod tests {
    use tungstenite::protocol::{
        CloseFrame,
        frame::{
            Frame,
            coding::{CloseCode, Data, OpCode},
        },
    };

    use super::*;

    /// Splits a byte stream of unmasked server frames into (opcode, payload) pairs.
    pub(crate) fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 2 {
            let (len, header) = match bytes[1] {
                126 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
                127 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&bytes[2..10]);
                    (usize::try_from(u64::from_be_bytes(n)).unwrap(), 10)
                }
                n => (usize::from(n), 2),
            };
            out.push((bytes[0] & 0x0f, bytes[header..header + len].to_vec()));
            bytes = &bytes[header + len..];
        }
        assert!(bytes.is_empty(), "a frame was cut off");
        out
    }

    fn tungstenite_text(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Frame::message(payload.to_vec(), OpCode::Data(Data::Text), true)
            .format(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn text_frames_match_tungstenite_at_every_length_class() {
        for len in [0, 1, 125, 126, 127, 1000, 65_535, 65_536, 100_000] {
            let payload = vec![b'x'; len];
            let ours = text(&payload);
            assert_eq!(
                ours.as_ref(),
                tungstenite_text(&payload).as_slice(),
                "{len}"
            );
            assert_eq!(
                parse_frames(&ours),
                vec![(OP_TEXT, payload.clone())],
                "{len}"
            );
            let mut theirs = Vec::new();
            Frame::message(payload.clone(), OpCode::Data(Data::Binary), true)
                .format(&mut theirs)
                .unwrap();
            assert_eq!(binary(&payload).as_ref(), theirs.as_slice(), "{len}");
        }
    }

    #[test]
    fn close_and_ping_frames_match_tungstenite() {
        let mut out = Vec::new();
        Frame::close(Some(CloseFrame {
            code: CloseCode::from(1013),
            reason: "too slow".into(),
        }))
        .format(&mut out)
        .unwrap();
        assert_eq!(close(1013, "too slow").as_ref(), out.as_slice());
        let mut out = Vec::new();
        Frame::ping(Vec::new()).format(&mut out).unwrap();
        assert_eq!(PING.as_ref(), out.as_slice());
        // A reason too long for a control frame is cut at a character boundary.
        let long = "é".repeat(100);
        let frame = close(1000, &long);
        assert!(frame.len() <= 2 + 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
