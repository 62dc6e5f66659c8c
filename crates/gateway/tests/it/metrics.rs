//! `/metrics` (docs/operations.md, "Metrics"): the exposition parses with a Prometheus
//! text parser and holds every series from start-up; the counters move as a message
//! crosses two instances, as clients are refused, closed or sent errors, and as Redis
//! goes down and comes back; `METRICS_PORT` moves it off the public port. And the logs:
//! a connection's lines carry its `conn`, `instance` and `user`, never a message's text
//! or a token.

use anyhow::{Context, ensure};
use chat_protocol::ServerFrame;
use chat_testkit::{GatewayProcess, RedisServer, TestGateway, Topology, WsClient};
use prometheus_parse::{Sample, Scrape, Value};

use crate::{Env, connect, on_both_buses};

on_both_buses!(
    every_series_is_there_from_start_up,
    refusals_closes_and_errors_are_counted,
);

/// The series the dashboard and the alerts depend on (issue 14), by type.
const COUNTERS: &[&str] = &[
    "chat_connections_opened_total",
    "chat_messages_received_total",
    "chat_messages_published_total",
    "chat_messages_delivered_total",
    "chat_bytes_sent_total",
    "chat_redis_reconnects_total",
    "chat_gaps_detected_total",
    "chat_backfilled_messages_total",
    "chat_epoch_resets_total",
];
const GAUGES: &[&str] = &[
    "chat_rooms_served",
    "chat_room_subscriptions",
    "chat_redis_up",
];
const HISTOGRAMS: &[&str] = &["chat_publish_duration_seconds", "chat_delivery_lag_seconds"];

/// One scrape, parsed.
pub(crate) struct Metrics(Scrape);

impl Metrics {
    /// GET `/metrics` where `gw` serves it, checks the content type and parses the body.
    pub(crate) async fn of(gw: &TestGateway) -> anyhow::Result<Self> {
        let addr = gw.metrics_addr().unwrap_or(gw.addr());
        let response = reqwest::get(format!("http://{addr}/metrics")).await?;
        ensure!(
            response.status() == 200,
            "GET /metrics: {}",
            response.status()
        );
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        ensure!(kind.starts_with("text/plain"), "content type {kind}");
        let body = response.text().await?;
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?;
        ensure!(!scrape.samples.is_empty(), "nothing parsed from {body}");
        Ok(Metrics(scrape))
    }

    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Sample> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    }

    /// The value of a counter or gauge (a histogram's `_count` and `_sum` too).
    pub(crate) fn value(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let sample = self
            .find(name, labels)
            .with_context(|| format!("no series {name}{labels:?}"))?;
        match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Ok(v),
            ref other => anyhow::bail!("{name} is {other:?}"),
        }
    }

    fn get(&self, name: &str) -> anyhow::Result<f64> {
        self.value(name, &[])
    }
}

/// Scrapes until `check` holds: the counters a connection's end moves are updated by
/// the server after the client has seen the close.
pub(crate) async fn until(
    gw: &TestGateway,
    what: &str,
    check: impl Fn(&Metrics) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + chat_testkit::WAIT;
    loop {
        let m = Metrics::of(gw).await?;
        if check(&m)? {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn every_series_is_there_from_start_up(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    let m = Metrics::of(&gw).await?;
    for name in COUNTERS {
        let sample = m.find(name, &[]).with_context(|| format!("no {name}"))?;
        ensure!(
            sample.value == Value::Counter(0.0),
            "{name}: {:?}",
            sample.value
        );
    }
    for name in GAUGES {
        ensure!(
            matches!(m.find(name, &[]).map(|s| &s.value), Some(Value::Gauge(_))),
            "{name}"
        );
    }
    // The bus is connected: an in-process bus always, a Redis once subscribed.
    ensure!(m.get("chat_redis_up")? == 1.0);
    ensure!(m.get("chat_rooms_served")? == 0.0);
    ensure!(m.get("chat_room_subscriptions")? == 0.0);
    for name in HISTOGRAMS {
        let buckets = m.find(name, &[]).with_context(|| format!("no {name}"))?;
        let Value::Histogram(ref buckets) = buckets.value else {
            anyhow::bail!("{name} is not a histogram: {:?}", buckets.value);
        };
        ensure!(buckets.len() > 5, "{name}: {} buckets", buckets.len());
        ensure!(
            buckets.iter().all(|b| b.count == 0.0),
            "{name}: {buckets:?}"
        );
        ensure!(m.get(&format!("{name}_count"))? == 0.0);
        ensure!(m.get(&format!("{name}_sum"))? == 0.0);
    }
    for endpoint in ["ws", "websocket"] {
        ensure!(m.value("chat_connections", &[("endpoint", endpoint)])? == 0.0);
    }
    for reason in ["origin", "limit", "auth", "shutdown"] {
        ensure!(m.value("chat_connections_refused_total", &[("reason", reason)])? == 0.0);
    }
    for code in [
        "1000", "1001", "1008", "1009", "1012", "1013", "4001", "none",
    ] {
        ensure!(m.value("chat_connections_closed_total", &[("code", code)])? == 0.0);
    }
    for code in ["bad_request", "not_joined", "rate_limited", "unavailable"] {
        ensure!(m.value("chat_errors_total", &[("code", code)])? == 0.0);
    }
    let version = env!("CARGO_PKG_VERSION");
    ensure!(m.value("chat_build_info", &[("version", version)])? == 1.0);
    Ok(())
}

async fn refusals_closes_and_errors_are_counted(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[
            ("ALLOWED_ORIGINS", "https://chat.example"),
            ("MAX_CONNECTIONS", "2"),
        ])
        .await?;
    // Refused by origin, twice, on either endpoint.
    for path in ["/ws", "/websocket"] {
        let evil = [("Origin", "https://evil.example")];
        let refused = WsClient::connect_with_headers(&gw.ws_url(path), &evil).await?;
        ensure!(matches!(refused, Err(403)), "{path}: not refused");
    }
    // Two connections (one per endpoint), then the limit.
    let (mut a, _) = connect(&gw, "?room=m", "m").await?;
    let legacy = WsClient::connect(&gw.ws_url("/websocket")).await?;
    let over = WsClient::connect_with_headers(&gw.ws_url("/ws"), &[]).await?;
    ensure!(over.is_err(), "a third connection was let in");
    // An error frame: a send to a room not joined.
    a.send_json(serde_json::json!({"type": "send", "room": "elsewhere", "text": "hi", "ref": "1"}))
        .await?;
    let (code, _) = a.recv_error().await?;
    ensure!(code == chat_protocol::ErrorCode::NotJoined, "{code:?}");

    let m = Metrics::of(&gw).await?;
    ensure!(m.value("chat_connections_refused_total", &[("reason", "origin")])? == 2.0);
    ensure!(m.value("chat_connections_refused_total", &[("reason", "limit")])? == 1.0);
    ensure!(m.value("chat_connections", &[("endpoint", "ws")])? == 1.0);
    ensure!(m.value("chat_connections", &[("endpoint", "websocket")])? == 1.0);
    ensure!(m.get("chat_connections_opened_total")? == 2.0);
    ensure!(m.value("chat_errors_total", &[("code", "not_joined")])? == 1.0);
    ensure!(m.get("chat_rooms_served")? >= 1.0);

    // A client's own close code, and a peer that vanishes without one.
    a.close().await?;
    drop(legacy);
    until(&gw, "both closes counted", |m| {
        Ok(
            m.value("chat_connections_closed_total", &[("code", "1000")])? == 1.0
                && m.value("chat_connections_closed_total", &[("code", "none")])? == 1.0,
        )
    })
    .await?;
    let m = Metrics::of(&gw).await?;
    ensure!(m.value("chat_connections", &[("endpoint", "ws")])? == 0.0);
    ensure!(m.value("chat_connections", &[("endpoint", "websocket")])? == 0.0);
    Ok(())
}

/// A message sent on A: received and published once on A, delivered on both, with a
/// publish latency on A and a delivery lag on both.
async fn a_message_crossing_two_instances(topology: Topology) -> anyhow::Result<()> {
    let url = topology.url();
    let a = TestGateway::with_redis(&url, &[("INSTANCE_ID", "gw-a")]).await?;
    let b = TestGateway::with_redis(&url, &[("INSTANCE_ID", "gw-b")]).await?;
    let (mut on_a, _) = connect(&a, "?room=lobby", "lobby").await?;
    let (mut on_b, _) = connect(&b, "?room=lobby", "lobby").await?;
    on_a.say("lobby", "hello across", Some("r1")).await?;
    let mut acked = false;
    let mut got = false;
    while !(acked && got) {
        match on_a.recv().await? {
            ServerFrame::Ack { .. } => acked = true,
            ServerFrame::Message(m) if m.text == "hello across" => got = true,
            _ => {}
        }
    }
    ensure!(on_b.recv_message().await?.text == "hello across");

    let (ma, mb) = (Metrics::of(&a).await?, Metrics::of(&b).await?);
    ensure!(ma.get("chat_messages_received_total")? == 1.0);
    ensure!(ma.get("chat_messages_published_total")? == 1.0);
    ensure!(ma.get("chat_messages_delivered_total")? == 1.0);
    ensure!(ma.get("chat_publish_duration_seconds_count")? == 1.0);
    ensure!(ma.get("chat_delivery_lag_seconds_count")? == 1.0);
    ensure!(mb.get("chat_messages_received_total")? == 0.0);
    ensure!(mb.get("chat_messages_published_total")? == 0.0);
    ensure!(mb.get("chat_messages_delivered_total")? == 1.0);
    ensure!(mb.get("chat_publish_duration_seconds_count")? == 0.0);
    ensure!(mb.get("chat_delivery_lag_seconds_count")? == 1.0);
    for m in [&ma, &mb] {
        ensure!(m.get("chat_rooms_served")? == 1.0);
        ensure!(m.get("chat_room_subscriptions")? == 1.0);
        ensure!(m.get("chat_bytes_sent_total")? > 0.0);
        ensure!(m.get("chat_gaps_detected_total")? == 0.0);
        ensure!(m.get("chat_redis_up")? == 1.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crossing_two_instances_standalone() -> anyhow::Result<()> {
    a_message_crossing_two_instances(Topology::standalone().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crossing_two_instances_cluster() -> anyhow::Result<()> {
    a_message_crossing_two_instances(Topology::cluster().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_shows_and_its_return_counts_a_reconnect() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[]).await?;
    let m = Metrics::of(&gw).await?;
    ensure!(m.get("chat_redis_up")? == 1.0);
    ensure!(m.get("chat_redis_reconnects_total")? == 0.0);
    redis.kill().await;
    until(&gw, "chat_redis_up 0", |m| {
        Ok(m.get("chat_redis_up")? == 0.0)
    })
    .await?;
    redis.restart().await?;
    until(&gw, "chat_redis_up 1 again", |m| {
        Ok(m.get("chat_redis_up")? == 1.0)
    })
    .await?;
    until(&gw, "one reconnect", |m| {
        Ok(m.get("chat_redis_reconnects_total")? == 1.0)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_port_takes_metrics_off_the_public_port() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let public = env.gateway(&[]).await?;
    ensure!(public.metrics_addr().is_none());
    ensure!(public.get_status("/metrics").await? == 200);

    let gw = env.gateway(&[("METRICS_PORT", "0")]).await?;
    let private = gw.metrics_addr().context("no metrics listener")?;
    ensure!(private.port() != gw.addr().port());
    ensure!(gw.get_status("/metrics").await? == 404, "still public");
    Metrics::of(&gw).await?;
    // The metrics port serves nothing else.
    for path in ["/", "/ws", "/readyz", "/api/openapi.json"] {
        let status = reqwest::get(format!("http://{private}{path}"))
            .await?
            .status();
        ensure!(status == 404, "{path} on the metrics port: {status}");
    }
    Ok(())
}

/// The binary as operators run it, JSON logs at `debug`: every line of a connection has
/// its `conn`, `instance` and `user`; no line carries a message's text or a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_log_lines_say_whose_they_are() -> anyhow::Result<()> {
    let secret = "a-metrics-test-secret-of-more-than-32-bytes";
    let mut gw = GatewayProcess::spawn(
        env!("CARGO_BIN_EXE_chat-gateway"),
        &[
            ("AUTH_JWT_SECRET", secret),
            ("INSTANCE_ID", "gw-logs"),
            ("RUST_LOG", "debug"),
            ("SHUTDOWN_DRAIN_SECS", "0"),
        ],
    )
    .await?;
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let token = chat_gateway::auth::sign_hs256(
        secret,
        &chat_gateway::auth::NewToken {
            sub: "u-logged",
            name: Some("ann"),
            rooms: None,
            iat: exp - 600,
            exp,
        },
    )?;
    let secret_text = "the-text-nobody-may-log-4711";
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url(&format!("/ws?token={token}"))).await?;
    c.until_joined("general").await?;
    c.say("general", secret_text, Some("1")).await?;
    while !matches!(c.recv().await?, ServerFrame::Ack { .. }) {}
    // An error frame is logged too (at debug), in the connection's span.
    c.send_json(serde_json::json!({"type": "send", "room": "nowhere", "text": secret_text}))
        .await?;
    c.recv_error().await?;
    c.close().await?;
    gw.signal("TERM").await?;
    ensure!(gw.wait(chat_testkit::WAIT).await? == Some(0));

    let mut of_the_connection = 0;
    while let Ok(line) = gw.logs.try_recv() {
        let value: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not one JSON object: {line}"))?;
        ensure!(
            !line.contains(secret_text),
            "a message's text in the logs: {line}"
        );
        ensure!(
            !line.contains(&token[token.len() - 20..]),
            "a token in the logs: {line}"
        );
        if value["span"]["name"] == "conn" {
            of_the_connection += 1;
            let span = &value["span"];
            ensure!(span["conn"].is_u64(), "no conn: {line}");
            ensure!(span["instance"] == "gw-logs", "no instance: {line}");
            ensure!(span["user"] == "u-logged", "no user: {line}");
        }
    }
    // connected, joined, refused, disconnected at least.
    ensure!(
        of_the_connection >= 4,
        "{of_the_connection} lines of the connection"
    );
    Ok(())
}
