//! Criterion benches of vmkit-block (filled in below).
fn main() {}
