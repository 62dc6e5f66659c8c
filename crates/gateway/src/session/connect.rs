//! The connect query (`?room=…&since=…&epoch=…&username=…`) and what the session does with
//! it before reading any frame: `welcome`, the username, the automatic join.
//!
//! The parameters are parsed by axum (`Query<ConnectParams>`) as plain strings and
//! validated here, because a bad value is answered with an `error` frame after `welcome`,
//! not with an HTTP error (docs/protocol.md).

use chat_protocol::{ErrorCode, FrameError, PROTOCOL_VERSION, RoomName, ServerFrame, Username};
use serde::Deserialize;

use super::Session;
use crate::config::Secret;

/// The query parameters of a connect request, unvalidated. Unknown parameters are ignored.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConnectParams {
    /// `token`: the credential when authentication is on (checked before the upgrade;
    /// redacted in `Debug`).
    pub token: Option<Secret>,
    /// `room`: joined automatically (default `DEFAULT_ROOM`).
    pub room: Option<String>,
    /// `since`: the last id the client has seen of that room.
    pub since: Option<String>,
    /// `epoch`: the room epoch `since` belongs to.
    pub epoch: Option<String>,
    /// `username`: the display name for sends that carry none.
    pub username: Option<String>,
    /// `client`: a stable id the client keeps across reconnects (1–64 of
    /// `[A-Za-z0-9_-]`); with it, a `send` carrying `ref` is stored at most once.
    pub client: Option<String>,
}

impl Session {
    /// Applies the connect query: `welcome`, the username, then the automatic join.
    pub(super) async fn start(&mut self, params: ConnectParams) {
        if !self.legacy {
            let welcome = ServerFrame::Welcome {
                instance: self.state.config.instance_id.clone(),
                conn: self.conn.to_string(),
                protocol: PROTOCOL_VERSION,
                user: self.principal.identity().map(|id| id.user.clone()),
            };
            self.reply(welcome).await;
            // At once: the automatic join may wait for Redis.
            self.outbox.write_or_defer();
        }
        // An authenticated connection's name is its token's: `username` is ignored.
        if let Some(name) = params
            .username
            .filter(|_| self.principal.identity().is_none())
        {
            match Username::new(&name) {
                Ok(name) => self.username = Some(name),
                Err(e) => {
                    let err = FrameError::new(
                        ErrorCode::InvalidUsername,
                        format!("query parameter `username`: {e}"),
                    );
                    self.refuse(err).await;
                }
            }
        }
        if let Some(client) = params.client {
            let valid = (1..=64).contains(&client.len())
                && client
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if valid {
                self.client = Some(client);
            } else {
                let err = FrameError::new(
                    ErrorCode::BadRequest,
                    "query parameter `client` must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
                );
                self.refuse(err).await;
            }
        }
        let room = match params.room {
            None => Ok(self.state.config.default_room.clone()),
            Some(r) => RoomName::new(&r).map_err(|e| {
                FrameError::new(
                    ErrorCode::InvalidRoom,
                    format!("query parameter `room`: {e}"),
                )
            }),
        };
        let since = match params.since {
            None => Ok(None),
            Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
                FrameError::new(
                    ErrorCode::BadRequest,
                    "query parameter `since` must be a non-negative integer",
                )
            }),
        };
        match (room, since) {
            (Ok(room), Ok(since)) => self.join(room, since, params.epoch, None).await,
            (Err(e), _) | (_, Err(e)) => self.refuse(e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::Query;

    use super::*;

    #[test]
    fn the_query_is_read_as_strings_and_unknown_parameters_are_ignored() {
        let uri: axum::http::Uri = "/ws?room=lobby&since=x&username=a%20b&other=1"
            .parse()
            .unwrap();
        let Query(p) = Query::<ConnectParams>::try_from_uri(&uri).unwrap();
        assert_eq!(p.room.as_deref(), Some("lobby"));
        assert_eq!(p.since.as_deref(), Some("x"));
        assert_eq!(p.username.as_deref(), Some("a b"));
        assert_eq!(p.epoch, None);
        // A parameter given twice is ambiguous: the upgrade is refused (HTTP 400).
        let twice: axum::http::Uri = "/ws?room=a&room=b".parse().unwrap();
        assert!(Query::<ConnectParams>::try_from_uri(&twice).is_err());
    }
}
