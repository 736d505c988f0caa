//! # vmkit-block
//!
//! A virtio-blk device (virtio 1.2 §5.2) for vmkit VMMs.
#![deny(missing_docs)]

pub mod config;
pub mod defs;
pub mod device;
pub mod exec;
mod fast;
mod guest;
pub mod image;
pub mod metrics;
pub mod persist;
pub mod rate_limiter;
pub mod request;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod uring;
pub mod worker;

pub use config::BlockConfig;
pub use device::{Block, BlockError};
pub use image::DiskImage;
pub use worker::EngineKind;
