//! Keeping the subscriber connection honest: after it breaks and comes back, restore every
//! subscription and report that messages may have been lost ([`RedisBus::keep_subscriptions`]);
//! and notice when it stays open but no longer delivers ([`RedisBus::probe`]). Until a
//! restore has finished, the instance is not ready.
//!
//! fred's own `manage_subscriptions` is not used: on connect it sends a bare `SUBSCRIBE`
//! whose error reply fred then hands to the next command on that connection.

use std::{collections::HashMap, sync::atomic::Ordering, time::Duration};

use fred::prelude::*;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tracing::{info, warn};

use super::{RedisBus, cluster::shard_probe_channels};
use crate::{
    bus::{Bus, BusError, BusEvent},
    sync::{Backoff, lock},
};

type ErrorEvents = Receiver<(fred::error::Error, Option<fred::types::config::Server>)>;
type ConnectEvents = Receiver<fred::types::config::Server>;

impl RedisBus {
    /// Runs for the life of the bus: a break marks the instance not ready; the reconnect
    /// that follows restores the subscriptions.
    pub(super) async fn keep_subscriptions(
        self,
        mut errors: ErrorEvents,
        mut connects: ConnectEvents,
    ) {
        loop {
            tokio::select! {
                // A break is always reported before the reconnect that follows it.
                biased;
                e = errors.recv() => match e {
                    Err(RecvError::Closed) => return,
                    _ => self.inner.resync_pending.store(true, Ordering::SeqCst),
                },
                c = connects.recv() => match c {
                    Err(RecvError::Closed) => return,
                    _ => {
                        // After a break (not the first connection): a reconnect.
                        if self.inner.resync_pending.load(Ordering::SeqCst) {
                            self.inner.reconnects.increment(1);
                        }
                        self.resync().await;
                    }
                },
            }
        }
    }

    /// Subscribes the probe channel and every room again on the new connection, then
    /// reports [`BusEvent::Lost`] (whatever was published meanwhile is in history) and
    /// only then clears `resync_pending`. Retries while the connection stays up.
    async fn resync(&self) {
        let subscriber = &self.inner.subscriber;
        let mut backoff = Backoff::new();
        loop {
            // fred reports the new connection before marking itself connected.
            let _ = tokio::time::timeout(self.inner.timeout, subscriber.wait_for_connect()).await;
            let restored = async {
                // The new connection has no subscription at all.
                lock(&self.inner.probes).clear();
                self.subscribe_probes(self.probe_channels()).await?;
                self.inner
                    .subscriptions
                    .restore(|room| async move { self.send_subscribe(&room).await })
                    .await
            };
            match restored.await {
                Ok(rooms) => {
                    if rooms > 0 {
                        info!(rooms, "resubscribed after reconnect");
                    }
                    self.inner.events.deliver(&mut vec![BusEvent::Lost]);
                    self.inner.resync_pending.store(false, Ordering::SeqCst);
                    return;
                }
                Err(err) => {
                    warn!(error = %err, "restoring subscriptions failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// The self-probe: a connection can stay open while Redis no longer delivers on it
    /// (a proxy or failover gone wrong). Every `every`, publish a token on each of this
    /// instance's probe channels (on a Cluster, one per primary) and expect it back on the
    /// subscriber connection within `every`; if one does not come, the instance is not
    /// ready and the subscriber reconnects, which restores the subscriptions and repairs
    /// every room.
    pub(super) async fn probe(self, every: Duration) {
        let mut seen = self.inner.probe_seen.subscribe();
        let mut token = 0u64;
        loop {
            tokio::time::sleep(every).await;
            if !self.is_ready() {
                continue;
            }
            token += 1;
            let channels = lock(&self.inner.probes).clone();
            let mut sent = true;
            for channel in &channels {
                let commands = &self.inner.commands;
                let published = if self.inner.sharded {
                    let publish = commands.spublish::<i64, _, _>(channel.as_str(), token);
                    self.with_timeout(publish).await
                } else {
                    let publish = commands.publish::<i64, _, _>(channel.as_str(), token);
                    self.with_timeout(publish).await
                };
                // The command connection's own troubles show elsewhere.
                sent &= published.is_ok();
            }
            if !sent {
                continue;
            }
            let back = |seen: &HashMap<String, u64>| {
                channels
                    .iter()
                    .all(|c| seen.get(c).is_some_and(|t| *t >= token))
            };
            if let Ok(Ok(_)) = tokio::time::timeout(every, seen.wait_for(back)).await {
                continue;
            }
            let silent: Vec<String> = {
                let seen = seen.borrow();
                channels
                    .iter()
                    .filter(|c| seen.get(*c).is_none_or(|t| *t < token))
                    .cloned()
                    .collect()
            };
            warn!(
                ?silent,
                "pub/sub connection stopped delivering; reconnecting it"
            );
            self.inner.resync_pending.store(true, Ordering::SeqCst);
            if self.inner.sharded {
                // fred's forced reconnection keeps a Cluster node's connection that looks
                // healthy: close the silent ones from the server side instead.
                if let Err(err) = self.kill_silent_connections(&silent).await {
                    warn!(error = %err, "closing the silent connection failed");
                }
            } else if let Err(err) = self.inner.subscriber.force_reconnection().await {
                warn!(error = %err, "forced reconnection failed");
            }
        }
    }

    /// The probe channels this instance should be subscribed to now.
    pub(super) fn probe_channels(&self) -> Vec<String> {
        let tag = &self.inner.probe_tag;
        let routing = self
            .inner
            .sharded
            .then(|| self.inner.subscriber.cached_cluster_state())
            .flatten();
        match routing {
            Some(routing) => shard_probe_channels(&self.inner.keys, tag, &routing),
            None => vec![self.inner.keys.probe(tag)],
        }
    }

    /// Subscribes `wanted` (and drops probe channels no longer wanted).
    pub(super) async fn subscribe_probes(&self, wanted: Vec<String>) -> Result<(), BusError> {
        let current = lock(&self.inner.probes).clone();
        for channel in current.iter().filter(|c| !wanted.contains(c)) {
            // A primary that left took the subscription with it; nothing to do if this fails.
            let _ = self.send_subscription(channel.clone(), false).await;
        }
        for channel in wanted.iter().filter(|c| !current.contains(c)) {
            self.send_subscription(channel.clone(), true).await?;
        }
        *lock(&self.inner.probes) = wanted;
        Ok(())
    }
}
