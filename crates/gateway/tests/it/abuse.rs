//! What a stranger can cost: every bound has a variable and a documented answer — slow
//! headers, idle keep-alives, connections per address, rooms that would never die, names
//! that lie, origins that are not text, bus details, and the page's own headers.

use anyhow::{bail, ensure};
use chat_protocol::{ErrorCode, ServerFrame};
use chat_testkit::{RedisServer, TestGateway, WAIT, WsClient};
use fred::prelude::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Env, connect, eventually};

/// Reads until the server closes the connection; returns what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
        .await
        .map_err(|_| anyhow::anyhow!("the server kept the connection open"))??;
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_keep_alives_are_closed() -> anyhow::Result<()> {
    let gw = Env::memory()
        .await?
        .gateway(&[("HTTP_HEADER_TIMEOUT_SECS", "1")])
        .await?;
    // A request that never finishes its headers.
    let mut loris = tokio::net::TcpStream::connect(gw.addr()).await?;
    loris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await?;
    until_closed(&mut loris).await?;
    // A keep-alive connection that says nothing after its first request.
    let mut idle = tokio::net::TcpStream::connect(gw.addr()).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let got = until_closed(&mut idle).await?;
    ensure!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_bounded_and_forwarded_for_only_from_trusted_proxies()
-> anyhow::Result<()> {
    let gw = Env::memory()
        .await?
        .gateway(&[
            ("MAX_CONNECTIONS_PER_IP", "2"),
            ("TRUSTED_PROXIES", "127.0.0.0/8"),
        ])
        .await?;
    let url = gw.ws_url("/ws");
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    let a1 = WsClient::connect_with_headers(&url, &from("203.0.113.1")).await?;
    let _a2 = WsClient::connect_with_headers(&url, &from("203.0.113.1")).await?;
    ensure!(a1.is_ok());
    let a3 = WsClient::connect_with_headers(&url, &from("203.0.113.1")).await?;
    ensure!(a3.err() == Some(429), "a third connection from one address");
    // Another client behind the same proxy is another address.
    let b1 = WsClient::connect_with_headers(&url, &from("203.0.113.2")).await?;
    ensure!(b1.is_ok());
    // A closed connection gives its place back.
    if let Ok(a1) = a1 {
        a1.close().await?;
    }
    eventually("a place freed", || async {
        matches!(
            WsClient::connect_with_headers(&url, &from("203.0.113.1")).await,
            Ok(Ok(_))
        )
    })
    .await?;
    // Without TRUSTED_PROXIES, X-Forwarded-For is the client's own claim: ignored.
    let strict = Env::memory()
        .await?
        .gateway(&[("MAX_CONNECTIONS_PER_IP", "1")])
        .await?;
    let url = strict.ws_url("/ws");
    let _first = WsClient::connect_with_headers(&url, &from("198.51.100.1")).await?;
    let second = WsClient::connect_with_headers(&url, &from("198.51.100.2")).await?;
    ensure!(
        second.err() == Some(429),
        "a forged X-Forwarded-For was believed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_room_expires_as_a_whole_and_comes_back_under_a_new_epoch() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[("ROOM_IDLE_TTL_SECS", "1")]).await?;
    let keys = [
        "chat:{fleeting}:seq",
        "chat:{fleeting}:history",
        "chat:{fleeting}:epoch",
    ];
    let (mut c, _) = connect(&gw, "?room=fleeting", "fleeting").await?;
    c.say("fleeting", "soon gone", Some("r")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack { .. } => break,
            ServerFrame::Message(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    let admin = redis.client().await?;
    for key in keys {
        let ttl: i64 = admin.pttl(key).await?;
        ensure!((1..=1000).contains(&ttl), "{key} has no idle TTL: {ttl}");
    }
    c.close().await?;
    // Nothing announces an expiry: look at Redis.
    eventually("the room's keys expire together", || async {
        admin.exists::<i64, _>(keys.to_vec()).await.ok() == Some(0)
    })
    .await?;
    let (_, again) = connect(&gw, "?room=fleeting&since=1", "fleeting").await?;
    ensure!(
        !again.recovered,
        "a resume into an expired room must not say recovered"
    );
    ensure!(again.ids().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_lie_and_origins_that_are_not_text_are_refused() -> anyhow::Result<()> {
    let gw = Env::memory().await?.gateway(&[]).await?;
    // U+202E RIGHT-TO-LEFT OVERRIDE in the query's username.
    let (mut c, _) = WsClient::connect_ws(&gw.ws_url("/ws?username=%E2%80%AEnna")).await?;
    let (code, _) = c.recv_error().await?;
    ensure!(code == ErrorCode::InvalidUsername);
    c.until_joined("general").await?;
    c.send_json(serde_json::json!({"type": "send", "room": "general", "text": "x", "username": "a\u{200B}b", "ref": "z"}))
        .await?;
    let (code, reference) = c.recv_error().await?;
    ensure!(code == ErrorCode::InvalidUsername && reference.as_deref() == Some("z"));
    // An Origin header that is not text.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    let mut request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://",
        gw.addr()
    )
    .into_bytes();
    request.extend_from_slice(b"\xffevil\r\n\r\n");
    tcp.write_all(&request).await?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await?;
    ensure!(
        &head == b"HTTP/1.1 403",
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_failures_reach_clients_without_their_details() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gw = TestGateway::with_redis(&redis.url(), &[("REDIS_TIMEOUT_MS", "300")]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    redis.kill().await;
    eventually("readyz 503", || async {
        gw.get_status("/readyz").await.ok() == Some(503)
    })
    .await?;
    c.say("general", "lost?", Some("r1")).await?;
    c.join("elsewhere", None).await?;
    for _ in 0..2 {
        match c.recv().await? {
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                message,
                ..
            } => {
                let lower = message.to_ascii_lowercase();
                for detail in [
                    "redis",
                    "fred",
                    "error:",
                    "timed out",
                    "connection",
                    "127.0.0.1",
                ] {
                    ensure!(!lower.contains(detail), "{message:?} tells {detail:?}");
                }
            }
            other => bail!("expected unavailable, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_with_its_security_headers_an_etag_and_compression() -> anyhow::Result<()>
{
    let gw = Env::memory().await?.gateway(&[]).await?;
    let get = |extra: &str| {
        let request = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
        let addr = gw.addr();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.write_all(request.as_bytes()).await?;
            let got = until_closed(&mut tcp).await?;
            let text = String::from_utf8_lossy(&got).into_owned();
            let head = text
                .split("\r\n\r\n")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            anyhow::Ok(head)
        }
    };
    let head = get("").await?;
    ensure!(head.starts_with("http/1.1 200"), "{head}");
    for expected in [
        "content-security-policy: default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
    ] {
        ensure!(head.contains(expected), "missing {expected:?} in {head}");
    }
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .ok_or_else(|| anyhow::anyhow!("no ETag: {head}"))?
        .to_owned();
    let revalidated = get(&format!("If-None-Match: {etag}\r\n")).await?;
    ensure!(revalidated.starts_with("http/1.1 304"), "{revalidated}");
    let compressed = get("Accept-Encoding: gzip\r\n").await?;
    ensure!(
        compressed.contains("content-encoding: gzip"),
        "{compressed}"
    );
    let compressed = get("Accept-Encoding: br\r\n").await?;
    ensure!(compressed.contains("content-encoding: br"), "{compressed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pings_from_a_reading_client_is_answered_not_taken_for_a_flood()
-> anyhow::Result<()> {
    // The bound itself (more than 16 pongs owed to a client that does not read: 1008) is
    // tested on the outbox (`transport::outbox`), where "does not read" can be made
    // exact; here, the other side of it: a client that reads is never cut off, however
    // many pings arrive in one segment.
    let gw = Env::memory()
        .await?
        .gateway(&[("RATE_LIMIT_PER_SEC", "0")])
        .await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    let mut ping = vec![0x89, 0x80 | 4, 0, 0, 0, 0];
    ping.extend_from_slice(b"ping");
    let stream = c.inner().get_mut();
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = stream else {
        bail!("not a plain stream");
    };
    tcp.write_all(&ping.repeat(200)).await?;
    let mut pongs = 0;
    while pongs < 200 {
        match c.inner().next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Pong(p))) => {
                ensure!(p.as_ref() == b"ping");
                pongs += 1;
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                if chat_testkit::is_signal(&t) => {}
            Some(Ok(other)) => bail!("unexpected {other:?}"),
            Some(Err(err)) => bail!("after {pongs} pongs: {err}"),
            None => bail!("closed after {pongs} pongs"),
        }
    }
    Ok(())
}
