//! The crate's one error type (STYLE #10): a failure of a management operation (RPC, `-c`)
//! of the target, or of the initiator's setup path (attach, connect, reconnect). What a peer
//! sends to the target never becomes one of these: it gets an NVMe status or a termination
//! request on its own connection (`conn.rs`).

use std::net::SocketAddr;

/// Why a target operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmfError {
    #[error("transport {trtype:?} is not supported (only TCP)")]
    UnsupportedTransport { trtype: String },
    #[error("the TCP transport already exists")]
    TransportExists,
    #[error("no TCP transport: create one first (nvmf_create_transport -t TCP)")]
    NoTransport,
    #[error("transport option {option}: {reason}")]
    TransportOption {
        option: &'static str,
        reason: String,
    },
    #[error("NQN {nqn:?} is invalid: {reason}")]
    BadNqn { nqn: String, reason: &'static str },
    #[error("subsystem {nqn:?} already exists")]
    SubsystemExists { nqn: String },
    #[error("subsystem {nqn:?} does not exist")]
    SubsystemNotFound { nqn: String },
    #[error("subsystem {nqn:?}: {field} {value:?} is invalid ({reason})")]
    SubsystemField {
        nqn: String,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("subsystem {nqn:?}: namespace ID {nsid} is invalid (1..={max})")]
    BadNsid { nqn: String, nsid: u32, max: u32 },
    #[error("subsystem {nqn:?}: namespace ID {nsid} is in use")]
    NsidInUse { nqn: String, nsid: u32 },
    #[error("subsystem {nqn:?}: no free namespace ID (max_namespaces {max})")]
    NoFreeNsid { nqn: String, max: u32 },
    #[error("subsystem {nqn:?}: namespace ID {nsid} does not exist")]
    NamespaceNotFound { nqn: String, nsid: u32 },
    #[error("subsystem {nqn:?}: bdev {bdev:?}")]
    Bdev {
        nqn: String,
        bdev: String,
        #[source]
        source: Box<pollux_bdev::BdevError>,
    },
    #[error("subsystem {nqn:?}: bdev {bdev:?} has a block size of {block_size} bytes (512..=65536, a power of two)")]
    BlockSize {
        nqn: String,
        bdev: String,
        block_size: u32,
    },
    #[error("listen address {traddr}:{trsvcid}: {reason}")]
    BadListenAddress {
        traddr: String,
        trsvcid: String,
        reason: String,
    },
    #[error("subsystem {nqn:?} already listens on {addr}")]
    ListenerExists { nqn: String, addr: SocketAddr },
    #[error("subsystem {nqn:?} does not listen on {addr}")]
    ListenerNotFound { nqn: String, addr: SocketAddr },
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the target's reactor thread {name}")]
    Thread {
        name: String,
        #[source]
        source: pollux_reactor::ReactorError,
    },
    #[error("nvmf config {path}: entry {index} ({method}): {reason}")]
    Config {
        path: String,
        index: usize,
        method: String,
        reason: String,
    },
    // The initiator (`host/`).
    #[error("connecting to {addr}")]
    HostConnect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("NVMe/TCP connection to {addr}: {what} timed out after {timeout_ms} ms")]
    HostTimeout {
        addr: SocketAddr,
        what: &'static str,
        timeout_ms: u64,
    },
    #[error("NVMe/TCP connection to {addr} failed during {what}")]
    HostConnection {
        addr: SocketAddr,
        what: &'static str,
    },
    #[error("NVMe/TCP controller at {addr}: {what} failed: {status}")]
    HostCommand {
        addr: SocketAddr,
        what: &'static str,
        status: String,
    },
    #[error("NVMe/TCP controller at {addr}: {reason}")]
    HostController { addr: SocketAddr, reason: String },
    #[error("NVMe/TCP controller {name:?}: no I/O queue left ({granted} granted)")]
    HostNoQueue { name: String, granted: u16 },
}
