//! The crate's one error enum.

/// Why a ublk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error(
        "{path} does not exist: ublk_drv is not loaded: modprobe ublk_drv (Linux 6.0+ with CONFIG_BLK_DEV_UBLK)"
    )]
    NoDriver { path: String },
    #[error("opening {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no ublk target: call ublk_create_target first")]
    NoTarget,
    #[error("the ublk target already exists")]
    TargetExists,
    #[error("ublk target: cpumask {mask} selects no core of the app's mask {app_mask}")]
    Cpumask { mask: String, app_mask: String },
    #[error("ublk target: creating reactor thread {name}")]
    Thread {
        name: String,
        #[source]
        source: Box<pollux_reactor::ReactorError>,
    },
    #[error("ublk {ublk_id}: queue_depth must be 1..={max}, got {queue_depth}")]
    QueueDepth {
        ublk_id: u32,
        queue_depth: u32,
        max: u16,
    },
    #[error("ublk {ublk_id}: num_queues must be 1..={max}, got {num_queues}")]
    NumQueues {
        ublk_id: u32,
        num_queues: u32,
        max: u16,
    },
    #[error("ublk id {ublk_id} is invalid (at most {max})")]
    BadId { ublk_id: u32, max: u32 },
    #[error("ublk {ublk_id} is already served by this target (bdev {bdev})")]
    InUse { ublk_id: u32, bdev: String },
    #[error(
        "ublk {ublk_id} already exists in the kernel in state {state} (another server owns it)"
    )]
    KernelInUse { ublk_id: u32, state: &'static str },
    #[error("ublk {ublk_id} is not served by this target")]
    NotFound { ublk_id: u32 },
    #[error("ublk {ublk_id}: cannot recover: the kernel's device is {state}, not quiesced")]
    NotRecoverable { ublk_id: u32, state: &'static str },
    #[error("ublk {ublk_id}: bdev {bdev}")]
    Bdev {
        ublk_id: u32,
        bdev: String,
        #[source]
        source: Box<pollux_bdev::BdevError>,
    },
    #[error("ublk {ublk_id}: bdev {bdev} ({bdev_sectors} sectors, logical block shift {bdev_shift}) does not match the quiesced disk ({disk_sectors} sectors, shift {disk_shift}): not recovering it onto another bdev")]
    RecoverMismatch {
        ublk_id: u32,
        bdev: String,
        bdev_sectors: u64,
        bdev_shift: u8,
        disk_sectors: u64,
        disk_shift: u8,
    },
    #[error("ublk {ublk_id}: bdev {bdev} has block size {block_size} (ublk takes 512..=page size, a power of two)")]
    BlockSize {
        ublk_id: u32,
        bdev: String,
        block_size: u32,
    },
    #[error("ublk {ublk_id}: DMA buffers for queue {q_id}")]
    Dma {
        ublk_id: u32,
        q_id: u16,
        #[source]
        source: Box<pollux_env::dma::DmaError>,
    },
    #[error("ublk control ring")]
    ControlRing(#[source] std::io::Error),
    #[error("ublk {dev_id}: control command {command} failed")]
    Control {
        dev_id: u32,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ublk {dev_id}: mapping queue {q_id}'s descriptors")]
    Mmap {
        dev_id: u32,
        q_id: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("ublk {dev_id}: queue {q_id}'s io_uring")]
    QueueRing {
        dev_id: u32,
        q_id: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("ublk {dev_id}: queue {q_id} did not start: {reason}")]
    QueueStart {
        dev_id: u32,
        q_id: u16,
        reason: String,
    },
}

/// A kernel state's name for messages.
pub fn state_name(state: u16) -> &'static str {
    match state {
        crate::sys::UBLK_S_DEV_DEAD => "dead",
        crate::sys::UBLK_S_DEV_LIVE => "live",
        crate::sys::UBLK_S_DEV_QUIESCED => "quiesced",
        crate::sys::UBLK_S_DEV_FAIL_IO => "fail_io",
        _ => "unknown",
    }
}
