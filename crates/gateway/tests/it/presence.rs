//! Who is here and who is typing, across instances: a user with several connections is
//! listed once, the users of a killed instance are reported `left` once their leases run
//! out, `count` is exact while `users` is capped, and typing is relayed to the others,
//! at most every 2 s.

use anyhow::{bail, ensure};
use chat_protocol::{PresenceUser, ServerFrame};
use chat_testkit::{GatewayProcess, TestGateway, Topology, WAIT, WsClient};
use serde_json::json;

use crate::{Env, on_both_buses};

const SECRET: &str = "a-presence-test-secret-of-40-bytes-long!";

fn token(sub: &str, name: &str) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    Ok(chat_gateway::auth::sign_hs256(
        SECRET,
        &chat_gateway::auth::NewToken {
            sub,
            name: Some(name),
            rooms: None,
            iat: now,
            exp: now + 600,
        },
    )?)
}

/// Connects as `sub` to `room` and returns the client and its `presence` frame.
async fn join_as(
    url: &str,
    sub: &str,
    name: &str,
    room: &str,
) -> anyhow::Result<(WsClient, u64, Vec<PresenceUser>)> {
    let (mut c, _) =
        WsClient::connect_ws(&format!("{url}/ws?room={room}&token={}", token(sub, name)?)).await?;
    c.until_joined(room).await?;
    match c.recv_any().await? {
        ServerFrame::Presence { count, users, .. } => Ok((c, count, users)),
        other => bail!("expected presence after joined, got {other:?}"),
    }
}

/// The next presence diff: (joined user ids, left user ids).
async fn diff(c: &mut WsClient) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    loop {
        match c.recv_any().await? {
            ServerFrame::PresenceDiff { joined, left, .. } => {
                let ids = |v: Vec<PresenceUser>| v.into_iter().map(|u| u.user).collect();
                return Ok((ids(joined), ids(left)));
            }
            ServerFrame::Typing { .. } | ServerFrame::Message(_) => {}
            other => bail!("expected a presence diff, got {other:?}"),
        }
    }
}

fn base(gw: &TestGateway) -> String {
    gw.ws_url("").trim_end_matches('/').to_owned()
}

async fn a_user_is_listed_once_however_many_connections_they_have(
    a: &TestGateway,
    b: &TestGateway,
) -> anyhow::Result<()> {
    // The joiner's own `presence` counts it; its arrival is announced to all, itself too.
    let (mut ann, count, users) = join_as(&base(a), "u-ann", "Ann", "lobby").await?;
    ensure!(count == 1 && users[0].name == "Ann", "{count} {users:?}");
    ensure!(diff(&mut ann).await? == (vec!["u-ann".into()], vec![]));
    let (mut bob, count, users) = join_as(&base(b), "u-bob", "Bob", "lobby").await?;
    let mut names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    names.sort_unstable();
    ensure!(count == 2 && names == ["Ann", "Bob"], "{count} {users:?}");
    ensure!(diff(&mut bob).await? == (vec!["u-bob".into()], vec![]));
    ensure!(diff(&mut ann).await? == (vec!["u-bob".into()], vec![]));
    // ann's second tab, on the other instance: no news.
    let (ann2, count, _) = join_as(&base(b), "u-ann", "Ann", "lobby").await?;
    ensure!(count == 2);
    // ann's first tab goes: still no news. Her last tab goes: she left.
    ann.close().await?;
    ann2.close().await?;
    ensure!(diff(&mut bob).await? == (vec![], vec!["u-ann".into()]));
    let (_, count, users) = join_as(&base(a), "u-carl", "Carl", "lobby").await?;
    let mut ids: Vec<&str> = users.iter().map(|u| u.user.as_str()).collect();
    ids.sort_unstable();
    ensure!(
        count == 2 && ids == ["u-bob", "u-carl"],
        "{count} {users:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_instances_on_a_standalone_redis() -> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let vars = [("AUTH_JWT_SECRET", SECRET)];
    let a = TestGateway::with_redis(&topo.url(), &vars).await?;
    let b = TestGateway::with_redis(&topo.url(), &vars).await?;
    a_user_is_listed_once_however_many_connections_they_have(&a, &b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_instances_on_a_cluster() -> anyhow::Result<()> {
    let topo = Topology::cluster().await?;
    let vars = [("AUTH_JWT_SECRET", SECRET)];
    let a = TestGateway::with_redis(&topo.url(), &vars).await?;
    let b = TestGateway::with_redis(&topo.url(), &vars).await?;
    a_user_is_listed_once_however_many_connections_they_have(&a, &b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_killed_instance_are_reported_left_by_the_survivors() -> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let vars = [
        ("REDIS_URL", topo.url()),
        ("AUTH_JWT_SECRET", SECRET.to_owned()),
        ("PRESENCE_TTL_SECS", "5".to_owned()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let doomed = GatewayProcess::spawn(env!("CARGO_BIN_EXE_chat-gateway"), &vars).await?;
    // "listening" comes before its Redis connection: a join before that is `unavailable`.
    crate::process::ready(&doomed).await?;
    let survivor = TestGateway::with_redis(
        &topo.url(),
        &[("AUTH_JWT_SECRET", SECRET), ("PRESENCE_TTL_SECS", "5")],
    )
    .await?;
    let doomed_url = doomed.ws_url("");
    let (_ann, _, _) = join_as(doomed_url.trim_end_matches('/'), "u-ann", "Ann", "kill").await?;
    let (mut bob, count, _) = join_as(&base(&survivor), "u-bob", "Bob", "kill").await?;
    ensure!(count == 2);
    ensure!(diff(&mut bob).await? == (vec!["u-bob".into()], vec![]));
    doomed.signal("KILL").await?;
    // Nobody says goodbye for ann; her lease runs out (5 s) and the survivor's next
    // renewal (every 1.7 s) sweeps it. WAIT (15 s) bounds "the TTL plus a few seconds".
    ensure!(diff(&mut bob).await? == (vec![], vec!["u-ann".into()]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_relayed_to_the_others_across_instances_at_most_every_two_seconds()
-> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let vars = [("AUTH_JWT_SECRET", SECRET), ("RATE_LIMIT_PER_SEC", "0")];
    let a = TestGateway::with_redis(&topo.url(), &vars).await?;
    let b = TestGateway::with_redis(&topo.url(), &vars).await?;
    let (mut ann, _, _) = join_as(&base(&a), "u-ann", "Ann", "t").await?;
    let (mut bob, _, _) = join_as(&base(&b), "u-bob", "Bob", "t").await?;
    for _ in 0..3 {
        ann.send_json(json!({"type": "typing", "room": "t"}))
            .await?;
    }
    // A message after the typing, on the same channel: everything before it has arrived.
    ann.say("t", "done typing", None).await?;
    let mut typing = 0;
    loop {
        match bob.recv_any().await? {
            ServerFrame::Typing { user, name, .. } => {
                ensure!((user.as_str(), name.as_str()) == ("u-ann", "Ann"));
                typing += 1;
            }
            ServerFrame::Message(m) if m.text == "done typing" => break,
            ServerFrame::PresenceDiff { .. } | ServerFrame::Message(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    ensure!(
        typing == 1,
        "bob got {typing} typing frames for 3 sent within 2 s"
    );
    // Ann does not get her own typing back.
    loop {
        match ann.recv_any().await? {
            ServerFrame::Typing { .. } => bail!("ann got her own typing"),
            ServerFrame::Message(m) if m.text == "done typing" => break,
            _ => {}
        }
    }
    Ok(())
}

on_both_buses!(
    count_is_exact_and_users_are_capped,
    presence_off_sends_no_presence_frames,
    a_reader_without_a_token_is_not_listed,
);

async fn count_is_exact_and_users_are_capped(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[("AUTH_JWT_SECRET", SECRET), ("PRESENCE_MAX_USERS", "2")])
        .await?;
    let mut held = Vec::new();
    for (sub, name) in [("u1", "One"), ("u2", "Two"), ("u3", "Three")] {
        held.push(join_as(&base(&gw), sub, name, "capped").await?.0);
    }
    let (_, count, users) = join_as(&base(&gw), "u4", "Four", "capped").await?;
    ensure!(count == 4 && users.len() == 2, "{count} {users:?}");
    Ok(())
}

async fn presence_off_sends_no_presence_frames(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[("PRESENCE", "off")]).await?;
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=quiet")).await?;
    c.until_joined("quiet").await?;
    c.say("quiet", "first", None).await?;
    match tokio::time::timeout(WAIT, c.recv_any()).await?? {
        ServerFrame::Message(m) => ensure!(m.text == "first"),
        other => bail!("expected the message, got {other:?}"),
    }
    if let Some(redis) = &env.redis {
        use fred::prelude::*;
        let client = redis.client().await?;
        for key in ["chat:{quiet}:presence", "chat:{quiet}:presence:users"] {
            let n: i64 = client.exists(key).await?;
            ensure!(n == 0, "PRESENCE=off wrote {key}");
        }
    }
    Ok(())
}

async fn a_reader_without_a_token_is_not_listed(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[("AUTH_JWT_SECRET", SECRET), ("AUTH_ANONYMOUS", "read")])
        .await?;
    let (mut ann, _, _) = join_as(&base(&gw), "u-ann", "Ann", "lurk").await?;
    ensure!(diff(&mut ann).await? == (vec!["u-ann".into()], vec![]));
    // A tokenless reader calling itself Ann: it gets the list, and is not on it.
    let (mut reader, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=lurk&username=Ann")).await?;
    reader.until_joined("lurk").await?;
    match reader.recv_any().await? {
        ServerFrame::Presence { count, users, .. } => {
            ensure!(count == 1 && users[0].user == "u-ann", "{count} {users:?}");
        }
        other => bail!("expected presence, got {other:?}"),
    }
    reader.close().await?;
    // The next diff ann sees is bob's join, not the reader coming or going.
    let (_bob, _, _) = join_as(&base(&gw), "u-bob", "Bob", "lurk").await?;
    ensure!(diff(&mut ann).await? == (vec!["u-bob".into()], vec![]));
    Ok(())
}
