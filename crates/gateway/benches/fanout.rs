//! The fan-out hot path: one message dispatched to 10,000 local members (each push is a
//! shared-bytes clone of the frame, built once, into a bounded outbox, which is listed for
//! the dispatcher's flush). The flush (one `writev` per member) is not part of it.

use std::sync::Arc;

use chat_gateway::{
    bus::{Msg, memory::MemoryBus},
    hub::Hub,
    outbox::{Dirty, Outbox},
};
use chat_protocol::{MessageTemplate, RoomName};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const MEMBERS: usize = 10_000;

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let room = RoomName::new("bench").unwrap_or_else(|_| unreachable!());
    let hub = Arc::new(Hub::new(1024));
    let bus = MemoryBus::new(200, Arc::new(Hub::new(16)));
    let outboxes: Vec<Arc<Outbox>> = (0..MEMBERS)
        .map(|_| Arc::new(Outbox::new(1 << 20, 1 << 30)))
        .collect();
    rt.block_on(async {
        for (conn, outbox) in outboxes.iter().enumerate() {
            let conn = conn as u64;
            hub.join(&room, conn, outbox.clone(), &bus)
                .await
                .unwrap_or_else(|e| panic!("join: {e}"));
            hub.go_live(&room, conn, 0, None, |_| None);
        }
    });
    let frame = MessageTemplate::new(&room, "ann", "Hello, how is everyone doing today?")
        .render(1, 1_764_500_000_000);
    let wire = Msg::new(0, frame.as_bytes()).wire;
    let mut id = 0u64;
    let mut sink = Vec::with_capacity(64);
    c.bench_function("dispatch one message to 10,000 local members", |b| {
        b.iter_batched(
            || {
                // Empty every outbox (not measured), so none reaches its bound.
                for o in &outboxes {
                    sink.clear();
                    o.take_queued(&mut sink, 64);
                }
                id += 1;
                Msg {
                    id,
                    wire: wire.clone(),
                }
            },
            |msg| {
                let mut dirty = Dirty::default();
                hub.dispatch("bench", msg, &mut dirty);
                // Returned, so its flush (here only a wake-up: no sockets) is not timed.
                dirty
            },
            BatchSize::PerIteration,
        )
    });
}

criterion_group!(benches, fanout);
criterion_main!(benches);
