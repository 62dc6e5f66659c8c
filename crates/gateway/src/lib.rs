//! The chat gateway: stateless WebSocket instances that share rooms through Redis.
//!
//! A message's path reads straight through the modules: [`session`] (a client's frame) →
//! [`bus`] (Redis or in-process: id, history, publish) → [`hub`] (the bus's events
//! handler: this instance's local members of the room) → [`transport`] (each client's
//! bounded outbox, written with `writev` of frames built once). [`routes`] and [`app`] wire
//! them to HTTP and run the server; [`state`] is what they share; [`config`] reads the
//! environment. See `docs/architecture.md` and `CONTRIBUTING.md`.

pub mod admission;
pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod hub;
pub mod metrics;
pub mod presence;
pub mod routes;
pub mod session;
pub mod state;
mod sync;
pub mod telemetry;
pub mod transport;
mod web;

pub use app::{App, AppError};
pub use config::Config;
