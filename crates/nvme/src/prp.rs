//! Data pointers built zero-copy from iovecs (NVMe Base 2.0, 4.1.1 PRPs and 4.1.8 SGLs).
//!
//! Every iovec is translated through env's [`MemMap`], one fragment per contiguous IOVA range
//! (a virtual range is never assumed contiguous). The fragments become:
//!
//! - **PRPs** when they follow the PRP rules: the first fragment may start anywhere (dword
//!   aligned), every later fragment starts on a page boundary, and every fragment but the last
//!   ends on one. One page entry per memory page touched: PRP1 is the first, PRP2 the second
//!   when there are exactly two, otherwise PRP2 points to a PRP list; a list page's last
//!   entry points to the next list page when the entries do not fit in one (4.1.1.1).
//! - **SGL data block descriptors** when the PRP rules are broken and the controller supports
//!   SGLs (Identify Controller SGLS): one descriptor inline in DPTR, or a Last Segment
//!   descriptor pointing to a descriptor list.
//! - Otherwise an error ([`NvmeError::NotPrpCompatible`]), on which the queue pair copies the
//!   data through one of its bounce buffers (`QueuePairOptions::bounce_buffers`, counted in
//!   `QpairStats::bounced`); it does the same for memory outside the translation map.
//!
//! List pages are the request's own preallocated area ([`ListArea`]), so nothing is allocated
//! per I/O.

use pollux_env::dma::DmaBuffer;
use pollux_env::memmap::{MemMap, TranslationCache};

use crate::error::NvmeError;
use crate::spec::{
    SglDescriptor, SGL_DESCRIPTOR_BYTES, SGL_TYPE_DATA_BLOCK, SGL_TYPE_LAST_SEGMENT,
};

/// One scatter-gather entry: env's, shared with the bdev layer (see [`pollux_env::iovec`]).
/// The address is translated to IOVAs when a command is built; the memory must be registered
/// in the controller's [`MemMap`] (DMA memory, pool buffers) or it goes through a bounce buffer.
pub use pollux_env::iovec::IoVec;

/// The data pointer of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointer {
    /// PRP1 and PRP2 (0 when unused).
    Prp { prp1: u64, prp2: u64 },
    /// One SGL descriptor in DPTR (a data block, or a Last Segment pointing to a list).
    Sgl(SglDescriptor),
}

impl DataPointer {
    #[inline(always)]
    pub fn dptr(&self) -> [u64; 2] {
        match self {
            DataPointer::Prp { prp1, prp2 } => [*prp1, *prp2],
            DataPointer::Sgl(descriptor) => descriptor.to_dptr(),
        }
    }

    pub fn is_sgl(&self) -> bool {
        matches!(self, DataPointer::Sgl(_))
    }
}

/// A request's preallocated list pages: `pages` pages of `page_size_bytes` at `offset` of
/// `buffer`, contiguous in IOVA space from `iova`.
pub struct ListArea<'a> {
    pub buffer: &'a mut DmaBuffer,
    pub offset: usize,
    pub iova: u64,
    pub pages: usize,
    pub page_size_bytes: u64,
}

impl ListArea<'_> {
    fn write_u64(&mut self, index: usize, value: u64) -> Result<(), NvmeError> {
        self.buffer
            .write_at(self.offset + index * 8, &value.to_le_bytes())
            .map_err(NvmeError::dma("PRP list"))
    }

    fn entries_per_page(&self) -> usize {
        (self.page_size_bytes / 8) as usize
    }
}

/// Why fragments break the PRP rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrpBreak {
    Rule(&'static str),
}

/// Builds the data pointer for `iovs` (whose lengths add up to `len_bytes`), PRPs first, an
/// SGL when `sgl_supported` and the PRP rules are broken. Returns the pointer and whether it
/// used a list page.
pub fn build(
    memmap: &MemMap,
    iovs: &[IoVec],
    len_bytes: u64,
    sgl_supported: bool,
    area: &mut ListArea<'_>,
) -> Result<DataPointer, NvmeError> {
    let mut cache = TranslationCache::default();
    build_cached(memmap, &mut cache, iovs, len_bytes, sgl_supported, area)
}

/// [`build`] with the caller's translation cache (a queue pair keeps one): the common case
/// of one iovec in the region last used translates without touching the map's snapshot.
#[inline]
pub fn build_cached(
    memmap: &MemMap,
    cache: &mut TranslationCache,
    iovs: &[IoVec],
    len_bytes: u64,
    sgl_supported: bool,
    area: &mut ListArea<'_>,
) -> Result<DataPointer, NvmeError> {
    // The I/O path's common case first: one iovec covering the transfer, one translation,
    // no list page, no length-sum loop.
    if let [iov] = iovs {
        if iov.len_bytes() as u64 == len_bytes && len_bytes != 0 {
            if let Some([prp1, prp2]) = single_iovec_prp(memmap, cache, iov, area.page_size_bytes) {
                return Ok(DataPointer::Prp { prp1, prp2 });
            }
        }
    }
    let mut sum = 0u64;
    for iov in iovs {
        if iov.len_bytes() == 0 {
            return Err(NvmeError::InvalidRequest {
                reason: "empty iovec",
            });
        }
        sum = sum.saturating_add(iov.len_bytes() as u64);
    }
    if sum != len_bytes || len_bytes == 0 {
        return Err(NvmeError::InvalidRequest {
            reason: "iovec lengths do not add up to the transfer length",
        });
    }
    match build_prp(memmap, iovs, area)? {
        Ok(pointer) => Ok(pointer),
        Err(PrpBreak::Rule(reason)) if sgl_supported => {
            tracing::trace!(reason, "nvme: PRP rules broken, using an SGL");
            build_sgl(memmap, iovs, area)
        }
        Err(PrpBreak::Rule(reason)) => Err(NvmeError::NotPrpCompatible { reason }),
    }
}

/// The common case on the I/O path: one iovec, contiguous in IOVA space, dword aligned and
/// touching at most two pages, needs one translation and no list page: PRP1, and PRP2 for the
/// second page (0 without one). Anything else (or a translation error, reported by the
/// general path) is `None` and goes through [`build_prp`]. `page_size_bytes` is a power of
/// two.
#[inline(always)]
pub(crate) fn single_iovec_prp(
    memmap: &MemMap,
    cache: &mut TranslationCache,
    iov: &IoVec,
    page_size_bytes: u64,
) -> Option<[u64; 2]> {
    let len = iov.len_bytes() as u64;
    let translation = memmap.translate_cached(cache, iov.addr(), len).ok()?;
    // Where the range ends, counted from the start of its first page: the offset in the page
    // is below a page, and `len` is a buffer's length, so this cannot overflow.
    let reach = (translation.iova & (page_size_bytes - 1)) + len;
    // One region holds the whole range (so it is contiguous in IOVA space), dword aligned,
    // within two pages.
    if translation.len != len || translation.iova & 3 != 0 || reach > 2 * page_size_bytes {
        return None;
    }
    let prp2 = if reach <= page_size_bytes {
        0
    } else {
        // The second page (a region that ended past the address space would wrap).
        (translation.iova | (page_size_bytes - 1)).checked_add(1)?
    };
    Some([translation.iova, prp2])
}

/// Streams PRP entries into the list area, chaining list pages as needed.
struct PrpWriter<'a, 'b> {
    area: &'a mut ListArea<'b>,
    count: usize,
    prp1: u64,
    prp2: u64,
    page: usize,
    slot: usize,
    /// An entry destined for a page's last slot, held until we know whether that slot must
    /// instead chain to the next page.
    held: Option<u64>,
}

impl PrpWriter<'_, '_> {
    fn push(&mut self, entry: u64) -> Result<(), NvmeError> {
        self.count += 1;
        if self.count == 1 {
            self.prp1 = entry;
            return Ok(());
        }
        if self.count == 2 {
            self.prp2 = entry;
        }
        let per_page = self.area.entries_per_page();
        if let Some(held) = self.held.take() {
            // More entries follow the page's last one: that slot chains to the next page.
            if self.page + 1 >= self.area.pages {
                return Err(NvmeError::TooManyDescriptors {
                    len_bytes: 0,
                    max_entries: self.area.pages * (per_page - 1) + 1,
                });
            }
            let next_iova = self.area.iova + (self.page as u64 + 1) * self.area.page_size_bytes;
            self.area
                .write_u64(self.page * per_page + per_page - 1, next_iova)?;
            self.page += 1;
            self.area.write_u64(self.page * per_page, held)?;
            self.slot = 1;
        }
        if self.slot == per_page - 1 {
            self.held = Some(entry);
            return Ok(());
        }
        self.area
            .write_u64(self.page * per_page + self.slot, entry)?;
        self.slot += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<DataPointer, NvmeError> {
        let per_page = self.area.entries_per_page();
        if let Some(held) = self.held.take() {
            self.area
                .write_u64(self.page * per_page + per_page - 1, held)?;
        }
        let prp2 = match self.count {
            0 | 1 => 0,
            2 => self.prp2,
            _ => self.area.iova,
        };
        Ok(DataPointer::Prp {
            prp1: self.prp1,
            prp2,
        })
    }
}

fn build_prp(
    memmap: &MemMap,
    iovs: &[IoVec],
    area: &mut ListArea<'_>,
) -> Result<Result<DataPointer, PrpBreak>, NvmeError> {
    let page = area.page_size_bytes;
    let mut writer = PrpWriter {
        area,
        count: 0,
        prp1: 0,
        prp2: 0,
        page: 0,
        slot: 0,
        held: None,
    };
    let mut first = true;
    let mut previous_end_aligned = true;
    for iov in iovs {
        for fragment in memmap.fragments(iov.addr(), iov.len_bytes() as u64) {
            let fragment = fragment.map_err(|source| NvmeError::Translation {
                vaddr: iov.addr(),
                len_bytes: iov.len_bytes() as u64,
                source,
            })?;
            if first {
                if fragment.iova & 3 != 0 {
                    return Ok(Err(PrpBreak::Rule("first entry not dword aligned")));
                }
            } else {
                if !previous_end_aligned {
                    return Ok(Err(PrpBreak::Rule(
                        "a fragment before the last ends inside a page",
                    )));
                }
                if fragment.iova % page != 0 {
                    return Ok(Err(PrpBreak::Rule(
                        "a fragment after the first starts inside a page",
                    )));
                }
            }
            first = false;
            let end = fragment
                .iova
                .checked_add(fragment.len)
                .ok_or(NvmeError::InvalidRequest {
                    reason: "IOVA range overflows",
                })?;
            previous_end_aligned = end % page == 0;
            writer.push(fragment.iova)?;
            let mut boundary = fragment.iova - fragment.iova % page + page;
            while boundary < end {
                writer.push(boundary)?;
                boundary += page;
            }
        }
    }
    writer.finish().map(Ok)
}

fn build_sgl(
    memmap: &MemMap,
    iovs: &[IoVec],
    area: &mut ListArea<'_>,
) -> Result<DataPointer, NvmeError> {
    let max_descriptors = area.pages * (area.page_size_bytes as usize / SGL_DESCRIPTOR_BYTES);
    let mut count = 0usize;
    let mut only: Option<SglDescriptor> = None;
    for iov in iovs {
        for fragment in memmap.fragments(iov.addr(), iov.len_bytes() as u64) {
            let fragment = fragment.map_err(|source| NvmeError::Translation {
                vaddr: iov.addr(),
                len_bytes: iov.len_bytes() as u64,
                source,
            })?;
            let length = u32::try_from(fragment.len).map_err(|_| NvmeError::InvalidRequest {
                reason: "SGL fragment longer than 4 GiB",
            })?;
            let descriptor = SglDescriptor {
                address: fragment.iova,
                length,
                descriptor_type: SGL_TYPE_DATA_BLOCK,
            };
            if count >= max_descriptors {
                return Err(NvmeError::TooManyDescriptors {
                    len_bytes: 0,
                    max_entries: max_descriptors,
                });
            }
            area.buffer
                .write_at(
                    area.offset + count * SGL_DESCRIPTOR_BYTES,
                    &descriptor.encode(),
                )
                .map_err(NvmeError::dma("SGL list"))?;
            if count == 0 {
                only = Some(descriptor);
            }
            count += 1;
        }
    }
    match (count, only) {
        (1, Some(descriptor)) => Ok(DataPointer::Sgl(descriptor)),
        _ => Ok(DataPointer::Sgl(SglDescriptor {
            address: area.iova,
            length: (count * SGL_DESCRIPTOR_BYTES) as u32,
            descriptor_type: SGL_TYPE_LAST_SEGMENT,
        })),
    }
}
