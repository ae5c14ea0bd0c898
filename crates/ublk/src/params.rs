//! What the kernel is told about a bdev (SET_PARAMS), and what a request the kernel hands
//! over becomes on the bdev. Pure functions, tested without a kernel.
//!
//! A descriptor comes from memory the kernel writes, and a buggy or hostile driver (or a
//! stale slot) must never make the server misbehave: every field is checked against the
//! bdev's geometry and the tag's buffer, and a request that fails a check is committed with
//! `-EINVAL` (or `-EOPNOTSUPP` for an operation the bdev lacks), never a panic.

use pollux_bdev::{BdevInfo, IoType};

use crate::sys::{self, IoDesc, ParamBasic, ParamDiscard, Params};

/// Linux sector size: ublk counts in 512-byte sectors whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
/// Blocks one discard or write-zeroes request may cover: the smallest limit among Pollux's
/// bdev modules (NVMe's 16-bit block count; the nvme bdev does not split these), so the
/// kernel splits larger ones before they reach the bdev.
pub const MAX_NO_DATA_BLOCKS: u32 = 65536;

/// The bdev geometry a queue checks requests against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    /// The per-tag buffer: the most a read or write may move.
    pub max_io_bytes: u32,
    /// Bit `IoType::index()` set: the bdev supports it.
    pub supported_mask: u8,
}

impl Geometry {
    pub fn from_info(info: &BdevInfo, max_io_bytes: u32) -> Self {
        Self {
            block_size_bytes: info.block_size_bytes,
            num_blocks: info.num_blocks,
            max_io_bytes,
            supported_mask: info
                .supported_io_types
                .iter()
                .fold(0u8, |mask, t| mask | (1 << t.index())),
        }
    }

    pub fn supports(&self, io_type: IoType) -> bool {
        self.supported_mask & (1 << io_type.index()) != 0
    }
}

/// Why a bdev cannot be a ublk disk (the caller names the disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadBlockSize(pub u32);

/// SET_PARAMS for a bdev: logical (and physical, minimum, optimal) block size from the
/// bdev's, capacity in 512-byte sectors, the largest request the per-tag buffer holds, a
/// volatile write cache when the bdev takes flushes (so the kernel sends them), and
/// discard / write-zeroes limits when the bdev supports unmap / write zeroes.
pub fn derive_params(
    info: &BdevInfo,
    max_io_buf_bytes: u32,
    page_size: usize,
) -> Result<Params, BadBlockSize> {
    let block_size = info.block_size_bytes;
    if !block_size.is_power_of_two() || block_size < 512 || block_size as usize > page_size {
        return Err(BadBlockSize(block_size));
    }
    let shift = block_size.trailing_zeros() as u8;
    let geometry = Geometry::from_info(info, max_io_buf_bytes);
    let mut attrs = 0;
    if geometry.supports(IoType::Flush) {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
    }
    let dev_sectors = info.num_blocks.saturating_mul(u64::from(block_size)) >> SECTOR_SHIFT;
    let mut params = Params {
        len: std::mem::size_of::<Params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: max_io_buf_bytes >> SECTOR_SHIFT,
            chunk_sectors: 0,
            dev_sectors,
            virt_boundary_mask: 0,
        },
        ..Params::default()
    };
    let max_no_data_sectors = MAX_NO_DATA_BLOCKS << (u32::from(shift) - SECTOR_SHIFT);
    let unmap = geometry.supports(IoType::Unmap);
    let zeroes = geometry.supports(IoType::WriteZeroes);
    if unmap || zeroes {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = ParamDiscard {
            discard_alignment: 0,
            discard_granularity: block_size,
            max_discard_sectors: if unmap { max_no_data_sectors } else { 0 },
            max_write_zeroes_sectors: if zeroes { max_no_data_sectors } else { 0 },
            // The kernel takes single-segment discards only.
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    Ok(params)
}

/// A request, as the bdev will see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BdevOp {
    pub io_type: IoType,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    /// Bytes moved through the tag's buffer (reads and writes), else 0.
    pub data_bytes: u32,
}

/// Decodes a descriptor into a bdev operation, or the negative errno to commit it with.
#[inline]
pub fn decode(iod: &IoDesc, geometry: &Geometry) -> Result<BdevOp, i32> {
    let io_type = match iod.op() {
        sys::UBLK_IO_OP_READ => IoType::Read,
        sys::UBLK_IO_OP_WRITE => IoType::Write,
        sys::UBLK_IO_OP_FLUSH => IoType::Flush,
        sys::UBLK_IO_OP_DISCARD => IoType::Unmap,
        sys::UBLK_IO_OP_WRITE_ZEROES => IoType::WriteZeroes,
        sys::UBLK_IO_OP_WRITE_SAME => return Err(-libc::EOPNOTSUPP),
        _ => return Err(-libc::EINVAL),
    };
    if !geometry.supports(io_type) {
        return Err(-libc::EOPNOTSUPP);
    }
    if io_type == IoType::Flush {
        // A flush covers the whole device whatever its range says.
        return Ok(BdevOp {
            io_type,
            offset_blocks: 0,
            num_blocks: geometry.num_blocks,
            data_bytes: 0,
        });
    }
    let block_shift = geometry.block_size_bytes.trailing_zeros();
    let sectors_per_block_mask = (1u64 << block_shift.saturating_sub(SECTOR_SHIFT)) - 1;
    let nr_sectors = u64::from(iod.nr_sectors);
    if nr_sectors == 0
        || iod.start_sector & sectors_per_block_mask != 0
        || nr_sectors & sectors_per_block_mask != 0
    {
        return Err(-libc::EINVAL);
    }
    let shift = block_shift.saturating_sub(SECTOR_SHIFT);
    let offset_blocks = iod.start_sector >> shift;
    let num_blocks = nr_sectors >> shift;
    match offset_blocks.checked_add(num_blocks) {
        Some(end) if end <= geometry.num_blocks => {}
        _ => return Err(-libc::EINVAL),
    }
    let data_bytes = if io_type.carries_data() {
        let bytes = nr_sectors << SECTOR_SHIFT;
        if bytes > u64::from(geometry.max_io_bytes) {
            return Err(-libc::EINVAL);
        }
        bytes as u32
    } else {
        0
    };
    Ok(BdevOp {
        io_type,
        offset_blocks,
        num_blocks,
        data_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollux_bdev::Uuid;

    fn info(block_size: u32, num_blocks: u64, types: &[IoType]) -> BdevInfo {
        BdevInfo {
            name: "Malloc0".into(),
            aliases: Vec::new(),
            uuid: Uuid([0; 16]),
            block_size_bytes: block_size,
            num_blocks,
            required_alignment_bytes: 1,
            write_cache: false,
            module: "malloc",
            supported_io_types: types.to_vec(),
        }
    }

    const ALL: [IoType; 5] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
    ];

    #[test]
    fn params_from_a_4k_malloc_bdev() {
        let p = derive_params(&info(4096, 65536, &ALL), 128 << 10, 4096).expect("valid");
        assert_eq!(p.len, 112);
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.io_min_shift, 12);
        assert_eq!(p.basic.dev_sectors, 256 << 11); // 256 MiB
        assert_eq!(p.basic.max_sectors, 256);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_segments, 1);
        // 65536 blocks of 4 KiB, in sectors: what one NVMe command carries.
        assert_eq!(p.discard.max_discard_sectors, 65536 * 8);
        assert_eq!(p.discard.max_write_zeroes_sectors, 65536 * 8);
    }

    #[test]
    fn params_without_unmap_or_flush() {
        let p = derive_params(
            &info(512, 1000, &[IoType::Read, IoType::Write]),
            65536,
            4096,
        )
        .expect("valid");
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.dev_sectors, 1000);
        assert_eq!(p.basic.attrs, 0);
        let z = derive_params(
            &info(
                512,
                1000,
                &[IoType::Read, IoType::Write, IoType::WriteZeroes],
            ),
            65536,
            4096,
        )
        .expect("valid");
        assert_eq!(
            z.types & sys::UBLK_PARAM_TYPE_DISCARD,
            sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(z.discard.max_discard_sectors, 0);
        assert!(z.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn block_sizes_ublk_cannot_take() {
        for bs in [256, 520, 8192] {
            assert_eq!(
                derive_params(&info(bs, 10, &ALL), 65536, 4096),
                Err(BadBlockSize(bs))
            );
        }
        assert!(derive_params(&info(8192, 10, &ALL), 65536, 65536).is_ok());
    }

    fn iod(op: u8, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | (1 << 8),
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    fn geometry() -> Geometry {
        Geometry::from_info(&info(4096, 1024, &ALL), 128 << 10)
    }

    #[test]
    fn requests_become_bdev_ops() {
        let g = geometry();
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_READ, 8, 16), &g),
            Ok(BdevOp {
                io_type: IoType::Read,
                offset_blocks: 1,
                num_blocks: 2,
                data_bytes: 8192
            })
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_WRITE, 8184, 8), &g)
                .map(|o| (o.offset_blocks, o.data_bytes)),
            Ok((1023, 4096))
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, 0), &g).map(|o| o.io_type),
            Ok(IoType::Flush)
        );
        let discard = decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 8192), &g).expect("whole disk");
        assert_eq!(
            (discard.io_type, discard.num_blocks, discard.data_bytes),
            (IoType::Unmap, 1024, 0)
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_WRITE_ZEROES, 16, 8), &g).map(|o| o.io_type),
            Ok(IoType::WriteZeroes)
        );
    }

    #[test]
    fn hostile_descriptors_are_refused_not_panicked_on() {
        let g = geometry();
        let einval = Err(-libc::EINVAL);
        // Past the end, and overflowing.
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 8192, 8), &g), einval);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 8184, 16), &g), einval);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_WRITE, !7, 8), &g), einval);
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_DISCARD, u64::MAX - 7, !7), &g),
            einval
        );
        // Empty, misaligned, larger than the tag's buffer.
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 0, 0), &g), einval);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 1, 8), &g), einval);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_WRITE, 0, 9), &g), einval);
        assert_eq!(decode(&iod(sys::UBLK_IO_OP_READ, 0, 264), &g), einval);
        // Unknown and unsupported operations.
        for op in [6, 10, 13, 0x22, 0xff] {
            assert_eq!(decode(&iod(op, 0, 8), &g), einval, "op {op}");
        }
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_WRITE_SAME, 0, 8), &g),
            Err(-libc::EOPNOTSUPP)
        );
        let plain = Geometry::from_info(&info(4096, 1024, &[IoType::Read, IoType::Write]), 65536);
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, 8), &plain),
            Err(-libc::EOPNOTSUPP)
        );
        assert_eq!(
            decode(&iod(sys::UBLK_IO_OP_FLUSH, 0, 0), &plain),
            Err(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn every_descriptor_decodes_without_panicking() {
        let g = Geometry::from_info(&info(512, 100, &ALL), 65536);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let d = IoDesc {
                op_flags: state as u32,
                nr_sectors: (state >> 20) as u32 & 0x3ff,
                start_sector: state >> 40,
                addr: state,
            };
            if let Ok(op) = decode(&d, &g) {
                assert!(op.offset_blocks + op.num_blocks <= 100);
                assert!(op.data_bytes <= 65536);
            }
        }
    }
}
