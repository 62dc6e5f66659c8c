//! The `message` frame: the one frame that is stored in history, published, and replayed
//! byte for byte. Ids and timestamps are assigned by the store (Redis or the memory bus),
//! so the gateway builds a [`MessageTemplate`] and the store splices the id and the time in.

use serde::{Deserialize, Serialize};

use crate::RoomName;

/// A chat message as a client receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageFrame {
    /// The room.
    pub room: String,
    /// Per-room id: consecutive from 1.
    pub id: u64,
    /// Author's display name.
    pub username: String,
    /// Author's user id (the token's `sub`), when the author was authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The message.
    pub text: String,
    /// Milliseconds since the Unix epoch, assigned by the store.
    pub ts: u64,
}

/// A `message` frame without its id and timestamp: `head` + id + `middle` + ts + `}` is the
/// exact JSON that serde would produce for the same [`MessageFrame`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageTemplate {
    /// `{"type":"message","room":"R","id":`
    pub head: String,
    /// `,"username":"...","text":"...","ts":` (with `"user":"..."` after the username
    /// when the author is authenticated)
    pub middle: String,
}

/// The closing byte that follows the timestamp.
pub const TEMPLATE_TAIL: &str = "}";

impl MessageTemplate {
    /// Builds the template of an anonymous author's message; `username` and `text` are
    /// JSON-escaped here, once.
    pub fn new(room: &RoomName, username: &str, text: &str) -> Self {
        Self::with_user(room, username, None, text)
    }

    /// Builds the template; `user` is the authenticated author's id.
    pub fn with_user(room: &RoomName, username: &str, user: Option<&str>, text: &str) -> Self {
        // Room names are [A-Za-z0-9_-]: nothing to escape.
        let head = format!(r#"{{"type":"message","room":"{room}","id":"#);
        // Escaped straight into one buffer (this runs for every message sent).
        let user_len = user.map_or(0, |u| u.len() + 10);
        let mut middle =
            Vec::with_capacity(32 + username.len() + user_len + text.len() + text.len() / 8);
        middle.extend_from_slice(br#","username":"#);
        push_json_str(&mut middle, username);
        if let Some(user) = user {
            middle.extend_from_slice(br#","user":"#);
            push_json_str(&mut middle, user);
        }
        middle.extend_from_slice(br#","text":"#);
        push_json_str(&mut middle, text);
        middle.extend_from_slice(br#","ts":"#);
        // serde_json writes UTF-8 only; the fallback is never taken.
        let middle = String::from_utf8(middle)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        MessageTemplate { head, middle }
    }

    /// The full frame for `id` and `ts`.
    pub fn render(&self, id: u64, ts: u64) -> String {
        let mut out = String::with_capacity(self.head.len() + self.middle.len() + 42);
        out.push_str(&self.head);
        out.push_str(&id.to_string());
        out.push_str(&self.middle);
        out.push_str(&ts.to_string());
        out.push_str(TEMPLATE_TAIL);
        out
    }
}

/// Appends `s` as a JSON string, escaped as serde encodes it (writing to a `Vec` cannot
/// fail).
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Reads the `id` of a stored `message` frame without building the whole frame.
pub fn peek_id(frame: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Head {
        id: u64,
    }
    serde_json::from_slice::<Head>(frame).ok().map(|h| h.id)
}

/// Reads the `ts` of a stored `message` frame from its end (`…,"ts":N}`, the layout
/// [`MessageTemplate::render`] and the publish script produce) without parsing the rest.
pub fn peek_ts(frame: &[u8]) -> Option<u64> {
    let body = frame.strip_suffix(TEMPLATE_TAIL.as_bytes())?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (head, ts) = body.split_at(body.len() - digits);
    if digits == 0 || !head.ends_with(b"\"ts\":") {
        return None;
    }
    std::str::from_utf8(ts).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerFrame;

    #[test]
    fn template_renders_exactly_what_serde_encodes() {
        let room = RoomName::new("general").unwrap();
        for (name, user, text) in [
            ("ann", None, "hi"),
            ("ann", Some("u-1"), "hi"),
            (
                "b\"o\\b",
                Some("id\"with\\quotes"),
                "line\nbreak\t<img src=x onerror=alert(1)> \u{1F600} \u{2028}",
            ),
            ("zoë", None, "\u{0}\u{1f}"),
        ] {
            let t = MessageTemplate::with_user(&room, name, user, text);
            let rendered = t.render(42, 1_764_500_000_000);
            let frame = ServerFrame::Message(MessageFrame {
                room: "general".into(),
                id: 42,
                username: name.into(),
                user: user.map(str::to_owned),
                text: text.into(),
                ts: 1_764_500_000_000,
            });
            assert_eq!(rendered, serde_json::to_string(&frame).unwrap());
            assert_eq!(peek_id(rendered.as_bytes()), Some(42));
        }
    }

    #[test]
    fn peek_ts_reads_the_last_field_and_refuses_anything_else() {
        let room = RoomName::new("r").unwrap();
        let t = MessageTemplate::with_user(&room, "ann", Some("u1"), "\"ts\":5}");
        assert_eq!(
            peek_ts(t.render(7, 1_700_000_000_123).as_bytes()),
            Some(1_700_000_000_123)
        );
        assert_eq!(peek_ts(br#"{"ts":}"#), None);
        assert_eq!(peek_ts(br#"{"id":12}"#), None);
        assert_eq!(peek_ts(b"12}"), None);
        assert_eq!(peek_ts(b""), None);
    }

    #[test]
    fn peek_id_refuses_non_messages() {
        assert_eq!(peek_id(b"not json"), None);
        assert_eq!(peek_id(br#"{"type":"message"}"#), None);
        assert_eq!(peek_id(br#"{"id":-1}"#), None);
    }
}
