//! One client's session: the inbound side of a connection. It reads frames in order and
//! acts on them one at a time — the connect query ([`connect`]), `join` with its history
//! replay ([`join`]), `leave`, `send` — under a frame rate limit ([`rate_limit`]).
//! Everything it says goes through the connection's outbox, and is written when it is done
//! with the frame; how bytes reach the socket, pings and the close handshake are the
//! transport's business.
//!
//! `/websocket` connections (the original sample's clients) run the same session with
//! `legacy = true`: only `message` frames are ever sent to them.

mod connect;
mod join;
mod rate_limit;
mod refresh;

use std::{future::Future, sync::Arc, time::Duration};

use chat_protocol::{
    ClientFrame, ErrorCode, FrameError, Limits, MessageTemplate, PresenceUser, RoomName,
    ServerFrame, Username, parse_client_frame,
};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};
use tungstenite::Message;

pub use connect::ConnectParams;
use rate_limit::RateLimit;

use crate::{
    auth::Principal,
    bus::{Bus, Dedupe},
    presence::typing_json,
    state::AppState,
    transport::{CloseReason, ConnId, Connection, Outbox, Reader, Upgraded, frame},
};

/// The username used when neither the frame nor the connection gives one.
pub const ANONYMOUS: &str = "anonymous";

/// Consecutive refused frames after which a connection is closed with 1008.
pub const BAD_FRAME_LIMIT: u32 = 10;

/// Which endpoint a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: protocol v1.
    Ws,
    /// `/websocket`: the original sample's clients, who only ever get `message` frames.
    Legacy,
}

struct Session {
    state: Arc<AppState>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    legacy: bool,
    /// Who is on this connection (a verified token decides the name and the rooms).
    principal: Principal,
    /// When the token expires (`exp` plus the clock leeway): the connection is closed with
    /// 4001 then, unless a `refresh` moved it.
    expires_at: Option<tokio::time::Instant>,
    /// The name from the connect query (anonymous connections only).
    username: Option<Username>,
    /// The `client` id from the connect query: makes sends with `ref` idempotent.
    client: Option<String>,
    /// Rooms in join order; `false` while the join's replay is in progress.
    rooms: Vec<(RoomName, bool)>,
    /// Rooms this connection is counted in for presence (from the start of its join
    /// until it leaves; see [`crate::presence`]).
    listed: Vec<RoomName>,
    rate: RateLimit,
    /// Frames refused in a row (not counting `unavailable` and `rate_limited`); at
    /// [`BAD_FRAME_LIMIT`] the connection is closed with 1008.
    refused_in_a_row: u32,
    /// Whether the frame being handled was refused.
    refused: bool,
    /// The close code of the peer's close frame, if it sent one.
    peer_close: Option<u16>,
}

/// Serves one upgraded WebSocket until it closes.
pub async fn run(
    upgraded: Upgraded,
    state: Arc<AppState>,
    params: ConnectParams,
    at: Endpoint,
    principal: Principal,
) {
    let conn = state.next_conn_id();
    let legacy = at == Endpoint::Legacy;
    // Every line a connection logs carries these (and its user once authenticated).
    let span = info_span!(
        "conn",
        conn,
        instance = %state.config.instance_id,
        legacy,
        user = tracing::field::Empty
    );
    if let Some(id) = principal.identity() {
        span.record("user", id.user.as_str());
    }
    async move {
        let metrics = state.metrics.clone();
        metrics.opened.increment(1);
        let open = metrics.connections(legacy);
        open.increment(1.0);
        let mut connection = Connection::open(upgraded, &state.transport).await;
        let rate = RateLimit::new(
            state.config.rate_limit_per_sec,
            state.config.rate_limit_burst,
        );
        let expires_at = principal.identity().map(|id| refresh::deadline(id.exp));
        let mut session = Session {
            state,
            conn,
            outbox: connection.outbox.clone(),
            legacy,
            principal,
            expires_at,
            username: None,
            client: None,
            rooms: Vec::new(),
            listed: Vec::new(),
            rate,
            refused_in_a_row: 0,
            refused: false,
            peer_close: None,
        };
        debug!("connected");
        let reason = session.serve(&mut connection.reader, params).await;
        session.leave_all();
        let outbox = connection.outbox.clone();
        connection.close(reason).await;
        // The first reason stands (e.g. too slow, found while this one was being chosen).
        let code = match outbox.closing().unwrap_or(reason) {
            CloseReason::PeerClosed => session.peer_close,
            reason => reason.code(),
        };
        metrics.closed(code);
        open.decrement(1.0);
        debug!(code, "disconnected");
    }
    .instrument(span)
    .await;
}

/// Runs `work` unless the outbox starts closing first (its reason stands).
async fn until_closed<T>(
    done: &CancellationToken,
    work: impl Future<Output = T>,
) -> Result<T, CloseReason> {
    tokio::select! {
        biased;
        // The first reason wins: this one is only a placeholder.
        () = done.cancelled() => Err(CloseReason::Gone),
        out = work => Ok(out),
    }
}

impl Session {
    /// Runs until the peer leaves, the outbox closes or the instance shuts down; returns
    /// how to close the connection.
    ///
    /// The shutdown is only noticed while waiting for the next frame: a frame being
    /// handled is finished first, so a publish in flight gets its `ack` (or its error)
    /// before the connection is closed with 1012 (and the client, resuming elsewhere, does
    /// not send it again). The close itself writes everything already queued first.
    async fn serve(&mut self, reader: &mut Reader, params: ConnectParams) -> CloseReason {
        // On shutdown each client is closed at its own random moment within the drain
        // window, so they do not all reconnect elsewhere in the same millisecond.
        let shutdown = self.state.shutdown.clone();
        let drain = self.state.config.shutdown_drain;
        let jitter =
            Duration::from_millis(fastrand::u64(0..=drain.as_millis().try_into().unwrap_or(0)));
        let stop = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(jitter).await;
        };
        tokio::pin!(stop);
        let done = self.outbox.done();
        // Boxed: the join's call graph (bus futures included) is large, and an idle
        // connection should not carry its state around (see docs/architecture.md).
        if let Err(reason) = until_closed(&done, Box::pin(self.start(params))).await {
            return reason;
        }
        self.outbox.write_or_defer();
        let expiry = tokio::time::sleep_until(refresh::never());
        tokio::pin!(expiry);
        loop {
            expiry
                .as_mut()
                .reset(self.expires_at.unwrap_or_else(refresh::never));
            let next = tokio::select! {
                biased;
                () = stop.as_mut() => return CloseReason::Restart,
                () = &mut expiry => return CloseReason::TokenExpired,
                // The first reason wins: this one is only a placeholder.
                () = done.cancelled() => return CloseReason::Gone,
                next = reader.next() => next,
            };
            let message = match next {
                None => return CloseReason::PeerClosed,
                Some(Err(err)) => {
                    debug!(error = %err, "read failed");
                    return CloseReason::after_read_error(&err);
                }
                Some(Ok(message)) => message,
            };
            self.outbox.mark_alive();
            if let Err(reason) = until_closed(&done, Box::pin(self.on_message(message))).await {
                return reason;
            }
            self.outbox.write_or_defer();
        }
    }

    async fn on_message(&mut self, message: Message) {
        let size = match &message {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        if size > self.state.config.max_frame_bytes {
            // Enforced after a whole read, so the close (1009) is clean: closing a socket
            // with unread bytes resets it and loses the close frame.
            debug!(size, "frame over MAX_FRAME_BYTES");
            self.outbox.close(CloseReason::TooBig);
            return;
        }
        let frame = match message {
            Message::Text(text) => parse_client_frame(
                text.as_str(),
                Limits {
                    max_text_bytes: self.state.config.max_text_bytes,
                },
            ),
            // Refused like any bad frame: rate-limited, and counted toward 1008.
            Message::Binary(_) => Err(FrameError::new(
                ErrorCode::BadRequest,
                "binary frames are not supported: send JSON text frames",
            )),
            // Pings are answered by the WebSocket layer (its pongs are bounded by the
            // outbox) and count against the rate limit; a close handshake finishes when
            // the stream ends.
            Message::Ping(_) => {
                let _ = self.rate.allow();
                return;
            }
            Message::Close(frame) => {
                self.peer_close = frame.map(|f| u16::from(f.code));
                return;
            }
            Message::Pong(_) | Message::Frame(_) => return,
        };
        if !self.rate.allow() {
            // A burst (a paste, a client re-sending after a reconnect) is not garbage: a
            // rate-limited frame neither counts toward BAD_FRAME_LIMIT nor resets it.
            let reference = match &frame {
                Ok(frame) => frame.reference().map(str::to_owned),
                Err(e) => e.reference.clone(),
            };
            let err = FrameError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} frames per second: slow down",
                    self.state.config.rate_limit_per_sec
                ),
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        self.refused = false;
        self.handle(frame).await;
        if self.refused {
            self.refused_in_a_row += 1;
            if self.refused_in_a_row >= BAD_FRAME_LIMIT {
                debug!("closing a connection that sends only refused frames");
                self.outbox.close(CloseReason::Policy);
            }
        } else {
            self.refused_in_a_row = 0;
        }
    }

    async fn handle(&mut self, frame: Result<ClientFrame, FrameError>) {
        match frame {
            Ok(ClientFrame::Join {
                room,
                since,
                epoch,
                reference,
            }) => Box::pin(self.join(room, since, epoch, reference)).await,
            Ok(ClientFrame::Leave { room, reference }) => self.leave(room, reference).await,
            Ok(ClientFrame::Send {
                room,
                text,
                username,
                reference,
            }) => Box::pin(self.send(room, text, username, reference)).await,
            Ok(ClientFrame::Refresh { token, reference }) => {
                Box::pin(self.refresh(token, reference)).await;
            }
            Ok(ClientFrame::Typing { room, reference }) => self.typing(room, reference).await,
            Err(err) => self.refuse(err).await,
        }
    }

    async fn leave(&mut self, room: RoomName, reference: Option<String>) {
        let Some(pos) = self.rooms.iter().position(|(r, live)| *r == room && *live) else {
            let err = FrameError::new(ErrorCode::NotJoined, format!("not in room {room}"));
            return self.refuse(err.with_ref(reference)).await;
        };
        self.rooms.remove(pos);
        self.leave_room(room).await;
    }

    /// Leaves `room` (already out of `rooms`) and says `left`.
    async fn leave_room(&mut self, room: RoomName) {
        self.rooms.retain(|(r, _)| *r != room);
        // Wait for a possible unsubscribe so that after `left` this instance no longer
        // receives the room's traffic because of this client.
        if let Some(release) = self.state.hub.leave(&room, self.conn, &self.state.bus) {
            release.await;
        }
        self.unlist(&room).await;
        self.reply(ServerFrame::Left {
            room: room.to_string(),
        })
        .await;
    }

    async fn send(
        &mut self,
        room: Option<RoomName>,
        text: String,
        username: Option<Username>,
        reference: Option<String>,
    ) {
        let room = match room {
            Some(room) if self.rooms.iter().any(|(r, live)| *r == room && *live) => room,
            Some(room) => {
                let err = FrameError::new(
                    ErrorCode::NotJoined,
                    format!("join {room} before sending to it"),
                );
                return self.refuse(err.with_ref(reference)).await;
            }
            None => match self.rooms.iter().find(|(_, live)| *live) {
                Some((room, _)) => room.clone(),
                None => {
                    let err = FrameError::new(ErrorCode::NotJoined, "join a room before sending");
                    return self.refuse(err.with_ref(reference)).await;
                }
            },
        };
        if !self.principal.may_write() {
            let err = FrameError::new(
                ErrorCode::Unauthorized,
                "this connection has no token: it may read, not send",
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        // An authenticated author's name is its token's: nobody can post as someone else.
        let template = match self.principal.identity() {
            Some(id) => MessageTemplate::with_user(&room, id.name.as_str(), Some(&id.user), &text),
            None => {
                let username = username
                    .as_ref()
                    .or(self.username.as_ref())
                    .map_or(ANONYMOUS, Username::as_str);
                MessageTemplate::new(&room, username, &text)
            }
        };
        // With a `client` id, a `send` carrying `ref` is stored at most once: a repeat
        // (after a reconnect, on any instance) gets the original's ack. The record is
        // per user (or per anonymous client), so nobody can answer for someone else.
        let dedupe = match (&self.client, &reference) {
            (Some(client), Some(reference)) => {
                let who = match self.principal.identity() {
                    Some(id) => format!("user:{}\u{0}{client}", id.user),
                    None => format!("client:{client}"),
                };
                Some(Dedupe::new(
                    &who,
                    reference,
                    self.state.config.idempotency_window,
                ))
            }
            _ => None,
        };
        let published = Box::pin(self.state.publish(&room, &template, dedupe.as_ref())).await;
        match published.map(|p| p.msg.id) {
            Ok(id) => {
                if let Some(reference) = reference {
                    let ack = ServerFrame::Ack {
                        reference,
                        room: room.to_string(),
                        id,
                    };
                    self.reply(ack).await;
                }
            }
            Err(err) => {
                // The detail is for the log, not for clients.
                warn!(%room, error = %err, "publish failed");
                let err = FrameError::new(
                    ErrorCode::Unavailable,
                    "message not stored: the message bus is unavailable, try again",
                );
                self.refuse(err.with_ref(reference)).await;
            }
        }
    }

    /// Relays "typing" to the room's other members, on every instance: not stored, at
    /// most one per user and room every 2 s (extras are dropped silently, not refused).
    async fn typing(&mut self, room: RoomName, reference: Option<String>) {
        if !self.rooms.iter().any(|(r, live)| *r == room && *live) {
            let err = FrameError::new(ErrorCode::NotJoined, format!("join {room} first"));
            return self.refuse(err.with_ref(reference)).await;
        }
        if !self.principal.may_write() {
            let err = FrameError::new(
                ErrorCode::Unauthorized,
                "this connection has no token: it may read, not type",
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        let me = self.who();
        if !self.state.presence.may_type(&room, &me.user) {
            return;
        }
        let json = typing_json(&room, &me);
        let sent = Box::pin(self.state.bus.signal(&room, json, Some(Arc::from(me.user)))).await;
        if let Err(err) = sent {
            // Typing is best-effort: nothing to retry, nothing to tell.
            debug!(%room, error = %err, "typing not relayed");
        }
    }

    async fn refuse(&mut self, err: FrameError) {
        debug!(code = %err.code, message = %err.message, "refused");
        if !self.legacy {
            self.state.metrics.error(err.code);
        }
        if !matches!(err.code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
            self.refused = true;
        }
        self.reply(ServerFrame::Error {
            code: err.code,
            message: err.message,
            reference: err.reference,
        })
        .await;
    }

    /// Sends a frame of the session's own (never on `/websocket`, whose clients render
    /// every frame as a chat line).
    async fn reply(&mut self, frame: ServerFrame) {
        if !self.legacy {
            // Refused only when the connection is closing: nobody to tell.
            let _ = self
                .outbox
                .push_paced(frame::text(frame.to_json().as_bytes()))
                .await;
        }
    }

    fn leave_all(&mut self) {
        for (room, _) in self.rooms.drain(..) {
            if let Some(release) = self.state.hub.leave(&room, self.conn, &self.state.bus) {
                tokio::spawn(release);
            }
        }
        let me = self.who();
        for room in self.listed.drain(..) {
            let (state, me) = (self.state.clone(), me.clone());
            tokio::spawn(async move { state.presence.exit(&state.bus, &room, &me).await });
        }
    }

    /// Counts this connection in `room`'s presence (a tokenless reader is not listed:
    /// its name is whatever it chose, so listing it would let anyone appear as anyone).
    async fn list(&mut self, room: &RoomName) {
        if !self.principal.may_write() || self.listed.contains(room) {
            return;
        }
        // Recorded before the count changes, so a connection dropped half-way still
        // takes itself out in `leave_all`.
        self.listed.push(room.clone());
        let me = self.who();
        Box::pin(self.state.presence.enter(&self.state.bus, room, &me)).await;
    }

    /// Undoes [`Session::list`], if it was done.
    async fn unlist(&mut self, room: &RoomName) {
        let Some(pos) = self.listed.iter().position(|r| r == room) else {
            return;
        };
        self.listed.swap_remove(pos);
        let me = self.who();
        Box::pin(self.state.presence.exit(&self.state.bus, room, &me)).await;
    }

    /// Who this connection is in presence lists and `typing`: the token's user, or
    /// `anon-<instance>-<conn>` under its username.
    fn who(&self) -> PresenceUser {
        match self.principal.identity() {
            Some(id) => PresenceUser {
                user: id.user.clone(),
                name: id.name.to_string(),
            },
            None => PresenceUser {
                user: format!("anon-{}-{}", self.state.config.instance_id, self.conn),
                name: self
                    .username
                    .as_ref()
                    .map_or(ANONYMOUS, Username::as_str)
                    .to_owned(),
            },
        }
    }
}
