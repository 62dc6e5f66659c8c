//! The server's lifecycle: build (bus + hub), bind, serve HTTP and WebSocket routes, and
//! shut down — report not ready, refuse new WebSockets, close every connection with 1012
//! spread over `SHUTDOWN_DRAIN_SECS`, wait at most `SHUTDOWN_GRACE_SECS`, close the bus.
//!
//! Signals are not handled here: [`App::run`] takes a shutdown future, so tests and the
//! binary decide what "stop" means.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use axum::{
    Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    bus::{
        AnyBus, Bus, BusError,
        memory::MemoryBus,
        redis::{RedisBus, RedisSettings},
    },
    config::{Config, redact_url},
    hub::{ConnId, Hub},
    session::{self, ConnectParams},
    web,
    ws::{SharedListener, SharedTcp, Upgrade},
};

/// Start-up or serving failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The bus could not be set up (e.g. an unusable `REDIS_URL`).
    #[error("REDIS_URL: {0}")]
    Bus(#[from] BusError),
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Serve(#[from] io::Error),
}

/// What every request handler and session shares.
#[derive(Debug)]
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// Local room membership.
    pub hub: Arc<Hub>,
    /// The message bus.
    pub bus: AnyBus,
    /// Cancelled when the instance starts shutting down.
    pub shutdown: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    next_conn: AtomicU64,
    /// Open WebSocket connections (for `MAX_CONNECTIONS`).
    connections: Arc<AtomicUsize>,
}

impl AppState {
    /// Open WebSocket connections on this instance.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A built, bound, not yet running gateway.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl App {
    /// Sets up the bus and binds `HOST:PORT`.
    pub async fn build(config: Config) -> Result<App, AppError> {
        let addr = SocketAddr::new(config.host, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        App::with_listener(config, listener)
    }

    /// Sets up the bus around an already bound listener (tests bind port 0).
    pub fn with_listener(config: Config, listener: TcpListener) -> Result<App, AppError> {
        let hub = Arc::new(Hub::new(config.client_queue));
        let bus = match &config.redis_url {
            None => {
                info!(
                    instance = %config.instance_id,
                    "no REDIS_URL: running as a single instance on the in-process bus"
                );
                AnyBus::Memory(MemoryBus::with_coalesce(
                    config.history_size,
                    hub.clone(),
                    config.write_coalesce,
                ))
            }
            Some(url) => {
                info!(instance = %config.instance_id, redis = %redact_url(url), "using Redis");
                let settings = RedisSettings {
                    url: url.clone(),
                    prefix: config.redis_prefix.clone(),
                    history_size: config.history_size,
                    timeout: config.redis_timeout,
                    probe_interval: config.pubsub_probe,
                    instance_id: config.instance_id.clone(),
                    tls_insecure: config.redis_tls_insecure,
                    tls_ca_file: config.redis_tls_ca_file.clone(),
                    write_coalesce: config.write_coalesce,
                };
                AnyBus::Redis(RedisBus::connect(&settings, hub.clone())?)
            }
        };
        let (repair_hub, repair_bus) = (hub.clone(), bus.clone());
        // Lives as long as the process (it only ever waits or reads history).
        tokio::spawn(async move { repair_hub.run_repairs(&repair_bus).await });
        let state = Arc::new(AppState {
            config,
            hub,
            bus,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            next_conn: AtomicU64::new(0),
            connections: Arc::new(AtomicUsize::new(0)),
        });
        Ok(App { listener, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (tests inspect the bus and hub).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Waits until the bus is connected.
    pub async fn wait_ready(&self) {
        if let AnyBus::Redis(bus) = &self.state.bus {
            bus.wait_connected().await;
        }
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let App { listener, state } = self;
        let token = state.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
        let addr = listener.local_addr()?;
        info!(%addr, instance = %state.config.instance_id, "listening");
        // Shutdown: `/readyz` turns 503 and upgrades are refused at once; every session
        // closes its client with 1012 at its own moment within SHUTDOWN_DRAIN_SECS. HTTP
        // keeps answering meanwhile (load balancers see the 503), and stops once the last
        // session is gone or SHUTDOWN_GRACE_SECS have passed. axum alone would not wait
        // for upgraded WebSockets.
        let drained = {
            let state = state.clone();
            async move {
                state.shutdown.cancelled().await;
                info!(
                    connections = state.tracker.len(),
                    "shutting down: draining connections"
                );
                state.tracker.close();
                let grace = state.config.shutdown_grace;
                if tokio::time::timeout(grace, state.tracker.wait())
                    .await
                    .is_err()
                {
                    warn!(
                        left = state.tracker.len(),
                        "grace period over; dropping connections"
                    );
                }
            }
        };
        let service = router(state.clone()).into_make_service_with_connect_info::<SharedTcp>();
        axum::serve(SharedListener(listener), service)
            .with_graceful_shutdown(drained)
            .await?;
        state.bus.shutdown().await;
        info!("stopped");
        Ok(())
    }
}

/// The HTTP routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws))
        .route("/websocket", get(legacy_ws))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(web::serve)
        .with_state(state)
}

async fn ws(
    upgrade: Upgrade,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(state): State<Arc<AppState>>,
) -> Response {
    accept(upgrade, query, &headers, state, false)
}

async fn legacy_ws(
    upgrade: Upgrade,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(state): State<Arc<AppState>>,
) -> Response {
    accept(upgrade, query, &headers, state, true)
}

/// Counts a connection until dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn accept(
    upgrade: Upgrade,
    query: HashMap<String, String>,
    headers: &HeaderMap,
    state: Arc<AppState>,
    legacy: bool,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !state.config.allowed_origins.allows(headers) {
        warn!(origin = ?headers.get(axum::http::header::ORIGIN), "refused a WebSocket from another origin");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let open = state.connections.fetch_add(1, Ordering::Relaxed);
    let slot = ConnectionSlot(state.connections.clone());
    let limit = state.config.max_connections;
    if limit > 0 && open >= limit {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    }
    let task = state.tracker.token();
    upgrade.on_upgrade(move |socket| async move {
        let _task = task;
        let _slot = slot;
        session::run(socket, state, ConnectParams::from_query(query), legacy).await;
    })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state.bus.is_ready() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "message bus not connected").into_response()
    }
}
