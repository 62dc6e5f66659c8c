//! A private redis-server process per test: started on a free port, killed on drop.

use std::{path::PathBuf, process::Stdio};

use anyhow::{Context, bail};
use fred::prelude::*;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{WAIT, free_port};

/// A running `redis-server` owned by the test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// A sentinel is started from a config file and says a different line when ready.
    sentinel: bool,
}

impl RedisServer {
    /// Starts a redis-server without persistence.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts a redis-server with extra arguments (e.g. `--appendonly yes`).
    pub async fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            sentinel: false,
        };
        // A port found free can be taken before redis binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// Starts a redis-server that speaks only TLS, with a certificate for `localhost` and
    /// 127.0.0.1 issued by a private CA made for the occasion. Returns the server and the
    /// CA certificate's PEM file; [`RedisServer::url`] is then `rediss://`.
    pub async fn start_tls() -> anyhow::Result<(Self, PathBuf)> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem())?;
        std::fs::write(dir.path().join("server.pem"), cert.pem())?;
        std::fs::write(dir.path().join("server.key"), key.serialize_pem())?;
        let d = dir.path().display().to_string();
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            extra: Vec::new(),
            sentinel: false,
        };
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port();
            server.extra = vec![
                "--tls-port".into(),
                server.port.to_string(),
                "--tls-cert-file".into(),
                format!("{d}/server.pem"),
                "--tls-key-file".into(),
                format!("{d}/server.key"),
                "--tls-ca-cert-file".into(),
                format!("{d}/ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
                // The plain port is turned off: the last --port wins.
                "--port".into(),
                "0".into(),
            ];
            match server.spawn().await {
                Ok(()) => return Ok((server, ca_file)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("TLS redis-server did not start")))
    }

    /// Starts a Sentinel (on a free port) that monitors `primary` as `name`.
    pub async fn start_sentinel(primary: &RedisServer, name: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            extra: Vec::new(),
            sentinel: true,
        };
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port();
            let conf = format!(
                "port {}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n",
                server.port,
                server.dir.path().display(),
                primary.port()
            );
            std::fs::write(server.dir.path().join("sentinel.conf"), conf)?;
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis sentinel did not start")))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        if self.sentinel {
            cmd.arg(self.dir.path().join("sentinel.conf"))
                .arg("--sentinel");
        } else {
            cmd.arg("--port")
                .arg(self.port.to_string())
                .args(["--bind", "127.0.0.1", "--save", "", "--dir"])
                .arg(self.dir.path())
                .args(&self.extra);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "redis-server is not on PATH: the Redis-backed tests need it \
                     (Debian/Ubuntu: apt-get install redis-server)"
                )
            } else {
                e.into()
            }
        })?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(WAIT, async {
            let ready = if self.sentinel {
                "+monitor master"
            } else {
                "Ready to accept connections"
            };
            while let Some(line) = lines.next_line().await? {
                if line.contains(ready) {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {
                // Keep draining stdout so redis never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill().await;
                bail!("redis-server on port {} did not become ready", self.port)
            }
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.extra.iter().any(|a| a == "--tls-port") {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The data directory (append-only files live here).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }

    /// A connected fred client, for inspecting or changing the server's state.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let client = Builder::from_config(Config::from_url(&self.url())?).build()?;
        client.init().await?;
        Ok(client)
    }
}

/// A Redis Cluster of `n` primaries (no replicas), each a private redis-server.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` cluster-enabled servers, creates the cluster and waits until every node
    /// reports `cluster_state:ok`.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--appendonly",
                    "no",
                ])
                .await?,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .context("redis-cli is needed to create a cluster (Debian: redis-tools)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let cluster = RedisCluster { nodes };
        // Slot assignment propagates by gossip; nothing announces it, so ask each node.
        let deadline = tokio::time::Instant::now() + WAIT;
        for node in &cluster.nodes {
            let client = node.client().await?;
            loop {
                let info: String = client
                    .custom(
                        fred::types::CustomCommand::new_static("CLUSTER", None, false),
                        vec!["INFO"],
                    )
                    .await?;
                if info.contains("cluster_state:ok") {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("cluster did not reach cluster_state:ok: {info}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(cluster)
    }

    /// `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port());
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port()));
        }
        url
    }

    /// The nodes, for commands that must reach each one.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Makes every node tell clients to reach it on `ports[i]` (e.g. a [`crate::RedisProxy`]
    /// in front of it) instead of its own port; the cluster bus keeps the real ports.
    pub async fn announce_ports(&self, ports: &[u16]) -> anyhow::Result<()> {
        for (node, port) in self.nodes.iter().zip(ports) {
            let client = node.client().await?;
            let bus = (node.port() + 10_000).to_string();
            let port = port.to_string();
            for (name, value) in [
                ("cluster-announce-bus-port", &bus),
                ("cluster-announce-port", &port),
            ] {
                let _: String = client
                    .custom(
                        fred::types::CustomCommand::new_static("CONFIG", None, false),
                        vec!["SET", name, value.as_str()],
                    )
                    .await?;
            }
        }
        // Every node must see every other one's new address before clients ask.
        let expected: Vec<String> = ports.iter().map(|p| format!(":{p}@")).collect();
        self.until_every_node(|nodes| expected.iter().all(|p| nodes.contains(p)))
            .await
    }

    /// The node (by index) that owns `slot`, and every node's id, from `CLUSTER NODES`.
    async fn layout(&self, slot: u16) -> anyhow::Result<(usize, Vec<String>)> {
        let mut ids = Vec::new();
        let mut owner = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let client = node.client().await?;
            let nodes = cluster(&client, &["NODES"]).await?;
            let myself = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .context("CLUSTER NODES has no `myself` line")?;
            let mut fields = myself.split_whitespace();
            ids.push(fields.next().context("no node id")?.to_owned());
            let owns = fields.skip(7).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if owns {
                owner = Some(i);
            }
        }
        Ok((owner.context("no node owns the slot")?, ids))
    }

    /// The index of the node that owns `slot`.
    pub async fn owner_of(&self, slot: u16) -> anyhow::Result<usize> {
        Ok(self.layout(slot).await?.0)
    }

    /// Moves `slot` to node `to` the way `redis-cli --cluster reshard` does: IMPORTING on
    /// the target, MIGRATING on the source, MIGRATE of its keys, then SETSLOT … NODE on
    /// every node. Returns the index of the node it came from.
    pub async fn migrate_slot(&self, slot: u16, to: usize) -> anyhow::Result<usize> {
        let (from, ids) = self.layout(slot).await?;
        anyhow::ensure!(from != to, "slot {slot} is already on node {to}");
        let slot_arg = slot.to_string();
        let source = self.nodes[from].client().await?;
        let target = self.nodes[to].client().await?;
        cluster(&target, &["SETSLOT", &slot_arg, "IMPORTING", &ids[from]]).await?;
        cluster(&source, &["SETSLOT", &slot_arg, "MIGRATING", &ids[to]]).await?;
        loop {
            let keys: Vec<String> = source
                .custom(
                    fred::types::CustomCommand::new_static("CLUSTER", None, false),
                    vec!["GETKEYSINSLOT", &slot_arg, "1000"],
                )
                .await?;
            if keys.is_empty() {
                break;
            }
            let port = self.nodes[to].port().to_string();
            let mut args = vec!["127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: String = source
                .custom(
                    fred::types::CustomCommand::new_static("MIGRATE", None, false),
                    args,
                )
                .await?;
        }
        for node in [to, from]
            .into_iter()
            .chain((0..self.nodes.len()).filter(|i| *i != to && *i != from))
        {
            let client = self.nodes[node].client().await?;
            cluster(&client, &["SETSLOT", &slot_arg, "NODE", &ids[to]]).await?;
        }
        Ok(from)
    }

    /// Waits until `check` holds for every node's `CLUSTER NODES` output (gossip has no
    /// event to await).
    async fn until_every_node(&self, check: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        for node in &self.nodes {
            let client = node.client().await?;
            loop {
                let nodes = cluster(&client, &["NODES"]).await?;
                if check(&nodes) {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("cluster nodes did not converge: {nodes}");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

/// `CLUSTER <args>` as text.
async fn cluster(client: &Client, args: &[&str]) -> anyhow::Result<String> {
    Ok(client
        .custom(
            fred::types::CustomCommand::new_static("CLUSTER", None, false),
            args.to_vec(),
        )
        .await?)
}
