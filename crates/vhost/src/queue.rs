//! Device-side virtqueues over guest memory: split (virtio 1.2 §2.7) and packed (§2.8), with
//! indirect descriptors (§2.7.5.3, §2.8.7) and EVENT_IDX (§2.7.10, §2.8.10). Every offset comes
//! from `pollux_virtio::ring` (the one definition of the layouts).
//!
//! The ring is hostile input. [`VirtQueue::pop`] walks one chain into a caller-owned buffer:
//!
//! - a split head or `next` index must be below the queue size (§2.7.5), and a chain holds at
//!   most queue-size descriptors, which also catches loops (§2.7.5.2 forbids them);
//! - an indirect table must be the chain's only descriptor (§2.7.5.3.1: INDIRECT and NEXT are
//!   exclusive), a non-zero multiple of 16 bytes inside one guest region, at most
//!   [`MAX_INDIRECT_DESCS`] entries, and may not itself contain an indirect descriptor
//!   (§2.7.5.3.1: "MUST NOT set VIRTQ_DESC_F_INDIRECT in an indirect descriptor");
//! - a packed buffer id must be below the queue size and not already in flight (§2.8.6);
//! - data addresses are not checked here: the consumer translates them, checked, through
//!   [`GuestMemory`].
//!
//! A chain that fails these checks is consumed and reported as [`PopError`]: with the head (a
//! split head in range) it can be returned to the driver used with length 0; without one
//! (packed id out of range) it is dropped and logged, as there is no id to return.
//!
//! Used entries are written one by one ([`VirtQueue::push_used`]) and published once per batch
//! ([`VirtQueue::publish_used`]): one used-index store (split) or in-place flag stores
//! (packed), then one notification decision.
//!
//! Driver notifications (kicks): a polling queue never reads them and leaves the ring's
//! suppression fields alone. An interrupt-mode queue turns them off while it is busy
//! ([`VirtQueue::disable_notifications`]: split `VIRTQ_USED_F_NO_NOTIFY`, or with EVENT_IDX
//! nothing, `avail_event` falling behind; packed `RING_EVENT_FLAGS_DISABLE` in the device
//! event area) and on before it sleeps ([`VirtQueue::enable_notifications`]: the flag
//! cleared, `avail_event` at the next entry, packed ENABLE or DESC at the next position),
//! then looks at the avail ring once more: a chain the driver published before it saw the
//! change gets no kick (virtio 1.2 §2.7.10 / §2.8.10), so the queue polls instead of
//! sleeping.

use std::sync::atomic::{fence, Ordering};

use pollux_virtio::ring::{
    need_event, packed_used_flags, PackedDesc, PackedEvent, PackedLayout, SplitDesc, SplitLayout,
    UsedElem, DESC_SIZE_BYTES, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};

use crate::guest_memory::{GuestMemory, GuestSlice, MemoryError};

/// Most entries an indirect table may hold (Linux uses at most `seg_max + 2`).
pub const MAX_INDIRECT_DESCS: u32 = 1024;

/// One buffer of a chain, as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub gpa: u64,
    pub len: u32,
    /// The device writes it (otherwise reads it).
    pub write: bool,
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head index {head} is not below the queue size {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("next index {next} is not below the table size {size}")]
    NextOutOfRange { next: u16, size: u32 },
    #[error("chain longer than {limit} descriptors (a loop?)")]
    TooLong { limit: u32 },
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor chained with others")]
    IndirectInChain,
    #[error("indirect table of {len} bytes (must be a non-zero multiple of 16, at most {MAX_INDIRECT_DESCS} entries)")]
    BadIndirectLen { len: u32 },
    #[error("indirect table at {gpa:#x} (+{len:#x}) is outside guest memory")]
    IndirectOutOfBounds { gpa: u64, len: u32 },
    #[error("packed buffer id {id} is not below the queue size {size}")]
    IdOutOfRange { id: u16, size: u16 },
    #[error("packed buffer id {id} is already in flight")]
    IdInFlight { id: u16 },
    #[error("the inflight region's copy at entry {entry} does not end where its chain does")]
    InflightCopy { entry: u16 },
}

/// A chain that could not be taken: `head` is the id to return used (length 0), when there is
/// a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopError {
    pub head: Option<u16>,
    pub error: ChainError,
}

/// Where the three parts of a ring live (front-end addresses, as SET_VRING_ADDR gives them)
/// and where to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VringAddrs {
    pub desc_uva: u64,
    pub avail_uva: u64,
    pub used_uva: u64,
}

/// Ring state the front-end saves and restores (SET_VRING_BASE / GET_VRING_BASE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VringBase {
    /// Split: the next avail index to read. Packed: bits 0..15 the next avail slot, bit 15 the
    /// avail wrap counter (the encoding QEMU and DPDK use); the used position equals it.
    pub num: u16,
}

/// A position in a packed ring: a slot and the wrap counter of the lap it is in (§2.8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedPosition {
    pub idx: u16,
    pub wrap: bool,
}

impl PackedPosition {
    /// The position `by` slots on (`by` at most `size`, `idx` below it).
    pub fn advance(self, by: u16, size: u16) -> Self {
        let next = u32::from(self.idx) + u32::from(by.min(size));
        if next >= u32::from(size) {
            Self {
                idx: (next - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Self {
                idx: next as u16,
                wrap: self.wrap,
            }
        }
    }

    /// Slots from here on to `later` (0 to `2 * size - 1`; laps alternate the wrap counter, so
    /// positions repeat every two laps).
    pub fn distance_to(self, later: Self, size: u16) -> u16 {
        let linear = |p: Self| u32::from(p.idx) + if p.wrap { 0 } else { u32::from(size) };
        let ring = 2 * u32::from(size);
        ((linear(later) + ring - linear(self)) % ring) as u16
    }
}

/// One packed chain walked descriptor by descriptor (§2.8.6, §2.8.7), from the ring or from
/// the inflight region's copies: the same checks either way.
pub(crate) struct PackedChainWalk {
    size: u16,
    taken: u16,
    result: Result<(), ChainError>,
}

impl PackedChainWalk {
    pub(crate) fn new(size: u16) -> Self {
        Self {
            size,
            taken: 0,
            result: Ok(()),
        }
    }

    /// Takes descriptor `desc` of the chain into `out`; returns whether the chain goes on.
    pub(crate) fn step(
        &mut self,
        mem: &GuestMemory,
        desc: &PackedDesc,
        out: &mut Vec<Desc>,
    ) -> bool {
        self.taken += 1;
        let next = desc.flags & VIRTQ_DESC_F_NEXT != 0;
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            // §2.8.7: an indirect descriptor is the chain's only one (INDIRECT and NEXT are
            // exclusive); the rest of a bad chain is still consumed, so the ring stays in step.
            if self.taken != 1 || next {
                self.result = Err(ChainError::IndirectInChain);
                return next;
            }
            self.result = walk_indirect(mem, desc.addr, desc.len, false, out);
            return false;
        }
        if self.result.is_ok() {
            out.push(Desc {
                gpa: desc.addr,
                len: desc.len,
                write: desc.flags & VIRTQ_DESC_F_WRITE != 0,
            });
        }
        next
    }

    /// The chain goes on past the queue size (a loop, §2.8.6 bounds a chain by it).
    fn too_long(&mut self) {
        self.result = Err(ChainError::TooLong {
            limit: u32::from(self.size),
        });
    }

    pub(crate) fn finish(self) -> Result<(), ChainError> {
        self.result
    }
}

/// Why a ring could not start.
#[derive(Debug, thiserror::Error)]
pub enum RingSetupError {
    #[error("queue size: {0}")]
    Layout(#[from] pollux_virtio::ring::LayoutError),
    #[error("ring part {part}")]
    Memory {
        part: &'static str,
        #[source]
        source: MemoryError,
    },
    #[error("ring part {part} at guest address {gpa:#x} is not {align}-byte aligned")]
    Misaligned {
        part: &'static str,
        gpa: u64,
        align: u64,
    },
}

/// A device-side virtqueue of either layout.
pub enum VirtQueue {
    Split(SplitQueue),
    Packed(PackedQueue),
}

impl std::fmt::Debug for VirtQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VirtQueue::Split(q) => write!(
                f,
                "SplitQueue(size {}, last_avail {})",
                q.layout.queue_size(),
                q.last_avail
            ),
            VirtQueue::Packed(q) => write!(
                f,
                "PackedQueue(size {}, next_avail {})",
                q.size, q.next_avail
            ),
        }
    }
}

fn part(
    mem: &GuestMemory,
    name: &'static str,
    uva: u64,
    len: u64,
    align: u64,
) -> Result<GuestSlice, RingSetupError> {
    let wrap = |source| RingSetupError::Memory { part: name, source };
    let gpa = mem.uva_to_gpa(uva, len).map_err(wrap)?;
    if gpa % align != 0 {
        return Err(RingSetupError::Misaligned {
            part: name,
            gpa,
            align,
        });
    }
    let mut hint = 0;
    mem.slice(gpa, len, &mut hint).map_err(wrap)
}

/// Reads one 16-byte descriptor at index `i` of a table slice.
#[inline]
fn read_desc(table: &GuestSlice, i: u32) -> [u8; DESC_SIZE_BYTES] {
    table.read_array::<DESC_SIZE_BYTES>(u64::from(i) * DESC_SIZE_BYTES as u64)
}

impl VirtQueue {
    /// Resolves the ring parts in `mem` and starts from `base`.
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: VringAddrs,
        base: VringBase,
        packed: bool,
        event_idx: bool,
    ) -> Result<Self, RingSetupError> {
        if packed {
            PackedQueue::new(mem, size, addrs, base, event_idx).map(VirtQueue::Packed)
        } else {
            SplitQueue::new(mem, size, addrs, base, event_idx).map(VirtQueue::Split)
        }
    }

    pub fn size(&self) -> u16 {
        match self {
            VirtQueue::Split(q) => q.layout.queue_size(),
            VirtQueue::Packed(q) => q.size,
        }
    }

    /// Takes the next available chain into `out` (cleared first). `None`: nothing available.
    #[inline]
    pub fn pop(&mut self, mem: &GuestMemory, out: &mut Vec<Desc>) -> Option<Result<u16, PopError>> {
        out.clear();
        match self {
            VirtQueue::Split(q) => q.pop(mem, out),
            VirtQueue::Packed(q) => q.pop(mem, out),
        }
    }

    /// Marks chain `head` used with `len` bytes written; visible to the driver after
    /// [`publish_used`](Self::publish_used).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        match self {
            VirtQueue::Split(q) => q.push_used(head, len),
            VirtQueue::Packed(q) => q.push_used(head, len),
        }
    }

    /// Publishes the used entries pushed since the last call; returns whether the driver asked
    /// to be notified for them.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        match self {
            VirtQueue::Split(q) => q.publish_used(),
            VirtQueue::Packed(q) => q.publish_used(),
        }
    }

    /// Walks the chain at `head` again (a split request recorded in flight before a
    /// reconnect, resubmitted). `None` for a packed ring (resubmitted from the inflight
    /// region's copies, [`PackedInflight::walk`](crate::inflight::PackedInflight::walk)).
    pub fn walk_head(
        &self,
        mem: &GuestMemory,
        head: u16,
        out: &mut Vec<Desc>,
    ) -> Option<Result<u16, PopError>> {
        out.clear();
        match self {
            VirtQueue::Split(q) => {
                let size = q.layout.queue_size();
                if head >= size {
                    return Some(Err(PopError {
                        head: None,
                        error: ChainError::HeadOutOfRange { head, size },
                    }));
                }
                Some(
                    q.walk(mem, head, out)
                        .map(|()| head)
                        .map_err(|error| PopError {
                            head: Some(head),
                            error,
                        }),
                )
            }
            VirtQueue::Packed(_) => None,
        }
    }

    /// Packed: the ring slots the last [`pop`](Self::pop) read (first slot, count).
    pub fn last_packed_chain(&self) -> Option<(u16, u16)> {
        match self {
            VirtQueue::Split(_) => None,
            VirtQueue::Packed(q) => Some(q.last_chain),
        }
    }

    /// Packed: the ring descriptor `i` slots after slot `start` (as it is now).
    pub fn packed_ring_desc(&self, start: u16, i: u16) -> Option<PackedDesc> {
        match self {
            VirtQueue::Split(_) => None,
            VirtQueue::Packed(q) => {
                let slot = (u32::from(start) + u32::from(i)) % u32::from(q.size);
                Some(q.read(slot as u16))
            }
        }
    }

    /// Packed: the USED flag of the ring descriptor at `slot` (§2.8.1).
    pub fn packed_used_flag(&self, slot: u16) -> bool {
        match self {
            VirtQueue::Split(_) => false,
            VirtQueue::Packed(q) => {
                slot < q.size
                    && q.ring
                        .read_u16(u64::from(slot) * DESC_SIZE_BYTES as u64 + 14)
                        & pollux_virtio::ring::VIRTQ_DESC_F_USED
                        != 0
            }
        }
    }

    /// Packed: the device's avail and used positions (the used one after the entries pushed
    /// so far, published or not).
    pub fn packed_positions(&self) -> Option<(PackedPosition, PackedPosition)> {
        match self {
            VirtQueue::Split(_) => None,
            VirtQueue::Packed(q) => Some((
                PackedPosition {
                    idx: q.next_avail,
                    wrap: q.avail_wrap,
                },
                PackedPosition {
                    idx: q.next_used,
                    wrap: q.used_wrap,
                },
            )),
        }
    }

    /// Packed: resumes at the positions an inflight region recorded (a packed ring's
    /// SET_VRING_BASE is stale after a back-end died: the front-end cannot read the device's
    /// position back, there is no used index in shared memory). Positions out of range are
    /// ignored.
    pub fn set_packed_positions(&mut self, avail: PackedPosition, used: PackedPosition) {
        if let VirtQueue::Packed(q) = self {
            if avail.idx < q.size && used.idx < q.size {
                (q.next_avail, q.avail_wrap) = (avail.idx, avail.wrap);
                (q.next_used, q.used_wrap) = (used.idx, used.wrap);
                (q.published_used, q.published_wrap) = (used.idx, used.wrap);
            }
        }
    }

    /// Packed: buffer `id`, taken by a previous back-end over `slots` ring slots, is in flight
    /// again (resubmitted from the inflight region). False when `id` is out of range or
    /// already in flight.
    pub fn resume_packed(&mut self, id: u16, slots: u16) -> bool {
        let VirtQueue::Packed(q) = self else {
            return false;
        };
        match q.id_slots.get_mut(usize::from(id)) {
            Some(entry) if *entry == 0 && slots > 0 => {
                *entry = slots;
                true
            }
            _ => false,
        }
    }

    /// The guest range the device writes when it publishes used entries (the dirty log marks
    /// it after a publish): the used ring (split), the descriptor ring (packed).
    pub fn device_written_area(&self) -> (u64, u64) {
        match self {
            VirtQueue::Split(q) => (q.used.gpa(), q.used.len()),
            VirtQueue::Packed(q) => (q.ring.gpa(), q.ring.len()),
        }
    }

    /// Asks the driver to kick when it makes the next chain available, then re-checks the
    /// avail ring: true when a chain is there already (published before the driver could see
    /// the request, so no kick comes for it: poll instead of sleeping). The full fence orders
    /// the request before the re-check, as the driver orders its index store before reading
    /// the suppression (§2.7.10, §2.8.10). Writes guest memory: see
    /// [`notification_area`](Self::notification_area).
    pub fn enable_notifications(&mut self) -> bool {
        match self {
            VirtQueue::Split(q) => {
                if q.event_idx {
                    // Kick when the entry at `last_avail` is published (§2.7.10).
                    q.used
                        .write_u16(q.layout.avail_event_offset(), q.last_avail);
                } else {
                    q.used.write_u16(SplitLayout::USED_FLAGS_OFFSET, 0);
                }
                fence(Ordering::SeqCst);
                q.avail.read_u16(SplitLayout::AVAIL_IDX_OFFSET) != q.last_avail
            }
            VirtQueue::Packed(q) => {
                if q.event_idx {
                    let off_wrap = q.next_avail | (u16::from(q.avail_wrap) << 15);
                    q.device_event.write_u16(0, off_wrap);
                    fence(Ordering::Release);
                    q.device_event.write_u16(2, RING_EVENT_FLAGS_DESC);
                } else {
                    q.device_event.write_u16(2, RING_EVENT_FLAGS_ENABLE);
                }
                fence(Ordering::SeqCst);
                let flags = q
                    .ring
                    .read_u16(u64::from(q.next_avail) * DESC_SIZE_BYTES as u64 + 14);
                PackedDesc {
                    flags,
                    ..PackedDesc::default()
                }
                .is_avail(q.avail_wrap)
            }
        }
    }

    /// Asks the driver not to kick (the queue polls while it is busy). Split with EVENT_IDX
    /// writes nothing: `avail_event` stays where the last enable put it and falls behind, so
    /// the driver kicks at most once more. Writes guest memory, see
    /// [`notification_area`](Self::notification_area).
    pub fn disable_notifications(&mut self) {
        match self {
            VirtQueue::Split(q) => {
                if !q.event_idx {
                    q.used
                        .write_u16(SplitLayout::USED_FLAGS_OFFSET, VIRTQ_USED_F_NO_NOTIFY);
                }
            }
            VirtQueue::Packed(q) => q.device_event.write_u16(2, RING_EVENT_FLAGS_DISABLE),
        }
    }

    /// The guest range the notification switches write (for the dirty log): the used ring
    /// (split, its flags and `avail_event`), the device event area (packed).
    pub fn notification_area(&self) -> (u64, u64) {
        match self {
            VirtQueue::Split(q) => (q.used.gpa(), q.used.len()),
            VirtQueue::Packed(q) => (q.device_event.gpa(), q.device_event.len()),
        }
    }

    /// Split: the used index in guest memory (what the driver has seen published).
    pub fn published_used_idx(&self) -> Option<u16> {
        match self {
            VirtQueue::Split(q) => Some(q.published_used),
            VirtQueue::Packed(_) => None,
        }
    }

    /// The driver's avail index as guest memory holds it now (split rings; for the log at
    /// ring start, where it should not be behind `base`).
    pub fn driver_avail_idx(&self) -> Option<u16> {
        match self {
            VirtQueue::Split(q) => Some(q.avail.read_u16(SplitLayout::AVAIL_IDX_OFFSET)),
            VirtQueue::Packed(_) => None,
        }
    }

    /// The state to give back on GET_VRING_BASE.
    pub fn base(&self) -> VringBase {
        match self {
            VirtQueue::Split(q) => VringBase { num: q.last_avail },
            VirtQueue::Packed(q) => VringBase {
                num: q.next_avail | (u16::from(q.avail_wrap) << 15),
            },
        }
    }

    /// Re-resolves the ring parts against a new memory table (SET_MEM_TABLE while running).
    pub fn remap(&mut self, mem: &GuestMemory, addrs: VringAddrs) -> Result<(), RingSetupError> {
        match self {
            VirtQueue::Split(q) => {
                let fresh = SplitQueue::new(
                    mem,
                    q.layout.queue_size(),
                    addrs,
                    VringBase::default(),
                    q.event_idx,
                )?;
                q.desc = fresh.desc;
                q.avail = fresh.avail;
                q.used = fresh.used;
            }
            VirtQueue::Packed(q) => {
                let fresh =
                    PackedQueue::new(mem, q.size, addrs, VringBase::default(), q.event_idx)?;
                q.ring = fresh.ring;
                q.driver_event = fresh.driver_event;
                q.device_event = fresh.device_event;
            }
        }
        Ok(())
    }
}

/// Walks an indirect table into `out` (§2.7.5.3 / §2.8.7): every entry read once, nested
/// indirect refused. `split` chooses how entries chain (`next` fields or sequential).
fn walk_indirect(
    mem: &GuestMemory,
    desc_gpa: u64,
    desc_len: u32,
    split: bool,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    let count = desc_len / DESC_SIZE_BYTES as u32;
    if desc_len == 0
        || !desc_len.is_multiple_of(DESC_SIZE_BYTES as u32)
        || count > MAX_INDIRECT_DESCS
    {
        return Err(ChainError::BadIndirectLen { len: desc_len });
    }
    // One translation for the whole table, then reads through it (no region lookup and no
    // reference count touched per entry: indirect chains are what Linux and Pollux's
    // virtio_blk bdev send for most requests).
    let mut hint = 0;
    let Ok(table) = mem.range(desc_gpa, u64::from(desc_len), &mut hint) else {
        return Err(ChainError::IndirectOutOfBounds {
            gpa: desc_gpa,
            len: desc_len,
        });
    };
    // `i < count` and the table is `count` entries long: never `None`.
    let read = |i: u32| {
        table
            .read_u64_pair(u64::from(i) * DESC_SIZE_BYTES as u64)
            .unwrap_or((0, 0))
    };
    if split {
        let mut index = 0u32;
        for _ in 0..count {
            let (low, high) = read(index);
            let d = SplitDesc::from_words(low, high);
            if d.is_indirect() {
                return Err(ChainError::NestedIndirect);
            }
            out.push(Desc {
                gpa: d.addr,
                len: d.len,
                write: d.is_write(),
            });
            if !d.has_next() {
                return Ok(());
            }
            if u32::from(d.next) >= count {
                return Err(ChainError::NextOutOfRange {
                    next: d.next,
                    size: count,
                });
            }
            index = u32::from(d.next);
        }
        Err(ChainError::TooLong { limit: count })
    } else {
        for index in 0..count {
            let (low, high) = read(index);
            let d = PackedDesc::from_words(low, high);
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            out.push(Desc {
                gpa: d.addr,
                len: d.len,
                write: d.flags & VIRTQ_DESC_F_WRITE != 0,
            });
        }
        Ok(())
    }
}

/// A split virtqueue (§2.7).
pub struct SplitQueue {
    layout: SplitLayout,
    desc: GuestSlice,
    avail: GuestSlice,
    used: GuestSlice,
    event_idx: bool,
    last_avail: u16,
    /// The driver's avail index as last read (re-read only when `last_avail` reaches it).
    avail_idx_cache: u16,
    /// The next used index to write (published at `publish_used`).
    used_idx: u16,
    /// The used index at the last publish (EVENT_IDX's `old`).
    published_used: u16,
}

impl SplitQueue {
    fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: VringAddrs,
        base: VringBase,
        event_idx: bool,
    ) -> Result<Self, RingSetupError> {
        use pollux_virtio::ring::{SPLIT_AVAIL_ALIGN, SPLIT_DESC_ALIGN, SPLIT_USED_ALIGN};
        let layout = SplitLayout::new(size)?;
        let desc = part(
            mem,
            "descriptor table",
            addrs.desc_uva,
            layout.desc_table_bytes(),
            SPLIT_DESC_ALIGN,
        )?;
        let avail = part(
            mem,
            "avail ring",
            addrs.avail_uva,
            layout.avail_ring_bytes(),
            SPLIT_AVAIL_ALIGN,
        )?;
        let used = part(
            mem,
            "used ring",
            addrs.used_uva,
            layout.used_ring_bytes(),
            SPLIT_USED_ALIGN,
        )?;
        // The used index in guest memory is authoritative for where completions go (§2.7.8);
        // requests between it and `base` are the ones in flight at the previous stop.
        let used_idx = used.read_u16(SplitLayout::USED_IDX_OFFSET);
        Ok(Self {
            layout,
            desc,
            avail,
            used,
            event_idx,
            last_avail: base.num,
            avail_idx_cache: base.num,
            used_idx,
            published_used: used_idx,
        })
    }

    #[inline]
    fn pop(&mut self, mem: &GuestMemory, out: &mut Vec<Desc>) -> Option<Result<u16, PopError>> {
        if self.last_avail == self.avail_idx_cache {
            self.avail_idx_cache = self.avail.read_u16(SplitLayout::AVAIL_IDX_OFFSET);
            if self.last_avail == self.avail_idx_cache {
                return None;
            }
            // The ring entries and descriptors were written before the index (§2.7.13).
            fence(Ordering::Acquire);
        }
        let size = self.layout.queue_size();
        let head = self
            .avail
            .read_u16(self.layout.avail_entry_offset(self.last_avail));
        self.last_avail = self.last_avail.wrapping_add(1);
        if head >= size {
            return Some(Err(PopError {
                head: None,
                error: ChainError::HeadOutOfRange { head, size },
            }));
        }
        Some(
            self.walk(mem, head, out)
                .map(|()| head)
                .map_err(|error| PopError {
                    head: Some(head),
                    error,
                }),
        )
    }

    fn walk(&self, mem: &GuestMemory, head: u16, out: &mut Vec<Desc>) -> Result<(), ChainError> {
        let size = self.layout.queue_size();
        let mut index = head;
        for count in 0..u32::from(size) {
            let (low, high) = self.desc.read_u64_pair(self.layout.desc_offset(index));
            let d = SplitDesc::from_words(low, high);
            if d.is_indirect() {
                if count != 0 || d.has_next() {
                    return Err(ChainError::IndirectInChain);
                }
                return walk_indirect(mem, d.addr, d.len, true, out);
            }
            out.push(Desc {
                gpa: d.addr,
                len: d.len,
                write: d.is_write(),
            });
            if !d.has_next() {
                return Ok(());
            }
            if d.next >= size {
                return Err(ChainError::NextOutOfRange {
                    next: d.next,
                    size: u32::from(size),
                });
            }
            index = d.next;
        }
        Err(ChainError::TooLong {
            limit: u32::from(size),
        })
    }

    #[inline]
    fn push_used(&mut self, head: u16, len: u32) {
        let elem = UsedElem {
            id: u32::from(head),
            len,
        };
        self.used.write_array(
            self.layout.used_entry_offset(self.used_idx),
            elem.to_le_bytes(),
        );
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    #[inline]
    fn publish_used(&mut self) -> bool {
        if self.used_idx == self.published_used {
            return false;
        }
        // Used entries before the index (§2.7.8.2).
        fence(Ordering::Release);
        self.used
            .write_u16(SplitLayout::USED_IDX_OFFSET, self.used_idx);
        // The index store before the read of used_event / flags (§2.7.10): a full fence, as
        // the driver does the mirror image.
        fence(Ordering::SeqCst);
        let old = self.published_used;
        self.published_used = self.used_idx;
        if self.event_idx {
            let used_event = self.avail.read_u16(self.layout.used_event_offset());
            need_event(used_event, self.used_idx, old)
        } else {
            self.avail.read_u16(SplitLayout::AVAIL_FLAGS_OFFSET) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }
}

/// A packed virtqueue (§2.8).
pub struct PackedQueue {
    size: u16,
    ring: GuestSlice,
    /// Driver event suppression (the "driver area"): controls our notifications.
    driver_event: GuestSlice,
    /// Device event suppression (the "device area"): left at its reset value while polling;
    /// interrupt mode switches it ([`VirtQueue::enable_notifications`]).
    device_event: GuestSlice,
    event_idx: bool,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// `next_used` / `used_wrap` at the last publish.
    published_used: u16,
    published_wrap: bool,
    /// Slots each in-flight buffer id occupies (0: not in flight).
    id_slots: Box<[u16]>,
    /// First used descriptor written in this batch, whose flags are stored last.
    pending_first: Option<(u16, u16)>,
    /// The ring slots the last pop read (first slot, count), for the inflight copy.
    last_chain: (u16, u16),
}

impl PackedQueue {
    fn new(
        mem: &GuestMemory,
        size: u16,
        addrs: VringAddrs,
        base: VringBase,
        event_idx: bool,
    ) -> Result<Self, RingSetupError> {
        use pollux_virtio::ring::{PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN};
        let layout = PackedLayout::new(size)?;
        let ring = part(
            mem,
            "descriptor ring",
            addrs.desc_uva,
            layout.desc_ring_bytes(),
            PACKED_DESC_ALIGN,
        )?;
        let event_bytes = PackedEvent::SIZE_BYTES as u64;
        let driver_event = part(
            mem,
            "driver event area",
            addrs.avail_uva,
            event_bytes,
            PACKED_EVENT_ALIGN,
        )?;
        let device_event = part(
            mem,
            "device event area",
            addrs.used_uva,
            event_bytes,
            PACKED_EVENT_ALIGN,
        )?;
        let next = (base.num & 0x7fff) % size;
        let wrap = base.num & 0x8000 != 0 || base.num == 0;
        Ok(Self {
            size,
            ring,
            driver_event,
            device_event,
            event_idx,
            next_avail: next,
            avail_wrap: wrap,
            next_used: next,
            used_wrap: wrap,
            published_used: next,
            published_wrap: wrap,
            id_slots: vec![0u16; usize::from(size)].into_boxed_slice(),
            pending_first: None,
            last_chain: (0, 0),
        })
    }

    #[inline]
    fn read(&self, slot: u16) -> PackedDesc {
        PackedDesc::from_le_bytes(read_desc(&self.ring, u32::from(slot)))
    }

    #[inline]
    fn advance(&self, slot: u16, wrap: bool, by: u16) -> (u16, bool) {
        let next = u32::from(slot) + u32::from(by);
        if next >= u32::from(self.size) {
            ((next - u32::from(self.size)) as u16, !wrap)
        } else {
            (next as u16, wrap)
        }
    }

    fn pop(&mut self, mem: &GuestMemory, out: &mut Vec<Desc>) -> Option<Result<u16, PopError>> {
        // The flags first, in one 16-bit load; the rest of the descriptor only after the
        // acquire fence: the driver writes it before the flags (§2.8.21), and one 16-byte copy
        // could see new flags with an old address.
        let flags = self
            .ring
            .read_u16(u64::from(self.next_avail) * DESC_SIZE_BYTES as u64 + 14);
        let probe = PackedDesc {
            flags,
            ..PackedDesc::default()
        };
        if !probe.is_avail(self.avail_wrap) {
            return None;
        }
        fence(Ordering::Acquire);
        let start = self.next_avail;
        let (mut slot, mut wrap) = (self.next_avail, self.avail_wrap);
        let mut walk = PackedChainWalk::new(self.size);
        let mut desc = self.read(slot);
        loop {
            if walk.taken >= self.size {
                walk.too_long();
                break;
            }
            if walk.taken > 0 {
                desc = self.read(slot);
            }
            (slot, wrap) = self.advance(slot, wrap, 1);
            if !walk.step(mem, &desc, out) {
                break;
            }
        }
        let taken = walk.taken;
        let result = walk.finish();
        self.last_chain = (start, taken);
        self.next_avail = slot;
        self.avail_wrap = wrap;
        // The buffer id sits in the last descriptor of the chain (§2.8.6).
        let id = desc.id;
        if id >= self.size {
            return Some(Err(PopError {
                head: None,
                error: ChainError::IdOutOfRange {
                    id,
                    size: self.size,
                },
            }));
        }
        let entry = &mut self.id_slots[usize::from(id)];
        if *entry != 0 {
            return Some(Err(PopError {
                head: None,
                error: ChainError::IdInFlight { id },
            }));
        }
        *entry = taken;
        Some(result.map(|()| id).map_err(|error| PopError {
            head: Some(id),
            error,
        }))
    }

    fn push_used(&mut self, id: u16, len: u32) {
        let Some(entry) = self.id_slots.get_mut(usize::from(id)) else {
            return;
        };
        let slots = std::mem::take(entry);
        if slots == 0 {
            tracing::error!(id, "vhost: used buffer id that is not in flight");
            return;
        }
        let offset = u64::from(self.next_used) * DESC_SIZE_BYTES as u64;
        // addr (ignored by the driver), len, id; the flags after them.
        let mut bytes = [0u8; 12];
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        self.ring.write_array(offset, bytes);
        self.ring.write_array(offset + 12, id.to_le_bytes());
        let flags =
            packed_used_flags(self.used_wrap) | if len > 0 { VIRTQ_DESC_F_WRITE } else { 0 };
        if self.pending_first.is_none() {
            // The batch's first flags are stored at publish, after every other entry: the
            // driver then sees the whole batch at once (§2.8.21, what SPDK and DPDK do).
            self.pending_first = Some((self.next_used, flags));
        } else {
            fence(Ordering::Release);
            self.ring.write_array(offset + 14, flags.to_le_bytes());
        }
        (self.next_used, self.used_wrap) = self.advance(self.next_used, self.used_wrap, slots);
    }

    fn publish_used(&mut self) -> bool {
        let Some((slot, flags)) = self.pending_first.take() else {
            return false;
        };
        fence(Ordering::Release);
        self.ring.write_array(
            u64::from(slot) * DESC_SIZE_BYTES as u64 + 14,
            flags.to_le_bytes(),
        );
        fence(Ordering::SeqCst);
        let event = PackedEvent {
            off_wrap: self.driver_event.read_u16(0),
            flags: self.driver_event.read_u16(2),
        };
        let (old, old_wrap) = (self.published_used, self.published_wrap);
        self.published_used = self.next_used;
        self.published_wrap = self.used_wrap;
        match event.flags {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                // Positions on one scale across the wrap (as DPDK's vhost_need_event use).
                let size = i32::from(self.size);
                let new = i32::from(self.next_used);
                let mut old = i32::from(old);
                if old_wrap != self.used_wrap {
                    old -= size;
                }
                let mut off = i32::from(event.offset());
                if event.wrap() != self.used_wrap {
                    off -= size;
                }
                need_event(off as u16, new as u16, old as u16)
            }
            _ => true,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::guest_memory::test_util::memory;
    use pollux_virtio::ring::{packed_avail_flags, VIRTQ_DESC_F_NEXT};

    pub const GPA: u64 = 0x10_0000;
    pub const UVA: u64 = GPA + 0x1000_0000_0000;
    pub const DESC: u64 = GPA;
    pub const AVAIL: u64 = GPA + 0x1000;
    pub const USED: u64 = GPA + 0x2000;
    pub const DATA: u64 = GPA + 0x4000;

    pub fn addrs() -> VringAddrs {
        VringAddrs {
            desc_uva: UVA,
            avail_uva: UVA + 0x1000,
            used_uva: UVA + 0x2000,
        }
    }

    /// A test driver writing raw split ring entries.
    pub struct SplitDriver {
        pub size: u16,
        pub avail_idx: u16,
    }

    impl SplitDriver {
        pub fn desc(&self, mem: &GuestMemory, index: u16, d: SplitDesc) {
            let mut h = 0;
            mem.write_bytes(DESC + 16 * u64::from(index), &d.to_le_bytes(), &mut h)
                .expect("desc");
        }
        pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let mut h = 0;
            let layout = SplitLayout::new(self.size).expect("layout");
            mem.write_bytes(
                AVAIL + layout.avail_entry_offset(self.avail_idx),
                &head.to_le_bytes(),
                &mut h,
            )
            .expect("avail entry");
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_bytes(AVAIL + 2, &self.avail_idx.to_le_bytes(), &mut h)
                .expect("avail idx");
        }
    }

    fn split(mem: &GuestMemory, size: u16) -> VirtQueue {
        VirtQueue::new(mem, size, addrs(), VringBase::default(), false, true).expect("queue")
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> SplitDesc {
        SplitDesc {
            addr,
            len,
            flags,
            next,
        }
    }

    #[test]
    fn split_chain_walks_and_used_entries_publish() {
        let (mem, _f) = memory(GPA, 0x10000);
        let mut q = split(&mem, 8);
        let mut drv = SplitDriver {
            size: 8,
            avail_idx: 0,
        };
        drv.desc(&mem, 0, d(DATA, 16, VIRTQ_DESC_F_NEXT, 1));
        drv.desc(
            &mem,
            1,
            d(DATA + 512, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
        );
        drv.desc(&mem, 2, d(DATA + 2048, 1, VIRTQ_DESC_F_WRITE, 0));
        drv.publish(&mem, 0);
        let mut out = Vec::new();
        assert_eq!(q.pop(&mem, &mut out), Some(Ok(0)));
        assert_eq!(out.len(), 3);
        assert!(out[1].write && !out[0].write);
        assert_eq!(q.pop(&mem, &mut out), None);
        q.push_used(0, 513);
        assert!(q.publish_used(), "used_event 0 crossed");
        let mut h = 0;
        let idx = mem.read_array::<2>(USED + 2, &mut h).expect("used idx");
        assert_eq!(u16::from_le_bytes(idx), 1);
        let elem = mem.read_array::<8>(USED + 4, &mut h).expect("elem");
        assert_eq!(UsedElem::from_le_bytes(elem), UsedElem { id: 0, len: 513 });
        assert!(!q.publish_used(), "nothing new");
    }

    #[test]
    fn hostile_split_chains_are_refused() {
        let (mem, _f) = memory(GPA, 0x10000);
        let mut q = split(&mem, 8);
        let mut drv = SplitDriver {
            size: 8,
            avail_idx: 0,
        };
        let mut out = Vec::new();
        // A loop: 0 -> 1 -> 0.
        drv.desc(&mem, 0, d(DATA, 16, VIRTQ_DESC_F_NEXT, 1));
        drv.desc(&mem, 1, d(DATA, 16, VIRTQ_DESC_F_NEXT, 0));
        drv.publish(&mem, 0);
        let err = q.pop(&mem, &mut out).expect("one").expect_err("loop");
        assert_eq!(err.head, Some(0));
        assert!(matches!(err.error, ChainError::TooLong { limit: 8 }));
        // A head out of range.
        drv.publish(&mem, 9);
        let err = q.pop(&mem, &mut out).expect("one").expect_err("head");
        assert_eq!(err.head, None);
        // next out of range.
        drv.desc(&mem, 2, d(DATA, 16, VIRTQ_DESC_F_NEXT, 200));
        drv.publish(&mem, 2);
        assert!(matches!(
            q.pop(&mem, &mut out).expect("one").expect_err("next").error,
            ChainError::NextOutOfRange { .. }
        ));
        // An indirect table beyond guest memory.
        drv.desc(&mem, 3, d(GPA + 0x10_0000, 64, VIRTQ_DESC_F_INDIRECT, 0));
        drv.publish(&mem, 3);
        assert!(matches!(
            q.pop(&mem, &mut out).expect("one").expect_err("oob").error,
            ChainError::IndirectOutOfBounds { .. }
        ));
        // A huge indirect length.
        drv.desc(&mem, 3, d(DATA, 0xffff_fff0, VIRTQ_DESC_F_INDIRECT, 0));
        drv.publish(&mem, 3);
        assert!(matches!(
            q.pop(&mem, &mut out).expect("one").expect_err("huge").error,
            ChainError::BadIndirectLen { .. }
        ));
        // A nested indirect table.
        let mut h = 0;
        mem.write_bytes(
            DATA,
            &d(DATA + 0x100, 32, VIRTQ_DESC_F_INDIRECT, 0).to_le_bytes(),
            &mut h,
        )
        .expect("table");
        drv.desc(&mem, 4, d(DATA, 16, VIRTQ_DESC_F_INDIRECT, 0));
        drv.publish(&mem, 4);
        assert!(matches!(
            q.pop(&mem, &mut out)
                .expect("one")
                .expect_err("nested")
                .error,
            ChainError::NestedIndirect
        ));
        // A loop inside an indirect table.
        mem.write_bytes(
            DATA,
            &d(DATA, 16, VIRTQ_DESC_F_NEXT, 1).to_le_bytes(),
            &mut h,
        )
        .expect("t0");
        mem.write_bytes(
            DATA + 16,
            &d(DATA, 16, VIRTQ_DESC_F_NEXT, 0).to_le_bytes(),
            &mut h,
        )
        .expect("t1");
        drv.desc(&mem, 5, d(DATA, 32, VIRTQ_DESC_F_INDIRECT, 0));
        drv.publish(&mem, 5);
        assert!(matches!(
            q.pop(&mem, &mut out)
                .expect("one")
                .expect_err("indirect loop")
                .error,
            ChainError::TooLong { limit: 2 }
        ));
        // A valid indirect chain afterwards still works.
        mem.write_bytes(
            DATA + 16,
            &d(DATA + 0x200, 1, VIRTQ_DESC_F_WRITE, 0).to_le_bytes(),
            &mut h,
        )
        .expect("t1");
        drv.publish(&mem, 5);
        assert_eq!(q.pop(&mem, &mut out), Some(Ok(5)));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn ring_parts_outside_memory_fail_setup() {
        let (mem, _f) = memory(GPA, 0x10000);
        let bad = VringAddrs {
            used_uva: UVA + 0xffff,
            ..addrs()
        };
        assert!(VirtQueue::new(&mem, 8, bad, VringBase::default(), false, false).is_err());
        assert!(VirtQueue::new(&mem, 100, addrs(), VringBase::default(), false, false).is_err());
        let misaligned = VringAddrs {
            desc_uva: UVA + 8,
            ..addrs()
        };
        assert!(VirtQueue::new(&mem, 8, misaligned, VringBase::default(), false, false).is_err());
    }

    fn packed_desc(mem: &GuestMemory, slot: u16, pd: PackedDesc) {
        let mut h = 0;
        mem.write_bytes(DESC + 16 * u64::from(slot), &pd.to_le_bytes(), &mut h)
            .expect("desc");
    }

    #[test]
    fn packed_chains_ids_and_wrap() {
        let (mem, _f) = memory(GPA, 0x10000);
        let mut q = VirtQueue::new(&mem, 4, addrs(), VringBase::default(), true, false).expect("q");
        let avail = packed_avail_flags(true);
        let mut out = Vec::new();
        assert_eq!(q.pop(&mem, &mut out), None);
        // Chain of 3 with id 2.
        packed_desc(
            &mem,
            0,
            PackedDesc {
                addr: DATA,
                len: 16,
                id: 2,
                flags: avail | VIRTQ_DESC_F_NEXT,
            },
        );
        packed_desc(
            &mem,
            1,
            PackedDesc {
                addr: DATA + 512,
                len: 512,
                id: 2,
                flags: avail | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            },
        );
        packed_desc(
            &mem,
            2,
            PackedDesc {
                addr: DATA + 2048,
                len: 1,
                id: 2,
                flags: avail | VIRTQ_DESC_F_WRITE,
            },
        );
        assert_eq!(q.pop(&mem, &mut out), Some(Ok(2)));
        assert_eq!(out.len(), 3);
        // Out-of-range id: consumed and dropped.
        packed_desc(
            &mem,
            3,
            PackedDesc {
                addr: DATA,
                len: 16,
                id: 77,
                flags: avail,
            },
        );
        let err = q.pop(&mem, &mut out).expect("one").expect_err("id");
        assert_eq!(err.head, None);
        assert!(matches!(err.error, ChainError::IdOutOfRange { id: 77, .. }));
        // Wrapped: the driver's counter flipped, slot 0 again, id 2 still in flight.
        let avail2 = packed_avail_flags(false);
        packed_desc(
            &mem,
            0,
            PackedDesc {
                addr: DATA,
                len: 16,
                id: 2,
                flags: avail2,
            },
        );
        assert!(matches!(
            q.pop(&mem, &mut out).expect("one").expect_err("dup").error,
            ChainError::IdInFlight { id: 2 }
        ));
        q.push_used(2, 513);
        assert!(q.publish_used(), "notifications enabled by default");
        let mut h = 0;
        let used = PackedDesc::from_le_bytes(mem.read_array::<16>(DESC, &mut h).expect("used"));
        assert_eq!((used.id, used.len), (2, 513));
        assert!(used.is_used(true));
        // Nested indirect in a packed table.
        mem.write_bytes(
            DATA,
            &PackedDesc {
                addr: DATA,
                len: 16,
                id: 0,
                flags: VIRTQ_DESC_F_INDIRECT,
            }
            .to_le_bytes(),
            &mut h,
        )
        .expect("table");
        packed_desc(
            &mem,
            1,
            PackedDesc {
                addr: DATA,
                len: 16,
                id: 1,
                flags: avail2 | VIRTQ_DESC_F_INDIRECT,
            },
        );
        assert!(matches!(
            q.pop(&mem, &mut out)
                .expect("one")
                .expect_err("nested")
                .error,
            ChainError::NestedIndirect
        ));
    }
}
