//! One connection's outbound queue, and the only way bytes reach a client's socket.
//!
//! Entries are whole WebSocket frames in wire form ([`super::frame`]): a chat message's
//! frame is built once per instance and the same shared bytes sit in every recipient's
//! queue. Writing is a non-blocking `writev` of up to [`WRITE_BATCH`] queued frames straight
//! from the queue, under the queue's lock, by whichever side comes first:
//! - the **dispatcher** that queued a batch of live messages ([`super::PendingWrites`]):
//!   no task wake-up, no thread hop, and every message of the batch shares the syscall;
//! - the **session**, when it is done with a client frame (its replies);
//! - the connection's **writer task** ([`super::writer`]) when the socket is full, for
//!   pings, and for the close frame.
//!
//! A frame the socket took only in part stays at the front, cut to what is left, so the
//! byte stream is never interleaved and a close frame always starts on a frame boundary.
//!
//! Two ways in, and a frame's [`Class`] decides its bounds:
//! - [`Outbox::push`] never waits. A [`Class::Live`] message (from the hub) is refused when
//!   `CLIENT_QUEUE` live messages or `CLIENT_QUEUE_BYTES` bytes of them already wait: the
//!   client is too slow and the outbox closes with 1013, so a slow client never holds up
//!   the hub or anyone else. [`Class::Reply`] (a frame that must land at an exact point,
//!   e.g. `joined` under the hub's room lock) and [`Class::Control`] (pongs and close
//!   replies from the WebSocket reader, pings) are never refused for space.
//! - [`Outbox::push_paced`] waits while a window of frames is queued: the session's own
//!   frames (history replay, acks, errors), so a replay far larger than `CLIENT_QUEUE` is
//!   flow-controlled and a client that floods us without reading is back-pressured
//!   through TCP.
//!
//! The queue keeps arrival order across all of them, which is what makes a join gap-free.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::{Buf, Bytes};
use metrics::Counter;
use tokio::{net::tcp::OwnedWriteHalf, sync::Notify};
use tokio_util::sync::CancellationToken;

use super::CloseReason;
use crate::sync::lock;

/// The write half of a connection's socket, as the outbox uses it. Implemented for the
/// TCP write half; tests and benchmarks bring their own.
pub trait Socket: Send + Sync + fmt::Debug {
    /// Writes as much of `bufs` as the socket takes now, without waiting
    /// ([`io::ErrorKind::WouldBlock`] when it takes nothing).
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Waits until the socket may take more bytes.
    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>>;
}

impl Socket for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>> {
        Box::pin(OwnedWriteHalf::writable(self))
    }
}

/// What a queued frame is, which decides how it is bounded (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A live chat message from the hub: counted against the live bounds.
    Live,
    /// A frame of the session's own.
    Reply,
    /// A pong, a close reply, a ping: kept even when the peer has closed, so its close is
    /// answered.
    Control,
}

/// The outbox is closing; the frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection is closing")]
pub struct Closed;

/// Bounds on what waits for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Live messages (`CLIENT_QUEUE`).
    pub live: usize,
    /// Bytes of live messages (`CLIENT_QUEUE_BYTES`).
    pub live_bytes: usize,
}

/// Frames the session may have waiting before [`Outbox::push_paced`] waits.
const PACED_WINDOW: usize = 64;

/// Control frames (mostly pongs the peer asked for) that may wait; a peer that keeps
/// pinging without reading is closed with 1008 beyond this.
pub const CONTROL_CAP: usize = 16;

/// Frames written per `writev` at most.
pub const WRITE_BATCH: usize = 64;

#[derive(Debug)]
struct Entry {
    frame: Bytes,
    class: Class,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    live: usize,
    live_bytes: usize,
    /// Control frames queued.
    control: usize,
    closing: Option<CloseReason>,
    /// The front entry was partly written: it must be finished before anything else.
    front_started: bool,
    /// The session waits in [`Outbox::push_paced`] for the queue to shrink.
    session_waits: bool,
}

impl State {
    fn enqueue(&mut self, frame: Bytes, class: Class) {
        match class {
            Class::Live => {
                self.live += 1;
                self.live_bytes += frame.len();
            }
            Class::Control => self.control += 1,
            Class::Reply => {}
        }
        self.queue.push_back(Entry { frame, class });
    }

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
            if front.class == Class::Live {
                self.live_bytes -= taken;
            }
            if taken == len {
                match front.class {
                    Class::Live => self.live -= 1,
                    Class::Control => self.control -= 1,
                    Class::Reply => {}
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
            let keep = (i == 0 && started) || (keep_control && e.class == Class::Control);
            i += 1;
            keep
        });
        self.live = 0;
        self.live_bytes = 0;
        for e in &mut self.queue {
            e.class = Class::Control;
        }
        self.control = self.queue.len();
    }
}

/// A bounded, ordered outbound queue shared by the hub and the session (producers) and
/// the writers (dispatchers' and the session's writes, the connection's writer task).
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    socket: Box<dyn Socket>,
    /// Wakes the writer task (single waiter).
    wake_writer: Notify,
    /// Wakes a session waiting in [`Outbox::push_paced`] (single waiter: the session task).
    space: Notify,
    /// Cancelled when the outbox starts closing: ends the session's read loop.
    done: CancellationToken,
    /// Set by the reader on every frame from the peer, taken by the writer's keep-alive.
    alive: AtomicBool,
    /// Listed in a [`super::PendingWrites`], waiting for its write.
    pub(super) pending: AtomicBool,
    /// When a coalesced batch last wrote this outbox (adaptive `WRITE_COALESCE_MODE`'s
    /// stamp; 0 = never).
    pub(super) last_flush: AtomicU64,
    bounds: Bounds,
    /// `chat_bytes_sent_total` (shared by every outbox; see [`Outbox::counting`]).
    pub(super) sent: Counter,
}

impl Outbox {
    /// An outbox writing to `socket`, closing the client as too slow beyond `bounds`.
    pub fn new(socket: Box<dyn Socket>, bounds: Bounds) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            socket,
            wake_writer: Notify::new(),
            space: Notify::new(),
            done: CancellationToken::new(),
            alive: AtomicBool::new(true),
            pending: AtomicBool::new(false),
            last_flush: AtomicU64::new(0),
            bounds,
            sent: Counter::noop(),
        }
    }

    /// Adds what this outbox writes to `sent` (`chat_bytes_sent_total`). A batch of
    /// writes ([`super::PendingWrites`]) adds its total once, not once per outbox.
    #[must_use]
    pub fn counting(mut self, sent: Counter) -> Self {
        self.sent = sent;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Queues `frame` without waiting (see [`Class`]). Not written yet: the caller writes
    /// with [`Outbox::write_or_defer`] (directly or through [`super::PendingWrites`]);
    /// only control frames wake the writer task themselves.
    pub fn push(&self, frame: Bytes, class: Class) -> Result<(), Closed> {
        let mut st = self.lock();
        match (st.closing, class) {
            // The peer closed: its close still gets answered.
            (Some(CloseReason::PeerClosed), Class::Control) => {}
            (Some(_), _) => return Err(Closed),
            (None, Class::Live)
                if st.live >= self.bounds.live
                    || st.live_bytes + frame.len() > self.bounds.live_bytes =>
            {
                self.start_closing(st, CloseReason::TooSlow);
                return Err(Closed);
            }
            (None, Class::Control) if st.control >= CONTROL_CAP => {
                self.start_closing(st, CloseReason::Flood);
                return Err(Closed);
            }
            (None, _) => {}
        }
        st.enqueue(frame, class);
        drop(st);
        if class == Class::Control {
            self.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Queues a frame of the session's own once fewer than a window of frames wait
    /// (writing what the socket takes when the window is full).
    pub async fn push_paced(&self, frame: Bytes) -> Result<(), Closed> {
        loop {
            {
                let mut st = self.lock();
                if st.closing.is_some() {
                    return Err(Closed);
                }
                if st.queue.len() < PACED_WINDOW {
                    st.enqueue(frame, Class::Reply);
                    return Ok(());
                }
                st.session_waits = true;
            }
            self.write_or_defer();
            // notify_one stores a permit when nobody waits, so a write that frees space
            // between the check above and this await is not missed.
            self.space.notified().await;
        }
    }

    /// Starts closing; the first reason wins. Nothing new is accepted (but control frames
    /// after [`CloseReason::PeerClosed`]); what is queued is dropped (for `PeerClosed`,
    /// all but control frames), except on a restart, which writes it all before its
    /// close frame.
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
        if !reason.writes_queue_first() {
            st.discard(reason == CloseReason::PeerClosed);
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
    pub(super) fn take_alive(&self) -> bool {
        self.alive.swap(false, Ordering::Relaxed)
    }

    /// Writes what the socket takes now, without waiting; if anything is left (a full
    /// socket) or the write failed, wakes the writer task to finish or report it.
    pub fn write_or_defer(&self) {
        let bytes = self.write_or_defer_uncounted();
        if bytes > 0 {
            self.sent.increment(bytes as u64);
        }
    }

    /// [`Outbox::write_or_defer`] without counting: returns the bytes written, for the
    /// caller to count with others.
    pub(super) fn write_or_defer_uncounted(&self) -> usize {
        match self.try_write() {
            Ok(p) if p.all => p.bytes,
            Ok(p) => {
                self.wake_writer.notify_one();
                p.bytes
            }
            Err(_) => {
                self.wake_writer.notify_one();
                0
            }
        }
    }

    /// Writes as much of the queue as the socket takes without waiting.
    pub(super) fn try_write(&self) -> io::Result<Progress> {
        let mut done = Progress {
            bytes: 0,
            all: false,
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
            let written = match self.socket.try_write_vectored(&slices[..count]) {
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

    /// Queues the close frame after everything else (the writer task, once
    /// [`Outbox::closed_and_drained`] said so).
    pub(super) fn push_close_frame(&self, frame: Bytes) {
        self.lock().enqueue(frame, Class::Control);
    }

    /// Waits until the socket can take more bytes.
    pub(super) async fn writable(&self) -> io::Result<()> {
        self.socket.writable().await
    }

    /// Waits until there may be something for the writer task to do.
    pub(super) async fn wait_for_work(&self) {
        self.wake_writer.notified().await;
    }

    /// The closing reason, once nothing is left to write before the close frame.
    pub(super) fn closed_and_drained(&self) -> Option<CloseReason> {
        let st = self.lock();
        st.closing.filter(|_| st.queue.is_empty())
    }
}

/// What [`Outbox::try_write`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Progress {
    /// Bytes the socket took.
    pub(super) bytes: usize,
    /// Nothing is left in the queue.
    pub(super) all: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::transport::frame::tests::parse_frames;

    /// A socket that keeps what is written, taking at most `room` more bytes (then it is
    /// "full" until [`CaptureSocket::grant`]).
    #[derive(Debug, Default)]
    pub(crate) struct CaptureSocket {
        written: Mutex<Vec<u8>>,
        room: Mutex<usize>,
        more_room: Notify,
    }

    impl CaptureSocket {
        /// A socket that takes everything.
        pub(crate) fn unbounded() -> Arc<Self> {
            let s = Arc::new(CaptureSocket::default());
            s.grant(usize::MAX);
            s
        }

        /// A full socket.
        pub(crate) fn full() -> Arc<Self> {
            Arc::new(CaptureSocket::default())
        }

        pub(crate) fn grant(&self, bytes: usize) {
            *lock(&self.room) = bytes;
            self.more_room.notify_one();
        }

        /// Raw bytes written so far (taken).
        pub(crate) fn take_bytes(&self) -> Vec<u8> {
            std::mem::take(&mut *lock(&self.written))
        }

        /// Payloads of the frames written so far (taken).
        pub(crate) fn take_payloads(&self) -> Vec<Vec<u8>> {
            parse_frames(&self.take_bytes())
                .into_iter()
                .map(|(_, p)| p)
                .collect()
        }
    }

    impl Socket for Arc<CaptureSocket> {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut room = lock(&self.room);
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut out = lock(&self.written);
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(*room - n);
                out.extend_from_slice(&b[..take]);
                n += take;
                if n == *room {
                    break;
                }
            }
            if *room != usize::MAX {
                *room -= n;
            }
            Ok(n)
        }

        fn writable(&self) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>> {
            Box::pin(async move {
                while *lock(&self.room) == 0 {
                    self.more_room.notified().await;
                }
                Ok(())
            })
        }
    }

    const BIG: Bounds = Bounds {
        live: usize::MAX,
        live_bytes: usize::MAX,
    };

    fn outbox(socket: &Arc<CaptureSocket>, live: usize, live_bytes: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            Box::new(socket.clone()),
            Bounds { live, live_bytes },
        ))
    }

    fn f(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn keeps_order_across_classes() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 10, 1 << 20);
        o.push_paced(f("a")).await.unwrap();
        o.push(f("b"), Class::Live).unwrap();
        o.push(f("c"), Class::Reply).unwrap();
        o.push(f("d"), Class::Control).unwrap();
        o.write_or_defer();
        assert_eq!(s.take_bytes(), b"abcd");
    }

    #[tokio::test]
    async fn live_overflow_closes_with_too_slow_and_refuses_more() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 2, 1 << 20);
        assert_eq!(o.push(f("1"), Class::Live), Ok(()));
        assert_eq!(o.push(f("2"), Class::Live), Ok(()));
        assert_eq!(o.push(f("3"), Class::Live), Err(Closed));
        assert_eq!(o.push(f("4"), Class::Live), Err(Closed));
        assert_eq!(o.push_paced(f("x")).await, Err(Closed));
        assert!(o.done().is_cancelled());
        assert_eq!(o.closed_and_drained(), Some(CloseReason::TooSlow));
        o.write_or_defer();
        assert!(s.take_bytes().is_empty());
    }

    #[test]
    fn the_byte_bound_closes_too() {
        let o = outbox(&CaptureSocket::unbounded(), 100, 10);
        assert_eq!(o.push(f("12345"), Class::Live), Ok(()));
        assert_eq!(o.push(f("12345"), Class::Live), Ok(()));
        assert_eq!(o.push(f("1"), Class::Live), Err(Closed));
        assert_eq!(o.closing(), Some(CloseReason::TooSlow));
    }

    #[test]
    fn writing_frees_live_slots() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 2, 1 << 20);
        for _ in 0..10 {
            assert_eq!(o.push(f("m"), Class::Live), Ok(()));
            assert_eq!(o.push(f("m"), Class::Live), Ok(()));
            o.write_or_defer();
        }
        assert_eq!(s.take_bytes().len(), 20);
    }

    #[test]
    fn a_peer_closed_connection_keeps_only_its_control_frames() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 10, 1 << 20);
        o.push(f("reply"), Class::Reply).unwrap();
        o.push(f("live"), Class::Live).unwrap();
        o.push(f("close-reply"), Class::Control).unwrap();
        o.close(CloseReason::PeerClosed);
        o.push(f("late-pong"), Class::Control).unwrap();
        assert_eq!(o.push(f("late-reply"), Class::Reply), Err(Closed));
        o.write_or_defer();
        assert_eq!(s.take_bytes(), b"close-replylate-pong");
        o.close(CloseReason::Gone);
        assert_eq!(o.closing(), Some(CloseReason::PeerClosed));
    }

    #[test]
    fn a_peer_that_makes_us_owe_too_many_pongs_is_closed_with_1008() {
        let s = CaptureSocket::full();
        let o = outbox(&s, 10, 1 << 20);
        for _ in 0..CONTROL_CAP {
            o.push(f("pong"), Class::Control).unwrap();
        }
        assert_eq!(o.push(f("pong"), Class::Control), Err(Closed));
        assert_eq!(o.closing(), Some(CloseReason::Flood));
        // A peer that reads frees its place.
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 10, 1 << 20);
        for _ in 0..CONTROL_CAP * 3 {
            o.push(f("pong"), Class::Control).unwrap();
            o.write_or_defer();
        }
        assert_eq!(o.closing(), None);
    }

    #[test]
    fn a_restart_writes_what_is_queued_before_closing() {
        let s = CaptureSocket::unbounded();
        let o = outbox(&s, 10, 1 << 20);
        o.push(f("live"), Class::Live).unwrap();
        o.push(f("ack"), Class::Reply).unwrap();
        o.close(CloseReason::Restart);
        assert_eq!(o.push(f("late"), Class::Live), Err(Closed));
        assert_eq!(o.closed_and_drained(), None, "the queue is written first");
        o.write_or_defer();
        assert_eq!(s.take_bytes(), b"liveack");
        assert_eq!(o.closed_and_drained(), Some(CloseReason::Restart));
    }

    #[tokio::test]
    async fn a_paced_push_waits_for_the_socket_instead_of_failing() {
        let s = CaptureSocket::full();
        let o = outbox(&s, 1, 1 << 20);
        for _ in 0..PACED_WINDOW {
            o.push_paced(f("h")).await.unwrap();
        }
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push_paced(f("last")).await });
        // Let the pusher reach its wait before making room.
        while !o.lock().session_waits {
            tokio::task::yield_now().await;
        }
        s.grant(usize::MAX);
        o.try_write().unwrap();
        blocked.await.unwrap().unwrap();
        o.try_write().unwrap();
        let mut expected = "h".repeat(PACED_WINDOW);
        expected.push_str("last");
        assert_eq!(s.take_bytes(), expected.as_bytes());
    }

    #[tokio::test]
    async fn close_wakes_a_waiting_session() {
        let o = outbox(&CaptureSocket::full(), 1, 1 << 20);
        for _ in 0..PACED_WINDOW {
            o.push_paced(f("h")).await.unwrap();
        }
        let o2 = o.clone();
        let blocked = tokio::spawn(async move { o2.push_paced(f("last")).await });
        o.close(CloseReason::Restart);
        assert_eq!(blocked.await.unwrap(), Err(Closed));
    }

    #[test]
    fn frames_are_written_whole_through_a_socket_that_takes_a_few_bytes_at_a_time() {
        let s = CaptureSocket::full();
        let o = outbox(&s, 10, 1 << 20);
        let frames: Vec<Bytes> = ["one", "two", "three"]
            .iter()
            .map(|t| crate::transport::frame::text(t.as_bytes()))
            .collect();
        for frame in &frames {
            o.push(frame.clone(), Class::Live).unwrap();
        }
        while !o.try_write().unwrap().all {
            s.grant(3);
        }
        assert_eq!(s.take_payloads(), [&b"one"[..], b"two", b"three"]);
    }

    /// A socket pair: the outbox writes to `server`'s write half, the test reads `client`.
    async fn pair() -> (Arc<Outbox>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        (Arc::new(Outbox::new(Box::new(write), BIG)), client)
    }

    /// What the writer task does with a full socket: write, wait until writable, repeat.
    fn write_in_background(o: &Arc<Outbox>) -> tokio::task::JoinHandle<()> {
        let o = o.clone();
        tokio::spawn(async move {
            while !o.try_write().unwrap().all {
                o.writable().await.unwrap();
            }
        })
    }

    #[tokio::test]
    async fn a_batch_is_written_whole_and_in_order_through_a_full_socket() {
        let (o, mut client) = pair().await;
        // Far more than socket buffers hold: the socket fills, the rest stays queued, a
        // frame is left half written, and later writes finish it before anything else.
        let frames: Vec<Bytes> = (0..40_000u32)
            .map(|i| Bytes::from(format!("<{i:07}:{}>", "x".repeat(200))))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut pending = crate::transport::PendingWrites::default();
        for frame in &frames {
            o.push(frame.clone(), Class::Live).unwrap();
            pending.add(&o);
        }
        assert_eq!(pending.len(), 1);
        pending.write_all();
        assert!(!o.try_write().unwrap().all, "the socket should be full");
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
        let (o, mut client) = pair().await;
        let big = Bytes::from(vec![b'a'; 16 << 20]);
        o.push(big.clone(), Class::Live).unwrap();
        o.push(f("dropped"), Class::Live).unwrap();
        assert!(!o.try_write().unwrap().all);
        o.close(CloseReason::Policy);
        assert_eq!(o.push(f("not-queued"), Class::Control), Err(Closed));
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
        assert_eq!(o.closed_and_drained(), Some(CloseReason::Policy));
    }
}
