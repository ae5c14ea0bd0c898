//! Pollux virtio.
//!
//! - [`ring`]: the one definition of the split and packed virtqueue layouts (virtio 1.2
//!   §2.7 and §2.8): entry sizes, field offsets, flags, alignment. Both the driver side (this
//!   crate) and the device side (`crates/vhost`) compute every ring address from it.
//! - [`blk`]: virtio-blk request header, request types, status codes, feature bits and the
//!   configuration space layout (virtio 1.2 §5.2).
//! - [`features`]: the device-independent feature bits (virtio 1.2 §6).

pub mod blk;
pub mod features;
pub mod ring;
