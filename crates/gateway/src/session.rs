//! One WebSocket connection: the reader/processor (this task) and the writer task.
//!
//! The session reads frames in order (tungstenite, over hyper's upgraded connection) and
//! acts on them one at a time (join with history replay, leave, send). Everything it says
//! goes through the connection's [`Outbox`], already in wire form, and is written when it
//! is done with the frame. The writer task takes over when the socket is full, sends
//! keep-alive pings and closes the socket with the code the outbox's [`CloseReason`] maps
//! to.
//!
//! `/websocket` connections (the original sample's clients) run the same session with
//! `legacy = true`: only `message` frames are ever sent to them.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chat_protocol::{
    ClientFrame, ErrorCode, FrameError, Limits, MessageTemplate, PROTOCOL_VERSION, RoomName,
    ServerFrame, Username, close, parse_client_frame,
};
use futures_util::StreamExt;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tracing::{Instrument, debug, info_span, warn};
use tungstenite::{Message, protocol::Role, protocol::WebSocketConfig};

use crate::{
    app::AppState,
    bus::{Bus, Epoch, History, Msg},
    hub::{ConnId, GoLive},
    limits::RateLimit,
    outbox::{CloseReason, Outbox},
    ws::{self, ClientIo, Connection},
};

/// The username used when neither the frame nor the connection gives one.
pub const ANONYMOUS: &str = "anonymous";

/// Initial read buffer per connection: chat frames are small, and it is allocated eagerly.
const READ_BUFFER: usize = 1024;

/// A connection's WebSocket reader.
type Reader = WebSocketStream<ClientIo>;

/// The query parameters of a connect request, unvalidated.
#[derive(Clone, Debug, Default)]
pub struct ConnectParams {
    /// `room`
    pub room: Option<String>,
    /// `since`
    pub since: Option<String>,
    /// `username`
    pub username: Option<String>,
    /// `epoch` (of `since`)
    pub epoch: Option<String>,
}

impl ConnectParams {
    /// Picks the parameters out of a parsed query string.
    pub fn from_query(mut q: HashMap<String, String>) -> Self {
        ConnectParams {
            room: q.remove("room"),
            since: q.remove("since"),
            username: q.remove("username"),
            epoch: q.remove("epoch"),
        }
    }
}

struct Session {
    state: Arc<AppState>,
    conn: ConnId,
    outbox: Arc<Outbox>,
    legacy: bool,
    username: Option<Username>,
    /// Rooms in join order; `false` while the join's replay is in progress.
    rooms: Vec<(RoomName, bool)>,
    rate: RateLimit,
    /// Frames refused in a row (not counting `unavailable`); at [`BAD_FRAME_LIMIT`] the
    /// connection is closed with 1008.
    refused_in_a_row: u32,
    /// Whether the frame being handled was refused.
    refused: bool,
}

/// Consecutive refused frames after which a connection is closed with 1008.
pub const BAD_FRAME_LIMIT: u32 = 10;

/// Serves one upgraded WebSocket until it closes.
pub async fn run(socket: Connection, state: Arc<AppState>, params: ConnectParams, legacy: bool) {
    let conn = state.next_conn_id();
    let span = info_span!("conn", conn, instance = %state.config.instance_id, legacy);
    async move {
        let Connection { tcp, upgraded } = socket;
        let outbox = Arc::new(Outbox::with_socket(
            state.config.client_queue,
            state.config.client_queue_bytes,
            tcp,
        ));
        // The session enforces MAX_FRAME_BYTES after reading a message whole, so the close
        // (1009) is clean: a message cut off mid-way would leave unread bytes, and closing a
        // socket with unread bytes resets it, losing the close frame. The hard limit, where
        // tungstenite gives up reading, is four times larger.
        let hard_limit = state.config.max_frame_bytes.saturating_mul(4);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(hard_limit))
            .max_frame_size(Some(hard_limit));
        let stream = WebSocketStream::from_raw_socket(
            ClientIo::new(upgraded, outbox.clone()),
            Role::Server,
            Some(config),
        )
        .await;
        // Not instrumented: entering a span each time the writer is polled is measurable.
        // Its few logs carry `conn`.
        let timing = WriterTiming {
            ping_every: state.config.ping_interval,
            write_timeout: state.config.write_timeout,
        };
        let writer = tokio::spawn(write_loop(outbox.clone(), timing, conn));
        let state_rate = &state.config;
        let rate = RateLimit::new(state_rate.rate_limit_per_sec, state_rate.rate_limit_burst);
        let mut session = Session {
            state,
            conn,
            outbox,
            legacy,
            username: None,
            rooms: Vec::new(),
            rate,
            refused_in_a_row: 0,
            refused: false,
        };
        debug!("connected");
        let stream = session.serve(stream, params).await;
        session.leave_all();
        session.outbox.close(match stream {
            // The peer ended the connection: answer its close, if it sent one.
            None => CloseReason::Finished,
            Some(_) => CloseReason::Gone,
        });
        let _ = writer.await;
        // Let the peer's answer to our close frame arrive, briefly, for a clean close.
        if let Some(mut stream) = stream {
            let _ = timeout(Duration::from_secs(1), async {
                while stream.next().await.is_some() {}
            })
            .await;
        }
        debug!("disconnected");
    }
    .instrument(span)
    .await;
}

impl Session {
    /// Runs until the peer leaves, the outbox closes or the instance shuts down. Returns the
    /// read half when a close handshake may still be completed.
    async fn serve(&mut self, mut stream: Reader, params: ConnectParams) -> Option<Reader> {
        // On shutdown each client is closed at its own random moment within the drain
        // window, so they do not all reconnect elsewhere in the same millisecond.
        let shutdown_token = self.state.shutdown.clone();
        let drain = self.state.config.shutdown_drain;
        let jitter =
            Duration::from_millis(fastrand::u64(0..=drain.as_millis().try_into().unwrap_or(0)));
        let shutdown = async move {
            shutdown_token.cancelled().await;
            tokio::time::sleep(jitter).await;
        };
        tokio::pin!(shutdown);
        let outbox = self.outbox.clone();
        let done = outbox.done();
        tokio::select! {
            biased;
            () = &mut shutdown => {
                outbox.close(CloseReason::Restart);
                return Some(stream);
            }
            () = done.cancelled() => return Some(stream),
            // Boxed: the join's call graph (bus futures included) is large, and an idle
            // connection should not carry its state around (see docs/architecture.md).
            () = Box::pin(self.start(params)) => outbox.flush(),
        }
        loop {
            let next = tokio::select! {
                biased;
                () = &mut shutdown => {
                    outbox.close(CloseReason::Restart);
                    return Some(stream);
                }
                () = done.cancelled() => return Some(stream),
                next = stream.next() => next,
            };
            let message = match next {
                None => return None,
                Some(Err(err)) => {
                    if is_capacity_error(&err) {
                        outbox.close(CloseReason::TooBig);
                        return Some(stream);
                    }
                    debug!(error = %err, "read failed");
                    return None;
                }
                Some(Ok(message)) => message,
            };
            outbox.mark_alive();
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    outbox.close(CloseReason::Restart);
                    return Some(stream);
                }
                () = done.cancelled() => return Some(stream),
                () = Box::pin(self.on_message(message)) => outbox.flush(),
            }
        }
    }

    /// Applies the connect query: username, then the automatic join.
    async fn start(&mut self, params: ConnectParams) {
        if !self.legacy {
            let welcome = ServerFrame::Welcome {
                instance: self.state.config.instance_id.clone(),
                conn: self.conn.to_string(),
                protocol: PROTOCOL_VERSION,
            };
            self.reply(welcome).await;
            // At once: the automatic join may wait for Redis.
            self.outbox.flush();
        }
        if let Some(name) = params.username {
            match Username::new(&name) {
                Ok(name) => self.username = Some(name),
                Err(e) => {
                    let err = FrameError::new(
                        ErrorCode::InvalidUsername,
                        format!("query parameter `username`: {e}"),
                    );
                    self.refuse(err).await;
                }
            }
        }
        let room = match params.room {
            None => Ok(self.state.config.default_room.clone()),
            Some(r) => RoomName::new(&r).map_err(|e| {
                FrameError::new(
                    ErrorCode::InvalidRoom,
                    format!("query parameter `room`: {e}"),
                )
            }),
        };
        let since = match params.since {
            None => Ok(None),
            Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
                FrameError::new(
                    ErrorCode::BadRequest,
                    "query parameter `since` must be a non-negative integer",
                )
            }),
        };
        match (room, since) {
            (Ok(room), Ok(since)) => self.join(room, since, params.epoch, None).await,
            (Err(e), _) | (_, Err(e)) => self.refuse(e).await,
        }
    }

    async fn on_message(&mut self, message: Message) {
        let size = match &message {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        if size > self.state.config.max_frame_bytes {
            debug!(size, "frame over MAX_FRAME_BYTES");
            self.outbox.close(CloseReason::TooBig);
            return;
        }
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                let err = FrameError::new(
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text frames",
                );
                return self.refuse(err).await;
            }
            // Pings are answered by the WebSocket layer; a close handshake finishes when
            // the stream ends.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                return;
            }
        };
        let limits = Limits {
            max_text_bytes: self.state.config.max_text_bytes,
        };
        self.refused = false;
        let frame = parse_client_frame(text.as_str(), limits);
        if !self.rate.allow() {
            let reference = match &frame {
                Ok(ClientFrame::Join { reference, .. })
                | Ok(ClientFrame::Leave { reference, .. })
                | Ok(ClientFrame::Send { reference, .. }) => reference.clone(),
                Err(e) => e.reference.clone(),
            };
            let err = FrameError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} frames per second: slow down",
                    self.state.config.rate_limit_per_sec
                ),
            );
            self.refuse(err.with_ref(reference)).await;
        } else {
            self.handle(frame).await;
        }
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
            }) => self.join(room, since, epoch, reference).await,
            Ok(ClientFrame::Leave { room, reference }) => self.leave(room, reference).await,
            Ok(ClientFrame::Send {
                room,
                text,
                username,
                reference,
            }) => self.send(room, text, username, reference).await,
            Err(err) => self.refuse(err).await,
        }
    }

    async fn join(
        &mut self,
        room: RoomName,
        since: Option<u64>,
        epoch: Option<String>,
        reference: Option<String>,
    ) {
        if self.rooms.iter().any(|(r, _)| *r == room) {
            let err = FrameError::new(ErrorCode::BadRequest, format!("already joined {room}"));
            return self.refuse(err.with_ref(reference)).await;
        }
        let max = self.state.config.max_rooms_per_connection;
        if self.rooms.len() >= max {
            let err = FrameError::new(
                ErrorCode::Forbidden,
                format!("a connection may be in at most {max} rooms: leave one first"),
            );
            return self.refuse(err.with_ref(reference)).await;
        }
        self.rooms.push((room.clone(), false));
        let state = self.state.clone();
        // The bus calls are boxed: their futures are several KB each (fred inside), and
        // inline they would make every frame's future (and so its box) that large.
        if let Err(err) = Box::pin(state.hub.join(
            &room,
            self.conn,
            self.outbox.clone(),
            &state.bus,
        ))
        .await
        {
            warn!(%room, error = %err, "join failed");
            return self.abort_join(&room, err.to_string(), reference).await;
        }
        let mut since = since;
        let mut recovered = true;
        let mut first_pass = true;
        loop {
            let mut history = Box::pin(state.bus.history(&room, since)).await;
            if let Ok(h) = &history
                && since.is_some()
                && epoch.is_some()
                && h.epoch.as_deref() != epoch.as_deref()
            {
                // `since` is from another epoch: the whole history, not a tail, is due.
                history = Box::pin(state.bus.history(&room, None)).await;
            }
            let history = match history {
                Ok(h) => h,
                Err(err) => {
                    warn!(%room, error = %err, "history read failed");
                    return self.abort_join(&room, err.to_string(), reference).await;
                }
            };
            let plan = ReplayPlan::new(since, epoch.as_deref(), history);
            if !first_pass && !plan.recovered {
                // The room moved faster than this client read its replay, beyond history.
                self.outbox.close(CloseReason::TooSlow);
                return;
            }
            recovered &= plan.recovered;
            for msg in plan.messages {
                if self.outbox.push(msg.wire).await.is_err() {
                    return;
                }
            }
            let legacy = self.legacy;
            let room_epoch = plan.epoch.clone();
            let joined = |last_id| {
                (!legacy).then(|| {
                    let frame = ServerFrame::Joined {
                        room: room.to_string(),
                        last_id,
                        recovered,
                        epoch: room_epoch.as_deref().map(str::to_owned),
                    };
                    ws::text_frame(frame.to_json().as_bytes())
                })
            };
            let go = state
                .hub
                .go_live(&room, self.conn, plan.last_id, plan.epoch.clone(), joined);
            match go {
                GoLive::Live(last_id) => {
                    debug!(%room, last_id, recovered, "joined");
                    if let Some(entry) = self.rooms.iter_mut().find(|(r, _)| *r == room) {
                        entry.1 = true;
                    }
                    return;
                }
                GoLive::Retry => {
                    since = Some(plan.last_id);
                    first_pass = false;
                }
                GoLive::Gone => return,
            }
        }
    }

    async fn abort_join(&mut self, room: &RoomName, why: String, reference: Option<String>) {
        self.rooms.retain(|(r, _)| r != room);
        if let Some(release) = self.state.hub.leave(room, self.conn, &self.state.bus) {
            release.await;
        }
        let err = FrameError::new(ErrorCode::Unavailable, format!("cannot join {room}: {why}"));
        self.refuse(err.with_ref(reference)).await;
    }

    async fn leave(&mut self, room: RoomName, reference: Option<String>) {
        let Some(pos) = self.rooms.iter().position(|(r, live)| *r == room && *live) else {
            let err = FrameError::new(ErrorCode::NotJoined, format!("not in room {room}"));
            return self.refuse(err.with_ref(reference)).await;
        };
        self.rooms.remove(pos);
        // Wait for a possible unsubscribe so that after `left` this instance no longer
        // receives the room's traffic because of this client.
        if let Some(release) = self.state.hub.leave(&room, self.conn, &self.state.bus) {
            release.await;
        }
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
        let username = username
            .as_ref()
            .or(self.username.as_ref())
            .map_or(ANONYMOUS, Username::as_str);
        let template = MessageTemplate::new(&room, username, &text);
        match Box::pin(self.state.bus.publish(&room, &template)).await {
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
                warn!(%room, error = %err, "publish failed");
                let err = FrameError::new(
                    ErrorCode::Unavailable,
                    format!("message not stored, try again: {err}"),
                );
                self.refuse(err.with_ref(reference)).await;
            }
        }
    }

    async fn refuse(&mut self, err: FrameError) {
        debug!(code = %err.code, message = %err.message, "refused");
        if err.code != ErrorCode::Unavailable {
            self.refused = true;
        }
        self.reply(ServerFrame::Error {
            code: err.code,
            message: err.message,
            reference: err.reference,
        })
        .await;
    }

    /// Sends a control frame (never on `/websocket`, whose clients render every frame).
    async fn reply(&mut self, frame: ServerFrame) {
        if !self.legacy {
            let _ = self
                .outbox
                .push(ws::text_frame(frame.to_json().as_bytes()))
                .await;
        }
    }

    fn leave_all(&mut self) {
        for (room, _) in self.rooms.drain(..) {
            if let Some(release) = self.state.hub.leave(&room, self.conn, &self.state.bus) {
                tokio::spawn(release);
            }
        }
    }
}

/// What a join replays, given the client's `since` (and its epoch) and what the bus
/// returned.
#[derive(Debug, PartialEq, Eq)]
struct ReplayPlan {
    messages: Vec<Msg>,
    recovered: bool,
    last_id: u64,
    epoch: Option<Epoch>,
}

impl ReplayPlan {
    fn new(since: Option<u64>, client_epoch: Option<&str>, history: History) -> Self {
        let History {
            top,
            epoch,
            messages,
        } = history;
        let same_epoch = client_epoch.is_none() || client_epoch == epoch.as_deref();
        let recovered = match since {
            None => true,
            Some(_) if !same_epoch => false,
            Some(s) if s > top => false,
            Some(s) => match messages.first() {
                Some(first) => first.id <= s + 1,
                None => s == top,
            },
        };
        let messages = match since {
            Some(s) if recovered => messages.into_iter().filter(|m| m.id > s).collect(),
            _ => messages,
        };
        ReplayPlan {
            messages,
            recovered,
            last_id: top,
            epoch,
        }
    }
}

fn is_capacity_error(err: &tungstenite::Error) -> bool {
    matches!(err, tungstenite::Error::Capacity(_))
}

/// The writer's clock settings.
#[derive(Clone, Copy, Debug)]
struct WriterTiming {
    ping_every: Duration,
    write_timeout: Duration,
}

/// The writer task: writes what the dispatcher's flushes could not (waiting for a full
/// socket, at most `write_timeout` without progress), the session's frames, pings, and the
/// close frame.
async fn write_loop(outbox: Arc<Outbox>, timing: WriterTiming, conn: ConnId) {
    let WriterTiming {
        ping_every,
        write_timeout,
    } = timing;
    let mut ticker = interval_at(Instant::now() + ping_every, ping_every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered = 0u32;
    let mut stalled_since = Instant::now();
    // `clean`: the stream ends at a frame boundary, so a close frame may follow.
    let (reason, clean) = loop {
        let written = match outbox.write_now() {
            Ok(w) => w,
            Err(err) => {
                debug!(conn, error = %err, "write failed");
                break (CloseReason::Gone, false);
            }
        };
        if written.bytes > 0 || written.all {
            stalled_since = Instant::now();
        }
        if written.all
            && let Some(reason) = outbox.closed_and_flushed()
        {
            break (reason, true);
        }
        tokio::select! {
            biased;
            ready = outbox.writable(), if !written.all => {
                if let Err(err) = ready {
                    debug!(conn, error = %err, "socket failed");
                    break (CloseReason::Gone, false);
                }
            }
            () = sleep_until(stalled_since + write_timeout), if !written.all => {
                debug!(conn, "write timed out");
                break (CloseReason::TooSlow, false);
            }
            () = outbox.work(), if written.all => {}
            _ = ticker.tick() => {
                if outbox.take_alive() {
                    unanswered = 0;
                } else {
                    unanswered += 1;
                    if unanswered >= 2 {
                        debug!(conn, "peer missed two pings");
                        break (CloseReason::Gone, false);
                    }
                }
                outbox.push_control(ws::PING);
            }
        }
    };
    outbox.close(reason);
    let code = match reason {
        CloseReason::TooSlow => close::TRY_AGAIN,
        CloseReason::TooBig => close::TOO_BIG,
        CloseReason::Restart => close::RESTART,
        CloseReason::Policy => close::POLICY,
        CloseReason::Gone | CloseReason::Finished => return,
    };
    if !clean {
        return;
    }
    let text = match reason {
        CloseReason::TooSlow => "too slow: reconnect with since",
        CloseReason::TooBig => "frame too large",
        CloseReason::Policy => "too many refused frames",
        _ => "server restarting: reconnect",
    };
    outbox.push_close(ws::close_frame(code, text));
    let _ = timeout(write_timeout, async {
        while let Ok(w) = outbox.write_now() {
            if w.all || outbox.writable().await.is_err() {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(top: u64, ids: &[u64]) -> History {
        History {
            top,
            epoch: Some(Epoch::from("e1")),
            messages: ids
                .iter()
                .copied()
                .map(|id| Msg::new(id, id.to_string().as_bytes()))
                .collect(),
        }
    }

    fn plan(since: Option<u64>, history: History) -> (Vec<u64>, bool, u64) {
        let p = ReplayPlan::new(since, None, history);
        (
            p.messages.iter().map(|m| m.id).collect(),
            p.recovered,
            p.last_id,
        )
    }

    #[test]
    fn replay_plans() {
        // empty room
        assert_eq!(plan(None, h(0, &[])), (vec![], true, 0));
        assert_eq!(plan(Some(0), h(0, &[])), (vec![], true, 0));
        // fresh join replays everything retained
        assert_eq!(
            plan(None, h(10, &(6..=10).collect::<Vec<_>>())),
            (vec![6, 7, 8, 9, 10], true, 10)
        );
        // resume within history
        assert_eq!(
            plan(Some(8), h(10, &(9..=10).collect::<Vec<_>>())),
            (vec![9, 10], true, 10)
        );
        assert_eq!(
            plan(Some(8), h(10, &(6..=10).collect::<Vec<_>>())),
            (vec![9, 10], true, 10)
        );
        assert_eq!(
            plan(Some(5), h(10, &(6..=10).collect::<Vec<_>>())),
            (vec![6, 7, 8, 9, 10], true, 10)
        );
        assert_eq!(plan(Some(10), h(10, &[])), (vec![], true, 10));
        // too old: some messages are gone
        assert_eq!(
            plan(Some(4), h(10, &(6..=10).collect::<Vec<_>>())),
            (vec![6, 7, 8, 9, 10], false, 10)
        );
        // from the future (the room was reset)
        assert_eq!(
            plan(Some(12), h(10, &(6..=10).collect::<Vec<_>>())),
            (vec![6, 7, 8, 9, 10], false, 10)
        );
        assert_eq!(plan(Some(3), h(0, &[])), (vec![], false, 0));
    }

    #[test]
    fn a_since_from_another_epoch_is_not_recovered() {
        let history = || h(10, &(6..=10).collect::<Vec<_>>());
        let same = ReplayPlan::new(Some(8), Some("e1"), history());
        assert_eq!((same.messages.len(), same.recovered), (2, true));
        let other = ReplayPlan::new(Some(8), Some("e0"), history());
        assert_eq!((other.messages.len(), other.recovered), (5, false));
        assert_eq!(other.epoch.as_deref(), Some("e1"));
    }
}
