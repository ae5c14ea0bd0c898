//! Pollux vhost-user-blk target: serves bdevs to virtual machines over vhost-user, zero copy
//! from guest memory to the bdev.
//!
//! - [`guest_memory`]: the front-end's memory table, mapped `MAP_SHARED`, every access checked
//!   and volatile; regions registered for DMA so an NVMe device reaches guest pages.
//! - [`queue`]: device-side split and packed virtqueues (indirect descriptors, EVENT_IDX), the
//!   ring as hostile input.
//! - [`blk`]: the virtio-blk device: requests become bdev I/O on the queue's thread; optional
//!   interrupt coalescing.
//! - [`inflight`]: the inflight region (INFLIGHT_SHMFD) that lets a restarted target resubmit
//!   the requests a killed one left in flight.
//! - [`dirty_log`]: the live-migration log (LOG_SHMFD, VHOST_F_LOG_ALL): one bit per guest
//!   page the target writes, set while the front-end logs.
//! - `controller`: the vhost-user back-end (rust-vmm `vhost`'s `BackendReqHandler`) on a
//!   control thread per controller; queues run in pollers on the controller's reactor threads.
//! - [`target`]: create / list / delete controllers at run time ([`VhostTarget`]), and the
//!   `vhost_blk` subsystem of SPDK's JSON config ([`config`]).
//!
//! Unsafe code: the volatile accesses in `guest_memory`, the atomic bitmap bytes of
//! `dirty_log`, the construction of the bdev iovecs
//! that point into guest memory in `blk`, and in `sys` the header / descriptor peeks the
//! control thread makes before the `vhost` crate reads a message and `memfd_create`; each
//! block with its SAFETY argument.

pub mod blk;
pub mod config;
mod controller;
pub mod dirty_log;
pub mod guest_memory;
pub mod inflight;
pub mod queue;
mod sys;
pub mod target;

pub use controller::{MAX_MEM_SLOTS, MAX_QUEUE_SIZE};
pub use target::{ControllerInfo, ControllerOptions, VhostError, VhostTarget};
