//! A connection's token over time: `refresh` replaces it with a new one for the same user,
//! and the session closes the connection with 4001 when it expires unrefreshed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_protocol::{ErrorCode, FrameError, RoomName, ServerFrame};
use tokio::time::Instant;
use tracing::debug;

use super::Session;
use crate::auth::{LEEWAY_SECS, Principal};

/// When a token with this `exp` (Unix seconds) stops being accepted.
pub(super) fn deadline(exp: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Instant::now() + Duration::from_secs((exp + LEEWAY_SECS).saturating_sub(now))
}

/// A deadline that never comes, for connections without a token.
pub(super) fn never() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

impl Session {
    /// Verifies `token` and, if it is valid and for the same user, makes it the
    /// connection's: its name applies to later messages, its `exp` to the connection, and
    /// the rooms it no longer allows are left (each with `left`). Anything else is refused
    /// `unauthorized` and changes nothing.
    pub(super) async fn refresh(&mut self, token: String, reference: Option<String>) {
        let Some(auth) = self.state.auth.clone() else {
            let err = FrameError::new(ErrorCode::BadRequest, "authentication is not enabled");
            return self.refuse(err.with_ref(reference)).await;
        };
        let verified = auth.verify(&token).await;
        let current = self.principal.identity().map(|id| id.user.clone());
        let identity = match verified {
            Ok(identity) if Some(&identity.user) == current.as_ref() => identity,
            Ok(_) => {
                let err = FrameError::new(
                    ErrorCode::Unauthorized,
                    "the token is for another user: reconnect to change users",
                );
                return self.refuse(err.with_ref(reference)).await;
            }
            Err(why) => {
                let err = FrameError::new(ErrorCode::Unauthorized, why.to_string());
                return self.refuse(err.with_ref(reference)).await;
            }
        };
        let exp = identity.exp;
        let gone: Vec<RoomName> = self
            .rooms
            .iter()
            .map(|(room, _)| room.clone())
            .filter(|room| !identity.rooms.allows(room))
            .collect();
        self.principal = Principal::User(identity);
        self.expires_at = Some(deadline(exp));
        debug!(exp, left = gone.len(), "token refreshed");
        for room in gone {
            self.leave_room(room).await;
        }
        self.reply(ServerFrame::Refreshed { exp }).await;
    }
}
