//! The embedded bus: one process, no Redis. Same ids, history and delivery order as the
//! Redis bus, so `cargo run` on a fresh machine behaves like a one-instance deployment.
//!
//! A room's id, history entry and place in the delivery queue are assigned under that
//! room's lock. Delivery happens outside the lock, one caller at a time per room: the
//! publisher that finds nobody delivering becomes the deliverer and hands the room's
//! queued messages to the [`BusEvents`] handler, in id order, until the queue is empty;
//! the others leave theirs to it. So no socket is written under a lock, and a room's
//! messages are never handed over out of order.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use chat_protocol::{MessageTemplate, RoomName};

use super::{Bus, BusError, BusEvent, BusEvents, Epoch, History, Msg, new_epoch};
use crate::sync::lock;

struct RoomLog {
    seq: u64,
    /// A new process is a new epoch: clients resuming across a restart of an embedded
    /// gateway are told their `since` is from another life.
    epoch: Epoch,
    history: VecDeque<Msg>,
    /// Published, not yet handed to the events handler.
    undelivered: Vec<BusEvent>,
    /// A publisher is handing this room's messages over.
    delivering: bool,
}

/// The in-process bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    rooms: Mutex<HashMap<RoomName, Arc<Mutex<RoomLog>>>>,
    history_size: usize,
    events: Arc<dyn BusEvents>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("history_size", &self.inner.history_size)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl MemoryBus {
    /// A bus keeping `history_size` messages per room and reporting to `events`.
    pub fn new(history_size: usize, events: Arc<dyn BusEvents>) -> Self {
        MemoryBus {
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                history_size,
                events,
            }),
        }
    }

    fn log(&self, room: &RoomName) -> Arc<Mutex<RoomLog>> {
        lock(&self.inner.rooms)
            .entry(room.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(RoomLog {
                    seq: 0,
                    epoch: Epoch::from(new_epoch()),
                    history: VecDeque::new(),
                    undelivered: Vec::new(),
                    delivering: false,
                }))
            })
            .clone()
    }
}

impl Bus for MemoryBus {
    async fn publish(&self, room: &RoomName, message: &MessageTemplate) -> Result<u64, BusError> {
        let log = self.log(room);
        let (id, mut batch) = {
            let mut log = lock(&log);
            log.seq += 1;
            let id = log.seq;
            let msg = Msg {
                id,
                json: Bytes::from(message.render(id, now_ms())),
            };
            log.history.push_back(msg.clone());
            while log.history.len() > self.inner.history_size {
                log.history.pop_front();
            }
            log.undelivered.push(BusEvent::Message {
                room: room.clone(),
                msg,
            });
            if log.delivering {
                // The current deliverer hands this one over too.
                return Ok(id);
            }
            log.delivering = true;
            (id, std::mem::take(&mut log.undelivered))
        };
        loop {
            self.inner.events.deliver(&mut batch);
            let mut log = lock(&log);
            if log.undelivered.is_empty() {
                log.delivering = false;
                return Ok(id);
            }
            std::mem::swap(&mut batch, &mut log.undelivered);
        }
    }

    async fn subscribe(&self, _room: &RoomName) -> Result<(), BusError> {
        // Every publish is reported; the handler ignores rooms it does not serve.
        Ok(())
    }

    async fn unsubscribe(&self, _room: &RoomName) -> Result<(), BusError> {
        Ok(())
    }

    async fn history(&self, room: &RoomName, since: Option<u64>) -> Result<History, BusError> {
        let log = self.log(room);
        let log = lock(&log);
        let start = tail_start(log.seq, log.history.len(), since);
        Ok(History {
            top: log.seq,
            epoch: Some(log.epoch.clone()),
            messages: log.history.iter().skip(start).cloned().collect(),
        })
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// Index of the first retained message newer than `since`, when `since` is within reach;
/// 0 (everything) otherwise. Mirrors the Redis history script.
fn tail_start(top: u64, retained: usize, since: Option<u64>) -> usize {
    match since {
        Some(since) if since <= top => {
            let newer = usize::try_from(top - since).unwrap_or(usize::MAX);
            retained.saturating_sub(newer)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn tail_start_matches_the_script() {
        // ids 6..=10 retained (5 messages), top 10
        assert_eq!(tail_start(10, 5, None), 0);
        assert_eq!(tail_start(10, 5, Some(10)), 5);
        assert_eq!(tail_start(10, 5, Some(8)), 3);
        assert_eq!(tail_start(10, 5, Some(5)), 0);
        assert_eq!(tail_start(10, 5, Some(2)), 0);
        assert_eq!(tail_start(10, 5, Some(11)), 0);
        assert_eq!(tail_start(0, 0, Some(0)), 0);
    }

    /// Records delivered ids; checks that no two deliveries overlap.
    #[derive(Default)]
    struct Recorder {
        ids: Mutex<Vec<u64>>,
        busy: AtomicBool,
    }

    impl BusEvents for Recorder {
        fn deliver(&self, events: &mut Vec<BusEvent>) {
            assert!(
                !self.busy.swap(true, Ordering::SeqCst),
                "overlapping delivery"
            );
            for e in events.drain(..) {
                if let BusEvent::Message { msg, .. } = e {
                    lock(&self.ids).push(msg.id);
                }
            }
            // Give concurrent publishers a chance to queue behind this delivery.
            std::thread::yield_now();
            self.busy.store(false, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_publishers_are_delivered_once_each_in_id_order() {
        let recorder = Arc::new(Recorder::default());
        let bus = MemoryBus::new(10, recorder.clone());
        let room = RoomName::new("r").unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (bus, room) = (bus.clone(), room.clone());
                tokio::spawn(async move {
                    for _ in 0..200 {
                        let t = MessageTemplate::new(&room, "u", "m");
                        bus.publish(&room, &t).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*lock(&recorder.ids), (1..=1600).collect::<Vec<u64>>());
        let history = bus.history(&room, None).await.unwrap();
        assert_eq!(history.top, 1600);
        assert_eq!(history.messages.len(), 10);
    }
}
