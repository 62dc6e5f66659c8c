//! A protocol-aware WebSocket test client.

use anyhow::{Context, bail};
use chat_protocol::{MessageFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

use crate::WAIT;

/// The replay and `joined` frame that answer a join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// Messages received before `joined`.
    pub messages: Vec<MessageFrame>,
    /// `joined.last_id`.
    pub last_id: u64,
    /// `joined.recovered`.
    pub recovered: bool,
    /// `joined.epoch`.
    pub epoch: Option<String>,
}

impl Joined {
    /// Ids of the replayed messages.
    pub fn ids(&self) -> Vec<u64> {
        self.messages.iter().map(|m| m.id).collect()
    }
}

/// A WebSocket client connection.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (ws, _) = tokio::time::timeout(WAIT, connect_async(url))
            .await
            .context("connect timed out")?
            .with_context(|| format!("connect to {url}"))?;
        Ok(WsClient { ws })
    }

    /// Connects with a small receive buffer of `bytes` (which turns off the kernel's
    /// auto-tuning), so that the server's writes block as soon as this client stops
    /// reading: a slow reader.
    pub async fn connect_slow_reader(url: &str, bytes: u32) -> anyhow::Result<Self> {
        let hostport = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .context("not a ws:// URL")?;
        let addr = tokio::net::lookup_host(hostport)
            .await?
            .next()
            .context("no address")?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(bytes)?;
        let tcp = socket.connect(addr).await?;
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)),
        )
        .await
        .context("connect timed out")??;
        Ok(WsClient { ws })
    }

    /// Connects with extra handshake headers (e.g. `Origin`); returns the HTTP status
    /// when the server refuses the upgrade.
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Result<Self, u16>> {
        use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest, http::HeaderValue};
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())?;
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value)?);
        }
        match tokio::time::timeout(WAIT, connect_async(request)).await? {
            Ok((ws, _)) => Ok(Ok(WsClient { ws })),
            Err(Error::Http(response)) => Ok(Err(response.status().as_u16())),
            Err(e) => Err(e.into()),
        }
    }

    /// Connects to `/ws?{query}` on `gateway`-style base URL and reads `welcome`.
    /// Returns the client and the instance id.
    pub async fn connect_ws(url: &str) -> anyhow::Result<(Self, String)> {
        let mut c = Self::connect(url).await?;
        match c.recv().await? {
            ServerFrame::Welcome { instance, .. } => Ok((c, instance)),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into().into())).await?;
        Ok(())
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: serde_json::Value) -> anyhow::Result<()> {
        self.send_text(value.to_string()).await
    }

    /// Sends a raw WebSocket message.
    pub async fn send_message(&mut self, message: Message) -> anyhow::Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// `{"type":"join","room":room,"since":since}`
    pub async fn join(&mut self, room: &str, since: Option<u64>) -> anyhow::Result<()> {
        let mut frame = serde_json::json!({"type": "join", "room": room});
        if let Some(since) = since {
            frame["since"] = since.into();
        }
        self.send_json(frame).await
    }

    /// `{"type":"send","room":room,"text":text,"ref":reference}`
    pub async fn say(
        &mut self,
        room: &str,
        text: &str,
        reference: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut frame = serde_json::json!({"type": "send", "room": room, "text": text});
        if let Some(r) = reference {
            frame["ref"] = r.into();
        }
        self.send_json(frame).await
    }

    /// The next text frame that is not a presence or typing signal (see
    /// [`WsClient::recv_any_text`]). Most tests are about the message stream and must
    /// not trip over who-is-online frames, which arrive whenever someone joins.
    pub async fn recv_text(&mut self) -> anyhow::Result<String> {
        loop {
            let text = self.recv_any_text().await?;
            if !is_signal(&text) {
                return Ok(text);
            }
        }
    }

    /// The next text frame of any type, skipping pings and pongs. Fails on close or
    /// after [`WAIT`].
    pub async fn recv_any_text(&mut self) -> anyhow::Result<String> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("no frame arrived in time")?;
            match next {
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(frame))) => bail!("connection closed: {frame:?}"),
                Some(Ok(other)) => bail!("unexpected message {other:?}"),
                Some(Err(e)) => bail!("read failed: {e}"),
                None => bail!("connection ended"),
            }
        }
    }

    /// The next frame that is not a presence or typing signal, decoded.
    pub async fn recv(&mut self) -> anyhow::Result<ServerFrame> {
        let text = self.recv_text().await?;
        serde_json::from_str(&text).with_context(|| format!("undecodable frame {text}"))
    }

    /// The next frame of any type, presence and typing included, decoded.
    pub async fn recv_any(&mut self) -> anyhow::Result<ServerFrame> {
        let text = self.recv_any_text().await?;
        serde_json::from_str(&text).with_context(|| format!("undecodable frame {text}"))
    }

    /// The next frame, which must be a `message`.
    pub async fn recv_message(&mut self) -> anyhow::Result<MessageFrame> {
        match self.recv().await? {
            ServerFrame::Message(m) => Ok(m),
            other => bail!("expected a message, got {other:?}"),
        }
    }

    /// The next frame, which must be an `error`: its code and `ref`.
    pub async fn recv_error(
        &mut self,
    ) -> anyhow::Result<(chat_protocol::ErrorCode, Option<String>)> {
        match self.recv().await? {
            ServerFrame::Error {
                code, reference, ..
            } => Ok((code, reference)),
            other => bail!("expected an error, got {other:?}"),
        }
    }

    /// Reads `message` frames up to `joined` for `room`.
    pub async fn until_joined(&mut self, room: &str) -> anyhow::Result<Joined> {
        let mut messages = Vec::new();
        loop {
            match self.recv().await? {
                ServerFrame::Message(m) => messages.push(m),
                ServerFrame::Joined {
                    room: r,
                    last_id,
                    recovered,
                    epoch,
                } if r == room => {
                    return Ok(Joined {
                        messages,
                        last_id,
                        recovered,
                        epoch,
                    });
                }
                other => bail!("expected messages then joined {room}, got {other:?}"),
            }
        }
    }

    /// Waits for the server to close the connection; returns the close code (None when
    /// the connection ended without a close frame). Frames before the close are skipped.
    pub async fn closed(&mut self) -> anyhow::Result<Option<u16>> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("the server did not close the connection in time")?;
            match next {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        Ok(())
    }

    /// The underlying stream, for tests that need raw control.
    pub fn inner(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}

/// Whether a server frame is a presence or typing signal rather than part of the
/// message stream.
pub fn is_signal(text: &str) -> bool {
    let head: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    matches!(
        head.get("type").and_then(|t| t.as_str()),
        Some("presence" | "presence_diff" | "typing")
    )
}
