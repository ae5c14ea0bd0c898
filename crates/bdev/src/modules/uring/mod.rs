//! The uring bdev, as SPDK's `module/bdev/uring`: a regular file or a block device through
//! io_uring (the `io-uring` crate), with the aio module's file semantics (O_DIRECT where
//! allowed, detected block size, required alignment).
//!
//! - Read and write: `IORING_OP_READ` / `IORING_OP_WRITE` for a single buffer,
//!   `IORING_OP_READV` / `IORING_OP_WRITEV` from the request's iovecs otherwise.
//! - Flush: `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`.
//! - Unmap and write zeroes: `IORING_OP_FALLOCATE` (a hole punched with `KEEP_SIZE` in a
//!   regular file, `ZERO_RANGE` on a block device), supported when the file system punches
//!   holes and the kernel has the opcode (5.6+). SPDK's uring bdev has neither; here they
//!   come free with the ring.
//! - Reset: not supported.
//!
//! One ring per channel, with as many submission entries as the channel has slots, so the
//! submission queue never fills and the completion queue (twice as large) never overflows.
//! `submit` writes one entry into the shared submission queue (no system call); the next
//! `poll` makes one `io_uring_enter` for everything written since, then reads completions
//! straight from the shared completion queue without entering the kernel. A poll with
//! nothing queued and no completion waiting makes no system call.
//!
//! The ring is set up as fio's io_uring engine sets up its own: `IORING_SETUP_SINGLE_ISSUER`
//! and `IORING_SETUP_DEFER_TASKRUN` (Linux 6.1+; older kernels get a plain ring). The kernel
//! then finishes a completion (the task work that posts its CQE) only when the channel's
//! thread enters the ring with `IORING_ENTER_GETEVENTS`, instead of interrupting that thread
//! (an IPI or a signal-like notification) once per completed batch; `IORING_SETUP_TASKRUN_FLAG`
//! tells the poller, through the shared `IORING_SQ_TASKRUN` flag, when such work waits, so a
//! poll enters the kernel only then or when it has entries to hand over. The ring is created
//! disabled (`IORING_SETUP_R_DISABLED`) and enabled by the first poll, so that its single
//! issuer is the thread that polls the channel, not the one that created it. Measured on a
//! shared 2-vCPU VM (docs/performance.md, 2026-12-07): with `bdevperf --interrupt-mode`, 4 KiB
//! random reads at queue depth 128 went from a median of 0.98 of fio to 1.06 (0.69 to 1.33
//! over the runs, a small gain against that noise); busy-polling stays below fio on that
//! oversubscribed machine.
//! Registered files (`IOSQE_FIXED_FILE`), batching submissions over several polls, COOP_TASKRUN,
//! SQPOLL, IOPOLL and `IORING_REGISTER_IOWQ_AFF` were measured too and are not used: none won
//! there (IOPOLL needs a device with poll queues; SQPOLL's kernel thread competed for the
//! second vCPU; COOP_TASKRUN cannot wake a reactor asleep in `epoll_wait`).
//!
//! I/O the kernel cannot finish inline (every read from tmpfs, which io_uring cannot try
//! without blocking) goes to io-wq worker threads, which inherit the reactor's pinning.
//! Moving them off the reactor's core (`IORING_REGISTER_IOWQ_AFF`: every other core of the
//! process) was measured on a 2-core VM and did not help (randread 4 KiB qd 128 on tmpfs,
//! 1-core mask: 176k IOPS against 182k without, the worker then costing a cross-core wakeup
//! per request), so the workers keep the kernel's default.
//!
//! Interrupt mode: [`BackendChannel::interrupt_fd`] creates an eventfd the first time it is
//! asked and registers it with the ring (`IORING_REGISTER_EVENTFD`), so the kernel signals it
//! on every completion and an interrupt-mode reactor can sleep in `epoll_wait` while I/O is
//! in flight. That frees the core for the io-wq worker serving tmpfs reads, which a busy-polling
//! reactor competes with. Poll-mode owners never ask, and so never pay for the signal.

use std::cell::OnceCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::config::{CreateContext, Params, PendingBdev};
use crate::error::BdevError;
use crate::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use crate::modules::aio::file::{
    self, BackingFile, KernelIovec, IOVS_RESERVED_PER_SLOT, MAX_IOVS_PER_IO,
};
use crate::modules::aio::FileBdevError;
use crate::types::{BdevInfo, BdevSpec, IoStatus, IoType, Uuid};
use crate::BdevRegistry;

/// The configuration method.
pub const METHOD: &str = "bdev_uring_create";

/// Completions read per poll at most (STYLE #4); the bdev layer caps what it hands out too.
const MAX_COMPLETIONS_PER_POLL: usize = 256;

/// What a uring bdev is made of (SPDK's `bdev_uring_create` parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringOptions {
    pub name: String,
    pub filename: PathBuf,
    /// `None`: detected, as for the aio bdev.
    pub block_size_bytes: Option<u32>,
    /// O_DIRECT where the file system allows it (the default, as SPDK); false: through the
    /// page cache, where io_uring serves cached reads inline (Pollux's `"direct": false`).
    pub direct: bool,
    pub uuid: Option<Uuid>,
}

impl UringOptions {
    pub fn new(name: impl Into<String>, filename: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            filename: filename.into(),
            block_size_bytes: None,
            direct: true,
            uuid: None,
        }
    }
}

fn new_ring(path: &std::path::Path, entries: u32) -> Result<IoUring, FileBdevError> {
    IoUring::new(entries).map_err(|source| FileBdevError::UringSetup {
        path: path.to_path_buf(),
        entries,
        source,
    })
}

/// A channel's ring: single issuer with deferred task work, created disabled (the first poll
/// enables it on the polling thread), and whether it got those flags; a plain, enabled ring
/// where the kernel refuses them (before Linux 6.1).
fn new_channel_ring(
    path: &std::path::Path,
    entries: u32,
) -> Result<(IoUring, bool), FileBdevError> {
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(entries);
    match deferred {
        Ok(ring) => Ok((ring, true)),
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "uring: no DEFER_TASKRUN ring, using a plain one");
            Ok((new_ring(path, entries)?, false))
        }
    }
}

struct UringBackend {
    file: Arc<BackingFile>,
    name: String,
    zeroing: bool,
    block_size_param: Option<u32>,
    /// The `direct` given at creation, for `write_config`.
    direct_param: bool,
}

impl BdevBackend for UringBackend {
    fn module_name(&self) -> &'static str {
        "uring"
    }

    fn supports(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::Unmap | IoType::WriteZeroes => self.zeroing,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let (ring, deferred) =
            new_channel_ring(&self.file.path, u32::from(queue_depth)).map_err(|error| {
                BdevError::ChannelCreate {
                    module: "uring",
                    bdev: self.name.clone(),
                    source: Box::new(error),
                }
            })?;
        // The file in the ring's table: the kernel then skips looking up and counting a
        // reference on the fd per request (`IOSQE_FIXED_FILE`). Plain fds where refused.
        let (sqe_fd, sqe_flags) = match ring.submitter().register_files(&[self.file.fd()]) {
            Ok(()) => (0, squeue::Flags::FIXED_FILE),
            Err(error) => {
                tracing::debug!(path = %self.file.path.display(), %error, "uring: file not registered, using its fd");
                (self.file.fd(), squeue::Flags::empty())
            }
        };
        let depth = usize::from(queue_depth);
        Ok(Box::new(UringChannel {
            sqe_fd,
            sqe_flags,
            ring,
            file: self.file.clone(),
            iovs: (0..depth)
                .map(|_| Vec::with_capacity(IOVS_RESERVED_PER_SLOT))
                .collect(),
            expected_result: vec![0; depth].into_boxed_slice(),
            unsubmitted: 0,
            in_kernel: 0,
            deferred,
            enabled: !deferred,
            eventfd: OnceCell::new(),
        }))
    }

    fn write_config(&self, info: &BdevInfo) -> serde_json::Value {
        let mut params = serde_json::json!({
            "name": info.name,
            "filename": self.file.path.display().to_string(),
            "uuid": info.uuid.to_string(),
        });
        if let Some(block_size) = self.block_size_param {
            params["block_size"] = serde_json::json!(block_size);
        }
        file::write_direct_param(&mut params, self.direct_param);
        serde_json::json!({ "method": METHOD, "params": params })
    }
}

struct UringChannel {
    /// What a submission entry names the file by: index 0 of the ring's registered files
    /// (with `sqe_flags` FIXED_FILE), or its fd where registering failed.
    sqe_fd: i32,
    sqe_flags: squeue::Flags,
    ring: IoUring,
    file: Arc<BackingFile>,
    /// Per slot: the request's iovecs in the kernel's layout, kept until completion.
    iovs: Box<[Vec<KernelIovec>]>,
    /// Per slot: the result a successful I/O returns (bytes; 0 for flush and fallocate).
    expected_result: Box<[u32]>,
    /// Entries written to the submission queue since the last `io_uring_enter`.
    unsubmitted: usize,
    /// Entries the kernel took and has not completed.
    in_kernel: usize,
    /// The ring defers completion work to `io_uring_enter` (`IORING_SETUP_DEFER_TASKRUN`).
    deferred: bool,
    /// The ring accepts `io_uring_enter` (a deferred ring starts disabled).
    enabled: bool,
    /// The completion eventfd registered with the ring, created by the first
    /// `interrupt_fd` call (`None` inside: creating or registering it failed).
    eventfd: OnceCell<Option<OwnedFd>>,
}

/// A non-blocking eventfd registered with `ring`, or `None` (logged) when either step fails.
fn new_completion_eventfd(ring: &IoUring, path: &std::path::Path) -> Option<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(path = %path.display(), %error, "uring: eventfd for interrupt mode");
        return None;
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match ring.submitter().register_eventfd(fd.as_raw_fd()) {
        Ok(()) => Some(fd),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "uring: registering the completion eventfd");
            None
        }
    }
}

impl UringChannel {
    /// Makes the completion eventfd readable (a submission to retry at the next poll: an
    /// interrupt-mode owner must not sleep on it).
    fn ring_own_eventfd(&self) {
        let Some(Some(fd)) = self.eventfd.get() else {
            return;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local array to an fd this channel owns.
        let written = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if written < 0 {
            // EAGAIN: the counter is saturated, so the fd is readable anyway.
            tracing::debug!(error = %std::io::Error::last_os_error(), "uring: ringing the completion eventfd");
        }
    }

    /// Writes one entry into the submission queue (no system call).
    fn push(&mut self, entry: &io_uring::squeue::Entry, done: &mut CompletionQueue, slot: u16) {
        // SAFETY: the entry's iovec array is this slot's entry of `self.iovs` and its
        // buffers are the request's; both stay valid and untouched until the slot's
        // completion is read (the bdev layer reuses a slot only after that, buffers by
        // `IoVec::new`'s contract), and drop waits for everything in flight.
        let pushed = unsafe { self.ring.submission().push(entry) };
        match pushed {
            Ok(()) => self.unsubmitted += 1,
            Err(_) => {
                // Cannot happen: the queue has a slot per request slot.
                tracing::error!(path = %self.file.path.display(), slot, "uring: submission queue full");
                done.complete(slot, IoStatus::Failed);
            }
        }
    }

    /// Enables a ring created disabled, on the calling thread, which becomes its single
    /// issuer. Returns whether the ring is enabled.
    fn enable(&mut self) -> bool {
        if !self.enabled {
            match self.ring.submitter().register_enable_rings() {
                Ok(()) => self.enabled = true,
                Err(error) => {
                    tracing::error!(path = %self.file.path.display(), %error, "uring: enabling the ring failed");
                }
            }
        }
        self.enabled
    }

    /// One `io_uring_enter`: hands over the queued entries and, when the kernel flagged
    /// deferred completion work, runs it (`submit` adds `IORING_ENTER_GETEVENTS` then).
    fn enter(&mut self) {
        if !self.enable() {
            // Entries stay queued: keep an interrupt-mode owner polling.
            self.ring_own_eventfd();
            return;
        }
        match self.ring.submit() {
            Ok(taken) => {
                let taken = taken.min(self.unsubmitted);
                self.unsubmitted -= taken;
                self.in_kernel += taken;
            }
            Err(error) => {
                // EAGAIN / EBUSY: the entries stay queued; the next poll retries.
                if !matches!(
                    error.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) {
                    tracing::error!(path = %self.file.path.display(), %error, "uring: io_uring_enter failed");
                }
                // Entries are still queued: keep an interrupt-mode owner polling.
                self.ring_own_eventfd();
            }
        }
    }

    /// Reads up to the cap of completions from the shared queue (no system call).
    fn reap(&mut self, done: &mut CompletionQueue) -> usize {
        let mut count = 0;
        for cqe in self.ring.completion().take(MAX_COMPLETIONS_PER_POLL) {
            let Ok(slot) = u16::try_from(cqe.user_data()) else {
                tracing::error!(user_data = cqe.user_data(), "uring: completion for no slot");
                continue;
            };
            let Some(&expected) = self.expected_result.get(usize::from(slot)) else {
                tracing::error!(slot, "uring: completion for a slot out of range");
                continue;
            };
            let result = cqe.result();
            let status = if result >= 0 && result as u32 == expected {
                IoStatus::Success
            } else {
                tracing::debug!(path = %self.file.path.display(), slot, result, expected, "uring: I/O failed or was short");
                IoStatus::Failed
            };
            done.complete(slot, status);
            count += 1;
        }
        self.in_kernel = self.in_kernel.saturating_sub(count);
        count
    }
}

impl BackendChannel for UringChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        let Some(offset) = self.file.byte_offset(io.offset_blocks) else {
            done.complete(io.slot, IoStatus::OutOfRange);
            return;
        };
        let offset = offset as u64;
        let len_bytes = io
            .num_blocks
            .saturating_mul(u64::from(self.file.block_size_bytes));
        let fd = types::Fd(self.sqe_fd);
        let index = usize::from(io.slot);
        let entry = match io.io_type {
            IoType::Read | IoType::Write => {
                // A result is an i32: larger I/Os cannot report their length.
                let expected = u32::try_from(len_bytes)
                    .ok()
                    .filter(|&bytes| bytes <= i32::MAX as u32);
                let Some(expected) = expected else {
                    done.complete(io.slot, IoStatus::Failed);
                    return;
                };
                if io.iovs.len() > MAX_IOVS_PER_IO {
                    done.complete(io.slot, IoStatus::Failed);
                    return;
                }
                if !self.file.iov_lengths_ok(io.iovs) {
                    done.complete(io.slot, IoStatus::Misaligned);
                    return;
                }
                let iovs = &mut self.iovs[index];
                iovs.clear();
                iovs.extend(io.iovs.iter().map(|iov| KernelIovec {
                    base: iov.addr() as usize,
                    len: iov.len_bytes(),
                }));
                self.expected_result[index] = expected;
                let iov_ptr = iovs.as_ptr().cast::<libc::iovec>();
                let iov_count = iovs.len() as u32;
                // One buffer (the common case): plain READ / WRITE, which spares the
                // kernel importing an iovec array.
                match (io.io_type, io.iovs) {
                    (IoType::Read, [one]) => opcode::Read::new(fd, one.as_mut_ptr(), expected)
                        .offset(offset)
                        .build(),
                    (IoType::Write, [one]) => {
                        opcode::Write::new(fd, one.as_mut_ptr().cast_const(), expected)
                            .offset(offset)
                            .build()
                    }
                    (IoType::Read, _) => opcode::Readv::new(fd, iov_ptr, iov_count)
                        .offset(offset)
                        .build(),
                    _ => opcode::Writev::new(fd, iov_ptr, iov_count)
                        .offset(offset)
                        .build(),
                }
            }
            IoType::Flush => {
                self.expected_result[index] = 0;
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
            IoType::Unmap | IoType::WriteZeroes => {
                self.expected_result[index] = 0;
                opcode::Fallocate::new(fd, len_bytes)
                    .offset(offset)
                    .mode(self.file.zeroing_mode())
                    .build()
            }
            IoType::Reset => {
                done.complete(io.slot, IoStatus::Unsupported);
                return;
            }
        };
        self.push(
            &entry.user_data(u64::from(io.slot)).flags(self.sqe_flags),
            done,
            io.slot,
        );
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        // A deferred ring posts completions only inside an enter: go in when the kernel
        // flagged such work (one load from shared memory), as well as to hand over entries.
        let completion_work =
            self.deferred && self.in_kernel > 0 && self.ring.submission().taskrun();
        if self.unsubmitted > 0 || completion_work {
            self.enter();
            // The kernel runs at most a few dozen deferred completions per enter and sets
            // the flag again for the rest, without signalling the eventfd: keep an
            // interrupt-mode owner polling (no-op in poll mode).
            if self.deferred && self.ring.submission().taskrun() {
                self.ring_own_eventfd();
            }
        }
        if self.in_kernel == 0 {
            return 0;
        }
        self.reap(done)
    }

    fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        self.eventfd
            .get_or_init(|| new_completion_eventfd(&self.ring, &self.file.path))
            .as_ref()
            .map(AsFd::as_fd)
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // The kernel may still write into buffers of I/Os in flight: wait for them before
        // the iovec arrays (and the caller's buffers) go away. `submit_and_wait` also hands
        // over entries not yet submitted.
        let mut discard = CompletionQueue::with_capacity(self.iovs.len());
        if !self.enabled {
            // Never entered: the kernel saw none of the queued entries.
            return;
        }
        self.in_kernel += std::mem::take(&mut self.unsubmitted);
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
                Err(error) => {
                    tracing::error!(%error, in_flight = self.in_kernel, "uring: waiting for I/O in flight at channel drop failed");
                    break;
                }
            }
            self.reap(&mut discard);
            discard.entries.clear();
        }
    }
}

/// Opens `options.filename` and registers a uring bdev over it. Fails clearly when the
/// kernel refuses io_uring.
pub fn create(registry: &BdevRegistry, options: UringOptions) -> Result<BdevInfo, FileBdevError> {
    if registry.contains(&options.name) {
        return Err(BdevError::NameTaken {
            existing: options.name.clone(),
            name: options.name,
        }
        .into());
    }
    let file = file::open(
        "uring",
        &options.filename,
        options.block_size_bytes,
        false,
        options.direct,
    )?;
    // Fail here, not at the first channel, when io_uring is not available.
    let ring = new_ring(&file.path, 2)?;
    let mut probe = Probe::new();
    let has_fallocate = ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(opcode::Fallocate::CODE);
    let spec = BdevSpec {
        name: options.name.clone(),
        aliases: Vec::new(),
        uuid: options.uuid,
        block_size_bytes: file.block_size_bytes,
        num_blocks: file.num_blocks,
        required_alignment_bytes: file.required_alignment_bytes,
        write_cache: true,
    };
    let backend = UringBackend {
        zeroing: file.punch_hole && has_fallocate,
        file: Arc::new(file),
        name: options.name,
        block_size_param: options.block_size_bytes,
        direct_param: options.direct,
    };
    Ok(registry.register(spec, Arc::new(backend))?)
}

const PARAMS: &[&str] = &["name", "filename", "block_size", "uuid", "direct"];

/// Parses `bdev_uring_create`'s parameters (SPDK's names: `name` and `filename` required,
/// `block_size` optional (0 or absent: detected), `uuid` optional), plus Pollux's `direct`
/// (optional, true by default). The file must exist.
pub fn parse(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    params.allow_only(PARAMS)?;
    let name = params.required_str("name")?;
    let filename = params.required_str("filename")?;
    let block_size_bytes = file::parse_block_size(params)?;
    let direct = params.bool("direct")?.unwrap_or(true);
    let uuid = params.uuid("uuid")?;
    file::check_exists(params, filename)?;
    Ok(Box::new(UringOptions {
        name: name.to_string(),
        filename: PathBuf::from(filename),
        block_size_bytes,
        direct,
        uuid,
    }))
}

impl PendingBdev for UringOptions {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        create(ctx.registry, *self).map_err(|error| error.into_bdev_error(METHOD))
    }
}
