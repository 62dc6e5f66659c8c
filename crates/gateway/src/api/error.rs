//! How the API refuses: `Failure`, an error code and a sentence, answered with the status
//! that follows from the code and the body `{"error","message"}` (`WWW-Authenticate:
//! Bearer` on a 401). A bus failure's detail goes to the log, not to the caller. It does
//! not decide when to refuse (the handlers, `access` and the body checks do).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use chat_protocol::{ErrorCode, RoomName};
use tracing::warn;

use super::doc::ErrorBody;
use crate::bus::BusError;

/// A refusal: its status follows from its code; the body is `{"error","message"}`.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) code: ErrorCode,
    message: String,
}

impl Failure {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }

    /// A bus failure: the detail is for the log, not for the caller.
    pub(super) fn unavailable(room: &RoomName, err: &BusError) -> Self {
        warn!(%room, error = %err, "server API: the message bus failed");
        Self::new(
            ErrorCode::Unavailable,
            "the message bus is unavailable, try again",
        )
    }

    fn status(&self) -> StatusCode {
        match self.code {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::BadRequest
            | ErrorCode::InvalidRoom
            | ErrorCode::InvalidUsername
            | ErrorCode::NotJoined => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(ErrorBody {
            error: self.code.as_str(),
            message: self.message,
        });
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
