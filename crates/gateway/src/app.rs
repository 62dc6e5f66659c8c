//! The server's lifecycle: start (hub, bus, repair worker), bind, serve HTTP/1.1, and shut
//! down — report not ready, refuse new WebSockets, close every connection with 1012
//! spread over `SHUTDOWN_DRAIN_SECS`, wait at most `SHUTDOWN_GRACE_SECS`, close the bus.
//!
//! Signals are not handled here: [`App::run`] takes a shutdown future, so tests and the
//! binary decide what "stop" means.
//!
//! The accept loop is our own (hyper's HTTP/1.1 connection with upgrades) rather than
//! `axum::serve`: axum serves through hyper-util's HTTP/1+2 auto-detection, which wraps
//! each socket in a type that hyper's `Upgraded::downcast` cannot see through, and the
//! transport needs the socket back after the upgrade (see `transport::upgrade`).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{
    auth::{Auth, KeyError},
    bus::{
        AnyBus, BusError, BusEvents,
        memory::MemoryBus,
        redis::{RedisBus, RedisSettings},
    },
    config::Config,
    hub::Hub,
    metrics::Metrics,
    presence::{self, Presence},
    routes::{metrics_router, router},
    state::AppState,
    transport::{Coalescing, WriteScheduler},
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
    /// The bus could not be set up (an unusable `REDIS_URL` or TLS setting).
    #[error("{0}")]
    Bus(#[from] BusError),
    /// A token key cannot be used (`AUTH_JWT_PUBLIC_KEY_FILE`, `AUTH_JWKS_URL`).
    #[error("{0}")]
    Auth(#[from] KeyError),
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Serve(#[from] io::Error),
    /// The metrics exporter refused its settings.
    #[error("metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
}

impl AppError {
    /// Whether the configuration is at fault (the binary exits with code 2).
    pub fn is_config(&self) -> bool {
        match self {
            AppError::Bus(e) => e.is_config(),
            AppError::Auth(_) => true,
            AppError::Bind { .. } | AppError::Serve(_) | AppError::Metrics(_) => false,
        }
    }
}

/// A built, bound, not yet running gateway.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    /// `/metrics` alone, on `METRICS_PORT`.
    metrics_listener: Option<TcpListener>,
    state: Arc<AppState>,
}

/// How long, after the WebSockets are drained, plain HTTP requests still in progress may
/// take to finish.
const HTTP_FINISH: Duration = Duration::from_secs(5);

impl App {
    /// Sets up the hub and the bus, then binds `HOST:PORT`. Must run inside a tokio
    /// runtime.
    pub async fn build(config: Config) -> Result<App, AppError> {
        let state = start(config)?;
        let addr = SocketAddr::new(state.config.host, state.config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let metrics_listener = bind_metrics(&state.config)?;
        Ok(App {
            listener,
            metrics_listener,
            state,
        })
    }

    /// Sets up the hub and the bus around an already bound listener (tests bind port 0).
    pub fn with_listener(config: Config, listener: TcpListener) -> Result<App, AppError> {
        let state = start(config)?;
        Ok(App {
            listener,
            metrics_listener: bind_metrics(&state.config)?,
            state,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address `/metrics` is served on when `METRICS_PORT` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The shared state (tests inspect it).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Waits until the bus is connected (and the JWKS document, if any, was fetched once).
    pub async fn wait_ready(&self) {
        self.state.bus.wait_connected().await;
        if let Some(auth) = &self.state.auth {
            auth.prefetched().await;
        }
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let App {
            listener,
            metrics_listener,
            state,
        } = self;
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
        // session is gone or SHUTDOWN_GRACE_SECS have passed.
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
        let header_timeout = state.config.http_header_timeout;
        // Scrapes go on through the drain: the metrics stop with the server.
        let metrics_stop = CancellationToken::new();
        if let Some(metrics_listener) = metrics_listener {
            let (routes, stop) = (metrics_router(state.clone()), metrics_stop.clone());
            tokio::spawn(async move {
                serve_with(
                    metrics_listener,
                    routes,
                    stop.cancelled_owned(),
                    header_timeout,
                )
                .await;
            });
        }
        serve_with(listener, router(state.clone()), drained, header_timeout).await;
        metrics_stop.cancel();
        state.bus.shutdown().await;
        info!("stopped");
        Ok(())
    }
}

/// Binds `HOST:METRICS_PORT` when it is set. A std listener made non-blocking, so that
/// [`App::with_listener`] stays synchronous.
fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, AppError> {
    let Some(port) = config.metrics_port else {
        return Ok(None);
    };
    let addr = SocketAddr::new(config.host, port);
    let bind = || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    };
    let listener = bind().map_err(|source| AppError::Bind { addr, source })?;
    info!(addr = ?listener.local_addr().ok(), "serving /metrics on METRICS_PORT only");
    Ok(Some(listener))
}

/// Starts the hub, the bus chosen by `REDIS_URL` and the repair worker.
fn start(config: Config) -> Result<Arc<AppState>, AppError> {
    let metrics = Metrics::new(env!("CARGO_PKG_VERSION"))?;
    metrics.keep_up();
    let writes = WriteScheduler::coalescing(Coalescing::new(
        config.write_coalesce,
        config.write_coalesce_adaptive,
    ));
    let hub = Arc::new(Hub::new(config.client_queue, writes, metrics.clone()));
    let events: Arc<dyn BusEvents> = hub.clone();
    let bus = match &config.redis_url {
        None => {
            info!(
                instance = %config.instance_id,
                "no REDIS_URL: running as a single instance on the in-process bus"
            );
            AnyBus::Memory(match config.room_idle_ttl {
                Some(ttl) => MemoryBus::with_idle_ttl(config.history_size, events, ttl),
                None => MemoryBus::new(config.history_size, events),
            })
        }
        Some(url) => {
            info!(instance = %config.instance_id, redis = ?url, "using Redis");
            let settings = RedisSettings {
                url: url.clone(),
                prefix: config.redis_prefix.clone(),
                history_size: config.history_size,
                timeout: config.redis_timeout,
                probe_interval: config.pubsub_probe,
                instance_id: config.instance_id.clone(),
                tls_insecure: config.redis_tls_insecure,
                tls_ca_file: config.redis_tls_ca_file.clone(),
                room_idle_ttl: config.room_idle_ttl,
                publish_batch: config.publish_batch,
                reconnects: metrics.redis_reconnects.clone(),
            };
            AnyBus::Redis(RedisBus::connect(&settings, events)?)
        }
    };
    let auth = match &config.auth {
        None => None,
        Some(auth) => {
            let auth = Auth::new(auth)?;
            let prefetch = auth.clone();
            tokio::spawn(async move { prefetch.prefetch().await });
            info!(anonymous = ?config.auth.as_ref().map(|a| a.anonymous), "authentication is on");
            Some(auth)
        }
    };
    let (repair_hub, repair_bus) = (hub.clone(), bus.clone());
    // Lives as long as the process (it only ever waits or reads history).
    tokio::spawn(async move { repair_hub.run_repairs(&repair_bus).await });
    let presence = Arc::new(Presence::new(
        config.presence,
        config.presence_ttl,
        config.presence_max_users,
    ));
    presence::spawn_renewals(presence.clone(), bus.clone());
    Ok(Arc::new(AppState::new(
        config, hub, bus, auth, presence, metrics,
    )))
}

/// Accepts HTTP/1.1 connections until `stop` resolves, with the default header timeout
/// (see [`serve_with`]). Public for the transport's conformance test, which serves its own
/// router.
pub async fn serve(listener: TcpListener, router: Router, stop: impl Future<Output = ()>) {
    serve_with(listener, router, stop, Duration::from_secs(10)).await;
}

/// Accepts HTTP/1.1 connections until `stop` resolves, then lets the requests in progress
/// finish (at most [`HTTP_FINISH`]) and closes idle keep-alive connections. Upgraded
/// connections are not waited for here: they belong to their sessions.
///
/// A connection must send complete request headers within `header_timeout` of starting
/// one — or, idle between keep-alive requests, of the last response — or it is closed
/// (`HTTP_HEADER_TIMEOUT_SECS`): a slow-loris client cannot hold a socket forever.
pub async fn serve_with(
    mut listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()>,
    header_timeout: Duration,
) {
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            // axum's accept: it retries, and backs off when out of file descriptors.
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        // Frames are batched by the outbox, not by Nagle's algorithm.
        if let Err(err) = tcp.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let router = router.clone();
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let closing = closing.clone();
        connections.spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = closing.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                debug!(%peer, error = %err, "HTTP connection ended with an error");
            }
        });
    }
    closing.cancel();
    connections.close();
    if tokio::time::timeout(HTTP_FINISH, connections.wait())
        .await
        .is_err()
    {
        debug!(
            left = connections.len(),
            "HTTP connections still busy at exit"
        );
    }
}
