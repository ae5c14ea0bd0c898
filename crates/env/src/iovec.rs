//! The one scatter-gather entry of the stack: an address and a length, like `struct iovec`.
//!
//! It lives here, below the bdev layer and the NVMe driver, so that a bdev's iovec reaches a
//! queue pair as it is (no conversion, no second type with its own safety contract). Whoever
//! consumes it (a bdev module, a device through PRPs) reads or writes that memory later, on
//! its own schedule, with no borrow tying it to the caller: that is why building one over
//! arbitrary memory is `unsafe`, and why the safe constructors take DMA memory, which is never
//! turned into a Rust reference (see [`crate::dma`]).

use crate::dma::{DmaBuffer, DmaError};

/// One scatter-gather entry over `[addr, addr + len_bytes)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoVec {
    addr: u64,
    len_bytes: usize,
}

impl IoVec {
    /// An iovec over `[addr, addr + len_bytes)`.
    ///
    /// # Safety
    /// Until every I/O submitted with this iovec has completed (its completion was handed back
    /// by the bdev channel or the queue pair that took it), the range stays mapped and valid
    /// for reads and writes, is not freed, and is neither read nor written by anyone else (a
    /// write I/O only reads it, but the caller must still not write it meanwhile): a device may
    /// DMA into it. It is not memory that a bdev module owns (a malloc bdev's disk, say).
    pub unsafe fn new(addr: *mut u8, len_bytes: usize) -> Self {
        Self {
            addr: addr as u64,
            len_bytes,
        }
    }

    /// An iovec over `len_bytes` of a DMA buffer at `offset` (checked against the buffer; an
    /// empty one is refused).
    ///
    /// Safe because DMA memory is never turned into a Rust reference (env reads and writes it
    /// only through volatile copies), so a device or module writing it cannot break Rust's
    /// aliasing rules, and a freed buffer stays mapped DMA memory. The caller must still keep
    /// `buffer` alive, and leave those bytes alone, until the I/O completes: dropping it
    /// earlier lets the I/O land in memory that has been handed to someone else.
    pub fn from_dma_buffer(
        buffer: &DmaBuffer,
        offset: usize,
        len_bytes: usize,
    ) -> Result<Self, DmaError> {
        match offset.checked_add(len_bytes) {
            Some(end) if end <= buffer.len() && len_bytes > 0 => Ok(Self {
                addr: buffer.vaddr() + offset as u64,
                len_bytes,
            }),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len_bytes,
                buf_len_bytes: buffer.len(),
            }),
        }
    }

    /// The `len_bytes` bytes at `offset` of this iovec, or `None` when they are not all inside
    /// it. Safe: a part of an iovec is valid for as long as the whole, under the same contract.
    #[inline]
    pub fn part(&self, offset: usize, len_bytes: usize) -> Option<Self> {
        let end = offset.checked_add(len_bytes)?;
        (end <= self.len_bytes).then(|| Self {
            addr: self.addr + offset as u64,
            len_bytes,
        })
    }

    /// Address of the first byte.
    #[inline]
    pub fn addr(&self) -> u64 {
        self.addr
    }

    #[inline]
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Raw pointer to the first byte, for modules that move data.
    #[inline]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaConfig, DmaMemory};

    #[test]
    fn dma_buffer_iovecs_are_bounds_checked() {
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 2,
            no_huge: true,
        })
        .expect("DMA memory");
        let buffer = dma.alloc(8192, 4096, None).expect("buffer");
        let iov = IoVec::from_dma_buffer(&buffer, 4096, 4096).expect("inside");
        assert_eq!(iov.addr(), buffer.vaddr() + 4096);
        assert_eq!(iov.len_bytes(), 4096);
        assert!(matches!(
            IoVec::from_dma_buffer(&buffer, 4096, 4097),
            Err(DmaError::OutOfBounds {
                offset: 4096,
                len_bytes: 4097,
                buf_len_bytes: 8192
            })
        ));
        assert!(IoVec::from_dma_buffer(&buffer, 0, 0).is_err());
        assert!(IoVec::from_dma_buffer(&buffer, usize::MAX, 2).is_err());
    }

    #[test]
    fn parts_stay_inside_their_iovec() {
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 2,
            no_huge: true,
        })
        .expect("DMA memory");
        let buffer = dma.alloc(4096, 4096, None).expect("buffer");
        let iov = IoVec::from_dma_buffer(&buffer, 0, 4096).expect("whole");
        let part = iov.part(512, 1024).expect("inside");
        assert_eq!(part.addr(), iov.addr() + 512);
        assert_eq!(part.len_bytes(), 1024);
        assert_eq!(iov.part(4096, 0).map(|p| p.len_bytes()), Some(0));
        assert!(iov.part(3072, 1025).is_none());
        assert!(iov.part(usize::MAX, 1).is_none());
    }
}
