//! What the virtio_blk bdev's process tests share, whichever back-end they drive
//! (qemu-storage-daemon, pollux-vhost): DMA memory without hugepages, I/O vectors over DMA
//! buffers, and a bounded wait for completions.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_bdev::{BdevChannel, IoCompletion, IoVec};
use pollux_env::dma::{DmaBuffer, DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;

/// `size_mib` of DMA memory from the heap (no hugepages) with a map of its own.
pub fn dma(size_mib: usize) -> Arc<DmaMemory> {
    DmaMemory::with_memmap(
        DmaConfig {
            size_mib,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory")
}

pub fn iov(buffer: &mut DmaBuffer) -> IoVec {
    // SAFETY: the buffer outlives every I/O of the test (each test waits for its
    // completions before dropping it) and is not touched while an I/O uses it.
    unsafe { IoVec::new(buffer.as_mut_ptr(), buffer.len()) }
}

/// Polls until `count` completions arrived (10 s at most).
pub fn wait(channel: &mut BdevChannel, count: usize) -> Vec<IoCompletion> {
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} I/Os completed in 10 s",
            done.len()
        );
        channel.poll(|_, completion| done.push(completion));
    }
    done
}
