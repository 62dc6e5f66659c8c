//! WebSocket close codes the server uses, and what a client should do on each.

/// Policy violation (bad origin, auth failure, too many bad frames): do not retry blindly.
pub const POLICY: u16 = 1008;
/// An incoming frame was larger than `MAX_FRAME_BYTES`.
pub const TOO_BIG: u16 = 1009;
/// Internal server error: reconnect with `since`.
pub const INTERNAL: u16 = 1011;
/// The instance is shutting down: reconnect (to another instance) with `since`.
pub const RESTART: u16 = 1012;
/// The client read too slowly to keep up: reconnect with `since`.
pub const TRY_AGAIN: u16 = 1013;
