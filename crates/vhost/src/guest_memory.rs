//! Guest memory as the front-end shares it (SET_MEM_TABLE, ADD_MEM_REG / REM_MEM_REG): each
//! region is a file (memfd, hugetlbfs, memfd with hugetlb) mapped here `MAP_SHARED` with
//! `memmap2`, at the region's `mmap_offset`.
//!
//! # Safety model
//!
//! Guest memory is shared with a guest that may change it at any moment, so it never becomes
//! a Rust `&` / `&mut`: every access is a bounds-checked volatile read or write of plain bytes
//! through this module, which holds all of the crate's unsafe code that touches guest memory.
//! A [`GuestSlice`] (a checked range inside one region) keeps its region's mapping alive with
//! an `Arc`, so no access can outlive the mapping. Every address a guest supplies goes through
//! checked arithmetic against the table before it is used: an address or length outside the
//! guest's regions is an error, never an access.
//!
//! # Swapping the table
//!
//! A [`GuestMemory`] is immutable. SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG build a new one
//! (sharing the unchanged regions' mappings) on the control thread and hand it to each queue's
//! poller by message; the poller switches at its next poll, between two batches, and keeps
//! the previous table alive until its in-flight requests (whose iovecs point into it) complete.
//! A region is unmapped, and unregistered from env's translation map, when the last table that
//! holds it goes away.
//!
//! # DMA
//!
//! Each region's host range is registered in [`MemMap::global`], so an attached VFIO container
//! (the `DmaMapper`) maps guest memory for the NVMe device: bdev I/O can then point straight
//! into guest memory (zero copy).

use std::fs::File;
use std::sync::Arc;

use pollux_env::memmap::MemMap;

/// Most regions one table may hold (vhost-user's VHOST_USER_MAX_RAM_SLOTS with
/// CONFIGURE_MEM_SLOTS; SET_MEM_TABLE itself carries at most 8).
pub const MAX_REGIONS: usize = 509;

/// Why a table or an access was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("region {index}: size 0")]
    ZeroSize { index: usize },
    #[error("region {index}: [{start:#x}, +{size:#x}) overflows the {space} address space")]
    Overflow {
        index: usize,
        space: &'static str,
        start: u64,
        size: u64,
    },
    #[error("region at guest address {gpa:#x} (+{size:#x}) overlaps the region at {other_gpa:#x} (+{other_size:#x}) in the {space} address space")]
    Overlap {
        space: &'static str,
        gpa: u64,
        size: u64,
        other_gpa: u64,
        other_size: u64,
    },
    #[error("more than {MAX_REGIONS} regions")]
    TooManyRegions,
    #[error("region at guest address {gpa:#x} (+{size:#x}): size does not fit this host's address space")]
    TooLarge { gpa: u64, size: u64 },
    #[error("mapping region at guest address {gpa:#x} (+{size:#x}, file offset {mmap_offset:#x})")]
    Map {
        gpa: u64,
        size: u64,
        mmap_offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("registering region at guest address {gpa:#x} in the DMA translation map")]
    Register {
        gpa: u64,
        #[source]
        source: pollux_env::memmap::TranslationError,
    },
    #[error("no region at guest address {gpa:#x} (+{size:#x}) to remove")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("guest address range [{gpa:#x}, +{len:#x}) is not inside one region")]
    OutOfBounds { gpa: u64, len: u64 },
    #[error("front-end address range [{uva:#x}, +{len:#x}) is not inside one region")]
    UvaOutOfBounds { uva: u64, len: u64 },
}

/// What the front-end says about one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    pub size: u64,
    /// The front-end's own virtual address of the first byte (vring addresses use these).
    pub uva: u64,
    /// Where the region starts in its file.
    pub mmap_offset: u64,
}

/// The part of a region's file that is mapped, aligned to the file's page size.
///
/// hugetlbfs files and memfds with MFD_HUGETLB report their page size as the block size
/// (`st_blksize`) and accept only mappings whose file offset and length are multiples of it
/// (mmap(2): EINVAL otherwise); QEMU's regions may start at offsets such as 0xc0000 inside one
/// file. So the mapping starts at the page boundary at or below `mmap_offset`, ends at the
/// page boundary at or above the region's end, and the region lies `delta` bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapWindow {
    /// The page size used: the file's when it is a power of two from 4 KiB to 1 GiB, else
    /// 4 KiB.
    page_size: u64,
    /// File offset of the mapping (a multiple of `page_size`).
    map_offset: u64,
    /// Where the region starts inside the mapping (below `page_size`).
    delta: usize,
    /// Length of the mapping (a multiple of `page_size`, at least `delta + size`).
    len: usize,
}

impl MapWindow {
    /// `None` when the aligned length overflows or does not fit this host's address space.
    fn new(spec: RegionSpec, file_page_size: u64) -> Option<Self> {
        let page_size =
            if file_page_size.is_power_of_two() && (4096..=1 << 30).contains(&file_page_size) {
                file_page_size
            } else {
                4096
            };
        let map_offset = spec.mmap_offset & !(page_size - 1);
        let delta = spec.mmap_offset - map_offset;
        let len = delta
            .checked_add(spec.size)?
            .checked_next_multiple_of(page_size)?;
        Some(Self {
            page_size,
            map_offset,
            delta: usize::try_from(delta).ok()?,
            len: usize::try_from(len).ok()?,
        })
    }
}

/// One mapped region. Mapped at creation, unmapped and unregistered on drop.
pub struct GuestRegion {
    spec: RegionSpec,
    /// Host address of the region's first byte (inside `map`).
    host: usize,
    /// The backing file's page size the mapping was aligned to (2 MiB for hugetlbfs and
    /// hugetlb memfds with 2 MiB pages).
    page_size: u64,
    /// Registered in the global translation map as `[host, host + size)`.
    registered: bool,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &format_args!("{:#x}", self.spec.gpa))
            .field("size", &format_args!("{:#x}", self.spec.size))
            .field("uva", &format_args!("{:#x}", self.spec.uva))
            .field("host", &format_args!("{:#x}", self.host))
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl GuestRegion {
    /// Maps `size` bytes of `file` from `mmap_offset`, shared and read-write, and registers
    /// the mapping in the global translation map when `register_dma`.
    pub fn map(spec: RegionSpec, file: &File, register_dma: bool) -> Result<Self, MemoryError> {
        let map_error = |source| MemoryError::Map {
            gpa: spec.gpa,
            size: spec.size,
            mmap_offset: spec.mmap_offset,
            source,
        };
        let too_large = || MemoryError::TooLarge {
            gpa: spec.gpa,
            size: spec.size,
        };
        let page = file
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::blksize(&m))
            .unwrap_or(4096);
        let window = MapWindow::new(spec, page).ok_or_else(too_large)?;
        let (map_offset, delta, len) = (window.map_offset, window.delta, window.len);
        let map = memmap2::MmapOptions::new()
            .offset(map_offset)
            .len(len)
            .map_raw(file)
            .map_err(map_error)?;
        if map.len() != len {
            return Err(map_error(std::io::Error::other("short mapping")));
        }
        // delta + size <= len (MapWindow::new): the region lies inside the mapping.
        let host = map.as_mut_ptr() as usize + delta;
        let mut region = Self {
            spec,
            host,
            page_size: window.page_size,
            registered: false,
            map,
        };
        if register_dma {
            MemMap::global()
                .register(host as u64, spec.size)
                .map_err(|source| MemoryError::Register {
                    gpa: spec.gpa,
                    source,
                })?;
            region.registered = true;
        }
        Ok(region)
    }

    pub fn spec(&self) -> RegionSpec {
        self.spec
    }

    /// The page size its mapping is aligned to (the file's: 4 KiB, or the huge page size of a
    /// hugetlbfs file or hugetlb memfd).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Host address of the region's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    #[inline]
    fn contains_gpa(&self, gpa: u64, len: u64) -> Option<u64> {
        let offset = gpa.checked_sub(self.spec.gpa)?;
        let end = offset.checked_add(len)?;
        (offset < self.spec.size && end <= self.spec.size).then_some(offset)
    }
}

impl Drop for GuestRegion {
    fn drop(&mut self) {
        if self.registered {
            if let Err(error) = MemMap::global().unregister(self.host as u64, self.spec.size) {
                tracing::warn!(%error, gpa = self.spec.gpa, "vhost: unregistering guest region");
            }
        }
        tracing::debug!(
            gpa = self.spec.gpa,
            size = self.spec.size,
            len = self.map.len(),
            "vhost: guest region unmapped"
        );
    }
}

/// A guest memory table: regions sorted by guest address, non-overlapping in the guest and in
/// the front-end's address space. Immutable; see the module documentation.
#[derive(Debug, Default, Clone)]
pub struct GuestMemory {
    regions: Vec<Arc<GuestRegion>>,
}

fn check_spec(index: usize, spec: &RegionSpec) -> Result<(), MemoryError> {
    if spec.size == 0 {
        return Err(MemoryError::ZeroSize { index });
    }
    for (space, start) in [
        ("guest", spec.gpa),
        ("front-end", spec.uva),
        ("file", spec.mmap_offset),
    ] {
        if start.checked_add(spec.size).is_none() {
            return Err(MemoryError::Overflow {
                index,
                space,
                start,
                size: spec.size,
            });
        }
    }
    Ok(())
}

/// Refuses overlaps in the guest and front-end address spaces (both were checked not to
/// overflow).
fn check_overlaps(specs: &[RegionSpec]) -> Result<(), MemoryError> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[..i] {
            for (space, a_start, b_start) in [("guest", a.gpa, b.gpa), ("front-end", a.uva, b.uva)]
            {
                if a_start < b_start + b.size && b_start < a_start + a.size {
                    return Err(MemoryError::Overlap {
                        space,
                        gpa: a.gpa,
                        size: a.size,
                        other_gpa: b.gpa,
                        other_size: b.size,
                    });
                }
            }
        }
    }
    Ok(())
}

impl GuestMemory {
    /// An empty table (no access succeeds).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Maps every region of a SET_MEM_TABLE. All checks come before any mapping; a failed
    /// mapping unmaps the ones made before it.
    pub fn from_regions(
        regions: &[(RegionSpec, &File)],
        register_dma: bool,
    ) -> Result<Self, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        let specs: Vec<RegionSpec> = regions.iter().map(|(spec, _)| *spec).collect();
        for (index, spec) in specs.iter().enumerate() {
            check_spec(index, spec)?;
        }
        check_overlaps(&specs)?;
        let mut mapped = Vec::with_capacity(regions.len());
        for (spec, file) in regions {
            mapped.push(Arc::new(GuestRegion::map(*spec, file, register_dma)?));
        }
        mapped.sort_by_key(|r| r.spec.gpa);
        Ok(Self { regions: mapped })
    }

    /// A new table with one more region (ADD_MEM_REG).
    pub fn with_region(
        &self,
        spec: RegionSpec,
        file: &File,
        register_dma: bool,
    ) -> Result<Self, MemoryError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        check_spec(self.regions.len(), &spec)?;
        let mut specs: Vec<RegionSpec> = self.regions.iter().map(|r| r.spec).collect();
        specs.push(spec);
        check_overlaps(&specs)?;
        let region = Arc::new(GuestRegion::map(spec, file, register_dma)?);
        let mut regions = self.regions.clone();
        regions.push(region);
        regions.sort_by_key(|r| r.spec.gpa);
        Ok(Self { regions })
    }

    /// A new table without the region at `gpa` of `size` bytes (REM_MEM_REG).
    pub fn without_region(&self, gpa: u64, size: u64) -> Result<Self, MemoryError> {
        let index = self
            .regions
            .iter()
            .position(|r| r.spec.gpa == gpa && r.spec.size == size)
            .ok_or(MemoryError::NoSuchRegion { gpa, size })?;
        let mut regions = self.regions.clone();
        regions.remove(index);
        Ok(Self { regions })
    }

    pub fn regions(&self) -> impl Iterator<Item = &GuestRegion> {
        self.regions.iter().map(|r| r.as_ref())
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The region holding all of `[gpa, gpa + len)` and the offset of `gpa` in it. `hint` is
    /// the index of the region that answered last (checked first: consecutive descriptors
    /// almost always sit in the same region) and is updated.
    #[inline]
    fn find(&self, gpa: u64, len: u64, hint: &mut usize) -> Option<(usize, u64)> {
        if let Some(offset) = self
            .regions
            .get(*hint)
            .and_then(|r| r.contains_gpa(gpa, len))
        {
            return Some((*hint, offset));
        }
        let index = self
            .regions
            .partition_point(|r| r.spec.gpa <= gpa)
            .checked_sub(1)?;
        let offset = self.regions[index].contains_gpa(gpa, len)?;
        *hint = index;
        Some((index, offset))
    }

    /// One past the highest guest address of the table (0 when empty): what a dirty log must
    /// cover.
    pub fn end_gpa(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.spec.gpa + r.spec.size)
            .max()
            .unwrap_or(0)
    }

    /// The guest address of host address `host` when `[host, host + len)` lies inside one
    /// region's mapping (a bdev iovec built from this table, translated back for the dirty
    /// log: only while logging is on, so the data path pays nothing otherwise).
    pub fn host_to_gpa(&self, host: u64, len: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let offset = host.checked_sub(r.host as u64)?;
            let end = offset.checked_add(len)?;
            (end <= r.spec.size).then_some(r.spec.gpa + offset)
        })
    }

    /// Translates a front-end virtual address range (vring addresses) to a guest address;
    /// the range must lie inside one region.
    pub fn uva_to_gpa(&self, uva: u64, len: u64) -> Result<u64, MemoryError> {
        let bad = MemoryError::UvaOutOfBounds { uva, len };
        for region in &self.regions {
            let Some(offset) = uva.checked_sub(region.spec.uva) else {
                continue;
            };
            if offset < region.spec.size {
                let end = offset.checked_add(len).ok_or(bad)?;
                if end > region.spec.size {
                    return Err(MemoryError::UvaOutOfBounds { uva, len });
                }
                return Ok(region.spec.gpa + offset);
            }
        }
        Err(bad)
    }

    /// A checked slice over `[gpa, gpa + len)`, which must lie in one region (ring parts,
    /// indirect tables, request headers).
    #[inline]
    pub fn slice(&self, gpa: u64, len: u64, hint: &mut usize) -> Result<GuestSlice, MemoryError> {
        let (index, offset) = self
            .find(gpa, len, hint)
            .ok_or(MemoryError::OutOfBounds { gpa, len })?;
        Ok(GuestSlice {
            region: self.regions[index].clone(),
            offset,
            len,
        })
    }

    /// Calls `f(host_addr, len)` for each host-contiguous fragment of `[gpa, gpa + len)`, in
    /// order, splitting where the range crosses from one region into the next; fails (before
    /// calling `f` for a byte outside the table) when any byte is in no region.
    #[inline]
    pub fn for_each_fragment<E>(
        &self,
        gpa: u64,
        len: u64,
        hint: &mut usize,
        mut f: impl FnMut(u64, usize) -> Result<(), E>,
    ) -> Result<Result<(), E>, MemoryError> {
        let mut addr = gpa;
        let mut left = len;
        gpa.checked_add(len)
            .ok_or(MemoryError::OutOfBounds { gpa, len })?;
        while left > 0 {
            let (index, offset) = self
                .find(addr, 1, hint)
                .ok_or(MemoryError::OutOfBounds { gpa, len })?;
            let region = &self.regions[index];
            let chunk = left.min(region.spec.size - offset);
            // chunk <= region size, which fit in usize when the region was mapped.
            if let Err(e) = f(region.host as u64 + offset, chunk as usize) {
                return Ok(Err(e));
            }
            addr += chunk;
            left -= chunk;
        }
        Ok(Ok(()))
    }

    /// Whether `[gpa, gpa + len)` lies inside one region.
    #[inline]
    pub fn contains(&self, gpa: u64, len: u64, hint: &mut usize) -> bool {
        self.find(gpa, len, hint).is_some()
    }

    /// The host address of `gpa` when `[gpa, gpa + len)` lies inside one region. No `Arc`
    /// is cloned: this is the per-request path, and a reference count shared by the queues of
    /// every core would be a contended cache line.
    #[inline]
    fn host(&self, gpa: u64, len: u64, hint: &mut usize) -> Result<*mut u8, MemoryError> {
        let (index, offset) = self
            .find(gpa, len, hint)
            .ok_or(MemoryError::OutOfBounds { gpa, len })?;
        // offset + len <= region size: the sum stays inside the region's mapping.
        Ok((self.regions[index].host as u64 + offset) as *mut u8)
    }

    /// `[gpa, gpa + len)`, which must lie in one region, translated once (an indirect table:
    /// its entries are then read without a region lookup each). Borrows the table, so no
    /// reference count is touched.
    #[inline]
    pub fn range(
        &self,
        gpa: u64,
        len: u64,
        hint: &mut usize,
    ) -> Result<GuestRange<'_>, MemoryError> {
        let host = self.host(gpa, len, hint)?;
        Ok(GuestRange {
            host,
            len,
            _table: std::marker::PhantomData,
        })
    }

    /// The two little-endian 64-bit words at guest address `gpa` (a request header), as two
    /// loads when 8-aligned.
    #[inline]
    pub fn read_u64_pair(&self, gpa: u64, hint: &mut usize) -> Result<(u64, u64), MemoryError> {
        let ptr = self.host(gpa, 16, hint)?;
        // SAFETY: `[ptr, ptr + 16)` lies inside a mapped region of this table (checked by
        // `host`), which `&self` keeps alive for the call.
        Ok(unsafe { read_u64_pair(ptr) })
    }

    /// Copies `N` bytes from guest address `gpa` (all in one region).
    #[inline]
    pub fn read_array<const N: usize>(
        &self,
        gpa: u64,
        hint: &mut usize,
    ) -> Result<[u8; N], MemoryError> {
        let ptr = self.host(gpa, N as u64, hint)?;
        // SAFETY: `[ptr, ptr + N)` lies inside a mapped region of this table (checked by
        // `host`), which `&self` keeps alive for the call.
        Ok(unsafe { read_volatile_bytes::<N>(ptr) })
    }

    /// Copies `bytes` to guest address `gpa` (all in one region).
    #[inline]
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8], hint: &mut usize) -> Result<(), MemoryError> {
        let ptr = self.host(gpa, bytes.len() as u64, hint)?;
        for (i, byte) in bytes.iter().enumerate() {
            // SAFETY: `ptr + i` lies inside a mapped region of this table (checked by `host`
            // for the whole range), alive for the call; a volatile byte store forms no
            // reference.
            unsafe { std::ptr::write_volatile(ptr.add(i), *byte) };
        }
        Ok(())
    }
}

/// A range of guest memory inside one region of a [`GuestMemory`] it borrows (which keeps the
/// mapping alive), translated once: see [`GuestMemory::range`].
pub struct GuestRange<'a> {
    host: *mut u8,
    len: u64,
    _table: std::marker::PhantomData<&'a GuestMemory>,
}

impl GuestRange<'_> {
    /// Reads `N` bytes at offset `at` (`None` past the end).
    #[inline]
    pub fn read_array<const N: usize>(&self, at: u64) -> Option<[u8; N]> {
        let end = at.checked_add(N as u64)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `[host + at, host + at + N)` lies inside `[host, host + len)` (checked
        // above), which `GuestMemory::range` found inside one mapped region of the table this
        // range borrows, so the mapping outlives the read.
        Some(unsafe { read_volatile_bytes::<N>(self.host.add(at as usize)) })
    }

    /// Reads the two little-endian 64-bit words at offset `at` (a descriptor), as two loads
    /// when 8-aligned (`None` past the end).
    #[inline]
    pub fn read_u64_pair(&self, at: u64) -> Option<(u64, u64)> {
        let end = at.checked_add(16)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `[host + at, host + at + 16)` is inside the range (checked above), which
        // lies in a mapped region of the table it borrows.
        Some(unsafe { read_u64_pair(self.host.add(at as usize)) })
    }
}

/// Two little-endian 64-bit words at `ptr`: two volatile loads when 8-aligned, else the
/// bytes one by one.
///
/// # Safety
/// `[ptr, ptr + 16)` must lie inside a live mapping.
#[inline(always)]
unsafe fn read_u64_pair(ptr: *const u8) -> (u64, u64) {
    if (ptr as usize).is_multiple_of(8) {
        // SAFETY: in the mapping (the caller's contract) and 8-aligned (checked).
        unsafe {
            (
                u64::from_le(std::ptr::read_volatile(ptr.cast::<u64>())),
                u64::from_le(std::ptr::read_volatile(ptr.add(8).cast::<u64>())),
            )
        }
    } else {
        // SAFETY: in the mapping; a byte array has alignment 1.
        let bytes = unsafe { std::ptr::read_volatile(ptr.cast::<[u8; 16]>()) };
        let [a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7] = bytes;
        (
            u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
        )
    }
}

/// Reads `N` bytes at `ptr` with volatile loads, never forming a reference to memory the
/// guest may change concurrently: 64-bit loads when `N` and `ptr` allow (a descriptor, a
/// request header: two loads instead of sixteen byte loads and the shifts that reassemble
/// them), else 32-bit loads, else bytes. Each word is copied out in memory order
/// (`to_ne_bytes`), so the result is the bytes as they lie in guest memory.
///
/// # Safety
/// `[ptr, ptr + N)` must lie inside a live mapping.
#[inline(always)]
unsafe fn read_volatile_bytes<const N: usize>(ptr: *const u8) -> [u8; N] {
    let mut out = [0u8; N];
    if N.is_multiple_of(8) && (ptr as usize).is_multiple_of(8) {
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: `ptr + 8 * i + 8 <= ptr + N` (in the mapping, the caller's contract),
            // 8-aligned (checked above).
            let word = unsafe { std::ptr::read_volatile(ptr.add(8 * i).cast::<u64>()) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    } else if N.is_multiple_of(4) && (ptr as usize).is_multiple_of(4) {
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            // SAFETY: in the mapping and 4-aligned, as above.
            let word = unsafe { std::ptr::read_volatile(ptr.add(4 * i).cast::<u32>()) };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
    } else {
        // SAFETY: in the mapping; a byte array has alignment 1.
        out = unsafe { std::ptr::read_volatile(ptr.cast::<[u8; N]>()) };
    }
    out
}

/// Writes `bytes` at `ptr` with volatile stores, the mirror of [`read_volatile_bytes`] (a
/// used element: two 32-bit stores).
///
/// # Safety
/// `[ptr, ptr + N)` must lie inside a live mapping.
#[inline(always)]
unsafe fn write_volatile_bytes<const N: usize>(ptr: *mut u8, bytes: [u8; N]) {
    if N.is_multiple_of(8) && (ptr as usize).is_multiple_of(8) {
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
            // SAFETY: in the mapping (the caller's contract) and 8-aligned (checked above).
            unsafe { std::ptr::write_volatile(ptr.add(8 * i).cast::<u64>(), word) };
        }
    } else if N.is_multiple_of(4) && (ptr as usize).is_multiple_of(4) {
        for (i, chunk) in bytes.chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes(chunk.try_into().unwrap_or([0; 4]));
            // SAFETY: in the mapping and 4-aligned, as above.
            unsafe { std::ptr::write_volatile(ptr.add(4 * i).cast::<u32>(), word) };
        }
    } else {
        // SAFETY: in the mapping; a byte array has alignment 1.
        unsafe { std::ptr::write_volatile(ptr.cast::<[u8; N]>(), bytes) };
    }
}

/// A checked range of guest memory inside one region; keeps the region mapped. Accessors take
/// offsets relative to the slice and panic only on the caller's arithmetic errors (an offset
/// past `len`), which the ring code rules out by construction (debug assertions) and guards
/// with a check that skips the access in release builds.
#[derive(Clone)]
pub struct GuestSlice {
    region: Arc<GuestRegion>,
    offset: u64,
    len: u64,
}

impl std::fmt::Debug for GuestSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestSlice(gpa {:#x}, +{:#x})",
            self.region.spec.gpa + self.offset,
            self.len
        )
    }
}

impl GuestSlice {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.region.spec.gpa + self.offset
    }

    /// The host address of byte `at`, if `[at, at + n)` lies inside the slice.
    #[inline]
    fn host_ptr(&self, at: u64, n: usize) -> Option<*mut u8> {
        let end = at.checked_add(n as u64)?;
        if end > self.len {
            debug_assert!(false, "guest slice access out of bounds");
            return None;
        }
        // offset + len <= region size (checked at creation), and the region is mapped at
        // `host`, so the sum stays inside the mapping.
        Some((self.region.host as u64 + self.offset + at) as *mut u8)
    }

    /// The two little-endian 64-bit words at `at` (a descriptor), as two loads when 8-aligned
    /// (zeroes if out of bounds, which the callers rule out).
    #[inline]
    pub fn read_u64_pair(&self, at: u64) -> (u64, u64) {
        let Some(ptr) = self.host_ptr(at, 16) else {
            return (0, 0);
        };
        // SAFETY: `[ptr, ptr + 16)` lies inside the region's live shared mapping (checked by
        // host_ptr; the Arc keeps the mapping alive).
        unsafe { read_u64_pair(ptr) }
    }

    /// Reads `N` bytes at `at` (zeroes if out of bounds, which the callers rule out).
    #[inline]
    pub fn read_array<const N: usize>(&self, at: u64) -> [u8; N] {
        let Some(ptr) = self.host_ptr(at, N) else {
            return [0; N];
        };
        // SAFETY: `[ptr, ptr + N)` lies inside the region's live shared mapping (checked by
        // host_ptr; the Arc keeps the mapping alive).
        unsafe { read_volatile_bytes::<N>(ptr) }
    }

    /// Writes `bytes` at `at` (nothing if out of bounds, which the callers rule out).
    #[inline]
    pub fn write_bytes(&self, at: u64, bytes: &[u8]) {
        let Some(ptr) = self.host_ptr(at, bytes.len()) else {
            return;
        };
        for (i, byte) in bytes.iter().enumerate() {
            // SAFETY: `ptr + i` is inside the region's live shared mapping (checked by
            // host_ptr for the whole range); a volatile byte store needs no alignment and forms
            // no reference.
            unsafe { std::ptr::write_volatile(ptr.add(i), *byte) };
        }
    }

    /// Writes an array of `N` bytes at `at` in one volatile store.
    #[inline]
    pub fn write_array<const N: usize>(&self, at: u64, bytes: [u8; N]) {
        let Some(ptr) = self.host_ptr(at, N) else {
            return;
        };
        // SAFETY: as in `read_array`: `[ptr, ptr + N)` is in bounds of a live mapping.
        unsafe { write_volatile_bytes(ptr, bytes) };
    }

    /// Reads a little-endian u16 at `at` (ring indices and flags) as one 16-bit load when
    /// aligned (the ring layouts guarantee it): a byte-wise read could see half of an index
    /// the driver is updating (0x00ff -> 0x0100 read as 0x01ff) and take stale entries.
    #[inline]
    pub fn read_u16(&self, at: u64) -> u16 {
        let Some(ptr) = self.host_ptr(at, 2) else {
            return 0;
        };
        if (ptr as usize).is_multiple_of(2) {
            // SAFETY: in bounds of a live mapping (host_ptr) and 2-byte aligned (checked); the
            // volatile load forms no reference.
            u16::from_le(unsafe { std::ptr::read_volatile(ptr as *const u16) })
        } else {
            u16::from_le_bytes(self.read_array::<2>(at))
        }
    }

    /// Writes a little-endian u16 at `at`, as one 16-bit store when aligned so that the
    /// driver never sees a torn index.
    #[inline]
    pub fn write_u16(&self, at: u64, value: u16) {
        let Some(ptr) = self.host_ptr(at, 2) else {
            return;
        };
        if (ptr as usize).is_multiple_of(2) {
            // SAFETY: in bounds of a live mapping (host_ptr) and 2-byte aligned (checked).
            unsafe { std::ptr::write_volatile(ptr as *mut u16, value.to_le()) };
        } else {
            self.write_array(at, value.to_le_bytes());
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use std::io::Write;

    /// An anonymous file of `size` bytes (a memfd-like backing) for tests.
    pub fn backing_file(size: u64) -> File {
        let file = tempfile_in_dev_shm();
        file.set_len(size).expect("set_len");
        file
    }

    fn tempfile_in_dev_shm() -> File {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "pollux-vhost-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create test backing file");
        file.flush().expect("flush");
        std::fs::remove_file(&path).expect("unlink test backing file");
        file
    }

    /// A one-region guest memory of `size` bytes at guest address `gpa` (front-end address
    /// `gpa + 0x1000_0000_0000`), not registered for DMA.
    pub fn memory(gpa: u64, size: u64) -> (GuestMemory, File) {
        let file = backing_file(size);
        let spec = RegionSpec {
            gpa,
            size,
            uva: gpa + 0x1000_0000_0000,
            mmap_offset: 0,
        };
        let memory = GuestMemory::from_regions(&[(spec, &file)], false).expect("map");
        (memory, file)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn word_reads_and_writes_match_bytes_at_any_alignment() {
        let (mem, _file) = memory(0x10000, 0x4000);
        let mut hint = 0;
        let bytes: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        mem.write_bytes(0x10000, &bytes, &mut hint).expect("write");
        let slice = mem.slice(0x10000, 64, &mut hint).expect("slice");
        for at in [0u64, 1, 2, 4, 8, 13, 16, 40] {
            let expected: [u8; 16] = bytes[at as usize..at as usize + 16].try_into().expect("16");
            let words = (
                u64::from_le_bytes(expected[..8].try_into().expect("8")),
                u64::from_le_bytes(expected[8..].try_into().expect("8")),
            );
            assert_eq!(slice.read_array::<16>(at), expected, "slice at {at}");
            assert_eq!(slice.read_u64_pair(at), words, "slice pair at {at}");
            assert_eq!(
                mem.read_array::<16>(0x10000 + at, &mut hint).expect("read"),
                expected
            );
            assert_eq!(
                mem.read_u64_pair(0x10000 + at, &mut hint).expect("pair"),
                words
            );
            let range = mem.range(0x10000, 64, &mut hint).expect("range");
            assert_eq!(range.read_u64_pair(at), Some(words), "range pair at {at}");
            assert_eq!(
                range.read_array::<8>(at).map(|a| a.to_vec()),
                Some(expected[..8].to_vec())
            );
        }
        let range = mem.range(0x10000, 64, &mut hint).expect("range");
        assert_eq!(range.read_u64_pair(49), None, "past the end");
        assert!(
            mem.range(0x13ff8, 16, &mut hint).is_err(),
            "outside the table"
        );
        // Stores: 8 bytes as two 32-bit words (a used element at 4 mod 8), and unaligned.
        for at in [4u64, 5, 8] {
            slice.write_array::<8>(at, [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(slice.read_array::<8>(at), [1, 2, 3, 4, 5, 6, 7, 8]);
        }
    }

    #[test]
    fn accesses_outside_the_table_are_refused() {
        let (mem, _file) = memory(0x10000, 0x4000);
        let mut hint = 0;
        assert!(mem.slice(0x10000, 0x4000, &mut hint).is_ok());
        assert!(matches!(
            mem.slice(0x13fff, 2, &mut hint),
            Err(MemoryError::OutOfBounds { .. })
        ));
        assert!(mem.slice(0xffff, 1, &mut hint).is_err(), "below the region");
        assert!(mem.slice(u64::MAX - 1, 16, &mut hint).is_err(), "wraps");
        assert!(
            mem.slice(0x10000, u64::MAX, &mut hint).is_err(),
            "huge length"
        );
        let frag = mem.for_each_fragment(0x13000, 0x2000, &mut hint, |_, _| Ok::<(), ()>(()));
        assert!(frag.is_err(), "runs off the end");
        assert!(mem.uva_to_gpa(0x1000_0001_0000, 0x100).is_ok());
        assert!(mem.uva_to_gpa(0x1000_0001_3f00, 0x200).is_err());
    }

    #[test]
    fn reads_see_writes_and_fragments_split_at_region_boundaries() {
        let a = backing_file(0x2000);
        let b = backing_file(0x2000);
        let specs = [
            (
                RegionSpec {
                    gpa: 0,
                    size: 0x2000,
                    uva: 0x7000_0000,
                    mmap_offset: 0,
                },
                &a,
            ),
            (
                RegionSpec {
                    gpa: 0x2000,
                    size: 0x2000,
                    uva: 0x9000_0000,
                    mmap_offset: 0,
                },
                &b,
            ),
        ];
        let mem = GuestMemory::from_regions(&specs, false).expect("map");
        let mut hint = 0;
        mem.write_bytes(0x1ff0, &[7; 16], &mut hint).expect("write");
        assert_eq!(
            mem.read_array::<16>(0x1ff0, &mut hint).expect("read"),
            [7; 16]
        );
        let mut fragments = Vec::new();
        mem.for_each_fragment(0x1800, 0x1000, &mut hint, |host, len| {
            fragments.push((host, len));
            Ok::<(), ()>(())
        })
        .expect("in bounds")
        .expect("no callback error");
        assert_eq!(fragments.len(), 2);
        assert_eq!(fragments[0].1 + fragments[1].1, 0x1000);
    }

    fn spec(mmap_offset: u64, size: u64) -> RegionSpec {
        RegionSpec {
            gpa: 0,
            size,
            uva: 0x7000_0000_0000,
            mmap_offset,
        }
    }

    #[test]
    fn map_windows_align_to_the_file_page_size() {
        const HUGE_2M: u64 = 2 << 20;
        // QEMU's low RAM region past the VGA hole on a hugetlb backend: 0xc0000 into the file.
        assert_eq!(
            MapWindow::new(spec(0xc0000, 0x3ff4_0000), HUGE_2M),
            Some(MapWindow {
                page_size: HUGE_2M,
                map_offset: 0,
                delta: 0xc0000,
                len: 0x4000_0000,
            })
        );
        // Inside a later huge page, ending mid-page: both ends rounded out.
        assert_eq!(
            MapWindow::new(spec(0x210_0000, 0x1000), HUGE_2M),
            Some(MapWindow {
                page_size: HUGE_2M,
                map_offset: 0x200_0000,
                delta: 0x10_0000,
                len: 0x20_0000,
            })
        );
        // 1 GiB pages are honoured too.
        let window = MapWindow::new(spec(0x4000_0000, 0x1000), 1 << 30).expect("window");
        assert_eq!(
            (window.map_offset, window.delta, window.len),
            (0x4000_0000, 0, 1 << 30)
        );
        // 4 KiB files map exactly the pages the region touches.
        assert_eq!(
            MapWindow::new(spec(0x3000, 0x4000), 4096),
            Some(MapWindow {
                page_size: 4096,
                map_offset: 0x3000,
                delta: 0,
                len: 0x4000,
            })
        );
        // A block size that is no page size (0, not a power of two, above 1 GiB): 4 KiB.
        for odd in [0, 512, 3 << 20, 1 << 31] {
            assert_eq!(
                MapWindow::new(spec(0x1800, 0x1000), odd).map(|w| w.page_size),
                Some(4096),
                "{odd}"
            );
        }
        // A length that overflows once rounded up is refused, not wrapped.
        assert_eq!(MapWindow::new(spec(0x1000, u64::MAX - 0x800), 4096), None);
        assert_eq!(MapWindow::new(spec(0, u64::MAX - 0x800), HUGE_2M), None);
    }

    #[test]
    fn a_region_inside_its_first_page_maps_from_the_page_start() {
        use std::os::unix::fs::FileExt;
        // The region starts 0x800 into a 4 KiB page: mapped from the page, pointed into it.
        let file = backing_file(0x4000);
        file.write_all_at(b"edge", 0x1800).expect("file write");
        let mem = GuestMemory::from_regions(&[(spec(0x1800, 0x1000), &file)], false).expect("map");
        let region = mem.regions().next().expect("one region");
        assert_eq!(region.page_size(), 4096);
        let mut hint = 0;
        assert_eq!(&mem.read_array::<4>(0, &mut hint).expect("read"), b"edge");
    }

    #[test]
    fn regions_honour_their_file_offset() {
        use std::os::unix::fs::FileExt;
        let file = backing_file(0x10000);
        file.write_all_at(b"pollux", 0x3010).expect("file write");
        let spec = RegionSpec {
            gpa: 0x100_0000,
            size: 0x4000,
            uva: 0x7000_0000,
            mmap_offset: 0x3000,
        };
        let mem = GuestMemory::from_regions(&[(spec, &file)], false).expect("map");
        let mut hint = 0;
        assert_eq!(
            &mem.read_array::<6>(0x100_0010, &mut hint).expect("read"),
            b"pollux"
        );
        mem.write_bytes(0x100_3ff0, b"tail", &mut hint)
            .expect("write");
        let mut back = [0u8; 4];
        file.read_exact_at(&mut back, 0x6ff0).expect("file read");
        assert_eq!(&back, b"tail");
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let a = backing_file(0x2000);
        let spec = RegionSpec {
            gpa: 0,
            size: 0x2000,
            uva: 0x7000_0000,
            mmap_offset: 0,
        };
        let overlapping = RegionSpec {
            gpa: 0x1000,
            uva: 0x9000_0000,
            ..spec
        };
        assert!(matches!(
            GuestMemory::from_regions(&[(spec, &a), (overlapping, &a)], false),
            Err(MemoryError::Overlap { .. })
        ));
        let uva_overlap = RegionSpec {
            gpa: 0x10_0000,
            uva: 0x7000_1000,
            ..spec
        };
        assert!(GuestMemory::from_regions(&[(spec, &a), (uva_overlap, &a)], false).is_err());
        let mem = GuestMemory::from_regions(&[(spec, &a)], false).expect("map");
        assert!(mem.with_region(overlapping, &a, false).is_err());
        let zero = RegionSpec { size: 0, ..spec };
        assert!(GuestMemory::from_regions(&[(zero, &a)], false).is_err());
        let wrap = RegionSpec {
            gpa: u64::MAX - 0xfff,
            ..spec
        };
        assert!(GuestMemory::from_regions(&[(wrap, &a)], false).is_err());
        let mem2 = mem.without_region(0, 0x2000).expect("remove");
        assert!(mem2.is_empty());
        assert!(mem2.without_region(0, 0x2000).is_err());
    }

    #[test]
    fn regions_register_in_the_translation_map_and_leave_it() {
        let file = backing_file(0x4000);
        let spec = RegionSpec {
            gpa: 0x4000_0000,
            size: 0x4000,
            uva: 0x5000_0000,
            mmap_offset: 0,
        };
        let mem = GuestMemory::from_regions(&[(spec, &file)], true).expect("map");
        let host = mem.regions().next().expect("one region").host_addr();
        assert!(MemMap::global().translate(host, 0x4000).is_ok());
        drop(mem);
        assert!(MemMap::global().translate(host, 1).is_err());
    }
}
