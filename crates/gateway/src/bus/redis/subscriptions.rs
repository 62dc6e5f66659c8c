//! Which room channels this instance is subscribed to, and on which Redis Cluster node, so
//! they can be restored after the subscriber connection is replaced (Redis forgets a
//! connection's subscriptions with it) and followed when a room's slot moves to another
//! node (the old one drops the subscription).
//!
//! The hub decides *when* to subscribe (first local member in, last one out) and never
//! runs two calls for one room at once; this set remembers *what* is subscribed, and
//! *where*. A restore or a move holds the gate exclusively, so no subscribe or
//! unsubscribe runs while it works: a room left meanwhile cannot be subscribed again
//! behind the leave's back.

use std::{collections::HashMap, future::Future, sync::Mutex};

use chat_protocol::RoomName;
use fred::types::config::Server;
use tokio::sync::RwLock;
use tracing::warn;

use crate::{bus::BusError, sync::lock};

/// Where a subscription is held: the Cluster node that owns the room's slot (`None`
/// outside a Cluster).
pub(super) type Owner = Option<Server>;

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    rooms: Mutex<HashMap<RoomName, Owner>>,
    /// Shared by subscribe and unsubscribe calls, exclusive for a restore. Held across the
    /// Redis calls (it orders them), never across anything that waits on a client.
    gate: RwLock<()>,
}

impl Subscriptions {
    /// Records `room` and runs `subscribe`, which says where the subscription landed;
    /// forgets the room again if that fails (the hub then treats it as not subscribed).
    pub(super) async fn add(
        &self,
        room: &RoomName,
        subscribe: impl Future<Output = Result<Owner, BusError>>,
    ) -> Result<(), BusError> {
        let _shared = self.gate.read().await;
        lock(&self.rooms).insert(room.clone(), None);
        match subscribe.await {
            Ok(owner) => {
                lock(&self.rooms).insert(room.clone(), owner);
                Ok(())
            }
            Err(err) => {
                lock(&self.rooms).remove(room);
                Err(err)
            }
        }
    }

    /// Rooms subscribed (or being subscribed) now.
    pub(super) fn len(&self) -> usize {
        lock(&self.rooms).len()
    }

    /// Forgets `room` and runs `unsubscribe`.
    pub(super) async fn remove(
        &self,
        room: &RoomName,
        unsubscribe: impl Future<Output = Result<(), BusError>>,
    ) -> Result<(), BusError> {
        let _shared = self.gate.read().await;
        lock(&self.rooms).remove(room);
        unsubscribe.await
    }

    /// Runs `subscribe` for every recorded room, with no other call in between. Stops at
    /// the first failure. Returns how many rooms were subscribed.
    pub(super) async fn restore<F, Fut>(&self, mut subscribe: F) -> Result<usize, BusError>
    where
        F: FnMut(RoomName) -> Fut,
        Fut: Future<Output = Result<Owner, BusError>>,
    {
        let _exclusive = self.gate.write().await;
        let rooms: Vec<RoomName> = lock(&self.rooms).keys().cloned().collect();
        let count = rooms.len();
        for room in rooms {
            let owner = subscribe(room.clone()).await?;
            lock(&self.rooms).insert(room, owner);
        }
        Ok(count)
    }

    /// Subscribes again, with `subscribe`, every room whose recorded owner is not
    /// `owner_now(room)` any more, with no other call in between; returns the rooms that
    /// moved. A room whose new subscription fails keeps its old record, so the next check
    /// tries again.
    pub(super) async fn follow<F, Fut>(
        &self,
        owner_now: impl Fn(&RoomName) -> Owner,
        mut subscribe: F,
    ) -> Vec<RoomName>
    where
        F: FnMut(RoomName) -> Fut,
        Fut: Future<Output = Result<Owner, BusError>>,
    {
        let _exclusive = self.gate.write().await;
        let moved: Vec<RoomName> = lock(&self.rooms)
            .iter()
            .filter(|(room, owner)| **owner != owner_now(room))
            .map(|(room, _)| room.clone())
            .collect();
        let mut followed = Vec::with_capacity(moved.len());
        for room in moved {
            match subscribe(room.clone()).await {
                Ok(owner) => {
                    lock(&self.rooms).insert(room.clone(), owner);
                    followed.push(room);
                }
                Err(err) => {
                    warn!(%room, error = %err, "subscribing at the slot's new owner failed")
                }
            }
        }
        followed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    #[tokio::test]
    async fn a_restore_replays_what_is_subscribed_now() {
        let subs = Subscriptions::default();
        subs.add(&r("a"), async { Ok(None) }).await.unwrap();
        subs.add(&r("b"), async { Ok(None) }).await.unwrap();
        let failed = subs
            .add(&r("c"), async { Err(BusError::Disconnected) })
            .await;
        assert!(failed.is_err());
        subs.remove(&r("a"), async { Ok(()) }).await.unwrap();
        let replayed = Mutex::new(Vec::new());
        let n = subs
            .restore(|room| {
                lock(&replayed).push(room);
                async { Ok(None) }
            })
            .await
            .unwrap();
        assert_eq!((n, lock(&replayed).clone()), (1, vec![r("b")]));
    }

    #[tokio::test]
    async fn a_leave_waits_for_a_restore_in_progress() {
        let subs = std::sync::Arc::new(Subscriptions::default());
        subs.add(&r("a"), async { Ok(None) }).await.unwrap();
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        let (started, restore_started) = tokio::sync::oneshot::channel::<()>();
        let restoring = {
            let subs = subs.clone();
            tokio::spawn(async move {
                let mut hold = Some(hold);
                let mut started = Some(started);
                subs.restore(|_| {
                    let hold = hold.take();
                    if let Some(s) = started.take() {
                        let _ = s.send(());
                    }
                    async move {
                        if let Some(h) = hold {
                            let _ = h.await;
                        }
                        Ok(None)
                    }
                })
                .await
            })
        };
        restore_started.await.unwrap();
        let leaving = {
            let subs = subs.clone();
            tokio::spawn(async move { subs.remove(&r("a"), async { Ok(()) }).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !leaving.is_finished(),
            "the leave must wait for the restore"
        );
        release.send(()).unwrap();
        assert_eq!(restoring.await.unwrap().unwrap(), 1);
        leaving.await.unwrap().unwrap();
        assert!(lock(&subs.rooms).is_empty());
    }

    #[tokio::test]
    async fn rooms_whose_slot_moved_are_subscribed_again_where_it_went() {
        let (a, b) = (Server::new("a", 1), Server::new("b", 2));
        let subs = Subscriptions::default();
        for (room, at) in [("x", &a), ("y", &a), ("z", &a)] {
            let at = Some(at.clone());
            subs.add(&r(room), async { Ok(at) }).await.unwrap();
        }
        // y's slot moved to b; z's new subscription fails and is tried again next time.
        let now = |room: &RoomName| {
            Some(if room.as_str() == "x" {
                a.clone()
            } else {
                b.clone()
            })
        };
        let moved = subs
            .follow(&now, |room| {
                let b = b.clone();
                async move {
                    if room.as_str() == "z" {
                        Err(BusError::Disconnected)
                    } else {
                        Ok(Some(b))
                    }
                }
            })
            .await;
        assert_eq!(moved, vec![r("y")]);
        assert_eq!(lock(&subs.rooms).get(&r("y")), Some(&Some(b.clone())));
        let again = subs
            .follow(&now, |_| {
                let b = b.clone();
                async move { Ok(Some(b)) }
            })
            .await;
        assert_eq!(again, vec![r("z")]);
    }
}
