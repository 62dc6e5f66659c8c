//! Which local connections are in which room; the gap-free hand-over of a join; and the
//! repair of a room whose live stream lost messages.
//!
//! The hub owns no sockets and no Redis connection. It is told by the bus that a message
//! arrived ([`Hub::dispatch`]) and pushes the same shared bytes into each member's
//! [`Outbox`]; it asks the bus to subscribe to a room when the first local member joins
//! and to unsubscribe when the last one leaves.
//!
//! **Joins.** A join is registered before the history is read: from then on, live
//! messages for the joining member are buffered in the hub. The session reads history,
//! replays it, then calls [`Hub::go_live`], which (under the room's lock, so no dispatch
//! can interleave) appends the buffered messages newer than the replay, queues `joined`
//! and switches the member to live delivery.
//!
//! **Every live member knows the last id it was given** (`last`). Delivery skips ids at or
//! below it (the history read and the subscription are different connections, so history
//! can be ahead of live delivery) and notices a gap above it. A gap puts the room in
//! repair: live delivery pauses and incoming messages are buffered while the repair worker
//! ([`Hub::run_repairs`]) reads the missing ids from history; then each member gets exactly
//! the ids it lacks, in order. A member whose hole is older than the history is closed
//! with 1013 and resumes with `since` (and is told `recovered:false`). After the bus
//! reconnects, every room is repaired the same way ([`Hub::repair_all`]).

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use chat_protocol::RoomName;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::{
    bus::{Bus, BusError, Epoch, Msg},
    outbox::{CloseReason, Dirty, LivePush, Outbox},
};

/// A connection's id, unique within this instance.
pub type ConnId = u64;

/// Outcome of [`Hub::go_live`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoLive {
    /// The member is live; carries the `last_id` announced in `joined`.
    Live(u64),
    /// Live messages outran the join buffer while history was replayed: replay again from
    /// the id given to `go_live`.
    Retry,
    /// The member is gone (it left, or the connection is closing).
    Gone,
}

struct Member {
    outbox: Arc<Outbox>,
    /// `Some` while the member's history replay is in progress.
    joining: Option<Buffer>,
    /// The last id this member was given (live members only).
    last: u64,
    /// The room epoch this member's ids belong to (`None`: the room had no messages).
    epoch: Option<Epoch>,
}

/// Messages held back while a join's replay or a room's repair is in progress.
#[derive(Default)]
struct Buffer {
    msgs: Vec<Msg>,
    overflowed: bool,
    /// A new epoch began meanwhile (its ids restart at 1).
    reset: Option<Epoch>,
}

impl Buffer {
    fn push(&mut self, msg: &Msg, cap: usize) {
        if self.overflowed {
        } else if self.msgs.len() >= cap {
            // Everything dropped here is in Redis history: the owner reads it again.
            self.msgs = Vec::new();
            self.overflowed = true;
        } else {
            self.msgs.push(msg.clone());
        }
    }
}

#[derive(Default)]
struct RoomState {
    members: HashMap<ConnId, Member>,
    /// `Some` while the room is being repaired: live delivery waits.
    repair: Option<Buffer>,
}

impl RoomState {
    /// Gives `msg` to a live member if it is the next id it needs; reports a gap. The
    /// member's outbox is listed in `dirty` for the caller to flush.
    fn deliver(member: &mut Member, msg: &Msg, dirty: &mut Dirty) -> Delivery {
        if msg.id <= member.last {
            Delivery::Duplicate
        } else if msg.id == member.last + 1 {
            member.last = msg.id;
            member.outbox.push_live(msg.wire.clone());
            dirty.add(&member.outbox);
            Delivery::Delivered
        } else {
            Delivery::Gap
        }
    }
}

enum Delivery {
    Delivered,
    Duplicate,
    Gap,
}

struct Room {
    name: RoomName,
    state: Mutex<RoomState>,
    /// Serialises this room's bus subscribe/unsubscribe calls; `true` while subscribed.
    /// An async mutex because it is held across the bus call (the only lock that is).
    subscription: tokio::sync::Mutex<bool>,
}

impl Room {
    fn state(&self) -> MutexGuard<'_, RoomState> {
        lock(&self.state)
    }

    fn is_empty(&self) -> bool {
        self.state().members.is_empty()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here never panic; recover the data if one ever did.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Room → local members.
pub struct Hub {
    rooms: Mutex<HashMap<RoomName, Arc<Room>>>,
    /// Live messages a join or a repair may buffer before it reads history again.
    buffer_cap: usize,
    /// Rooms waiting for the repair worker (at most one entry per room).
    repairs: Mutex<HashSet<RoomName>>,
    repair_wake: Notify,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("rooms", &lock(&self.rooms).len())
            .finish()
    }
}

impl Hub {
    /// An empty hub; joins and repairs buffer at most `buffer_cap` live messages.
    pub fn new(buffer_cap: usize) -> Self {
        Hub {
            rooms: Mutex::new(HashMap::new()),
            buffer_cap,
            repairs: Mutex::new(HashSet::new()),
            repair_wake: Notify::new(),
        }
    }

    fn room(&self, name: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(name).cloned()
    }

    /// Registers `conn` as a joining member of `room` and makes sure this instance is
    /// subscribed to the room. When this returns `Ok`, every message published from now on
    /// reaches the member's join buffer.
    pub async fn join<B: Bus>(
        &self,
        room: &RoomName,
        conn: ConnId,
        outbox: Arc<Outbox>,
        bus: &B,
    ) -> Result<(), BusError> {
        let entry = {
            let mut rooms = lock(&self.rooms);
            let entry = rooms
                .entry(room.clone())
                .or_insert_with(|| {
                    Arc::new(Room {
                        name: room.clone(),
                        state: Mutex::default(),
                        subscription: tokio::sync::Mutex::new(false),
                    })
                })
                .clone();
            entry.state().members.insert(
                conn,
                Member {
                    outbox,
                    joining: Some(Buffer::default()),
                    last: 0,
                    epoch: None,
                },
            );
            entry
        };
        let mut subscribed = entry.subscription.lock().await;
        if !*subscribed {
            bus.subscribe(room).await?;
            debug!(%room, "subscribed");
            *subscribed = true;
        }
        Ok(())
    }

    /// Finishes a join: queues the buffered live messages with id > `after`, then the frame
    /// `joined(last_id)` builds (if any), and makes the member live — all under the room's
    /// lock, so no live message can slip in between.
    pub fn go_live(
        &self,
        room: &RoomName,
        conn: ConnId,
        after: u64,
        epoch: Option<Epoch>,
        joined: impl FnOnce(u64) -> Option<Bytes>,
    ) -> GoLive {
        let Some(entry) = self.room(room.as_str()) else {
            return GoLive::Gone;
        };
        let mut st = entry.state();
        let RoomState { members, repair } = &mut *st;
        let Some(member) = members.get_mut(&conn) else {
            return GoLive::Gone;
        };
        let Some(buffer) = member.joining.as_mut() else {
            return GoLive::Gone;
        };
        if buffer.reset.is_some() && buffer.reset != epoch {
            // The room was reset after the history this member replayed: what it was shown
            // is from a dead epoch. It resumes and is told `recovered:false`.
            member.outbox.close(CloseReason::TooSlow);
            return GoLive::Gone;
        }
        if buffer.overflowed {
            *buffer = Buffer::default();
            return GoLive::Retry;
        }
        let mut buffered = std::mem::take(&mut buffer.msgs);
        buffered.sort_by_key(|m| m.id);
        let mut last_id = after;
        let mut hole = false;
        for msg in buffered.iter().filter(|m| m.id > after) {
            if msg.id != last_id + 1 {
                // A live message was lost while this member joined: the room's repair
                // fills the hole (from `last_id`) and delivers the rest in order.
                hole = true;
                break;
            }
            last_id = msg.id;
            if member.outbox.push_live(msg.wire.clone()) != LivePush::Queued {
                return GoLive::Gone;
            }
        }
        if let Some(frame) = joined(last_id)
            && member.outbox.push_now(frame).is_err()
        {
            return GoLive::Gone;
        }
        member.joining = None;
        member.last = last_id;
        member.epoch = epoch;
        if hole {
            let cap = self.buffer_cap;
            let pending = repair.get_or_insert_with(Buffer::default);
            for msg in buffered.iter().filter(|m| m.id > last_id) {
                pending.push(msg, cap);
            }
            drop(st);
            self.request_repair(room);
        }
        GoLive::Live(last_id)
    }

    /// Removes `conn` from `room` (a no-op when it is not a member). When it was the last
    /// member, returns the work that unsubscribes this instance from the room: await it to
    /// know the unsubscribe is done, or spawn it.
    pub fn leave<B: Bus + Clone + 'static>(
        self: &Arc<Self>,
        room: &RoomName,
        conn: ConnId,
        bus: &B,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>> {
        let entry = {
            let rooms = lock(&self.rooms);
            let entry = rooms.get(room)?.clone();
            let mut st = entry.state();
            if st.members.remove(&conn).is_none() || !st.members.is_empty() {
                return None;
            }
            drop(st);
            entry
        };
        let hub = Arc::clone(self);
        let bus = bus.clone();
        // Boxed: the unsubscribe future is large (a Redis call), and callers hold it.
        Some(Box::pin(async move { hub.release(entry, &bus).await }))
    }

    /// Unsubscribes an empty room and forgets it, unless someone joined meanwhile.
    async fn release<B: Bus>(&self, entry: Arc<Room>, bus: &B) {
        let mut subscribed = entry.subscription.lock().await;
        if *subscribed && entry.is_empty() {
            if let Err(err) = bus.unsubscribe(&entry.name).await {
                warn!(room = %entry.name, error = %err, "unsubscribe failed");
            }
            debug!(room = %entry.name, "unsubscribed");
            *subscribed = false;
        }
        if !*subscribed {
            // Joins insert members under the rooms lock, so this check cannot race one.
            let mut rooms = lock(&self.rooms);
            let same = rooms
                .get(&entry.name)
                .is_some_and(|r| Arc::ptr_eq(r, &entry));
            if same && entry.is_empty() {
                rooms.remove(&entry.name);
            }
        }
    }

    /// Delivers a message that arrived from the bus to every local member of its room.
    /// Never waits: a member that cannot take it is closed as too slow by its outbox. The
    /// outboxes that got it are listed in `dirty`: flush it after a batch of dispatches.
    pub fn dispatch(&self, room: &str, msg: Msg, dirty: &mut Dirty) {
        let Some(entry) = self.room(room) else {
            return;
        };
        let cap = self.buffer_cap;
        let mut st = entry.state();
        let RoomState { members, repair } = &mut *st;
        let mut gap = false;
        for member in members.values_mut() {
            match member.joining.as_mut() {
                Some(buffer) => buffer.push(&msg, cap),
                None if repair.is_some() => {}
                None => gap |= matches!(RoomState::deliver(member, &msg, dirty), Delivery::Gap),
            }
        }
        match repair {
            Some(buffer) => buffer.push(&msg, cap),
            None if gap => {
                let mut buffer = Buffer::default();
                buffer.push(&msg, cap);
                *repair = Some(buffer);
                drop(st);
                warn!(%room, id = msg.id, "gap in live messages; repairing from history");
                self.request_repair(&entry.name);
            }
            None => {}
        }
    }

    /// A new epoch began in `room` (its ids restart at 1): members that hold ids of an
    /// older epoch are closed with 1013 and resume with `since` and their epoch, and are
    /// told `recovered:false`. Members of an empty room simply adopt the epoch.
    pub fn reset(&self, room: &str, epoch: Epoch) {
        let Some(entry) = self.room(room) else {
            return;
        };
        let mut st = entry.state();
        let mut closed = 0usize;
        for member in st.members.values_mut() {
            if let Some(buffer) = member.joining.as_mut() {
                buffer.reset = Some(epoch.clone());
            } else if member.epoch.is_none() && member.last == 0 {
                member.epoch = Some(epoch.clone());
            } else if member.epoch.as_ref() != Some(&epoch) {
                member.outbox.close(CloseReason::TooSlow);
                closed += 1;
            }
        }
        // A repair in progress was for the old epoch.
        st.repair = None;
        drop(st);
        if closed > 0 {
            warn!(%room, %epoch, closed, "room reset (new epoch): members must resume");
        }
    }

    /// Puts every room in repair (after the bus lost messages it cannot name, e.g. a
    /// reconnect): each member then gets whatever it missed, from history.
    pub fn repair_all(&self) {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        for room in rooms {
            let mut st = room.state();
            if st.repair.is_none() {
                st.repair = Some(Buffer::default());
            }
            drop(st);
            self.request_repair(&room.name);
        }
    }

    fn request_repair(&self, room: &RoomName) {
        lock(&self.repairs).insert(room.clone());
        self.repair_wake.notify_one();
    }

    /// The repair worker: runs for the life of the instance.
    pub async fn run_repairs<B: Bus>(&self, bus: &B) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let batch: Vec<RoomName> = lock(&self.repairs).drain().collect();
            if batch.is_empty() {
                self.repair_wake.notified().await;
                continue;
            }
            let mut failed = false;
            for room in batch {
                if let Err(err) = self.repair(&room, bus).await {
                    warn!(%room, error = %err, "repair failed; will retry");
                    lock(&self.repairs).insert(room);
                    failed = true;
                }
            }
            if failed {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            } else {
                backoff = Duration::from_millis(50);
            }
        }
    }

    /// Fills every live member of `room` up from history, then resumes live delivery.
    async fn repair<B: Bus>(&self, room: &RoomName, bus: &B) -> Result<(), BusError> {
        loop {
            let Some(entry) = self.room(room.as_str()) else {
                return Ok(());
            };
            let from = {
                let mut st = entry.state();
                if st.repair.is_none() {
                    return Ok(());
                }
                let from = st
                    .members
                    .values()
                    .filter(|m| m.joining.is_none())
                    .map(|m| m.last)
                    .min();
                match from {
                    Some(from) => from,
                    None => {
                        // Nobody live: joining members have their own buffers.
                        st.repair = None;
                        return Ok(());
                    }
                }
            };
            let history = bus.history(room, Some(from)).await?;
            let mut st = entry.state();
            let Some(buffer) = st.repair.take() else {
                return Ok(());
            };
            if buffer.overflowed {
                st.repair = Some(Buffer::default());
                continue;
            }
            let mut msgs = history.messages;
            msgs.extend(buffer.msgs);
            msgs.sort_by_key(|m| m.id);
            msgs.dedup_by_key(|m| m.id);
            let (mut filled, mut cut) = (0usize, 0usize);
            let mut dirty = Dirty::default();
            for member in st.members.values_mut().filter(|m| m.joining.is_none()) {
                let before = member.last;
                for msg in msgs.iter().filter(|m| m.id > before) {
                    if let Delivery::Gap = RoomState::deliver(member, msg, &mut dirty) {
                        // Older than history: the member must resume (recovered:false).
                        member.outbox.close(CloseReason::TooSlow);
                        cut += 1;
                        break;
                    }
                }
                filled += usize::try_from(member.last - before).unwrap_or(0);
            }
            drop(st);
            dirty.flush();
            info!(%room, from, filled, cut, "repaired");
            return Ok(());
        }
    }

    /// Rooms this instance currently serves (has at least one member in).
    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Subscribes again to every room this instance is subscribed to, after the bus lost
    /// its subscriptions (a new Redis connection). Each room's subscription lock keeps
    /// this ordered with concurrent joins and leaves. Stops at the first failure.
    pub async fn resubscribe<B: Bus>(&self, bus: &B) -> Result<usize, BusError> {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let mut done = 0usize;
        for room in rooms {
            let subscribed = room.subscription.lock().await;
            if *subscribed {
                bus.subscribe(&room.name).await?;
                done += 1;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use chat_protocol::MessageTemplate;

    use super::*;
    use crate::bus::memory::MemoryBus;

    /// A store whose own deliveries go to a hub nobody listens to, so the hub under test
    /// only sees what the test dispatches: lost messages are simulated by not dispatching.
    async fn store_with(n: u64) -> (MemoryBus, Vec<Msg>, RoomName) {
        let room = RoomName::new("r").unwrap();
        let bus = MemoryBus::new(100, Arc::new(Hub::new(16)));
        for i in 1..=n {
            let t = MessageTemplate::new(&room, "u", &format!("m{i}"));
            bus.publish(&room, &t).await.unwrap();
        }
        let msgs = bus.history(&room, None).await.unwrap().messages;
        (bus, msgs, room)
    }

    async fn drain(outbox: &Outbox) -> Vec<u64> {
        let mut frames = Vec::new();
        if outbox.closing().is_none() {
            outbox.take_queued(&mut frames, usize::MAX);
        }
        frames
            .iter()
            .filter_map(|f| chat_protocol::peek_id(crate::ws::payload(f)))
            .collect()
    }

    fn dispatch(hub: &Hub, msg: &Msg) {
        hub.dispatch("r", msg.clone(), &mut Dirty::default());
    }

    #[tokio::test]
    async fn a_gap_is_repaired_from_history_in_order_and_duplicates_are_dropped() {
        let (bus, msgs, room) = store_with(6).await;
        let hub = Arc::new(Hub::new(16));
        let outbox = Arc::new(Outbox::new(100, 1 << 20));
        hub.join(&room, 1, outbox.clone(), &bus).await.unwrap();
        assert_eq!(hub.go_live(&room, 1, 1, None, |_| None), GoLive::Live(1));
        dispatch(&hub, &msgs[1]); // 2
        dispatch(&hub, &msgs[1]); // 2 again: dropped
        dispatch(&hub, &msgs[4]); // 5: 3 and 4 were lost
        dispatch(&hub, &msgs[5]); // 6: held while repairing
        assert_eq!(drain(&outbox).await, vec![2]);
        let repairs: Vec<RoomName> = lock(&hub.repairs).drain().collect();
        assert_eq!(repairs, vec![room.clone()]);
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(drain(&outbox).await, vec![3, 4, 5, 6]);
        dispatch(&hub, &msgs[5]);
        assert_eq!(drain(&outbox).await, Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_hole_older_than_history_closes_the_member_with_1013() {
        let room = RoomName::new("r").unwrap();
        let bus = MemoryBus::new(3, Arc::new(Hub::new(16)));
        for i in 1..=8 {
            let t = MessageTemplate::new(&room, "u", &format!("m{i}"));
            bus.publish(&room, &t).await.unwrap();
        }
        let hub = Arc::new(Hub::new(16));
        let outbox = Arc::new(Outbox::new(100, 1 << 20));
        hub.join(&room, 1, outbox.clone(), &bus).await.unwrap();
        hub.go_live(&room, 1, 2, None, |_| None);
        hub.repair_all();
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(outbox.closing(), Some(CloseReason::TooSlow));
    }

    #[tokio::test]
    async fn a_hole_in_a_join_buffer_is_repaired_after_going_live() {
        let (bus, msgs, room) = store_with(5).await;
        let hub = Arc::new(Hub::new(16));
        let outbox = Arc::new(Outbox::new(100, 1 << 20));
        hub.join(&room, 1, outbox.clone(), &bus).await.unwrap();
        dispatch(&hub, &msgs[2]); // 3
        dispatch(&hub, &msgs[4]); // 5 (4 lost)
        assert_eq!(hub.go_live(&room, 1, 2, None, |_| None), GoLive::Live(3));
        assert_eq!(drain(&outbox).await, vec![3]);
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(drain(&outbox).await, vec![4, 5]);
    }
}
