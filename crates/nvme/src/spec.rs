//! NVMe wire formats (NVMe Base Specification 2.0 unless noted; NVM Command Set 1.0 for I/O):
//! controller registers (3.1), submission and completion queue entries (4.2, 4.6), status
//! codes (4.6.1.2), identify data (5.17), log pages (5.16) and features (5.27).
//!
//! Everything here is plain data: encoding to and decoding from little-endian bytes, with no
//! device access. Decoders never panic and never index out of bounds whatever the bytes are:
//! the data comes from a device, which may be broken.

use std::fmt;

// ---------------------------------------------------------------------------------------
// Registers (3.1.3)

pub const REG_CAP: u64 = 0x00;
pub const REG_VS: u64 = 0x08;
pub const REG_INTMS: u64 = 0x0c;
pub const REG_INTMC: u64 = 0x10;
pub const REG_CC: u64 = 0x14;
pub const REG_CSTS: u64 = 0x1c;
pub const REG_NSSR: u64 = 0x20;
pub const REG_AQA: u64 = 0x24;
pub const REG_ASQ: u64 = 0x28;
pub const REG_ACQ: u64 = 0x30;
/// First doorbell: SQ y tail at `0x1000 + 2y * stride`, CQ y head at `0x1000 + (2y + 1) * stride`.
pub const REG_DOORBELL_BASE: u64 = 0x1000;

/// Offset of submission queue `qid`'s tail doorbell.
pub fn sq_tail_doorbell(qid: u16, stride_bytes: u64) -> u64 {
    REG_DOORBELL_BASE + 2 * u64::from(qid) * stride_bytes
}

/// Offset of completion queue `qid`'s head doorbell.
pub fn cq_head_doorbell(qid: u16, stride_bytes: u64) -> u64 {
    REG_DOORBELL_BASE + (2 * u64::from(qid) + 1) * stride_bytes
}

/// Byte offset of submission queue `qid`'s tail in the Shadow Doorbell and EventIdx buffers
/// (Doorbell Buffer Config, NVMe Base 2.0, 5.8): `2 * qid * stride`, the doorbell's own layout.
pub fn shadow_sq_tail_offset(qid: u16, stride_bytes: u64) -> u64 {
    2 * u64::from(qid) * stride_bytes
}

/// Byte offset of completion queue `qid`'s head in the shadow buffers: `(2 * qid + 1) * stride`.
pub fn shadow_cq_head_offset(qid: u16, stride_bytes: u64) -> u64 {
    (2 * u64::from(qid) + 1) * stride_bytes
}

/// Whether moving a doorbell from `old` to `new` passed the controller's `event_idx`, so the
/// MMIO doorbell must be written (the virtio rule NVMe borrowed: Linux `nvme_dbbuf_need_event`,
/// `(u16)(new - event_idx - 1) < (u16)(new - old)`). Indices wrap at the queue's `entries`,
/// not at 65536, so the arithmetic is modulo `entries` (the same as the u16 form for 65536
/// entries; the u16 form rings needlessly when a smaller ring wraps). `event_idx` comes from
/// the device: any value is accepted, reduced modulo `entries`.
pub fn need_event(event_idx: u32, new: u16, old: u16, entries: u16) -> bool {
    let n = u32::from(entries.max(1));
    let event_idx = event_idx % n;
    let (new, old) = (u32::from(new) % n, u32::from(old) % n);
    (new + 2 * n - event_idx - 1) % n < (new + n - old) % n
}

/// Controller Capabilities (CAP), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub raw: u64,
    /// Maximum queue entries (MQES + 1).
    pub max_queue_entries: u32,
    pub contiguous_queues_required: bool,
    pub arbitration_mechanisms: u8,
    /// Worst-case time to change CSTS.RDY (TO, 500 ms units), in milliseconds.
    pub timeout_ms: u32,
    /// Doorbell stride: `4 << DSTRD` bytes.
    pub doorbell_stride_bytes: u64,
    pub nvm_subsystem_reset: bool,
    /// CSS bitmap: bit 0 NVM, bit 6 I/O command sets, bit 7 admin only.
    pub command_sets: u8,
    pub boot_partitions: bool,
    pub page_size_min_bytes: u64,
    pub page_size_max_bytes: u64,
    pub persistent_memory_region: bool,
    pub controller_memory_buffer: bool,
}

impl Cap {
    pub fn decode(raw: u64) -> Self {
        let bits = |shift: u32, width: u32| (raw >> shift) & ((1u64 << width) - 1);
        Self {
            raw,
            max_queue_entries: bits(0, 16) as u32 + 1,
            contiguous_queues_required: bits(16, 1) != 0,
            arbitration_mechanisms: bits(17, 2) as u8,
            timeout_ms: bits(24, 8) as u32 * 500,
            doorbell_stride_bytes: 4 << bits(32, 4),
            nvm_subsystem_reset: bits(36, 1) != 0,
            command_sets: bits(37, 8) as u8,
            boot_partitions: bits(45, 1) != 0,
            page_size_min_bytes: 1 << (12 + bits(48, 4)),
            page_size_max_bytes: 1 << (12 + bits(52, 4)),
            persistent_memory_region: bits(56, 1) != 0,
            controller_memory_buffer: bits(57, 1) != 0,
        }
    }
}

/// Version (VS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u16,
    pub minor: u8,
    pub tertiary: u8,
}

impl Version {
    pub fn decode(raw: u32) -> Self {
        Self {
            major: (raw >> 16) as u16,
            minor: (raw >> 8) as u8,
            tertiary: raw as u8,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.tertiary)
    }
}

/// CC.EN
pub const CC_EN: u32 = 1 << 0;
/// CC.SHN: normal shutdown notification (bits 15:14 = 01b).
pub const CC_SHN_NORMAL: u32 = 1 << 14;
pub const CC_SHN_MASK: u32 = 3 << 14;

/// Controller Configuration (CC), the fields the driver sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cc {
    pub enable: bool,
    /// Command set selected (CSS, 0 = NVM).
    pub css: u8,
    /// Memory page size: `4096 << MPS`.
    pub mps: u8,
    pub ams: u8,
    /// Shutdown notification (SHN, 0 none, 1 normal, 2 abrupt).
    pub shn: u8,
    /// log2 of the I/O submission queue entry size (6: 64 bytes).
    pub iosqes: u8,
    /// log2 of the I/O completion queue entry size (4: 16 bytes).
    pub iocqes: u8,
}

impl Cc {
    pub fn decode(raw: u32) -> Self {
        Self {
            enable: raw & 1 != 0,
            css: ((raw >> 4) & 7) as u8,
            mps: ((raw >> 7) & 0xf) as u8,
            ams: ((raw >> 11) & 7) as u8,
            shn: ((raw >> 14) & 3) as u8,
            iosqes: ((raw >> 16) & 0xf) as u8,
            iocqes: ((raw >> 20) & 0xf) as u8,
        }
    }

    pub fn encode(&self) -> u32 {
        u32::from(self.enable)
            | (u32::from(self.css & 7) << 4)
            | (u32::from(self.mps & 0xf) << 7)
            | (u32::from(self.ams & 7) << 11)
            | (u32::from(self.shn & 3) << 14)
            | (u32::from(self.iosqes & 0xf) << 16)
            | (u32::from(self.iocqes & 0xf) << 20)
    }
}

pub const CSTS_RDY: u32 = 1 << 0;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = 10b: shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Controller Status (CSTS), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csts {
    pub raw: u32,
    pub ready: bool,
    pub fatal: bool,
    /// SHST: 0 normal operation, 1 shutdown in progress, 2 shutdown complete.
    pub shutdown_status: u8,
    pub subsystem_reset: bool,
    pub processing_paused: bool,
}

impl Csts {
    pub fn decode(raw: u32) -> Self {
        Self {
            raw,
            ready: raw & CSTS_RDY != 0,
            fatal: raw & CSTS_CFS != 0,
            shutdown_status: ((raw >> 2) & 3) as u8,
            subsystem_reset: raw & (1 << 4) != 0,
            processing_paused: raw & (1 << 5) != 0,
        }
    }

    /// All ones: the device no longer decodes its BAR (surprise removal, link down).
    pub fn is_all_ones(&self) -> bool {
        self.raw == u32::MAX
    }
}

/// Admin Queue Attributes (AQA): 0's based sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aqa {
    pub sq_entries: u32,
    pub cq_entries: u32,
}

impl Aqa {
    pub fn decode(raw: u32) -> Self {
        Self {
            sq_entries: (raw & 0xfff) + 1,
            cq_entries: ((raw >> 16) & 0xfff) + 1,
        }
    }

    /// `entries` must be in 2..=4096.
    pub fn encode(&self) -> u32 {
        ((self.cq_entries.saturating_sub(1) & 0xfff) << 16)
            | (self.sq_entries.saturating_sub(1) & 0xfff)
    }
}

// ---------------------------------------------------------------------------------------
// Opcodes

pub mod opc {
    //! Admin (5) and NVM command set (NVM 3) opcodes.
    pub const DELETE_IO_SQ: u8 = 0x00;
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_IO_CQ: u8 = 0x04;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    /// Fabrics commands (NVMe over Fabrics 1.1, 6): the type is in FCTYPE ([`super::fctype`]).
    pub const FABRICS: u8 = 0x7f;

    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values (5.17.1).
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
    pub const NAMESPACE_DESCRIPTOR_LIST: u8 = 0x03;
    /// I/O command set specific Identify Controller (CSI in CDW11).
    pub const CS_CONTROLLER: u8 = 0x06;
}

/// Feature identifiers (5.27.1).
pub mod fid {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// Log page identifiers (5.16.1).
pub mod lid {
    pub const ERROR_INFORMATION: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Discovery log page (NVMe over Fabrics 1.1, 5.3).
    pub const DISCOVERY: u8 = 0x70;
}

// ---------------------------------------------------------------------------------------
// Queue entries (4.2, 4.6)

pub const SQE_BYTES: usize = 64;
pub const CQE_BYTES: usize = 16;

/// PSDT (CDW0 bits 15:14): how DPTR is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Psdt {
    Prp,
    /// SGL, MPTR holds an address.
    SglMptrAddress,
    /// SGL, MPTR holds an SGL descriptor.
    SglMptrSgl,
    Reserved,
}

impl Psdt {
    fn bits(self) -> u32 {
        match self {
            Psdt::Prp => 0,
            Psdt::SglMptrAddress => 1,
            Psdt::SglMptrSgl => 2,
            Psdt::Reserved => 3,
        }
    }

    fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Psdt::Prp,
            1 => Psdt::SglMptrAddress,
            2 => Psdt::SglMptrSgl,
            _ => Psdt::Reserved,
        }
    }
}

/// A 64-byte submission queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub opcode: u8,
    /// FUSE, bits 9:8 of CDW0.
    pub fuse: u8,
    pub psdt: Psdt,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    /// PRP1 / PRP2, or one SGL descriptor (16 bytes) in SGL mode.
    pub dptr: [u64; 2],
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Command {
    pub const fn new(opcode: u8) -> Self {
        Self {
            opcode,
            fuse: 0,
            psdt: Psdt::Prp,
            cid: 0,
            nsid: 0,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr: [0; 2],
            cdw10: 0,
            cdw11: 0,
            cdw12: 0,
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        }
    }

    /// The entry as eight 64-bit words (each to be stored little endian): the I/O path
    /// writes these straight into the SQ slot, with no byte-array round trip.
    #[inline]
    pub fn encode_words(&self) -> [u64; SQE_BYTES / 8] {
        let cdw0 = u32::from(self.opcode)
            | (u32::from(self.fuse & 3) << 8)
            | (self.psdt.bits() << 14)
            | (u32::from(self.cid) << 16);
        let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        [
            pair(cdw0, self.nsid),
            pair(self.cdw2, self.cdw3),
            self.mptr,
            self.dptr[0],
            self.dptr[1],
            pair(self.cdw10, self.cdw11),
            pair(self.cdw12, self.cdw13),
            pair(self.cdw14, self.cdw15),
        ]
    }

    pub fn encode(&self) -> [u8; SQE_BYTES] {
        let mut b = [0u8; SQE_BYTES];
        let cdw0 = u32::from(self.opcode)
            | (u32::from(self.fuse & 3) << 8)
            | (self.psdt.bits() << 14)
            | (u32::from(self.cid) << 16);
        put32(&mut b, 0, cdw0);
        put32(&mut b, 4, self.nsid);
        put32(&mut b, 8, self.cdw2);
        put32(&mut b, 12, self.cdw3);
        put64(&mut b, 16, self.mptr);
        put64(&mut b, 24, self.dptr[0]);
        put64(&mut b, 32, self.dptr[1]);
        put32(&mut b, 40, self.cdw10);
        put32(&mut b, 44, self.cdw11);
        put32(&mut b, 48, self.cdw12);
        put32(&mut b, 52, self.cdw13);
        put32(&mut b, 56, self.cdw14);
        put32(&mut b, 60, self.cdw15);
        b
    }

    pub fn decode(b: &[u8; SQE_BYTES]) -> Self {
        let cdw0 = le32(b, 0);
        Self {
            opcode: cdw0 as u8,
            fuse: ((cdw0 >> 8) & 3) as u8,
            psdt: Psdt::from_bits(cdw0 >> 14),
            cid: (cdw0 >> 16) as u16,
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            mptr: le64(b, 16),
            dptr: [le64(b, 24), le64(b, 32)],
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }
}

/// A 16-byte completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific (DW0).
    pub dw0: u32,
    pub dw1: u32,
    /// How far the controller has consumed the submission queue.
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    pub phase: bool,
    pub status: Status,
}

impl Completion {
    /// Decodes an entry read as two 64-bit words (DW0-DW1, DW2-DW3), as the I/O path reads it.
    #[inline]
    pub fn from_words(words: [u64; 2]) -> Self {
        let [low, high] = words;
        let dw2 = high as u32;
        let dw3 = (high >> 32) as u32;
        Self {
            dw0: low as u32,
            dw1: (low >> 32) as u32,
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 & (1 << 16) != 0,
            status: Status::from_field((dw3 >> 17) as u16),
        }
    }

    pub fn decode(b: &[u8; CQE_BYTES]) -> Self {
        let dw2 = le32(b, 8);
        let dw3 = le32(b, 12);
        Self {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 & (1 << 16) != 0,
            status: Status::from_field((dw3 >> 17) as u16),
        }
    }

    pub fn encode(&self) -> [u8; CQE_BYTES] {
        let mut b = [0u8; CQE_BYTES];
        put32(&mut b, 0, self.dw0);
        put32(&mut b, 4, self.dw1);
        put32(
            &mut b,
            8,
            u32::from(self.sq_head) | (u32::from(self.sq_id) << 16),
        );
        put32(
            &mut b,
            12,
            u32::from(self.cid)
                | (u32::from(self.phase) << 16)
                | (u32::from(self.status.to_field()) << 17),
        );
        b
    }
}

// ---------------------------------------------------------------------------------------
// Status (4.6.1.2)

/// Status code type (SCT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCodeType {
    Generic,
    CommandSpecific,
    MediaDataIntegrity,
    Path,
    Reserved(u8),
    VendorSpecific,
}

impl StatusCodeType {
    pub fn from_bits(sct: u8) -> Self {
        match sct & 7 {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaDataIntegrity,
            3 => Self::Path,
            7 => Self::VendorSpecific,
            other => Self::Reserved(other),
        }
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::Generic => 0,
            Self::CommandSpecific => 1,
            Self::MediaDataIntegrity => 2,
            Self::Path => 3,
            Self::Reserved(other) => other & 7,
            Self::VendorSpecific => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Generic => "generic command status",
            Self::CommandSpecific => "command specific status",
            Self::MediaDataIntegrity => "media and data integrity error",
            Self::Path => "path related status",
            Self::Reserved(_) => "reserved status code type",
            Self::VendorSpecific => "vendor specific",
        }
    }
}

/// A completion's status field: type, code, Command Retry Delay index, More, Do Not Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    pub sct: StatusCodeType,
    pub sc: u8,
    /// Command Retry Delay (CRD) index, 0..=3.
    pub crd: u8,
    pub more: bool,
    pub dnr: bool,
}

/// Generic command status codes (Figure 102 and NVM Figure 22).
pub mod sc {
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_OPCODE: u8 = 0x01;
    pub const INVALID_FIELD: u8 = 0x02;
    pub const COMMAND_ID_CONFLICT: u8 = 0x03;
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const INTERNAL_ERROR: u8 = 0x06;
    pub const ABORTED_BY_REQUEST: u8 = 0x07;
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    pub const INVALID_NAMESPACE_OR_FORMAT: u8 = 0x0b;
    pub const COMMAND_SEQUENCE_ERROR: u8 = 0x0c;
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    pub const SGL_OFFSET_INVALID: u8 = 0x16;
    pub const KEEP_ALIVE_TIMEOUT_INVALID: u8 = 0x1a;
    pub const TRANSIENT_TRANSPORT_ERROR: u8 = 0x22;
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: u8 = 0x0d;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    pub const PRP_OFFSET_INVALID: u8 = 0x13;
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    // Command specific.
    pub const COMPLETION_QUEUE_INVALID: u8 = 0x00;
    pub const INVALID_QUEUE_IDENTIFIER: u8 = 0x01;
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: u8 = 0x05;
    pub const INVALID_LOG_PAGE: u8 = 0x09;
    pub const INVALID_QUEUE_DELETION: u8 = 0x0c;
    pub const FEATURE_NOT_CHANGEABLE: u8 = 0x0e;
    // Fabrics command specific (NVMe over Fabrics 1.1, Figure 10): Connect and Property
    // Get / Set.
    pub const CONNECT_INCOMPATIBLE_FORMAT: u8 = 0x80;
    pub const CONNECT_CONTROLLER_BUSY: u8 = 0x81;
    pub const CONNECT_INVALID_PARAMETERS: u8 = 0x82;
    pub const CONNECT_RESTART_DISCOVERY: u8 = 0x83;
    pub const CONNECT_INVALID_HOST: u8 = 0x84;
    // Media.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
}

impl Status {
    pub const SUCCESS: Status = Status::generic(sc::SUCCESS);

    pub const fn generic(sc: u8) -> Self {
        Self {
            sct: StatusCodeType::Generic,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    pub const fn new(sct: StatusCodeType, sc: u8) -> Self {
        Self {
            sct,
            sc,
            crd: 0,
            more: false,
            dnr: false,
        }
    }

    pub const fn with_dnr(mut self, dnr: bool) -> Self {
        self.dnr = dnr;
        self
    }

    /// Decodes the 15-bit status field (CQE DW3 bits 31:17, shifted down).
    pub fn from_field(field: u16) -> Self {
        Self {
            sc: field as u8,
            sct: StatusCodeType::from_bits(((field >> 8) & 7) as u8),
            crd: ((field >> 11) & 3) as u8,
            more: field & (1 << 13) != 0,
            dnr: field & (1 << 14) != 0,
        }
    }

    pub fn to_field(&self) -> u16 {
        u16::from(self.sc)
            | (u16::from(self.sct.bits()) << 8)
            | (u16::from(self.crd & 3) << 11)
            | (u16::from(self.more) << 13)
            | (u16::from(self.dnr) << 14)
    }

    pub fn is_success(&self) -> bool {
        self.sct == StatusCodeType::Generic && self.sc == sc::SUCCESS
    }

    /// The specification's name of this status code ("Invalid Field in Command").
    pub fn name(&self) -> &'static str {
        status_name(self.sct, self.sc)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {:#x}, sc {:#04x}",
            self.name(),
            self.sct.bits(),
            self.sc
        )?;
        if self.more {
            f.write_str(", more")?;
        }
        if self.dnr {
            f.write_str(", do not retry")?;
        }
        f.write_str(")")
    }
}

fn status_name(sct: StatusCodeType, code: u8) -> &'static str {
    match sct {
        StatusCodeType::Generic => match code {
            0x00 => "Successful Completion",
            0x01 => "Invalid Command Opcode",
            0x02 => "Invalid Field in Command",
            0x03 => "Command ID Conflict",
            0x04 => "Data Transfer Error",
            0x05 => "Commands Aborted due to Power Loss Notification",
            0x06 => "Internal Error",
            0x07 => "Command Abort Requested",
            0x08 => "Command Aborted due to SQ Deletion",
            0x09 => "Command Aborted due to Failed Fused Command",
            0x0a => "Command Aborted due to Missing Fused Command",
            0x0b => "Invalid Namespace or Format",
            0x0c => "Command Sequence Error",
            0x0d => "Invalid SGL Segment Descriptor",
            0x0e => "Invalid Number of SGL Descriptors",
            0x0f => "Data SGL Length Invalid",
            0x10 => "Metadata SGL Length Invalid",
            0x11 => "SGL Descriptor Type Invalid",
            0x12 => "Invalid Use of Controller Memory Buffer",
            0x13 => "PRP Offset Invalid",
            0x14 => "Atomic Write Unit Exceeded",
            0x15 => "Operation Denied",
            0x16 => "SGL Offset Invalid",
            0x18 => "Host Identifier Inconsistent Format",
            0x19 => "Keep Alive Timer Expired",
            0x1a => "Keep Alive Timeout Invalid",
            0x1b => "Command Aborted due to Preempt and Abort",
            0x1c => "Sanitize Failed",
            0x1d => "Sanitize In Progress",
            0x1e => "SGL Data Block Granularity Invalid",
            0x1f => "Command Not Supported for Queue in CMB",
            0x20 => "Namespace is Write Protected",
            0x21 => "Command Interrupted",
            0x22 => "Transient Transport Error",
            0x23 => "Command Prohibited by Command and Feature Lockdown",
            0x24 => "Admin Command Media Not Ready",
            0x80 => "LBA Out of Range",
            0x81 => "Capacity Exceeded",
            0x82 => "Namespace Not Ready",
            0x83 => "Reservation Conflict",
            0x84 => "Format In Progress",
            0x85 => "Invalid Value Size",
            0x86 => "Invalid Key Size",
            0x87 => "KV Key Does Not Exist",
            0x88 => "Unrecovered Error",
            0x89 => "Key Exists",
            0xc0..=0xff => "Vendor Specific",
            _ => "Reserved Generic Status",
        },
        StatusCodeType::CommandSpecific => match code {
            0x00 => "Completion Queue Invalid",
            0x01 => "Invalid Queue Identifier",
            0x02 => "Invalid Queue Size",
            0x03 => "Abort Command Limit Exceeded",
            0x05 => "Asynchronous Event Request Limit Exceeded",
            0x06 => "Invalid Firmware Slot",
            0x07 => "Invalid Firmware Image",
            0x08 => "Invalid Interrupt Vector",
            0x09 => "Invalid Log Page",
            0x0a => "Invalid Format",
            0x0b => "Firmware Activation Requires Conventional Reset",
            0x0c => "Invalid Queue Deletion",
            0x0d => "Feature Identifier Not Saveable",
            0x0e => "Feature Not Changeable",
            0x0f => "Feature Not Namespace Specific",
            0x10 => "Firmware Activation Requires NVM Subsystem Reset",
            0x11 => "Firmware Activation Requires Controller Level Reset",
            0x12 => "Firmware Activation Requires Maximum Time Violation",
            0x13 => "Firmware Activation Prohibited",
            0x14 => "Overlapping Range",
            0x15 => "Namespace Insufficient Capacity",
            0x16 => "Namespace Identifier Unavailable",
            0x18 => "Namespace Already Attached",
            0x19 => "Namespace Is Private",
            0x1a => "Namespace Not Attached",
            0x1b => "Thin Provisioning Not Supported",
            0x1c => "Controller List Invalid",
            0x1d => "Device Self-test In Progress",
            0x1e => "Boot Partition Write Prohibited",
            0x1f => "Invalid Controller Identifier",
            0x20 => "Invalid Secondary Controller State",
            0x21 => "Invalid Number of Controller Resources",
            0x22 => "Invalid Resource Identifier",
            0x23 => "Sanitize Prohibited While Persistent Memory Region is Enabled",
            0x24 => "ANA Group Identifier Invalid",
            0x25 => "ANA Attach Failed",
            0x26 => "Insufficient Capacity",
            0x27 => "Namespace Attachment Limit Exceeded",
            0x28 => "Prohibition of Command Execution Not Supported",
            0x29 => "I/O Command Set Not Supported",
            0x2a => "I/O Command Set Not Enabled",
            0x2b => "I/O Command Set Combination Rejected",
            0x2c => "Invalid I/O Command Set",
            0x2d => "Identifier Unavailable",
            // NVM command set specific (NVM Command Set 1.0, Figure 23).
            0x80 => "Conflicting Attributes",
            0x81 => "Invalid Protection Information",
            0x82 => "Attempted Write to Read Only Range",
            0x83 => "Command Size Limit Exceeded",
            // Zoned namespace command set.
            0xb8 => "Zone Boundary Error",
            0xb9 => "Zone Is Full",
            0xba => "Zone Is Read Only",
            0xbb => "Zone Is Offline",
            0xbc => "Zone Invalid Write",
            0xbd => "Too Many Active Zones",
            0xbe => "Too Many Open Zones",
            0xbf => "Invalid Zone State Transition",
            0xc0..=0xff => "Vendor Specific",
            _ => "Reserved Command Specific Status",
        },
        StatusCodeType::MediaDataIntegrity => match code {
            0x80 => "Write Fault",
            0x81 => "Unrecovered Read Error",
            0x82 => "End-to-end Guard Check Error",
            0x83 => "End-to-end Application Tag Check Error",
            0x84 => "End-to-end Reference Tag Check Error",
            0x85 => "Compare Failure",
            0x86 => "Access Denied",
            0x87 => "Deallocated or Unwritten Logical Block",
            0x88 => "End-to-End Storage Tag Check Error",
            0xc0..=0xff => "Vendor Specific",
            _ => "Reserved Media and Data Integrity Status",
        },
        StatusCodeType::Path => match code {
            0x00 => "Internal Path Error",
            0x01 => "Asymmetric Access Persistent Loss",
            0x02 => "Asymmetric Access Inaccessible",
            0x03 => "Asymmetric Access Transition",
            0x60 => "Controller Pathing Error",
            0x70 => "Host Pathing Error",
            0x71 => "Command Aborted By Host",
            0xc0..=0xff => "Vendor Specific",
            _ => "Reserved Path Related Status",
        },
        StatusCodeType::Reserved(_) => "Reserved Status Code Type",
        StatusCodeType::VendorSpecific => "Vendor Specific",
    }
}

// ---------------------------------------------------------------------------------------
// Identify (5.17.2)

pub const IDENTIFY_BYTES: usize = 4096;

/// OACS bit 8: Doorbell Buffer Config supported.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
/// ONCS bits.
pub const ONCS_DSM: u16 = 1 << 2;
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// Identify Controller data structure (CNS 01h), the fields the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyController {
    pub vid: u16,
    pub ssvid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub ieee_oui: [u8; 3],
    pub cmic: u8,
    /// Maximum data transfer size as a power of two of the minimum page size (0 = no limit).
    pub mdts: u8,
    pub cntlid: u16,
    pub version: u32,
    pub oaes: u32,
    pub ctratt: u32,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Abort Command Limit (0's based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0's based).
    pub aerl: u8,
    pub frmw: u8,
    pub lpa: u8,
    /// Error Log Page Entries (0's based).
    pub elpe: u8,
    pub sqes: u8,
    pub cqes: u8,
    pub maxcmd: u16,
    /// Number of namespaces (the largest valid NSID).
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    pub fuses: u16,
    pub fna: u8,
    /// Volatile Write Cache (bit 0: present).
    pub vwc: u8,
    pub awun: u16,
    pub awupf: u16,
    /// SGL Support.
    pub sgls: u32,
    pub subnqn: String,
    /// Controller type (1 I/O, 2 discovery, 3 administrative; 0 not reported).
    pub cntrltype: u8,
    /// Keep Alive Support: granularity in 100 ms units (0: no keep alive).
    pub kas: u16,
    /// NVMe over Fabrics: I/O queue command capsule size in 16-byte units (SQE plus
    /// in-capsule data).
    pub ioccsz: u32,
    /// NVMe over Fabrics: I/O queue response capsule size in 16-byte units.
    pub iorcsz: u32,
    /// NVMe over Fabrics: in-capsule data offset in 16-byte units (Linux needs 0).
    pub icdoff: u16,
    /// NVMe over Fabrics: controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// NVMe over Fabrics: maximum SGL data block descriptors per command.
    pub msdbd: u8,
}

impl IdentifyController {
    pub fn parse(b: &[u8; IDENTIFY_BYTES]) -> Self {
        Self {
            vid: le16(b, 0),
            ssvid: le16(b, 2),
            serial: ascii_field(&b[4..24]),
            model: ascii_field(&b[24..64]),
            firmware: ascii_field(&b[64..72]),
            ieee_oui: [b[73], b[74], b[75]],
            cmic: b[76],
            mdts: b[77],
            cntlid: le16(b, 78),
            version: le32(b, 80),
            oaes: le32(b, 92),
            ctratt: le32(b, 96),
            oacs: le16(b, 256),
            acl: b[258],
            aerl: b[259],
            frmw: b[260],
            lpa: b[261],
            elpe: b[262],
            sqes: b[512],
            cqes: b[513],
            maxcmd: le16(b, 514),
            nn: le32(b, 516),
            oncs: le16(b, 520),
            fuses: le16(b, 522),
            fna: b[524],
            vwc: b[525],
            awun: le16(b, 526),
            awupf: le16(b, 528),
            sgls: le32(b, 536),
            subnqn: ascii_field(&b[768..1024]),
            cntrltype: b[111],
            kas: le16(b, 320),
            ioccsz: le32(b, 1792),
            iorcsz: le32(b, 1796),
            icdoff: le16(b, 1800),
            fcatt: b[1802],
            msdbd: b[1803],
        }
    }

    /// Writes the parsed fields back (for the controller model and round-trip tests).
    pub fn encode(&self) -> [u8; IDENTIFY_BYTES] {
        let mut b = [0u8; IDENTIFY_BYTES];
        put16(&mut b, 0, self.vid);
        put16(&mut b, 2, self.ssvid);
        put_ascii(&mut b[4..24], &self.serial);
        put_ascii(&mut b[24..64], &self.model);
        put_ascii(&mut b[64..72], &self.firmware);
        b[73..76].copy_from_slice(&self.ieee_oui);
        b[76] = self.cmic;
        b[77] = self.mdts;
        put16(&mut b, 78, self.cntlid);
        put32(&mut b, 80, self.version);
        put32(&mut b, 92, self.oaes);
        put32(&mut b, 96, self.ctratt);
        put16(&mut b, 256, self.oacs);
        b[258] = self.acl;
        b[259] = self.aerl;
        b[260] = self.frmw;
        b[261] = self.lpa;
        b[262] = self.elpe;
        b[512] = self.sqes;
        b[513] = self.cqes;
        put16(&mut b, 514, self.maxcmd);
        put32(&mut b, 516, self.nn);
        put16(&mut b, 520, self.oncs);
        put16(&mut b, 522, self.fuses);
        b[524] = self.fna;
        b[525] = self.vwc;
        put16(&mut b, 526, self.awun);
        put16(&mut b, 528, self.awupf);
        put32(&mut b, 536, self.sgls);
        let nqn = self.subnqn.as_bytes();
        let n = nqn.len().min(256);
        b[768..768 + n].copy_from_slice(&nqn[..n]);
        b[111] = self.cntrltype;
        put16(&mut b, 320, self.kas);
        put32(&mut b, 1792, self.ioccsz);
        put32(&mut b, 1796, self.iorcsz);
        put16(&mut b, 1800, self.icdoff);
        b[1802] = self.fcatt;
        b[1803] = self.msdbd;
        b
    }

    pub fn supports_doorbell_buffer_config(&self) -> bool {
        self.oacs & OACS_DOORBELL_BUFFER_CONFIG != 0
    }

    /// SGLS bits 1:0 non-zero: SGLs supported for the NVM command set.
    pub fn supports_sgl(&self) -> bool {
        self.sgls & 3 != 0
    }

    /// SGLS bits 1:0 = 10b: data blocks must be dword aligned.
    pub fn sgl_requires_dword_alignment(&self) -> bool {
        self.sgls & 3 == 2
    }

    pub fn has_volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }

    /// Maximum transfer in bytes for `page_size_min_bytes` (CAP.MPSMIN), `None` for no limit
    /// (MDTS 0, or a limit beyond 64 bits: `checked_shl` alone would let the bits fall off the
    /// top and turn a huge MDTS into a limit of 0 bytes, found by the nvme_identify fuzz target).
    pub fn max_transfer_bytes(&self, page_size_min_bytes: u64) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        1u64.checked_shl(u32::from(self.mdts))?
            .checked_mul(page_size_min_bytes)
    }
}

/// One LBA format (LBAF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per block.
    pub metadata_bytes: u16,
    /// log2 of the data size (LBADS); 0 means the format is not available.
    pub lba_data_size_log2: u8,
    pub relative_performance: u8,
}

impl LbaFormat {
    pub fn decode(raw: u32) -> Self {
        Self {
            metadata_bytes: raw as u16,
            lba_data_size_log2: (raw >> 16) as u8,
            relative_performance: ((raw >> 24) & 3) as u8,
        }
    }

    pub fn encode(&self) -> u32 {
        u32::from(self.metadata_bytes)
            | (u32::from(self.lba_data_size_log2) << 16)
            | (u32::from(self.relative_performance & 3) << 24)
    }

    /// Block size in bytes, `None` when LBADS is below 9 (the spec minimum) or absurd.
    pub fn block_size_bytes(&self) -> Option<u32> {
        if (9..=31).contains(&self.lba_data_size_log2) {
            Some(1 << self.lba_data_size_log2)
        } else {
            None
        }
    }
}

/// Identify Namespace data structure (CNS 00h), NVM command set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in blocks.
    pub nsze: u64,
    pub ncap: u64,
    pub nuse: u64,
    pub nsfeat: u8,
    /// Number of LBA formats (NLBAF is 0's based; this is NLBAF + 1, at most 64).
    pub lba_format_count: u8,
    pub flbas: u8,
    pub mc: u8,
    pub dpc: u8,
    pub dps: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    /// The valid LBA formats (`lba_format_count` of them).
    pub lba_formats: Vec<LbaFormat>,
}

impl IdentifyNamespace {
    pub fn parse(b: &[u8; IDENTIFY_BYTES]) -> Self {
        // NLBAF is 0's based and at most 63 (64 formats, 128 + 64 * 4 = 384 bytes).
        let lba_format_count = (b[25] as usize + 1).min(64);
        let lba_formats = (0..lba_format_count)
            .map(|i| LbaFormat::decode(le32(b, 128 + 4 * i)))
            .collect();
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&b[120..128]);
        Self {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nuse: le64(b, 16),
            nsfeat: b[24],
            lba_format_count: lba_format_count as u8,
            flbas: b[26],
            mc: b[27],
            dpc: b[28],
            dps: b[29],
            nguid,
            eui64,
            lba_formats,
        }
    }

    pub fn encode(&self) -> [u8; IDENTIFY_BYTES] {
        let mut b = [0u8; IDENTIFY_BYTES];
        put64(&mut b, 0, self.nsze);
        put64(&mut b, 8, self.ncap);
        put64(&mut b, 16, self.nuse);
        b[24] = self.nsfeat;
        b[25] = self.lba_format_count.saturating_sub(1);
        b[26] = self.flbas;
        b[27] = self.mc;
        b[28] = self.dpc;
        b[29] = self.dps;
        b[104..120].copy_from_slice(&self.nguid);
        b[120..128].copy_from_slice(&self.eui64);
        for (i, format) in self.lba_formats.iter().take(64).enumerate() {
            put32(&mut b, 128 + 4 * i, format.encode());
        }
        b
    }

    /// Index of the format in use: FLBAS bits 3:0, with bits 6:5 as the upper bits when more
    /// than 16 formats exist.
    pub fn current_format_index(&self) -> usize {
        let low = usize::from(self.flbas & 0xf);
        if self.lba_format_count > 16 {
            low | (usize::from((self.flbas >> 5) & 3) << 4)
        } else {
            low
        }
    }

    /// The format in use, `None` when FLBAS names a format the namespace does not list.
    pub fn current_format(&self) -> Option<LbaFormat> {
        self.lba_formats.get(self.current_format_index()).copied()
    }

    /// Block size of the format in use.
    pub fn block_size_bytes(&self) -> Option<u32> {
        self.current_format()?.block_size_bytes()
    }

    /// FLBAS bit 4: metadata is transferred at the end of each block (extended LBA).
    pub fn metadata_extended(&self) -> bool {
        self.flbas & (1 << 4) != 0
    }
}

/// Parses an active namespace ID list (CNS 02h): increasing NSIDs, terminated by 0. Entries
/// that do not increase are dropped (a broken device), so the result is strictly increasing.
pub fn parse_active_ns_list(b: &[u8; IDENTIFY_BYTES]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut last = 0u32;
    for i in 0..IDENTIFY_BYTES / 4 {
        let nsid = le32(b, 4 * i);
        if nsid == 0 {
            break;
        }
        if nsid > last && nsid != u32::MAX {
            out.push(nsid);
            last = nsid;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Log pages (5.16.1)

pub const ERROR_LOG_ENTRY_BYTES: usize = 64;
pub const SMART_LOG_BYTES: usize = 512;

/// One Error Information log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// 0 marks an unused entry.
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
    pub parameter_error_location: u16,
    pub lba: u64,
    pub nsid: u32,
    pub vendor_specific_log_page: u8,
    pub transport_type: u8,
    pub command_specific: u64,
}

impl ErrorLogEntry {
    pub fn parse(b: &[u8; ERROR_LOG_ENTRY_BYTES]) -> Self {
        Self {
            error_count: le64(b, 0),
            sqid: le16(b, 8),
            cid: le16(b, 10),
            // Bits 15:1 hold the status field, bit 0 the phase tag.
            status: Status::from_field(le16(b, 12) >> 1),
            parameter_error_location: le16(b, 14),
            lba: le64(b, 16),
            nsid: le32(b, 24),
            vendor_specific_log_page: b[28],
            transport_type: b[29],
            command_specific: le64(b, 32),
        }
    }

    /// Parses every used entry of an error log (`bytes` a multiple of 64; a tail is ignored).
    pub fn parse_log(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(ERROR_LOG_ENTRY_BYTES)
            .filter_map(|chunk| <&[u8; ERROR_LOG_ENTRY_BYTES]>::try_from(chunk).ok())
            .map(Self::parse)
            .filter(|entry| entry.error_count != 0)
            .collect()
    }
}

/// SMART / Health Information log page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Composite temperature in kelvins.
    pub temperature_k: u16,
    pub available_spare_percent: u8,
    pub available_spare_threshold_percent: u8,
    pub percentage_used: u8,
    pub endurance_group_critical_warning: u8,
    /// In thousands of 512-byte units.
    pub data_units_read: u128,
    pub data_units_written: u128,
    pub host_read_commands: u128,
    pub host_write_commands: u128,
    pub controller_busy_time_min: u128,
    pub power_cycles: u128,
    pub power_on_hours: u128,
    /// "Unsafe Shutdowns" in the spec: power lost without a shutdown notification.
    pub unclean_shutdowns: u128,
    pub media_errors: u128,
    pub error_log_entries: u128,
    pub warning_temperature_time_min: u32,
    pub critical_temperature_time_min: u32,
    /// Temperature sensors 1..=8 in kelvins (0: not implemented).
    pub temperature_sensors_k: [u16; 8],
}

impl SmartLog {
    pub fn parse(b: &[u8; SMART_LOG_BYTES]) -> Self {
        let mut temperature_sensors_k = [0u16; 8];
        for (i, t) in temperature_sensors_k.iter_mut().enumerate() {
            *t = le16(b, 200 + 2 * i);
        }
        Self {
            critical_warning: b[0],
            temperature_k: le16(b, 1),
            available_spare_percent: b[3],
            available_spare_threshold_percent: b[4],
            percentage_used: b[5],
            endurance_group_critical_warning: b[6],
            data_units_read: le128(b, 32),
            data_units_written: le128(b, 48),
            host_read_commands: le128(b, 64),
            host_write_commands: le128(b, 80),
            controller_busy_time_min: le128(b, 96),
            power_cycles: le128(b, 112),
            power_on_hours: le128(b, 128),
            unclean_shutdowns: le128(b, 144),
            media_errors: le128(b, 160),
            error_log_entries: le128(b, 176),
            warning_temperature_time_min: le32(b, 192),
            critical_temperature_time_min: le32(b, 196),
            temperature_sensors_k,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Features (5.27.1)

/// Number of Queues (FID 07h): CDW11 on set, DW0 on completion; 0's based counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NumberOfQueues {
    pub io_sqs: u16,
    pub io_cqs: u16,
}

impl NumberOfQueues {
    /// From DW0 / CDW11. A value of 0xffff (65536 queues) is not allowed and saturates.
    pub fn decode(raw: u32) -> Self {
        Self {
            io_sqs: (raw as u16).saturating_add(1),
            io_cqs: ((raw >> 16) as u16).saturating_add(1),
        }
    }

    pub fn encode(&self) -> u32 {
        u32::from(self.io_sqs.saturating_sub(1)) | (u32::from(self.io_cqs.saturating_sub(1)) << 16)
    }
}

/// Volatile Write Cache (FID 06h): CDW11 / DW0 bit 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolatileWriteCache {
    pub enabled: bool,
}

impl VolatileWriteCache {
    pub fn decode(raw: u32) -> Self {
        Self {
            enabled: raw & 1 != 0,
        }
    }

    pub fn encode(&self) -> u32 {
        u32::from(self.enabled)
    }
}

/// Asynchronous event (AER completion DW0, 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// 0 error, 1 SMART/health, 2 notice, 6 I/O command set specific, 7 vendor.
    pub event_type: u8,
    pub event_info: u8,
    pub log_page: u8,
}

impl AsyncEvent {
    pub fn decode(dw0: u32) -> Self {
        Self {
            event_type: (dw0 & 7) as u8,
            event_info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    pub fn encode(&self) -> u32 {
        u32::from(self.event_type & 7)
            | (u32::from(self.event_info) << 8)
            | (u32::from(self.log_page) << 16)
    }
}

// ---------------------------------------------------------------------------------------
// SGL descriptors (4.1.8)

pub const SGL_DESCRIPTOR_BYTES: usize = 16;
/// Descriptor type in bits 7:4 of byte 15.
pub const SGL_TYPE_DATA_BLOCK: u8 = 0x0;
pub const SGL_TYPE_SEGMENT: u8 = 0x2;
pub const SGL_TYPE_LAST_SEGMENT: u8 = 0x3;

/// An SGL descriptor: address, length, type (sub type 0: address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SglDescriptor {
    pub address: u64,
    pub length: u32,
    pub descriptor_type: u8,
}

impl SglDescriptor {
    pub fn encode(&self) -> [u8; SGL_DESCRIPTOR_BYTES] {
        let mut b = [0u8; SGL_DESCRIPTOR_BYTES];
        put64(&mut b, 0, self.address);
        put32(&mut b, 8, self.length);
        b[15] = self.descriptor_type << 4;
        b
    }

    pub fn decode(b: &[u8; SGL_DESCRIPTOR_BYTES]) -> Self {
        Self {
            address: le64(b, 0),
            length: le32(b, 8),
            descriptor_type: b[15] >> 4,
        }
    }

    /// As the two DPTR quadwords of a command.
    pub fn to_dptr(&self) -> [u64; 2] {
        let b = self.encode();
        [le64(&b, 0), le64(&b, 8)]
    }

    pub fn from_dptr(dptr: [u64; 2]) -> Self {
        let mut b = [0u8; SGL_DESCRIPTOR_BYTES];
        b[..8].copy_from_slice(&dptr[0].to_le_bytes());
        b[8..].copy_from_slice(&dptr[1].to_le_bytes());
        Self::decode(&b)
    }
}

// ---------------------------------------------------------------------------------------
// NVMe over Fabrics (NVMe over Fabrics 1.1): Fabrics commands, Connect data, properties,
// the discovery log page, Namespace Identification Descriptors (Base 2.0, 5.17.2.3).

/// Fabrics command types (FCTYPE, byte 4 of a Fabrics command; NVMe-oF 1.1 Figure 13).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTHENTICATION_SEND: u8 = 0x05;
    pub const AUTHENTICATION_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// The well-known NQN of a discovery controller (NVMe-oF 1.1, 7.1).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Identify Controller CNTRLTYPE.
pub const CNTRLTYPE_IO: u8 = 1;
pub const CNTRLTYPE_DISCOVERY: u8 = 2;
/// Connect's CNTLID for "any controller" (the dynamic controller model).
pub const CNTLID_DYNAMIC: u16 = 0xffff;

/// FCTYPE of a Fabrics command (the low byte of the NSID field's position).
pub fn fabrics_type(cmd: &Command) -> u8 {
    cmd.nsid as u8
}

/// The Connect command's fields (NVMe-oF 1.1, Figure 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectCommand {
    /// Record format (0).
    pub recfmt: u16,
    /// Queue to connect (0: admin).
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect attributes (bit 2: disable SQ flow control).
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only; 0: off).
    pub kato_ms: u32,
}

impl ConnectCommand {
    /// Byte offsets in the SQE, for a Connect Invalid Parameters IPO.
    pub const QID_OFFSET: u16 = 42;
    pub const SQSIZE_OFFSET: u16 = 44;

    pub fn from_command(cmd: &Command) -> Self {
        Self {
            recfmt: cmd.cdw10 as u16,
            qid: (cmd.cdw10 >> 16) as u16,
            sqsize: cmd.cdw11 as u16,
            cattr: (cmd.cdw11 >> 16) as u8,
            kato_ms: cmd.cdw12,
        }
    }

    /// The Fabrics command (CID, SGL and PSDT left to the transport).
    pub fn to_command(&self) -> Command {
        let mut cmd = Command::new(opc::FABRICS);
        cmd.nsid = u32::from(fctype::CONNECT);
        cmd.cdw10 = u32::from(self.recfmt) | (u32::from(self.qid) << 16);
        cmd.cdw11 = u32::from(self.sqsize) | (u32::from(self.cattr) << 16);
        cmd.cdw12 = self.kato_ms;
        cmd
    }
}

pub const CONNECT_DATA_BYTES: usize = 1024;

/// The Connect command's data (NVMe-oF 1.1, Figure 20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    /// The controller to connect to: [`CNTLID_DYNAMIC`] for the admin queue, the one the
    /// admin Connect returned for an I/O queue.
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl ConnectData {
    /// Byte offsets in the data, for a Connect Invalid Parameters IPO.
    pub const CNTLID_OFFSET: u16 = 16;
    pub const SUBNQN_OFFSET: u16 = 256;
    pub const HOSTNQN_OFFSET: u16 = 512;

    pub fn parse(b: &[u8; CONNECT_DATA_BYTES]) -> Self {
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        Self {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn_field(&b[256..512]),
            hostnqn: nqn_field(&b[512..768]),
        }
    }

    pub fn encode(&self) -> [u8; CONNECT_DATA_BYTES] {
        let mut b = [0u8; CONNECT_DATA_BYTES];
        b[0..16].copy_from_slice(&self.hostid);
        put16(&mut b, 16, self.cntlid);
        put_nqn(&mut b[256..512], &self.subnqn);
        put_nqn(&mut b[512..768], &self.hostnqn);
        b
    }
}

/// A Connect response's DW0 on failure with Connect Invalid Parameters (NVMe-oF 1.1,
/// Figure 21): IATTR (bit 0: the bad field is in the data, else in the command) and IPO (the
/// byte offset of the field).
pub fn connect_invalid_dw0(in_data: bool, offset: u16) -> u32 {
    u32::from(in_data) | (u32::from(offset) << 16)
}

/// A Property Get / Set command (NVMe-oF 1.1, Figures 23, 25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertyCommand {
    /// 8-byte property (ATTRIB bits 2:0 = 1), else 4 bytes.
    pub eight_bytes: bool,
    pub offset: u32,
    /// Property Set's value.
    pub value: u64,
}

impl PropertyCommand {
    pub fn from_command(cmd: &Command) -> Self {
        Self {
            eight_bytes: cmd.cdw10 & 7 == 1,
            offset: cmd.cdw11,
            value: u64::from(cmd.cdw12) | (u64::from(cmd.cdw13) << 32),
        }
    }

    pub fn to_command(&self, fabrics_type: u8) -> Command {
        let mut cmd = Command::new(opc::FABRICS);
        cmd.nsid = u32::from(fabrics_type);
        cmd.cdw10 = u32::from(self.eight_bytes);
        cmd.cdw11 = self.offset;
        cmd.cdw12 = self.value as u32;
        cmd.cdw13 = (self.value >> 32) as u32;
        cmd
    }
}

/// Discovery log page (NVMe-oF 1.1, Figures 30, 31): a 1024-byte header then 1024-byte entries.
pub const DISCOVERY_LOG_HEADER_BYTES: usize = 1024;
pub const DISCOVERY_LOG_ENTRY_BYTES: usize = 1024;
/// TRTYPE: TCP.
pub const TRTYPE_TCP: u8 = 3;
/// ADRFAM: IPv4, IPv6.
pub const ADRFAM_IPV4: u8 = 1;
pub const ADRFAM_IPV6: u8 = 2;
/// SUBTYPE: a discovery service referral, an NVM subsystem, the current discovery subsystem.
pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
pub const SUBTYPE_NVME: u8 = 2;
pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;
/// TREQ: secure channel not required.
pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 2;

/// The discovery log page header's fields.
pub fn encode_discovery_log_header(genctr: u64, numrec: u64) -> [u8; DISCOVERY_LOG_HEADER_BYTES] {
    let mut b = [0u8; DISCOVERY_LOG_HEADER_BYTES];
    put64(&mut b, 0, genctr);
    put64(&mut b, 8, numrec);
    // RECFMT 0.
    b
}

/// One discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    pub eflags: u16,
    /// Transport service identifier (the TCP port, in ASCII).
    pub trsvcid: String,
    pub subnqn: String,
    /// Transport address (the IP address, in ASCII).
    pub traddr: String,
    /// TCP: security type (0: none).
    pub tsas_sectype: u8,
}

impl DiscoveryLogEntry {
    pub fn encode(&self) -> [u8; DISCOVERY_LOG_ENTRY_BYTES] {
        let mut b = [0u8; DISCOVERY_LOG_ENTRY_BYTES];
        b[0] = self.trtype;
        b[1] = self.adrfam;
        b[2] = self.subtype;
        b[3] = self.treq;
        put16(&mut b, 4, self.portid);
        put16(&mut b, 6, self.cntlid);
        put16(&mut b, 8, self.asqsz);
        put16(&mut b, 10, self.eflags);
        // TRSVCID and TRADDR are space padded, SUBNQN NUL padded (Figure 31).
        put_ascii(&mut b[32..64], &self.trsvcid);
        put_nqn(&mut b[256..512], &self.subnqn);
        put_ascii(&mut b[512..768], &self.traddr);
        b[768] = self.tsas_sectype;
        b
    }

    pub fn parse(b: &[u8; DISCOVERY_LOG_ENTRY_BYTES]) -> Self {
        Self {
            trtype: b[0],
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: le16(b, 4),
            cntlid: le16(b, 6),
            asqsz: le16(b, 8),
            eflags: le16(b, 10),
            trsvcid: ascii_field(&b[32..64]),
            subnqn: nqn_field(&b[256..512]),
            traddr: ascii_field(&b[512..768]),
            tsas_sectype: b[768],
        }
    }
}

/// Namespace Identification Descriptor types (Base 2.0, Figure 281).
pub mod nidt {
    pub const EUI64: u8 = 1;
    pub const NGUID: u8 = 2;
    pub const UUID: u8 = 3;
    pub const CSI: u8 = 4;
}

/// Writes a Namespace Identification Descriptor list (CNS 03h) holding `ids` (type, value),
/// in order, into a 4096-byte page; descriptors that do not fit are left out.
pub fn encode_ns_descriptors(ids: &[(u8, &[u8])]) -> [u8; IDENTIFY_BYTES] {
    let mut b = [0u8; IDENTIFY_BYTES];
    let mut at = 0usize;
    for (nidt, value) in ids {
        let end = at + 4 + value.len();
        // The list ends with a zeroed descriptor header: keep room for it.
        if value.is_empty() || value.len() > 255 || end + 4 > IDENTIFY_BYTES {
            break;
        }
        b[at] = *nidt;
        b[at + 1] = value.len() as u8;
        b[at + 4..end].copy_from_slice(value);
        at = end;
    }
    b
}

/// An NQN field: UTF-8 up to the first NUL (NVMe-oF 1.1, 7.9); control characters and
/// invalid bytes replaced, so a hostile peer cannot inject them in logs.
fn nqn_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Writes an NQN NUL padded (at most 255 bytes, so a NUL always ends it).
fn put_nqn(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len().saturating_sub(1));
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

// ---------------------------------------------------------------------------------------
// Little-endian helpers: callers pass constant offsets inside fixed-size arrays.

fn le16(b: &[u8], off: usize) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(v)
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn le128(b: &[u8], off: usize) -> u128 {
    let mut v = [0u8; 16];
    v.copy_from_slice(&b[off..off + 16]);
    u128::from_le_bytes(v)
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Space-padded ASCII field (serial, model, firmware): trailing spaces and NULs removed,
/// non-printable bytes replaced so a hostile device cannot inject control characters in logs.
fn ascii_field(b: &[u8]) -> String {
    let s: String = b
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else if c == 0 {
                ' '
            } else {
                '?'
            }
        })
        .collect();
    s.trim_end().to_string()
}

fn put_ascii(b: &mut [u8], s: &str) {
    b.fill(b' ');
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trip() {
        let mut c = Command::new(opc::READ);
        c.cid = 0x1234;
        c.nsid = 1;
        c.dptr = [0x1000, 0x2000];
        c.cdw10 = 7;
        c.cdw12 = 0xffff;
        c.psdt = Psdt::SglMptrAddress;
        let b = c.encode();
        assert_eq!(b[0], opc::READ);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0x1234);
        assert_eq!(b[1] >> 6, 1, "PSDT in CDW0 bits 15:14");
        assert_eq!(Command::decode(&b), c);
        c.fuse = 1;
        c.mptr = 0xdead_beef_0000;
        c.cdw2 = 0x0a0b_0c0d;
        c.cdw15 = 0x8000_0001;
        let words: Vec<u8> = c
            .encode_words()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(words, c.encode(), "word encoding matches the byte encoding");
    }

    #[test]
    fn completion_round_trip_and_status_field() {
        let cpl = Completion {
            dw0: 5,
            dw1: 0,
            sq_head: 3,
            sq_id: 2,
            cid: 9,
            phase: true,
            status: Status::new(StatusCodeType::MediaDataIntegrity, 0x81).with_dnr(true),
        };
        let b = cpl.encode();
        let dw3 = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        assert_eq!(dw3 & 0xffff, 9);
        assert_eq!((dw3 >> 16) & 1, 1);
        assert_eq!((dw3 >> 17) & 0xff, 0x81, "SC in bits 24:17");
        assert_eq!((dw3 >> 25) & 7, 2, "SCT in bits 27:25");
        assert_eq!(dw3 >> 31, 1, "DNR in bit 31");
        assert_eq!(Completion::decode(&b), cpl);
        let mut low = [0u8; 8];
        let mut high = [0u8; 8];
        low.copy_from_slice(&b[..8]);
        high.copy_from_slice(&b[8..]);
        let words = [u64::from_le_bytes(low), u64::from_le_bytes(high)];
        assert_eq!(Completion::from_words(words), cpl);
    }

    #[test]
    fn status_names() {
        assert_eq!(Status::SUCCESS.name(), "Successful Completion");
        assert_eq!(
            Status::generic(sc::INVALID_FIELD).name(),
            "Invalid Field in Command"
        );
        assert_eq!(
            Status::generic(sc::LBA_OUT_OF_RANGE).name(),
            "LBA Out of Range"
        );
        assert_eq!(
            Status::new(
                StatusCodeType::CommandSpecific,
                sc::INVALID_QUEUE_IDENTIFIER
            )
            .name(),
            "Invalid Queue Identifier"
        );
        assert_eq!(
            Status::new(StatusCodeType::CommandSpecific, 0x82).name(),
            "Attempted Write to Read Only Range"
        );
        assert_eq!(
            Status::new(StatusCodeType::MediaDataIntegrity, 0x81).name(),
            "Unrecovered Read Error"
        );
        assert_eq!(
            Status::new(StatusCodeType::Path, 0x71).name(),
            "Command Aborted By Host"
        );
        assert_eq!(
            Status::new(StatusCodeType::Generic, 0x7f).name(),
            "Reserved Generic Status"
        );
        let shown = Status::generic(sc::ABORTED_SQ_DELETION)
            .with_dnr(true)
            .to_string();
        assert_eq!(
            shown,
            "Command Aborted due to SQ Deletion (sct 0x0, sc 0x08, do not retry)"
        );
        // Every 15-bit field decodes and re-encodes losslessly.
        for field in 0..(1u16 << 15) {
            assert_eq!(Status::from_field(field).to_field(), field);
        }
    }

    #[test]
    fn registers_decode() {
        // MQES 1023, CQR, TO 30 (15 s), DSTRD 2 (16 bytes), CSS NVM, MPSMIN 0, MPSMAX 4.
        let raw = 1023 | (1 << 16) | (30 << 24) | (2u64 << 32) | (1u64 << 37) | (4u64 << 52);
        let cap = Cap::decode(raw);
        assert_eq!(cap.max_queue_entries, 1024);
        assert!(cap.contiguous_queues_required);
        assert_eq!(cap.timeout_ms, 15_000);
        assert_eq!(cap.doorbell_stride_bytes, 16);
        assert_eq!(cap.command_sets, 1);
        assert_eq!(cap.page_size_min_bytes, 4096);
        assert_eq!(cap.page_size_max_bytes, 65536);
        assert_eq!(sq_tail_doorbell(1, 16), 0x1020);
        assert_eq!(shadow_sq_tail_offset(3, 4), 24);
        assert_eq!(shadow_cq_head_offset(3, 16), 112);
        // The controller saw up to 10: moving 10 -> 12 passes it, 12 -> 14 does not.
        assert!(need_event(10, 12, 10, 256));
        assert!(!need_event(10, 14, 12, 256));
        // Across the wrap of a 256-entry ring: 250 -> 4 passes 252 and 255, not 100.
        assert!(need_event(252, 4, 250, 256));
        assert!(need_event(255, 4, 250, 256));
        assert!(!need_event(100, 4, 250, 256));
        // Nothing moved: never.
        assert!(!need_event(7, 7, 7, 256));
        assert_eq!(cq_head_doorbell(1, 16), 0x1030);
        let cc = Cc {
            enable: true,
            css: 0,
            mps: 0,
            ams: 0,
            shn: 1,
            iosqes: 6,
            iocqes: 4,
        };
        assert_eq!(cc.encode(), 1 | (1 << 14) | (6 << 16) | (4 << 20));
        assert_eq!(Cc::decode(cc.encode()), cc);
        let csts = Csts::decode(CSTS_RDY | CSTS_SHST_COMPLETE);
        assert!(csts.ready && !csts.fatal && csts.shutdown_status == 2);
        assert!(Csts::decode(u32::MAX).is_all_ones());
        let aqa = Aqa {
            sq_entries: 32,
            cq_entries: 64,
        };
        assert_eq!(aqa.encode(), (63 << 16) | 31);
        assert_eq!(Aqa::decode(aqa.encode()), aqa);
        assert_eq!(Version::decode(0x0001_0400).to_string(), "1.4.0");
    }

    #[test]
    fn identify_controller_parse() {
        let mut b = [0u8; IDENTIFY_BYTES];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"deadbeef            ");
        b[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
        b[64..72].copy_from_slice(b"8.0.0   ");
        b[77] = 7;
        b[256..258].copy_from_slice(&(0x010au16).to_le_bytes());
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        b[520..522].copy_from_slice(&(ONCS_DSM | ONCS_WRITE_ZEROES).to_le_bytes());
        b[525] = 1;
        b[536..540].copy_from_slice(&0x0010_0001u32.to_le_bytes());
        let id = IdentifyController::parse(&b);
        assert_eq!(id.vid, 0x1b36);
        assert_eq!(id.serial, "deadbeef");
        assert_eq!(id.model, "QEMU NVMe Ctrl");
        assert_eq!(id.firmware, "8.0.0");
        assert_eq!(id.max_transfer_bytes(4096), Some(512 * 1024));
        // A limit past 64 bits is no limit, never 0 bytes (bits shifted off the top).
        let huge = IdentifyController {
            mdts: 42,
            ..id.clone()
        };
        assert_eq!(huge.max_transfer_bytes(4096 << 15), None);
        assert_eq!(huge.max_transfer_bytes(4096), Some(4096 << 42));
        assert!(id.supports_doorbell_buffer_config());
        assert!(id.supports_sgl());
        assert!(id.has_volatile_write_cache());
        assert_eq!(id.nn, 256);
        assert_eq!(IdentifyController::parse(&id.encode()), id);
        // Control characters from a hostile device are neutralised.
        b[4] = 0x1b;
        assert_eq!(IdentifyController::parse(&b).serial, "?eadbeef");
    }

    #[test]
    fn identify_namespace_parse() {
        let mut b = [0u8; IDENTIFY_BYTES];
        b[0..8].copy_from_slice(&1000u64.to_le_bytes());
        b[8..16].copy_from_slice(&1000u64.to_le_bytes());
        b[16..24].copy_from_slice(&10u64.to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // second in use
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&((12u32 << 16) | 8).to_le_bytes());
        let ns = IdentifyNamespace::parse(&b);
        assert_eq!(ns.nsze, 1000);
        assert_eq!(ns.nuse, 10);
        assert_eq!(ns.lba_formats.len(), 2);
        assert_eq!(ns.block_size_bytes(), Some(4096));
        assert_eq!(ns.current_format().map(|f| f.metadata_bytes), Some(8));
        assert_eq!(IdentifyNamespace::parse(&ns.encode()), ns);
        // FLBAS naming a format that does not exist: no block size, no panic.
        b[26] = 5;
        assert_eq!(IdentifyNamespace::parse(&b).block_size_bytes(), None);
        // NLBAF = 255 is clamped to 64 formats.
        b[25] = 255;
        assert_eq!(IdentifyNamespace::parse(&b).lba_formats.len(), 64);
    }

    #[test]
    fn active_ns_list_drops_non_increasing() {
        let mut b = [0u8; IDENTIFY_BYTES];
        for (i, nsid) in [1u32, 2, 2, 1, 7].iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&nsid.to_le_bytes());
        }
        assert_eq!(parse_active_ns_list(&b), vec![1, 2, 7]);
    }

    #[test]
    fn log_pages_parse() {
        let mut e = [0u8; 128];
        e[0..8].copy_from_slice(&3u64.to_le_bytes());
        e[8..10].copy_from_slice(&1u16.to_le_bytes());
        e[10..12].copy_from_slice(&42u16.to_le_bytes());
        e[12..14].copy_from_slice(&((0x281u16 << 1) | 1).to_le_bytes());
        let entries = ErrorLogEntry::parse_log(&e);
        assert_eq!(entries.len(), 1, "the zero entry is unused");
        assert_eq!(entries[0].cid, 42);
        assert_eq!(entries[0].status.name(), "Unrecovered Read Error");

        let mut s = [0u8; SMART_LOG_BYTES];
        s[0] = 0x4;
        s[1..3].copy_from_slice(&310u16.to_le_bytes());
        s[3] = 100;
        s[128..144].copy_from_slice(&12345u128.to_le_bytes());
        let smart = SmartLog::parse(&s);
        assert_eq!(smart.critical_warning, 4);
        assert_eq!(smart.temperature_k, 310);
        assert_eq!(smart.power_on_hours, 12345);
    }

    #[test]
    fn features_encode() {
        let q = NumberOfQueues {
            io_sqs: 4,
            io_cqs: 8,
        };
        assert_eq!(q.encode(), (7 << 16) | 3);
        assert_eq!(NumberOfQueues::decode(q.encode()), q);
        assert!(VolatileWriteCache::decode(1).enabled);
        let ev = AsyncEvent {
            event_type: 1,
            event_info: 2,
            log_page: 2,
        };
        assert_eq!(AsyncEvent::decode(ev.encode()), ev);
        let d = SglDescriptor {
            address: 0xdead_0000,
            length: 4096,
            descriptor_type: SGL_TYPE_LAST_SEGMENT,
        };
        assert_eq!(SglDescriptor::from_dptr(d.to_dptr()), d);
        assert_eq!(d.encode()[15], 0x30);
    }

    #[test]
    fn fabrics_structures_round_trip() {
        let data = ConnectData {
            hostid: [7; 16],
            cntlid: CNTLID_DYNAMIC,
            subnqn: "nqn.2016-06.io.spdk:cnode1".to_string(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".to_string(),
        };
        let bytes = data.encode();
        assert_eq!(&bytes[256..282], b"nqn.2016-06.io.spdk:cnode1");
        assert_eq!(ConnectData::parse(&bytes), data);
        let connect = ConnectCommand {
            recfmt: 0,
            qid: 2,
            sqsize: 127,
            cattr: 0,
            kato_ms: 5000,
        };
        let cmd = connect.to_command();
        assert_eq!(cmd.encode()[42], 2, "QID at byte 42");
        assert_eq!(fabrics_type(&cmd), fctype::CONNECT);
        assert_eq!(
            ConnectCommand::from_command(&Command::decode(&cmd.encode())),
            connect
        );
        let entry = DiscoveryLogEntry {
            trtype: TRTYPE_TCP,
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            treq: TREQ_SECURE_CHANNEL_NOT_REQUIRED,
            portid: 1,
            cntlid: CNTLID_DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420".to_string(),
            subnqn: "nqn.2016-06.io.spdk:cnode1".to_string(),
            traddr: "127.0.0.1".to_string(),
            tsas_sectype: 0,
        };
        let bytes = entry.encode();
        assert_eq!(&bytes[32..38], b"4420  ");
        assert_eq!(DiscoveryLogEntry::parse(&bytes), entry);
        let page = encode_ns_descriptors(&[(nidt::UUID, &[1; 16]), (nidt::CSI, &[0])]);
        assert_eq!(&page[..4], &[nidt::UUID, 16, 0, 0]);
        assert_eq!(&page[20..25], &[nidt::CSI, 1, 0, 0, 0]);
        assert_eq!(page[25..].iter().filter(|&&b| b != 0).count(), 0);
    }
}
