//! Promises of docs/operations.md and docs/protocol.md that no other test checked: a
//! Redis that is down at start-up, `join` while the bus is down, the write timeout of a
//! client that stops reading, exit code 2 for a configuration that cannot be used, and the
//! Origin check behind a proxy (`X-Forwarded-Host`).

use std::{process::Stdio, time::Duration};

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame};
use chat_testkit::{RedisServer, TestGateway, WAIT, WsClient};
use serde_json::json;
use tokio::time::Instant;

use crate::{Env, connect, eventually};

/// "Redis unreachable at start-up: the process starts, `/readyz` is 503 until Redis
/// answers" — and a `join` meanwhile is answered `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_up_is_503_until_it_answers() -> anyhow::Result<()> {
    // A port where a redis-server will be, but is not yet.
    let mut redis = RedisServer::start().await?;
    redis.kill().await;
    let url = redis.url();
    let gw =
        TestGateway::start_unready(&[("REDIS_URL", &url), ("REDIS_TIMEOUT_MS", "500")]).await?;
    assert_eq!(gw.get_status("/healthz").await?, 200, "the process runs");
    assert_eq!(gw.get_status("/readyz").await?, 503);
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=early")).await?;
    // The automatic join, then a `join` frame: both `unavailable`.
    assert_eq!(c.recv_error().await?.0, ErrorCode::Unavailable);
    c.send_json(json!({"type": "join", "room": "early", "ref": "j1"}))
        .await?;
    let (code, reference) = c.recv_error().await?;
    assert_eq!(
        (code, reference.as_deref()),
        (ErrorCode::Unavailable, Some("j1"))
    );
    assert_eq!(gw.get_status("/readyz").await?, 503, "still no Redis");

    redis.restart().await?;
    eventually("readyz 200", || async {
        gw.get_status("/readyz").await.ok() == Some(200)
    })
    .await?;
    // The same connection can now join and publish.
    c.join("early", None).await?;
    assert_eq!(c.until_joined("early").await?.last_id, 0);
    c.say("early", "at last", Some("s1")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack { id, .. } => {
                assert_eq!(id, 1);
                break;
            }
            ServerFrame::Message(m) => assert_eq!(m.text, "at last"),
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(())
}

/// docs/protocol.md, `unavailable`: "Also answers a `join` that could not reach the bus
/// (the connection is then not in the room)" — for a room this instance must subscribe
/// to, and for one it already serves (the history read fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_answered_unavailable_while_the_bus_is_down() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[("REDIS_TIMEOUT_MS", "500")]).await?;
    let (_member, _) = connect(&gw, "?room=busy", "busy").await?;
    let (mut c, _) = connect(&gw, "?room=lobby", "lobby").await?;
    redis.kill().await;
    eventually("readyz 503", || async {
        gw.get_status("/readyz").await.ok() == Some(503)
    })
    .await?;
    for (room, reference) in [("fresh", "j1"), ("busy", "j2")] {
        c.send_json(json!({"type": "join", "room": room, "ref": reference}))
            .await?;
        let (code, got) = c.recv_error().await?;
        assert_eq!(
            (code, got.as_deref()),
            (ErrorCode::Unavailable, Some(reference)),
            "join {room}"
        );
        // Not in the room: a send to it is refused as not joined (locally, no bus needed).
        c.say(room, "x", Some("s")).await?;
        let (code, got) = c.recv_error().await?;
        assert_eq!(
            (code, got.as_deref()),
            (ErrorCode::NotJoined, Some("s")),
            "send to {room}"
        );
    }
    Ok(())
}

/// `WRITE_TIMEOUT_SECS`: a client whose socket takes no bytes for that long while frames
/// wait is dropped — without a close frame (its socket is full) — and the others keep
/// receiving. The live-queue bounds are set far out of reach, so they are not what closes
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> anyhow::Result<()> {
    const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
    // Slack for scheduling on a shared machine (timers fire late, never early).
    const SCHEDULING: Duration = Duration::from_secs(1);
    // Once a message no longer fits, the kernel's send buffer may still take a few more
    // of its bytes now and then (it grows, the peer's window opens a crack): measured at
    // about 0.5 s on Linux with this 16 KiB receive buffer.
    const KERNEL: Duration = Duration::from_secs(1);
    let env = Env::memory().await?;
    let gw = env
        .gateway(&[
            ("WRITE_TIMEOUT_SECS", "1"),
            ("CLIENT_QUEUE", "1000000"),
            ("CLIENT_QUEUE_BYTES", "1073741824"),
            ("RATE_LIMIT_PER_SEC", "0"),
        ])
        .await?;
    let (mut watcher, _) = connect(&gw, "?room=flood", "flood").await?;
    let (mut publisher, _) = connect(&gw, "?room=flood", "flood").await?;
    let mut slow = WsClient::connect_slow_reader(&gw.ws_url("/ws?room=flood"), 16384).await?;
    ensure!(matches!(slow.recv().await?, ServerFrame::Welcome { .. }));
    slow.until_joined("flood").await?;
    // From here on the slow client reads nothing.
    let stopped_reading = Instant::now();
    assert_eq!(gw.state().connection_count(), 3);

    // The watcher reads everything, as it comes, in its own task.
    let (ids_tx, mut ids_rx) = tokio::sync::mpsc::unbounded_channel();
    let watching = tokio::spawn(async move {
        loop {
            let m = watcher.recv_message().await?;
            if ids_tx.send((m.id, Instant::now())).is_err() {
                return anyhow::Ok(());
            }
        }
    });
    // Live messages keep coming (4 KB each, at most 8 in flight) until the slow client is
    // gone; each id's publication time is kept.
    let text = "x".repeat(4000);
    let mut published = Vec::new();
    let mut sent = 0u64;
    let deadline = Instant::now() + WAIT;
    let dropped_at = loop {
        if gw.state().connection_count() < 3 {
            break Instant::now();
        }
        ensure!(
            Instant::now() < deadline,
            "the client that stopped reading was not dropped ({sent} messages sent)"
        );
        while sent < published.len() as u64 + 8 {
            sent += 1;
            publisher
                .say("flood", &text, Some(&sent.to_string()))
                .await?;
        }
        match publisher.recv().await? {
            ServerFrame::Ack { id, .. } => published.push((id, Instant::now())),
            ServerFrame::Message(_) => {}
            other => bail!("publisher got {other:?}"),
        }
    };
    // The others keep receiving: a message published after the drop reaches the watcher,
    // after every earlier one.
    publisher.say("flood", "after", Some("after")).await?;
    let after_id = loop {
        if let ServerFrame::Ack { id, .. } = publisher.recv().await? {
            break id;
        }
    };
    let mut watched = Vec::new();
    while watched.last().is_none_or(|(id, _)| *id < after_id) {
        let next = tokio::time::timeout(WAIT, ids_rx.recv()).await?;
        watched.push(next.ok_or_else(|| anyhow::anyhow!("the watcher stopped"))?);
    }
    let watched_ids: Vec<u64> = watched.iter().map(|(id, _)| *id).collect();
    ensure!(
        watched_ids == (1..=after_id).collect::<Vec<_>>(),
        "the watcher missed messages: {watched_ids:?}"
    );
    watching.abort();

    // What reached the slow client before the end, and how it ended: no close frame.
    let mut received = 0u64;
    let ending = loop {
        let next = tokio::time::timeout(WAIT, futures_util::StreamExt::next(slow.inner())).await?;
        match next {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                if let Ok(ServerFrame::Message(m)) = serde_json::from_str(t.as_str()) {
                    received = m.id;
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                bail!("the dropped client got a close frame: {frame:?}")
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break Some(e.to_string()),
            None => break None,
        }
    };
    ensure!(
        received < after_id,
        "the slow client got everything ({received}): it was not behind"
    );
    // Its socket was full by the time the message after the last one it received in full
    // was published (give or take the kernel's trickle): the drop is due WRITE_TIMEOUT
    // later.
    let stalled_by = published
        .iter()
        .find(|(id, _)| *id == received + 1)
        .map(|(_, at)| *at)
        .ok_or_else(|| anyhow::anyhow!("message {} was never published", received + 1))?;
    let waited = dropped_at.saturating_duration_since(stalled_by);
    ensure!(
        dropped_at.duration_since(stopped_reading) >= WRITE_TIMEOUT,
        "dropped {:?} after it stopped reading: before WRITE_TIMEOUT_SECS",
        dropped_at.duration_since(stopped_reading)
    );
    ensure!(
        waited <= WRITE_TIMEOUT + KERNEL + SCHEDULING,
        "dropped {waited:?} after its socket stopped taking bytes ({ending:?})"
    );
    Ok(())
}

/// "Invalid values stop the process at start with exit code 2 and a message naming the
/// variable" — for the real binary.
#[tokio::test]
async fn a_configuration_that_cannot_be_used_exits_with_code_2() -> anyhow::Result<()> {
    const BIN: &str = env!("CARGO_BIN_EXE_chat-gateway");
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[("HISTORY_SIZE", "0")], "HISTORY_SIZE"),
        (&[("HOST", "localhost")], "HOST"),
        (&[("REDIS_URL", "redis://127.0.0.1:notaport")], "REDIS_URL"),
        (&[("REDIS_URL", "http://127.0.0.1:6379")], "REDIS_URL"),
        (
            &[
                ("REDIS_URL", "rediss://127.0.0.1:1"),
                ("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem"),
            ],
            "REDIS_TLS_CA_FILE",
        ),
        (&[("SHUTDOWN_DRAIN_SECS", "30")], "SHUTDOWN_DRAIN_SECS"),
    ];
    for (vars, variable) in cases {
        let out = tokio::process::Command::new(BIN)
            .env_clear()
            .envs([
                ("APP_ENV", "production"),
                ("PORT", "0"),
                ("HOST", "127.0.0.1"),
            ])
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(WAIT, out).await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{vars:?}: exit status {:?}, stderr {stderr:?}",
            out.status
        );
        ensure!(
            stderr.contains(variable),
            "{vars:?}: stderr does not name {variable}: {stderr:?}"
        );
    }
    Ok(())
}

/// docs/operations.md, `ALLOWED_ORIGINS` unset: "only pages served from the request's own
/// host (`Host` or `X-Forwarded-Host`)".
#[tokio::test]
async fn behind_a_proxy_the_origin_is_checked_against_x_forwarded_host() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let url = gw.ws_url("/ws");
    // The Host header is the gateway's own 127.0.0.1:PORT; the page came through a proxy.
    for (origin, forwarded, want) in [
        ("https://chat.example.com", Some("chat.example.com"), 101),
        (
            "https://chat.example.com:8443",
            Some("chat.example.com:8443"),
            101,
        ),
        ("https://evil.example", Some("chat.example.com"), 403),
        ("https://chat.example.com", Some("other.example.com"), 403),
        ("https://chat.example.com", None, 403),
    ] {
        let mut headers = vec![("Origin", origin)];
        if let Some(host) = forwarded {
            headers.push(("X-Forwarded-Host", host));
        }
        let got = WsClient::connect_with_headers(&url, &headers)
            .await?
            .err()
            .unwrap_or(101);
        assert_eq!(got, want, "Origin {origin}, X-Forwarded-Host {forwarded:?}");
    }
    Ok(())
}
