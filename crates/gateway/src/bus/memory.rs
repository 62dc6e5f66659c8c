//! The embedded bus: one process, no Redis. Same ids, history and delivery order as the
//! Redis bus, so `cargo run` on a fresh machine behaves like a one-instance deployment.
//!
//! Publishing a room's message happens under that room's lock and hands the message to
//! the hub before releasing it, which keeps delivery in id order without a queue. The
//! publisher's task then writes the recipients' sockets, or, with `WRITE_COALESCE_MS`,
//! leaves them to a flusher task that writes at most once per interval.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::Notify;

use chat_protocol::{MessageTemplate, RoomName};

use super::{Bus, BusError, Epoch, History, Msg, new_epoch};
use crate::hub::Hub;
use crate::outbox::Dirty;

struct RoomLog {
    seq: u64,
    /// A new process is a new epoch: clients resuming across a restart of an embedded
    /// gateway are told their `since` is from another life.
    epoch: Epoch,
    history: VecDeque<Msg>,
}

struct Inner {
    rooms: Mutex<HashMap<RoomName, Arc<Mutex<RoomLog>>>>,
    history_size: usize,
    hub: Arc<Hub>,
    /// With `WRITE_COALESCE_MS`: where publishers leave the outboxes to flush.
    coalescer: Option<Arc<Coalescer>>,
}

/// Outboxes waiting for the flusher task.
#[derive(Default)]
struct Coalescer {
    pending: Mutex<Dirty>,
    wake: Notify,
}

impl Coalescer {
    /// Flushes what publishers left, at most once per `interval`.
    async fn run(&self, interval: Duration) {
        let mut last = tokio::time::Instant::now();
        loop {
            self.wake.notified().await;
            tokio::time::sleep_until(last + interval).await;
            let mut due = std::mem::take(&mut *lock(&self.pending));
            due.flush();
            last = tokio::time::Instant::now();
        }
    }
}

/// The in-process bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("history_size", &self.inner.history_size)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl MemoryBus {
    /// A bus keeping `history_size` messages per room and delivering to `hub`; each
    /// publisher writes the recipients' sockets itself.
    pub fn new(history_size: usize, hub: Arc<Hub>) -> Self {
        MemoryBus {
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                history_size,
                hub,
                coalescer: None,
            }),
        }
    }

    /// Like [`MemoryBus::new`], but the sockets are written at most once per `coalesce`
    /// (when it is not zero) by a flusher task. Must be called inside a tokio runtime.
    pub fn with_coalesce(history_size: usize, hub: Arc<Hub>, coalesce: Duration) -> Self {
        let coalescer = (!coalesce.is_zero()).then(|| {
            let coalescer = Arc::new(Coalescer::default());
            let task = coalescer.clone();
            // Lives as long as the process (it only ever waits or writes what is queued).
            tokio::spawn(async move { task.run(coalesce).await });
            coalescer
        });
        MemoryBus {
            inner: Arc::new(Inner {
                rooms: Mutex::new(HashMap::new()),
                history_size,
                hub,
                coalescer,
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
                }))
            })
            .clone()
    }
}

impl Bus for MemoryBus {
    async fn publish(&self, room: &RoomName, message: &MessageTemplate) -> Result<u64, BusError> {
        let log = self.log(room);
        let mut log = lock(&log);
        log.seq += 1;
        let msg = Msg::new(log.seq, message.render(log.seq, now_ms()).as_bytes());
        log.history.push_back(msg.clone());
        while log.history.len() > self.inner.history_size {
            log.history.pop_front();
        }
        let mut dirty = Dirty::default();
        self.inner.hub.dispatch(room.as_str(), msg, &mut dirty);
        let id = log.seq;
        drop(log);
        match &self.inner.coalescer {
            None => dirty.flush(),
            Some(c) => {
                lock(&c.pending).append(&mut dirty);
                c.wake.notify_one();
            }
        }
        Ok(id)
    }

    async fn subscribe(&self, _room: &RoomName) -> Result<(), BusError> {
        // Every publish is offered to the hub, which ignores rooms it does not serve.
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
pub(crate) fn tail_start(top: u64, retained: usize, since: Option<u64>) -> usize {
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
    use super::tail_start;

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
}
