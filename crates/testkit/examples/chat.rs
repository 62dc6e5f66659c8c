//! A terminal chat client for trying a gateway by hand.
//!
//! ```text
//! cargo run -p chat-testkit --example chat -- "ws://localhost:4444/ws?room=general&username=ann"
//! ```
//! Every frame received is printed as it arrived. Each line typed is sent: a line that
//! starts with `{` as-is (any protocol frame), anything else as a `send` to the room of
//! the URL (or `general`).

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::{connect_async, tungstenite::Message};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://localhost:4444/ws".into());
    let room = url
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("room="))
        .unwrap_or("general")
        .to_owned();
    let (ws, _) = connect_async(&url).await?;
    let (mut tx, mut rx) = ws.split();
    let printer = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Text(t) => println!("<- {t}"),
                Message::Close(c) => {
                    println!("<- close {c:?}");
                    break;
                }
                _ => {}
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut n = 0;
    while let Some(line) = lines.next_line().await? {
        let frame = if line.trim_start().starts_with('{') {
            line
        } else {
            n += 1;
            serde_json::json!({"type": "send", "room": room, "text": line, "ref": format!("c-{n}")})
                .to_string()
        };
        println!("-> {frame}");
        tx.send(Message::Text(frame.into())).await?;
    }
    let _ = tx.close().await;
    let _ = printer.await;
    Ok(())
}
