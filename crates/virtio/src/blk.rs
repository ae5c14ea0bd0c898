//! virtio-blk (virtio 1.2 §5.2): feature bits, request types and status, the request header,
//! discard / write-zeroes segments and the configuration space, shared by the driver side
//! (the virtio_blk bdev) and the device side (pollux-vhost).

/// Feature bits (§5.2.3), as bit numbers.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Request types (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status byte values (§5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// virtio-blk sectors are always 512 bytes, whatever `blk_size` says (§5.2.6).
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// Bytes of a GET_ID answer: the serial, NUL-padded, not NUL-terminated when 20 long.
pub const ID_BYTES: usize = 20;
/// Bytes of the status descriptor's payload.
pub const STATUS_BYTES: usize = 1;

/// Discard / write-zeroes segment flag: the device may unmap while zeroing.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The request header (`struct virtio_blk_outhdr`): `type: le32, reserved: le32, sector: le64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader {
    pub request_type: u32,
    pub reserved: u32,
    pub sector: u64,
}

impl RequestHeader {
    pub const SIZE_BYTES: usize = 16;

    #[inline]
    pub fn from_le_bytes(bytes: [u8; Self::SIZE_BYTES]) -> Self {
        let [t0, t1, t2, t3, r0, r1, r2, r3, s0, s1, s2, s3, s4, s5, s6, s7] = bytes;
        Self {
            request_type: u32::from_le_bytes([t0, t1, t2, t3]),
            reserved: u32::from_le_bytes([r0, r1, r2, r3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; Self::SIZE_BYTES] {
        let mut bytes = [0u8; Self::SIZE_BYTES];
        bytes[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.reserved.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.sector.to_le_bytes());
        bytes
    }
}

/// A discard or write-zeroes segment (`struct virtio_blk_discard_write_zeroes`):
/// `sector: le64, num_sectors: le32, flags: le32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardWriteZeroesSegment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl DiscardWriteZeroesSegment {
    pub const SIZE_BYTES: usize = 16;

    #[inline]
    pub fn from_le_bytes(bytes: [u8; Self::SIZE_BYTES]) -> Self {
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = bytes;
        Self {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
        }
    }

    #[inline]
    pub fn to_le_bytes(self) -> [u8; Self::SIZE_BYTES] {
        let mut bytes = [0u8; Self::SIZE_BYTES];
        bytes[0..8].copy_from_slice(&self.sector.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.flags.to_le_bytes());
        bytes
    }
}

/// The configuration space (`struct virtio_blk_config`, §5.2.4) up to
/// `write_zeroes_may_unmap` and its padding: the 60 bytes QEMU and SPDK exchange.
/// Fields whose feature was not negotiated are still encoded; their value is then meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry_cylinders: u16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    /// Write-back cache on (1) or write-through (0); CONFIG_WCE lets the driver change it.
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    pub const SIZE_BYTES: usize = 60;
    /// Offset of `writeback`, the one field a driver writes (with CONFIG_WCE).
    pub const WRITEBACK_OFFSET: usize = 32;

    pub fn to_le_bytes(&self) -> [u8; Self::SIZE_BYTES] {
        let mut b = [0u8; Self::SIZE_BYTES];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[16..18].copy_from_slice(&self.geometry_cylinders.to_le_bytes());
        b[18] = self.geometry_heads;
        b[19] = self.geometry_sectors;
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = self.alignment_offset;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Decodes as many fields as `bytes` holds; missing fields stay zero (a device may
    /// expose a shorter config space).
    pub fn from_le_bytes(bytes: &[u8]) -> Self {
        let mut b = [0u8; Self::SIZE_BYTES];
        let len = bytes.len().min(Self::SIZE_BYTES);
        b[..len].copy_from_slice(&bytes[..len]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&b[0..8]);
        Self {
            capacity_sectors: u64::from_le_bytes(capacity),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            geometry_cylinders: u16_at(16),
            geometry_heads: b[18],
            geometry_sectors: b[19],
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_segment_round_trip() {
        let header = RequestHeader {
            request_type: VIRTIO_BLK_T_OUT,
            reserved: 0,
            sector: 77,
        };
        assert_eq!(RequestHeader::from_le_bytes(header.to_le_bytes()), header);
        let segment = DiscardWriteZeroesSegment {
            sector: 8,
            num_sectors: 16,
            flags: 1,
        };
        assert_eq!(
            DiscardWriteZeroesSegment::from_le_bytes(segment.to_le_bytes()),
            segment
        );
    }

    #[test]
    fn config_fields_sit_at_the_spec_offsets() {
        let config = BlkConfig {
            capacity_sectors: 1 << 21,
            seg_max: 126,
            blk_size: 4096,
            writeback: 1,
            num_queues: 2,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: 1,
            ..BlkConfig::default()
        };
        let bytes = config.to_le_bytes();
        assert_eq!(&bytes[0..8], &(1u64 << 21).to_le_bytes());
        assert_eq!(&bytes[20..24], &4096u32.to_le_bytes());
        assert_eq!(bytes[BlkConfig::WRITEBACK_OFFSET], 1);
        assert_eq!(&bytes[34..36], &2u16.to_le_bytes());
        assert_eq!(bytes[56], 1);
        assert_eq!(BlkConfig::from_le_bytes(&bytes), config);
        let short = BlkConfig::from_le_bytes(&bytes[..24]);
        assert_eq!(
            (short.blk_size, short.num_queues),
            (4096, 0),
            "short config spaces decode"
        );
    }
}
