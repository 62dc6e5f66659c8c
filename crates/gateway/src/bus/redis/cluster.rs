//! Redis Cluster: following a room's slot when it moves, and a probe channel on every
//! primary.
//!
//! **Slot moves.** When a room's slot moves to another primary (resharding: `CLUSTER
//! SETSLOT … MIGRATING/IMPORTING`, `MIGRATE`, `SETSLOT … NODE`), the old primary drops the
//! sharded subscriptions of that slot: it sends `sunsubscribe`, which fred swallows. From
//! then on the room's messages are published on the new primary, where this instance is
//! not subscribed. The bus notices the move when one of its commands meets `MOVED` (fred
//! then refreshes its routing table and reports a cluster change) or, at the latest, at
//! the next periodic check (`PUBSUB_PROBE_SECS`); it refreshes the subscriber's routing
//! table, subscribes every room whose slot changed owner again at the new owner, and
//! reports each such room as [`BusEvent::LostRoom`], so the hub repairs it from history:
//! what was published meanwhile reached nobody here, but it is in history.
//!
//! **Probes.** A subscriber talks to every primary over its own connection, and any of
//! them can go silent. So on a Cluster the self-probe uses one sharded channel per
//! primary (a hash tag chosen to land in that primary's slots) and expects a token back
//! on each.

use std::time::Duration;

use fred::{
    prelude::*,
    types::{CustomCommand, Value, cluster::ClusterRouting},
};
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use super::RedisBus;
use crate::bus::{Bus, BusError, BusEvent, keys::Keys};

/// How often slot ownership is checked when no cluster change is reported (with
/// `PUBSUB_PROBE_SECS=0`).
const CHECK_EVERY: Duration = Duration::from_secs(5);

impl RedisBus {
    /// Runs for the life of the bus: after every cluster change the command client reports
    /// (a `MOVED`, a new node), and every `every`, follows the rooms whose slot moved.
    pub(super) async fn follow_slots(self, every: Option<Duration>) {
        let mut changes = self.inner.commands.cluster_change_rx();
        let every = every.unwrap_or(CHECK_EVERY);
        loop {
            tokio::select! {
                change = changes.recv() => if let Err(RecvError::Closed) = change {
                    return;
                },
                () = tokio::time::sleep(every) => {}
            }
            // While not ready, a resync is restoring every subscription anyway.
            if !self.is_ready() {
                continue;
            }
            if let Err(err) = self.follow_slot_moves().await {
                warn!(error = %err, "checking the cluster's slots failed; will retry");
            }
        }
    }

    /// Refreshes the subscriber's routing table, subscribes the rooms whose slot changed
    /// owner at the new owner (and the probe channels, if the primaries changed), and
    /// reports those rooms for repair.
    async fn follow_slot_moves(&self) -> Result<(), BusError> {
        self.with_timeout(self.inner.subscriber.sync_cluster())
            .await?;
        let moved = self
            .inner
            .subscriptions
            .follow(self.owners(), |room| async move {
                self.send_subscribe(&room).await
            })
            .await;
        if !moved.is_empty() {
            info!(
                rooms = moved.len(),
                "slots moved: subscribed again at their new owners; repairing from history"
            );
            let mut lost = moved
                .into_iter()
                .map(|room| BusEvent::LostRoom { room })
                .collect();
            self.inner.events.deliver(&mut lost);
        }
        let wanted = self.probe_channels();
        let current = crate::sync::lock(&self.inner.probes).clone();
        if wanted != current {
            self.subscribe_probes(wanted).await?;
        }
        Ok(())
    }
}

impl RedisBus {
    /// Closes this instance's own subscriber connections to the primaries that own the
    /// `silent` probe channels (open, but delivering nothing), from the server side: fred
    /// then reconnects them, and the reconnect restores their subscriptions. The
    /// connections are found by name (fred names each one after its client).
    pub(super) async fn kill_silent_connections(&self, silent: &[String]) -> Result<(), BusError> {
        let Some(routing) = self.inner.subscriber.cached_cluster_state() else {
            return Ok(());
        };
        let name = format!("name={}", self.inner.subscriber.id());
        let client = || CustomCommand::new_static("CLIENT", None, false);
        for channel in silent {
            let Some(node) = routing.get_server(ClusterRouting::hash_key(channel.as_bytes()))
            else {
                continue;
            };
            let node = self.inner.commands.with_cluster_node(node.clone());
            let list: String = self
                .with_timeout(node.custom(client(), vec!["LIST", "TYPE", "pubsub"]))
                .await?;
            let ours = list
                .lines()
                .filter(|line| line.split(' ').any(|field| field == name))
                .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("id=")));
            for id in ours {
                let _: Value = self
                    .with_timeout(node.custom(client(), vec!["KILL", "ID", id]))
                    .await?;
            }
        }
        Ok(())
    }
}

/// One probe channel per primary in `routing`: `chat:probe:{TAG-N}` for the smallest N
/// whose slot that primary owns.
pub(super) fn shard_probe_channels(
    keys: &Keys,
    tag: &str,
    routing: &ClusterRouting,
) -> Vec<String> {
    let mut primaries = routing.unique_primary_nodes();
    primaries.sort_by(|a, b| (&*a.host, a.port).cmp(&(&*b.host, b.port)));
    let mut channels = vec![None; primaries.len()];
    // 16384 slots over a handful of primaries: a few dozen tries find one for each.
    for n in 0..100_000u32 {
        if channels.iter().all(Option::is_some) {
            break;
        }
        let channel = keys.shard_probe(tag, n);
        let slot = ClusterRouting::hash_key(channel.as_bytes());
        if let Some(owner) = routing.get_server(slot)
            && let Some(i) = primaries.iter().position(|p| p == owner)
            && channels[i].is_none()
        {
            channels[i] = Some(channel);
        }
    }
    channels.into_iter().flatten().collect()
}
