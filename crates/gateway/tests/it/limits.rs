//! Limits with clear answers: rate, rooms, connections, garbage, origins.

use chat_protocol::{ErrorCode, ServerFrame, close};
use chat_testkit::WsClient;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

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

/// Sends a frame the server refuses and reads its `error` (proof that the connection is
/// still open).
async fn refused(c: &mut WsClient, i: usize) -> anyhow::Result<()> {
    // Refusals of every kind count: not JSON, an unknown type, a bad room, not joined, an
    // empty text, an invalid username. (Binary frames should too: see
    // `binary_frames_count_toward_1008`.)
    let frame = match i % 6 {
        0 => "this is not json".to_string(),
        1 => json!({"type": "dance"}).to_string(),
        2 => json!({"type": "join", "room": "a b"}).to_string(),
        3 => json!({"type": "send", "room": "elsewhere", "text": "x"}).to_string(),
        4 => json!({"type": "send", "room": "general", "text": ""}).to_string(),
        _ => json!({"type": "send", "room": "general", "text": "x", "username": " "}).to_string(),
    };
    c.send_text(frame).await?;
    let (code, _) = c.recv_error().await?;
    anyhow::ensure!(
        !matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable),
        "frame {i} was answered {code}, which does not count"
    );
    Ok(())
}

/// docs/protocol.md: 1008 after 10 refused frames in a row (the documented number,
/// literally).
#[tokio::test]
async fn garbage_only_connections_are_closed_with_1008() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    // Nine refused frames in a row: each is answered, the connection stays open...
    for i in 0..9 {
        refused(&mut c, i).await?;
    }
    // ...and a valid frame is served and starts the count again,
    c.say("general", "fine", Some("ok")).await?;
    loop {
        match c.recv().await? {
            ServerFrame::Ack { reference, .. } if reference == "ok" => break,
            ServerFrame::Message(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    // so nine more are answered too (without the reset the first would be the tenth)...
    for i in 0..9 {
        refused(&mut c, i + 3).await?;
    }
    // ...and the tenth in a row closes the connection with 1008.
    c.send_text("this is not json").await?;
    assert_eq!(c.closed().await?, Some(close::POLICY));

    // A connection that makes mistakes but also valid requests is not closed.
    let (mut d, _) = connect(&gw, "", "general").await?;
    for i in 0..30 {
        refused(&mut d, i).await?;
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

/// docs/protocol.md lists "a binary frame" under `bad_request`, and 1008 closes after 10
/// refused frames in a row; a binary frame is answered `bad_request`, but the session
/// refuses it before the code that counts refusals (`Session::on_message` returns early),
/// so a client sending only binary frames is never closed.
#[tokio::test]
async fn binary_frames_count_toward_1008() -> anyhow::Result<()> {
    let env = Env::memory().await?;
    let gw = env.gateway(&[]).await?;
    let (mut c, _) = connect(&gw, "", "general").await?;
    for _ in 0..9 {
        c.send_message(Message::Binary(vec![1, 2, 3].into()))
            .await?;
        assert_eq!(c.recv_error().await?.0, ErrorCode::BadRequest);
    }
    c.send_message(Message::Binary(vec![1, 2, 3].into()))
        .await?;
    assert_eq!(c.closed().await?, Some(close::POLICY));
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
