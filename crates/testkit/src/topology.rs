//! The Redis deployments the gateway supports, each started privately for one test.

use crate::{RedisCluster, RedisServer};

/// A private Redis deployment.
#[allow(clippy::large_enum_variant)] // one per test; size is irrelevant
pub enum Topology {
    /// One redis-server.
    Standalone(RedisServer),
    /// A primary watched by one Sentinel; the gateway finds the primary through it.
    Sentinel {
        /// The data node.
        primary: RedisServer,
        /// The Sentinel.
        sentinel: RedisServer,
    },
    /// A three-primary Redis Cluster.
    Cluster(RedisCluster),
}

/// The Sentinel service name used by [`Topology::sentinel`].
pub const SENTINEL_SERVICE: &str = "chat";

impl Topology {
    /// One redis-server.
    pub async fn standalone() -> anyhow::Result<Self> {
        Ok(Topology::Standalone(RedisServer::start().await?))
    }

    /// A primary plus a Sentinel.
    pub async fn sentinel() -> anyhow::Result<Self> {
        let primary = RedisServer::start().await?;
        let sentinel = RedisServer::start_sentinel(&primary, SENTINEL_SERVICE).await?;
        Ok(Topology::Sentinel { primary, sentinel })
    }

    /// A three-primary cluster.
    pub async fn cluster() -> anyhow::Result<Self> {
        Ok(Topology::Cluster(RedisCluster::start(3).await?))
    }

    /// The `REDIS_URL` a gateway uses.
    pub fn url(&self) -> String {
        match self {
            Topology::Standalone(r) => r.url(),
            Topology::Sentinel { sentinel, .. } => format!(
                "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SENTINEL_SERVICE}",
                sentinel.port()
            ),
            Topology::Cluster(c) => c.url(),
        }
    }

    /// The servers that hold data and pub/sub subscriptions.
    pub fn data_nodes(&self) -> Vec<&RedisServer> {
        match self {
            Topology::Standalone(r) => vec![r],
            Topology::Sentinel { primary, .. } => vec![primary],
            Topology::Cluster(c) => c.nodes().iter().collect(),
        }
    }

    /// Whether this is a cluster (sharded pub/sub).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }
}
