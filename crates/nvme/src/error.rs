//! The crate's one error type.

use pollux_env::dma::DmaError;
use pollux_env::memmap::TranslationError;
use pollux_env::vfio::VfioError;

use crate::spec::Status;

/// Everything the driver can refuse or report. Device misbehaviour (a bad completion entry,
/// an implausible register) is an error with the offending values, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("register access at offset {offset:#x} failed")]
    Register {
        offset: u64,
        #[source]
        source: VfioError,
    },
    #[error("register offset {offset:#x} is outside the model's register space")]
    ModelRegister { offset: u64 },
    #[error("DMA memory for {what}")]
    Dma {
        what: &'static str,
        #[source]
        source: DmaError,
    },
    #[error("buffer [{vaddr:#x}, +{len_bytes}) has no IOVA")]
    Translation {
        vaddr: u64,
        len_bytes: u64,
        #[source]
        source: TranslationError,
    },
    #[error("controller reports implausible {what}: {detail}")]
    Implausible { what: &'static str, detail: String },
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout { what: &'static str, waited_ms: u64 },
    #[error("controller fatal status (CSTS {csts:#x})")]
    ControllerFatal { csts: u32 },
    #[error("controller registers read all ones: the device was removed or stopped decoding")]
    DeviceRemoved,
    #[error("controller has failed and is no longer usable")]
    ControllerFailed,
    #[error("queue pair {qid} is disconnected (controller reset or failed); reconnect it")]
    Disconnected { qid: u16 },
    #[error(
        "broken completion on queue {qid}: {reason} (cid {cid}, sq_head {sq_head}, sq_id {sq_id})"
    )]
    BadCompletion {
        qid: u16,
        cid: u16,
        sq_head: u16,
        sq_id: u16,
        reason: &'static str,
    },
    #[error("command {opcode:#04x} failed: {status}")]
    CommandFailed { opcode: u8, status: Status },
    #[error("all {depth} request slots of queue {qid} are in use")]
    NoFreeSlot { qid: u16, depth: u16 },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: &'static str },
    #[error(
        "iovecs cannot go zero copy ({reason}: PRP rules broken without SGL support, or memory \
         not registered) and no bounce buffer fits"
    )]
    NotPrpCompatible { reason: &'static str },
    #[error("transfer of {len_bytes} bytes needs more than the {max_entries} descriptors preallocated per request")]
    TooManyDescriptors { len_bytes: u64, max_entries: usize },
    #[error("no I/O queue id left (controller granted {granted})")]
    NoQueueId { granted: u16 },
    #[error("namespace {nsid} is not active")]
    NoSuchNamespace { nsid: u32 },
}

impl NvmeError {
    pub(crate) fn dma(what: &'static str) -> impl FnOnce(DmaError) -> NvmeError {
        move |source| NvmeError::Dma { what, source }
    }
}
