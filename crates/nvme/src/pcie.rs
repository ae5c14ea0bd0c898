//! A controller's registers on a real PCIe device: env's VFIO device and its BAR 0, owned
//! together.
//!
//! env's [`Bar`] borrows the [`VfioPciDevice`] it was mapped from (`Bar<'device>`), which a
//! long-lived controller (shared by every queue pair through an `Arc`) cannot hold next to
//! the device without a self-referencing struct. [`PcieRegisters`] owns both and keeps the
//! BAR with its lifetime erased; see the `SAFETY` note in [`PcieRegisters::open`].

use pollux_env::pci::PciAddress;
use pollux_env::vfio::{Bar, VfioContainer, VfioError, VfioPciDevice};
use std::sync::Arc;

use crate::error::NvmeError;
use crate::regs::Registers;

/// BAR 0 of an NVMe controller bound to `vfio-pci`, with the device it belongs to.
pub struct PcieRegisters {
    // Field order is drop order: the BAR is unmapped before the device (and its fd) closes.
    bar: Bar<'static>,
    device: VfioPciDevice,
}

impl std::fmt::Debug for PcieRegisters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcieRegisters")
            .field("address", &self.device.address())
            .field("bar_len", &self.bar.len())
            .finish()
    }
}

impl PcieRegisters {
    /// Opens `address` in the process-wide VFIO container, enables memory decoding and bus
    /// mastering, and maps BAR 0 (the NVMe register space, NVMe over PCIe 1.0, 3.1).
    pub fn open(address: &PciAddress) -> Result<Self, VfioError> {
        let device = VfioPciDevice::open(address)?;
        device.enable_bus_master()?;
        let bar = device.map_bar(0)?;
        // SAFETY: `Bar<'device>` only records that the mapping must not outlive the device
        // (it holds a pointer to the mmap'ed region and a `PhantomData`, no pointer into the
        // `VfioPciDevice` value), so moving the device into the struct below is fine. The
        // struct keeps the device for as long as the BAR exists (the `bar` field is declared
        // first, so it is dropped, and unmapped, before `device`), and the `'static` BAR is
        // private: only borrowed through `&self` by the `Registers` methods, never handed out.
        let bar = unsafe { std::mem::transmute::<Bar<'_>, Bar<'static>>(bar) };
        Ok(Self { bar, device })
    }

    pub fn address(&self) -> PciAddress {
        self.device.address()
    }

    /// The container (the DMA mapper) the device DMAs through.
    pub fn container(&self) -> &Arc<VfioContainer> {
        self.device.container()
    }
}

impl Registers for PcieRegisters {
    #[inline]
    fn read32(&self, offset: u64) -> Result<u32, NvmeError> {
        Registers::read32(&self.bar, offset)
    }

    #[inline]
    fn read64(&self, offset: u64) -> Result<u64, NvmeError> {
        Registers::read64(&self.bar, offset)
    }

    #[inline]
    fn write32(&self, offset: u64, value: u32) -> Result<(), NvmeError> {
        Registers::write32(&self.bar, offset, value)
    }

    #[inline]
    fn write64(&self, offset: u64, value: u64) -> Result<(), NvmeError> {
        Registers::write64(&self.bar, offset, value)
    }
}
