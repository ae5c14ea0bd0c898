//! The virtio-blk device (virtio 1.2 §5.2) on a bdev: one [`BlkQueue`] per virtqueue, owned
//! by the poller of its reactor thread.
//!
//! Zero copy: a read or write becomes bdev I/O whose iovecs point straight into guest memory
//! (through [`GuestMemory::for_each_fragment`], checked against the table); the status byte is
//! written when the bdev completes the I/O. No data is copied on the path for any bdev that
//! does not copy itself (nvme DMAs into the guest pages, aio hands them to the kernel).
//!
//! Per-request state lives in slots preallocated per queue and indexed by the chain's head (a
//! head is in flight at most once), so the I/O path allocates nothing: the iovec array of each
//! slot is sized for [`MAX_IOVS`] entries at queue creation.
//!
//! Request framing (§5.2.6): the first descriptor holds the 16-byte header (device-readable,
//! at least 16 bytes, as SPDK requires); the last descriptor is the device-writable status
//! (at least one byte; the status goes to its last byte, as SPDK writes it); the descriptors in
//! between carry the data, all device-writable for IN and GET_ID and all device-readable
//! otherwise. A chain without a usable status descriptor is returned used with length 0 and no
//! status; any other malformed request completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for
//! an unknown type or a feature not offered).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use pollux_bdev::{BdevChannel, BdevDesc, IoCompletion, IoStatus, IoVec};
use pollux_virtio::blk::{
    BlkConfig, DiscardWriteZeroesSegment, RequestHeader, ID_BYTES, SECTOR_SIZE_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use pollux_virtio::blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use pollux_virtio::features::{
    bit, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::dirty_log::DirtyLog;
use crate::guest_memory::GuestMemory;
use crate::inflight::Tracker;
use crate::queue::{Desc, VirtQueue, VringAddrs};

/// Data descriptors per request the driver may use (`seg_max`; SPDK's 128 iovecs minus the
/// header and the status).
pub const SEG_MAX: u32 = 126;
/// Bytes per data descriptor (`size_max`).
pub const SIZE_MAX_BYTES: u32 = 128 * 1024;
/// Host iovecs per request: each data descriptor may cross one region boundary.
pub const MAX_IOVS: usize = 2 * SEG_MAX as usize;
/// Chains taken from the avail ring per poll at most (STYLE #4).
pub const MAX_REQUESTS_PER_POLL: usize = 64;
/// Discard / write-zeroes: sectors per request and segments per request offered.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

/// What every queue of one controller shares about its device; immutable except the
/// write-cache mode a driver may flip with CONFIG_WCE.
#[derive(Debug)]
pub struct BlkDevice {
    pub bdev_name: String,
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    pub readonly: bool,
    pub packed_ring: bool,
    /// Track packed rings in the inflight region and resume them from it after a back-end
    /// restart (SPDK's `packed_ring_recovery`; off: a packed ring is not tracked).
    pub packed_ring_recovery: bool,
    pub supports_flush: bool,
    pub supports_unmap: bool,
    pub supports_write_zeroes: bool,
    pub num_queues: u16,
    /// GET_ID's answer (the bdev name, NUL-padded to 20 bytes, as SPDK answers).
    pub serial: [u8; ID_BYTES],
    /// `writeback` of the config space (1: write back).
    pub writeback: AtomicU8,
}

impl BlkDevice {
    /// The device for an open bdev.
    pub fn new(desc: &BdevDesc, readonly: bool, packed_ring: bool, num_queues: u16) -> Self {
        let info = desc.info();
        let mut serial = [0u8; ID_BYTES];
        let name = info.name.as_bytes();
        let n = name.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&name[..n]);
        Self {
            bdev_name: info.name.clone(),
            block_size_bytes: info.block_size_bytes,
            num_blocks: info.num_blocks,
            readonly,
            packed_ring,
            packed_ring_recovery: false,
            supports_flush: desc.supports(pollux_bdev::IoType::Flush),
            supports_unmap: desc.supports(pollux_bdev::IoType::Unmap),
            supports_write_zeroes: desc.supports(pollux_bdev::IoType::WriteZeroes),
            num_queues,
            serial,
            writeback: AtomicU8::new(u8::from(info.write_cache)),
        }
    }

    /// The device features offered (virtio 1.2 §5.2.3 and §6).
    pub fn features(&self) -> u64 {
        let mut features = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.packed_ring {
            features |= bit(VIRTIO_F_RING_PACKED);
        }
        if self.readonly {
            features |= bit(VIRTIO_BLK_F_RO);
        } else {
            if self.supports_unmap {
                features |= bit(VIRTIO_BLK_F_DISCARD);
            }
            if self.supports_write_zeroes {
                features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
            }
        }
        features
    }

    /// The configuration space (§5.2.4).
    pub fn config(&self) -> BlkConfig {
        let size_bytes = self
            .num_blocks
            .saturating_mul(u64::from(self.block_size_bytes));
        let sectors_per_block = self.block_size_bytes / SECTOR_SIZE_BYTES as u32;
        BlkConfig {
            capacity_sectors: size_bytes / SECTOR_SIZE_BYTES,
            size_max: SIZE_MAX_BYTES,
            seg_max: SEG_MAX,
            blk_size: self.block_size_bytes,
            physical_block_exp: 0,
            alignment_offset: 0,
            min_io_size: 1,
            opt_io_size: 1,
            writeback: self.writeback.load(Ordering::Relaxed),
            num_queues: self.num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: sectors_per_block,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            write_zeroes_may_unmap: 0,
            ..BlkConfig::default()
        }
    }
}

/// Interrupt coalescing settings, SPDK's `vhost_controller_set_coalescing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescingSettings {
    /// Base delay of a notification, in microseconds (0: coalescing off).
    pub delay_base_us: u32,
    /// Above this many requests per second a queue's notifications are delayed.
    pub iops_threshold: u32,
}

/// Statistics window of the coalescing decision (SPDK's `SPDK_VHOST_STATS_CHECK_INTERVAL_MS`).
const COALESCING_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// A queue's coalescing state: as SPDK, a queue running above the threshold delays its
/// notifications by `delay_base * (rate - threshold) / threshold` (at most `delay_base`),
/// recomputed every window, and sends at most one per delay; below it, notifications go out
/// at once. The clock is read once per poll, and only on queues with coalescing on.
#[derive(Debug)]
struct Coalescing {
    delay_base: std::time::Duration,
    /// Requests per window above which notifications are delayed (at least 1).
    threshold_per_window: u64,
    window_start: std::time::Instant,
    window_requests: u64,
    delay: std::time::Duration,
    next_at: std::time::Instant,
    pending: bool,
}

impl Coalescing {
    fn new(settings: CoalescingSettings) -> Option<Self> {
        if settings.delay_base_us == 0 {
            return None;
        }
        let now = std::time::Instant::now();
        Some(Self {
            delay_base: std::time::Duration::from_micros(u64::from(settings.delay_base_us)),
            threshold_per_window: (u64::from(settings.iops_threshold)
                * COALESCING_WINDOW.as_millis() as u64
                / 1000)
                .max(1),
            window_start: now,
            window_requests: 0,
            delay: std::time::Duration::ZERO,
            next_at: now,
            pending: false,
        })
    }

    /// Whether to notify now, given whether this poll's publish asked for it and how many
    /// requests it took.
    #[inline]
    fn due(&mut self, wanted: bool, taken: usize) -> bool {
        self.window_requests += taken as u64;
        self.pending |= wanted;
        if !self.pending {
            return false;
        }
        let now = std::time::Instant::now();
        if now.duration_since(self.window_start) >= COALESCING_WINDOW {
            let over = self
                .window_requests
                .saturating_sub(self.threshold_per_window);
            self.delay = (self.delay_base * over.min(u64::from(u32::MAX)) as u32)
                / self.threshold_per_window.min(u64::from(u32::MAX)) as u32;
            self.delay = self.delay.min(self.delay_base);
            self.window_start = now;
            self.window_requests = 0;
        }
        if self.delay.is_zero() || now >= self.next_at {
            self.pending = false;
            self.next_at = now + self.delay;
            return true;
        }
        false
    }
}

/// One request slot, indexed by chain head.
#[derive(Debug)]
struct ReqSlot {
    in_flight: bool,
    /// Guest address of the status byte.
    status_gpa: u64,
    /// Bytes the device writes into the chain (data read plus the status byte).
    used_len: u32,
    /// The bdev I/O's iovecs (capacity MAX_IOVS, never grows).
    iovs: Vec<IoVec>,
}

/// Counters of one queue (read by its owner).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    pub requests: u64,
    pub errors: u64,
    pub bad_chains: u64,
    pub notifications: u64,
}

/// How a parsed request goes on.
enum Start {
    /// Submitted to the bdev; completes from the channel's poll.
    Submitted,
    /// Done now with this status (status byte position known).
    Done { status: u8, used_len: u32 },
    /// No usable status descriptor: return the chain used with length 0.
    NoStatus,
}

/// A running virtqueue of a virtio-blk device, owned by the poller of its thread.
pub struct BlkQueue {
    index: u16,
    dev: Arc<BlkDevice>,
    queue: VirtQueue,
    addrs: VringAddrs,
    mem: Arc<GuestMemory>,
    /// Earlier tables still referenced by in-flight I/O (dropped when none is in flight).
    retired: Vec<Arc<GuestMemory>>,
    channel: BdevChannel,
    slots: Box<[ReqSlot]>,
    chain: Vec<Desc>,
    hint: usize,
    call: Option<File>,
    in_flight: usize,
    stats: QueueStats,
    /// Reconnection tracking (INFLIGHT_SHMFD; packed rings with `packed_ring_recovery`).
    inflight: Option<Tracker>,
    /// Heads (packed: buffer ids) pushed used since the last publish (for `inflight`;
    /// capacity: the queue size).
    batch: Vec<u16>,
    /// Requests recorded in flight by a previous back-end, to resubmit first (last = next):
    /// split heads, or packed head entries of the inflight region.
    resubmit: Vec<u16>,
    /// Interrupt coalescing (`None`: every notification the driver asks for is sent).
    coalescing: Option<Coalescing>,
    /// The dirty-page log while live migration logs (`None`: logging off, one branch per
    /// write to guest memory).
    log: Option<Arc<DirtyLog>>,
    /// Interrupt mode: driver kicks are asked for (the queue was about to sleep).
    kicks_on: bool,
}

impl std::fmt::Debug for BlkQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkQueue")
            .field("index", &self.index)
            .field("queue", &self.queue)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Marks the guest pages under a completed read's iovecs dirty. The iovecs point into the
/// table the request started in: the current one or one retired while it was in flight.
#[cold]
fn log_iovecs(
    log: &DirtyLog,
    mem: &GuestMemory,
    retired: &[Arc<GuestMemory>],
    iovs: &[IoVec],
    queue: u16,
) {
    for iov in iovs {
        let (host, len) = (iov.addr(), iov.len_bytes() as u64);
        let gpa = mem
            .host_to_gpa(host, len)
            .or_else(|| retired.iter().find_map(|m| m.host_to_gpa(host, len)));
        match gpa {
            Some(gpa) => log.mark(gpa, len),
            // Cannot happen: the table an iovec was built from stays alive until it completes.
            None => tracing::error!(
                queue,
                host,
                len,
                "vhost: read buffer in no guest region; not logged"
            ),
        }
    }
}

/// Maps a bdev completion status to a virtio-blk status byte.
fn blk_status(status: IoStatus) -> u8 {
    match status {
        IoStatus::Success => VIRTIO_BLK_S_OK,
        IoStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    }
}

/// What a [`BlkQueue`] is made of.
pub struct BlkQueueParts {
    pub index: u16,
    pub dev: Arc<BlkDevice>,
    /// The started ring.
    pub queue: VirtQueue,
    /// Its addresses (to re-resolve them when the memory table changes).
    pub addrs: VringAddrs,
    pub mem: Arc<GuestMemory>,
    /// A channel with at least `queue.size()` slots.
    pub channel: BdevChannel,
    /// The call eventfd (`None`: the driver is never notified).
    pub call: Option<File>,
    /// Inflight tracking and the requests to resubmit, oldest first (split heads, packed
    /// head entries).
    pub inflight: Option<(Tracker, Vec<u16>)>,
    /// The dirty-page log, when the front-end is logging (live migration).
    pub log: Option<Arc<DirtyLog>>,
}

impl BlkQueue {
    /// A queue over a started ring.
    pub fn new(parts: BlkQueueParts) -> Self {
        let BlkQueueParts {
            index,
            dev,
            queue,
            addrs,
            mem,
            channel,
            call,
            inflight,
            log,
        } = parts;
        let size = usize::from(queue.size());
        let (inflight, mut resubmit) = match inflight {
            Some((tracker, resubmit)) => (Some(tracker), resubmit),
            None => (None, Vec::new()),
        };
        resubmit.reverse();
        let slots = (0..size)
            .map(|_| ReqSlot {
                in_flight: false,
                status_gpa: 0,
                used_len: 0,
                iovs: Vec::with_capacity(MAX_IOVS),
            })
            .collect();
        Self {
            index,
            dev,
            queue,
            addrs,
            mem,
            retired: Vec::new(),
            channel,
            slots,
            chain: Vec::with_capacity(size.max(crate::queue::MAX_INDIRECT_DESCS as usize)),
            hint: 0,
            call,
            in_flight: 0,
            stats: QueueStats::default(),
            inflight,
            batch: Vec::with_capacity(size),
            resubmit,
            coalescing: None,
            log,
            kicks_on: false,
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The ring position to hand back at GET_VRING_BASE.
    pub fn base(&self) -> crate::queue::VringBase {
        self.queue.base()
    }

    /// Starts (`Some`) or stops (`None`) dirty-page logging. Requests in flight are logged
    /// when they complete, so one that started before logging began is logged too.
    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    /// A new call eventfd (SET_VRING_CALL while running).
    pub fn set_call(&mut self, call: Option<File>) {
        self.call = call;
    }

    /// Switches to a new memory table between two polls; the old one stays alive until the
    /// I/O in flight in it completes. Fails (keeping the old table) when the ring no longer
    /// lies in the new one.
    pub fn set_memory(
        &mut self,
        mem: Arc<GuestMemory>,
    ) -> Result<(), crate::queue::RingSetupError> {
        self.queue.remap(&mem, self.addrs)?;
        let old = std::mem::replace(&mut self.mem, mem);
        if self.in_flight > 0 {
            self.retired.push(old);
        }
        self.hint = 0;
        Ok(())
    }

    /// One poll: completions first, then up to [`MAX_REQUESTS_PER_POLL`] new requests unless
    /// `accept_new` is false (the ring is stopping), then one used-index publish and at most
    /// one notification. Returns the work done (0: idle).
    #[inline]
    pub fn poll(&mut self, accept_new: bool) -> usize {
        let mut work = self.reap();
        let mut taken = 0;
        if accept_new {
            taken = self.take_requests();
            work += taken;
        }
        let mut notify = false;
        if work > 0 {
            if let Some(inflight) = self.inflight.as_mut() {
                inflight.pre_publish(&self.batch, &self.queue);
            }
            notify = self.queue.publish_used();
            if let Some(log) = &self.log {
                let (gpa, len) = self.queue.device_written_area();
                log.mark(gpa, len);
            }
            if let Some(inflight) = self.inflight.as_mut() {
                inflight.post_publish(&self.batch, &self.queue);
            }
            self.batch.clear();
        }
        match self.coalescing.as_mut() {
            None => {
                if notify {
                    self.notify();
                }
            }
            Some(coalescing) => {
                if coalescing.due(notify, taken) {
                    self.notify();
                }
            }
        }
        if self.in_flight == 0 && !self.retired.is_empty() {
            self.retired.clear();
        }
        work
    }

    /// Interrupt mode, after a poll that did work: the queue polls again, so driver kicks
    /// go off (one guest store, only when they were on).
    pub fn notifications_off(&mut self) {
        if std::mem::take(&mut self.kicks_on) {
            self.queue.disable_notifications();
            self.log_notification_area();
        }
    }

    /// Interrupt mode, after a poll that did nothing: whether the queue's thread may sleep
    /// until the kick fd or the bdev channel's completion fd wakes it. `kick_watched`: the
    /// kick fd is registered; `completions_watched`: the channel's fd is. Turns kicks on and
    /// re-checks the ring (a chain published before the driver saw that gets no kick), and
    /// sends a notification coalescing held back (nothing would send it while asleep).
    pub fn may_sleep(
        &mut self,
        accept_new: bool,
        kick_watched: bool,
        completions_watched: bool,
    ) -> bool {
        if self.in_flight > 0 && !(completions_watched && self.channel.interrupt_fd().is_some()) {
            // Completions nothing announces (no fd, or held back by rate limits): poll.
            return false;
        }
        self.flush_notification();
        if !accept_new {
            return true;
        }
        if !kick_watched || !self.resubmit.is_empty() {
            return false;
        }
        self.kicks_on = true;
        let available = self.queue.enable_notifications();
        self.log_notification_area();
        !available
    }

    /// Interrupt mode from the first poll: the ring starts with kicks on (the fields' reset
    /// values), so the first busy poll turns them off.
    pub fn start_interrupt_mode(&mut self) {
        self.kicks_on = true;
    }

    /// The bdev channel's completion fd (interrupt mode registers a duplicate).
    pub fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.channel.interrupt_fd()
    }

    fn log_notification_area(&self) {
        if let Some(log) = &self.log {
            let (gpa, len) = self.queue.notification_area();
            log.mark(gpa, len);
        }
    }

    /// Sets interrupt coalescing (SPDK's `vhost_controller_set_coalescing`); `None`: off.
    pub fn set_coalescing(&mut self, settings: Option<CoalescingSettings>) {
        self.coalescing = settings.and_then(Coalescing::new);
    }

    /// Sends a notification held back by coalescing (when the queue stops).
    pub fn flush_notification(&mut self) {
        if self
            .coalescing
            .as_mut()
            .is_some_and(|c| std::mem::take(&mut c.pending))
        {
            self.notify();
        }
    }

    fn notify(&mut self) {
        let Some(call) = self.call.as_mut() else {
            return;
        };
        self.stats.notifications += 1;
        if let Err(error) = call.write_all(&1u64.to_ne_bytes()) {
            if error.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!(queue = self.index, %error, "vhost: writing the call eventfd");
            }
        }
    }

    fn reap(&mut self) -> usize {
        let Self {
            channel,
            slots,
            queue,
            mem,
            hint,
            in_flight,
            stats,
            index,
            inflight,
            batch,
            log,
            retired,
            ..
        } = self;
        channel.poll(|_chan, done: IoCompletion| {
            let head = done.tag as u16;
            let Some(slot) = slots.get_mut(usize::from(head)) else {
                return;
            };
            slot.in_flight = false;
            *in_flight -= 1;
            let status = blk_status(done.status);
            if status != VIRTIO_BLK_S_OK {
                stats.errors += 1;
                tracing::debug!(queue = *index, head, status = %done.status, io = %done.io_type, "vhost: request failed");
            }
            let used_len = if status == VIRTIO_BLK_S_OK { slot.used_len } else { 1 };
            if let Err(error) = mem.write_bytes(slot.status_gpa, &[status], hint) {
                tracing::warn!(queue = *index, head, %error, "vhost: status byte left guest memory (table changed)");
            }
            if let Some(log) = log {
                log.mark(slot.status_gpa, 1);
                // A read (used_len counts its data): the bdev wrote its buffers, whatever
                // the status (a failed read may have written part of them).
                if slot.used_len > 1 {
                    log_iovecs(log, mem, retired, &slot.iovs, *index);
                }
            }
            queue.push_used(head, used_len);
            if inflight.is_some() {
                batch.push(head);
            }
        })
    }

    /// Marks `head` used (and remembers it for the inflight batch).
    #[inline]
    fn used(&mut self, head: u16, len: u32) {
        self.queue.push_used(head, len);
        if self.inflight.is_some() {
            self.batch.push(head);
        }
    }

    fn take_requests(&mut self) -> usize {
        let mut taken = 0;
        while taken < MAX_REQUESTS_PER_POLL {
            let popped = match self.resubmit.pop() {
                Some(head) => match self.resubmitted(head) {
                    Some(popped) => popped,
                    None => continue,
                },
                None => match self.queue.pop(&self.mem, &mut self.chain) {
                    Some(popped) => {
                        // Packed: the chain's descriptors copied to the region (step 1), a
                        // malformed one too, as its used descriptor moves the used position.
                        if let (Some(Tracker::Packed(inflight)), Some(id)) = (
                            self.inflight.as_mut(),
                            popped.as_ref().map_or_else(|e| e.head, |&id| Some(id)),
                        ) {
                            inflight.begin(id, &self.queue);
                        }
                        popped
                    }
                    None => break,
                },
            };
            taken += 1;
            self.stats.requests += 1;
            let head = match popped {
                Ok(head) => head,
                Err(error) => {
                    self.stats.bad_chains += 1;
                    tracing::warn!(queue = self.index, head = ?error.head, error = %error.error, "vhost: malformed descriptor chain");
                    if let Some(head) = error.head {
                        if !self.slots[usize::from(head)].in_flight {
                            self.used(head, 0);
                        }
                    }
                    continue;
                }
            };
            if self.slots[usize::from(head)].in_flight {
                self.stats.bad_chains += 1;
                tracing::warn!(
                    queue = self.index,
                    head,
                    "vhost: driver made a chain available twice; dropped"
                );
                continue;
            }
            if let Some(Tracker::Split(inflight)) = self.inflight.as_mut() {
                inflight.begin(head);
            }
            match self.start(head) {
                Start::Submitted => {
                    self.slots[usize::from(head)].in_flight = true;
                    self.in_flight += 1;
                }
                Start::Done { status, used_len } => {
                    if status != VIRTIO_BLK_S_OK {
                        self.stats.errors += 1;
                    }
                    let gpa = self.slots[usize::from(head)].status_gpa;
                    if self
                        .mem
                        .write_bytes(gpa, &[status], &mut self.hint)
                        .is_err()
                    {
                        self.used(head, 0);
                    } else {
                        if let Some(log) = &self.log {
                            log.mark(gpa, 1);
                        }
                        self.used(head, used_len);
                    }
                }
                Start::NoStatus => {
                    self.stats.errors += 1;
                    tracing::warn!(
                        queue = self.index,
                        head,
                        "vhost: request without a usable status descriptor"
                    );
                    self.used(head, 0);
                }
            }
        }
        taken
    }

    /// Walks a request a previous back-end left in flight into `self.chain`: a split head
    /// through the ring, a packed head entry through the region's copy (the ring slots may
    /// hold used descriptors by now). `None`: nothing to resubmit there.
    #[cold]
    fn resubmitted(&mut self, head: u16) -> Option<Result<u16, crate::queue::PopError>> {
        match self.inflight.as_ref()? {
            Tracker::Split(_) => self.queue.walk_head(&self.mem, head, &mut self.chain),
            Tracker::Packed(inflight) => {
                let (id, slots) = inflight.resubmit_info(head)?;
                if !self.queue.resume_packed(id, slots) {
                    tracing::warn!(
                        queue = self.index,
                        id,
                        "vhost: packed id recorded in flight is already in flight; not resubmitted"
                    );
                    return None;
                }
                Some(inflight.walk(&self.mem, head, &mut self.chain))
            }
        }
    }

    /// Parses the chain in `self.chain` (head `head`) and starts it.
    fn start(&mut self, head: u16) -> Start {
        let chain = &self.chain;
        // Status: the last descriptor, device-writable, at least one byte, in guest memory.
        let Some(status_desc) = chain.last().copied() else {
            return Start::NoStatus;
        };
        if chain.len() < 2 || !status_desc.write || status_desc.len == 0 {
            return Start::NoStatus;
        }
        let status_gpa = status_desc.gpa.wrapping_add(u64::from(status_desc.len) - 1);
        if !self.mem.contains(status_gpa, 1, &mut self.hint) {
            return Start::NoStatus;
        }
        self.slots[usize::from(head)].status_gpa = status_gpa;
        let ioerr = Start::Done {
            status: VIRTIO_BLK_S_IOERR,
            used_len: 1,
        };
        let header_desc = chain[0];
        if header_desc.write || (header_desc.len as usize) < RequestHeader::SIZE_BYTES {
            return ioerr;
        }
        let Ok((type_reserved, sector)) = self.mem.read_u64_pair(header_desc.gpa, &mut self.hint)
        else {
            return ioerr;
        };
        // `type: le32, reserved: le32, sector: le64` as two words.
        let header = RequestHeader {
            request_type: type_reserved as u32,
            reserved: (type_reserved >> 32) as u32,
            sector,
        };
        let data = &chain[1..chain.len() - 1];
        match header.request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => self.start_rw(head, header, data.len()),
            VIRTIO_BLK_T_FLUSH => {
                if !self.dev.supports_flush {
                    return Start::Done {
                        status: VIRTIO_BLK_S_OK,
                        used_len: 1,
                    };
                }
                self.slots[usize::from(head)].used_len = 1;
                let blocks = self.dev.num_blocks;
                self.submit(head, |chan, tag| chan.flush(tag, 0, blocks))
            }
            VIRTIO_BLK_T_GET_ID => {
                let [desc] = data else { return ioerr };
                if !desc.write || desc.len == 0 {
                    return ioerr;
                }
                let n = (desc.len as usize).min(ID_BYTES);
                let serial = self.dev.serial;
                if self
                    .mem
                    .write_bytes(desc.gpa, &serial[..n], &mut self.hint)
                    .is_err()
                {
                    return ioerr;
                }
                if let Some(log) = &self.log {
                    log.mark(desc.gpa, n as u64);
                }
                Start::Done {
                    status: VIRTIO_BLK_S_OK,
                    used_len: n as u32 + 1,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.start_discard(head, header.request_type, data.len())
            }
            _ => Start::Done {
                status: VIRTIO_BLK_S_UNSUPP,
                used_len: 1,
            },
        }
    }

    fn submit(
        &mut self,
        head: u16,
        f: impl FnOnce(&mut BdevChannel, u64) -> Result<(), pollux_bdev::BdevError>,
    ) -> Start {
        match f(&mut self.channel, u64::from(head)) {
            Ok(()) => Start::Submitted,
            Err(error) => {
                tracing::warn!(queue = self.index, head, %error, "vhost: bdev refused a request");
                Start::Done {
                    status: VIRTIO_BLK_S_IOERR,
                    used_len: 1,
                }
            }
        }
    }

    /// The block range of `bytes` from `sector`, if aligned to the bdev's blocks.
    fn blocks(&self, sector: u64, bytes: u64) -> Option<(u64, u64)> {
        let block = u64::from(self.dev.block_size_bytes);
        let offset = sector.checked_mul(SECTOR_SIZE_BYTES)?;
        if block.is_power_of_two() {
            // Every request passes here: a mask and a shift, not four 64-bit divisions
            // (tens of cycles each on these cores, where callgrind counts one instruction).
            let mask = block - 1;
            if offset & mask != 0 || bytes & mask != 0 || bytes == 0 {
                return None;
            }
            let shift = block.trailing_zeros();
            return Some((offset >> shift, bytes >> shift));
        }
        if !offset.is_multiple_of(block) || !bytes.is_multiple_of(block) || bytes == 0 {
            return None;
        }
        Some((offset / block, bytes / block))
    }

    fn start_rw(&mut self, head: u16, header: RequestHeader, data_descs: usize) -> Start {
        let ioerr = Start::Done {
            status: VIRTIO_BLK_S_IOERR,
            used_len: 1,
        };
        let read = header.request_type == VIRTIO_BLK_T_IN;
        if !read && self.dev.readonly {
            return ioerr;
        }
        let Self {
            chain,
            slots,
            mem,
            hint,
            ..
        } = self;
        let slot = &mut slots[usize::from(head)];
        slot.iovs.clear();
        let mut total = 0u64;
        for desc in &chain[1..=data_descs] {
            // IN: the device writes every data buffer; OUT: it only reads them.
            if desc.write != read || desc.len == 0 {
                return ioerr;
            }
            total += u64::from(desc.len);
            let iovs = &mut slot.iovs;
            let fragments =
                mem.for_each_fragment(desc.gpa, u64::from(desc.len), hint, |host, len| {
                    if iovs.len() == MAX_IOVS {
                        return Err(());
                    }
                    // SAFETY: `[host, host + len)` lies in a region of the guest memory table
                    // (checked by for_each_fragment), which stays mapped until this I/O completes:
                    // the queue holds the table (and any table it replaces while I/O is in flight,
                    // in `retired`) until its in-flight count drops to zero. The memory is the
                    // guest's; no Rust reference to it exists, and what the guest does to its own
                    // buffers while the I/O runs only changes its own data.
                    iovs.push(unsafe { IoVec::new(host as *mut u8, len) });
                    Ok(())
                });
            match fragments {
                Ok(Ok(())) => {}
                _ => return ioerr,
            }
        }
        let Some((offset_blocks, num_blocks)) = self.blocks(header.sector, total) else {
            return ioerr;
        };
        let slot = &mut self.slots[usize::from(head)];
        slot.used_len = if read { total as u32 + 1 } else { 1 };
        let iovs = &slot.iovs;
        let tag = u64::from(head);
        let result = if read {
            self.channel.read(tag, offset_blocks, num_blocks, iovs)
        } else {
            self.channel.write(tag, offset_blocks, num_blocks, iovs)
        };
        match result {
            Ok(()) => Start::Submitted,
            Err(error) => {
                tracing::warn!(queue = self.index, head, %error, "vhost: bdev refused a request");
                ioerr
            }
        }
    }

    fn start_discard(&mut self, head: u16, request_type: u32, data_descs: usize) -> Start {
        let ioerr = Start::Done {
            status: VIRTIO_BLK_S_IOERR,
            used_len: 1,
        };
        let unsupp = Start::Done {
            status: VIRTIO_BLK_S_UNSUPP,
            used_len: 1,
        };
        let discard = request_type == VIRTIO_BLK_T_DISCARD;
        if self.dev.readonly {
            return ioerr;
        }
        if (discard && !self.dev.supports_unmap) || (!discard && !self.dev.supports_write_zeroes) {
            return unsupp;
        }
        // One segment (max_discard_seg = 1), device-readable, exactly one segment long.
        let desc = self.chain[1];
        if data_descs != 1
            || desc.write
            || desc.len as usize != DiscardWriteZeroesSegment::SIZE_BYTES
        {
            return ioerr;
        }
        let Ok(bytes) = self
            .mem
            .read_array::<{ DiscardWriteZeroesSegment::SIZE_BYTES }>(desc.gpa, &mut self.hint)
        else {
            return ioerr;
        };
        let segment = DiscardWriteZeroesSegment::from_le_bytes(bytes);
        let allowed_flags = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if segment.flags & !allowed_flags != 0 {
            return unsupp;
        }
        if segment.num_sectors > MAX_DISCARD_SECTORS {
            return ioerr;
        }
        let Some((offset, count)) = self.blocks(
            segment.sector,
            u64::from(segment.num_sectors) * SECTOR_SIZE_BYTES,
        ) else {
            return ioerr;
        };
        self.slots[usize::from(head)].used_len = 1;
        if discard {
            self.submit(head, |chan, tag| chan.unmap(tag, offset, count))
        } else {
            self.submit(head, |chan, tag| chan.write_zeroes(tag, offset, count))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_memory::test_util::memory;
    use crate::queue::tests::{addrs, SplitDriver, DATA, GPA, USED};
    use crate::queue::VringBase;
    use pollux_bdev::modules::malloc;
    use pollux_bdev::BdevRegistry;
    use pollux_env::dma::{DmaConfig, DmaMemory};
    use pollux_virtio::ring::{SplitDesc, UsedElem, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    const HDR: u64 = DATA;
    const STATUS: u64 = DATA + 0x100;
    const BUF: u64 = DATA + 0x1000;
    const SIZE: u16 = 16;

    struct Rig {
        mem: Arc<GuestMemory>,
        _file: std::fs::File,
        _dma: Arc<DmaMemory>,
        _registry: Arc<BdevRegistry>,
        q: BlkQueue,
        drv: SplitDriver,
        used_seen: u16,
    }

    fn rig(readonly: bool) -> Rig {
        let registry = BdevRegistry::new();
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 4,
            no_huge: true,
        })
        .expect("dma");
        malloc::create(
            &registry,
            &dma,
            malloc::MallocOptions::from_size_mib(Some("M0".into()), 1, 512),
        )
        .expect("malloc");
        let desc = registry.open("M0", true, None).expect("open");
        let dev = Arc::new(BlkDevice::new(&desc, readonly, false, 1));
        let (mem, file) = memory(GPA, 0x40000);
        let mem = Arc::new(mem);
        let queue =
            VirtQueue::new(&mem, SIZE, addrs(), VringBase::default(), false, false).expect("queue");
        let channel = desc.channel(u32::from(SIZE)).expect("channel");
        let q = BlkQueue::new(BlkQueueParts {
            index: 0,
            dev,
            queue,
            addrs: addrs(),
            mem: mem.clone(),
            channel,
            call: None,
            inflight: None,
            log: None,
        });
        Rig {
            mem,
            _file: file,
            _dma: dma,
            _registry: registry,
            q,
            drv: SplitDriver {
                size: SIZE,
                avail_idx: 0,
            },
            used_seen: 0,
        }
    }

    impl Rig {
        fn put(&self, gpa: u64, bytes: &[u8]) {
            let mut h = 0;
            self.mem
                .write_bytes(gpa, bytes, &mut h)
                .expect("guest write");
        }

        fn get<const N: usize>(&self, gpa: u64) -> [u8; N] {
            let mut h = 0;
            self.mem.read_array::<N>(gpa, &mut h).expect("guest read")
        }

        /// A request: header, data descriptors, status; returns (status byte, used len).
        fn request(
            &mut self,
            header: RequestHeader,
            hdr_len: u32,
            data: &[SplitDesc],
            status: SplitDesc,
        ) -> (u8, u32) {
            self.put(HDR, &header.to_le_bytes());
            self.put(STATUS, &[0xff]);
            let mut descs = vec![SplitDesc {
                addr: HDR,
                len: hdr_len,
                flags: 0,
                next: 0,
            }];
            descs.extend_from_slice(data);
            descs.push(status);
            let n = descs.len();
            for (i, mut d) in descs.into_iter().enumerate() {
                if i + 1 < n {
                    d.flags |= VIRTQ_DESC_F_NEXT;
                    d.next = i as u16 + 1;
                }
                self.drv.desc(&self.mem, i as u16, d);
            }
            self.drv.publish(&self.mem, 0);
            for _ in 0..4 {
                self.q.poll(true);
            }
            let idx = u16::from_le_bytes(self.get::<2>(USED + 2));
            assert_eq!(
                idx,
                self.used_seen.wrapping_add(1),
                "one used entry per request"
            );
            let elem = UsedElem::from_le_bytes(
                self.get::<8>(USED + 4 + 8 * u64::from(self.used_seen % SIZE)),
            );
            self.used_seen = idx;
            assert_eq!(elem.id, 0);
            (self.get::<1>(STATUS)[0], elem.len)
        }
    }

    fn hdr(request_type: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            request_type,
            reserved: 0,
            sector,
        }
    }

    fn status_desc() -> SplitDesc {
        SplitDesc {
            addr: STATUS,
            len: 1,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        }
    }

    fn data(addr: u64, len: u32, write: bool) -> SplitDesc {
        SplitDesc {
            addr,
            len,
            flags: if write { VIRTQ_DESC_F_WRITE } else { 0 },
            next: 0,
        }
    }

    #[test]
    fn write_then_read_back_through_guest_memory() {
        let mut rig = rig(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        rig.put(BUF, &pattern);
        // Split across two descriptors.
        let w = [data(BUF, 512, false), data(BUF + 512, 512, false)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_OUT, 8), 16, &w, status_desc()),
            (VIRTIO_BLK_S_OK, 1)
        );
        rig.put(BUF + 0x1000, &[0u8; 1024]);
        let r = [data(BUF + 0x1000, 1024, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 8), 16, &r, status_desc()),
            (VIRTIO_BLK_S_OK, 1025)
        );
        let back = rig.get::<1024>(BUF + 0x1000);
        assert_eq!(&back[..], &pattern[..]);
        // GET_ID answers the bdev name.
        let id = [data(BUF, 20, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_GET_ID, 0), 16, &id, status_desc()),
            (VIRTIO_BLK_S_OK, 21)
        );
        assert_eq!(&rig.get::<3>(BUF), b"M0\0");
        // Flush and write zeroes.
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_FLUSH, 0), 16, &[], status_desc())
                .0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(rig.q.stats().errors, 0);
    }

    #[test]
    fn malformed_requests_fail_alone() {
        let mut rig = rig(false);
        let r = [data(BUF, 512, true)];
        // Header too short.
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 8, &r, status_desc()).0,
            VIRTIO_BLK_S_IOERR
        );
        // Data direction wrong for a read.
        let wrong = [data(BUF, 512, false)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &wrong, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        // Beyond the end of the 1 MiB disk.
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 2048), 16, &r, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, u64::MAX / 256), 16, &r, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        // Not a multiple of the block size.
        let odd = [data(BUF, 100, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &odd, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        // Data outside guest memory, huge length.
        let outside = [data(GPA + 0x10_0000, 512, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &outside, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        let huge = [data(BUF, u32::MAX, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &huge, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        // Unknown type.
        assert_eq!(
            rig.request(hdr(99, 0), 16, &r, status_desc()).0,
            VIRTIO_BLK_S_UNSUPP
        );
        // Status device-readable: no status written, used length 0.
        let ro_status = SplitDesc {
            flags: 0,
            ..status_desc()
        };
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &r, ro_status),
            (0xff, 0)
        );
        // A valid request afterwards completes.
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &r, status_desc()),
            (VIRTIO_BLK_S_OK, 513)
        );
    }

    #[test]
    fn coalescing_holds_notifications_back_above_the_threshold() {
        assert!(Coalescing::new(CoalescingSettings {
            delay_base_us: 0,
            iops_threshold: 1
        })
        .is_none());
        let mut c = Coalescing::new(CoalescingSettings {
            delay_base_us: 200_000,
            iops_threshold: 100,
        })
        .expect("on");
        assert!(c.due(true, 50), "first window: no delay yet");
        std::thread::sleep(COALESCING_WINDOW + std::time::Duration::from_millis(2));
        assert!(c.due(true, 50), "the delay starts after this one");
        assert_eq!(
            c.delay,
            std::time::Duration::from_millis(200),
            "capped at the base"
        );
        assert!(!c.due(true, 1), "held back");
        assert!(!c.due(false, 0), "still held back");
        std::thread::sleep(std::time::Duration::from_millis(210));
        assert!(c.due(false, 0), "the held-back notification goes out");
        assert!(!c.due(false, 0), "and only once");
    }

    #[test]
    fn read_only_controller_refuses_modifications() {
        let mut rig = rig(true);
        let w = [data(BUF, 512, false)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_OUT, 0), 16, &w, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        let segment = DiscardWriteZeroesSegment {
            sector: 0,
            num_sectors: 8,
            flags: 0,
        };
        rig.put(BUF + 0x800, &segment.to_le_bytes());
        let seg = [data(BUF + 0x800, 16, false)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_DISCARD, 0), 16, &seg, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_WRITE_ZEROES, 0), 16, &seg, status_desc())
                .0,
            VIRTIO_BLK_S_IOERR
        );
        let r = [data(BUF, 512, true)];
        assert_eq!(
            rig.request(hdr(VIRTIO_BLK_T_IN, 0), 16, &r, status_desc())
                .0,
            VIRTIO_BLK_S_OK
        );
        assert_ne!(rig.q.dev.features() & bit(VIRTIO_BLK_F_RO), 0);
    }
}
