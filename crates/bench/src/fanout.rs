//! The fan-out scenario: R rooms, each with S subscribers and P publishers, publishing at
//! a paced total rate. Every message carries its send time; subscribers record end-to-end
//! latency and check ids (rooms are fresh, so ids run 1, 2, 3, ... in each).

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use serde::Serialize;

pub use crate::ws::Target;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ws::{self, Frame};

/// One fan-out run's shape.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Plan {
    /// Gateways (connections are spread round-robin).
    pub targets: Vec<Target>,
    /// Local addresses to connect from, round-robin (more ports on loopback).
    pub sources: Vec<IpAddr>,
    /// Rooms.
    pub rooms: usize,
    /// Subscribers per room.
    pub subs: usize,
    /// Publishers per room.
    pub pubs: usize,
    /// Messages per second, all publishers together.
    pub rate: f64,
    /// How long publishers publish.
    pub duration: Duration,
    /// Text bytes per message.
    pub size: usize,
    /// Prefix making this run's room names unique.
    pub run_id: String,
    /// Put every connection of a room on the same instance (room r → instance r mod n)
    /// instead of spreading each room over all of them.
    pub room_affinity: bool,
    /// Publishers connect with `client` and send with `ref` (deduplicated sends).
    #[serde(default)]
    pub retry_safe: bool,
    /// `(k, w)`: this process is worker k of w and drives rooms r with r mod w = k.
    pub worker: Option<(usize, usize)>,
}

/// How the start of a run is coordinated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// This process alone: start once every connection has joined.
    Local,
    /// A worker: print `READY` when joined, start on a `GO` line from stdin.
    Stdio,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// Messages publishers sent.
    pub sent: u64,
    /// Sends the server refused.
    pub refused: u64,
    /// Deliveries expected to subscribers (stored messages × subscribers of the room).
    pub expected: u64,
    /// Deliveries received by subscribers (distinct ids).
    pub delivered: u64,
    /// Expected but never received.
    pub lost: u64,
    /// Received with an id at or below one already received (a duplicate, or a message
    /// out of order).
    pub duplicated: u64,
    /// Deliveries per second over the publishing window.
    pub deliveries_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub latency_ms: Latency,
    /// Connections opened.
    pub connections: usize,
    /// Subscribers whose connection closed before the end.
    pub dropped: u64,
    /// Seconds the measurement window lasted (publishing plus drain).
    pub window_secs: f64,
    /// CPU seconds of the gateway processes over the window.
    pub server_cpu_secs: f64,
    /// CPU seconds of this tool over the window.
    pub bench_cpu_secs: f64,
    /// Redis over the window, when it is ours to ask; with a cluster, the sum over its
    /// nodes (`redis_nodes` has each one).
    pub redis: Option<RedisDelta>,
    /// Each Redis node over the window (one entry for a single server, one per master of
    /// a `--cluster`), in the order the nodes were started; absent when Redis is not ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_nodes: Option<Vec<RedisDelta>>,
    /// `fanout --floor`: the raw cost of one loopback write of a message-sized frame,
    /// microseconds of the writing thread's CPU per write (see [`crate::floor`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor_usec_per_write: Option<f64>,
    /// `fanout --floor`: gateway CPU per delivery divided by `floor_usec_per_write`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_to_floor_ratio: Option<f64>,
    /// `fanout --floor`: the floor run's details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<crate::floor::FloorOutcome>,
}

/// What Redis spent over the window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisDelta {
    /// CPU seconds.
    pub cpu_secs: f64,
    /// EVALSHA calls (publishes and history reads).
    pub evalsha_calls: u64,
    /// Mean microseconds per EVALSHA, as Redis measures it.
    pub usec_per_evalsha: f64,
}

impl RedisDelta {
    /// What Redis spent between two readings.
    pub fn between(r0: crate::sys::RedisStats, r1: crate::sys::RedisStats) -> Self {
        let calls = r1.evalsha_calls.saturating_sub(r0.evalsha_calls);
        RedisDelta {
            cpu_secs: r1.cpu_secs - r0.cpu_secs,
            evalsha_calls: calls,
            usec_per_evalsha: r1.evalsha_usec.saturating_sub(r0.evalsha_usec) as f64
                / calls.max(1) as f64,
        }
    }

    /// The total over the nodes (`redis`) and each node (`redis_nodes`) between two
    /// readings of every node; `(None, None)` when there are no nodes.
    pub fn of_nodes(
        r0: &[crate::sys::RedisStats],
        r1: &[crate::sys::RedisStats],
    ) -> (Option<Self>, Option<Vec<Self>>) {
        if r0.is_empty() || r0.len() != r1.len() {
            return (None, None);
        }
        let total = Self::between(
            crate::sys::RedisStats::sum(r0),
            crate::sys::RedisStats::sum(r1),
        );
        let nodes = r0
            .iter()
            .zip(r1)
            .map(|(a, b)| Self::between(*a, *b))
            .collect();
        (Some(total), Some(nodes))
    }
}

/// Where to read CPU time from.
pub struct Meters<'a> {
    /// Gateway process ids.
    pub server_pids: &'a [u32],
    /// A client on each node of the deployment's Redis (empty: none to ask).
    pub redis: &'a [fred::prelude::Client],
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| crate::sys::cpu_secs(*p)).sum()
}

/// End-to-end latency, milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct Shared {
    joined: AtomicUsize,
    joined_wake: Notify,
    go: Notify,
    started: AtomicBool,
    stop: AtomicBool,
    /// Per room: messages stored (sent and not refused).
    stored: Vec<AtomicU64>,
    sent: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    dropped: AtomicU64,
    /// Tells subscribers to flush their histograms and end.
    finish: CancellationToken,
    histogram: Mutex<Histogram<u64>>,
}

/// Runs one fan-out; `progress` is called every second with (sent, delivered).
pub async fn run(
    plan: &Plan,
    meters: &Meters<'_>,
    barrier: Barrier,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<(Outcome, Histogram<u64>)> {
    let shared = Arc::new(Shared {
        joined: AtomicUsize::new(0),
        joined_wake: Notify::new(),
        go: Notify::new(),
        started: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        stored: (0..plan.rooms).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        finish: CancellationToken::new(),
        histogram: Mutex::new(Histogram::new_with_bounds(1_000, 120_000_000_000, 3)?),
    });
    let per_pub_rate = plan.rate / (plan.rooms * plan.pubs).max(1) as f64;
    let mut subs = Vec::new();
    let mut pubs = Vec::new();
    let mut n = 0usize;
    // Connect everything, a room at a time, spreading connections over targets.
    for room in 0..plan.rooms {
        if let Some((k, w)) = plan.worker
            && room % w != k
        {
            continue;
        }
        let name = format!("{}-{room}", plan.run_id);
        let pick = |n: usize| {
            let i = if plan.room_affinity { room } else { n };
            &plan.targets[i % plan.targets.len()]
        };
        for _ in 0..plan.subs {
            let target = pick(n).with_path(&format!("/ws?room={name}"));
            let source = (!plan.sources.is_empty()).then(|| plan.sources[n % plan.sources.len()]);
            n += 1;
            let (reader, writer) = ws::connect(&target, source).await?;
            subs.push(tokio::spawn(subscriber(reader, writer, shared.clone())));
        }
        for p in 0..plan.pubs {
            let client = match plan.retry_safe {
                true => format!("&client={name}-p{p}"),
                false => String::new(),
            };
            let target = pick(n).with_path(&format!("/ws?room={name}&username=pub{p}{client}"));
            let source = (!plan.sources.is_empty()).then(|| plan.sources[n % plan.sources.len()]);
            n += 1;
            let (reader, writer) = ws::connect(&target, source).await?;
            pubs.push(tokio::spawn(publisher(
                reader,
                writer,
                shared.clone(),
                room,
                name.clone(),
                per_pub_rate,
                plan.size,
                plan.retry_safe,
            )));
        }
    }
    // Wait for every connection's `joined` before the clock starts.
    let total = n;
    let wait_joined = async {
        while shared.joined.load(Ordering::SeqCst) < total {
            let notified = shared.joined_wake.notified();
            tokio::pin!(notified);
            // Registered before the check, so a wake-up in between is not lost.
            notified.as_mut().enable();
            if shared.joined.load(Ordering::SeqCst) >= total {
                break;
            }
            notified.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), wait_joined)
        .await
        .map_err(|_| anyhow::anyhow!("not every connection joined"))?;
    if barrier == Barrier::Stdio {
        use tokio::io::AsyncBufReadExt;
        println!("READY");
        let mut line = String::new();
        tokio::io::BufReader::new(tokio::io::stdin())
            .read_line(&mut line)
            .await?;
        anyhow::ensure!(line.trim() == "GO", "expected GO on stdin, got {line:?}");
    }

    let me = std::process::id();
    let server_cpu0 = cpu_of(meters.server_pids);
    let bench_cpu0 = cpu_of(&[me]);
    let redis0 = crate::sys::redis_stats_all(meters.redis).await?;
    shared.started.store(true, Ordering::SeqCst);
    shared.go.notify_waiters();
    let start = Instant::now();
    while start.elapsed() < plan.duration {
        tokio::time::sleep(
            Duration::from_secs(1).min(plan.duration.saturating_sub(start.elapsed())),
        )
        .await;
        progress(
            shared.sent.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
        );
    }
    shared.stop.store(true, Ordering::SeqCst);
    let window = start.elapsed();
    // Drain: until every subscriber has every stored message, or 10 s. The publishers
    // keep their connections (and count late refusals) until then.
    let expected = || -> u64 {
        shared
            .stored
            .iter()
            .map(|s| s.load(Ordering::SeqCst) * plan.subs as u64)
            .sum()
    };
    let drain_until = Instant::now() + Duration::from_secs(10);
    while shared.delivered.load(Ordering::SeqCst) < expected() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected = expected();
    let measured = start.elapsed();
    let server_cpu = cpu_of(meters.server_pids) - server_cpu0;
    let bench_cpu = cpu_of(&[me]) - bench_cpu0;
    let redis1 = crate::sys::redis_stats_all(meters.redis).await?;
    let (redis, redis_nodes) = RedisDelta::of_nodes(&redis0, &redis1);
    shared.finish.cancel();
    for t in subs.into_iter().chain(pubs) {
        let _ = t.await;
    }
    let mut outcome = Outcome {
        sent: shared.sent.load(Ordering::SeqCst),
        refused: shared.refused.load(Ordering::SeqCst),
        expected,
        connections: total,
        delivered: shared.delivered.load(Ordering::SeqCst),
        duplicated: shared.duplicated.load(Ordering::SeqCst),
        dropped: shared.dropped.load(Ordering::SeqCst),
        window_secs: measured.as_secs_f64(),
        server_cpu_secs: server_cpu,
        bench_cpu_secs: bench_cpu,
        redis,
        redis_nodes,
        ..Outcome::default()
    };
    outcome.lost = expected.saturating_sub(outcome.delivered);
    outcome.deliveries_per_sec = outcome.delivered as f64 / window.as_secs_f64();
    let h = shared
        .histogram
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    outcome.latency_ms = Latency::of(&h);
    Ok((outcome, h))
}

impl Latency {
    /// Percentiles of a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |v: u64| v as f64 / 1e6;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// What a worker process reports to the parent.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct WorkerResult {
    /// Its counts.
    pub outcome: OutcomeCounts,
    /// Its latency histogram as (value, count) pairs.
    pub histogram: Vec<(u64, u64)>,
}

/// The additive part of an [`Outcome`].
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct OutcomeCounts {
    /// Messages sent.
    pub sent: u64,
    /// Sends refused.
    pub refused: u64,
    /// Deliveries expected.
    pub expected: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// Duplicates or out-of-order deliveries.
    pub duplicated: u64,
    /// Subscribers dropped.
    pub dropped: u64,
    /// Connections opened.
    pub connections: usize,
}

impl WorkerResult {
    /// Packs a worker's outcome for the parent.
    pub fn new(o: &Outcome, h: &Histogram<u64>) -> Self {
        WorkerResult {
            outcome: OutcomeCounts {
                sent: o.sent,
                refused: o.refused,
                expected: o.expected,
                delivered: o.delivered,
                duplicated: o.duplicated,
                dropped: o.dropped,
                connections: o.connections,
            },
            histogram: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }
}

/// Latencies a subscriber keeps before recording them into the shared histogram.
const LATENCY_BATCH: usize = 256;

/// Records `pending` latencies (ns) into the shared histogram and empties it.
fn record(shared: &Shared, pending: &mut Vec<u64>) {
    if let Ok(mut g) = shared.histogram.lock() {
        for &v in pending.iter() {
            // Saturates at the histogram's top (two minutes) instead of failing.
            g.saturating_record(v);
        }
    }
    pending.clear();
}

async fn subscriber(mut reader: ws::Reader, mut writer: ws::Writer, shared: Arc<Shared>) {
    let mut next_id = 1u64;
    // Latencies are kept here and recorded into the shared histogram now and then, under
    // one lock: a histogram per subscriber was 155 KB of counters each, and merging one
    // (every 256 messages) walked all of them.
    let mut pending: Vec<u64> = Vec::with_capacity(LATENCY_BATCH);
    // Registered once: a fresh `cancelled()` per frame would lock the token's (shared)
    // waiter list twice per delivery.
    let finish = shared.finish.clone().cancelled_owned();
    tokio::pin!(finish);
    loop {
        let frame = tokio::select! {
            biased;
            () = &mut finish => break,
            f = reader.next() => f,
        };
        let Ok(frame) = frame else {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            break;
        };
        match frame {
            Frame::Text(t) if t.starts_with(br#"{"type":"message""#) => {
                let now = now_ns();
                let Some(id) = ws::find_u64(t, br#""id":"#) else {
                    continue;
                };
                if id >= next_id {
                    // id > next_id is a gap: the missing ids count as lost.
                    next_id = id + 1;
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                } else {
                    shared.duplicated.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(sent) = ws::find_u64(t, br#""text":"~"#) {
                    pending.push(now.saturating_sub(sent).max(1_000));
                    if pending.len() >= LATENCY_BATCH {
                        record(&shared, &mut pending);
                    }
                }
            }
            Frame::Text(t) if t.starts_with(br#"{"type":"joined""#) => {
                shared.joined.fetch_add(1, Ordering::SeqCst);
                shared.joined_wake.notify_waiters();
            }
            Frame::Text(_) => {}
            Frame::Ping(p) => {
                let _ = writer.pong(&p).await;
            }
            Frame::Close(_) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    record(&shared, &mut pending);
    let _ = writer.close().await;
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut reader: ws::Reader,
    mut writer: ws::Writer,
    shared: Arc<Shared>,
    room: usize,
    room_name: String,
    rate: f64,
    size: usize,
    retry_safe: bool,
) {
    // Wait for our own `joined`, then for the start.
    loop {
        match reader.next().await {
            Ok(Frame::Text(t)) if t.starts_with(br#"{"type":"joined""#) => break,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    let go = shared.go.notified();
    tokio::pin!(go);
    go.as_mut().enable();
    shared.joined.fetch_add(1, Ordering::SeqCst);
    shared.joined_wake.notify_waiters();
    if !shared.started.load(Ordering::SeqCst) {
        go.await;
    }
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Spread publishers' first sends over one period.
    let offset = period.mul_f64(fastrand::f64());
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let head = format!(r#"{{"type":"send","room":"{room_name}","text":"~"#);
    let mut frame = Vec::with_capacity(size + 64);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                frame.clear();
                frame.extend_from_slice(head.as_bytes());
                let stamp = now_ns().to_string();
                frame.extend_from_slice(stamp.as_bytes());
                frame.push(b'|');
                let pad = size.saturating_sub(stamp.len() + 2);
                frame.extend(std::iter::repeat_n(b'x', pad));
                frame.extend_from_slice(b"\"");
                if retry_safe {
                    seq += 1;
                    frame.extend_from_slice(format!(r#","ref":"r{seq}""#).as_bytes());
                }
                frame.push(b'}');
                if writer.text(&frame).await.is_err() {
                    break;
                }
                shared.sent.fetch_add(1, Ordering::Relaxed);
                shared.stored[room].fetch_add(1, Ordering::Relaxed);
            }
            next = reader.next() => match next {
                Ok(Frame::Text(t)) if t.starts_with(br#"{"type":"error""#) => {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    shared.stored[room].fetch_sub(1, Ordering::Relaxed);
                }
                Ok(Frame::Ping(p)) => {
                    let _ = writer.pong(&p).await;
                }
                Ok(Frame::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    // Keep reading until the drain is over: late refusals are counted, our echo does not
    // back up, and the sends still queued in the gateway (under overload, behind this
    // connection's publish in flight) are all handled. Closing earlier with unread echoes
    // makes the kernel reset the connection, which discards the frames the gateway has
    // not read yet: they were never stored, but they counted as sent (and so as lost).
    let finish = shared.finish.clone().cancelled_owned();
    tokio::pin!(finish);
    loop {
        let next = tokio::select! {
            biased;
            () = &mut finish => break,
            next = reader.next() => next,
        };
        match next {
            Ok(Frame::Text(t)) if t.starts_with(br#"{"type":"error""#) => {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                shared.stored[room].fetch_sub(1, Ordering::Relaxed);
            }
            Ok(Frame::Ping(p)) => {
                let _ = writer.pong(&p).await;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = writer.close().await;
}
