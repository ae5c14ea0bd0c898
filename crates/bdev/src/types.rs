//! Plain values shared by the whole layer: I/O types and statuses, scatter-gather entries,
//! UUIDs and the description a module gives of a bdev.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;

/// The operations a bdev may support, as SPDK's `spdk_bdev_io_type` (the subset Pollux has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoType {
    Read = 0,
    Write = 1,
    Flush = 2,
    Unmap = 3,
    WriteZeroes = 4,
    Reset = 5,
}

impl IoType {
    /// Number of I/O types (the length of per-type statistics arrays).
    pub const COUNT: usize = 6;
    /// Every I/O type, in index order.
    pub const ALL: [IoType; IoType::COUNT] = [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::Unmap,
        IoType::WriteZeroes,
        IoType::Reset,
    ];

    /// Index into per-type arrays.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// SPDK's name of the type (`write_zeroes`, ...).
    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Reset => "reset",
        }
    }

    /// Whether the type carries a data buffer (iovecs).
    #[inline]
    pub fn carries_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }

    /// Whether the type changes the bdev's contents (refused on a read-only descriptor).
    #[inline]
    pub fn modifies(self) -> bool {
        matches!(self, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
    }

    /// Whether the type addresses a block range (checked against the bdev's size).
    #[inline]
    pub fn has_range(self) -> bool {
        !matches!(self, IoType::Reset)
    }
}

impl fmt::Display for IoType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an I/O ended. One byte, `Copy`: it travels in the completion queue. Every failure the
/// bdev layer detects itself has its own variant, so the submitter knows which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IoStatus {
    Success,
    /// The block range runs past the end of the bdev (or `num_blocks` is 0).
    OutOfRange,
    /// A data buffer does not start at the bdev's required alignment.
    Misaligned,
    /// The iovecs do not add up to `num_blocks * block_size` bytes.
    LengthMismatch,
    /// The bdev's module does not support this I/O type.
    Unsupported,
    /// A modifying I/O through a descriptor opened read-only.
    ReadOnly,
    /// The bdev was hot-removed before this I/O was submitted.
    Removed,
    /// The module failed the I/O (media or transport error).
    Failed,
}

impl IoStatus {
    #[inline]
    pub fn is_success(self) -> bool {
        self == IoStatus::Success
    }
}

impl fmt::Display for IoStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoStatus::Success => "success",
            IoStatus::OutOfRange => "block range outside the bdev",
            IoStatus::Misaligned => "buffer not aligned to the bdev's required alignment",
            IoStatus::LengthMismatch => "iovec lengths do not add up to num_blocks * block_size",
            IoStatus::Unsupported => "I/O type not supported by the bdev",
            IoStatus::ReadOnly => "modifying I/O on a read-only descriptor",
            IoStatus::Removed => "bdev was removed",
            IoStatus::Failed => "I/O failed in the module",
        })
    }
}

/// One scatter-gather entry: env's, shared with the NVMe driver (see [`pollux_env::iovec`]).
pub use pollux_env::iovec::IoVec;

/// A 128-bit UUID in the usual `8-4-4-4-12` text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4) UUID. Setup path: seeded from std's per-process random keys.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        for (index, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_usize(index);
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            chunk.copy_from_slice(&hasher.finish().to_ne_bytes());
        }
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Uuid(bytes)
    }
}

/// Why a UUID string did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UuidParseError;

impl fmt::Display for UuidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected a UUID of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    }
}

impl FromStr for Uuid {
    type Err = UuidParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let groups: Vec<&str> = text.split('-').collect();
        let lengths = [8, 4, 4, 4, 12];
        if groups.len() != lengths.len()
            || groups.iter().zip(lengths).any(|(g, len)| g.len() != len)
        {
            return Err(UuidParseError);
        }
        let hex: String = groups.concat();
        let mut bytes = [0u8; 16];
        for (index, byte) in bytes.iter_mut().enumerate() {
            let pair = hex.get(2 * index..2 * index + 2).ok_or(UuidParseError)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| UuidParseError)?;
        }
        Ok(Uuid(bytes))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if matches!(index, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// What a module says about a bdev it registers; the registry fills in a UUID when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevSpec {
    /// Unique among bdev names and aliases.
    pub name: String,
    /// Other names the bdev answers to (unique too).
    pub aliases: Vec<String>,
    /// `None`: a random one is generated at registration.
    pub uuid: Option<Uuid>,
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    /// Data buffers must start at a multiple of this (a power of two; 1: no requirement).
    pub required_alignment_bytes: u32,
    /// The bdev has a volatile write cache (a flush makes writes durable).
    pub write_cache: bool,
}

/// A registered bdev's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub uuid: Uuid,
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    pub required_alignment_bytes: u32,
    pub write_cache: bool,
    /// Name of the module that registered it (`malloc`, `null`).
    pub module: &'static str,
    /// The I/O types its module supports.
    pub supported_io_types: Vec<IoType>,
}

impl BdevInfo {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks
            .saturating_mul(u64::from(self.block_size_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trips_and_rejects_garbage() {
        let text = "0f8e9d3c-1234-4abc-8def-0123456789ab";
        let uuid: Uuid = text.parse().expect("valid uuid");
        assert_eq!(uuid.to_string(), text);
        assert!("0f8e9d3c12344abc8def0123456789ab".parse::<Uuid>().is_err());
        assert!("zz8e9d3c-1234-4abc-8def-0123456789ab"
            .parse::<Uuid>()
            .is_err());
        let random = Uuid::random();
        assert_eq!(random.0[6] >> 4, 4, "version 4");
        assert_ne!(random, Uuid::random());
    }
}
