//! The bdev modules that ship with Pollux, one folder each.

pub mod aio;
pub mod malloc;
pub mod null;
pub mod uring;
