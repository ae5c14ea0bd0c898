//! Fixed-size DMA buffer pools, so that the I/O path never calls an allocator.
//!
//! A [`BufferPool`] carves `count` equal buffers out of one [`DmaMemory`] allocation made at
//! setup. Free buffers are tracked by index in a lock-free bounded queue
//! ([`crossbeam_queue::ArrayQueue`]), so any thread can take and return them without a lock.
//! An empty pool is an error ([`PoolError::Exhausted`]), never a wait: the caller decides
//! whether to queue the request and retry from a poller.
//!
//! In front of the shared queue, each polling thread keeps a [`PoolCache`] (as SPDK's
//! per-thread mempool caches): gets and puts touch only a local `Vec` and reach the shared
//! queue in batches, which keeps the queue's cache lines from bouncing between cores on
//! every I/O. The cache's `Vec` is allocated once with its capacity and never grows.
//!
//! A [`PoolBuffer`] goes back to the shared queue when dropped, or to a cache through
//! [`PoolCache::put`]. Like [`crate::dma::DmaBuffer`] it is never exposed as a Rust
//! reference; its accessors share [`DmaError`] for bounds and translation failures.

use std::fmt;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::dma::{self, DmaBuffer, DmaError, DmaMemory};

/// Marks a [`PoolBuffer`] whose index was handed to a cache: its drop does nothing.
const RETURNED: u32 = u32::MAX;
/// Most buffers in one pool (indices are `u32`, one value is the `RETURNED` marker).
pub const MAX_BUFFERS: usize = (u32::MAX - 1) as usize;

/// Why a pool could not be made or a buffer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("a buffer pool needs at least one buffer of at least one byte (got {count} x {buf_len_bytes} bytes)")]
    Empty { count: usize, buf_len_bytes: usize },
    #[error("a buffer pool holds at most {MAX_BUFFERS} buffers (asked for {count})")]
    TooManyBuffers { count: usize },
    #[error("buffer pool of {count} x {buf_len_bytes} bytes does not fit in the address space")]
    TooLarge { count: usize, buf_len_bytes: usize },
    #[error("could not allocate DMA memory for a pool of {count} x {buf_len_bytes} bytes")]
    Alloc {
        count: usize,
        buf_len_bytes: usize,
        #[source]
        source: DmaError,
    },
    #[error("buffer pool of {count} x {buf_len_bytes} bytes is exhausted")]
    Exhausted { count: usize, buf_len_bytes: usize },
}

/// `count` buffers of `buf_len_bytes` from one DMA allocation.
pub struct BufferPool {
    /// Free buffer indices. Every index is in exactly one place: this queue, a cache, or a
    /// live `PoolBuffer`.
    free: ArrayQueue<u32>,
    /// The one allocation the buffers are carved from; never accessed as a whole.
    block: DmaBuffer,
    count: usize,
    buf_len_bytes: usize,
    /// Distance between buffers: `buf_len_bytes` rounded up to the alignment.
    stride_bytes: usize,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("count", &self.count)
            .field("buf_len_bytes", &self.buf_len_bytes)
            .field("available", &self.available())
            .finish()
    }
}

impl BufferPool {
    /// Carves `count` buffers of `buf_len_bytes`, each aligned to `align` (a power of two),
    /// out of one allocation from `memory`.
    pub fn new(
        memory: &Arc<DmaMemory>,
        count: usize,
        buf_len_bytes: usize,
        align: usize,
    ) -> Result<Arc<BufferPool>, PoolError> {
        if count == 0 || buf_len_bytes == 0 {
            return Err(PoolError::Empty {
                count,
                buf_len_bytes,
            });
        }
        if count > MAX_BUFFERS {
            return Err(PoolError::TooManyBuffers { count });
        }
        let alloc_error = |source| PoolError::Alloc {
            count,
            buf_len_bytes,
            source,
        };
        if !align.is_power_of_two() {
            return Err(alloc_error(DmaError::BadAlignment { align }));
        }
        let too_large = PoolError::TooLarge {
            count,
            buf_len_bytes,
        };
        let stride_bytes = buf_len_bytes
            .checked_next_multiple_of(align)
            .ok_or(too_large)?;
        let total_bytes = stride_bytes.checked_mul(count).ok_or(PoolError::TooLarge {
            count,
            buf_len_bytes,
        })?;
        let block = memory
            .alloc(total_bytes, align, None)
            .map_err(alloc_error)?;
        let free = ArrayQueue::new(count);
        for index in 0..count as u32 {
            // The queue holds exactly `count` entries and starts empty.
            let pushed = free.push(index);
            assert!(pushed.is_ok(), "pool: fresh queue refused an index");
        }
        tracing::debug!(count, buf_len_bytes, stride_bytes, "pool: created");
        Ok(Arc::new(BufferPool {
            free,
            block,
            count,
            buf_len_bytes,
            stride_bytes,
        }))
    }

    /// Takes a buffer from the shared queue, or fails at once when none is free.
    pub fn get(self: &Arc<Self>) -> Result<PoolBuffer, PoolError> {
        let index = self.free.pop().ok_or_else(|| self.exhausted())?;
        Ok(PoolBuffer {
            pool: Arc::clone(self),
            index,
        })
    }

    /// A per-thread cache of up to `capacity` buffers (at most `count` are useful).
    pub fn cache(self: &Arc<Self>, capacity: usize) -> PoolCache {
        assert!(capacity > 0, "pool cache capacity must be at least 1");
        let capacity = capacity.min(self.count);
        PoolCache {
            pool: Arc::clone(self),
            local: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// Buffers in the shared queue right now (approximate while other threads get and put;
    /// buffers sitting in caches are not counted).
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Buffers in the pool.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Usable length of each buffer.
    pub fn buf_len_bytes(&self) -> usize {
        self.buf_len_bytes
    }

    /// Distance between the starts of consecutive buffers.
    pub fn stride_bytes(&self) -> usize {
        self.stride_bytes
    }

    fn exhausted(&self) -> PoolError {
        PoolError::Exhausted {
            count: self.count,
            buf_len_bytes: self.buf_len_bytes,
        }
    }

    fn put_index(&self, index: u32) {
        // Each index is pushed back only by its one owner, so the queue (sized to `count`)
        // always has room; a refusal would be a bug in this module.
        if self.free.push(index).is_err() {
            debug_assert!(false, "pool: index {index} returned twice");
            tracing::error!(index, "pool: free queue full, buffer returned twice?");
        }
    }

    fn vaddr_of(&self, index: u32) -> u64 {
        self.block.vaddr() + index as u64 * self.stride_bytes as u64
    }
}

/// One buffer of a [`BufferPool`]; goes back to the pool's shared queue on drop.
pub struct PoolBuffer {
    pool: Arc<BufferPool>,
    /// `RETURNED` once handed to a cache by [`PoolCache::put`].
    index: u32,
}

impl fmt::Debug for PoolBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuffer")
            .field("index", &self.index)
            .field("vaddr", &format_args!("{:#x}", self.vaddr()))
            .finish()
    }
}

impl PoolBuffer {
    /// Index of this buffer in its pool (`0..count`), e.g. to key per-buffer state.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The pool this buffer belongs to.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// Virtual address of the first byte.
    pub fn vaddr(&self) -> u64 {
        self.pool.vaddr_of(self.index)
    }

    /// Usable length (the pool's `buf_len_bytes`).
    pub fn len(&self) -> usize {
        self.pool.buf_len_bytes
    }

    /// Never true: pools refuse zero-length buffers.
    pub fn is_empty(&self) -> bool {
        self.pool.buf_len_bytes == 0
    }

    /// The IOVA devices use for the first byte (contiguous for the whole buffer).
    pub fn iova(&self) -> Result<u64, DmaError> {
        dma::contiguous_iova(
            self.pool.block.memory().memmap(),
            self.vaddr(),
            self.pool.buf_len_bytes,
        )
    }

    /// Raw pointer to the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.vaddr() as *const u8
    }

    /// Raw mutable pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.vaddr() as *mut u8
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DmaError> {
        dma::check_access(offset, src.len(), self.len())?;
        // SAFETY: the range is inside this buffer (checked above); the buffer is owned by
        // this `PoolBuffer` alone and its pool keeps the DMA memory alive; `src` is ordinary
        // memory, so they cannot overlap.
        unsafe { dma::copy_to_dma(self.as_mut_ptr().add(offset), src) };
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DmaError> {
        dma::check_access(offset, dst.len(), self.len())?;
        // SAFETY: as in `write_at`.
        unsafe { dma::copy_from_dma(dst, self.as_ptr().add(offset)) };
        Ok(())
    }

    /// Sets `len_bytes` bytes at `offset` to `byte`.
    pub fn fill(&mut self, offset: usize, len_bytes: usize, byte: u8) -> Result<(), DmaError> {
        dma::check_access(offset, len_bytes, self.len())?;
        // SAFETY: as in `write_at`.
        unsafe { dma::fill_dma(self.as_mut_ptr().add(offset), len_bytes, byte) };
        Ok(())
    }
}

impl Drop for PoolBuffer {
    fn drop(&mut self) {
        if self.index != RETURNED {
            self.pool.put_index(self.index);
        }
    }
}

/// A per-thread cache in front of a [`BufferPool`]; owned by one thread (it is `Send`, so
/// it can be moved to the thread that polls with it). Dropping it returns every cached
/// buffer to the pool.
pub struct PoolCache {
    pool: Arc<BufferPool>,
    /// Allocated once with `capacity`; never grows past it.
    local: Vec<u32>,
    capacity: usize,
}

impl fmt::Debug for PoolCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCache")
            .field("cached", &self.local.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl PoolCache {
    /// Takes a buffer from the cache, refilling it with up to half its capacity from the
    /// shared queue when empty. Fails at once when the cache and the pool are both empty.
    pub fn get(&mut self) -> Result<PoolBuffer, PoolError> {
        if self.local.is_empty() {
            self.refill();
        }
        let index = self.local.pop().ok_or_else(|| self.pool.exhausted())?;
        Ok(PoolBuffer {
            pool: Arc::clone(&self.pool),
            index,
        })
    }

    /// Returns a buffer to the cache; when the cache is full, half of it first goes back to
    /// the shared queue. A buffer of another pool goes back to its own pool.
    pub fn put(&mut self, mut buffer: PoolBuffer) {
        if !Arc::ptr_eq(&buffer.pool, &self.pool) {
            drop(buffer);
            return;
        }
        if self.local.len() == self.capacity {
            self.spill(self.capacity.div_ceil(2));
        }
        let index = std::mem::replace(&mut buffer.index, RETURNED);
        // Room was made above, so this never reallocates.
        self.local.push(index);
    }

    /// Buffers held by this cache right now.
    pub fn cached(&self) -> usize {
        self.local.len()
    }

    /// Most buffers this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The pool behind this cache.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    fn refill(&mut self) {
        let batch = self.capacity.div_ceil(2);
        // Bounded by the batch size: one refill never drains more than half a cache's worth.
        while self.local.len() < batch {
            match self.pool.free.pop() {
                Some(index) => self.local.push(index),
                None => break,
            }
        }
    }

    fn spill(&mut self, spill_count: usize) {
        for _ in 0..spill_count {
            match self.local.pop() {
                Some(index) => self.pool.put_index(index),
                None => break,
            }
        }
    }
}

impl Drop for PoolCache {
    fn drop(&mut self) {
        self.spill(self.local.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::DmaConfig;
    use crate::memmap::MemMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn memory(size_mib: usize) -> Arc<DmaMemory> {
        DmaMemory::with_memmap(
            DmaConfig {
                size_mib,
                no_huge: true,
            },
            Arc::new(MemMap::new()),
        )
        .expect("reserve DMA memory")
    }

    #[test]
    fn exhaustion_is_an_error_and_drop_returns() {
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 4, 4096, 4096).unwrap();
        let buffers: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
        assert_eq!(pool.available(), 0);
        let error = pool.get().unwrap_err();
        assert!(matches!(
            error,
            PoolError::Exhausted {
                count: 4,
                buf_len_bytes: 4096
            }
        ));
        assert!(error.to_string().contains("exhausted"));
        drop(buffers);
        assert_eq!(pool.available(), 4);
        assert!(pool.get().is_ok());
    }

    #[test]
    fn buffers_are_distinct_aligned_and_translate() {
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 16, 1000, 512).unwrap();
        assert_eq!(pool.stride_bytes(), 1024);
        let mut buffers: Vec<_> = (0..16).map(|_| pool.get().unwrap()).collect();
        let mut starts: Vec<u64> = buffers.iter().map(|b| b.vaddr()).collect();
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 16);
        assert!(starts.windows(2).all(|w| w[1] - w[0] >= 1000));
        for buffer in &mut buffers {
            assert_eq!(buffer.vaddr() % 512, 0);
            assert_eq!(buffer.len(), 1000);
            assert_eq!(buffer.iova().unwrap(), buffer.vaddr());
            let t = memory.memmap().translate(buffer.vaddr(), 1000).unwrap();
            assert_eq!(t.len, 1000);
            buffer.fill(0, 1000, buffer.index() as u8).unwrap();
        }
        // No buffer's fill spilled into a neighbour.
        for buffer in &buffers {
            let mut edge = [0u8; 2];
            buffer.read_at(0, &mut edge[..1]).unwrap();
            buffer.read_at(999, &mut edge[1..]).unwrap();
            assert_eq!(edge, [buffer.index() as u8; 2]);
        }
        assert!(matches!(
            buffers[0].write_at(999, &[0, 0]),
            Err(DmaError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn bad_pools_are_refused() {
        let memory = memory(2);
        assert!(matches!(
            BufferPool::new(&memory, 0, 64, 64),
            Err(PoolError::Empty { .. })
        ));
        assert!(matches!(
            BufferPool::new(&memory, 4, 0, 64),
            Err(PoolError::Empty { .. })
        ));
        assert!(matches!(
            BufferPool::new(&memory, 4, 64, 3),
            Err(PoolError::Alloc {
                source: DmaError::BadAlignment { align: 3 },
                ..
            })
        ));
        assert!(matches!(
            BufferPool::new(&memory, 1 << 20, 4096, 4096),
            Err(PoolError::Alloc {
                source: DmaError::OutOfMemory { .. },
                ..
            })
        ));
        assert!(matches!(
            BufferPool::new(&memory, 1 << 30, usize::MAX / 4, 64),
            Err(PoolError::TooLarge { .. })
        ));
    }

    #[test]
    fn cache_refills_in_batches_and_spills_half() {
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 32, 512, 64).unwrap();
        let mut cache = pool.cache(8);
        let first = cache.get().unwrap();
        // One refill of half the capacity, one of them handed out.
        assert_eq!(cache.cached(), 3);
        assert_eq!(pool.available(), 28);
        let mut held = vec![first];
        for _ in 0..15 {
            held.push(cache.get().unwrap());
        }
        // Sixteen gets took exactly four batches of four: nothing left in the cache.
        assert_eq!(cache.cached(), 0);
        assert_eq!(pool.available(), 16);
        let mut cached_max = 0;
        for buffer in held.drain(..) {
            cache.put(buffer);
            cached_max = cached_max.max(cache.cached());
        }
        assert_eq!(cached_max, 8, "never above capacity");
        // Puts 9 and 13 found the cache full and spilled four each time: 8 cached, 24 shared.
        assert_eq!(cache.cached(), 8);
        assert_eq!(pool.available(), 24);
        drop(cache);
        assert_eq!(pool.available(), 32);
    }

    #[test]
    fn cache_exhaustion_is_an_error_and_dropped_buffers_go_home() {
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 4, 512, 64).unwrap();
        let mut cache = pool.cache(100);
        assert_eq!(cache.capacity(), 4, "capacity clamps to the pool");
        let held: Vec<_> = (0..4).map(|_| cache.get().unwrap()).collect();
        assert!(matches!(cache.get(), Err(PoolError::Exhausted { .. })));
        drop(held);
        assert_eq!(pool.available(), 4);
        // A buffer of another pool put into this cache goes back to its own pool.
        let other = BufferPool::new(&memory, 2, 512, 64).unwrap();
        cache.put(other.get().unwrap());
        assert_eq!(other.available(), 2);
        assert_eq!(cache.cached(), 0);
    }

    /// Two threads take and return buffers (one through a cache, one directly) as fast as
    /// they can; a per-index flag catches any buffer handed out twice, and each holder's
    /// pattern written into the buffer must still be there when it returns it.
    #[test]
    fn concurrent_get_put_never_hands_out_a_buffer_twice() {
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 64, 256, 64).unwrap();
        let in_use: Arc<Vec<AtomicBool>> =
            Arc::new((0..64).map(|_| AtomicBool::new(false)).collect());
        let worker = |thread: u8, use_cache: bool| {
            let pool = pool.clone();
            let in_use = in_use.clone();
            std::thread::spawn(move || {
                let mut cache = use_cache.then(|| pool.cache(16));
                let mut held: Vec<PoolBuffer> = Vec::with_capacity(40);
                let mut exhausted = 0u64;
                for round in 0..20_000u32 {
                    let want = (round % 40) as usize;
                    while held.len() < want {
                        let got = match cache.as_mut() {
                            Some(cache) => cache.get(),
                            None => pool.get(),
                        };
                        let Ok(mut buffer) = got else {
                            exhausted += 1;
                            break;
                        };
                        let was = in_use[buffer.index() as usize].swap(true, Ordering::AcqRel);
                        assert!(!was, "buffer {} handed out twice", buffer.index());
                        buffer.fill(0, 256, thread).unwrap();
                        held.push(buffer);
                    }
                    while held.len() > want / 2 {
                        let buffer = held.pop().unwrap();
                        let mut check = [0u8; 256];
                        buffer.read_at(0, &mut check).unwrap();
                        assert!(check.iter().all(|&b| b == thread), "buffer overwritten");
                        in_use[buffer.index() as usize].store(false, Ordering::Release);
                        match cache.as_mut() {
                            Some(cache) => cache.put(buffer),
                            None => drop(buffer),
                        }
                    }
                }
                for buffer in held {
                    in_use[buffer.index() as usize].store(false, Ordering::Release);
                }
                exhausted
            })
        };
        let a = worker(0xa5, true);
        let b = worker(0x5a, false);
        a.join().expect("thread a");
        b.join().expect("thread b");
        assert_eq!(pool.available(), 64);
    }

    #[test]
    fn buffers_follow_the_memmap() {
        struct Offset;
        impl crate::memmap::DmaMapper for Offset {
            fn map_dma(&self, vaddr: u64, _len: u64) -> std::io::Result<u64> {
                Ok(vaddr + (1 << 40))
            }
            fn unmap_dma(&self, _iova: u64, _len: u64) -> std::io::Result<()> {
                Ok(())
            }
        }
        let memory = memory(2);
        let pool = BufferPool::new(&memory, 4, 4096, 4096).unwrap();
        memory.memmap().set_mapper(Arc::new(Offset)).unwrap();
        let buffer = pool.get().unwrap();
        assert_eq!(buffer.iova().unwrap(), buffer.vaddr() + (1 << 40));
        fn assert_send<T: Send>() {}
        assert_send::<PoolBuffer>();
        assert_send::<PoolCache>();
    }
}
