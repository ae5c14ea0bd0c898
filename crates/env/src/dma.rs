//! DMA-able memory: one reservation made up front, chosen like SPDK's `-s <MiB>` and
//! `--no-huge`, and an aligned allocator over it.
//!
//! # Backing
//!
//! Both backings are one **memfd** mapped `MAP_SHARED`, so that another process can map the
//! same pages: a vhost-user back-end maps the initiator's memory from the fd and offset given
//! in SET_MEM_TABLE ([`DmaMemory::shared_regions`]). One reservation is one file and one
//! region (back-ends accept as few as 8 regions; a file per hugepage would not do).
//!
//! - **2 MiB hugepages** (`memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)`), unless
//!   [`DmaConfig::no_huge`]: hugetlb pages are never swapped nor migrated, and a 2 MiB page
//!   needs one IOTLB entry. Tried first; when the host has too few free hugepages the kernel
//!   refuses the mapping and the reservation falls back to the next backing (logged).
//! - **A plain memfd locked with `mlock`**: 2 MiB aligned, locked so that it stays
//!   resident and never goes to swap. What keeps the *physical* pages stable while a device
//!   uses them is the IOMMU mapping (VFIO pins the pages it maps); Pollux never hands a
//!   physical address to a device, only IOVAs, so page migration outside a mapping is harmless.
//!
//! The reservation is registered in a [`MemMap`] ([`MemMap::global`] unless another is
//! given), so that a VFIO container attached to that map makes it reachable by devices.
//!
//! # Allocator
//!
//! First-fit over a sorted free list, coalescing on free, under a `Mutex`. Allocation
//! happens at setup (queues, pools), never per I/O; per-I/O buffers come from
//! [`crate::pool::BufferPool`]. Sizes and alignments are rounded up to [`GRANULE_BYTES`]
//! (one cache line) so that two buffers never share a cache line.
//!
//! # Access
//!
//! DMA memory is shared with a device that reads and writes it behind the compiler's back,
//! so it is never turned into `&[u8]` / `&mut [u8]`: buffers offer raw pointers and
//! bounds-checked copy accessors that use volatile loads and stores.
//!
//! # NUMA
//!
//! `alloc` takes the NUMA node the caller wants the buffer on. The node is validated
//! against the host's node count (an unknown node is an error). On a single-node host the
//! request is trivially met and only traced. On a multi-node host the reservation is not
//! (yet) split per node, so the request is recorded on the buffer
//! ([`DmaBuffer::requested_numa_node`]) and a debug message notes that placement is not
//! enforced; binding per-node reservations (`mbind`) is future work.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::memmap::{MemMap, TranslationError};

/// One mebibyte.
pub const MIB: usize = 1 << 20;
/// Alignment and size quantum of a reservation: one 2 MiB hugepage.
pub const RESERVATION_ALIGN_BYTES: usize = 2 * MIB;
/// Allocation quantum: sizes and alignments are rounded up to one cache line.
pub const GRANULE_BYTES: usize = 64;

/// `MFD_HUGE_2MB` (log2(2 MiB) = 21 shifted by `MFD_HUGE_SHIFT` = 26, see memfd_create(2)).
const MFD_HUGE_2MB: libc::c_uint = 21 << 26;

/// Why DMA memory could not be reserved, allocated or accessed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("DMA memory size must be at least 1 MiB (got {size_mib} MiB)")]
    ZeroSize { size_mib: usize },
    #[error("DMA memory size of {size_mib} MiB does not fit in the address space")]
    SizeTooLarge { size_mib: usize },
    #[error("could not create a {len_bytes}-byte memfd for DMA memory")]
    Memfd {
        len_bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("could not map {len_bytes} bytes of anonymous memory for DMA")]
    Map {
        len_bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "could not lock {len_bytes} bytes of DMA memory in RAM; raise the locked-memory limit \
         (`ulimit -l`, LimitMEMLOCK= for a service) or reserve 2 MiB hugepages \
         (/proc/sys/vm/nr_hugepages)"
    )]
    Lock {
        len_bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("could not register DMA memory [{vaddr:#x}, +{len_bytes}) for translation")]
    Register {
        vaddr: u64,
        len_bytes: usize,
        #[source]
        source: TranslationError,
    },
    #[error("DMA allocation of zero bytes")]
    ZeroLength,
    #[error("DMA alignment {align} is not a power of two")]
    BadAlignment { align: usize },
    #[error(
        "out of DMA memory: {requested_bytes} bytes aligned to {align} requested, \
         {free_bytes} bytes free (largest free block {largest_free_bytes} bytes) of {total_bytes}"
    )]
    OutOfMemory {
        requested_bytes: usize,
        align: usize,
        free_bytes: usize,
        largest_free_bytes: usize,
        total_bytes: usize,
    },
    #[error("NUMA node {node} requested, but this host has {node_count} node(s)")]
    UnknownNumaNode { node: u32, node_count: u32 },
    #[error("access of {len_bytes} bytes at offset {offset} is outside a {buf_len_bytes}-byte DMA buffer")]
    OutOfBounds {
        offset: usize,
        len_bytes: usize,
        buf_len_bytes: usize,
    },
    #[error("DMA buffer [{vaddr:#x}, +{len_bytes}) has no IOVA")]
    Translation {
        vaddr: u64,
        len_bytes: usize,
        #[source]
        source: TranslationError,
    },
    #[error(
        "DMA buffer [{vaddr:#x}, +{len_bytes}) is only contiguous for {contiguous_bytes} bytes in IOVA space"
    )]
    NotContiguous {
        vaddr: u64,
        len_bytes: usize,
        contiguous_bytes: u64,
    },
}

/// What to reserve, as SPDK's `-s <MiB>` and `--no-huge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaConfig {
    /// Size of the reservation, rounded up to a multiple of 2 MiB.
    pub size_mib: usize,
    /// Skip hugepages and use locked anonymous memory.
    pub no_huge: bool,
}

/// Which [`MemMap`] the reservation is registered in.
enum MemMapRef {
    Global(&'static MemMap),
    Owned(Arc<MemMap>),
}

impl std::ops::Deref for MemMapRef {
    type Target = MemMap;
    fn deref(&self) -> &MemMap {
        match self {
            MemMapRef::Global(map) => map,
            MemMapRef::Owned(map) => map,
        }
    }
}

/// One mmap'ed range of a memfd, unmapped on drop (the fd closes after).
struct Reservation {
    vaddr: usize,
    len_bytes: usize,
    hugepage_backed: bool,
    /// The file the range maps, from offset 0 (see [`DmaMemory::shared_regions`]).
    memfd: OwnedFd,
}

/// One range of DMA memory as another process maps it: `len_bytes` of `fd` from
/// `fd_offset_bytes` hold what this process sees at `vaddr` (vhost-user's SET_MEM_TABLE).
#[derive(Debug, Clone, Copy)]
pub struct SharedRegion<'a> {
    pub vaddr: u64,
    pub len_bytes: u64,
    pub fd: BorrowedFd<'a>,
    pub fd_offset_bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: `[vaddr, vaddr + len_bytes)` is a mapping this reservation created and
        // owns alone; every buffer carved from it holds an `Arc<DmaMemory>`, so none is
        // alive any more when this runs.
        let rc = unsafe { libc::munmap(self.vaddr as *mut libc::c_void, self.len_bytes) };
        if rc != 0 {
            tracing::warn!(
                vaddr = self.vaddr,
                len_bytes = self.len_bytes,
                error = %io::Error::last_os_error(),
                "dma: munmap of reservation failed"
            );
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct FreeBlock {
    offset: usize,
    len_bytes: usize,
}

/// Free blocks sorted by offset, never adjacent (coalesced on free).
struct FreeList {
    blocks: Vec<FreeBlock>,
    free_bytes: usize,
}

impl FreeList {
    /// First fit: the lowest block that holds `len_bytes` at an address aligned to `align`.
    /// Returns the offset taken.
    fn take(&mut self, base_vaddr: usize, len_bytes: usize, align: usize) -> Option<usize> {
        let (index, start) = self.blocks.iter().enumerate().find_map(|(index, block)| {
            let aligned_vaddr = (base_vaddr + block.offset).checked_next_multiple_of(align)?;
            let start = aligned_vaddr - base_vaddr;
            let padding = start - block.offset;
            (padding.checked_add(len_bytes)? <= block.len_bytes).then_some((index, start))
        })?;
        let block = self.blocks[index];
        let head = FreeBlock {
            offset: block.offset,
            len_bytes: start - block.offset,
        };
        let tail = FreeBlock {
            offset: start + len_bytes,
            len_bytes: block.offset + block.len_bytes - (start + len_bytes),
        };
        let leftovers = [head, tail].into_iter().filter(|b| b.len_bytes > 0);
        self.blocks.splice(index..=index, leftovers);
        self.free_bytes -= len_bytes;
        Some(start)
    }

    fn give_back(&mut self, offset: usize, len_bytes: usize) {
        let index = self.blocks.partition_point(|block| block.offset < offset);
        // Blocks come back only from the `DmaBuffer` that owned them, so an overlap is a
        // bug in this module, not a caller error.
        if let Some(previous) = index.checked_sub(1).map(|i| self.blocks[i]) {
            assert!(
                previous.offset + previous.len_bytes <= offset,
                "dma: double free"
            );
        }
        if let Some(next) = self.blocks.get(index) {
            assert!(offset + len_bytes <= next.offset, "dma: double free");
        }
        self.free_bytes += len_bytes;
        let merges_previous = index > 0 && {
            let previous = self.blocks[index - 1];
            previous.offset + previous.len_bytes == offset
        };
        let merges_next = self
            .blocks
            .get(index)
            .is_some_and(|next| offset + len_bytes == next.offset);
        match (merges_previous, merges_next) {
            (true, true) => {
                let next = self.blocks.remove(index);
                self.blocks[index - 1].len_bytes += len_bytes + next.len_bytes;
            }
            (true, false) => self.blocks[index - 1].len_bytes += len_bytes,
            (false, true) => {
                self.blocks[index].offset = offset;
                self.blocks[index].len_bytes += len_bytes;
            }
            (false, false) => self.blocks.insert(index, FreeBlock { offset, len_bytes }),
        }
    }

    fn largest_free_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.len_bytes).max().unwrap_or(0)
    }
}

/// The DMA reservation and its allocator. Shared as `Arc<DmaMemory>`: every [`DmaBuffer`]
/// keeps it alive.
pub struct DmaMemory {
    reservation: Reservation,
    memmap: MemMapRef,
    numa_node_count: u32,
    free: Mutex<FreeList>,
}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory")
            .field("vaddr", &format_args!("{:#x}", self.reservation.vaddr))
            .field("len_bytes", &self.reservation.len_bytes)
            .field("hugepage_backed", &self.reservation.hugepage_backed)
            .field("free_bytes", &self.free_bytes())
            .finish()
    }
}

impl DmaMemory {
    /// Reserves `config.size_mib` and registers it in [`MemMap::global`].
    pub fn new(config: DmaConfig) -> Result<Arc<Self>, DmaError> {
        Self::create(config, MemMapRef::Global(MemMap::global()))
    }

    /// Reserves `config.size_mib` and registers it in `memmap`.
    pub fn with_memmap(config: DmaConfig, memmap: Arc<MemMap>) -> Result<Arc<Self>, DmaError> {
        Self::create(config, MemMapRef::Owned(memmap))
    }

    fn create(config: DmaConfig, memmap: MemMapRef) -> Result<Arc<Self>, DmaError> {
        if config.size_mib == 0 {
            return Err(DmaError::ZeroSize {
                size_mib: config.size_mib,
            });
        }
        let len_bytes = config
            .size_mib
            .checked_mul(MIB)
            .and_then(|bytes| bytes.checked_next_multiple_of(RESERVATION_ALIGN_BYTES))
            .filter(|&bytes| bytes <= isize::MAX as usize / 2)
            .ok_or(DmaError::SizeTooLarge {
                size_mib: config.size_mib,
            })?;
        let reservation = reserve(len_bytes, config.no_huge)?;
        let vaddr = reservation.vaddr as u64;
        memmap
            .register(vaddr, len_bytes as u64)
            .map_err(|source| DmaError::Register {
                vaddr,
                len_bytes,
                source,
            })?;
        let numa_node_count = crate::topology::sysfs_numa_node_count();
        tracing::info!(
            vaddr,
            len_bytes,
            hugepage_backed = reservation.hugepage_backed,
            numa_node_count,
            "dma: memory reserved"
        );
        Ok(Arc::new(Self {
            reservation,
            memmap,
            numa_node_count,
            free: Mutex::new(FreeList {
                blocks: vec![FreeBlock {
                    offset: 0,
                    len_bytes,
                }],
                free_bytes: len_bytes,
            }),
        }))
    }

    fn lock_free_list(&self) -> MutexGuard<'_, FreeList> {
        // The free list is updated in place by short, non-panicking steps (the only panics
        // are double-free assertions, which leave it unchanged): recover from poisoning.
        self.free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the reservation is backed by 2 MiB hugepages (otherwise locked anonymous memory).
    pub fn is_hugepage_backed(&self) -> bool {
        self.reservation.hugepage_backed
    }

    /// Start of the reservation (2 MiB aligned).
    pub fn vaddr(&self) -> u64 {
        self.reservation.vaddr as u64
    }

    /// Size of the reservation.
    pub fn len_bytes(&self) -> usize {
        self.reservation.len_bytes
    }

    /// The file-backed ranges that make up this memory (one: the whole reservation), for
    /// sharing it with another process, as a vhost-user front-end does. The fds stay owned
    /// by this memory; a receiver gets its own copy through `SCM_RIGHTS`.
    pub fn shared_regions(&self) -> Vec<SharedRegion<'_>> {
        vec![SharedRegion {
            vaddr: self.reservation.vaddr as u64,
            len_bytes: self.reservation.len_bytes as u64,
            fd: self.reservation.memfd.as_fd(),
            fd_offset_bytes: 0,
        }]
    }

    /// Whether `[vaddr, vaddr + len_bytes)` lies inside this memory.
    #[inline]
    pub fn contains(&self, vaddr: u64, len_bytes: u64) -> bool {
        let start = self.reservation.vaddr as u64;
        let end = start + self.reservation.len_bytes as u64;
        vaddr >= start && vaddr.checked_add(len_bytes).is_some_and(|e| e <= end)
    }

    /// Bytes not allocated right now.
    pub fn free_bytes(&self) -> usize {
        self.lock_free_list().free_bytes
    }

    /// NUMA nodes of this host, as seen when the memory was reserved.
    pub fn numa_node_count(&self) -> u32 {
        self.numa_node_count
    }

    /// The map this memory is registered in.
    pub fn memmap(&self) -> &MemMap {
        &self.memmap
    }

    /// Allocates `len_bytes` aligned to `align` (a power of two; at least [`GRANULE_BYTES`]
    /// is used). `numa_node`: see the module documentation. Setup path only (takes a lock).
    pub fn alloc(
        self: &Arc<Self>,
        len_bytes: usize,
        align: usize,
        numa_node: Option<u32>,
    ) -> Result<DmaBuffer, DmaError> {
        if len_bytes == 0 {
            return Err(DmaError::ZeroLength);
        }
        if !align.is_power_of_two() {
            return Err(DmaError::BadAlignment { align });
        }
        if let Some(node) = numa_node {
            if node >= self.numa_node_count {
                return Err(DmaError::UnknownNumaNode {
                    node,
                    node_count: self.numa_node_count,
                });
            }
            if self.numa_node_count == 1 {
                tracing::trace!(node, "dma: single NUMA node, placement request is moot");
            } else {
                tracing::debug!(
                    node,
                    "dma: reservation is not split per node, placement not enforced"
                );
            }
        }
        let effective_align = align.max(GRANULE_BYTES);
        let out_of_memory = |free: &FreeList| DmaError::OutOfMemory {
            requested_bytes: len_bytes,
            align,
            free_bytes: free.free_bytes,
            largest_free_bytes: free.largest_free_bytes(),
            total_bytes: self.reservation.len_bytes,
        };
        let mut free = self.lock_free_list();
        let reserved_len_bytes = len_bytes
            .checked_next_multiple_of(GRANULE_BYTES)
            .ok_or_else(|| out_of_memory(&free))?;
        let offset = free
            .take(self.reservation.vaddr, reserved_len_bytes, effective_align)
            .ok_or_else(|| out_of_memory(&free))?;
        drop(free);
        Ok(DmaBuffer {
            memory: Arc::clone(self),
            offset,
            len_bytes,
            reserved_len_bytes,
            numa_node,
        })
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // Unregister (and so unmap from any device) before `reservation` munmaps the memory.
        if let Err(error) = self.memmap.unregister(
            self.reservation.vaddr as u64,
            self.reservation.len_bytes as u64,
        ) {
            tracing::warn!(%error, "dma: unregistering the reservation failed");
        }
    }
}

fn reserve(len_bytes: usize, no_huge: bool) -> Result<Reservation, DmaError> {
    if !no_huge {
        match reserve_hugepages(len_bytes) {
            Ok(reservation) => return Ok(reservation),
            Err(error) => tracing::info!(
                len_bytes,
                %error,
                "dma: not enough free 2 MiB hugepages, using locked anonymous memory"
            ),
        }
    }
    reserve_locked_anonymous(len_bytes)
}

/// A memfd of `len_bytes` (`MFD_CLOEXEC`, plus `extra_flags`).
fn create_memfd(len_bytes: usize, extra_flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"pollux-dma".as_ptr(), libc::MFD_CLOEXEC | extra_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size exceeds off_t"))?;
    // SAFETY: ftruncate on an fd this function owns.
    if unsafe { libc::ftruncate(memfd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(memfd)
}

fn reserve_hugepages(len_bytes: usize) -> io::Result<Reservation> {
    let memfd = create_memfd(len_bytes, libc::MFD_HUGETLB | MFD_HUGE_2MB)?;
    // SAFETY: a fresh shared mapping of a file this function created, at an address the
    // kernel chooses; it aliases nothing in this process. hugetlb mappings are 2 MiB aligned.
    // `MAP_POPULATE` makes the kernel fault every page in now, so that a shortage shows
    // here and not as SIGBUS on first touch.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            memfd.as_raw_fd(),
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let reservation = Reservation {
        vaddr: address as usize,
        len_bytes,
        hugepage_backed: true,
        memfd,
    };
    dont_fork(&reservation);
    Ok(reservation)
}

fn reserve_locked_anonymous(len_bytes: usize) -> Result<Reservation, DmaError> {
    let memfd =
        create_memfd(len_bytes, 0).map_err(|source| DmaError::Memfd { len_bytes, source })?;
    // Reserve address space one alignment unit larger, map the memfd over its 2 MiB aligned
    // part, then trim head and tail (mmap only guarantees page alignment).
    let mapped_len_bytes = len_bytes + RESERVATION_ALIGN_BYTES;
    // SAFETY: a fresh inaccessible anonymous mapping at an address the kernel chooses; it
    // aliases nothing and only reserves the range.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped_len_bytes,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(DmaError::Map {
            len_bytes: mapped_len_bytes,
            source: io::Error::last_os_error(),
        });
    }
    let mapped = address as usize;
    let aligned = mapped.next_multiple_of(RESERVATION_ALIGN_BYTES);
    // SAFETY: `[aligned, aligned + len_bytes)` lies inside the reservation made above, which
    // this function owns and nothing uses; MAP_FIXED replaces that part of it.
    let fixed = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            memfd.as_raw_fd(),
            0,
        )
    };
    if fixed == libc::MAP_FAILED {
        let source = io::Error::last_os_error();
        // SAFETY: the whole reservation made above, unused.
        unsafe { libc::munmap(address, mapped_len_bytes) };
        return Err(DmaError::Map { len_bytes, source });
    }
    let head_len_bytes = aligned - mapped;
    let tail_len_bytes = mapped_len_bytes - head_len_bytes - len_bytes;
    for (start, trim_len_bytes) in [
        (mapped, head_len_bytes),
        (aligned + len_bytes, tail_len_bytes),
    ] {
        if trim_len_bytes == 0 {
            continue;
        }
        // SAFETY: `[start, start + trim_len_bytes)` is a page-aligned part of the reservation
        // made above that lies outside the range kept; nothing refers to it.
        let rc = unsafe { libc::munmap(start as *mut libc::c_void, trim_len_bytes) };
        if rc != 0 {
            // Harmless: the untrimmed bytes stay reserved (inaccessible) and unused.
            tracing::warn!(error = %io::Error::last_os_error(), "dma: trimming reservation failed");
        }
    }
    let reservation = Reservation {
        vaddr: aligned,
        len_bytes,
        hugepage_backed: false,
        memfd,
    };
    dont_fork(&reservation);
    // mlock(2) faults every page in and keeps it resident: the same effect as MAP_POPULATE,
    // plus no swapping.
    // SAFETY: the range is the mapping owned by `reservation`; locking changes no contents.
    let rc = unsafe { libc::mlock(aligned as *const libc::c_void, len_bytes) };
    if rc != 0 {
        return Err(DmaError::Lock {
            len_bytes,
            source: io::Error::last_os_error(),
        });
    }
    Ok(reservation)
}

/// A forked child must not share DMA pages copy-on-write with the parent: the first write
/// by the parent after fork would move the page away from the device's mapping.
fn dont_fork(reservation: &Reservation) {
    // SAFETY: the range is the mapping owned by `reservation`; the advice changes only what
    // a future fork(2) copies.
    let rc = unsafe {
        libc::madvise(
            reservation.vaddr as *mut libc::c_void,
            reservation.len_bytes,
            libc::MADV_DONTFORK,
        )
    };
    if rc != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "dma: MADV_DONTFORK failed");
    }
}

/// Checks that `[offset, offset + len_bytes)` lies inside a buffer of `buf_len_bytes`.
pub(crate) fn check_access(
    offset: usize,
    len_bytes: usize,
    buf_len_bytes: usize,
) -> Result<(), DmaError> {
    match offset.checked_add(len_bytes) {
        Some(end) if end <= buf_len_bytes => Ok(()),
        _ => Err(DmaError::OutOfBounds {
            offset,
            len_bytes,
            buf_len_bytes,
        }),
    }
}

/// Copies `src` to DMA memory at `dst` with volatile stores (word-sized where aligned), so
/// the compiler neither drops nor merges them with accesses it cannot see (the device's).
///
/// # Safety
/// `dst` is valid for writes of `src.len()` bytes and does not overlap `src`.
pub(crate) unsafe fn copy_to_dma(dst: *mut u8, src: &[u8]) {
    let len = src.len();
    let mut done = 0;
    while done < len && (dst as usize + done) & 7 != 0 {
        // SAFETY: `done < len`, inside the destination (caller's contract).
        unsafe { dst.add(done).write_volatile(src[done]) };
        done += 1;
    }
    while len - done >= 8 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[done..done + 8]);
        // SAFETY: `done + 8 <= len`, inside the destination, and `dst + done` is 8-aligned.
        unsafe {
            dst.add(done)
                .cast::<u64>()
                .write_volatile(u64::from_ne_bytes(word))
        };
        done += 8;
    }
    while done < len {
        // SAFETY: `done < len`, inside the destination.
        unsafe { dst.add(done).write_volatile(src[done]) };
        done += 1;
    }
}

/// Copies DMA memory at `src` into `dst` with volatile loads (word-sized where aligned).
///
/// # Safety
/// `src` is valid for reads of `dst.len()` bytes and does not overlap `dst`.
pub(crate) unsafe fn copy_from_dma(dst: &mut [u8], src: *const u8) {
    let len = dst.len();
    let mut done = 0;
    while done < len && (src as usize + done) & 7 != 0 {
        // SAFETY: `done < len`, inside the source (caller's contract).
        dst[done] = unsafe { src.add(done).read_volatile() };
        done += 1;
    }
    while len - done >= 8 {
        // SAFETY: `done + 8 <= len`, inside the source, and `src + done` is 8-aligned.
        let word = unsafe { src.add(done).cast::<u64>().read_volatile() };
        dst[done..done + 8].copy_from_slice(&word.to_ne_bytes());
        done += 8;
    }
    while done < len {
        // SAFETY: `done < len`, inside the source.
        dst[done] = unsafe { src.add(done).read_volatile() };
        done += 1;
    }
}

/// Sets `len_bytes` of DMA memory at `dst` to `byte` with volatile stores.
///
/// # Safety
/// `dst` is valid for writes of `len_bytes` bytes.
pub(crate) unsafe fn fill_dma(dst: *mut u8, len_bytes: usize, byte: u8) {
    let mut done = 0;
    while done < len_bytes && (dst as usize + done) & 7 != 0 {
        // SAFETY: `done < len_bytes`, inside the destination (caller's contract).
        unsafe { dst.add(done).write_volatile(byte) };
        done += 1;
    }
    let word = u64::from_ne_bytes([byte; 8]);
    while len_bytes - done >= 8 {
        // SAFETY: `done + 8 <= len_bytes`, inside the destination, `dst + done` 8-aligned.
        unsafe { dst.add(done).cast::<u64>().write_volatile(word) };
        done += 8;
    }
    while done < len_bytes {
        // SAFETY: `done < len_bytes`, inside the destination.
        unsafe { dst.add(done).write_volatile(byte) };
        done += 1;
    }
}

/// Translates a buffer that must be contiguous in IOVA space (it lies in one registered
/// region, so it is unless someone unregistered that region under it).
pub(crate) fn contiguous_iova(
    memmap: &MemMap,
    vaddr: u64,
    len_bytes: usize,
) -> Result<u64, DmaError> {
    let translation = memmap
        .translate(vaddr, len_bytes as u64)
        .map_err(|source| DmaError::Translation {
            vaddr,
            len_bytes,
            source,
        })?;
    if translation.len < len_bytes as u64 {
        return Err(DmaError::NotContiguous {
            vaddr,
            len_bytes,
            contiguous_bytes: translation.len,
        });
    }
    Ok(translation.iova)
}

/// An allocation from [`DmaMemory`], returned to it on drop. Never handed out as a Rust
/// reference: use the copy accessors or the raw pointers.
pub struct DmaBuffer {
    memory: Arc<DmaMemory>,
    offset: usize,
    len_bytes: usize,
    /// `len_bytes` rounded up to the allocation granule: what goes back to the free list.
    reserved_len_bytes: usize,
    numa_node: Option<u32>,
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("vaddr", &format_args!("{:#x}", self.vaddr()))
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl DmaBuffer {
    /// Virtual address of the first byte.
    pub fn vaddr(&self) -> u64 {
        (self.memory.reservation.vaddr + self.offset) as u64
    }

    /// Length asked for at allocation.
    pub fn len(&self) -> usize {
        self.len_bytes
    }

    /// Never true: allocations of zero bytes are refused.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// The IOVA devices use for the first byte, through the memory's [`MemMap`] (so it
    /// follows a mapper attached after the allocation). The buffer is contiguous in IOVA space.
    pub fn iova(&self) -> Result<u64, DmaError> {
        contiguous_iova(self.memory.memmap(), self.vaddr(), self.len_bytes)
    }

    /// The NUMA node given to [`DmaMemory::alloc`] (see the module documentation).
    pub fn requested_numa_node(&self) -> Option<u32> {
        self.numa_node
    }

    /// The memory this buffer was carved from.
    pub fn memory(&self) -> &Arc<DmaMemory> {
        &self.memory
    }

    /// Raw pointer to the first byte, for handing to code that does its own volatile access.
    pub fn as_ptr(&self) -> *const u8 {
        self.vaddr() as *const u8
    }

    /// Raw mutable pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.vaddr() as *mut u8
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), DmaError> {
        check_access(offset, src.len(), self.len_bytes)?;
        // SAFETY: the range is inside this buffer (checked above), which owns its part of
        // the live reservation; `src` is ordinary memory, so they cannot overlap.
        unsafe { copy_to_dma(self.as_mut_ptr().add(offset), src) };
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), DmaError> {
        check_access(offset, dst.len(), self.len_bytes)?;
        // SAFETY: as in `write_at`.
        unsafe { copy_from_dma(dst, self.as_ptr().add(offset)) };
        Ok(())
    }

    /// Writes `words` (as little-endian bytes) at `offset`: one bounds check, then one
    /// volatile 64-bit store per word when the destination is 8-byte aligned (queue entries
    /// are), a byte-wise volatile copy otherwise.
    #[inline(always)]
    pub fn write_u64s_at<const N: usize>(
        &mut self,
        offset: usize,
        words: &[u64; N],
    ) -> Result<(), DmaError> {
        check_access(offset, std::mem::size_of_val(words), self.len_bytes)?;
        // SAFETY: `offset` is inside this buffer (checked above).
        let dst = unsafe { self.as_mut_ptr().add(offset) };
        // The alignment test once, outside the loop, so the aligned loop unrolls into N
        // plain stores.
        if dst as usize & 7 == 0 {
            let dst = dst.cast::<u64>();
            for (i, word) in words.iter().enumerate() {
                // SAFETY: `(i + 1) * 8 <= N * 8`, inside the checked range, and `dst + i` is
                // 8-aligned.
                unsafe { dst.add(i).write_volatile(word.to_le()) };
            }
        } else {
            for (i, word) in words.iter().enumerate() {
                // SAFETY: inside the checked range; `word` is ordinary memory, no overlap.
                unsafe { copy_to_dma(dst.add(i * 8), &word.to_le_bytes()) };
            }
        }
        Ok(())
    }

    /// Reads `N` little-endian 64-bit words at `offset`: one bounds check, then one volatile
    /// load per word when the source is 8-byte aligned, a byte-wise volatile copy otherwise.
    #[inline(always)]
    pub fn read_u64s_at<const N: usize>(&self, offset: usize) -> Result<[u64; N], DmaError> {
        let mut words = [0u64; N];
        check_access(offset, std::mem::size_of_val(&words), self.len_bytes)?;
        // SAFETY: `offset` is inside this buffer (checked above).
        let src = unsafe { self.as_ptr().add(offset) };
        let aligned = src as usize & 7 == 0;
        for (i, word) in words.iter_mut().enumerate() {
            if aligned {
                // SAFETY: `(i + 1) * 8 <= N * 8`, inside the checked range, and `src + i * 8`
                // is 8-aligned.
                *word = u64::from_le(unsafe { src.add(i * 8).cast::<u64>().read_volatile() });
            } else {
                let mut bytes = [0u8; 8];
                // SAFETY: inside the checked range; `bytes` is ordinary memory, no overlap.
                unsafe { copy_from_dma(&mut bytes, src.add(i * 8)) };
                *word = u64::from_le_bytes(bytes);
            }
        }
        Ok(words)
    }

    /// Reads one little-endian 32-bit word at `offset` (a single volatile load when aligned):
    /// for polling a phase or status bit before reading the rest of an entry.
    #[inline(always)]
    pub fn read_u32_at(&self, offset: usize) -> Result<u32, DmaError> {
        check_access(offset, 4, self.len_bytes)?;
        // SAFETY: `offset` is inside this buffer (checked above).
        let src = unsafe { self.as_ptr().add(offset) };
        if src as usize & 3 == 0 {
            // SAFETY: `[src, src + 4)` is inside the checked range and `src` is 4-aligned.
            Ok(u32::from_le(unsafe { src.cast::<u32>().read_volatile() }))
        } else {
            let mut bytes = [0u8; 4];
            // SAFETY: inside the checked range; `bytes` is ordinary memory, no overlap.
            unsafe { copy_from_dma(&mut bytes, src) };
            Ok(u32::from_le_bytes(bytes))
        }
    }

    /// Sets `len_bytes` bytes at `offset` to `byte`.
    pub fn fill(&mut self, offset: usize, len_bytes: usize, byte: u8) -> Result<(), DmaError> {
        check_access(offset, len_bytes, self.len_bytes)?;
        // SAFETY: as in `write_at`.
        unsafe { fill_dma(self.as_mut_ptr().add(offset), len_bytes, byte) };
        Ok(())
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        self.memory
            .lock_free_list()
            .give_back(self.offset, self.reserved_len_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(size_mib: usize) -> (Arc<DmaMemory>, Arc<MemMap>) {
        let memmap = Arc::new(MemMap::new());
        let memory = DmaMemory::with_memmap(
            DmaConfig {
                size_mib,
                no_huge: true,
            },
            memmap.clone(),
        )
        .expect("reserve locked anonymous memory");
        (memory, memmap)
    }

    /// `Locked:` of the smaps entry starting at `vaddr`, in bytes.
    fn locked_bytes(vaddr: u64) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let prefix = format!("{vaddr:x}-");
        let mut lines = smaps.lines().skip_while(|line| !line.starts_with(&prefix));
        lines.next()?;
        let locked = lines.find(|line| line.starts_with("Locked:"))?;
        let kib: u64 = locked.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    #[test]
    fn reserves_aligned_locked_registered_memory() {
        let (memory, memmap) = small(8);
        assert!(!memory.is_hugepage_backed());
        assert_eq!(memory.len_bytes(), 8 * MIB);
        assert_eq!(memory.vaddr() % RESERVATION_ALIGN_BYTES as u64, 0);
        assert_eq!(memory.free_bytes(), 8 * MIB);
        let regions = memmap.regions();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].vaddr, memory.vaddr());
        assert_eq!(regions[0].len, 8 * MIB as u64);
        // The kernel's own accounting says the whole reservation is locked (kernels merge
        // adjacent VMAs, so compare with at least).
        if let Some(locked) = locked_bytes(memory.vaddr()) {
            assert!(locked >= 8 * MIB as u64, "only {locked} bytes locked");
        }
        drop(memory);
        assert!(memmap.regions().is_empty(), "drop unregisters");
    }

    #[test]
    fn odd_sizes_round_up_and_zero_is_refused() {
        let (memory, _) = small(3);
        assert_eq!(memory.len_bytes(), 4 * MIB);
        assert!(matches!(
            DmaMemory::new(DmaConfig {
                size_mib: 0,
                no_huge: true
            }),
            Err(DmaError::ZeroSize { .. })
        ));
        assert!(matches!(
            DmaMemory::new(DmaConfig {
                size_mib: usize::MAX / 2,
                no_huge: true
            }),
            Err(DmaError::SizeTooLarge { .. })
        ));
    }

    #[test]
    fn hugepages_or_fallback_into_global_map() {
        // This host may or may not have free hugepages; either backing must work and be
        // registered in the global map.
        let memory = DmaMemory::new(DmaConfig {
            size_mib: 2,
            no_huge: false,
        })
        .unwrap();
        assert_eq!(memory.vaddr() % RESERVATION_ALIGN_BYTES as u64, 0);
        let t = MemMap::global().translate(memory.vaddr(), 4096).unwrap();
        assert_eq!(t.iova, memory.vaddr());
        let mut buffer = memory.alloc(4096, 4096, None).unwrap();
        buffer.fill(0, 4096, 0x5a).unwrap();
        let mut back = [0u8; 16];
        buffer.read_at(4080, &mut back).unwrap();
        assert_eq!(back, [0x5a; 16]);
    }

    #[test]
    fn allocations_are_aligned_distinct_and_translate() {
        let (memory, _) = small(8);
        let mut buffers = Vec::new();
        for (len, align) in [
            (1, 1),
            (100, 8),
            (4096, 4096),
            (5000, 512),
            (MIB, 2 * MIB),
            (3, 64),
        ] {
            let buffer = memory.alloc(len, align, Some(0)).unwrap();
            assert_eq!(buffer.vaddr() % align.max(GRANULE_BYTES) as u64, 0);
            assert_eq!(buffer.len(), len);
            assert_eq!(buffer.iova().unwrap(), buffer.vaddr());
            assert_eq!(buffer.requested_numa_node(), Some(0));
            buffers.push(buffer);
        }
        let mut ranges: Vec<(u64, u64)> = buffers
            .iter()
            .map(|b| (b.vaddr(), b.vaddr() + b.len() as u64))
            .collect();
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:x?}");
        assert!(ranges.iter().all(|&(start, end)| start >= memory.vaddr()
            && end <= memory.vaddr() + memory.len_bytes() as u64));
    }

    #[test]
    fn accessors_round_trip_and_check_bounds() {
        let (memory, _) = small(2);
        let mut buffer = memory.alloc(100, 64, None).unwrap();
        let data: Vec<u8> = (0..100).collect();
        // Unaligned offsets exercise the head, word and tail loops.
        buffer.write_at(3, &data[..97]).unwrap();
        let mut back = vec![0u8; 97];
        buffer.read_at(3, &mut back).unwrap();
        assert_eq!(back, &data[..97]);
        buffer.fill(10, 20, 0xff).unwrap();
        let mut byte = [0u8; 1];
        buffer.read_at(29, &mut byte).unwrap();
        assert_eq!(byte, [0xff]);
        buffer.read_at(30, &mut byte).unwrap();
        assert_eq!(byte, [27]);
        for (offset, len) in [(0, 101), (100, 1), (101, 0), (usize::MAX, 2)] {
            assert!(matches!(
                buffer.fill(offset, len, 0),
                Err(DmaError::OutOfBounds { .. })
            ));
        }
        assert!(buffer.write_at(99, &[1, 2]).is_err());
        assert!(buffer.read_at(99, &mut [0, 0]).is_err());
        buffer.write_at(100, &[]).unwrap();
    }

    #[test]
    fn word_accessors_round_trip_and_check_bounds() {
        let (memory, _) = small(2);
        let mut buffer = memory.alloc(100, 64, None).unwrap();
        let words = [0x0102_0304_0506_0708u64, u64::MAX, 0];
        // Aligned (one store per word) and unaligned (byte-wise) destinations.
        for offset in [8, 3] {
            buffer.write_u64s_at(offset, &words).unwrap();
            assert_eq!(buffer.read_u64s_at::<3>(offset).unwrap(), words);
            let mut bytes = [0u8; 8];
            buffer.read_at(offset, &mut bytes).unwrap();
            assert_eq!(bytes, words[0].to_le_bytes());
            assert_eq!(buffer.read_u32_at(offset).unwrap(), 0x0506_0708);
            assert_eq!(buffer.read_u32_at(offset + 4).unwrap(), 0x0102_0304);
        }
        assert!(buffer.write_u64s_at(80, &words).is_err());
        assert!(buffer.read_u64s_at::<3>(77).is_err());
        assert!(buffer.read_u32_at(97).is_err());
        assert!(buffer.read_u32_at(usize::MAX).is_err());
        buffer.read_u32_at(96).unwrap();
    }

    #[test]
    fn bad_requests_are_errors() {
        let (memory, _) = small(2);
        assert!(matches!(
            memory.alloc(0, 64, None),
            Err(DmaError::ZeroLength)
        ));
        assert!(matches!(
            memory.alloc(64, 48, None),
            Err(DmaError::BadAlignment { align: 48 })
        ));
        assert!(matches!(
            memory.alloc(64, 64, Some(4096)),
            Err(DmaError::UnknownNumaNode { node: 4096, .. })
        ));
        assert!(matches!(
            memory.alloc(usize::MAX, 64, None),
            Err(DmaError::OutOfMemory { .. })
        ));
    }

    #[test]
    fn out_of_memory_names_requested_and_free_bytes() {
        let (memory, _) = small(2);
        let _most = memory.alloc(2 * MIB - 4096, 64, None).unwrap();
        let error = memory.alloc(8192, 64, None).unwrap_err();
        match &error {
            DmaError::OutOfMemory {
                requested_bytes,
                free_bytes,
                ..
            } => {
                assert_eq!(*requested_bytes, 8192);
                assert_eq!(*free_bytes, 4096);
            }
            other => panic!("expected out of memory, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("8192") && message.contains("4096"),
            "{message}"
        );
    }

    #[test]
    fn memory_returns_on_drop_and_coalesces() {
        let (memory, _) = small(2);
        let buffers: Vec<_> = (0..32)
            .map(|_| memory.alloc(64 * 1024, 4096, None).unwrap())
            .collect();
        assert_eq!(memory.free_bytes(), 0);
        assert!(memory.alloc(64, 64, None).is_err());
        // Drop in an interleaved order to exercise every coalescing case.
        let (even, odd): (Vec<_>, Vec<_>) = buffers
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        drop(odd);
        assert_eq!(memory.free_bytes(), MIB);
        assert!(memory.alloc(128 * 1024, 64, None).is_err(), "fragmented");
        drop(even);
        assert_eq!(memory.free_bytes(), 2 * MIB);
        let whole = memory.alloc(2 * MIB, 2 * MIB, None).unwrap();
        assert_eq!(whole.vaddr(), memory.vaddr());
    }

    #[test]
    fn buffer_keeps_memory_alive_and_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let (memory, memmap) = small(2);
        let mut buffer = memory.alloc(64, 64, None).unwrap();
        assert_send(&buffer);
        drop(memory);
        assert_eq!(memmap.regions().len(), 1);
        let handle = std::thread::spawn(move || {
            buffer.write_at(0, b"still here").unwrap();
            buffer
        });
        let buffer = handle.join().unwrap();
        let mut back = [0u8; 10];
        buffer.read_at(0, &mut back).unwrap();
        assert_eq!(&back, b"still here");
        drop(buffer);
        assert!(memmap.regions().is_empty());
    }

    #[test]
    fn memory_is_one_shared_memfd_region() {
        let (memory, _) = small(2);
        let regions = memory.shared_regions();
        assert_eq!(regions.len(), 1, "one reservation, one region");
        let region = regions[0];
        assert_eq!(
            (region.vaddr, region.len_bytes, region.fd_offset_bytes),
            (memory.vaddr(), 2 * MIB as u64, 0)
        );
        assert!(memory.contains(memory.vaddr() + 4096, 4096));
        assert!(!memory.contains(memory.vaddr() + 2 * MIB as u64 - 1, 2));
        assert!(!memory.contains(memory.vaddr() - 1, 1));
        let mut buffer = memory.alloc(4096, 4096, None).unwrap();
        buffer.write_at(0, b"seen by the other side").unwrap();
        let offset = buffer.vaddr() - region.vaddr;
        // A second mapping of the fd (what a vhost-user back-end makes) sees the same bytes.
        // SAFETY: a fresh shared mapping of the memfd; read only, unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                region.len_bytes as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                region.fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        let mut back = [0u8; 22];
        // SAFETY: `offset + 22` lies inside the mapping made above.
        unsafe { copy_from_dma(&mut back, other.cast::<u8>().add(offset as usize)) };
        // SAFETY: the mapping made above, not used after.
        unsafe { libc::munmap(other, region.len_bytes as usize) };
        assert_eq!(&back, b"seen by the other side");
    }

    struct XorMapper;
    const XOR: u64 = 0x7000_0000_0000;
    impl crate::memmap::DmaMapper for XorMapper {
        fn map_dma(&self, vaddr: u64, _len: u64) -> io::Result<u64> {
            Ok(vaddr ^ XOR)
        }
        fn unmap_dma(&self, _iova: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn iova_follows_an_attached_mapper() {
        let (memory, memmap) = small(2);
        let buffer = memory.alloc(4096, 4096, None).unwrap();
        assert_eq!(buffer.iova().unwrap(), buffer.vaddr());
        memmap.set_mapper(Arc::new(XorMapper)).unwrap();
        assert_eq!(buffer.iova().unwrap(), buffer.vaddr() ^ XOR);
        memmap.clear_mapper().unwrap();
        assert_eq!(buffer.iova().unwrap(), buffer.vaddr());
    }
}
