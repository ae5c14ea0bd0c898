//! The bdev modules that ship with Pollux, one folder each.

pub mod aio;
pub mod delay;
pub mod malloc;
pub mod null;
pub mod uring;
