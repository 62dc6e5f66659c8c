//! Shutdown, keep-alive and plain HTTP.

use chat_protocol::{ServerFrame, close};
use chat_testkit::{WAIT, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{Env, connect, on_both_buses};

on_both_buses!(shutdown_closes_every_client_with_1012, health_and_static);

async fn shutdown_closes_every_client_with_1012(env: Env) -> anyhow::Result<()> {
    let gw = env
        .gateway(&[("SHUTDOWN_GRACE_SECS", "5"), ("SHUTDOWN_DRAIN_SECS", "0")])
        .await?;
    let (mut a, _) = connect(&gw, "", "general").await?;
    let (mut b, _) = connect(&gw, "?room=x", "x").await?;
    let mut legacy = WsClient::connect(&gw.ws_url("/websocket")).await?;
    gw.begin_shutdown();
    assert_eq!(a.closed().await?, Some(close::RESTART));
    assert_eq!(b.closed().await?, Some(close::RESTART));
    assert_eq!(legacy.closed().await?, Some(close::RESTART));
    tokio::time::timeout(WAIT, gw.stop()).await??;
    Ok(())
}

async fn health_and_static(env: Env) -> anyhow::Result<()> {
    let gw = env.gateway(&[]).await?;
    assert_eq!(gw.get_status("/healthz").await?, 200);
    assert_eq!(gw.get_status("/readyz").await?, 200);
    assert_eq!(gw.get_status("/").await?, 200);
    assert_eq!(gw.get_status("/no-such-file.js").await?, 404);
    assert_eq!(gw.get_status("/../Cargo.toml").await?, 404);
    Ok(())
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[("PING_INTERVAL_SECS", "1")]).await?;
    // A hand-made WebSocket handshake, then never a pong.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let mut received = Vec::new();
    // Reading until EOF: the server sends welcome, joined, pings, then hangs up.
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut received)).await??;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.contains(r#""type":"welcome""#));
    // At least two pings (opcode 0x89) went unanswered before the drop.
    let pings = received.windows(2).filter(|w| w == &[0x89, 0x00]).count();
    assert!(pings >= 2, "saw {pings} pings");
    Ok(())
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[("PING_INTERVAL_SECS", "1")]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    // tungstenite answers each ping while we read; wait for four of them.
    let mut pings = 0;
    while pings < 4 {
        let next = tokio::time::timeout(WAIT, futures_util::StreamExt::next(c.inner())).await?;
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(_)) => {}
            other => anyhow::bail!("connection ended: {other:?}"),
        }
    }
    c.say("general", "still alive", Some("k")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack { reference, .. } if reference == "k" => return Ok(()),
            ServerFrame::Message(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
}

/// Sends `request` on a fresh connection and reads until `until` appears in the answer
/// (or the peer closes); returns everything read.
async fn raw_exchange(
    gw: &chat_testkit::TestGateway,
    request: &[u8],
    until: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await?;
    tcp.write_all(request).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !got.windows(until.len()).any(|w| w == until) {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        anyhow::Ok(())
    })
    .await??;
    Ok(got)
}

/// Our own upgrade handling: requests that are not a WebSocket upgrade get a clear HTTP
/// error, and a client that sends its first frame together with the request (before the
/// 101) has it read, not lost.
#[tokio::test]
async fn upgrade_requests_are_checked_and_early_frames_are_kept() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let head = |extra: &str| {
        format!(
            "GET /ws?room=a HTTP/1.1\r\nHost: {}\r\nConnection: close{extra}\r\n\r\n",
            gw.addr()
        )
    };
    let plain = raw_exchange(&gw, head("").as_bytes(), b"\r\n\r\n").await?;
    assert!(
        plain.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    let old = head(
        ", Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    );
    let old = raw_exchange(&gw, old.as_bytes(), b"\r\n\r\n").await?;
    let old = String::from_utf8_lossy(&old).to_ascii_lowercase();
    assert!(old.starts_with("http/1.1 426"), "{old}");
    assert!(old.contains("sec-websocket-version: 13"), "{old}");

    // A valid upgrade with a masked `join` frame (mask key 0) in the same write.
    let mut request = format!(
        "GET /ws?room=a HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr()
    )
    .into_bytes();
    let join = br#"{"type":"join","room":"early"}"#;
    request.extend_from_slice(&[0x81, 0x80 | join.len() as u8, 0, 0, 0, 0]);
    request.extend_from_slice(join);
    let got = raw_exchange(&gw, &request, br#""type":"joined","room":"early""#).await?;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // RFC 6455's example key and its accept value.
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{text}"
    );
    assert!(text.contains(r#""type":"joined","room":"early""#), "{text}");
    Ok(())
}
