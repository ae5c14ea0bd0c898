//! The null bdev, as SPDK's `module/bdev/null`: every I/O succeeds and no data moves, so a
//! benchmark against it measures the stack's own cost. Reads leave the buffers as they were.
//!
//! Supported, as in SPDK: read, write, write zeroes, reset (flush and unmap are not).
//! Completion: queued in the channel's completion queue inside `submit` and handed to the
//! submitter by its next poll, never inside the submit call (STYLE #6).
//!
//! Interrupt mode: see [`crate::module::SyncWake`] (an eventfd signalled when the completion
//! queue goes from empty to non-empty).

use std::sync::Arc;

use crate::config::{CreateContext, Params, PendingBdev};
use crate::error::BdevError;
use crate::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest, SyncWake};
use crate::types::{BdevInfo, BdevSpec, IoStatus, IoType, Uuid};
use crate::BdevRegistry;

/// The configuration method.
pub const METHOD: &str = "bdev_null_create";

/// What a null bdev is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NullOptions {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    pub block_size_bytes: u32,
    /// Not an SPDK parameter (its null bdev requires none); here so that tests can check
    /// the bdev layer's alignment checks. 1 from a config file.
    pub required_alignment_bytes: u32,
}

struct NullBackend;

impl BdevBackend for NullBackend {
    fn module_name(&self) -> &'static str {
        "null"
    }

    fn supports(&self, io_type: IoType) -> bool {
        matches!(
            io_type,
            IoType::Read | IoType::Write | IoType::WriteZeroes | IoType::Reset
        )
    }

    fn create_channel(&self, _queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(NullChannel {
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

struct NullChannel {
    wake: SyncWake,
}

impl BackendChannel for NullChannel {
    #[inline]
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        self.wake.complete(done, io.slot, IoStatus::Success);
    }

    fn interrupt_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.wake.fd()
    }
}

/// Creates and registers a null bdev.
pub fn create(registry: &BdevRegistry, options: NullOptions) -> Result<BdevInfo, BdevError> {
    registry.register(
        BdevSpec {
            name: options.name,
            aliases: Vec::new(),
            uuid: options.uuid,
            block_size_bytes: options.block_size_bytes,
            num_blocks: options.num_blocks,
            required_alignment_bytes: options.required_alignment_bytes,
            write_cache: false,
        },
        Arc::new(NullBackend),
    )
}

const PARAMS: &[&str] = &[
    "name",
    "uuid",
    "num_blocks",
    "block_size",
    "md_size",
    "dif_type",
    "dif_is_head_of_md",
    "physical_block_size",
    "md_interleave",
    "dif_pi_format",
];

/// Parses `bdev_null_create`'s parameters (SPDK's names: `name` and `num_blocks` and
/// `block_size` required, `uuid` optional; metadata and DIF only at their defaults).
pub fn parse(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    params.allow_only(PARAMS)?;
    params.refuse_metadata()?;
    let options = NullOptions {
        name: params.required_str("name")?.to_string(),
        uuid: params.uuid("uuid")?,
        num_blocks: params.required_u64("num_blocks")?,
        block_size_bytes: params.required_block_size("block_size")?,
        required_alignment_bytes: 1,
    };
    if options.num_blocks == 0 {
        return Err(params.invalid("num_blocks", "must be greater than 0"));
    }
    Ok(Box::new(options))
}

impl PendingBdev for NullOptions {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        create(ctx.registry, *self)
    }
}
