//! Register access: what the driver needs from a BAR, so that the same driver runs against a
//! real controller (env's VFIO [`Bar`]) and the software model.

use pollux_env::vfio::Bar;

use crate::error::NvmeError;

/// 32- and 64-bit register accesses at byte offsets of the controller's register space.
/// Implementations check bounds and alignment and return an error instead of touching memory
/// outside the registers. `Send + Sync`: queue pairs on several threads ring their own
/// doorbells through one shared implementation.
pub trait Registers: Send + Sync {
    fn read32(&self, offset: u64) -> Result<u32, NvmeError>;
    fn read64(&self, offset: u64) -> Result<u64, NvmeError>;
    fn write32(&self, offset: u64, value: u32) -> Result<(), NvmeError>;
    fn write64(&self, offset: u64, value: u64) -> Result<(), NvmeError>;
}

impl Registers for Bar<'_> {
    fn read32(&self, offset: u64) -> Result<u32, NvmeError> {
        Bar::read32(self, offset).map_err(|source| NvmeError::Register { offset, source })
    }

    fn read64(&self, offset: u64) -> Result<u64, NvmeError> {
        Bar::read64(self, offset).map_err(|source| NvmeError::Register { offset, source })
    }

    fn write32(&self, offset: u64, value: u32) -> Result<(), NvmeError> {
        Bar::write32(self, offset, value).map_err(|source| NvmeError::Register { offset, source })
    }

    fn write64(&self, offset: u64, value: u64) -> Result<(), NvmeError> {
        Bar::write64(self, offset, value).map_err(|source| NvmeError::Register { offset, source })
    }
}
