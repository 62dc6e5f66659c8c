//! A minimal WebSocket client for load generation: one read buffer per connection,
//! frames parsed in place (no allocation per frame), text frames handed to the caller
//! as byte slices, pings answered. Only what talking to chat-gateway needs: client
//! frames are masked text, server frames are unmasked and never fragmented.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpSocket, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// Where to connect: `ws://host:port/path?query`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Target {
    /// The server address.
    pub addr: SocketAddr,
    /// Host header value.
    pub host: String,
    /// Path and query.
    pub path: String,
    /// A token to connect with (`--auth-secret`), added to every path's query.
    #[serde(default)]
    pub token: Option<String>,
}

impl Target {
    /// Parses `ws://127.0.0.1:4444` (numeric hosts and `localhost` only).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
        let (hostport, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let addr: SocketAddr = hostport
            .replace("localhost", "127.0.0.1")
            .parse()
            .with_context(|| format!("{hostport} is not ip:port"))?;
        Ok(Target {
            addr,
            host: hostport.to_owned(),
            path: format!("/{path}"),
            token: None,
        })
    }

    /// The same server with another path and query (plus the token, if any).
    pub fn with_path(&self, path: &str) -> Target {
        let path = match &self.token {
            Some(token) => format!("{path}&token={token}"),
            None => path.to_owned(),
        };
        Target {
            path,
            ..self.clone()
        }
    }
}

/// The reading half: a buffer of whole and partial frames.
pub struct Reader {
    half: OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The writing half.
pub struct Writer {
    half: OwnedWriteHalf,
    scratch: Vec<u8>,
}

/// What [`Reader::next`] found.
pub enum Frame<'a> {
    /// A text frame's payload.
    Text(&'a [u8]),
    /// A ping: answer with [`Writer::pong`].
    Ping(Vec<u8>),
    /// The server closed (with this code, if any).
    Close(Option<u16>),
}

/// Opens a TCP connection (optionally from a given local address) and upgrades it.
pub async fn connect(target: &Target, source: Option<IpAddr>) -> anyhow::Result<(Reader, Writer)> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    // Small kernel buffers: thousands of idle connections should not cost megabytes.
    let _ = socket.set_recv_buffer_size(64 * 1024);
    let mut stream: TcpStream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut end = 0;
    let header_end = loop {
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            bail!("connection closed during the handshake");
        }
        end += n;
        if let Some(i) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if end == buf.len() {
            bail!("handshake response too large");
        }
    };
    let status = std::str::from_utf8(&buf[..header_end]).unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {}", status.lines().next().unwrap_or(""));
    }
    let (r, w) = stream.into_split();
    Ok((
        Reader {
            half: r,
            buf,
            start: header_end,
            end,
        },
        Writer {
            half: w,
            scratch: Vec::with_capacity(256),
        },
    ))
}

impl Reader {
    /// The next frame. Blocks until one is complete.
    pub async fn next(&mut self) -> anyhow::Result<Frame<'_>> {
        loop {
            if let Some((opcode, payload_at, len)) = self.peek_header() {
                let frame_end = payload_at + len;
                if frame_end <= self.end {
                    self.start = frame_end;
                    let payload = payload_at..frame_end;
                    return Ok(match opcode {
                        0x1 | 0x2 => Frame::Text(&self.buf[payload]),
                        0x9 => Frame::Ping(self.buf[payload].to_vec()),
                        0x8 => {
                            let p = &self.buf[payload];
                            Frame::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
                        }
                        _ => continue, // pong, continuation: nothing to do
                    });
                }
                // Make room for the rest of a large frame.
                if frame_end - self.start > self.buf.len() {
                    let mut bigger = vec![0u8; frame_end - self.start];
                    bigger[..self.end - self.start]
                        .copy_from_slice(&self.buf[self.start..self.end]);
                    self.end -= self.start;
                    self.start = 0;
                    self.buf = bigger;
                }
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.half.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                bail!("connection closed");
            }
            self.end += n;
        }
    }

    /// Opcode, payload offset and length of the frame at `start`, once its header is in.
    fn peek_header(&self) -> Option<(u8, usize, usize)> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (usize::try_from(u64::from_be_bytes(n)).ok()?, 10)
            }
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        Some((opcode, self.start + header, len))
    }
}

impl Writer {
    /// Sends a text frame (masked, as clients must).
    pub async fn text(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.frame(0x1, payload).await
    }

    /// Answers a ping.
    pub async fn pong(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.frame(0xA, payload).await
    }

    /// Sends a close frame.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.frame(0x8, &1000u16.to_be_bytes()).await
    }

    async fn frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
        let out = &mut self.scratch;
        out.clear();
        out.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => out.push(0x80 | u8::try_from(n).unwrap_or(0)),
            n if n <= usize::from(u16::MAX) => {
                out.push(0x80 | 126);
                out.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.half.write_all(out).await?;
        Ok(())
    }
}

/// Finds `"key":` in a frame and parses the unsigned integer after it.
pub fn find_u64(frame: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(frame, key)? + key.len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers() {
        let f = br#"{"type":"message","room":"r","id":42,"username":"u","text":"~1700|x","ts":5}"#;
        assert_eq!(find_u64(f, br#""id":"#), Some(42));
        assert_eq!(find_u64(f, br#""text":"~"#), Some(1700));
        assert_eq!(find_u64(f, br#""nope":"#), None);
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("ws://localhost:4444").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (4444, "/"));
        let t = Target::parse("ws://127.0.0.1:1/ws?room=a").unwrap();
        assert_eq!(t.path, "/ws?room=a");
    }
}
