//! When queued live messages are written: the outboxes a dispatcher filled are listed in a
//! [`PendingWrites`] (each once, however many messages it got) and written together, each
//! with one syscall, at once or — with `WRITE_COALESCE_MS` — by a [`WriteScheduler`] task
//! at most once per interval ([`Coalescing::Interval`]), or at most once per interval *per
//! client* ([`Coalescing::Adaptive`]: a client not written to for an interval is written at
//! once). Both buses deliver through the hub, so this is the one place that decides.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

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

    /// Stamps every listed outbox as written at `at` (adaptive coalescing's clock).
    fn stamp(&self, at: u64) {
        for outbox in &self.0 {
            outbox.last_flush.store(at, Ordering::Relaxed);
        }
    }
}

impl Drop for PendingWrites {
    fn drop(&mut self) {
        self.write_all();
    }
}

/// How live messages are batched into writes (`WRITE_COALESCE_MS`, `WRITE_COALESCE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coalescing {
    /// Every batch is written as it arrives.
    Off,
    /// At most one flush of all the clients' sockets per interval: the first batch after a
    /// quiet interval goes out at once, the next ones wait for the interval to end.
    Interval(Duration),
    /// At most one write per client per interval: a client not written to for an interval
    /// is written at once; one written to less than an interval ago waits for the rest of
    /// its interval, gathering what else arrives for it. Sparse traffic (one message per
    /// client now and then, however busy the instance) costs no latency; a client under
    /// sustained traffic gets several messages per syscall.
    Adaptive(Duration),
}

impl Coalescing {
    /// The mode for `interval` (zero: [`Coalescing::Off`]).
    pub fn new(interval: Duration, adaptive: bool) -> Self {
        match (interval.is_zero(), adaptive) {
            (true, _) => Coalescing::Off,
            (false, false) => Coalescing::Interval(interval),
            (false, true) => Coalescing::Adaptive(interval),
        }
    }
}

/// Writes batches of live messages at once, or coalesced as [`Coalescing`] says.
#[derive(Debug)]
pub struct WriteScheduler {
    coalescer: Option<Arc<Coalescer>>,
}

/// Batches waiting for the next coalesced write.
#[derive(Debug)]
struct Coalescer {
    waiting: Mutex<Waiting>,
    wake: Notify,
    interval: Duration,
    adaptive: bool,
    /// Zero of the outboxes' `last_flush` stamps (microseconds since this, plus one, so
    /// that 0 means never written).
    epoch: Instant,
}

#[derive(Debug, Default)]
struct Waiting {
    outboxes: PendingWrites,
    /// Adaptive: when the first of them is due (stamp), if any waits.
    due: Option<u64>,
}

impl WriteScheduler {
    /// Writes every batch at once.
    pub fn immediate() -> Self {
        WriteScheduler { coalescer: None }
    }

    /// Writes as `mode` says. Starts the writing task unless [`Coalescing::Off`], so it must
    /// run inside a tokio runtime.
    pub fn coalescing(mode: Coalescing) -> Self {
        let (interval, adaptive) = match mode {
            Coalescing::Off => return Self::immediate(),
            Coalescing::Interval(i) => (i, false),
            Coalescing::Adaptive(i) => (i, true),
        };
        let coalescer = Arc::new(Coalescer {
            waiting: Mutex::default(),
            wake: Notify::new(),
            interval,
            adaptive,
            epoch: Instant::now(),
        });
        let task = coalescer.clone();
        // Lives as long as the process: it only ever waits or writes what is queued.
        tokio::spawn(async move {
            if task.adaptive {
                task.run_adaptive().await
            } else {
                task.run_interval().await
            }
        });
        WriteScheduler {
            coalescer: Some(coalescer),
        }
    }

    /// Writes `batch` now, or hands it (or, adaptive, the part of it written to less than
    /// an interval ago) to the coalescing task.
    pub fn submit(&self, mut batch: PendingWrites) {
        if batch.is_empty() {
            return;
        }
        match &self.coalescer {
            None => batch.write_spread(),
            Some(c) if c.adaptive => c.submit_adaptive(batch),
            Some(c) => {
                lock(&c.waiting).outboxes.append(&mut batch);
                c.wake.notify_one();
            }
        }
    }
}

impl Coalescer {
    /// Microseconds since `epoch`, plus one (0 is "never").
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn interval_micros(&self) -> u64 {
        u64::try_from(self.interval.as_micros()).unwrap_or(u64::MAX)
    }

    /// Splits `batch`: clients written to an interval ago or more are written now, the
    /// others wait for their interval to end.
    fn submit_adaptive(&self, mut batch: PendingWrites) {
        let now = self.stamp(Instant::now());
        let interval = self.interval_micros();
        let mut due: Option<u64> = None;
        let mut later = PendingWrites::default();
        batch.0.retain(|outbox| {
            let last = outbox.last_flush.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= interval {
                return true;
            }
            let at = last.saturating_add(interval);
            due = Some(due.map_or(at, |d| d.min(at)));
            later.0.push(outbox.clone());
            false
        });
        batch.stamp(now);
        batch.write_spread();
        if let Some(at) = due {
            let mut waiting = lock(&self.waiting);
            waiting.outboxes.append(&mut later);
            let first = waiting.due.is_none_or(|d| at < d);
            waiting.due = Some(waiting.due.map_or(at, |d| d.min(at)));
            drop(waiting);
            if first {
                self.wake.notify_one();
            }
        }
    }

    async fn run_interval(&self) {
        let now = Instant::now();
        // As if the last write were an interval ago: the first batch goes out at once.
        let mut last = now.checked_sub(self.interval).unwrap_or(now);
        loop {
            self.wake.notified().await;
            tokio::time::sleep_until(last + self.interval).await;
            let mut due = std::mem::take(&mut lock(&self.waiting).outboxes);
            due.write_spread();
            last = Instant::now();
        }
    }

    /// Sleeps until the earliest waiting client is due, then writes every waiting client
    /// (the others are less than an interval early: writing them together saves a wake-up,
    /// and each still gets at most about one write per interval).
    async fn run_adaptive(&self) {
        loop {
            let due = lock(&self.waiting).due;
            let Some(due) = due else {
                self.wake.notified().await;
                continue;
            };
            let at = self.epoch + Duration::from_micros(due.saturating_sub(1));
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                // An earlier client arrived: look again.
                () = self.wake.notified() => continue,
            }
            let mut ready = {
                let mut waiting = lock(&self.waiting);
                waiting.due = None;
                std::mem::take(&mut waiting.outboxes)
            };
            ready.stamp(self.stamp(Instant::now()));
            ready.write_spread();
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
        let scheduler = WriteScheduler::coalescing(Coalescing::Interval(Duration::from_millis(20)));
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

    #[tokio::test(start_paused = true)]
    async fn adaptive_writes_a_quiet_client_at_once_and_a_busy_one_once_per_interval() {
        let quiet_socket = CaptureSocket::unbounded();
        let busy_socket = CaptureSocket::unbounded();
        let (quiet, busy) = (outbox(&quiet_socket), outbox(&busy_socket));
        let scheduler = WriteScheduler::coalescing(Coalescing::Adaptive(Duration::from_millis(20)));
        let send = |o: &Arc<Outbox>, m: &'static str| {
            o.push(bytes::Bytes::from(m), Class::Live).unwrap();
            let mut batch = PendingWrites::default();
            batch.add(o);
            scheduler.submit(batch);
        };
        // Nobody was written to yet: both go out at once, in the caller's own write.
        send(&busy, "a");
        send(&quiet, "x");
        assert_eq!(
            (busy_socket.take_bytes(), quiet_socket.take_bytes()),
            (b"a".to_vec(), b"x".to_vec())
        );
        // Within the busy client's interval its messages gather...
        tokio::time::sleep(Duration::from_millis(5)).await;
        send(&busy, "b");
        tokio::time::sleep(Duration::from_millis(5)).await;
        send(&busy, "c");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(busy_socket.take_bytes(), b"");
        // ...and go out together when it ends (20 ms after "a").
        tokio::time::sleep(Duration::from_millis(6)).await;
        assert_eq!(busy_socket.take_bytes(), b"bc");
        // The quiet client, untouched for more than an interval, is written at once,
        // however busy the other one is.
        tokio::time::sleep(Duration::from_millis(1)).await;
        send(&busy, "d");
        send(&quiet, "y");
        assert_eq!(quiet_socket.take_bytes(), b"y");
        assert_eq!(busy_socket.take_bytes(), b"");
        tokio::time::sleep(Duration::from_millis(25)).await;
        assert_eq!(busy_socket.take_bytes(), b"d");
    }
}
