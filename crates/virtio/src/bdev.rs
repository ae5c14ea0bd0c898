//! The bdev module `virtio_blk`, after SPDK's `module/bdev/virtio` (`bdev_virtio_blk.c`): a
//! virtio-blk device reached through a vhost-user socket (SPDK's `virtio_user`), one bdev
//! per device, named exactly as the controller (`name`), as SPDK does.
//!
//! - Configuration: `bdev_virtio_attach_controller` with SPDK's parameters: `name`,
//!   `trtype` `"user"`, `traddr` the socket path, `dev_type` `"blk"`, `vq_count` (default 1)
//!   and `vq_size` (default 512); see [`parse_attach`]. `bdev_virtio_detach_controller`
//!   ([`VirtioModule::detach_controller`], [`parse_detach`]) is for an RPC layer, as nvme's.
//! - Set-up: [`BlkDevice::start`] over a [`VhostUserBackend`] (connect with a bounded retry,
//!   features, protocol features, config space, memory table, N queues).
//! - Channels: one virtqueue each, taken from the device's pool (SPDK's
//!   `virtio_dev_find_and_acquire_queue`); more channels than `vq_count` fail clearly.
//! - I/O path: one request = one chain `header, data..., status` (or `header, segment,
//!   status` for discard / write zeroes), header, segment and status in a per-slot area of
//!   DMA memory allocated with the channel (no allocation per I/O). Chains are made visible
//!   once per poll (one index store) and the device is kicked only when it asked for it.
//!   A full ring queues the request in the channel (backpressure, STYLE #7).
//! - Supported I/O: read; write unless VIRTIO_BLK_F_RO; flush with F_FLUSH; unmap with
//!   F_DISCARD; write zeroes with F_WRITE_ZEROES. Requests larger than the device's limits
//!   (`max_discard_sectors`, ...) fail (not split), with a log line.
//! - Loss of the back-end: a channel checks its socket for a hang-up every
//!   [`HANGUP_CHECK_POLLS`] polls, and the admin poller ([`VirtioModule::poll_admin`]) at its
//!   period. Either one marks the controller failed; every channel then fails its outstanding
//!   and new I/O with [`IoStatus::Failed`] (logged once with the reason), and the admin poller
//!   unregisters the bdev (hot remove: open descriptors get `BdevEvent::Remove`).
//!
//! Data buffers must lie in the DMA memory given at attach (the only memory the back-end
//! maps); any other buffer fails its I/O with a log line instead of reaching the device.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use pollux_bdev::config::{CreateContext, MethodTable, Params, PendingBdev};
use pollux_bdev::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use pollux_bdev::{
    BdevError, BdevInfo, BdevRegistry, BdevSpec, IoStatus, IoType, IoVec, MAX_COMPLETIONS_PER_POLL,
};
use pollux_env::dma::DmaMemory;

use crate::backend::{VhostUserBackend, VirtioBackend};
use crate::blk::{
    DiscardWriteZeroesSegment, RequestHeader, SECTOR_SIZE_BYTES, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::device::{BlkDevice, DeviceOptions, QueueSet};
use crate::error::VirtioError;
use crate::features::VIRTIO_RING_F_INDIRECT_DESC;
use crate::mem::{hung_up, owned_eventfd, RingMem};
use crate::queue::{AddError, Buffer, MAX_INDIRECT_ENTRIES};
use crate::ring::DESC_SIZE_BYTES;

/// The attach method.
pub const ATTACH_METHOD: &str = "bdev_virtio_attach_controller";
/// The detach method (RPC only).
pub const DETACH_METHOD: &str = "bdev_virtio_detach_controller";
/// The module name bdevs report.
pub const MODULE_NAME: &str = "virtio_blk";
/// Data iovecs of one I/O at most (the channel's scratch chain is this long plus 2).
pub const MAX_IOVS_PER_IO: usize = 256;
/// A channel checks its back-end's socket once per this many polls (one `poll(2)`).
pub const HANGUP_CHECK_POLLS: u32 = 1024;
/// How long an attach waits for the back-end's socket to accept.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a channel dropped with I/O in flight waits for the device to finish it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Per request slot, two cache lines, so that two requests never share one: the indirect
/// table (three descriptors) at 0 and the header at 48 fill the first line, which only the
/// driver writes and the device reads as one; the discard / write-zeroes segment at 64 and
/// the status byte at 80 (the one byte the device writes) sit in the second.
const REQUEST_STRIDE_BYTES: usize = 128;
const TABLE_OFFSET: usize = 0;
const HEADER_OFFSET: usize = 48;
const SEGMENT_OFFSET: usize = 64;
const STATUS_OFFSET: usize = 80;
const _: () = assert!(TABLE_OFFSET + MAX_INDIRECT_ENTRIES * DESC_SIZE_BYTES <= HEADER_OFFSET);
/// Written into the status byte before submission: a device that completes a request without
/// writing its status is caught.
const STATUS_UNSET: u8 = 0xff;

// -----------------------------------------------------------------------------------------
// Configuration

/// What a controller attach asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachOptions {
    /// The controller's name, and its bdev's.
    pub name: String,
    /// The vhost-user socket.
    pub traddr: PathBuf,
    pub device: DeviceOptions,
    pub connect_timeout: Duration,
}

/// A validated `bdev_virtio_attach_controller`, created in the config's second phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAttach {
    pub options: AttachOptions,
}

/// A validated `bdev_virtio_detach_controller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachRequest {
    pub name: String,
}

/// Adds `bdev_virtio_attach_controller` to an app's method table.
pub fn register_methods(table: &mut MethodTable) -> Result<(), BdevError> {
    table.register(ATTACH_METHOD, parse_attach)
}

/// SPDK's `rpc_bdev_virtio_attach_controller` decoders (`module/bdev/virtio/bdev_virtio_rpc.c`),
/// plus Pollux's `packed_ring`.
const ATTACH_PARAMS: &[&str] = &[
    "name",
    "trtype",
    "traddr",
    "dev_type",
    "vq_count",
    "vq_size",
    "packed_ring",
];

/// Parses `bdev_virtio_attach_controller`: `name`, `trtype` (`user`; `pci` is refused: no
/// virtio-pci driver), `traddr` and `dev_type` (`blk`; `scsi` is refused) required;
/// `vq_count` (1..=256) and `vq_size` (1..=32768) optional. `packed_ring` (a Pollux
/// extension, default false; SPDK's initiator has split rings only) uses the packed layout
/// when the device offers it.
pub fn parse_attach(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    parse_attach_options(params).map(|options| Box::new(PendingAttach { options }) as _)
}

/// [`parse_attach`], returning the concrete value (for an RPC layer and tests).
pub fn parse_attach_options(params: &Params<'_>) -> Result<AttachOptions, BdevError> {
    params.allow_only(ATTACH_PARAMS)?;
    let name = params.required_str("name")?;
    if name.is_empty() {
        return Err(params.invalid("name", "must not be empty"));
    }
    let trtype = params.required_str("trtype")?;
    if !trtype.eq_ignore_ascii_case("user") {
        return Err(params.invalid(
            "trtype",
            &format!(
                "{trtype:?} is not supported by Pollux: only \"user\" (a vhost-user socket) is"
            ),
        ));
    }
    let traddr = params.required_str("traddr")?;
    if traddr.is_empty() {
        return Err(params.invalid("traddr", "must be the vhost-user socket's path"));
    }
    let dev_type = params.required_str("dev_type")?;
    if dev_type != "blk" {
        return Err(params.invalid(
            "dev_type",
            &format!("{dev_type:?} is not supported by Pollux: only \"blk\" is"),
        ));
    }
    let mut device = DeviceOptions::default();
    if let Some(count) = params.u64("vq_count")? {
        device.vq_count = u16::try_from(count)
            .ok()
            .filter(|c| (1..=256).contains(c))
            .ok_or_else(|| params.invalid("vq_count", "must be 1 to 256"))?;
    }
    device.packed_ring = params.bool("packed_ring")?.unwrap_or(false);
    if let Some(size) = params.u64("vq_size")? {
        device.vq_size = u16::try_from(size)
            .ok()
            .filter(|s| (1..=crate::ring::QUEUE_SIZE_MAX).contains(s))
            .ok_or_else(|| params.invalid("vq_size", "must be 1 to 32768"))?;
        if !device.packed_ring && !device.vq_size.is_power_of_two() {
            return Err(params.invalid(
                "vq_size",
                "must be a power of two for split virtqueues (virtio 1.2 §2.7)",
            ));
        }
    }
    Ok(AttachOptions {
        name: name.to_string(),
        traddr: PathBuf::from(traddr),
        device,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
    })
}

/// Parses `bdev_virtio_detach_controller`: `name`.
pub fn parse_detach(params: &Params<'_>) -> Result<DetachRequest, BdevError> {
    params.allow_only(&["name"])?;
    Ok(DetachRequest {
        name: params.required_str("name")?.to_string(),
    })
}

impl PendingBdev for PendingAttach {
    fn name(&self) -> Option<&str> {
        Some(&self.options.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        let dma = ctx.dma.ok_or_else(|| BdevError::NoDmaMemory {
            method: ATTACH_METHOD.to_string(),
        })?;
        VirtioModule::global().attach_controller(ctx.registry, dma, self.options)
    }
}

// -----------------------------------------------------------------------------------------
// The module: attached controllers

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every user leaves the device consistent between calls (queues are taken and returned
    // whole).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the I/O path needs to know of the device, copied once.
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_only: bool,
    flush: bool,
    discard: bool,
    write_zeroes: bool,
    sectors_per_block: u64,
    /// 0: no limit given.
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    /// Data segments per request (SEG_MAX, else the queue's own bound).
    max_data_segments: usize,
    /// VIRTIO_RING_F_INDIRECT_DESC: requests of up to [`MAX_INDIRECT_ENTRIES`] buffers
    /// take one ring slot each.
    indirect: bool,
}

/// An attached controller: the device, shared by its bdev and channels.
struct Controller {
    options: AttachOptions,
    device: Mutex<BlkDevice>,
    /// The back-end's socket (a duplicate), for hang-up checks without the device lock.
    hangup: OwnedFd,
    /// The back-end is gone or broke a ring: every channel fails its I/O.
    failed: AtomicBool,
    dma: Arc<DmaMemory>,
    limits: Limits,
    /// Duplicates of the queues' call eventfds: a failure wakes every interrupt-mode
    /// channel sleeping on one, so that it fails its I/O back.
    calls: Vec<vmm_sys_util::eventfd::EventFd>,
}

impl Controller {
    fn fail(&self, reason: &str) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                controller = %self.options.name,
                traddr = %self.options.traddr.display(),
                reason,
                "virtio_blk: controller failed: outstanding and new I/O fail, the bdev is removed"
            );
            for call in &self.calls {
                let _ = call.write(1);
            }
        }
    }
}

/// The module's controllers.
#[derive(Default)]
pub struct VirtioModule {
    controllers: Mutex<Vec<Arc<Controller>>>,
}

impl std::fmt::Debug for VirtioModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioModule")
            .field("controllers", &self.controller_names())
            .finish()
    }
}

impl VirtioModule {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide module that config files attach to.
    pub fn global() -> &'static VirtioModule {
        static GLOBAL: OnceLock<VirtioModule> = OnceLock::new();
        GLOBAL.get_or_init(VirtioModule::new)
    }

    pub fn controller_names(&self) -> Vec<String> {
        lock(&self.controllers)
            .iter()
            .map(|c| c.options.name.clone())
            .collect()
    }

    /// Connects to the vhost-user socket and registers the bdev `options.name`.
    pub fn attach_controller(
        &self,
        registry: &BdevRegistry,
        dma: &Arc<DmaMemory>,
        options: AttachOptions,
    ) -> Result<BdevInfo, BdevError> {
        if lock(&self.controllers)
            .iter()
            .any(|c| c.options.name == options.name)
            || registry.contains(&options.name)
        {
            return Err(BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "name",
                reason: format!("{:?} is already taken", options.name),
                source: None,
            });
        }
        let traddr_error = |source: VirtioError| BdevError::InvalidParam {
            method: ATTACH_METHOD.to_string(),
            param: "traddr",
            reason: format!(
                "{}: could not attach the virtio-blk device",
                options.traddr.display()
            ),
            source: Some(Box::new(source)),
        };
        let backend = VhostUserBackend::connect(&options.traddr, options.connect_timeout)
            .map_err(traddr_error)?;
        let hangup = backend.hangup_fd().map_err(traddr_error)?;
        let device = BlkDevice::start(&options.name, Box::new(backend), dma, options.device)
            .map_err(traddr_error)?;
        let config = device.config();
        let max_data_segments = if device.has_feature(VIRTIO_BLK_F_SEG_MAX) && config.seg_max > 0 {
            config.seg_max as usize
        } else {
            MAX_IOVS_PER_IO
        }
        .min(MAX_IOVS_PER_IO)
        .min(usize::from(options.device.vq_size).saturating_sub(2).max(1));
        let limits = Limits {
            read_only: device.has_feature(VIRTIO_BLK_F_RO),
            flush: device.has_feature(VIRTIO_BLK_F_FLUSH),
            discard: device.has_feature(VIRTIO_BLK_F_DISCARD),
            write_zeroes: device.has_feature(VIRTIO_BLK_F_WRITE_ZEROES),
            sectors_per_block: u64::from(device.block_size_bytes()) / SECTOR_SIZE_BYTES,
            max_discard_sectors: config.max_discard_sectors,
            max_write_zeroes_sectors: config.max_write_zeroes_sectors,
            max_data_segments,
            indirect: device.has_feature(VIRTIO_RING_F_INDIRECT_DESC),
        };
        let spec = BdevSpec {
            name: options.name.clone(),
            aliases: Vec::new(),
            uuid: None,
            block_size_bytes: device.block_size_bytes(),
            num_blocks: device.num_blocks(),
            required_alignment_bytes: 1,
            write_cache: limits.flush,
        };
        let calls = device.call_fds();
        let controller = Arc::new(Controller {
            options,
            calls,
            device: Mutex::new(device),
            hangup,
            failed: AtomicBool::new(false),
            dma: Arc::clone(dma),
            limits,
        });
        let info = registry.register(
            spec,
            Arc::new(VirtioBlkBdev {
                ctrlr: Arc::clone(&controller),
            }),
        )?;
        tracing::info!(
            controller = %controller.options.name,
            traddr = %controller.options.traddr.display(),
            ?limits,
            "virtio_blk: controller attached"
        );
        lock(&self.controllers).push(controller);
        Ok(info)
    }

    /// `bdev_virtio_detach_controller`: hot-removes the bdev and forgets the controller; the
    /// connection closes once its last channel is gone.
    pub fn detach_controller(&self, registry: &BdevRegistry, name: &str) -> Result<(), BdevError> {
        let ctrlr = {
            let mut controllers = lock(&self.controllers);
            let index = controllers
                .iter()
                .position(|c| c.options.name == name)
                .ok_or_else(|| BdevError::InvalidParam {
                    method: DETACH_METHOD.to_string(),
                    param: "name",
                    reason: format!("names no attached virtio controller: {name:?}"),
                    source: None,
                })?;
            controllers.remove(index)
        };
        match registry.unregister(&ctrlr.options.name) {
            Ok(_) | Err(BdevError::NotFound { .. }) => {}
            Err(error) => {
                tracing::warn!(controller = name, %error, "virtio_blk: unregister failed")
            }
        }
        tracing::info!(controller = name, "virtio_blk: controller detached");
        Ok(())
    }

    /// Detaches every controller (at app exit, after the I/O stopped).
    pub fn detach_all(&self, registry: &BdevRegistry) {
        for name in self.controller_names() {
            if let Err(error) = self.detach_controller(registry, &name) {
                tracing::warn!(controller = %name, %error, "virtio_blk: detach failed");
            }
        }
    }

    /// The admin poller: a controller whose back-end hung up (or that a channel marked
    /// failed) is removed: its bdev is unregistered (hot remove) and it is forgotten. Call
    /// it every few milliseconds from one thread. Returns the controllers removed.
    pub fn poll_admin(&self, registry: &BdevRegistry) -> u32 {
        let gone: Vec<Arc<Controller>> = {
            let mut controllers = lock(&self.controllers);
            let mut gone = Vec::new();
            controllers.retain(|c| {
                if c.failed.load(Ordering::Acquire) || hung_up(c.hangup.as_fd()) {
                    gone.push(Arc::clone(c));
                    false
                } else {
                    true
                }
            });
            gone
        };
        for ctrlr in &gone {
            ctrlr.fail("the vhost-user back-end closed the connection");
            match registry.unregister(&ctrlr.options.name) {
                Ok(_) | Err(BdevError::NotFound { .. }) => {}
                Err(error) => tracing::warn!(
                    controller = %ctrlr.options.name,
                    %error,
                    "virtio_blk: unregister after back-end loss failed"
                ),
            }
        }
        gone.len() as u32
    }
}

// -----------------------------------------------------------------------------------------
// Backend and channel

struct VirtioBlkBdev {
    ctrlr: Arc<Controller>,
}

impl BdevBackend for VirtioBlkBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn supports(&self, io_type: IoType) -> bool {
        let limits = &self.ctrlr.limits;
        match io_type {
            IoType::Read => true,
            IoType::Write => !limits.read_only,
            IoType::Flush => limits.flush,
            IoType::Unmap => limits.discard && !limits.read_only,
            IoType::WriteZeroes => limits.write_zeroes && !limits.read_only,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let name = &self.ctrlr.options.name;
        let channel_error = |reason: String| BdevError::ChannelCreate {
            module: MODULE_NAME,
            bdev: name.clone(),
            source: Box::new(VirtioError::Device {
                name: name.clone(),
                reason,
            }),
        };
        if self.ctrlr.failed.load(Ordering::Acquire) {
            return Err(channel_error("the back-end is gone".to_string()));
        }
        let set = {
            let mut device = lock(&self.ctrlr.device);
            let queues = device.queue_count();
            device.take_queue().ok_or_else(|| {
                channel_error(format!(
                    "all {queues} virtqueues are in use (one per channel): attach with a \
                     larger vq_count"
                ))
            })?
        };
        let len_bytes = usize::from(queue_depth) * REQUEST_STRIDE_BYTES;
        let requests = match self.ctrlr.dma.alloc(len_bytes, 4096, None) {
            Ok(buffer) => buffer,
            Err(source) => {
                lock(&self.ctrlr.device).return_queue(set);
                return Err(BdevError::ChannelCreate {
                    module: MODULE_NAME,
                    bdev: name.clone(),
                    source: Box::new(VirtioError::Alloc {
                        what: "request headers",
                        len_bytes,
                        source,
                    }),
                });
            }
        };
        tracing::debug!(bdev = %name, queue = set.queue.index(), queue_depth, "virtio_blk: channel created");
        let depth = usize::from(queue_depth);
        Ok(Box::new(VirtioChannel {
            ctrlr: Arc::clone(&self.ctrlr),
            requests_addr: requests.vaddr(),
            requests: RingMem::new(requests),
            set: Some(set),
            slots: vec![SlotState::Idle; depth].into_boxed_slice(),
            saved: (0..depth).map(|_| SavedIo::default()).collect(),
            pending: VecDeque::with_capacity(depth),
            chain: Vec::with_capacity(MAX_IOVS_PER_IO + 2),
            max_per_poll: depth.min(MAX_COMPLETIONS_PER_POLL),
            polls: 0,
            failed: false,
            call_fd: std::cell::OnceCell::new(),
        }))
    }

    fn write_config(&self, _info: &BdevInfo) -> serde_json::Value {
        let options = &self.ctrlr.options;
        let mut params = serde_json::json!({
            "name": options.name,
            "trtype": "user",
            "traddr": options.traddr.display().to_string(),
            "dev_type": "blk",
            "vq_count": options.device.vq_count,
            "vq_size": options.device.vq_size,
        });
        if options.device.packed_ring {
            params["packed_ring"] = true.into();
        }
        serde_json::json!({ "method": ATTACH_METHOD, "params": params })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    /// Waiting in the channel for free descriptors.
    Pending,
    /// On the ring.
    InFlight,
}

/// A request kept while the ring is full. Its iovec vector keeps its capacity, so a slot
/// allocates at most once in the channel's life (the first time it waits with that many
/// iovecs).
#[derive(Debug, Default)]
struct SavedIo {
    io_type: Option<IoType>,
    offset_blocks: u64,
    num_blocks: u64,
    iovs: Vec<IoVec>,
}

/// Why a request was not put on the ring.
enum SubmitError {
    Full,
    Invalid(String),
}

struct VirtioChannel {
    ctrlr: Arc<Controller>,
    /// Per-slot indirect table, header, segment and status (`REQUEST_STRIDE_BYTES` each),
    /// written and read with single volatile accesses (the device reads and writes them).
    requests: RingMem,
    requests_addr: u64,
    /// `None` only inside `drop`.
    set: Option<QueueSet>,
    slots: Box<[SlotState]>,
    saved: Box<[SavedIo]>,
    pending: VecDeque<u16>,
    /// Scratch for one chain (never grows).
    chain: Vec<Buffer>,
    max_per_poll: usize,
    polls: u32,
    /// This channel already failed everything back.
    failed: bool,
    /// Interrupt mode: a duplicate of the queue's call eventfd, created by the first
    /// `interrupt_fd` call (`None` inside when it could not be duplicated). From then on a
    /// poll that leaves chains in flight and reaps nothing asks the device to notify.
    call_fd: std::cell::OnceCell<Option<OwnedFd>>,
}

impl VirtioChannel {
    /// Builds the chain of one request and adds it to the ring.
    fn add_request(
        &mut self,
        slot: u16,
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
    ) -> Result<(), SubmitError> {
        let limits = self.ctrlr.limits;
        let base = usize::from(slot) * REQUEST_STRIDE_BYTES;
        let sector = offset_blocks * limits.sectors_per_block;
        let sectors = num_blocks * limits.sectors_per_block;
        let request_type = match io_type {
            IoType::Read => VIRTIO_BLK_T_IN,
            IoType::Write => VIRTIO_BLK_T_OUT,
            IoType::Flush => VIRTIO_BLK_T_FLUSH,
            IoType::Unmap => VIRTIO_BLK_T_DISCARD,
            IoType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
            IoType::Reset => {
                return Err(SubmitError::Invalid(
                    "reset is not supported by virtio-blk".to_string(),
                ))
            }
        };
        self.chain.clear();
        // `struct virtio_blk_outhdr` as two little-endian words: `type | reserved << 32`,
        // `sector`.
        let header = base + HEADER_OFFSET;
        self.requests
            .write_u64(header as u64, u64::from(request_type));
        self.requests.write_u64(
            (header + 8) as u64,
            if io_type == IoType::Flush { 0 } else { sector },
        );
        self.requests
            .write_u8((base + STATUS_OFFSET) as u64, STATUS_UNSET);
        self.chain.push(Buffer {
            addr: self.requests_addr + header as u64,
            len_bytes: RequestHeader::SIZE_BYTES as u32,
            device_writes: false,
        });
        match io_type {
            IoType::Read | IoType::Write => {
                if iovs.len() > limits.max_data_segments {
                    return Err(SubmitError::Invalid(format!(
                        "{} iovecs, the device takes {} per request",
                        iovs.len(),
                        limits.max_data_segments
                    )));
                }
                for iov in iovs {
                    let len_bytes = u32::try_from(iov.len_bytes()).map_err(|_| {
                        SubmitError::Invalid(format!("an iovec of {} bytes", iov.len_bytes()))
                    })?;
                    if !self.ctrlr.dma.contains(iov.addr(), u64::from(len_bytes)) {
                        return Err(SubmitError::Invalid(format!(
                            "buffer [{:#x}, +{len_bytes}) is outside the DMA memory shared \
                             with the back-end",
                            iov.addr()
                        )));
                    }
                    self.chain.push(Buffer {
                        addr: iov.addr(),
                        len_bytes,
                        device_writes: io_type == IoType::Read,
                    });
                }
            }
            IoType::Unmap | IoType::WriteZeroes => {
                let max = if io_type == IoType::Unmap {
                    limits.max_discard_sectors
                } else {
                    limits.max_write_zeroes_sectors
                };
                let num_sectors = u32::try_from(sectors)
                    .ok()
                    .filter(|s| max == 0 || *s <= max)
                    .ok_or_else(|| {
                        SubmitError::Invalid(format!(
                            "{sectors} sectors, more than the device takes per request ({max})"
                        ))
                    })?;
                // `sector: le64, num_sectors: le32, flags: le32` as two words.
                let segment = (base + SEGMENT_OFFSET) as u64;
                self.requests.write_u64(segment, sector);
                self.requests.write_u64(segment + 8, u64::from(num_sectors));
                self.chain.push(Buffer {
                    addr: self.requests_addr + (base + SEGMENT_OFFSET) as u64,
                    len_bytes: DiscardWriteZeroesSegment::SIZE_BYTES as u32,
                    device_writes: false,
                });
            }
            IoType::Flush | IoType::Reset => {}
        }
        self.chain.push(Buffer {
            addr: self.requests_addr + (base + STATUS_OFFSET) as u64,
            len_bytes: 1,
            device_writes: true,
        });
        let Some(set) = self.set.as_mut() else {
            return Err(SubmitError::Invalid("channel closing".to_string()));
        };
        let added = if limits.indirect && self.chain.len() <= MAX_INDIRECT_ENTRIES {
            set.queue.add_indirect(
                slot,
                &mut self.requests,
                (base + TABLE_OFFSET) as u64,
                &self.chain,
            )
        } else {
            set.queue.add(slot, &self.chain)
        };
        match added {
            Ok(()) => {
                self.slots[usize::from(slot)] = SlotState::InFlight;
                Ok(())
            }
            Err(AddError::Full { .. }) => Err(SubmitError::Full),
            Err(error @ AddError::TooLong { .. }) => Err(SubmitError::Invalid(error.to_string())),
        }
    }

    fn save(&mut self, io: &IoRequest<'_>) {
        let saved = &mut self.saved[usize::from(io.slot)];
        saved.io_type = Some(io.io_type);
        saved.offset_blocks = io.offset_blocks;
        saved.num_blocks = io.num_blocks;
        saved.iovs.clear();
        saved.iovs.extend_from_slice(io.iovs);
        self.slots[usize::from(io.slot)] = SlotState::Pending;
        self.pending.push_back(io.slot);
    }

    /// Retries the requests that waited for descriptors, in order.
    fn retry_pending(&mut self, done: &mut CompletionQueue) {
        while let Some(&slot) = self.pending.front() {
            let saved = std::mem::take(&mut self.saved[usize::from(slot)]);
            let Some(io_type) = saved.io_type else {
                self.pending.pop_front();
                continue;
            };
            let result = self.add_request(
                slot,
                io_type,
                saved.offset_blocks,
                saved.num_blocks,
                &saved.iovs,
            );
            self.saved[usize::from(slot)] = saved;
            match result {
                Ok(()) => {
                    self.pending.pop_front();
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::Invalid(reason)) => {
                    self.pending.pop_front();
                    self.refuse(slot, io_type, &reason, done);
                }
            }
        }
    }

    fn refuse(&mut self, slot: u16, io_type: IoType, reason: &str, done: &mut CompletionQueue) {
        tracing::warn!(bdev = %self.ctrlr.options.name, %io_type, reason, "virtio_blk: I/O not submitted");
        self.slots[usize::from(slot)] = SlotState::Idle;
        done.complete(slot, IoStatus::Failed);
    }

    /// Fails every outstanding request (the back-end is gone); returns how many.
    fn fail_all(&mut self, done: &mut CompletionQueue) -> usize {
        self.failed = true;
        self.pending.clear();
        let mut count = 0;
        for (slot, state) in self.slots.iter_mut().enumerate() {
            if *state != SlotState::Idle {
                *state = SlotState::Idle;
                done.complete(slot as u16, IoStatus::Failed);
                count += 1;
            }
        }
        if count > 0 {
            tracing::error!(
                bdev = %self.ctrlr.options.name,
                failed_ios = count,
                "virtio_blk: outstanding I/O failed: the back-end is gone"
            );
        }
        count
    }

    fn status(&self, slot: u16) -> IoStatus {
        let offset = usize::from(slot) * REQUEST_STRIDE_BYTES + STATUS_OFFSET;
        match self.requests.read_u8(offset as u64) {
            VIRTIO_BLK_S_OK => IoStatus::Success,
            VIRTIO_BLK_S_UNSUPP => IoStatus::Unsupported,
            other => {
                tracing::warn!(
                    bdev = %self.ctrlr.options.name,
                    status = other,
                    meaning = if other == VIRTIO_BLK_S_IOERR { "IOERR" } else { "not a virtio-blk status" },
                    "virtio_blk: I/O failed"
                );
                IoStatus::Failed
            }
        }
    }

    /// Publishes, kicks when asked, and reaps at most `max_per_poll` completions.
    fn reap(&mut self, done: &mut CompletionQueue) -> Result<usize, VirtioError> {
        let Some(set) = self.set.as_mut() else {
            return Ok(0);
        };
        if set.queue.publish() {
            set.kick();
        }
        let mut used = [0u16; 64];
        let mut total = 0;
        // Tokens are collected in small batches so that reading each status (which borrows
        // the channel) happens outside the queue's borrow.
        while total < self.max_per_poll {
            let Some(set) = self.set.as_mut() else { break };
            let mut n = 0;
            let limit = (self.max_per_poll - total).min(used.len());
            set.queue.poll_used(limit, |token, _len| {
                used[n] = token;
                n += 1;
            })?;
            for &slot in &used[..n] {
                let valid = self
                    .slots
                    .get(usize::from(slot))
                    .is_some_and(|s| *s == SlotState::InFlight);
                if !valid {
                    return Err(VirtioError::RingBroken {
                        queue: set_index(&self.set),
                        reason: format!(
                            "completion for request slot {slot}, which is not in flight"
                        ),
                    });
                }
                let status = self.status(slot);
                self.slots[usize::from(slot)] = SlotState::Idle;
                done.complete(slot, status);
            }
            total += n;
            if n < limit {
                break;
            }
        }
        Ok(total)
    }
}

fn set_index(set: &Option<QueueSet>) -> u16 {
    set.as_ref().map_or(0, |s| s.queue.index())
}

impl BackendChannel for VirtioChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        if self.failed || self.ctrlr.failed.load(Ordering::Relaxed) {
            // Reported from the submitter's next poll, never inside its submit (STYLE #6).
            self.slots[usize::from(io.slot)] = SlotState::Idle;
            done.complete(io.slot, IoStatus::Failed);
            return;
        }
        if !self.pending.is_empty() {
            self.save(io);
            return;
        }
        match self.add_request(
            io.slot,
            io.io_type,
            io.offset_blocks,
            io.num_blocks,
            io.iovs,
        ) {
            Ok(()) => {}
            Err(SubmitError::Full) => self.save(io),
            Err(SubmitError::Invalid(reason)) => self.refuse(io.slot, io.io_type, &reason, done),
        }
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        if self.failed {
            return 0;
        }
        self.polls = self.polls.wrapping_add(1);
        let lost = self.ctrlr.failed.load(Ordering::Relaxed)
            || (self.polls.is_multiple_of(HANGUP_CHECK_POLLS)
                && hung_up(self.ctrlr.hangup.as_fd()));
        if lost {
            self.ctrlr
                .fail("the vhost-user back-end closed the connection");
            return self.fail_all(done);
        }
        self.retry_pending(done);
        let count = match self.reap(done) {
            Ok(count) => count,
            Err(error) => {
                self.ctrlr.fail(&error.to_string());
                return self.fail_all(done);
            }
        };
        if matches!(self.call_fd.get(), Some(Some(_))) {
            self.arm_call(count);
        }
        count
    }

    fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        self.call_fd
            .get_or_init(|| {
                let set = self.set.as_ref()?;
                match owned_eventfd(&set.call) {
                    Ok(fd) => Some(fd),
                    Err(error) => {
                        tracing::warn!(bdev = %self.ctrlr.options.name, %error, "virtio_blk: duplicating the call eventfd for interrupt mode");
                        None
                    }
                }
            })
            .as_ref()
            .map(AsFd::as_fd)
    }
}

impl VirtioChannel {
    /// Interrupt mode, after a poll that reaped `reaped`: a poll that reaped is followed by
    /// another (the owner is busy), so notifications go off; one that reaped nothing with
    /// chains in flight is where the owner may sleep, so they go on, and an entry the device
    /// published before it saw them makes the call fd readable here (the device will not
    /// notify for it).
    fn arm_call(&mut self, reaped: usize) {
        let Some(set) = self.set.as_mut() else {
            return;
        };
        if reaped > 0 || set.queue.chains_in_flight() == 0 {
            set.queue.disable_used_notifications();
        } else if set.queue.enable_used_notifications() {
            let _ = set.call.write(1);
        }
    }
}

impl Drop for VirtioChannel {
    fn drop(&mut self) {
        let Some(mut set) = self.set.take() else {
            return;
        };
        if !self.failed && !self.ctrlr.failed.load(Ordering::Acquire) {
            // Let the device finish what it holds (it may still write into the callers'
            // buffers): bounded wait.
            set.queue.publish();
            set.kick();
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while set.queue.chains_in_flight() > 0 && Instant::now() < deadline {
                if set.queue.poll_used(usize::MAX, |_, _| {}).is_err() {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let in_flight = set.queue.chains_in_flight();
        if in_flight == 0 && !self.ctrlr.failed.load(Ordering::Acquire) {
            lock(&self.ctrlr.device).return_queue(set);
        } else {
            // The queue's state is unknown to a next owner: it stays out of the pool.
            tracing::warn!(
                bdev = %self.ctrlr.options.name,
                queue = set.queue.index(),
                in_flight,
                "virtio_blk: channel dropped with I/O the device did not finish; its queue is retired"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: serde_json::Value) -> Result<AttachOptions, BdevError> {
        let params = Params::new(ATTACH_METHOD, Some(&value))?;
        parse_attach_options(&params)
    }

    #[test]
    fn attach_takes_spdk_parameters_and_refuses_the_rest_by_name() {
        let options = parse(serde_json::json!({
            "name": "VirtioBlk0", "trtype": "user", "traddr": "/var/tmp/vhost.0",
            "dev_type": "blk", "vq_count": 2, "vq_size": 256
        }))
        .expect("valid");
        assert_eq!(options.name, "VirtioBlk0");
        assert_eq!(options.traddr, PathBuf::from("/var/tmp/vhost.0"));
        assert_eq!((options.device.vq_count, options.device.vq_size), (2, 256));
        assert!(!options.device.packed_ring);
        let defaults = parse(serde_json::json!({
            "name": "V", "trtype": "User", "traddr": "/s", "dev_type": "blk"
        }))
        .expect("defaults");
        assert_eq!(
            (defaults.device.vq_count, defaults.device.vq_size),
            (1, 512)
        );

        for (params, key) in [
            (
                serde_json::json!({"name": "V", "trtype": "pci", "traddr": "0000:00:04.0", "dev_type": "blk"}),
                "trtype",
            ),
            (
                serde_json::json!({"name": "V", "trtype": "user", "traddr": "/s", "dev_type": "scsi"}),
                "dev_type",
            ),
            (
                serde_json::json!({"name": "V", "trtype": "user", "traddr": "/s", "dev_type": "blk", "vq_count": 0}),
                "vq_count",
            ),
            (
                serde_json::json!({"name": "V", "trtype": "user", "traddr": "/s", "dev_type": "blk", "vq_size": 100}),
                "vq_size",
            ),
            (
                serde_json::json!({"name": "", "trtype": "user", "traddr": "/s", "dev_type": "blk"}),
                "name",
            ),
        ] {
            match parse(params) {
                Err(BdevError::InvalidParam { param, .. }) => assert_eq!(param, key),
                other => panic!("{key}: expected an invalid parameter, got {other:?}"),
            }
        }
        assert!(matches!(
            parse(
                serde_json::json!({"name": "V", "trtype": "user", "traddr": "/s", "dev_type": "blk", "bogus": 1})
            ),
            Err(BdevError::UnknownParam { .. })
        ));
        assert!(matches!(
            parse(serde_json::json!({"name": "V", "trtype": "user", "dev_type": "blk"})),
            Err(BdevError::MissingParam {
                param: "traddr",
                ..
            })
        ));
        let packed = parse(serde_json::json!({
            "name": "V", "trtype": "user", "traddr": "/s", "dev_type": "blk",
            "packed_ring": true, "vq_size": 100
        }))
        .expect("packed rings take any size");
        assert!(packed.device.packed_ring);
        let detach = parse_detach(
            &Params::new(DETACH_METHOD, Some(&serde_json::json!({"name": "V"}))).expect("params"),
        )
        .expect("detach");
        assert_eq!(detach.name, "V");
    }
}
