//! Small concurrency helpers shared by the whole crate, defined once: a lock that survives
//! a panicking holder, and the back-off between retries of a failed Redis operation.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

/// Locks `m`, recovering the data if a holder once panicked. The crate's critical sections
/// are short and never panic; this keeps one bug from turning into a crash loop.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential back-off between retries: 50 ms, doubling, at most 2 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// Sleeps for the current delay and doubles it for next time.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }

    /// Starts again from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_two_seconds_and_resets() {
        let mut b = Backoff::new();
        let mut waits = Vec::new();
        for _ in 0..8 {
            let start = tokio::time::Instant::now();
            b.wait().await;
            waits.push(start.elapsed().as_millis());
        }
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        let start = tokio::time::Instant::now();
        b.wait().await;
        assert_eq!(start.elapsed().as_millis(), 50);
    }
}
