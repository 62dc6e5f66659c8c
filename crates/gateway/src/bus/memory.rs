//! The embedded bus: one process, no Redis. Same ids, history and delivery order as the
//! Redis bus, so `cargo run` on a fresh machine behaves like a one-instance deployment.
//!
//! A room's id, history entry and place in the delivery queue are assigned under that
//! room's lock. Delivery happens outside the lock, one caller at a time per room: the
//! publisher that finds nobody delivering becomes the deliverer and hands the room's
//! queued messages to the [`BusEvents`] handler, in id order, until the queue is empty;
//! the others leave theirs to it. So no socket is written under a lock, and a room's
//! messages are never handed over out of order.
//!
//! Rooms are forgotten when nobody holds them: a room without messages when its last
//! local member leaves, and (with `ROOM_IDLE_TTL_SECS`) a room nobody joined or wrote to
//! for that long. A forgotten room comes back empty, under a new epoch.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use chat_protocol::{MessageTemplate, PresenceUser, RoomName};

use super::{
    Bus, BusError, BusEvent, BusEvents, Dedupe, Epoch, History, Msg, Page, PresenceSnapshot,
    Published, new_epoch, presence_diff,
};
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
    /// This instance has members in the room (between subscribe and unsubscribe).
    subscribed: bool,
    /// The last publish, history read or subscription.
    last_used: tokio::time::Instant,
    /// Forgotten: whoever still holds it must look the room up again.
    retired: bool,
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
    /// Idempotent sends: (room, dedupe key) → the stored message, until it expires.
    sent: Mutex<Sent>,
    /// Who is in each room (rooms with nobody are not kept).
    present: Mutex<HashMap<RoomName, HashMap<String, PresenceUser>>>,
}

/// A room's queued messages, to be handed to the events handler by the publisher that
/// found nobody doing it.
struct Handover {
    log: Arc<Mutex<RoomLog>>,
    batch: Vec<BusEvent>,
    events: Arc<dyn BusEvents>,
}

impl Handover {
    /// Hands the batch over, then whatever was queued meanwhile, until nothing is left.
    fn run(mut self) {
        loop {
            self.events.deliver(&mut self.batch);
            let mut log = lock(&self.log);
            if log.undelivered.is_empty() {
                log.delivering = false;
                return;
            }
            std::mem::swap(&mut self.batch, &mut log.undelivered);
        }
    }
}

/// Idempotent sends remembered, oldest first; at most [`SENT_MAX`] of them.
#[derive(Default)]
struct Sent {
    by_key: HashMap<(RoomName, String), Msg>,
    order: VecDeque<(tokio::time::Instant, RoomName, String)>,
}

/// Idempotent sends the in-process bus remembers at most (the oldest go first).
const SENT_MAX: usize = 100_000;

impl Sent {
    fn forget_expired(&mut self) {
        let now = tokio::time::Instant::now();
        while let Some((until, room, key)) = self.order.front() {
            if *until > now && self.order.len() <= SENT_MAX {
                break;
            }
            self.by_key.remove(&(room.clone(), key.clone()));
            self.order.pop_front();
        }
    }
}

impl Inner {
    /// Forgets the rooms nobody subscribes to and nobody used for `ttl`.
    fn forget_idle(&self, ttl: std::time::Duration) {
        lock(&self.rooms).retain(|_, log| {
            let mut log = lock(log);
            let keep = log.subscribed || log.last_used.elapsed() < ttl;
            log.retired |= !keep;
            keep
        });
    }
}

impl MemoryBus {
    /// Rooms this instance has members in (is "subscribed" to).
    pub fn room_subscriptions(&self) -> usize {
        let logs: Vec<_> = lock(&self.inner.rooms).values().cloned().collect();
        logs.iter().filter(|log| lock(log).subscribed).count()
    }
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
                sent: Mutex::default(),
                present: Mutex::default(),
            }),
        }
    }

    /// Like [`MemoryBus::new`], forgetting rooms idle for `ttl` (a task checks every
    /// tenth of it, at least every hour). Must run inside a tokio runtime.
    pub fn with_idle_ttl(
        history_size: usize,
        events: Arc<dyn BusEvents>,
        ttl: std::time::Duration,
    ) -> Self {
        let bus = Self::new(history_size, events);
        let inner = Arc::downgrade(&bus.inner);
        let every = (ttl / 10).clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(3600),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match inner.upgrade() {
                    Some(inner) => inner.forget_idle(ttl),
                    None => return,
                }
            }
        });
        bus
    }

    /// Runs `f` on the room's log, creating it if needed (and again if it was forgotten
    /// meanwhile).
    fn with_log<T>(
        &self,
        room: &RoomName,
        mut f: impl FnMut(&mut RoomLog) -> T,
    ) -> (T, Arc<Mutex<RoomLog>>) {
        loop {
            let log = lock(&self.inner.rooms)
                .entry(room.clone())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(RoomLog {
                        seq: 0,
                        epoch: Epoch::from(new_epoch()),
                        history: VecDeque::new(),
                        undelivered: Vec::new(),
                        delivering: false,
                        subscribed: false,
                        last_used: tokio::time::Instant::now(),
                        retired: false,
                    }))
                })
                .clone();
            let mut guard = lock(&log);
            if guard.retired {
                continue;
            }
            guard.last_used = tokio::time::Instant::now();
            let out = f(&mut guard);
            drop(guard);
            return (out, log);
        }
    }

    /// Stores `message` as the room's next id. Returns it, and — unless another
    /// publisher is handing the room's messages over already — the work of handing them
    /// over ([`Handover::run`]), which the caller runs outside any lock.
    fn store(&self, room: &RoomName, message: &MessageTemplate) -> (Msg, Option<Handover>) {
        let history_size = self.inner.history_size;
        let ((stored, batch), log) = self.with_log(room, |log| {
            log.seq += 1;
            let id = log.seq;
            let msg = Msg {
                id,
                json: Bytes::from(message.render(id, now_ms())),
            };
            log.history.push_back(msg.clone());
            while log.history.len() > history_size {
                log.history.pop_front();
            }
            log.undelivered.push(BusEvent::Message {
                room: room.clone(),
                msg: msg.clone(),
            });
            if log.delivering {
                // The current deliverer hands this one over too.
                return (msg, None);
            }
            log.delivering = true;
            (msg, Some(std::mem::take(&mut log.undelivered)))
        });
        let handover = batch.map(|batch| Handover {
            log,
            batch,
            events: self.inner.events.clone(),
        });
        (stored, handover)
    }

    /// Hands a presence diff to the events handler (outside any lock).
    fn announce(&self, room: &RoomName, json: Bytes) {
        self.inner.events.deliver(&mut vec![BusEvent::Signal {
            room: room.clone(),
            json,
            except: None,
        }]);
    }

    /// Rooms this bus remembers (tests).
    pub fn room_count(&self) -> usize {
        lock(&self.inner.rooms).len()
    }
}

impl Bus for MemoryBus {
    async fn publish(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> Result<Published, BusError> {
        let Some(dedupe) = dedupe else {
            let (msg, handover) = self.store(room, message);
            if let Some(handover) = handover {
                handover.run();
            }
            return Ok(Published {
                msg,
                duplicate: false,
            });
        };
        // The check, the store and the record happen under the dedupe lock, so a repeat
        // racing its original finds it (the Redis script is atomic the same way); the
        // handover (socket writes) happens after it is released.
        let (msg, handover) = {
            let mut sent = lock(&self.inner.sent);
            sent.forget_expired();
            let key = (room.clone(), dedupe.key.clone());
            if let Some(msg) = sent.by_key.get(&key) {
                return Ok(Published {
                    msg: msg.clone(),
                    duplicate: true,
                });
            }
            let (msg, handover) = self.store(room, message);
            sent.by_key.insert(key, msg.clone());
            let until = tokio::time::Instant::now() + dedupe.window;
            sent.order
                .push_back((until, room.clone(), dedupe.key.clone()));
            (msg, handover)
        };
        if let Some(handover) = handover {
            handover.run();
        }
        Ok(Published {
            msg,
            duplicate: false,
        })
    }

    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, BusError> {
        // Reading a room nobody has written to must not make the bus hold an entry
        // for it: the read API lets anyone name any room.
        if !lock(&self.inner.rooms).contains_key(room) {
            return Ok(Page {
                top: 0,
                epoch: None,
                messages: Vec::new(),
                has_more: false,
            });
        }
        let (page, _) = self.with_log(room, |log| {
            let first = (log.seq + 1).saturating_sub(log.history.len() as u64);
            let last = before.map_or(log.seq, |b| b.saturating_sub(1).min(log.seq));
            let from = first.max((last + 1).saturating_sub(limit.max(1) as u64));
            let messages: Vec<Msg> = log
                .history
                .iter()
                .filter(|m| (from..=last).contains(&m.id))
                .cloned()
                .collect();
            Page {
                top: log.seq,
                epoch: Some(log.epoch.clone()),
                has_more: !messages.is_empty() && from > first,
                messages,
            }
        });
        Ok(page)
    }

    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError> {
        // Every publish is reported; the handler ignores rooms it does not serve. The
        // room is remembered while this instance has members in it.
        self.with_log(room, |log| log.subscribed = true);
        Ok(())
    }

    async fn unsubscribe(&self, room: &RoomName) -> Result<(), BusError> {
        let mut rooms = lock(&self.inner.rooms);
        if let Some(log) = rooms.get(room).cloned() {
            let mut log = lock(&log);
            log.subscribed = false;
            // Nobody here and nothing said: nothing worth remembering.
            if log.seq == 0 {
                log.retired = true;
                rooms.remove(room);
            }
        }
        Ok(())
    }

    async fn history(&self, room: &RoomName, since: Option<u64>) -> Result<History, BusError> {
        let (history, _) = self.with_log(room, |log| {
            let start = tail_start(log.seq, log.history.len(), since);
            History {
                top: log.seq,
                epoch: Some(log.epoch.clone()),
                messages: log.history.iter().skip(start).cloned().collect(),
            }
        });
        Ok(history)
    }

    async fn presence(&self, room: &RoomName, max: usize) -> Result<PresenceSnapshot, BusError> {
        let present = lock(&self.inner.present);
        let users = present.get(room);
        Ok(PresenceSnapshot {
            count: users.map_or(0, |u| u.len() as u64),
            users: users
                .map(|u| u.values().take(max).cloned().collect())
                .unwrap_or_default(),
        })
    }

    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &PresenceUser,
        _lease: Duration,
    ) -> Result<(), BusError> {
        // One instance: no leases to keep.
        let new = lock(&self.inner.present)
            .entry(room.clone())
            .or_default()
            .insert(user.user.clone(), user.clone())
            .is_none();
        if new {
            self.announce(room, presence_diff(room, vec![user.clone()], vec![]));
        }
        Ok(())
    }

    async fn presence_exit(&self, room: &RoomName, user: &PresenceUser) -> Result<(), BusError> {
        let gone = {
            let mut present = lock(&self.inner.present);
            let gone = present
                .get_mut(room)
                .and_then(|users| users.remove(&user.user))
                .is_some();
            if present.get(room).is_some_and(HashMap::is_empty) {
                present.remove(room);
            }
            gone
        };
        if gone {
            self.announce(room, presence_diff(room, vec![], vec![user.clone()]));
        }
        Ok(())
    }

    async fn presence_renew(
        &self,
        _room: &RoomName,
        _users: &[PresenceUser],
        _lease: Duration,
    ) -> Result<(), BusError> {
        Ok(())
    }

    async fn signal(
        &self,
        room: &RoomName,
        json: Bytes,
        except: Option<Arc<str>>,
    ) -> Result<(), BusError> {
        self.inner.events.deliver(&mut vec![BusEvent::Signal {
            room: room.clone(),
            json,
            except,
        }]);
        Ok(())
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

    #[tokio::test(start_paused = true)]
    async fn rooms_nobody_holds_are_forgotten_and_come_back_under_a_new_epoch() {
        let ttl = std::time::Duration::from_secs(60);
        let bus = MemoryBus::with_idle_ttl(10, Arc::new(Recorder::default()), ttl);
        let room = |n: &str| RoomName::new(n).unwrap();
        // Joined and left without a word: forgotten at once.
        bus.subscribe(&room("empty")).await.unwrap();
        bus.history(&room("empty"), None).await.unwrap();
        bus.unsubscribe(&room("empty")).await.unwrap();
        assert_eq!(bus.room_count(), 0);
        // With messages: kept while idle less than the TTL, or while someone is in it.
        let t = MessageTemplate::new(&room("talk"), "u", "m");
        bus.publish(&room("talk"), &t, None).await.unwrap();
        let before = bus.history(&room("talk"), None).await.unwrap();
        bus.subscribe(&room("held")).await.unwrap();
        bus.publish(&room("held"), &t, None).await.unwrap();
        tokio::time::sleep(ttl / 2).await;
        assert_eq!(bus.room_count(), 2);
        tokio::time::sleep(ttl).await;
        assert_eq!(
            bus.room_count(),
            1,
            "the idle room is forgotten, the held one is not"
        );
        let after = bus.history(&room("talk"), None).await.unwrap();
        assert_eq!((after.top, after.messages.len()), (0, 0));
        assert_ne!(after.epoch, before.epoch, "it comes back under a new epoch");
    }

    #[tokio::test]
    async fn pages_walk_back_through_what_is_retained() {
        let bus = MemoryBus::new(10, Arc::new(Recorder::default()));
        let room = RoomName::new("r").unwrap();
        for _ in 0..25 {
            let t = MessageTemplate::new(&room, "u", "m");
            bus.publish(&room, &t, None).await.unwrap();
        }
        let ids = |p: &Page| p.messages.iter().map(|m| m.id).collect::<Vec<_>>();
        let newest = bus.page(&room, None, 4).await.unwrap();
        assert_eq!(
            (ids(&newest), newest.has_more, newest.top),
            (vec![22, 23, 24, 25], true, 25)
        );
        let older = bus.page(&room, Some(22), 4).await.unwrap();
        assert_eq!((ids(&older), older.has_more), (vec![18, 19, 20, 21], true));
        // Retained: 16..=25 (HISTORY_SIZE 10).
        let last = bus.page(&room, Some(18), 4).await.unwrap();
        assert_eq!((ids(&last), last.has_more), (vec![16, 17], false));
        let none = bus.page(&room, Some(16), 4).await.unwrap();
        assert_eq!((ids(&none), none.has_more), (vec![], false));
        // A room nobody wrote to reads as empty and is not created by the read.
        let unknown = RoomName::new("never").unwrap();
        let empty = bus.page(&unknown, None, 4).await.unwrap();
        assert_eq!((empty.top, empty.messages.len()), (0, 0));
        assert!(!lock(&bus.inner.rooms).contains_key(&unknown));
    }

    #[tokio::test]
    async fn a_repeated_idempotent_send_returns_the_original_and_publishes_nothing() {
        let recorder = Arc::new(Recorder::default());
        let bus = MemoryBus::new(10, recorder.clone());
        let room = RoomName::new("r").unwrap();
        let dedupe = Dedupe::new("client:a", "c-1", std::time::Duration::from_secs(60));
        let first = bus
            .publish(
                &room,
                &MessageTemplate::new(&room, "u", "one"),
                Some(&dedupe),
            )
            .await
            .unwrap();
        let again = bus
            .publish(
                &room,
                &MessageTemplate::new(&room, "u", "two"),
                Some(&dedupe),
            )
            .await
            .unwrap();
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(again.msg, first.msg);
        assert_eq!(*lock(&recorder.ids), vec![1]);
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
                        bus.publish(&room, &t, None).await.unwrap();
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
