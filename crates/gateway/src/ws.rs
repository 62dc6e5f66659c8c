//! The WebSocket transport, split by direction.
//!
//! **Upgrade.** [`Upgrade`] is our own HTTP/1.1 upgrade extractor (axum's `WebSocketUpgrade`
//! hides the socket). The server accepts connections with [`SharedListener`], whose
//! connections are a shared [`TcpStream`] ([`SharedTcp`]) that each request can see: after
//! the `101`, reads go on through hyper's upgraded connection (which holds any bytes read
//! past the request) and writes go straight to the shared stream.
//!
//! **Writes never go through a WebSocket library.** A server frame is unmasked, so its
//! wire form does not depend on the recipient: a chat message is framed once per instance
//! ([`text_frame`]) and the same bytes are shared by every recipient's outbox, which writes
//! batches of them with one `writev` (see [`crate::outbox`]).
//!
//! **Reads go through tungstenite** (masking, fragmentation, UTF-8, control frames, size
//! limits), over [`ClientIo`]: reads come from the read half; what tungstenite writes by
//! itself (pongs, the answer to a client's close) is queued in the connection's outbox as
//! a control frame, so it takes its place between the data frames instead of racing them.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::{FromRequestParts, connect_info::Connected},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header, request::Parts},
    response::{IntoResponse, Response},
};
use bytes::{BufMut, Bytes, BytesMut};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::outbox::Outbox;

const OP_TEXT: u8 = 0x1;
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

/// The wire form of a server text frame carrying `payload` (which must be UTF-8).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut buf, OP_TEXT, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// The wire form of a close frame with `code` and a short `reason`.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
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

/// The payload of a frame made by [`text_frame`].
pub fn payload(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or_default()
}

/// An HTTP/1.1 WebSocket upgrade request, validated (method, `Connection`, `Upgrade`,
/// `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`).
#[derive(Debug)]
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    tcp: SharedTcp,
}

/// Why a request is not a WebSocket upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRejection {
    /// Not `GET` over HTTP/1.1.
    #[error("a WebSocket upgrade must be an HTTP/1.1 GET")]
    Method,
    /// Missing or wrong `Connection`, `Upgrade`, `Sec-WebSocket-Version` or key header.
    #[error("not a WebSocket upgrade request: `{0}` header missing or invalid")]
    Header(&'static str),
    /// The connection cannot be upgraded (e.g. HTTP/2).
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRejection::Method => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRejection::Header("Sec-WebSocket-Version") => StatusCode::UPGRADE_REQUIRED,
            UpgradeRejection::Header(_) => StatusCode::BAD_REQUEST,
            UpgradeRejection::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
        };
        let mut response = (status, self.to_string()).into_response();
        if status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET || parts.version != Version::HTTP_11 {
            return Err(UpgradeRejection::Method);
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeRejection::Header("Connection"));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeRejection::Header("Upgrade"));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeRejection::Header("Sec-WebSocket-Version"));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeRejection::Header("Sec-WebSocket-Key"))?
            .clone();
        let tcp = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SharedTcp>>()
            .map(|info| info.0.clone())
            .ok_or(UpgradeRejection::NotUpgradable)?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRejection::NotUpgradable)?;
        Ok(Upgrade {
            key,
            on_upgrade,
            tcp,
        })
    }
}

/// An upgraded connection: the TCP stream (for writes) and hyper's upgraded connection
/// (for reads: it starts with any bytes the HTTP server read past the request).
#[derive(Debug)]
pub struct Connection {
    /// The socket, shared.
    pub tcp: Arc<TcpStream>,
    /// The read side.
    pub upgraded: TokioIo<Upgraded>,
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and, once hyper hands the connection over, runs
    /// `serve` with it.
    pub fn on_upgrade<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade {
            key,
            on_upgrade,
            tcp,
        } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    debug!(error = %err, "upgrade failed");
                    return;
                }
            };
            serve(Connection {
                tcp: tcp.0,
                upgraded: TokioIo::new(upgraded),
            })
            .await;
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// A TCP listener whose connections are [`SharedTcp`] (with `TCP_NODELAY`: frames are
/// batched by the outbox, not by Nagle's algorithm).
#[derive(Debug)]
pub struct SharedListener(pub TcpListener);

impl axum::serve::Listener for SharedListener {
    type Io = SharedTcp;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop (it retries, and backs off on EMFILE).
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY");
        }
        (SharedTcp(Arc::new(tcp)), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A TCP stream shared by the HTTP server and, after an upgrade, the connection's outbox.
/// Also the connect info of every request (`ConnectInfo<SharedTcp>`), which is how an
/// upgrade finds its socket.
#[derive(Clone, Debug)]
pub struct SharedTcp(pub Arc<TcpStream>);

impl Connected<axum::serve::IncomingStream<'_, SharedListener>> for SharedTcp {
    fn connect_info(stream: axum::serve::IncomingStream<'_, SharedListener>) -> Self {
        stream.io().clone()
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl SharedTcp {
    /// Waits until the socket is writable and runs `write`, again if it would block.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What tungstenite reads from and writes to: the socket's read half, and the outbox for
/// the frames tungstenite writes by itself (pongs, close replies).
#[derive(Debug)]
pub struct ClientIo {
    read: TokioIo<Upgraded>,
    outbox: Arc<Outbox>,
}

impl ClientIo {
    /// Reads from `read`; control frames go to `outbox`.
    pub fn new(read: TokioIo<Upgraded>, outbox: Arc<Outbox>) -> Self {
        ClientIo { read, outbox }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite writes whole frames it produced itself; a closing outbox drops them
        // (the connection is going away).
        self.outbox.push_control(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tungstenite::protocol::{
        CloseFrame,
        frame::{
            Frame,
            coding::{CloseCode, Data, OpCode},
        },
    };

    use super::*;

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
            let ours = text_frame(&payload);
            assert_eq!(
                ours.as_ref(),
                tungstenite_text(&payload).as_slice(),
                "{len}"
            );
            assert_eq!(super::payload(&ours), payload.as_slice(), "{len}");
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
        assert_eq!(close_frame(1013, "too slow").as_ref(), out.as_slice());
        let mut out = Vec::new();
        Frame::ping(Vec::new()).format(&mut out).unwrap();
        assert_eq!(PING.as_ref(), out.as_slice());
        // A reason too long for a control frame is cut at a character boundary.
        let long = "é".repeat(100);
        let frame = close_frame(1000, &long);
        assert!(frame.len() <= 2 + 125);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
