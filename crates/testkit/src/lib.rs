//! Dev-only helpers for the gateway's tests and tools: a private `redis-server` on a free
//! port ([`RedisServer`]), an in-process gateway on a free port ([`TestGateway`]) and a
//! WebSocket client that speaks the protocol ([`WsClient`]).
//!
//! Every wait here is on an event (a line from redis-server, a frame, a connection) and is
//! bounded by [`WAIT`] so a broken behaviour fails the test instead of hanging it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

mod client;
mod gateway;
mod process;
mod proxy;
mod redis;
mod topology;

pub use client::{Joined, WsClient, is_signal};
pub use gateway::TestGateway;
pub use process::GatewayProcess;
pub use proxy::RedisProxy;
pub use redis::{RedisCluster, RedisServer};
pub use topology::{SENTINEL_SERVICE, Topology};

/// Longest wait for any single expected event.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}
