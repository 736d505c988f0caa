//! Token-bucket rate limiting on bytes/s and operations/s, with burst.
//!
//! A bucket holds up to `capacity` tokens (the burst) and refills at `rate` tokens per second.
//! A request takes one ops token and `len` bytes tokens; when either bucket is short the queue
//! stops and the device reports when to retry ([`RateLimiter::retry_after`]).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Configuration of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketConfig {
    /// Tokens added per second.
    pub rate: u64,
    /// Most tokens held at once (the burst size); at least 1.
    pub capacity: u64,
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    cfg: BucketConfig,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(cfg: BucketConfig) -> Self {
        let cfg = BucketConfig {
            rate: cfg.rate.max(1),
            capacity: cfg.capacity.max(1),
        };
        Self {
            cfg,
            tokens: cfg.capacity,
            last: Instant::now(),
        }
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
        self.tokens >= n.min(self.cfg.capacity)
    }

    fn take(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }

    /// Time until `n` tokens will be available.
    fn wait_for(&self, n: u64) -> Duration {
        let need = n.min(self.cfg.capacity).saturating_sub(self.tokens);
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
/// use vmkit_block::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
/// let mut rl = RateLimiter::new(RateLimiterConfig {
///     bandwidth: None,
///     ops: Some(BucketConfig { rate: 1, capacity: 2 }),
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
        let now = Instant::now();
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
