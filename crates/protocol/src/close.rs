//! WebSocket close codes the server sends, and what a client should do on each.

/// The client broke the WebSocket protocol (RFC 6455 §7.4.1): fix the client.
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text message that is not valid UTF-8 (RFC 6455 §7.1.7): fix the client.
pub const INVALID_DATA: u16 = 1007;
/// Policy violation (10 refused frames in a row): do not retry blindly.
pub const POLICY: u16 = 1008;
/// An incoming message was larger than `MAX_FRAME_BYTES`: fix the client.
pub const TOO_BIG: u16 = 1009;
/// The instance is shutting down: reconnect (to another instance) with `since`.
pub const RESTART: u16 = 1012;
/// The client read too slowly to keep up: reconnect with `since`.
pub const TRY_AGAIN: u16 = 1013;
/// The connection's token expired without a `refresh`: reconnect with a new token and
/// `since`.
pub const TOKEN_EXPIRED: u16 = 4001;
