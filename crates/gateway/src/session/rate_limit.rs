//! The frame rate limit of one connection: a token bucket (`RATE_LIMIT_PER_SEC` frames a
//! second on average, bursts of `RATE_LIMIT_BURST`).

use tokio::time::Instant;

/// A token bucket: `rate` frames per second on average, bursts of `burst`.
#[derive(Debug)]
pub(super) struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket. `rate == 0` disables the limit.
    pub(super) fn new(rate: u32, burst: u32) -> Self {
        RateLimit {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token for one frame; `false` when the client is over its rate.
    pub(super) fn allow(&mut self) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket() {
        let mut r = RateLimit::new(10, 3);
        assert!(r.allow() && r.allow() && r.allow());
        assert!(!r.allow());
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        assert!(r.allow());
        assert!(!r.allow());
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        assert!(r.allow() && r.allow() && r.allow());
        assert!(!r.allow());
        let mut off = RateLimit::new(0, 0);
        assert!((0..1000).all(|_| off.allow()));
    }
}
