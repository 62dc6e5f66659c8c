//! Limits with clear answers: rate, rooms, connections, garbage, origins.

use chat_protocol::{ErrorCode, ServerFrame, close};
use chat_testkit::WsClient;
use serde_json::json;

use crate::{Env, connect, eventually};

#[tokio::test]
async fn a_connection_over_its_rate_is_told_rate_limited_with_its_ref() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env
        .gateway(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "3")])
        .await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    for i in 0..6 {
        c.say("general", &format!("m{i}"), Some(&format!("r{i}")))
            .await?;
    }
    let (mut acked, mut limited) = (Vec::new(), Vec::new());
    while acked.len() + limited.len() < 6 {
        match c.recv().await? {
            ServerFrame::Ack { reference, .. } => acked.push(reference),
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                reference,
                ..
            } => {
                limited.push(reference.unwrap_or_default());
            }
            ServerFrame::Message(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // A burst of 3, then at most one more token within the test's few milliseconds.
    assert!((3..=4).contains(&acked.len()), "acked {acked:?}");
    assert_eq!(&acked[..3], ["r0", "r1", "r2"]);
    assert!(limited.contains(&"r5".to_string()), "limited {limited:?}");
    Ok(())
}

#[tokio::test]
async fn garbage_only_connections_are_closed_with_1008() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    for _ in 0..chat_gateway::session::BAD_FRAME_LIMIT {
        c.send_text("this is not json").await?;
    }
    assert_eq!(c.closed().await?, Some(close::POLICY));
    // A connection that makes mistakes but also valid requests is not closed.
    let (mut d, _) = connect(&gw, "", "general").await?;
    for i in 0..(3 * chat_gateway::session::BAD_FRAME_LIMIT) {
        d.send_text("oops").await?;
        assert!(matches!(
            d.recv().await?,
            ServerFrame::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        if i % 5 == 4 {
            d.say("general", "fine", Some("ok")).await?;
            loop {
                if let ServerFrame::Ack { .. } = d.recv().await? {
                    break;
                }
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn rooms_per_connection_are_limited() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[("MAX_ROOMS_PER_CONNECTION", "2")]).await?;
    let (mut c, _) = connect(&gw, "?room=a", "a").await?;
    c.join("b", None).await?;
    c.until_joined("b").await?;
    c.send_json(json!({"type": "join", "room": "c", "ref": "j3"}))
        .await?;
    let (code, reference) = c.recv_error().await?;
    assert_eq!(
        (code, reference.as_deref()),
        (ErrorCode::Forbidden, Some("j3"))
    );
    c.send_json(json!({"type": "leave", "room": "a"})).await?;
    assert_eq!(c.recv().await?, ServerFrame::Left { room: "a".into() });
    c.join("c", None).await?;
    c.until_joined("c").await?;
    Ok(())
}

#[tokio::test]
async fn connections_beyond_max_get_503() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[("MAX_CONNECTIONS", "2")]).await?;
    let (a, _) = connect(&gw, "", "general").await?;
    let (_b, _) = connect(&gw, "", "general").await?;
    let third = WsClient::connect_with_headers(&gw.ws_url("/ws"), &[]).await?;
    assert_eq!(third.err(), Some(503));
    a.close().await?;
    // The slot is released when the server has seen the close.
    eventually("a free slot", || async {
        gw.state().connection_count() < 2
    })
    .await?;
    let fourth = WsClient::connect_with_headers(&gw.ws_url("/ws"), &[]).await?;
    assert!(fourth.is_ok());
    Ok(())
}

#[tokio::test]
async fn cross_site_websockets_are_refused() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let url = gw.ws_url("/ws");
    let host = gw.addr().to_string();
    let status = |r: Result<WsClient, u16>| r.err().unwrap_or(101);
    // Default: only the page's own host, and non-browser clients (no Origin).
    assert_eq!(
        status(WsClient::connect_with_headers(&url, &[]).await?),
        101
    );
    let own = format!("http://{host}");
    assert_eq!(
        status(WsClient::connect_with_headers(&url, &[("Origin", &own)]).await?),
        101
    );
    let evil = [("Origin", "https://evil.example")];
    assert_eq!(
        status(WsClient::connect_with_headers(&url, &evil).await?),
        403
    );
    let legacy = gw.ws_url("/websocket");
    assert_eq!(
        status(WsClient::connect_with_headers(&legacy, &evil).await?),
        403
    );

    let gw = env
        .gateway(&[("ALLOWED_ORIGINS", "*.example.com,http://localhost:3000")])
        .await?;
    let url = gw.ws_url("/ws");
    for (origin, want) in [
        ("https://chat.example.com", 101),
        ("https://example.com", 403),
        ("http://localhost:3000", 101),
        ("http://localhost:3001", 403),
        ("https://evil.example", 403),
    ] {
        let got = status(WsClient::connect_with_headers(&url, &[("Origin", origin)]).await?);
        assert_eq!(got, want, "{origin}");
    }
    Ok(())
}
