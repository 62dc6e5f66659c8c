//! Which room channels this instance is subscribed to, so they can be restored after the
//! subscriber connection is replaced (Redis forgets a connection's subscriptions with it).
//!
//! The hub decides *when* to subscribe (first local member in, last one out) and never
//! runs two calls for one room at once; this set remembers *what* is subscribed. A restore
//! holds the gate exclusively, so no subscribe or unsubscribe runs while it replays the
//! set: a room left during a restore cannot be subscribed again behind the leave's back.

use std::{collections::HashSet, future::Future, sync::Mutex};

use chat_protocol::RoomName;
use tokio::sync::RwLock;

use crate::{bus::BusError, sync::lock};

#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    rooms: Mutex<HashSet<RoomName>>,
    /// Shared by subscribe and unsubscribe calls, exclusive for a restore. Held across the
    /// Redis calls (it orders them), never across anything that waits on a client.
    gate: RwLock<()>,
}

impl Subscriptions {
    /// Records `room` and runs `subscribe`; forgets the room again if that fails (the hub
    /// then treats the room as not subscribed).
    pub(super) async fn add(
        &self,
        room: &RoomName,
        subscribe: impl Future<Output = Result<(), BusError>>,
    ) -> Result<(), BusError> {
        let _shared = self.gate.read().await;
        lock(&self.rooms).insert(room.clone());
        let result = subscribe.await;
        if result.is_err() {
            lock(&self.rooms).remove(room);
        }
        result
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
        Fut: Future<Output = Result<(), BusError>>,
    {
        let _exclusive = self.gate.write().await;
        let rooms: Vec<RoomName> = lock(&self.rooms).iter().cloned().collect();
        let count = rooms.len();
        for room in rooms {
            subscribe(room).await?;
        }
        Ok(count)
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
        subs.add(&r("a"), async { Ok(()) }).await.unwrap();
        subs.add(&r("b"), async { Ok(()) }).await.unwrap();
        let failed = subs
            .add(&r("c"), async { Err(BusError::Disconnected) })
            .await;
        assert!(failed.is_err());
        subs.remove(&r("a"), async { Ok(()) }).await.unwrap();
        let replayed = Mutex::new(Vec::new());
        let n = subs
            .restore(|room| {
                lock(&replayed).push(room);
                async { Ok(()) }
            })
            .await
            .unwrap();
        assert_eq!((n, lock(&replayed).clone()), (1, vec![r("b")]));
    }

    #[tokio::test]
    async fn a_leave_waits_for_a_restore_in_progress() {
        let subs = std::sync::Arc::new(Subscriptions::default());
        subs.add(&r("a"), async { Ok(()) }).await.unwrap();
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
                        Ok(())
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
}
