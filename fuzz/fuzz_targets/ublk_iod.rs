//! What the kernel's ublk driver writes into a queue's descriptor array, into the ublk
//! target's decoder (`pollux_ublk::params::decode`), and the kernel parameters derived from a
//! bdev (`derive_params`).
//!
//! The input: 8 bytes of geometry (block size shift 9..=12 from byte 0, the supported I/O
//! types from byte 1, the tag buffer in 512-byte units from bytes 2-3, the block count from
//! bytes 4-7), then 24-byte descriptors (`ublksrv_io_desc`, little endian) until the input
//! ends.
//!
//! Invariants: nothing panics; a decoded request lies inside the bdev, on block boundaries,
//! names an I/O type the bdev supports, and moves at most the tag's buffer (exactly its
//! blocks for reads and writes, nothing for the others); a refused one carries a negative
//! errno. Derived parameters, when a block size is accepted, describe that block size and the
//! bdev's size in sectors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollux_bdev::{BdevInfo, IoType, Uuid};
use pollux_ublk::params::{decode, derive_params, Geometry};
use pollux_ublk::sys::IoDesc;

const TYPES: [IoType; 5] = [
    IoType::Read,
    IoType::Write,
    IoType::Flush,
    IoType::Unmap,
    IoType::WriteZeroes,
];

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 8 {
        return;
    }
    let block_size = 512u32 << (input[0] % 4);
    let types: Vec<IoType> = TYPES
        .iter()
        .enumerate()
        .filter(|(i, _)| input[1] & (1 << i) != 0)
        .map(|(_, t)| *t)
        .collect();
    let max_io_bytes = u32::from(u16::from_le_bytes([input[2], input[3]])) << 9;
    let num_blocks = u64::from(u32_at(input, 4));
    let info = BdevInfo {
        name: "fuzz".into(),
        aliases: Vec::new(),
        uuid: Uuid([0; 16]),
        block_size_bytes: block_size,
        num_blocks,
        required_alignment_bytes: 1,
        write_cache: false,
        module: "fuzz",
        supported_io_types: types.clone(),
    };
    let params = derive_params(&info, max_io_bytes, 4096).expect("block sizes 512..4096 are taken");
    assert_eq!(1u32 << params.basic.logical_bs_shift, block_size);
    assert_eq!(
        params.basic.dev_sectors,
        num_blocks * u64::from(block_size) / 512
    );
    assert_eq!(params.basic.max_sectors, max_io_bytes >> 9);
    let geometry = Geometry::from_info(&info, max_io_bytes);
    for d in input[8..].chunks_exact(24) {
        let iod = IoDesc {
            op_flags: u32_at(d, 0),
            nr_sectors: u32_at(d, 4),
            start_sector: u64_at(d, 8),
            addr: u64_at(d, 16),
        };
        match decode(&iod, &geometry) {
            Ok(op) => {
                assert!(types.contains(&op.io_type));
                let end = op
                    .offset_blocks
                    .checked_add(op.num_blocks)
                    .expect("no overflow");
                assert!(end <= num_blocks);
                assert!(op.data_bytes <= max_io_bytes);
                if op.io_type.carries_data() {
                    assert!(op.num_blocks > 0);
                    assert_eq!(
                        u64::from(op.data_bytes),
                        op.num_blocks * u64::from(block_size)
                    );
                } else {
                    assert_eq!(op.data_bytes, 0);
                }
                if op.io_type != IoType::Flush {
                    assert_eq!(
                        iod.start_sector * 512,
                        op.offset_blocks * u64::from(block_size)
                    );
                }
            }
            Err(errno) => assert!(errno < 0),
        }
    }
});
