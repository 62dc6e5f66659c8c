//! The Redis bus (fred): one multiplexed client for commands, one subscriber client for
//! the rooms this instance serves, and two Lua scripts that make publishing and history
//! reads atomic.
//!
//! Publishing is one `EVALSHA` round trip: INCR the room's counter, render the frame with
//! that id and Redis' clock, RPUSH + LTRIM the history, PUBLISH (SPUBLISH on a Cluster).
//! Every command is sent at most once and bounded by `REDIS_TIMEOUT_MS`; fred drops a
//! timed-out command it still holds, so an `unavailable` answer is not followed by a late
//! store. (A command already written when the connection breaks has an unknown outcome:
//! see docs/operations.md.)
//!
//! The reader task moves each pub/sub message to [`Hub::dispatch`]; it never waits on a
//! client.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chat_protocol::{MessageTemplate, RoomName, peek_id};
use fred::{
    clients::SubscriberClient,
    prelude::*,
    types::{Message, config::Config as FredConfig, scripts::Script},
};
use tokio::{
    sync::broadcast::error::{RecvError, TryRecvError},
    task::JoinHandle,
};
use tracing::{error, warn};

use super::{Bus, BusError, Epoch, EpochNotice, History, Msg, keys::Keys, new_epoch};
use crate::{hub::Hub, outbox::Dirty};

mod tls {
    //! TLS to Redis beyond the system roots: a private CA, or (Heroku only) no verification.

    use std::sync::Arc;

    use rustls::{
        ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, ring},
        pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    };

    use super::{BusError, RedisSettings};

    /// `None`: fred's default (system roots).
    pub(super) fn client_config(s: &RedisSettings) -> Result<Option<ClientConfig>, BusError> {
        let provider = Arc::new(ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|_| BusError::Tls("no usable TLS protocol version".into()))?;
        if s.tls_insecure {
            let verifier = Arc::new(AnyCertificate(provider));
            return Ok(Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth(),
            ));
        }
        let Some(path) = &s.tls_ca_file else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| BusError::Tls(format!("REDIS_TLS_CA_FILE {path}: {e}")))?;
        for cert in certs {
            let cert = cert.map_err(|e| BusError::Tls(format!("REDIS_TLS_CA_FILE {path}: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| BusError::Tls(format!("REDIS_TLS_CA_FILE {path}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(BusError::Tls(format!(
                "REDIS_TLS_CA_FILE {path}: no certificate"
            )));
        }
        Ok(Some(
            builder.with_root_certificates(roots).with_no_client_auth(),
        ))
    }

    /// Accepts any server certificate (signatures are still checked, so the session is
    /// encrypted to whoever holds the key). Only behind `REDIS_TLS_INSECURE=true`.
    #[derive(Debug)]
    struct AnyCertificate(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

/// KEYS: seq, history, epoch. ARGV: channel, head, middle, history size, publish command,
/// epoch candidate, room. A counter that starts at 1 (a new room, or one whose data was
/// lost) drops stale history, makes sure the room has an epoch (a join may have created
/// it already) and publishes an epoch notice before the message, so every instance learns
/// of a reset in order.
const PUBLISH_LUA: &str = r#"
local id = redis.call('INCR', KEYS[1])
if id == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[3], ARGV[6], 'NX')
  local epoch = redis.call('GET', KEYS[3])
  redis.call(ARGV[5], ARGV[1], '{"type":"epoch","room":"' .. ARGV[7] .. '","epoch":"' .. epoch .. '"}')
end
local t = redis.call('TIME')
local ts = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local msg = ARGV[2] .. id .. ARGV[3] .. ts .. '}'
redis.call('RPUSH', KEYS[2], msg)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
redis.call(ARGV[5], ARGV[1], msg)
return id
"#;

/// KEYS: seq, history, epoch. ARGV: since (-1 for none), epoch candidate. Returns {top,
/// epoch, entries}: the entries after `since` when all of them are retained, else every
/// retained entry. Creates the room's epoch if it has none, so that `joined` always
/// carries one.
const HISTORY_LUA: &str = r"
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[3], epoch)
end
local since = tonumber(ARGV[1])
local n = redis.call('LLEN', KEYS[2])
local start = 0
if since >= 0 and since <= top then
  local newer = top - since
  if newer < n then start = n - newer end
end
if start >= n then return {top, epoch, {}} end
return {top, epoch, redis.call('LRANGE', KEYS[2], start, -1)}
";

/// Messages fred may hold for the reader task before it reports a lag.
const PUBSUB_BUFFER: usize = 8192;

struct Inner {
    commands: Client,
    subscriber: SubscriberClient,
    keys: Keys,
    history_size: usize,
    timeout: Duration,
    sharded: bool,
    publish: Script,
    history: Script,
    /// Set when the subscriber connection breaks, cleared once every room is subscribed
    /// again on the new connection: until then this instance may miss messages, so it
    /// is not ready.
    resync_pending: AtomicBool,
    /// This instance's own channel for the delivery self-probe.
    probe_channel: String,
    /// The last probe token that came back through the subscriber connection.
    probe_seen: tokio::sync::watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
    /// `redis://`, `rediss://`, `redis-sentinel://` or `redis-cluster://` URL.
    pub url: String,
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
    /// At most one flush of the clients' sockets per interval (`WRITE_COALESCE_MS`).
    pub write_coalesce: Duration,
}

impl RedisBus {
    /// Builds the clients and starts connecting in the background (with reconnects);
    /// fails only on an unusable URL. [`Bus::is_ready`] tells when Redis is reachable.
    pub fn connect(settings: &RedisSettings, hub: Arc<Hub>) -> Result<Self, BusError> {
        let mut config = FredConfig::from_url(&settings.url)?;
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
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let commands = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;

        let keys = Keys::new(&settings.prefix);
        // Take the receiver before anything is subscribed so no message can be missed.
        let messages = subscriber.message_rx();
        // Likewise for connection events, before connecting.
        let errors = subscriber.error_rx();
        let connects = subscriber.reconnect_rx();
        let probe_channel = keys.probe(&format!(
            "{}-{:04x}",
            settings.instance_id,
            fastrand::u16(..)
        ));
        let (probe_seen, _) = tokio::sync::watch::channel(0u64);
        let reader = tokio::spawn(read_messages(
            messages,
            keys.clone(),
            hub.clone(),
            probe_channel.clone(),
            probe_seen.clone(),
            settings.write_coalesce,
        ));
        let commands_task = spawn_connection(&commands);
        let subscriber_task = spawn_connection(&subscriber);

        let bus = RedisBus {
            inner: Arc::new(Inner {
                commands,
                subscriber,
                keys,
                history_size: settings.history_size,
                timeout: settings.timeout,
                sharded,
                publish: Script::from_lua(PUBLISH_LUA),
                history: Script::from_lua(HISTORY_LUA),
                resync_pending: AtomicBool::new(false),
                probe_channel,
                probe_seen,
                tasks: Mutex::new(vec![reader, commands_task, subscriber_task]),
            }),
        };
        let resync = tokio::spawn(bus.clone().keep_subscriptions(hub, errors, connects));
        bus.tasks().push(resync);
        if let Some(every) = settings.probe_interval {
            let probe = tokio::spawn(bus.clone().probe(every));
            bus.tasks().push(probe);
        }
        Ok(bus)
    }

    /// The self-probe: a connection can stay open while Redis no longer delivers on it
    /// (a proxy or failover gone wrong). Every `every`, publish a token on this instance's
    /// own channel and expect it back on the subscriber connection within `every`; if it
    /// does not come, the instance is not ready and the subscriber reconnects, which
    /// resubscribes and repairs every room.
    async fn probe(self, every: Duration) {
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

    /// Resubscribes every room after a reconnect; clears `resync_pending` only when all
    /// of them succeeded. Retries while the connection stays up.
    async fn resync(&self, hub: &Hub) {
        let subscriber = &self.inner.subscriber;
        let mut delay = Duration::from_millis(50);
        loop {
            // fred reports the new connection before marking itself connected.
            let _ = tokio::time::timeout(self.inner.timeout, subscriber.wait_for_connect()).await;
            let probe = async {
                let channel = self.inner.probe_channel.clone();
                self.with_timeout(subscriber.subscribe(channel)).await?;
                self.barrier().await
            };
            if let Err(err) = probe.await {
                warn!(error = %err, "probe subscription failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
            match hub.resubscribe(self).await {
                Ok(rooms) => {
                    if rooms > 0 {
                        tracing::info!(rooms, "resubscribed after reconnect");
                    }
                    // Whatever was published while we were not subscribed is in history.
                    hub.repair_all();
                    self.inner.resync_pending.store(false, Ordering::SeqCst);
                    return;
                }
                Err(err) => {
                    warn!(error = %err, "resubscribe failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Redis forgets a connection's subscriptions when it breaks. fred's own
    /// `manage_subscriptions` is not used: on connect it sends a bare `SUBSCRIBE` whose
    /// error reply fred then hands to the next command on that connection.
    async fn keep_subscriptions(
        self,
        hub: Arc<Hub>,
        mut errors: tokio::sync::broadcast::Receiver<(
            fred::error::Error,
            Option<fred::types::config::Server>,
        )>,
        mut connects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
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
                    _ => self.resync(&hub).await,
                },
            }
        }
    }

    /// Waits until both connections are up.
    pub async fn wait_connected(&self) {
        for client in [
            &self.inner.commands as &dyn ConnectedClient,
            &self.inner.subscriber,
        ] {
            while !client.connected() {
                client.wait().await;
            }
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
        for task in self.tasks().drain(..) {
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

    /// Runs a script with EVALSHA, loading it first when Redis does not know it. fred's
    /// command timeout bounds each step; the outer timeout is only a backstop.
    async fn evalsha<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, BusError> {
        let client = &self.inner.commands;
        let run = async {
            let first = client
                .evalsha::<R, _, _, _>(script.sha1().clone(), keys.clone(), args.clone())
                .await;
            match first {
                Err(e) if e.details().starts_with("NOSCRIPT") => {
                    // First use on this Redis (or after SCRIPT FLUSH / a restart): the
                    // script did not run, so loading it and trying again cannot double a
                    // write.
                    let lua = script.lua().cloned().unwrap_or_default();
                    client.script_load_cluster::<(), _>(lua).await?;
                    client.evalsha(script.sha1().clone(), keys, args).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.inner.timeout * 4, run).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(BusError::Timeout),
        }
    }
}

impl RedisBus {
    /// fred answers SUBSCRIBE and UNSUBSCRIBE as soon as it queues them, before Redis has
    /// processed them. A PING on the same connection is answered only after everything
    /// sent before it, so once it returns the subscription really is (in)active — which
    /// the gap-free join depends on.
    async fn barrier(&self) -> Result<(), BusError> {
        self.with_timeout(self.inner.subscriber.ping::<Value>(None))
            .await
            .map(drop)
    }
}

trait ConnectedClient: Sync {
    fn connected(&self) -> bool;
    fn wait(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

impl<C: ClientLike + EventInterface + Sync> ConnectedClient for C {
    fn connected(&self) -> bool {
        self.is_connected()
    }

    fn wait(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _ = self.wait_for_connect().await;
        })
    }
}

fn spawn_connection<C: ClientLike>(client: &C) -> JoinHandle<()> {
    let handle = client.connect();
    tokio::spawn(async move {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_canceled() => {}
            Ok(Err(e)) => error!(error = %e, "redis connection task ended"),
            Err(e) => error!(error = %e, "redis connection task failed"),
        }
    })
}

/// Messages dispatched before the touched outboxes are flushed, at most.
const DISPATCH_BATCH: usize = 256;

/// Outboxes one task flushes; a larger fan-out is spread over several tasks (threads).
const FLUSH_PER_TASK: usize = 128;

async fn read_messages(
    mut messages: tokio::sync::broadcast::Receiver<Message>,
    keys: Keys,
    hub: Arc<Hub>,
    probe_channel: String,
    probe_seen: tokio::sync::watch::Sender<u64>,
    coalesce: Duration,
) {
    let mut dirty = Dirty::default();
    let mut last_flush = tokio::time::Instant::now();
    loop {
        // Wait for a message; then take whatever else has arrived (and, with
        // WRITE_COALESCE_MS, what arrives until one interval after the last flush), so
        // that every client gets all of it with one write.
        let first = messages.recv().await;
        if !coalesce.is_zero() {
            tokio::time::sleep_until(last_flush + coalesce).await;
        }
        let mut next = Some(first);
        let mut taken = 0usize;
        while let Some(received) = next.take() {
            match received {
                Ok(message) => on_message(
                    message,
                    &keys,
                    &hub,
                    &probe_channel,
                    &probe_seen,
                    &mut dirty,
                ),
                Err(RecvError::Lagged(n)) => {
                    // We cannot tell which rooms lost messages: repair them all from history.
                    error!(skipped = n, "pub/sub reader lagged; repairing every room");
                    hub.repair_all();
                }
                Err(RecvError::Closed) => return,
            }
            taken += 1;
            if taken < DISPATCH_BATCH {
                next = match messages.try_recv() {
                    Ok(m) => Some(Ok(m)),
                    Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    Err(TryRecvError::Empty) => None,
                };
            }
        }
        dirty.flush_spread(FLUSH_PER_TASK);
        last_flush = tokio::time::Instant::now();
    }
}

fn on_message(
    message: Message,
    keys: &Keys,
    hub: &Hub,
    probe_channel: &str,
    probe_seen: &tokio::sync::watch::Sender<u64>,
    dirty: &mut Dirty,
) {
    if *message.channel == *probe_channel {
        if let Some(token) = message.value.as_u64() {
            probe_seen.send_modify(|seen| *seen = (*seen).max(token));
        }
        return;
    }
    let Some(room) = keys.room_of_channel(&message.channel) else {
        return;
    };
    let Some(bytes) = message.value.into_bytes() else {
        return;
    };
    if let Some(msg) = to_msg(bytes.clone()) {
        hub.dispatch(room, msg, dirty);
    } else if let Ok(notice) = serde_json::from_slice::<EpochNotice>(&bytes) {
        hub.reset(room, Epoch::from(notice.epoch));
    } else {
        warn!(%room, "ignoring a pub/sub payload that is not a message frame");
    }
}

fn to_msg(bytes: bytes::Bytes) -> Option<Msg> {
    let id = peek_id(&bytes)?;
    std::str::from_utf8(&bytes).ok()?;
    Some(Msg::new(id, &bytes))
}

impl Bus for RedisBus {
    async fn publish(&self, room: &RoomName, message: &MessageTemplate) -> Result<u64, BusError> {
        if !self.inner.commands.is_connected() {
            return Err(BusError::Disconnected);
        }
        let k = &self.inner.keys;
        let command = if self.inner.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        self.evalsha(
            &self.inner.publish,
            vec![k.seq(room), k.history(room), k.epoch(room)],
            vec![
                k.channel(room),
                message.head.clone(),
                message.middle.clone(),
                self.inner.history_size.to_string(),
                command.to_owned(),
                new_epoch(),
                room.to_string(),
            ],
        )
        .await
    }

    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError> {
        let s = &self.inner.subscriber;
        if !s.is_connected() {
            return Err(BusError::Disconnected);
        }
        let channel = self.inner.keys.channel(room);
        if self.inner.sharded {
            // fred waits for SSUBSCRIBE's reply (it may be redirected).
            self.with_timeout(s.ssubscribe(channel)).await
        } else {
            self.with_timeout(s.subscribe(channel)).await?;
            self.barrier().await
        }
    }

    async fn unsubscribe(&self, room: &RoomName) -> Result<(), BusError> {
        let s = &self.inner.subscriber;
        let channel = self.inner.keys.channel(room);
        if self.inner.sharded {
            self.with_timeout(s.sunsubscribe(channel)).await
        } else {
            self.with_timeout(s.unsubscribe(channel)).await?;
            self.barrier().await
        }
    }

    async fn history(&self, room: &RoomName, since: Option<u64>) -> Result<History, BusError> {
        if !self.inner.commands.is_connected() {
            return Err(BusError::Disconnected);
        }
        let k = &self.inner.keys;
        let since = since.map_or_else(|| "-1".to_owned(), |s| s.to_string());
        let reply: Value = self
            .evalsha(
                &self.inner.history,
                vec![k.seq(room), k.history(room), k.epoch(room)],
                vec![since, new_epoch()],
            )
            .await?;
        let mut parts = reply.into_array().into_iter();
        let top = parts
            .next()
            .and_then(|v| v.as_u64())
            .ok_or(BusError::Corrupt("history top is not an integer"))?;
        let epoch = parts
            .next()
            .and_then(|v| v.into_string())
            .filter(|e| !e.is_empty())
            .map(Epoch::from);
        let entries = parts
            .next()
            .ok_or(BusError::Corrupt("history reply has no entries"))?;
        let messages = entries
            .into_array()
            .into_iter()
            .map(|v| {
                v.into_bytes()
                    .and_then(to_msg)
                    .ok_or(BusError::Corrupt("history entry is not a message frame"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(History {
            top,
            epoch,
            messages,
        })
    }

    fn is_ready(&self) -> bool {
        self.inner.commands.is_connected()
            && self.inner.subscriber.is_connected()
            && !self.inner.resync_pending.load(Ordering::SeqCst)
    }
}
