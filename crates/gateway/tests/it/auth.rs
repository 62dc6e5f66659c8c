//! Identity and access: signed tokens checked before the upgrade (every claim, every key
//! type, JWKS rotation), names nobody can forge, room permissions, refresh and expiry, and
//! read-only anonymous clients.

// The test keys are fixtures: a missing one is a broken checkout, not a test failure.
#![allow(clippy::expect_used)]

use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame, close};
use chat_testkit::{RedisServer, TestGateway, WsClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, jwk::Jwk, jwk::JwkSet};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Env;

const SECRET: &str = "an-integration-test-secret-of-40-bytes!!";
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/keys");

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs256(claims: Value) -> String {
    sign(Algorithm::HS256, None, &claims)
}

/// Signs `claims` with the test key for `alg` (HS256: the secret).
fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&key_file("rsa.key")),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&key_file(
            kid.map_or("ec.key", |k| if k == "b" { "ec2.key" } else { "ec.key" }),
        )),
        _ => EncodingKey::from_ed_pem(&key_file("ed.key")),
    }
    .expect("test key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, &key).expect("signing")
}

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}/{name}")).expect("test key file")
}

/// A raw upgrade request; returns the HTTP status and the body.
async fn upgrade(gw: &TestGateway, query: &str, headers: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    let request = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n",
        gw.addr()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await?);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status"))?
        .parse()?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(Ok(0), |n| n.trim().parse::<usize>())?;
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Expects a 401 whose JSON body says `unauthorized` and mentions `why`.
async fn expect_401(gw: &TestGateway, token: &str, why: &str) -> anyhow::Result<()> {
    let (status, body) = upgrade(gw, &format!("?token={token}"), "").await?;
    ensure!(status == 401, "status {status} for {why}");
    let body: Value = serde_json::from_str(&body)?;
    ensure!(body["error"] == "unauthorized", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    ensure!(message.contains(why), "{message:?} should say {why:?}");
    ensure!(
        !token.is_empty() && !message.contains(token),
        "the token was echoed"
    );
    Ok(())
}

async fn gateway(env: &Env, vars: &[(&str, &str)]) -> anyhow::Result<TestGateway> {
    let mut all = vec![("AUTH_JWT_SECRET", SECRET)];
    all.extend_from_slice(vars);
    env.gateway(&all).await
}

/// Connects with `token` in the query; returns the client and `welcome`'s user.
async fn connect_as(
    gw: &TestGateway,
    token: &str,
    query: &str,
) -> anyhow::Result<(WsClient, Option<String>)> {
    let mut c = WsClient::connect(&gw.ws_url(&format!("/ws?token={token}{query}"))).await?;
    match c.recv().await? {
        ServerFrame::Welcome { user, .. } => Ok((c, user)),
        other => bail!("expected welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_the_upgrade() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = gateway(
        &env,
        &[("AUTH_JWT_ISSUER", "issuer"), ("AUTH_JWT_AUDIENCE", "chat")],
    )
    .await?;
    let good = json!({"sub": "u1", "exp": now() + 600, "iss": "issuer", "aud": "chat"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let (status, body) = upgrade(&gw, "", "").await?;
    ensure!(
        status == 401 && body.contains("required"),
        "{status} {body}"
    );
    expect_401(&gw, "not-a-jwt", "well-formed").await?;
    expect_401(&gw, &hs256(with("exp", json!(now() - 60))), "expired").await?;
    expect_401(&gw, &hs256(with("nbf", json!(now() + 60))), "not valid yet").await?;
    expect_401(&gw, &hs256(with("iss", json!("someone"))), "issuer").await?;
    expect_401(&gw, &hs256(with("aud", json!("other"))), "audience").await?;
    expect_401(&gw, &hs256(with("sub", json!(""))), "sub").await?;
    // Change the signature's first character: its last one also holds padding bits, and
    // 'A' → 'B' there can decode to the very same signature.
    let token = hs256(good.clone());
    let at = token.rfind('.').map_or(0, |dot| dot + 1);
    let mut forged = token.clone();
    let swap = if token[at..].starts_with('A') {
        "B"
    } else {
        "A"
    };
    forged.replace_range(at..=at, swap);
    expect_401(&gw, &forged, "signature").await?;
    // alg: none, and an RS256 token where only a secret is configured.
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&good));
    let (status, _) = upgrade(&gw, &format!("?token={none}"), "").await?;
    ensure!(status == 401, "alg none let in: {status}");
    expect_401(&gw, &sign(Algorithm::RS256, None, &good), "key").await?;
    // The good token, in the query or as a bearer header.
    let (_, user) = connect_as(&gw, &hs256(good.clone()), "").await?;
    ensure!(user.as_deref() == Some("u1"));
    let (status, _) = upgrade(
        &gw,
        "",
        &format!("Authorization: Bearer {}\r\n", hs256(good)),
    )
    .await?;
    ensure!(status == 101, "bearer header: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_es256_and_eddsa_keys_verify_their_own_tokens_only() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let claims = json!({"sub": "u1", "exp": now() + 600});
    for (file, alg) in [
        ("rsa.pub", Algorithm::RS256),
        ("ec.pub", Algorithm::ES256),
        ("ed.pub", Algorithm::EdDSA),
    ] {
        let path = format!("{KEYS}/{file}");
        let gw = env.gateway(&[("AUTH_JWT_PUBLIC_KEY_FILE", &path)]).await?;
        let (_, user) = connect_as(&gw, &sign(alg, None, &claims), "").await?;
        ensure!(user.as_deref() == Some("u1"), "{file}");
        for other in [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA] {
            if other != alg {
                let (status, _) =
                    upgrade(&gw, &format!("?token={}", sign(other, None, &claims)), "").await?;
                ensure!(status == 401, "{file} accepted a {other:?} token");
            }
        }
        // Algorithm confusion: an HS256 token whose "secret" is the public key itself.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&key_file(file))?,
        )?;
        let (status, _) = upgrade(&gw, &format!("?token={confused}"), "").await?;
        ensure!(
            status == 401,
            "{file}: HS256 with the public key as secret let in"
        );
    }
    // An unusable key file stops the start-up.
    let missing = TestGateway::start(&[("AUTH_JWT_PUBLIC_KEY_FILE", "/nonexistent.pem")]).await;
    ensure!(missing.is_err(), "a missing key file must not start");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_fetched_again_for_an_unknown_kid_at_most_so_often() -> anyhow::Result<()> {
    // A JWKS endpoint whose keys the test rotates.
    let jwk = |kid: &str, file: &str| -> anyhow::Result<Jwk> {
        let mut jwk = Jwk::from_encoding_key(
            &EncodingKey::from_ec_pem(&key_file(file))?,
            Algorithm::ES256,
        )?;
        jwk.common.key_id = Some(kid.to_owned());
        Ok(jwk)
    };
    let served = Arc::new(Mutex::new(JwkSet {
        keys: vec![jwk("a", "ec.key")?],
    }));
    let keys = served.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let keys = keys.clone();
            async move {
                axum::Json(
                    keys.lock()
                        .map(|k| k.clone())
                        .unwrap_or(JwkSet { keys: vec![] }),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jwks", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let env = Env::memory().await?;
    let gw = env.gateway(&[("AUTH_JWKS_URL", &url)]).await?;
    let claims = json!({"sub": "u1", "exp": now() + 600});
    let (_, user) = connect_as(&gw, &sign(Algorithm::ES256, Some("a"), &claims), "").await?;
    ensure!(user.as_deref() == Some("u1"));
    // Rotation: the old key goes, a new one comes; a token with the new kid makes the
    // gateway fetch the document again.
    *served.lock().map_err(|_| anyhow::anyhow!("lock"))? = JwkSet {
        keys: vec![jwk("b", "ec2.key")?],
    };
    let (_, user) = connect_as(&gw, &sign(Algorithm::ES256, Some("b"), &claims), "").await?;
    ensure!(user.as_deref() == Some("u1"));
    // Right after, another unknown kid does not make it fetch again (rate limit).
    served
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .keys
        .push(jwk("c", "ec.key")?);
    let (status, _) = upgrade(
        &gw,
        &format!("?token={}", sign(Algorithm::ES256, Some("c"), &claims)),
        "",
    )
    .await?;
    ensure!(status == 401, "a refetch within the rate limit: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_cannot_be_forged_across_instances() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let vars = [("AUTH_JWT_SECRET", SECRET)];
    let gw_a = TestGateway::with_redis(&redis.url(), &vars).await?;
    let gw_b = TestGateway::with_redis(&redis.url(), &vars).await?;
    let ann = hs256(json!({"sub": "u-ann", "name": "Ann", "exp": now() + 600}));
    let watcher = hs256(json!({"sub": "u-w", "exp": now() + 600}));
    let (mut a, _) = connect_as(&gw_a, &ann, "&room=forge&username=Mallory").await?;
    a.until_joined("forge").await?;
    let (mut b, _) = connect_as(&gw_b, &watcher, "&room=forge").await?;
    b.until_joined("forge").await?;
    a.send_json(json!({"type": "send", "room": "forge", "text": "hi", "username": "Bob"}))
        .await?;
    let m = b.recv_message().await?;
    ensure!(
        (m.username.as_str(), m.user.as_deref()) == ("Ann", Some("u-ann")),
        "{m:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_the_token_does_not_allow_is_forbidden_and_the_connection_stays()
-> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = gateway(&env, &[]).await?;
    let t = hs256(json!({"sub": "u1", "rooms": ["lobby", "team-*"], "exp": now() + 600}));
    let (mut c, _) = connect_as(&gw, &t, "&room=secret").await?;
    let (code, _) = c.recv_error().await?;
    ensure!(code == ErrorCode::Forbidden);
    c.join("team-red", None).await?;
    c.until_joined("team-red").await?;
    c.send_json(json!({"type": "join", "room": "teamx", "ref": "j"}))
        .await?;
    let (code, reference) = c.recv_error().await?;
    ensure!(code == ErrorCode::Forbidden && reference.as_deref() == Some("j"));
    c.join("lobby", None).await?;
    c.until_joined("lobby").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_renames_and_narrows_and_another_user_is_refused() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = gateway(&env, &[]).await?;
    let first = hs256(json!({"sub": "u1", "name": "Ann", "exp": now() + 600}));
    let (mut c, _) = connect_as(&gw, &first, "&room=lobby").await?;
    c.until_joined("lobby").await?;
    c.join("other", None).await?;
    c.until_joined("other").await?;
    // The same user, a new name, fewer rooms, a later expiry.
    let exp = now() + 3600;
    let second = hs256(json!({"sub": "u1", "name": "Annie", "rooms": ["lobby"], "exp": exp}));
    c.send_json(json!({"type": "refresh", "token": second}))
        .await?;
    match c.recv().await? {
        ServerFrame::Left { room } => ensure!(room == "other"),
        other => bail!("expected left, got {other:?}"),
    }
    match c.recv().await? {
        ServerFrame::Refreshed { exp: got } => ensure!(got == exp),
        other => bail!("expected refreshed, got {other:?}"),
    }
    c.say("lobby", "renamed", Some("r1")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Message(m) => {
                ensure!(m.username == "Annie");
                break;
            }
            ServerFrame::Ack { .. } => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    // Another user's token, or a bad one: refused, nothing changes.
    for (token, what) in [
        (
            hs256(json!({"sub": "u2", "exp": now() + 600})),
            "another user",
        ),
        ("garbage".to_owned(), "not a JWT"),
    ] {
        c.send_json(json!({"type": "refresh", "token": token, "ref": "x"}))
            .await?;
        loop {
            match c.recv().await? {
                ServerFrame::Error { code, .. } => {
                    ensure!(code == ErrorCode::Unauthorized, "{what}");
                    break;
                }
                ServerFrame::Ack { .. } => {}
                other => bail!("{what}: unexpected {other:?}"),
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_the_connection_with_4001() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = gateway(&env, &[]).await?;
    // Past its exp, but within the 5 s leeway: accepted now, expired a second later.
    let t = hs256(json!({"sub": "u1", "exp": now() - 4}));
    let (mut c, _) = connect_as(&gw, &t, "").await?;
    ensure!(c.closed().await? == Some(close::TOKEN_EXPIRED));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_read_lets_token_less_clients_read_but_not_write() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = gateway(&env, &[("AUTH_ANONYMOUS", "read")]).await?;
    let (mut reader, _) = WsClient::connect_ws(&gw.ws_url("/ws?room=open")).await?;
    reader.until_joined("open").await?;
    let t = hs256(json!({"sub": "u1", "name": "Ann", "exp": now() + 600}));
    let (mut writer, _) = connect_as(&gw, &t, "&room=open").await?;
    writer.until_joined("open").await?;
    writer.say("open", "for everyone", None).await?;
    let m = reader.recv_message().await?;
    ensure!(m.text == "for everyone" && m.user.as_deref() == Some("u1"));
    reader.say("open", "me too", Some("w")).await?;
    let (code, reference) = reader.recv_error().await?;
    ensure!(code == ErrorCode::Unauthorized && reference.as_deref() == Some("w"));
    // A bad token is still refused, even though no token would do.
    let (status, _) = upgrade(&gw, "?token=bad", "").await?;
    ensure!(status == 401);
    Ok(())
}
