//! When queued live messages are written: the outboxes a dispatcher filled are listed in a
//! [`PendingWrites`] (each once, however many messages it got) and written together, each
//! with one syscall, at once or — with `WRITE_COALESCE_MS` — by a [`WriteScheduler`] task
//! at most once per interval. Both buses deliver through the hub, so this is the one place
//! that decides.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::Notify;

use super::Outbox;
use crate::sync::lock;

/// Outboxes that got live messages and wait for their write, each listed once.
#[derive(Debug, Default)]
pub struct PendingWrites(Vec<Arc<Outbox>>);

/// Outboxes one task writes; a larger fan-out is spread over several tasks (threads).
const WRITES_PER_TASK: usize = 128;

impl PendingWrites {
    /// Lists `outbox` unless it is already listed (here or in another batch, which will
    /// write it).
    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        if !outbox.pending.swap(true, Ordering::AcqRel) {
            self.0.push(outbox.clone());
        }
    }

    /// How many outboxes wait.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Writes every listed outbox from this task, and counts the bytes once.
    pub fn write_all(&mut self) {
        let mut bytes = 0usize;
        for outbox in &self.0 {
            // Cleared first: a push after this point lists the outbox again.
            outbox.pending.store(false, Ordering::Release);
            bytes += outbox.write_or_defer_uncounted();
        }
        // Every outbox shares the one `chat_bytes_sent_total`: one add for the batch.
        if let Some(first) = self.0.first()
            && bytes > 0
        {
            first.sent.increment(bytes as u64);
        }
        self.0.clear();
    }

    /// Like [`PendingWrites::write_all`], but beyond [`WRITES_PER_TASK`] outboxes the rest
    /// is written by other tasks, so a large fan-out uses every worker thread. Must run
    /// inside a tokio runtime.
    pub fn write_spread(&mut self) {
        while self.0.len() > WRITES_PER_TASK {
            let rest = self.0.split_off(self.0.len() - WRITES_PER_TASK);
            tokio::spawn(async move { PendingWrites(rest).write_all() });
        }
        self.write_all();
    }

    fn append(&mut self, other: &mut PendingWrites) {
        self.0.append(&mut other.0);
    }
}

impl Drop for PendingWrites {
    fn drop(&mut self) {
        self.write_all();
    }
}

/// Writes batches of live messages at once, or at most once per `WRITE_COALESCE_MS`.
#[derive(Debug)]
pub struct WriteScheduler {
    coalescer: Option<Arc<Coalescer>>,
}

/// Batches waiting for the next coalesced write.
#[derive(Debug, Default)]
struct Coalescer {
    waiting: Mutex<PendingWrites>,
    wake: Notify,
}

impl WriteScheduler {
    /// Writes every batch at once.
    pub fn immediate() -> Self {
        WriteScheduler { coalescer: None }
    }

    /// Writes at most once per `interval` (zero: at once). Traffic sparser than the
    /// interval is written at once: a write waits only for the previous one's interval to
    /// end. Starts the writing task, so it must run inside a tokio runtime.
    pub fn coalescing(interval: Duration) -> Self {
        if interval.is_zero() {
            return Self::immediate();
        }
        let coalescer = Arc::new(Coalescer::default());
        let task = coalescer.clone();
        // Lives as long as the process: it only ever waits or writes what is queued.
        tokio::spawn(async move { task.run(interval).await });
        WriteScheduler {
            coalescer: Some(coalescer),
        }
    }

    /// Writes `batch` now, or hands it to the coalescing task.
    pub fn submit(&self, mut batch: PendingWrites) {
        if batch.is_empty() {
            return;
        }
        match &self.coalescer {
            None => batch.write_spread(),
            Some(c) => {
                lock(&c.waiting).append(&mut batch);
                c.wake.notify_one();
            }
        }
    }
}

impl Coalescer {
    async fn run(&self, interval: Duration) {
        let now = tokio::time::Instant::now();
        // As if the last write were an interval ago: the first batch goes out at once.
        let mut last = now.checked_sub(interval).unwrap_or(now);
        loop {
            self.wake.notified().await;
            tokio::time::sleep_until(last + interval).await;
            let mut due = std::mem::take(&mut *lock(&self.waiting));
            due.write_spread();
            last = tokio::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Bounds, CaptureSocket, Class};

    fn outbox(socket: &Arc<CaptureSocket>) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            Box::new(socket.clone()),
            Bounds {
                live: 100,
                live_bytes: 1 << 20,
            },
        ))
    }

    #[test]
    fn an_outbox_is_listed_once_and_listed_again_after_its_write() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s);
        let mut batch = PendingWrites::default();
        for m in ["a", "b"] {
            o.push(bytes::Bytes::from(m), Class::Live).unwrap();
            batch.add(&o);
        }
        let mut other = PendingWrites::default();
        other.add(&o);
        assert_eq!((batch.len(), other.len()), (1, 0));
        batch.write_all();
        assert_eq!(s.take_bytes(), b"ab");
        other.add(&o);
        assert_eq!(other.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn coalescing_writes_at_most_once_per_interval() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s);
        let scheduler = WriteScheduler::coalescing(Duration::from_millis(20));
        let send = |m: &'static str| {
            o.push(bytes::Bytes::from(m), Class::Live).unwrap();
            let mut batch = PendingWrites::default();
            batch.add(&o);
            scheduler.submit(batch);
        };
        // The first batch after a quiet spell goes out at once.
        send("a");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(s.take_bytes(), b"a");
        // The next ones wait for the interval to end, and go out together.
        send("b");
        tokio::time::sleep(Duration::from_millis(5)).await;
        send("c");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.take_bytes(), b"");
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert_eq!(s.take_bytes(), b"bc");
    }
}
