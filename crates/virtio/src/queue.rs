//! The driver side of a virtqueue, split (virtio 1.2 §2.7) or packed (§2.8), in DMA memory.
//!
//! Every offset comes from [`crate::ring`] (the layouts the device side uses too); every
//! access goes through [`crate::mem::RingMem`] (volatile, bounds-checked).
//!
//! - **Add** ([`Virtqueue::add`]): a chain of buffers for one request, tagged with the
//!   caller's `token` (its request slot). Nothing is visible to the device yet.
//! - **Publish** ([`Virtqueue::publish`]): one store makes the whole batch available, the
//!   split ring's `avail.idx` or, packed, the flags of the batch's first head (the device
//!   reads descriptors in ring order, so it cannot see the later heads first). Returns
//!   whether the device asked to be notified (`VIRTQ_USED_F_NO_NOTIFY`, or with EVENT_IDX
//!   `avail_event` / the packed device event suppression): a polling back-end gets no kick.
//! - **Poll** ([`Virtqueue::poll_used`]): at most `max` used entries per call (STYLE #4),
//!   each checked: its id names a chain in flight, else the ring is broken and the queue
//!   reports it (the device is hostile, STYLE #3), never indexes out of bounds.
//! - Used-buffer notifications (device -> driver interrupts) are suppressed while the driver
//!   polls. Split: `VIRTQ_AVAIL_F_NO_INTERRUPT`, or with EVENT_IDX `used_event` kept just
//!   behind the driver's position; packed: `RING_EVENT_FLAGS_DISABLE`. An interrupt-mode
//!   owner that is about to sleep with chains in flight turns them on
//!   ([`Virtqueue::enable_used_notifications`]: the flag cleared, `used_event` at the next
//!   entry, packed `RING_EVENT_FLAGS_ENABLE`) and then looks at the used ring once more, so
//!   that an entry the device published before it saw the change is not slept through
//!   (virtio 1.2 §2.7.10 / §2.8.10); the next poll that reaps turns them off again.
//!
//! Nothing allocates after [`Virtqueue::new`]: descriptor free lists, chain lengths and
//! tokens live in arrays of the queue size.

use std::sync::Arc;

use pollux_env::dma::DmaMemory;

use crate::error::VirtioError;
use crate::mem::{fence_acquire, fence_full, fence_release, RingMem};
use crate::ring::{
    need_event, packed_avail_flags, PackedDesc, PackedEvent, PackedLayout, SplitLayout, UsedElem,
    DESC_SIZE_BYTES, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};

/// Entries of an indirect table [`Virtqueue::add_indirect`] writes at most (a virtio-blk
/// request with one data buffer: header, data, status; or a discard's header, segment, status).
pub const MAX_INDIRECT_ENTRIES: usize = 3;

/// Parts are placed on their own cache lines: the driver writes the descriptors and the
/// avail ring, the device the used ring (STYLE #11).
const PART_ALIGN_BYTES: u64 = 64;

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// The address the device is given (the process virtual address, see `crate::backend`).
    pub addr: u64,
    pub len_bytes: u32,
    /// The device writes it (a read's data, the status byte); otherwise it only reads it.
    pub device_writes: bool,
}

/// The three guest addresses SET_VRING_ADDR carries: split descriptor table, avail ring,
/// used ring; packed descriptor ring, driver event suppression, device event suppression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// Why a chain was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// Not enough free descriptors now: poll and retry (backpressure, STYLE #7).
    #[error("virtqueue full: {needed} descriptors needed, {free} free")]
    Full { needed: u16, free: u16 },
    /// The chain can never fit: longer than the queue, or empty.
    #[error("a chain of {buffers} buffers does not fit a queue of {queue_size}")]
    TooLong { buffers: usize, queue_size: u16 },
}

/// Split or packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFormat {
    Split,
    Packed,
}

/// Shadow state of the chains in flight, indexed by split head / packed buffer id.
struct Chains {
    token: Box<[u16]>,
    len: Box<[u16]>,
    in_flight: Box<[bool]>,
}

impl Chains {
    fn new(size: u16) -> Self {
        let n = usize::from(size);
        Self {
            token: vec![0; n].into_boxed_slice(),
            len: vec![0; n].into_boxed_slice(),
            in_flight: vec![false; n].into_boxed_slice(),
        }
    }
}

struct SplitQueue {
    layout: SplitLayout,
    avail_offset: u64,
    used_offset: u64,
    /// Driver-private copy of each descriptor's `next` (the free list and chain walks never
    /// read the shared table back: the device could have changed it).
    next: Box<[u16]>,
    free_head: u16,
    /// The driver's `avail.idx`, free running; `published_idx` is what the device sees.
    avail_idx: u16,
    published_idx: u16,
    last_used_idx: u16,
}

struct PackedQueue {
    layout: PackedLayout,
    driver_event_offset: u64,
    device_event_offset: u64,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// Free buffer ids (a stack).
    free_ids: Vec<u16>,
    /// The batch's first head, whose flags are written at publish: (position, flags).
    deferred_head: Option<(u16, u16)>,
    /// Descriptors added since the last publish (for the EVENT_IDX check).
    added_since_publish: u16,
}

enum Ring {
    Split(SplitQueue),
    Packed(PackedQueue),
}

/// One virtqueue, driver side. Owned by one thread (a bdev channel); see the module docs.
pub struct Virtqueue {
    index: u16,
    size: u16,
    event_idx: bool,
    mem: RingMem,
    ring: Ring,
    chains: Chains,
    num_free: u16,
    chains_in_flight: u16,
    /// Used-buffer notifications are asked for (interrupt mode, waiting).
    used_notifications: bool,
}

impl std::fmt::Debug for Virtqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virtqueue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("format", &self.format())
            .field("event_idx", &self.event_idx)
            .field("chains_in_flight", &self.chains_in_flight)
            .finish()
    }
}

fn align_up(value: u64) -> u64 {
    value.next_multiple_of(PART_ALIGN_BYTES)
}

impl Virtqueue {
    /// A queue of `size` entries (a power of two for split) with its rings in `dma`.
    /// `event_idx`: VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn new(
        dma: &Arc<DmaMemory>,
        index: u16,
        size: u16,
        format: RingFormat,
        event_idx: bool,
    ) -> Result<Self, VirtioError> {
        let layout_error = |source| VirtioError::Layout {
            queue_size: size,
            source,
        };
        let (len_bytes, ring) = match format {
            RingFormat::Split => {
                let layout = SplitLayout::new(size).map_err(layout_error)?;
                let avail_offset = align_up(layout.desc_table_bytes());
                let used_offset = align_up(avail_offset + layout.avail_ring_bytes());
                let len = used_offset + layout.used_ring_bytes();
                let next: Box<[u16]> = (1..=size).collect();
                (
                    len,
                    Ring::Split(SplitQueue {
                        layout,
                        avail_offset,
                        used_offset,
                        next,
                        free_head: 0,
                        avail_idx: 0,
                        published_idx: 0,
                        last_used_idx: 0,
                    }),
                )
            }
            RingFormat::Packed => {
                let layout = PackedLayout::new(size).map_err(layout_error)?;
                let driver_event_offset = align_up(layout.desc_ring_bytes());
                let device_event_offset = driver_event_offset + PART_ALIGN_BYTES;
                (
                    device_event_offset + PART_ALIGN_BYTES,
                    Ring::Packed(PackedQueue {
                        layout,
                        driver_event_offset,
                        device_event_offset,
                        next_avail: 0,
                        avail_wrap: true,
                        next_used: 0,
                        used_wrap: true,
                        free_ids: (0..size).rev().collect(),
                        deferred_head: None,
                        added_since_publish: 0,
                    }),
                )
            }
        };
        let len_bytes = len_bytes as usize;
        let mut buf = dma
            .alloc(len_bytes, 4096, None)
            .map_err(|source| VirtioError::Alloc {
                what: "a virtqueue's rings",
                len_bytes,
                source,
            })?;
        buf.fill(0, len_bytes, 0)
            .map_err(|source| VirtioError::Alloc {
                what: "a virtqueue's rings",
                len_bytes,
                source,
            })?;
        let mut queue = Self {
            index,
            size,
            event_idx,
            mem: RingMem::new(buf),
            ring,
            chains: Chains::new(size),
            num_free: size,
            chains_in_flight: 0,
            used_notifications: false,
        };
        queue.suppress_used_notifications();
        Ok(queue)
    }

    fn suppress_used_notifications(&mut self) {
        match &self.ring {
            Ring::Split(split) => {
                let offset = split.avail_offset + SplitLayout::AVAIL_FLAGS_OFFSET;
                // With EVENT_IDX the flag is ignored (§2.7.10) and `used_event` does the
                // job: 0xffff stays behind the device's index until the first poll moves it.
                if self.event_idx {
                    let used_event = split.avail_offset + split.layout.used_event_offset();
                    self.mem
                        .write_u16(used_event, split.last_used_idx.wrapping_sub(1));
                } else {
                    self.mem.write_u16(offset, VIRTQ_AVAIL_F_NO_INTERRUPT);
                }
            }
            Ring::Packed(packed) => {
                // Driver event suppression (§2.8.10): no used-buffer notifications.
                let offset = packed.driver_event_offset + PackedEvent::FLAGS_OFFSET;
                self.mem.write_u16(offset, RING_EVENT_FLAGS_DISABLE);
            }
        }
    }

    /// Asks the device for a used-buffer notification (the call eventfd) when it next
    /// returns a chain, then re-checks the ring: true when a used entry is already there (the
    /// device may have published it before it saw the request, and will not notify for it:
    /// poll instead of sleeping). The full fence orders the request before the re-check, as
    /// the device orders its used-index store before reading the request (§2.7.10, §2.8.10).
    pub fn enable_used_notifications(&mut self) -> bool {
        if !self.used_notifications {
            self.used_notifications = true;
            match &self.ring {
                Ring::Split(split) => {
                    if self.event_idx {
                        // Notify when the entry at `last_used_idx` is used (§2.7.10).
                        let used_event = split.avail_offset + split.layout.used_event_offset();
                        self.mem.write_u16(used_event, split.last_used_idx);
                    } else {
                        let flags = split.avail_offset + SplitLayout::AVAIL_FLAGS_OFFSET;
                        self.mem.write_u16(flags, 0);
                    }
                }
                Ring::Packed(packed) => {
                    let flags = packed.driver_event_offset + PackedEvent::FLAGS_OFFSET;
                    self.mem.write_u16(flags, RING_EVENT_FLAGS_ENABLE);
                }
            }
        }
        fence_full();
        self.has_used()
    }

    /// Stops asking for used-buffer notifications (the owner polls again).
    pub fn disable_used_notifications(&mut self) {
        if std::mem::take(&mut self.used_notifications) {
            self.suppress_used_notifications();
        }
    }

    /// Whether a used entry waits (one index or flags load).
    fn has_used(&self) -> bool {
        match &self.ring {
            Ring::Split(split) => {
                self.mem
                    .read_u16(split.used_offset + SplitLayout::USED_IDX_OFFSET)
                    != split.last_used_idx
            }
            Ring::Packed(packed) => {
                if self.chains_in_flight == 0 {
                    return false;
                }
                let offset = packed.layout.desc_offset(packed.next_used);
                let flags = self.mem.read_u16(offset + PackedDesc::FLAGS_OFFSET);
                let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
                let used = flags & VIRTQ_DESC_F_USED != 0;
                avail == used && used == packed.used_wrap
            }
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn format(&self) -> RingFormat {
        match self.ring {
            Ring::Split(_) => RingFormat::Split,
            Ring::Packed(_) => RingFormat::Packed,
        }
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains added and not yet returned by [`Virtqueue::poll_used`].
    pub fn chains_in_flight(&self) -> u16 {
        self.chains_in_flight
    }

    /// Addresses for SET_VRING_ADDR.
    pub fn addresses(&self) -> RingAddresses {
        let base = self.mem.addr();
        match &self.ring {
            Ring::Split(split) => RingAddresses {
                desc: base,
                driver: base + split.avail_offset,
                device: base + split.used_offset,
            },
            Ring::Packed(packed) => RingAddresses {
                desc: base,
                driver: base + packed.driver_event_offset,
                device: base + packed.device_event_offset,
            },
        }
    }

    /// SET_VRING_BASE's value: the split `last_avail_idx`, or packed (vhost-user) the next
    /// avail position with the wrap counter in bit 15.
    pub fn base(&self) -> u16 {
        match &self.ring {
            Ring::Split(split) => split.published_idx,
            Ring::Packed(packed) => packed.next_avail | (u16::from(packed.avail_wrap) << 15),
        }
    }

    /// Adds one chain tagged `token`; visible to the device at the next [`Self::publish`].
    pub fn add(&mut self, token: u16, buffers: &[Buffer]) -> Result<(), AddError> {
        let needed = match u16::try_from(buffers.len()) {
            Ok(n) if n > 0 && n <= self.size => n,
            _ => {
                return Err(AddError::TooLong {
                    buffers: buffers.len(),
                    queue_size: self.size,
                })
            }
        };
        if needed > self.num_free {
            return Err(AddError::Full {
                needed,
                free: self.num_free,
            });
        }
        let id = match &mut self.ring {
            Ring::Split(split) => add_split(&mut self.mem, split, buffers),
            Ring::Packed(packed) => add_packed(&mut self.mem, packed, buffers),
        };
        let id = usize::from(id);
        self.chains.token[id] = token;
        self.chains.len[id] = needed;
        self.chains.in_flight[id] = true;
        self.num_free -= needed;
        self.chains_in_flight += 1;
        Ok(())
    }

    /// Adds one request as a single ring descriptor pointing at an indirect table
    /// (VIRTIO_RING_F_INDIRECT_DESC, §2.7.5.3 / §2.8.7): the table's entries, one per buffer,
    /// are written in this ring's format at `table_offset` of `table_mem` (driver-owned DMA
    /// memory the device can read, 16-aligned), then the ring descriptor. The chain takes one
    /// ring slot whatever its length, so a queue of N entries holds N requests, and the device
    /// reads the table (and a header placed beside it) from one cache line. Visible to the
    /// device at the next [`Self::publish`]. Only when the feature was negotiated.
    pub(crate) fn add_indirect(
        &mut self,
        token: u16,
        table_mem: &mut RingMem,
        table_offset: u64,
        buffers: &[Buffer],
    ) -> Result<(), AddError> {
        let entries = match u16::try_from(buffers.len()) {
            Ok(n) if n > 0 && usize::from(n) <= MAX_INDIRECT_ENTRIES => n,
            _ => {
                return Err(AddError::TooLong {
                    buffers: buffers.len(),
                    queue_size: self.size,
                })
            }
        };
        if self.num_free == 0 {
            return Err(AddError::Full { needed: 1, free: 0 });
        }
        let packed = matches!(self.ring, Ring::Packed(_));
        for (i, buffer) in buffers.iter().enumerate() {
            let offset = table_offset + (i * DESC_SIZE_BYTES) as u64;
            let more = i + 1 < buffers.len();
            let (low, high) = if packed {
                // §2.8.7: table entries are used in order; only WRITE is meaningful.
                packed_desc_words(buffer, 0, 0)
            } else {
                // Table entries chain through `next`, an index into the table (§2.7.5.3).
                split_desc_words(buffer, more, if more { i as u16 + 1 } else { 0 })
            };
            table_mem.write_u64(offset, low);
            table_mem.write_u64(offset + 8, high);
        }
        let table = Buffer {
            addr: table_mem.addr() + table_offset,
            len_bytes: u32::from(entries) * DESC_SIZE_BYTES as u32,
            device_writes: false,
        };
        // The table is ordered before the ring descriptor by the release fence `publish` (or
        // a later head's flags store) issues before making the descriptor available.
        let id = match &mut self.ring {
            Ring::Split(split) => {
                add_split_one(&mut self.mem, split, &table, VIRTQ_DESC_F_INDIRECT)
            }
            Ring::Packed(packed) => {
                add_packed_one(&mut self.mem, packed, &table, VIRTQ_DESC_F_INDIRECT)
            }
        };
        let id = usize::from(id);
        self.chains.token[id] = token;
        self.chains.len[id] = 1;
        self.chains.in_flight[id] = true;
        self.num_free -= 1;
        self.chains_in_flight += 1;
        Ok(())
    }

    /// Makes every chain added since the last call available with one store; returns
    /// whether the device wants a notification (kick) for them.
    pub fn publish(&mut self) -> bool {
        match &mut self.ring {
            Ring::Split(split) => {
                if split.avail_idx == split.published_idx {
                    return false;
                }
                fence_release();
                let old = split.published_idx;
                let new = split.avail_idx;
                self.mem
                    .write_u16(split.avail_offset + SplitLayout::AVAIL_IDX_OFFSET, new);
                split.published_idx = new;
                fence_full();
                if self.event_idx {
                    let avail_event = self
                        .mem
                        .read_u16(split.used_offset + split.layout.avail_event_offset());
                    need_event(avail_event, new, old)
                } else {
                    let flags = self
                        .mem
                        .read_u16(split.used_offset + SplitLayout::USED_FLAGS_OFFSET);
                    flags & VIRTQ_USED_F_NO_NOTIFY == 0
                }
            }
            Ring::Packed(packed) => {
                let Some((position, flags)) = packed.deferred_head.take() else {
                    return false;
                };
                fence_release();
                self.mem.write_u16(
                    packed.layout.desc_offset(position) + PackedDesc::FLAGS_OFFSET,
                    flags,
                );
                let added = std::mem::take(&mut packed.added_since_publish);
                fence_full();
                let off_wrap = self
                    .mem
                    .read_u16(packed.device_event_offset + PackedEvent::OFF_WRAP_OFFSET);
                let event_flags = self
                    .mem
                    .read_u16(packed.device_event_offset + PackedEvent::FLAGS_OFFSET);
                match event_flags {
                    RING_EVENT_FLAGS_DISABLE => false,
                    RING_EVENT_FLAGS_DESC if self.event_idx => {
                        // Linux's `virtqueue_kick_prepare_packed`: bring the event offset
                        // into the driver's wrap phase, then the split formula.
                        let new = packed.next_avail;
                        let old = new.wrapping_sub(added);
                        let mut event = off_wrap & 0x7fff;
                        if (off_wrap & 0x8000 != 0) != packed.avail_wrap {
                            event = event.wrapping_sub(self.size);
                        }
                        need_event(event, new, old)
                    }
                    RING_EVENT_FLAGS_ENABLE | RING_EVENT_FLAGS_DESC => true,
                    // A reserved value (§2.8.10): notifying is always safe.
                    _ => true,
                }
            }
        }
    }

    /// Hands at most `max` used chains to `on_used(token, len_bytes_written)`; returns how
    /// many. A used entry that names no chain in flight breaks the queue (an error; the
    /// entries before it were handed out).
    pub fn poll_used(
        &mut self,
        max: usize,
        mut on_used: impl FnMut(u16, u32),
    ) -> Result<usize, VirtioError> {
        let mut count = 0;
        match &mut self.ring {
            Ring::Split(split) => {
                let used_idx = self
                    .mem
                    .read_u16(split.used_offset + SplitLayout::USED_IDX_OFFSET);
                let ready = used_idx.wrapping_sub(split.last_used_idx);
                if ready > self.size {
                    return Err(VirtioError::RingBroken {
                        queue: self.index,
                        reason: format!(
                            "used.idx {used_idx} is {ready} entries ahead of the driver's {} \
                             in a queue of {} (virtio 1.2 §2.7.8)",
                            split.last_used_idx, self.size
                        ),
                    });
                }
                if ready == 0 {
                    return Ok(0);
                }
                fence_acquire();
                while count < max && split.last_used_idx != used_idx {
                    let entry =
                        split.used_offset + split.layout.used_entry_offset(split.last_used_idx);
                    let id = self.mem.read_u32(entry + UsedElem::ID_OFFSET);
                    let len = self.mem.read_u32(entry + UsedElem::LEN_OFFSET);
                    let head = check_id(&self.chains, self.index, self.size, id)?;
                    // Return the chain to the free list through the driver's own `next` copy.
                    let chain_len = self.chains.len[usize::from(head)];
                    let mut tail = head;
                    for _ in 1..chain_len {
                        tail = split.next[usize::from(tail)];
                    }
                    split.next[usize::from(tail)] = split.free_head;
                    split.free_head = head;
                    self.chains.in_flight[usize::from(head)] = false;
                    self.num_free += chain_len;
                    self.chains_in_flight -= 1;
                    split.last_used_idx = split.last_used_idx.wrapping_add(1);
                    count += 1;
                    on_used(self.chains.token[usize::from(head)], len);
                }
                if self.event_idx && count > 0 {
                    // Keep `used_event` behind the device: no used-buffer notification (an
                    // interrupt-mode owner asks again before it sleeps).
                    self.used_notifications = false;
                    let used_event = split.avail_offset + split.layout.used_event_offset();
                    self.mem
                        .write_u16(used_event, split.last_used_idx.wrapping_sub(1));
                }
            }
            Ring::Packed(packed) => {
                while count < max && self.chains_in_flight > 0 {
                    let offset = packed.layout.desc_offset(packed.next_used);
                    let flags = self.mem.read_u16(offset + PackedDesc::FLAGS_OFFSET);
                    let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
                    let used = flags & VIRTQ_DESC_F_USED != 0;
                    // §2.8.1: used when both bits equal the wrap counter.
                    if avail != used || used != packed.used_wrap {
                        break;
                    }
                    fence_acquire();
                    let id = self.mem.read_u16(offset + PackedDesc::ID_OFFSET);
                    let len = self.mem.read_u32(offset + PackedDesc::LEN_OFFSET);
                    let id = check_id(&self.chains, self.index, self.size, u32::from(id))?;
                    let chain_len = self.chains.len[usize::from(id)];
                    let next = u32::from(packed.next_used) + u32::from(chain_len);
                    if next >= u32::from(self.size) {
                        packed.next_used = (next - u32::from(self.size)) as u16;
                        packed.used_wrap = !packed.used_wrap;
                    } else {
                        packed.next_used = next as u16;
                    }
                    self.chains.in_flight[usize::from(id)] = false;
                    packed.free_ids.push(id);
                    self.num_free += chain_len;
                    self.chains_in_flight -= 1;
                    count += 1;
                    on_used(self.chains.token[usize::from(id)], len);
                }
            }
        }
        Ok(count)
    }
}

/// A used id must name a chain in flight (§2.7.8 / §2.8.21: the device returns only
/// buffers it was given).
fn check_id(chains: &Chains, queue: u16, size: u16, id: u32) -> Result<u16, VirtioError> {
    match u16::try_from(id) {
        Ok(id) if id < size && chains.in_flight[usize::from(id)] => Ok(id),
        _ => Err(VirtioError::RingBroken {
            queue,
            reason: format!("used id {id} names no buffer in flight (queue size {size})"),
        }),
    }
}

/// A split descriptor as the two little-endian 64-bit words of
/// [`SplitDesc::to_le_bytes`](crate::ring::SplitDesc::to_le_bytes)
/// (descriptors are 16-byte aligned: two single stores).
fn split_desc_words(buffer: &Buffer, more: bool, next: u16) -> (u64, u64) {
    let mut flags = 0u16;
    if buffer.device_writes {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    if more {
        flags |= VIRTQ_DESC_F_NEXT;
    }
    // `addr: le64`, then `len: le32, flags: le16, next: le16` (SplitDesc's layout).
    (
        buffer.addr,
        u64::from(buffer.len_bytes) | u64::from(flags) << 32 | u64::from(next) << 48,
    )
}

/// A packed descriptor as two little-endian 64-bit words: `addr`, then `len | id | flags`.
fn packed_desc_words(buffer: &Buffer, id: u16, mut flags: u16) -> (u64, u64) {
    if buffer.device_writes {
        flags |= VIRTQ_DESC_F_WRITE;
    }
    (
        buffer.addr,
        u64::from(buffer.len_bytes) | u64::from(id) << 32 | u64::from(flags) << 48,
    )
}

/// Writes one split descriptor (with `flags`, no NEXT) and its avail entry; returns the head.
fn add_split_one(mem: &mut RingMem, split: &mut SplitQueue, buffer: &Buffer, flags: u16) -> u16 {
    let head = split.free_head;
    let (low, high) = split_desc_words(buffer, false, 0);
    let offset = split.layout.desc_offset(head);
    mem.write_u64(offset, low);
    // `flags` sit in bits 32..48 of the second word (`len: le32, flags: le16, next: le16`).
    mem.write_u64(offset + 8, high | u64::from(flags) << 32);
    split.free_head = split.next[usize::from(head)];
    let slot = split.avail_offset + split.layout.avail_entry_offset(split.avail_idx);
    mem.write_u16(slot, head);
    split.avail_idx = split.avail_idx.wrapping_add(1);
    head
}

/// Writes one packed descriptor (with `flags` besides the avail bits, no NEXT): its flags
/// last, after a release fence, or deferred to `publish` for the batch's first head. Returns
/// the buffer id.
fn add_packed_one(mem: &mut RingMem, packed: &mut PackedQueue, buffer: &Buffer, flags: u16) -> u16 {
    // The caller checked there is a free descriptor, and ids are as many as descriptors.
    let id = packed.free_ids.pop().unwrap_or_default();
    let position = packed.next_avail;
    let mut head_flags = packed_avail_flags(packed.avail_wrap) | flags;
    if buffer.device_writes {
        head_flags |= VIRTQ_DESC_F_WRITE;
    }
    let offset = packed.layout.desc_offset(position);
    mem.write_u64(offset + PackedDesc::ADDR_OFFSET, buffer.addr);
    mem.write_u32(offset + PackedDesc::LEN_OFFSET, buffer.len_bytes);
    mem.write_u16(offset + PackedDesc::ID_OFFSET, id);
    packed.next_avail += 1;
    if packed.next_avail == packed.layout.queue_size() {
        packed.next_avail = 0;
        packed.avail_wrap = !packed.avail_wrap;
    }
    packed.added_since_publish = packed.added_since_publish.wrapping_add(1);
    if packed.deferred_head.is_none() {
        packed.deferred_head = Some((position, head_flags));
    } else {
        fence_release();
        mem.write_u16(offset + PackedDesc::FLAGS_OFFSET, head_flags);
    }
    id
}

/// Writes a split chain and its avail entry; returns the head. The caller checked that
/// `buffers.len()` descriptors are free.
fn add_split(mem: &mut RingMem, split: &mut SplitQueue, buffers: &[Buffer]) -> u16 {
    let head = split.free_head;
    let mut index = head;
    for (i, buffer) in buffers.iter().enumerate() {
        let next = split.next[usize::from(index)];
        let more = i + 1 < buffers.len();
        let (low, high) = split_desc_words(buffer, more, if more { next } else { 0 });
        let offset = split.layout.desc_offset(index);
        mem.write_u64(offset, low);
        mem.write_u64(offset + 8, high);
        if more {
            index = next;
        } else {
            split.free_head = next;
        }
    }
    let slot = split.avail_offset + split.layout.avail_entry_offset(split.avail_idx);
    mem.write_u16(slot, head);
    split.avail_idx = split.avail_idx.wrapping_add(1);
    head
}

/// Writes a packed chain; the head's flags are written last (after a release fence), or
/// deferred to `publish` for the batch's first head. Returns the buffer id.
fn add_packed(mem: &mut RingMem, packed: &mut PackedQueue, buffers: &[Buffer]) -> u16 {
    // The caller checked there are free descriptors, and ids are as many as descriptors.
    let id = packed.free_ids.pop().unwrap_or_default();
    let head_position = packed.next_avail;
    let mut head_flags = 0;
    for (i, buffer) in buffers.iter().enumerate() {
        let mut flags = packed_avail_flags(packed.avail_wrap);
        if buffer.device_writes {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        if i + 1 < buffers.len() {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        let offset = packed.layout.desc_offset(packed.next_avail);
        mem.write_u64(offset + PackedDesc::ADDR_OFFSET, buffer.addr);
        mem.write_u32(offset + PackedDesc::LEN_OFFSET, buffer.len_bytes);
        mem.write_u16(offset + PackedDesc::ID_OFFSET, id);
        if i == 0 {
            head_flags = flags;
        } else {
            fence_release();
            mem.write_u16(offset + PackedDesc::FLAGS_OFFSET, flags);
        }
        packed.next_avail += 1;
        if packed.next_avail == packed.layout.queue_size() {
            packed.next_avail = 0;
            packed.avail_wrap = !packed.avail_wrap;
        }
    }
    packed.added_since_publish = packed
        .added_since_publish
        .wrapping_add(buffers.len() as u16);
    if packed.deferred_head.is_none() {
        packed.deferred_head = Some((head_position, head_flags));
    } else {
        fence_release();
        mem.write_u16(
            packed.layout.desc_offset(head_position) + PackedDesc::FLAGS_OFFSET,
            head_flags,
        );
    }
    id
}

const _: () = assert!(DESC_SIZE_BYTES == 16);

#[cfg(test)]
mod tests;
