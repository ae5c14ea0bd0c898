//! The I/O path: a [`BdevChannel`] is one thread's queue to one bdev, with a fixed pool of
//! request slots, the module's channel and its statistics.
//!
//! # Why the channel is owned by its user
//!
//! The reactor's io-device channels live in a per-thread table reached through
//! `ThreadCtx::channel_ctx_mut` (a search and a downcast at every access), and a completion
//! callback stored in the channel would need a second lookup (or an `Rc<RefCell>`) to reach
//! the submitter's state. Here the submitter owns the channel (in its poller, next to its
//! own state), so:
//!
//! - submit is a direct method call: validate, take a slot, one dynamic call into the module;
//! - [`BdevChannel::poll`] hands each completion to a closure the caller passes in, which
//!   borrows the caller's state mutably and gets the channel back to resubmit: callbacks with
//!   a context, without storing a callback or a context pointer per I/O, monomorphized (no
//!   dynamic dispatch) and with no allocation;
//! - completions always run from the poll, never inside submit (STYLE #6), and on the thread
//!   that polls, which is the thread that submitted.
//!
//! A channel is `Send` (it may be moved into a poller) but not `Sync`.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bdev::BdevShared;
use crate::clock;
use crate::error::BdevError;
use crate::module::{BackendChannel, CompletionQueue, IoRequest};
use crate::stats::IoStats;
use crate::types::{IoStatus, IoType, IoVec};

/// Completions handed out per [`BdevChannel::poll`] at most (STYLE #4).
pub const MAX_COMPLETIONS_PER_POLL: usize = 256;

/// A finished I/O, as its submitter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCompletion {
    /// What the submitter passed in (an index into its own table, typically).
    pub tag: u64,
    pub io_type: IoType,
    pub status: IoStatus,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// From submit to the poll that handed it out, in clock ticks (see [`BdevChannel::poll`]
    /// for the precision).
    pub latency_ticks: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    tag: u64,
    offset_blocks: u64,
    num_blocks: u64,
    submit_ticks: u64,
    bytes: u64,
    io_type: IoType,
    in_flight: bool,
}

const IDLE_SLOT: Slot = Slot {
    tag: 0,
    offset_blocks: 0,
    num_blocks: 0,
    submit_ticks: 0,
    bytes: 0,
    io_type: IoType::Read,
    in_flight: false,
};

/// One thread's queue to one bdev; see the module documentation.
pub struct BdevChannel {
    bdev: Arc<BdevShared>,
    module: Box<dyn BackendChannel>,
    // Copies of the bdev's geometry, so that validation reads only this struct.
    block_size_bytes: u64,
    num_blocks: u64,
    align_mask: u64,
    /// Bit `IoType::index()` set: supported.
    supported_mask: u8,
    writable: bool,
    slots: Box<[Slot]>,
    /// Free slot indices; capacity `queue_depth`, never grows.
    free: Vec<u16>,
    done: CompletionQueue,
    stats: IoStats,
    /// The timestamp of the poll whose completions are being handed out (0: not in a poll).
    /// Submissions from completion callbacks reuse it instead of reading the clock.
    poll_ticks: u64,
    /// This channel's id in its bdev's live statistics.
    stats_id: u64,
    /// When `stats` was last published to the bdev (clock ticks).
    stats_published_ticks: u64,
    /// [`STATS_PUBLISH_INTERVAL_US`] in clock ticks.
    stats_publish_interval_ticks: u64,
    /// `stats` changed since it was last published.
    stats_dirty: bool,
    /// Idle polls since the last completion, for a final publication once the channel idles.
    idle_polls: u32,
    /// Slots of I/Os held back by the bdev's rate limits, oldest first (see [`crate::qos`]).
    /// Empty and unallocated until a limit first holds one back.
    qos_waiting: VecDeque<u16>,
    /// The iovecs of each waiting slot, by slot index (each keeps its capacity: allocation
    /// happens only while the lists first grow).
    qos_iovs: Vec<Vec<IoVec>>,
}

/// A busy channel publishes its statistics to its bdev at most this often.
const STATS_PUBLISH_INTERVAL_US: f64 = 10_000.0;
/// An idle channel with unpublished statistics publishes after this many idle polls.
const STATS_PUBLISH_IDLE_POLLS: u32 = 1024;

impl std::fmt::Debug for BdevChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevChannel")
            .field("bdev", &self.bdev.info.name)
            .field("queue_depth", &self.slots.len())
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl BdevChannel {
    pub(crate) fn new(
        bdev: Arc<BdevShared>,
        writable: bool,
        queue_depth: u16,
    ) -> Result<Self, BdevError> {
        let module = bdev.backend.create_channel(queue_depth)?;
        let depth = usize::from(queue_depth);
        let supported_mask = bdev
            .info
            .supported_io_types
            .iter()
            .fold(0u8, |mask, t| mask | (1 << t.index()));
        Ok(Self {
            block_size_bytes: u64::from(bdev.info.block_size_bytes),
            num_blocks: bdev.info.num_blocks,
            align_mask: u64::from(bdev.info.required_alignment_bytes) - 1,
            supported_mask,
            writable,
            slots: vec![IDLE_SLOT; depth].into_boxed_slice(),
            free: (0..queue_depth).rev().collect(),
            done: CompletionQueue::with_capacity(depth),
            stats: IoStats::default(),
            poll_ticks: 0,
            stats_id: bdev.open_channel_stats(),
            stats_published_ticks: 0,
            stats_publish_interval_ticks: (STATS_PUBLISH_INTERVAL_US * clock::ticks_per_us())
                as u64,
            stats_dirty: false,
            idle_polls: 0,
            qos_waiting: VecDeque::new(),
            qos_iovs: Vec::new(),
            module,
            bdev,
        })
    }

    pub fn bdev_name(&self) -> &str {
        &self.bdev.info.name
    }

    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes as u32
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    pub fn queue_depth(&self) -> usize {
        self.slots.len()
    }

    /// I/Os submitted and not yet handed back by [`BdevChannel::poll`].
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The bdev was hot-removed: new I/O completes with [`IoStatus::Removed`].
    pub fn is_removed(&self) -> bool {
        self.bdev.removed.load(Ordering::Relaxed)
    }

    /// This channel's statistics so far.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// The module's completion fd, if it has one (see
    /// [`BackendChannel::interrupt_fd`](crate::module::BackendChannel::interrupt_fd)): an
    /// interrupt-mode owner registers it with its reactor and may stop polling while it is
    /// not readable. `None`: keep polling while I/O is outstanding.
    ///
    /// `None` as well while the bdev has rate limits: I/O held back by them starts from a
    /// poll, which no fd announces.
    pub fn interrupt_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.bdev.qos.is_active() {
            return None;
        }
        self.module.interrupt_fd()
    }

    /// Reads `num_blocks` blocks at `offset_blocks` into `iovs`.
    #[inline]
    pub fn read(
        &mut self,
        tag: u64,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
    ) -> Result<(), BdevError> {
        self.submit(tag, IoType::Read, offset_blocks, num_blocks, iovs)
    }

    /// Writes `iovs` to `num_blocks` blocks at `offset_blocks`.
    #[inline]
    pub fn write(
        &mut self,
        tag: u64,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
    ) -> Result<(), BdevError> {
        self.submit(tag, IoType::Write, offset_blocks, num_blocks, iovs)
    }

    pub fn flush(
        &mut self,
        tag: u64,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<(), BdevError> {
        self.submit(tag, IoType::Flush, offset_blocks, num_blocks, &[])
    }

    pub fn unmap(
        &mut self,
        tag: u64,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<(), BdevError> {
        self.submit(tag, IoType::Unmap, offset_blocks, num_blocks, &[])
    }

    pub fn write_zeroes(
        &mut self,
        tag: u64,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<(), BdevError> {
        self.submit(tag, IoType::WriteZeroes, offset_blocks, num_blocks, &[])
    }

    pub fn reset(&mut self, tag: u64) -> Result<(), BdevError> {
        self.submit(tag, IoType::Reset, 0, 0, &[])
    }

    /// Submits one I/O. `Err(QueueFull)` when every slot is in flight (nothing was submitted:
    /// poll and retry). Otherwise the I/O always completes through [`BdevChannel::poll`],
    /// with [`IoStatus::Success`] or the status of the check it failed.
    #[inline]
    pub fn submit(
        &mut self,
        tag: u64,
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
    ) -> Result<(), BdevError> {
        let Some(slot_index) = self.free.pop() else {
            return Err(BdevError::QueueFull {
                queue_depth: self.slots.len() as u32,
            });
        };
        let (status, bytes) = self.validate(io_type, offset_blocks, num_blocks, iovs);
        self.slots[usize::from(slot_index)] = Slot {
            tag,
            offset_blocks,
            num_blocks,
            submit_ticks: if self.poll_ticks != 0 {
                self.poll_ticks
            } else {
                clock::ticks()
            },
            bytes,
            io_type,
            in_flight: true,
        };
        match status {
            // Only reads and writes are limited; the others pass those waiting (a flush
            // covers completed writes only, so passing waiting ones changes nothing).
            IoStatus::Success if self.bdev.qos.is_active() && io_type.carries_data() => {
                self.submit_limited(slot_index, io_type, bytes, iovs)
            }
            IoStatus::Success => self.module.submit(
                &IoRequest {
                    slot: slot_index,
                    io_type,
                    offset_blocks,
                    num_blocks,
                    iovs,
                },
                &mut self.done,
            ),
            failed => self.done.complete(slot_index, failed),
        }
        Ok(())
    }

    /// Submits an I/O under the bdev's rate limits, or holds it back behind those already
    /// waiting.
    #[cold]
    fn submit_limited(&mut self, slot: u16, io_type: IoType, bytes: u64, iovs: &[IoVec]) {
        let now = self.slots[usize::from(slot)].submit_ticks;
        if self.qos_waiting.is_empty() && self.bdev.qos.try_take(now, io_type, bytes) {
            let request = IoRequest {
                slot,
                io_type,
                offset_blocks: self.slots[usize::from(slot)].offset_blocks,
                num_blocks: self.slots[usize::from(slot)].num_blocks,
                iovs,
            };
            self.module.submit(&request, &mut self.done);
            return;
        }
        if self.qos_iovs.is_empty() {
            self.qos_iovs = vec![Vec::new(); self.slots.len()];
            self.qos_waiting.reserve_exact(self.slots.len());
        }
        let kept = &mut self.qos_iovs[usize::from(slot)];
        kept.clear();
        kept.extend_from_slice(iovs);
        self.qos_waiting.push_back(slot);
    }

    /// Starts the held-back I/Os the rate limits now allow, oldest first; all of them once
    /// the limits are gone. A bdev removed meanwhile fails them.
    #[cold]
    fn start_waiting(&mut self) {
        let now = clock::ticks();
        while let Some(&slot) = self.qos_waiting.front() {
            let held = self.slots[usize::from(slot)];
            debug_assert!(held.in_flight, "a waiting slot is in flight");
            if self.is_removed() {
                self.done.complete(slot, IoStatus::Removed);
            } else if !self.bdev.qos.is_active()
                || self.bdev.qos.try_take(now, held.io_type, held.bytes)
            {
                let request = IoRequest {
                    slot,
                    io_type: held.io_type,
                    offset_blocks: held.offset_blocks,
                    num_blocks: held.num_blocks,
                    iovs: &self.qos_iovs[usize::from(slot)],
                };
                self.module.submit(&request, &mut self.done);
            } else {
                break;
            }
            self.qos_waiting.pop_front();
        }
    }

    /// The checks every module relies on; returns the status and the byte count.
    #[inline]
    fn validate(
        &self,
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u64,
        iovs: &[IoVec],
    ) -> (IoStatus, u64) {
        if self.is_removed() {
            return (IoStatus::Removed, 0);
        }
        if self.supported_mask & (1 << io_type.index()) == 0 {
            return (IoStatus::Unsupported, 0);
        }
        if io_type.modifies() && !self.writable {
            return (IoStatus::ReadOnly, 0);
        }
        if !io_type.has_range() {
            return (IoStatus::Success, 0);
        }
        let in_range = num_blocks > 0
            && offset_blocks
                .checked_add(num_blocks)
                .is_some_and(|end| end <= self.num_blocks);
        if !in_range {
            return (IoStatus::OutOfRange, 0);
        }
        // Cannot overflow: num_blocks <= the bdev's size, checked at registration.
        let bytes = num_blocks * self.block_size_bytes;
        if !io_type.carries_data() {
            return (IoStatus::Success, bytes);
        }
        let mut total_bytes = 0u64;
        for iov in iovs {
            if iov.addr() & self.align_mask != 0 {
                return (IoStatus::Misaligned, 0);
            }
            total_bytes = total_bytes.saturating_add(iov.len_bytes() as u64);
        }
        if total_bytes != bytes {
            return (IoStatus::LengthMismatch, 0);
        }
        (IoStatus::Success, bytes)
    }

    /// Drives the module and hands each finished I/O (at most [`MAX_COMPLETIONS_PER_POLL`])
    /// to `on_complete`, which may submit again through the channel it is given. I/Os that
    /// complete during this poll's callbacks are handed out at the next poll. Returns the
    /// number handed out (0: idle).
    #[inline]
    pub fn poll<F>(&mut self, mut on_complete: F) -> usize
    where
        F: FnMut(&mut BdevChannel, IoCompletion),
    {
        if !self.qos_waiting.is_empty() {
            self.start_waiting();
        }
        self.module.poll(&mut self.done);
        let count = self.done.len().min(MAX_COMPLETIONS_PER_POLL);
        if count == 0 {
            if self.stats_dirty {
                self.idle_polls += 1;
                if self.idle_polls >= STATS_PUBLISH_IDLE_POLLS {
                    self.publish_stats(clock::ticks());
                }
            }
            return 0;
        }
        self.idle_polls = 0;
        // One clock read per poll, not two per I/O: `rdtsc` costs 16-20 ns on the AMD EPYC
        // hosts (measured), which at 10+ M IOPS is a third of the budget. Completions of this
        // poll are stamped with the poll's time and so are I/Os submitted from their callbacks;
        // a latency is then exact for in-order completions and otherwise off by at most the
        // time one poll takes to hand out its batch.
        self.poll_ticks = clock::ticks().max(1);
        let mut handed = 0;
        for _ in 0..count {
            let Some(done) = self.done.entries.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(usize::from(done.slot)) else {
                tracing::error!(bdev = %self.bdev.info.name, slot = done.slot, "module completed a slot that does not exist");
                continue;
            };
            if !slot.in_flight {
                tracing::error!(bdev = %self.bdev.info.name, slot = done.slot, "module completed a slot twice");
                continue;
            }
            slot.in_flight = false;
            let slot = *slot;
            let latency_ticks = self.poll_ticks.saturating_sub(slot.submit_ticks);
            self.stats
                .record(slot.io_type, slot.bytes, latency_ticks, done.status);
            self.free.push(done.slot);
            handed += 1;
            on_complete(
                self,
                IoCompletion {
                    tag: slot.tag,
                    io_type: slot.io_type,
                    status: done.status,
                    offset_blocks: slot.offset_blocks,
                    num_blocks: slot.num_blocks,
                    latency_ticks,
                },
            );
        }
        self.stats_dirty = true;
        if self.poll_ticks.saturating_sub(self.stats_published_ticks)
            >= self.stats_publish_interval_ticks
        {
            self.publish_stats(self.poll_ticks);
        }
        self.poll_ticks = 0;
        handed
    }

    /// Hands the bdev a copy of this channel's statistics (for `bdev_get_iostat` while the
    /// channel is open); skipped, and retried later, when a reader holds the lock.
    #[cold]
    fn publish_stats(&mut self, now_ticks: u64) {
        if self.bdev.publish_stats(self.stats_id, &self.stats) {
            self.stats_dirty = false;
            self.stats_published_ticks = now_ticks;
        }
        self.idle_polls = 0;
    }
}

impl Drop for BdevChannel {
    fn drop(&mut self) {
        let outstanding = self.outstanding();
        if outstanding > 0 {
            tracing::warn!(
                bdev = %self.bdev.info.name,
                outstanding,
                "bdev channel dropped with I/O outstanding: their completions are lost"
            );
        }
        self.bdev.close_channel_stats(self.stats_id, &self.stats);
    }
}
