//! The session's state machine under random frame sequences (proptest): every frame the
//! server sends is a valid protocol frame, the connection either keeps answering in order
//! or is closed with a documented code, and the instance stays healthy.

use chat_protocol::{ServerFrame, close};
use chat_testkit::{TestGateway, WAIT, WsClient};
use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Debug)]
enum Step {
    Text(String),
    Binary(Vec<u8>),
    Ping,
}

fn room() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("d"), Just("bad room")].prop_map(String::from)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (room(), prop::option::of(prop_oneof![0u64..20, Just(u64::MAX)]))
            .prop_map(|(room, since)| Step::Text(json!({"type": "join", "room": room, "since": since}).to_string())),
        2 => room().prop_map(|room| Step::Text(json!({"type": "leave", "room": room}).to_string())),
        6 => (room(), ".{0,80}", prop::option::of("[a-z0-9]{1,6}"))
            .prop_map(|(room, text, r)| Step::Text(json!({"type": "send", "room": room, "text": text, "ref": r}).to_string())),
        2 => (".{0,40}", ".{0,40}")
            .prop_map(|(username, text)| Step::Text(json!({"username": username, "text": text}).to_string())),
        3 => ".{0,200}".prop_map(Step::Text),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Step::Binary),
        1 => Just(Step::Ping),
        1 => Just(Step::Text("x".repeat(2000))),
    ]
}

/// Sends `steps`, then a final request whose answer proves the session still works in
/// order; checks every frame received.
async fn run(gw: &TestGateway, steps: Vec<Step>) -> anyhow::Result<()> {
    let mut c = WsClient::connect(&gw.ws_url("/ws?room=a")).await?;
    for step in steps {
        let message = match step {
            Step::Text(t) => Message::Text(t.into()),
            Step::Binary(b) => Message::Binary(b.into()),
            Step::Ping => Message::Ping(Default::default()),
        };
        if c.send_message(message).await.is_err() {
            break; // the server already closed
        }
    }
    let _ = c
        .send_json(json!({"type": "leave", "room": "never-joined", "ref": "final"}))
        .await;
    loop {
        let next = tokio::time::timeout(WAIT, c.inner().next()).await?;
        match next {
            Some(Ok(Message::Text(t))) => {
                let frame: ServerFrame = serde_json::from_str(&t)
                    .map_err(|e| anyhow::anyhow!("invalid server frame {t}: {e}"))?;
                if let ServerFrame::Error {
                    reference: Some(r), ..
                } = &frame
                    && r == "final"
                {
                    return Ok(());
                }
            }
            Some(Ok(Message::Close(Some(f)))) => {
                let code = u16::from(f.code);
                anyhow::ensure!(
                    code == close::POLICY || code == close::TOO_BIG,
                    "unexpected close code {code}"
                );
                return Ok(());
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("connection ended without a close frame: {other:?}"),
        }
    }
}

#[test]
fn random_frame_sequences_never_break_a_session() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let gw = rt.block_on(TestGateway::start(&[
        ("RATE_LIMIT_PER_SEC", "0"),
        ("MAX_ROOMS_PER_CONNECTION", "3"),
        ("MAX_TEXT_BYTES", "64"),
        ("MAX_FRAME_BYTES", "1024"),
    ]))?;
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(steps in prop::collection::vec(step(), 1..40))| {
        rt.block_on(run(&gw, steps)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    });
    let healthy = rt.block_on(gw.get_status("/healthz"))?;
    assert_eq!(healthy, 200);
    Ok(())
}
