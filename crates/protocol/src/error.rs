//! Error codes carried by `error` frames, and the error a refused client frame produces.

use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown type, missing or mistyped field, empty text.
    BadRequest,
    /// `text` over `MAX_TEXT_BYTES`.
    TooLarge,
    /// Room name outside `^[A-Za-z0-9_-]{1,64}$`.
    InvalidRoom,
    /// Username empty after trimming, over 32 characters, or with control characters.
    InvalidUsername,
    /// `send` or `leave` for a room the connection has not joined.
    NotJoined,
    /// Too many frames too fast.
    RateLimited,
    /// A write without a token (`AUTH_ANONYMOUS=read`), or a `refresh` with an invalid
    /// token or another user's.
    Unauthorized,
    /// Not allowed: a `join` of a room the token does not allow, or beyond
    /// `MAX_ROOMS_PER_CONNECTION`.
    Forbidden,
    /// The message bus is down: the message was not stored; the client may retry.
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidUsername => "invalid_username",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client frame the server refuses: becomes an `error` frame, echoing `ref` when given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// The wire code.
    pub code: ErrorCode,
    /// A sentence for humans.
    pub message: String,
    /// The client's `ref`, when the frame had one.
    pub reference: Option<String>,
}

impl FrameError {
    /// A refusal without `ref`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            reference: None,
        }
    }

    /// The same refusal, echoing the client's `ref`.
    pub fn with_ref(mut self, reference: Option<String>) -> Self {
        self.reference = reference;
        self
    }
}
