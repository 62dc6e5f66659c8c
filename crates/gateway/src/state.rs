//! What every request handler and session shares, in one place, so that `app`, `routes`,
//! `session` and `web` depend on it instead of on each other.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use chat_protocol::{MessageTemplate, RoomName};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admission::ConnectionLimit,
    auth::Auth,
    bus::{AnyBus, Bus, BusError, Dedupe, Published},
    config::Config,
    hub::Hub,
    metrics::Metrics,
    presence::Presence,
    transport,
    transport::ConnId,
};

/// The instance's shared state.
#[derive(Debug)]
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// How connections are set up (derived from `config`).
    pub transport: transport::Settings,
    /// Local room membership.
    pub hub: Arc<Hub>,
    /// The message bus.
    pub bus: AnyBus,
    /// Token verification; `None` when authentication is off.
    pub auth: Option<Arc<Auth>>,
    /// Who is here, as this instance sees it.
    pub presence: Arc<Presence>,
    /// The Prometheus series.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the instance starts shutting down.
    pub shutdown: CancellationToken,
    /// Every WebSocket task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Open WebSocket connections against `MAX_CONNECTIONS`.
    pub connections: ConnectionLimit,
    next_conn: AtomicU64,
}

impl AppState {
    /// Shared state around a started hub and bus.
    pub fn new(
        config: Config,
        hub: Arc<Hub>,
        bus: AnyBus,
        auth: Option<Arc<Auth>>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let transport = transport::Settings {
            bounds: transport::Bounds {
                live: config.client_queue,
                live_bytes: config.client_queue_bytes,
            },
            // MAX_FRAME_BYTES is enforced after a whole read (see `session`); tungstenite
            // gives up reading only at four times that.
            read_limit: config.max_frame_bytes.saturating_mul(4),
            ping_every: config.ping_interval,
            write_timeout: config.write_timeout,
            bytes_sent: metrics.bytes_sent.clone(),
        };
        AppState {
            connections: ConnectionLimit::new(
                config.max_connections,
                config.max_connections_per_ip,
            ),
            config,
            transport,
            hub,
            bus,
            auth,
            presence,
            metrics,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn: AtomicU64::new(0),
        }
    }

    /// Open WebSocket connections on this instance.
    pub fn connection_count(&self) -> usize {
        self.connections.open()
    }

    /// Publishes a send (a client's or the server API's) on the bus: the one path every
    /// message takes, counted here (received, published, the round trip's duration).
    pub async fn publish(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> Result<Published, BusError> {
        self.metrics.received.increment(1);
        let started = Instant::now();
        let published = self.bus.publish(room, message, dedupe).await;
        self.metrics.publish_duration.record(started.elapsed());
        if matches!(&published, Ok(p) if !p.duplicate) {
            self.metrics.published.increment(1);
        }
        published
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }
}
