#![no_main]
//! Fuzz target: see `vmkit_fuzz_common::emulate::run`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmkit_fuzz_common::emulate::run(data));
