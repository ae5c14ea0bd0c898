//! Pollux block device layer, after SPDK's `lib/bdev`:
//!
//! - [`BdevRegistry`]: modules register and unregister bdevs (name, aliases, UUID, block
//!   size and count, required buffer alignment, supported I/O types, write cache); a removed
//!   bdev tells every open descriptor ([`BdevEvent::Remove`]).
//! - [`BdevDesc`]: an open bdev, read-only or read-write, with an exclusive write claim
//!   ([`BdevDesc::claim`]).
//! - [`BdevChannel`]: one thread's I/O queue to a bdev: read / write with iovec lists, flush,
//!   unmap, write zeroes, reset; a fixed pool of request slots; completions handed to the
//!   submitter from [`BdevChannel::poll`]; per-channel [`IoStats`]; per-bdev rate limits
//!   ([`qos`], SPDK's `bdev_set_qos_limit`) shared by the bdev's channels.
//! - [`module`]: the interface a backend implements; [`modules`]: malloc (a RAM disk), null
//!   (no data), aio (a file or block device through Linux native AIO), uring (the same
//!   through io_uring) and delay (a virtual bdev that holds another's completions back by a
//!   configured latency, as SPDK's `bdev_delay_create`).
//! - [`config`]: SPDK's JSON configuration (`bdev_malloc_create`, `bdev_null_create`,
//!   `bdev_aio_create`, `bdev_uring_create`, `bdev_delay_create`, `bdev_set_qos_limit`).
//!
//! `unsafe` in the layer itself: only the TSC read in `clock`. In the modules: malloc's
//! copies between its disk and the caller's memory; aio's raw system calls (`io_setup`,
//! `io_submit`, `io_getevents`, `io_destroy` in `modules/aio/sys.rs`), its read of the
//! completion ring header the kernel maps into the process, and the iocbs it hands over;
//! uring's submission-queue pushes; the file modules' `statx`, `ioctl` and `fallocate`
//! calls (`modules/aio/file.rs`). Caller memory is described by [`IoVec`]s, whose
//! construction is `unsafe`: the caller promises the memory stays valid and untouched until
//! the I/O completes, which is what lets a module copy into it or hand it to the kernel.

mod bdev;
mod channel;
pub mod clock;
pub mod config;
mod error;
pub mod module;
pub mod modules;
pub mod qos;
pub mod stats;
mod types;

pub use bdev::{BdevDesc, BdevEvent, BdevRegistry, EventCallback, EventTarget, MAX_QUEUE_DEPTH};
pub use channel::{BdevChannel, IoCompletion, MAX_COMPLETIONS_PER_POLL};
pub use error::{BdevError, ModuleError};
pub use stats::{IoStats, LatencyHistogram, LatencySummaryUs, TypeStats};
pub use types::{BdevInfo, BdevSpec, IoStatus, IoType, IoVec, Uuid, UuidParseError};
