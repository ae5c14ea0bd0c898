//! Helpers shared by the bdev integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use pollux_bdev::modules::null;
use pollux_bdev::{BdevChannel, BdevRegistry, IoCompletion, IoVec};
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;

/// Registers a null bdev (no data moves) of the given geometry and buffer alignment.
pub fn null_bdev(
    registry: &BdevRegistry,
    name: &str,
    num_blocks: u64,
    block_size_bytes: u32,
    required_alignment_bytes: u32,
) {
    null::create(
        registry,
        null::NullOptions {
            name: name.to_string(),
            uuid: None,
            num_blocks,
            block_size_bytes,
            required_alignment_bytes,
        },
    )
    .expect("null bdev");
}

/// Small DMA memory of its own (locked anonymous memory; no hugepages needed).
pub fn dma(size_mib: usize) -> Arc<DmaMemory> {
    DmaMemory::with_memmap(
        DmaConfig {
            size_mib,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory for tests")
}

/// Test memory that I/O reads and writes: a heap buffer that outlives every I/O of a test.
pub struct TestBuf {
    bytes: Vec<u8>,
}

impl TestBuf {
    pub fn new(len: usize, fill: u8) -> Self {
        Self {
            bytes: vec![fill; len],
        }
    }

    /// An iovec over `[offset, offset + len)`.
    pub fn iov(&mut self, offset: usize, len: usize) -> IoVec {
        assert!(offset + len <= self.bytes.len());
        // SAFETY: the range is inside `bytes`, which lives until the end of the test, after
        // every I/O was polled to completion, and the test only reads it between I/Os.
        unsafe { IoVec::new(self.bytes.as_mut_ptr().add(offset), len) }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

/// Polls until `count` completions arrived (bounded); returns them in order.
pub fn reap(channel: &mut BdevChannel, count: usize) -> Vec<IoCompletion> {
    let mut done = Vec::new();
    for _ in 0..1000 {
        channel.poll(|_, completion| done.push(completion));
        if done.len() >= count {
            break;
        }
    }
    assert_eq!(done.len(), count, "completions");
    done
}
