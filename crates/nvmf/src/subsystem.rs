//! NVM subsystems: an NQN, a serial and model number, namespaces on bdevs (each claimed, as
//! a vhost controller claims its bdev), the hosts allowed to connect and the addresses it
//! listens on. Changed only on the setup path (RPC, `-c`), under a lock; the I/O path reads
//! one atomic generation number per poll to notice a namespace change (see `conn.rs`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pollux_bdev::{BdevDesc, IoType, Uuid};
use serde_json::{json, Value};

/// SPDK's defaults for `nvmf_create_subsystem`.
pub const DEFAULT_SERIAL: &str = "00000000000000000000";
pub const DEFAULT_MODEL: &str = "SPDK bdev Controller";
pub const DEFAULT_MAX_NAMESPACES: u32 = 32;
/// Serial (SN, 20 bytes) and model (MN, 40 bytes) field widths in Identify Controller.
pub const SERIAL_MAX_BYTES: usize = 20;
pub const MODEL_MAX_BYTES: usize = 40;
/// NQNs are at most 223 bytes (NVMe Base 2.0, 4.5).
pub const NQN_MAX_BYTES: usize = 223;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks an NQN's form: `nqn.yyyy-mm.reverse-domain[:...]`, or the UUID form, at most 223
/// bytes, printable ASCII or UTF-8 without control characters (Base 2.0, 4.5).
pub fn check_nqn(nqn: &str) -> Result<(), &'static str> {
    if nqn.len() > NQN_MAX_BYTES {
        return Err("longer than 223 bytes");
    }
    if nqn.chars().any(char::is_control) {
        return Err("holds control characters");
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return Err("does not start with \"nqn.\"");
    };
    let date = rest.get(..7).ok_or("too short")?;
    let bytes = date.as_bytes();
    let date_ok = bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[5..7].iter().all(u8::is_ascii_digit);
    if !date_ok {
        return Err("no yyyy-mm date after \"nqn.\"");
    }
    if rest.len() < 9 || rest.as_bytes()[7] != b'.' {
        return Err("no reverse domain name after the date");
    }
    Ok(())
}

/// A transport address a subsystem listens on (SPDK's `listen_address`); TCP over IPv4 or
/// IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddress {
    pub addr: SocketAddr,
}

impl ListenAddress {
    /// SPDK's `listen_address` object.
    pub fn to_json(&self) -> Value {
        json!({
            "trtype": "TCP",
            "adrfam": if self.addr.is_ipv4() { "IPv4" } else { "IPv6" },
            "traddr": self.addr.ip().to_string(),
            "trsvcid": self.addr.port().to_string(),
        })
    }
}

/// A namespace: a bdev, claimed while the namespace exists.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub nsid: u32,
    pub bdev: String,
    pub desc: Arc<BdevDesc>,
    pub uuid: Uuid,
    pub nguid: [u8; 16],
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    pub supports_flush: bool,
    pub supports_unmap: bool,
    pub supports_write_zeroes: bool,
}

impl Namespace {
    pub(crate) fn new(nsid: u32, desc: Arc<BdevDesc>, uuid: Option<Uuid>) -> Self {
        let info = desc.info().clone();
        let uuid = uuid.unwrap_or(info.uuid);
        Self {
            nsid,
            bdev: info.name.clone(),
            uuid,
            nguid: uuid.0,
            block_size_bytes: info.block_size_bytes,
            num_blocks: info.num_blocks,
            supports_flush: desc.supports(IoType::Flush),
            supports_unmap: desc.supports(IoType::Unmap),
            supports_write_zeroes: desc.supports(IoType::WriteZeroes),
            desc,
        }
    }

    fn to_json(&self) -> Value {
        let nguid: String = self.nguid.iter().map(|b| format!("{b:02X}")).collect();
        json!({
            "nsid": self.nsid,
            "bdev_name": self.bdev,
            "name": self.bdev,
            "nguid": nguid,
            "uuid": self.uuid.to_string(),
        })
    }
}

/// What `nvmf_create_subsystem` takes (SPDK's parameter names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemOptions {
    pub nqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub allow_any_host: bool,
    pub max_namespaces: u32,
}

impl SubsystemOptions {
    pub fn new(nqn: &str) -> Self {
        Self {
            nqn: nqn.to_string(),
            serial_number: DEFAULT_SERIAL.to_string(),
            model_number: DEFAULT_MODEL.to_string(),
            allow_any_host: false,
            max_namespaces: DEFAULT_MAX_NAMESPACES,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    namespaces: Vec<Namespace>,
    hosts: Vec<String>,
    listeners: Vec<ListenAddress>,
}

/// An NVM subsystem.
#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial_number: String,
    pub model_number: String,
    pub max_namespaces: u32,
    allow_any_host: AtomicBool,
    state: Mutex<State>,
    /// Bumped on every namespace change: connections compare it once per poll.
    ns_generation: AtomicU64,
    /// Set when the subsystem is deleted: its controllers go away.
    deleted: AtomicBool,
}

impl Subsystem {
    pub(crate) fn new(options: &SubsystemOptions) -> Self {
        Self {
            nqn: options.nqn.clone(),
            serial_number: options.serial_number.clone(),
            model_number: options.model_number.clone(),
            max_namespaces: options.max_namespaces,
            allow_any_host: AtomicBool::new(options.allow_any_host),
            state: Mutex::new(State::default()),
            ns_generation: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
        }
    }

    pub fn allow_any_host(&self) -> bool {
        self.allow_any_host.load(Ordering::Acquire)
    }

    pub(crate) fn set_allow_any_host(&self, allow: bool) {
        self.allow_any_host.store(allow, Ordering::Release);
    }

    /// Whether `hostnqn` may connect (allow-any-host or on the list).
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host() || lock(&self.state).hosts.iter().any(|h| h == hostnqn)
    }

    pub fn hosts(&self) -> Vec<String> {
        lock(&self.state).hosts.clone()
    }

    /// Adds a host NQN (already there: nothing changes).
    pub(crate) fn add_host(&self, host: &str) {
        let mut state = lock(&self.state);
        if !state.hosts.iter().any(|h| h == host) {
            state.hosts.push(host.to_string());
        }
    }

    pub(crate) fn remove_host(&self, host: &str) -> bool {
        let mut state = lock(&self.state);
        let before = state.hosts.len();
        state.hosts.retain(|h| h != host);
        state.hosts.len() != before
    }

    pub fn listeners(&self) -> Vec<ListenAddress> {
        lock(&self.state).listeners.clone()
    }

    pub fn listens_on(&self, addr: SocketAddr) -> bool {
        lock(&self.state).listeners.iter().any(|l| l.addr == addr)
    }

    pub(crate) fn add_listener(&self, listener: ListenAddress) -> bool {
        let mut state = lock(&self.state);
        if state.listeners.contains(&listener) {
            return false;
        }
        state.listeners.push(listener);
        true
    }

    pub(crate) fn remove_listener(&self, listener: ListenAddress) -> bool {
        let mut state = lock(&self.state);
        let before = state.listeners.len();
        state.listeners.retain(|l| *l != listener);
        state.listeners.len() != before
    }

    /// The namespaces, by NSID.
    pub fn namespaces(&self) -> Vec<Namespace> {
        lock(&self.state).namespaces.clone()
    }

    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        lock(&self.state)
            .namespaces
            .iter()
            .find(|ns| ns.nsid == nsid)
            .cloned()
    }

    /// The namespace generation (see the field).
    #[inline]
    pub fn ns_generation(&self) -> u64 {
        self.ns_generation.load(Ordering::Acquire)
    }

    /// The lowest free NSID, or `None` when all `max_namespaces` are used.
    pub(crate) fn free_nsid(&self) -> Option<u32> {
        let state = lock(&self.state);
        (1..=self.max_namespaces).find(|n| !state.namespaces.iter().any(|ns| ns.nsid == *n))
    }

    pub(crate) fn insert_namespace(&self, ns: Namespace) -> Result<(), Namespace> {
        let mut state = lock(&self.state);
        if state.namespaces.iter().any(|n| n.nsid == ns.nsid) {
            return Err(ns);
        }
        let at = state
            .namespaces
            .iter()
            .position(|n| n.nsid > ns.nsid)
            .unwrap_or(state.namespaces.len());
        state.namespaces.insert(at, ns);
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Removes a namespace and releases its bdev's claim.
    pub(crate) fn remove_namespace(&self, nsid: u32) -> Option<Namespace> {
        let mut state = lock(&self.state);
        let at = state.namespaces.iter().position(|n| n.nsid == nsid)?;
        let ns = state.namespaces.remove(at);
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        ns.desc.release_claim();
        Some(ns)
    }

    /// Deletion: every namespace's claim released; controllers notice [`Subsystem::is_deleted`].
    pub(crate) fn delete(&self) {
        self.deleted.store(true, Ordering::Release);
        let namespaces = std::mem::take(&mut lock(&self.state).namespaces);
        self.ns_generation.fetch_add(1, Ordering::AcqRel);
        for ns in namespaces {
            ns.desc.release_claim();
        }
    }

    #[inline]
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// SPDK's `nvmf_get_subsystems` entry.
    pub fn to_json(&self) -> Value {
        let state = lock(&self.state);
        json!({
            "nqn": self.nqn,
            "subtype": "NVMe",
            "listen_addresses": state.listeners.iter().map(ListenAddress::to_json).collect::<Vec<_>>(),
            "allow_any_host": self.allow_any_host(),
            "hosts": state.hosts.iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
            "serial_number": self.serial_number,
            "model_number": self.model_number,
            "max_namespaces": self.max_namespaces,
            "min_cntlid": 1,
            "max_cntlid": crate::ctrlr::MAX_CNTLID,
            "namespaces": state.namespaces.iter().map(Namespace::to_json).collect::<Vec<_>>(),
        })
    }

    /// The entries that recreate it (`save_config`), in SPDK's order.
    pub fn to_config(&self) -> Vec<Value> {
        let state = lock(&self.state);
        let mut entries = vec![json!({
            "method": "nvmf_create_subsystem",
            "params": {
                "nqn": self.nqn,
                "serial_number": self.serial_number,
                "model_number": self.model_number,
                "allow_any_host": self.allow_any_host(),
                "max_namespaces": self.max_namespaces,
            }
        })];
        for listener in &state.listeners {
            entries.push(json!({
                "method": "nvmf_subsystem_add_listener",
                "params": { "nqn": self.nqn, "listen_address": listener.to_json() }
            }));
        }
        for host in &state.hosts {
            entries.push(json!({
                "method": "nvmf_subsystem_add_host",
                "params": { "nqn": self.nqn, "host": host }
            }));
        }
        for ns in &state.namespaces {
            entries.push(json!({
                "method": "nvmf_subsystem_add_ns",
                "params": {
                    "nqn": self.nqn,
                    "namespace": {
                        "nsid": ns.nsid,
                        "bdev_name": ns.bdev,
                        "uuid": ns.uuid.to_string(),
                    }
                }
            }));
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_forms() {
        assert!(check_nqn("nqn.2016-06.io.spdk:cnode1").is_ok());
        assert!(
            check_nqn("nqn.2014-08.org.nvmexpress:uuid:0f8e9d3c-1234-4abc-8def-0123456789ab")
                .is_ok()
        );
        assert!(check_nqn("iqn.2016-06.io.spdk").is_err());
        assert!(check_nqn("nqn.16-06.io.spdk").is_err());
        assert!(check_nqn("nqn.2016-06").is_err());
        assert!(check_nqn(&format!("nqn.2016-06.io.{}", "a".repeat(220))).is_err());
        assert!(check_nqn("nqn.2016-06.io.spdk:\u{1b}").is_err());
    }
}
