//! One connection's outbound queue, and the only way bytes reach a client's socket.
//!
//! Entries are whole WebSocket frames in wire form ([`crate::ws`]): a chat message's frame
//! is built once per instance and the same shared bytes sit in every recipient's queue.
//! Writing is `writev` of up to [`WRITE_BATCH`] queued frames straight from the queue,
//! under the queue's lock with a non-blocking call, by whichever side comes first:
//! - the **dispatcher** ([`Outbox::flush`], through [`Dirty`]), right after it queued a
//!   batch of live messages: no task wake-up, no thread hop, and every message that arrived
//!   in the same batch shares the syscall;
//! - the **session**, when it is done with a client frame (its replies);
//! - the connection's **writer task** when the socket is full (it waits until the socket
//!   is writable again, bounded by `WRITE_TIMEOUT_SECS`), for pings and control frames,
//!   and for the close frame.
//!
//! A frame the socket took only in part stays at the front, cut to what is left, so the
//! byte stream is never interleaved.
//!
//! Three ways in:
//! - [`Outbox::push_live`] — live messages from the hub. Never waits: when `CLIENT_QUEUE`
//!   live messages or `CLIENT_QUEUE_BYTES` bytes of them are already waiting, the client
//!   is too slow and the outbox closes with 1013, so a slow client can never hold up the
//!   hub or anyone else. The caller flushes (see [`Dirty`]).
//! - [`Outbox::push`] — frames the session produces itself (history replay, acks, errors).
//!   Waits for room instead, so a replay far larger than `CLIENT_QUEUE` is flow-controlled
//!   and a client that floods us without reading is back-pressured through TCP.
//! - [`Outbox::push_now`] / [`Outbox::push_control`] — a frame that must land at an exact
//!   point in the stream (`joined`, under the hub's room lock; pongs and close replies from
//!   the WebSocket reader). Never waits and is never refused for space.
//!
//! The queue keeps arrival order across all of them, which is what makes a join gap-free.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::{Buf, Bytes};
use tokio::{net::TcpStream, sync::Notify};
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
    /// The peer ended the connection: control frames still queued (the answer to its
    /// close) are written, nothing else.
    Finished,
    /// The peer stopped answering pings or the socket failed: no close frame.
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

/// Frames written per `writev` at most.
pub const WRITE_BATCH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A live message (counted against the live bounds).
    Live,
    /// A frame of the session's own.
    Reply,
    /// A control frame (pong, close reply, ping) or the rest of a partly written frame.
    Control,
}

#[derive(Debug)]
struct Entry {
    frame: Bytes,
    kind: Kind,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    live: usize,
    live_bytes: usize,
    closing: Option<CloseReason>,
    /// The front entry was partly written: it must be finished before anything else.
    front_started: bool,
    /// The session waits in [`Outbox::push`] for the queue to shrink.
    session_waits: bool,
}

impl State {
    /// Removes `n` written bytes from the front of the queue; returns whether a session
    /// waiting for space should be woken.
    fn consume(&mut self, mut n: usize) -> bool {
        let mut freed = false;
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let len = front.frame.len();
            let taken = n.min(len);
            if front.kind == Kind::Live {
                self.live_bytes -= taken;
            }
            if taken == len {
                if front.kind == Kind::Live {
                    self.live -= 1;
                }
                self.queue.pop_front();
                self.front_started = false;
                freed = true;
            } else {
                front.frame.advance(taken);
                self.front_started = true;
            }
            n -= taken;
        }
        freed && std::mem::take(&mut self.session_waits)
    }

    /// Drops queued frames when closing, keeping a partly written front frame (the stream
    /// must stay well-formed for the close frame) and, if asked, control frames.
    fn discard(&mut self, keep_control: bool) {
        let started = self.front_started;
        let mut i = 0usize;
        self.queue.retain(|e| {
            let keep = (i == 0 && started) || (keep_control && e.kind == Kind::Control);
            i += 1;
            keep
        });
        self.live = 0;
        self.live_bytes = 0;
        for e in &mut self.queue {
            e.kind = Kind::Control;
        }
    }
}

/// A bounded, ordered outbound queue shared by the hub (producer), the session (producer)
/// and the writers (the dispatcher's flush and the connection's writer task).
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// The socket; `None` in unit tests, where frames are taken with [`Outbox::take_queued`].
    socket: Option<Arc<TcpStream>>,
    /// Wakes the writer task (single waiter).
    wake_writer: Notify,
    /// Wakes a session waiting in [`Outbox::push`] (single waiter: the session task).
    space: Notify,
    /// Cancelled when the outbox starts closing: ends the session's read loop.
    done: CancellationToken,
    /// Set by the reader on every frame from the peer, taken by the writer's keep-alive.
    alive: AtomicBool,
    /// Listed in a dispatcher's [`Dirty`] set, waiting for its flush.
    dirty: AtomicBool,
    live_cap: usize,
    live_bytes_cap: usize,
}

impl Outbox {
    /// An outbox without a socket (tests take the frames with [`Outbox::take_queued`]),
    /// closing the client after `live_cap` undelivered live messages or `live_bytes_cap`
    /// bytes of them.
    pub fn new(live_cap: usize, live_bytes_cap: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            socket: None,
            wake_writer: Notify::new(),
            space: Notify::new(),
            done: CancellationToken::new(),
            alive: AtomicBool::new(true),
            dirty: AtomicBool::new(false),
            live_cap,
            live_bytes_cap,
        }
    }

    /// An outbox writing to `socket`.
    pub fn with_socket(live_cap: usize, live_bytes_cap: usize, socket: Arc<TcpStream>) -> Self {
        Outbox {
            socket: Some(socket),
            ..Outbox::new(live_cap, live_bytes_cap)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The critical sections never panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a live message, or closes the outbox (1013) when the client is too slow.
    /// Does not wake the writer: the caller flushes (see [`Dirty`]).
    pub fn push_live(&self, frame: Bytes) -> LivePush {
        let mut st = self.lock();
        if st.closing.is_some() {
            return LivePush::Closed;
        }
        if st.live >= self.live_cap || st.live_bytes + frame.len() > self.live_bytes_cap {
            self.start_closing(st, CloseReason::TooSlow);
            return LivePush::Overflow;
        }
        st.live += 1;
        st.live_bytes += frame.len();
        st.queue.push_back(Entry {
            frame,
            kind: Kind::Live,
        });
        LivePush::Queued
    }

    /// Queues a frame without waiting and without counting it against the live bound.
    /// Like [`Outbox::push`], it is written at the session's next [`Outbox::flush`].
    pub fn push_now(&self, frame: Bytes) -> Result<(), Closed> {
        let mut st = self.lock();
        if st.closing.is_some() {
            return Err(Closed);
        }
        st.queue.push_back(Entry {
            frame,
            kind: Kind::Reply,
        });
        Ok(())
    }

    /// Queues a control frame (a pong or the answer to a close from the WebSocket reader,
    /// a ping from the writer). Dropped when closing, unless the peer ended the connection.
    pub fn push_control(&self, frame: Bytes) {
        let mut st = self.lock();
        if st.closing.is_some_and(|r| r != CloseReason::Finished) {
            return;
        }
        st.queue.push_back(Entry {
            frame,
            kind: Kind::Control,
        });
        drop(st);
        self.wake_writer.notify_one();
    }

    /// Queues a frame once fewer than a window of frames are waiting (writing the window
    /// first when it is full). The session calls [`Outbox::flush`] when it is done with a
    /// client frame, so all it said in answer shares one write, from its own task.
    pub async fn push(&self, frame: Bytes) -> Result<(), Closed> {
        loop {
            {
                let mut st = self.lock();
                if st.closing.is_some() {
                    return Err(Closed);
                }
                if st.queue.len() < PUSH_WINDOW {
                    st.queue.push_back(Entry {
                        frame,
                        kind: Kind::Reply,
                    });
                    return Ok(());
                }
                st.session_waits = true;
            }
            // Write what the socket takes now; a full socket wakes the writer task.
            self.flush();
            // notify_one stores a permit when nobody waits, so a drain that happens
            // between the check above and this await is not missed.
            self.space.notified().await;
        }
    }

    /// Starts closing; the first reason wins. Queued frames are dropped (for
    /// [`CloseReason::Finished`], all but control frames).
    pub fn close(&self, reason: CloseReason) {
        let st = self.lock();
        if st.closing.is_none() {
            self.start_closing(st, reason);
        } else {
            drop(st);
            self.done.cancel();
        }
    }

    fn start_closing(&self, mut st: MutexGuard<'_, State>, reason: CloseReason) {
        st.closing = Some(reason);
        st.discard(reason == CloseReason::Finished);
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

    /// Wakes the writer task.
    fn wake(&self) {
        self.wake_writer.notify_one();
    }

    /// Writes what is queued now, without waiting; hands whatever the socket does not take
    /// to the writer task.
    pub fn flush(&self) {
        if self.socket.is_none() {
            return self.wake();
        }
        match self.write_now() {
            Ok(w) if w.all => {}
            // Full socket or an error: the writer task waits, or reports it.
            Ok(_) | Err(_) => self.wake(),
        }
    }

    /// Writes as much of the queue as the socket takes without waiting. Without a
    /// socket, nothing is written.
    pub fn write_now(&self) -> io::Result<Written> {
        let mut done = Written {
            bytes: 0,
            all: false,
        };
        let Some(socket) = &self.socket else {
            done.all = self.lock().queue.is_empty();
            return Ok(done);
        };
        let mut st = self.lock();
        loop {
            if st.queue.is_empty() {
                done.all = true;
                return Ok(done);
            }
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
            let mut count = 0usize;
            let mut total = 0usize;
            for (slot, entry) in slices.iter_mut().zip(st.queue.iter()) {
                *slot = IoSlice::new(&entry.frame);
                count += 1;
                total += entry.frame.len();
            }
            let written = match socket.try_write_vectored(&slices[..count]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            done.bytes += written;
            if st.consume(written) {
                self.space.notify_one();
            }
            if written < total {
                // The socket took less than offered: it is full for now.
                done.all = st.queue.is_empty();
                return Ok(done);
            }
        }
    }

    /// Queues the close frame, after [`Outbox::closed_and_flushed`] (the writer task only).
    pub fn push_close(&self, frame: Bytes) {
        self.lock().queue.push_back(Entry {
            frame,
            kind: Kind::Control,
        });
    }

    /// Waits until the socket can take more bytes (the writer task, after
    /// [`Outbox::write_now`] returned `Ok(false)`).
    pub async fn writable(&self) -> io::Result<()> {
        match &self.socket {
            Some(socket) => socket.writable().await,
            None => std::future::pending().await,
        }
    }

    /// Waits until there may be something for the writer task to do.
    pub async fn work(&self) {
        self.wake_writer.notified().await;
    }

    /// Whether a close can be written now: the closing reason once the queue is empty.
    pub fn closed_and_flushed(&self) -> Option<CloseReason> {
        let st = self.lock();
        st.closing.filter(|_| st.queue.is_empty())
    }

    /// Without a socket (tests, benchmarks): moves up to `max` queued frames to `out`.
    pub fn take_queued(&self, out: &mut Vec<Bytes>, max: usize) {
        let mut st = self.lock();
        let n = st.queue.len().min(max);
        let bytes = st.queue.iter().take(n).map(|e| e.frame.len()).sum();
        out.extend(st.queue.iter().take(n).map(|e| e.frame.clone()));
        if st.consume(bytes) {
            drop(st);
            self.space.notify_one();
        }
    }
}

/// What [`Outbox::write_now`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Bytes the socket took.
    pub bytes: usize,
    /// Nothing is left in the queue.
    pub all: bool,
}

/// The outboxes a dispatcher queued live messages into and has not flushed yet; each is
/// listed once however many messages it got. Flushing writes each one's batch with one
/// syscall, from the dispatcher itself.
#[derive(Debug, Default)]
pub struct Dirty(Vec<Arc<Outbox>>);

impl Dirty {
    /// Lists `outbox` unless it is already listed (here or by another dispatcher, which
    /// will flush it).
    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        if !outbox.dirty.swap(true, Ordering::AcqRel) {
            self.0.push(outbox.clone());
        }
    }

    /// Takes over every outbox listed in `other`.
    pub fn append(&mut self, other: &mut Dirty) {
        self.0.append(&mut other.0);
    }

    /// How many outboxes wait for a flush.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Flushes every listed outbox.
    pub fn flush(&mut self) {
        for outbox in self.0.drain(..) {
            // Cleared first: a push after this point lists the outbox again.
            outbox.dirty.store(false, Ordering::Release);
            outbox.flush();
        }
    }
}

impl Dirty {
    /// Like [`Dirty::flush`], but with more than `per_task` outboxes listed, the rest is
    /// flushed by other tasks, so a large fan-out is written from several worker threads
    /// at once. Must run inside a tokio runtime.
    pub fn flush_spread(&mut self, per_task: usize) {
        let per_task = per_task.max(1);
        while self.0.len() > per_task {
            let rest = self.0.split_off(self.0.len() - per_task);
            tokio::spawn(async move { Dirty(rest).flush() });
        }
        self.flush();
    }
}

impl Drop for Dirty {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    fn f(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn take(o: &Outbox, max: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        o.take_queued(&mut out, max);
        out
    }

    #[tokio::test]
    async fn keeps_order_across_kinds_and_drains_in_batches() {
        let o = Outbox::new(10, 1 << 20);
        o.push(f("a")).await.unwrap();
        assert_eq!(o.push_live(f("b")), LivePush::Queued);
        o.push_now(f("c")).unwrap();
        o.push_control(f("d"));
        let mut out = take(&o, 2);
        out.extend(take(&o, 8));
        assert_eq!(out, vec![f("a"), f("b"), f("c"), f("d")]);
    }

    #[tokio::test]
    async fn live_overflow_closes_with_too_slow_and_refuses_more() {
        let o = Outbox::new(2, 1 << 20);
        assert_eq!(o.push_live(f("1")), LivePush::Queued);
        assert_eq!(o.push_live(f("2")), LivePush::Queued);
        assert_eq!(o.push_live(f("3")), LivePush::Overflow);
        assert_eq!(o.push_live(f("4")), LivePush::Closed);
        assert_eq!(o.push(f("x")).await, Err(Closed));
        assert!(o.done().is_cancelled());
        assert_eq!(o.closed_and_flushed(), Some(CloseReason::TooSlow));
        assert!(take(&o, 8).is_empty());
    }

    #[test]
    fn the_byte_bound_closes_too() {
        let o = Outbox::new(100, 10);
        assert_eq!(o.push_live(f("12345")), LivePush::Queued);
        assert_eq!(o.push_live(f("12345")), LivePush::Queued);
        assert_eq!(o.push_live(f("1")), LivePush::Overflow);
        assert_eq!(o.closing(), Some(CloseReason::TooSlow));
    }

    #[test]
    fn draining_frees_live_slots() {
        let o = Outbox::new(2, 1 << 20);
        let mut n = 0;
        for _ in 0..10 {
            assert_eq!(o.push_live(f("m")), LivePush::Queued);
            assert_eq!(o.push_live(f("m")), LivePush::Queued);
            n += take(&o, 8).len();
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn a_finished_connection_keeps_only_its_control_frames() {
        let o = Outbox::new(10, 1 << 20);
        o.push_now(f("reply")).unwrap();
        assert_eq!(o.push_live(f("live")), LivePush::Queued);
        o.push_control(f("close-reply"));
        o.close(CloseReason::Finished);
        o.push_control(f("late-pong"));
        assert_eq!(take(&o, 8), vec![f("close-reply"), f("late-pong")]);
        o.close(CloseReason::Gone);
        assert_eq!(o.closing(), Some(CloseReason::Finished));
    }

    #[tokio::test]
    async fn session_push_waits_for_the_writer_instead_of_failing() {
        let o = std::sync::Arc::new(Outbox::new(1, 1 << 20));
        for _ in 0..PUSH_WINDOW {
            o.push(f("h")).await.unwrap();
        }
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push(f("last")).await });
        // Let the pusher reach its wait before making room.
        while !o.lock().session_waits {
            tokio::task::yield_now().await;
        }
        let mut out = take(&o, 1);
        blocked.await.unwrap().unwrap();
        while out.len() < PUSH_WINDOW + 1 {
            out.extend(take(&o, 100));
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

    /// A socket pair: the outbox writes to `server`'s write half, the test reads `client`.
    async fn pair(live_cap: usize) -> (Arc<Outbox>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            Arc::new(Outbox::with_socket(live_cap, usize::MAX, Arc::new(server))),
            client,
        )
    }

    /// What the writer task does with a full socket: write, wait until writable, repeat.
    fn write_in_background(o: &Arc<Outbox>) -> tokio::task::JoinHandle<()> {
        let o = o.clone();
        tokio::spawn(async move {
            while !o.write_now().unwrap().all {
                o.writable().await.unwrap();
            }
        })
    }

    #[tokio::test]
    async fn a_flush_writes_every_queued_frame_in_order_through_a_full_socket() {
        let (o, mut client) = pair(usize::MAX).await;
        // Far more than socket buffers hold: the socket fills, the rest stays queued, a
        // frame is left half written, and later writes finish it before anything else.
        let frames: Vec<Bytes> = (0..40_000u32)
            .map(|i| Bytes::from(format!("<{i:07}:{}>", "x".repeat(200))))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut dirty = Dirty::default();
        for frame in &frames {
            assert_eq!(o.push_live(frame.clone()), LivePush::Queued);
            dirty.add(&o);
        }
        assert_eq!(dirty.len(), 1);
        dirty.flush();
        assert!(!o.write_now().unwrap().all, "the socket should be full");
        let writer = write_in_background(&o);
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == expected, "bytes differ from the queued frames");
        let st = o.lock();
        assert_eq!((st.live, st.live_bytes, st.queue.len()), (0, 0, 0));
    }

    #[tokio::test]
    async fn closing_keeps_a_half_written_frame_so_the_stream_stays_whole() {
        let (o, mut client) = pair(usize::MAX).await;
        let big = Bytes::from(vec![b'a'; 16 << 20]);
        assert_eq!(o.push_live(big.clone()), LivePush::Queued);
        assert_eq!(o.push_live(f("dropped")), LivePush::Queued);
        assert!(!o.write_now().unwrap().all);
        o.close(CloseReason::Restart);
        o.push_control(f("not-queued-while-closing"));
        {
            let st = o.lock();
            assert_eq!(st.queue.len(), 1, "only the started frame is kept");
            assert!(st.front_started);
        }
        let writer = write_in_background(&o);
        let mut got = vec![0u8; big.len()];
        client.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == big, "the big frame arrives whole");
        assert_eq!(o.closed_and_flushed(), Some(CloseReason::Restart));
    }
}
