//! The chat gateway's wire protocol v1, as types: what clients send ([`ClientFrame`]),
//! what the server sends ([`ServerFrame`], [`MessageFrame`]), the validated names
//! ([`RoomName`], [`Username`]), error codes ([`ErrorCode`]) and close codes ([`close`]).
//!
//! This crate knows nothing of sockets, Redis or tokio: the gateway, its tests and the
//! load tool share it, so the contract lives in one place. `docs/protocol.md` is the prose
//! version of the same contract.

mod client;
pub mod close;
mod error;
pub mod message;
pub mod names;
mod server;

pub use client::{ClientFrame, Limits, parse_client_frame};
pub use error::{ErrorCode, FrameError};
pub use message::{MessageFrame, MessageTemplate, peek_id, peek_ts};
pub use names::{NameError, RoomName, Username};
pub use server::{PresenceUser, ServerFrame};

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
