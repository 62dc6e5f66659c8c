//! Fault paths where a message or an ack could be lost, or a well-behaved client cut off:
//! a repair across a lost epoch, a retried join after an epoch change, an ack in flight at
//! shutdown, a long replay to a slow reader, protocol errors, and bursts.

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame, close};
use chat_testkit::{RedisProxy, RedisServer, TestGateway, WsClient};
use fred::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Env, connect, on_both_buses};

/// Sends `n` messages of `size` bytes to `room`, a window of them in flight at a time;
/// returns once all are acknowledged.
async fn fill(c: &mut WsClient, room: &str, n: u64, size: usize) -> anyhow::Result<()> {
    let text = "x".repeat(size);
    let mut acked = 0u64;
    for i in 1..=n {
        c.say(room, &text, Some(&i.to_string())).await?;
        while i >= acked + 16 || (i == n && acked < n) {
            match c.recv().await? {
                ServerFrame::Ack { .. } => acked += 1,
                ServerFrame::Message(_) => {}
                other => bail!("publisher got {other:?}"),
            }
        }
    }
    Ok(())
}

/// Reads a replay slowly (a pause every 100 frames) up to `joined`; returns the message
/// ids and `joined`'s `recovered`.
async fn read_slowly(c: &mut WsClient, room: &str) -> anyhow::Result<(Vec<u64>, bool)> {
    let mut ids = Vec::new();
    loop {
        match c.recv().await? {
            ServerFrame::Message(m) => {
                ids.push(m.id);
                if ids.len() % 100 == 0 {
                    // A slow reader, not a synchronisation.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
            ServerFrame::Joined {
                room: r, recovered, ..
            } if r == room => return Ok((ids, recovered)),
            ServerFrame::Welcome { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_across_a_lost_epoch_closes_the_member_instead_of_skipping_ids()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // gw-a's subscriber goes through a proxy that can silence it; gw-b talks to Redis.
    let proxy = RedisProxy::start(redis.port()).await?;
    let gw_a = TestGateway::with_redis(
        &proxy.url(),
        &[("INSTANCE_ID", "gw-a"), ("PUBSUB_PROBE_SECS", "1")],
    )
    .await?;
    let gw_b = TestGateway::with_redis(&redis.url(), &[("INSTANCE_ID", "gw-b")]).await?;
    let (mut on_a, joined) = connect(&gw_a, "?room=reset", "reset").await?;
    let epoch = joined.epoch.clone().unwrap_or_default();
    {
        let (mut publisher, _) = connect(&gw_b, "?room=reset", "reset").await?;
        fill(&mut publisher, "reset", 5, 10).await?;
    }
    for i in 1..=5 {
        ensure!(on_a.recv_message().await?.id == i);
    }
    // gw-a stops hearing the room; meanwhile the room's data is lost and starts again.
    ensure!(proxy.silence_subscribers() >= 1, "subscriber not found");
    redis.client().await?.flushall::<()>(false).await?;
    let (mut publisher, _) = connect(&gw_b, "?room=reset", "reset").await?;
    fill(&mut publisher, "reset", 3, 10).await?;
    // gw-a's probe notices, its repair finds another epoch: ids 1..=3 are not duplicates of
    // what on_a holds, they are another life of the room. on_a must resume.
    ensure!(on_a.closed().await? == Some(close::TRY_AGAIN));
    let (_, again) = connect(
        &gw_a,
        &format!("?room=reset&since=5&epoch={epoch}"),
        "reset",
    )
    .await?;
    ensure!(!again.recovered, "told it recovered across a reset");
    ensure!(again.ids() == [1, 2, 3], "replayed {:?}", again.ids());
    Ok(())
}

on_both_buses!(
    a_join_retried_after_a_stale_epoch_goes_live_with_the_rooms_epoch,
    a_long_replay_to_a_slow_reader_is_not_taken_for_a_dead_peer,
    a_burst_is_rate_limited_but_not_taken_for_garbage,
    protocol_errors_are_closed_with_their_code,
);

async fn a_join_retried_after_a_stale_epoch_goes_live_with_the_rooms_epoch(
    env: Env,
) -> anyhow::Result<()> {
    // A join buffer of 64 live messages (CLIENT_QUEUE): the 100 live ones sent during the
    // replay overflow it, so the join replays a second time from where it got.
    let vars = [
        ("CLIENT_QUEUE", "64"),
        ("HISTORY_SIZE", "2000"),
        ("RATE_LIMIT_PER_SEC", "0"),
    ];
    let gw = env.gateway(&vars).await?;
    let (mut publisher, _) = connect(&gw, "?room=stale", "stale").await?;
    fill(&mut publisher, "stale", 1500, 4000).await?;
    let mut reader = WsClient::connect_slow_reader(
        &gw.ws_url("/ws?room=stale&since=10&epoch=not-this-one"),
        16 * 1024,
    )
    .await?;
    // Wait until the replay is under way, then publish while the reader lags.
    let mut ids = Vec::new();
    while ids.len() < 100 {
        if let ServerFrame::Message(m) = reader.recv().await? {
            ids.push(m.id);
        }
    }
    fill(&mut publisher, "stale", 100, 10).await?;
    let (rest, recovered) = read_slowly(&mut reader, "stale").await?;
    ids.extend(rest);
    ensure!(!recovered, "a stale epoch cannot be recovered");
    // Everything retained (ids 1..=1500, the history holds them all), then the 100 live
    // ones, each once, in order — not a 1013 close at the second pass.
    let expected: Vec<u64> = (1..=1600).collect();
    ensure!(
        ids == expected,
        "got {} ids, first {:?}, last {:?}",
        ids.len(),
        ids.first(),
        ids.last()
    );
    Ok(())
}

async fn a_long_replay_to_a_slow_reader_is_not_taken_for_a_dead_peer(
    env: Env,
) -> anyhow::Result<()> {
    // Two ping intervals (2 s) are shorter than the replay takes this reader (~3 s).
    let vars = [
        ("PING_INTERVAL_SECS", "1"),
        ("HISTORY_SIZE", "1500"),
        ("RATE_LIMIT_PER_SEC", "0"),
    ];
    let gw = env.gateway(&vars).await?;
    let (mut publisher, _) = connect(&gw, "?room=long", "long").await?;
    fill(&mut publisher, "long", 1500, 4000).await?;
    let mut reader = WsClient::connect_slow_reader(&gw.ws_url("/ws?room=long"), 16 * 1024).await?;
    let (ids, recovered) = read_slowly(&mut reader, "long").await?;
    ensure!(recovered);
    ensure!(
        ids == (1..=1500).collect::<Vec<_>>(),
        "got {} ids",
        ids.len()
    );
    Ok(())
}

async fn a_burst_is_rate_limited_but_not_taken_for_garbage(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "3")])
        .await?;
    let (mut c, _) = connect(&gw, "?room=burst", "burst").await?;
    // A paste of 30 lines: far more than 10 refused frames in a row.
    for i in 0..30 {
        c.say("burst", &format!("line {i}"), Some(&format!("r{i}")))
            .await?;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 30 {
        match c.recv().await? {
            ServerFrame::Ack { .. } => acks += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            ServerFrame::Message(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(acks >= 3 && limited >= 20, "acks {acks}, limited {limited}");
    // Still open: the next frame is answered, not met by a 1008 close.
    c.send_json(serde_json::json!({"type": "leave", "room": "nowhere", "ref": "after"}))
        .await?;
    loop {
        match c.recv().await? {
            ServerFrame::Error { reference, .. } => {
                ensure!(reference.as_deref() == Some("after"));
                return Ok(());
            }
            ServerFrame::Message(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
}

/// Opens a WebSocket by hand, sends `frame` raw, and returns the server's close code.
async fn close_code_after(gw: &TestGateway, frame: &[u8]) -> anyhow::Result<Option<u16>> {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    let request = format!(
        "GET /ws?room=raw HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr()
    );
    tcp.write_all(request.as_bytes()).await?;
    // Skip the response head.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await?);
    }
    ensure!(head.starts_with(b"HTTP/1.1 101"), "no upgrade");
    tcp.write_all(frame).await?;
    // Read server frames (unmasked) until a close frame.
    let read = async {
        loop {
            let b0 = tcp.read_u8().await?;
            let len = match tcp.read_u8().await? & 0x7f {
                126 => u64::from(tcp.read_u16().await?),
                127 => tcp.read_u64().await?,
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len)?];
            tcp.read_exact(&mut payload).await?;
            if b0 & 0x0f == 0x8 {
                return anyhow::Ok(payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])));
            }
        }
    };
    match tokio::time::timeout(chat_testkit::WAIT, read).await? {
        Ok(code) => Ok(code),
        // The connection ended without a close frame.
        Err(_) => Ok(None),
    }
}

async fn protocol_errors_are_closed_with_their_code(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let mask = [1u8, 2, 3, 4];
    let masked = |first: u8, payload: &[u8]| {
        let mut f = vec![first, 0x80 | u8::try_from(payload.len()).unwrap_or(0)];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    let cases: [(&str, Vec<u8>, u16); 4] = [
        (
            "an unmasked frame",
            vec![0x81, 2, b'h', b'i'],
            close::PROTOCOL_ERROR,
        ),
        (
            "a reserved opcode",
            masked(0x83, b""),
            close::PROTOCOL_ERROR,
        ),
        (
            "a continuation with nothing to continue",
            masked(0x80, b"x"),
            close::PROTOCOL_ERROR,
        ),
        (
            "text that is not UTF-8",
            masked(0x81, &[0xff, 0xfe]),
            close::INVALID_DATA,
        ),
    ];
    for (what, frame, code) in cases {
        let got = close_code_after(&gw, &frame).await?;
        ensure!(got == Some(code), "{what}: closed with {got:?}, not {code}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_in_flight_at_shutdown_is_written_before_the_1012_close() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[("SHUTDOWN_DRAIN_SECS", "0")]).await?;
    let (mut c, _) = connect(&gw, "?room=drain", "drain").await?;
    let admin = redis.client().await?;
    // Redis holds writes for a while: the publish is in flight when the shutdown begins.
    let _: String = admin
        .custom(
            fred::types::CustomCommand::new_static("CLIENT", None, false),
            vec!["PAUSE", "1500", "WRITE"],
        )
        .await?;
    c.say("drain", "last words", Some("r1")).await?;
    crate::until_redis_holds_one(&admin).await?;
    gw.begin_shutdown();
    loop {
        match c.recv().await {
            Ok(ServerFrame::Ack { reference, id, .. }) => {
                ensure!(reference == "r1" && id == 1);
                break;
            }
            Ok(ServerFrame::Message(_)) => {}
            Ok(other) => bail!("unexpected {other:?}"),
            Err(err) => bail!("closed before the ack: {err}"),
        }
    }
    ensure!(c.closed().await? == Some(close::RESTART));
    Ok(())
}
