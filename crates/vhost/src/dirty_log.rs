//! The dirty-page log of live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD): a bitmap the front-end shares by SET_LOG_BASE, one bit per
//! 4 KiB page of guest physical memory (vhost-user spec, "Migration"; QEMU's `VHOST_LOG_PAGE`),
//! bit `page % 8` of byte `page / 8`. While logging is on, the target sets the bit of every page
//! it writes: data buffers of reads, status bytes, GET_ID strings and the rings' used areas. The
//! front-end reads and clears the bitmap with atomic exchanges while the guest runs, and sends
//! the pages whose bits were set again.
//!
//! # Safety model
//!
//! The bitmap is shared memory the front-end changes at any time, so it is only ever touched
//! through atomic read-modify-write operations on single bytes, each inside the mapping (checked
//! against its length). A page beyond what the log covers (a memory table that grew past it) is
//! counted and skipped, never written. The whole mapping lies inside the file (its size is
//! checked before mapping), so no access faults on a hole past the end.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bytes of guest memory one bit stands for (vhost-user's log page).
pub const LOG_PAGE_BYTES: u64 = 4096;
/// Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// Why a log region was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log region of size 0")]
    Empty,
    #[error("log region of {size} bytes is larger than the {MAX_LOG_BYTES} bytes accepted")]
    TooLarge { size: u64 },
    #[error("log region [{offset:#x}, +{size:#x}) overflows the file's address space")]
    Overflow { offset: u64, size: u64 },
    #[error("reading the size of the log file")]
    Stat(#[source] std::io::Error),
    #[error(
        "log region [{offset:#x}, +{size:#x}) lies past the end of its file ({file_bytes} bytes)"
    )]
    PastFileEnd {
        offset: u64,
        size: u64,
        file_bytes: u64,
    },
    #[error("mapping the log region [{offset:#x}, +{size:#x})")]
    Map {
        offset: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("log region of {size} bytes covers guest memory up to {covered_bytes:#x}; the memory table reaches {needed_bytes:#x}")]
    TooSmall {
        size: u64,
        covered_bytes: u64,
        needed_bytes: u64,
    },
}

/// A mapped dirty-page bitmap. Shared by every queue of a controller (`Arc`); marking is
/// lock-free.
pub struct DirtyLog {
    /// Host address of the bitmap's first byte (inside `map`).
    base: usize,
    len_bytes: usize,
    /// Pages a mark fell outside the bitmap (the memory table outgrew it).
    pages_outside: AtomicU64,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("len_bytes", &self.len_bytes)
            .field("pages_outside", &self.pages_outside.load(Ordering::Relaxed))
            .finish()
    }
}

impl DirtyLog {
    /// Maps `size` bytes of `file` from `offset` (SET_LOG_BASE's `mmap_size`, `mmap_offset`),
    /// shared and read-write. All checks come before the mapping.
    pub fn map(file: &File, size: u64, offset: u64) -> Result<Self, LogError> {
        if size == 0 {
            return Err(LogError::Empty);
        }
        if size > MAX_LOG_BYTES {
            return Err(LogError::TooLarge { size });
        }
        let end = offset
            .checked_add(size)
            .ok_or(LogError::Overflow { offset, size })?;
        let file_bytes = file.metadata().map_err(LogError::Stat)?.len();
        if end > file_bytes {
            return Err(LogError::PastFileEnd {
                offset,
                size,
                file_bytes,
            });
        }
        // mmap wants a page-aligned file offset: map from the page below it.
        let page = 4096u64;
        let map_offset = offset & !(page - 1);
        let delta = offset - map_offset;
        // delta < 4096 and size <= 1 GiB: the sum fits in usize.
        let map_len = (delta + size) as usize;
        let map = memmap2::MmapOptions::new()
            .offset(map_offset)
            .len(map_len)
            .map_raw(file)
            .map_err(|source| LogError::Map {
                offset,
                size,
                source,
            })?;
        if map.len() != map_len {
            return Err(LogError::Map {
                offset,
                size,
                source: std::io::Error::other("short mapping"),
            });
        }
        Ok(Self {
            base: map.as_mut_ptr() as usize + delta as usize,
            len_bytes: size as usize,
            pages_outside: AtomicU64::new(0),
            map,
        })
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Guest memory the bitmap covers, from address 0.
    pub fn covered_bytes(&self) -> u64 {
        (self.len_bytes as u64)
            .saturating_mul(8)
            .saturating_mul(LOG_PAGE_BYTES)
    }

    /// Refuses a log that does not cover guest memory up to `needed_bytes` (the end of the
    /// memory table's highest region).
    pub fn check_covers(&self, needed_bytes: u64) -> Result<(), LogError> {
        if needed_bytes > self.covered_bytes() {
            return Err(LogError::TooSmall {
                size: self.len_bytes as u64,
                covered_bytes: self.covered_bytes(),
                needed_bytes,
            });
        }
        Ok(())
    }

    /// Pages that fell outside the bitmap so far.
    pub fn pages_outside(&self) -> u64 {
        self.pages_outside.load(Ordering::Relaxed)
    }

    /// Marks every page of `[gpa, gpa + len)` dirty, after the target wrote it: one atomic OR
    /// per bitmap byte touched. Release ordering: the data written before is visible to a
    /// front-end that sees the bit (it reads the bitmap with atomic exchanges).
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE_BYTES;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE_BYTES;
        let pages_covered = (self.len_bytes as u64) * 8;
        let mut page = first;
        while page <= last {
            if page >= pages_covered {
                self.pages_outside
                    .fetch_add(last - page + 1, Ordering::Relaxed);
                return;
            }
            let byte = page / 8;
            // The bits of this byte from `page` up to `last` (at most to bit 7).
            let low = page % 8;
            let high = (last - byte * 8).min(7);
            let mask = ((0xffu16 << low) & (0xffu16 >> (7 - high))) as u8;
            let ptr = (self.base + byte as usize) as *mut u8;
            // SAFETY: `byte < len_bytes` (page < pages_covered), so `ptr` lies inside the
            // mapping, which `self` keeps alive; the bitmap is shared with the front-end, which
            // changes it only atomically, and it is only ever accessed here as an atomic byte
            // (alignment 1), so no non-atomic access races with this one.
            let cell = unsafe { AtomicU8::from_ptr(ptr) };
            cell.fetch_or(mask, Ordering::Release);
            page = (byte + 1) * 8;
        }
    }

    /// Reads the bit of `page` (tests and diagnostics).
    pub fn is_dirty(&self, page: u64) -> bool {
        let byte = page / 8;
        if byte >= self.len_bytes as u64 {
            return false;
        }
        let ptr = (self.base + byte as usize) as *mut u8;
        // SAFETY: as in `mark`: inside the mapping, accessed atomically only.
        let cell = unsafe { AtomicU8::from_ptr(ptr) };
        cell.load(Ordering::Acquire) & (1 << (page % 8)) != 0
    }

    /// Host address range of the bitmap (tests: to check nothing outside it changed).
    pub fn mapping_len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// A zeroed memfd of `bytes` bytes.
    fn log_file(bytes: u64) -> File {
        crate::sys::memfd("pollux-test-log", bytes).expect("memfd")
    }

    fn contents(file: &mut File) -> Vec<u8> {
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.read_to_end(&mut bytes).expect("read");
        bytes
    }

    #[test]
    fn marks_set_exactly_the_pages_written() {
        let mut file = log_file(16);
        let log = DirtyLog::map(&file, 16, 0).expect("map");
        assert_eq!(log.covered_bytes(), 16 * 8 * 4096);
        log.mark(0, 1); // page 0
        log.mark(3 * 4096 + 4095, 2); // pages 3 and 4
        log.mark(9 * 4096, 4096 * 9); // pages 9..=17
        let bytes = contents(&mut file);
        assert_eq!(bytes[0], 0b0001_1001);
        assert_eq!(bytes[1], 0b1111_1110);
        assert_eq!(bytes[2], 0b0000_0011);
        assert!(bytes[3..].iter().all(|b| *b == 0));
        assert!(log.is_dirty(17) && !log.is_dirty(18));
        assert_eq!(log.pages_outside(), 0);
    }

    #[test]
    fn pages_past_the_bitmap_are_counted_not_written() {
        // A 4-byte log inside a 4096-byte file whose other bytes must stay untouched.
        let mut file = log_file(4096);
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(&[0xaa; 4096]).expect("fill");
        let log = DirtyLog::map(&file, 4, 100).expect("map");
        log.mark(30 * 4096, 4 * 4096); // pages 30, 31 inside; 32, 33 outside
        log.mark(u64::MAX - 10, 100); // saturates, all outside
        assert_eq!(log.pages_outside(), 2 + 1);
        let bytes = contents(&mut file);
        assert_eq!(bytes[103], 0xaa | 0b1100_0000);
        for (i, b) in bytes.iter().enumerate() {
            if i != 103 {
                assert_eq!(*b, 0xaa, "byte {i} changed");
            }
        }
    }

    #[test]
    fn bad_regions_are_refused_before_mapping() {
        let file = log_file(8192);
        assert!(matches!(DirtyLog::map(&file, 0, 0), Err(LogError::Empty)));
        assert!(matches!(
            DirtyLog::map(&file, MAX_LOG_BYTES + 1, 0),
            Err(LogError::TooLarge { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&file, 4096, u64::MAX - 10),
            Err(LogError::Overflow { .. })
        ));
        assert!(matches!(
            DirtyLog::map(&file, 8192, 1),
            Err(LogError::PastFileEnd { .. })
        ));
        let log = DirtyLog::map(&file, 8, 0).expect("map");
        assert!(log.check_covers(64 * 4096).is_ok());
        assert!(matches!(
            log.check_covers(64 * 4096 + 1),
            Err(LogError::TooSmall { .. })
        ));
    }
}
