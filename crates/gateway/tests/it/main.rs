//! Integration tests: real gateways on free ports, real WebSocket clients, and a private

#![allow(missing_debug_implementations)]
//! `redis-server` per Redis-backed test (see `chat-testkit`).

mod abuse;
mod api;
mod auth;
mod batching;
mod cluster;
mod fuzz;
mod lifecycle;
mod limits;
mod metrics;
mod multi;
mod presence;
mod process;
mod promises;
mod reliability;
mod retries;
mod single;

use chat_testkit::{RedisServer, TestGateway, WsClient};

/// One test's world: a private Redis, or none (the in-process bus).
pub struct Env {
    pub redis: Option<RedisServer>,
}

impl Env {
    pub async fn memory() -> anyhow::Result<Self> {
        Ok(Env { redis: None })
    }

    pub async fn redis() -> anyhow::Result<Self> {
        Ok(Env {
            redis: Some(RedisServer::start().await?),
        })
    }

    /// A gateway on this world's bus, configured by `vars`.
    pub async fn gateway(&self, vars: &[(&str, &str)]) -> anyhow::Result<TestGateway> {
        match &self.redis {
            Some(r) => TestGateway::with_redis(&r.url(), vars).await,
            None => TestGateway::start(vars).await,
        }
    }
}

/// Connects to `/ws{query}` and reads `welcome` and the automatic join's replay.
pub async fn connect(
    gw: &TestGateway,
    query: &str,
    room: &str,
) -> anyhow::Result<(WsClient, chat_testkit::Joined)> {
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url(&format!("/ws{query}"))).await?;
    let joined = c.until_joined(room).await?;
    Ok((c, joined))
}

/// Runs each named `async fn(Env) -> anyhow::Result<()>` once on the memory bus and once
/// on a private Redis.
#[macro_export]
macro_rules! on_both_buses {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() -> anyhow::Result<()> {
                    super::$name($crate::Env::memory().await?).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() -> anyhow::Result<()> {
                    super::$name($crate::Env::redis().await?).await
                }
            }
        )*
    };
}

/// Polls `check` until it holds, at most [`chat_testkit::WAIT`]: for state that has no
/// event to await (a readiness probe is polled by its consumers too).
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + chat_testkit::WAIT;
    while !check().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until Redis holds exactly one client's command (a paused write in flight).
pub async fn until_redis_holds_one(admin: &fred::prelude::Client) -> anyhow::Result<()> {
    use fred::prelude::*;
    eventually("a command held in Redis", || async {
        let info: String = admin
            .info(Some(fred::types::InfoKind::Clients))
            .await
            .unwrap_or_default();
        info.lines().any(|l| l.trim() == "blocked_clients:1")
    })
    .await
}
