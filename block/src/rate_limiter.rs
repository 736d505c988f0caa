//! The token-bucket rate limiter lives in vmkit-virtio (shared with other devices); re-exported
//! here under its old path.

pub use vmkit_virtio::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig, TokenBucket};
