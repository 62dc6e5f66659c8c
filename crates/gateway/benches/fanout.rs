//! The fan-out hot path: one message delivered to 10,000 local members (framed once; each
//! push is a shared-bytes clone of the frame into a bounded outbox, which is listed for the
//! batch's write). The writes themselves go to a socket that discards everything.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
};

use bytes::Bytes;
use chat_gateway::{
    bus::{BusEvent, BusEvents, Msg, memory::MemoryBus},
    hub::{Hub, MemberInfo},
    metrics::Metrics,
    transport::{Bounds, Outbox, Socket, WriteScheduler},
};
use chat_protocol::{MessageTemplate, RoomName};
use criterion::{Criterion, criterion_group, criterion_main};

const MEMBERS: usize = 10_000;

/// A socket that takes every byte at once.
#[derive(Debug)]
struct Discard;

impl Socket for Discard {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }

    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let room = RoomName::new("bench").unwrap_or_else(|_| unreachable!());
    let metrics = Metrics::new("bench").unwrap_or_else(|e| panic!("metrics: {e}"));
    let hub = Arc::new(Hub::new(1024, WriteScheduler::immediate(), metrics.clone()));
    let store = MemoryBus::new(
        200,
        Arc::new(Hub::new(16, WriteScheduler::immediate(), metrics)),
    );
    let bounds = Bounds {
        live: 1 << 20,
        live_bytes: 1 << 30,
    };
    rt.block_on(async {
        for conn in 0..MEMBERS as u64 {
            let outbox = Arc::new(Outbox::new(Box::new(Discard), bounds));
            hub.join(
                &room,
                conn,
                outbox,
                MemberInfo {
                    user: Arc::from("u"),
                    signals: true,
                },
                &store,
            )
            .await
            .unwrap_or_else(|e| panic!("join: {e}"));
            hub.go_live(&room, conn, 0, None, |_| Vec::new());
        }
    });
    let json = Bytes::from(
        MessageTemplate::new(&room, "ann", "Hello, how is everyone doing today?")
            .render(1, 1_764_500_000_000),
    );
    let mut id = 0u64;
    let mut events = Vec::with_capacity(1);
    c.bench_function("deliver one message to 10,000 local members", |b| {
        b.iter(|| {
            id += 1;
            events.push(BusEvent::Message {
                room: room.clone(),
                msg: Msg {
                    id,
                    json: json.clone(),
                },
            });
            rt.block_on(async { hub.deliver(&mut events) });
        })
    });
}

criterion_group!(benches, fanout);
criterion_main!(benches);
