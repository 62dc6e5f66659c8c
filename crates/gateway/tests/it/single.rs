//! The protocol on one instance, run on both buses: embedded mode must behave exactly
//! like a one-instance Redis deployment.

use anyhow::ensure;
use chat_protocol::{ErrorCode, ServerFrame, close};
use chat_testkit::WsClient;
use serde_json::json;

use crate::{Env, connect, on_both_buses};

on_both_buses!(
    welcome_then_empty_join,
    sends_are_acked_with_consecutive_ids_and_echoed_to_the_room,
    fresh_join_replays_history_in_order,
    since_resumes_only_what_is_missing,
    history_is_capped,
    errors_answer_and_the_connection_survives,
    oversized_frame_closes_with_1009,
    seed_frame_and_legacy_endpoint,
    connect_query_errors,
    leave_and_rejoin,
    live_bytes_equal_replayed_bytes,
    replay_larger_than_the_client_queue_is_flow_controlled,
    a_slow_client_is_closed_with_1013_and_never_delays_the_room,
    coalesced_writes_deliver_every_message_once_in_order,
    adaptive_coalesced_writes_deliver_every_message_once_in_order,
);

async fn welcome_then_empty_join(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[("INSTANCE_ID", "gw-a")]).await?;
    let mut c = WsClient::connect(&gw.ws_url("/ws")).await?;
    match c.recv().await? {
        ServerFrame::Welcome {
            instance,
            conn,
            protocol,
            user,
        } => {
            assert_eq!(instance, "gw-a");
            assert!(!conn.is_empty());
            assert_eq!(protocol, 1);
            assert_eq!(user, None, "anonymous: no user");
        }
        other => anyhow::bail!("expected welcome, got {other:?}"),
    }
    let j = c.until_joined("general").await?;
    assert_eq!((j.ids(), j.last_id, j.recovered), (vec![], 0, true));
    Ok(())
}

async fn sends_are_acked_with_consecutive_ids_and_echoed_to_the_room(
    env: Env,
) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let (mut a, _) = connect(&gw, "?room=r1&username=ann", "r1").await?;
    let (mut b, _) = connect(&gw, "?room=r1&username=bob", "r1").await?;
    for i in 1..=5u64 {
        a.say("r1", &format!("m{i}"), Some(&format!("c-{i}")))
            .await?;
        let mut got_ack = false;
        let mut got_msg = false;
        while !(got_ack && got_msg) {
            match a.recv().await? {
                ServerFrame::Ack {
                    reference,
                    room,
                    id,
                } => {
                    assert_eq!(
                        (reference.as_str(), room.as_str(), id),
                        (format!("c-{i}").as_str(), "r1", i)
                    );
                    got_ack = true;
                }
                ServerFrame::Message(m) => {
                    assert_eq!(
                        (m.id, m.username.as_str(), m.text.as_str()),
                        (i, "ann", format!("m{i}").as_str())
                    );
                    got_msg = true;
                }
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        let m = b.recv_message().await?;
        assert_eq!(
            (m.id, m.room.as_str(), m.username.as_str()),
            (i, "r1", "ann")
        );
        assert!(
            m.ts > 1_700_000_000_000,
            "ts is milliseconds since the epoch: {}",
            m.ts
        );
    }
    // No ref, no ack: the next frame after the message is the message itself.
    b.say("r1", "quiet", None).await?;
    b.say("r1", "loud", Some("x")).await?;
    assert_eq!(b.recv_message().await?.text, "quiet");
    let mut rest = [b.recv().await?, b.recv().await?];
    rest.sort_by_key(|f| matches!(f, ServerFrame::Ack { .. }));
    assert!(matches!(&rest[0], ServerFrame::Message(m) if m.text == "loud" && m.id == 7));
    assert!(matches!(&rest[1], ServerFrame::Ack { reference, id: 7, .. } if reference == "x"));
    Ok(())
}

async fn fresh_join_replays_history_in_order(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let (mut a, _) = connect(&gw, "?room=h&username=ann", "h").await?;
    for i in 1..=20 {
        a.say("h", &format!("n{i}"), None).await?;
    }
    for _ in 1..=20 {
        a.recv_message().await?;
    }
    let (_b, j) = connect(&gw, "?room=h", "h").await?;
    assert_eq!(j.ids(), (1..=20).collect::<Vec<_>>());
    assert_eq!(j.messages[19].text, "n20");
    assert_eq!((j.last_id, j.recovered), (20, true));
    // Joining a second room on the same connection with a join frame.
    let (mut c, _) = connect(&gw, "?room=other", "other").await?;
    c.join("h", None).await?;
    let j = c.until_joined("h").await?;
    assert_eq!(j.ids(), (1..=20).collect::<Vec<_>>());
    Ok(())
}

async fn since_resumes_only_what_is_missing(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[("HISTORY_SIZE", "10")]).await?;
    let (mut a, _) = connect(&gw, "?room=s&username=ann", "s").await?;
    for i in 1..=15 {
        a.say("s", &format!("n{i}"), None).await?;
    }
    for _ in 1..=15 {
        a.recv_message().await?;
    }
    let cases: [(u64, Vec<u64>, bool); 6] = [
        (12, (13..=15).collect(), true),
        (15, vec![], true),
        (5, (6..=15).collect(), true),
        (4, (6..=15).collect(), false),
        (0, (6..=15).collect(), false),
        (99, (6..=15).collect(), false),
    ];
    for (since, ids, recovered) in cases {
        let (_c, j) = connect(&gw, &format!("?room=s&since={since}"), "s").await?;
        assert_eq!(
            (j.ids(), j.recovered, j.last_id),
            (ids.clone(), recovered, 15),
            "since={since} via query"
        );
        let (mut c, _) = connect(&gw, "?room=lobby", "lobby").await?;
        c.join("s", Some(since)).await?;
        let j = c.until_joined("s").await?;
        assert_eq!(
            (j.ids(), j.recovered, j.last_id),
            (ids, recovered, 15),
            "since={since} via join"
        );
    }
    Ok(())
}

async fn history_is_capped(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[("HISTORY_SIZE", "5")]).await?;
    let (mut a, _) = connect(&gw, "?room=cap", "cap").await?;
    for i in 1..=8 {
        a.say("cap", &format!("n{i}"), None).await?;
    }
    for _ in 1..=8 {
        a.recv_message().await?;
    }
    let (_b, j) = connect(&gw, "?room=cap", "cap").await?;
    assert_eq!(
        (j.ids(), j.last_id, j.recovered),
        (vec![4, 5, 6, 7, 8], 8, true)
    );
    if let Some(redis) = &env.redis {
        use fred::prelude::*;
        // Trimmed in steps: at most an eighth more (here one) than is ever read.
        let len: u64 = redis.client().await?.llen("chat:{cap}:history").await?;
        assert!((5..=6).contains(&len), "{len} entries");
    }
    // A resume from before what is retained sees the same five, and says it missed some.
    let (mut c, _) = connect(&gw, "?room=elsewhere", "elsewhere").await?;
    c.join("cap", Some(1)).await?;
    let j = c.until_joined("cap").await?;
    assert_eq!((j.ids(), j.recovered), (vec![4, 5, 6, 7, 8], false));
    Ok(())
}

async fn errors_answer_and_the_connection_survives(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[("MAX_TEXT_BYTES", "100")]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    let long = "x".repeat(101);
    let cases = [
        ("not json".to_string(), ErrorCode::BadRequest, None),
        (
            json!({"type": "dance"}).to_string(),
            ErrorCode::BadRequest,
            None,
        ),
        (
            json!({"type": "send", "room": "general", "ref": "r0"}).to_string(),
            ErrorCode::BadRequest,
            Some("r0"),
        ),
        (
            json!({"type": "send", "room": "general", "text": "", "ref": "r1"}).to_string(),
            ErrorCode::BadRequest,
            Some("r1"),
        ),
        (
            json!({"type": "join", "room": "no spaces"}).to_string(),
            ErrorCode::InvalidRoom,
            None,
        ),
        (
            json!({"type": "join", "room": "x".repeat(65), "ref": "r2"}).to_string(),
            ErrorCode::InvalidRoom,
            Some("r2"),
        ),
        (
            json!({"type": "send", "room": "elsewhere", "text": "hi", "ref": "r3"}).to_string(),
            ErrorCode::NotJoined,
            Some("r3"),
        ),
        (
            json!({"type": "leave", "room": "elsewhere"}).to_string(),
            ErrorCode::NotJoined,
            None,
        ),
        (
            json!({"type": "send", "room": "general", "text": long, "ref": "r4"}).to_string(),
            ErrorCode::TooLarge,
            Some("r4"),
        ),
        (
            json!({"type": "send", "room": "general", "text": "hi", "username": "\u{7}"})
                .to_string(),
            ErrorCode::InvalidUsername,
            None,
        ),
        (
            json!({"type": "send", "room": "general", "text": "hi", "username": "x".repeat(33)})
                .to_string(),
            ErrorCode::InvalidUsername,
            None,
        ),
    ];
    for (i, (frame, code, reference)) in cases.into_iter().enumerate() {
        if i % 5 == 4 {
            // A valid frame now and then: only a run of refusals closes a connection.
            c.say("general", "valid", Some("v")).await?;
            let (mut acked, mut echoed) = (false, false);
            while !(acked && echoed) {
                match c.recv().await? {
                    ServerFrame::Ack { .. } => acked = true,
                    ServerFrame::Message(_) => echoed = true,
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
        }
        c.send_text(frame.clone()).await?;
        match c.recv().await? {
            ServerFrame::Error {
                code: got,
                message,
                reference: r,
            } => {
                assert_eq!(got, code, "{frame}");
                assert_eq!(r.as_deref(), reference, "{frame}");
                assert!(!message.is_empty());
            }
            other => anyhow::bail!("{frame}: expected error, got {other:?}"),
        }
    }
    c.send_message(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await?;
    assert!(matches!(
        c.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // Still alive and still joined.
    c.say("general", "still here", Some("ok")).await?;
    let mut seen = (false, false);
    while seen != (true, true) {
        match c.recv().await? {
            // Two valid sends came first, so this is id 3.
            ServerFrame::Ack {
                reference, id: 3, ..
            } if reference == "ok" => seen.0 = true,
            ServerFrame::Message(m) if m.text == "still here" => seen.1 = true,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    Ok(())
}

async fn oversized_frame_closes_with_1009(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[("MAX_FRAME_BYTES", "1024"), ("MAX_TEXT_BYTES", "512")])
        .await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    c.say("general", &"y".repeat(2000), None).await?;
    // The client keeps talking: the close frame must still arrive, not a reset (found by
    // the session fuzzer).
    for _ in 0..3 {
        c.say("general", "after the big one", None).await?;
    }
    assert_eq!(c.closed().await?, Some(close::TOO_BIG));
    // The instance is unaffected.
    let (mut d, _) = connect(&gw, "", "general").await?;
    d.say("general", "after", Some("a")).await?;
    assert!(matches!(
        d.recv().await?,
        ServerFrame::Message(_) | ServerFrame::Ack { .. }
    ));
    Ok(())
}

async fn seed_frame_and_legacy_endpoint(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    // History first, from a v1 client.
    let (mut a, _) = connect(&gw, "?username=ann", "general").await?;
    a.say("general", "before", None).await?;
    a.recv_message().await?;

    // The original sample connects to /websocket and sends bare frames at once.
    let mut old = WsClient::connect(&gw.ws_url("/websocket")).await?;
    old.send_json(json!({"username": "seed", "text": "hello from the sample"}))
        .await?;
    // Garbage and a refused frame produce nothing on /websocket...
    old.send_text("garbage").await?;
    old.send_json(json!({"username": "", "text": "bad name"}))
        .await?;
    old.send_json(json!({"username": "seed", "text": "second"}))
        .await?;
    // ...so the stream is exactly: history, then the two messages.
    let texts: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let raw = old.recv_text().await?;
            let frame: serde_json::Value = serde_json::from_str(&raw)?;
            ensure!(
                frame["type"] == "message",
                "/websocket got a non-message frame {raw}"
            );
            v.push(frame["text"].as_str().unwrap_or_default().to_owned());
        }
        v
    };
    assert_eq!(texts, ["before", "hello from the sample", "second"]);
    // A bare frame on /ws lands in the first joined room and is acked like a send... with
    // no ref, so only the message arrives.
    a.send_json(json!({"username": "ann", "text": "bare on ws"}))
        .await?;
    let m = a.recv_message().await?;
    assert_eq!((m.text.as_str(), m.id), ("hello from the sample", 2));
    assert_eq!(a.recv_message().await?.text, "second");
    let m = a.recv_message().await?;
    assert_eq!(
        (m.text.as_str(), m.room.as_str(), m.id),
        ("bare on ws", "general", 4)
    );
    Ok(())
}

async fn connect_query_errors(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=bad%20room")).await?;
    assert!(matches!(
        c.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::InvalidRoom,
            ..
        }
    ));
    // Not joined anywhere: a bare frame has no room.
    c.send_json(json!({"username": "a", "text": "x"})).await?;
    assert!(matches!(
        c.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::NotJoined,
            ..
        }
    ));

    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?since=abc")).await?;
    assert!(matches!(
        c.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));

    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?username=%20%20")).await?;
    assert!(matches!(
        c.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::InvalidUsername,
            ..
        }
    ));
    // The automatic join still happens; sends fall back to "anonymous".
    c.until_joined("general").await?;
    c.say("general", "who am i", None).await?;
    assert_eq!(c.recv_message().await?.username, "anonymous");
    Ok(())
}

async fn leave_and_rejoin(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let (mut a, _) = connect(&gw, "?room=x", "x").await?;
    let (mut b, _) = connect(&gw, "?room=x", "x").await?;
    b.send_json(json!({"type": "leave", "room": "x"})).await?;
    assert_eq!(b.recv().await?, ServerFrame::Left { room: "x".into() });
    a.say("x", "after b left", None).await?;
    assert_eq!(a.recv_message().await?.id, 1);
    // b must not get it: prove it by what b receives next.
    b.say("x", "nope", Some("n")).await?;
    assert!(matches!(
        b.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::NotJoined,
            ..
        }
    ));
    b.join("x", Some(0)).await?;
    let j = b.until_joined("x").await?;
    assert_eq!((j.ids(), j.recovered), (vec![1], true));
    b.join("x", None).await?;
    assert!(matches!(
        b.recv().await?,
        ServerFrame::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    Ok(())
}

async fn live_bytes_equal_replayed_bytes(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let (mut a, _) = connect(&gw, "?room=b&username=z%C3%AB", "b").await?;
    a.say(
        "b",
        "quote \" backslash \\ newline \n emoji \u{1F600} <b>",
        None,
    )
    .await?;
    let live = a.recv_text().await?;
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=b")).await?;
    let replayed = c.recv_text().await?;
    assert_eq!(live, replayed);
    if let Some(redis) = &env.redis {
        use fred::prelude::*;
        let stored: Vec<String> = redis
            .client()
            .await?
            .lrange("chat:{b}:history", 0, -1)
            .await?;
        assert_eq!(stored, vec![live.clone()]);
    }
    let frame: serde_json::Value = serde_json::from_str(&live)?;
    assert_eq!(frame["username"], "zë");
    Ok(())
}

async fn replay_larger_than_the_client_queue_is_flow_controlled(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[
            ("CLIENT_QUEUE", "4"),
            ("HISTORY_SIZE", "500"),
            ("RATE_LIMIT_PER_SEC", "0"),
        ])
        .await?;
    let (mut a, _) = connect(&gw, "?room=big", "big").await?;
    for i in 1..=300 {
        a.say("big", &format!("n{i}"), None).await?;
        // Read as we go: this client is not the slow one under test.
        a.recv_message().await?;
    }
    let (_b, j) = connect(&gw, "?room=big", "big").await?;
    assert_eq!(j.ids(), (1..=300).collect::<Vec<_>>());
    Ok(())
}

async fn a_slow_client_is_closed_with_1013_and_never_delays_the_room(
    env: Env,
) -> anyhow::Result<()> {
    // 20,000 messages of 1.2 KB (24 MB) outgrow the slow client's queue and every socket
    // buffer between us, whatever the kernel's autotuning does.
    const N: u64 = 20_000;
    let gw = env
        .gateway(&[
            ("CLIENT_QUEUE", "256"),
            ("WRITE_TIMEOUT_SECS", "120"),
            ("RATE_LIMIT_PER_SEC", "0"),
        ])
        .await?;
    let (mut slow, _) = connect(&gw, "?room=flood", "flood").await?;
    let (mut fast, _) = connect(&gw, "?room=flood", "flood").await?;
    let (mut publisher, _) = connect(&gw, "?room=other", "other").await?;
    publisher.join("flood", None).await?;
    publisher.until_joined("flood").await?;
    let text = "z".repeat(1200);
    // At most 32 sends in flight: a fast reader keeps up with that, a stalled one cannot.
    let send = tokio::spawn(async move {
        let mut acked = 0;
        for i in 0..N {
            publisher.say("flood", &text, Some(&i.to_string())).await?;
            while i >= acked + 32 {
                if let ServerFrame::Ack { .. } = publisher.recv().await? {
                    acked += 1;
                }
            }
        }
        Ok::<_, anyhow::Error>(publisher)
    });
    // The fast client gets every message, in order, while `slow` reads nothing.
    for id in 1..=N {
        assert_eq!(fast.recv_message().await?.id, id);
    }
    let _publisher = send.await??;
    // Now the slow client reads: a gap-free prefix, then close 1013.
    let mut next = 1;
    loop {
        let frame = tokio::time::timeout(
            chat_testkit::WAIT,
            futures_util::StreamExt::next(slow.inner()),
        )
        .await?;
        match frame {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                if chat_testkit::is_signal(&t) => {}
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let ServerFrame::Message(m) = serde_json::from_str(&t)? else {
                    anyhow::bail!("unexpected frame {t}");
                };
                assert_eq!(m.id, next);
                next += 1;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), close::TRY_AGAIN);
                break;
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("expected close 1013, got {other:?}"),
        }
    }
    assert!(next <= N, "the slow client was not cut off");
    // The operator sees it (`chat_connections_closed_total{code="1013"}`).
    crate::metrics::until(&gw, "the 1013 close counted", |m| {
        Ok(m.value("chat_connections_closed_total", &[("code", "1013")])? == 1.0)
    })
    .await?;
    Ok(())
}

/// With `WRITE_COALESCE_MS` the sockets are written in batches by a flusher: every reader
/// still gets every message once, in id order, and each writer's messages in the order
/// it sent them.
async fn coalesced_writes_deliver_every_message_once_in_order(env: Env) -> anyhow::Result<()> {
    every_message_once_in_order(env, &[("WRITE_COALESCE_MS", "20")]).await
}

/// The same with `WRITE_COALESCE_MODE=adaptive` (each client written at most once per
/// interval, at once when it was not written to for an interval).
async fn adaptive_coalesced_writes_deliver_every_message_once_in_order(
    env: Env,
) -> anyhow::Result<()> {
    every_message_once_in_order(
        env,
        &[
            ("WRITE_COALESCE_MS", "20"),
            ("WRITE_COALESCE_MODE", "adaptive"),
        ],
    )
    .await
}

async fn every_message_once_in_order(env: Env, coalescing: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut vars = vec![("RATE_LIMIT_PER_SEC", "0")];
    vars.extend_from_slice(coalescing);
    let gw = env.gateway(&vars).await?;
    const EACH: u64 = 150;
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(connect(&gw, "?room=co", "co").await?.0);
    }
    let mut writers = Vec::new();
    for w in 0..2 {
        let (mut c, _) = connect(&gw, &format!("?room=co&username=w{w}"), "co").await?;
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                c.say("co", &format!("{i}"), None).await?;
            }
            anyhow::Ok(c)
        }));
    }
    let mut held = Vec::new();
    for w in writers {
        held.push(w.await??);
    }
    for mut r in readers {
        let mut next_of = [0u64; 2];
        for id in 1..=2 * EACH {
            let m = r.recv_message().await?;
            ensure!(m.id == id, "expected id {id}, got {}", m.id);
            let w: usize = m.username.trim_start_matches('w').parse()?;
            let n: u64 = m.text.parse()?;
            ensure!(
                n == next_of[w],
                "writer {w}: expected {}, got {n}",
                next_of[w]
            );
            next_of[w] += 1;
        }
    }
    Ok(())
}
