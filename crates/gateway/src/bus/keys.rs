//! The only place Redis key and channel names are built. The room is the hash tag, so a
//! room's counter, history and channel share one Redis Cluster slot (the publish script
//! touches all three atomically).

use std::{fmt::Write as _, ops::Range};

use bytes::BytesMut;
use chat_protocol::RoomName;

/// Key and channel names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix` (`REDIS_PREFIX`).
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// `chat:{R}:seq` — the id counter.
    pub fn seq(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:seq", self.prefix)
    }

    /// `chat:{R}:history` — the capped list of `message` frames.
    pub fn history(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:history", self.prefix)
    }

    /// `chat:{R}:epoch` — a random token that changes when the room's ids start again.
    pub fn epoch(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:epoch", self.prefix)
    }

    /// `chat:{R}:sent:DIGEST` — the record of an idempotent send (its stored frame).
    pub fn sent(&self, room: &RoomName, digest: &str) -> String {
        format!("{}:{{{room}}}:sent:{digest}", self.prefix)
    }

    /// `chat:{R}:presence` — leases: `INSTANCE\x1fUSER` scored by expiry (ms).
    pub fn presence(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence", self.prefix)
    }

    /// `chat:{R}:presence:users` — user → its `{"user","name"}` JSON.
    pub fn presence_users(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence:users", self.prefix)
    }

    /// `chat:{R}:presence:count` — user → how many instances hold a lease.
    pub fn presence_count(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}:presence:count", self.prefix)
    }

    /// `chat:{R}` — the live channel.
    pub fn channel(&self, room: &RoomName) -> String {
        format!("{}:{{{room}}}", self.prefix)
    }

    /// A room's counter, history, epoch and channel names written one after another into
    /// `buf` (a publish needs all four: one allocation instead of four), and where each is.
    pub fn put_room(&self, room: &RoomName, buf: &mut BytesMut) -> RoomNames {
        let mut put = |suffix: &str| {
            let start = buf.len();
            // Writing to a BytesMut cannot fail (it grows).
            let _ = write!(buf, "{}:{{{room}}}{suffix}", self.prefix);
            start..buf.len()
        };
        RoomNames {
            seq: put(":seq"),
            history: put(":history"),
            epoch: put(":epoch"),
            channel: put(""),
        }
    }

    /// `chat:probe:INSTANCE` — an instance's own channel for its delivery self-probe.
    pub fn probe(&self, instance: &str) -> String {
        format!("{}{instance}", self.probe_prefix())
    }

    /// `chat:probe:{INSTANCE-N}` — on a Cluster, one of an instance's per-shard probe
    /// channels: the hash tag decides which primary's slot (and so which subscriber
    /// connection) it lands on.
    pub fn shard_probe(&self, instance: &str, n: u32) -> String {
        format!("{}{{{instance}-{n}}}", self.probe_prefix())
    }

    /// What every probe channel starts with.
    pub fn probe_prefix(&self) -> String {
        format!("{}:probe:", self.prefix)
    }

    /// The room a channel name belongs to, if it is one of ours.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix('}')
    }
}

/// Where [`Keys::put_room`] wrote each name.
#[derive(Debug)]
pub struct RoomNames {
    /// [`Keys::seq`].
    pub seq: Range<usize>,
    /// [`Keys::history`].
    pub history: Range<usize>,
    /// [`Keys::epoch`].
    pub epoch: Range<usize>,
    /// [`Keys::channel`].
    pub channel: Range<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_room_hash_tag() {
        let k = Keys::new("chat");
        let r = RoomName::new("general").unwrap();
        assert_eq!(k.seq(&r), "chat:{general}:seq");
        assert_eq!(k.history(&r), "chat:{general}:history");
        assert_eq!(k.channel(&r), "chat:{general}");
        assert_eq!(k.epoch(&r), "chat:{general}:epoch");
        assert_eq!(k.sent(&r, "ab12"), "chat:{general}:sent:ab12");
        assert_eq!(k.room_of_channel("chat:{general}"), Some("general"));
        assert_eq!(k.room_of_channel("other:{general}"), None);
        assert_eq!(k.room_of_channel("chat:{general}:x"), None);
        assert_eq!(k.probe("web-1"), "chat:probe:web-1");
        assert_eq!(k.shard_probe("web-1", 7), "chat:probe:{web-1-7}");
        assert!(k.shard_probe("web-1", 7).starts_with(&k.probe_prefix()));
        assert_eq!(k.room_of_channel(&k.shard_probe("web-1", 7)), None);
        let mut buf = BytesMut::from(&b"before"[..]);
        let at = k.put_room(&r, &mut buf);
        let name = |range: Range<usize>| String::from_utf8(buf[range].to_vec()).unwrap();
        assert_eq!(name(at.seq), k.seq(&r));
        assert_eq!(name(at.history), k.history(&r));
        assert_eq!(name(at.epoch), k.epoch(&r));
        assert_eq!(name(at.channel), k.channel(&r));
    }
}
