//! Memory per idle connection, and connection churn.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    sys,
    ws::{self, Frame, Target},
};

/// The result of `idle`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleOutcome {
    /// Connections opened (and joined).
    pub connections: usize,
    /// Server RSS before, KiB (sum over the measured processes).
    pub rss_before_kib: u64,
    /// Server RSS with every connection open and idle, KiB.
    pub rss_after_kib: u64,
    /// (after − before) / connections, KiB.
    pub kib_per_connection: f64,
    /// This tool's RSS, KiB.
    pub bench_rss_kib: u64,
    /// Seconds to open and join everything.
    pub connect_secs: f64,
}

fn rss(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| sys::rss_kib(*p)).sum()
}

/// Keeps a connection alive (answers pings) until `stop`.
async fn hold(mut reader: ws::Reader, mut writer: ws::Writer, stop: CancellationToken) {
    loop {
        let frame = tokio::select! {
            () = stop.cancelled() => break,
            f = reader.next() => f,
        };
        match frame {
            Ok(Frame::Ping(p)) => {
                let _ = writer.pong(&p).await;
            }
            Ok(Frame::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = writer.close().await;
}

/// Waits for `joined` on a fresh connection.
async fn until_joined(reader: &mut ws::Reader) -> anyhow::Result<()> {
    loop {
        match reader.next().await? {
            Frame::Text(t) if t.starts_with(br#"{"type":"joined""#) => return Ok(()),
            Frame::Close(code) => anyhow::bail!("closed ({code:?}) before joining"),
            _ => {}
        }
    }
}

/// Opens `count` connections spread over `targets` and `rooms` rooms, measures the
/// servers' RSS growth, then closes them.
pub async fn idle(
    targets: &[Target],
    sources: &[IpAddr],
    count: usize,
    rooms: usize,
    settle: Duration,
    pids: &[u32],
    mut progress: impl FnMut(usize),
) -> anyhow::Result<IdleOutcome> {
    let before = rss(pids);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    // When no source is given and one loopback address runs out of ports, continue from
    // 127.0.0.2, 127.0.0.3, ...
    let auto_source = Arc::new(std::sync::atomic::AtomicU8::new(1));
    // Open in waves, so the server is not handed 15,000 handshakes at once.
    let wave = 200;
    for chunk in (0..count).collect::<Vec<_>>().chunks(wave) {
        let mut opening = Vec::new();
        for &i in chunk {
            let target = targets[i % targets.len()]
                .with_path(&format!("/ws?room=idle-{}", i % rooms.max(1)));
            let fixed = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let auto = auto_source.clone();
            opening.push(tokio::spawn(async move {
                loop {
                    let step = auto.load(Ordering::Relaxed);
                    let source = fixed.or_else(|| {
                        (step > 1 && target.addr.is_ipv4()).then(|| IpAddr::from([127, 0, 0, step]))
                    });
                    match ws::connect(&target, source).await {
                        Ok((mut reader, writer)) => {
                            until_joined(&mut reader).await?;
                            return Ok::<_, anyhow::Error>((reader, writer));
                        }
                        Err(e) if fixed.is_none() && is_out_of_ports(&e) && step < 250 => {
                            let _ = auto.compare_exchange(
                                step,
                                step + 1,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                        Err(e) => return Err(e),
                    }
                }
            }));
        }
        for o in opening {
            let (reader, writer) = o.await??;
            tasks.push(tokio::spawn(hold(reader, writer, stop.clone())));
        }
        progress(tasks.len());
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let after = rss(pids);
    let outcome = IdleOutcome {
        connections: tasks.len(),
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_connection: after.saturating_sub(before) as f64 / tasks.len().max(1) as f64,
        bench_rss_kib: sys::rss_kib(std::process::id()).unwrap_or(0),
        connect_secs,
    };
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(outcome)
}

fn is_out_of_ports(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrNotAvailable)
}

/// The result of `churn`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnOutcome {
    /// Connect → join → leave → close cycles completed.
    pub cycles: u64,
    /// Cycles that failed.
    pub errors: u64,
    /// Server RSS before, KiB.
    pub rss_before_kib: u64,
    /// Server RSS after the churn and a settle pause, KiB.
    pub rss_after_kib: u64,
    /// Cycles per second achieved.
    pub cycles_per_sec: f64,
}

/// Connects, joins a second room, leaves it and disconnects, `rate` times a second for
/// `duration`; reports errors and the servers' RSS before and after.
pub async fn churn(
    targets: &[Target],
    sources: &[IpAddr],
    rate: f64,
    duration: Duration,
    settle: Duration,
    pids: &[u32],
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<ChurnOutcome> {
    let before = rss(pids);
    let cycles = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut running = Vec::new();
    let mut i = 0usize;
    while started.elapsed() < duration {
        ticker.tick().await;
        let target = targets[i % targets.len()].with_path(&format!("/ws?room=churn-{}", i % 50));
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let other = format!("churn-x{}", i % 50);
        i += 1;
        let (done, failed) = (cycles.clone(), errors.clone());
        running.push(tokio::spawn(async move {
            let result = async {
                let (mut reader, mut writer) = ws::connect(&target, source).await?;
                until_joined(&mut reader).await?;
                writer
                    .text(format!(r#"{{"type":"join","room":"{other}"}}"#).as_bytes())
                    .await?;
                until_joined(&mut reader).await?;
                writer
                    .text(format!(r#"{{"type":"leave","room":"{other}"}}"#).as_bytes())
                    .await?;
                loop {
                    if let Frame::Text(t) = reader.next().await?
                        && t.starts_with(br#"{"type":"left""#)
                    {
                        break;
                    }
                }
                writer.close().await?;
                Ok::<_, anyhow::Error>(())
            }
            .await;
            match result {
                Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }));
        running.retain(|t| !t.is_finished());
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            progress(
                cycles.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
            );
        }
    }
    for t in running {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(settle).await;
    let done = cycles.load(Ordering::Relaxed);
    Ok(ChurnOutcome {
        cycles: done,
        errors: errors.load(Ordering::Relaxed),
        rss_before_kib: before,
        rss_after_kib: rss(pids),
        cycles_per_sec: done as f64 / elapsed.as_secs_f64(),
    })
}
