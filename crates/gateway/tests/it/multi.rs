//! Several instances on one private Redis deployment: fan-out, gap-free joins under
//! load, subscription bookkeeping, repair after lost subscriptions, readiness. Most tests
//! run on a standalone Redis, a Sentinel-managed primary and a three-node Cluster.

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame};
use chat_testkit::{RedisServer, TestGateway, Topology, WsClient};
use fred::prelude::*;
use serde_json::json;

use crate::{connect, eventually};

/// Runs each named `async fn(Topology) -> anyhow::Result<()>` on every Redis topology.
macro_rules! on_topologies {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn standalone() -> anyhow::Result<()> {
                    super::$name(chat_testkit::Topology::standalone().await?).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sentinel() -> anyhow::Result<()> {
                    super::$name(chat_testkit::Topology::sentinel().await?).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() -> anyhow::Result<()> {
                    super::$name(chat_testkit::Topology::cluster().await?).await
                }
            }
        )*
    };
}

on_topologies!(
    messages_cross_instances_with_consecutive_ids,
    resume_with_since_on_another_instance,
    joins_racing_a_burst_from_another_instance_see_every_id_once,
    an_instance_subscribes_only_while_it_has_members,
    killed_pubsub_connections_are_backfilled_from_history,
);

/// Two instances; the test clients publish in bursts, so no rate limit.
async fn two_on(url: &str) -> anyhow::Result<(TestGateway, TestGateway)> {
    let a = TestGateway::with_redis(url, &[("INSTANCE_ID", "gw-a"), ("RATE_LIMIT_PER_SEC", "0")])
        .await?;
    let b = TestGateway::with_redis(url, &[("INSTANCE_ID", "gw-b"), ("RATE_LIMIT_PER_SEC", "0")])
        .await?;
    Ok((a, b))
}

async fn two(redis: &RedisServer) -> anyhow::Result<(TestGateway, TestGateway)> {
    two_on(&redis.url()).await
}

/// Runs a Redis command on every data node and adds up the integer replies.
async fn on_every_node(
    topo: &Topology,
    cmd: &'static str,
    args: Vec<String>,
) -> anyhow::Result<i64> {
    let mut total = 0;
    for node in topo.data_nodes() {
        let reply: Value = node
            .client()
            .await?
            .custom(
                fred::types::CustomCommand::new_static(cmd, None, false),
                args.clone(),
            )
            .await?;
        total += match reply {
            Value::Integer(n) => n,
            // PUBSUB (SHARD)NUMSUB: [channel, count]
            Value::Array(v) => v.get(1).and_then(Value::as_i64).unwrap_or(0),
            other => bail!("unexpected {cmd} reply {other:?}"),
        };
    }
    Ok(total)
}

async fn messages_cross_instances_with_consecutive_ids(topo: Topology) -> anyhow::Result<()> {
    let (gw_a, gw_b) = two_on(&topo.url()).await?;
    // Several rooms, so that on a cluster they live on different nodes.
    for room in ["x", "y", "zz", "room-42", "general"] {
        let q = |u: &str| format!("/ws?room={room}&username={u}");
        let (mut a, ia) = WsClient::connect_ws(&gw_a.ws_url(&q("ann"))).await?;
        let (mut b, ib) = WsClient::connect_ws(&gw_b.ws_url(&q("bob"))).await?;
        assert_eq!((ia.as_str(), ib.as_str()), ("gw-a", "gw-b"));
        a.until_joined(room).await?;
        b.until_joined(room).await?;
        for round in 0..3u64 {
            a.say(room, &format!("from a {round}"), None).await?;
            let (ma, mb) = (a.recv_message().await?, b.recv_message().await?);
            assert_eq!((ma.id, mb.id), (2 * round + 1, 2 * round + 1));
            assert_eq!(
                (mb.username.as_str(), mb.text),
                ("ann", format!("from a {round}"))
            );
            b.say(room, &format!("from b {round}"), None).await?;
            let (ma, mb) = (a.recv_message().await?, b.recv_message().await?);
            assert_eq!((ma.id, mb.id), (2 * round + 2, 2 * round + 2));
            assert_eq!((ma.room.as_str(), ma.username.as_str()), (room, "bob"));
        }
    }
    Ok(())
}

async fn resume_with_since_on_another_instance(topo: Topology) -> anyhow::Result<()> {
    let (gw_a, gw_b) = two_on(&topo.url()).await?;
    let (mut a, _) = connect(&gw_a, "?room=r", "r").await?;
    for i in 1..=10 {
        a.say("r", &format!("n{i}"), None).await?;
        a.recv_message().await?;
    }
    let (_b, j) = connect(&gw_b, "?room=r&since=7", "r").await?;
    assert_eq!(
        (j.ids(), j.last_id, j.recovered),
        (vec![8, 9, 10], 10, true)
    );
    Ok(())
}

/// Reads frames until message `last` arrives; returns every message id seen, in order.
async fn collect_ids(c: &mut WsClient, last: u64) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    loop {
        match c.recv().await? {
            ServerFrame::Message(m) => {
                ids.push(m.id);
                if m.id >= last {
                    return Ok(ids);
                }
            }
            ServerFrame::Joined { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    }
}

async fn joins_racing_a_burst_from_another_instance_see_every_id_once(
    topo: Topology,
) -> anyhow::Result<()> {
    const N: u64 = 150;
    const ROUNDS: usize = 10;
    let (gw_a, gw_b) = two_on(&topo.url()).await?;
    for round in 0..ROUNDS {
        let room = format!("race{round}");
        let (mut publisher, _) = connect(&gw_a, &format!("?room={room}&username=p"), &room).await?;
        // Pipeline the whole burst; joiners start on the other instance as acks come in.
        for i in 1..=N {
            publisher
                .say(&room, &format!("m{i}"), Some(&i.to_string()))
                .await?;
        }
        let triggers = [1, N / 4, N / 2, 3 * N / 4, N - 1];
        let mut joiners = Vec::new();
        let mut acked = 0;
        while acked < N {
            if let ServerFrame::Ack { id, .. } = publisher.recv().await? {
                acked += 1;
                if let Some(k) = triggers.iter().position(|t| *t == id) {
                    let url = if k % 2 == 0 {
                        gw_b.ws_url(&format!("/ws?room={room}"))
                    } else {
                        gw_b.ws_url(&format!("/ws?room={room}&since={}", k))
                    };
                    let since = if k % 2 == 0 { 0 } else { k as u64 };
                    joiners.push(tokio::spawn(async move {
                        let (mut c, _) = WsClient::connect_ws(&url).await?;
                        let ids = collect_ids(&mut c, N).await?;
                        let want: Vec<u64> = (since + 1..=N).collect();
                        ensure!(ids == want, "joiner {k} (since {since}) saw {ids:?}");
                        Ok::<_, anyhow::Error>(())
                    }));
                }
            }
        }
        for j in joiners {
            j.await??;
        }
    }
    Ok(())
}

async fn numsub(topo: &Topology, channel: &str) -> anyhow::Result<i64> {
    let kind = if topo.is_cluster() {
        "SHARDNUMSUB"
    } else {
        "NUMSUB"
    };
    on_every_node(topo, "PUBSUB", vec![kind.into(), channel.into()]).await
}

async fn an_instance_subscribes_only_while_it_has_members(topo: Topology) -> anyhow::Result<()> {
    let r = &topo;
    let (gw_a, gw_b) = two_on(&topo.url()).await?;
    assert_eq!(numsub(r, "chat:{sub}").await?, 0);
    let (mut a1, _) = connect(&gw_a, "?room=lobby", "lobby").await?;
    a1.join("sub", None).await?;
    a1.until_joined("sub").await?;
    assert_eq!(
        numsub(r, "chat:{sub}").await?,
        1,
        "A subscribed on first join"
    );
    let (mut a2, _) = connect(&gw_a, "?room=sub", "sub").await?;
    assert_eq!(
        numsub(r, "chat:{sub}").await?,
        1,
        "one subscription per instance"
    );
    let (_b1, _) = connect(&gw_b, "?room=sub", "sub").await?;
    assert_eq!(numsub(r, "chat:{sub}").await?, 2);
    a1.send_json(json!({"type": "leave", "room": "sub"}))
        .await?;
    assert_eq!(a1.recv().await?, ServerFrame::Left { room: "sub".into() });
    assert_eq!(numsub(r, "chat:{sub}").await?, 2, "A still has a2");
    a2.send_json(json!({"type": "leave", "room": "sub"}))
        .await?;
    assert_eq!(a2.recv().await?, ServerFrame::Left { room: "sub".into() });
    assert_eq!(
        numsub(r, "chat:{sub}").await?,
        1,
        "A unsubscribed after its last member left"
    );
    // Rooms nobody joined are never subscribed.
    assert_eq!(numsub(r, "chat:{lobby}").await?, 1);
    assert_eq!(numsub(r, "chat:{general}").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_and_sends_are_refused_while_it_is_down() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[("REDIS_TIMEOUT_MS", "500")]).await?;
    assert_eq!(gw.get_status("/readyz").await?, 200);
    assert_eq!(gw.get_status("/healthz").await?, 200);
    let (mut c, _) = connect(&gw, "", "general").await?;
    redis.kill().await;
    eventually("readyz 503", || async {
        gw.get_status("/readyz").await.ok() == Some(503)
    })
    .await?;
    assert_eq!(gw.get_status("/healthz").await?, 200);
    c.say("general", "lost?", Some("r1")).await?;
    let (code, reference) = c.recv_error().await?;
    assert_eq!(
        (code, reference.as_deref()),
        (ErrorCode::Unavailable, Some("r1"))
    );
    redis.restart().await?;
    eventually("readyz 200", || async {
        gw.get_status("/readyz").await.ok() == Some(200)
    })
    .await?;
    // This Redis kept no data: the repair after the reconnect finds the room in another
    // epoch, and the connection that lived across the reset is told to resume (1013).
    assert_eq!(c.closed().await?, Some(chat_protocol::close::TRY_AGAIN));
    // The refused message was never stored: the new epoch is empty, and starts at 1.
    let (mut d, j) = connect(&gw, "", "general").await?;
    assert_eq!(j.ids(), Vec::<u64>::new());
    d.say("general", "back", Some("r2")).await?;
    loop {
        match d.recv().await? {
            ServerFrame::Ack { id, .. } => {
                assert_eq!(id, 1);
                break;
            }
            ServerFrame::Message(m) => assert_eq!((m.id, m.text.as_str()), (1, "back")),
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(())
}

/// Publishes `n` messages from `publisher` (at most 16 in flight) and waits for their
/// acks; returns the acknowledged ids. The publisher's own copies are skipped.
async fn publish(publisher: &mut WsClient, room: &str, n: u64) -> anyhow::Result<Vec<u64>> {
    let mut acked = Vec::new();
    let mut sent = 0;
    while (acked.len() as u64) < n {
        while sent < n && sent < acked.len() as u64 + 16 {
            sent += 1;
            publisher
                .say(room, &format!("m{sent}"), Some(&sent.to_string()))
                .await?;
        }
        match publisher.recv().await? {
            ServerFrame::Ack { id, .. } => acked.push(id),
            ServerFrame::Message(_) => {}
            other => bail!("publisher got {other:?}"),
        }
    }
    Ok(acked)
}

/// Waits until every gateway in `gws` reports ready.
async fn all_ready(gws: &[&TestGateway]) -> anyhow::Result<()> {
    for gw in gws {
        eventually("ready", || async {
            gw.get_status("/readyz").await.ok() == Some(200)
        })
        .await?;
    }
    Ok(())
}

/// How many times a test may try to publish inside an outage it caused before the
/// gateways have recovered from it (a reconnect takes at least fred's 100 ms back-off;
/// three acknowledged sends take a few milliseconds).
const OUTAGE_ATTEMPTS: usize = 20;

/// CLIENT KILL TYPE pubsub on every data node: both instances' subscriber connections.
async fn kill_subscribers(topo: &Topology) -> anyhow::Result<()> {
    let kill = vec!["KILL".into(), "TYPE".into(), "pubsub".into()];
    let killed = on_every_node(topo, "CLIENT", kill).await?;
    ensure!(
        killed >= 2,
        "expected both subscribers killed, got {killed}"
    );
    Ok(())
}

async fn killed_pubsub_connections_are_backfilled_from_history(
    topo: Topology,
) -> anyhow::Result<()> {
    let (gw_a, gw_b) = two_on(&topo.url()).await?;
    let (mut on_b, _) = connect(&gw_b, "?room=bf", "bf").await?;
    let (mut on_a, _) = connect(&gw_a, "?room=bf", "bf").await?;
    let (mut publisher, _) = connect(&gw_a, "?room=bf&username=p", "bf").await?;
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    let mut last = 0;
    for _round in 0..2 {
        all_ready(&[&gw_a, &gw_b]).await?;
        // Mid-stream, with sends in flight, cut every subscriber connection (both
        // instances'): what they miss comes back when a later message reveals the gap, or
        // after the resubscription.
        let (mut sent, mut acked) = (0, 0);
        while acked < 100 {
            while sent < 100 && sent < acked + 16 {
                sent += 1;
                publisher
                    .say("bf", &format!("s{sent}"), Some(&sent.to_string()))
                    .await?;
            }
            match publisher.recv().await? {
                ServerFrame::Ack { id, .. } => {
                    acked += 1;
                    last = id;
                    if acked == 50 {
                        kill_subscribers(&topo).await?;
                    }
                }
                ServerFrame::Message(_) => {}
                other => bail!("publisher got {other:?}"),
            }
        }
        all_ready(&[&gw_a, &gw_b]).await?;
        // Then cut them again and publish while they are down, with nothing after.
        // PUBSUB NUMSUB still 0 *after* the acks proves that no instance was subscribed to
        // the room when any of them was published (a subscription that is gone only comes
        // back; nothing else kills it): none was delivered live. If an instance
        // resubscribed first, this is tried again.
        let mut attempts = 0;
        let missed = loop {
            attempts += 1;
            kill_subscribers(&topo).await?;
            let ids = publish(&mut publisher, "bf", 3).await?;
            if numsub(&topo, "chat:{bf}").await? == 0 {
                break ids;
            }
            ensure!(
                attempts < OUTAGE_ATTEMPTS,
                "the instances always resubscribed before three messages were published"
            );
            all_ready(&[&gw_a, &gw_b]).await?;
        };
        last = missed.last().copied().unwrap_or(last);
        // Nothing more is published until they arrive, so no later message can reveal the
        // gap: the missed ids can only come from the repair that follows the resubscription
        // (read from history). Without that repair this waits in vain and fails.
        seen_a.extend(collect_ids(&mut on_a, last).await?);
        seen_b.extend(collect_ids(&mut on_b, last).await?);
    }
    // And live delivery goes on afterwards.
    last = publish(&mut publisher, "bf", 50)
        .await?
        .last()
        .copied()
        .unwrap_or(last);
    seen_a.extend(collect_ids(&mut on_a, last).await?);
    seen_b.extend(collect_ids(&mut on_b, last).await?);
    let want: Vec<u64> = (1..=last).collect();
    ensure!(seen_a == want, "on_a saw {seen_a:?}");
    ensure!(seen_b == want, "on_b saw {seen_b:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_acknowledged() -> anyhow::Result<()> {
    const N: u64 = 60;
    let mut redis =
        RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await?;
    let (gw_a, gw_b) = two(&redis).await?;
    let (mut on_b, _) = connect(&gw_b, "?room=dur", "dur").await?;
    let (mut publisher, _) = connect(&gw_a, "?room=dur&username=p", "dur").await?;
    let mut refused = 0;
    let mut i = 1;
    while i <= N {
        if i == N / 2 + 1 && refused == 0 {
            redis.kill().await;
            eventually("readyz 503", || async {
                gw_a.get_status("/readyz").await.ok() == Some(503)
            })
            .await?;
        }
        publisher
            .say("dur", &format!("m{i}"), Some(&i.to_string()))
            .await?;
        let acked = loop {
            match publisher.recv().await? {
                ServerFrame::Ack { id, reference, .. } => {
                    assert_eq!(
                        (id, reference),
                        (i, i.to_string()),
                        "ids continue after the restart"
                    );
                    break true;
                }
                ServerFrame::Error {
                    code: ErrorCode::Unavailable,
                    reference,
                    ..
                } => {
                    assert_eq!(reference, Some(i.to_string()));
                    break false;
                }
                ServerFrame::Message(_) => {}
                other => bail!("publisher got {other:?}"),
            }
        };
        if acked {
            i += 1;
        } else {
            refused += 1;
            if refused == 1 {
                redis.restart().await?;
            }
            for gw in [&gw_a, &gw_b] {
                eventually("ready again", || async {
                    gw.get_status("/readyz").await.ok() == Some(200)
                })
                .await?;
            }
        }
    }
    assert!(refused >= 1, "the send during the outage must be refused");
    let mut texts = Vec::new();
    loop {
        let m = on_b.recv_message().await?;
        assert_eq!(m.id, texts.len() as u64 + 1);
        texts.push(m.text);
        if m.id == N {
            break;
        }
    }
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_reset_is_never_mistaken_for_being_up_to_date() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let (gw_a, gw_b) = two(&redis).await?;
    let (mut c1, j) = connect(&gw_a, "?room=e", "e").await?;
    let old_epoch = j.epoch.clone().expect("joined carries the room's epoch");
    let (mut across, _) = connect(&gw_b, "?room=e", "e").await?;
    for i in 1..=5 {
        c1.say("e", &format!("old {i}"), None).await?;
        c1.recv_message().await?;
        across.recv_message().await?;
    }
    c1.close().await?;
    // The room's data is lost (FLUSHALL stands for a Redis restarted without persistence).
    let admin = redis.client().await?;
    let _: () = admin
        .custom(
            fred::types::CustomCommand::new_static("FLUSHALL", None, false),
            Vec::<String>::new(),
        )
        .await?;
    let (mut writer, _) = connect(&gw_b, "?room=e&username=w", "e").await?;
    for i in 1..=6 {
        writer
            .say("e", &format!("new {i}"), Some(&i.to_string()))
            .await?;
        loop {
            if let ServerFrame::Ack { id, .. } = writer.recv().await? {
                assert_eq!(id, i, "ids start again at 1");
                break;
            }
        }
    }
    // A client connected across the reset is told to resume (1013)...
    assert_eq!(
        across.closed().await?,
        Some(chat_protocol::close::TRY_AGAIN)
    );
    // ...and one resuming with its old epoch is not told it is up to date.
    let (_c, j) = connect(&gw_a, &format!("?room=e&since=5&epoch={old_epoch}"), "e").await?;
    assert!(!j.recovered);
    assert_ne!(j.epoch.as_deref(), Some(old_epoch.as_str()));
    assert_eq!(j.ids(), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(j.messages[0].text, "new 1");
    // The same with a join frame.
    let (mut c, _) = connect(&gw_a, "?room=lobby", "lobby").await?;
    c.send_json(json!({"type": "join", "room": "e", "since": 5, "epoch": old_epoch}))
        .await?;
    let j = c.until_joined("e").await?;
    assert_eq!((j.ids().len(), j.recovered), (6, false));
    // With the current epoch, resuming works as usual.
    let current = j.epoch.clone().unwrap_or_default();
    let (_c, j) = connect(&gw_a, &format!("?room=e&since=5&epoch={current}"), "e").await?;
    assert_eq!((j.ids(), j.recovered), (vec![6], true));
    Ok(())
}

/// The ids of the connections in pub/sub mode (CLIENT LIST; ids only ever grow, so a
/// connection opened later has an id not in an earlier list).
async fn pubsub_connections(admin: &Client) -> anyhow::Result<Vec<u64>> {
    let list: String = admin
        .custom(
            fred::types::CustomCommand::new_static("CLIENT", None, false),
            vec!["LIST", "TYPE", "pubsub"],
        )
        .await?;
    Ok(list
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("id="))
        .filter_map(|id| id.parse().ok())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_detected_by_the_probe_and_backfilled() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let admin = redis.client().await?;
    let proxy = chat_testkit::RedisProxy::start(redis.port()).await?;
    let vars = |id| {
        [
            ("INSTANCE_ID", id),
            ("RATE_LIMIT_PER_SEC", "0"),
            ("PUBSUB_PROBE_SECS", "1"),
        ]
    };
    let gw_a = TestGateway::with_redis(&proxy.url(), &vars("gw-a")).await?;
    let gw_b = TestGateway::with_redis(&proxy.url(), &vars("gw-b")).await?;
    let (mut on_b, _) = connect(&gw_b, "?room=quiet", "quiet").await?;
    let (mut publisher, _) = connect(&gw_a, "?room=quiet", "quiet").await?;
    let mut last = publish(&mut publisher, "quiet", 100)
        .await?
        .last()
        .copied()
        .unwrap_or(0);
    let mut seen = collect_ids(&mut on_b, last).await?;
    // Both subscriber connections stay open but deliver nothing more; then three messages
    // are published. If no subscriber connection was opened since the silence (CLIENT
    // LIST after the acks), every subscriber of the room was a silenced one when they were
    // published: none was delivered live. (The probe notices within about two intervals;
    // if it was faster than the publisher, the round is tried again.)
    let mut attempts = 0;
    let missed = loop {
        attempts += 1;
        let before = pubsub_connections(&admin).await?;
        ensure!(proxy.silence_subscribers() >= 2, "subscribers not found");
        let ids = publish(&mut publisher, "quiet", 3).await?;
        let after = pubsub_connections(&admin).await?;
        if after.iter().all(|id| before.contains(id)) {
            break ids;
        }
        ensure!(
            attempts < OUTAGE_ATTEMPTS,
            "the probe always reconnected before three messages were published"
        );
        all_ready(&[&gw_a, &gw_b]).await?;
    };
    last = missed.last().copied().unwrap_or(last);
    // Each instance reports not ready while it reconnects (watched at once: the two
    // probes' moments are independent), then ready again.
    futures_util::future::try_join_all([&gw_a, &gw_b].map(|gw| {
        eventually("not ready", move || async move {
            gw.get_status("/readyz").await.ok() == Some(503)
        })
    }))
    .await?;
    all_ready(&[&gw_a, &gw_b]).await?;
    // Nothing more is published until they arrive: the missed ids can only come from the
    // repair after the probe's reconnect (from history). Without it this fails.
    seen.extend(collect_ids(&mut on_b, last).await?);
    last = publish(&mut publisher, "quiet", 100)
        .await?
        .last()
        .copied()
        .unwrap_or(last);
    seen.extend(collect_ids(&mut on_b, last).await?);
    ensure!(seen == (1..=last).collect::<Vec<_>>(), "on_b saw {seen:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_or_the_heroku_opt_in() -> anyhow::Result<()> {
    let (redis, ca) = RedisServer::start_tls().await?;
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    // By default the certificate is verified against the system roots, which do not know
    // this CA: a gateway with neither REDIS_TLS_CA_FILE nor REDIS_TLS_INSECURE never
    // connects. It starts first, so it has had longer than the two below to connect by the
    // time it is checked.
    let untrusting = TestGateway::start_unready(&[("REDIS_URL", &url)]).await?;
    let ca = ca.to_string_lossy().into_owned();
    let verified = TestGateway::with_redis(&url, &[("REDIS_TLS_CA_FILE", &ca)]).await?;
    let insecure = TestGateway::with_redis(&url, &[("REDIS_TLS_INSECURE", "true")]).await?;
    let (mut a, _) = connect(&verified, "?room=tls", "tls").await?;
    let (mut b, _) = connect(&insecure, "?room=tls", "tls").await?;
    a.say("tls", "over TLS", None).await?;
    assert_eq!(a.recv_message().await?.text, "over TLS");
    assert_eq!(b.recv_message().await?.id, 1);

    assert_eq!(
        untrusting.get_status("/readyz").await?,
        503,
        "an unknown CA must not be trusted by default"
    );
    // Its clients are told: the automatic join and a `join` frame are answered
    // `unavailable`, and the connection is in no room.
    let (mut c, _) = WsClient::connect_ws(&untrusting.ws_url("/ws?room=tls")).await?;
    assert_eq!(c.recv_error().await?.0, ErrorCode::Unavailable);
    c.send_json(json!({"type": "join", "room": "tls", "ref": "j"}))
        .await?;
    let (code, reference) = c.recv_error().await?;
    assert_eq!(
        (code, reference.as_deref()),
        (ErrorCode::Unavailable, Some("j"))
    );
    c.say("tls", "lost", Some("s")).await?;
    let (code, reference) = c.recv_error().await?;
    assert_eq!(
        (code, reference.as_deref()),
        (ErrorCode::NotJoined, Some("s"))
    );
    assert_eq!(untrusting.get_status("/readyz").await?, 503);
    Ok(())
}
