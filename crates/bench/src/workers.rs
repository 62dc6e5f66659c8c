//! `fanout --workers W`: the connections are driven by W child processes (each owns whole
//! rooms, so its id checks stay local). They connect and join, say `READY`; the parent
//! takes its CPU and Redis readings, says `GO` to all, and merges their results
//! (histograms included) into one outcome.

use std::{process::Stdio, time::Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

use crate::{
    fanout::{Latency, Meters, Outcome, Plan, RedisDelta, WorkerResult},
    sys,
};

async fn next_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    prefix: &str,
) -> anyhow::Result<String> {
    loop {
        match lines.next_line().await? {
            Some(line) if line.starts_with(prefix) => return Ok(line),
            Some(_) => {}
            None => bail!("a worker exited before saying {prefix}"),
        }
    }
}

/// Runs `plan` split over `workers` processes.
pub async fn fanout(plan: &Plan, meters: &Meters<'_>, workers: usize) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    let mut outputs = Vec::new();
    for k in 0..workers {
        let mut part = plan.clone();
        part.worker = Some((k, workers));
        let mut child = Command::new(&exe)
            .arg("fanout-worker")
            .arg("--plan")
            .arg(serde_json::to_string(&part)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        outputs.push(BufReader::new(stdout).lines());
        children.push(child);
    }
    for lines in &mut outputs {
        next_line(lines, "READY").await?;
    }
    let pids: Vec<u32> = children.iter().filter_map(Child::id).collect();
    let me = [std::process::id()];
    let cpu = |pids: &[u32]| -> f64 { pids.iter().filter_map(|p| sys::cpu_secs(*p)).sum() };
    let (server0, tool0) = (cpu(meters.server_pids), cpu(&pids) + cpu(&me));
    let redis0 = sys::redis_stats_all(meters.redis).await?;
    for child in &mut children {
        let stdin = child.stdin.as_mut().context("worker stdin")?;
        stdin.write_all(b"GO\n").await?;
        stdin.flush().await?;
    }
    let start = Instant::now();
    let mut results = Vec::new();
    let mut tool1 = 0.0;
    for (lines, pid) in outputs.iter_mut().zip(&pids) {
        let line = next_line(lines, "RESULT ").await?;
        // Read a worker's CPU before it exits and its /proc entry goes.
        tool1 += sys::cpu_secs(*pid).unwrap_or(0.0);
        let result: WorkerResult = serde_json::from_str(&line["RESULT ".len()..])?;
        results.push(result);
    }
    let window = start.elapsed();
    let server1 = cpu(meters.server_pids);
    tool1 += cpu(&me);
    let redis1 = sys::redis_stats_all(meters.redis).await?;
    let (redis, redis_nodes) = RedisDelta::of_nodes(&redis0, &redis1);
    for mut child in children {
        let _ = child.wait().await;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1_000, 120_000_000_000, 3)?;
    let mut o = Outcome {
        window_secs: window.as_secs_f64(),
        server_cpu_secs: server1 - server0,
        bench_cpu_secs: tool1 - tool0,
        redis,
        redis_nodes,
        ..Outcome::default()
    };
    for r in results {
        let c = r.outcome;
        o.sent += c.sent;
        o.refused += c.refused;
        o.expected += c.expected;
        o.delivered += c.delivered;
        o.duplicated += c.duplicated;
        o.dropped += c.dropped;
        o.connections += c.connections;
        for (value, count) in r.histogram {
            let _ = h.record_n(value, count);
        }
    }
    o.lost = o.expected.saturating_sub(o.delivered);
    o.deliveries_per_sec = o.delivered as f64 / plan.duration.as_secs_f64().max(0.001);
    o.latency_ms = Latency::of(&h);
    Ok(o)
}
