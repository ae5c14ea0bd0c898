//! The malloc bdev, as SPDK's `module/bdev/malloc`: a RAM disk in env's DMA memory, zeroed
//! at creation. Every I/O type is supported; data is copied synchronously inside `submit`
//! and the completion queued for the submitter's next poll (STYLE #6).
//!
//! The copies are the crate's only data-moving `unsafe` code: the disk side is bounds-checked
//! here against the disk's own size (besides the bdev layer's range check), the caller side
//! is covered by [`IoVec::new`](crate::IoVec::new)'s contract.

use std::sync::Arc;

use pollux_env::dma::{DmaBuffer, DmaMemory};

use crate::bdev::validate_spec;
use crate::config::{CreateContext, Params, PendingBdev};
use crate::error::BdevError;
use crate::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest, SyncWake};
use crate::types::{BdevInfo, BdevSpec, IoStatus, IoType, IoVec, Uuid};
use crate::BdevRegistry;

/// The configuration method.
pub const METHOD: &str = "bdev_malloc_create";

/// Alignment of the disk's memory (one 4 KiB page).
const DISK_ALIGN_BYTES: usize = 4096;

/// What a malloc bdev is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MallocOptions {
    /// `None`: `Malloc<N>`, the first free one, as SPDK.
    pub name: Option<String>,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    /// 512 or 4096 typically; any power of two from 512 to 65536.
    pub block_size_bytes: u32,
}

impl MallocOptions {
    /// A bdev of `size_mib` MiB in blocks of `block_size_bytes`.
    pub fn from_size_mib(name: Option<String>, size_mib: u64, block_size_bytes: u32) -> Self {
        let num_blocks = size_mib.saturating_mul(1 << 20) / u64::from(block_size_bytes.max(1));
        Self {
            name,
            uuid: None,
            num_blocks,
            block_size_bytes,
        }
    }
}

/// The disk: shared by the backend and every channel, freed with the last of them.
struct MallocDisk {
    memory: DmaBuffer,
    len_bytes: usize,
    block_size_bytes: u32,
}

impl MallocDisk {
    /// Copies between the disk at `disk_offset` and the iovecs (`to_disk`: a write).
    fn copy(&self, disk_offset: usize, iovs: &[IoVec], to_disk: bool) -> IoStatus {
        let total: usize = iovs.iter().map(IoVec::len_bytes).sum();
        if disk_offset
            .checked_add(total)
            .is_none_or(|end| end > self.len_bytes)
        {
            return IoStatus::OutOfRange;
        }
        let base = self.memory.vaddr() as *mut u8;
        let mut offset = disk_offset;
        for iov in iovs {
            let len = iov.len_bytes();
            // SAFETY: `[offset, offset + len)` lies inside the disk (the sum of the iovecs was
            // checked against its length above), which this `MallocDisk` owns and keeps
            // mapped. The iovec's memory is valid and not used by anyone else until this I/O
            // completes (`IoVec::new`'s contract), and it cannot overlap the disk, which is
            // handed to nobody. Two channels copying the same blocks at once is the caller's
            // race, as on any disk; it cannot reach outside either range.
            unsafe {
                let disk = base.add(offset);
                if to_disk {
                    std::ptr::copy_nonoverlapping(iov.as_mut_ptr().cast_const(), disk, len);
                } else {
                    std::ptr::copy_nonoverlapping(disk.cast_const(), iov.as_mut_ptr(), len);
                }
            }
            offset += len;
        }
        IoStatus::Success
    }

    fn zero(&self, disk_offset: usize, len_bytes: usize) -> IoStatus {
        if disk_offset
            .checked_add(len_bytes)
            .is_none_or(|end| end > self.len_bytes)
        {
            return IoStatus::OutOfRange;
        }
        // SAFETY: the range lies inside the disk (checked above), owned by this
        // `MallocDisk` and handed to nobody.
        unsafe {
            std::ptr::write_bytes(
                (self.memory.vaddr() as *mut u8).add(disk_offset),
                0,
                len_bytes,
            )
        };
        IoStatus::Success
    }
}

struct MallocBackend {
    disk: Arc<MallocDisk>,
}

impl BdevBackend for MallocBackend {
    fn module_name(&self) -> &'static str {
        "malloc"
    }

    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, _queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            disk: self.disk.clone(),
            wake: SyncWake::default(),
        }))
    }

    fn write_config(&self, info: &BdevInfo) -> serde_json::Value {
        serde_json::json!({
            "method": METHOD,
            "params": {
                "name": info.name,
                "uuid": info.uuid.to_string(),
                "num_blocks": info.num_blocks,
                "block_size": info.block_size_bytes,
            }
        })
    }
}

struct MallocChannel {
    disk: Arc<MallocDisk>,
    /// Interrupt mode: see [`SyncWake`].
    wake: SyncWake,
}

impl BackendChannel for MallocChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        let block_size = u64::from(self.disk.block_size_bytes);
        let to_bytes = |blocks: u64| usize::try_from(blocks.saturating_mul(block_size)).ok();
        let (Some(offset), Some(len)) = (to_bytes(io.offset_blocks), to_bytes(io.num_blocks))
        else {
            self.wake.complete(done, io.slot, IoStatus::OutOfRange);
            return;
        };
        let status = match io.io_type {
            IoType::Read => self.disk.copy(offset, io.iovs, false),
            IoType::Write => self.disk.copy(offset, io.iovs, true),
            IoType::Unmap | IoType::WriteZeroes => self.disk.zero(offset, len),
            // RAM has no volatile cache to flush and nothing queued to reset.
            IoType::Flush | IoType::Reset => IoStatus::Success,
        };
        self.wake.complete(done, io.slot, status);
    }

    fn interrupt_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.wake.fd()
    }
}

/// Creates and registers a malloc bdev from `dma`.
pub fn create(
    registry: &BdevRegistry,
    dma: &Arc<DmaMemory>,
    options: MallocOptions,
) -> Result<BdevInfo, BdevError> {
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| registry.unique_name("Malloc"));
    let len_bytes = options
        .num_blocks
        .checked_mul(u64::from(options.block_size_bytes))
        .ok_or_else(|| BdevError::TooLarge {
            name: name.clone(),
            num_blocks: options.num_blocks,
            block_size_bytes: options.block_size_bytes,
        })?;
    let spec = BdevSpec {
        name: name.clone(),
        aliases: Vec::new(),
        uuid: options.uuid,
        block_size_bytes: options.block_size_bytes,
        num_blocks: options.num_blocks,
        required_alignment_bytes: 1,
        write_cache: true,
    };
    if registry.contains(&name) {
        return Err(BdevError::NameTaken {
            existing: name.clone(),
            name,
        });
    }
    let alloc_error = |source| BdevError::MallocAlloc {
        name: name.clone(),
        len_bytes,
        source,
    };
    let len = usize::try_from(len_bytes).map_err(|_| BdevError::TooLarge {
        name: name.clone(),
        num_blocks: options.num_blocks,
        block_size_bytes: options.block_size_bytes,
    })?;
    // Refuse a bad geometry or a taken name before allocating anything.
    validate_spec(&spec)?;
    let mut memory = dma
        .alloc(len, DISK_ALIGN_BYTES, None)
        .map_err(alloc_error)?;
    memory.fill(0, len, 0).map_err(alloc_error)?;
    let disk = Arc::new(MallocDisk {
        memory,
        len_bytes: len,
        block_size_bytes: options.block_size_bytes,
    });
    registry.register(spec, Arc::new(MallocBackend { disk }))
}

const PARAMS: &[&str] = &[
    "name",
    "uuid",
    "num_blocks",
    "block_size",
    "optimal_io_boundary",
    "md_size",
    "md_interleave",
    "dif_type",
    "dif_is_head_of_md",
    "dif_pi_format",
    "physical_block_size",
];

/// Parses `bdev_malloc_create`'s parameters (SPDK's names: `num_blocks` and `block_size`
/// required; `name` optional, `Malloc<N>` by default; `uuid` optional;
/// `optimal_io_boundary` and `physical_block_size` accepted and ignored; metadata and DIF
/// only at their defaults).
pub fn parse(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    params.allow_only(PARAMS)?;
    params.refuse_metadata()?;
    params.u64("optimal_io_boundary")?;
    params.u64("physical_block_size")?;
    let options = MallocOptions {
        name: params.str("name")?.map(str::to_string),
        uuid: params.uuid("uuid")?,
        num_blocks: params.required_u64("num_blocks")?,
        block_size_bytes: params.required_block_size("block_size")?,
    };
    if options.num_blocks == 0 {
        return Err(params.invalid("num_blocks", "must be greater than 0"));
    }
    if options
        .num_blocks
        .checked_mul(u64::from(options.block_size_bytes))
        .is_none_or(|bytes| usize::try_from(bytes).is_err())
    {
        return Err(params.invalid("num_blocks", "times block_size overflows the address space"));
    }
    Ok(Box::new(options))
}

impl PendingBdev for MallocOptions {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        let dma = ctx.dma.ok_or_else(|| BdevError::NoDmaMemory {
            method: METHOD.to_string(),
        })?;
        create(ctx.registry, dma, *self)
    }
}
