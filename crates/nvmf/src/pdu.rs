//! NVMe/TCP PDUs: the codec (NVMe/TCP Transport Specification 1.0, section 3.6 "PDU
//! Formats"; figure numbers below are that document's, revision 1.0c).
//!
//! Pure encode and decode over byte buffers: no socket, no allocation, no state beyond what
//! the caller passes in ([`Limits`], [`EncodeOptions`]). The target (`conn.rs`) uses it in two
//! steps, so that data can be received straight into its destination: the 8-byte common
//! header first ([`parse_common_header`], which says how long the header, padding, data and
//! digests are), then the rest of the header ([`decode_header`]); an initiator can do the
//! same, or use [`decode`] on a buffer holding a whole PDU. Every check that fails returns a
//! [`PduError`] carrying the Fatal Error Status (FES) and Fatal Error Information (FEI) the
//! specification assigns (Figure 25, H2CTermReq / C2HTermReq), so the caller can answer with
//! a termination request naming the offending field. Decoding never panics and never reads
//! past the buffer it was given, whatever the bytes (the `nvmf_pdu` fuzz target checks it).
//!
//! Digests are CRC32C (3.6.2.2, the Castagnoli polynomial as iSCSI uses it), over
//! the header (common header and PDU specific header, not the padding) and over the data
//! segment (not the padding), each stored little endian after what it covers.

use pollux_nvme::spec::{Command, Completion, CQE_BYTES, SQE_BYTES};

/// Common header length (3.6.1, Figure 13).
pub const CH_BYTES: usize = 8;
/// One digest (HDGST or DDGST).
pub const DIGEST_BYTES: usize = 4;
/// PDU Format Version 1.0 (ICReq / ICResp PFV).
pub const PFV_1_0: u16 = 0;
/// Largest PDU data alignment a peer may ask for (HPDA / CPDA are 0's based dwords, 0..=31).
pub const MAX_PDA: u8 = 31;
/// Error data a termination request carries at most: the header of the PDU in error
/// (Figure 25: up to 128 bytes; SPDK and Linux use the same bound).
pub const MAX_TERM_REQ_DATA_BYTES: usize = 128;
/// The largest header of any PDU type with its digest (ICReq / ICResp: 128 bytes, no digest).
pub const MAX_HEADER_BYTES: usize = 128;

/// Header lengths (HLEN) per type, fixed by the specification (Figures 19-30).
pub mod hlen {
    pub const IC_REQ: u8 = 128;
    pub const IC_RESP: u8 = 128;
    pub const TERM_REQ: u8 = 24;
    pub const CAPSULE_CMD: u8 = 72;
    pub const CAPSULE_RESP: u8 = 24;
    pub const DATA: u8 = 24;
    pub const R2T: u8 = 24;
}

/// Common header flags (Figure 13 and the per-type figures).
pub mod flags {
    /// HDGSTF: a header digest follows the header.
    pub const HDGST: u8 = 0x01;
    /// DDGSTF: a data digest follows the data.
    pub const DDGST: u8 = 0x02;
    /// H2CData / C2HData: the last data PDU of the command.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully, no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// ICReq / ICResp DGST field bits (Figures 26, 27).
const DGST_HEADER: u8 = 0x01;
const DGST_DATA: u8 = 0x02;

/// Fatal Error Status values of a termination request (Figure 25).
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// R2T Limit Exceeded / Data Transfer Limit Exceeded share the value.
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Byte offsets of header fields, for the FEI of an Invalid PDU Header Field error.
mod at {
    pub const FLAGS: u32 = 1;
    pub const HLEN: u32 = 2;
    pub const PDO: u32 = 3;
    pub const PLEN: u32 = 4;
    /// ICReq HPDA / ICResp CPDA.
    pub const PDA: u32 = 10;
    /// H2CData / C2HData DATAL.
    pub const DATAL: u32 = 16;
}

/// PDU types (Figure 13, PDU-Type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2cTermReq = 0x02,
    C2hTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2cData = 0x06,
    C2hData = 0x07,
    R2t = 0x09,
}

impl PduType {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2cTermReq,
            0x03 => Self::C2hTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2cData,
            0x07 => Self::C2hData,
            0x09 => Self::R2t,
            _ => return None,
        })
    }

    /// The fixed HLEN of the type.
    pub fn hlen(self) -> u8 {
        match self {
            Self::IcReq => hlen::IC_REQ,
            Self::IcResp => hlen::IC_RESP,
            Self::H2cTermReq | Self::C2hTermReq => hlen::TERM_REQ,
            Self::CapsuleCmd => hlen::CAPSULE_CMD,
            Self::CapsuleResp => hlen::CAPSULE_RESP,
            Self::H2cData | Self::C2hData => hlen::DATA,
            Self::R2t => hlen::R2T,
        }
    }

    /// Whether PDUs of this type carry digests once negotiated (all but the connection
    /// set-up and termination PDUs, 3.6.2).
    pub fn has_digests(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2cTermReq | Self::C2hTermReq
        )
    }

    /// Whether PDUs of this type may carry a data segment.
    pub fn may_carry_data(self) -> bool {
        matches!(
            self,
            Self::CapsuleCmd | Self::H2cData | Self::C2hData | Self::H2cTermReq | Self::C2hTermReq
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::IcReq => "ICReq",
            Self::IcResp => "ICResp",
            Self::H2cTermReq => "H2CTermReq",
            Self::C2hTermReq => "C2HTermReq",
            Self::CapsuleCmd => "CapsuleCmd",
            Self::CapsuleResp => "CapsuleResp",
            Self::H2cData => "H2CData",
            Self::C2hData => "C2HData",
            Self::R2t => "R2T",
        }
    }
}

impl std::fmt::Display for PduType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a PDU was refused. Each variant maps to the FES / FEI a termination request carries
/// ([`PduError::fes`], [`PduError::fei`]); all of them are fatal to the connection (3.6.2.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("PDU truncated: {have} bytes, the PDU needs {need}")]
    Truncated { have: usize, need: usize },
    #[error("unknown PDU type {pdu_type:#04x}")]
    UnknownType { pdu_type: u8 },
    #[error("{pdu_type}: flags {flags:#04x} do not match the negotiated digests or the PDU")]
    BadFlags { pdu_type: PduType, flags: u8 },
    #[error("{pdu_type}: HLEN {hlen}, the type's is {expected}")]
    BadHlen {
        pdu_type: PduType,
        hlen: u8,
        expected: u8,
    },
    #[error("{pdu_type}: PDO {pdo} invalid ({reason})")]
    BadPdo {
        pdu_type: PduType,
        pdo: u8,
        reason: &'static str,
    },
    #[error("{pdu_type}: PLEN {plen} invalid ({reason})")]
    BadPlen {
        pdu_type: PduType,
        plen: u32,
        reason: &'static str,
    },
    #[error("{pdu_type}: {len} data bytes, at most {max} negotiated")]
    DataTooLong {
        pdu_type: PduType,
        len: u64,
        max: u64,
    },
    #[error("{pdu_type}: DATAL {datal} but the PDU carries {segment} data bytes")]
    BadDataLength {
        pdu_type: PduType,
        datal: u32,
        segment: u64,
    },
    #[error("{pdu_type}: PDU data alignment {pda} above {MAX_PDA}")]
    BadPda { pdu_type: PduType, pda: u8 },
    #[error("header digest {received:#010x}, computed {computed:#010x}")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest {received:#010x}, computed {computed:#010x}")]
    DataDigest { received: u32, computed: u32 },
    #[error("PDU format version {pfv} unsupported (only 1.0)")]
    UnsupportedPfv { pfv: u16 },
    #[error("{pdu_type} not expected {state}")]
    Sequence {
        pdu_type: PduType,
        state: &'static str,
    },
    #[error("{pdu_type}: data offset {offset} + length {len} outside the expected {expected_offset}..{limit}")]
    DataOutOfRange {
        pdu_type: PduType,
        offset: u32,
        len: u32,
        expected_offset: u32,
        limit: u32,
    },
    #[error("{pdu_type} encoding: {reason}")]
    Encode {
        pdu_type: PduType,
        reason: &'static str,
    },
}

impl PduError {
    /// The Fatal Error Status of the termination request that reports this error.
    pub fn fes(&self) -> u16 {
        match self {
            Self::HeaderDigest { .. } | Self::DataDigest { .. } => fes::HEADER_DIGEST_ERROR,
            Self::Sequence { .. } => fes::PDU_SEQUENCE_ERROR,
            Self::DataOutOfRange { .. } => fes::DATA_OUT_OF_RANGE,
            Self::DataTooLong { .. } => fes::DATA_LIMIT_EXCEEDED,
            Self::UnsupportedPfv { .. } => fes::UNSUPPORTED_PARAMETER,
            Self::Truncated { .. }
            | Self::UnknownType { .. }
            | Self::BadFlags { .. }
            | Self::BadHlen { .. }
            | Self::BadPdo { .. }
            | Self::BadPlen { .. }
            | Self::BadDataLength { .. }
            | Self::BadPda { .. }
            | Self::Encode { .. } => fes::INVALID_HEADER_FIELD,
        }
    }

    /// The Fatal Error Information: for an invalid header field, the byte offset of the
    /// field in the PDU header (Figure 25); 0 otherwise.
    pub fn fei(&self) -> u32 {
        match self {
            Self::BadFlags { .. } => at::FLAGS,
            Self::BadHlen { .. } => at::HLEN,
            Self::BadPdo { .. } => at::PDO,
            Self::BadPlen { .. } | Self::Truncated { .. } | Self::DataTooLong { .. } => at::PLEN,
            Self::BadDataLength { .. } => at::DATAL,
            Self::BadPda { .. } => at::PDA,
            Self::UnsupportedPfv { .. } => 8,
            _ => 0,
        }
    }
}

/// Which digests a connection negotiated (ICReq / ICResp DGST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    fn from_bits(bits: u8) -> Self {
        Self {
            header: bits & DGST_HEADER != 0,
            data: bits & DGST_DATA != 0,
        }
    }

    fn bits(self) -> u8 {
        (if self.header { DGST_HEADER } else { 0 }) | (if self.data { DGST_DATA } else { 0 })
    }
}

/// What the receiver of a PDU negotiated: the digests, and the largest data segments it
/// accepts (the in-capsule data size for a CapsuleCmd, MAXH2CDATA for H2CData; for C2HData
/// what the initiator's buffers allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub digests: Digests,
    pub max_capsule_data_bytes: u32,
    pub max_data_pdu_bytes: u32,
}

impl Limits {
    /// Before the ICReq / ICResp exchange: no digests, and only the set-up and termination
    /// PDUs make sense (the caller checks the sequence).
    pub const INITIAL: Limits = Limits {
        digests: Digests {
            header: false,
            data: false,
        },
        max_capsule_data_bytes: 0,
        max_data_pdu_bytes: 0,
    };
}

/// What the sender uses: the negotiated digests and the receiver's PDU data alignment
/// (HPDA for a controller sending, CPDA for a host), 0's based dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    pub digests: Digests,
    pub pda: u8,
}

/// ICReq (Figure 26).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment: data in C2H PDUs starts at a multiple of (hpda + 1) dwords.
    pub hpda: u8,
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

/// ICResp (Figure 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment for H2C PDUs.
    pub cpda: u8,
    pub digests: Digests,
    /// Largest data segment of one H2CData PDU the controller accepts.
    pub maxh2cdata: u32,
}

/// H2CTermReq / C2HTermReq (Figures 24, 25); the data segment holds the offending header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// H2CData / C2HData (Figures 29, 30).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Command capsule CID the data belongs to.
    pub cccid: u16,
    /// Transfer tag from the R2T (H2CData only; reserved in C2HData).
    pub ttag: u16,
    /// Offset of this PDU's data in the command's data.
    pub datao: u32,
    /// Bytes of data in this PDU.
    pub datal: u32,
    pub last: bool,
    /// C2HData SUCCESS: the command completed, no response capsule follows.
    pub success: bool,
}

/// R2T (Figure 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// A PDU's header, typed. The data segment (if any) travels beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdu {
    IcReq(IcReq),
    IcResp(IcResp),
    H2cTermReq(TermReq),
    C2hTermReq(TermReq),
    /// A command capsule (Figure 28); in-capsule data is the data segment.
    CapsuleCmd(Command),
    /// A response capsule (Figure 29).
    CapsuleResp(Completion),
    H2cData(DataHeader),
    C2hData(DataHeader),
    R2t(R2t),
}

impl Pdu {
    pub fn pdu_type(&self) -> PduType {
        match self {
            Pdu::IcReq(_) => PduType::IcReq,
            Pdu::IcResp(_) => PduType::IcResp,
            Pdu::H2cTermReq(_) => PduType::H2cTermReq,
            Pdu::C2hTermReq(_) => PduType::C2hTermReq,
            Pdu::CapsuleCmd(_) => PduType::CapsuleCmd,
            Pdu::CapsuleResp(_) => PduType::CapsuleResp,
            Pdu::H2cData(_) => PduType::H2cData,
            Pdu::C2hData(_) => PduType::C2hData,
            Pdu::R2t(_) => PduType::R2t,
        }
    }
}

/// Where everything after the common header lies, as the common header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pdu_type: PduType,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
    /// A header digest follows the header.
    pub hdgst: bool,
    /// A data digest follows the data.
    pub ddgst: bool,
}

impl Layout {
    /// Header and its digest, from the first byte of the common header.
    pub fn header_bytes(&self) -> usize {
        usize::from(self.hlen) + if self.hdgst { DIGEST_BYTES } else { 0 }
    }

    /// Where the data segment starts (its padding ends); the end of the header when there is
    /// no data.
    pub fn data_offset(&self) -> usize {
        if self.pdo == 0 {
            self.header_bytes()
        } else {
            usize::from(self.pdo)
        }
    }

    /// Padding between the header (digest included) and the data.
    pub fn pad_bytes(&self) -> usize {
        self.data_offset().saturating_sub(self.header_bytes())
    }

    /// Bytes of data (the digest excluded). [`parse_common_header`] only builds layouts where
    /// the subtractions hold; saturating keeps a hand-built one from wrapping.
    pub fn data_bytes(&self) -> usize {
        (self.plen as usize)
            .saturating_sub(self.data_offset())
            .saturating_sub(if self.ddgst { DIGEST_BYTES } else { 0 })
    }

    /// The whole PDU.
    pub fn total_bytes(&self) -> usize {
        self.plen as usize
    }
}

/// CRC32C of `bytes` (hardware-assisted where the CPU has it, `crc32c` crate).
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Continues a CRC32C over more bytes (for data received in pieces).
#[inline]
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Checks a common header (3.6.1, Figure 13) against what the receiver negotiated and says
/// how long the rest of the PDU is. Only the lengths and flags are checked here; the PDU
/// specific header comes next ([`decode_header`]).
pub fn parse_common_header(ch: &[u8; CH_BYTES], limits: &Limits) -> Result<Layout, PduError> {
    let pdu_type = PduType::from_u8(ch[0]).ok_or(PduError::UnknownType { pdu_type: ch[0] })?;
    let flag_bits = ch[1];
    let hlen = ch[2];
    let pdo = ch[3];
    let plen = le32(ch, 4);
    let expected = pdu_type.hlen();
    if hlen != expected {
        return Err(PduError::BadHlen {
            pdu_type,
            hlen,
            expected,
        });
    }
    let bad_flags = || PduError::BadFlags {
        pdu_type,
        flags: flag_bits,
    };
    // HDGSTF must say what was negotiated on every PDU that carries digests (3.6.2.2), and
    // the set-up and termination PDUs never carry one.
    let hdgst = flag_bits & flags::HDGST != 0;
    let ddgst = flag_bits & flags::DDGST != 0;
    if pdu_type.has_digests() {
        if hdgst != limits.digests.header || (ddgst && !limits.digests.data) {
            return Err(bad_flags());
        }
    } else if hdgst || ddgst {
        return Err(bad_flags());
    }
    let header_bytes = u32::from(hlen) + if hdgst { DIGEST_BYTES as u32 } else { 0 };
    let bad_plen = |reason| PduError::BadPlen {
        pdu_type,
        plen,
        reason,
    };
    let bad_pdo = |reason| PduError::BadPdo {
        pdu_type,
        pdo,
        reason,
    };
    if plen < header_bytes {
        return Err(bad_plen("shorter than the header"));
    }
    let layout = Layout {
        pdu_type,
        flags: flag_bits,
        hlen,
        pdo,
        plen,
        hdgst,
        ddgst,
    };
    match pdu_type {
        PduType::IcReq | PduType::IcResp | PduType::CapsuleResp | PduType::R2t => {
            if pdo != 0 {
                return Err(bad_pdo("the PDU carries no data"));
            }
            // No data, so no data digest (3.6.2.2): DDGSTF set here would claim 4 bytes
            // that the PLEN does not hold (found by the nvmf_pdu fuzz target, on an R2T).
            if ddgst {
                return Err(bad_flags());
            }
            if plen != header_bytes {
                return Err(bad_plen("the PDU carries no data"));
            }
            return Ok(layout);
        }
        PduType::H2cTermReq | PduType::C2hTermReq => {
            // The error data follows the header directly (PDO reserved).
            if pdo != 0 {
                return Err(bad_pdo("reserved in a termination request"));
            }
            if (plen - header_bytes) as usize > MAX_TERM_REQ_DATA_BYTES {
                return Err(bad_plen("termination request data above 128 bytes"));
            }
            return Ok(layout);
        }
        PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData => {}
    }
    if plen == header_bytes {
        // No data segment: PDO is 0 and no data digest (3.6.2.1).
        if pdo != 0 {
            return Err(bad_pdo("set on a PDU without data"));
        }
        if ddgst {
            return Err(bad_flags());
        }
        if matches!(pdu_type, PduType::H2cData | PduType::C2hData) {
            return Err(bad_plen("a data PDU without data"));
        }
        return Ok(layout);
    }
    if u32::from(pdo) < header_bytes {
        return Err(bad_pdo("inside the header"));
    }
    if !pdo.is_multiple_of(4) {
        return Err(bad_pdo("not dword aligned"));
    }
    // The data digest is present exactly when negotiated (the PDU has data here).
    if ddgst != limits.digests.data {
        return Err(bad_flags());
    }
    let trailer = if ddgst { DIGEST_BYTES as u32 } else { 0 };
    let data_bytes = plen
        .checked_sub(u32::from(pdo))
        .and_then(|rest| rest.checked_sub(trailer))
        .filter(|&n| n > 0)
        .ok_or(bad_plen("no room for the data segment after PDO"))?;
    let max = match pdu_type {
        PduType::CapsuleCmd => limits.max_capsule_data_bytes,
        _ => limits.max_data_pdu_bytes,
    };
    if data_bytes > max {
        return Err(PduError::DataTooLong {
            pdu_type,
            len: u64::from(data_bytes),
            max: u64::from(max),
        });
    }
    Ok(layout)
}

/// Decodes the PDU specific header. `header` starts at the common header and holds at least
/// [`Layout::header_bytes`] bytes (the header digest, when present, is checked here).
pub fn decode_header(layout: &Layout, header: &[u8]) -> Result<Pdu, PduError> {
    let need = layout.header_bytes();
    if header.len() < need {
        return Err(PduError::Truncated {
            have: header.len(),
            need,
        });
    }
    let hlen = usize::from(layout.hlen);
    if layout.hdgst {
        let received = le32(header, hlen);
        let computed = crc32c(&header[..hlen]);
        if received != computed {
            return Err(PduError::HeaderDigest { received, computed });
        }
    }
    let b = &header[..hlen];
    let pdu_type = layout.pdu_type;
    let pdu = match pdu_type {
        PduType::IcReq => {
            let hpda = b[10];
            if hpda > MAX_PDA {
                return Err(PduError::BadPda {
                    pdu_type,
                    pda: hpda,
                });
            }
            Pdu::IcReq(IcReq {
                pfv: le16(b, 8),
                hpda,
                digests: Digests::from_bits(b[11]),
                maxr2t: le32(b, 12),
            })
        }
        PduType::IcResp => {
            let cpda = b[10];
            if cpda > MAX_PDA {
                return Err(PduError::BadPda {
                    pdu_type,
                    pda: cpda,
                });
            }
            Pdu::IcResp(IcResp {
                pfv: le16(b, 8),
                cpda,
                digests: Digests::from_bits(b[11]),
                maxh2cdata: le32(b, 12),
            })
        }
        PduType::H2cTermReq | PduType::C2hTermReq => {
            let term = TermReq {
                fes: le16(b, 8),
                fei: le32(b, 10),
            };
            if pdu_type == PduType::H2cTermReq {
                Pdu::H2cTermReq(term)
            } else {
                Pdu::C2hTermReq(term)
            }
        }
        PduType::CapsuleCmd => {
            let mut sqe = [0u8; SQE_BYTES];
            sqe.copy_from_slice(&b[CH_BYTES..CH_BYTES + SQE_BYTES]);
            Pdu::CapsuleCmd(Command::decode(&sqe))
        }
        PduType::CapsuleResp => {
            let mut cqe = [0u8; CQE_BYTES];
            cqe.copy_from_slice(&b[CH_BYTES..CH_BYTES + CQE_BYTES]);
            Pdu::CapsuleResp(Completion::decode(&cqe))
        }
        PduType::H2cData | PduType::C2hData => {
            let data = DataHeader {
                cccid: le16(b, 8),
                // Reserved in C2HData (Figure 30).
                ttag: if pdu_type == PduType::H2cData {
                    le16(b, 10)
                } else {
                    0
                },
                datao: le32(b, 12),
                datal: le32(b, 16),
                last: layout.flags & flags::LAST_PDU != 0,
                success: pdu_type == PduType::C2hData && layout.flags & flags::SUCCESS != 0,
            };
            let segment = layout.data_bytes() as u64;
            if u64::from(data.datal) != segment {
                return Err(PduError::BadDataLength {
                    pdu_type,
                    datal: data.datal,
                    segment,
                });
            }
            // SUCCESS only on the last PDU of a command (C2HData, Figure 30).
            if data.success && !data.last {
                return Err(PduError::BadFlags {
                    pdu_type,
                    flags: layout.flags,
                });
            }
            if pdu_type == PduType::H2cData {
                Pdu::H2cData(data)
            } else {
                Pdu::C2hData(data)
            }
        }
        PduType::R2t => Pdu::R2t(R2t {
            cccid: le16(b, 8),
            ttag: le16(b, 10),
            r2to: le32(b, 12),
            r2tl: le32(b, 16),
        }),
    };
    Ok(pdu)
}

/// Checks a received data digest: `received` against the CRC32C of the data.
pub fn check_data_digest(computed: u32, received: &[u8; DIGEST_BYTES]) -> Result<(), PduError> {
    let received = u32::from_le_bytes(*received);
    if received == computed {
        Ok(())
    } else {
        Err(PduError::DataDigest { received, computed })
    }
}

/// A whole PDU decoded from a buffer by [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub pdu: Pdu,
    /// The data segment (empty when there is none), its digest checked.
    pub data: &'a [u8],
    /// Bytes of `buf` the PDU occupies (its PLEN).
    pub len: usize,
}

/// Decodes the PDU at the start of `buf` (a whole PDU; more bytes may follow): common
/// header, PDU specific header, header digest, data, data digest.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, PduError> {
    let Some(ch) = buf.first_chunk::<CH_BYTES>() else {
        return Err(PduError::Truncated {
            have: buf.len(),
            need: CH_BYTES,
        });
    };
    let layout = parse_common_header(ch, limits)?;
    let len = layout.total_bytes();
    if buf.len() < len {
        return Err(PduError::Truncated {
            have: buf.len(),
            need: len,
        });
    }
    let pdu = decode_header(&layout, buf)?;
    let start = layout.data_offset();
    let data = &buf[start..start + layout.data_bytes()];
    if layout.ddgst {
        let mut digest = [0u8; DIGEST_BYTES];
        digest.copy_from_slice(&buf[len - DIGEST_BYTES..len]);
        check_data_digest(crc32c(data), &digest)?;
    }
    Ok(Decoded { pdu, data, len })
}

/// Writes the header of `pdu`, for a data segment of `data_len` bytes, into `out`: common
/// header, PDU specific header, header digest and padding up to the data. Returns the bytes
/// written (where the data goes); the caller then sends the data and, when
/// [`data_digest_follows`], its CRC32C.
pub fn encode_header(
    pdu: &Pdu,
    data_len: usize,
    options: &EncodeOptions,
    out: &mut [u8],
) -> Result<usize, PduError> {
    let pdu_type = pdu.pdu_type();
    let fail = |reason| PduError::Encode { pdu_type, reason };
    if data_len > 0 && !pdu_type.may_carry_data() {
        return Err(fail("this PDU type carries no data"));
    }
    let hlen = usize::from(pdu_type.hlen());
    let hdgst = pdu_type.has_digests() && options.digests.header;
    let ddgst = pdu_type.has_digests() && options.digests.data && data_len > 0;
    let header_bytes = hlen + if hdgst { DIGEST_BYTES } else { 0 };
    let is_term = matches!(pdu_type, PduType::H2cTermReq | PduType::C2hTermReq);
    if is_term && data_len > MAX_TERM_REQ_DATA_BYTES {
        return Err(fail("termination request data above 128 bytes"));
    }
    let data_offset = if data_len == 0 || is_term {
        header_bytes
    } else {
        let align = (usize::from(options.pda.min(MAX_PDA)) + 1) * 4;
        header_bytes.div_ceil(align) * align
    };
    let pdo = if data_len == 0 || is_term {
        0
    } else {
        u8::try_from(data_offset).map_err(|_| fail("PDU data offset above 255"))?
    };
    let plen = data_offset
        .checked_add(data_len)
        .and_then(|n| n.checked_add(if ddgst { DIGEST_BYTES } else { 0 }))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(fail("PDU length above 4 GiB"))?;
    if out.len() < data_offset {
        return Err(fail("output buffer shorter than the header"));
    }
    let header = &mut out[..data_offset];
    header.fill(0);
    let mut flag_bits = 0u8;
    if hdgst {
        flag_bits |= flags::HDGST;
    }
    if ddgst {
        flag_bits |= flags::DDGST;
    }
    header[0] = pdu_type as u8;
    header[2] = pdu_type.hlen();
    header[3] = pdo;
    put32(header, 4, plen);
    match pdu {
        Pdu::IcReq(ic) => {
            put16(header, 8, ic.pfv);
            header[10] = ic.hpda;
            header[11] = ic.digests.bits();
            put32(header, 12, ic.maxr2t);
        }
        Pdu::IcResp(ic) => {
            put16(header, 8, ic.pfv);
            header[10] = ic.cpda;
            header[11] = ic.digests.bits();
            put32(header, 12, ic.maxh2cdata);
        }
        Pdu::H2cTermReq(term) | Pdu::C2hTermReq(term) => {
            put16(header, 8, term.fes);
            put32(header, 10, term.fei);
        }
        Pdu::CapsuleCmd(cmd) => header[8..8 + SQE_BYTES].copy_from_slice(&cmd.encode()),
        Pdu::CapsuleResp(cqe) => header[8..8 + CQE_BYTES].copy_from_slice(&cqe.encode()),
        Pdu::H2cData(data) | Pdu::C2hData(data) => {
            if data.datal as usize != data_len || data_len == 0 {
                return Err(fail("DATAL differs from the data segment, or no data"));
            }
            if data.success && !data.last {
                return Err(fail("SUCCESS without LAST_PDU"));
            }
            if data.last {
                flag_bits |= flags::LAST_PDU;
            }
            if data.success && pdu_type == PduType::C2hData {
                flag_bits |= flags::SUCCESS;
            }
            put16(header, 8, data.cccid);
            let ttag = if pdu_type == PduType::H2cData {
                data.ttag
            } else {
                0
            };
            put16(header, 10, ttag);
            put32(header, 12, data.datao);
            put32(header, 16, data.datal);
        }
        Pdu::R2t(r2t) => {
            put16(header, 8, r2t.cccid);
            put16(header, 10, r2t.ttag);
            put32(header, 12, r2t.r2to);
            put32(header, 16, r2t.r2tl);
        }
    }
    header[1] = flag_bits;
    if hdgst {
        let digest = crc32c(&header[..hlen]);
        put32(header, hlen, digest);
    }
    Ok(data_offset)
}

/// Whether a data digest follows a data segment of `data_len` bytes of this PDU type.
pub fn data_digest_follows(pdu_type: PduType, data_len: usize, options: &EncodeOptions) -> bool {
    pdu_type.has_digests() && options.digests.data && data_len > 0
}

/// Encodes a whole PDU (header, `data`, data digest) into `out`; returns its length.
pub fn encode(
    pdu: &Pdu,
    data: &[u8],
    options: &EncodeOptions,
    out: &mut [u8],
) -> Result<usize, PduError> {
    let pdu_type = pdu.pdu_type();
    let start = encode_header(pdu, data.len(), options, out)?;
    let ddgst = data_digest_follows(pdu_type, data.len(), options);
    let end = start + data.len() + if ddgst { DIGEST_BYTES } else { 0 };
    if out.len() < end {
        return Err(PduError::Encode {
            pdu_type,
            reason: "output buffer shorter than the PDU",
        });
    }
    out[start..start + data.len()].copy_from_slice(data);
    if ddgst {
        put32(out, start + data.len(), crc32c(data));
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollux_nvme::spec::{opc, Status};

    const OPEN: Limits = Limits {
        digests: Digests {
            header: false,
            data: false,
        },
        max_capsule_data_bytes: 8192,
        max_data_pdu_bytes: 131072,
    };

    fn with_digests(limits: Limits) -> Limits {
        Limits {
            digests: Digests {
                header: true,
                data: true,
            },
            ..limits
        }
    }

    fn round_trip(pdu: Pdu, data: &[u8], options: EncodeOptions, limits: &Limits) -> Vec<u8> {
        let mut out = vec![0u8; 1024 + data.len()];
        let len = encode(&pdu, data, &options, &mut out).expect("encodes");
        out.truncate(len);
        let decoded = decode(&out, limits).expect("decodes");
        assert_eq!(decoded.pdu, pdu);
        assert_eq!(decoded.data, data);
        assert_eq!(decoded.len, len);
        out
    }

    fn write_cmd() -> Command {
        let mut cmd = Command::new(opc::WRITE);
        cmd.cid = 0x1007;
        cmd.nsid = 1;
        cmd.cdw10 = 8;
        cmd
    }

    #[test]
    fn every_type_round_trips_with_and_without_digests() {
        let data = [0x5au8; 100];
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            let options = EncodeOptions { digests, pda: 0 };
            let limits = Limits { digests, ..OPEN };
            let ic_req = Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests,
                maxr2t: 0,
            });
            let bytes = round_trip(ic_req, &[], options, &limits);
            assert_eq!(bytes.len(), 128, "ICReq is 128 bytes, never digested");
            round_trip(
                Pdu::IcResp(IcResp {
                    pfv: 0,
                    cpda: 0,
                    digests,
                    maxh2cdata: 131072,
                }),
                &[],
                options,
                &limits,
            );
            round_trip(
                Pdu::C2hTermReq(TermReq { fes: 1, fei: 2 }),
                &bytes[..24],
                options,
                &limits,
            );
            round_trip(Pdu::CapsuleCmd(write_cmd()), &[], options, &limits);
            let capsule = round_trip(Pdu::CapsuleCmd(write_cmd()), &data, options, &limits);
            let digest = if digests.header { 4 } else { 0 };
            assert_eq!(
                capsule[3] as usize,
                72 + digest,
                "PDO right after the header"
            );
            let mut cqe = Completion::decode(&[0u8; 16]);
            cqe.cid = 0x1007;
            cqe.status = Status::generic(0x02).with_dnr(true);
            round_trip(Pdu::CapsuleResp(cqe), &[], options, &limits);
            let header = DataHeader {
                cccid: 3,
                ttag: 4,
                datao: 4096,
                datal: data.len() as u32,
                last: true,
                success: false,
            };
            round_trip(Pdu::H2cData(header), &data, options, &limits);
            round_trip(
                Pdu::C2hData(DataHeader {
                    ttag: 0,
                    success: true,
                    ..header
                }),
                &data,
                options,
                &limits,
            );
            round_trip(
                Pdu::R2t(R2t {
                    cccid: 9,
                    ttag: 1,
                    r2to: 0,
                    r2tl: 65536,
                }),
                &[],
                options,
                &limits,
            );
        }
    }

    #[test]
    fn data_alignment_pads_the_header() {
        let options = EncodeOptions {
            digests: Digests::default(),
            pda: 7, // 32-byte alignment
        };
        let header = DataHeader {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 8,
            last: true,
            success: false,
        };
        let bytes = round_trip(Pdu::C2hData(header), &[1; 8], options, &OPEN);
        assert_eq!(bytes[3], 32);
        assert_eq!(bytes.len(), 40);
    }

    fn encoded(pdu: Pdu, data: &[u8], digests: Digests) -> Vec<u8> {
        let mut out = vec![0u8; 1024 + data.len()];
        let options = EncodeOptions { digests, pda: 0 };
        let len = encode(&pdu, data, &options, &mut out).expect("encodes");
        out.truncate(len);
        out
    }

    fn fes_fei(result: Result<Decoded<'_>, PduError>) -> (u16, u32) {
        let error = result.expect_err("refused");
        (error.fes(), error.fei())
    }

    #[test]
    fn a_data_digest_flag_on_a_pdu_without_data_is_refused() {
        let digests = Digests {
            header: false,
            data: true,
        };
        let limits = Limits { digests, ..OPEN };
        let r2t = Pdu::R2t(R2t {
            cccid: 1,
            ttag: 2,
            r2to: 0,
            r2tl: 4096,
        });
        let mut flagged = encoded(r2t, &[], digests);
        assert!(decode(&flagged, &limits).is_ok());
        // DDGSTF with PLEN = HLEN: a digest the PDU has no room for (the fuzz target's
        // find: the data length underflowed).
        flagged[1] |= flags::DDGST;
        assert!(matches!(
            decode(&flagged, &limits),
            Err(PduError::BadFlags { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_refused_with_their_fes() {
        let good = encoded(Pdu::CapsuleCmd(write_cmd()), &[7; 64], Digests::default());
        assert!(decode(&good, &OPEN).is_ok());

        let mut unknown = good.clone();
        unknown[0] = 0x08;
        assert_eq!(
            decode(&unknown, &OPEN),
            Err(PduError::UnknownType { pdu_type: 8 })
        );
        assert_eq!(
            fes_fei(decode(&unknown, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 0)
        );

        let mut bad_hlen = good.clone();
        bad_hlen[2] = 24;
        assert_eq!(
            fes_fei(decode(&bad_hlen, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 2)
        );

        let mut pdo_in_header = good.clone();
        pdo_in_header[3] = 64;
        assert_eq!(
            fes_fei(decode(&pdo_in_header, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 3)
        );
        let mut pdo_unaligned = good.clone();
        pdo_unaligned[3] = 73;
        assert_eq!(
            fes_fei(decode(&pdo_unaligned, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 3)
        );
        let mut pdo_past_plen = good.clone();
        pdo_past_plen[3] = 200;
        assert_eq!(
            fes_fei(decode(&pdo_past_plen, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 4)
        );

        let mut short_plen = good.clone();
        short_plen[4..8].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(
            fes_fei(decode(&short_plen, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 4)
        );

        // A PLEN beyond what the buffer holds is a truncated PDU, not an overread.
        let mut long_plen = good.clone();
        long_plen[4..8].copy_from_slice(&(good.len() as u32 + 4).to_le_bytes());
        assert!(matches!(
            decode(&long_plen, &OPEN),
            Err(PduError::Truncated { .. })
        ));
        // And beyond the negotiated maximum, a data limit error whatever follows.
        long_plen[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            fes_fei(decode(&long_plen, &OPEN)),
            (fes::DATA_LIMIT_EXCEEDED, 4)
        );

        // Digest flags that disagree with the negotiation.
        let mut hdgst_flag = good.clone();
        hdgst_flag[1] |= flags::HDGST;
        assert_eq!(
            fes_fei(decode(&hdgst_flag, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 1)
        );
        let digested = with_digests(OPEN);
        assert_eq!(
            fes_fei(decode(&good, &digested)),
            (fes::INVALID_HEADER_FIELD, 1)
        );

        // A PDU type without data that claims some.
        let resp = encoded(
            Pdu::CapsuleResp(Completion::decode(&[0u8; 16])),
            &[],
            Digests::default(),
        );
        let mut resp_pdo = resp.clone();
        resp_pdo[3] = 24;
        assert_eq!(
            fes_fei(decode(&resp_pdo, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 3)
        );
        let mut resp_plen = resp.clone();
        resp_plen[4..8].copy_from_slice(&28u32.to_le_bytes());
        resp_plen.extend_from_slice(&[0; 4]);
        assert_eq!(
            fes_fei(decode(&resp_plen, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 4)
        );

        // ICReq with a PDA above 31.
        let mut ic = encoded(
            Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests: Digests::default(),
                maxr2t: 0,
            }),
            &[],
            Digests::default(),
        );
        ic[10] = 32;
        assert_eq!(
            fes_fei(decode(&ic, &Limits::INITIAL)),
            (fes::INVALID_HEADER_FIELD, 10)
        );

        // H2CData whose DATAL is not its segment's length, or without data.
        let h2c = encoded(
            Pdu::H2cData(DataHeader {
                cccid: 1,
                ttag: 0,
                datao: 0,
                datal: 16,
                last: true,
                success: false,
            }),
            &[1; 16],
            Digests::default(),
        );
        let mut bad_datal = h2c.clone();
        bad_datal[16..20].copy_from_slice(&15u32.to_le_bytes());
        assert_eq!(
            fes_fei(decode(&bad_datal, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 16)
        );
        let mut no_data = h2c[..24].to_vec();
        no_data[3] = 0;
        no_data[4..8].copy_from_slice(&24u32.to_le_bytes());
        assert_eq!(
            fes_fei(decode(&no_data, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 4)
        );

        // Termination request data above 128 bytes.
        let mut term = encoded(
            Pdu::H2cTermReq(TermReq { fes: 1, fei: 0 }),
            &[0; 128],
            Digests::default(),
        );
        assert!(decode(&term, &OPEN).is_ok());
        term.extend_from_slice(&[0; 4]);
        term[4..8].copy_from_slice(&(24u32 + 132).to_le_bytes());
        assert_eq!(
            fes_fei(decode(&term, &OPEN)),
            (fes::INVALID_HEADER_FIELD, 4)
        );
    }

    #[test]
    fn data_beyond_the_negotiated_sizes_is_refused() {
        let limits = Limits {
            max_capsule_data_bytes: 4096,
            max_data_pdu_bytes: 8192,
            ..OPEN
        };
        let at_limit = encoded(Pdu::CapsuleCmd(write_cmd()), &[0; 4096], Digests::default());
        assert!(decode(&at_limit, &limits).is_ok());
        let above = encoded(Pdu::CapsuleCmd(write_cmd()), &[0; 4100], Digests::default());
        assert_eq!(
            decode(&above, &limits),
            Err(PduError::DataTooLong {
                pdu_type: PduType::CapsuleCmd,
                len: 4100,
                max: 4096
            })
        );
        let header = DataHeader {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 8196,
            last: false,
            success: false,
        };
        let h2c = encoded(Pdu::H2cData(header), &[0; 8196], Digests::default());
        assert_eq!(
            fes_fei(decode(&h2c, &limits)),
            (fes::DATA_LIMIT_EXCEEDED, 4)
        );
    }

    #[test]
    fn digest_mismatches_are_refused() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let limits = with_digests(OPEN);
        let good = encoded(Pdu::CapsuleCmd(write_cmd()), &[9; 32], digests);
        assert!(decode(&good, &limits).is_ok());
        let mut header = good.clone();
        header[20] ^= 1; // inside the SQE
        assert!(matches!(
            decode(&header, &limits),
            Err(PduError::HeaderDigest { .. })
        ));
        assert_eq!(
            fes_fei(decode(&header, &limits)),
            (fes::HEADER_DIGEST_ERROR, 0)
        );
        let mut data = good.clone();
        data[80] ^= 0x80; // inside the data
        assert!(matches!(
            decode(&data, &limits),
            Err(PduError::DataDigest { .. })
        ));
        let mut ddgst = good.clone();
        let last = ddgst.len() - 1;
        ddgst[last] ^= 1;
        assert!(matches!(
            decode(&ddgst, &limits),
            Err(PduError::DataDigest { .. })
        ));
        // Known answer (RFC 3720 B.4: 32 bytes of zeroes).
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(
            crc32c_append(crc32c(&[0u8; 16]), &[0u8; 16]),
            0x8a91_36aa,
            "the CRC continues across pieces"
        );
    }

    #[test]
    fn truncated_input_never_overreads() {
        let good = encoded(
            Pdu::CapsuleCmd(write_cmd()),
            &[3; 40],
            Digests {
                header: true,
                data: true,
            },
        );
        let limits = with_digests(OPEN);
        for cut in 0..good.len() {
            assert!(
                matches!(
                    decode(&good[..cut], &limits),
                    Err(PduError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn encoder_refuses_inconsistent_pdus() {
        let mut out = [0u8; 256];
        let options = EncodeOptions::default();
        assert!(encode(
            &Pdu::CapsuleResp(Completion::decode(&[0; 16])),
            &[1],
            &options,
            &mut out
        )
        .is_err());
        let header = DataHeader {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 4,
            last: false,
            success: true,
        };
        assert!(encode(&Pdu::C2hData(header), &[0; 4], &options, &mut out).is_err());
        assert!(encode(
            &Pdu::CapsuleCmd(write_cmd()),
            &[0; 8],
            &options,
            &mut out[..40]
        )
        .is_err());
    }
}
