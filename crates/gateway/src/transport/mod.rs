//! A WebSocket connection's transport: the handshake ([`upgrade`]), the socket, and
//! everything outbound — the queue and its `writev` ([`Outbox`]), when queued messages are
//! written ([`PendingWrites`], [`WriteScheduler`]), the writer task with pings and the close
//! handshake ([`writer`]), and the wire form of server frames ([`frame`]).
//!
//! **Writes never go through a WebSocket library.** A server frame is unmasked, so a chat
//! message is framed once per instance and its bytes are shared by every recipient's
//! outbox, which writes batches of them with one `writev` on the socket's write half.
//!
//! **Reads go through tungstenite** (masking, fragmentation, UTF-8, control frames, size
//! limits) on the socket's read half, after the bytes the HTTP server read ahead. What
//! tungstenite writes by itself (pongs, the answer to a client's close) is queued in the
//! outbox as a control frame ([`ClientIo`]), so it takes its place between the data
//! frames instead of racing them. What the frames *mean* is the session's business.

pub mod frame;
mod outbox;
mod pending;
pub mod upgrade;
mod writer;

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use chat_protocol::close;
use futures_util::StreamExt;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, Chain, ReadBuf},
    net::tcp::OwnedReadHalf,
    task::JoinHandle,
};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;
use tungstenite::protocol::{Role, WebSocketConfig};

pub use outbox::{Bounds, CONTROL_CAP, Class, Closed, Outbox, Socket, WRITE_BATCH};
pub use pending::{Coalescing, PendingWrites, WriteScheduler};
pub use upgrade::{Upgrade, UpgradeRejection, Upgraded};

#[cfg(test)]
pub(crate) use outbox::tests::CaptureSocket;

/// A connection's id, unique within this instance.
pub type ConnId = u64;

/// Why a connection is being closed; decides its close frame ([`CloseReason::close_frame`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client could not keep up (its live queue overflowed, a full socket took nothing
    /// for `WRITE_TIMEOUT_SECS`, or the server lost live messages for it): 1013.
    TooSlow,
    /// An incoming message was over `MAX_FRAME_BYTES`: 1009.
    TooBig,
    /// The instance is shutting down: 1012.
    Restart,
    /// The client broke policy (too many refused frames in a row): 1008.
    Policy,
    /// The connection's token expired without a `refresh`: 4001.
    TokenExpired,
    /// The client keeps pinging without reading its pongs (more than [`CONTROL_CAP`]
    /// waiting): 1008.
    Flood,
    /// The client broke the WebSocket protocol (an unmasked frame, a bad opcode, a
    /// fragmentation error, …): 1002.
    ProtocolError,
    /// The client sent a text message that is not UTF-8: 1007.
    InvalidUtf8,
    /// The peer ended the connection: queued control frames (the answer to its close) are
    /// still written, nothing else, and no close frame of ours.
    PeerClosed,
    /// The peer is gone (no answer to pings, a failed socket): no close frame.
    Gone,
}

impl CloseReason {
    /// The close code this reason ends the connection with, if it sends a close frame.
    pub fn code(self) -> Option<u16> {
        self.close_frame_parts().map(|(code, _)| code)
    }

    /// The close frame this reason ends the connection with, if any.
    pub fn close_frame(self) -> Option<Bytes> {
        self.close_frame_parts()
            .map(|(code, reason)| frame::close(code, reason))
    }

    fn close_frame_parts(self) -> Option<(u16, &'static str)> {
        Some(match self {
            CloseReason::TooSlow => (close::TRY_AGAIN, "too slow: reconnect with since"),
            CloseReason::TooBig => (close::TOO_BIG, "frame too large"),
            CloseReason::Restart => (close::RESTART, "server restarting: reconnect"),
            CloseReason::Policy => (close::POLICY, "too many refused frames"),
            CloseReason::TokenExpired => (close::TOKEN_EXPIRED, "token expired"),
            CloseReason::Flood => (close::POLICY, "too many pings unanswered: read your socket"),
            CloseReason::ProtocolError => (close::PROTOCOL_ERROR, "protocol error"),
            CloseReason::InvalidUtf8 => (close::INVALID_DATA, "text is not UTF-8"),
            CloseReason::PeerClosed | CloseReason::Gone => return None,
        })
    }

    /// Whether the frames already queued are written before the close frame: on a
    /// restart or an expired token (the client did nothing wrong, and an `ack` queued for
    /// it must not be lost); otherwise they are dropped.
    pub fn writes_queue_first(self) -> bool {
        matches!(self, CloseReason::Restart | CloseReason::TokenExpired)
    }

    /// How a failed read ends the connection.
    pub fn after_read_error(err: &tungstenite::Error) -> Self {
        use tungstenite::error::ProtocolError as P;
        match err {
            tungstenite::Error::Capacity(_) => CloseReason::TooBig,
            tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
            // The socket closed under us: nobody to tell.
            tungstenite::Error::Protocol(P::ResetWithoutClosingHandshake)
            | tungstenite::Error::Io(_) => CloseReason::Gone,
            tungstenite::Error::Protocol(_) => CloseReason::ProtocolError,
            _ => CloseReason::PeerClosed,
        }
    }
}

/// How connections are set up (from the configuration).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Bounds of each client's live queue.
    pub bounds: Bounds,
    /// Largest message tungstenite reads at all; the session enforces the smaller
    /// `MAX_FRAME_BYTES` itself after a whole read (see `session`).
    pub read_limit: usize,
    /// `PING_INTERVAL_SECS`.
    pub ping_every: Duration,
    /// `WRITE_TIMEOUT_SECS`.
    pub write_timeout: Duration,
    /// `chat_bytes_sent_total`.
    pub bytes_sent: metrics::Counter,
}

/// Initial read buffer per connection: chat frames are small, and it is allocated eagerly.
const READ_BUFFER: usize = 1024;

/// A connection's incoming WebSocket messages.
pub type Reader = WebSocketStream<ClientIo>;

/// An open connection: its reader (the session's), its outbox (shared with the hub) and
/// its writer task.
#[derive(Debug)]
pub struct Connection {
    /// Incoming messages.
    pub reader: Reader,
    /// Outgoing frames.
    pub outbox: Arc<Outbox>,
    writer: JoinHandle<Option<writer::Ended>>,
}

impl Connection {
    /// Takes over an upgraded socket: splits it, starts the writer task.
    pub async fn open(upgraded: Upgraded, settings: &Settings) -> Self {
        let Upgraded { tcp, read_ahead } = upgraded;
        // The read-ahead bytes are a slice of hyper's read buffer (8 KiB or more): keep a
        // copy of the few bytes, not the whole buffer, for the life of the connection.
        let read_ahead = Bytes::copy_from_slice(&read_ahead);
        let (read, write) = tcp.into_split();
        let outbox = Arc::new(
            Outbox::new(Box::new(write), settings.bounds).counting(settings.bytes_sent.clone()),
        );
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(settings.read_limit))
            .max_frame_size(Some(settings.read_limit));
        let io = ClientIo {
            read: io::Cursor::new(read_ahead).chain(read),
            outbox: outbox.clone(),
        };
        let reader = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let timing = writer::Timing {
            ping_every: settings.ping_every,
            write_timeout: settings.write_timeout,
        };
        let writer = tokio::spawn(writer::run(outbox.clone(), timing));
        Connection {
            reader,
            outbox,
            writer,
        }
    }

    /// Closes the connection for `reason` (unless it is already closing for another) and
    /// waits for the writer to finish. When a close frame was sent, lets the peer's answer
    /// arrive, briefly, so the close is clean.
    pub async fn close(self, reason: CloseReason) {
        let Connection {
            mut reader,
            outbox,
            writer,
        } = self;
        outbox.close(reason);
        match writer.await {
            Ok(Some(writer::Ended::WriteFailed(err))) => debug!(error = %err, "write failed"),
            Ok(Some(writer::Ended::SocketFailed(err))) => debug!(error = %err, "socket failed"),
            Ok(Some(writer::Ended::TimedOut)) => debug!("write timed out"),
            Ok(Some(writer::Ended::MissedPings)) => debug!("peer missed two pings"),
            Ok(None) | Err(_) => {}
        }
        if outbox
            .closing()
            .and_then(CloseReason::close_frame)
            .is_some()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(_)) = reader.next().await {}
            })
            .await;
        }
    }
}

/// What tungstenite reads from and writes to: the socket's read half (after the bytes read
/// ahead), and the outbox for the frames tungstenite writes by itself.
#[derive(Debug)]
pub struct ClientIo {
    read: Chain<io::Cursor<Bytes>, OwnedReadHalf>,
    outbox: Arc<Outbox>,
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
        let _ = self
            .outbox
            .push(Bytes::copy_from_slice(buf), Class::Control);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
