//! Virtual address -> IOVA translation for registered regions.
//! (Skeleton: the interface other modules code against; implementation in progress.)

/// Maps and unmaps DMA for a device's IOMMU as regions come and go (a VFIO container).
/// The mapper chooses the IOVA: the virtual address itself where the IOMMU's usable
/// ranges hold it (as SPDK does in VFIO mode), an allocated one otherwise.
pub trait DmaMapper: Send + Sync {
    /// Makes `[vaddr, vaddr + len)` reachable by the device and returns the IOVA of `vaddr`.
    fn map_dma(&self, vaddr: u64, len: u64) -> std::io::Result<u64>;
    /// Undoes one earlier `map_dma` of exactly `len` bytes at `iova`.
    fn unmap_dma(&self, iova: u64, len: u64) -> std::io::Result<()>;
}
