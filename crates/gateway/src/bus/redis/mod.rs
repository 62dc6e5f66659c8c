//! The Redis bus (fred): one multiplexed client for commands, one subscriber client for
//! the rooms this instance serves.
//!
//! - [`scripts`]: publishing is one `EVALSHA` round trip (INCR the room's counter, render
//!   the frame with that id and Redis' clock, RPUSH + LTRIM the history, PUBLISH — SPUBLISH
//!   on a Cluster); a second script reads history atomically with the counter.
//! - [`batch`]: on a single Redis, publishes that meet in time share one script call.
//! - [`reader`]: the pub/sub reader task, which reports to the [`BusEvents`] handler.
//! - [`subscriptions`] and [`health`]: what is subscribed (and where), restoring it after a
//!   reconnect, and the self-probe that notices a silent subscriber connection.
//! - [`cluster`]: on a Redis Cluster, following a room's slot to its new owner, and a
//!   probe channel on every primary.
//! - [`tls`]: `rediss://` with a private CA or without verification.
//!
//! Every command is sent at most once and bounded by `REDIS_TIMEOUT_MS`; fred drops a
//! timed-out command it still holds, so an `unavailable` answer is not followed by a late
//! store. (A command already written when the connection breaks has an unknown outcome:
//! see docs/operations.md.)

mod batch;
mod cluster;
mod health;
mod presence;
mod reader;
mod scripts;
mod subscriptions;
mod tls;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use chat_protocol::{MessageTemplate, PresenceUser, RoomName};
use fred::{
    clients::SubscriberClient,
    prelude::*,
    types::{Value, cluster::ClusterRouting, config::Config as FredConfig},
};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use super::{
    Bus, BusError, BusEvents, Dedupe, History, Page, PresenceSnapshot, Published, keys::Keys,
};
use crate::sync::{Backoff, lock};
use scripts::Scripts;
use subscriptions::{Owner, Subscriptions};

/// The last probe token seen on each probe channel.
type ProbeSeen = tokio::sync::watch::Sender<HashMap<String, u64>>;

/// Messages fred may hold for the reader task before it reports a lag.
const PUBSUB_BUFFER: usize = 8192;

struct Inner {
    commands: Client,
    subscriber: SubscriberClient,
    keys: Keys,
    scripts: Arc<Scripts>,
    /// Where publishes gather into shared script calls (not on a Cluster: `batch.rs`).
    lane: Option<batch::Lane>,
    presence: presence::PresenceScripts,
    timeout: Duration,
    sharded: bool,
    events: Arc<dyn BusEvents>,
    subscriptions: Subscriptions,
    /// Set when the subscriber connection breaks, cleared once every room is subscribed
    /// again on the new connection: until then this instance may miss messages, so it
    /// is not ready.
    resync_pending: AtomicBool,
    /// Names this instance's probe channels.
    probe_tag: String,
    /// The probe channels subscribed now: one classic channel, or on a Cluster one sharded
    /// channel per primary (they change with the topology).
    probes: Mutex<Vec<String>>,
    /// The last probe token that came back through the subscriber connection, per channel.
    probe_seen: ProbeSeen,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// `chat_redis_reconnects_total`.
    reconnects: metrics::Counter,
}

/// The Redis-backed bus.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBus")
            .field("sharded", &self.inner.sharded)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

/// Settings the Redis bus takes from the gateway's configuration.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://`, `rediss://`, `redis-sentinel://` or `redis-cluster://` URL (secret).
    pub url: crate::config::Secret,
    /// Key prefix.
    pub prefix: String,
    /// Messages kept per room.
    pub history_size: usize,
    /// Longest wait for one command.
    pub timeout: Duration,
    /// How often to check, through Redis, that the subscriber connection still delivers
    /// (`None`: never).
    pub probe_interval: Option<Duration>,
    /// Names this instance's probe channel.
    pub instance_id: String,
    /// `rediss://` without certificate verification (Heroku).
    pub tls_insecure: bool,
    /// `rediss://` verified against this CA (PEM) instead of the system roots.
    pub tls_ca_file: Option<String>,
    /// Rooms idle this long expire as a whole (`None`: never).
    pub room_idle_ttl: Option<Duration>,
    /// Under load, one publish script call per this interval (`batch.rs`; zero: a call as
    /// soon as the previous one is answered).
    pub publish_batch: Duration,
    /// `chat_redis_reconnects_total`.
    pub reconnects: metrics::Counter,
}

impl RedisBus {
    /// Builds the clients and starts connecting in the background (with reconnects);
    /// fails only on unusable settings. [`Bus::is_ready`] tells when Redis is reachable.
    pub fn connect(settings: &RedisSettings, events: Arc<dyn BusEvents>) -> Result<Self, BusError> {
        let mut config =
            FredConfig::from_url(settings.url.expose()).map_err(BusError::InvalidUrl)?;
        if config.tls.is_some() {
            if let Some(tls) = tls::client_config(settings)? {
                config.tls = Some(fred::types::config::TlsConnector::from(tls).into());
            }
        } else if settings.tls_insecure || settings.tls_ca_file.is_some() {
            warn!("REDIS_TLS_* is set but REDIS_URL is not rediss://: ignored");
        }
        // Keep retrying a Redis that is down at start-up instead of exiting: `/readyz`
        // says 503 meanwhile.
        config.fail_fast = false;
        let sharded = config.server.is_clustered();
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = PUBSUB_BUFFER;
                // Applies to every command. A command that times out while fred holds it
                // (e.g. during a reconnect back-off) is marked and never written later, so
                // an `unavailable` answer cannot be followed by a late store.
                p.default_command_timeout = settings.timeout;
            })
            .with_connection_config(|c| {
                c.connection_timeout = settings.timeout.max(Duration::from_secs(1));
                c.internal_command_timeout = settings.timeout.max(Duration::from_secs(1));
                // At most once: a command in flight when the connection breaks fails
                // instead of being replayed after the reconnect.
                c.max_command_attempts = 1;
                c.tcp.nodelay = Some(true);
                // Each connection is named after its client (CLIENT LIST shows whose it
                // is; the Cluster probe finds its own silent connections by name).
                c.auto_client_setname = true;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let commands = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;

        let keys = Keys::new(&settings.prefix);
        // Take the receivers before anything is subscribed or connected, so no message
        // and no connection event can be missed.
        let messages = subscriber.message_rx();
        let errors = subscriber.error_rx();
        let connects = subscriber.reconnect_rx();
        let probe_tag = format!("{}-{:04x}", settings.instance_id, fastrand::u16(..));
        let (probe_seen, _) = tokio::sync::watch::channel(HashMap::new());
        let reader = reader::Reader {
            keys: keys.clone(),
            events: events.clone(),
            probe_prefix: keys.probe_prefix(),
            probe_seen: probe_seen.clone(),
        };
        let mut tasks = vec![
            tokio::spawn(reader.run(messages)),
            spawn_connection(&commands),
            spawn_connection(&subscriber),
        ];
        let scripts = Arc::new(Scripts::new(
            keys.clone(),
            settings.history_size,
            sharded,
            settings.timeout,
            settings.room_idle_ttl,
        ));
        let lane = (!sharded).then(|| {
            let (lane, task) = batch::Lane::start(
                scripts.clone(),
                commands.clone(),
                settings.timeout,
                settings.publish_batch,
            );
            tasks.push(task);
            lane
        });
        let bus = RedisBus {
            inner: Arc::new(Inner {
                commands,
                subscriber,
                scripts,
                lane,
                presence: presence::PresenceScripts::new(&probe_tag),
                keys,
                timeout: settings.timeout,
                sharded,
                events,
                subscriptions: Subscriptions::default(),
                resync_pending: AtomicBool::new(false),
                probe_tag,
                probes: Mutex::new(Vec::new()),
                probe_seen,
                tasks: Mutex::new(tasks),
                reconnects: settings.reconnects.clone(),
            }),
        };
        let resync = tokio::spawn(bus.clone().keep_subscriptions(errors, connects));
        lock(&bus.inner.tasks).push(resync);
        if let Some(every) = settings.probe_interval {
            let probe = tokio::spawn(bus.clone().probe(every));
            lock(&bus.inner.tasks).push(probe);
        }
        if sharded {
            let follow = tokio::spawn(bus.clone().follow_slots(settings.probe_interval));
            lock(&bus.inner.tasks).push(follow);
        }
        Ok(bus)
    }

    /// Room channels subscribed (the probe channels are not counted).
    pub fn room_subscriptions(&self) -> usize {
        self.inner.subscriptions.len()
    }

    /// Waits until both connections are up.
    pub async fn wait_connected(&self) {
        while !self.inner.commands.is_connected() {
            let _ = self.inner.commands.wait_for_connect().await;
        }
        while !self.inner.subscriber.is_connected() {
            let _ = self.inner.subscriber.wait_for_connect().await;
        }
    }

    /// Stops the reader and closes both connections.
    pub async fn shutdown(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            // QUIT waits for a connection that may never come: only when connected.
            if self.inner.subscriber.is_connected() {
                let _ = self.inner.subscriber.quit().await;
            }
            if self.inner.commands.is_connected() {
                let _ = self.inner.commands.quit().await;
            }
        })
        .await;
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
    }

    async fn with_timeout<T>(
        &self,
        fut: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, BusError> {
        // fred's own command timeout answers first; this is a backstop.
        match tokio::time::timeout(self.inner.timeout * 2, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// fred answers SUBSCRIBE and UNSUBSCRIBE as soon as it queues them, before Redis has
    /// processed them. A PING on the same connection is answered only after everything
    /// sent before it, so once it returns the subscription really is (in)active — which
    /// the gap-free join depends on.
    async fn barrier(&self) -> Result<(), BusError> {
        self.with_timeout(self.inner.subscriber.ping::<Value>(None))
            .await
            .map(drop)
    }

    /// Subscribes `room`'s channel on the current subscriber connection and waits until
    /// Redis has processed it; says where the subscription is held.
    async fn send_subscribe(&self, room: &RoomName) -> Result<Owner, BusError> {
        self.send_subscription(self.inner.keys.channel(room), true)
            .await?;
        Ok(self.owners()(room))
    }

    /// Subscribes (or unsubscribes) a channel and waits until Redis has processed it; on a
    /// Cluster the channel is sharded.
    async fn send_subscription(&self, channel: String, on: bool) -> Result<(), BusError> {
        let s = &self.inner.subscriber;
        match (self.inner.sharded, on) {
            // fred waits for the sharded commands' replies (they may be redirected).
            (true, true) => self.with_timeout(s.ssubscribe(channel)).await,
            (true, false) => self.with_timeout(s.sunsubscribe(channel)).await,
            (false, true) => {
                self.with_timeout(s.subscribe(channel)).await?;
                self.barrier().await
            }
            (false, false) => {
                self.with_timeout(s.unsubscribe(channel)).await?;
                self.barrier().await
            }
        }
    }

    /// Where each room's subscription belongs now, by the subscriber's routing table (on a
    /// Cluster: the primary that owns the room's slot; elsewhere `None`).
    fn owners(&self) -> impl Fn(&RoomName) -> Owner + '_ {
        let routing = self
            .inner
            .sharded
            .then(|| self.inner.subscriber.cached_cluster_state())
            .flatten();
        move |room| {
            let routing = routing.as_ref()?;
            let slot = ClusterRouting::hash_key(self.inner.keys.channel(room).as_bytes());
            routing.get_server(slot).cloned()
        }
    }
}

/// Drives `client`'s connection until it is closed with QUIT. fred's connection task can
/// end on its own with an error (e.g. fred 10 gives up routing a command that met an `ASK`
/// redirect during a Cluster reshard when no attempts are left, and ends the task with
/// it): it is started again, after a back-off, so the client reconnects.
impl RedisBus {
    fn commands_up(&self) -> Result<(), BusError> {
        if self.inner.commands.is_connected() {
            Ok(())
        } else {
            Err(BusError::Disconnected)
        }
    }
}

fn spawn_connection<C: ClientLike + Clone + Send + 'static>(client: &C) -> JoinHandle<()> {
    let client = client.clone();
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            match client.connect().await {
                Ok(Ok(())) => return,
                Ok(Err(e)) if e.is_canceled() => return,
                Ok(Err(e)) => error!(error = %e, "redis connection task ended; starting it again"),
                Err(e) => error!(error = %e, "redis connection task failed; starting it again"),
            }
            backoff.wait().await;
        }
    })
}

impl Bus for RedisBus {
    async fn publish(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> Result<Published, BusError> {
        if !self.inner.commands.is_connected() {
            return Err(BusError::Disconnected);
        }
        match &self.inner.lane {
            Some(lane) => {
                let request = self.inner.scripts.publish_request(room, message, dedupe);
                lane.publish(request).await
            }
            // Boxed: fred's futures are large, and this one would otherwise make every
            // publish's future (the lane's included) kilobytes long.
            None => {
                Box::pin(
                    self.inner
                        .scripts
                        .publish(&self.inner.commands, room, message, dedupe),
                )
                .await
            }
        }
    }

    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, BusError> {
        if !self.inner.commands.is_connected() {
            return Err(BusError::Disconnected);
        }
        self.inner
            .scripts
            .page(&self.inner.commands, room, before, limit)
            .await
    }

    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError> {
        if !self.inner.subscriber.is_connected() {
            return Err(BusError::Disconnected);
        }
        self.inner
            .subscriptions
            .add(room, self.send_subscribe(room))
            .await
    }

    async fn unsubscribe(&self, room: &RoomName) -> Result<(), BusError> {
        self.inner
            .subscriptions
            .remove(
                room,
                self.send_subscription(self.inner.keys.channel(room), false),
            )
            .await
    }

    async fn history(&self, room: &RoomName, since: Option<u64>) -> Result<History, BusError> {
        if !self.inner.commands.is_connected() {
            return Err(BusError::Disconnected);
        }
        self.inner
            .scripts
            .history(&self.inner.commands, room, since)
            .await
    }

    async fn presence(&self, room: &RoomName, max: usize) -> Result<PresenceSnapshot, BusError> {
        self.commands_up()?;
        let i = &self.inner;
        i.scripts
            .presence_snapshot(&i.commands, &i.presence, room, max)
            .await
    }

    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &PresenceUser,
        lease: Duration,
    ) -> Result<(), BusError> {
        self.commands_up()?;
        let i = &self.inner;
        i.scripts
            .presence_enter(&i.commands, &i.presence, room, user, lease)
            .await
    }

    async fn presence_exit(&self, room: &RoomName, user: &PresenceUser) -> Result<(), BusError> {
        self.commands_up()?;
        let i = &self.inner;
        i.scripts
            .presence_exit(&i.commands, &i.presence, room, user)
            .await
    }

    async fn presence_renew(
        &self,
        room: &RoomName,
        users: &[PresenceUser],
        lease: Duration,
    ) -> Result<(), BusError> {
        self.commands_up()?;
        let i = &self.inner;
        i.scripts
            .presence_renew(&i.commands, &i.presence, room, users, lease)
            .await
    }

    async fn signal(
        &self,
        room: &RoomName,
        json: Bytes,
        _except: Option<Arc<str>>,
    ) -> Result<(), BusError> {
        self.commands_up()?;
        // Who to leave out travels in the payload itself (`typing.user`).
        let channel = self.inner.keys.channel(room);
        let commands = &self.inner.commands;
        if self.inner.sharded {
            self.with_timeout(commands.spublish::<i64, _, _>(channel, json))
                .await
                .map(drop)
        } else {
            self.with_timeout(commands.publish::<i64, _, _>(channel, json))
                .await
                .map(drop)
        }
    }

    fn is_ready(&self) -> bool {
        self.inner.commands.is_connected()
            && self.inner.subscriber.is_connected()
            && !self.inner.resync_pending.load(Ordering::SeqCst)
    }
}
