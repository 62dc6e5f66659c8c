//! The message bus: where a message gets its id, is stored in history and is published to
//! every instance that serves its room.
//!
//! [`Bus`] is deliberately small (publish, subscribe, unsubscribe, history, readiness). It
//! works per instance, not per client: the hub decides when this instance needs a room's
//! channel (first local member joins, last one leaves). What arrives on subscribed
//! channels is reported to a [`BusEvents`] handler the bus is given at start-up (the hub
//! implements it); the bus never names the hub, and it carries payloads, not WebSocket
//! frames. Local messages travel the same way, so every instance delivers identically.
//!
//! Two implementations, picked at start-up by [`AnyBus`]: [`memory::MemoryBus`] (one
//! process, no Redis) and [`redis::RedisBus`] (fred; standalone, Sentinel, Cluster).

pub mod keys;
pub mod memory;
pub mod redis;

use std::future::Future;

use bytes::Bytes;
use chat_protocol::{MessageTemplate, RoomName};
use serde::Deserialize;

/// A stored `message` frame: its id and its exact JSON (as stored, published and replayed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// The per-room id.
    pub id: u64,
    /// The frame's JSON (UTF-8).
    pub json: Bytes,
}

/// What a publish stored (or, for a repeated idempotent send, had stored before).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The message as stored (its id and exact JSON).
    pub msg: Msg,
    /// The send was a repeat within the idempotency window: nothing was published now,
    /// `msg` is the original.
    pub duplicate: bool,
}

/// Makes a send idempotent: stored at most once per key within `window`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedupe {
    /// A digest of who sent it (user or client) and its `ref`: fixed length, whatever
    /// they are.
    pub key: String,
    /// `IDEMPOTENCY_WINDOW_SECS`.
    pub window: std::time::Duration,
}

impl Dedupe {
    /// The dedupe record of `reference` sent by `who` (a user id, or a client id).
    pub fn new(who: &str, reference: &str, window: std::time::Duration) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(who.as_bytes());
        hash.update([0]);
        hash.update(reference.as_bytes());
        let key = hash.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Dedupe { key, window }
    }
}

/// A page of a room's retained history, newest last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The room's last assigned id.
    pub top: u64,
    /// The room's epoch.
    pub epoch: Option<Epoch>,
    /// The messages, oldest first.
    pub messages: Vec<Msg>,
    /// Older retained messages exist before the first one.
    pub has_more: bool,
}

impl From<Page> for History {
    fn from(page: Page) -> Self {
        History {
            top: page.top,
            epoch: page.epoch,
            messages: page.messages,
        }
    }
}

/// Who is in a room, across instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresenceSnapshot {
    /// How many users (exact).
    pub count: u64,
    /// At most the requested number of them.
    pub users: Vec<chat_protocol::PresenceUser>,
}

/// What a history read returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The room's last assigned id (0 when nothing was ever published).
    pub top: u64,
    /// The room's epoch, created with its first message or first join (none before).
    pub epoch: Option<Epoch>,
    /// Retained messages in id order: those after `since` when the store could tell they
    /// are all there, otherwise everything it retains.
    pub messages: Vec<Msg>,
}

/// A room epoch: a random token created atomically with the room's id counter. When a
/// room's data is lost (flush, eviction, a Redis without persistence), its ids start at 1
/// again under a new epoch, and a `since` from the old epoch cannot be trusted.
pub type Epoch = std::sync::Arc<str>;

/// A fresh random epoch token.
pub fn new_epoch() -> String {
    let mut epoch = String::with_capacity(16);
    put_new_epoch(&mut epoch);
    epoch
}

/// Writes a new epoch (see [`new_epoch`]) at the end of `out` (a `String`, a `BytesMut`:
/// writing to either cannot fail).
pub fn put_new_epoch(out: &mut impl std::fmt::Write) {
    let _ = write!(out, "{:016x}", fastrand::u64(..));
}

/// The pub/sub notice that precedes a room's first message in a new epoch:
/// `{"type":"epoch","room":"R","epoch":"…"}`. Only the Redis bus publishes it (the
/// in-process bus reports a new epoch directly); the publish script fills in the epoch.
#[derive(Debug, Deserialize)]
pub struct EpochNotice {
    /// Always `"epoch"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The room.
    pub room: String,
    /// The new epoch.
    pub epoch: String,
}

impl EpochNotice {
    /// Writes the notice's JSON up to the epoch value at the end of `out` (a `String`, a
    /// `BytesMut`: writing to either cannot fail); [`EpochNotice::TAIL`] follows the epoch.
    pub fn put_head(room: &RoomName, out: &mut impl std::fmt::Write) {
        // Room names are [A-Za-z0-9_-]: nothing to escape.
        let _ = write!(out, r#"{{"type":"epoch","room":"{room}","epoch":""#);
    }

    /// What follows the epoch value.
    pub const TAIL: &'static str = r#""}"#;
}

/// What a bus reports about the rooms this instance subscribed to.
#[derive(Debug)]
pub enum BusEvent {
    /// A message of a subscribed room.
    Message {
        /// The room.
        room: RoomName,
        /// The message.
        msg: Msg,
    },
    /// A new epoch began in `room`: its ids restart at 1.
    NewEpoch {
        /// The room.
        room: RoomName,
        /// The new epoch.
        epoch: Epoch,
    },
    /// Messages may have been lost in rooms the bus cannot name (a new subscriber
    /// connection, a lagging pub/sub reader): every room must be checked against history.
    Lost,
    /// Messages of `room` may have been lost (its subscription moved to another Redis
    /// Cluster node): the room must be checked against history.
    LostRoom {
        /// The room.
        room: RoomName,
    },
    /// An ephemeral frame for the room's members (a `presence_diff`, a `typing`): not
    /// stored, no id, not for `/websocket` clients.
    Signal {
        /// The room.
        room: RoomName,
        /// The frame's JSON.
        json: Bytes,
        /// Not for this user's own connections (who is typing).
        except: Option<std::sync::Arc<str>>,
    },
}

/// The JSON of a `presence_diff` frame.
pub fn presence_diff(
    room: &RoomName,
    joined: Vec<chat_protocol::PresenceUser>,
    left: Vec<chat_protocol::PresenceUser>,
) -> Bytes {
    let frame = chat_protocol::ServerFrame::PresenceDiff {
        room: room.to_string(),
        joined,
        left,
    };
    Bytes::from(frame.to_json())
}

/// A pub/sub payload that is a signal, told apart from a message by its `type`.
#[derive(Debug, Deserialize)]
pub struct SignalHead {
    /// `presence_diff` or `typing`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Who is typing.
    pub user: Option<String>,
}

/// The handler a bus reports to (the hub). Implementations never block.
pub trait BusEvents: Send + Sync {
    /// Handles events that arrived together, in order (the vector is drained), and writes
    /// to clients once for the whole batch. A room's events are never handed over by two
    /// callers at once, and never under a bus lock.
    fn deliver(&self, events: &mut Vec<BusEvent>);
}

/// A bus operation failed; the client is told `unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Not connected to Redis.
    #[error("the message bus is not connected")]
    Disconnected,
    /// Redis did not answer in time.
    #[error("the message bus did not answer in time")]
    Timeout,
    /// Redis answered with an error or the connection failed mid-command.
    #[error("message bus error: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis returned data this gateway did not write.
    #[error("unexpected data in the message bus: {0}")]
    Corrupt(&'static str),
    /// `REDIS_URL` cannot be used (start-up only).
    #[error("invalid REDIS_URL: {0}")]
    InvalidUrl(fred::error::Error),
    /// The TLS settings cannot be used (start-up only); names the variable.
    #[error("{0}")]
    Tls(String),
}

impl BusError {
    /// Whether this is a configuration mistake found at start-up (not a passing fault).
    pub fn is_config(&self) -> bool {
        matches!(self, BusError::InvalidUrl(_) | BusError::Tls(_))
    }

    /// The same error again: for each of the callers that shared one failed call.
    pub(crate) fn again(&self) -> BusError {
        match self {
            BusError::Disconnected => BusError::Disconnected,
            BusError::Timeout => BusError::Timeout,
            BusError::Redis(e) => BusError::Redis(e.clone()),
            BusError::Corrupt(what) => BusError::Corrupt(what),
            BusError::InvalidUrl(e) => BusError::InvalidUrl(e.clone()),
            BusError::Tls(what) => BusError::Tls(what.clone()),
        }
    }
}

/// The contract both buses implement.
pub trait Bus: Send + Sync {
    /// Assigns the next id of `room`, appends the rendered frame to the room's capped
    /// history and publishes it, atomically — unless `dedupe` names a send already stored
    /// within its window, which is returned instead (and nothing is published).
    fn publish(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> impl Future<Output = Result<Published, BusError>> + Send;

    /// Starts reporting `room`'s messages. Resolves once delivery is active, so that a
    /// history read made afterwards cannot miss a message.
    fn subscribe(&self, room: &RoomName) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Stops reporting `room`'s messages.
    fn unsubscribe(&self, room: &RoomName) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Reads `room`'s retained history (see [`History`]).
    fn history(
        &self,
        room: &RoomName,
        since: Option<u64>,
    ) -> impl Future<Output = Result<History, BusError>> + Send;

    /// Reads up to `limit` retained messages before id `before` (the newest without it).
    /// Like a history read, it keeps the room alive and gives it an epoch.
    fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, BusError>> + Send;

    /// Who is in `room` (at most `max` of them listed). Leases that ran out are dropped
    /// first (and reported `left`).
    fn presence(
        &self,
        room: &RoomName,
        max: usize,
    ) -> impl Future<Output = Result<PresenceSnapshot, BusError>> + Send;

    /// This instance has `user` in `room` (its first local connection there), for `lease`
    /// unless renewed: the room hears `joined` if no instance had them.
    fn presence_enter(
        &self,
        room: &RoomName,
        user: &chat_protocol::PresenceUser,
        lease: std::time::Duration,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// This instance no longer has `user` in `room`: the room hears `left` if no instance
    /// has them any more.
    fn presence_exit(
        &self,
        room: &RoomName,
        user: &chat_protocol::PresenceUser,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Renews this instance's leases of `users` in `room`, and drops the leases in the
    /// room that ran out (another instance died), reporting those users `left`.
    fn presence_renew(
        &self,
        room: &RoomName,
        users: &[chat_protocol::PresenceUser],
        lease: std::time::Duration,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Sends an ephemeral frame to `room`'s members on every instance (see
    /// [`BusEvent::Signal`]).
    fn signal(
        &self,
        room: &RoomName,
        json: Bytes,
        except: Option<std::sync::Arc<str>>,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Whether the bus can serve requests now (drives `/readyz`).
    fn is_ready(&self) -> bool;
}

/// The bus chosen at start-up.
#[derive(Clone, Debug)]
pub enum AnyBus {
    /// In-process, single instance.
    Memory(memory::MemoryBus),
    /// Redis, any number of instances.
    Redis(redis::RedisBus),
}

impl AnyBus {
    /// Waits until the bus can serve (Redis: both connections are up).
    pub async fn wait_connected(&self) {
        if let AnyBus::Redis(r) = self {
            r.wait_connected().await;
        }
    }

    /// Room channels this instance is subscribed to (not the health probe's).
    pub fn room_subscriptions(&self) -> usize {
        match self {
            AnyBus::Memory(m) => m.room_subscriptions(),
            AnyBus::Redis(r) => r.room_subscriptions(),
        }
    }

    /// Closes connections (Redis: QUIT).
    pub async fn shutdown(&self) {
        if let AnyBus::Redis(r) = self {
            r.shutdown().await;
        }
    }
}

impl Bus for AnyBus {
    async fn publish(
        &self,
        room: &RoomName,
        message: &MessageTemplate,
        dedupe: Option<&Dedupe>,
    ) -> Result<Published, BusError> {
        match self {
            AnyBus::Memory(b) => b.publish(room, message, dedupe).await,
            AnyBus::Redis(b) => b.publish(room, message, dedupe).await,
        }
    }

    async fn page(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, BusError> {
        match self {
            AnyBus::Memory(b) => b.page(room, before, limit).await,
            AnyBus::Redis(b) => b.page(room, before, limit).await,
        }
    }

    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.subscribe(room).await,
            AnyBus::Redis(b) => b.subscribe(room).await,
        }
    }

    async fn unsubscribe(&self, room: &RoomName) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.unsubscribe(room).await,
            AnyBus::Redis(b) => b.unsubscribe(room).await,
        }
    }

    async fn history(&self, room: &RoomName, since: Option<u64>) -> Result<History, BusError> {
        match self {
            AnyBus::Memory(b) => b.history(room, since).await,
            AnyBus::Redis(b) => b.history(room, since).await,
        }
    }

    async fn presence(&self, room: &RoomName, max: usize) -> Result<PresenceSnapshot, BusError> {
        match self {
            AnyBus::Memory(b) => b.presence(room, max).await,
            AnyBus::Redis(b) => b.presence(room, max).await,
        }
    }

    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &chat_protocol::PresenceUser,
        lease: std::time::Duration,
    ) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.presence_enter(room, user, lease).await,
            AnyBus::Redis(b) => b.presence_enter(room, user, lease).await,
        }
    }

    async fn presence_exit(
        &self,
        room: &RoomName,
        user: &chat_protocol::PresenceUser,
    ) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.presence_exit(room, user).await,
            AnyBus::Redis(b) => b.presence_exit(room, user).await,
        }
    }

    async fn presence_renew(
        &self,
        room: &RoomName,
        users: &[chat_protocol::PresenceUser],
        lease: std::time::Duration,
    ) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.presence_renew(room, users, lease).await,
            AnyBus::Redis(b) => b.presence_renew(room, users, lease).await,
        }
    }

    async fn signal(
        &self,
        room: &RoomName,
        json: Bytes,
        except: Option<std::sync::Arc<str>>,
    ) -> Result<(), BusError> {
        match self {
            AnyBus::Memory(b) => b.signal(room, json, except).await,
            AnyBus::Redis(b) => b.signal(room, json, except).await,
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            AnyBus::Memory(b) => b.is_ready(),
            AnyBus::Redis(b) => b.is_ready(),
        }
    }
}
