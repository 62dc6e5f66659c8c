//! Frames the server sends. `message` frames on the hot path are never built from this
//! enum (they are rendered once from a [`crate::MessageTemplate`] and shared); the enum
//! serves the control frames and lets clients and tests decode everything.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, MessageFrame};

/// Any server → client frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every `/ws` connection.
    Welcome {
        /// The instance's id (`INSTANCE_ID`).
        instance: String,
        /// This connection's id on that instance.
        conn: String,
        /// Protocol version, 1.
        protocol: u32,
        /// The authenticated user's id (the token's `sub`); absent when anonymous.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// A chat message, replayed or live.
    Message(MessageFrame),
    /// The end of a join's history replay: live from `last_id + 1`.
    Joined {
        /// The room.
        room: String,
        /// Id of the last message delivered before this frame (0 for an empty room).
        last_id: u64,
        /// False when the requested `since` could not be honoured (messages are gone).
        recovered: bool,
        /// The room's epoch: changes when the room's ids start again (its data was lost).
        /// Give it back with `since` when resuming. An extension of protocol v1.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// The answer to `leave`.
    Left {
        /// The room.
        room: String,
    },
    /// A `send` carrying `ref` was stored and published.
    Ack {
        /// The client's `ref`.
        #[serde(rename = "ref")]
        reference: String,
        /// The room.
        room: String,
        /// The id the message got.
        id: u64,
    },
    /// Who is in the room: sent after `joined`.
    Presence {
        /// The room.
        room: String,
        /// How many users are in the room (exact).
        count: u64,
        /// At most `PRESENCE_MAX_USERS` of them.
        users: Vec<PresenceUser>,
    },
    /// Users who came into or left the room (each listed once, however many
    /// connections they have).
    PresenceDiff {
        /// The room.
        room: String,
        /// Who came.
        joined: Vec<PresenceUser>,
        /// Who left.
        left: Vec<PresenceUser>,
    },
    /// Someone else in the room is typing (relayed at most every 2 s per user and room).
    Typing {
        /// The room.
        room: String,
        /// Their user id.
        user: String,
        /// Their display name.
        name: String,
    },
    /// The answer to a valid `refresh`: the connection's token now expires at `exp`.
    Refreshed {
        /// The new token's `exp`, Unix seconds.
        exp: u64,
    },
    /// A refused frame.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable text.
        message: String,
        /// The client's `ref`, when the refused frame had one.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

/// A user in a presence list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PresenceUser {
    /// The user id (a token's `sub`, or `anon-<instance>-<conn>` without authentication).
    pub user: String,
    /// The display name.
    pub name: String,
}

impl ServerFrame {
    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Every field is a string, integer or bool: encoding cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frames() {
        let cases = [
            (
                ServerFrame::Welcome {
                    instance: "web.1".into(),
                    conn: "7".into(),
                    protocol: 1,
                    user: None,
                },
                r#"{"type":"welcome","instance":"web.1","conn":"7","protocol":1}"#,
            ),
            (
                ServerFrame::Welcome {
                    instance: "web.1".into(),
                    conn: "7".into(),
                    protocol: 1,
                    user: Some("u1".into()),
                },
                r#"{"type":"welcome","instance":"web.1","conn":"7","protocol":1,"user":"u1"}"#,
            ),
            (
                ServerFrame::Refreshed { exp: 1764503600 },
                r#"{"type":"refreshed","exp":1764503600}"#,
            ),
            (
                ServerFrame::Joined {
                    room: "R".into(),
                    last_id: 42,
                    recovered: true,
                    epoch: None,
                },
                r#"{"type":"joined","room":"R","last_id":42,"recovered":true}"#,
            ),
            (
                ServerFrame::Joined {
                    room: "R".into(),
                    last_id: 42,
                    recovered: false,
                    epoch: Some("9f2c".into()),
                },
                r#"{"type":"joined","room":"R","last_id":42,"recovered":false,"epoch":"9f2c"}"#,
            ),
            (
                ServerFrame::Left { room: "R".into() },
                r#"{"type":"left","room":"R"}"#,
            ),
            (
                ServerFrame::Ack {
                    reference: "c-7".into(),
                    room: "R".into(),
                    id: 43,
                },
                r#"{"type":"ack","ref":"c-7","room":"R","id":43}"#,
            ),
            (
                ServerFrame::Error {
                    code: ErrorCode::NotJoined,
                    message: "join first".into(),
                    reference: None,
                },
                r#"{"type":"error","code":"not_joined","message":"join first"}"#,
            ),
            (
                ServerFrame::Error {
                    code: ErrorCode::Unavailable,
                    message: "down".into(),
                    reference: Some("c-7".into()),
                },
                r#"{"type":"error","code":"unavailable","message":"down","ref":"c-7"}"#,
            ),
            (
                ServerFrame::Message(MessageFrame {
                    room: "R".into(),
                    id: 42,
                    username: "ann".into(),
                    user: None,
                    text: "hi".into(),
                    ts: 1764500000000,
                }),
                r#"{"type":"message","room":"R","id":42,"username":"ann","text":"hi","ts":1764500000000}"#,
            ),
            (
                ServerFrame::Message(MessageFrame {
                    room: "R".into(),
                    id: 43,
                    username: "ann".into(),
                    user: Some("u1".into()),
                    text: "hi".into(),
                    ts: 1764500000001,
                }),
                r#"{"type":"message","room":"R","id":43,"username":"ann","user":"u1","text":"hi","ts":1764500000001}"#,
            ),
        ];
        for (frame, json) in cases {
            assert_eq!(frame.to_json(), json);
            assert_eq!(serde_json::from_str::<ServerFrame>(json).unwrap(), frame);
        }
    }
}
