//! Inflight I/O tracking for reconnection (vhost-user INFLIGHT_SHMFD; the split-queue layout
//! QEMU's `libvhost-user` and DPDK use): a shared memory file the back-end creates at
//! GET_INFLIGHT_FD, the front-end keeps, and hands back at SET_INFLIGHT_FD to the next
//! back-end process after a crash. Per queue:
//!
//! ```text
//! features: le64, version: le16, desc_num: le16, last_batch_head: le16, used_idx: le16,
//! desc[desc_num]: { inflight: u8, padding: [u8; 5], next: le16, counter: le64 }
//! ```
//!
//! Protocol of this back-end (it reads only what it wrote itself):
//!
//! 1. a chain taken from the avail ring: `desc[head] = { inflight: 1, counter: n++ }`, before
//!    its I/O starts;
//! 2. before a batch's used index is published: the batch's heads linked through `next`
//!    from `last_batch_head`;
//! 3. after it: each head's `inflight` cleared, then `used_idx` set to the published index.
//!
//! After a crash between 2 and 3 the used ring's index differs from `used_idx` by the batch
//! length, and the batch list says which heads to clear. Every head still marked is resubmitted
//! in `counter` order, and the avail position restarts at `used_idx + in flight`.
//!
//! Packed rings use the packed layout of the same region ([`packed`]): which layout a region
//! holds follows the negotiated VIRTIO_F_RING_PACKED, at GET_INFLIGHT_FD and SET_INFLIGHT_FD
//! alike (as DPDK decides it), so both back-end processes agree on the queues' offsets.

mod packed;

pub use packed::{PackedInflight, PackedRecovery, PackedRegionError};

use crate::guest_memory::{GuestMemory, GuestSlice, RegionSpec};
use crate::queue::VirtQueue;

const HEADER_BYTES: u64 = 16;
const DESC_BYTES: u64 = 16;
const VERSION_OFFSET: u64 = 8;
const DESC_NUM_OFFSET: u64 = 10;
const LAST_BATCH_HEAD_OFFSET: u64 = 12;
const USED_IDX_OFFSET: u64 = 14;
const INFLIGHT_VERSION: u16 = 1;
/// Each queue's part is a multiple of this (libvhost-user's INFLIGHT_ALIGNMENT).
const ALIGN: u64 = 64;

/// Bytes of one queue's part for `queue_size` descriptors: libvhost-user's formula for split
/// queues, DPDK's (`get_pervq_shm_size_packed`) for packed ones.
pub fn queue_region_bytes(queue_size: u16, packed: bool) -> u64 {
    let bytes = if packed {
        packed::HEADER_BYTES + packed::DESC_BYTES * u64::from(queue_size)
    } else {
        DESC_BYTES * u64::from(queue_size) + 2
    };
    bytes.div_ceil(ALIGN) * ALIGN
}

/// The mapped inflight file of one connection.
#[derive(Debug, Clone)]
pub struct InflightRegion {
    mem: GuestMemory,
    num_queues: u16,
    queue_size: u16,
    /// The packed layout (the queues use packed rings).
    packed: bool,
}

/// Why an inflight region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(
        "inflight region of {mmap_size} bytes is too small for {num_queues} queues of {queue_size}"
    )]
    TooSmall {
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("inflight region: {0}")]
    Map(#[from] crate::guest_memory::MemoryError),
    #[error("inflight region: creating its memory file")]
    Create(#[source] std::io::Error),
}

impl InflightRegion {
    /// A fresh zeroed file for GET_INFLIGHT_FD and its size.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        packed: bool,
    ) -> Result<(std::fs::File, u64), InflightError> {
        let size = queue_region_bytes(queue_size, packed) * u64::from(num_queues.max(1));
        let file =
            crate::sys::memfd("pollux-vhost-inflight", size).map_err(InflightError::Create)?;
        Ok((file, size))
    }

    /// Maps the file the front-end hands over at SET_INFLIGHT_FD.
    pub fn map(
        file: &std::fs::File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        packed: bool,
    ) -> Result<Self, InflightError> {
        let needed = queue_region_bytes(queue_size, packed).saturating_mul(u64::from(num_queues));
        if mmap_size < needed || needed == 0 {
            return Err(InflightError::TooSmall {
                mmap_size,
                num_queues,
                queue_size,
            });
        }
        let spec = RegionSpec {
            gpa: 0,
            size: mmap_size,
            uva: 0,
            mmap_offset,
        };
        let mem = GuestMemory::from_regions(&[(spec, file)], false)?;
        Ok(Self {
            mem,
            num_queues,
            queue_size,
            packed,
        })
    }

    /// Whether the region has the packed layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Queue `index`'s tracker for a ring of `ring_size` (at most the region's queue size) of
    /// the region's layout (`packed`: the ring is packed).
    pub fn tracker(&self, index: u16, ring_size: u16, packed: bool) -> Option<Tracker> {
        if packed != self.packed {
            return None;
        }
        if packed {
            self.packed_queue(index, ring_size).map(Tracker::Packed)
        } else {
            self.queue(index, ring_size).map(Tracker::Split)
        }
    }

    /// Packed queue `index`'s tracker for a ring of `ring_size`.
    pub fn packed_queue(&self, index: u16, ring_size: u16) -> Option<PackedInflight> {
        if !self.packed || index >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        let offset = u64::from(index) * queue_region_bytes(self.queue_size, true);
        let len = packed::HEADER_BYTES + packed::DESC_BYTES * u64::from(ring_size);
        let mut hint = 0;
        let slice = self.mem.slice(offset, len, &mut hint).ok()?;
        Some(PackedInflight::new(slice, ring_size))
    }

    /// Split queue `index`'s tracker for a ring of `ring_size` (at most the region's queue size).
    pub fn queue(&self, index: u16, ring_size: u16) -> Option<QueueInflight> {
        if self.packed || index >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        let offset = u64::from(index) * queue_region_bytes(self.queue_size, false);
        let len = HEADER_BYTES + DESC_BYTES * u64::from(ring_size);
        let mut hint = 0;
        let slice = self.mem.slice(offset, len, &mut hint).ok()?;
        Some(QueueInflight {
            slice,
            size: ring_size,
            counter: 0,
        })
    }
}

/// One queue's tracker, of its ring's layout.
#[derive(Debug)]
pub enum Tracker {
    Split(QueueInflight),
    Packed(PackedInflight),
}

impl Tracker {
    /// Step 2 of either protocol: the used entries of `heads` (split heads, packed buffer
    /// ids) pushed to `queue` are about to be published.
    #[inline]
    pub fn pre_publish(&mut self, heads: &[u16], queue: &VirtQueue) {
        match self {
            Tracker::Split(t) => t.pre_publish(heads),
            Tracker::Packed(t) => {
                if let Some((_, used)) = queue.packed_positions() {
                    t.pre_publish(heads, used);
                }
            }
        }
    }

    /// Step 3: they were published.
    #[inline]
    pub fn post_publish(&mut self, heads: &[u16], queue: &VirtQueue) {
        match self {
            Tracker::Split(t) => t.post_publish(heads, queue.published_used_idx().unwrap_or(0)),
            Tracker::Packed(t) => {
                if let Some((_, used)) = queue.packed_positions() {
                    t.post_publish(heads, used);
                }
            }
        }
    }
}

/// One split queue's part of the inflight region.
#[derive(Debug)]
pub struct QueueInflight {
    slice: GuestSlice,
    size: u16,
    counter: u64,
}

/// What a restarting ring learns from the region.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the avail ring resumes (`None`: use the front-end's base).
    pub last_avail: Option<u16>,
    /// The region was fresh (or reset by the front-end): nothing to recover.
    pub fresh: bool,
}

impl QueueInflight {
    fn desc_offset(head: u16) -> u64 {
        HEADER_BYTES + DESC_BYTES * u64::from(head)
    }

    /// Reads the region at ring start; `used_idx` is the used ring's index in guest memory.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let version = self.slice.read_u16(VERSION_OFFSET);
        if version != INFLIGHT_VERSION {
            // A fresh region (or one the front-end reset): start it.
            self.slice.write_array(0, [0u8; 8]);
            self.slice.write_u16(DESC_NUM_OFFSET, self.size);
            self.slice.write_u16(USED_IDX_OFFSET, used_idx);
            for head in 0..self.size {
                self.slice.write_array(Self::desc_offset(head), [0u8; 16]);
            }
            self.slice.write_u16(VERSION_OFFSET, INFLIGHT_VERSION);
            return Recovery {
                fresh: true,
                ..Recovery::default()
            };
        }
        let recorded_used = self.slice.read_u16(USED_IDX_OFFSET);
        if recorded_used != used_idx {
            // Died between publishing a batch and clearing it: clear that batch.
            let mut count = used_idx.wrapping_sub(recorded_used).min(self.size);
            let mut head = self.slice.read_u16(LAST_BATCH_HEAD_OFFSET);
            while count > 0 && head < self.size {
                let at = Self::desc_offset(head);
                self.slice.write_array(at, [0u8]);
                head = self.slice.read_u16(at + 6);
                count -= 1;
            }
            self.slice.write_u16(USED_IDX_OFFSET, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|head| {
                let bytes = self.slice.read_array::<16>(Self::desc_offset(head));
                (bytes[0] == 1).then(|| {
                    let mut counter = [0u8; 8];
                    counter.copy_from_slice(&bytes[8..16]);
                    (u64::from_le_bytes(counter), head)
                })
            })
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |(c, _)| c + 1);
        Recovery {
            last_avail: Some(used_idx.wrapping_add(pending.len() as u16)),
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
            fresh: false,
        }
    }

    /// Step 1: `head` was taken from the avail ring.
    #[inline]
    pub fn begin(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        let at = Self::desc_offset(head);
        self.slice.write_array(at + 8, self.counter.to_le_bytes());
        self.counter += 1;
        self.slice.write_array(at, [1u8]);
    }

    /// Step 2: the batch `heads` is about to be published.
    #[inline]
    pub fn pre_publish(&mut self, heads: &[u16]) {
        let Some(&first) = heads.first() else { return };
        for pair in heads.windows(2) {
            if pair[0] < self.size {
                self.slice
                    .write_u16(Self::desc_offset(pair[0]) + 6, pair[1]);
            }
        }
        self.slice.write_u16(LAST_BATCH_HEAD_OFFSET, first);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    /// Step 3: the batch was published up to `used_idx`.
    #[inline]
    pub fn post_publish(&mut self, heads: &[u16], used_idx: u16) {
        for &head in heads {
            if head < self.size {
                self.slice.write_array(Self::desc_offset(head), [0u8]);
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.slice.write_u16(USED_IDX_OFFSET, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_mid_batch_resubmits_exactly_the_unfinished_heads() {
        let (file, size) = InflightRegion::create(2, 8, false).expect("memfd");
        let region = InflightRegion::map(&file, size, 0, 2, 8, false).expect("map");
        let mut q = region.queue(1, 8).expect("queue 1");
        assert!(q.recover(0).fresh, "fresh region");
        for head in [3, 5, 1, 6] {
            q.begin(head);
        }
        // Batch {5, 3} published (used idx 0 -> 2), then "crash" before post_publish.
        q.pre_publish(&[5, 3]);
        // A second process maps the same file.
        let region2 = InflightRegion::map(&file, size, 0, 2, 8, false).expect("map again");
        let mut q2 = region2.queue(1, 8).expect("queue 1");
        let recovery = q2.recover(2);
        assert_eq!(
            recovery.resubmit,
            vec![1, 6],
            "oldest first, the published batch cleared"
        );
        assert_eq!(recovery.last_avail, Some(4));
        assert!(region.queue(2, 8).is_none() && region.queue(0, 9).is_none());
        assert!(InflightRegion::map(&file, 16, 0, 2, 8, false).is_err());
    }
}
