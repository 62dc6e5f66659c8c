//! A connection's writer task: finishes what other writers left in a full socket (bounded
//! by `WRITE_TIMEOUT_SECS` without progress), sends keep-alive pings and judges liveness
//! (any frame from the peer, or a full socket draining, is a sign of life; two ping
//! intervals without one end the connection), and ends the connection with the close
//! frame its [`CloseReason`] maps to.
//!
//! Not instrumented with a span: entering one each time the task is polled is measurable
//! on the hot path. It logs nothing itself: it returns why it ended ([`Ended`]), and the
//! connection logs that in its session's span (`conn`, `instance`, `user`).

use std::{io, sync::Arc, time::Duration};

use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};

use super::{CloseReason, Outbox, frame};

/// Why the writer ended the connection by itself, if it did.
#[derive(Debug)]
pub(super) enum Ended {
    /// A write failed.
    WriteFailed(io::Error),
    /// Waiting for the socket to take more failed.
    SocketFailed(io::Error),
    /// A full socket took nothing for `WRITE_TIMEOUT_SECS`.
    TimedOut,
    /// Two ping intervals without a sign of life.
    MissedPings,
}

/// The writer's clock settings.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    /// `PING_INTERVAL_SECS`: a ping every interval; two without a sign of life end it.
    pub(super) ping_every: Duration,
    /// `WRITE_TIMEOUT_SECS`: longest time a full socket may take no bytes.
    pub(super) write_timeout: Duration,
}

/// Runs until the outbox is closed and its close frame (if any) is written, or the peer is
/// gone; says why when it was the writer that ended it.
pub(super) async fn run(outbox: Arc<Outbox>, timing: Timing) -> Option<Ended> {
    let Timing {
        ping_every,
        write_timeout,
    } = timing;
    let mut ticker = interval_at(Instant::now() + ping_every, ping_every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unanswered = 0u32;
    let mut stalled_since = Instant::now();
    // The socket was full and became writable again: the peer's TCP acknowledged data,
    // so it is reading (e.g. a long replay while the session cannot read its pongs).
    let mut drained = false;
    let mut ended = None;
    // `clean`: the stream ends at a frame boundary, so a close frame may follow.
    let (reason, clean) = loop {
        let progress = match outbox.try_write() {
            Ok(p) => p,
            Err(err) => {
                ended = Some(Ended::WriteFailed(err));
                break (CloseReason::Gone, false);
            }
        };
        if progress.bytes > 0 {
            outbox.sent.increment(progress.bytes as u64);
        }
        if progress.bytes > 0 || progress.all {
            stalled_since = Instant::now();
        }
        if drained && progress.bytes > 0 {
            outbox.mark_alive();
        }
        drained = false;
        if progress.all
            && let Some(reason) = outbox.closed_and_drained()
        {
            break (reason, true);
        }
        tokio::select! {
            biased;
            ready = outbox.writable(), if !progress.all => {
                if let Err(err) = ready {
                    ended = Some(Ended::SocketFailed(err));
                    break (CloseReason::Gone, false);
                }
                drained = true;
            }
            () = sleep_until(stalled_since + write_timeout), if !progress.all => {
                ended = Some(Ended::TimedOut);
                break (CloseReason::TooSlow, false);
            }
            () = outbox.wait_for_work(), if progress.all => {}
            _ = ticker.tick() => {
                if outbox.take_alive() {
                    unanswered = 0;
                } else {
                    unanswered += 1;
                    if unanswered >= 2 {
                        ended = Some(Ended::MissedPings);
                        break (CloseReason::Gone, false);
                    }
                }
                // Refused only while closing, when the loop ends anyway.
                let _ = outbox.push(frame::PING, super::Class::Control);
            }
        }
    };
    outbox.close(reason);
    let Some(close) = reason.close_frame().filter(|_| clean) else {
        return ended;
    };
    outbox.push_close_frame(close);
    let _ = timeout(write_timeout, async {
        while let Ok(p) = outbox.try_write() {
            outbox.sent.increment(p.bytes as u64);
            if p.all || outbox.writable().await.is_err() {
                break;
            }
        }
    })
    .await;
    ended
}
