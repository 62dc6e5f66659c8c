//! Frames clients send, and the one function that turns a text frame into a valid
//! [`ClientFrame`] or a [`FrameError`] carrying the right code and the client's `ref`.

use serde::Deserialize;

use crate::{ErrorCode, FrameError, RoomName, Username};

/// Limits that depend on the server's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `text`, in bytes of UTF-8.
    pub max_text_bytes: usize,
}

/// A valid client frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"join","room":"R","since":41}`
    Join {
        /// The room to join.
        room: RoomName,
        /// Last id the client has seen, to resume from.
        since: Option<u64>,
        /// The room epoch `since` belongs to (from an earlier `joined`).
        epoch: Option<String>,
        /// Echoed in an `error` about this frame.
        reference: Option<String>,
    },
    /// `{"type":"leave","room":"R"}`
    Leave {
        /// The room to leave.
        room: RoomName,
        /// Echoed in an `error` about this frame.
        reference: Option<String>,
    },
    /// `{"type":"send",...}`, or the original sample's bare `{"username","text"}` (then
    /// `room` is `None`: the connection's first joined room).
    Send {
        /// Target room; `None` for a bare frame.
        room: Option<RoomName>,
        /// The message, 1..=`max_text_bytes` bytes.
        text: String,
        /// Overrides the connection's username.
        username: Option<Username>,
        /// Echoed in `ack` or `error`.
        reference: Option<String>,
    },
    /// `{"type":"typing","room":"R"}`: the client's user is typing in `room`.
    Typing {
        /// The room (must be joined).
        room: RoomName,
        /// Echoed in an `error` about this frame.
        reference: Option<String>,
    },
    /// `{"type":"refresh","token":"…"}`: a new token for the same user, before the
    /// current one expires.
    Refresh {
        /// The new token (never logged).
        token: String,
        /// Echoed in an `error` about this frame.
        reference: Option<String>,
    },
}

impl ClientFrame {
    /// The client's `ref`, if the frame carried one.
    pub fn reference(&self) -> Option<&str> {
        match self {
            ClientFrame::Join { reference, .. }
            | ClientFrame::Leave { reference, .. }
            | ClientFrame::Send { reference, .. }
            | ClientFrame::Typing { reference, .. }
            | ClientFrame::Refresh { reference, .. } => reference.as_deref(),
        }
    }
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    kind: Option<String>,
    room: Option<String>,
    since: Option<u64>,
    text: Option<String>,
    username: Option<String>,
    epoch: Option<String>,
    token: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<String>,
}

/// Parses and validates one text frame.
pub fn parse_client_frame(input: &str, limits: Limits) -> Result<ClientFrame, FrameError> {
    // Only a JSON object is a frame: serde's derive would also read an array as the
    // positional form of the field list.
    if !input.trim_start().starts_with('{') {
        let message = match serde_json::from_str::<serde_json::Value>(input) {
            Ok(_) => "a frame is a JSON object".to_owned(),
            Err(err) => format!("not valid JSON: {err}"),
        };
        return Err(FrameError::new(ErrorCode::BadRequest, message));
    }
    let raw: Raw = serde_json::from_str(input).map_err(|err| {
        let message = if err.is_syntax() || err.is_eof() {
            format!("not valid JSON: {err}")
        } else {
            format!("malformed frame: {err}")
        };
        FrameError::new(ErrorCode::BadRequest, message).with_ref(salvage_ref(input))
    })?;
    let reference = raw.reference.clone();
    validate(raw, limits).map_err(|e| e.with_ref(reference))
}

/// Finds a string `ref` in a frame that failed to parse as a whole, so the error can echo it.
fn salvage_ref(input: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct RefOnly {
        #[serde(rename = "ref")]
        reference: Option<serde_json::Value>,
    }
    match serde_json::from_str::<RefOnly>(input).ok()?.reference? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

fn validate(raw: Raw, limits: Limits) -> Result<ClientFrame, FrameError> {
    match raw.kind.as_deref() {
        Some("join") => Ok(ClientFrame::Join {
            room: room(raw.room)?,
            since: raw.since,
            epoch: raw.epoch,
            reference: raw.reference,
        }),
        Some("leave") => Ok(ClientFrame::Leave {
            room: room(raw.room)?,
            reference: raw.reference,
        }),
        Some("send") => {
            let room = room(raw.room)?;
            send(Some(room), raw.text, raw.username, raw.reference, limits)
        }
        Some("typing") => Ok(ClientFrame::Typing {
            room: room(raw.room)?,
            reference: raw.reference,
        }),
        Some("refresh") => Ok(ClientFrame::Refresh {
            token: raw
                .token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| FrameError::new(ErrorCode::BadRequest, "missing field `token`"))?,
            reference: raw.reference,
        }),
        Some(other) => Err(FrameError::new(
            ErrorCode::BadRequest,
            format!("unknown frame type {other:?}"),
        )),
        None if raw.text.is_some() => send(None, raw.text, raw.username, raw.reference, limits),
        None => Err(FrameError::new(
            ErrorCode::BadRequest,
            "missing field `type`",
        )),
    }
}

fn room(room: Option<String>) -> Result<RoomName, FrameError> {
    let room =
        room.ok_or_else(|| FrameError::new(ErrorCode::BadRequest, "missing field `room`"))?;
    RoomName::new(&room).map_err(|e| FrameError::new(ErrorCode::InvalidRoom, e.to_string()))
}

fn send(
    room: Option<RoomName>,
    text: Option<String>,
    username: Option<String>,
    reference: Option<String>,
    limits: Limits,
) -> Result<ClientFrame, FrameError> {
    let text =
        text.ok_or_else(|| FrameError::new(ErrorCode::BadRequest, "missing field `text`"))?;
    if text.is_empty() {
        return Err(FrameError::new(ErrorCode::BadRequest, "`text` is empty"));
    }
    if text.len() > limits.max_text_bytes {
        return Err(FrameError::new(
            ErrorCode::TooLarge,
            format!(
                "`text` is {} bytes; the limit is {}",
                text.len(),
                limits.max_text_bytes
            ),
        ));
    }
    let username = username
        .map(|u| Username::new(&u))
        .transpose()
        .map_err(|e| FrameError::new(ErrorCode::InvalidUsername, e.to_string()))?;
    Ok(ClientFrame::Send {
        room,
        text,
        username,
        reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_text_bytes: 10 };

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(s, LIMITS)
    }

    fn code(s: &str) -> (ErrorCode, Option<String>) {
        let e = parse(s).unwrap_err();
        (e.code, e.reference)
    }

    #[test]
    fn valid_frames() {
        assert_eq!(
            parse(r#"{"type":"join","room":"R","since":41}"#),
            Ok(ClientFrame::Join {
                room: RoomName::new("R").unwrap(),
                since: Some(41),
                epoch: None,
                reference: None,
            })
        );
        assert_eq!(
            parse(r#"{"type":"leave","room":"R","extra":[1]}"#),
            Ok(ClientFrame::Leave {
                room: RoomName::new("R").unwrap(),
                reference: None,
            })
        );
        assert_eq!(
            parse(r#"{"type":"send","room":"R","text":"hi","username":" ann ","ref":"c-7"}"#),
            Ok(ClientFrame::Send {
                room: Some(RoomName::new("R").unwrap()),
                text: "hi".into(),
                username: Some(Username::new("ann").unwrap()),
                reference: Some("c-7".into()),
            })
        );
        assert_eq!(
            parse(r#"{"username":"ann","text":"hi"}"#),
            Ok(ClientFrame::Send {
                room: None,
                text: "hi".into(),
                username: Some(Username::new("ann").unwrap()),
                reference: None,
            })
        );
    }

    #[test]
    fn refusals_have_the_right_code_and_echo_ref() {
        use ErrorCode::*;
        let r = Some("r1".to_string());
        assert_eq!(code("nope"), (BadRequest, None));
        assert_eq!(code("[1,2]"), (BadRequest, None));
        assert_eq!(
            code(r#"{"type":"dance","ref":"r1"}"#),
            (BadRequest, r.clone())
        );
        assert_eq!(
            code(r#"{"type":"send","room":"R","ref":"r1"}"#),
            (BadRequest, r.clone())
        );
        assert_eq!(
            code(r#"{"type":"send","room":"R","text":"","ref":"r1"}"#),
            (BadRequest, r.clone())
        );
        assert_eq!(code(r#"{"type":"join"}"#), (BadRequest, None));
        assert_eq!(
            code(r#"{"type":"join","room":"a b","ref":"r1"}"#),
            (InvalidRoom, r.clone())
        );
        assert_eq!(
            code(r#"{"type":"join","room":"R","since":-1,"ref":"r1"}"#),
            (BadRequest, r.clone())
        );
        assert_eq!(
            code(r#"{"type":"send","room":"R","text":"12345678901","ref":"r1"}"#),
            (TooLarge, r.clone())
        );
        assert_eq!(
            code(r#"{"type":"send","room":"R","text":"x","username":"  ","ref":"r1"}"#),
            (InvalidUsername, r.clone())
        );
        assert_eq!(code(r#"{"username":"ann"}"#), (BadRequest, None));
        assert_eq!(
            code(r#"{"type":"send","room":"R","text":"\ud800"}"#),
            (BadRequest, None)
        );
        assert_eq!(code(r#"{"type":5,"ref":"r1"}"#), (BadRequest, r));
    }

    #[test]
    fn refresh_carries_a_token() {
        assert_eq!(
            parse(r#"{"type":"refresh","token":"a.b.c","ref":"r"}"#),
            Ok(ClientFrame::Refresh {
                token: "a.b.c".into(),
                reference: Some("r".into()),
            })
        );
        assert_eq!(
            code(r#"{"type":"refresh","ref":"r1"}"#),
            (ErrorCode::BadRequest, Some("r1".into()))
        );
    }

    #[test]
    fn text_limit_counts_bytes_not_characters() {
        // 5 two-byte characters = 10 bytes: at the limit.
        assert!(parse(r#"{"type":"send","room":"R","text":"ééééé"}"#).is_ok());
        assert_eq!(
            code(r#"{"type":"send","room":"R","text":"éééééé"}"#).0,
            ErrorCode::TooLarge
        );
    }
}
