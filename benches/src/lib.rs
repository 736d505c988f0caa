//! Criterion benchmarks that cut across vmkit crates; see `benches/`.
