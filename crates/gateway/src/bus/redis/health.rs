//! Keeping the subscriber connection honest: after it breaks and comes back, restore every
//! subscription and report that messages may have been lost ([`RedisBus::keep_subscriptions`]);
//! and notice when it stays open but no longer delivers ([`RedisBus::probe`]). Until a
//! restore has finished, the instance is not ready.
//!
//! fred's own `manage_subscriptions` is not used: on connect it sends a bare `SUBSCRIBE`
//! whose error reply fred then hands to the next command on that connection.

use std::{sync::atomic::Ordering, time::Duration};

use fred::prelude::*;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tracing::{info, warn};

use super::RedisBus;
use crate::{
    bus::{Bus, BusEvent},
    sync::Backoff,
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
                    _ => self.resync().await,
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
                let probe = self.inner.probe_channel.clone();
                self.with_timeout(subscriber.subscribe(probe)).await?;
                self.barrier().await?;
                self.inner
                    .subscriptions
                    .restore(|room| async move { self.send_subscription(&room, true).await })
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
    /// (a proxy or failover gone wrong). Every `every`, publish a token on this instance's
    /// own channel and expect it back on the subscriber connection within `every`; if it
    /// does not come, the instance is not ready and the subscriber reconnects, which
    /// restores the subscriptions and repairs every room.
    pub(super) async fn probe(self, every: Duration) {
        let mut seen = self.inner.probe_seen.subscribe();
        let mut token = 0u64;
        loop {
            tokio::time::sleep(every).await;
            if !self.is_ready() {
                continue;
            }
            token += 1;
            let channel = self.inner.probe_channel.clone();
            let sent = self
                .with_timeout(self.inner.commands.publish::<i64, _, _>(channel, token))
                .await;
            if sent.is_err() {
                // The command connection's own troubles show elsewhere.
                continue;
            }
            let back = matches!(
                tokio::time::timeout(every, seen.wait_for(|v| *v >= token)).await,
                Ok(Ok(_))
            );
            if !back {
                warn!("pub/sub connection stopped delivering; reconnecting it");
                self.inner.resync_pending.store(true, Ordering::SeqCst);
                if let Err(err) = self.inner.subscriber.force_reconnection().await {
                    warn!(error = %err, "forced reconnection failed");
                }
            }
        }
    }
}
