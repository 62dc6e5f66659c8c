//! One connection's outbound queue: the only way frames reach a client's socket.
//!
//! Three ways in, one way out (the connection's writer task, which drains in batches):
//! - [`Outbox::push_live`] — live messages from the hub. Never waits: when `CLIENT_QUEUE`
//!   live messages or `CLIENT_QUEUE_BYTES` bytes of them are already waiting, the client
//!   is too slow and the outbox closes with 1013, so a slow client can never hold up the
//!   hub or anyone else.
//! - [`Outbox::push`] — frames the session produces itself (history replay, acks, errors).
//!   Waits for room instead, so a replay far larger than `CLIENT_QUEUE` is flow-controlled
//!   and a client that floods us without reading is back-pressured through TCP.
//! - [`Outbox::push_now`] — a control frame that must land at an exact point in the stream
//!   (`joined`, under the hub's room lock). Never waits and is never refused for space.
//!
//! The queue keeps arrival order across all three, which is what makes a join gap-free.

use std::{
    collections::VecDeque,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why an outbox stopped accepting frames; the writer turns it into a close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The live queue overflowed: close 1013.
    TooSlow,
    /// An incoming frame was over `MAX_FRAME_BYTES`: close 1009.
    TooBig,
    /// The instance is shutting down: close 1012.
    Restart,
    /// The client broke policy (too many refused frames): close 1008.
    Policy,
    /// The peer stopped answering pings or went away: no close frame.
    Gone,
}

/// Result of [`Outbox::push_live`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivePush {
    /// Queued.
    Queued,
    /// The client was too slow; the outbox is now closing with 1013.
    Overflow,
    /// Already closing; dropped.
    Closed,
}

/// The outbox is closing; the frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection is closing")]
pub struct Closed;

/// Frames the session may have waiting before [`Outbox::push`] waits for the writer.
const PUSH_WINDOW: usize = 64;

#[derive(Debug)]
struct Entry {
    frame: Utf8Bytes,
    live: bool,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    live: usize,
    live_bytes: usize,
    closing: Option<CloseReason>,
}

impl State {
    /// Moves up to `n` frames to `out`, releasing their live-message accounting.
    fn drain_into(&mut self, out: &mut Vec<Utf8Bytes>, n: usize) -> usize {
        let n = self.queue.len().min(n);
        let (mut live, mut live_bytes) = (0, 0);
        out.extend(self.queue.drain(..n).map(|e| {
            if e.live {
                live += 1;
                live_bytes += e.frame.len();
            }
            e.frame
        }));
        self.live -= live;
        self.live_bytes -= live_bytes;
        n
    }
}

/// A bounded, ordered outbound queue shared by the hub (producer), the session (producer)
/// and the writer task (the only consumer).
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer (single waiter: the writer task).
    wake_writer: Notify,
    /// Wakes a session waiting in [`Outbox::push`] (single waiter: the session task).
    space: Notify,
    /// Cancelled when the outbox starts closing: ends the session's read loop.
    done: CancellationToken,
    /// Set by the reader on every frame from the peer, taken by the writer's keep-alive.
    alive: AtomicBool,
    live_cap: usize,
    live_bytes_cap: usize,
}

impl Outbox {
    /// An outbox closing the client after `live_cap` undelivered live messages or
    /// `live_bytes_cap` bytes of them.
    pub fn new(live_cap: usize, live_bytes_cap: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake_writer: Notify::new(),
            space: Notify::new(),
            done: CancellationToken::new(),
            alive: AtomicBool::new(true),
            live_cap,
            live_bytes_cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The critical sections never panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a live message, or closes the outbox (1013) when the client is too slow.
    pub fn push_live(&self, frame: Utf8Bytes) -> LivePush {
        let mut st = self.lock();
        if st.closing.is_some() {
            return LivePush::Closed;
        }
        if st.live >= self.live_cap || st.live_bytes + frame.len() > self.live_bytes_cap {
            st.closing = Some(CloseReason::TooSlow);
            st.queue.clear();
            drop(st);
            self.wake_writer.notify_one();
            self.space.notify_one();
            self.done.cancel();
            return LivePush::Overflow;
        }
        st.live += 1;
        st.live_bytes += frame.len();
        st.queue.push_back(Entry { frame, live: true });
        drop(st);
        self.wake_writer.notify_one();
        LivePush::Queued
    }

    /// Queues a frame without waiting and without counting it against the live bound.
    pub fn push_now(&self, frame: Utf8Bytes) -> Result<(), Closed> {
        let mut st = self.lock();
        if st.closing.is_some() {
            return Err(Closed);
        }
        st.queue.push_back(Entry { frame, live: false });
        drop(st);
        self.wake_writer.notify_one();
        Ok(())
    }

    /// Queues a frame once fewer than a window of frames are waiting.
    pub async fn push(&self, frame: Utf8Bytes) -> Result<(), Closed> {
        loop {
            {
                let mut st = self.lock();
                if st.closing.is_some() {
                    return Err(Closed);
                }
                if st.queue.len() < PUSH_WINDOW {
                    st.queue.push_back(Entry { frame, live: false });
                    drop(st);
                    self.wake_writer.notify_one();
                    return Ok(());
                }
            }
            // notify_one stores a permit when nobody waits, so a drain that happens
            // between the check above and this await is not missed.
            self.space.notified().await;
        }
    }

    /// Starts closing; the first reason wins. Queued frames are dropped.
    pub fn close(&self, reason: CloseReason) {
        let mut st = self.lock();
        if st.closing.is_none() {
            st.closing = Some(reason);
            st.queue.clear();
        }
        drop(st);
        self.wake_writer.notify_one();
        self.space.notify_one();
        self.done.cancel();
    }

    /// The reason the outbox is closing, if it is.
    pub fn closing(&self) -> Option<CloseReason> {
        self.lock().closing
    }

    /// A token cancelled once the outbox starts closing.
    pub fn done(&self) -> CancellationToken {
        self.done.clone()
    }

    /// Records that the peer showed a sign of life.
    pub fn mark_alive(&self) {
        self.alive.store(true, Ordering::Relaxed);
    }

    /// Whether the peer showed a sign of life since the last call.
    pub fn take_alive(&self) -> bool {
        self.alive.swap(false, Ordering::Relaxed)
    }

    /// Writer side, without waiting: tops `out` up to `max` frames with what is queued.
    pub fn take_more(&self, out: &mut Vec<Utf8Bytes>, max: usize) {
        let mut st = self.lock();
        if st.closing.is_some() {
            return;
        }
        let moved = st.drain_into(out, max.saturating_sub(out.len()));
        drop(st);
        if moved > 0 {
            self.space.notify_one();
        }
    }

    /// Writer side: moves up to `max` frames into `out`, or reports that the outbox is closing.
    /// Waits while there is nothing to do.
    pub async fn next_batch(
        &self,
        out: &mut Vec<Utf8Bytes>,
        max: usize,
    ) -> Result<(), CloseReason> {
        loop {
            {
                let mut st = self.lock();
                if let Some(reason) = st.closing {
                    return Err(reason);
                }
                if !st.queue.is_empty() {
                    st.drain_into(out, max);
                    drop(st);
                    self.space.notify_one();
                    return Ok(());
                }
            }
            self.wake_writer.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(s)
    }

    #[tokio::test]
    async fn keeps_order_across_kinds_and_drains_in_batches() {
        let o = Outbox::new(10, 1 << 20);
        o.push(f("a")).await.unwrap();
        assert_eq!(o.push_live(f("b")), LivePush::Queued);
        o.push_now(f("c")).unwrap();
        let mut out = Vec::new();
        o.next_batch(&mut out, 2).await.unwrap();
        o.next_batch(&mut out, 2).await.unwrap();
        assert_eq!(out, vec![f("a"), f("b"), f("c")]);
    }

    #[tokio::test]
    async fn live_overflow_closes_with_too_slow_and_refuses_more() {
        let o = Outbox::new(2, 1 << 20);
        assert_eq!(o.push_live(f("1")), LivePush::Queued);
        assert_eq!(o.push_live(f("2")), LivePush::Queued);
        assert_eq!(o.push_live(f("3")), LivePush::Overflow);
        assert_eq!(o.push_live(f("4")), LivePush::Closed);
        assert_eq!(o.push(f("x")).await, Err(Closed));
        let mut out = Vec::new();
        assert_eq!(o.next_batch(&mut out, 8).await, Err(CloseReason::TooSlow));
        assert!(out.is_empty());
    }

    #[test]
    fn the_byte_bound_closes_too() {
        let o = Outbox::new(100, 10);
        assert_eq!(o.push_live(f("12345")), LivePush::Queued);
        assert_eq!(o.push_live(f("12345")), LivePush::Queued);
        assert_eq!(o.push_live(f("1")), LivePush::Overflow);
        assert_eq!(o.closing(), Some(CloseReason::TooSlow));
    }

    #[tokio::test]
    async fn draining_frees_live_slots() {
        let o = Outbox::new(2, 1 << 20);
        let mut out = Vec::new();
        for _ in 0..10 {
            assert_eq!(o.push_live(f("m")), LivePush::Queued);
            assert_eq!(o.push_live(f("m")), LivePush::Queued);
            o.next_batch(&mut out, 8).await.unwrap();
        }
        assert_eq!(out.len(), 20);
    }

    #[tokio::test]
    async fn session_push_waits_for_the_writer_instead_of_failing() {
        let o = std::sync::Arc::new(Outbox::new(1, 1 << 20));
        for _ in 0..PUSH_WINDOW {
            o.push(f("h")).await.unwrap();
        }
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push(f("last")).await });
        let mut out = Vec::new();
        o.next_batch(&mut out, 1).await.unwrap();
        blocked.await.unwrap().unwrap();
        while out.len() < PUSH_WINDOW + 1 {
            o.next_batch(&mut out, 100).await.unwrap();
        }
        assert_eq!(out.last(), Some(&f("last")));
    }

    #[tokio::test]
    async fn close_wakes_a_waiting_session() {
        let o = std::sync::Arc::new(Outbox::new(1, 1 << 20));
        for _ in 0..PUSH_WINDOW {
            o.push(f("h")).await.unwrap();
        }
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push(f("last")).await });
        o.close(CloseReason::Restart);
        assert_eq!(blocked.await.unwrap(), Err(Closed));
    }
}
