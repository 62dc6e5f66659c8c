//! The WebSocket handshake (RFC 6455 §4.2), as an axum extractor: axum's own
//! `WebSocketUpgrade` hides the socket, and the write path needs it.
//!
//! [`Upgrade`] checks the request like axum's does (an HTTP/1.1 GET with `Connection:
//! upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a key) and answers
//! `101`. Once hyper hands the connection over, [`Upgrade::on_upgrade`] takes the TCP
//! stream back out of it with hyper's `Upgraded::downcast`, together with any bytes the
//! HTTP server read past the request, so the transport owns the socket outright. That
//! works because the server speaks HTTP/1.1 on plain `TcpStream`s (see `crate::app`): an
//! auto-detecting HTTP/1+2 server would wrap the stream in a type that cannot be
//! downcast.

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header, request::Parts},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, error};

/// An HTTP/1.1 WebSocket upgrade request, validated (method, `Connection`, `Upgrade`,
/// `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`).
#[derive(Debug)]
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
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
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRejection::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade })
    }
}

/// An upgraded connection: the socket, and the bytes the HTTP server had already read
/// past the request (a client may send its first frame with the request).
#[derive(Debug)]
pub struct Upgraded {
    /// The socket.
    pub tcp: TcpStream,
    /// Bytes that were read from `tcp` but belong to the WebSocket.
    pub read_ahead: Bytes,
}

impl Upgrade {
    /// Answers `101 Switching Protocols` and, once hyper hands the connection over, runs
    /// `serve` with it.
    pub fn on_upgrade<F, Fut>(self, serve: F) -> Response
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Upgrade { key, on_upgrade } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    debug!(error = %err, "upgrade failed");
                    return;
                }
            };
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    serve(Upgraded {
                        tcp: parts.io.into_inner(),
                        read_ahead: parts.read_buf,
                    })
                    .await;
                }
                // Only a server that is not ours (see the module docs) gets here.
                Err(_) => error!("upgraded connection is not a plain TCP stream; dropped"),
            }
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
