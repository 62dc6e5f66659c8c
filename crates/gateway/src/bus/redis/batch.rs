//! Publishes that meet in time share one round trip and one script call.
//!
//! On a single Redis (standalone or Sentinel-managed) every publish goes through one lane:
//! a task that sends the waiting publishes as one `EVALSHA` of the publish script and,
//! while that call is in flight, lets the next ones gather. At low load a publish finds
//! the lane idle and goes at once, alone (no added delay); under load a call carries
//! everything that arrived during the previous one, so Redis pays one script call, one
//! `TIME` and one reply for many messages instead of one each. With a batch interval
//! (`PUBLISH_BATCH_MS`) the lane also paces itself under load: after a call that carried
//! more than one message, the next starts no sooner than the interval after it began, so
//! calls carry more messages each (much of Redis' cost is per call: a read, a reply, the
//! script's setup, one write to each subscribed instance). A call that carried one
//! message means the lane is quiet: the next publish goes at once, as without the
//! interval. A full batch is never held back. Each message is still
//! stored and published as if alone (its own id, history, dedupe record, `PUBLISH`), and
//! one that fails does not fail the others.
//!
//! On a Cluster the keys of one call must share a slot and a room has its own, so there
//! publishes are not batched (see docs/architecture.md).
//!
//! No late store after an `unavailable`: a publish that waited longer than
//! `REDIS_TIMEOUT_MS` for its turn is answered [`BusError::Timeout`] without being sent,
//! and one whose caller has gone is dropped; the caller waits four times that at most
//! (a queue wait and the call, each bounded by the timeout, fit well inside).

use std::{sync::Arc, time::Duration};

use fred::prelude::Client;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use super::scripts::{PublishRequest, Scripts};
use crate::bus::{BusError, Published};

/// Most messages in one script call.
const MAX_BATCH: usize = 64;

/// Publishes waiting for the lane at most: beyond it a publish is answered
/// [`BusError::Timeout`] at once (the client gets `unavailable` and may retry). Each
/// connection has at most one publish in flight, so this is reached only by thousands
/// of connections sending at the same moment to a Redis that has stopped answering.
const QUEUE: usize = 16_384;

struct Waiting {
    request: PublishRequest,
    /// Not sent after this: the caller has been, or is about to be, told `unavailable`.
    deadline: Instant,
    reply: oneshot::Sender<Result<Published, BusError>>,
}

/// The way into the lane.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    queue: mpsc::Sender<Waiting>,
    timeout: Duration,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting").finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts the lane's task, which runs `scripts` on `client`; each publish waits for
    /// its turn at most `timeout`.
    ///
    /// A call starts no sooner than `interval` after the previous one began when that one
    /// carried several messages but not a full batch (`Duration::ZERO`: as soon as the
    /// previous one is answered).
    pub(super) fn start(
        scripts: Arc<Scripts>,
        client: Client,
        timeout: Duration,
        interval: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (queue, waiting) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(scripts, client, waiting, interval));
        (Lane { queue, timeout }, task)
    }

    /// Publishes `request` with whatever else is waiting.
    pub(super) async fn publish(&self, request: PublishRequest) -> Result<Published, BusError> {
        let (reply, outcome) = oneshot::channel();
        let waiting = Waiting {
            request,
            deadline: Instant::now() + self.timeout,
            reply,
        };
        self.queue.try_send(waiting).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => BusError::Timeout,
            mpsc::error::TrySendError::Closed(_) => BusError::Disconnected,
        })?;
        match tokio::time::timeout(self.timeout * 4, outcome).await {
            Ok(Ok(result)) => result,
            // The lane's task has stopped (shutdown).
            Ok(Err(_)) => Err(BusError::Disconnected),
            Err(_) => Err(BusError::Timeout),
        }
    }
}

/// The lane's task: one script call at a time, each for everything that is waiting.
async fn run(
    scripts: Arc<Scripts>,
    client: Client,
    mut waiting: mpsc::Receiver<Waiting>,
    interval: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut requests = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    // When the next call may start: the previous one's start plus the interval when it
    // carried more than one message (under load) but not a full batch, else at once.
    let mut next_call = Instant::now();
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if batch.len() < MAX_BATCH && next_call > Instant::now() {
            // Busy: gather until the interval is up or the batch is full.
            let up = tokio::time::sleep_until(next_call);
            tokio::pin!(up);
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                tokio::select! {
                    () = &mut up => break,
                    // Cancel safe: nothing is taken from the queue unless it returns.
                    n = waiting.recv_many(&mut batch, room) => if n == 0 { break },
                }
            }
        }
        let now = Instant::now();
        next_call = if (2..MAX_BATCH).contains(&batch.len()) {
            now + interval
        } else {
            now
        };
        for w in batch.drain(..) {
            if w.reply.is_closed() {
                continue;
            }
            if w.deadline <= now {
                let _ = w.reply.send(Err(BusError::Timeout));
                continue;
            }
            requests.push(w.request);
            replies.push(w.reply);
        }
        if requests.is_empty() {
            continue;
        }
        let outcome = scripts.publish_many(&client, &requests).await;
        requests.clear();
        match outcome {
            Ok(outcomes) => {
                for (reply, outcome) in replies.drain(..).zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(err) => {
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(err.again()));
                }
            }
        }
        replies.clear();
    }
}
