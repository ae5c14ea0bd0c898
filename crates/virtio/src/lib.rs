//! Pollux virtio.
//!
//! - [`ring`]: the one definition of the split and packed virtqueue layouts (virtio 1.2
//!   §2.7 and §2.8): entry sizes, field offsets, flags, alignment. Both the driver side (this
//!   crate) and the device side (`crates/vhost`) compute every ring address from it.
//! - [`blk`]: virtio-blk request header, request types, status codes, feature bits and the
//!   configuration space layout (virtio 1.2 §5.2).
//! - [`features`]: the device-independent feature bits (virtio 1.2 §6).
//! - [`queue`]: the driver side of split and packed virtqueues in DMA memory: chains added,
//!   published with one store per batch, used entries polled and checked.
//! - [`backend`]: [`backend::VirtioBackend`], a device's control plane with one method per
//!   request, and the vhost-user front-end that implements it (rust-vmm's `vhost` crate).
//! - [`device`]: a virtio-blk device set up through a back-end: features, config space,
//!   memory table, a pool of queues.
//! - [`bdev`]: the `virtio_blk` bdev module (`bdev_virtio_attach_controller`).
//!
//! `unsafe` lives in `mem` only: volatile ring accesses and one `poll(2)`.

pub mod backend;
pub mod bdev;
pub mod blk;
pub mod device;
pub mod error;
pub mod features;
mod mem;
pub mod queue;
pub mod ring;

pub use error::VirtioError;
