//! Which local connections are in which room, and how a room's messages reach them: the
//! hub is the bus's [`BusEvents`] handler.
//!
//! The hub owns no socket and no Redis connection. It asks the bus to subscribe to a room
//! when the first local member joins and to unsubscribe when the last one leaves. When the
//! bus reports a message, the hub frames it for the WebSocket once and queues the same
//! shared bytes in each live member's [`Outbox`]; the outboxes are written once per batch
//! by its [`WriteScheduler`].
//!
//! **Joins.** A join is registered before the history is read: from then on, live
//! messages for the joining member are buffered in the hub. The session reads history,
//! replays it, then calls [`Hub::go_live`], which (under the room's lock, so no delivery
//! can interleave) queues the buffered messages newer than the replay, queues `joined`
//! and switches the member to live delivery. See `session::join` for the whole algorithm.
//!
//! **Every live member knows the last id it was given** (`last`). Delivery skips ids at or
//! below it (the history read and the subscription are different connections, so history
//! can be ahead of live delivery) and notices a gap above it, which puts the room in
//! repair ([`repair`]).

mod repair;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use chat_protocol::{RoomName, peek_ts};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::{
    bus::{Bus, BusError, BusEvent, BusEvents, Epoch, Msg},
    metrics::Metrics,
    sync::lock,
    transport::{Class, CloseReason, ConnId, Outbox, PendingWrites, WriteScheduler, frame},
};

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

/// Work that unsubscribes this instance from a room its last member left: await it, or
/// spawn it.
pub type Release = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Who a member is, for ephemeral frames.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    /// The member's user id (its own `typing` is not sent back to it).
    pub user: Arc<str>,
    /// Whether it takes ephemeral frames (`presence_diff`, `typing`): not `/websocket`
    /// clients, which render every frame as a chat line.
    pub signals: bool,
}

struct Member {
    outbox: Arc<Outbox>,
    info: MemberInfo,
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
    /// Ephemeral frames for a joining member, after its `joined` (at most the cap; extra
    /// ones are dropped: a presence snapshot follows anyway).
    signals: Vec<Bytes>,
    overflowed: bool,
    /// A new epoch began meanwhile (its ids restart at 1).
    new_epoch: Option<Epoch>,
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

    fn push_signal(&mut self, json: &Bytes, cap: usize) {
        if self.signals.len() < cap {
            self.signals.push(json.clone());
        }
    }
}

#[derive(Default)]
struct RoomState {
    members: HashMap<ConnId, Member>,
    /// `Some` while the room is being repaired: live delivery waits.
    repair: Option<Buffer>,
}

/// What [`deliver`] did with a message for one member.
enum Delivery {
    Delivered,
    Duplicate,
    Gap,
}

/// Gives message `id` (in wire form) to a live member if it is the next id it needs;
/// reports a gap. The member's outbox is listed in `pending` for the caller to write.
fn deliver(member: &mut Member, id: u64, wire: &Bytes, pending: &mut PendingWrites) -> Delivery {
    if id <= member.last {
        Delivery::Duplicate
    } else if id == member.last + 1 {
        member.last = id;
        // A refusal closed the outbox (too slow): nothing more to do for it.
        let _ = member.outbox.push(wire.clone(), Class::Live);
        pending.add(&member.outbox);
        Delivery::Delivered
    } else {
        Delivery::Gap
    }
}

struct Room {
    name: RoomName,
    state: Mutex<RoomState>,
    /// Serialises this room's bus subscribe/unsubscribe calls; `true` while subscribed.
    /// An async mutex because it is held across the bus call (the only hub lock that is).
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

/// Room → local members.
pub struct Hub {
    rooms: Mutex<HashMap<RoomName, Arc<Room>>>,
    /// Live messages a join or a repair may buffer before it reads history again.
    buffer_cap: usize,
    /// When delivered messages are written.
    writes: WriteScheduler,
    /// Rooms waiting for the repair worker (at most one entry per room).
    repairs: Mutex<HashSet<RoomName>>,
    repair_wake: Notify,
    /// Deliveries, delivery lag, gaps, repairs and resets are counted here.
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("rooms", &lock(&self.rooms).len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// An empty hub; joins and repairs buffer at most `buffer_cap` live messages; delivered
    /// messages are written by `writes` and counted in `metrics`.
    pub fn new(buffer_cap: usize, writes: WriteScheduler, metrics: Arc<Metrics>) -> Self {
        Hub {
            rooms: Mutex::new(HashMap::new()),
            buffer_cap,
            writes,
            repairs: Mutex::new(HashSet::new()),
            repair_wake: Notify::new(),
            metrics,
        }
    }

    fn room(&self, name: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).get(name).cloned()
    }

    /// Rooms this instance currently serves (has at least one member in).
    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Registers `conn` as a joining member of `room` and makes sure this instance is
    /// subscribed to the room. When this returns `Ok`, every message published from now on
    /// reaches the member's join buffer.
    pub async fn join<B: Bus>(
        &self,
        room: &RoomName,
        conn: ConnId,
        outbox: Arc<Outbox>,
        info: MemberInfo,
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
                    info,
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

    /// Finishes a join: queues the buffered live messages with id > `after`, then the frames
    /// `joined(last_id)` builds (`joined`, `presence`), then the ephemeral frames that came
    /// meanwhile, and makes the member live — all under the room's lock, so no live message
    /// can slip in between.
    pub fn go_live(
        &self,
        room: &RoomName,
        conn: ConnId,
        after: u64,
        epoch: Option<Epoch>,
        joined: impl FnOnce(u64) -> Vec<Bytes>,
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
        if buffer.new_epoch.is_some() && buffer.new_epoch != epoch {
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
        let mut delivered = 0u64;
        for msg in buffered.iter().filter(|m| m.id > after) {
            if msg.id != last_id + 1 {
                // A live message was lost while this member joined: the room's repair
                // fills the hole (from `last_id`) and delivers the rest in order.
                hole = true;
                break;
            }
            last_id = msg.id;
            if member
                .outbox
                .push(frame::text(&msg.json), Class::Live)
                .is_err()
            {
                return GoLive::Gone;
            }
            delivered += 1;
        }
        self.metrics.delivered.increment(delivered);
        for frame in joined(last_id) {
            if member.outbox.push(frame, Class::Reply).is_err() {
                return GoLive::Gone;
            }
        }
        for json in std::mem::take(&mut buffer.signals) {
            if member.outbox.push(frame::text(&json), Class::Live).is_err() {
                return GoLive::Gone;
            }
        }
        member.joining = None;
        member.last = last_id;
        member.epoch = epoch;
        if hole {
            self.metrics.gaps_detected.increment(1);
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
    /// member, returns the work that unsubscribes this instance from the room.
    pub fn leave<B: Bus + Clone + 'static>(
        self: &Arc<Self>,
        room: &RoomName,
        conn: ConnId,
        bus: &B,
    ) -> Option<Release> {
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

    /// Queues a message that arrived from the bus for every local member of its room,
    /// framed once. Never waits: a member that cannot take it is closed as too slow by its
    /// outbox. The outboxes that got it are listed in `pending`.
    fn dispatch(&self, room: &RoomName, msg: Msg, pending: &mut PendingWrites) {
        let Some(entry) = self.room(room.as_str()) else {
            return;
        };
        let cap = self.buffer_cap;
        let mut wire: Option<Bytes> = None;
        let mut st = entry.state();
        let RoomState { members, repair } = &mut *st;
        let mut gap = false;
        let mut delivered = 0u64;
        for member in members.values_mut() {
            match member.joining.as_mut() {
                Some(buffer) => buffer.push(&msg, cap),
                None if repair.is_some() => {}
                None => {
                    let wire = wire.get_or_insert_with(|| frame::text(&msg.json));
                    match deliver(member, msg.id, wire, pending) {
                        Delivery::Delivered => delivered += 1,
                        Delivery::Duplicate => {}
                        Delivery::Gap => gap = true,
                    }
                }
            }
        }
        // Counted once per message, not per member.
        if delivered > 0 {
            self.metrics.delivered.increment(delivered);
            if let Some(ts) = peek_ts(&msg.json) {
                self.metrics.delivery_lag(ts);
            }
        }
        match repair {
            Some(buffer) => buffer.push(&msg, cap),
            None if gap => {
                let mut buffer = Buffer::default();
                buffer.push(&msg, cap);
                *repair = Some(buffer);
                drop(st);
                self.metrics.gaps_detected.increment(1);
                warn!(%room, id = msg.id, "gap in live messages; repairing from history");
                self.request_repair(&entry.name);
            }
            None => {}
        }
    }

    /// Queues an ephemeral frame for the room's members that take them (not `except`'s
    /// own connections), framed once; joining members get it after their `joined`.
    fn signal(
        &self,
        room: &RoomName,
        json: &Bytes,
        except: Option<&str>,
        pending: &mut PendingWrites,
    ) {
        let Some(entry) = self.room(room.as_str()) else {
            return;
        };
        let cap = self.buffer_cap;
        let mut wire: Option<Bytes> = None;
        let mut st = entry.state();
        for member in st.members.values_mut() {
            if !member.info.signals || except == Some(&*member.info.user) {
                continue;
            }
            match member.joining.as_mut() {
                Some(buffer) => buffer.push_signal(json, cap),
                None => {
                    let wire = wire.get_or_insert_with(|| frame::text(json));
                    // A refusal closed the outbox (too slow): nothing more to do for it.
                    let _ = member.outbox.push(wire.clone(), Class::Live);
                    pending.add(&member.outbox);
                }
            }
        }
    }

    /// A new epoch began in `room` (its ids restart at 1): members that hold ids of an
    /// older epoch are closed with 1013 and resume with `since` and their epoch, and are
    /// told `recovered:false`. Members of an empty room simply adopt the epoch.
    fn new_epoch(&self, room: &RoomName, epoch: Epoch) {
        let Some(entry) = self.room(room.as_str()) else {
            return;
        };
        let mut st = entry.state();
        let mut closed = 0usize;
        for member in st.members.values_mut() {
            if let Some(buffer) = member.joining.as_mut() {
                // What it buffered so far is from the old epoch: its ids mean nothing now.
                buffer.msgs.clear();
                buffer.new_epoch = Some(epoch.clone());
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
            self.metrics.epoch_resets.increment(1);
            warn!(%room, %epoch, closed, "room reset (new epoch): members must resume");
        }
    }
}

impl BusEvents for Hub {
    fn deliver(&self, events: &mut Vec<BusEvent>) {
        let mut pending = PendingWrites::default();
        // A client is too slow when CLIENT_QUEUE live messages wait for its socket, not
        // when a large batch queued them all before the first write: hand the writes over
        // at least every half of that bound.
        let write_every = (self.buffer_cap / 2).max(1);
        let mut since_write = 0usize;
        for event in events.drain(..) {
            match event {
                BusEvent::Message { room, msg } => {
                    self.dispatch(&room, msg, &mut pending);
                    since_write += 1;
                    if since_write >= write_every {
                        self.writes.submit(std::mem::take(&mut pending));
                        since_write = 0;
                    }
                }
                BusEvent::NewEpoch { room, epoch } => self.new_epoch(&room, epoch),
                BusEvent::Lost => self.repair_all(),
                BusEvent::LostRoom { room } => self.repair_room(&room),
                BusEvent::Signal { room, json, except } => {
                    self.signal(&room, &json, except.as_deref(), &mut pending);
                }
            }
        }
        self.writes.submit(pending);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chat_protocol::MessageTemplate;

    use super::*;
    use crate::{
        bus::memory::MemoryBus,
        transport::{Bounds, CaptureSocket},
    };

    /// A member as the tests join it.
    pub(crate) fn tests_info() -> MemberInfo {
        MemberInfo {
            user: Arc::from("u"),
            signals: true,
        }
    }

    pub(crate) fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(
            16,
            WriteScheduler::immediate(),
            Metrics::new("test").unwrap(),
        ))
    }

    /// A store whose own deliveries go to a hub nobody listens to, so the hub under test
    /// only sees what the test dispatches: lost messages are simulated by not dispatching.
    pub(crate) async fn store(history_size: usize, n: u64) -> (MemoryBus, Vec<Msg>, RoomName) {
        let room = RoomName::new("r").unwrap();
        let bus = MemoryBus::new(history_size, hub());
        for i in 1..=n {
            let t = MessageTemplate::new(&room, "u", &format!("m{i}"));
            bus.publish(&room, &t, None).await.unwrap();
        }
        let msgs = bus.history(&room, None).await.unwrap().messages;
        (bus, msgs, room)
    }

    /// An outbox on a socket that keeps what is written.
    pub(crate) fn member() -> (Arc<Outbox>, Arc<CaptureSocket>) {
        member_with(100)
    }

    /// The same, closing the client beyond `live` waiting live messages.
    fn member_with(live: usize) -> (Arc<Outbox>, Arc<CaptureSocket>) {
        let socket = CaptureSocket::unbounded();
        let bounds = Bounds {
            live,
            live_bytes: 1 << 20,
        };
        (
            Arc::new(Outbox::new(Box::new(socket.clone()), bounds)),
            socket,
        )
    }

    /// Ids of the messages written to the member's socket since the last call.
    pub(crate) fn written_ids(outbox: &Outbox, socket: &CaptureSocket) -> Vec<u64> {
        outbox.write_or_defer();
        socket
            .take_payloads()
            .iter()
            .filter_map(|p| chat_protocol::peek_id(p))
            .collect()
    }

    pub(crate) fn dispatch(hub: &Hub, msg: &Msg) {
        hub.deliver(&mut vec![BusEvent::Message {
            room: RoomName::new("r").unwrap(),
            msg: msg.clone(),
        }]);
    }

    #[tokio::test]
    async fn live_members_get_each_id_once_in_order_and_joining_members_buffer() {
        let (bus, msgs, room) = store(100, 4).await;
        let hub = hub();
        let (live, live_socket) = member();
        let (late, late_socket) = member();
        hub.join(&room, 1, live.clone(), tests_info(), &bus)
            .await
            .unwrap();
        assert_eq!(
            hub.go_live(&room, 1, 0, None, |_| Vec::new()),
            GoLive::Live(0)
        );
        hub.join(&room, 2, late.clone(), tests_info(), &bus)
            .await
            .unwrap();
        for msg in &msgs[..3] {
            dispatch(&hub, msg);
        }
        dispatch(&hub, &msgs[0]); // a duplicate
        assert_eq!(written_ids(&live, &live_socket), [1, 2, 3]);
        assert_eq!(written_ids(&late, &late_socket), Vec::<u64>::new());
        // The late member replayed up to 1: it gets 2 and 3 from its buffer, then joined.
        let joined = hub.go_live(&room, 2, 1, None, |last| {
            vec![frame::text(format!("joined {last}").as_bytes())]
        });
        assert_eq!(joined, GoLive::Live(3));
        late.write_or_defer();
        let frames = late_socket.take_payloads();
        assert_eq!(frames.last().map(Vec::as_slice), Some(&b"joined 3"[..]));
        assert_eq!(frames.len(), 3);
        dispatch(&hub, &msgs[3]);
        assert_eq!(written_ids(&late, &late_socket), [4]);
        assert_eq!(written_ids(&live, &live_socket), [4]);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_client_queue_does_not_close_a_reading_client() {
        let (bus, msgs, room) = store(100, 40).await;
        let hub = hub(); // CLIENT_QUEUE 16
        let (outbox_16, socket) = member_with(16);
        hub.join(&room, 1, outbox_16.clone(), tests_info(), &bus)
            .await
            .unwrap();
        hub.go_live(&room, 1, 0, None, |_| Vec::new());
        let mut batch: Vec<BusEvent> = msgs
            .iter()
            .map(|m| BusEvent::Message {
                room: room.clone(),
                msg: m.clone(),
            })
            .collect();
        hub.deliver(&mut batch);
        assert_eq!(outbox_16.closing(), None);
        assert_eq!(
            written_ids(&outbox_16, &socket),
            (1..=40).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_new_epoch_drops_what_a_join_buffered_of_the_old_one() {
        let (bus, old_msgs, room) = store(100, 2).await;
        // Another life of the room: the same ids, other messages.
        let new_msgs: Vec<Msg> = (1..=2)
            .map(|id| Msg {
                id,
                json: format!("new {id}").into(),
            })
            .collect();
        let hub = hub();
        let (outbox, socket) = member();
        hub.join(&room, 1, outbox.clone(), tests_info(), &bus)
            .await
            .unwrap();
        dispatch(&hub, &old_msgs[0]); // old 1
        dispatch(&hub, &old_msgs[1]); // old 2
        hub.deliver(&mut vec![BusEvent::NewEpoch {
            room: room.clone(),
            epoch: Epoch::from("e2"),
        }]);
        dispatch(&hub, &new_msgs[0]);
        dispatch(&hub, &new_msgs[1]);
        // The member replayed the new epoch's (empty) history: it gets new 1 and 2, not
        // the old 1 and 2 that were buffered before the notice.
        let live = hub.go_live(&room, 1, 0, Some(Epoch::from("e2")), |_| Vec::new());
        assert_eq!(live, GoLive::Live(2));
        outbox.write_or_defer();
        assert_eq!(
            socket.take_payloads(),
            [b"new 1".to_vec(), b"new 2".to_vec()]
        );
    }

    #[tokio::test]
    async fn a_new_epoch_closes_members_of_the_old_one() {
        let (bus, msgs, room) = store(100, 2).await;
        let hub = hub();
        let (old, _) = member();
        let (fresh, _) = member();
        hub.join(&room, 1, old.clone(), tests_info(), &bus)
            .await
            .unwrap();
        hub.go_live(&room, 1, 0, Some(Epoch::from("e1")), |_| Vec::new());
        dispatch(&hub, &msgs[0]);
        hub.join(&room, 2, fresh.clone(), tests_info(), &bus)
            .await
            .unwrap();
        hub.deliver(&mut vec![BusEvent::NewEpoch {
            room: room.clone(),
            epoch: Epoch::from("e2"),
        }]);
        assert_eq!(old.closing(), Some(CloseReason::TooSlow));
        // A join whose replay was from the old epoch is closed at its hand-over...
        assert_eq!(
            hub.go_live(&room, 2, 0, Some(Epoch::from("e1")), |_| Vec::new()),
            GoLive::Gone
        );
        assert_eq!(fresh.closing(), Some(CloseReason::TooSlow));
    }
}
