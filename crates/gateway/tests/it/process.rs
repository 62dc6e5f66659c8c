//! The gateway as a real process: SIGTERM drains, SIGKILL loses nothing acknowledged.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use chat_protocol::{ServerFrame, close};
use chat_testkit::{GatewayProcess, RedisServer, WAIT, WsClient};

use crate::eventually;

const BIN: &str = env!("CARGO_BIN_EXE_chat-gateway");

/// Waits until a spawned gateway reports ready (its bus connected).
pub(crate) async fn ready(gw: &GatewayProcess) -> anyhow::Result<()> {
    eventually("readyz 200", || async {
        gw.get_status("/readyz").await == Some(200)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_1012_spread_over_the_window() -> anyhow::Result<()> {
    const DRAIN: Duration = Duration::from_secs(2);
    // Slack on top of SHUTDOWN_DRAIN_SECS for scheduling (signal delivery, a loaded
    // machine): timers fire late, never early.
    const SCHEDULING: Duration = Duration::from_secs(1);
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let mut gw = GatewayProcess::spawn(
        BIN,
        &[
            ("REDIS_URL", &url),
            ("SHUTDOWN_DRAIN_SECS", "2"),
            ("SHUTDOWN_GRACE_SECS", "6"),
        ],
    )
    .await?;
    ready(&gw).await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws")).await?;
        c.until_joined("general").await?;
        clients.push(c);
    }
    let signalled = Instant::now();
    gw.signal("TERM").await?;
    // Not ready at once, and new WebSockets are refused while the old ones drain.
    eventually("readyz 503", || async {
        gw.get_status("/readyz").await == Some(503)
    })
    .await?;
    // (20 closes spread over 2 s: that all of them are already gone has a probability
    // far below 1e-9, so the server is still serving HTTP.)
    let refused = WsClient::connect_with_headers(&gw.ws_url("/ws"), &[]).await?;
    assert_eq!(refused.err(), Some(503), "a new WebSocket during the drain");
    let closes = futures_util::future::join_all(clients.iter_mut().map(|c| async {
        let code = c.closed().await;
        (code, Instant::now())
    }))
    .await;
    let mut times = Vec::new();
    for (code, at) in closes {
        assert_eq!(code?, Some(close::RESTART));
        times.push(at.duration_since(signalled));
    }
    let (first, last) = (times.iter().min(), times.iter().max());
    let spread = last.zip(first).map(|(l, f)| *l - *f).unwrap_or_default();
    // Spread: 20 uniform moments in 2 s have a range below 0.5 s with probability ~1e-11.
    ensure!(
        spread >= Duration::from_millis(500),
        "closes were not spread: {times:?}"
    );
    // Within the window: every 1012 within SHUTDOWN_DRAIN_SECS of the signal.
    ensure!(
        last.is_some_and(|l| *l <= DRAIN + SCHEDULING),
        "a 1012 came after SHUTDOWN_DRAIN_SECS: {times:?}"
    );
    let code = gw.wait(WAIT).await?;
    let took = signalled.elapsed();
    assert_eq!(code, Some(0));
    ensure!(
        took < Duration::from_secs(6),
        "exit took {took:?}, over SHUTDOWN_GRACE_SECS"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acked_and_clients_resume_elsewhere() -> anyhow::Result<()> {
    const N: u64 = 200;
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let vars = [("REDIS_URL", url.as_str()), ("RATE_LIMIT_PER_SEC", "0")];
    let mut a = GatewayProcess::spawn(BIN, &vars).await?;
    let b = GatewayProcess::spawn(BIN, &vars).await?;
    ready(&a).await?;
    ready(&b).await?;
    let (mut reader, _) = WsClient::connect_ws(&a.ws_url("/ws?room=k")).await?;
    reader.until_joined("k").await?;
    let (mut writer, _) = WsClient::connect_ws(&b.ws_url("/ws?room=k")).await?;
    writer.until_joined("k").await?;
    let mut seen = Vec::new();
    let mut killed = false;
    let mut acked = 0;
    for i in 1..=N {
        writer
            .say("k", &format!("m{i}"), Some(&i.to_string()))
            .await?;
        loop {
            match writer.recv().await? {
                ServerFrame::Ack { id, .. } => {
                    assert_eq!(id, i);
                    acked = id;
                    break;
                }
                ServerFrame::Message(_) => {}
                other => bail!("writer got {other:?}"),
            }
        }
        if !killed && i < N / 2 {
            // The reader keeps up until its instance dies.
            seen.push(reader.recv_message().await?.id);
        }
        if i == N / 2 && !killed {
            a.signal("KILL").await?;
            assert_eq!(a.wait(WAIT).await?, None, "killed by a signal");
            killed = true;
            // The reader's connection is gone; it may still read what was in flight.
            while let Ok(ServerFrame::Message(m)) = reader.recv().await {
                seen.push(m.id);
            }
            // Resume on the surviving instance from the last id it saw.
            let since = seen.last().copied().unwrap_or(0);
            let (c, _) =
                WsClient::connect_ws(&b.ws_url(&format!("/ws?room=k&since={since}"))).await?;
            reader = c;
        }
    }
    assert_eq!(acked, N);
    while seen.last() != Some(&N) {
        match reader.recv().await? {
            ServerFrame::Message(m) => seen.push(m.id),
            ServerFrame::Joined { recovered, .. } => assert!(recovered),
            other => bail!("reader got {other:?}"),
        }
    }
    assert_eq!(seen, (1..=N).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_even_when_the_log_reader_has_gone() -> anyhow::Result<()> {
    let mut gw = GatewayProcess::spawn_with_piped_logs(
        BIN,
        &[("SHUTDOWN_DRAIN_SECS", "0"), ("SHUTDOWN_GRACE_SECS", "3")],
    )
    .await?;
    ready(&gw).await?;
    // The log shipper exits: every log line from now on meets a broken pipe, on stdout
    // and on stderr.
    gw.close_logs().await;
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws")).await?;
    c.until_joined("general").await?;
    gw.signal("TERM").await?;
    ensure!(c.closed().await? == Some(close::RESTART));
    let code = gw.wait(WAIT).await?;
    ensure!(code == Some(0), "exit code {code:?} after SIGTERM");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs() -> anyhow::Result<()> {
    let secret = "a-process-test-secret-of-more-than-32-bytes";
    let mut gw = GatewayProcess::spawn(
        BIN,
        &[
            ("AUTH_JWT_SECRET", secret),
            ("RUST_LOG", "debug"),
            ("SHUTDOWN_DRAIN_SECS", "0"),
        ],
    )
    .await?;
    ready(&gw).await?;
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let good = chat_gateway::auth::sign_hs256(
        secret,
        &chat_gateway::auth::NewToken {
            sub: "u-logs",
            name: None,
            rooms: None,
            iat: exp - 600,
            exp,
        },
    )?;
    let bad = format!("{good}x");
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url(&format!("/ws?token={good}"))).await?;
    c.until_joined("general").await?;
    c.send_json(serde_json::json!({"type": "refresh", "token": bad}))
        .await?;
    let refused =
        WsClient::connect_with_headers(&gw.ws_url(&format!("/ws?token={bad}")), &[]).await?;
    ensure!(matches!(refused, Err(401)), "a bad token was let in");
    c.close().await?;
    gw.signal("TERM").await?;
    ensure!(gw.wait(WAIT).await? == Some(0));
    let mut lines = 0;
    while let Ok(line) = gw.logs.try_recv() {
        lines += 1;
        ensure!(
            !line.contains(&good) && !line.contains(&good[good.len() - 20..]),
            "a token in the logs: {line}"
        );
    }
    ensure!(
        lines > 3,
        "the debug log should have said something ({lines} lines)"
    );
    Ok(())
}
