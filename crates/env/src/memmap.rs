//! Virtual address -> IOVA translation for registered regions.
//!
//! Every byte a device reads or writes must lie in a region registered here: the region's
//! virtual range, and the IOVA the device sees for its first byte. Without a [`DmaMapper`]
//! the IOVA is the virtual address itself (what an IOMMU mapping made by VFIO in "VA mode"
//! gives); with one, the mapper picks the IOVA and this map records it.
//!
//! # Design: lock-free readers, copy-on-write writers
//!
//! Translation sits on the I/O path (every PRP / SGL entry of every command), registration
//! sits on the setup path (a few calls per process). The regions are therefore kept as a
//! sorted, non-overlapping `Vec<Region>` behind an [`ArcSwap`]:
//!
//! - readers `load()` the current snapshot (no lock, no syscall, no allocation) and binary
//!   search it: O(log n) in the number of regions;
//! - writers serialize on one `Mutex`, copy the vector, change the copy (and call the
//!   mapper), then publish it with one atomic `store`. A reader sees either the old or the
//!   new vector whole, never a half-updated one, so it can never observe a wrong answer.
//!
//! The usual read-copy-update caveat applies: a reader that loaded the old snapshot just
//! before an `unregister` may still return a translation for the region being removed.
//! Unregistering memory that I/O is still using is the caller's bug in any design; this
//! one only guarantees that every answer was true at some instant during the call.
//!
//! A translation never assumes that a range is contiguous: [`MemMap::translate`] answers
//! for the bytes of one region at most, and callers loop for the rest (see
//! [`MemMap::fragments`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;

/// Maps and unmaps DMA for a device's IOMMU as regions come and go (a VFIO container).
/// The mapper chooses the IOVA: the virtual address itself where the IOMMU's usable
/// ranges hold it (as SPDK does in VFIO mode), an allocated one otherwise.
pub trait DmaMapper: Send + Sync {
    /// Makes `[vaddr, vaddr + len)` reachable by the device and returns the IOVA of `vaddr`.
    fn map_dma(&self, vaddr: u64, len: u64) -> std::io::Result<u64>;
    /// Undoes one earlier `map_dma` of exactly `len` bytes at `iova`.
    fn unmap_dma(&self, iova: u64, len: u64) -> std::io::Result<()>;
}

/// Why a registration, an unregistration or a translation was refused.
#[derive(Debug, thiserror::Error)]
pub enum TranslationError {
    #[error("region at {vaddr:#x} has zero length")]
    ZeroLength { vaddr: u64 },
    #[error("region at {vaddr:#x} of {len} bytes runs past the end of the address space")]
    Overflow { vaddr: u64, len: u64 },
    #[error(
        "region [{vaddr:#x}, {end:#x}) overlaps registered region [{existing_vaddr:#x}, {existing_end:#x})"
    )]
    Overlap {
        vaddr: u64,
        end: u64,
        existing_vaddr: u64,
        existing_end: u64,
    },
    #[error("address {vaddr:#x} is in no registered region")]
    NotRegistered { vaddr: u64 },
    #[error(
        "[{vaddr:#x}, +{len}) is not a registered region (unregister takes exactly the range given to register)"
    )]
    NotARegion { vaddr: u64, len: u64 },
    #[error("DMA mapper refused to map [{vaddr:#x}, +{len})")]
    MapFailed {
        vaddr: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("DMA mapper returned IOVA {iova:#x} for {len} bytes, which runs past the end of the IOVA space")]
    MapperIovaOverflow { iova: u64, len: u64 },
    #[error("DMA mapper refused to unmap IOVA [{iova:#x}, +{len})")]
    UnmapFailed {
        iova: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("a DMA mapper is already attached; clear_mapper() first")]
    MapperAlreadySet,
}

/// One registered region: `len` bytes at virtual address `vaddr`, seen by devices at `iova`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub vaddr: u64,
    pub len: u64,
    pub iova: u64,
}

impl Region {
    /// One past the last virtual address (registration checked that it does not overflow).
    pub fn end(&self) -> u64 {
        self.vaddr + self.len
    }

    fn contains(&self, vaddr: u64) -> bool {
        self.vaddr <= vaddr && vaddr < self.end()
    }

    /// The translation of `[vaddr, vaddr + len)`'s first bytes; `vaddr` must be inside.
    #[inline(always)]
    fn translation(&self, vaddr: u64, len: u64) -> Translation {
        let offset = vaddr - self.vaddr;
        Translation {
            // Registration checked that `iova + len` does not overflow.
            iova: self.iova + offset,
            len: len.min(self.len - offset),
        }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Region([{:#x}, {:#x}) -> iova {:#x})",
            self.vaddr,
            self.end(),
            self.iova
        )
    }
}

/// The answer for the first bytes of a range: `len` bytes from the asked address are
/// contiguous at `iova` (at most the bytes asked for, at most to the end of one region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub iova: u64,
    pub len: u64,
}

/// The last region one user (a queue pair) translated through, for
/// [`MemMap::translate_cached`]. Starts empty; owned by one thread, no synchronisation.
#[derive(Debug, Clone, Copy)]
pub struct TranslationCache {
    /// 0: never filled (the map's generations start at 1).
    generation: u64,
    region: Region,
}

impl Default for TranslationCache {
    fn default() -> Self {
        Self {
            generation: 0,
            region: Region {
                vaddr: 0,
                len: 0,
                iova: 0,
            },
        }
    }
}

/// Virtual address -> IOVA map. See the module documentation for the locking design.
pub struct MemMap {
    /// Sorted by `vaddr`, non-overlapping. Readers only `load()`.
    regions: ArcSwap<Vec<Region>>,
    /// Bumped after every change of `regions`: a [`TranslationCache`] filled at an older
    /// generation is stale.
    generation: AtomicU64,
    /// Serializes writers; holds the attached mapper, which only writers use.
    writer: Mutex<Option<Arc<dyn DmaMapper>>>,
}

impl Default for MemMap {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemMap")
            .field("regions", &self.regions())
            .finish()
    }
}

impl MemMap {
    /// An empty map with no mapper (IOVA = VA).
    pub fn new() -> Self {
        Self {
            regions: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(1),
            writer: Mutex::new(None),
        }
    }

    /// The process-wide map that [`crate::dma::DmaMemory`] registers into by default and that
    /// a VFIO container attaches its mapper to.
    pub fn global() -> &'static MemMap {
        static GLOBAL: OnceLock<MemMap> = OnceLock::new();
        GLOBAL.get_or_init(MemMap::new)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Option<Arc<dyn DmaMapper>>> {
        // A writer that panicked left `regions` untouched or fully published (the store is
        // its last step), so the map stays consistent: recover from poisoning.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `[vaddr, vaddr + len)` and returns the IOVA of `vaddr`: the one the attached
    /// mapper chose, or `vaddr` itself when no mapper is attached.
    pub fn register(&self, vaddr: u64, len: u64) -> Result<u64, TranslationError> {
        if len == 0 {
            return Err(TranslationError::ZeroLength { vaddr });
        }
        let end = vaddr
            .checked_add(len)
            .ok_or(TranslationError::Overflow { vaddr, len })?;
        let mapper = self.lock_writer();
        let current = self.regions.load_full();
        // The first region that starts at or after `end` cannot overlap; only its
        // predecessor, the last region starting before `end`, can.
        let index = current.partition_point(|region| region.vaddr < end);
        if let Some(existing) = index.checked_sub(1).map(|i| current[i]) {
            if existing.end() > vaddr {
                return Err(TranslationError::Overlap {
                    vaddr,
                    end,
                    existing_vaddr: existing.vaddr,
                    existing_end: existing.end(),
                });
            }
        }
        let iova = match mapper.as_deref() {
            Some(mapper) => map_region(mapper, vaddr, len)?,
            None => vaddr,
        };
        let mut next = Vec::with_capacity(current.len() + 1);
        next.extend_from_slice(&current[..index]);
        next.push(Region { vaddr, len, iova });
        next.extend_from_slice(&current[index..]);
        self.publish(next);
        tracing::debug!(vaddr, len, iova, "memmap: registered region");
        Ok(iova)
    }

    /// Removes the region registered as exactly `[vaddr, vaddr + len)` and unmaps it from the
    /// attached mapper. The region is removed even when the mapper fails to unmap it (the
    /// error is returned): the memory is going away either way.
    pub fn unregister(&self, vaddr: u64, len: u64) -> Result<(), TranslationError> {
        let mapper = self.lock_writer();
        let current = self.regions.load_full();
        let index = current
            .binary_search_by_key(&vaddr, |region| region.vaddr)
            .ok()
            .filter(|&i| current[i].len == len)
            .ok_or(TranslationError::NotARegion { vaddr, len })?;
        let removed = current[index];
        let mut next = Vec::with_capacity(current.len() - 1);
        next.extend_from_slice(&current[..index]);
        next.extend_from_slice(&current[index + 1..]);
        // Publish before unmapping so that no new translation hands out an IOVA that is
        // about to stop working.
        self.publish(next);
        tracing::debug!(
            vaddr,
            len,
            iova = removed.iova,
            "memmap: unregistered region"
        );
        match mapper.as_deref() {
            Some(mapper) => unmap_region(mapper, removed),
            None => Ok(()),
        }
    }

    /// Stores a new region list, then bumps the generation (in that order: a reader that
    /// sees the new generation also sees the new list).
    fn publish(&self, regions: Vec<Region>) {
        self.regions.store(Arc::new(regions));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// [`translate`](Self::translate) through a per-user cache of the last region hit: when
    /// the map has not changed since and `vaddr` lies in that region, one atomic load and
    /// two compares instead of a snapshot load and a binary search. The I/O path's common
    /// case (one thread's buffers in one DMA region) then costs a few instructions.
    #[inline(always)]
    pub fn translate_cached(
        &self,
        cache: &mut TranslationCache,
        vaddr: u64,
        len: u64,
    ) -> Result<Translation, TranslationError> {
        // Acquire pairs with `publish`'s Release: read before the regions, so a cache filled
        // below is never newer-generation-with-older-regions.
        let generation = self.generation.load(Ordering::Acquire);
        if generation == cache.generation
            && vaddr >= cache.region.vaddr
            && vaddr < cache.region.end()
            && len != 0
        {
            return Ok(cache.region.translation(vaddr, len));
        }
        self.translate_and_fill(cache, generation, vaddr, len)
    }

    /// [`translate_cached`](Self::translate_cached)'s miss: a full lookup that refills the cache.
    #[cold]
    #[inline(never)]
    fn translate_and_fill(
        &self,
        cache: &mut TranslationCache,
        generation: u64,
        vaddr: u64,
        len: u64,
    ) -> Result<Translation, TranslationError> {
        let region = self.region_of(vaddr, len)?;
        *cache = TranslationCache { generation, region };
        Ok(region.translation(vaddr, len))
    }

    /// The region holding `vaddr` (for a non-empty range): one snapshot load, a binary search.
    #[inline]
    fn region_of(&self, vaddr: u64, len: u64) -> Result<Region, TranslationError> {
        if len == 0 {
            return Err(TranslationError::ZeroLength { vaddr });
        }
        let regions = self.regions.load();
        let index = regions.partition_point(|region| region.vaddr <= vaddr);
        index
            .checked_sub(1)
            .map(|i| regions[i])
            .filter(|region| region.contains(vaddr))
            .ok_or(TranslationError::NotRegistered { vaddr })
    }

    /// Translates the first bytes of `[vaddr, vaddr + len)`: the IOVA of `vaddr` and how many
    /// bytes from it are contiguous (`min(len, region end - vaddr)`). Callers loop for the
    /// rest. Lock-free: one atomic load and a binary search.
    #[inline]
    pub fn translate(&self, vaddr: u64, len: u64) -> Result<Translation, TranslationError> {
        Ok(self.region_of(vaddr, len)?.translation(vaddr, len))
    }

    /// Translates all of `[vaddr, vaddr + len)`, one [`Translation`] per contiguous fragment,
    /// and fails on the first byte that is in no region.
    pub fn fragments(&self, vaddr: u64, len: u64) -> Fragments<'_> {
        Fragments {
            map: self,
            vaddr,
            len_left: len,
        }
    }

    /// Attaches `mapper` and maps every registered region through it right away, recording
    /// the IOVAs it returns. From now on regions are mapped as they are registered and
    /// unmapped as they are unregistered. On failure every region mapped so far is unmapped
    /// again and no mapper is attached.
    pub fn set_mapper(&self, mapper: Arc<dyn DmaMapper>) -> Result<(), TranslationError> {
        let mut attached = self.lock_writer();
        if attached.is_some() {
            return Err(TranslationError::MapperAlreadySet);
        }
        let current = self.regions.load_full();
        let mut next: Vec<Region> = Vec::with_capacity(current.len());
        for region in current.iter() {
            match map_region(mapper.as_ref(), region.vaddr, region.len) {
                Ok(iova) => next.push(Region { iova, ..*region }),
                Err(error) => {
                    for mapped in &next {
                        if let Err(undo_error) = unmap_region(mapper.as_ref(), *mapped) {
                            tracing::warn!(%undo_error, "memmap: rollback of set_mapper failed");
                        }
                    }
                    return Err(error);
                }
            }
        }
        self.publish(next);
        *attached = Some(mapper);
        tracing::debug!(regions = current.len(), "memmap: mapper attached");
        Ok(())
    }

    /// Unmaps every region from the attached mapper and detaches it; IOVAs revert to virtual
    /// addresses. The mapper is detached even if some unmaps fail; the first failure is
    /// returned and the others are logged. Without a mapper this does nothing.
    pub fn clear_mapper(&self) -> Result<(), TranslationError> {
        let mut attached = self.lock_writer();
        let Some(mapper) = attached.take() else {
            return Ok(());
        };
        let current = self.regions.load_full();
        let identity: Vec<Region> = current
            .iter()
            .map(|region| Region {
                iova: region.vaddr,
                ..*region
            })
            .collect();
        self.publish(identity);
        let mut first_error = None;
        for region in current.iter() {
            if let Err(error) = unmap_region(mapper.as_ref(), *region) {
                tracing::warn!(%error, "memmap: clear_mapper could not unmap a region");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether a mapper is attached.
    pub fn has_mapper(&self) -> bool {
        self.lock_writer().is_some()
    }

    /// A snapshot of the registered regions, sorted by virtual address (for diagnostics).
    pub fn regions(&self) -> Vec<Region> {
        self.regions.load().as_ref().clone()
    }
}

fn map_region(mapper: &dyn DmaMapper, vaddr: u64, len: u64) -> Result<u64, TranslationError> {
    let iova = mapper
        .map_dma(vaddr, len)
        .map_err(|source| TranslationError::MapFailed { vaddr, len, source })?;
    if iova.checked_add(len).is_none() {
        if let Err(error) = mapper.unmap_dma(iova, len) {
            tracing::warn!(%error, iova, len, "memmap: could not unmap an unusable IOVA");
        }
        return Err(TranslationError::MapperIovaOverflow { iova, len });
    }
    Ok(iova)
}

fn unmap_region(mapper: &dyn DmaMapper, region: Region) -> Result<(), TranslationError> {
    mapper
        .unmap_dma(region.iova, region.len)
        .map_err(|source| TranslationError::UnmapFailed {
            iova: region.iova,
            len: region.len,
            source,
        })
}

/// Iterator returned by [`MemMap::fragments`]. Stops after the first error.
pub struct Fragments<'a> {
    map: &'a MemMap,
    vaddr: u64,
    len_left: u64,
}

impl Iterator for Fragments<'_> {
    type Item = Result<Translation, TranslationError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.len_left == 0 {
            return None;
        }
        match self.map.translate(self.vaddr, self.len_left) {
            Ok(translation) => {
                // `translation.len` is at most `len_left` and ends inside a region, so the
                // addition cannot overflow.
                self.vaddr += translation.len;
                self.len_left -= translation.len;
                Some(Ok(translation))
            }
            Err(error) => {
                self.len_left = 0;
                Some(Err(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const MIB: u64 = 1 << 20;

    #[test]
    fn identity_without_mapper() {
        let map = MemMap::new();
        assert_eq!(map.register(0x10_0000, MIB).unwrap(), 0x10_0000);
        let t = map.translate(0x10_0040, 64).unwrap();
        assert_eq!(
            t,
            Translation {
                iova: 0x10_0040,
                len: 64
            }
        );
    }

    #[test]
    fn cached_translation_follows_every_change_of_the_map() {
        let map = MemMap::new();
        let mut cache = TranslationCache::default();
        assert!(matches!(
            map.translate_cached(&mut cache, 0x10_0000, 8),
            Err(TranslationError::NotRegistered { .. })
        ));
        map.register(0x10_0000, MIB).unwrap();
        let hit = map.translate_cached(&mut cache, 0x10_0040, 64).unwrap();
        assert_eq!(hit, map.translate(0x10_0040, 64).unwrap());
        // Clamped at the cached region's end, exactly like the uncached path.
        let tail = map
            .translate_cached(&mut cache, 0x10_0000 + MIB - 8, 64)
            .unwrap();
        assert_eq!(tail.len, 8);
        assert!(matches!(
            map.translate_cached(&mut cache, 0x10_0000, 0),
            Err(TranslationError::ZeroLength { .. })
        ));
        // Unregistering invalidates the cache: no stale IOVA for memory that is gone.
        map.unregister(0x10_0000, MIB).unwrap();
        assert!(map.translate_cached(&mut cache, 0x10_0040, 64).is_err());
        // A re-registration under a mapper with other IOVAs is seen at once.
        map.register(0x10_0000, MIB).unwrap();
        map.translate_cached(&mut cache, 0x10_0040, 64).unwrap();
        map.unregister(0x10_0000, MIB).unwrap();
        struct Offset;
        impl DmaMapper for Offset {
            fn map_dma(&self, vaddr: u64, _len: u64) -> Result<u64, std::io::Error> {
                Ok(vaddr + 0x1000_0000)
            }
            fn unmap_dma(&self, _iova: u64, _len: u64) -> Result<(), std::io::Error> {
                Ok(())
            }
        }
        map.set_mapper(Arc::new(Offset)).unwrap();
        map.register(0x10_0000, MIB).unwrap();
        let mapped = map.translate_cached(&mut cache, 0x10_0040, 64).unwrap();
        assert_eq!(mapped.iova, 0x1010_0040);
    }

    #[test]
    fn rejects_zero_length_and_overflow() {
        let map = MemMap::new();
        assert!(matches!(
            map.register(0x1000, 0),
            Err(TranslationError::ZeroLength { vaddr: 0x1000 })
        ));
        assert!(matches!(
            map.register(u64::MAX - 10, 11),
            Err(TranslationError::Overflow { .. })
        ));
        // Exactly up to the top of the address space is fine.
        map.register(u64::MAX - 10, 10).unwrap();
        assert!(matches!(
            map.translate(0x1000, 0),
            Err(TranslationError::ZeroLength { .. })
        ));
    }

    #[test]
    fn rejects_overlaps_of_every_shape() {
        let map = MemMap::new();
        let base = 0x100_0000;
        map.register(base, MIB).unwrap();
        map.register(base + 4 * MIB, MIB).unwrap();
        let shapes = [
            ("same range", base, MIB),
            ("inside", base + 0x1000, 0x1000),
            ("covers", base - 0x1000, MIB + 0x2000),
            ("tail overlaps head", base - 0x1000, 0x1001),
            ("head overlaps tail", base + MIB - 1, 0x1000),
            ("spans both", base + MIB / 2, 4 * MIB),
            ("same start longer", base, 2 * MIB),
            ("same end shorter", base + 0x1000, MIB - 0x1000),
            ("overlaps second only", base + 3 * MIB, MIB + 1),
        ];
        for (shape, vaddr, len) in shapes {
            match map.register(vaddr, len) {
                Err(TranslationError::Overlap {
                    existing_vaddr,
                    existing_end,
                    ..
                }) => {
                    assert!(
                        existing_vaddr < vaddr + len && vaddr < existing_end,
                        "{shape}"
                    );
                    let message = map.register(vaddr, len).unwrap_err().to_string();
                    assert!(
                        message.contains(&format!("{existing_vaddr:#x}")),
                        "{message}"
                    );
                    assert!(message.contains(&format!("{vaddr:#x}")), "{message}");
                }
                other => panic!("{shape}: expected an overlap, got {other:?}"),
            }
        }
        // Touching neighbours are not overlaps.
        map.register(base - 0x1000, 0x1000).unwrap();
        map.register(base + MIB, 3 * MIB).unwrap();
        assert_eq!(map.regions().len(), 4);
        let regions = map.regions();
        assert!(regions.windows(2).all(|w| w[0].end() <= w[1].vaddr));
    }

    #[test]
    fn unregister_must_match_exactly() {
        let map = MemMap::new();
        map.register(0x20_0000, MIB).unwrap();
        for (vaddr, len) in [
            (0x20_0000, MIB - 1),
            (0x20_0000, MIB + 1),
            (0x20_1000, MIB - 0x1000),
            (0x40_0000, MIB),
        ] {
            assert!(matches!(
                map.unregister(vaddr, len),
                Err(TranslationError::NotARegion { .. })
            ));
        }
        map.unregister(0x20_0000, MIB).unwrap();
        assert!(map.regions().is_empty());
        assert!(matches!(
            map.translate(0x20_0000, 1),
            Err(TranslationError::NotRegistered { vaddr: 0x20_0000 })
        ));
        // The range can be registered again.
        map.register(0x20_0000, MIB).unwrap();
    }

    #[test]
    fn misses_below_between_above_and_at_end() {
        let map = MemMap::new();
        map.register(0x10_0000, 0x1000).unwrap();
        map.register(0x30_0000, 0x1000).unwrap();
        for vaddr in [0, 0xf_ffff, 0x10_1000, 0x20_0000, 0x30_1000, u64::MAX] {
            match map.translate(vaddr, 1) {
                Err(TranslationError::NotRegistered { vaddr: missed }) => {
                    assert_eq!(missed, vaddr)
                }
                other => panic!("{vaddr:#x}: expected a miss, got {other:?}"),
            }
        }
        // Last byte of each region hits.
        assert_eq!(map.translate(0x10_0fff, 1).unwrap().iova, 0x10_0fff);
        assert_eq!(map.translate(0x30_0fff, 1).unwrap().iova, 0x30_0fff);
    }

    #[test]
    fn partial_translation_at_region_end() {
        let map = MemMap::new();
        map.register(0x10_0000, 0x1000).unwrap();
        map.register(0x10_1000, 0x1000).unwrap();
        let t = map.translate(0x10_0f00, 0x400).unwrap();
        assert_eq!(
            t,
            Translation {
                iova: 0x10_0f00,
                len: 0x100
            }
        );
        let fragments: Vec<_> = map
            .fragments(0x10_0f00, 0x400)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            fragments,
            vec![
                Translation {
                    iova: 0x10_0f00,
                    len: 0x100
                },
                Translation {
                    iova: 0x10_1000,
                    len: 0x300
                },
            ]
        );
        // A range running past the last region reports the miss after the good fragment.
        let mut fragments = map.fragments(0x10_1f00, 0x200);
        assert_eq!(fragments.next().unwrap().unwrap().len, 0x100);
        assert!(matches!(
            fragments.next(),
            Some(Err(TranslationError::NotRegistered { vaddr: 0x10_2000 }))
        ));
        assert!(fragments.next().is_none());
    }

    /// Test double: maps `vaddr` to `vaddr ^ XOR`, logs calls, can be told to fail.
    #[derive(Default)]
    struct XorMapper {
        calls: Mutex<Vec<(&'static str, u64, u64)>>,
        fail_map_after: Mutex<Option<usize>>,
        maps: AtomicUsize,
    }

    const XOR: u64 = 0xabc0_0000_0000;

    impl DmaMapper for XorMapper {
        fn map_dma(&self, vaddr: u64, len: u64) -> std::io::Result<u64> {
            let done = self.maps.fetch_add(1, Ordering::SeqCst);
            if let Some(limit) = *self.fail_map_after.lock().unwrap() {
                if done >= limit {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                }
            }
            self.calls.lock().unwrap().push(("map", vaddr, len));
            Ok(vaddr ^ XOR)
        }
        fn unmap_dma(&self, iova: u64, len: u64) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(("unmap", iova, len));
            Ok(())
        }
    }

    #[test]
    fn mapper_called_and_its_iova_used() {
        let map = MemMap::new();
        map.register(0x10_0000, MIB).unwrap();
        let mapper = Arc::new(XorMapper::default());
        map.set_mapper(mapper.clone()).unwrap();
        assert!(map.has_mapper());
        // Existing region mapped at once.
        assert_eq!(*mapper.calls.lock().unwrap(), vec![("map", 0x10_0000, MIB)]);
        assert_eq!(map.translate(0x10_0010, 1).unwrap().iova, 0x10_0010 ^ XOR);
        // New region mapped on registration.
        assert_eq!(map.register(0x40_0000, MIB).unwrap(), 0x40_0000 ^ XOR);
        assert_eq!(map.translate(0x40_0100, 8).unwrap().iova, 0x40_0100 ^ XOR);
        assert!(matches!(
            map.set_mapper(mapper.clone()),
            Err(TranslationError::MapperAlreadySet)
        ));
        // Unregistration unmaps at the recorded IOVA.
        map.unregister(0x40_0000, MIB).unwrap();
        assert_eq!(
            mapper.calls.lock().unwrap().last(),
            Some(&("unmap", 0x40_0000 ^ XOR, MIB))
        );
        // Clearing unmaps the rest and reverts to identity.
        map.clear_mapper().unwrap();
        assert!(!map.has_mapper());
        assert_eq!(
            mapper.calls.lock().unwrap().last(),
            Some(&("unmap", 0x10_0000 ^ XOR, MIB))
        );
        assert_eq!(map.translate(0x10_0010, 1).unwrap().iova, 0x10_0010);
    }

    #[test]
    fn failed_set_mapper_rolls_back() {
        let map = MemMap::new();
        map.register(0x10_0000, MIB).unwrap();
        map.register(0x30_0000, MIB).unwrap();
        let mapper = Arc::new(XorMapper::default());
        *mapper.fail_map_after.lock().unwrap() = Some(1);
        assert!(matches!(
            map.set_mapper(mapper.clone()),
            Err(TranslationError::MapFailed {
                vaddr: 0x30_0000,
                ..
            })
        ));
        assert!(!map.has_mapper());
        assert_eq!(
            *mapper.calls.lock().unwrap(),
            vec![("map", 0x10_0000, MIB), ("unmap", 0x10_0000 ^ XOR, MIB)]
        );
        assert_eq!(map.translate(0x30_0000, 1).unwrap().iova, 0x30_0000);
        // A failing map on register leaves the map unchanged.
        let failing = Arc::new(XorMapper::default());
        *failing.fail_map_after.lock().unwrap() = Some(2);
        map.set_mapper(failing).unwrap();
        assert!(matches!(
            map.register(0x50_0000, MIB),
            Err(TranslationError::MapFailed { .. })
        ));
        assert_eq!(map.regions().len(), 2);
    }

    /// Readers on another thread translate addresses of stable regions (and probe addresses
    /// of regions that come and go) while this thread registers and unregisters; every answer
    /// must be exactly right or, for the churned regions, a clean miss.
    #[test]
    fn concurrent_readers_never_see_a_wrong_answer() {
        let map = Arc::new(MemMap::new());
        let stable: Vec<u64> = (0..16).map(|i| 0x1000_0000 + i * 4 * MIB).collect();
        for &vaddr in &stable {
            map.register(vaddr, MIB).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        let reader = {
            let map = map.clone();
            let stop = stop.clone();
            let progress = progress.clone();
            let stable = stable.clone();
            std::thread::spawn(move || {
                let mut lookups = 0u64;
                let mut churn_hits = 0u64;
                let mut state = 0x9e37_79b9_7f4a_7c15u64;
                while !stop.load(Ordering::Relaxed) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let region = stable[(state % stable.len() as u64) as usize];
                    let offset = (state >> 8) % MIB;
                    let t = map.translate(region + offset, 4096).unwrap();
                    assert_eq!(t.iova, region + offset);
                    assert_eq!(t.len, 4096.min(MIB - offset));
                    // Churned regions sit in the gaps between stable ones.
                    let churn = region + 2 * MIB + offset;
                    match map.translate(churn, 1) {
                        Ok(t) => {
                            assert_eq!(t.iova, churn);
                            churn_hits += 1;
                        }
                        Err(TranslationError::NotRegistered { vaddr }) => assert_eq!(vaddr, churn),
                        Err(other) => panic!("unexpected {other}"),
                    }
                    lookups += 1;
                    progress.store(lookups as usize, Ordering::Relaxed);
                }
                (lookups, churn_hits)
            })
        };
        // Churn until the reader has overlapped with many writes (bounded in case it stalls).
        let mut round = 0u64;
        while round < 20_000 || (progress.load(Ordering::Relaxed) < 200_000 && round < 2_000_000) {
            round += 1;
            let vaddr = stable[(round % stable.len() as u64) as usize] + 2 * MIB;
            map.register(vaddr, MIB).unwrap();
            // Now and then leave the region registered across a yield, so the reader
            // sees hits on churned regions as well as misses.
            if round & 3 == 0 {
                std::thread::yield_now();
            }
            map.unregister(vaddr, MIB).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (lookups, _churn_hits) = reader.join().expect("reader panicked");
        assert!(lookups > 0);
        assert_eq!(map.regions().len(), stable.len());
    }

    #[test]
    fn global_is_one_map() {
        assert!(std::ptr::eq(MemMap::global(), MemMap::global()));
    }
}
