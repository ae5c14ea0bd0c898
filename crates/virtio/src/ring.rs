//! Virtqueue layouts (virtio 1.2 §2.7 split, §2.8 packed): the single definition that both the
//! driver side (`crates/virtio`) and the device side (`crates/vhost`) use.
//!
//! Rings live in memory shared with the other side, which may change them at any moment, so
//! nothing here hands out references into a ring. Entries are decoded from and encoded to
//! little-endian byte arrays (`from_le_bytes` / `to_le_bytes`) that each side reads and writes
//! with volatile accesses of its own; offsets are computed by [`SplitLayout`] and
//! [`PackedLayout`] with checked arithmetic from the queue size alone.

/// The largest queue size either layout allows (§2.7: split sizes are powers of two up to
/// 32768; §2.8: packed sizes up to 32768, any value).
pub const QUEUE_SIZE_MAX: u16 = 32768;

/// Descriptor flag: the chain continues at `next` (split) or in the next slot (packed).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it only reads it).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (§2.7.5.3, §2.8.7).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Packed descriptor flag: the avail wrap bit (§2.8.1).
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: the used wrap bit (§2.8.1).
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// Split avail ring flag: the driver asks for no interrupts (ignored with EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Split used ring flag: the device asks for no kicks (ignored with EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Packed event suppression flags (§2.8.10): notify on every buffer.
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Packed event suppression flags: no notifications at all.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Packed event suppression flags: notify when `off_wrap` is reached (needs EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// Bytes per descriptor, split and packed alike.
pub const DESC_SIZE_BYTES: usize = 16;
/// Bytes per split used-ring element (`id: le32, len: le32`).
pub const USED_ELEM_SIZE_BYTES: usize = 8;

/// Required alignments of the three split parts (§2.7, table "Virtqueue Part Alignment").
pub const SPLIT_DESC_ALIGN: u64 = 16;
pub const SPLIT_AVAIL_ALIGN: u64 = 2;
pub const SPLIT_USED_ALIGN: u64 = 4;
/// Required alignments of the packed descriptor ring and event suppression areas (§2.8.10.1).
pub const PACKED_DESC_ALIGN: u64 = 16;
pub const PACKED_EVENT_ALIGN: u64 = 4;

/// Why a queue size is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("queue size {0} is out of range 1..={QUEUE_SIZE_MAX}")]
    SizeOutOfRange(u16),
    #[error("split queue size {0} is not a power of two (virtio 1.2 §2.7)")]
    SplitSizeNotPowerOfTwo(u16),
}

/// A split-ring descriptor (§2.7.5): `addr: le64, len: le32, flags: le16, next: le16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl SplitDesc {
    #[inline]
    pub fn from_le_bytes(bytes: [u8; DESC_SIZE_BYTES]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = bytes;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; DESC_SIZE_BYTES] {
        let mut bytes = [0u8; DESC_SIZE_BYTES];
        bytes[0..8].copy_from_slice(&self.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.next.to_le_bytes());
        bytes
    }

    /// From the descriptor's two 64-bit words, each already read as little-endian (two
    /// loads instead of sixteen byte loads): `addr`, then `len | flags << 32 | next << 48`.
    #[inline]
    pub fn from_words(low: u64, high: u64) -> Self {
        Self {
            addr: low,
            len: high as u32,
            flags: (high >> 32) as u16,
            next: (high >> 48) as u16,
        }
    }

    #[inline]
    pub fn has_next(&self) -> bool {
        self.flags & VIRTQ_DESC_F_NEXT != 0
    }

    #[inline]
    pub fn is_write(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    #[inline]
    pub fn is_indirect(&self) -> bool {
        self.flags & VIRTQ_DESC_F_INDIRECT != 0
    }
}

/// A packed-ring descriptor (§2.8.13): `addr: le64, len: le32, id: le16, flags: le16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

impl PackedDesc {
    /// Field offsets inside a packed descriptor (§2.8.13), for sides that store fields one
    /// at a time (the flags last, after a write barrier, §2.8.21).
    pub const ADDR_OFFSET: u64 = 0;
    pub const LEN_OFFSET: u64 = 8;
    pub const ID_OFFSET: u64 = 12;
    pub const FLAGS_OFFSET: u64 = 14;

    #[inline]
    pub fn from_le_bytes(bytes: [u8; DESC_SIZE_BYTES]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, i0, i1, f0, f1] = bytes;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            id: u16::from_le_bytes([i0, i1]),
            flags: u16::from_le_bytes([f0, f1]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; DESC_SIZE_BYTES] {
        let mut bytes = [0u8; DESC_SIZE_BYTES];
        bytes[0..8].copy_from_slice(&self.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.id.to_le_bytes());
        bytes[14..16].copy_from_slice(&self.flags.to_le_bytes());
        bytes
    }

    /// From the descriptor's two 64-bit words, each already read as little-endian:
    /// `addr`, then `len | id << 32 | flags << 48`.
    #[inline]
    pub fn from_words(low: u64, high: u64) -> Self {
        Self {
            addr: low,
            len: high as u32,
            id: (high >> 32) as u16,
            flags: (high >> 48) as u16,
        }
    }

    /// Whether the device may take this descriptor: its AVAIL bit equals the driver's wrap
    /// counter and its USED bit differs from it (§2.8.1).
    #[inline]
    pub fn is_avail(&self, wrap_counter: bool) -> bool {
        let avail = self.flags & VIRTQ_DESC_F_AVAIL != 0;
        let used = self.flags & VIRTQ_DESC_F_USED != 0;
        avail == wrap_counter && used != wrap_counter
    }

    /// Whether the device has used this descriptor: AVAIL and USED both equal the wrap
    /// counter the descriptor was made available with (§2.8.1).
    #[inline]
    pub fn is_used(&self, wrap_counter: bool) -> bool {
        let avail = self.flags & VIRTQ_DESC_F_AVAIL != 0;
        let used = self.flags & VIRTQ_DESC_F_USED != 0;
        avail == used && used == wrap_counter
    }
}

/// The AVAIL/USED bits a driver sets to make a packed descriptor available with `wrap_counter`.
#[inline]
pub const fn packed_avail_flags(wrap_counter: bool) -> u16 {
    if wrap_counter {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

/// The AVAIL/USED bits a device sets to mark a packed descriptor used with `wrap_counter`.
#[inline]
pub const fn packed_used_flags(wrap_counter: bool) -> u16 {
    if wrap_counter {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    }
}

/// A packed event suppression structure (§2.8.10): `off_wrap: le16` (bits 0..15 the
/// descriptor offset, bit 15 the wrap counter), `flags: le16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackedEvent {
    pub off_wrap: u16,
    pub flags: u16,
}

impl PackedEvent {
    pub const SIZE_BYTES: usize = 4;
    /// Field offsets inside the event suppression structure (§2.8.10).
    pub const OFF_WRAP_OFFSET: u64 = 0;
    pub const FLAGS_OFFSET: u64 = 2;

    #[inline]
    pub fn from_le_bytes(bytes: [u8; 4]) -> Self {
        Self {
            off_wrap: u16::from_le_bytes([bytes[0], bytes[1]]),
            flags: u16::from_le_bytes([bytes[2], bytes[3]]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; 4] {
        let o = self.off_wrap.to_le_bytes();
        let f = self.flags.to_le_bytes();
        [o[0], o[1], f[0], f[1]]
    }

    /// The descriptor offset part of `off_wrap`.
    #[inline]
    pub fn offset(&self) -> u16 {
        self.off_wrap & 0x7fff
    }

    /// The wrap counter part of `off_wrap`.
    #[inline]
    pub fn wrap(&self) -> bool {
        self.off_wrap & 0x8000 != 0
    }
}

/// Offsets inside the three parts of a split virtqueue of `queue_size` entries (§2.7). Each
/// part has its own guest address (SET_VRING_ADDR, or the driver's allocation); offsets are
/// relative to the start of their part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitLayout {
    queue_size: u16,
}

impl SplitLayout {
    pub const AVAIL_FLAGS_OFFSET: u64 = 0;
    pub const AVAIL_IDX_OFFSET: u64 = 2;
    pub const USED_FLAGS_OFFSET: u64 = 0;
    pub const USED_IDX_OFFSET: u64 = 2;

    pub fn new(queue_size: u16) -> Result<Self, LayoutError> {
        if queue_size == 0 || queue_size > QUEUE_SIZE_MAX {
            return Err(LayoutError::SizeOutOfRange(queue_size));
        }
        if !queue_size.is_power_of_two() {
            return Err(LayoutError::SplitSizeNotPowerOfTwo(queue_size));
        }
        Ok(Self { queue_size })
    }

    #[inline]
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Bytes of the descriptor table: 16 per entry.
    #[inline]
    pub fn desc_table_bytes(&self) -> u64 {
        DESC_SIZE_BYTES as u64 * u64::from(self.queue_size)
    }

    /// Offset of descriptor `index` (< queue size) in the table.
    #[inline]
    pub fn desc_offset(&self, index: u16) -> u64 {
        debug_assert!(index < self.queue_size);
        DESC_SIZE_BYTES as u64 * u64::from(index)
    }

    /// Bytes of the avail ring with its trailing `used_event`: `flags, idx, ring[n], used_event`.
    #[inline]
    pub fn avail_ring_bytes(&self) -> u64 {
        6 + 2 * u64::from(self.queue_size)
    }

    /// Offset of `avail.ring[slot]` for a free-running index (wrapped modulo the size here).
    #[inline]
    pub fn avail_entry_offset(&self, index: u16) -> u64 {
        4 + 2 * u64::from(index & (self.queue_size - 1))
    }

    /// Offset of `used_event` (the avail ring's last field).
    #[inline]
    pub fn used_event_offset(&self) -> u64 {
        4 + 2 * u64::from(self.queue_size)
    }

    /// Bytes of the used ring with its trailing `avail_event`: `flags, idx, ring[n], avail_event`.
    #[inline]
    pub fn used_ring_bytes(&self) -> u64 {
        6 + USED_ELEM_SIZE_BYTES as u64 * u64::from(self.queue_size)
    }

    /// Offset of `used.ring[slot]` (an `id: le32, len: le32` pair) for a free-running index.
    #[inline]
    pub fn used_entry_offset(&self, index: u16) -> u64 {
        4 + USED_ELEM_SIZE_BYTES as u64 * u64::from(index & (self.queue_size - 1))
    }

    /// Offset of `avail_event` (the used ring's last field).
    #[inline]
    pub fn avail_event_offset(&self) -> u64 {
        4 + USED_ELEM_SIZE_BYTES as u64 * u64::from(self.queue_size)
    }
}

/// Offsets of a packed virtqueue of `queue_size` entries (§2.8): a descriptor ring and two
/// event suppression structures, each at its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLayout {
    queue_size: u16,
}

impl PackedLayout {
    pub fn new(queue_size: u16) -> Result<Self, LayoutError> {
        if queue_size == 0 || queue_size > QUEUE_SIZE_MAX {
            return Err(LayoutError::SizeOutOfRange(queue_size));
        }
        Ok(Self { queue_size })
    }

    #[inline]
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    #[inline]
    pub fn desc_ring_bytes(&self) -> u64 {
        DESC_SIZE_BYTES as u64 * u64::from(self.queue_size)
    }

    #[inline]
    pub fn desc_offset(&self, index: u16) -> u64 {
        debug_assert!(index < self.queue_size);
        DESC_SIZE_BYTES as u64 * u64::from(index)
    }
}

/// A split used-ring element: `id: le32` (the chain's head), `len: le32` (bytes written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

impl UsedElem {
    /// Field offsets inside a used element (§2.7.8): used elements sit at 4 mod 8, so a side
    /// reads them as two 32-bit words.
    pub const ID_OFFSET: u64 = 0;
    pub const LEN_OFFSET: u64 = 4;

    #[inline]
    pub fn from_le_bytes(bytes: [u8; USED_ELEM_SIZE_BYTES]) -> Self {
        let [i0, i1, i2, i3, l0, l1, l2, l3] = bytes;
        Self {
            id: u32::from_le_bytes([i0, i1, i2, i3]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; USED_ELEM_SIZE_BYTES] {
        let mut bytes = [0u8; USED_ELEM_SIZE_BYTES];
        bytes[0..4].copy_from_slice(&self.id.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.len.to_le_bytes());
        bytes
    }
}

/// EVENT_IDX (§2.7.10): whether moving an index from `old` to `new` passed `event`, i.e.
/// whether the other side asked to be notified for this batch. Free-running u16 indices.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_layout_matches_the_spec_sizes() {
        let layout = SplitLayout::new(256).expect("valid");
        assert_eq!(layout.desc_table_bytes(), 4096);
        assert_eq!(layout.avail_ring_bytes(), 518);
        assert_eq!(layout.used_ring_bytes(), 2054);
        assert_eq!(
            layout.avail_entry_offset(257),
            6,
            "indices wrap modulo the size"
        );
        assert_eq!(layout.used_event_offset(), 516);
        assert_eq!(layout.used_entry_offset(255), 4 + 8 * 255);
        assert_eq!(layout.avail_event_offset(), 2052);
        assert_eq!(SplitLayout::new(0), Err(LayoutError::SizeOutOfRange(0)));
        assert_eq!(
            SplitLayout::new(100),
            Err(LayoutError::SplitSizeNotPowerOfTwo(100))
        );
        assert!(
            PackedLayout::new(100).is_ok(),
            "packed sizes need not be powers of two"
        );
    }

    #[test]
    fn descriptors_round_trip_through_little_endian_bytes() {
        let split = SplitDesc {
            addr: 0x1122_3344_5566_7788,
            len: 0x99aa_bbcc,
            flags: 3,
            next: 7,
        };
        let bytes = split.to_le_bytes();
        assert_eq!(bytes[0], 0x88);
        assert_eq!(bytes[14], 7);
        assert_eq!(SplitDesc::from_le_bytes(bytes), split);
        let packed = PackedDesc {
            addr: 1,
            len: 2,
            id: 3,
            flags: packed_avail_flags(true),
        };
        assert_eq!(PackedDesc::from_le_bytes(packed.to_le_bytes()), packed);
        assert!(packed.is_avail(true));
        assert!(!packed.is_avail(false));
        let used = PackedDesc {
            flags: packed_used_flags(true),
            ..packed
        };
        assert!(used.is_used(true));
        assert!(!used.is_avail(true));
        let elem = UsedElem { id: 5, len: 512 };
        assert_eq!(UsedElem::from_le_bytes(elem.to_le_bytes()), elem);
        let event = PackedEvent {
            off_wrap: 0x8005,
            flags: RING_EVENT_FLAGS_DESC,
        };
        assert_eq!(PackedEvent::from_le_bytes(event.to_le_bytes()), event);
        assert_eq!((event.offset(), event.wrap()), (5, true));
    }

    #[test]
    fn need_event_follows_the_spec_formula_across_wrap() {
        assert!(need_event(0, 1, 0), "event 0 crossed by 0 -> 1");
        assert!(!need_event(5, 3, 0), "event 5 not reached");
        assert!(need_event(65535, 2, 65534), "wraps");
        assert!(!need_event(10, 10, 10), "no progress, no event");
    }
}
