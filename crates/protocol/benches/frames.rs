//! Frame encode/decode costs: what a publish costs before it reaches the bus, and what
//! reading a stored frame's id costs on the delivery path.

use chat_protocol::{Limits, MessageTemplate, RoomName, parse_client_frame, peek_id};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn frames(c: &mut Criterion) {
    let room = RoomName::new("general").unwrap_or_else(|_| unreachable!());
    let send = r#"{"type":"send","room":"general","text":"Hello, how is everyone doing today?","ref":"c-42"}"#;
    let limits = Limits {
        max_text_bytes: 4096,
    };
    c.bench_function("decode a send frame", |b| {
        b.iter(|| parse_client_frame(black_box(send), limits))
    });
    c.bench_function("build a message template", |b| {
        b.iter(|| {
            MessageTemplate::new(
                &room,
                black_box("ann"),
                black_box("Hello, how is everyone doing today?"),
            )
        })
    });
    let template = MessageTemplate::new(&room, "ann", "Hello, how is everyone doing today?");
    c.bench_function("render a message frame (memory bus)", |b| {
        b.iter(|| template.render(black_box(123_456), black_box(1_764_500_000_000)))
    });
    let stored = template.render(123_456, 1_764_500_000_000);
    c.bench_function("peek the id of a stored frame", |b| {
        b.iter(|| peek_id(black_box(stored.as_bytes())))
    });
}

criterion_group!(benches, frames);
criterion_main!(benches);
