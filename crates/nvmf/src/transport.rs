//! The TCP transport's options (SPDK's `nvmf_create_transport -t TCP` parameters that matter
//! here) and what they imply for a connection.

use serde_json::{json, Value};

use crate::error::NvmfError;

/// SPDK's TCP defaults (`lib/nvmf/tcp.c`).
pub const DEFAULT_MAX_QUEUE_DEPTH: u16 = 128;
pub const DEFAULT_MAX_IO_QPAIRS_PER_CTRLR: u16 = 127;
pub const DEFAULT_IN_CAPSULE_DATA_SIZE: u32 = 4096;
pub const DEFAULT_MAX_IO_SIZE: u32 = 131_072;
pub const DEFAULT_IO_UNIT_SIZE: u32 = 131_072;
pub const DEFAULT_MAX_AQ_DEPTH: u16 = 128;
/// In-capsule data the admin queue accepts whatever the I/O queues' size: Linux sends up to
/// 8 KiB in-capsule on the admin queue without asking (`NVME_TCP_ADMIN_CCSZ`).
pub const ADMIN_IN_CAPSULE_BYTES: u32 = 8192;
/// Largest data transfer of an admin command (Identify and log pages, in pieces of at most
/// this much; Linux and nvme-cli ask for 4 KiB at a time).
pub const ADMIN_MAX_DATA_BYTES: u32 = 8192;
/// The memory page size the controller reports (CAP.MPSMIN = MPSMAX = 4 KiB).
pub const PAGE_BYTES: u32 = 4096;
/// Largest `max_io_size` accepted: every slot of every I/O queue holds a buffer this large.
pub const MAX_IO_SIZE_LIMIT: u32 = 1 << 20;

/// The TCP transport's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTransportOptions {
    /// Largest I/O queue (entries): CAP.MQES + 1, and the slots each queue preallocates.
    pub max_queue_depth: u16,
    /// I/O queues a controller may have.
    pub max_io_qpairs_per_ctrlr: u16,
    /// In-capsule data an I/O command may carry (IOCCSZ = 4 + this / 16).
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command (MDTS), also MAXH2CDATA: a power of two, 4 KiB..1 MiB.
    pub max_io_size: u32,
    /// SPDK's buffer unit; accepted and reported, not used (each slot owns a buffer of
    /// `max_io_size`, see docs/ARCHITECTURE.md).
    pub io_unit_size: u32,
    /// Largest admin queue (entries).
    pub max_aq_depth: u16,
}

impl Default for TcpTransportOptions {
    fn default() -> Self {
        Self {
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            max_io_qpairs_per_ctrlr: DEFAULT_MAX_IO_QPAIRS_PER_CTRLR,
            in_capsule_data_size: DEFAULT_IN_CAPSULE_DATA_SIZE,
            max_io_size: DEFAULT_MAX_IO_SIZE,
            io_unit_size: DEFAULT_IO_UNIT_SIZE,
            max_aq_depth: DEFAULT_MAX_AQ_DEPTH,
        }
    }
}

impl TcpTransportOptions {
    pub fn validate(&self) -> Result<(), NvmfError> {
        let bad = |option, reason: String| Err(NvmfError::TransportOption { option, reason });
        if !(2..=1024).contains(&self.max_queue_depth) {
            return bad(
                "max_queue_depth",
                format!("{} is outside 2..=1024", self.max_queue_depth),
            );
        }
        if !(2..=4096).contains(&self.max_aq_depth) {
            return bad(
                "max_aq_depth",
                format!("{} is outside 2..=4096", self.max_aq_depth),
            );
        }
        if self.max_io_qpairs_per_ctrlr == 0 || self.max_io_qpairs_per_ctrlr > 1024 {
            return bad(
                "max_io_qpairs_per_ctrlr",
                format!("{} is outside 1..=1024", self.max_io_qpairs_per_ctrlr),
            );
        }
        if !self.max_io_size.is_power_of_two()
            || !(PAGE_BYTES..=MAX_IO_SIZE_LIMIT).contains(&self.max_io_size)
        {
            return bad(
                "max_io_size",
                format!(
                    "{} is not a power of two in 4096..=1048576",
                    self.max_io_size
                ),
            );
        }
        if !self.in_capsule_data_size.is_multiple_of(16)
            || self.in_capsule_data_size > self.max_io_size
        {
            return bad(
                "in_capsule_data_size",
                format!(
                    "{} is not a multiple of 16 at most max_io_size",
                    self.in_capsule_data_size
                ),
            );
        }
        if self.io_unit_size == 0 || self.io_unit_size > self.max_io_size {
            return bad(
                "io_unit_size",
                format!("{} is outside 1..=max_io_size", self.io_unit_size),
            );
        }
        Ok(())
    }

    /// MDTS: log2 of the largest transfer in pages.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / PAGE_BYTES).trailing_zeros() as u8
    }

    /// SPDK's `nvmf_get_transports` entry.
    pub fn to_json(&self) -> Value {
        json!({
            "trtype": "TCP",
            "max_queue_depth": self.max_queue_depth,
            "max_io_qpairs_per_ctrlr": self.max_io_qpairs_per_ctrlr,
            "in_capsule_data_size": self.in_capsule_data_size,
            "max_io_size": self.max_io_size,
            "io_unit_size": self.io_unit_size,
            "max_aq_depth": self.max_aq_depth,
            "num_shared_buffers": 0,
            "buf_cache_size": 0,
            "dif_insert_or_strip": false,
            "zcopy": false,
            "c2h_success": false,
            "sock_priority": 0,
            "abort_timeout_sec": 1,
        })
    }

    /// The `nvmf_create_transport` entry that recreates it (`save_config`).
    pub fn to_config(&self) -> Value {
        json!({
            "method": "nvmf_create_transport",
            "params": {
                "trtype": "TCP",
                "max_queue_depth": self.max_queue_depth,
                "max_io_qpairs_per_ctrlr": self.max_io_qpairs_per_ctrlr,
                "in_capsule_data_size": self.in_capsule_data_size,
                "max_io_size": self.max_io_size,
                "io_unit_size": self.io_unit_size,
                "max_aq_depth": self.max_aq_depth,
            }
        })
    }
}
