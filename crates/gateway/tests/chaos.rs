//! The chaos test: several gateway processes on one Redis deployment, many clients
//! joining, leaving, reconnecting and sending, while faults are injected. At the end every
//! client's view of every room is checked against Redis: ids consecutive from 1 in each
//! room epoch (no gap, no duplicate), the same text as stored for each id, every
//! acknowledged message stored, every surviving connection caught up live.
//!
//! It runs twice, once per topology, each with its own faults:
//!
//! - a three-primary **Redis Cluster**: pub/sub connections killed on every node, instances
//!   SIGKILLed or SIGTERMed (which must exit with code 0) and restarted, and a room's slot
//!   migrated to another primary mid-stream (resharding);
//! - a **standalone Redis**: the same pub/sub kills and signals, plus a flush-and-restart
//!   (FLUSHALL, then Redis restarted): every room starts again at id 1 under a new epoch.
//!   Its clients' views start again too (`joined` with `recovered:false` and the new
//!   epoch), so views are kept per epoch and each epoch's is compared with what that epoch
//!   held when it was flushed (read atomically with the FLUSHALL).
//!
//! Every fault kind must have been injected, traffic must have flowed, and there must be
//! no anomaly. A `chaos summary:` line per topology gives the counts.
//!
//! Not part of the normal run (it takes minutes):
//!
//! ```sh
//! CHAOS_SECS=120 cargo test -p chat-gateway --test chaos -- --ignored --nocapture
//! ```
//!
//! `CHAOS_SECS` is per topology; `CHAOS_TOPOLOGY=cluster` or `standalone` runs only one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chat_protocol::{ErrorCode, ServerFrame};
use chat_testkit::{GatewayProcess, RedisCluster, RedisServer, WsClient};
use fred::{prelude::*, types::cluster::ClusterRouting};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_chat-gateway");
const INSTANCES: usize = 3;
const CLIENTS: usize = 24;
const ROOMS: [&str; 5] = ["general", "r1", "r2", "r3", "r4"];
/// The longest one fault's injection may take (a restart included).
const FAULT_LIMIT: Duration = Duration::from_secs(60);
/// The longest the set-up and the final catch-up and checks of one run may take, on top
/// of `CHAOS_SECS`.
const RUN_OVERHEAD_LIMIT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    Cluster,
    Standalone,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::Cluster => "cluster",
            Topology::Standalone => "standalone",
        }
    }

    /// The faults injected on this topology.
    fn faults(self) -> &'static [Fault] {
        match self {
            Topology::Cluster => &[
                Fault::PubsubKill,
                Fault::SigKill,
                Fault::SigTerm,
                Fault::Reshard,
            ],
            Topology::Standalone => &[
                Fault::PubsubKill,
                Fault::SigKill,
                Fault::SigTerm,
                Fault::FlushRestart,
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `CLIENT KILL TYPE pubsub` on every node.
    PubsubKill,
    /// An instance SIGKILLed, and a fresh one started.
    SigKill,
    /// An instance SIGTERMed (it must drain and exit with 0), and a fresh one started.
    SigTerm,
    /// A random room's slot migrated to another primary (Cluster).
    Reshard,
    /// FLUSHALL, then Redis restarted (standalone): every room gets a new epoch.
    FlushRestart,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    refused: AtomicU64,
    reconnects: AtomicU64,
    /// `joined` with `recovered:false` after a room's epoch changed.
    resets: AtomicU64,
    /// Connections the server closed with 1012, with 1013, or dropped without a close
    /// frame.
    closed_restart: AtomicU64,
    closed_try_again: AtomicU64,
    dropped: AtomicU64,
    pubsub_kills: AtomicU64,
    /// Pub/sub connections those kills closed.
    pubsub_killed: AtomicU64,
    sigkills: AtomicU64,
    sigterms: AtomicU64,
    reshards: AtomicU64,
    flush_restarts: AtomicU64,
    /// Flushes completed: the "generation" of the data. A message acknowledged is stored
    /// in a generation between the one current when it was sent and the one after the
    /// one current when its ack arrived.
    generation: AtomicU64,
    anomalies: Mutex<Vec<String>>,
}

impl Stats {
    fn anomaly(&self, what: String) {
        eprintln!("ANOMALY: {what}");
        self.anomalies.lock().unwrap().push(what);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn fault_count(&self, fault: Fault) -> u64 {
        Self::get(match fault {
            Fault::PubsubKill => &self.pubsub_kills,
            Fault::SigKill => &self.sigkills,
            Fault::SigTerm => &self.sigterms,
            Fault::Reshard => &self.reshards,
            Fault::FlushRestart => &self.flush_restarts,
        })
    }
}

/// The live instances' WebSocket base URLs.
type Urls = Arc<Mutex<Vec<String>>>;

/// What a client saw of a room in an epoch that has ended for it.
struct Segment {
    epoch: Option<String>,
    got: HashMap<u64, String>,
}

#[derive(Default)]
struct View {
    /// Last id seen in this room in the current epoch (ids must arrive as 1, 2, 3, ...).
    last: u64,
    epoch: Option<String>,
    /// The client means to be in the room (a join was sent and not refused).
    joined: bool,
    /// A join was sent and its `joined` has not come back: messages meanwhile are its
    /// replay, which may be of a new epoch (known only at `joined`).
    joining: bool,
    /// Messages received while joining.
    pending: Vec<(u64, String)>,
    /// A `leave` was sent and its `left` has not come back: rejoining now would replay
    /// messages that are still on their way.
    leaving: bool,
    /// id → text, everything received in the current epoch.
    got: HashMap<u64, String>,
    /// Earlier epochs.
    past: Vec<Segment>,
}

struct Acked {
    room: String,
    id: u64,
    text: String,
    /// Generations when the send was made and when the ack arrived.
    sent_gen: u64,
    acked_gen: u64,
}

/// What came from a connection.
enum Next {
    Frame(ServerFrame),
    /// Closed by the server (its close code) or dropped (None).
    Closed(Option<u16>),
}

struct Chatter {
    n: usize,
    topology: Topology,
    views: HashMap<String, View>,
    /// Sends in flight on the current connection: ref (= text) → generation when sent.
    in_flight: HashMap<String, u64>,
    acked: Vec<Acked>,
    stats: Arc<Stats>,
    seq: u64,
    /// The connection must be given up (its automatic join was refused).
    give_up: bool,
}

impl Chatter {
    fn query(&self, room: &str) -> String {
        let v = self.views.get(room);
        let mut q = format!("/ws?room={room}&username=c{}", self.n);
        if let Some(v) = v.filter(|v| v.last > 0 || v.epoch.is_some()) {
            q.push_str(&format!("&since={}", v.last));
            if let Some(e) = &v.epoch {
                q.push_str(&format!("&epoch={e}"));
            }
        }
        q
    }

    fn join_frame(&self, room: &str) -> serde_json::Value {
        let v = &self.views[room];
        let mut f =
            json!({"type": "join", "room": room, "since": v.last, "ref": format!("join:{room}")});
        if let Some(e) = &v.epoch {
            f["epoch"] = e.clone().into();
        }
        f
    }

    /// Connects to a random live instance and resumes every room it is in.
    async fn connect(&mut self, urls: &Urls) -> Option<WsClient> {
        let url = {
            let urls = urls.lock().unwrap();
            if urls.is_empty() {
                return None;
            }
            urls[fastrand::usize(..urls.len())].clone()
        };
        let mut c = WsClient::connect(&format!("{url}{}", self.query("general")))
            .await
            .ok()?;
        self.give_up = false;
        self.in_flight.clear();
        self.views.entry("general".into()).or_default().joined = true;
        for v in self.views.values_mut() {
            v.leaving = false;
            v.joining = v.joined;
            v.pending.clear();
        }
        for room in ROOMS.iter().skip(1) {
            if self.views.get(*room).is_some_and(|v| v.joined) {
                let f = self.join_frame(room);
                c.send_json(f).await.ok()?;
            }
        }
        Some(c)
    }

    /// The connection is gone: what was in flight on it is void.
    fn disconnected(&mut self) {
        self.in_flight.clear();
        for v in self.views.values_mut() {
            v.joining = false;
            v.pending.clear();
        }
    }

    fn on_next(&mut self, next: Next) -> bool {
        match next {
            Next::Frame(frame) => {
                self.on_frame(frame);
                true
            }
            Next::Closed(code) => {
                match code {
                    None => &self.stats.dropped,
                    Some(chat_protocol::close::RESTART) => &self.stats.closed_restart,
                    Some(chat_protocol::close::TRY_AGAIN) => &self.stats.closed_try_again,
                    Some(other) => {
                        self.stats
                            .anomaly(format!("client {}: closed with code {other}", self.n));
                        &self.stats.dropped
                    }
                }
                .fetch_add(1, Ordering::Relaxed);
                self.disconnected();
                false
            }
        }
    }

    /// Takes a message into the current epoch's view of `room`.
    fn take(&mut self, room: &str, id: u64, text: String) {
        let v = self.views.entry(room.to_owned()).or_default();
        if id != v.last + 1 {
            self.stats.anomaly(format!(
                "client {} room {room}: got id {id} after {} (epoch {:?})",
                self.n, v.last, v.epoch
            ));
        }
        v.last = v.last.max(id);
        v.got.insert(id, text);
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Message(m) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                let v = self.views.entry(m.room.clone()).or_default();
                if v.joining {
                    v.pending.push((m.id, m.text));
                    return;
                }
                if !v.joined && !v.leaving {
                    self.stats.anomaly(format!(
                        "client {} room {}: message {} while not in the room",
                        self.n, m.room, m.id
                    ));
                }
                self.take(&m.room, m.id, m.text);
            }
            ServerFrame::Joined {
                room,
                last_id,
                recovered,
                epoch,
                ..
            } => self.on_joined(room, last_id, recovered, epoch),
            ServerFrame::Ack {
                room,
                id,
                reference,
            } => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                let Some(sent_gen) = self.in_flight.remove(&reference) else {
                    self.stats.anomaly(format!(
                        "client {}: ack for {reference:?} not in flight",
                        self.n
                    ));
                    return;
                };
                self.acked.push(Acked {
                    room,
                    id,
                    text: reference,
                    sent_gen,
                    acked_gen: Stats::get(&self.stats.generation),
                });
            }
            ServerFrame::Error {
                code,
                reference,
                message,
            } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                // The bus being unreachable (a restart, a slot between two primaries) and a
                // send after a join the bus refused are expected; anything else is not.
                if !matches!(code, ErrorCode::Unavailable | ErrorCode::NotJoined) {
                    self.stats.anomaly(format!(
                        "client {}: error {code:?} {message:?} for {reference:?}",
                        self.n
                    ));
                }
                match reference.as_deref() {
                    // The automatic join of the connect query was refused.
                    None => self.give_up = true,
                    Some(r) => {
                        if let Some(room) = r.strip_prefix("leave:") {
                            // Frames are handled in order: a refused leave means the room's
                            // join was refused too.
                            let v = self.views.entry(room.to_owned()).or_default();
                            v.leaving = false;
                            v.joined = false;
                        } else if let Some(room) = r.strip_prefix("join:") {
                            let v = self.views.entry(room.to_owned()).or_default();
                            v.joined = false;
                            v.joining = false;
                            v.pending.clear();
                        } else {
                            self.in_flight.remove(r);
                        }
                    }
                }
            }
            ServerFrame::Left { room } => {
                let v = self.views.entry(room).or_default();
                v.leaving = false;
            }
            _ => {}
        }
    }

    fn on_joined(&mut self, room: String, last_id: u64, recovered: bool, epoch: Option<String>) {
        let n = self.n;
        let stats = self.stats.clone();
        let v = self.views.entry(room.clone()).or_default();
        if !v.joining {
            stats.anomaly(format!("client {n} room {room}: joined without a join"));
        }
        v.joining = false;
        let pending = std::mem::take(&mut v.pending);
        if epoch.is_none() {
            stats.anomaly(format!("client {n} room {room}: joined without an epoch"));
        }
        if recovered {
            if v.epoch.is_some() && v.epoch != epoch {
                stats.anomaly(format!(
                    "client {n} room {room}: recovered:true from epoch {:?} into {epoch:?}",
                    v.epoch
                ));
            }
        } else {
            if self.topology != Topology::Standalone || Stats::get(&stats.generation) == 0 {
                stats.anomaly(format!("client {n} room {room}: recovered:false"));
            } else if v.epoch == epoch {
                stats.anomaly(format!(
                    "client {n} room {room}: recovered:false within epoch {epoch:?} (since {})",
                    v.last
                ));
            } else {
                stats.resets.fetch_add(1, Ordering::Relaxed);
            }
            // The view starts again: the replay is the new epoch's history from id 1.
            v.past.push(Segment {
                epoch: v.epoch.take(),
                got: std::mem::take(&mut v.got),
            });
            v.last = 0;
        }
        v.epoch = epoch;
        for (id, text) in pending {
            self.take(&room, id, text);
        }
        let v = &self.views[&room];
        if v.last != last_id {
            stats.anomaly(format!(
                "client {n} room {room}: joined says last_id {last_id}, saw up to {}",
                v.last
            ));
        }
    }

    /// One random action.
    async fn act(&mut self, c: &mut WsClient) -> anyhow::Result<()> {
        let room = ROOMS[fastrand::usize(..ROOMS.len())];
        let (joined, leaving) = self
            .views
            .get(room)
            .map_or((false, false), |v| (v.joined, v.leaving));
        if leaving {
            return Ok(());
        }
        match fastrand::u8(..100) {
            0..70 if joined => {
                self.seq += 1;
                let text = format!("c{}-{}", self.n, self.seq);
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.in_flight
                    .insert(text.clone(), Stats::get(&self.stats.generation));
                // The ref is the text, so an ack names what it acknowledges.
                c.say(room, &text, Some(&text)).await?;
            }
            0..85 if !joined => {
                let v = self.views.entry(room.into()).or_default();
                v.joined = true;
                v.joining = true;
                v.pending.clear();
                let f = self.join_frame(room);
                c.send_json(f).await?;
            }
            85..95 if joined && room != "general" => {
                let v = self.views.entry(room.into()).or_default();
                v.joined = false;
                v.leaving = true;
                let r = format!("leave:{room}");
                c.send_json(json!({"type": "leave", "room": room, "ref": r}))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn run(mut self, urls: Urls, until: Instant) -> (Self, Option<WsClient>) {
        let mut conn: Option<WsClient> = None;
        while Instant::now() < until {
            let Some(c) = conn.as_mut() else {
                conn = self.connect(&urls).await;
                if conn.is_none() {
                    self.disconnected();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } else {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            if self.act(c).await.is_err() {
                self.disconnected();
                conn = None;
                continue;
            }
            // Read for a moment (the pacing of this client).
            let pause = Duration::from_millis(fastrand::u64(30..150));
            let deadline = tokio::time::Instant::now() + pause;
            loop {
                match tokio::time::timeout_at(deadline, next(c)).await {
                    Err(_) => break,
                    Ok(n) => {
                        if !self.on_next(n) {
                            conn = None;
                            break;
                        }
                    }
                }
            }
            if self.give_up {
                // Redis was unreachable when the connection joined its room: start over.
                self.disconnected();
                conn = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else if fastrand::u8(..100) == 0 {
                // Now and then, just reconnect.
                self.disconnected();
                conn = None;
            }
        }
        (self, conn)
    }

    fn behind(&self, end: &End) -> bool {
        ROOMS.iter().any(|r| {
            self.views.get(*r).is_some_and(|v| {
                let (top, epoch) = &end.tops[*r];
                v.joined
                    && (v.joining
                        || (v.epoch == *epoch && v.last < *top)
                        || (v.epoch != *epoch && *top > 0))
            })
        })
    }

    fn lag(&self, end: &End) -> Vec<String> {
        ROOMS
            .iter()
            .filter_map(|r| {
                let v = self.views.get(*r)?;
                let (top, epoch) = &end.tops[*r];
                Some(format!(
                    "{r}: joined {} joining {} last {} epoch {:?} / top {top} epoch {epoch:?}",
                    v.joined, v.joining, v.last, v.epoch
                ))
            })
            .collect()
    }

    /// A connection that survived the chaos must catch up live, without reconnecting: a
    /// stall (a gap the server never repaired) is an anomaly even if a reconnect would
    /// hide it.
    async fn catch_up_live(&mut self, mut c: WsClient, end: &End) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.behind(end) {
            match tokio::time::timeout_at(deadline, next(&mut c)).await {
                // Closed meanwhile (1012/1013 are legitimate): resume below.
                Ok(n) => {
                    if !self.on_next(n) {
                        return false;
                    }
                }
                Err(_) => {
                    self.stats.anomaly(format!(
                        "client {} stalled on a live connection: {:?}",
                        self.n,
                        self.lag(end)
                    ));
                    return false;
                }
            }
        }
        true
    }

    /// Reconnects and reads until every joined room has caught up with `end`.
    async fn catch_up(&mut self, urls: &Urls, end: &End) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        'outer: while tokio::time::Instant::now() < deadline {
            self.disconnected();
            let Some(mut c) = self.connect(urls).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            loop {
                if self.give_up {
                    continue 'outer;
                }
                if !self.behind(end) {
                    return Ok(());
                }
                match tokio::time::timeout_at(deadline, next(&mut c)).await {
                    Ok(n) => {
                        if !self.on_next(n) {
                            continue 'outer;
                        }
                    }
                    Err(_) => break 'outer,
                }
            }
        }
        anyhow::bail!("client {} did not catch up: {:?}", self.n, self.lag(end))
    }
}

/// The next frame, or how the connection ended. An undecodable frame is an anomaly.
async fn next(c: &mut WsClient) -> Next {
    loop {
        match c.inner().next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                Ok(frame) => return Next::Frame(frame),
                Err(e) => panic!("undecodable frame {t}: {e}"),
            },
            Some(Ok(Message::Close(frame))) => {
                return Next::Closed(frame.map(|f| u16::from(f.code)));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(b))) => panic!("binary frame from the server: {b:?}"),
            Some(Err(_)) | None => return Next::Closed(None),
        }
    }
}

async fn spawn_instance(redis: &str, n: usize) -> GatewayProcess {
    let id = format!("gw-{n}");
    GatewayProcess::spawn(
        BIN,
        &[
            ("REDIS_URL", redis),
            ("INSTANCE_ID", &id),
            ("HISTORY_SIZE", "100000"),
            ("RATE_LIMIT_PER_SEC", "0"),
            ("SHUTDOWN_DRAIN_SECS", "1"),
            ("SHUTDOWN_GRACE_SECS", "5"),
            ("PUBSUB_PROBE_SECS", "1"),
        ],
    )
    .await
    .unwrap()
}

/// `CUSTOM args...` on `client`.
async fn command<R: FromValue>(
    client: &Client,
    cmd: &'static str,
    args: Vec<&str>,
) -> FredResult<R> {
    client
        .custom(
            fred::types::CustomCommand::new_static(cmd, None, false),
            args,
        )
        .await
}

/// A room's data in one generation: epoch, last id, history (JSON of each message).
#[derive(Clone, Debug, Default)]
struct RoomData {
    epoch: Option<String>,
    top: u64,
    history: Vec<String>,
}

impl RoomData {
    fn text(&self, id: u64) -> Option<String> {
        let entry = self
            .history
            .get(usize::try_from(id).ok()?.checked_sub(1)?)?;
        let v: serde_json::Value = serde_json::from_str(entry).ok()?;
        (v["id"] == id).then(|| v["text"].as_str().unwrap_or_default().to_owned())
    }
}

/// Reads every room's data and, in the same script, flushes everything: what each epoch
/// held when it ended, exactly.
const SNAPSHOT_AND_FLUSH: &str = r"
local out = {}
for i, room in ipairs(ARGV) do
  local p = 'chat:{' .. room .. '}'
  local h = redis.call('LRANGE', p .. ':history', 0, -1)
  table.insert(h, 1, redis.call('GET', p .. ':epoch') or '')
  table.insert(h, 2, redis.call('GET', p .. ':seq') or '0')
  out[i] = h
end
redis.call('FLUSHALL')
return out
";

/// The Redis deployment of one run.
#[allow(clippy::large_enum_variant)] // one per run; size is irrelevant
enum Deployment {
    Cluster {
        cluster: RedisCluster,
        /// One plain client per node.
        nodes: Vec<Client>,
    },
    Standalone {
        server: RedisServer,
        admin: Client,
        /// What each flushed generation held, by generation.
        flushed: Vec<BTreeMap<String, RoomData>>,
    },
}

impl Deployment {
    async fn start(topology: Topology) -> Self {
        match topology {
            Topology::Cluster => {
                let cluster = RedisCluster::start(3).await.unwrap();
                let mut nodes = Vec::new();
                for node in cluster.nodes() {
                    nodes.push(node.client().await.unwrap());
                }
                Deployment::Cluster { cluster, nodes }
            }
            Topology::Standalone => {
                let server = RedisServer::start_with(&["--appendonly", "yes"])
                    .await
                    .unwrap();
                let admin = server.client().await.unwrap();
                Deployment::Standalone {
                    server,
                    admin,
                    flushed: Vec::new(),
                }
            }
        }
    }

    fn url(&self) -> String {
        match self {
            Deployment::Cluster { cluster, .. } => cluster.url(),
            Deployment::Standalone { server, .. } => server.url(),
        }
    }

    fn clients(&self) -> Vec<&Client> {
        match self {
            Deployment::Cluster { nodes, .. } => nodes.iter().collect(),
            Deployment::Standalone { admin, .. } => vec![admin],
        }
    }

    /// Kills every pub/sub connection on every node; returns how many.
    async fn kill_pubsub(&self) -> u64 {
        let mut killed = 0;
        for client in self.clients() {
            let n: i64 = command(client, "CLIENT", vec!["KILL", "TYPE", "pubsub"])
                .await
                .unwrap();
            killed += u64::try_from(n).unwrap_or(0);
        }
        killed
    }

    /// Moves a random room's slot to another primary; returns a description.
    async fn reshard(&self) -> String {
        let Deployment::Cluster { cluster, .. } = self else {
            unreachable!("resharding needs a cluster")
        };
        let room = ROOMS[fastrand::usize(..ROOMS.len())];
        let slot = ClusterRouting::hash_key(format!("chat:{{{room}}}").as_bytes());
        let from = cluster.owner_of(slot).await.unwrap();
        let to = (from + 1 + fastrand::usize(..cluster.nodes().len() - 1)) % cluster.nodes().len();
        cluster.migrate_slot(slot, to).await.unwrap();
        format!("room {room} (slot {slot}) from node {from} to node {to}")
    }

    /// FLUSHALL (keeping what each room held), then a restart of Redis.
    async fn flush_restart(&mut self, stats: &Stats) {
        let Deployment::Standalone {
            server,
            admin,
            flushed,
        } = self
        else {
            unreachable!("flush-and-restart is on a standalone Redis")
        };
        let rooms: Vec<Value> = admin
            .eval(SNAPSHOT_AND_FLUSH, Vec::<String>::new(), ROOMS.to_vec())
            .await
            .unwrap();
        stats.generation.fetch_add(1, Ordering::Relaxed);
        let mut data = BTreeMap::new();
        for (room, value) in ROOMS.iter().zip(rooms) {
            let mut fields: Vec<String> = value.convert().unwrap();
            let history = fields.split_off(2);
            let epoch = Some(fields[0].clone()).filter(|e| !e.is_empty());
            let top = fields[1].parse().unwrap();
            data.insert(
                room.to_string(),
                RoomData {
                    epoch,
                    top,
                    history,
                },
            );
        }
        flushed.push(data);
        // A clean shutdown (the append-only file keeps what came after the flush), then
        // the same port again.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            command::<Value>(admin, "SHUTDOWN", vec![]),
        )
        .await;
        // (No QUIT: on a connection Redis has closed, fred may never answer it.)
        server.restart().await.unwrap();
        *admin = server.client().await.unwrap();
    }

    /// Every room's data now.
    async fn read(&self) -> BTreeMap<String, RoomData> {
        let mut out = BTreeMap::new();
        for room in ROOMS {
            let p = format!("chat:{{{room}}}");
            let mut found = None;
            // On a cluster, the node that owns the room's slot answers; others say MOVED.
            for client in self.clients() {
                let top: FredResult<Option<u64>> = client.get(format!("{p}:seq")).await;
                let Ok(top) = top else { continue };
                let epoch: Option<String> = client.get(format!("{p}:epoch")).await.unwrap();
                let history: Vec<String> =
                    client.lrange(format!("{p}:history"), 0, -1).await.unwrap();
                found = Some(RoomData {
                    epoch,
                    top: top.unwrap_or(0),
                    history,
                });
                break;
            }
            out.insert(room.to_string(), found.expect("no node has the room"));
        }
        out
    }

    /// The data of each generation (the flushed ones, then `now`), by generation.
    fn generations(&self, now: BTreeMap<String, RoomData>) -> Vec<BTreeMap<String, RoomData>> {
        let mut all = match self {
            Deployment::Standalone { flushed, .. } => flushed.clone(),
            Deployment::Cluster { .. } => Vec::new(),
        };
        all.push(now);
        all
    }
}

/// Where the rooms stand at the end: last id and epoch of each.
struct End {
    tops: HashMap<String, (u64, Option<String>)>,
}

/// One chaos run on `topology`; returns its failures (empty when it passed).
async fn chaos_on(topology: Topology, secs: u64) -> Vec<String> {
    let started = Instant::now();
    let mut redis = Deployment::start(topology).await;
    let url = redis.url();
    let stats = Arc::new(Stats::default());
    let mut instances = Vec::new();
    let mut spawned = 0;
    for _ in 0..INSTANCES {
        spawned += 1;
        instances.push((spawned, spawn_instance(&url, spawned).await));
    }
    let urls: Urls = Arc::new(Mutex::new(
        instances.iter().map(|(_, g)| g.ws_url("")).collect(),
    ));
    let until = Instant::now() + Duration::from_secs(secs);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let client = Chatter {
                n,
                topology,
                views: HashMap::new(),
                in_flight: HashMap::new(),
                acked: Vec::new(),
                stats: stats.clone(),
                seq: 0,
                give_up: false,
            };
            tokio::spawn(client.run(urls.clone(), until))
        })
        .collect();

    // The fault injector: every kind in a random order, again and again, at random
    // intervals (shorter for short runs, so that every kind gets its turn).
    let ms = secs * 1000;
    let (lo, hi) = ((ms / 16).clamp(250, 1000), (ms / 8).clamp(500, 3000));
    let mut round: Vec<Fault> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(lo..hi))).await;
        if Instant::now() >= until {
            break;
        }
        if round.is_empty() {
            round = topology.faults().to_vec();
            fastrand::shuffle(&mut round);
        }
        let fault = round.pop().unwrap();
        let at = started.elapsed().as_secs_f32();
        // A fault that hangs fails the run instead of hanging it.
        let injected = tokio::time::timeout(FAULT_LIMIT, async {
            match fault {
                Fault::PubsubKill => {
                    let killed = redis.kill_pubsub().await;
                    eprintln!("chaos {at:.1}s: killed {killed} pub/sub connections");
                    stats.pubsub_kills.fetch_add(1, Ordering::Relaxed);
                    stats.pubsub_killed.fetch_add(killed, Ordering::Relaxed);
                }
                Fault::Reshard => {
                    let what = redis.reshard().await;
                    eprintln!("chaos {at:.1}s: moved {what}");
                    stats.reshards.fetch_add(1, Ordering::Relaxed);
                }
                Fault::FlushRestart => {
                    redis.flush_restart(&stats).await;
                    eprintln!("chaos {at:.1}s: flushed and restarted Redis");
                    stats.flush_restarts.fetch_add(1, Ordering::Relaxed);
                }
                Fault::SigKill | Fault::SigTerm => {
                    let i = fastrand::usize(..instances.len());
                    let (n, mut victim) = instances.remove(i);
                    urls.lock().unwrap().retain(|u| *u != victim.ws_url(""));
                    let signal = if fault == Fault::SigKill {
                        "KILL"
                    } else {
                        "TERM"
                    };
                    victim.signal(signal).await.unwrap();
                    let exit = victim.wait(Duration::from_secs(10)).await;
                    eprintln!("chaos {at:.1}s: SIG{signal} gw-{n}: exit {exit:?}");
                    if fault == Fault::SigKill {
                        stats.sigkills.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.sigterms.fetch_add(1, Ordering::Relaxed);
                        // A SIGTERM is a clean shutdown: drained, exit code 0.
                        if !matches!(exit, Ok(Some(0))) {
                            stats
                                .anomaly(format!("SIGTERMed gw-{n} did not exit with 0: {exit:?}"));
                        }
                    }
                    spawned += 1;
                    let fresh = spawn_instance(&url, spawned).await;
                    urls.lock().unwrap().push(fresh.ws_url(""));
                    instances.push((spawned, fresh));
                }
            }
        })
        .await;
        assert!(
            injected.is_ok(),
            "{fault:?} at {at:.1}s did not finish within {FAULT_LIMIT:?}"
        );
    }
    let mut clients: Vec<(Chatter, Option<WsClient>)> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    // Catch everyone up, then compare with Redis.
    let end = End {
        tops: redis
            .read()
            .await
            .into_iter()
            .map(|(room, d)| (room, (d.top, d.epoch)))
            .collect(),
    };
    let mut live = 0;
    for (c, conn) in &mut clients {
        if let Some(conn) = conn.take()
            && c.catch_up_live(conn, &end).await
        {
            live += 1;
            continue;
        }
        if let Err(e) = c.catch_up(&urls, &end).await {
            stats.anomaly(e.to_string());
        }
    }
    let clients: Vec<Chatter> = clients.into_iter().map(|(c, _)| c).collect();
    // Each epoch's data: the flushed generations, then what is there now (read after the
    // catch-up, so it holds everything a client can have seen).
    let generations = redis.generations(redis.read().await);
    let by_epoch: HashMap<(&str, &str), &RoomData> = generations
        .iter()
        .flat_map(|g| {
            g.iter()
                .filter_map(|(room, d)| Some(((room.as_str(), d.epoch.as_deref()?), d)))
        })
        .collect();
    // How much of the check looked at flushed epochs (it must not be vacuous there).
    let (mut checked_past, mut acks_past) = (0_u64, 0_u64);
    for c in &clients {
        for (room, v) in &c.views {
            let current = Segment {
                epoch: v.epoch.clone(),
                got: v.got.clone(),
            };
            for seg in v.past.iter().chain([&current]) {
                if seg.got.is_empty() {
                    continue;
                }
                let Some(data) = seg
                    .epoch
                    .as_deref()
                    .and_then(|e| by_epoch.get(&(room.as_str(), e)))
                else {
                    stats.anomaly(format!(
                        "client {} room {room}: epoch {:?} is unknown to Redis",
                        c.n, seg.epoch
                    ));
                    continue;
                };
                if seg.epoch != end.tops[room.as_str()].1 {
                    checked_past += seg.got.len() as u64;
                }
                for (id, text) in &seg.got {
                    if data.text(*id).as_deref() != Some(text.as_str()) {
                        stats.anomaly(format!(
                            "client {} room {room} epoch {:?} id {id}: text {text:?} differs \
                             from Redis",
                            c.n, seg.epoch
                        ));
                    }
                }
            }
        }
        for a in &c.acked {
            // Stored in the generation of the send, or a later one up to the one after
            // that of the ack.
            let last = usize::try_from(a.acked_gen + 1)
                .unwrap()
                .min(generations.len() - 1);
            let first = usize::try_from(a.sent_gen).unwrap();
            let stored = generations[first..=last]
                .iter()
                .position(|g| g[&a.room].text(a.id).as_deref() == Some(a.text.as_str()));
            if stored.is_some_and(|g| first + g + 1 < generations.len()) {
                acks_past += 1;
            }
            let stored = stored.is_some();
            if !stored {
                stats.anomaly(format!(
                    "acked {}#{} {:?} (generations {first}..={last}) is not stored as acked",
                    a.room, a.id, a.text
                ));
            }
        }
    }

    let get = Stats::get;
    let mut failures = stats.anomalies.lock().unwrap().clone();
    println!(
        "chaos summary: topology={} secs={secs} sent={} acked={} delivered={} refused={} \
         reconnects={} faults: pubsub_kill={} sigkill={} sigterm={} reshard={} \
         flush_restart={} anomalies={}",
        topology.name(),
        get(&stats.sent),
        get(&stats.acked),
        get(&stats.delivered),
        get(&stats.refused),
        get(&stats.reconnects),
        get(&stats.pubsub_kills),
        get(&stats.sigkills),
        get(&stats.sigterms),
        get(&stats.reshards),
        get(&stats.flush_restarts),
        failures.len(),
    );
    let stored: u64 = end.tops.values().map(|(top, _)| top).sum();
    println!(
        "chaos detail: topology={} wall={:.1}s instances={INSTANCES} clients={CLIENTS} \
         rooms={} stored_now={stored} live_caught_up={live}/{CLIENTS} epoch_resets={} \
         closed_1012={} closed_1013={} dropped={} pubsub_conns_killed={} \
         checked_in_flushed_epochs: messages={checked_past} acks={acks_past}",
        topology.name(),
        started.elapsed().as_secs_f32(),
        ROOMS.len(),
        get(&stats.resets),
        get(&stats.closed_restart),
        get(&stats.closed_try_again),
        get(&stats.dropped),
        get(&stats.pubsub_killed),
    );

    // The run must have done what it claims: traffic, and every kind of fault.
    // About a fifth of what 24 clients do on a busy 2-core machine.
    for (what, n, per_sec) in [
        ("sent", get(&stats.sent), 30),
        ("acked", get(&stats.acked), 20),
        ("delivered", get(&stats.delivered), 300),
    ] {
        let min = per_sec * secs;
        if n < min {
            failures.push(format!(
                "{}: only {n} {what} (at least {min})",
                topology.name()
            ));
        }
    }
    for fault in topology.faults() {
        if stats.fault_count(*fault) == 0 {
            failures.push(format!("{}: {fault:?} never injected", topology.name()));
        }
    }
    if topology == Topology::Standalone && (get(&stats.resets) == 0 || checked_past == 0) {
        failures.push(format!(
            "{}: no client went through a reset and was checked against the flushed epoch",
            topology.name()
        ));
    }
    if get(&stats.pubsub_killed) == 0 {
        failures.push(format!(
            "{}: no pub/sub connection was ever killed",
            topology.name()
        ));
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: CHAOS_SECS=120 cargo test -p chat-gateway --test chaos -- --ignored --nocapture"]
async fn chaos() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let only = std::env::var("CHAOS_TOPOLOGY").unwrap_or_default();
    let mut failures = Vec::new();
    for topology in [Topology::Cluster, Topology::Standalone] {
        if only.is_empty() || only == topology.name() {
            let limit = Duration::from_secs(secs) + RUN_OVERHEAD_LIMIT;
            match tokio::time::timeout(limit, chaos_on(topology, secs)).await {
                Ok(f) => failures.extend(f),
                Err(_) => failures.push(format!("{}: hung (over {limit:?})", topology.name())),
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
