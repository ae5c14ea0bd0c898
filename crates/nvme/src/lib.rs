//! Pollux's polled-mode NVMe driver (NVMe Base 2.0, NVM Command Set 1.0), written in the
//! spirit of SPDK's `lib/nvme`:
//!
//! - [`spec`]: wire formats (queue entries, registers, identify, log pages, features, status
//!   codes with their names);
//! - [`Registers`]: 32/64-bit register access, implemented for env's VFIO
//!   [`Bar`](pollux_env::vfio::Bar) and by the software controller model;
//! - [`QueuePair`]: one submission / completion ring pair in DMA memory, owned by one thread,
//!   with a fixed request pool indexed by command id, a fixed software queue for a full ring,
//!   batched doorbells (shadow doorbells with EventIdx when the controller offers Doorbell
//!   Buffer Config) and validation of every completion entry;
//! - [`prp`]: PRP lists and SGL descriptors built zero-copy from iovecs;
//! - [`Controller`]: initialisation, admin commands, namespaces, I/O queue pairs, timeouts
//!   (abort, then reset), reset, fatal status and surprise removal, shutdown;
//! - `model` (feature `model`): a software NVMe controller that executes the rings from the
//!   same DMA memory, with fault injection, for fast tests without a device.
//!
//! - [`bdev`]: the bdev module `nvme` (`bdev_nvme_attach_controller`), one bdev per
//!   namespace, one queue pair per bdev channel; [`PcieRegisters`]: a VFIO device and its
//!   BAR 0, owned together.
//!
//! MMIO goes through [`Registers`], DMA memory through env's bounds-checked volatile copy
//! accessors. `unsafe` outside the test-only model: two places, each with its `SAFETY`
//! note: [`PcieRegisters::open`] erases the BAR's borrow of the device it owns, and the
//! bdev channel turns a bdev iovec into a driver iovec (the same caller contract).

pub mod bdev;
mod ctrlr;
mod error;
#[cfg(feature = "model")]
pub mod model;
mod pcie;
pub mod prp;
mod qpair;
mod regs;
pub mod spec;

pub use ctrlr::{Controller, ControllerOptions, ControllerState, Namespace};
pub use error::NvmeError;
pub use pcie::PcieRegisters;
pub use prp::{DataPointer, IoVec};
pub use qpair::{QpairStats, QueuePair, QueuePairOptions};
pub use regs::Registers;
pub use spec::{Completion, Status};

/// Result alias for this crate.
pub type Result<T, E = NvmeError> = std::result::Result<T, E>;
