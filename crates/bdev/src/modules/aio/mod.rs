//! The aio bdev, as SPDK's `module/bdev/aio`: a regular file or a block device through
//! Linux native AIO (`io_setup` / `io_submit` / `io_getevents` as raw system calls, no
//! libaio), opened with O_DIRECT where the file system allows it, buffered otherwise.
//!
//! - Read and write: `IOCB_CMD_PREADV` / `IOCB_CMD_PWRITEV` from the request's iovecs.
//! - Flush: `IOCB_CMD_FDSYNC`; where the file system refuses it (EINVAL), `fdatasync(2)` run
//!   from the channel's poll, never inside submit.
//! - Unmap and write zeroes (only with `"fallocate": true`, as SPDK): `fallocate(2)` run from
//!   the poll: a hole punched with `KEEP_SIZE` in a regular file, `ZERO_RANGE` on a block
//!   device. Native AIO has no fallocate command.
//! - Reset: not supported.
//!
//! Per channel: one AIO context of `queue_depth` events and arrays sized at channel creation
//! and indexed by request slot (iocbs, iovecs, expected byte counts), so no I/O allocates.
//! `submit` only fills the slot's iocb and queues it; the next `poll` hands everything queued
//! to the kernel with one `io_submit`, then reaps with `io_getevents` (zero timeout), which
//! it skips when the completion ring, read from user space, is empty.
//!
//! Interrupt mode: [`BackendChannel::interrupt_fd`] creates an eventfd the first time it is
//! asked; every iocb queued from then on carries `IOCB_FLAG_RESFD` with it, so the kernel
//! signals it per completion (SPDK's aio bdev does the same). A poll that leaves work for the
//! next one (iocbs the kernel did not take, synchronous operations past the per-poll limit)
//! signals it too. Poll-mode owners never ask, and so never pay for the signal.
//!
//! With O_DIRECT the bdev's required alignment is the logical block size (512 or 4096 bytes
//! typically), and the kernel also wants every iovec's length to be a multiple of it: an I/O
//! whose iovecs are not completes with [`IoStatus::Misaligned`].

pub(crate) mod file;
mod sys;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{CreateContext, Params, PendingBdev};
use crate::error::BdevError;
use crate::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest, SyncWake};
use crate::types::{BdevInfo, BdevSpec, IoStatus, IoType, Uuid};
use crate::BdevRegistry;

pub use file::FileBdevError;
use file::{BackingFile, KernelIovec, IOVS_RESERVED_PER_SLOT, MAX_IOVS_PER_IO};
use sys::{
    AioContext, IoEvent, Iocb, IOCB_CMD_FDSYNC, IOCB_CMD_PREADV, IOCB_CMD_PWRITEV, IOCB_FLAG_RESFD,
};

/// The configuration method.
pub const METHOD: &str = "bdev_aio_create";

/// Synchronous operations (fdatasync fallback, fallocate) run per poll at most (STYLE #4).
const MAX_SYNC_OPS_PER_POLL: usize = 4;

/// What an aio bdev is made of (SPDK's `bdev_aio_create` parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AioOptions {
    pub name: String,
    pub filename: PathBuf,
    /// `None`: detected (the device's logical block size, or the file system's O_DIRECT
    /// alignment; 512 for a buffered regular file).
    pub block_size_bytes: Option<u32>,
    pub readonly: bool,
    /// Support unmap and write zeroes through `fallocate(2)` (SPDK's default: false).
    pub fallocate: bool,
    /// O_DIRECT where the file system allows it (the default, as SPDK); false: through the
    /// page cache (Pollux's `"direct": false`).
    pub direct: bool,
    pub uuid: Option<Uuid>,
}

impl AioOptions {
    /// Options with SPDK's defaults: detected block size, read-write, no fallocate.
    pub fn new(name: impl Into<String>, filename: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            filename: filename.into(),
            block_size_bytes: None,
            readonly: false,
            fallocate: false,
            direct: true,
            uuid: None,
        }
    }
}

struct AioBackend {
    file: Arc<BackingFile>,
    name: String,
    /// Unmap and write zeroes enabled (`fallocate` asked for and supported).
    zeroing: bool,
    /// The `block_size` given at creation (`None`: detected), for `write_config`.
    block_size_param: Option<u32>,
    /// The `direct` given at creation, for `write_config`.
    direct_param: bool,
}

impl BdevBackend for AioBackend {
    fn module_name(&self) -> &'static str {
        "aio"
    }

    fn supports(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Flush => true,
            IoType::Write => !self.file.readonly,
            IoType::Unmap | IoType::WriteZeroes => self.zeroing,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let ctx =
            AioContext::new(u32::from(queue_depth)).map_err(|source| BdevError::ChannelCreate {
                module: "aio",
                bdev: self.name.clone(),
                source: Box::new(FileBdevError::AioSetup {
                    path: self.file.path.clone(),
                    events: u32::from(queue_depth),
                    source,
                }),
            })?;
        let depth = usize::from(queue_depth);
        Ok(Box::new(AioChannel {
            ctx,
            file: self.file.clone(),
            iocbs: vec![Iocb::default(); depth].into_boxed_slice(),
            iovs: (0..depth)
                .map(|_| Vec::with_capacity(IOVS_RESERVED_PER_SLOT))
                .collect(),
            expected_bytes: vec![0; depth].into_boxed_slice(),
            pending: Vec::with_capacity(depth),
            events: vec![IoEvent::default(); depth].into_boxed_slice(),
            deferred: VecDeque::with_capacity(depth),
            in_kernel: 0,
            fdsync_async: true,
            wake: SyncWake::default(),
        }))
    }

    fn write_config(&self, info: &BdevInfo) -> serde_json::Value {
        let mut params = serde_json::json!({
            "name": info.name,
            "filename": self.file.path.display().to_string(),
            "readonly": self.file.readonly,
            "fallocate": self.zeroing,
            "uuid": info.uuid.to_string(),
        });
        if let Some(block_size) = self.block_size_param {
            params["block_size"] = serde_json::json!(block_size);
        }
        file::write_direct_param(&mut params, self.direct_param);
        serde_json::json!({ "method": METHOD, "params": params })
    }
}

/// A synchronous operation run from the poll.
#[derive(Debug, Clone, Copy)]
enum SyncOp {
    Flush,
    Fallocate { mode: i32, offset: i64, len: i64 },
}

struct AioChannel {
    // Declared first so that it is dropped first: `io_destroy` waits for the I/Os in flight
    // before the iocbs and iovec arrays below are freed.
    ctx: AioContext,
    file: Arc<BackingFile>,
    /// Per slot; the kernel reads an iocb during `io_submit`.
    iocbs: Box<[Iocb]>,
    /// Per slot: the request's iovecs in the kernel's layout, kept until completion.
    iovs: Box<[Vec<KernelIovec>]>,
    /// Per slot: the result a successful I/O returns (bytes; 0 for a flush).
    expected_bytes: Box<[u64]>,
    /// Addresses of iocbs queued since the last poll (capacity `queue_depth`).
    pending: Vec<usize>,
    events: Box<[IoEvent]>,
    /// Slots waiting for a synchronous operation (capacity `queue_depth`).
    deferred: VecDeque<(u16, SyncOp)>,
    /// Iocbs the kernel holds.
    in_kernel: usize,
    /// `IOCB_CMD_FDSYNC` works on this file (cleared at its first EINVAL).
    fdsync_async: bool,
    /// Interrupt mode: the eventfd iocbs name with `IOCB_FLAG_RESFD`.
    wake: SyncWake,
}

impl AioChannel {
    /// Fills slot `slot`'s iocb and queues it for the next poll's `io_submit`.
    #[inline]
    fn queue(&mut self, slot: u16, opcode: u16, offset: i64, expected_bytes: u64) {
        let index = usize::from(slot);
        let iovs = &self.iovs[index];
        let (aio_flags, aio_resfd) = match self.wake.active_fd() {
            Some(fd) => (IOCB_FLAG_RESFD, fd.as_raw_fd() as u32),
            None => (0, 0),
        };
        self.iocbs[index] = Iocb {
            aio_data: u64::from(slot),
            aio_lio_opcode: opcode,
            aio_fildes: self.file.fd() as u32,
            aio_buf: iovs.as_ptr() as u64,
            aio_nbytes: iovs.len() as u64,
            aio_offset: offset,
            aio_flags,
            aio_resfd,
            ..Iocb::default()
        };
        self.expected_bytes[index] = expected_bytes;
        self.pending
            .push(&self.iocbs[index] as *const Iocb as usize);
    }

    fn slot_of(&self, iocb_addr: usize) -> u16 {
        let index = (iocb_addr - self.iocbs.as_ptr() as usize) / std::mem::size_of::<Iocb>();
        index as u16
    }

    /// One `io_submit` for everything queued (more only when the kernel takes part of it or
    /// refuses one iocb, which is then failed or deferred).
    fn submit_pending(&mut self, done: &mut CompletionQueue) -> usize {
        let mut taken = 0;
        let mut failed = 0;
        while taken < self.pending.len() {
            // SAFETY: each queued address is an iocb of `self.iocbs`, whose iovec array is
            // its slot's entry of `self.iovs`; both stay untouched until the slot completes
            // (the bdev layer reuses a slot only after its completion was handed back), and
            // the context is destroyed before either is freed. The data buffers are valid
            // until completion by `IoVec::new`'s contract.
            match unsafe { self.ctx.submit(&self.pending[taken..]) } {
                Ok(0) => break,
                Ok(count) => {
                    taken += count;
                    self.in_kernel += count;
                }
                Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(error) => {
                    let slot = self.slot_of(self.pending[taken]);
                    taken += 1;
                    let opcode = self.iocbs[usize::from(slot)].aio_lio_opcode;
                    if opcode == IOCB_CMD_FDSYNC && error.raw_os_error() == Some(libc::EINVAL) {
                        tracing::info!(path = %self.file.path.display(), "aio: IOCB_CMD_FDSYNC refused (EINVAL): flushes use fdatasync from the poller");
                        self.fdsync_async = false;
                        self.deferred.push_back((slot, SyncOp::Flush));
                    } else {
                        tracing::warn!(path = %self.file.path.display(), slot, opcode, %error, "aio: io_submit refused an I/O");
                        done.complete(slot, IoStatus::Failed);
                        failed += 1;
                    }
                }
            }
        }
        self.pending.drain(..taken);
        failed
    }

    fn reap(&mut self, done: &mut CompletionQueue) -> usize {
        if self.in_kernel == 0 || !self.ctx.may_have_events() {
            return 0;
        }
        let count = match self.ctx.get_events(&mut self.events) {
            Ok(count) => count,
            Err(error) => {
                if error.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(path = %self.file.path.display(), %error, "aio: io_getevents failed");
                }
                return 0;
            }
        };
        for event in &self.events[..count] {
            let slot = event.data as u16;
            let expected = self.expected_bytes[usize::from(slot)];
            let status = if event.res >= 0 && event.res as u64 == expected {
                IoStatus::Success
            } else {
                tracing::debug!(path = %self.file.path.display(), slot, res = event.res, expected, "aio: I/O failed or was short");
                IoStatus::Failed
            };
            done.complete(slot, status);
        }
        self.in_kernel -= count;
        count
    }

    fn run_sync_ops(&mut self, done: &mut CompletionQueue) -> usize {
        let mut count = 0;
        while count < MAX_SYNC_OPS_PER_POLL {
            let Some((slot, op)) = self.deferred.pop_front() else {
                break;
            };
            let result = match op {
                SyncOp::Flush => self.file.file.sync_data(),
                SyncOp::Fallocate { mode, offset, len } => self.file.fallocate(mode, offset, len),
            };
            let status = match result {
                Ok(()) => IoStatus::Success,
                Err(error) => {
                    tracing::warn!(path = %self.file.path.display(), ?op, %error, "aio: synchronous operation failed");
                    IoStatus::Failed
                }
            };
            done.complete(slot, status);
            count += 1;
        }
        count
    }
}

impl BackendChannel for AioChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        let Some(offset) = self.file.byte_offset(io.offset_blocks) else {
            self.wake.complete(done, io.slot, IoStatus::OutOfRange);
            return;
        };
        let len_bytes = io
            .num_blocks
            .saturating_mul(u64::from(self.file.block_size_bytes));
        match io.io_type {
            IoType::Read | IoType::Write => {
                if io.iovs.len() > MAX_IOVS_PER_IO {
                    self.wake.complete(done, io.slot, IoStatus::Failed);
                    return;
                }
                if !self.file.iov_lengths_ok(io.iovs) {
                    self.wake.complete(done, io.slot, IoStatus::Misaligned);
                    return;
                }
                let iovs = &mut self.iovs[usize::from(io.slot)];
                iovs.clear();
                iovs.extend(io.iovs.iter().map(|iov| KernelIovec {
                    base: iov.addr() as usize,
                    len: iov.len_bytes(),
                }));
                let opcode = if io.io_type == IoType::Read {
                    IOCB_CMD_PREADV
                } else {
                    IOCB_CMD_PWRITEV
                };
                self.queue(io.slot, opcode, offset, len_bytes);
            }
            IoType::Flush if self.fdsync_async => {
                self.iovs[usize::from(io.slot)].clear();
                self.queue(io.slot, IOCB_CMD_FDSYNC, 0, 0);
            }
            IoType::Flush => self.deferred.push_back((io.slot, SyncOp::Flush)),
            IoType::Unmap | IoType::WriteZeroes => {
                let op = SyncOp::Fallocate {
                    mode: self.file.zeroing_mode(),
                    offset,
                    len: i64::try_from(len_bytes).unwrap_or(i64::MAX),
                };
                self.deferred.push_back((io.slot, op));
            }
            IoType::Reset => self.wake.complete(done, io.slot, IoStatus::Unsupported),
        }
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        let failed = self.submit_pending(done);
        let count = failed + self.reap(done) + self.run_sync_ops(done);
        if !self.pending.is_empty() || !self.deferred.is_empty() {
            // Work left for the next poll, which no kernel event announces.
            self.wake.signal();
        }
        count
    }

    fn interrupt_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.wake.fd()
    }
}

/// Opens `options.filename` and registers an aio bdev over it.
pub fn create(registry: &BdevRegistry, options: AioOptions) -> Result<BdevInfo, FileBdevError> {
    if registry.contains(&options.name) {
        return Err(BdevError::NameTaken {
            existing: options.name.clone(),
            name: options.name,
        }
        .into());
    }
    let mut file = file::open(
        "aio",
        &options.filename,
        options.block_size_bytes,
        options.readonly,
        options.direct,
    )?;
    let zeroing = options.fallocate && !options.readonly;
    if zeroing && !file.punch_hole {
        return Err(FileBdevError::NoFallocate {
            path: file.path.clone(),
            source: file
                .punch_hole_error
                .take()
                .unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        });
    }
    // Fail here, not at the first channel, when the kernel has no AIO contexts to give.
    AioContext::new(1).map_err(|source| FileBdevError::AioSetup {
        path: file.path.clone(),
        events: 1,
        source,
    })?;
    let spec = BdevSpec {
        name: options.name.clone(),
        aliases: Vec::new(),
        uuid: options.uuid,
        block_size_bytes: file.block_size_bytes,
        num_blocks: file.num_blocks,
        required_alignment_bytes: file.required_alignment_bytes,
        write_cache: true,
    };
    let backend = AioBackend {
        file: Arc::new(file),
        name: options.name,
        zeroing,
        block_size_param: options.block_size_bytes,
        direct_param: options.direct,
    };
    Ok(registry.register(spec, Arc::new(backend))?)
}

const PARAMS: &[&str] = &[
    "name",
    "filename",
    "block_size",
    "readonly",
    "fallocate",
    "uuid",
    "nowait",
    "direct",
];

/// Parses `bdev_aio_create`'s parameters (SPDK's names: `name` and `filename` required;
/// `block_size` optional, 0 or absent to detect; `readonly` and `fallocate` optional, false
/// by default; `uuid` optional; `nowait` accepted and ignored), plus Pollux's `direct`
/// (optional, true by default). The file must exist.
pub fn parse(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    params.allow_only(PARAMS)?;
    let name = params.required_str("name")?;
    let filename = params.required_str("filename")?;
    let block_size_bytes = file::parse_block_size(params)?;
    let readonly = params.bool("readonly")?.unwrap_or(false);
    let fallocate = params.bool("fallocate")?.unwrap_or(false);
    let direct = params.bool("direct")?.unwrap_or(true);
    let uuid = params.uuid("uuid")?;
    if params.bool("nowait")? == Some(true) {
        tracing::debug!(
            method = METHOD,
            "nowait accepted and ignored (RWF_NOWAIT is not used)"
        );
    }
    file::check_exists(params, filename)?;
    Ok(Box::new(AioOptions {
        name: name.to_string(),
        filename: PathBuf::from(filename),
        block_size_bytes,
        readonly,
        fallocate,
        direct,
        uuid,
    }))
}

impl PendingBdev for AioOptions {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        create(ctx.registry, *self).map_err(|error| error.into_bdev_error(METHOD))
    }
}
