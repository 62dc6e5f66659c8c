//! `chat-bench`: the load tool for chat-gateway.
//!
//! ```text
//! chat-bench fanout --spawn 2 --rooms 1 --subs 1000 --pubs 10 --rate 200 --duration 20
//! chat-bench ramp   --spawn 2 --subs 1000 --pubs 10 --start-rate 50 --p99-ms 25
//! chat-bench idle   --spawn 1 --connections 15000
//! chat-bench churn  --spawn 1 --rate 200 --duration 30
//! chat-bench fanout --url ws://127.0.0.1:4444 --url ws://127.0.0.1:4445 --pid 123 --pid 456
//! chat-bench fanout --spawn 2 --cluster 3 --rooms 100 --subs 5 --pubs 1 --rate 1000
//! chat-bench fanout --spawn 1 --rooms 1 --subs 100 --pubs 10 --rate 500 --floor
//! ```
//! Every report prints the tool's own CPU time next to the servers', so a saturated load
//! generator is visible.

// A binary: `pub` marks what a module offers the rest of the tool.
#![allow(clippy::cast_precision_loss, unreachable_pub)]

mod fanout;
mod floor;
mod idle;
mod sys;
mod workers;
mod ws;

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(name = "chat-bench", version, about = "Load tool for chat-gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// R rooms × S subscribers × P publishers at a paced total rate: latency, loss, CPU.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        shape: Shape,
        /// Messages per second, all publishers together.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Drive the connections from this many processes (rooms are split between them).
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// After the run, measure the floor: the raw CPU cost of one loopback write of a
        /// message-sized frame. Opens rooms × subs loopback connections (at most 5000) to
        /// this process, read by the subscribers' own client on one thread (one epoll), and
        /// from another plain thread writes, with one blocking write per socket, the exact
        /// bytes of a server text frame as large as the run's messages, message k to the
        /// sockets of room k mod rooms, at the run's rate for min(duration, 10 s).
        /// Reports that thread's CPU (from /proc/thread-self/stat) per write
        /// (floor_usec_per_write; on loopback it includes the receiver's TCP work, not the
        /// reader's own read) and gateway CPU per delivery ÷ floor (gateway_to_floor_ratio).
        #[arg(long, verbatim_doc_comment)]
        floor: bool,
    },
    /// (internal) One worker process of `fanout --workers`.
    #[command(hide = true)]
    FanoutWorker {
        /// The plan, as JSON.
        #[arg(long)]
        plan: String,
    },
    /// Fan-out at increasing rates: the highest rate with zero loss and p99 under a bound.
    Ramp {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        shape: Shape,
        /// First rate (messages per second, all publishers).
        #[arg(long, default_value_t = 100.0)]
        start_rate: f64,
        /// Each step multiplies the rate by this.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// Stop at this rate.
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        /// The p99 bound, milliseconds.
        #[arg(long, default_value_t = 25.0)]
        p99_ms: f64,
    },
    /// Opens C idle connections and reports the servers' RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Rooms they are spread over.
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Seconds to wait before reading RSS.
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
    /// Connect → join → leave → disconnect at a rate: errors and RSS before/after.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Cycles per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Seconds.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Seconds to wait before reading RSS at the end.
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// A gateway to load (repeat for several instances; connections go round-robin).
    #[arg(long = "url")]
    urls: Vec<String>,
    /// Start a private redis-server and this many gateways instead of using --url.
    #[arg(long)]
    spawn: Option<usize>,
    /// With --spawn 1: no Redis, the gateway's in-process bus.
    #[arg(long)]
    embedded: bool,
    /// With --spawn: a private Redis Cluster of M masters (no replicas; M ≥ 3, needs
    /// redis-cli) instead of one redis-server. Redis CPU is reported per node
    /// (`redis_nodes`) and summed (`redis`).
    #[arg(
        long,
        value_name = "M",
        requires = "spawn",
        conflicts_with = "embedded",
        value_parser = clap::value_parser!(u64).range(3..)
    )]
    cluster: Option<u64>,
    /// The gateway binary for --spawn (default: next to this tool).
    #[arg(long)]
    gateway_bin: Option<String>,
    /// Extra environment for spawned gateways, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    envs: Vec<String>,
    /// Server process ids to measure CPU and RSS of when not spawning (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Local addresses to connect from, round-robin (e.g. 127.0.0.2; repeatable).
    #[arg(long = "source-ip")]
    sources: Vec<IpAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Authenticate: spawned gateways get AUTH_JWT_SECRET=SECRET, and every connection
    /// presents an HS256 token signed with it (at least 32 bytes).
    #[arg(long)]
    auth_secret: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct Shape {
    /// Rooms.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Subscribers per room.
    #[arg(long, default_value_t = 100)]
    subs: usize,
    /// Publishers per room.
    #[arg(long, default_value_t = 10)]
    pubs: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Keep each room on one instance (room r → instance r mod n).
    #[arg(long)]
    room_affinity: bool,
    /// Sends that can be retried: publishers connect with a `client` id and every send
    /// carries a `ref`, so the gateway records each one for deduplication.
    #[arg(long)]
    retry_safe: bool,
}

/// The servers being measured.
struct Setup {
    targets: Vec<ws::Target>,
    pids: Vec<u32>,
    deployment: Option<sys::Deployment>,
    description: String,
}

async fn setup(common: &Common) -> anyhow::Result<Setup> {
    let mut setup = setup_servers(common).await?;
    if let Some(secret) = &common.auth_secret {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let claims = chat_gateway::auth::NewToken {
            sub: "bench",
            name: None,
            rooms: None,
            iat: now,
            exp: now + 24 * 3600,
        };
        let token = chat_gateway::auth::sign_hs256(secret, &claims)?;
        for target in &mut setup.targets {
            target.token = Some(token.clone());
        }
        setup.description.push_str("; authenticated (HS256 tokens)");
    }
    Ok(setup)
}

async fn setup_servers(common: &Common) -> anyhow::Result<Setup> {
    let fd_limit = sys::raise_fd_limit();
    if let Some(n) = common.spawn {
        let bin = match &common.gateway_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .with_file_name("chat-gateway")
                .to_string_lossy()
                .into_owned(),
        };
        let mut env = common
            .envs
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--env {kv}: expected KEY=VALUE"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(secret) = &common.auth_secret {
            env.push(("AUTH_JWT_SECRET".to_owned(), secret.clone()));
        }
        if common.embedded && n != 1 {
            bail!("--embedded runs exactly one gateway");
        }
        let backend = match (common.embedded, common.cluster) {
            (true, Some(_)) => bail!("--embedded and --cluster exclude each other"),
            (true, None) => sys::Backend::Embedded,
            (false, None) => sys::Backend::Redis,
            (false, Some(m)) => sys::Backend::Cluster(usize::try_from(m)?),
        };
        let d = sys::Deployment::spawn(n, &bin, backend, &env).await?;
        let targets = d
            .urls()
            .iter()
            .map(|u| ws::Target::parse(u))
            .collect::<Result<_, _>>()?;
        let on = match backend {
            sys::Backend::Embedded => "the in-process bus".to_owned(),
            sys::Backend::Redis => "a private redis-server".to_owned(),
            sys::Backend::Cluster(m) => format!("a private Redis Cluster of {m} masters"),
        };
        let description = format!("{n} spawned gateway(s) on {on}; open-file limit {fd_limit}");
        Ok(Setup {
            targets,
            pids: d.pids(),
            deployment: Some(d),
            description,
        })
    } else {
        if common.urls.is_empty() {
            bail!("give --url (one per instance) or --spawn N");
        }
        let targets = common
            .urls
            .iter()
            .map(|u| ws::Target::parse(u))
            .collect::<Result<_, _>>()?;
        Ok(Setup {
            targets,
            pids: common.pids.clone(),
            deployment: None,
            description: format!("{} gateway(s) by URL", common.urls.len()),
        })
    }
}

/// A progress bar, or a hidden one when the output is JSON.
fn progress(json: bool, total: u64, what: &str) -> ProgressBar {
    if json {
        ProgressBar::hidden()
    } else {
        bar(total, what)
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
    {
        pb.set_style(style);
    }
    pb.set_message(what.to_owned());
    pb
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", table());
    }
    Ok(())
}

fn fanout_table(shape: &Shape, rate: f64, setup: &Setup, o: &fanout::Outcome) -> String {
    let per = |secs: f64| {
        if o.delivered == 0 {
            "-".to_owned()
        } else {
            format!("{:.2} µs per delivery", secs * 1e6 / o.delivered as f64)
        }
    };
    let redis_line = |r: &fanout::RedisDelta| {
        format!(
            "{:.2} s CPU; {} EVALSHA at {:.1} µs each; {:.2} µs CPU per published message",
            r.cpu_secs,
            r.evalsha_calls,
            r.usec_per_evalsha,
            r.cpu_secs * 1e6 / o.sent.max(1) as f64
        )
    };
    let mut redis = o.redis.as_ref().map_or("-".to_owned(), redis_line);
    if let Some(nodes) = o.redis_nodes.as_ref().filter(|n| n.len() > 1) {
        redis.push_str(&format!(" (total of {} nodes)", nodes.len()));
        for (i, r) in nodes.iter().enumerate() {
            redis.push_str(&format!("\n  node {:<8}{}", i + 1, redis_line(r)));
        }
    }
    let mut floor = String::new();
    if let Some(f) = &o.floor {
        floor = format!(
            "\nfloor          {:.2} µs CPU per write (one thread, blocking write of a {} B frame \
             to {} loopback sockets in {} group(s): {} writes at {} msg/s over {:.1} s; \
             {} received; reader thread {:.2} µs per write, not included)",
            f.usec_per_write,
            f.frame_bytes,
            f.sockets,
            f.rooms,
            f.writes,
            f.rate,
            f.secs,
            f.received,
            f.reader_usec_per_write,
        );
        floor.push_str(&match o.gateway_to_floor_ratio {
            Some(r) => format!(
                "\ngateway/floor  {r:.2} × ({:.2} µs server CPU per delivery ÷ {:.2} µs per write)",
                o.server_cpu_secs * 1e6 / o.delivered.max(1) as f64,
                f.usec_per_write
            ),
            None => "\ngateway/floor  - (no server CPU or deliveries measured)".to_owned(),
        });
    }
    format!(
        "fanout: {} room(s) × {} subscribers × {} publishers, {rate} msg/s for {} s, {} B text\n\
         servers        {}\n\
         connections    {}\n\
         sent           {}   refused {}\n\
         expected       {}\n\
         delivered      {}\n\
         lost           {}\n\
         duplicated     {}   dropped connections {}\n\
         deliveries/s   {:.0}\n\
         latency ms     p50 {:.2}   p90 {:.2}   p99 {:.2}   p99.9 {:.2}   max {:.2}\n\
         server CPU     {:.2} s over {:.1} s ({})\n\
         redis          {}\n\
         bench CPU      {:.2} s ({}){floor}",
        shape.rooms,
        shape.subs,
        shape.pubs,
        shape.duration,
        shape.size,
        setup.description,
        o.connections,
        o.sent,
        o.refused,
        o.expected,
        o.delivered,
        o.lost,
        o.duplicated,
        o.dropped,
        o.deliveries_per_sec,
        o.latency_ms.p50,
        o.latency_ms.p90,
        o.latency_ms.p99,
        o.latency_ms.p999,
        o.latency_ms.max,
        o.server_cpu_secs,
        o.window_secs,
        per(o.server_cpu_secs),
        redis,
        o.bench_cpu_secs,
        per(o.bench_cpu_secs),
    )
}

async fn fanout_once(
    setup: &Setup,
    common: &Common,
    shape: &Shape,
    rate: f64,
    quiet: bool,
) -> anyhow::Result<fanout::Outcome> {
    fanout_with(setup, common, shape, rate, quiet, 1).await
}

async fn fanout_with(
    setup: &Setup,
    common: &Common,
    shape: &Shape,
    rate: f64,
    quiet: bool,
    workers: usize,
) -> anyhow::Result<fanout::Outcome> {
    let plan = fanout::Plan {
        targets: setup.targets.clone(),
        sources: common.sources.clone(),
        rooms: shape.rooms,
        subs: shape.subs,
        pubs: shape.pubs,
        rate,
        duration: Duration::from_secs(shape.duration),
        size: shape.size,
        run_id: format!("b{:08x}", fastrand::u32(..)),
        room_affinity: shape.room_affinity,
        retry_safe: shape.retry_safe,
        worker: None,
    };
    let meters = fanout::Meters {
        server_pids: &setup.pids,
        redis: setup
            .deployment
            .as_ref()
            .map_or(&[], |d| d.admin.as_slice()),
    };
    if workers > 1 {
        return workers::fanout(&plan, &meters, workers).await;
    }
    let expected_sends = (rate * shape.duration as f64) as u64;
    let pb = progress(quiet, expected_sends, "sent");
    let outcome = fanout::run(&plan, &meters, fanout::Barrier::Local, |sent, delivered| {
        pb.set_position(sent);
        pb.set_message(format!("sent, {delivered} delivered"));
    })
    .await;
    pb.finish_and_clear();
    outcome.map(|(o, _)| o)
}

/// `fanout --floor`: measures the floor after the run and sets it against the gateway's
/// CPU per delivery (see [`floor`]).
async fn add_floor(
    o: &mut fanout::Outcome,
    common: &Common,
    shape: &Shape,
    rate: f64,
) -> anyhow::Result<()> {
    let pb = if common.json {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new_spinner();
        pb.set_message("measuring the floor");
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    };
    let f = floor::run(&floor::FloorPlan {
        rooms: shape.rooms,
        subs: shape.subs,
        rate,
        duration: Duration::from_secs(shape.duration),
        size: shape.size,
        // As long as the run's room names (`b` + 8 hex digits + `-` + room).
        room_name: format!("b{:08x}-{}", 0, shape.rooms / 2),
        sources: common.sources.clone(),
    })
    .await;
    pb.finish_and_clear();
    let f = f?;
    o.floor_usec_per_write = Some(f.usec_per_write);
    let per_delivery = o.server_cpu_secs * 1e6 / o.delivered.max(1) as f64;
    o.gateway_to_floor_ratio =
        (o.delivered > 0 && o.server_cpu_secs > 0.0 && f.usec_per_write > 0.0)
            .then(|| per_delivery / f.usec_per_write);
    o.floor = Some(f);
    Ok(())
}

#[derive(Serialize)]
struct RampStep {
    rate: f64,
    outcome: fanout::Outcome,
    ok: bool,
}

#[derive(Serialize)]
struct RampReport {
    p99_bound_ms: f64,
    best_rate: Option<f64>,
    steps: Vec<RampStep>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fanout {
            common,
            shape,
            rate,
            workers,
            floor,
        } => {
            let setup = setup(&common).await?;
            let mut o = fanout_with(&setup, &common, &shape, rate, common.json, workers).await?;
            if floor {
                add_floor(&mut o, &common, &shape, rate).await?;
            }
            print(common.json, &o, || fanout_table(&shape, rate, &setup, &o))?;
        }
        Command::FanoutWorker { plan } => {
            sys::raise_fd_limit();
            let plan: fanout::Plan = serde_json::from_str(&plan)?;
            let meters = fanout::Meters {
                server_pids: &[],
                redis: &[],
            };
            let (o, h) = fanout::run(&plan, &meters, fanout::Barrier::Stdio, |_, _| {}).await?;
            let result = fanout::WorkerResult::new(&o, &h);
            println!("RESULT {}", serde_json::to_string(&result)?);
        }
        Command::Ramp {
            common,
            shape,
            start_rate,
            factor,
            max_rate,
            p99_ms,
        } => {
            let setup = setup(&common).await?;
            let mut report = RampReport {
                p99_bound_ms: p99_ms,
                best_rate: None,
                steps: Vec::new(),
            };
            let mut rate = start_rate;
            while rate <= max_rate {
                let o = fanout_once(&setup, &common, &shape, rate, true).await?;
                let ok = o.lost == 0 && o.duplicated == 0 && o.latency_ms.p99 <= p99_ms;
                if !common.json {
                    println!(
                        "rate {rate:>9.0} msg/s  deliveries/s {:>9.0}  p50 {:>7.2}  p99 {:>8.2}  max {:>8.2} ms  lost {:>6}  server CPU {:.2} µs/delivery  bench CPU {:.2} µs/delivery  {}",
                        o.deliveries_per_sec,
                        o.latency_ms.p50,
                        o.latency_ms.p99,
                        o.latency_ms.max,
                        o.lost,
                        o.server_cpu_secs * 1e6 / o.delivered.max(1) as f64,
                        o.bench_cpu_secs * 1e6 / o.delivered.max(1) as f64,
                        if ok { "ok" } else { "over" }
                    );
                }
                if ok {
                    report.best_rate = Some(rate);
                }
                report.steps.push(RampStep {
                    rate,
                    outcome: o,
                    ok,
                });
                if !ok {
                    break;
                }
                rate *= factor;
            }
            print(common.json, &report, || match report.best_rate {
                Some(r) => format!(
                    "knee: {r:.0} msg/s ({:.0} deliveries/s) is the highest rate with zero loss and p99 ≤ {p99_ms} ms",
                    r * shape.subs as f64
                ),
                None => format!("no rate met zero loss and p99 ≤ {p99_ms} ms"),
            })?;
        }
        Command::Idle {
            common,
            connections,
            rooms,
            settle,
        } => {
            let setup = setup(&common).await?;
            let pb = progress(common.json, connections as u64, "connected");
            let o = idle::idle(
                &setup.targets,
                &common.sources,
                connections,
                rooms,
                Duration::from_secs(settle),
                &setup.pids,
                |n| pb.set_position(n as u64),
            )
            .await?;
            pb.finish_and_clear();
            print(common.json, &o, || {
                format!(
                    "idle: {} connections over {rooms} rooms ({})\n\
                     server RSS     {} KiB → {} KiB\n\
                     per connection {:.2} KiB\n\
                     connect time   {:.1} s\n\
                     bench RSS      {} KiB",
                    o.connections,
                    setup.description,
                    o.rss_before_kib,
                    o.rss_after_kib,
                    o.kib_per_connection,
                    o.connect_secs,
                    o.bench_rss_kib
                )
            })?;
        }
        Command::Churn {
            common,
            rate,
            duration,
            settle,
        } => {
            let setup = setup(&common).await?;
            let pb = progress(common.json, (rate * duration as f64) as u64, "cycles");
            let o = idle::churn(
                &setup.targets,
                &common.sources,
                rate,
                Duration::from_secs(duration),
                Duration::from_secs(settle),
                &setup.pids,
                |done, errors| {
                    pb.set_position(done);
                    pb.set_message(format!("cycles, {errors} errors"));
                },
            )
            .await?;
            pb.finish_and_clear();
            print(common.json, &o, || {
                format!(
                    "churn: {rate} cycles/s for {duration} s ({})\n\
                     cycles         {} ({:.0}/s)\n\
                     errors         {}\n\
                     server RSS     {} KiB → {} KiB",
                    setup.description,
                    o.cycles,
                    o.cycles_per_sec,
                    o.errors,
                    o.rss_before_kib,
                    o.rss_after_kib
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_redis_per_node_and_the_floor() {
        let shape = Shape {
            rooms: 1,
            subs: 100,
            pubs: 10,
            duration: 10,
            size: 64,
            room_affinity: false,
            retry_safe: false,
        };
        let setup = Setup {
            targets: Vec::new(),
            pids: Vec::new(),
            deployment: None,
            description: "test".to_owned(),
        };
        let node = |cpu_secs: f64| fanout::RedisDelta {
            cpu_secs,
            evalsha_calls: 1000,
            usec_per_evalsha: 50.0,
        };
        let o = fanout::Outcome {
            sent: 1000,
            delivered: 100_000,
            server_cpu_secs: 0.7,
            redis: Some(node(0.3)),
            redis_nodes: Some(vec![node(0.1), node(0.2)]),
            floor_usec_per_write: Some(2.0),
            gateway_to_floor_ratio: Some(3.5),
            floor: Some(floor::FloorOutcome {
                usec_per_write: 2.0,
                ..floor::FloorOutcome::default()
            }),
            ..fanout::Outcome::default()
        };
        let table = fanout_table(&shape, 100.0, &setup, &o);
        println!("{table}");
        assert!(table.contains("300.00 µs CPU per published message (total of 2 nodes)"));
        assert!(table.contains("node 1"), "{table}");
        assert!(table.contains("100.00 µs CPU per published message\n  node 2"));
        assert!(table.contains("floor          2.00 µs CPU per write"));
        assert!(table.contains("gateway/floor  3.50 × (7.00 µs server CPU per delivery"));
    }
}
