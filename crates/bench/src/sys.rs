//! What the load tool reads about processes (CPU time, RSS from /proc) and Redis (INFO),
//! and the private deployment `--spawn` starts.

use std::time::Duration;

use anyhow::Context;
use chat_testkit::{GatewayProcess, RedisServer};
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

/// A private deployment: a redis-server (unless embedded) and N gateway processes.
pub struct Deployment {
    /// Kept alive (and killed on drop) for the run.
    _redis: Option<RedisServer>,
    /// The gateways.
    pub gateways: Vec<GatewayProcess>,
    /// A client on the private Redis, for its statistics.
    pub admin: Option<Client>,
}

impl Deployment {
    /// Starts `n` gateways from `bin` on a private Redis (or one embedded gateway when
    /// `embedded`), with `env` added to each.
    pub async fn spawn(
        n: usize,
        bin: &str,
        embedded: bool,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let redis = if embedded {
            None
        } else {
            Some(RedisServer::start().await?)
        };
        let url = redis.as_ref().map(RedisServer::url);
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
        let admin = match &redis {
            Some(r) => Some(r.client().await?),
            None => None,
        };
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
