//! Who may call the API: the bearer credential of a request, the constant-time check of
//! an API key, and whether the caller may read a room (an API key, a user token that
//! allows it, or nothing when authentication is off), with the room named in the path.
//! It does not verify user tokens (`auth` does) and never logs a key or a token.

use axum::{
    extract::{Path, rejection::PathRejection},
    http::{HeaderMap, header},
};
use chat_protocol::{ErrorCode, RoomName};
use subtle::ConstantTimeEq;
use tracing::debug;

use super::{doc::RoomPath, error::Failure};
use crate::{
    auth::{AuthError, Principal},
    config::Secret,
    state::AppState,
};

/// The room named in the path.
pub(super) fn room(path: Result<Path<RoomPath>, PathRejection>) -> Result<RoomName, Failure> {
    let name = path
        .map(|Path(p)| p.room)
        .map_err(|r| Failure::new(ErrorCode::InvalidRoom, r.body_text()))?;
    RoomName::new(&name).map_err(|err| Failure::new(ErrorCode::InvalidRoom, err.to_string()))
}

/// The bearer credential of a request, if it has an `Authorization` header at all.
pub(super) fn credential(headers: &HeaderMap) -> Result<Option<&str>, Failure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        || Failure::unauthorized("the Authorization header must be `Bearer <credential>`");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, credential) = value.split_once(' ').ok_or_else(malformed)?;
    let credential = credential.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || credential.is_empty() {
        return Err(malformed());
    }
    Ok(Some(credential))
}

/// Whether `presented` is one of `keys`. Digests of equal length are compared in constant
/// time, with every key compared whatever the outcome of the others, so the time taken
/// says neither which key matched nor how much of one.
pub(super) fn is_api_key(keys: &[Secret], presented: &str) -> bool {
    use sha2::{Digest, Sha256};
    let presented = Sha256::digest(presented.as_bytes());
    let found = keys.iter().fold(subtle::Choice::from(0), |found, key| {
        let key = Sha256::digest(key.expose().as_bytes());
        found | key.as_slice().ct_eq(presented.as_slice())
    });
    found.into()
}

/// The room of a read, once the caller may read it: with an API key; with a user token
/// that allows the room (authentication on); with nothing when authentication is off or
/// allows anonymous readers (`AUTH_ANONYMOUS=read`) — a join would show the same. A
/// credential that is presented must be valid either way.
pub(super) async fn readable_room(
    state: &AppState,
    headers: &HeaderMap,
    path: Result<Path<RoomPath>, PathRejection>,
) -> Result<RoomName, Failure> {
    let principal = match credential(headers)? {
        Some(presented) if is_api_key(&state.config.api_keys, presented) => Principal::Open,
        presented => match (&state.auth, presented) {
            (None, None) => Principal::Open,
            (None, Some(_)) => {
                return Err(Failure::unauthorized(
                    "not a valid API key (authentication is off: reads need no credential)",
                ));
            }
            (Some(auth), presented) => auth.principal(presented).await.map_err(|why| {
                debug!(reason = %why, "server API: refused a read");
                Failure::unauthorized(match why {
                    AuthError::Missing => {
                        "an API key or a user token is required: Authorization: Bearer <credential>"
                            .to_owned()
                    }
                    other => other.to_string(),
                })
            })?,
        },
    };
    let room = room(path)?;
    if principal.may_join(&room) {
        Ok(room)
    } else {
        Err(Failure::new(
            ErrorCode::Forbidden,
            format!("the token does not allow room {room}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = [
            Secret::new("first-key-of-16-chars"),
            Secret::new("second-key-of-16-chars"),
        ];
        assert!(is_api_key(&keys, "first-key-of-16-chars"));
        assert!(is_api_key(&keys, "second-key-of-16-chars"));
        for wrong in ["", "first-key-of-16-char", "first-key-of-16-charsX", "x"] {
            assert!(!is_api_key(&keys, wrong), "{wrong:?}");
        }
        assert!(!is_api_key(&[], "first-key-of-16-chars"));
    }

    #[test]
    fn the_credential_is_a_bearer() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        assert_eq!(credential(&HeaderMap::new()).unwrap(), None);
        assert_eq!(credential(&with("Bearer abc")).unwrap(), Some("abc"));
        assert_eq!(credential(&with("bearer  abc ")).unwrap(), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert!(credential(&with(bad)).is_err(), "{bad:?}");
        }
    }
}
