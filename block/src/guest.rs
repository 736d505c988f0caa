//! The request path's guest-memory accessors live in vmkit-virtio (`guest_access`), shared by
//! every device; re-exported here for the parser and executors.

pub(crate) use vmkit_virtio::guest_access::{check, iovecs, read_obj, write, write_u8};
