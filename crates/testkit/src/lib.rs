//! Test support for the tests that drive processes outside the test binary: a
//! qemu-storage-daemon vhost-user-blk export ([`qsd`]) and the workspace's own binaries
//! ([`bin`]).
//!
//! A dev-dependency only, and layer-neutral: it depends on no Pollux crate, so any crate's
//! tests may use it. Missing tools fail the test with how to get them; nothing is skipped.

pub mod bin;
pub mod qsd;
