//! What the load tool reads about processes (CPU time, RSS from /proc) and Redis (INFO),
//! and the private deployment `--spawn` starts.

use std::time::Duration;

use anyhow::Context;
use chat_testkit::{GatewayProcess, RedisCluster, RedisServer};
use fred::prelude::*;

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every mainstream arch.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raises the open-file limit to the hard limit (children inherit it).
pub fn raise_fd_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or_default()
}

/// CPU seconds (user + system) the calling thread has used so far, from
/// `/proc/thread-self/stat` (the same accounting as [`cpu_secs`] for a process).
pub fn thread_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// Redis' CPU seconds and its publish-script statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisStats {
    /// used_cpu_user + used_cpu_sys
    pub cpu_secs: f64,
    /// EVALSHA calls so far.
    pub evalsha_calls: u64,
    /// Microseconds spent in EVALSHA so far.
    pub evalsha_usec: u64,
}

impl RedisStats {
    /// The readings of several nodes added up.
    pub fn sum(all: &[RedisStats]) -> RedisStats {
        all.iter().fold(RedisStats::default(), |a, b| RedisStats {
            cpu_secs: a.cpu_secs + b.cpu_secs,
            evalsha_calls: a.evalsha_calls + b.evalsha_calls,
            evalsha_usec: a.evalsha_usec + b.evalsha_usec,
        })
    }
}

/// Reads every node's statistics, in order.
pub async fn redis_stats_all(clients: &[Client]) -> anyhow::Result<Vec<RedisStats>> {
    let mut all = Vec::with_capacity(clients.len());
    for c in clients {
        all.push(redis_stats(c).await?);
    }
    Ok(all)
}

/// Reads INFO cpu and commandstats.
pub async fn redis_stats(client: &Client) -> anyhow::Result<RedisStats> {
    let cpu: String = client.info(Some(fred::types::InfoKind::Cpu)).await?;
    let commands: String = client
        .info(Some(fred::types::InfoKind::CommandStats))
        .await?;
    let info = format!("{cpu}\n{commands}");
    let mut s = RedisStats::default();
    for line in info.lines() {
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            s.cpu_secs += v.trim().parse::<f64>().unwrap_or(0.0);
        }
        if let Some(v) = line.strip_prefix("cmdstat_evalsha:") {
            for kv in v.split(',') {
                match kv.split_once('=') {
                    Some(("calls", n)) => s.evalsha_calls = n.parse().unwrap_or(0),
                    Some(("usec", n)) => s.evalsha_usec = n.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    Ok(s)
}

/// What the spawned gateways share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Nothing: one gateway on its in-process bus.
    Embedded,
    /// One private redis-server.
    Redis,
    /// A private Redis Cluster of this many masters (no replicas).
    Cluster(usize),
}

/// The private Redis of a deployment, kept alive (and killed on drop) for the run.
enum PrivateRedis {
    Single(Box<RedisServer>),
    Cluster(RedisCluster),
}

/// A private deployment: a redis-server or Redis Cluster (unless embedded) and N gateway
/// processes.
pub struct Deployment {
    _redis: Option<PrivateRedis>,
    /// The gateways.
    pub gateways: Vec<GatewayProcess>,
    /// One client per Redis node (one for a single server, one per master of a cluster),
    /// for their statistics; empty when embedded.
    pub admin: Vec<Client>,
}

impl Deployment {
    /// Starts `n` gateways from `bin` on `backend` (embedded: exactly one gateway, on its
    /// in-process bus), with `env` added to each.
    pub async fn spawn(
        n: usize,
        bin: &str,
        backend: Backend,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let redis = match backend {
            Backend::Embedded => None,
            Backend::Redis => Some(PrivateRedis::Single(Box::new(RedisServer::start().await?))),
            Backend::Cluster(m) => Some(PrivateRedis::Cluster(
                RedisCluster::start(m)
                    .await
                    .with_context(|| format!("starting a Redis Cluster of {m} masters"))?,
            )),
        };
        let url = redis.as_ref().map(|r| match r {
            PrivateRedis::Single(s) => s.url(),
            PrivateRedis::Cluster(c) => c.url(),
        });
        let mut gateways = Vec::new();
        for i in 0..n.max(1) {
            let id = format!("bench-gw-{}", i + 1);
            let mut vars: Vec<(&str, &str)> = vec![
                ("INSTANCE_ID", &id),
                ("RATE_LIMIT_PER_SEC", "0"),
                // Thousands of connections from a few loopback addresses.
                ("MAX_CONNECTIONS_PER_IP", "0"),
                ("RUST_LOG", "warn"),
            ];
            if let Some(url) = &url {
                vars.push(("REDIS_URL", url));
            }
            for (k, v) in env {
                vars.push((k, v));
            }
            let gw = GatewayProcess::spawn(bin, &vars)
                .await
                .with_context(|| format!("starting {bin}"))?;
            wait_ready(&gw).await?;
            gateways.push(gw);
        }
        let mut admin = Vec::new();
        match &redis {
            Some(PrivateRedis::Single(s)) => admin.push(s.client().await?),
            Some(PrivateRedis::Cluster(c)) => {
                for node in c.nodes() {
                    admin.push(node.client().await?);
                }
            }
            None => {}
        }
        Ok(Deployment {
            _redis: redis,
            gateways,
            admin,
        })
    }

    /// `ws://` base URLs of the gateways.
    pub fn urls(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.ws_url("")).collect()
    }

    /// The gateways' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.gateways.iter().filter_map(|g| g.pid().ok()).collect()
    }
}

async fn wait_ready(gw: &GatewayProcess) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gw.get_status("/readyz").await != Some(200) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "a gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
