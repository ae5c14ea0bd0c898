//! The data every block is written with, and what a block is expected to hold.
//!
//! A pattern block is self-describing, so a misdirected write says where it came from:
//! word 0 = LBA, word 1 = NSID << 32 | seed, the rest a cheap mix of (seed, NSID, LBA). The
//! host-side image check (`nvme-vmtest check-image`) generates the same bytes.

/// What one block must hold when read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Not written by this run: anything goes.
    Unknown,
    Zero,
    Pattern(u32),
    /// Deallocated after holding the pattern: NVMe lets the controller keep the data or
    /// return zeroes (DLFEAT), and QEMU's `discard=ignore` default keeps it.
    PatternOrZero(u32),
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut x: u64) -> u64 {
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` (one block, a multiple of 8 bytes) with the pattern of (`nsid`, `lba`, `seed`).
pub fn fill_block(out: &mut [u8], nsid: u32, lba: u64, seed: u32) {
    let base = mix((u64::from(seed) << 32) ^ u64::from(nsid)) ^ mix(lba.wrapping_add(GOLDEN));
    for (index, word) in out.chunks_exact_mut(8).enumerate() {
        let value = match index {
            0 => lba,
            1 => (u64::from(nsid) << 32) | u64::from(seed),
            _ => base.wrapping_add((index as u64).wrapping_mul(GOLDEN)),
        };
        word.copy_from_slice(&value.to_le_bytes());
    }
}

/// Checks one block against its state; `scratch` is a block-sized work area. The error says
/// what the block holds instead (whose LBA / seed, when it is a pattern block).
pub fn check_block(
    data: &[u8],
    nsid: u32,
    lba: u64,
    state: BlockState,
    scratch: &mut [u8],
) -> Result<(), String> {
    let is_zero = || data.iter().all(|&b| b == 0);
    let matches = |seed: u32, scratch: &mut [u8]| {
        fill_block(scratch, nsid, lba, seed);
        data == &scratch[..data.len()]
    };
    let ok = match state {
        BlockState::Unknown => true,
        BlockState::Zero => is_zero(),
        BlockState::Pattern(seed) => matches(seed, scratch),
        BlockState::PatternOrZero(seed) => is_zero() || matches(seed, scratch),
    };
    if ok {
        return Ok(());
    }
    let word = |i: usize| {
        data.get(8 * i..8 * i + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let found = if is_zero() {
        "all zeroes".to_string()
    } else {
        format!(
            "a block stamped lba {} nsid {} seed {:#x}",
            word(0),
            word(1) >> 32,
            word(1) as u32
        )
    };
    Err(format!(
        "nsid {nsid} lba {lba}: expected {state:?}, found {found}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_distinct_and_checkable() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        let mut scratch = vec![0u8; 512];
        fill_block(&mut a, 1, 7, 0xa);
        fill_block(&mut b, 1, 8, 0xa);
        assert_ne!(a, b);
        fill_block(&mut b, 2, 7, 0xa);
        assert_ne!(a, b);
        assert!(check_block(&a, 1, 7, BlockState::Pattern(0xa), &mut scratch).is_ok());
        assert!(check_block(&a, 1, 7, BlockState::PatternOrZero(0xa), &mut scratch).is_ok());
        let error = check_block(&a, 1, 9, BlockState::Pattern(0xa), &mut scratch).unwrap_err();
        assert!(error.contains("stamped lba 7 nsid 1 seed 0xa"), "{error}");
        assert!(check_block(&[0; 512], 1, 7, BlockState::Zero, &mut scratch).is_ok());
        assert!(check_block(&[0; 512], 1, 7, BlockState::PatternOrZero(3), &mut scratch).is_ok());
        assert!(check_block(&a, 1, 7, BlockState::Zero, &mut scratch).is_err());
    }
}
