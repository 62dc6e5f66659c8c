//! A WebSocket echo server on the gateway's own transport, for the Autobahn|Testsuite
//! (`deploy/autobahn/`, run in CI by `deploy/autobahn/ci.sh`). Test-only: nothing in the
//! product routes here.
//!
//! ```text
//! cargo run -p chat-testkit --example autobahn_echo -- PORT    # ws://127.0.0.1:PORT/
//! ```
//! PORT 0 takes a free port; the address is printed on stderr as `autobahn_echo:
//! ws://127.0.0.1:PORT/` (`ci.sh` reads it). Ctrl-C (SIGINT) stops it.
//!
//! Every text and binary message is echoed through the same path a chat client's frames
//! take: `app::serve` (our HTTP/1.1 accept loop), `transport::Upgrade`, `Connection::open`
//! (tungstenite reads, the outbox writes frames built by `transport::frame`), and
//! `Connection::close` with the `CloseReason` a session would return. Only the limits
//! differ: group 9 sends messages of up to 16 MiB.

use std::time::Duration;

use axum::{Router, routing::get};
use chat_gateway::{
    app,
    metrics::Counter,
    transport::{Bounds, CloseReason, Connection, Settings, Upgrade, Upgraded, frame},
};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

fn settings() -> Settings {
    Settings {
        bounds: Bounds {
            live: 1 << 16,
            live_bytes: 1 << 30,
        },
        read_limit: 32 << 20,
        ping_every: Duration::from_secs(3600),
        write_timeout: Duration::from_secs(60),
        bytes_sent: Counter::noop(),
    }
}

async fn echo(upgraded: Upgraded) {
    let mut conn = Connection::open(upgraded, &settings()).await;
    let reason = loop {
        let message = match conn.reader.next().await {
            None => break CloseReason::PeerClosed,
            Some(Err(err)) => break CloseReason::after_read_error(&err),
            Some(Ok(message)) => message,
        };
        conn.outbox.mark_alive();
        let echo = match message {
            Message::Text(text) => Some(frame::text(text.as_bytes())),
            Message::Binary(data) => Some(frame::binary(&data)),
            // tungstenite has queued its pong (or its close reply) in the outbox itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => None,
        };
        if let Some(echo) = echo
            && conn.outbox.push_paced(echo).await.is_err()
        {
            break CloseReason::Gone; // already closing: its own reason stands
        }
        // After every frame, as the session does: what is queued (pongs too) is written now.
        conn.outbox.write_or_defer();
    };
    conn.close(reason).await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = match std::env::args().nth(1) {
        Some(port) => port.parse()?,
        None => anyhow::bail!("usage: autobahn_echo PORT"),
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("autobahn_echo: ws://{}/", listener.local_addr()?);
    let router = Router::new().route(
        "/",
        get(|upgrade: Upgrade| async move { upgrade.on_upgrade(echo) }),
    );
    app::serve(listener, router, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
