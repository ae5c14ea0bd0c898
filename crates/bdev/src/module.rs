//! The module interface: what a backend (malloc, null, aio, uring, ...) implements.
//! Kept small on purpose (STYLE #9, SPDK's `spdk_bdev_fn_table`):
//!
//! - [`BdevBackend`], one per bdev, shared by every channel: [`supports`](BdevBackend::supports),
//!   [`create_channel`](BdevBackend::create_channel) and
//!   [`write_config`](BdevBackend::write_config) (so that `save_config` can rebuild the bdev);
//! - [`BackendChannel`], one per [`BdevChannel`](crate::BdevChannel), owned by one thread:
//!   [`submit`](BackendChannel::submit) and [`poll`](BackendChannel::poll), and optionally
//!   [`interrupt_fd`](BackendChannel::interrupt_fd) for interrupt-mode apps.
//!
//! The bdev layer has already checked every request it hands a module: the type is supported,
//! the block range lies inside the bdev, the iovecs add up to `num_blocks * block_size` and
//! start at the required alignment, the descriptor may write. A module only moves data.
//!
//! Completion: a module reports an I/O done by pushing its slot into the channel's
//! [`CompletionQueue`], either inside `submit` (a module that finishes synchronously, as
//! null and malloc do) or from `poll` (one that waits on a device or the kernel). Either way
//! the submitter sees the completion only from its next [`BdevChannel::poll`](crate::BdevChannel::poll),
//! never inside its own submit call (STYLE #6). Slots are `0..queue_depth`, so a module
//! keeps per-I/O state in arrays sized at `create_channel` and never allocates per I/O.
//!
//! A configuration method (`bdev_malloc_create`, ...) is added to a
//! [`MethodTable`](crate::config::MethodTable) with a parse function; see [`crate::config`].
//!
//! # Example: a module whose reads return zeroes
//!
//! ```
//! use std::sync::Arc;
//! use pollux_bdev::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
//! use pollux_bdev::{BdevError, BdevInfo, BdevRegistry, BdevSpec, IoStatus, IoType};
//!
//! struct Zero;
//! struct ZeroChannel;
//!
//! impl BdevBackend for Zero {
//!     fn module_name(&self) -> &'static str {
//!         "zero"
//!     }
//!     fn supports(&self, io_type: IoType) -> bool {
//!         io_type == IoType::Read
//!     }
//!     fn create_channel(&self, _queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
//!         Ok(Box::new(ZeroChannel))
//!     }
//!     fn write_config(&self, info: &BdevInfo) -> serde_json::Value {
//!         serde_json::json!({ "method": "bdev_zero_create", "params": { "name": info.name } })
//!     }
//! }
//!
//! impl BackendChannel for ZeroChannel {
//!     fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
//!         for iov in io.iovs {
//!             // SAFETY: the bdev layer hands only iovecs built with `IoVec::new`, whose
//!             // contract keeps the memory valid and unshared until this I/O completes.
//!             unsafe { std::ptr::write_bytes(iov.as_mut_ptr(), 0, iov.len_bytes()) };
//!         }
//!         done.complete(io.slot, IoStatus::Success);
//!     }
//! }
//!
//! let registry = BdevRegistry::new();
//! let spec = BdevSpec {
//!     name: "Zero0".into(),
//!     aliases: vec![],
//!     uuid: None,
//!     block_size_bytes: 512,
//!     num_blocks: 8,
//!     required_alignment_bytes: 1,
//!     write_cache: false,
//! };
//! registry.register(spec, Arc::new(Zero))?;
//! assert_eq!(registry.info("Zero0")?.module, "zero");
//! # Ok::<(), BdevError>(())
//! ```

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

use crate::error::BdevError;
use crate::types::{BdevInfo, IoStatus, IoType, IoVec};

/// One validated I/O, as a module sees it. Valid for the `submit` call only: a module that
/// completes later copies what it needs (the iovec array; the memory it points to stays
/// valid until completion by [`IoVec::new`]'s contract).
#[derive(Debug)]
pub struct IoRequest<'a> {
    /// The request slot, `0..queue_depth`; hand it back to [`CompletionQueue::complete`].
    pub slot: u16,
    pub io_type: IoType,
    pub offset_blocks: u64,
    /// 0 for a reset.
    pub num_blocks: u64,
    /// The data buffers of a read or write (empty for the other types).
    pub iovs: &'a [IoVec],
}

/// One backend per bdev. `Send + Sync`: the registry shares it with every thread that opens
/// a channel. Setup-path methods only; the I/O path is [`BackendChannel`].
pub trait BdevBackend: Send + Sync + 'static {
    /// The module's name (`malloc`), for logs and `bdev_get_bdevs`.
    fn module_name(&self) -> &'static str;

    /// Whether this bdev handles `io_type`; asked once per channel, not per I/O.
    fn supports(&self, io_type: IoType) -> bool;

    /// A channel for one thread, with request slots `0..queue_depth`.
    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError>;

    /// The configuration entry that recreates this bdev, in SPDK's form:
    /// `{"method": "bdev_malloc_create", "params": {...}}`.
    fn write_config(&self, info: &BdevInfo) -> serde_json::Value;
}

/// A module's per-thread state: owned by one [`BdevChannel`](crate::BdevChannel), used only
/// by the thread that polls it, so it needs no lock.
///
/// Dropping it with I/O in flight (its owner gave up without draining, say at a forced
/// shutdown) must leave no device or kernel operation able to touch those I/Os' buffers
/// once `drop` returns: cancel them or wait for them there.
pub trait BackendChannel: Send {
    /// Starts one validated I/O. Completes it (now or later) exactly once through `done`.
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue);

    /// Reaps finished I/Os into `done`; called at every channel poll. Returns how many were
    /// completed (0: idle). Synchronous modules keep the default.
    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        let _ = done;
        0
    }

    /// An fd that turns readable when a completion may be waiting for [`poll`](Self::poll),
    /// so that an interrupt-mode reactor can sleep while I/O is in flight (SPDK's
    /// `spdk_interrupt_register` on a module's eventfd). `None` (the default): completions
    /// raise no event, and an owner with I/O outstanding must keep polling.
    ///
    /// A module that returns an fd guarantees that, once `poll` returned, everything queued
    /// was handed to the device or kernel, or the fd is readable: sleeping until the fd is
    /// readable loses no I/O. The owner consumes the readiness (for an eventfd, a read)
    /// before it polls. The fds by module: malloc and null, an eventfd signalled when a
    /// completion lands in an empty queue ([`SyncWake`]); aio, the eventfd the kernel
    /// signals per completion (`IOCB_FLAG_RESFD`); uring, the ring's registered eventfd;
    /// virtio_blk, the virtqueue's call eventfd (the channel asks the device for used-buffer
    /// notifications only while it waits); nvme, a periodic timerfd armed while commands are
    /// outstanding (the polled driver has no interrupt). Asking for the fd is what turns the
    /// wake-ups on: a poll-mode owner never asks and never pays for them.
    fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// The wake-up of a module that completes inside `submit` (malloc, null): an eventfd created
/// by the first [`SyncWake::fd`] call and signalled, from then on, when a completion lands in
/// an empty [`CompletionQueue`] (one write per batch, not per I/O: a queue that already holds
/// completions has signalled). Before that call (poll mode) completing costs one branch.
#[derive(Debug, Default)]
pub struct SyncWake {
    fd: std::cell::OnceCell<Option<pollux_env::wake::WakeFd>>,
}

impl SyncWake {
    /// Queues the completion of `slot`, signalling the fd when the queue was empty.
    #[inline]
    pub fn complete(&self, done: &mut CompletionQueue, slot: u16, status: IoStatus) {
        if let Some(Some(fd)) = self.fd.get() {
            if done.is_empty() {
                fd.signal();
            }
        }
        done.complete(slot, status);
    }

    /// The eventfd (created at the first call; `None` when the system refused one, logged:
    /// the owner then keeps polling).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd
            .get_or_init(|| match pollux_env::wake::WakeFd::new() {
                Ok(fd) => Some(fd),
                Err(error) => {
                    tracing::warn!(%error, "bdev: eventfd for interrupt mode");
                    None
                }
            })
            .as_ref()
            .map(std::os::fd::AsFd::as_fd)
    }

    /// The fd if [`SyncWake::fd`] created it already (interrupt mode), without creating it.
    #[inline]
    pub fn active_fd(&self) -> Option<BorrowedFd<'_>> {
        match self.fd.get() {
            Some(Some(fd)) => Some(std::os::fd::AsFd::as_fd(fd)),
            _ => None,
        }
    }

    /// Signals the fd, if there is one (work left for the next poll).
    pub fn signal(&self) {
        if let Some(Some(fd)) = self.fd.get() {
            fd.signal();
        }
    }
}

/// One finished I/O waiting for its submitter's poll.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completed {
    pub(crate) slot: u16,
    pub(crate) status: IoStatus,
}

/// The queue where modules put finished I/Os. Its capacity is the channel's queue depth and
/// each slot completes once, so it never grows (no allocation after channel creation).
#[derive(Debug)]
pub struct CompletionQueue {
    pub(crate) entries: VecDeque<Completed>,
}

impl CompletionQueue {
    pub(crate) fn with_capacity(queue_depth: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(queue_depth),
        }
    }

    /// Reports the I/O in `slot` finished with `status`.
    #[inline]
    pub fn complete(&mut self, slot: u16, status: IoStatus) {
        self.entries.push_back(Completed { slot, status });
    }

    /// Finished I/Os not yet handed to the submitter.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
