//! Shutdown, keep-alive and plain HTTP.

use std::time::Duration;

use anyhow::ensure;
use chat_protocol::{ServerFrame, close};
use chat_testkit::{WAIT, WsClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

use crate::{Env, connect, eventually, on_both_buses};

on_both_buses!(shutdown_closes_every_client_with_1012, health_and_static);

/// Slack allowed on top of a documented duration for the test's own scheduling (a shared,
/// loaded machine): the timers fire late, never early.
const SCHEDULING: Duration = Duration::from_secs(1);

async fn shutdown_closes_every_client_with_1012(env: Env) -> anyhow::Result<()> {
    const DRAIN: Duration = Duration::from_secs(2);
    let gw = env
        .gateway(&[("SHUTDOWN_GRACE_SECS", "5"), ("SHUTDOWN_DRAIN_SECS", "2")])
        .await?;
    let mut clients = Vec::new();
    for i in 0..6 {
        let room = format!("r{i}");
        clients.push(connect(&gw, &format!("?room={room}"), &room).await?.0);
    }
    clients.push(WsClient::connect(&gw.ws_url("/websocket")).await?);
    let begun = Instant::now();
    gw.begin_shutdown();
    eventually("readyz 503", || async {
        gw.get_status("/readyz").await.ok() == Some(503)
    })
    .await?;
    // While the connections drain (seven closes spread over 2 s: that all of them are
    // already gone has a probability far below 1e-9), a new upgrade is refused with 503.
    let refused = WsClient::connect_with_headers(&gw.ws_url("/ws"), &[]).await?;
    assert_eq!(refused.err(), Some(503), "a new WebSocket during the drain");
    let closes = futures_util::future::join_all(clients.iter_mut().map(|c| async {
        let code = c.closed().await;
        (code, begun.elapsed())
    }))
    .await;
    for (code, after) in closes {
        assert_eq!(code?, Some(close::RESTART));
        ensure!(
            after <= DRAIN + SCHEDULING,
            "a 1012 came {after:?} after the shutdown began, outside SHUTDOWN_DRAIN_SECS"
        );
    }
    tokio::time::timeout(WAIT, gw.stop()).await??;
    Ok(())
}

async fn health_and_static(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    assert_eq!(gw.get_status("/healthz").await?, 200);
    assert_eq!(gw.get_status("/readyz").await?, 200);
    assert_eq!(gw.get_status("/").await?, 200);
    assert_eq!(gw.get_status("/no-such-file.js").await?, 404);
    assert_eq!(gw.get_status("/../Cargo.toml").await?, 404);
    Ok(())
}

/// The opcodes of the complete WebSocket frames in `bytes` (a server's frames: unmasked).
fn opcodes(mut bytes: &[u8]) -> Vec<u8> {
    let mut ops = Vec::new();
    while bytes.len() >= 2 {
        let (op, short) = (bytes[0] & 0x0f, usize::from(bytes[1] & 0x7f));
        let (len, head) = match short {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&bytes[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break,
            n => (n, 2),
        };
        if bytes.len() - head < len {
            break;
        }
        ops.push(op);
        bytes = &bytes[head + len..];
    }
    ops
}

/// docs/protocol.md, Keep-alive: a peer from which nothing arrives during two consecutive
/// ping intervals is dropped without a close frame.
#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped_without_a_close_frame() -> anyhow::Result<()> {
    const INTERVAL: Duration = Duration::from_secs(1);
    // Liveness is judged on the ping ticks, which count from the upgrade: two whole silent
    // intervals have passed by the third tick at the latest. Plus slack for scheduling.
    const TICK_SLACK: Duration = Duration::from_millis(500);
    let env = Env::memory().await?;
    let gw = env.gateway(&[("PING_INTERVAL_SECS", "1")]).await?;
    // A hand-made WebSocket handshake, then nothing ever again: it reads (TCP) but never
    // sends a pong.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    let silent_from = Instant::now();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // Reading until the server hangs up (EOF or reset): welcome, joined, pings, then the end.
    tokio::time::timeout(WAIT, async {
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await?;
    let after = silent_from.elapsed();
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let body = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| &received[at + 4..])
        .unwrap_or_default();
    let ops = opcodes(body);
    assert!(text.contains(r#""type":"welcome""#), "{text}");
    assert!(ops.contains(&0x9), "no ping was sent: opcodes {ops:?}");
    assert!(
        !ops.contains(&0x8),
        "the connection ended with a close frame: opcodes {ops:?}"
    );
    ensure!(
        after >= 2 * INTERVAL,
        "dropped {after:?} after the last byte from the peer: before two ping intervals"
    );
    ensure!(
        after <= 3 * INTERVAL + TICK_SLACK,
        "dropped only {after:?} after the last byte from the peer"
    );
    Ok(())
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[("PING_INTERVAL_SECS", "1")]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    // tungstenite answers each ping while we read; wait for four of them.
    let mut pings = 0;
    while pings < 4 {
        let next = tokio::time::timeout(WAIT, futures_util::StreamExt::next(c.inner())).await?;
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(_)) => {}
            other => anyhow::bail!("connection ended: {other:?}"),
        }
    }
    c.say("general", "still alive", Some("k")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack { reference, .. } if reference == "k" => return Ok(()),
            ServerFrame::Message(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
}

/// Sends `request` on a fresh connection and reads until `until` appears in the answer
/// (or the peer closes); returns everything read.
async fn raw_exchange(
    gw: &chat_testkit::TestGateway,
    request: &[u8],
    until: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    tcp.write_all(request).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !got.windows(until.len()).any(|w| w == until) {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    })
    .await??;
    Ok(got)
}

/// Our own upgrade handling: requests that are not a WebSocket upgrade get a clear HTTP
/// error, and a client that sends its first frame together with the request (before the
/// 101) has it read, not lost.
#[tokio::test]
async fn upgrade_requests_are_checked_and_early_frames_are_kept() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let head = |extra: &str| {
        format!(
            "GET /ws?room=a HTTP/1.1\r\nHost: {}\r\nConnection: close{extra}\r\n\r\n",
            gw.addr()
        )
    };
    let plain = raw_exchange(&gw, head("").as_bytes(), b"\r\n\r\n").await?;
    assert!(
        plain.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    let old = head(
        ", Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    );
    let old = raw_exchange(&gw, old.as_bytes(), b"\r\n\r\n").await?;
    let old = String::from_utf8_lossy(&old).to_ascii_lowercase();
    assert!(old.starts_with("http/1.1 426"), "{old}");
    assert!(old.contains("sec-websocket-version: 13"), "{old}");

    // A valid upgrade with a masked `join` frame (mask key 0) in the same write.
    let mut request = format!(
        "GET /ws?room=a HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr()
    )
    .into_bytes();
    let join = br#"{"type":"join","room":"early"}"#;
    request.extend_from_slice(&[0x81, 0x80 | join.len() as u8, 0, 0, 0, 0]);
    request.extend_from_slice(join);
    let got = raw_exchange(&gw, &request, br#""type":"joined","room":"early""#).await?;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // RFC 6455's example key and its accept value.
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    assert!(text.contains(r#""type":"joined","room":"early""#), "{text}");
    Ok(())
}
