//! One submission / completion queue pair (NVMe Base 2.0, 3.3.1 and 4.1), owned by one thread.
//!
//! - **Rings** in DMA memory, page aligned, read and written with env's volatile copy
//!   accessors. The CQ is zeroed when (re)created, so the first pass posts phase 1.
//! - **Request pool**: `depth` fixed slots of 32 bytes, the command id *is* the slot index, so
//!   a completion finds its request in O(1) and nothing is allocated per I/O (STYLE #5); the
//!   free list runs through the slots themselves. Each slot owns `list_pages` preallocated
//!   PRP / SGL list pages.
//! - **Software queue**: when the SQ is full (it holds `entries - 1` commands) a request
//!   waits, already built, in a FIFO of (slot id, command) sized to `depth` up front: it never
//!   grows and never fails (STYLE #7).
//! - **Submit fast path**: a read or write of one iovec in the region the pair last translated,
//!   within two pages, is checked with a handful of compares (block count and MDTS in one, the
//!   namespace end, SQ room from a counter refreshed per completion batch, one load of the
//!   controller's usable epoch for reset / failure / disconnection, a free slot) and written
//!   as eight words inline in the caller; anything else takes the general path, which reports
//!   each failed check.
//! - **Doorbells**: submits only write entries; [`QueuePair::process_completions`] rings the
//!   SQ tail doorbell once for everything submitted since the last call, reaps up to `max`
//!   completions and rings the CQ head doorbell once for the batch (STYLE #13).
//! - **Shadow doorbells** (Doorbell Buffer Config, NVMe Base 2.0, 5.8; OACS bit 8), when the
//!   controller configured them: a new SQ tail / CQ head goes into the pair's slot of the
//!   shared shadow page, then (after a full fence) the pair reads the controller's EventIdx
//!   slot and writes the MMIO doorbell only when the move passed it ([`spec::need_event`]).
//!   The admin queue writes both, always (QEMU copies admin MMIO doorbells into the shadow
//!   itself: drivers, Linux's included, leave the admin slots alone). With shadow doorbells a
//!   pair keeps at most `entries - 1` commands outstanding, so its CQ can never fill: a
//!   skipped CQ head doorbell can then never leave the controller waiting for room.
//! - **Validation**: every CQE is checked before it is trusted: command id in range and
//!   outstanding, SQ id, SQ head inside the submitted range (4.6.1), merged into one branch for
//!   the common case (SQ id and SQ head bound in one compare on DW2). A broken entry is
//!   consumed and reported as [`NvmeError::BadCompletion`] naming the check it failed; the
//!   controller is asked to reset.
//! - **Timeouts**: checked from idle polls, rate limited; a command outstanding longer than
//!   the timeout is reported to the controller for an Abort; if it is still outstanding one
//!   timeout later the controller is asked to reset.
//! - **Reset / failure**: the controller bumps a generation (after disabling the device, so
//!   no more DMA can land) or marks itself failed; the next poll completes every outstanding
//!   and queued request with *Command Aborted due to SQ Deletion* (DNR clear after a reset,
//!   set when the controller failed or was removed) and the pair is disconnected until
//!   [`Controller::reconnect_io_qpair`](crate::Controller::reconnect_io_qpair). Requests are
//!   failed back to the caller, not resubmitted: the caller (the bdev layer) decides.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pollux_env::dma::{DmaBuffer, DmaMemory};
use pollux_env::memmap::TranslationCache;

use crate::ctrlr::Namespace;
use crate::error::NvmeError;
use crate::prp::{self, IoVec, ListArea};
use crate::regs::Registers;
use crate::spec::{self, opc, Command, Completion, Psdt, Status, CQE_BYTES, SQE_BYTES};

/// The phase tag in a CQE's DW3.
const PHASE_BIT: u32 = 1 << 16;

/// A busy queue pair checks timeouts once per this many polls.
const TIMEOUT_CHECK_POLLS: u32 = 256;

pub(crate) const STATE_RUNNING: u8 = 0;
pub(crate) const STATE_RESETTING: u8 = 1;
pub(crate) const STATE_FAILED: u8 = 2;

/// State the controller shares with its queue pairs (which live on other threads).
#[derive(Debug)]
pub(crate) struct Shared {
    /// Bumped by every reset, after the controller was disabled.
    pub generation: AtomicU64,
    /// [`usable_epoch`] of the generation, with bit 0 set once the controller failed: what the
    /// submit path compares with one load (a pair may submit only while it equals the pair's
    /// own [`usable_epoch`]). Written right after `generation` and `state` change.
    pub usable_epoch: AtomicU64,
    pub state: AtomicU8,
    /// Set by a queue pair that saw a broken completion or a command that ignored its abort.
    pub needs_reset: AtomicBool,
    /// (qid, cid) of timed-out commands for which the controller should send an Abort.
    pub abort_requests: Mutex<Vec<(u16, u16)>>,
    /// Rings of queue pairs dropped without being freed: deleted on the controller, then dropped.
    pub orphans: Mutex<Vec<Rings>>,
    pub page_size_bytes: u64,
    pub doorbell_stride_bytes: u64,
    /// The Shadow Doorbell and EventIdx pages, once allocated. Every queue pair writes its own
    /// slots; a lock because env's `DmaBuffer` hands out no shared sub-slices (its writes need
    /// `&mut`). Taken once per doorbell batch, never per I/O; the pages themselves are shared
    /// by every queue (4-byte slots) whatever the locking, as the spec lays them out.
    pub shadow: Mutex<Option<ShadowPages>>,
    /// Doorbell Buffer Config succeeded in the current generation (cleared by a reset).
    pub shadow_enabled: AtomicBool,
}

/// One page of shadow doorbells and one of EventIdx values (Doorbell Buffer Config PRP1 and
/// PRP2).
#[derive(Debug)]
pub(crate) struct ShadowPages {
    pub doorbells: DmaBuffer,
    pub event_idx: DmaBuffer,
}

/// A generation's usable epoch: the generation shifted past the failed bit (bit 0).
#[inline(always)]
pub(crate) fn usable_epoch(generation: u64) -> u64 {
    generation << 1
}

/// The epoch a disconnected pair expects: odd, so never a running controller's, and above any
/// failed one's (a generation would need 2^63 - 1 resets to reach it).
const DISCONNECTED_EPOCH: u64 = u64::MAX;

impl Shared {
    /// Marks the controller failed: its state, then the failed bit of the usable epoch.
    pub fn mark_failed(&self) {
        self.state.store(STATE_FAILED, Ordering::Release);
        self.usable_epoch.fetch_or(1, Ordering::AcqRel);
    }

    pub fn lock_aborts(&self) -> std::sync::MutexGuard<'_, Vec<(u16, u16)>> {
        self.abort_requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn lock_orphans(&self) -> std::sync::MutexGuard<'_, Vec<Rings>> {
        self.orphans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn lock_shadow(&self) -> std::sync::MutexGuard<'_, Option<ShadowPages>> {
        self.shadow
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `new` into the shadow doorbell at `offset`, then reads the EventIdx beside it:
    /// whether the MMIO doorbell is needed for the move from `old` (true when the pages are
    /// gone, to stay safe).
    fn shadow_update(
        &self,
        offset: usize,
        new: u16,
        old: u16,
        entries: u16,
    ) -> Result<bool, NvmeError> {
        let mut guard = self.lock_shadow();
        let Some(pages) = guard.as_mut() else {
            return Ok(true);
        };
        pages
            .doorbells
            .write_at(offset, &u32::from(new).to_le_bytes())
            .map_err(NvmeError::dma("shadow doorbell"))?;
        // The controller must see the new value before we read its EventIdx (it writes
        // EventIdx, then re-reads the shadow value): store then load, which only a full fence
        // orders. Without it we could read a stale EventIdx, skip the MMIO write and leave the
        // controller asleep with work in the queue.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut raw = [0u8; 4];
        pages
            .event_idx
            .read_at(offset, &mut raw)
            .map_err(NvmeError::dma("EventIdx"))?;
        Ok(spec::need_event(u32::from_le_bytes(raw), new, old, entries))
    }

    /// Zeroes queue `qid`'s shadow and EventIdx slots (a new queue starts at 0, and the
    /// controller may read the slot as soon as the queue exists).
    fn clear_shadow_slots(&self, qid: u16) -> Result<(), NvmeError> {
        let mut guard = self.lock_shadow();
        let Some(pages) = guard.as_mut() else {
            return Ok(());
        };
        let offset = spec::shadow_sq_tail_offset(qid, self.doorbell_stride_bytes) as usize;
        let len = 2 * self.doorbell_stride_bytes as usize;
        pages
            .doorbells
            .fill(offset, len, 0)
            .map_err(NvmeError::dma("shadow doorbell"))?;
        pages
            .event_idx
            .fill(offset, len, 0)
            .map_err(NvmeError::dma("EventIdx"))
    }
}

/// The DMA memory of one queue pair.
#[derive(Debug)]
pub(crate) struct Rings {
    pub qid: u16,
    pub sq: DmaBuffer,
    pub cq: DmaBuffer,
    pub lists: DmaBuffer,
    /// `bounce_buffers` buffers of `bounce_buffer_bytes` (see [`QueuePairOptions`]).
    pub bounce: DmaBuffer,
}

/// How to build a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePairOptions {
    /// Ring entries (the SQ holds `entries - 1` commands). Clamped to CAP.MQES + 1.
    pub entries: u16,
    /// Request slots (commands in flight or waiting in the software queue). At most 65535.
    pub depth: u16,
    /// PRP / SGL list pages per request: one page covers 2 MiB of PRP entries (4 KiB pages).
    pub list_pages: u16,
    /// Per-command timeout (abort after one, reset after two); `None` disables it.
    pub timeout: Option<Duration>,
    /// Bounce buffers, for the rare request whose iovecs fit neither PRPs nor (on a
    /// controller without them) SGLs, or lie outside registered memory: its data is copied
    /// through one of these (counted in [`QpairStats::bounced`]). 0 refuses such requests.
    pub bounce_buffers: u16,
    /// Bytes of each bounce buffer: a bounced request may be at most this long.
    pub bounce_buffer_bytes: u32,
}

impl Default for QueuePairOptions {
    fn default() -> Self {
        Self {
            entries: 256,
            depth: 256,
            list_pages: 1,
            timeout: Some(Duration::from_secs(30)),
            bounce_buffers: 2,
            bounce_buffer_bytes: 128 * 1024,
        }
    }
}

/// Counters of one queue pair.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QpairStats {
    /// Requests accepted (completed, failed back, or in flight).
    pub submitted: u64,
    pub completed: u64,
    /// Requests that waited in the software queue because the SQ was full.
    pub queued_sq_full: u64,
    /// MMIO SQ tail doorbell writes.
    pub sq_doorbells: u64,
    /// MMIO CQ head doorbell writes.
    pub cq_doorbells: u64,
    /// SQ tails written to the shadow doorbell buffer (each may or may not ring MMIO).
    pub sq_shadow_updates: u64,
    /// CQ heads written to the shadow doorbell buffer.
    pub cq_shadow_updates: u64,
    pub prp_lists: u64,
    pub sgls: u64,
    /// Requests whose data went through a bounce buffer (one copy) instead of zero copy.
    pub bounced: u64,
    pub bad_completions: u64,
    pub timeouts: u64,
    /// Requests failed back by a reset or a failed controller.
    pub failed_by_reset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Built, waiting in the software queue for room in the SQ.
    Queued,
    /// In the SQ: the controller may be working on it; zero copy.
    Outstanding,
    /// In the SQ, holding a bounce buffer (copied back and released at completion). A state
    /// of its own so that completing a zero-copy request tests one field, not two.
    OutstandingBounced,
}

impl SlotState {
    fn is_outstanding(self) -> bool {
        matches!(self, SlotState::Outstanding | SlotState::OutstandingBounced)
    }
}

/// One request (32 bytes: two to a cache line). The built command of a request that waits
/// for SQ room is kept in the software queue, not here: an entry that goes straight into the
/// SQ is encoded there and never copied.
#[derive(Debug, Clone, Copy)]
struct Slot {
    tag: u64,
    /// When a timeout check first saw this command outstanding.
    seen_at: Option<Instant>,
    state: SlotState,
    /// For timeout reports (the command id is the slot index).
    opcode: u8,
    abort_requested: bool,
    /// Exempt from timeouts (the admin queue's Asynchronous Event Request).
    no_timeout: bool,
    /// The bounce buffer this request holds, or [`NO_BOUNCE`].
    bounce: u16,
    /// While free: the next free slot, or [`NO_SLOT`] (the free list runs through the slots,
    /// so taking and giving back a slot touches no other array).
    next_free: u16,
}

/// [`Slot::bounce`] of a request that transfers zero copy.
const NO_BOUNCE: u16 = u16::MAX;
/// The end of the free list. Never a slot index (at most 65534 slots), so the bounds check of
/// the slot lookup also tells that no slot is free.
const NO_SLOT: u16 = u16::MAX;
/// The most iovecs a bounced request may have (their list is kept for the copy back).
const BOUNCE_IOVS_MAX: usize = 256;

/// One bounce buffer's request: where the data goes back to, and whether it does.
#[derive(Debug)]
struct BounceUse {
    /// Copy the buffer into `iovs` when the command succeeds (controller-to-host data).
    copy_back: bool,
    /// Capacity [`BOUNCE_IOVS_MAX`], reserved up front: refilled without allocating.
    iovs: Vec<IoVec>,
}

const EMPTY_SLOT: Slot = Slot {
    tag: 0,
    seen_at: None,
    state: SlotState::Free,
    opcode: 0,
    abort_requested: false,
    no_timeout: false,
    bounce: NO_BOUNCE,
    next_free: NO_SLOT,
};

/// The status a request gets when its queue pair is torn down under it.
fn teardown_status(failed: bool) -> Status {
    Status::generic(spec::sc::ABORTED_SQ_DELETION).with_dnr(failed)
}

/// One thread's submission / completion queue pair. See the module documentation.
pub struct QueuePair<R: Registers> {
    regs: Arc<R>,
    shared: Arc<Shared>,
    dma: Arc<DmaMemory>,
    qid: u16,
    /// The controller generation this pair's queues were created in.
    generation: u64,
    /// `usable_epoch(generation)` while connected, [`DISCONNECTED_EPOCH`] when not: submits
    /// compare it with [`Shared::usable_epoch`], one load for disconnected, reset and failed.
    epoch: u64,
    disconnected: bool,
    /// `None` only while being dropped or after being freed.
    rings: Option<Rings>,
    sq_iova: u64,
    cq_iova: u64,
    lists_iova: u64,
    entries: u16,
    sq_tail: u16,
    /// Oldest SQ entry the controller may not have fetched yet (from CQE.sq_head).
    sq_head: u16,
    /// Commands the SQ takes before it is full (see [`refresh_sq_room`](Self::refresh_sq_room)):
    /// decremented per entry written, recomputed once per completion batch.
    sq_room: u16,
    cq_head: u16,
    /// The phase tag the next new CQE carries, where it sits in DW3 (bit 16): 0 or 1 << 16.
    phase_bit: u32,
    /// `qid << 16`: a valid CQE's DW2 (SQ head | SQ id << 16) less this is its SQ head.
    sq_id_bits: u32,
    sq_doorbell: u64,
    cq_doorbell: u64,
    /// Shadow doorbells are configured for this pair's generation.
    shadow: bool,
    /// SQ tail / CQ head last published (shadow or MMIO): the `old` of [`spec::need_event`].
    sq_tail_published: u16,
    cq_head_published: u16,
    slots: Vec<Slot>,
    /// First free slot, or [`NO_SLOT`].
    free_head: u16,
    /// Requests waiting for SQ room, oldest first, with their built commands (capacity
    /// `depth`, reserved up front).
    waiting: VecDeque<(u16, Command)>,
    /// The controller's memory page size (a copy of `shared.page_size_bytes`, one load less).
    page_size_bytes: u64,
    list_pages: usize,
    sgl_supported: bool,
    /// The region this pair's buffers were last found in (see `MemMap::translate_cached`).
    translation_cache: TranslationCache,
    bounce_iova: u64,
    bounce_buffer_bytes: usize,
    bounce_free: Vec<u16>,
    bounce_uses: Vec<BounceUse>,
    timeout: Option<Duration>,
    last_timeout_check: Option<Instant>,
    outstanding: u16,
    polls: u32,
    stats: QpairStats,
}

impl<R: Registers> std::fmt::Debug for QueuePair<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qid", &self.qid)
            .field("entries", &self.entries)
            .field("depth", &self.slots.len())
            .field("outstanding", &self.outstanding)
            .field("waiting", &self.waiting.len())
            .field("disconnected", &self.disconnected)
            .finish()
    }
}

impl<R: Registers> QueuePair<R> {
    /// Allocates the rings and the request pool. The queues are not created on the device.
    pub(crate) fn new(
        regs: Arc<R>,
        shared: Arc<Shared>,
        dma: Arc<DmaMemory>,
        qid: u16,
        options: &QueuePairOptions,
        sgl_supported: bool,
    ) -> Result<Self, NvmeError> {
        if options.entries < 2 || options.depth == 0 || options.depth == u16::MAX {
            return Err(NvmeError::InvalidRequest {
                reason: "queue pair needs at least 2 entries and 1..65535 request slots",
            });
        }
        let page = shared.page_size_bytes as usize;
        let entries = usize::from(options.entries);
        let sq = dma
            .alloc(entries * SQE_BYTES, page, None)
            .map_err(NvmeError::dma("submission queue"))?;
        let cq = dma
            .alloc(entries * CQE_BYTES, page, None)
            .map_err(NvmeError::dma("completion queue"))?;
        let list_pages = usize::from(options.list_pages.max(1));
        let lists = dma
            .alloc(usize::from(options.depth) * list_pages * page, page, None)
            .map_err(NvmeError::dma("PRP lists"))?;
        if options.bounce_buffers == NO_BOUNCE {
            return Err(NvmeError::InvalidRequest {
                reason: "at most 65534 bounce buffers",
            });
        }
        let bounce_buffer_bytes = (options.bounce_buffer_bytes as usize).next_multiple_of(page);
        let bounce = dma
            .alloc(
                (usize::from(options.bounce_buffers) * bounce_buffer_bytes).max(page),
                page,
                None,
            )
            .map_err(NvmeError::dma("bounce buffers"))?;
        let stride = shared.doorbell_stride_bytes;
        let generation = shared.generation.load(Ordering::Acquire);
        let mut qpair = Self {
            regs,
            shared,
            dma,
            qid,
            generation,
            epoch: usable_epoch(generation),
            disconnected: false,
            rings: Some(Rings {
                qid,
                sq,
                cq,
                lists,
                bounce,
            }),
            sq_iova: 0,
            cq_iova: 0,
            lists_iova: 0,
            entries: options.entries,
            sq_tail: 0,
            sq_head: 0,
            sq_room: 0,
            cq_head: 0,
            phase_bit: PHASE_BIT,
            sq_id_bits: u32::from(qid) << 16,
            sq_doorbell: spec::sq_tail_doorbell(qid, stride),
            cq_doorbell: spec::cq_head_doorbell(qid, stride),
            shadow: false,
            sq_tail_published: 0,
            cq_head_published: 0,
            slots: (0..options.depth)
                .map(|cid| Slot {
                    next_free: if cid + 1 == options.depth {
                        NO_SLOT
                    } else {
                        cid + 1
                    },
                    ..EMPTY_SLOT
                })
                .collect(),
            free_head: 0,
            waiting: VecDeque::with_capacity(usize::from(options.depth)),
            page_size_bytes: page as u64,
            list_pages,
            sgl_supported,
            translation_cache: TranslationCache::default(),
            bounce_iova: 0,
            bounce_buffer_bytes,
            bounce_free: (0..options.bounce_buffers).rev().collect(),
            bounce_uses: (0..options.bounce_buffers)
                .map(|_| BounceUse {
                    copy_back: false,
                    iovs: Vec::with_capacity(BOUNCE_IOVS_MAX),
                })
                .collect(),
            timeout: options.timeout,
            last_timeout_check: None,
            outstanding: 0,
            polls: 0,
            stats: QpairStats::default(),
        };
        qpair.reset_rings()?;
        Ok(qpair)
    }

    /// Zeroes the CQ, rewinds every index and refreshes the IOVAs (a mapper may have been
    /// attached since). Only when no request is outstanding.
    pub(crate) fn reset_rings(&mut self) -> Result<(), NvmeError> {
        let Some(rings) = self.rings.as_mut() else {
            return Err(NvmeError::Disconnected { qid: self.qid });
        };
        let cq_len = rings.cq.len();
        rings
            .cq
            .fill(0, cq_len, 0)
            .map_err(NvmeError::dma("completion queue"))?;
        self.sq_iova = rings
            .sq
            .iova()
            .map_err(NvmeError::dma("submission queue"))?;
        self.cq_iova = rings
            .cq
            .iova()
            .map_err(NvmeError::dma("completion queue"))?;
        self.lists_iova = rings.lists.iova().map_err(NvmeError::dma("PRP lists"))?;
        self.bounce_iova = rings
            .bounce
            .iova()
            .map_err(NvmeError::dma("bounce buffers"))?;
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase_bit = PHASE_BIT;
        self.sq_tail_published = 0;
        self.cq_head_published = 0;
        self.generation = self.shared.generation.load(Ordering::Acquire);
        self.shadow = self.shared.shadow_enabled.load(Ordering::Acquire);
        self.refresh_sq_room();
        if self.shadow {
            self.shared.clear_shadow_slots(self.qid)?;
        }
        self.disconnected = false;
        self.epoch = usable_epoch(self.generation);
        self.last_timeout_check = None;
        Ok(())
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn entries(&self) -> u16 {
        self.entries
    }

    pub fn depth(&self) -> u16 {
        self.slots.len() as u16
    }

    pub(crate) fn sq_iova(&self) -> u64 {
        self.sq_iova
    }

    pub(crate) fn cq_iova(&self) -> u64 {
        self.cq_iova
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Starts using the shadow doorbells just configured (the admin queue, whose queues
    /// already exist: the controller copied their current tail and head into the page).
    pub(crate) fn enable_shadow(&mut self) {
        self.shadow = self.shared.shadow_enabled.load(Ordering::Acquire);
        self.refresh_sq_room();
        self.sq_tail_published = self.sq_tail;
        self.cq_head_published = self.cq_head;
    }

    /// Whether this pair publishes its doorbells through the shadow buffer.
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.shadow
    }

    /// Requests submitted and not yet handed back (in the SQ or waiting for room).
    pub fn in_flight(&self) -> usize {
        usize::from(self.outstanding) + self.waiting.len()
    }

    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    pub fn stats(&self) -> QpairStats {
        // Every request accepted is completed, failed back or still in flight: counted here,
        // not per submit.
        QpairStats {
            submitted: self.stats.completed + self.stats.failed_by_reset + self.in_flight() as u64,
            ..self.stats
        }
    }

    /// Reads `nblocks` blocks at `lba` of `ns` into `iovs`; the completion comes back with `tag`.
    #[inline]
    pub fn submit_read(
        &mut self,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
        iovs: &[IoVec],
    ) -> Result<(), NvmeError> {
        self.submit_rw(opc::READ, ns, tag, lba, nblocks, iovs)
    }

    /// Writes `nblocks` blocks at `lba` of `ns` from `iovs`.
    #[inline]
    pub fn submit_write(
        &mut self,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
        iovs: &[IoVec],
    ) -> Result<(), NvmeError> {
        self.submit_rw(opc::WRITE, ns, tag, lba, nblocks, iovs)
    }

    pub fn submit_flush(&mut self, ns: &Namespace, tag: u64) -> Result<(), NvmeError> {
        let mut command = Command::new(opc::FLUSH);
        command.nsid = ns.nsid();
        self.submit_command(tag, command, &[], 0)
    }

    /// Write Zeroes over `nblocks` (at most 65536) blocks at `lba`.
    pub fn submit_write_zeroes(
        &mut self,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
    ) -> Result<(), NvmeError> {
        let command = lba_command(opc::WRITE_ZEROES, ns, lba, nblocks)?;
        self.submit_command(tag, command, &[], 0)
    }

    /// Dataset Management, deallocate (trim) `nblocks` at `lba` (one range).
    pub fn submit_deallocate(
        &mut self,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
    ) -> Result<(), NvmeError> {
        check_range(ns, lba, u64::from(nblocks))?;
        let mut command = Command::new(opc::DATASET_MANAGEMENT);
        command.nsid = ns.nsid();
        command.cdw10 = 0; // one range (0's based)
        command.cdw11 = 1 << 2; // AD: deallocate
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&nblocks.to_le_bytes());
        range[8..16].copy_from_slice(&lba.to_le_bytes());
        self.submit_with_inline_data(tag, command, &range)
    }

    /// Any command (passthrough): the driver fills in the command id and the data pointer
    /// (from `iovs`, `len_bytes` in all; none when empty).
    pub fn submit_raw(
        &mut self,
        tag: u64,
        command: Command,
        iovs: &[IoVec],
        len_bytes: u64,
    ) -> Result<(), NvmeError> {
        self.submit_command(tag, command, iovs, len_bytes)
    }

    /// A read or write: the common case inline (see [`try_submit_rw`](Self::try_submit_rw)),
    /// anything else through the general path, which checks and reports each case.
    #[inline(always)]
    fn submit_rw(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
        iovs: &[IoVec],
    ) -> Result<(), NvmeError> {
        if let [iov] = iovs {
            if self.try_submit_rw(opcode, ns, tag, lba, nblocks, iov) {
                return Ok(());
            }
        }
        self.submit_rw_general(opcode, ns, tag, lba, nblocks, iovs)
    }

    /// The I/O path's common case, with as few branches as the checks allow: a valid range
    /// (block count, MDTS and namespace end), one iovec covering the transfer in the region
    /// this pair last translated, PRP-friendly, room in the SQ, a usable pair, a free slot.
    /// The SQE is written as eight words straight from the arguments. Returns false, having
    /// changed nothing, when any of it does not hold.
    #[inline(always)]
    fn try_submit_rw(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
        iov: &IoVec,
    ) -> bool {
        // 1..=max blocks in one compare (0 wraps to u32::MAX); the namespace end with the
        // overflow folded into the compare (a wrapped end is below `lba`).
        let end = lba.wrapping_add(u64::from(nblocks));
        if nblocks.wrapping_sub(1) >= ns.max_blocks_per_command()
            || end > ns.num_blocks()
            || end < lba
            || iov.len_bytes() as u64 != u64::from(nblocks) * u64::from(ns.block_size_bytes())
            || !self.sq_has_room()
            || self.shared.usable_epoch.load(Ordering::Acquire) != self.epoch
        {
            return false;
        }
        // Requests wait only while the SQ is full, and only a completion batch makes room (it
        // moves the waiting ones in first): room means nobody waits, so a new request cannot
        // overtake one.
        debug_assert!(self.waiting.is_empty());
        let Some(pointer) = prp::single_iovec_prp(
            self.dma.memmap(),
            &mut self.translation_cache,
            iov,
            self.page_size_bytes,
        ) else {
            return false;
        };
        // An empty free list is NO_SLOT, out of bounds: one check for both.
        let cid = self.free_head;
        let Some(slot) = self.slots.get_mut(usize::from(cid)) else {
            return false;
        };
        let Some(rings) = self.rings.as_mut() else {
            return false;
        };
        let [prp1, prp2] = pointer;
        let words = [
            u64::from(opcode) | (u64::from(cid) << 16) | (u64::from(ns.nsid()) << 32),
            0,
            0,
            prp1,
            prp2,
            lba,
            u64::from(nblocks - 1), // NLB is 0's based
            0,
        ];
        // `map_err(drop)`: the error is dropped on its own path, not the whole `Result` (an
        // out-of-line drop call) on every submit.
        if rings
            .sq
            .write_u64s_at(usize::from(self.sq_tail) * SQE_BYTES, &words)
            .map_err(drop)
            .is_err()
        {
            return false;
        }
        self.free_head = slot.next_free;
        slot.tag = tag;
        slot.seen_at = None;
        slot.state = SlotState::Outstanding;
        slot.opcode = opcode;
        slot.abort_requested = false;
        slot.no_timeout = false;
        self.outstanding += 1;
        self.sq_room -= 1;
        self.sq_tail = self.next_index(self.sq_tail);
        true
    }

    /// Reads and writes the fast path turned down: each check again, with its error.
    #[cold]
    #[inline(never)]
    fn submit_rw_general(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        tag: u64,
        lba: u64,
        nblocks: u32,
        iovs: &[IoVec],
    ) -> Result<(), NvmeError> {
        let len_bytes = u64::from(nblocks) * u64::from(ns.block_size_bytes());
        let command = lba_command(opcode, ns, lba, nblocks)?;
        if len_bytes > ns.max_transfer_bytes() {
            return Err(NvmeError::InvalidRequest {
                reason: "transfer larger than the controller's MDTS",
            });
        }
        self.submit_command(tag, command, iovs, len_bytes)
    }

    fn check_usable(&mut self) -> Result<(), NvmeError> {
        if self.shared.usable_epoch.load(Ordering::Acquire) != self.epoch {
            return Err(NvmeError::Disconnected { qid: self.qid });
        }
        Ok(())
    }

    /// Takes the first free slot.
    fn take_slot(&mut self) -> Result<u16, NvmeError> {
        let cid = self.free_head;
        let Some(slot) = self.slots.get_mut(usize::from(cid)) else {
            return Err(NvmeError::NoFreeSlot {
                qid: self.qid,
                depth: self.slots.len() as u16,
            });
        };
        self.free_head = slot.next_free;
        Ok(cid)
    }

    /// Puts a slot back on the free list (its state must already be `Free`).
    #[inline(always)]
    fn give_back_slot(&mut self, cid: u16) {
        self.slots[usize::from(cid)].next_free = self.free_head;
        self.free_head = cid;
    }

    fn submit_command(
        &mut self,
        tag: u64,
        mut command: Command,
        iovs: &[IoVec],
        len_bytes: u64,
    ) -> Result<(), NvmeError> {
        self.check_usable()?;
        let cid = self.take_slot()?;
        if !iovs.is_empty() || len_bytes != 0 {
            let built = match self.build_data_pointer(cid, iovs, len_bytes) {
                Err(NvmeError::NotPrpCompatible { reason }) => {
                    self.bounce(cid, command.opcode, iovs, len_bytes, reason)
                }
                Err(NvmeError::Translation { .. }) => self.bounce(
                    cid,
                    command.opcode,
                    iovs,
                    len_bytes,
                    "memory not registered",
                ),
                built => built,
            };
            match built {
                Ok(pointer) => {
                    command.psdt = if pointer.is_sgl() {
                        Psdt::SglMptrAddress
                    } else {
                        Psdt::Prp
                    };
                    command.dptr = pointer.dptr();
                }
                Err(error) => {
                    self.release_bounce(cid);
                    self.give_back_slot(cid);
                    return Err(error);
                }
            }
        }
        self.enqueue(cid, tag, command, false)
    }

    /// A command whose small payload (DSM ranges) is copied into the slot's list page.
    fn submit_with_inline_data(
        &mut self,
        tag: u64,
        mut command: Command,
        data: &[u8],
    ) -> Result<(), NvmeError> {
        self.check_usable()?;
        let cid = self.take_slot()?;
        let page = self.shared.page_size_bytes as usize;
        let offset = usize::from(cid) * self.list_pages * page;
        let written = match self.rings.as_mut() {
            Some(rings) => rings
                .lists
                .write_at(offset, data)
                .map_err(NvmeError::dma("inline data")),
            None => Err(NvmeError::Disconnected { qid: self.qid }),
        };
        if let Err(error) = written {
            self.give_back_slot(cid);
            return Err(error);
        }
        command.dptr = [self.lists_iova + offset as u64, 0];
        self.enqueue(cid, tag, command, false)
    }

    fn build_data_pointer(
        &mut self,
        cid: u16,
        iovs: &[IoVec],
        len_bytes: u64,
    ) -> Result<prp::DataPointer, NvmeError> {
        let page = self.shared.page_size_bytes;
        let offset = usize::from(cid) * self.list_pages * page as usize;
        let Some(rings) = self.rings.as_mut() else {
            return Err(NvmeError::Disconnected { qid: self.qid });
        };
        let mut area = ListArea {
            buffer: &mut rings.lists,
            offset,
            iova: self.lists_iova + offset as u64,
            pages: self.list_pages,
            page_size_bytes: page,
        };
        let pointer = prp::build_cached(
            self.dma.memmap(),
            &mut self.translation_cache,
            iovs,
            len_bytes,
            self.sgl_supported,
            &mut area,
        )?;
        match pointer {
            prp::DataPointer::Sgl(_) => self.stats.sgls += 1,
            prp::DataPointer::Prp { prp2, .. } if prp2 == area.iova => self.stats.prp_lists += 1,
            prp::DataPointer::Prp { .. } => {}
        }
        Ok(pointer)
    }

    /// Copies the data of a request that cannot go zero copy through a bounce buffer: in now
    /// for host-to-controller data, back at completion for controller-to-host data (the
    /// opcode's direction bits, NVMe Base 2.0 figure 89). `reason` says why zero copy failed.
    fn bounce(
        &mut self,
        cid: u16,
        opcode: u8,
        iovs: &[IoVec],
        len_bytes: u64,
        reason: &'static str,
    ) -> Result<prp::DataPointer, NvmeError> {
        let refuse = |detail: &'static str| {
            tracing::debug!(
                reason,
                detail,
                "nvme: request can be neither zero copy nor bounced"
            );
            NvmeError::NotPrpCompatible { reason }
        };
        if len_bytes > self.bounce_buffer_bytes as u64 || iovs.len() > BOUNCE_IOVS_MAX {
            return Err(refuse("larger than a bounce buffer"));
        }
        let Some(&index) = self.bounce_free.last() else {
            return Err(refuse("every bounce buffer is in use"));
        };
        let Some(rings) = self.rings.as_mut() else {
            return Err(NvmeError::Disconnected { qid: self.qid });
        };
        let base = usize::from(index) * self.bounce_buffer_bytes;
        let host_to_controller = opcode & 1 != 0;
        if host_to_controller {
            let mut offset = base;
            for iov in iovs {
                // SAFETY: `IoVec::new`'s contract: the range is valid, mapped and touched by
                // nobody else until this command completes, so reading it here is sound; it
                // is copied into DMA memory through env's volatile accessor.
                let source =
                    unsafe { std::slice::from_raw_parts(iov.addr() as *const u8, iov.len_bytes()) };
                rings
                    .bounce
                    .write_at(offset, source)
                    .map_err(NvmeError::dma("bounce buffer"))?;
                offset += iov.len_bytes();
            }
        }
        self.bounce_free.pop();
        let bounce_use = &mut self.bounce_uses[usize::from(index)];
        bounce_use.copy_back = opcode & 2 != 0;
        bounce_use.iovs.clear();
        bounce_use.iovs.extend_from_slice(iovs);
        self.slots[usize::from(cid)].bounce = index;
        self.stats.bounced += 1;
        let iova = self.bounce_iova + base as u64;
        let page = self.shared.page_size_bytes;
        // One contiguous, page-aligned range: PRP1, plus PRP2 or the slot's list page.
        let Some(rings) = self.rings.as_mut() else {
            return Err(NvmeError::Disconnected { qid: self.qid });
        };
        let list_offset = usize::from(cid) * self.list_pages * page as usize;
        let pages = len_bytes.div_ceil(page);
        let pointer = match pages {
            1 => prp::DataPointer::Prp {
                prp1: iova,
                prp2: 0,
            },
            2 => prp::DataPointer::Prp {
                prp1: iova,
                prp2: iova + page,
            },
            _ => {
                let entries = (pages - 1) as usize;
                if entries > self.list_pages * (page as usize / 8 - 1) {
                    self.release_bounce(cid);
                    return Err(refuse("more pages than the list area holds"));
                }
                let mut words = [0u64; 1];
                for entry in 0..entries {
                    // Chained list pages: a page's last slot points to the next page.
                    let per_page = page as usize / 8;
                    let (list_page, slot) = (entry / (per_page - 1), entry % (per_page - 1));
                    if slot == 0 && list_page > 0 {
                        words[0] = self.lists_iova + (list_offset as u64) + list_page as u64 * page;
                        rings
                            .lists
                            .write_u64s_at(list_offset + (list_page * per_page - 1) * 8, &words)
                            .map_err(NvmeError::dma("PRP list"))?;
                    }
                    words[0] = iova + (entry as u64 + 1) * page;
                    rings
                        .lists
                        .write_u64s_at(list_offset + (list_page * per_page + slot) * 8, &words)
                        .map_err(NvmeError::dma("PRP list"))?;
                }
                prp::DataPointer::Prp {
                    prp1: iova,
                    prp2: self.lists_iova + list_offset as u64,
                }
            }
        };
        Ok(pointer)
    }

    fn release_bounce(&mut self, cid: u16) {
        let slot = &mut self.slots[usize::from(cid)];
        if slot.bounce != NO_BOUNCE {
            self.bounce_free.push(slot.bounce);
            slot.bounce = NO_BOUNCE;
        }
    }

    /// Puts a built command in the SQ, or in the software queue when the SQ is full.
    pub(crate) fn enqueue(
        &mut self,
        cid: u16,
        tag: u64,
        mut command: Command,
        no_timeout: bool,
    ) -> Result<(), NvmeError> {
        command.cid = cid;
        let slot = &mut self.slots[usize::from(cid)];
        slot.tag = tag;
        slot.opcode = command.opcode;
        slot.seen_at = None;
        slot.abort_requested = false;
        slot.no_timeout = no_timeout;
        if self.waiting.is_empty() && self.sq_has_room() {
            self.write_sqe(cid, &command)
        } else {
            self.slots[usize::from(cid)].state = SlotState::Queued;
            self.stats.queued_sq_full += 1;
            // Capacity is `depth` and every queued id is a distinct slot: never grows.
            self.waiting.push_back((cid, command));
            Ok(())
        }
    }

    /// Takes a free slot for an internal (admin) command.
    pub(crate) fn alloc_cid(&mut self) -> Result<u16, NvmeError> {
        self.check_usable()?;
        self.take_slot()
    }

    /// The ring index after `index` (a compare, not a division, on the hot path).
    #[inline(always)]
    fn next_index(&self, index: u16) -> u16 {
        if index + 1 == self.entries {
            0
        } else {
            index + 1
        }
    }

    #[inline(always)]
    fn sq_has_room(&self) -> bool {
        self.sq_room != 0
    }

    /// Recomputes `sq_room` from the ring: `entries - 1` less the entries the controller may
    /// not have fetched yet; with shadow doorbells less every outstanding command instead, so
    /// that the CQ can never fill (see the module documentation; outstanding commands include
    /// the unfetched ones, so this is the smaller).
    fn refresh_sq_room(&mut self) {
        let used = if self.shadow {
            u32::from(self.outstanding)
        } else {
            ring_distance(self.sq_head, self.sq_tail, self.entries)
        };
        self.sq_room = (u32::from(self.entries) - 1).saturating_sub(used) as u16;
    }

    /// Encodes `command` straight into the SQ tail slot: one bounds check, eight 64-bit
    /// volatile stores.
    fn write_sqe(&mut self, cid: u16, command: &Command) -> Result<(), NvmeError> {
        let Some(rings) = self.rings.as_mut() else {
            return Err(NvmeError::Disconnected { qid: self.qid });
        };
        rings
            .sq
            .write_u64s_at(
                usize::from(self.sq_tail) * SQE_BYTES,
                &command.encode_words(),
            )
            .map_err(NvmeError::dma("submission queue"))?;
        let slot = &mut self.slots[usize::from(cid)];
        slot.state = if slot.bounce == NO_BOUNCE {
            SlotState::Outstanding
        } else {
            SlotState::OutstandingBounced
        };
        self.outstanding += 1;
        self.sq_room -= 1;
        self.sq_tail = self.next_index(self.sq_tail);
        Ok(())
    }

    /// Rings the SQ tail doorbell if entries were written since the last ring (the tail moved
    /// since it was last published: between two rings at most `entries - 1` entries are
    /// written, so a moved tail never comes back to the published one). The release fence
    /// orders the entries' stores before the doorbell's (shadow or MMIO) store.
    #[inline]
    pub fn flush(&mut self) -> Result<(), NvmeError> {
        if self.sq_tail != self.sq_tail_published {
            self.ring_sq()
        } else {
            Ok(())
        }
    }

    /// [`flush`](Self::flush)'s doorbell write.
    #[inline(never)]
    fn ring_sq(&mut self) -> Result<(), NvmeError> {
        std::sync::atomic::fence(Ordering::Release);
        let tail = self.sq_tail;
        let old = std::mem::replace(&mut self.sq_tail_published, tail);
        if self.shadow {
            self.stats.sq_shadow_updates += 1;
            let offset = spec::shadow_sq_tail_offset(self.qid, self.shared.doorbell_stride_bytes);
            let needed = self
                .shared
                .shadow_update(offset as usize, tail, old, self.entries)?;
            if !needed && self.qid != 0 {
                return Ok(());
            }
        }
        self.stats.sq_doorbells += 1;
        self.regs.write32(self.sq_doorbell, u32::from(tail))
    }

    /// Publishes the CQ head: shadow slot, then MMIO when the controller asked for it.
    fn ring_cq(&mut self) -> Result<(), NvmeError> {
        let head = self.cq_head;
        let old = std::mem::replace(&mut self.cq_head_published, head);
        if self.shadow {
            self.stats.cq_shadow_updates += 1;
            let offset = spec::shadow_cq_head_offset(self.qid, self.shared.doorbell_stride_bytes);
            let needed = self
                .shared
                .shadow_update(offset as usize, head, old, self.entries)?;
            if !needed && self.qid != 0 {
                return Ok(());
            }
        }
        self.stats.cq_doorbells += 1;
        self.regs.write32(self.cq_doorbell, u32::from(head))
    }

    /// Rings the SQ doorbell, reaps up to `max` completions (one CQ doorbell for the batch),
    /// moves waiting requests into the freed SQ room, and checks timeouts when idle. Each
    /// completion is handed to `on_complete(tag, completion)`. Returns how many were handed back.
    ///
    /// After a reset or a controller failure this hands every request back with *Command
    /// Aborted due to SQ Deletion* and the pair becomes disconnected.
    pub fn process_completions<F>(&mut self, max: u32, mut on_complete: F) -> Result<u32, NvmeError>
    where
        F: FnMut(u64, &Completion),
    {
        if self.disconnected {
            return Err(NvmeError::Disconnected { qid: self.qid });
        }
        let state = self.shared.state.load(Ordering::Acquire);
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation || state == STATE_FAILED {
            return Ok(self.fail_all(state == STATE_FAILED, &mut on_complete));
        }
        self.flush()?;
        let mut broken = None;
        let reaped = self.reap(max, &mut on_complete, &mut broken);
        self.stats.completed += u64::from(reaped);
        self.refresh_sq_room();
        if reaped > 0 || broken.is_some() {
            self.ring_cq()?;
        }
        if let Some(error) = broken {
            if let NvmeError::BadCompletion { .. } = error {
                self.stats.bad_completions += 1;
                self.shared.needs_reset.store(true, Ordering::Release);
                tracing::error!(%error, "nvme: broken completion entry");
            }
            return Err(error);
        }
        if !self.waiting.is_empty() {
            while self.sq_has_room() {
                let Some((cid, command)) = self.waiting.pop_front() else {
                    break;
                };
                self.write_sqe(cid, &command)?;
            }
            self.flush()?;
        }
        // Idle polls check timeouts (rate limited inside); busy ones every 256th poll, so a
        // stuck command is found even while others keep completing.
        self.polls = self.polls.wrapping_add(1);
        if self.outstanding > 0 && (reaped == 0 || self.polls.is_multiple_of(TIMEOUT_CHECK_POLLS)) {
            self.check_timeouts();
        }
        Ok(reaped)
    }

    /// Reaps up to `max` completion entries: returns how many were handed to `on_complete`;
    /// `broken` gets the error that stopped the walk (a broken entry, consumed; or the CQ
    /// unreadable), written only then.
    ///
    /// Each entry's effect (CQ head, phase, SQ head, the slot freed) is stored in `self`
    /// before its callback runs, so a callback that unwinds leaves the pair consistent. Every
    /// entry is validated (NVMe Base 2.0, 4.6.1) before anything in it is trusted, the checks
    /// merged into one branch for the common case: the command id names an outstanding
    /// zero-copy request, the SQ id is this queue's, and the SQ head lies between the previous
    /// head and the tail.
    #[inline(always)]
    fn reap<F>(&mut self, max: u32, on_complete: &mut F, broken: &mut Option<NvmeError>) -> u32
    where
        F: FnMut(u64, &Completion),
    {
        let Some(rings) = self.rings.as_ref() else {
            *broken = Some(NvmeError::Disconnected { qid: self.qid });
            return 0;
        };
        // SQ entries submitted and not yet known fetched: how far the next SQ head may move.
        let mut unfetched = ring_distance(self.sq_head, self.sq_tail, self.entries);
        let mut budget = max;
        while budget != 0 {
            let offset = usize::from(self.cq_head) * CQE_BYTES;
            // DW2-DW3 in one aligned 64-bit load: the phase tag (DW3 bit 16) and, from the
            // same load, the command id, status, SQ id and SQ head it vouches for (a
            // controller writes an entry's dwords in order, DW3 last: when the new tag shows,
            // so does the DW2 beside it).
            let high = match rings.cq.read_u64s_at::<1>(offset + 8) {
                Ok([high]) => high,
                Err(error) => {
                    *broken = Some(NvmeError::dma("completion queue")(error));
                    break;
                }
            };
            if ((high >> 32) as u32 ^ self.phase_bit) & PHASE_BIT != 0 {
                break;
            }
            // Read the rest of the entry (and the data it announces) only after the phase.
            std::sync::atomic::fence(Ordering::Acquire);
            let low = match rings.cq.read_u64s_at::<1>(offset) {
                Ok([low]) => low,
                Err(error) => {
                    *broken = Some(NvmeError::dma("completion queue")(error));
                    break;
                }
            };
            let words = [low, high];
            let completion = Completion::from_words(words);
            // Consumed whether or not it is valid.
            let head = self.cq_head + 1;
            if head == self.entries {
                self.cq_head = 0;
                self.phase_bit ^= PHASE_BIT;
            } else {
                self.cq_head = head;
            }
            let moved = ring_distance(self.sq_head, completion.sq_head, self.entries);
            // A valid entry's DW2 (SQ head | SQ id << 16) less the queue's id so shifted is
            // its SQ head, below `entries`; another SQ id leaves 65536 or more (or wraps):
            // one compare for both.
            let queue_ok = ((words[1] as u32).wrapping_sub(self.sq_id_bits)
                < u32::from(self.entries))
                & (moved <= unfetched);
            let slot = match self.slots.get_mut(usize::from(completion.cid)) {
                Some(slot) if queue_ok && slot.state == SlotState::Outstanding => slot,
                Some(slot) if queue_ok && slot.state == SlotState::OutstandingBounced => {
                    finish_bounce(
                        slot,
                        &mut self.bounce_free,
                        &self.bounce_uses,
                        &rings.bounce,
                        self.bounce_buffer_bytes,
                        completion.status.is_success(),
                    );
                    slot
                }
                _ => {
                    *broken = Some(self.bad_completion(words));
                    break;
                }
            };
            unfetched -= moved;
            self.sq_head = completion.sq_head;
            slot.state = SlotState::Free;
            slot.next_free = self.free_head;
            self.free_head = completion.cid;
            self.outstanding -= 1;
            budget -= 1;
            on_complete(slot.tag, &completion);
        }
        max - budget
    }

    /// Names the first check a completion entry (as read, two words) failed (4.6.1).
    #[cold]
    #[inline(never)]
    fn bad_completion(&self, words: [u64; 2]) -> NvmeError {
        let completion = Completion::from_words(words);
        let reason = match self.slots.get(usize::from(completion.cid)) {
            None => "command id out of range",
            Some(slot) if !slot.state.is_outstanding() => "command id not outstanding",
            Some(_) if completion.sq_id != self.qid => "completion names another submission queue",
            Some(_) if completion.sq_head >= self.entries => "sq_head beyond the queue",
            // The new head lies between the old head and the tail (inclusive), modulo the
            // ring: whatever else failed, it was this.
            Some(_) => "sq_head outside the submitted range",
        };
        NvmeError::BadCompletion {
            qid: self.qid,
            cid: completion.cid,
            sq_head: completion.sq_head,
            sq_id: completion.sq_id,
            reason,
        }
    }

    /// Hands every request back with a teardown status; the pair is then disconnected.
    fn fail_all<F>(&mut self, controller_failed: bool, on_complete: &mut F) -> u32
    where
        F: FnMut(u64, &Completion),
    {
        self.disconnected = true;
        self.epoch = DISCONNECTED_EPOCH;
        let status = teardown_status(controller_failed);
        let mut failed = 0u32;
        self.waiting.clear();
        for cid in 0..self.slots.len() {
            if self.slots[cid].state == SlotState::Free {
                continue;
            }
            self.slots[cid].state = SlotState::Free;
            self.release_bounce(cid as u16);
            self.give_back_slot(cid as u16);
            failed += 1;
            let completion = Completion {
                dw0: 0,
                dw1: 0,
                sq_head: self.sq_head,
                sq_id: self.qid,
                cid: cid as u16,
                phase: self.phase_bit != 0,
                status,
            };
            on_complete(self.slots[cid].tag, &completion);
        }
        self.outstanding = 0;
        self.refresh_sq_room();
        self.stats.failed_by_reset += u64::from(failed);
        if failed > 0 {
            tracing::warn!(
                qid = self.qid,
                failed,
                %status,
                "nvme: requests failed back by controller reset or failure"
            );
        }
        failed
    }

    /// Drops every request without a callback (the admin queue's internal commands).
    pub(crate) fn discard_all(&mut self) {
        let mut noop = |_: u64, _: &Completion| {};
        self.fail_all(false, &mut noop);
    }

    /// Rate-limited scan for commands outstanding longer than the timeout.
    fn check_timeouts(&mut self) {
        let Some(timeout) = self.timeout else {
            return;
        };
        let now = Instant::now();
        let interval = (timeout / 4).max(Duration::from_millis(1));
        if self
            .last_timeout_check
            .is_some_and(|last| now.duration_since(last) < interval)
        {
            return;
        }
        self.last_timeout_check = Some(now);
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            let cid = cid as u16;
            if !slot.state.is_outstanding() || slot.no_timeout {
                continue;
            }
            let Some(seen_at) = slot.seen_at else {
                slot.seen_at = Some(now);
                continue;
            };
            if now.duration_since(seen_at) < timeout {
                continue;
            }
            self.stats.timeouts += 1;
            if slot.abort_requested {
                tracing::error!(
                    qid = self.qid,
                    cid,
                    "nvme: command still outstanding after its abort, asking for a reset"
                );
                self.shared.needs_reset.store(true, Ordering::Release);
            } else {
                tracing::warn!(
                    qid = self.qid,
                    cid,
                    opcode = slot.opcode,
                    "nvme: command timed out, asking for an abort"
                );
                slot.abort_requested = true;
                slot.seen_at = Some(now);
                self.shared.lock_aborts().push((self.qid, cid));
            }
        }
    }

    pub(crate) fn take_rings(&mut self) -> Option<Rings> {
        self.rings.take()
    }
}

impl<R: Registers> Drop for QueuePair<R> {
    fn drop(&mut self) {
        // The controller may still write this pair's CQ and read its SQ: hand the rings to it
        // to delete the queues before the memory is reused. The admin pair (qid 0) is
        // dropped by its controller after disabling it.
        if self.qid != 0 {
            if let Some(rings) = self.rings.take() {
                self.shared.lock_orphans().push(rings);
            }
        }
    }
}

/// Copies a finished bounced read back into its iovecs and frees the bounce buffer (the
/// queue pair's fields passed one by one: the completion walk holds the CQ borrowed).
#[cold]
#[inline(never)]
fn finish_bounce(
    slot: &mut Slot,
    bounce_free: &mut Vec<u16>,
    bounce_uses: &[BounceUse],
    bounce: &DmaBuffer,
    bounce_buffer_bytes: usize,
    success: bool,
) {
    let index = slot.bounce;
    let Some(bounce_use) = bounce_uses.get(usize::from(index)) else {
        return;
    };
    if success && bounce_use.copy_back {
        let mut offset = usize::from(index) * bounce_buffer_bytes;
        for iov in &bounce_use.iovs {
            // SAFETY: `IoVec::new`'s contract: the caller's range is valid and touched by
            // nobody else until this completion is handed back, which happens only after this
            // copy.
            let target =
                unsafe { std::slice::from_raw_parts_mut(iov.addr() as *mut u8, iov.len_bytes()) };
            if let Err(error) = bounce.read_at(offset, target) {
                tracing::error!(%error, "nvme: bounce buffer copy back failed");
            }
            offset += iov.len_bytes();
        }
    }
    // Capacity is the number of bounce buffers, each given back once: never grows.
    bounce_free.push(index);
    slot.bounce = NO_BOUNCE;
}

/// How far `to` lies after `from` on a ring of `entries` (`from` below `entries`; a `to`
/// beyond the ring gives a distance beyond it). A conditional add, not a division.
#[inline(always)]
fn ring_distance(from: u16, to: u16, entries: u16) -> u32 {
    let (from, to) = (u32::from(from), u32::from(to));
    if to >= from {
        to - from
    } else {
        to + u32::from(entries) - from
    }
}

fn check_range(ns: &Namespace, lba: u64, nblocks: u64) -> Result<(), NvmeError> {
    if nblocks == 0 || nblocks > 65536 {
        return Err(NvmeError::InvalidRequest {
            reason: "block count must be 1..=65536",
        });
    }
    match lba.checked_add(nblocks) {
        Some(end) if end <= ns.num_blocks() => Ok(()),
        _ => Err(NvmeError::InvalidRequest {
            reason: "block range outside the namespace",
        }),
    }
}

fn lba_command(opcode: u8, ns: &Namespace, lba: u64, nblocks: u32) -> Result<Command, NvmeError> {
    check_range(ns, lba, u64::from(nblocks))?;
    let mut command = Command::new(opcode);
    command.nsid = ns.nsid();
    command.cdw10 = lba as u32;
    command.cdw11 = (lba >> 32) as u32;
    command.cdw12 = nblocks - 1; // NLB is 0's based
    Ok(command)
}
