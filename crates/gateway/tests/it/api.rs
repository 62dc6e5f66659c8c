//! The server API (`/api/*`, docs/api.md): off without `API_KEY`; keys (rotation, wrong
//! ones); a post takes the WebSocket path (next id, every instance, the exact frame
//! clients get) and is idempotent; history pages; a room's counters; presence; error
//! codes; reads with user tokens; and the OpenAPI document against what is served.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, ensure};
use chat_testkit::{TestGateway, Topology, WsClient};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{Env, connect, on_both_buses};

const KEY: &str = "first-api-key-0123456789";
const OTHER_KEY: &str = "second-api-key-0123456789";
const SECRET: &str = "an-api-test-secret-of-at-least-40-bytes!";

/// Both keys configured (rotation).
const KEYS: (&str, &str) = (
    "API_KEY",
    "first-api-key-0123456789,second-api-key-0123456789",
);

/// One HTTP exchange: the status and the body as sent.
async fn call(
    gw: &TestGateway,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut request = reqwest::Client::new().request(method, gw.http_url(path));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = tokio::time::timeout(chat_testkit::WAIT, request.send()).await??;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn post(gw: &TestGateway, room: &str, body: Value) -> anyhow::Result<(u16, String)> {
    let path = format!("/api/rooms/{room}/messages");
    call(gw, Method::POST, &path, Some(KEY), Some(&body.to_string())).await
}

async fn get(gw: &TestGateway, path: &str, bearer: Option<&str>) -> anyhow::Result<(u16, Value)> {
    let (status, body) = call(gw, Method::GET, path, bearer, None).await?;
    let value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
    Ok((status, value))
}

/// Expects an error answer: its status and its `{"error","message"}` body.
fn refused(answer: (u16, String), status: u16, code: &str) -> anyhow::Result<()> {
    let (got, body) = answer;
    let value: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    let fields: BTreeSet<&str> = value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    ensure!(
        got == status
            && value["error"] == code
            && value["message"].is_string()
            && fields == BTreeSet::from(["error", "message"]),
        "expected {status} {code}, got {got} {body}"
    );
    Ok(())
}

/// The next `message` frame's exact text (other frames, such as presence, are skipped).
async fn next_message(c: &mut WsClient) -> anyhow::Result<String> {
    loop {
        let text = c.recv_text().await?;
        if serde_json::from_str::<Value>(&text)?["type"] == "message" {
            return Ok(text);
        }
    }
}

fn token(sub: &str, rooms: Option<Vec<&str>>) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    Ok(chat_gateway::auth::sign_hs256(
        SECRET,
        &chat_gateway::auth::NewToken {
            sub,
            name: None,
            rooms,
            iat: now,
            exp: now + 600,
        },
    )?)
}

on_both_buses!(
    the_api_is_not_there_without_a_key,
    keys_are_checked_and_either_of_two_works,
    a_repeated_idempotency_key_answers_the_original,
    pages_walk_back_through_what_is_retained,
    a_room_tells_its_counters_and_presence,
    refusals_carry_the_websocket_error_codes,
    reads_take_a_user_token_that_allows_the_room,
    the_document_describes_exactly_what_is_served,
);

async fn the_api_is_not_there_without_a_key(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    for (method, path) in [
        (Method::GET, "/api/openapi.json"),
        (Method::GET, "/api/rooms/r/messages"),
        (Method::POST, "/api/rooms/r/messages"),
        (Method::GET, "/api/rooms/r"),
        (Method::GET, "/api/rooms/r/presence"),
        (Method::GET, "/api"),
    ] {
        let (status, _) = call(
            &gw,
            method.clone(),
            path,
            Some(KEY),
            Some("{\"text\":\"x\"}"),
        )
        .await?;
        ensure!(status == 404, "{method} {path}: {status}");
    }
    // The rest of the gateway is unchanged.
    ensure!(gw.get_status("/healthz").await? == 200);
    Ok(())
}

async fn keys_are_checked_and_either_of_two_works(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS]).await?;
    let path = "/api/rooms/keys/messages";
    let body = Some("{\"text\":\"hi\"}");
    refused(
        call(&gw, Method::POST, path, None, body).await?,
        401,
        "unauthorized",
    )?;
    for wrong in ["first-api-key-012345678", "first-api-key-01234567890", "x"] {
        refused(
            call(&gw, Method::POST, path, Some(wrong), body).await?,
            401,
            "unauthorized",
        )?;
    }
    // Another scheme is no credential.
    let basic = reqwest::Client::new()
        .post(gw.http_url(path))
        .header("authorization", format!("Basic {KEY}"))
        .body("{\"text\":\"hi\"}")
        .send()
        .await?;
    ensure!(basic.status() == 401 && basic.headers()["www-authenticate"] == "Bearer");
    let (first, a) = call(&gw, Method::POST, path, Some(KEY), body).await?;
    let (second, b) = call(&gw, Method::POST, path, Some(OTHER_KEY), body).await?;
    ensure!(first == 201 && second == 201, "{first} {a} / {second} {b}");
    let (a, b): (Value, Value) = (serde_json::from_str(&a)?, serde_json::from_str(&b)?);
    ensure!(a["id"] == 1 && b["id"] == 2, "{a} {b}");
    // Reads need nothing with authentication off, but a credential given must be valid.
    ensure!(get(&gw, path, None).await?.0 == 200);
    ensure!(get(&gw, path, Some(OTHER_KEY)).await?.0 == 200);
    refused(
        call(&gw, Method::GET, path, Some("nope"), None).await?,
        401,
        "unauthorized",
    )?;
    Ok(())
}

/// Posts through `a` and `b` reach clients of both, with the room's next id and exactly
/// the frame they receive; a retry on the other instance gets the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_reaches_clients_on_every_instance() -> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let a = TestGateway::with_redis(&topo.url(), &[KEYS]).await?;
    let b = TestGateway::with_redis(&topo.url(), &[KEYS]).await?;
    let (mut on_a, _) = connect(&a, "?room=lobby", "lobby").await?;
    let (mut on_b, _) = connect(&b, "?room=lobby", "lobby").await?;
    on_a.say("lobby", "from a socket", None).await?;
    for c in [&mut on_a, &mut on_b] {
        let first: Value = serde_json::from_str(&next_message(c).await?)?;
        ensure!(first["id"] == 1, "{first}");
    }
    let body = json!({"text": "from a backend", "user": "bot-7", "idempotency_key": "k-1"});
    let (status, frame) = post(&b, "lobby", body.clone()).await?;
    ensure!(status == 201, "{status} {frame}");
    for c in [&mut on_a, &mut on_b] {
        let seen = next_message(c).await?;
        ensure!(
            seen == frame,
            "clients got {seen}, the API answered {frame}"
        );
    }
    let value: Value = serde_json::from_str(&frame)?;
    ensure!(
        value["id"] == 2
            && value["room"] == "lobby"
            && value["username"] == "bot-7"
            && value["user"] == "bot-7"
            && value["text"] == "from a backend",
        "{value}"
    );
    // The retry, through the other instance: the original, and nothing published.
    let (status, again) = post(&a, "lobby", body).await?;
    ensure!(status == 200 && again == frame, "{status} {again}");
    let (status, next) = post(&a, "lobby", json!({"text": "next"})).await?;
    ensure!(status == 201);
    for c in [&mut on_a, &mut on_b] {
        ensure!(next_message(c).await? == next, "the retry was published");
    }
    Ok(())
}

async fn a_repeated_idempotency_key_answers_the_original(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS]).await?;
    let first = json!({"text": "once", "idempotency_key": "order-17"});
    let (status, original) = post(&gw, "idem", first).await?;
    ensure!(status == 201, "{status} {original}");
    // Whatever the retry says, and whichever key it uses, the original is the answer.
    let retry = json!({"text": "twice?", "username": "x", "idempotency_key": "order-17"});
    let body = retry.to_string();
    let path = "/api/rooms/idem/messages";
    let (status, again) = call(&gw, Method::POST, path, Some(OTHER_KEY), Some(&body)).await?;
    ensure!(status == 200 && again == original, "{status} {again}");
    // Another key is another message; the same key in another room too.
    for (room, text, key) in [("idem", "b", "order-18"), ("idem2", "c", "order-17")] {
        let (status, _) = post(&gw, room, json!({"text": text, "idempotency_key": key})).await?;
        ensure!(status == 201);
    }
    let (_, page) = get(&gw, path, Some(KEY)).await?;
    let texts: Vec<&Value> = page["messages"]
        .as_array()
        .context("messages")?
        .iter()
        .map(|m| &m["text"])
        .collect();
    ensure!(texts == [&json!("once"), &json!("b")], "{page}");
    Ok(())
}

async fn pages_walk_back_through_what_is_retained(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS, ("HISTORY_SIZE", "7")]).await?;
    let mut frames = BTreeMap::new();
    for i in 1..=10u64 {
        let (status, frame) = post(&gw, "pages", json!({"text": format!("m{i}")})).await?;
        ensure!(status == 201, "{status} {frame}");
        frames.insert(i, frame);
    }
    // Retained: 4..=10. Each page holds exactly the stored frames, oldest first.
    let check = |page: &Value, raw: &str, ids: &[u64], more: bool| -> anyhow::Result<()> {
        let got: Vec<u64> = page["messages"]
            .as_array()
            .context("messages")?
            .iter()
            .filter_map(|m| m["id"].as_u64())
            .collect();
        ensure!(
            got == ids
                && page["has_more"] == more
                && page["last_id"] == 10
                && page["room"] == "pages"
                && page["epoch"].is_string(),
            "expected {ids:?} (more: {more}), got {page}"
        );
        for id in ids {
            ensure!(
                raw.contains(&frames[id]),
                "{id} is not the stored frame in {raw}"
            );
        }
        Ok(())
    };
    let mut seen = Vec::new();
    let mut before: Option<u64> = None;
    for (ids, more) in [
        (&[8u64, 9, 10][..], true),
        (&[5, 6, 7], true),
        (&[4], false),
    ] {
        let path = match before {
            Some(b) => format!("/api/rooms/pages/messages?limit=3&before={b}"),
            None => "/api/rooms/pages/messages?limit=3".to_owned(),
        };
        let (status, raw) = call(&gw, Method::GET, &path, Some(KEY), None).await?;
        ensure!(status == 200, "{path}: {status} {raw}");
        let page: Value = serde_json::from_str(&raw)?;
        check(&page, &raw, ids, more)?;
        before = ids.first().copied();
        seen.extend_from_slice(ids);
    }
    seen.sort_unstable();
    ensure!(seen == (4..=10).collect::<Vec<_>>());
    // Past the oldest: nothing. Without a limit: 50, so all of it.
    let (_, raw) = call(
        &gw,
        Method::GET,
        "/api/rooms/pages/messages?before=4",
        Some(KEY),
        None,
    )
    .await?;
    check(&serde_json::from_str(&raw)?, &raw, &[], false)?;
    let (_, raw) = call(&gw, Method::GET, "/api/rooms/pages/messages", None, None).await?;
    check(
        &serde_json::from_str(&raw)?,
        &raw,
        &[4, 5, 6, 7, 8, 9, 10],
        false,
    )?;
    let (_, raw) = call(
        &gw,
        Method::GET,
        "/api/rooms/pages/messages?limit=200&before=6",
        None,
        None,
    )
    .await?;
    check(&serde_json::from_str(&raw)?, &raw, &[4, 5], false)?;
    Ok(())
}

async fn a_room_tells_its_counters_and_presence(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS, ("HISTORY_SIZE", "5")]).await?;
    let (status, empty) = get(&gw, "/api/rooms/quiet", Some(KEY)).await?;
    ensure!(
        status == 200
            && empty["room"] == "quiet"
            && empty["last_id"] == 0
            && empty["retained"] == 0,
        "{empty}"
    );
    for i in 1..=3 {
        post(&gw, "busy", json!({"text": format!("m{i}")})).await?;
    }
    let (_, three) = get(&gw, "/api/rooms/busy", None).await?;
    ensure!(three["last_id"] == 3 && three["retained"] == 3, "{three}");
    for i in 4..=8 {
        post(&gw, "busy", json!({"text": format!("m{i}")})).await?;
    }
    let (_, full) = get(&gw, "/api/rooms/busy", Some(KEY)).await?;
    let (_, page) = get(&gw, "/api/rooms/busy/messages", Some(KEY)).await?;
    ensure!(
        full["last_id"] == 8
            && full["retained"] == 5
            && full["epoch"].is_string()
            && full["epoch"] == page["epoch"],
        "{full} / {page}"
    );
    let fields: BTreeSet<&String> = full.as_object().context("object")?.keys().collect();
    ensure!(
        fields
            .iter()
            .map(|f| f.as_str())
            .eq(["epoch", "last_id", "retained", "room"])
    );
    // Presence: ann is listed once her own join has been announced.
    let (mut c, _) = connect(&gw, "?room=busy&username=ann", "busy").await?;
    loop {
        if let chat_protocol::ServerFrame::PresenceDiff { .. } = c.recv_any().await? {
            break;
        }
    }
    let (status, presence) = get(&gw, "/api/rooms/busy/presence", Some(KEY)).await?;
    ensure!(
        status == 200
            && presence["room"] == "busy"
            && presence["count"] == 1
            && presence["users"][0]["name"] == "ann"
            && presence["users"][0]["user"]
                .as_str()
                .is_some_and(|u| u.starts_with("anon-")),
        "{presence}"
    );
    Ok(())
}

async fn refusals_carry_the_websocket_error_codes(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[KEYS, ("MAX_TEXT_BYTES", "16"), ("MAX_FRAME_BYTES", "1024")])
        .await?;
    let raw = |body: &str| {
        let body = body.to_owned();
        let gw = &gw;
        async move {
            call(
                gw,
                Method::POST,
                "/api/rooms/r/messages",
                Some(KEY),
                Some(&body),
            )
            .await
        }
    };
    for room in ["bad%20room", "%C3%A9t%C3%A9", &"x".repeat(65)] {
        let path = format!("/api/rooms/{room}/messages");
        let body = Some("{\"text\":\"hi\"}");
        refused(
            call(&gw, Method::POST, &path, Some(KEY), body).await?,
            400,
            "invalid_room",
        )?;
        refused(
            call(&gw, Method::GET, &path, Some(KEY), None).await?,
            400,
            "invalid_room",
        )?;
        let path = format!("/api/rooms/{room}");
        refused(
            call(&gw, Method::GET, &path, None, None).await?,
            400,
            "invalid_room",
        )?;
    }
    for body in [
        "not json",
        "",
        "[\"hi\"]",
        "{}",
        "{\"text\":5}",
        "{\"text\":\"\"}",
        "{\"text\":\"hi\",\"user\":\"\"}",
        "{\"text\":\"hi\",\"idempotency_key\":\"\"}",
    ] {
        refused(raw(body).await?, 400, "bad_request").with_context(|| body.to_owned())?;
    }
    let long_key = json!({"text": "hi", "idempotency_key": "k".repeat(129)}).to_string();
    refused(raw(&long_key).await?, 400, "bad_request")?;
    let nameless = json!({"text": "hi", "username": "  \u{200b} "}).to_string();
    refused(raw(&nameless).await?, 400, "invalid_username")?;
    let long_user = json!({"text": "hi", "user": "u".repeat(40)}).to_string();
    refused(raw(&long_user).await?, 400, "invalid_username")?;
    refused(
        raw(&json!({"text": "x".repeat(17)}).to_string()).await?,
        413,
        "too_large",
    )?;
    refused(
        raw(&json!({"text": "é".repeat(9)}).to_string()).await?,
        413,
        "too_large",
    )?;
    let huge = json!({"text": "hi", "pad": "x".repeat(2000)}).to_string();
    refused(raw(&huge).await?, 413, "too_large")?;
    // At the limit: accepted, with the name and no user.
    let (status, frame) =
        raw(&json!({"text": "x".repeat(16), "username": "ann"}).to_string()).await?;
    let frame: Value = serde_json::from_str(&frame)?;
    ensure!(
        status == 201 && frame["username"] == "ann" && frame.get("user").is_none(),
        "{frame}"
    );
    for query in ["limit=0", "limit=201", "limit=x", "before=-1", "before=x"] {
        let path = format!("/api/rooms/r/messages?{query}");
        refused(
            call(&gw, Method::GET, &path, Some(KEY), None).await?,
            400,
            "bad_request",
        )
        .with_context(|| query.to_owned())?;
    }
    Ok(())
}

/// `retained` is right when instances disagree on `HISTORY_SIZE` (a rolling change):
/// each counts what it serves, the newest `HISTORY_SIZE` of what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_is_counted_whatever_history_size_says() -> anyhow::Result<()> {
    let topo = Topology::standalone().await?;
    let long = TestGateway::with_redis(&topo.url(), &[KEYS, ("HISTORY_SIZE", "10")]).await?;
    let short = TestGateway::with_redis(&topo.url(), &[KEYS, ("HISTORY_SIZE", "5")]).await?;
    for i in 1..=8 {
        post(&long, "sizes", json!({"text": format!("m{i}")})).await?;
    }
    for (gw, retained) in [(&long, 8), (&short, 5)] {
        let (_, room) = get(gw, "/api/rooms/sizes", Some(KEY)).await?;
        ensure!(
            room["last_id"] == 8 && room["retained"] == retained,
            "{room}"
        );
    }
    // The short one trims to 5 when it publishes.
    post(&short, "sizes", json!({"text": "m9"})).await?;
    for gw in [&long, &short] {
        let (_, room) = get(gw, "/api/rooms/sizes", Some(KEY)).await?;
        ensure!(room["last_id"] == 9 && room["retained"] == 5, "{room}");
    }
    Ok(())
}

/// A bus that cannot be reached is `unavailable`, without its detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_failure_is_unavailable_and_says_no_more() -> anyhow::Result<()> {
    let mut env = Env::redis().await?;
    let gw = env.gateway(&[KEYS]).await?;
    ensure!(post(&gw, "down", json!({"text": "up"})).await?.0 == 201);
    env.redis.as_mut().context("redis")?.kill().await;
    crate::eventually("the bus to notice", || async {
        gw.get_status("/readyz").await.ok() == Some(503)
    })
    .await?;
    let answers = [
        post(&gw, "down", json!({"text": "lost"})).await?,
        call(
            &gw,
            Method::GET,
            "/api/rooms/down/messages",
            Some(KEY),
            None,
        )
        .await?,
        call(&gw, Method::GET, "/api/rooms/down", Some(KEY), None).await?,
    ];
    for answer in answers {
        let body = answer.1.clone();
        refused(answer, 503, "unavailable")?;
        let lower = body.to_lowercase();
        ensure!(
            !lower.contains("redis") && !lower.contains("127.0.0.1"),
            "{body}"
        );
    }
    Ok(())
}

async fn reads_take_a_user_token_that_allows_the_room(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS, ("AUTH_JWT_SECRET", SECRET)]).await?;
    post(&gw, "team-a", json!({"text": "for the team"})).await?;
    let team = token("u-1", Some(vec!["team-*"]))?;
    let anywhere = token("u-2", None)?;
    for path in [
        "/api/rooms/team-a/messages",
        "/api/rooms/team-a",
        "/api/rooms/team-a/presence",
    ] {
        ensure!(get(&gw, path, Some(&team)).await?.0 == 200, "{path}");
        ensure!(get(&gw, path, Some(&anywhere)).await?.0 == 200, "{path}");
        ensure!(get(&gw, path, Some(KEY)).await?.0 == 200, "{path}");
        refused(
            call(&gw, Method::GET, path, None, None).await?,
            401,
            "unauthorized",
        )?;
        refused(
            call(&gw, Method::GET, path, Some("not.a.jwt"), None).await?,
            401,
            "unauthorized",
        )?;
    }
    for path in [
        "/api/rooms/other/messages",
        "/api/rooms/other",
        "/api/rooms/other/presence",
    ] {
        refused(
            call(&gw, Method::GET, path, Some(&team), None).await?,
            403,
            "forbidden",
        )?;
        ensure!(get(&gw, path, Some(KEY)).await?.0 == 200, "{path}");
    }
    let (_, page) = get(&gw, "/api/rooms/team-a/messages", Some(&team)).await?;
    ensure!(page["messages"][0]["text"] == "for the team", "{page}");
    // Writing takes the API key: a user token is not one.
    let body = Some("{\"text\":\"mine\"}");
    let path = "/api/rooms/team-a/messages";
    refused(
        call(&gw, Method::POST, path, Some(&anywhere), body).await?,
        401,
        "unauthorized",
    )?;
    // With anonymous readers allowed, a read needs no credential (a bad one is refused).
    let open = env
        .gateway(&[
            KEYS,
            ("AUTH_JWT_SECRET", SECRET),
            ("AUTH_ANONYMOUS", "read"),
        ])
        .await?;
    ensure!(get(&open, path, None).await?.0 == 200);
    refused(
        call(&open, Method::GET, path, Some("not.a.jwt"), None).await?,
        401,
        "unauthorized",
    )?;
    Ok(())
}

/// Every route the API serves, with its methods and documented response codes.
fn served() -> BTreeMap<(&'static str, &'static str), Vec<&'static str>> {
    let read = vec!["200", "400", "401", "403", "503"];
    BTreeMap::from([
        (
            ("/api/rooms/{room}/messages", "post"),
            vec!["200", "201", "400", "401", "413", "503"],
        ),
        (("/api/rooms/{room}/messages", "get"), read.clone()),
        (("/api/rooms/{room}", "get"), read.clone()),
        (("/api/rooms/{room}/presence", "get"), read),
        (("/api/openapi.json", "get"), vec!["200"]),
    ])
}

async fn the_document_describes_exactly_what_is_served(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[KEYS]).await?;
    let (status, doc) = get(&gw, "/api/openapi.json", None).await?;
    ensure!(status == 200, "{status}");
    ensure!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    ensure!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let scheme = &doc["components"]["securitySchemes"]["api_key"];
    ensure!(
        scheme["type"] == "http" && scheme["scheme"] == "bearer",
        "{scheme}"
    );
    // The document lists exactly the served operations, with their codes.
    let mut documented = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().context("paths")? {
        for (method, op) in item.as_object().context("path item")? {
            let codes: Vec<&str> = op["responses"]
                .as_object()
                .context("responses")?
                .keys()
                .map(String::as_str)
                .collect();
            ensure!(op["operationId"].is_string() && op["summary"].is_string());
            documented.insert((path.as_str(), method.as_str()), codes);
        }
    }
    let expected = served();
    ensure!(documented == expected, "documented {documented:?}");
    // Every $ref points at a schema the document has.
    let schemas = doc["components"]["schemas"]
        .as_object()
        .context("schemas")?;
    let text = doc.to_string();
    for part in text.split("\"$ref\":\"").skip(1) {
        let target = part.split('"').next().unwrap_or_default();
        let name = target
            .strip_prefix("#/components/schemas/")
            .with_context(|| format!("unexpected $ref {target}"))?;
        ensure!(schemas.contains_key(name), "dangling $ref {target}");
    }
    // And the router serves what the document says: each documented operation answers
    // one of its codes; other methods on its path are 405; other paths are 404.
    let body = json!({"text": "documented"}).to_string();
    for ((path, method), codes) in &expected {
        let url = path.replace("{room}", "doc");
        let method: Method = method.to_uppercase().parse()?;
        let (status, answer) = call(&gw, method.clone(), &url, Some(KEY), Some(&body)).await?;
        ensure!(
            codes.contains(&status.to_string().as_str()),
            "{method} {url}: {status} {answer}"
        );
        for other in [
            Method::POST,
            Method::GET,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            let name = other.as_str().to_lowercase();
            if expected.contains_key(&(*path, name.as_str())) {
                continue;
            }
            let (status, _) = call(&gw, other.clone(), &url, Some(KEY), None).await?;
            ensure!(status == 405, "{other} {url}: {status}");
        }
    }
    for path in [
        "/api",
        "/api/rooms",
        "/api/rooms/doc/other",
        "/api/openapi.yaml",
    ] {
        let (status, _) = call(&gw, Method::GET, path, Some(KEY), None).await?;
        ensure!(status == 404, "{path}: {status}");
    }
    Ok(())
}
