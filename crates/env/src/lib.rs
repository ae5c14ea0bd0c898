//! Pollux environment layer: everything that touches the host below the reactor.
//!
//! - [`cpumask`]: SPDK-style core masks (`0x3`, `[0,2-4]`).
//! - [`topology`]: cores, NUMA nodes of cores and PCI devices (hwloc, checked against sysfs).
//! - [`dma`]: DMA-able memory (hugepages or mlocked anonymous memory), aligned allocator.
//! - [`pool`]: fixed-size buffer pools with a per-thread cache.
//! - [`memmap`]: virtual address -> IOVA translation for registered regions.
//! - [`pci`] / [`vfio`]: PCI addresses, VFIO container/group/device, BAR mapping, DMA mapping.

pub mod cpumask;
pub mod dma;
pub mod memmap;
pub mod pci;
pub mod pool;
pub mod topology;
pub mod vfio;
