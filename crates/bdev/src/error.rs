//! The bdev layer's one error type. I/O failures are not errors of this type: they complete
//! with an [`IoStatus`](crate::IoStatus); these are setup-path failures (register, open,
//! claim, configuration) plus the one hot-path refusal, [`BdevError::QueueFull`].

use std::path::PathBuf;

/// A module's own error, kept whole as the `#[source]` of the variant that carries it across
/// into the bdev layer: its text is in the chain, and callers that know the module can
/// `downcast_ref` it back (`FileBdevError` for aio and uring).
pub type ModuleError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("bdev name {name:?} is already used by bdev {existing:?}")]
    NameTaken { name: String, existing: String },
    #[error("bdev name must not be empty")]
    EmptyName,
    #[error("bdev {name:?}: block size {block_size_bytes} must be a power of two from 512 to 65536 bytes")]
    BadBlockSize { name: String, block_size_bytes: u32 },
    #[error("bdev {name:?}: num_blocks must be greater than 0")]
    ZeroBlocks { name: String },
    #[error("bdev {name:?}: required alignment {align_bytes} is not a power of two")]
    BadAlignment { name: String, align_bytes: u32 },
    #[error(
        "bdev {name:?}: {num_blocks} blocks of {block_size_bytes} bytes overflow the address space"
    )]
    TooLarge {
        name: String,
        num_blocks: u64,
        block_size_bytes: u32,
    },
    #[error("no bdev named {name:?}")]
    NotFound { name: String },
    #[error("bdev {bdev:?} is claimed for exclusive write by {owner:?}")]
    Claimed { bdev: String, owner: String },
    #[error("bdev {bdev:?}: an exclusive write claim needs a descriptor opened read-write")]
    ClaimNeedsWrite { bdev: String },
    #[error(
        "bdev {bdev:?}: cannot claim for {owner:?}: {writers} other descriptor(s) open for write"
    )]
    OtherWriters {
        bdev: String,
        owner: String,
        writers: usize,
    },
    #[error("bdev {bdev:?} was removed")]
    Removed { bdev: String },
    #[error("bdev {bdev:?}: channel queue depth must be 1 to {max}, got {queue_depth}")]
    BadQueueDepth {
        bdev: String,
        queue_depth: u32,
        max: u32,
    },
    #[error("bdev channel full: all {queue_depth} request slots are in flight; poll for completions and retry")]
    QueueFull { queue_depth: u32 },
    #[error("module {module:?} could not create a channel for bdev {bdev:?}")]
    ChannelCreate {
        module: &'static str,
        bdev: String,
        #[source]
        source: ModuleError,
    },
    #[error("malloc bdev {name:?}: could not allocate {len_bytes} bytes of DMA memory")]
    MallocAlloc {
        name: String,
        len_bytes: u64,
        #[source]
        source: pollux_env::dma::DmaError,
    },
    #[error("{method}: no DMA memory was given to create bdevs from")]
    NoDmaMemory { method: String },

    // Configuration (`-c file.json`, SPDK's format).
    #[error("cannot read config file {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: not valid JSON")]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config {path}: {reason}")]
    ConfigShape { path: PathBuf, reason: String },
    #[error(
        "config: unknown method {method:?} (entry {index} of the bdev subsystem); known: {known}"
    )]
    UnknownMethod {
        method: String,
        index: usize,
        known: String,
    },
    #[error("config method table: method {method:?} is registered twice")]
    MethodTaken { method: String },
    #[error("{method}: missing required parameter {param:?}")]
    MissingParam { method: String, param: &'static str },
    #[error("{method}: parameter {param:?} must be {expected}")]
    WrongType {
        method: String,
        param: String,
        expected: &'static str,
    },
    #[error("{method}: unknown parameter {param:?}")]
    UnknownParam { method: String, param: String },
    /// A parameter refused: by its parser (`source: None`, `reason` says why) or by the
    /// module when it creates the bdev (`source`: the module's error).
    #[error("{method}: parameter {param:?} {reason}")]
    InvalidParam {
        method: String,
        param: &'static str,
        reason: String,
        #[source]
        source: Option<ModuleError>,
    },
    #[error("{method}: bdev name {name:?} is already taken{where_}")]
    DuplicateName {
        method: String,
        name: String,
        where_: &'static str,
    },
    #[error("{method}: creating bdev {name:?} failed (bdevs created before it were deleted)")]
    Create {
        method: String,
        name: String,
        #[source]
        source: Box<BdevError>,
    },
}
