//! Publishes that meet in time share one script call on a single Redis (`bus/redis/
//! batch.rs`): the call carries every publish that waited, each still gets its own id and
//! ack, and one that fails does not fail the others.

use std::collections::BTreeSet;

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame};
use chat_testkit::{RedisServer, TestGateway, WsClient};
use fred::prelude::*;

use crate::{connect, metrics::Metrics};

async fn redis_cmd(admin: &Client, args: Vec<&str>) -> anyhow::Result<Value> {
    let (cmd, rest) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no command"))?;
    Ok(admin
        .custom(
            fred::types::CustomCommand::new(cmd.to_string(), None, false),
            rest.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .await?)
}

/// `EVALSHA` calls since the last `CONFIG RESETSTAT`.
async fn evalsha_calls(admin: &Client) -> anyhow::Result<u64> {
    let stats: String = admin
        .info(Some(fred::types::InfoKind::CommandStats))
        .await?;
    Ok(stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// A Redis, a gateway on it with `vars` (presence and the probe off, so the publish script
/// is the only `EVALSHA`), an admin client and `n` members of `room`.
async fn lane_setup(
    vars: &[(&str, &str)],
    room: &str,
    n: usize,
) -> anyhow::Result<(RedisServer, TestGateway, Client, Vec<WsClient>)> {
    let redis = RedisServer::start().await?;
    let mut all = vec![("PRESENCE", "off"), ("PUBSUB_PROBE_SECS", "0")];
    all.extend_from_slice(vars);
    let gw = TestGateway::with_redis(&redis.url(), &all).await?;
    let admin = redis.client().await?;
    let mut members = Vec::new();
    for _ in 0..n {
        members.push(connect(&gw, &format!("?room={room}"), room).await?.0);
    }
    Ok((redis, gw, admin, members))
}

/// Sends one message in its own room and waits for the ack: Redis learns the publish
/// script (NOSCRIPT, then SCRIPT LOAD) in a call of one message.
async fn warm_up(gw: &TestGateway) -> anyhow::Result<WsClient> {
    let (mut warm, _) = connect(gw, "?room=warm-up", "warm-up").await?;
    warm.say("warm-up", "hello", Some("w")).await?;
    until_ack(&mut warm).await?;
    Ok(warm)
}

/// The id of `c`'s next ack, skipping the room's messages.
async fn until_ack(c: &mut WsClient) -> anyhow::Result<u64> {
    loop {
        match c.recv().await? {
            ServerFrame::Ack { id, .. } => return Ok(id),
            ServerFrame::Message(_) => {}
            other => bail!("a sender got {other:?}"),
        }
    }
}

/// One ack from each of `senders`: their ids, each once.
async fn one_ack_each(senders: &mut [WsClient]) -> anyhow::Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    for c in senders {
        let id = until_ack(c).await?;
        ensure!(ids.insert(id), "id {id} acked twice");
    }
    Ok(ids)
}

/// Holds Redis' writes so that one publish is in flight, lets the others gather behind it
/// (the gateway has counted them as received), then lets Redis go: two script calls in
/// all, every sender acked with its own id, and the room whose keys are broken answered
/// `unavailable` without taking its batch's other messages with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_waiting_behind_one_in_flight_go_together() -> anyhow::Result<()> {
    const SENDERS: usize = 12;
    let (_redis, gw, admin, mut senders) =
        lane_setup(&[("REDIS_TIMEOUT_MS", "20000")], "lobby", SENDERS).await?;
    let (mut broken, _) = connect(&gw, "?room=broken", "broken").await?;
    // A counter that is not a number: this room's publish fails inside the script.
    redis_cmd(&admin, vec!["SET", "chat:{broken}:seq", "not a number"]).await?;
    // Redis learns the publish script before counting starts.
    warm_up(&gw).await?;
    redis_cmd(&admin, vec!["CONFIG", "RESETSTAT"]).await?;

    let _ = redis_cmd(&admin, vec!["CLIENT", "PAUSE", "60000", "WRITE"]).await?;
    senders[0].say("lobby", "first", Some("s0")).await?;
    crate::until_redis_holds_one(&admin).await?;
    for (i, c) in senders.iter_mut().enumerate().skip(1) {
        c.say("lobby", &format!("m{i}"), Some(&format!("s{i}")))
            .await?;
    }
    broken.say("broken", "lost cause", Some("b")).await?;
    let received = (SENDERS + 2) as f64; // and the warm-up
    crate::metrics::until(&gw, "every send received", |m: &Metrics| {
        Ok(m.value("chat_messages_received_total", &[])? == received)
    })
    .await?;
    redis_cmd(&admin, vec!["CLIENT", "UNPAUSE"]).await?;

    let ids = one_ack_each(&mut senders).await?;
    ensure!(
        ids == (1..=SENDERS as u64).collect::<BTreeSet<_>>(),
        "ids {ids:?}"
    );
    let (code, reference) = broken.recv_error().await?;
    ensure!(code == ErrorCode::Unavailable && reference.as_deref() == Some("b"));
    // The first call alone, then everything that gathered behind it.
    ensure!(
        evalsha_calls(&admin).await? == 2,
        "{} script calls",
        evalsha_calls(&admin).await?
    );
    // And every member got the room's messages in id order.
    let (late, joined) = connect(&gw, "?room=lobby", "lobby").await?;
    ensure!(joined.ids() == (1..=SENDERS as u64).collect::<Vec<_>>());
    late.close().await?;
    Ok(())
}

/// `PUBLISH_BATCH_MS` under load: after a call that carried several messages the next one
/// waits for the interval, gathering every publish that arrives meanwhile, and a full
/// batch (64) goes at once without waiting the interval out. The interval here is far
/// longer than the test, and without it the first of 64 quick sends would go alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_publishes_gather_for_the_batch_interval() -> anyhow::Result<()> {
    const FULL: usize = 64;
    let vars = [
        ("REDIS_TIMEOUT_MS", "60000"),
        ("PUBLISH_BATCH_MS", "10000"),
        ("RATE_LIMIT_PER_SEC", "0"),
    ];
    let (_redis, gw, admin, mut senders) = lane_setup(&vars, "busy", FULL).await?;
    // A call of one message: the lane stays quiet.
    let mut warm = warm_up(&gw).await?;

    // Load: one call in flight, two publishes gather behind it and go together.
    let _ = redis_cmd(&admin, vec!["CLIENT", "PAUSE", "60000", "WRITE"]).await?;
    senders[0].say("busy", "first", Some("f0")).await?;
    crate::until_redis_holds_one(&admin).await?;
    senders[1].say("busy", "second", Some("f1")).await?;
    senders[2].say("busy", "third", Some("f2")).await?;
    crate::metrics::until(&gw, "every send received", |m: &Metrics| {
        Ok(m.value("chat_messages_received_total", &[])? == 4.0)
    })
    .await?;
    redis_cmd(&admin, vec!["CLIENT", "UNPAUSE"]).await?;
    one_ack_each(&mut senders[..3]).await?;
    redis_cmd(&admin, vec!["CONFIG", "RESETSTAT"]).await?;

    // The lane now waits the interval: 64 quick sends fill one call, which goes at once.
    for (i, c) in senders.iter_mut().enumerate() {
        c.say("busy", &format!("m{i}"), Some(&format!("s{i}")))
            .await?;
    }
    let ids = one_ack_each(&mut senders).await?;
    ensure!(
        ids == (4..4 + FULL as u64).collect::<BTreeSet<_>>(),
        "ids {ids:?}"
    );
    let calls = evalsha_calls(&admin).await?;
    ensure!(calls == 1, "{calls} script calls for one full batch");

    // A full batch leaves the lane quiet: a lone publish goes at once, in its own call.
    warm.say("warm-up", "again", Some("w2")).await?;
    until_ack(&mut warm).await?;
    let calls = evalsha_calls(&admin).await?;
    ensure!(calls == 2, "{calls} script calls");
    Ok(())
}
