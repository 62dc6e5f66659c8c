//! The pub/sub reader task: turns what arrives on the subscriber connection into
//! [`BusEvent`]s and hands them to the events handler in batches (whatever has arrived,
//! up to [`BATCH`] messages), so every client gets all of a batch with one write. It never
//! waits on a client.

use std::sync::Arc;

use bytes::Bytes;
use chat_protocol::RoomName;
use fred::types::{Message, Value};
use tokio::sync::broadcast::{
    Receiver,
    error::{RecvError, TryRecvError},
};
use tracing::{error, warn};

use super::scripts::to_msg;
use crate::bus::{BusEvent, BusEvents, Epoch, EpochNotice, SignalHead, keys::Keys};

/// Messages handed over in one batch, at most.
const BATCH: usize = 256;

/// What one pub/sub message is.
#[derive(Debug)]
enum Incoming {
    /// A token of this instance's self-probe, on one of its probe channels.
    Probe { channel: String, token: u64 },
    /// A room's message or epoch notice.
    Event(BusEvent),
    /// Not ours, or not readable.
    Ignored,
}

/// Where the reader delivers.
pub(super) struct Reader {
    pub(super) keys: Keys,
    pub(super) events: Arc<dyn BusEvents>,
    /// What probe channels start with (only this instance's own are subscribed), and where
    /// the last probe token seen on each is reported.
    pub(super) probe_prefix: String,
    pub(super) probe_seen: super::ProbeSeen,
}

impl Reader {
    /// Runs until fred's message channel closes.
    pub(super) async fn run(self, mut messages: Receiver<Message>) {
        let mut batch = Vec::new();
        loop {
            let mut next = Some(messages.recv().await);
            let mut taken = 0usize;
            while let Some(received) = next.take() {
                match received {
                    Ok(message) => match self.classify(&message.channel, message.value) {
                        Incoming::Probe { channel, token } => {
                            self.probe_seen.send_modify(|seen| {
                                let last = seen.entry(channel).or_default();
                                *last = (*last).max(token);
                            });
                        }
                        Incoming::Event(event) => batch.push(event),
                        Incoming::Ignored => {}
                    },
                    Err(RecvError::Lagged(n)) => {
                        // We cannot tell which rooms lost messages: check them all.
                        error!(skipped = n, "pub/sub reader lagged; repairing every room");
                        batch.push(BusEvent::Lost);
                    }
                    Err(RecvError::Closed) => return,
                }
                taken += 1;
                if taken < BATCH {
                    next = match messages.try_recv() {
                        Ok(m) => Some(Ok(m)),
                        Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                        Err(TryRecvError::Empty) => None,
                    };
                }
            }
            if !batch.is_empty() {
                self.events.deliver(&mut batch);
            }
        }
    }

    fn classify(&self, channel: &str, value: Value) -> Incoming {
        if channel.starts_with(&self.probe_prefix) {
            return value
                .as_u64()
                .map_or(Incoming::Ignored, |token| Incoming::Probe {
                    channel: channel.to_owned(),
                    token,
                });
        }
        let Some(room) = self
            .keys
            .room_of_channel(channel)
            .and_then(|r| RoomName::new(r).ok())
        else {
            return Incoming::Ignored;
        };
        let Some(bytes) = value.into_bytes() else {
            return Incoming::Ignored;
        };
        classify_payload(room, bytes)
    }
}

fn classify_payload(room: RoomName, bytes: Bytes) -> Incoming {
    if let Some(msg) = to_msg(bytes.clone()) {
        Incoming::Event(BusEvent::Message { room, msg })
    } else if let Ok(notice) = serde_json::from_slice::<EpochNotice>(&bytes) {
        Incoming::Event(BusEvent::NewEpoch {
            room,
            epoch: Epoch::from(notice.epoch),
        })
    } else if let Ok(head) = serde_json::from_slice::<SignalHead>(&bytes)
        && matches!(head.kind.as_str(), "presence_diff" | "typing")
    {
        Incoming::Event(BusEvent::Signal {
            room,
            json: bytes,
            except: head.user.map(Arc::from),
        })
    } else {
        warn!(%room, "ignoring a pub/sub payload that is not a message frame");
        Incoming::Ignored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nobody;

    impl BusEvents for Nobody {
        fn deliver(&self, _: &mut Vec<BusEvent>) {}
    }

    fn reader() -> Reader {
        Reader {
            keys: Keys::new("chat"),
            events: Arc::new(Nobody),
            probe_prefix: "chat:probe:".into(),
            probe_seen: tokio::sync::watch::channel(Default::default()).0,
        }
    }

    #[test]
    fn payloads_are_told_apart() {
        let r = reader();
        let msg = r#"{"type":"message","room":"a","id":3,"username":"u","text":"t","ts":1}"#;
        match r.classify("chat:{a}", Value::from(msg)) {
            Incoming::Event(BusEvent::Message { room, msg }) => {
                assert_eq!((room.as_str(), msg.id), ("a", 3));
            }
            other => panic!("{other:?}"),
        }
        let notice = r#"{"type":"epoch","room":"a","epoch":"e2"}"#;
        match r.classify("chat:{a}", Value::from(notice)) {
            Incoming::Event(BusEvent::NewEpoch { room, epoch }) => {
                assert_eq!((room.as_str(), &*epoch), ("a", "e2"));
            }
            other => panic!("{other:?}"),
        }
        match r.classify("chat:probe:{me-2}", Value::Integer(9)) {
            Incoming::Probe { channel, token } => {
                assert_eq!((channel.as_str(), token), ("chat:probe:{me-2}", 9));
            }
            other => panic!("{other:?}"),
        }
        let typing = r#"{"type":"typing","room":"a","user":"u1","name":"ann"}"#;
        match r.classify("chat:{a}", Value::from(typing)) {
            Incoming::Event(BusEvent::Signal { except, .. }) => {
                assert_eq!(except.as_deref(), Some("u1"));
            }
            other => panic!("{other:?}"),
        }
        for (channel, value) in [
            ("other:{a}", Value::from(msg)),
            ("chat:{a b}", Value::from(msg)),
            ("chat:{a}", Value::from("garbage")),
            ("chat:{a}", Value::Null),
        ] {
            assert!(
                matches!(r.classify(channel, value), Incoming::Ignored),
                "{channel}"
            );
        }
    }
}
