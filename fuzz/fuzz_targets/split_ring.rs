//! The device-side split ring walker against a hostile driver (see `pollux_fuzz::rings`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollux_fuzz::rings::{run, RingInput};

fuzz_target!(|input: RingInput| run(&input, false));
