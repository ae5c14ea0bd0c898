//! The target of one app: the TCP transport, subsystems, listeners, controllers, the poll
//! groups (one lightweight reactor thread per core of the app, like SPDK's) and the service
//! thread that accepts connections and enforces keep alive timeouts.
//!
//! Every method may be called from any thread (an RPC handler, the app's start callback): the
//! state they change sits behind locks taken only on the setup path. The I/O path (the poll
//! groups) reads only atomics of it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use pollux_bdev::{BdevRegistry, Uuid};
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::DmaMemory;
use pollux_nvme::spec::{
    DiscoveryLogEntry, ADRFAM_IPV4, ADRFAM_IPV6, CNTLID_DYNAMIC, SUBTYPE_NVME,
    TREQ_SECURE_CHANNEL_NOT_REQUIRED, TRTYPE_TCP,
};
use pollux_reactor::{send_msg, AppHandle, PollStatus, ThreadCtx, ThreadHandle};
use serde_json::{json, Value};

use crate::conn::Connection;
use crate::ctrlr::{Controller, MAX_CNTLID};
use crate::error::NvmfError;
use crate::poll_group::PollGroup;
use crate::subsystem::{check_nqn, lock, ListenAddress, Namespace, Subsystem, SubsystemOptions};
use crate::transport::TcpTransportOptions;

/// The default NVMe/TCP port (and the discovery service's, on the same listener).
pub const DEFAULT_TRSVCID: u16 = 4420;
/// How often the service thread accepts connections.
const ACCEPT_POLL_US: u64 = 1_000;
/// How often keep alive timers are checked (KAS is 1 s; a tenth of it).
const KEEP_ALIVE_POLL_US: u64 = 100_000;
/// Connections accepted per listener per poll (STYLE #4).
const ACCEPTS_PER_POLL: usize = 8;
/// New connections waiting for their poll group at most; a full inbox refuses more.
const GROUP_INBOX: usize = 64;

/// A listening socket, shared by the subsystems that listen on its address.
struct Listener {
    addr: SocketAddr,
    socket: TcpListener,
    /// Subsystems listening on it.
    refs: usize,
}

/// What the connections share with the target (behind an `Arc`).
pub(crate) struct TargetShared {
    pub(crate) dma: Arc<DmaMemory>,
    transport: Mutex<Option<TcpTransportOptions>>,
    subsystems: Mutex<Vec<Arc<Subsystem>>>,
    controllers: Mutex<Vec<Arc<Controller>>>,
    listeners: Mutex<Vec<Listener>>,
    next_cntlid: AtomicU32,
    /// Discovery log generation: bumped whenever what it shows may have changed.
    genctr: AtomicU64,
    epoch: Instant,
}

impl TargetShared {
    /// Milliseconds on the target's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn transport(&self) -> Option<TcpTransportOptions> {
        *lock(&self.transport)
    }

    pub(crate) fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        lock(&self.subsystems)
            .iter()
            .find(|s| s.nqn == nqn)
            .cloned()
    }

    fn bump_genctr(&self) {
        self.genctr.fetch_add(1, Ordering::AcqRel);
    }

    /// A new controller with a free controller ID.
    pub(crate) fn create_controller(
        &self,
        subsystem: Option<Arc<Subsystem>>,
        hostnqn: &str,
        hostid: [u8; 16],
        transport: TcpTransportOptions,
        kato_ms: u32,
    ) -> Option<Arc<Controller>> {
        let mut controllers = lock(&self.controllers);
        // Controller IDs wrap around 1..=MAX_CNTLID, skipping those in use.
        for _ in 0..MAX_CNTLID {
            let raw = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let cntlid = (raw % u32::from(MAX_CNTLID)) as u16 + 1;
            if controllers.iter().any(|c| c.cntlid == cntlid) {
                continue;
            }
            let ctrlr = Arc::new(Controller::new(
                cntlid,
                subsystem,
                hostnqn,
                hostid,
                transport,
                kato_ms,
                self.now_ms(),
            ));
            controllers.push(ctrlr.clone());
            return Some(ctrlr);
        }
        None
    }

    /// The controller an I/O queue Connect names (same subsystem and host).
    pub(crate) fn find_controller(
        &self,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
    ) -> Option<Arc<Controller>> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.cntlid == cntlid && c.subnqn() == subnqn && c.hostnqn == hostnqn)
            .cloned()
    }

    /// Its admin queue went away: the controller and its I/O queues go too.
    pub(crate) fn remove_controller(&self, ctrlr: &Arc<Controller>) {
        ctrlr.fail();
        lock(&self.controllers).retain(|c| !Arc::ptr_eq(c, ctrlr));
        tracing::info!(cntlid = ctrlr.cntlid, subnqn = %ctrlr.subnqn(), hostnqn = %ctrlr.hostnqn, "nvmf: controller removed");
    }

    /// The discovery log page for `hostnqn` (NVMe-oF 1.1, 5.3): one entry per listener of each
    /// subsystem the host may connect to.
    pub(crate) fn discovery_log(&self, hostnqn: &str, out: &mut Vec<u8>) {
        let subsystems = lock(&self.subsystems).clone();
        let mut entries: Vec<DiscoveryLogEntry> = Vec::new();
        for subsystem in subsystems.iter().filter(|s| s.host_allowed(hostnqn)) {
            for listener in subsystem.listeners() {
                entries.push(DiscoveryLogEntry {
                    trtype: TRTYPE_TCP,
                    adrfam: if listener.addr.is_ipv4() {
                        ADRFAM_IPV4
                    } else {
                        ADRFAM_IPV6
                    },
                    subtype: SUBTYPE_NVME,
                    treq: TREQ_SECURE_CHANNEL_NOT_REQUIRED,
                    portid: 0,
                    cntlid: CNTLID_DYNAMIC,
                    asqsz: 32,
                    eflags: 0,
                    trsvcid: listener.addr.port().to_string(),
                    subnqn: subsystem.nqn.clone(),
                    traddr: listener.addr.ip().to_string(),
                    tsas_sectype: 0,
                });
            }
        }
        crate::discovery::encode_log(self.genctr.load(Ordering::Acquire), &entries, out);
    }
}

/// A poll group as the target sees it: its thread and the inbox of new connections.
struct GroupHandle {
    thread: ThreadHandle,
    inbox: Arc<ArrayQueue<Box<Connection>>>,
}

/// The NVMe-oF target of one app; see the module documentation.
pub struct NvmfTarget {
    app: AppHandle,
    registry: Arc<BdevRegistry>,
    shared: Arc<TargetShared>,
    groups: Mutex<Vec<GroupHandle>>,
    service: Mutex<Option<ThreadHandle>>,
    next_group: Arc<AtomicUsize>,
}

impl std::fmt::Debug for NvmfTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmfTarget")
            .field("subsystems", &self.subsystem_nqns())
            .finish()
    }
}

impl NvmfTarget {
    /// A target with no transport, no subsystem and no listener (SPDK's nvmf_tgt at start).
    /// Its poll groups and service thread start with the TCP transport.
    pub fn new(app: AppHandle, registry: Arc<BdevRegistry>, dma: Arc<DmaMemory>) -> Arc<Self> {
        Arc::new(Self {
            app,
            registry,
            shared: Arc::new(TargetShared {
                dma,
                transport: Mutex::new(None),
                subsystems: Mutex::new(Vec::new()),
                controllers: Mutex::new(Vec::new()),
                listeners: Mutex::new(Vec::new()),
                next_cntlid: AtomicU32::new(0),
                genctr: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
            groups: Mutex::new(Vec::new()),
            service: Mutex::new(None),
            next_group: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// `nvmf_create_transport -t TCP`: checks the options and starts one poll group per core
    /// of the app and the service thread.
    pub fn create_transport(&self, options: TcpTransportOptions) -> Result<(), NvmfError> {
        options.validate()?;
        let mut transport = lock(&self.shared.transport);
        if transport.is_some() {
            return Err(NvmfError::TransportExists);
        }
        let groups = self.start_threads()?;
        *lock(&self.groups) = groups;
        *transport = Some(options);
        tracing::info!(?options, "nvmf: TCP transport created");
        Ok(())
    }

    pub fn transport(&self) -> Option<TcpTransportOptions> {
        self.shared.transport()
    }

    fn start_threads(&self) -> Result<Vec<GroupHandle>, NvmfError> {
        let mut groups: Vec<GroupHandle> = Vec::new();
        let mask = self.app.cpumask();
        for core in mask.iter() {
            let name = format!("nvmf_tgt_poll_group_{core}");
            let only: CpuMask = std::iter::once(core).collect();
            let thread = self
                .app
                .create_thread(&name, Some(&only))
                .map_err(|source| {
                    exit_threads(groups.iter().map(|g| &g.thread));
                    NvmfError::Thread {
                        name: name.clone(),
                        source,
                    }
                })?;
            let inbox = Arc::new(ArrayQueue::new(GROUP_INBOX));
            let group_inbox = inbox.clone();
            let started = send_msg(&thread, move |ctx| PollGroup::start(ctx, group_inbox));
            if started.is_err() {
                tracing::error!(%name, "nvmf: poll group thread refused its start message");
            }
            groups.push(GroupHandle { thread, inbox });
        }
        let first: CpuMask = mask.first().into_iter().collect();
        let service = self
            .app
            .create_thread("nvmf_tgt", Some(&first))
            .map_err(|source| {
                exit_threads(groups.iter().map(|g| &g.thread));
                NvmfError::Thread {
                    name: "nvmf_tgt".to_string(),
                    source,
                }
            })?;
        let shared = self.shared.clone();
        let inboxes: Vec<Arc<ArrayQueue<Box<Connection>>>> =
            groups.iter().map(|g| g.inbox.clone()).collect();
        let next = self.next_group.clone();
        if send_msg(&service, move |ctx| {
            start_service(ctx, shared, inboxes, next)
        })
        .is_err()
        {
            tracing::error!("nvmf: service thread refused its start message");
        }
        *lock(&self.service) = Some(service);
        Ok(groups)
    }

    /// `nvmf_create_subsystem`.
    pub fn create_subsystem(&self, options: SubsystemOptions) -> Result<Arc<Subsystem>, NvmfError> {
        check_nqn(&options.nqn).map_err(|reason| NvmfError::BadNqn {
            nqn: options.nqn.clone(),
            reason,
        })?;
        if options.nqn == pollux_nvme::spec::DISCOVERY_NQN {
            return Err(NvmfError::SubsystemExists { nqn: options.nqn });
        }
        let field = |field, value: &str, reason| NvmfError::SubsystemField {
            nqn: options.nqn.clone(),
            field,
            value: value.to_string(),
            reason,
        };
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        if options.serial_number.is_empty()
            || options.serial_number.len() > crate::subsystem::SERIAL_MAX_BYTES
            || !printable(&options.serial_number)
        {
            return Err(field(
                "serial_number",
                &options.serial_number,
                "1 to 20 printable ASCII characters",
            ));
        }
        if options.model_number.is_empty()
            || options.model_number.len() > crate::subsystem::MODEL_MAX_BYTES
            || !printable(&options.model_number)
        {
            return Err(field(
                "model_number",
                &options.model_number,
                "1 to 40 printable ASCII characters",
            ));
        }
        if options.max_namespaces == 0 || options.max_namespaces > 1024 {
            return Err(field(
                "max_namespaces",
                &options.max_namespaces.to_string(),
                "1..=1024",
            ));
        }
        let mut subsystems = lock(&self.shared.subsystems);
        if subsystems.iter().any(|s| s.nqn == options.nqn) {
            return Err(NvmfError::SubsystemExists { nqn: options.nqn });
        }
        let subsystem = Arc::new(Subsystem::new(&options));
        subsystems.push(subsystem.clone());
        self.shared.bump_genctr();
        tracing::info!(nqn = %options.nqn, "nvmf: subsystem created");
        Ok(subsystem)
    }

    fn get(&self, nqn: &str) -> Result<Arc<Subsystem>, NvmfError> {
        self.shared
            .subsystem(nqn)
            .ok_or_else(|| NvmfError::SubsystemNotFound {
                nqn: nqn.to_string(),
            })
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.shared.subsystem(nqn)
    }

    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        lock(&self.shared.subsystems).clone()
    }

    pub fn subsystem_nqns(&self) -> Vec<String> {
        self.subsystems().iter().map(|s| s.nqn.clone()).collect()
    }

    /// `nvmf_delete_subsystem`: its controllers' queues close (their in-flight I/O completes
    /// first), its listeners are dropped and its bdevs' claims released.
    pub fn delete_subsystem(&self, nqn: &str) -> Result<(), NvmfError> {
        let subsystem = {
            let mut subsystems = lock(&self.shared.subsystems);
            let at = subsystems
                .iter()
                .position(|s| s.nqn == nqn)
                .ok_or_else(|| NvmfError::SubsystemNotFound {
                    nqn: nqn.to_string(),
                })?;
            subsystems.remove(at)
        };
        for listener in subsystem.listeners() {
            subsystem.remove_listener(listener);
            self.release_listener(listener.addr);
        }
        subsystem.delete();
        self.shared.bump_genctr();
        tracing::info!(%nqn, "nvmf: subsystem deleted");
        Ok(())
    }

    /// `nvmf_subsystem_add_ns`: opens and claims the bdev; returns the NSID (the lowest free
    /// one when `nsid` is `None`).
    pub fn add_namespace(
        &self,
        nqn: &str,
        bdev: &str,
        nsid: Option<u32>,
        uuid: Option<Uuid>,
    ) -> Result<u32, NvmfError> {
        let subsystem = self.get(nqn)?;
        let nsid = match nsid {
            Some(n) if n == 0 || n > subsystem.max_namespaces => {
                return Err(NvmfError::BadNsid {
                    nqn: nqn.to_string(),
                    nsid: n,
                    max: subsystem.max_namespaces,
                })
            }
            Some(n) => n,
            None => subsystem.free_nsid().ok_or_else(|| NvmfError::NoFreeNsid {
                nqn: nqn.to_string(),
                max: subsystem.max_namespaces,
            })?,
        };
        if subsystem.namespace(nsid).is_some() {
            return Err(NvmfError::NsidInUse {
                nqn: nqn.to_string(),
                nsid,
            });
        }
        let bdev_error = |source| NvmfError::Bdev {
            nqn: nqn.to_string(),
            bdev: bdev.to_string(),
            source: Box::new(source),
        };
        let desc = self.registry.open(bdev, true, None).map_err(bdev_error)?;
        let block_size = desc.info().block_size_bytes;
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(NvmfError::BlockSize {
                nqn: nqn.to_string(),
                bdev: bdev.to_string(),
                block_size,
            });
        }
        desc.claim(&format!("nvmf subsystem {nqn}"))
            .map_err(bdev_error)?;
        let ns = Namespace::new(nsid, Arc::new(desc), uuid);
        if let Err(ns) = subsystem.insert_namespace(ns) {
            ns.desc.release_claim();
            return Err(NvmfError::NsidInUse {
                nqn: nqn.to_string(),
                nsid,
            });
        }
        tracing::info!(%nqn, nsid, %bdev, "nvmf: namespace added");
        Ok(nsid)
    }

    /// `nvmf_subsystem_remove_ns`.
    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<(), NvmfError> {
        let subsystem = self.get(nqn)?;
        subsystem
            .remove_namespace(nsid)
            .ok_or_else(|| NvmfError::NamespaceNotFound {
                nqn: nqn.to_string(),
                nsid,
            })?;
        tracing::info!(%nqn, nsid, "nvmf: namespace removed");
        Ok(())
    }

    /// `nvmf_subsystem_add_listener`: listens on the address (shared with other subsystems
    /// listening there; the discovery service answers on every listener).
    /// Returns the address listened on (for port 0, the port the kernel chose).
    pub fn add_listener(&self, nqn: &str, addr: SocketAddr) -> Result<SocketAddr, NvmfError> {
        if self.transport().is_none() {
            return Err(NvmfError::NoTransport);
        }
        let subsystem = self.get(nqn)?;
        if subsystem.listens_on(addr) {
            return Err(NvmfError::ListenerExists {
                nqn: nqn.to_string(),
                addr,
            });
        }
        let addr = {
            let mut listeners = lock(&self.shared.listeners);
            match listeners.iter_mut().find(|l| l.addr == addr) {
                Some(listener) => {
                    listener.refs += 1;
                    addr
                }
                None => {
                    let socket = TcpListener::bind(addr)
                        .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        .map_err(|source| NvmfError::Listen { addr, source })?;
                    // Port 0: the port the kernel chose is the listener's address.
                    let bound = socket
                        .local_addr()
                        .map_err(|source| NvmfError::Listen { addr, source })?;
                    tracing::info!(addr = %bound, "nvmf: listening (TCP)");
                    listeners.push(Listener {
                        addr: bound,
                        socket,
                        refs: 1,
                    });
                    bound
                }
            }
        };
        subsystem.add_listener(ListenAddress { addr });
        self.shared.bump_genctr();
        Ok(addr)
    }

    /// `nvmf_subsystem_remove_listener`. Connections already made stay.
    pub fn remove_listener(&self, nqn: &str, addr: SocketAddr) -> Result<(), NvmfError> {
        let subsystem = self.get(nqn)?;
        if !subsystem.remove_listener(ListenAddress { addr }) {
            return Err(NvmfError::ListenerNotFound {
                nqn: nqn.to_string(),
                addr,
            });
        }
        self.release_listener(addr);
        self.shared.bump_genctr();
        Ok(())
    }

    fn release_listener(&self, addr: SocketAddr) {
        let mut listeners = lock(&self.shared.listeners);
        if let Some(at) = listeners.iter().position(|l| l.addr == addr) {
            listeners[at].refs -= 1;
            if listeners[at].refs == 0 {
                listeners.remove(at);
                tracing::info!(%addr, "nvmf: stopped listening");
            }
        }
    }

    /// `nvmf_subsystem_add_host`.
    pub fn add_host(&self, nqn: &str, host: &str) -> Result<(), NvmfError> {
        check_nqn(host).map_err(|reason| NvmfError::BadNqn {
            nqn: host.to_string(),
            reason,
        })?;
        self.get(nqn)?.add_host(host);
        self.shared.bump_genctr();
        Ok(())
    }

    /// `nvmf_subsystem_remove_host`; `Ok(false)` when it was not on the list.
    pub fn remove_host(&self, nqn: &str, host: &str) -> Result<bool, NvmfError> {
        let removed = self.get(nqn)?.remove_host(host);
        self.shared.bump_genctr();
        Ok(removed)
    }

    /// `nvmf_subsystem_allow_any_host`.
    pub fn allow_any_host(&self, nqn: &str, allow: bool) -> Result<(), NvmfError> {
        self.get(nqn)?.set_allow_any_host(allow);
        self.shared.bump_genctr();
        Ok(())
    }

    /// Controllers connected now (for tests and logs).
    pub fn controller_count(&self) -> usize {
        lock(&self.shared.controllers).len()
    }

    /// `nvmf_get_subsystems`: the discovery subsystem first, as SPDK lists it.
    pub fn subsystems_json(&self) -> Value {
        let mut list = vec![json!({
            "nqn": pollux_nvme::spec::DISCOVERY_NQN,
            "subtype": "Discovery",
            "listen_addresses": [],
            "allow_any_host": true,
            "hosts": [],
        })];
        list.extend(self.subsystems().iter().map(|s| s.to_json()));
        Value::Array(list)
    }

    /// `{"subsystem": "nvmf", "config": [...]}` (what `-c` and `load_config` replay).
    pub fn save_config(&self) -> Value {
        let mut config: Vec<Value> = Vec::new();
        if let Some(transport) = self.transport() {
            config.push(transport.to_config());
        }
        for subsystem in self.subsystems() {
            config.extend(subsystem.to_config());
        }
        json!({ "subsystem": "nvmf", "config": config })
    }

    /// Deletes every subsystem and stops listening (app shutdown, after the reactors
    /// stopped: the poll groups have drained their connections).
    pub fn shutdown(&self) {
        for nqn in self.subsystem_nqns() {
            let _ = self.delete_subsystem(&nqn);
        }
        lock(&self.shared.listeners).clear();
        exit_threads(lock(&self.groups).iter().map(|g| &g.thread));
        if let Some(service) = lock(&self.service).take() {
            exit_threads(std::iter::once(&service));
        }
    }
}

impl Drop for NvmfTarget {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn exit_threads<'a>(threads: impl Iterator<Item = &'a ThreadHandle>) {
    for thread in threads {
        if thread.has_exited() {
            continue;
        }
        if send_msg(thread, |ctx| ctx.exit()).is_err() {
            tracing::debug!(thread = thread.name(), "nvmf: thread already gone");
        }
    }
}

/// The service thread: accepts connections on every listener (round robin over the poll
/// groups) and expires controllers whose keep alive timer ran out.
fn start_service(
    ctx: &mut ThreadCtx,
    shared: Arc<TargetShared>,
    inboxes: Vec<Arc<ArrayQueue<Box<Connection>>>>,
    next: Arc<AtomicUsize>,
) {
    let accept_shared = shared.clone();
    let accept = ctx.register_poller("nvmf_tcp_accept", ACCEPT_POLL_US, move |_ctx| {
        PollStatus::from_busy(accept_all(&accept_shared, &inboxes, &next) > 0)
    });
    let keep_alive = ctx.register_poller("nvmf_keep_alive", KEEP_ALIVE_POLL_US, move |_ctx| {
        PollStatus::from_busy(expire_keep_alive(&shared) > 0)
    });
    ctx.on_exit(move |ctx| {
        ctx.unregister_poller(accept);
        ctx.unregister_poller(keep_alive);
    });
}

fn accept_all(
    shared: &Arc<TargetShared>,
    inboxes: &[Arc<ArrayQueue<Box<Connection>>>],
    next: &AtomicUsize,
) -> usize {
    let Some(transport) = shared.transport() else {
        return 0;
    };
    // Setup-path state; a poll that finds it busy (an RPC changing listeners) skips a turn.
    let Ok(listeners) = shared.listeners.try_lock() else {
        return 0;
    };
    let mut accepted = 0;
    for listener in listeners.iter() {
        for _ in 0..ACCEPTS_PER_POLL {
            let (stream, peer) = match listener.socket.accept() {
                Ok(pair) => pair,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::warn!(addr = %listener.addr, %error, "nvmf: accept failed");
                    break;
                }
            };
            accepted += 1;
            if let Err(error) = prepare(&stream) {
                tracing::warn!(%peer, %error, "nvmf: cannot set up the connection's socket");
                continue;
            }
            let conn = Box::new(Connection::new(
                stream,
                peer,
                listener.addr,
                shared.clone(),
                transport,
            ));
            let index = next.fetch_add(1, Ordering::Relaxed) % inboxes.len().max(1);
            match inboxes.get(index).map(|inbox| inbox.push(conn)) {
                Some(Ok(())) => {
                    tracing::info!(%peer, listener = %listener.addr, group = index, "nvmf: connection accepted")
                }
                _ => tracing::warn!(%peer, "nvmf: poll group inbox full, connection refused"),
            }
        }
    }
    accepted
}

fn prepare(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)
}

fn expire_keep_alive(shared: &TargetShared) -> usize {
    let now = shared.now_ms();
    let controllers = lock(&shared.controllers).clone();
    let mut expired = 0;
    for ctrlr in controllers.iter().filter(|c| !c.is_failed()) {
        if ctrlr.keep_alive_expired(now) {
            tracing::warn!(cntlid = ctrlr.cntlid, subnqn = %ctrlr.subnqn(), hostnqn = %ctrlr.hostnqn, kato_ms = ctrlr.kato_ms(), "nvmf: keep alive timeout expired, controller removed");
            shared.remove_controller(ctrlr);
            expired += 1;
        }
    }
    expired
}
