//! Which local connections are in which room, and the gap-free hand-over of a join.
//!
//! The hub owns no sockets and no Redis connection. It is told by the bus that a message
//! arrived ([`Hub::dispatch`]) and pushes the same shared bytes into each member's
//! [`Outbox`]; it asks the bus to subscribe to a room when the first local member joins
//! and to unsubscribe when the last one leaves.
//!
//! A join is registered before the history is read: from then on, live messages for the
//! joining member are buffered in the hub. The session reads history, replays it, then
//! calls [`Hub::go_live`], which (under the room's lock, so no dispatch can interleave)
//! appends the buffered messages newer than the replay, queues `joined` and switches the
//! member to live delivery. Nothing is lost (the history read happens after the
//! subscription is active) and nothing is doubled (buffered ids at or below the replay's
//! last id are dropped).

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
};

use axum::extract::ws::Utf8Bytes;
use chat_protocol::RoomName;
use tracing::{debug, warn};

use crate::{
    bus::{Bus, BusError, Msg},
    outbox::{LivePush, Outbox},
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
    joining: Option<JoinBuffer>,
    /// Live messages up to this id were already replayed: the history read (on the command
    /// connection) can see a message before the subscriber connection delivers it.
    /// Cleared by the first newer message.
    skip_through: u64,
}

#[derive(Default)]
struct JoinBuffer {
    msgs: Vec<Msg>,
    overflowed: bool,
}

#[derive(Default)]
struct RoomState {
    members: HashMap<ConnId, Member>,
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
    /// Live messages a joining member may accumulate before its replay is restarted.
    join_buffer_cap: usize,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("rooms", &lock(&self.rooms).len())
            .finish()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new(join_buffer_cap: usize) -> Self {
        Hub {
            rooms: Mutex::new(HashMap::new()),
            join_buffer_cap,
        }
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
                    joining: Some(JoinBuffer::default()),
                    skip_through: 0,
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
        joined: impl FnOnce(u64) -> Option<Utf8Bytes>,
    ) -> GoLive {
        let Some(entry) = lock(&self.rooms).get(room).cloned() else {
            return GoLive::Gone;
        };
        let mut st = entry.state();
        let Some(member) = st.members.get_mut(&conn) else {
            return GoLive::Gone;
        };
        let Some(buffer) = member.joining.as_mut() else {
            return GoLive::Gone;
        };
        if buffer.overflowed {
            *buffer = JoinBuffer::default();
            return GoLive::Retry;
        }
        let buffered = std::mem::take(&mut buffer.msgs);
        let mut last_id = after;
        for msg in buffered.into_iter().filter(|m| m.id > after) {
            last_id = msg.id;
            if member.outbox.push_live(msg.frame) != LivePush::Queued {
                return GoLive::Gone;
            }
        }
        if let Some(frame) = joined(last_id)
            && member.outbox.push_now(frame).is_err()
        {
            return GoLive::Gone;
        }
        member.joining = None;
        member.skip_through = last_id;
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
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
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
        Some(async move { hub.release(entry, &bus).await })
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
    /// Never waits: a member that cannot take it is closed as too slow by its outbox.
    pub fn dispatch(&self, room: &str, msg: Msg) {
        let Some(entry) = lock(&self.rooms).get(room).cloned() else {
            return;
        };
        let cap = self.join_buffer_cap;
        let mut st = entry.state();
        for member in st.members.values_mut() {
            match member.joining.as_mut() {
                None if msg.id <= member.skip_through => {}
                None => {
                    member.skip_through = 0;
                    member.outbox.push_live(msg.frame.clone());
                }
                Some(buf) if buf.overflowed => {}
                Some(buf) if buf.msgs.len() >= cap => {
                    buf.msgs = Vec::new();
                    buf.overflowed = true;
                }
                Some(buf) => buf.msgs.push(msg.clone()),
            }
        }
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

    /// Rooms this instance currently serves (has at least one member in).
    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }
}
