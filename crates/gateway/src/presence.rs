//! Who is here and who is typing, as this instance sees it.
//!
//! A user is in a room while at least one of their connections is; this instance counts
//! its own connections per (room, user) and tells the bus only about the first one in and
//! the last one out, so a user with several tabs is listed once. On Redis, the bus keeps
//! leases that this module renews every third of `PRESENCE_TTL_SECS`, so the users of an
//! instance that dies are reported `left` by the survivors once the leases run out (see
//! `bus::redis::presence`). `PRESENCE=off` turns all of it off: no frames, no Redis writes.
//!
//! Typing is throttled here too: at most one `typing` per user and room every
//! [`TYPING_EVERY`] leaves this instance.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use chat_protocol::{PresenceUser, RoomName, ServerFrame};
use tokio::time::Instant;
use tracing::warn;

use crate::{
    bus::{AnyBus, Bus},
    sync::lock,
};

/// At most one `typing` per user and room this often.
pub const TYPING_EVERY: Duration = Duration::from_secs(2);

/// Typing records kept before the old ones are dropped.
const TYPING_KEPT: usize = 10_000;

/// One (room, user) on this instance.
#[derive(Debug)]
struct Local {
    user: PresenceUser,
    /// This user's connections in the room here.
    conns: usize,
    /// Whether the bus was told they are here (and not told since that they left).
    announced: bool,
}

/// What the bus must hear about one (room, user) to match [`Local`].
enum Due {
    Enter(PresenceUser),
    Exit(PresenceUser),
}

/// This instance's view of presence.
#[derive(Debug)]
pub struct Presence {
    enabled: bool,
    lease: Duration,
    max_users: usize,
    /// (room, user id) → how many of the user's connections are in the room here.
    local: Mutex<HashMap<(RoomName, String), Local>>,
    /// Orders the bus calls of one (room, user).
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// (room, user id) → when its last `typing` was relayed.
    typing: Mutex<HashMap<(RoomName, String), Instant>>,
}

impl Presence {
    /// Presence as configured (`PRESENCE`, `PRESENCE_TTL_SECS`, `PRESENCE_MAX_USERS`).
    pub fn new(enabled: bool, lease: Duration, max_users: usize) -> Self {
        Presence {
            enabled,
            lease,
            max_users,
            local: Mutex::default(),
            stripes: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            typing: Mutex::default(),
        }
    }

    fn stripe(&self, room: &RoomName, user: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (room, user).hash(&mut h);
        &self.stripes[(h.finish() % self.stripes.len() as u64) as usize]
    }

    /// One more of `user`'s connections is in `room`; the first one announces them.
    ///
    /// The count changes before the first await, and the bus is told by a task of its
    /// own: a caller that is dropped half-way (its connection closed) cannot leave the
    /// count and the bus disagreeing. Each [`Presence::exit`] must match an `enter`.
    pub async fn enter(self: &Arc<Self>, bus: &AnyBus, room: &RoomName, user: &PresenceUser) {
        if !self.enabled {
            return;
        }
        {
            let mut local = lock(&self.local);
            let entry = local
                .entry((room.clone(), user.user.clone()))
                .or_insert_with(|| Local {
                    user: user.clone(),
                    conns: 0,
                    announced: false,
                });
            entry.conns += 1;
        }
        self.settle_detached(bus, room, &user.user).await;
    }

    /// One of `user`'s connections left `room`; the last one announces they left.
    pub async fn exit(self: &Arc<Self>, bus: &AnyBus, room: &RoomName, user: &PresenceUser) {
        if !self.enabled {
            return;
        }
        {
            let mut local = lock(&self.local);
            if let Some(entry) = local.get_mut(&(room.clone(), user.user.clone())) {
                entry.conns = entry.conns.saturating_sub(1);
            }
        }
        self.settle_detached(bus, room, &user.user).await;
    }

    /// Runs [`Presence::settle`] in a task of its own and waits for it.
    async fn settle_detached(self: &Arc<Self>, bus: &AnyBus, room: &RoomName, user: &str) {
        let (this, bus, room, user) = (self.clone(), bus.clone(), room.clone(), user.to_owned());
        // A panic in it is the task's own; the count is fixed by the next settle.
        let _ = tokio::spawn(async move { this.settle(&bus, &room, &user).await }).await;
    }

    /// Tells the bus what it must hear for (room, user) to match the local count: that
    /// they arrived, that they left, or nothing. It reads the count under the (room,
    /// user)'s stripe lock, so settles running in any order end with the bus right.
    async fn settle(&self, bus: &AnyBus, room: &RoomName, user: &str) {
        let _ordered = self.stripe(room, user).lock().await;
        let key = (room.clone(), user.to_owned());
        let due = {
            let mut local = lock(&self.local);
            match local.get(&key) {
                Some(e) if e.conns > 0 && !e.announced => Due::Enter(e.user.clone()),
                Some(e) if e.conns == 0 && e.announced => Due::Exit(e.user.clone()),
                Some(e) if e.conns == 0 => {
                    local.remove(&key);
                    return;
                }
                _ => return,
            }
        };
        match due {
            Due::Enter(user) => {
                if let Err(err) = bus.presence_enter(room, &user, self.lease).await {
                    // The next renewal takes the lease.
                    warn!(%room, error = %err, "presence: entering failed");
                }
                // Announced either way: the renewals hold the lease from now on.
                if let Some(e) = lock(&self.local).get_mut(&key) {
                    e.announced = true;
                }
            }
            Due::Exit(user) => {
                if let Err(err) = bus.presence_exit(room, &user).await {
                    // The lease runs out, and the survivors report them `left`.
                    warn!(%room, error = %err, "presence: leaving failed");
                }
                let mut local = lock(&self.local);
                match local.get_mut(&key) {
                    // Back meanwhile: their settle, queued behind this one, enters them.
                    Some(e) if e.conns > 0 => e.announced = false,
                    _ => {
                        local.remove(&key);
                    }
                }
            }
        }
    }

    /// The `presence` frame a joining client gets after `joined` (none when presence is
    /// off, or the bus cannot say).
    pub async fn snapshot(&self, bus: &AnyBus, room: &RoomName) -> Option<Bytes> {
        if !self.enabled {
            return None;
        }
        match bus.presence(room, self.max_users).await {
            Ok(snapshot) => {
                let frame = ServerFrame::Presence {
                    room: room.to_string(),
                    count: snapshot.count,
                    users: snapshot.users,
                };
                Some(Bytes::from(frame.to_json()))
            }
            Err(err) => {
                warn!(%room, error = %err, "presence: reading failed");
                None
            }
        }
    }

    /// Renews this instance's leases every third of `PRESENCE_TTL_SECS` (and so sweeps
    /// the rooms it serves of the leases that ran out). Runs for the life of the instance.
    pub async fn run_renewals(&self, bus: &AnyBus) {
        if !self.enabled {
            return;
        }
        let mut ticker = tokio::time::interval(self.lease / 3);
        loop {
            ticker.tick().await;
            let mut rooms: HashMap<RoomName, Vec<PresenceUser>> = HashMap::new();
            for ((room, _), e) in lock(&self.local).iter() {
                if e.announced && e.conns > 0 {
                    rooms.entry(room.clone()).or_default().push(e.user.clone());
                }
            }
            for (room, users) in rooms {
                if let Err(err) = bus.presence_renew(&room, &users, self.lease).await {
                    warn!(%room, error = %err, "presence: renewing failed");
                    continue;
                }
                // A user who left while the renewal was on its way may have had their
                // lease taken again by it: give those back now.
                let gone: Vec<PresenceUser> = {
                    let local = lock(&self.local);
                    users
                        .into_iter()
                        .filter(|u| {
                            local
                                .get(&(room.clone(), u.user.clone()))
                                .is_none_or(|e| !e.announced)
                        })
                        .collect()
                };
                for user in gone {
                    let _ordered = self.stripe(&room, &user.user).lock().await;
                    let still_gone = lock(&self.local)
                        .get(&(room.clone(), user.user.clone()))
                        .is_none_or(|e| !e.announced);
                    if still_gone && let Err(err) = bus.presence_exit(&room, &user).await {
                        warn!(%room, error = %err, "presence: leaving failed");
                    }
                }
            }
        }
    }

    /// Whether `user` may relay a `typing` in `room` now (at most one per
    /// [`TYPING_EVERY`]).
    pub fn may_type(&self, room: &RoomName, user: &str) -> bool {
        let now = Instant::now();
        let mut typing = lock(&self.typing);
        if typing.len() >= TYPING_KEPT {
            typing.retain(|_, at| now.duration_since(*at) < TYPING_EVERY);
        }
        match typing.get_mut(&(room.clone(), user.to_owned())) {
            Some(at) if now.duration_since(*at) < TYPING_EVERY => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                typing.insert((room.clone(), user.to_owned()), now);
                true
            }
        }
    }
}

/// The `typing` frame's JSON for `user` in `room`.
pub fn typing_json(room: &RoomName, user: &PresenceUser) -> Bytes {
    let frame = ServerFrame::Typing {
        room: room.to_string(),
        user: user.user.clone(),
        name: user.name.clone(),
    };
    Bytes::from(frame.to_json())
}

/// Keeps the instance's presence leases alive (spawned at start).
pub fn spawn_renewals(presence: Arc<Presence>, bus: AnyBus) {
    // Lives as long as the process (it only waits or renews).
    tokio::spawn(async move { presence.run_renewals(&bus).await });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusEvent, BusEvents, memory::MemoryBus};

    /// The presence diffs the bus published, in order.
    #[derive(Default)]
    struct Diffs(Mutex<Vec<String>>);

    impl BusEvents for Diffs {
        fn deliver(&self, events: &mut Vec<BusEvent>) {
            for e in events.drain(..) {
                if let BusEvent::Signal { json, .. } = e {
                    lock(&self.0).push(String::from_utf8_lossy(&json).into_owned());
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enters_and_exits_in_any_order_and_cancelled_half_way_leave_the_bus_right() {
        let diffs = Arc::new(Diffs::default());
        let bus = AnyBus::Memory(MemoryBus::new(10, diffs.clone()));
        let p = Arc::new(Presence::new(true, Duration::from_secs(30), 10));
        let room = RoomName::new("r").unwrap();
        let ann = PresenceUser {
            user: "u-ann".into(),
            name: "Ann".into(),
        };
        // 40 connections of ann come and go at once; one of them stays.
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (p, bus, room, ann) = (p.clone(), bus.clone(), room.clone(), ann.clone());
            tasks.push(tokio::spawn(async move {
                p.enter(&bus, &room, &ann).await;
                if i != 0 {
                    p.exit(&bus, &room, &ann).await;
                }
            }));
        }
        // Callers dropped as soon as they start: the count changed, the bus follows.
        for _ in 0..10 {
            let f = Box::pin(p.enter(&bus, &room, &ann));
            let _ = futures_util::poll!(f);
            p.exit(&bus, &room, &ann).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let now = bus.presence(&room, 10).await.unwrap();
        assert_eq!((now.count, now.users), (1, vec![ann.clone()]));
        // The diffs alternate, starting with joined and ending with it.
        let seen = lock(&diffs.0).clone();
        assert!(!seen.is_empty());
        for (i, d) in seen.iter().enumerate() {
            let joined = d.contains(r#""joined":[{"#);
            assert_eq!(joined, i % 2 == 0, "diff {i}: {d} of {seen:?}");
        }
        assert_eq!(seen.len() % 2, 1);
        p.exit(&bus, &room, &ann).await;
        assert_eq!(bus.presence(&room, 10).await.unwrap().count, 0);
        assert!(lock(&p.local).is_empty(), "nothing left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn typing_is_relayed_at_most_every_two_seconds_per_user_and_room() {
        let p = Presence::new(true, Duration::from_secs(30), 10);
        let (a, b) = (RoomName::new("a").unwrap(), RoomName::new("b").unwrap());
        assert!(p.may_type(&a, "u1"));
        assert!(!p.may_type(&a, "u1"));
        assert!(p.may_type(&b, "u1") && p.may_type(&a, "u2"));
        tokio::time::advance(TYPING_EVERY).await;
        assert!(p.may_type(&a, "u1"));
    }
}
