//! Redis Cluster specifics: a room's slot moving to another primary mid-stream
//! (resharding), and a silent subscriber connection to one primary among several.

use anyhow::{bail, ensure};
use chat_protocol::ServerFrame;
use chat_testkit::{RedisCluster, RedisProxy, TestGateway, WsClient};
use fred::{prelude::*, types::cluster::ClusterRouting};

use crate::{connect, eventually};

/// Sends `text` until it is acknowledged (an `unavailable` answer — e.g. while the room's
/// keys are between two primaries — means it was not stored: send it again); returns the
/// id it got. Messages of the room arriving meanwhile are skipped.
async fn publish(c: &mut WsClient, room: &str, text: &str) -> anyhow::Result<u64> {
    for attempt in 0..50 {
        c.say(room, text, Some(&format!("{text}-{attempt}")))
            .await?;
        loop {
            match c.recv().await? {
                ServerFrame::Ack { id, .. } => return Ok(id),
                ServerFrame::Error { .. } => break,
                ServerFrame::Message(_) => {}
                other => bail!("publisher got {other:?}"),
            }
        }
    }
    bail!("{text} was never stored")
}

/// Reads until message `last`; returns every message id seen, in order.
async fn ids_until(c: &mut WsClient, last: u64) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    loop {
        if let ServerFrame::Message(m) = c.recv().await? {
            ids.push(m.id);
            if m.id >= last {
                return Ok(ids);
            }
        }
    }
}

/// Subscribers of a sharded channel on one node.
async fn shard_subscribers(node: &Client, channel: &str) -> anyhow::Result<i64> {
    let reply: Vec<Value> = node
        .custom(
            fred::types::CustomCommand::new_static("PUBSUB", None, false),
            vec!["SHARDNUMSUB", channel],
        )
        .await?;
    Ok(reply.get(1).and_then(Value::as_i64).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_slot_moving_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    const N: u64 = 120;
    let cluster = RedisCluster::start(3).await?;
    let vars = |id| {
        [
            ("INSTANCE_ID", id),
            ("RATE_LIMIT_PER_SEC", "0"),
            ("PUBSUB_PROBE_SECS", "1"),
        ]
    };
    let gw_a = TestGateway::with_redis(&cluster.url(), &vars("gw-a")).await?;
    let gw_b = TestGateway::with_redis(&cluster.url(), &vars("gw-b")).await?;
    let (mut on_a, _) = connect(&gw_a, "?room=moving", "moving").await?;
    let (mut on_b, _) = connect(&gw_b, "?room=moving", "moving").await?;
    let (mut publisher, _) = connect(&gw_b, "?room=moving", "moving").await?;
    let channel = "chat:{moving}";
    let slot = ClusterRouting::hash_key(channel.as_bytes());
    let from = cluster.owner_of(slot).await?;
    let to = (from + 1) % cluster.nodes().len();

    let (moving, move_now) = tokio::sync::oneshot::channel();
    let publishing = async {
        let mut moving = Some(moving);
        for i in 1..=N {
            let id = publish(&mut publisher, "moving", &format!("m{i}")).await?;
            ensure!(id == i, "message {i} got id {id}");
            if i == N / 3
                && let Some(moving) = moving.take()
            {
                // The slot moves while the publisher keeps going.
                let _ = moving.send(());
            }
        }
        anyhow::Ok(())
    };
    let migrating = async {
        move_now.await?;
        cluster.migrate_slot(slot, to).await
    };
    let (published, migrated) = tokio::join!(publishing, migrating);
    published?;
    ensure!(migrated? == from, "the slot came from another node");
    for c in [&mut on_a, &mut on_b] {
        let ids = ids_until(c, N).await?;
        ensure!(ids == (1..=N).collect::<Vec<_>>(), "saw {ids:?}");
    }
    // Both instances are subscribed at the new owner, none at the old one.
    let new_owner = cluster.nodes()[to].client().await?;
    let old_owner = cluster.nodes()[from].client().await?;
    eventually("subscriptions at the new owner", || async {
        shard_subscribers(&new_owner, channel).await.ok() == Some(2)
    })
    .await?;
    ensure!(shard_subscribers(&old_owner, channel).await? == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscriber_connection_to_one_primary_is_noticed_and_backfilled()
-> anyhow::Result<()> {
    const N: u64 = 90;
    let cluster = RedisCluster::start(3).await?;
    // Clients reach every primary through its own proxy, so one primary's subscriber
    // connections can be silenced while the others keep working.
    let mut proxies = Vec::new();
    for node in cluster.nodes() {
        proxies.push(RedisProxy::start(node.port()).await?);
    }
    let ports: Vec<u16> = proxies.iter().map(RedisProxy::port).collect();
    cluster.announce_ports(&ports).await?;
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let vars = |id| {
        [
            ("INSTANCE_ID", id),
            ("RATE_LIMIT_PER_SEC", "0"),
            ("PUBSUB_PROBE_SECS", "1"),
        ]
    };
    let gw_a = TestGateway::with_redis(&url, &vars("gw-a")).await?;
    let gw_b = TestGateway::with_redis(&url, &vars("gw-b")).await?;
    let (mut on_b, _) = connect(&gw_b, "?room=quiet", "quiet").await?;
    let (mut publisher, _) = connect(&gw_a, "?room=quiet", "quiet").await?;
    let owner = cluster
        .owner_of(ClusterRouting::hash_key(b"chat:{quiet}"))
        .await?;
    for i in 1..=N {
        publish(&mut publisher, "quiet", &format!("m{i}")).await?;
        if i == N / 3 {
            ensure!(
                proxies[owner].silence_subscribers() >= 2,
                "subscriber connections not found"
            );
            for gw in [&gw_a, &gw_b] {
                eventually("not ready", || async {
                    gw.get_status("/readyz").await.ok() == Some(503)
                })
                .await?;
            }
            for gw in [&gw_a, &gw_b] {
                eventually("ready again", || async {
                    gw.get_status("/readyz").await.ok() == Some(200)
                })
                .await?;
            }
        }
    }
    let ids = ids_until(&mut on_b, N).await?;
    ensure!(ids == (1..=N).collect::<Vec<_>>(), "on_b saw {ids:?}");
    Ok(())
}
