//! An in-process gateway on a free port with its own configuration.

use std::{net::SocketAddr, sync::Arc};

use chat_gateway::{App, Config, state::AppState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::WAIT;

/// A running in-process gateway; shut down on drop.
pub struct TestGateway {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), chat_gateway::AppError>>>,
}

impl TestGateway {
    /// Starts a gateway configured by `vars` (environment-style names; `PORT` is ignored)
    /// and waits until its bus is connected.
    pub async fn start(vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(vars, true).await
    }

    /// Starts a gateway like [`TestGateway::start`] without waiting for its bus: for
    /// tests of a Redis that is down, or that it cannot (or must not) reach.
    pub async fn start_unready(vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(vars, false).await
    }

    async fn launch(vars: &[(&str, &str)], wait_ready: bool) -> anyhow::Result<Self> {
        init_logging();
        let config = Config::from_vars(
            vars.iter()
                .filter(|(k, _)| *k != "PORT")
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let app = App::with_listener(config, listener)?;
        if wait_ready {
            tokio::time::timeout(WAIT, app.wait_ready())
                .await
                .map_err(|_| anyhow::anyhow!("gateway's bus did not connect"))?;
        }
        let addr = app.local_addr()?;
        let metrics_addr = app.metrics_addr();
        let state = app.state().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone().cancelled_owned()));
        Ok(TestGateway {
            addr,
            metrics_addr,
            state,
            shutdown,
            task: Some(task),
        })
    }

    /// The gateway with Redis at `redis_url` plus `vars`.
    pub async fn with_redis(redis_url: &str, vars: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut all = vec![("REDIS_URL", redis_url)];
        all.extend_from_slice(vars);
        Self::start(&all).await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served when `METRICS_PORT` is set (`0` picks a free port).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `ws://ADDR{path}`, e.g. `ws_url("/ws?room=a")`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// `http://ADDR{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The gateway's shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// An HTTP GET's status code (a minimal HTTP/1.1 client, enough for health checks).
    pub async fn get_status(&self, path: &str) -> anyhow::Result<u16> {
        http_status(self.addr, path).await
    }

    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT * 2, task).await???;
        }
        Ok(())
    }

    /// Starts a graceful shutdown without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Logs from the gateway under test, shown by the test harness when a test fails
/// (`RUST_LOG` filters; default `warn`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// GET `path` on `addr` and return the status code.
pub(crate) async fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf);
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status line in {head:?}"))?;
    Ok(status.parse()?)
}
