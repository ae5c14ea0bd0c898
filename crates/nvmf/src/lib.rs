//! Pollux NVMe over Fabrics target, TCP transport (SPDK's `lib/nvmf` with its TCP transport,
//! written anew): serves bdevs to other machines, interoperating with the Linux kernel's
//! nvme-tcp initiator.
//!
//! - [`pdu`]: the NVMe/TCP PDU codec, pure encode and decode with no socket in it (an
//!   initiator builds on it too).
//! - [`NvmfTarget`] (`target.rs`): the TCP transport ([`TcpTransportOptions`]), subsystems
//!   ([`Subsystem`]: NQN, serial, model, namespaces on claimed bdevs, allowed hosts,
//!   listeners), one poll group per reactor core and a service thread that accepts
//!   connections and enforces keep alive timeouts.
//! - `conn.rs`: a connection's socket state machine (receive into the command slots' DMA
//!   buffers, R2T for writes above the in-capsule size, C2HData for reads, digests, fatal
//!   errors answered with a C2HTermReq); `ctrlr.rs`: controllers, property registers and
//!   admin commands; `discovery.rs`: the discovery log page.
//! - [`config`]: SPDK's `nvmf_*` parameters, parsed the same for a `-c` file and for RPC.
//! - [`host`]: the initiator: `bdev_nvme_attach_controller -t tcp` makes one bdev per
//!   namespace of a remote subsystem (one TCP connection per channel), with SPDK's reconnect
//!   parameters.
//!
//! `unsafe` is confined to `sys.rs` (receiving into DMA memory or a bdev I/O's iovecs,
//! `sendmsg` over iovecs that point into them) and to the initiator's iovecs over its own
//! setup-path buffers (`host/qpair.rs`, `host/bdev.rs`).

pub mod config;
mod conn;
mod ctrlr;
mod discovery;
mod error;
pub mod host;
pub mod pdu;
mod poll_group;
mod subsystem;
mod sys;
mod target;
mod transport;

pub use ctrlr::{Controller, KAS_100MS, MAX_CNTLID, NVME_VERSION};
pub use error::NvmfError;
pub use subsystem::{
    check_nqn, ListenAddress, Namespace, Subsystem, SubsystemOptions, DEFAULT_MAX_NAMESPACES,
    DEFAULT_MODEL, DEFAULT_SERIAL,
};
pub use target::{NvmfTarget, DEFAULT_TRSVCID};
pub use transport::{
    TcpTransportOptions, ADMIN_IN_CAPSULE_BYTES, ADMIN_MAX_DATA_BYTES,
    DEFAULT_IN_CAPSULE_DATA_SIZE, DEFAULT_IO_UNIT_SIZE, DEFAULT_MAX_AQ_DEPTH,
    DEFAULT_MAX_IO_QPAIRS_PER_CTRLR, DEFAULT_MAX_IO_SIZE, DEFAULT_MAX_QUEUE_DEPTH,
};
