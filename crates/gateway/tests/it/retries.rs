//! Sends that can be retried (exactly once), and how much a fresh join replays.

use anyhow::{bail, ensure};
use chat_protocol::ServerFrame;
use chat_testkit::{TestGateway, Topology, WsClient};

use crate::{Env, connect, on_both_buses};

/// Sends `text` with `reference`; returns the acked id (skipping the room's messages).
async fn send(c: &mut WsClient, room: &str, text: &str, reference: &str) -> anyhow::Result<u64> {
    c.say(room, text, Some(reference)).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack {
                id, reference: r, ..
            } if r == reference => return Ok(id),
            ServerFrame::Message(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
}

async fn a_retried_send_is_stored_once_wherever_it_is_retried(
    a: &TestGateway,
    b: &TestGateway,
) -> anyhow::Result<()> {
    let (mut first, _) = connect(a, "?room=once&client=tab-1", "once").await?;
    ensure!(send(&mut first, "once", "hello", "c-1").await? == 1);
    ensure!(send(&mut first, "once", "again", "c-2").await? == 2);
    drop(first);
    // The same tab, reconnected to another instance, sends c-1 again: the original id.
    let (mut retry, joined) = connect(b, "?room=once&client=tab-1&since=2", "once").await?;
    ensure!(joined.ids().is_empty());
    ensure!(send(&mut retry, "once", "hello", "c-1").await? == 1);
    // Another client may use the same ref: its own message.
    let (mut other, _) = connect(b, "?room=once&client=tab-2", "once").await?;
    ensure!(send(&mut other, "once", "mine", "c-1").await? == 3);
    // A client without `client` is not deduplicated (as before).
    let (mut plain, _) = connect(a, "?room=once", "once").await?;
    ensure!(send(&mut plain, "once", "x", "c-1").await? == 4);
    ensure!(send(&mut plain, "once", "x", "c-1").await? == 5);
    let (_, all) = connect(a, "?room=once", "once").await?;
    let texts: Vec<&str> = all.messages.iter().map(|m| m.text.as_str()).collect();
    ensure!(
        texts == ["hello", "again", "mine", "x", "x"],
        "history {texts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_stored_once_on_a_standalone_redis() -> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let a = TestGateway::with_redis(&topo.url(), &[]).await?;
    let b = TestGateway::with_redis(&topo.url(), &[]).await?;
    a_retried_send_is_stored_once_wherever_it_is_retried(&a, &b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_stored_once_on_a_cluster() -> anyhow::Result<()> {
    let topo = Topology::cluster().await?;
    let a = TestGateway::with_redis(&topo.url(), &[]).await?;
    let b = TestGateway::with_redis(&topo.url(), &[]).await?;
    a_retried_send_is_stored_once_wherever_it_is_retried(&a, &b).await
}

on_both_buses!(
    a_retried_send_is_stored_once_on_one_instance,
    a_fresh_join_replays_the_newest_and_a_resume_everything_retained,
);

async fn a_retried_send_is_stored_once_on_one_instance(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    a_retried_send_is_stored_once_wherever_it_is_retried(&gw, &gw).await
}

async fn a_fresh_join_replays_the_newest_and_a_resume_everything_retained(
    env: Env,
) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[
            ("HISTORY_SIZE", "50"),
            ("JOIN_REPLAY_LIMIT", "5"),
            ("RATE_LIMIT_PER_SEC", "0"),
        ])
        .await?;
    let (mut c, _) = connect(&gw, "?room=long", "long").await?;
    for i in 1..=30 {
        send(&mut c, "long", &format!("m{i}"), &format!("r{i}")).await?;
    }
    let (_, fresh) = connect(&gw, "?room=long", "long").await?;
    ensure!(fresh.ids() == [26, 27, 28, 29, 30] && fresh.last_id == 30 && fresh.recovered);
    let (_, resumed) = connect(&gw, "?room=long&since=10", "long").await?;
    ensure!(resumed.ids() == (11..=30).collect::<Vec<_>>() && resumed.recovered);
    Ok(())
}
