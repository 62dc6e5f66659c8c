//! The chat gateway: stateless WebSocket instances that share rooms through Redis.
//!
//! A message's path reads straight through the modules: [`session`] (a client's frame) →
//! [`bus`] (Redis or in-process: id, history, publish) → [`hub`] (this instance's local
//! members of the room) → [`outbox`] (each client's bounded queue, written with `writev`
//! of frames built once, [`ws`]).
//! [`app`] wires them to HTTP; [`config`] reads the environment. See `docs/architecture.md`.

pub mod app;
pub mod bus;
pub mod config;
pub mod hub;
pub mod limits;
pub mod outbox;
pub mod session;
pub mod telemetry;
mod web;
pub mod ws;

pub use app::{App, AppError};
pub use config::Config;
