//! Pollux environment layer: everything that touches the host below the reactor.
//!
//! - [`cpumask`]: SPDK-style core masks (`0x3`, `[0,2-4]`).
//! - [`topology`]: cores, NUMA nodes of cores and PCI devices (hwloc, checked against sysfs).
//! - [`dma`]: DMA-able memory (hugepages or mlocked anonymous memory), aligned allocator.
//! - [`pool`]: fixed-size buffer pools with a per-thread cache.
//! - [`memmap`]: virtual address -> IOVA translation for registered regions.
//! - [`pci`] / [`vfio`]: PCI addresses, VFIO container/group/device, BAR mapping, DMA mapping.
//! - [`wake`]: non-blocking eventfd and periodic timerfd, the wake-up fds of interrupt mode.
//! - [`error_chain`]: an error and its causes on one line, as every layer reports them.

pub mod cpumask;
pub mod dma;
pub mod iovec;
pub mod memmap;
pub mod pci;
pub mod pool;
pub mod topology;
pub mod vfio;
pub mod wake;

/// `error` and each of its causes, joined by `": "` (the form the apps print on failure and the
/// RPC server puts in its error messages).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
