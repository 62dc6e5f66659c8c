//! Repair: filling a room's live members up from history when its live stream lost
//! messages.
//!
//! A gap (a message whose id is above a live member's `last + 1`) puts the room in repair:
//! live delivery pauses and incoming messages are buffered while the repair worker
//! ([`Hub::run_repairs`], one task per instance) reads the missing ids from history; then
//! each member gets exactly the ids it lacks, in order, and live delivery resumes. A member
//! whose hole is older than the history is closed with 1013 and resumes with `since` (and
//! is told `recovered:false`); so is one whose epoch is not the room's any more (its data
//! was lost and its ids started again while this instance was not listening). When the
//! bus reports that messages may have been lost in rooms it cannot name, every room is
//! repaired the same way ([`Hub::repair_all`]).

use std::sync::Arc;

use bytes::Bytes;
use chat_protocol::RoomName;
use tracing::{info, warn};

use super::{Buffer, Delivery, Hub, Room, deliver};
use crate::{
    bus::{Bus, BusError},
    sync::{Backoff, lock},
    transport::{CloseReason, PendingWrites, frame},
};

impl Hub {
    /// Puts every room in repair: each live member then gets whatever it missed, from
    /// history.
    pub(super) fn repair_all(&self) {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        for room in rooms {
            self.start_repair(&room);
        }
    }

    /// Puts one room in repair.
    pub(super) fn repair_room(&self, name: &RoomName) {
        if let Some(room) = self.room(name.as_str()) {
            self.start_repair(&room);
        }
    }

    fn start_repair(&self, room: &Room) {
        let mut st = room.state();
        if st.repair.is_none() {
            st.repair = Some(Buffer::default());
        }
        drop(st);
        self.request_repair(&room.name);
    }

    pub(super) fn request_repair(&self, room: &RoomName) {
        lock(&self.repairs).insert(room.clone());
        self.repair_wake.notify_one();
    }

    /// The repair worker: runs for the life of the instance. A repair that cannot reach
    /// the bus is retried with back-off.
    pub async fn run_repairs<B: Bus>(&self, bus: &B) {
        let mut backoff = Backoff::new();
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
                backoff.wait().await;
            } else {
                backoff.reset();
            }
        }
    }

    /// Fills every live member of `room` up from history, then resumes live delivery.
    pub(super) async fn repair<B: Bus>(&self, room: &RoomName, bus: &B) -> Result<(), BusError> {
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
            let (top, epoch) = (history.top, history.epoch.clone());
            let mut msgs = history.messages;
            msgs.extend(buffer.msgs);
            msgs.sort_by_key(|m| m.id);
            msgs.dedup_by_key(|m| m.id);
            let framed: Vec<(u64, Bytes)> =
                msgs.iter().map(|m| (m.id, frame::text(&m.json))).collect();
            let (mut filled, mut cut, mut resets) = (0usize, 0usize, false);
            let mut pending = PendingWrites::default();
            for member in st.members.values_mut().filter(|m| m.joining.is_none()) {
                if member.epoch.is_none() {
                    member.epoch.clone_from(&epoch);
                }
                if member.epoch != epoch || member.last > top {
                    if member.epoch != epoch {
                        resets = true;
                    }
                    // The room's data was lost and its ids started again (a new epoch this
                    // instance was not subscribed to hear of): the ids this member holds
                    // mean nothing now. It resumes with `since` and is told
                    // `recovered:false`.
                    member.outbox.close(CloseReason::TooSlow);
                    cut += 1;
                    continue;
                }
                let before = member.last;
                for (id, wire) in framed.iter().filter(|(id, _)| *id > before) {
                    if let Delivery::Gap = deliver(member, *id, wire, &mut pending) {
                        // Older than history: the member must resume (recovered:false).
                        member.outbox.close(CloseReason::TooSlow);
                        cut += 1;
                        break;
                    }
                }
                filled += usize::try_from(member.last - before).unwrap_or(0);
            }
            drop(st);
            self.writes.submit(pending);
            self.metrics.backfilled.increment(filled as u64);
            self.metrics.delivered.increment(filled as u64);
            if resets {
                self.metrics.epoch_resets.increment(1);
            }
            info!(%room, from, filled, cut, "repaired");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        GoLive,
        tests::{dispatch, hub, member, store, tests_info, written_ids},
    };
    use super::*;

    #[tokio::test]
    async fn a_gap_is_repaired_from_history_in_order_and_duplicates_are_dropped() {
        let (bus, msgs, room) = store(100, 6).await;
        let hub = hub();
        let (outbox, socket) = member();
        hub.join(&room, 1, outbox.clone(), tests_info(), &bus)
            .await
            .unwrap();
        assert_eq!(
            hub.go_live(&room, 1, 1, None, |_| Vec::new()),
            GoLive::Live(1)
        );
        dispatch(&hub, &msgs[1]); // 2
        dispatch(&hub, &msgs[1]); // 2 again: dropped
        dispatch(&hub, &msgs[4]); // 5: 3 and 4 were lost
        dispatch(&hub, &msgs[5]); // 6: held while repairing
        assert_eq!(written_ids(&outbox, &socket), [2]);
        let repairs: Vec<RoomName> = lock(&hub.repairs).drain().collect();
        assert_eq!(repairs, vec![room.clone()]);
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(written_ids(&outbox, &socket), [3, 4, 5, 6]);
        dispatch(&hub, &msgs[5]);
        assert_eq!(written_ids(&outbox, &socket), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_hole_older_than_history_closes_the_member_with_1013() {
        let (bus, _, room) = store(3, 8).await;
        let hub = hub();
        let (outbox, _) = member();
        hub.join(&room, 1, outbox.clone(), tests_info(), &bus)
            .await
            .unwrap();
        hub.go_live(&room, 1, 2, None, |_| Vec::new());
        hub.repair_all();
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(outbox.closing(), Some(CloseReason::TooSlow));
    }

    #[tokio::test]
    async fn a_member_of_another_epoch_is_closed_not_silently_skipped() {
        // The store's epoch is random; the member holds ids 1..=5 of an older one.
        let (bus, _, room) = store(100, 8).await;
        let hub = hub();
        let (outbox, socket) = member();
        hub.join(&room, 1, outbox.clone(), tests_info(), &bus)
            .await
            .unwrap();
        let old = crate::bus::Epoch::from("old-epoch");
        assert_eq!(
            hub.go_live(&room, 1, 5, Some(old), |_| Vec::new()),
            GoLive::Live(5)
        );
        hub.repair_all();
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(outbox.closing(), Some(CloseReason::TooSlow));
        assert_eq!(written_ids(&outbox, &socket), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_hole_in_a_join_buffer_is_repaired_after_going_live() {
        let (bus, msgs, room) = store(100, 5).await;
        let hub = hub();
        let (outbox, socket) = member();
        hub.join(&room, 1, outbox.clone(), tests_info(), &bus)
            .await
            .unwrap();
        dispatch(&hub, &msgs[2]); // 3
        dispatch(&hub, &msgs[4]); // 5 (4 lost)
        assert_eq!(
            hub.go_live(&room, 1, 2, None, |_| Vec::new()),
            GoLive::Live(3)
        );
        assert_eq!(written_ids(&outbox, &socket), [3]);
        hub.repair(&room, &bus).await.unwrap();
        assert_eq!(written_ids(&outbox, &socket), [4, 5]);
    }
}
