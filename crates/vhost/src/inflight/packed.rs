//! Inflight tracking of a packed virtqueue (virtio 1.2 §2.8), in the layout DPDK's
//! `rte_vhost`, SPDK and `libvhost-user` use for packed queues:
//!
//! ```text
//! header (32 bytes): features: le64, version: le16, desc_num: le16, free_head: le16,
//!     old_free_head: le16, used_idx: le16, old_used_idx: le16, used_wrap_counter: u8,
//!     old_used_wrap_counter: u8, padding: [u8; 7] (+3 bytes to the entries' alignment)
//! desc[desc_num] (32 bytes each): inflight: u8, padding: u8, num: le16, next: le16,
//!     last: le16, counter: le64, id: le16, flags: le16, len: le32, addr: le64
//! ```
//!
//! Why copies: a packed device writes used descriptors in order at its used position, over
//! the ring slots of chains that may still be in flight (a later request completing first).
//! So when a chain is taken, its ring descriptors (addr, len, flags, id) are copied into
//! entries of the region, and a restarted back-end resubmits from the copies, never from the
//! ring. A chain of `num` descriptors holds `num` entries linked through `next`; its head
//! entry carries `inflight`, `num`, `last` and `counter`. Free entries are linked through
//! `next` from `free_head`.
//!
//! Protocol of this back-end (it reads only what it wrote itself; the process keeps its own
//! copy of the free list and never reads the region while running):
//!
//! 1. a chain taken from the ring: its descriptors copied into free entries, the head's
//!    `num` / `last` / `counter` written, then (fence) `inflight = 1`, then `free_head` and
//!    `old_free_head` moved past it. A crash before `inflight = 1` leaves the chain
//!    unrecorded: it was the last one taken, so no used descriptor covers its slots and the
//!    ring still holds it where the restarted back-end reads on.
//! 2. before a batch of used descriptors is published: each chain of the batch pushed on the
//!    free list (its last entry's `next` = `free_head`, `free_head` = its head), then
//!    `used_idx` / `used_wrap_counter` set to the used position after the batch. `old_*` still
//!    hold the state before the batch.
//! 3. after the publish (the first used descriptor's flags store): each head's `inflight`
//!    cleared, then (fence) `old_free_head` / `old_used_idx` / `old_used_wrap_counter` set to
//!    the new values.
//!
//! Recovery: when `used_*` differ from `old_*`, the back-end died in 2 or 3. When
//! `old_free_head` already equals `free_head`, step 3 had cleared the whole batch (and may have
//! written half of `old_used_*`): the new position is kept. Otherwise the ring says
//! whether the batch was published: the slot at `old_used_idx` is where the batch's first used descriptor goes; its USED
//! flag equals `old_used_wrap_counter` only once it was published (before, it is the driver's
//! available descriptor of that lap, USED = !wrap; after, whatever the driver wrote next keeps
//! USED = wrap until the device's next lap, §2.8.1). Published: the batch (walked from
//! `free_head`, as many slots as the positions differ) is cleared and the new position kept.
//! Not published: the old position is kept and the batch stays in flight. Then every head
//! still marked is checked (entries in range, chains disjoint, `last` where the chain ends,
//! ids below the queue size and distinct) and resubmitted in `counter` order; the used
//! position is the recorded one and the avail position follows the slots still in flight
//! (every chain taken either is in flight or moved the used position by its slots). Any
//! inconsistency, and the region is restarted empty: nothing is resubmitted and the ring
//! starts from the front-end's SET_VRING_BASE.
//!
//! A driver that makes a chain available with an id out of range or already in flight loses
//! those slots (no used descriptor can return them); after a restart the avail position then
//! falls short of the slots taken. That driver's ring is broken either way.

use std::sync::atomic::{fence, Ordering};

use pollux_virtio::ring::PackedDesc;

use crate::guest_memory::{GuestMemory, GuestSlice};
use crate::queue::{ChainError, Desc, PackedChainWalk, PackedPosition, PopError, VirtQueue};

pub(super) const HEADER_BYTES: u64 = 32;
pub(super) const DESC_BYTES: u64 = 32;
const VERSION_OFFSET: u64 = 8;
const DESC_NUM_OFFSET: u64 = 10;
const FREE_HEAD_OFFSET: u64 = 12;
const OLD_FREE_HEAD_OFFSET: u64 = 14;
const USED_IDX_OFFSET: u64 = 16;
const OLD_USED_IDX_OFFSET: u64 = 18;
const USED_WRAP_OFFSET: u64 = 20;
const OLD_USED_WRAP_OFFSET: u64 = 21;
// Entry fields.
const E_INFLIGHT: u64 = 0;
const E_NUM: u64 = 2;
const E_NEXT: u64 = 4;
const E_LAST: u64 = 6;
const E_COUNTER: u64 = 8;
/// The copy of one ring descriptor: id, flags, len, addr (16 bytes, read and written whole).
const E_ID: u64 = 16;
const INFLIGHT_VERSION: u16 = 1;
/// `features` of a packed region: VIRTIO_F_RING_PACKED (a split region holds 0 there), so a
/// region written for the other layout reads as fresh.
const FEATURES_PACKED: u64 = 1 << pollux_virtio::features::VIRTIO_F_RING_PACKED;
/// "No entry" in the process's own lists (the region writes `desc_num` for it).
const NONE: u16 = u16::MAX;

/// Why a region was found inconsistent (it is then restarted empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackedRegionError {
    #[error("desc_num {found} is not the queue size {size}")]
    DescNum { found: u16, size: u16 },
    #[error("recorded used position {idx} (wrap {wrap}) is not below the queue size")]
    Position { idx: u16, wrap: u8 },
    #[error("the unfinished batch does not add up to the {slots} slots it published")]
    Batch { slots: u16 },
    #[error("in-flight entry {head}: {reason}")]
    Entry { head: u16, reason: &'static str },
    #[error("buffer id {id} recorded in flight twice")]
    DuplicateId { id: u16 },
}

/// What a restarting packed ring learns from the region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackedRecovery {
    /// Head entries to resubmit (region entries, not ring slots), oldest first.
    pub resubmit: Vec<u16>,
    /// Where the ring resumes: `None` (fresh or restarted region) keeps SET_VRING_BASE's.
    pub positions: Option<(PackedPosition, PackedPosition)>,
    /// The region was fresh (or reset by the front-end): nothing to recover.
    pub fresh: bool,
    /// The region was inconsistent and was restarted empty.
    pub refused: Option<PackedRegionError>,
}

/// One packed queue's part of the inflight region, and the process's own copy of its lists.
#[derive(Debug)]
pub struct PackedInflight {
    slice: GuestSlice,
    size: u16,
    counter: u64,
    /// Per entry: the next free entry (free) or the next entry of its chain (in use).
    link: Box<[u16]>,
    free_head: u16,
    free_count: u16,
    /// Per buffer id in flight: its head entry (`NONE`: not tracked).
    entry_of_id: Box<[u16]>,
    /// Per head entry: the chain's last entry, its length and its buffer id.
    last_of: Box<[u16]>,
    num_of: Box<[u16]>,
    id_of: Box<[u16]>,
}

fn entry_offset(entry: u16) -> u64 {
    HEADER_BYTES + DESC_BYTES * u64::from(entry)
}

impl PackedInflight {
    pub(super) fn new(slice: GuestSlice, size: u16) -> Self {
        let n = usize::from(size);
        Self {
            slice,
            size,
            counter: 0,
            link: vec![NONE; n].into_boxed_slice(),
            free_head: NONE,
            free_count: 0,
            entry_of_id: vec![NONE; n].into_boxed_slice(),
            last_of: vec![NONE; n].into_boxed_slice(),
            num_of: vec![0; n].into_boxed_slice(),
            id_of: vec![NONE; n].into_boxed_slice(),
        }
    }

    fn read_u8(&self, at: u64) -> u8 {
        self.slice.read_array::<1>(at)[0]
    }

    fn read_field(&self, entry: u16, field: u64) -> u16 {
        self.slice.read_u16(entry_offset(entry) + field)
    }

    fn write_field(&self, entry: u16, field: u64, value: u16) {
        self.slice.write_u16(entry_offset(entry) + field, value);
    }

    /// The region's encoding of a list end.
    fn region_index(&self, entry: u16) -> u16 {
        if entry == NONE {
            self.size
        } else {
            entry
        }
    }

    /// Reads the region at ring start. `start` is the position SET_VRING_BASE gave (kept in a
    /// fresh region); `ring_used_flag(idx)` reads the USED flag of the ring descriptor at slot
    /// `idx`.
    pub fn recover(
        &mut self,
        start: PackedPosition,
        ring_used_flag: impl Fn(u16) -> bool,
    ) -> PackedRecovery {
        let version = self.slice.read_u16(VERSION_OFFSET);
        let features = u64::from_le_bytes(self.slice.read_array::<8>(0));
        if version != INFLIGHT_VERSION || features != FEATURES_PACKED {
            self.restart(start);
            return PackedRecovery {
                fresh: true,
                ..PackedRecovery::default()
            };
        }
        match self.recover_checked(ring_used_flag) {
            Ok(recovery) => recovery,
            Err(error) => {
                self.restart(start);
                PackedRecovery {
                    refused: Some(error),
                    ..PackedRecovery::default()
                }
            }
        }
    }

    /// A region holding nothing in flight, at `start`, every entry free.
    fn restart(&mut self, start: PackedPosition) {
        self.slice.write_u16(VERSION_OFFSET, 0);
        fence(Ordering::Release);
        for entry in 0..self.size {
            let mut bytes = [0u8; DESC_BYTES as usize];
            bytes[E_NEXT as usize..E_NEXT as usize + 2].copy_from_slice(&(entry + 1).to_le_bytes());
            self.slice.write_array(entry_offset(entry), bytes);
            self.link[usize::from(entry)] = if entry + 1 < self.size {
                entry + 1
            } else {
                NONE
            };
        }
        self.entry_of_id.fill(NONE);
        self.last_of.fill(NONE);
        self.num_of.fill(0);
        self.id_of.fill(NONE);
        self.free_head = if self.size > 0 { 0 } else { NONE };
        self.free_count = self.size;
        self.counter = 0;
        self.slice.write_array(0, FEATURES_PACKED.to_le_bytes());
        self.slice.write_u16(DESC_NUM_OFFSET, self.size);
        self.slice.write_u16(FREE_HEAD_OFFSET, 0);
        self.slice.write_u16(OLD_FREE_HEAD_OFFSET, 0);
        self.write_position(start, true);
        fence(Ordering::Release);
        self.slice.write_u16(VERSION_OFFSET, INFLIGHT_VERSION);
    }

    fn write_position(&self, at: PackedPosition, both: bool) {
        self.slice.write_u16(USED_IDX_OFFSET, at.idx);
        self.slice
            .write_array(USED_WRAP_OFFSET, [u8::from(at.wrap)]);
        if both {
            self.slice.write_u16(OLD_USED_IDX_OFFSET, at.idx);
            self.slice
                .write_array(OLD_USED_WRAP_OFFSET, [u8::from(at.wrap)]);
        }
    }

    fn read_position(
        &self,
        idx_at: u64,
        wrap_at: u64,
    ) -> Result<PackedPosition, PackedRegionError> {
        let idx = self.slice.read_u16(idx_at);
        let wrap = self.read_u8(wrap_at);
        if idx >= self.size || wrap > 1 {
            return Err(PackedRegionError::Position { idx, wrap });
        }
        Ok(PackedPosition {
            idx,
            wrap: wrap == 1,
        })
    }

    fn recover_checked(
        &mut self,
        ring_used_flag: impl Fn(u16) -> bool,
    ) -> Result<PackedRecovery, PackedRegionError> {
        let size = self.size;
        let found = self.slice.read_u16(DESC_NUM_OFFSET);
        if found != size {
            return Err(PackedRegionError::DescNum { found, size });
        }
        let new = self.read_position(USED_IDX_OFFSET, USED_WRAP_OFFSET)?;
        let old = self.read_position(OLD_USED_IDX_OFFSET, OLD_USED_WRAP_OFFSET)?;
        let mut used = old;
        if new != old {
            // Died in step 2 or 3. `old_free_head` reaches `free_head` only once step 3 has
            // cleared the batch (in step 2 `free_head` is a head of the batch, which no free
            // list held): the publish happened, and `old_used_*` may be half written.
            // Otherwise the ring says whether the batch was published (§2.8.1).
            let cleared =
                self.slice.read_u16(FREE_HEAD_OFFSET) == self.slice.read_u16(OLD_FREE_HEAD_OFFSET);
            if cleared {
                used = new;
            } else if ring_used_flag(old.idx) == old.wrap {
                let slots = old.distance_to(new, size);
                if slots > size {
                    return Err(PackedRegionError::Batch { slots });
                }
                self.clear_batch(slots)?;
                used = new;
            }
        }
        // Every head still marked: its chain checked, its entries claimed once.
        let n = usize::from(size);
        let mut claimed = vec![false; n];
        let mut pending: Vec<(u64, u16)> = Vec::new();
        let mut slots_in_flight = 0u32;
        for head in 0..size {
            match self.read_u8(entry_offset(head) + E_INFLIGHT) {
                0 => continue,
                1 => {}
                _ => {
                    return Err(PackedRegionError::Entry {
                        head,
                        reason: "inflight is neither 0 nor 1",
                    })
                }
            }
            let bad = |reason| PackedRegionError::Entry { head, reason };
            let num = self.read_field(head, E_NUM);
            if num == 0 || num > size {
                return Err(bad("num is 0 or above the queue size"));
            }
            let mut entry = head;
            for step in 0..num {
                if entry >= size {
                    return Err(bad("chain entry out of range"));
                }
                if std::mem::replace(&mut claimed[usize::from(entry)], true) {
                    return Err(bad("chain entry shared with another chain"));
                }
                if step + 1 < num {
                    let next = self.read_field(entry, E_NEXT);
                    self.link[usize::from(entry)] = next;
                    entry = next;
                }
            }
            if self.read_field(head, E_LAST) != entry {
                return Err(bad("last is not where the chain ends"));
            }
            let id = self.read_field(entry, E_ID);
            if id >= size {
                return Err(bad("buffer id not below the queue size"));
            }
            if self.entry_of_id[usize::from(id)] != NONE {
                return Err(PackedRegionError::DuplicateId { id });
            }
            self.entry_of_id[usize::from(id)] = head;
            self.last_of[usize::from(head)] = entry;
            self.num_of[usize::from(head)] = num;
            self.id_of[usize::from(head)] = id;
            slots_in_flight += u32::from(num);
            let counter =
                u64::from_le_bytes(self.slice.read_array::<8>(entry_offset(head) + E_COUNTER));
            pending.push((counter, head));
        }
        // Disjoint chains of at least one entry each: at most `size` slots in all.
        debug_assert!(slots_in_flight <= u32::from(size));
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |(c, _)| c.wrapping_add(1));
        // The free list: every entry no chain claims, written back in order.
        self.free_head = NONE;
        self.free_count = 0;
        for entry in (0..size).rev() {
            if !claimed[usize::from(entry)] {
                self.link[usize::from(entry)] = self.free_head;
                self.write_field(entry, E_NEXT, self.region_index(self.free_head));
                self.free_head = entry;
                self.free_count += 1;
            }
        }
        let free_head = self.region_index(self.free_head);
        self.slice.write_u16(FREE_HEAD_OFFSET, free_head);
        self.slice.write_u16(OLD_FREE_HEAD_OFFSET, free_head);
        self.write_position(used, true);
        fence(Ordering::Release);
        let avail = used.advance(slots_in_flight as u16, size);
        Ok(PackedRecovery {
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
            positions: Some((avail, used)),
            fresh: false,
            refused: None,
        })
    }

    /// Clears the in-flight marks of the batch published over `slots` ring slots (step 3 of
    /// a back-end that died before finishing it).
    fn clear_batch(&mut self, slots: u16) -> Result<(), PackedRegionError> {
        let size = self.size;
        let mut head = self.slice.read_u16(FREE_HEAD_OFFSET);
        let mut left = slots;
        // Each chain covers at least one slot: at most `size` steps.
        while left > 0 {
            if head >= size {
                return Err(PackedRegionError::Batch { slots });
            }
            let num = self.read_field(head, E_NUM);
            let last = self.read_field(head, E_LAST);
            if num == 0 || num > left || last >= size {
                return Err(PackedRegionError::Batch { slots });
            }
            self.slice
                .write_array(entry_offset(head) + E_INFLIGHT, [0u8]);
            left -= num;
            head = self.read_field(last, E_NEXT);
        }
        Ok(())
    }

    /// Step 1: buffer `id` was taken from `queue` (the chain its last pop read). Only while
    /// tracking is on, so a controller without it pays nothing per request.
    pub fn begin(&mut self, id: u16, queue: &VirtQueue) {
        let Some((start, count)) = queue.last_packed_chain() else {
            return;
        };
        if id >= self.size || count == 0 {
            return;
        }
        if count > self.free_count {
            // Only a driver with more descriptors in flight than the ring holds gets here.
            tracing::warn!(
                id,
                count,
                free = self.free_count,
                "vhost: packed chain not recorded in the inflight region (no free entries)"
            );
            return;
        }
        let head = self.free_head;
        let mut entry = head;
        let mut last = head;
        for i in 0..count {
            let desc = queue.packed_ring_desc(start, i).unwrap_or_default();
            let at = entry_offset(entry);
            let mut copy = [0u8; 16];
            copy[0..2].copy_from_slice(&desc.id.to_le_bytes());
            copy[2..4].copy_from_slice(&desc.flags.to_le_bytes());
            copy[4..8].copy_from_slice(&desc.len.to_le_bytes());
            copy[8..16].copy_from_slice(&desc.addr.to_le_bytes());
            self.slice.write_array(at + E_ID, copy);
            last = entry;
            entry = self.link[usize::from(entry)];
        }
        // `entry` is the first free entry after the chain; the chain keeps its links.
        let header = {
            let mut h = [0u8; 16];
            h[E_NUM as usize..E_NUM as usize + 2].copy_from_slice(&count.to_le_bytes());
            let next = self.region_index(self.link[usize::from(head)]);
            h[E_NEXT as usize..E_NEXT as usize + 2].copy_from_slice(&next.to_le_bytes());
            h[E_LAST as usize..E_LAST as usize + 2].copy_from_slice(&last.to_le_bytes());
            h[E_COUNTER as usize..E_COUNTER as usize + 8]
                .copy_from_slice(&self.counter.to_le_bytes());
            h
        };
        self.slice.write_array(entry_offset(head), header);
        fence(Ordering::Release);
        self.slice
            .write_array(entry_offset(head) + E_INFLIGHT, [1u8]);
        fence(Ordering::Release);
        self.counter = self.counter.wrapping_add(1);
        self.free_head = entry;
        self.free_count -= count;
        let free_head = self.region_index(entry);
        self.slice.write_u16(FREE_HEAD_OFFSET, free_head);
        self.slice.write_u16(OLD_FREE_HEAD_OFFSET, free_head);
        self.entry_of_id[usize::from(id)] = head;
        self.last_of[usize::from(head)] = last;
        self.num_of[usize::from(head)] = count;
        self.id_of[usize::from(head)] = id;
    }

    /// Step 2: the used descriptors of `ids` are about to be published; the used position
    /// after them is `used`.
    pub fn pre_publish(&mut self, ids: &[u16], used: PackedPosition) {
        if ids.is_empty() {
            return;
        }
        for &id in ids {
            let Some(&head) = self.entry_of_id.get(usize::from(id)) else {
                continue;
            };
            if head == NONE {
                continue;
            }
            let last = self.last_of[usize::from(head)];
            self.write_field(last, E_NEXT, self.region_index(self.free_head));
            self.link[usize::from(last)] = self.free_head;
            self.free_head = head;
            self.free_count += self.num_of[usize::from(head)];
        }
        self.slice
            .write_u16(FREE_HEAD_OFFSET, self.region_index(self.free_head));
        self.write_position(used, false);
        fence(Ordering::Release);
    }

    /// Step 3: the batch `ids` was published at `used`.
    pub fn post_publish(&mut self, ids: &[u16], used: PackedPosition) {
        if ids.is_empty() {
            return;
        }
        for &id in ids {
            let Some(head) = self.entry_of_id.get_mut(usize::from(id)) else {
                continue;
            };
            let head = std::mem::replace(head, NONE);
            if head != NONE {
                self.slice
                    .write_array(entry_offset(head) + E_INFLIGHT, [0u8]);
                self.num_of[usize::from(head)] = 0;
                self.id_of[usize::from(head)] = NONE;
            }
        }
        fence(Ordering::Release);
        self.slice
            .write_u16(OLD_FREE_HEAD_OFFSET, self.region_index(self.free_head));
        self.slice.write_u16(OLD_USED_IDX_OFFSET, used.idx);
        self.slice
            .write_array(OLD_USED_WRAP_OFFSET, [u8::from(used.wrap)]);
    }

    /// The buffer id and ring slots of the chain recorded at head entry `head` (as
    /// [`recover`](Self::recover) checked them).
    pub fn resubmit_info(&self, head: u16) -> Option<(u16, u16)> {
        let num = *self.num_of.get(usize::from(head))?;
        let id = self.id_of[usize::from(head)];
        (num != 0 && id != NONE).then_some((id, num))
    }

    /// Walks the copy recorded at head entry `head` into `out`, through the checks a ring
    /// chain goes through (§2.8.6, §2.8.7: an indirect descriptor alone, its table in guest
    /// memory, at most [`MAX_INDIRECT_DESCS`](crate::queue::MAX_INDIRECT_DESCS) entries, no
    /// nesting). Returns the buffer id; the copies are re-read from shared memory, so only
    /// what `recover` checked (the chain's entries, its id) is taken from the process's lists.
    pub fn walk(&self, mem: &GuestMemory, head: u16, out: &mut Vec<Desc>) -> Result<u16, PopError> {
        out.clear();
        let Some((id, num)) = self.resubmit_info(head) else {
            return Err(PopError {
                head: None,
                error: ChainError::HeadOutOfRange {
                    head,
                    size: self.size,
                },
            });
        };
        let bad_copy = || PopError {
            head: Some(id),
            error: ChainError::InflightCopy { entry: head },
        };
        let mut walk = PackedChainWalk::new(self.size);
        let mut entry = head;
        for step in 0..num {
            if entry >= self.size {
                return Err(bad_copy());
            }
            let bytes = self.slice.read_array::<16>(entry_offset(entry) + E_ID);
            let desc = PackedDesc {
                id: u16::from_le_bytes([bytes[0], bytes[1]]),
                flags: u16::from_le_bytes([bytes[2], bytes[3]]),
                len: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
                addr: u64::from_le_bytes([
                    bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                    bytes[15],
                ]),
            };
            // The copy must end exactly where the recorded chain does.
            let more = walk.step(mem, &desc, out);
            if more != (step + 1 < num) {
                return Err(bad_copy());
            }
            entry = self.link[usize::from(entry)];
        }
        walk.finish().map(|()| id).map_err(|error| PopError {
            head: Some(id),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_memory::test_util::memory;
    use crate::inflight::{queue_region_bytes, InflightRegion};
    use crate::queue::tests::{addrs, DATA, DESC, GPA};
    use crate::queue::VringBase;
    use pollux_virtio::ring::{
        packed_avail_flags, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    };
    use proptest::prelude::*;

    const SIZE: u16 = 8;
    const START: PackedPosition = PackedPosition { idx: 0, wrap: true };

    fn region() -> (std::fs::File, u64) {
        InflightRegion::create(2, SIZE, true).expect("memfd")
    }

    fn tracker(file: &std::fs::File, size: u64) -> PackedInflight {
        InflightRegion::map(file, size, 0, 2, SIZE, true)
            .expect("map")
            .packed_queue(1, SIZE)
            .expect("queue 1")
    }

    fn ring(mem: &GuestMemory) -> VirtQueue {
        VirtQueue::new(mem, SIZE, addrs(), VringBase::default(), true, false).expect("ring")
    }

    /// A test driver making packed chains available: `(addr, len, flags)` per descriptor.
    struct Driver {
        slot: u16,
        wrap: bool,
    }

    impl Driver {
        fn chain(&mut self, mem: &GuestMemory, id: u16, descs: &[(u64, u32, u16)]) {
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let next = if i + 1 < descs.len() {
                    VIRTQ_DESC_F_NEXT
                } else {
                    0
                };
                let d = PackedDesc {
                    addr,
                    len,
                    id,
                    flags: flags | next | packed_avail_flags(self.wrap),
                };
                let mut h = 0;
                mem.write_bytes(DESC + 16 * u64::from(self.slot), &d.to_le_bytes(), &mut h)
                    .expect("desc");
                self.slot += 1;
                if self.slot == SIZE {
                    self.slot = 0;
                    self.wrap = !self.wrap;
                }
            }
        }
    }

    fn take(q: &mut VirtQueue, t: &mut PackedInflight, mem: &GuestMemory) -> (u16, Vec<Desc>) {
        let mut out = Vec::new();
        let id = q.pop(mem, &mut out).expect("available").expect("valid");
        t.begin(id, q);
        (id, out)
    }

    fn complete(q: &mut VirtQueue, t: &mut PackedInflight, ids: &[u16]) {
        for &id in ids {
            q.push_used(id, 1);
        }
        let (_, used) = q.packed_positions().expect("packed");
        t.pre_publish(ids, used);
        q.publish_used();
        t.post_publish(ids, used);
    }

    fn recover(t: &mut PackedInflight, q: &VirtQueue) -> PackedRecovery {
        t.recover(START, |slot| q.packed_used_flag(slot))
    }

    const R: u16 = 0;
    const W: u16 = VIRTQ_DESC_F_WRITE;

    #[test]
    fn layout_is_dpdks() {
        assert_eq!(
            queue_region_bytes(128, true),
            4160,
            "32 + 32 * 128, 64-aligned"
        );
        assert_eq!(queue_region_bytes(8, true), 320);
        let (file, size) = region();
        assert_eq!(size, 2 * 320);
        let (mem, _f) = memory(GPA, 0x10000);
        let q = ring(&mem);
        let mut t = tracker(&file, size);
        assert!(recover(&mut t, &q).fresh);
        let mut bytes = vec![0u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).expect("read");
        let part = &bytes[320..];
        let u16_at = |at: usize| u16::from_le_bytes([part[at], part[at + 1]]);
        assert_eq!(
            u64::from_le_bytes(part[0..8].try_into().expect("8")),
            1 << 34
        );
        assert_eq!((u16_at(8), u16_at(10)), (1, SIZE), "version, desc_num");
        assert_eq!((u16_at(12), u16_at(14)), (0, 0), "free_head, old_free_head");
        assert_eq!((u16_at(16), u16_at(18)), (0, 0), "used_idx, old_used_idx");
        assert_eq!((part[20], part[21]), (1, 1), "wrap counters start at 1");
        for entry in 0..usize::from(SIZE) {
            assert_eq!(u16_at(32 + 32 * entry + 4), entry as u16 + 1, "free list");
        }
        assert!(bytes[..320].iter().all(|&b| b == 0), "queue 0 untouched");
    }

    #[test]
    fn copies_survive_the_ring_and_only_unfinished_chains_come_back() {
        let (mem, _f) = memory(GPA, 0x10000);
        let (file, size) = region();
        let mut q = ring(&mem);
        let mut t = tracker(&file, size);
        assert!(recover(&mut t, &q).fresh);
        let mut drv = Driver {
            slot: 0,
            wrap: true,
        };
        // A: id 5, three descriptors (slots 0-2); B: id 1, two (3-4); C: id 2, indirect (5).
        let a = [(DATA, 16, R), (DATA + 0x200, 512, W), (DATA + 0x400, 1, W)];
        drv.chain(&mem, 5, &a);
        drv.chain(&mem, 1, &[(DATA + 0x600, 16, R), (DATA + 0x800, 1, W)]);
        let mut h = 0;
        let table = PackedDesc {
            addr: DATA + 0xa00,
            len: 1,
            id: 0,
            flags: W,
        };
        mem.write_bytes(DATA + 0x1000, &table.to_le_bytes(), &mut h)
            .expect("table");
        drv.chain(&mem, 2, &[(DATA + 0x1000, 16, VIRTQ_DESC_F_INDIRECT)]);
        let (id_a, descs_a) = take(&mut q, &mut t, &mem);
        let (id_b, _) = take(&mut q, &mut t, &mem);
        let (id_c, descs_c) = take(&mut q, &mut t, &mem);
        assert_eq!((id_a, id_b, id_c), (5, 1, 2));
        // B completes first: its used descriptor goes to slot 0, over A's first descriptor.
        complete(&mut q, &mut t, &[id_b]);
        let over = PackedDesc::from_le_bytes(mem.read_array::<16>(DESC, &mut h).expect("slot 0"));
        assert!(over.is_used(true) && over.id == 1);

        // The back-end dies; the next one maps the same file, SET_VRING_BASE says 0.
        let mut q2 = ring(&mem);
        let mut t2 = tracker(&file, size);
        let recovery = recover(&mut t2, &q2);
        assert!(!recovery.fresh && recovery.refused.is_none());
        assert_eq!(recovery.resubmit.len(), 2, "A and C, not B");
        let (avail, used) = recovery.positions.expect("positions");
        assert_eq!(used, PackedPosition { idx: 2, wrap: true });
        assert_eq!(
            avail,
            PackedPosition { idx: 6, wrap: true },
            "2 + A's 3 + C's 1"
        );
        q2.set_packed_positions(avail, used);
        let mut out = Vec::new();
        let first = recovery.resubmit[0];
        assert_eq!(t2.resubmit_info(first), Some((5, 3)), "oldest first: A");
        assert_eq!(t2.walk(&mem, first, &mut out), Ok(5));
        assert_eq!(out, descs_a, "from the copy, not the overwritten ring");
        let second = recovery.resubmit[1];
        assert_eq!(t2.walk(&mem, second, &mut out), Ok(2));
        assert_eq!(
            out, descs_c,
            "the indirect table read again from guest memory"
        );
        for (head, slots) in [(first, 3), (second, 1)] {
            let (id, num) = t2.resubmit_info(head).expect("info");
            assert_eq!(num, slots);
            assert!(q2.resume_packed(id, num));
        }
        // C then A complete; then a new chain is taken at slot 6 and the region follows.
        complete(&mut q2, &mut t2, &[2, 5]);
        assert_eq!(
            q2.packed_positions().expect("packed").1,
            PackedPosition { idx: 6, wrap: true }
        );
        drv.chain(&mem, 3, &[(DATA, 16, R), (DATA + 0x400, 1, W)]);
        let (id, _) = take(&mut q2, &mut t2, &mem);
        assert_eq!(id, 3);
        // A third process finds only id 3, and the positions past the wrap.
        let q3 = ring(&mem);
        let mut t3 = tracker(&file, size);
        let recovery = recover(&mut t3, &q3);
        assert_eq!(recovery.resubmit.len(), 1);
        assert_eq!(t3.resubmit_info(recovery.resubmit[0]).map(|i| i.0), Some(3));
        assert_eq!(
            recovery.positions,
            Some((
                PackedPosition {
                    idx: 0,
                    wrap: false
                },
                PackedPosition { idx: 6, wrap: true }
            ))
        );
    }

    /// Dies between steps 2 and 3 of a batch: published or not, each chain comes back
    /// exactly when the driver has not seen it used.
    #[test]
    fn an_interrupted_publish_is_resolved_from_the_ring() {
        for (published, reused) in [(false, false), (true, false), (true, true)] {
            let (mem, _f) = memory(GPA, 0x10000);
            let (file, size) = region();
            let mut q = ring(&mem);
            let mut t = tracker(&file, size);
            recover(&mut t, &q);
            let mut drv = Driver {
                slot: 0,
                wrap: true,
            };
            drv.chain(&mem, 4, &[(DATA, 16, R), (DATA + 0x400, 1, W)]);
            drv.chain(&mem, 6, &[(DATA + 0x800, 1, W)]);
            let _ = take(&mut q, &mut t, &mem);
            let _ = take(&mut q, &mut t, &mem);
            q.push_used(4, 1);
            let (_, used) = q.packed_positions().expect("packed");
            t.pre_publish(&[4], used);
            if published {
                q.publish_used();
            }
            if reused {
                // The driver saw it and made slot 0 available again in its next lap.
                let mut h = 0;
                let flags = packed_avail_flags(false);
                mem.write_bytes(DESC + 14, &flags.to_le_bytes(), &mut h)
                    .expect("flags");
            }
            let q2 = ring(&mem);
            let mut t2 = tracker(&file, size);
            let recovery = recover(&mut t2, &q2);
            let ids: Vec<u16> = recovery
                .resubmit
                .iter()
                .filter_map(|&head| t2.resubmit_info(head).map(|i| i.0))
                .collect();
            let (avail, used) = recovery.positions.expect("positions");
            assert_eq!(avail, PackedPosition { idx: 3, wrap: true });
            if published {
                assert_eq!(ids, vec![6], "published: only the other one ({reused})");
                assert_eq!(used.idx, 2);
            } else {
                assert_eq!(ids, vec![4, 6], "not published: both, oldest first");
                assert_eq!(used.idx, 0);
            }
        }
    }

    /// Dies in step 3 after `old_used_idx` but before `old_used_wrap_counter`, on a batch that
    /// crossed the wrap: the half-written old position must not win.
    #[test]
    fn a_half_written_old_position_is_not_rolled_back_to() {
        let (mem, _f) = memory(GPA, 0x10000);
        let (file, size) = region();
        let mut q = ring(&mem);
        let mut t = tracker(&file, size);
        recover(&mut t, &q);
        let mut drv = Driver {
            slot: 0,
            wrap: true,
        };
        drv.chain(&mem, 0, &[(DATA, 16, R); 6]);
        let _ = take(&mut q, &mut t, &mem);
        complete(&mut q, &mut t, &[0]);
        drv.chain(&mem, 1, &[(DATA, 16, R); 3]);
        let _ = take(&mut q, &mut t, &mem);
        complete(&mut q, &mut t, &[1]);
        let after = PackedPosition {
            idx: 1,
            wrap: false,
        };
        assert_eq!(q.packed_positions(), Some((after, after)));
        poke(&file, OLD_USED_WRAP_OFFSET, &[1]);
        let mut t2 = tracker(&file, size);
        let recovery = recover(&mut t2, &ring(&mem));
        assert!(recovery.resubmit.is_empty() && recovery.refused.is_none());
        assert_eq!(recovery.positions, Some((after, after)));
    }

    /// Writes `value` at `at` of queue 1's part of the region.
    fn poke(file: &std::fs::File, at: u64, value: &[u8]) {
        std::os::unix::fs::FileExt::write_all_at(file, value, 320 + at).expect("poke");
    }

    #[test]
    fn a_hostile_region_resubmits_nothing() {
        let entry = |e: u64, field: u64| HEADER_BYTES + DESC_BYTES * e + field;
        type Scribble = fn(&std::fs::File);
        let cases: [(&str, Scribble); 9] = [
            ("desc_num", |f| {
                poke(f, DESC_NUM_OFFSET, &99u16.to_le_bytes())
            }),
            ("used_idx", |f| {
                poke(f, USED_IDX_OFFSET, &8u16.to_le_bytes())
            }),
            ("wrap", |f| poke(f, OLD_USED_WRAP_OFFSET, &[7])),
            ("inflight", |f| poke(f, HEADER_BYTES, &[2])),
            ("num 0", |f| {
                poke(f, HEADER_BYTES + E_NUM, &0u16.to_le_bytes())
            }),
            ("num huge", |f| {
                poke(f, HEADER_BYTES + E_NUM, &9u16.to_le_bytes())
            }),
            ("last", |f| {
                poke(f, HEADER_BYTES + E_LAST, &5u16.to_le_bytes())
            }),
            ("next out of range", |f| {
                poke(f, HEADER_BYTES + E_NEXT, &0xfffeu16.to_le_bytes())
            }),
            ("id", |f| {
                poke(f, HEADER_BYTES + DESC_BYTES + E_ID, &8u16.to_le_bytes())
            }),
        ];
        let _ = entry;
        for (name, scribble) in cases {
            let (mem, _f) = memory(GPA, 0x10000);
            let (file, size) = region();
            let mut q = ring(&mem);
            let mut t = tracker(&file, size);
            recover(&mut t, &q);
            let mut drv = Driver {
                slot: 0,
                wrap: true,
            };
            // Entries 0-1: id 3's chain; entry 2: id 4's.
            drv.chain(&mem, 3, &[(DATA, 16, R), (DATA + 0x400, 1, W)]);
            drv.chain(&mem, 4, &[(DATA + 0x800, 1, W)]);
            let _ = take(&mut q, &mut t, &mem);
            let _ = take(&mut q, &mut t, &mem);
            scribble(&file);
            let q2 = ring(&mem);
            let mut t2 = tracker(&file, size);
            let recovery = recover(&mut t2, &q2);
            assert!(recovery.refused.is_some(), "{name}: refused");
            assert!(
                recovery.resubmit.is_empty() && recovery.positions.is_none(),
                "{name}"
            );
            // Restarted empty: a third process finds a clean region.
            let mut t3 = tracker(&file, size);
            let again = recover(&mut t3, &q2);
            assert!(
                again.refused.is_none() && again.resubmit.is_empty(),
                "{name}: clean"
            );
        }
        // Two chains sharing an entry, and a duplicate id.
        for shared in [true, false] {
            let (mem, _f) = memory(GPA, 0x10000);
            let (file, size) = region();
            let mut q = ring(&mem);
            let mut t = tracker(&file, size);
            recover(&mut t, &q);
            let mut drv = Driver {
                slot: 0,
                wrap: true,
            };
            drv.chain(&mem, 3, &[(DATA, 16, R), (DATA + 0x400, 1, W)]);
            drv.chain(&mem, 4, &[(DATA + 0x800, 1, W)]);
            let _ = take(&mut q, &mut t, &mem);
            let _ = take(&mut q, &mut t, &mem);
            if shared {
                // Entry 2 (id 4's head) claims entry 1 as its chain too.
                poke(&file, entry(2, E_NUM), &2u16.to_le_bytes());
                poke(&file, entry(2, E_NEXT), &1u16.to_le_bytes());
                poke(&file, entry(2, E_LAST), &1u16.to_le_bytes());
            } else {
                poke(&file, entry(2, E_ID), &3u16.to_le_bytes());
            }
            let mut t2 = tracker(&file, size);
            let recovery = recover(&mut t2, &ring(&mem));
            assert!(recovery.refused.is_some() && recovery.resubmit.is_empty());
        }
    }

    #[test]
    fn a_scribbled_copy_is_an_error_for_its_id_only() {
        let (mem, _f) = memory(GPA, 0x10000);
        let (file, size) = region();
        let mut q = ring(&mem);
        let mut t = tracker(&file, size);
        recover(&mut t, &q);
        let mut drv = Driver {
            slot: 0,
            wrap: true,
        };
        drv.chain(&mem, 3, &[(DATA, 16, R), (DATA + 0x400, 1, W)]);
        drv.chain(&mem, 4, &[(GPA + 0x100_0000, 32, VIRTQ_DESC_F_INDIRECT)]);
        let _ = take(&mut q, &mut t, &mem);
        let mut out = Vec::new();
        let err = q
            .pop(&mem, &mut out)
            .expect("one")
            .expect_err("table outside memory");
        t.begin(4, &q);
        assert_eq!(err.head, Some(4));
        // The last copy of id 3's chain now says NEXT.
        let flags = packed_avail_flags(true) | VIRTQ_DESC_F_NEXT | W;
        poke(
            &file,
            HEADER_BYTES + DESC_BYTES + E_ID + 2,
            &flags.to_le_bytes(),
        );
        let mut t2 = tracker(&file, size);
        let recovery = recover(&mut t2, &ring(&mem));
        assert_eq!(recovery.resubmit.len(), 2);
        let err = t2
            .walk(&mem, recovery.resubmit[0], &mut out)
            .expect_err("copy");
        assert_eq!(err.head, Some(3));
        assert!(matches!(err.error, ChainError::InflightCopy { .. }));
        let err = t2
            .walk(&mem, recovery.resubmit[1], &mut out)
            .expect_err("table");
        assert_eq!(err.head, Some(4));
        assert!(matches!(err.error, ChainError::IndirectOutOfBounds { .. }));
    }

    proptest! {
        /// Any bytes in the region: no panic, and what comes back is consistent (distinct
        /// ids below the queue size, at most the ring's slots, positions in range).
        #[test]
        fn random_regions_never_panic(bytes in proptest::collection::vec(any::<u8>(), 320), valid in any::<bool>()) {
            let (mem, _f) = memory(GPA, 0x10000);
            let (file, size) = region();
            let mut bytes = bytes;
            if valid {
                bytes[0..8].copy_from_slice(&(1u64 << 34).to_le_bytes());
                bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
                bytes[10..12].copy_from_slice(&SIZE.to_le_bytes());
            }
            poke(&file, 0, &bytes);
            let q = ring(&mem);
            let mut t = tracker(&file, size);
            let recovery = recover(&mut t, &q);
            let mut ids = Vec::new();
            let mut slots = 0u32;
            for &head in &recovery.resubmit {
                let (id, num) = t.resubmit_info(head).expect("info");
                prop_assert!(id < SIZE && !ids.contains(&id));
                ids.push(id);
                slots += u32::from(num);
                let mut out = Vec::new();
                let _ = t.walk(&mem, head, &mut out);
            }
            prop_assert!(slots <= u32::from(SIZE));
            if let Some((avail, used)) = recovery.positions {
                prop_assert!(avail.idx < SIZE && used.idx < SIZE);
            }
        }
    }
}
