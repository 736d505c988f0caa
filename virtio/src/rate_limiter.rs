//! Token-bucket rate limiting on bytes/s and operations/s, with burst, for any device (virtio-blk
//! requests, virtio-net frames).
//!
//! A bucket holds up to `capacity` tokens (the steady burst) and refills at `rate` tokens per
//! second; `one_time_burst` extra tokens are available once, from the start, and never refill
//! (as Firecracker's and Cloud Hypervisor's limiters offer, e.g. for a fast boot). A request
//! takes one ops token and `len` bytes tokens; when either bucket is short the device stops the
//! queue (`ChainOutcome::Retry(Retry::After(..))` of [`crate::queue_pass`], or
//! `Activation::retry_after`) for [`RateLimiter::retry_after`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Configuration of one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens added per second.
    pub rate: u64,
    /// Most tokens held at once (the burst size); at least 1.
    pub capacity: u64,
    /// Extra tokens available once, before the bucket's own; never refilled.
    #[serde(default)]
    pub one_time_burst: u64,
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    cfg: BucketConfig,
    tokens: u64,
    /// What is left of the one-time burst.
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (with its whole one-time burst).
    pub fn new(cfg: BucketConfig) -> Self {
        Self::new_at(cfg, Instant::now())
    }

    fn new_at(cfg: BucketConfig, now: Instant) -> Self {
        let cfg = BucketConfig {
            rate: cfg.rate.max(1),
            capacity: cfg.capacity.max(1),
            one_time_burst: cfg.one_time_burst,
        };
        Self {
            cfg,
            tokens: cfg.capacity,
            burst: cfg.one_time_burst,
            last: now,
        }
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst_left(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_nanos() * u128::from(self.cfg.rate) / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.cfg.capacity);
            // Advance by the time those tokens represent, keeping the remainder.
            let used_ns = u128::from(add) * 1_000_000_000 / u128::from(self.cfg.rate);
            self.last += Duration::from_nanos(used_ns.min(u128::from(u64::MAX)) as u64);
            if self.tokens == self.cfg.capacity {
                self.last = now;
            }
        }
    }

    /// Whether `n` tokens are available at `now` (a request larger than the capacity passes
    /// when the bucket is full, so it cannot block forever).
    fn can_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        n <= self.burst || self.tokens >= n.saturating_sub(self.burst).min(self.cfg.capacity)
    }

    /// Take `n` tokens: the one-time burst first, then the bucket's own.
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.tokens = self.tokens.saturating_sub(n - from_burst);
    }

    /// Time until `n` tokens will be available.
    fn wait_for(&self, n: u64) -> Duration {
        let need = n
            .saturating_sub(self.burst)
            .min(self.cfg.capacity)
            .saturating_sub(self.tokens);
        Duration::from_nanos(
            (u128::from(need) * 1_000_000_000 / u128::from(self.cfg.rate)).min(u64::MAX as u128)
                as u64,
        )
    }
}

/// Configuration of a device's rate limiter; `None` buckets do not limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes per second (data of reads and writes).
    pub bandwidth: Option<BucketConfig>,
    /// Requests per second.
    pub ops: Option<BucketConfig>,
}

/// A bandwidth and an ops bucket.
///
/// ```
/// use vmkit_virtio::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
/// let mut rl = RateLimiter::new(RateLimiterConfig {
///     bandwidth: None,
///     ops: Some(BucketConfig { rate: 1, capacity: 2, one_time_burst: 0 }),
/// });
/// assert!(rl.consume(4096));
/// assert!(rl.consume(4096));
/// assert!(!rl.consume(4096)); // burst of 2 used up
/// assert!(rl.retry_after().unwrap() > std::time::Duration::ZERO);
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    blocked_on: Option<u64>,
}

impl RateLimiter {
    /// Build from a configuration.
    pub fn new(cfg: RateLimiterConfig) -> Self {
        Self {
            bandwidth: cfg.bandwidth.map(TokenBucket::new),
            ops: cfg.ops.map(TokenBucket::new),
            blocked_on: None,
        }
    }

    /// Whether any bucket is configured.
    pub fn is_active(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Take tokens for one request of `bytes` bytes; `false` (nothing taken) when throttled.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.can_take(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.can_take(1, now));
        if !(bw_ok && ops_ok) {
            self.blocked_on = Some(bytes);
            return false;
        }
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        self.blocked_on = None;
        true
    }

    /// After a refused [`consume`](Self::consume): how long until it would succeed.
    pub fn retry_after(&self) -> Option<Duration> {
        let bytes = self.blocked_on?;
        let bw = self
            .bandwidth
            .as_ref()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes));
        let ops = self.ops.as_ref().map_or(Duration::ZERO, |b| b.wait_for(1));
        Some(bw.max(ops))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u64, capacity: u64, one_time_burst: u64) -> BucketConfig {
        BucketConfig {
            rate,
            capacity,
            one_time_burst,
        }
    }

    /// Refill at the configured rate, capped at the capacity; the one-time burst is spent
    /// first and never comes back.
    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(bucket(1000, 100, 250), t0);
        // 100 own + 250 burst: 350 at once.
        assert!(b.can_take(350, t0));
        b.take(350);
        assert_eq!((b.tokens, b.one_time_burst_left()), (0, 0));
        assert!(!b.can_take(1, t0));
        assert_eq!(b.wait_for(50), Duration::from_millis(50));
        // 50 ms later: 50 tokens back (1000/s), the burst stays spent.
        let t1 = t0 + Duration::from_millis(50);
        assert!(b.can_take(50, t1));
        assert!(!b.can_take(51, t1));
        // A long pause refills to the capacity only.
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.can_take(100, t2));
        assert_eq!(b.tokens, 100);
        assert_eq!(b.one_time_burst_left(), 0);
    }

    #[test]
    fn both_buckets_must_allow_a_request() {
        let t0 = Instant::now();
        let mut rl = RateLimiter {
            bandwidth: Some(TokenBucket::new_at(bucket(1 << 20, 8192, 0), t0)),
            ops: Some(TokenBucket::new_at(bucket(10, 3, 1), t0)),
            blocked_on: None,
        };
        // Ops: 3 + 1 burst; bandwidth: 8192 bytes.
        assert!(rl.consume_at(4096, t0));
        assert!(rl.consume_at(4096, t0));
        assert!(!rl.consume_at(4096, t0), "bandwidth empty");
        assert_eq!(rl.retry_after(), Some(Duration::from_nanos(3_906_250)));
        assert!(rl.consume_at(0, t0) && rl.consume_at(0, t0));
        assert!(!rl.consume_at(0, t0), "ops empty (burst spent)");
        assert_eq!(rl.retry_after(), Some(Duration::from_millis(100)));
    }
}
