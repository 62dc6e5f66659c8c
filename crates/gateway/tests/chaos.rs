//! The chaos test: several gateway processes on one Redis, many clients joining, leaving,
//! reconnecting and sending, while subscriber connections are killed and instances are
//! SIGKILLed or SIGTERMed and restarted. At the end every client's view of every room is
//! checked against Redis: ids consecutive from 1 (no gap, no duplicate), the same text as
//! stored for each id, and every acknowledged message stored.
//!
//! Not part of the normal run (it takes minutes):
//!
//! ```sh
//! CHAOS_SECS=120 cargo test -p chat-gateway --test chaos -- --ignored --nocapture
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chat_protocol::ServerFrame;
use chat_testkit::{GatewayProcess, RedisServer, WsClient};
use fred::prelude::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_chat-gateway");
const INSTANCES: usize = 3;
const CLIENTS: usize = 24;
const ROOMS: [&str; 5] = ["general", "r1", "r2", "r3", "r4"];

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    refused: AtomicU64,
    reconnects: AtomicU64,
    pubsub_kills: AtomicU64,
    sigkills: AtomicU64,
    sigterms: AtomicU64,
    anomalies: Mutex<Vec<String>>,
}

impl Stats {
    fn anomaly(&self, what: String) {
        eprintln!("ANOMALY: {what}");
        self.anomalies.lock().unwrap().push(what);
    }
}

/// The live instances' WebSocket base URLs.
type Urls = Arc<Mutex<Vec<String>>>;

#[derive(Default)]
struct View {
    /// Last id seen in this room (ids must arrive as 1, 2, 3, ...).
    last: u64,
    epoch: Option<String>,
    joined: bool,
    /// A `leave` was sent and its `left` has not come back: rejoining now would replay
    /// messages that are still on their way.
    leaving: bool,
    /// id → text, everything received.
    got: HashMap<u64, String>,
}

struct Client {
    n: usize,
    views: HashMap<String, View>,
    acked: Vec<(String, u64, String)>,
    stats: Arc<Stats>,
    seq: u64,
}

impl Client {
    fn query(&self, room: &str) -> String {
        let v = self.views.get(room);
        let mut q = format!("/ws?room={room}&username=c{}", self.n);
        if let Some(v) = v.filter(|v| v.last > 0) {
            q.push_str(&format!("&since={}", v.last));
            if let Some(e) = &v.epoch {
                q.push_str(&format!("&epoch={e}"));
            }
        }
        q
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
        self.views.entry("general".into()).or_default().joined = true;
        for v in self.views.values_mut() {
            v.leaving = false;
        }
        for room in ROOMS.iter().skip(1) {
            if self.views.get(*room).is_some_and(|v| v.joined) {
                let v = &self.views[*room];
                let mut f = json!({"type": "join", "room": room, "since": v.last});
                if let Some(e) = &v.epoch {
                    f["epoch"] = e.clone().into();
                }
                c.send_json(f).await.ok()?;
            }
        }
        Some(c)
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Message(m) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                let v = self.views.entry(m.room.clone()).or_default();
                if m.id != v.last + 1 {
                    self.stats.anomaly(format!(
                        "client {} room {}: got id {} after {}",
                        self.n, m.room, m.id, v.last
                    ));
                }
                v.last = v.last.max(m.id);
                v.got.insert(m.id, m.text);
            }
            ServerFrame::Joined {
                room,
                recovered,
                epoch,
                ..
            } => {
                if !recovered {
                    self.stats
                        .anomaly(format!("client {} room {room}: recovered:false", self.n));
                }
                self.views.entry(room).or_default().epoch = epoch;
            }
            ServerFrame::Ack {
                room,
                id,
                reference,
            } => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                self.acked.push((room, id, reference));
            }
            ServerFrame::Error { reference, .. } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                // A leave refused (the join was still replaying): still in the room.
                if let Some(room) = reference.as_deref().and_then(|r| r.strip_prefix("leave:")) {
                    let v = self.views.entry(room.to_owned()).or_default();
                    v.leaving = false;
                    v.joined = true;
                }
            }
            ServerFrame::Left { room } => {
                self.views.entry(room).or_default().leaving = false;
            }
            _ => {}
        }
    }

    /// One random action.
    async fn act(&mut self, c: &mut WsClient) -> anyhow::Result<()> {
        let room = ROOMS[fastrand::usize(..ROOMS.len())];
        let joined = self.views.get(room).is_some_and(|v| v.joined);
        if self.views.get(room).is_some_and(|v| v.leaving) {
            return Ok(());
        }
        match fastrand::u8(..100) {
            0..70 if joined => {
                self.seq += 1;
                let text = format!("c{}-{}", self.n, self.seq);
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                // The ref is the text, so an ack names what it acknowledges.
                c.say(room, &text, Some(&text)).await?;
            }
            0..85 if !joined => {
                let v = self.views.entry(room.into()).or_default();
                v.joined = true;
                let mut f = json!({"type": "join", "room": room, "since": v.last});
                if let Some(e) = &v.epoch {
                    f["epoch"] = e.clone().into();
                }
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } else {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            if self.act(c).await.is_err() {
                conn = None;
                continue;
            }
            // Read for a moment (the pacing of this client).
            let pause = Duration::from_millis(fastrand::u64(30..150));
            let deadline = tokio::time::Instant::now() + pause;
            loop {
                match tokio::time::timeout_at(deadline, c.recv()).await {
                    Err(_) => break,
                    Ok(Ok(frame)) => self.on_frame(frame),
                    Ok(Err(_)) => {
                        conn = None;
                        break;
                    }
                }
            }
            // Now and then, just reconnect.
            if fastrand::u8(..100) == 0 {
                conn = None;
            }
        }
        (self, conn)
    }

    fn behind(&self, tops: &HashMap<String, u64>) -> bool {
        ROOMS.iter().any(|r| {
            self.views
                .get(*r)
                .is_some_and(|v| v.joined && v.last < tops[*r])
        })
    }

    /// A connection that survived the chaos must catch up live, without reconnecting: a
    /// stall (a gap the server never repaired) is an anomaly even if a reconnect would
    /// hide it.
    async fn catch_up_live(&mut self, mut c: WsClient, tops: &HashMap<String, u64>) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.behind(tops) {
            match tokio::time::timeout_at(deadline, c.recv()).await {
                Ok(Ok(frame)) => self.on_frame(frame),
                // Closed meanwhile (1012/1013 are legitimate): resume below.
                Ok(Err(_)) => return false,
                Err(_) => {
                    let lag: Vec<_> = ROOMS
                        .iter()
                        .filter_map(|r| self.views.get(*r).map(|v| (r, v.last, tops[*r])))
                        .filter(|(_, last, top)| last < top)
                        .collect();
                    self.stats.anomaly(format!(
                        "client {} stalled on a live connection: {lag:?}",
                        self.n
                    ));
                    return false;
                }
            }
        }
        true
    }

    /// Reconnects and reads until every joined room has caught up with `tops`.
    async fn catch_up(&mut self, urls: &Urls, tops: &HashMap<String, u64>) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        'outer: while Instant::now() < deadline {
            let Some(mut c) = self.connect(urls).await else {
                continue;
            };
            loop {
                if !self.behind(tops) {
                    return Ok(());
                }
                match c.recv().await {
                    Ok(frame) => self.on_frame(frame),
                    Err(_) => continue 'outer,
                }
            }
        }
        anyhow::bail!("client {} did not catch up", self.n)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: CHAOS_SECS=120 cargo test -p chat-gateway --test chaos -- --ignored --nocapture"]
async fn chaos() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let redis = RedisServer::start_with(&["--appendonly", "yes"])
        .await
        .unwrap();
    let url = redis.url();
    let admin = redis.client().await.unwrap();
    let stats = Arc::new(Stats::default());
    let mut instances = Vec::new();
    let mut spawned = 0;
    for _ in 0..INSTANCES {
        spawned += 1;
        instances.push(spawn_instance(&url, spawned).await);
    }
    let urls: Urls = Arc::new(Mutex::new(instances.iter().map(|g| g.ws_url("")).collect()));
    let until = Instant::now() + Duration::from_secs(secs);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let client = Client {
                n,
                views: HashMap::new(),
                acked: Vec::new(),
                stats: stats.clone(),
                seq: 0,
            };
            tokio::spawn(client.run(urls.clone(), until))
        })
        .collect();

    // The fault injector.
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(1500..4000))).await;
        match fastrand::u8(..3) {
            0 => {
                let killed: i64 = admin
                    .custom(
                        fred::types::CustomCommand::new_static("CLIENT", None, false),
                        vec!["KILL", "TYPE", "pubsub"],
                    )
                    .await
                    .unwrap();
                stats
                    .pubsub_kills
                    .fetch_add(u64::try_from(killed).unwrap_or(0), Ordering::Relaxed);
            }
            kind => {
                let i = fastrand::usize(..instances.len());
                let mut victim = instances.remove(i);
                urls.lock().unwrap().retain(|u| *u != victim.ws_url(""));
                if kind == 1 {
                    victim.signal("KILL").await.unwrap();
                    stats.sigkills.fetch_add(1, Ordering::Relaxed);
                } else {
                    victim.signal("TERM").await.unwrap();
                    stats.sigterms.fetch_add(1, Ordering::Relaxed);
                }
                let _ = victim.wait(Duration::from_secs(10)).await;
                spawned += 1;
                let fresh = spawn_instance(&url, spawned).await;
                urls.lock().unwrap().push(fresh.ws_url(""));
                instances.push(fresh);
            }
        }
    }
    let mut clients: Vec<(Client, Option<WsClient>)> = futures_util::future::join_all(clients)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    // Catch everyone up, then compare with Redis.
    let mut tops = HashMap::new();
    let mut history: HashMap<String, Vec<String>> = HashMap::new();
    for room in ROOMS {
        let top: Option<u64> = admin.get(format!("chat:{{{room}}}:seq")).await.unwrap();
        tops.insert(room.to_string(), top.unwrap_or(0));
        let stored: Vec<String> = admin
            .lrange(format!("chat:{{{room}}}:history"), 0, -1)
            .await
            .unwrap();
        history.insert(room.to_string(), stored);
    }
    let mut live = 0;
    for (c, conn) in &mut clients {
        if let Some(conn) = conn.take()
            && c.catch_up_live(conn, &tops).await
        {
            live += 1;
            continue;
        }
        if let Err(e) = c.catch_up(&urls, &tops).await {
            stats.anomaly(e.to_string());
        }
    }
    println!("chaos: {live} of {CLIENTS} clients caught up on the connection they had");
    let clients: Vec<Client> = clients.into_iter().map(|(c, _)| c).collect();
    let stored_text = |room: &str, id: u64| -> Option<String> {
        let entry = history[room].get(usize::try_from(id).ok()?.checked_sub(1)?)?;
        let v: serde_json::Value = serde_json::from_str(entry).ok()?;
        (v["id"] == id).then(|| v["text"].as_str().unwrap_or_default().to_owned())
    };
    for c in &clients {
        for (room, v) in &c.views {
            for (id, text) in &v.got {
                if stored_text(room, *id).as_deref() != Some(text.as_str()) {
                    stats.anomaly(format!(
                        "client {} room {room} id {id}: text differs from Redis",
                        c.n
                    ));
                }
            }
        }
        for (room, id, text) in &c.acked {
            if stored_text(room, *id).as_deref() != Some(text.as_str()) {
                stats.anomaly(format!("acked {room}#{id} {text:?} is not stored as acked"));
            }
        }
    }
    let total: u64 = tops.values().sum();
    let anomalies = stats.anomalies.lock().unwrap().clone();
    println!(
        "chaos: {secs}s, {INSTANCES} instances, {CLIENTS} clients, {} rooms\n\
         messages: sent {} acked {} stored {total} delivered {}; refused frames {}; reconnects {}\n\
         faults: pub/sub connections killed {}, SIGKILL {}, SIGTERM {}\n\
         anomalies: {}",
        ROOMS.len(),
        stats.sent.load(Ordering::Relaxed),
        stats.acked.load(Ordering::Relaxed),
        stats.delivered.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.reconnects.load(Ordering::Relaxed),
        stats.pubsub_kills.load(Ordering::Relaxed),
        stats.sigkills.load(Ordering::Relaxed),
        stats.sigterms.load(Ordering::Relaxed),
        anomalies.len(),
    );
    assert!(anomalies.is_empty(), "{anomalies:#?}");
}
