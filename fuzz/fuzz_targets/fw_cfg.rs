#![no_main]
//! Fuzz target: see `vmkit_fuzz_common::fw_cfg`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmkit_fuzz_common::fw_cfg::run(data));
