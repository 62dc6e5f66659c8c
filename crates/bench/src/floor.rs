//! `fanout --floor`: the raw cost of one loopback write of a message-sized frame, to set
//! the gateway's CPU per delivery against.
//!
//! What is measured, in this process, after the gateway run:
//!
//! - `sockets` loopback TCP connections (the run's rooms × subscribers, at most
//!   [`MAX_SOCKETS`]) opened with the fan-out subscribers' own client (`ws::connect`, the
//!   same 64 KiB receive buffer, `TCP_NODELAY`) to a listener in this process that answers
//!   the upgrade with `101` and nothing else. They are read by ONE thread, a tokio
//!   current-thread runtime (one epoll, as a load client), a task per connection with the
//!   subscribers' frame reader (`ws::Reader`), which counts and discards the frames.
//! - One plain std thread writes, with a blocking `write` per socket (no batching, no
//!   `writev`), the exact bytes of one unmasked server text frame whose payload is a
//!   `message` as the gateway renders it for the run's `--size` text (same room name,
//!   username, text and timestamp lengths). Messages go out at the run's rate for
//!   min(duration, [`MAX_DURATION`]); message k is written to every socket of "room"
//!   k mod rooms, so writes per second equal the run's deliveries per second.
//! - `usec_per_write` is that thread's CPU time (user + system, from
//!   `/proc/thread-self/stat` read by the thread itself before and after) divided by the
//!   writes. On loopback the receiving side's TCP work (the segment's way up to the
//!   reader's socket, and waking the reader) runs inside the sender's `write`, so it is
//!   included, as it is in the gateway's CPU figures; the reader's own user-space,
//!   `epoll_wait` and `read` work is not. That is reported on its own as
//!   `reader_usec_per_write`: the reader thread's CPU (read the same way, from handing the
//!   sockets to the writer until every connection has ended) per write.
//!
//! `gateway_to_floor_ratio` (in the outcome) is the gateway's CPU per delivery of the
//! run divided by `usec_per_write`: 1.0 would be a gateway that costs nothing but its
//! socket writes.

use std::{
    io::Write,
    net::{IpAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    sys,
    ws::{self, Frame},
};

/// At most this many sockets (two descriptors each in this process).
pub const MAX_SOCKETS: usize = 5_000;

/// The floor writes for at most this long.
pub const MAX_DURATION: Duration = Duration::from_secs(10);

/// The floor's shape, from the run's.
#[derive(Clone, Debug)]
pub struct FloorPlan {
    /// Rooms of the run.
    pub rooms: usize,
    /// Subscribers per room of the run.
    pub subs: usize,
    /// Messages per second of the run, all rooms together.
    pub rate: f64,
    /// How long the run published.
    pub duration: Duration,
    /// Bytes of text per message.
    pub size: usize,
    /// The run's room name length (a room of the run, e.g. `b1a2b3c4d-0`).
    pub room_name: String,
    /// Local addresses to connect from, round-robin.
    pub sources: Vec<IpAddr>,
}

/// What the floor measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloorOutcome {
    /// Sockets written to.
    pub sockets: usize,
    /// Groups of sockets a message goes to in turn (the run's rooms, fewer if capped).
    pub rooms: usize,
    /// Bytes of each write (the whole WebSocket frame).
    pub frame_bytes: usize,
    /// Messages per second.
    pub rate: f64,
    /// Seconds of writing.
    pub secs: f64,
    /// Messages written (each to every socket of its group).
    pub messages: u64,
    /// `write` calls, one per socket per message.
    pub writes: u64,
    /// Frames the readers received (equal to `writes` unless something went wrong).
    pub received: u64,
    /// CPU seconds of the writer thread.
    pub writer_cpu_secs: f64,
    /// CPU seconds of the reader thread (not part of the floor).
    pub reader_cpu_secs: f64,
    /// Writer thread CPU microseconds per write: the floor.
    pub usec_per_write: f64,
    /// Reader CPU microseconds per write (not part of the floor).
    pub reader_usec_per_write: f64,
}

/// The bytes of an unmasked server text frame carrying `payload`.
pub fn server_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x81);
    match payload.len() {
        n if n < 126 => out.push(u8::try_from(n).unwrap_or(0)),
        n if n <= usize::from(u16::MAX) => {
            out.push(126);
            out.extend_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// A `message` frame's JSON as the gateway sends it for a publisher of the run: the same
/// fields and lengths (the text is the publishers' `~<send time>|xxx…` of `size` bytes).
pub fn message_json(room: &str, id: u64, size: usize) -> String {
    let stamp = crate::fanout::now_ns().to_string();
    let pad = size.saturating_sub(stamp.len() + 2);
    let text = format!("~{stamp}|{}", "x".repeat(pad));
    let ts = crate::fanout::now_ns() / 1_000_000;
    format!(
        r#"{{"type":"message","room":"{room}","id":{id},"username":"pub0","text":"{text}","ts":{ts}}}"#
    )
}

/// Accepts one connection and answers its upgrade request; returns the blocking socket.
async fn accept_one(listener: &tokio::net::TcpListener) -> anyhow::Result<TcpStream> {
    let (mut stream, _) = listener.accept().await?;
    let mut buf = [0u8; 2048];
    let mut end = 0;
    loop {
        let n = stream.read(&mut buf[end..]).await?;
        if n == 0 {
            bail!("floor: a client closed during the handshake");
        }
        end += n;
        if buf[..end].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if end == buf.len() {
            bail!("floor: upgrade request too large");
        }
    }
    stream
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .await?;
    stream.set_nodelay(true)?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Reads and discards frames until the connection ends, counting text frames.
async fn read_frames(mut reader: ws::Reader, _writer: ws::Writer, received: Arc<AtomicU64>) {
    loop {
        match reader.next().await {
            Ok(Frame::Text(_)) => {
                received.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Frame::Ping(_)) => {}
            Ok(Frame::Close(_)) | Err(_) => break,
        }
    }
}

/// What the reader thread reports: frames received and its CPU seconds from handing the
/// sockets over to the last end of stream.
struct Read {
    received: u64,
    cpu_secs: f64,
}

/// The reader thread: on a current-thread runtime (one thread, one epoll), opens `n`
/// connections with the subscribers' client to a listener of its own, hands the server
/// ends (blocking sockets) over through `ready`, then reads every connection to its end.
fn read_side(
    n: usize,
    sources: &[IpAddr],
    ready: tokio::sync::oneshot::Sender<Vec<TcpStream>>,
) -> anyhow::Result<Read> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = ws::Target {
            addr,
            host: addr.to_string(),
            path: "/floor".to_owned(),
            token: None,
        };
        let received = Arc::new(AtomicU64::new(0));
        let mut servers = Vec::with_capacity(n);
        let mut readers = Vec::with_capacity(n);
        for i in 0..n {
            let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let (client, server) =
                tokio::try_join!(ws::connect(&target, source), accept_one(&listener))?;
            let (reader, writer) = client;
            readers.push(tokio::spawn(read_frames(reader, writer, received.clone())));
            servers.push(server);
        }
        drop(listener);
        let cpu0 = sys::thread_cpu_secs().context("reading /proc/thread-self/stat")?;
        if ready.send(servers).is_err() {
            bail!("floor: nobody took the sockets");
        }
        for r in readers {
            let _ = r.await;
        }
        let cpu1 = sys::thread_cpu_secs().context("reading /proc/thread-self/stat")?;
        Ok(Read {
            received: received.load(Ordering::SeqCst),
            cpu_secs: cpu1 - cpu0,
        })
    })
}

/// What the writer thread reports: messages, writes, its CPU seconds, seconds of writing.
struct Written {
    messages: u64,
    writes: u64,
    cpu_secs: f64,
    secs: f64,
}

/// The writer thread: `frame` to every socket of group k mod groups for message k, paced
/// at `rate` for `duration`. Closes the sockets when done (after its CPU reading).
fn write_loop(
    sockets: Vec<TcpStream>,
    per_group: usize,
    rate: f64,
    duration: Duration,
    frame: &[u8],
) -> anyhow::Result<Written> {
    let groups: Vec<&[TcpStream]> = sockets.chunks(per_group.max(1)).collect();
    let n_groups = groups.len().max(1) as u64;
    let cpu0 = sys::thread_cpu_secs().context("reading /proc/thread-self/stat")?;
    let start = Instant::now();
    let (mut messages, mut writes) = (0u64, 0u64);
    while start.elapsed() < duration {
        // Message k is due at k / rate: catch up on every one that is due.
        let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
        while messages < due {
            let group = groups
                .get((messages % n_groups) as usize)
                .context("no sockets")?;
            for mut socket in group.iter() {
                socket.write_all(frame).context("floor: a write failed")?;
                writes += 1;
            }
            messages += 1;
        }
        let next = Duration::from_secs_f64(messages as f64 / rate);
        if let Some(wait) = next.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu1 = sys::thread_cpu_secs().context("reading /proc/thread-self/stat")?;
    drop(groups);
    drop(sockets);
    Ok(Written {
        messages,
        writes,
        cpu_secs: cpu1 - cpu0,
        secs,
    })
}

/// Runs the floor measurement (see the module documentation).
pub async fn run(plan: &FloorPlan) -> anyhow::Result<FloorOutcome> {
    anyhow::ensure!(plan.subs > 0, "--floor needs at least one subscriber");
    anyhow::ensure!(plan.rate > 0.0, "--floor needs a rate above 0");
    let fd_cap = usize::try_from(sys::raise_fd_limit().saturating_sub(512) / 2).unwrap_or(0);
    let cap = MAX_SOCKETS.min(fd_cap).max(1);
    let per_group = plan.subs.min(cap);
    let groups = plan.rooms.clamp(1, (cap / per_group).max(1));
    let n = per_group * groups;
    let duration = plan.duration.min(MAX_DURATION);
    let payload = message_json(
        &plan.room_name,
        (plan.rate * duration.as_secs_f64()) as u64,
        plan.size,
    );
    let frame = server_text_frame(payload.as_bytes());
    let frame_bytes = frame.len();

    // The readers: one thread, one epoll (a current-thread runtime), as a load client.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let sources = plan.sources.clone();
    let reader = std::thread::Builder::new()
        .name("floor-reader".to_owned())
        .spawn(move || read_side(n, &sources, ready_tx))
        .context("starting the floor reader thread")?;
    let Ok(servers) = ready_rx.await else {
        // The reader thread ended before handing over the sockets: its error says why.
        let err = match reader.join() {
            Ok(Err(e)) => e,
            _ => anyhow::anyhow!("the floor reader thread failed"),
        };
        return Err(err.context("floor: opening the loopback connections"));
    };

    let rate = plan.rate;
    let writer = std::thread::Builder::new()
        .name("floor-writer".to_owned())
        .spawn(move || write_loop(servers, per_group, rate, duration, &frame))
        .context("starting the floor writer thread")?;
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the floor writer thread panicked"))??;
    // The writer closed its sockets: the readers end once they have read everything.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() {
        if Instant::now() > drain_until {
            bail!("floor: the readers did not finish reading within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the floor reader thread panicked"))??;
    let writes = written.writes.max(1) as f64;
    Ok(FloorOutcome {
        sockets: n,
        rooms: groups,
        frame_bytes,
        rate,
        secs: written.secs,
        messages: written.messages,
        writes: written.writes,
        received: read.received,
        writer_cpu_secs: written.cpu_secs,
        reader_cpu_secs: read.cpu_secs,
        usec_per_write: written.cpu_secs * 1e6 / writes,
        reader_usec_per_write: read.cpu_secs * 1e6 / writes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_unmasked_server_text_frames() {
        let f = server_text_frame(b"hi");
        assert_eq!(f, [0x81, 2, b'h', b'i']);
        let p = vec![b'x'; 200];
        let f = server_text_frame(&p);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        assert_eq!(f.len(), 204);
    }

    #[test]
    fn message_json_matches_the_gateway_shape() {
        let j = message_json("b0000abcd-0", 5000, 64);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["id"], 5000);
        assert_eq!(v["text"].as_str().map(str::len), Some(64));
        assert!(j.starts_with(r#"{"type":"message","room":"b0000abcd-0","id":5000,"#));
        assert_eq!(ws::find_u64(j.as_bytes(), br#""id":"#), Some(5000));
    }
}
