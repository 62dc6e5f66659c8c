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

/// This instance's view of presence.
#[derive(Debug)]
pub struct Presence {
    enabled: bool,
    lease: Duration,
    max_users: usize,
    /// (room, user id) → the user and how many of its connections are in the room.
    local: Mutex<HashMap<(RoomName, String), (PresenceUser, usize)>>,
    /// Orders one (room, user)'s first-in and last-out announcements.
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
    pub async fn enter(&self, bus: &AnyBus, room: &RoomName, user: &PresenceUser) {
        if !self.enabled {
            return;
        }
        let _ordered = self.stripe(room, &user.user).lock().await;
        let first = {
            let mut local = lock(&self.local);
            let entry = local
                .entry((room.clone(), user.user.clone()))
                .or_insert_with(|| (user.clone(), 0));
            entry.1 += 1;
            entry.1 == 1
        };
        if first && let Err(err) = bus.presence_enter(room, user, self.lease).await {
            // The next renewal takes the lease again.
            warn!(%room, error = %err, "presence: entering failed");
        }
    }

    /// One of `user`'s connections left `room`; the last one announces they left.
    pub async fn exit(&self, bus: &AnyBus, room: &RoomName, user: &PresenceUser) {
        if !self.enabled {
            return;
        }
        let _ordered = self.stripe(room, &user.user).lock().await;
        let last = {
            let mut local = lock(&self.local);
            let key = (room.clone(), user.user.clone());
            match local.get_mut(&key) {
                Some(entry) if entry.1 > 1 => {
                    entry.1 -= 1;
                    false
                }
                Some(_) => local.remove(&key).is_some(),
                None => false,
            }
        };
        if last && let Err(err) = bus.presence_exit(room, user).await {
            // The lease runs out, and the survivors report them `left`.
            warn!(%room, error = %err, "presence: leaving failed");
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
            for ((room, _), (user, _)) in lock(&self.local).iter() {
                rooms.entry(room.clone()).or_default().push(user.clone());
            }
            for (room, users) in rooms {
                if let Err(err) = bus.presence_renew(&room, &users, self.lease).await {
                    warn!(%room, error = %err, "presence: renewing failed");
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
