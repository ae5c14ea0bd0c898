//! The bdev module `nvme`, after SPDK's `module/bdev/nvme`: one bdev per active namespace of
//! an attached controller, named `<controller>n<nsid>` (`Nvme0n1`, ...).
//!
//! - Configuration: `bdev_nvme_attach_controller` with SPDK's parameters (`name`, `trtype`
//!   `"PCIe"`, `traddr` a PCI address; the optional ones accepted at SPDK's defaults, any
//!   other value refused by name, see [`parse_attach`]). The bdev layer sits below this
//!   crate, so an app adds the method to its [`MethodTable`] with [`register_methods`].
//!   `bdev_nvme_detach_controller` ([`NvmeModule::detach_controller`], [`parse_detach`]) is
//!   not a config-file method: a config entry creates bdevs, a detach removes them (it is for
//!   an RPC layer).
//! - Setup path: the controller sits behind a `Mutex` ([`Controller`] runs its admin commands
//!   synchronously). `create_channel` takes the lock to create one I/O queue pair per
//!   channel; the admin poller ([`NvmeModule::poll_admin`], every few milliseconds from the
//!   app) only `try_lock`s it, so it never waits behind a channel being created.
//! - I/O path: the channel owns its [`QueuePair`] and never locks. One bdev I/O is one NVMe
//!   command whose tag is the bdev request slot, so there is no per-I/O state beyond the
//!   driver's own slot table and a scratch iovec array sized at `create_channel` (STYLE #5).
//!   Completions are reaped in the channel's `poll` and mapped to an [`IoStatus`]; a failed
//!   command logs its NVMe status name ("LBA Out of Range", ...).
//! - Supported I/O: read, write; flush when the controller has a volatile write cache
//!   (VWC); write zeroes and unmap (Dataset Management, deallocate) when ONCS says so.
//!   Reset is not supported (a controller reset is the admin poller's decision).
//!
//! A read or write larger than the namespace's maximum transfer (MDTS) is split into commands
//! of at most that size, all tagged with the bdev slot; the bdev I/O completes when the last
//! one does (failed if any failed). Children that find the queue pair's slots taken wait in
//! the channel and go out as earlier commands complete. The parent's iovec list is copied
//! into the slot's own array (allocated at the slot's first split, reused after).
//!
//! Limits (refused with [`IoStatus::Failed`] and a log line): more than [`MAX_IOVS_PER_IO`]
//! iovecs, and write zeroes / unmap of more than 65536 blocks.
//!
//! Recovery: after a controller reset every queue pair fails its requests back with
//! *Command Aborted due to SQ Deletion* (-> `Failed`) and disconnects; the channel's next
//! poll reconnects it when the controller is running again (`try_lock`, so it never blocks).
//!
//! The module's controllers live in a process-wide [`NvmeModule::global`]: a config method's
//! parse function is a plain `fn` (the bdev layer's interface), so the state it creates must
//! be reachable without a context argument. Tests may build their own [`NvmeModule`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};

use pollux_bdev::config::{CreateContext, MethodTable, Params, PendingBdev};
use pollux_bdev::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use pollux_bdev::{
    BdevError, BdevInfo, BdevRegistry, BdevSpec, IoStatus, IoType, MAX_COMPLETIONS_PER_POLL,
};
use pollux_env::dma::DmaMemory;
use pollux_env::pci::PciAddress;
use pollux_env::wake::WakeTimer;

use crate::ctrlr::{Controller, ControllerOptions, ControllerState, Namespace};
use crate::error::NvmeError;
use crate::pcie::PcieRegisters;
use crate::prp::IoVec;
use crate::qpair::{QueuePair, QueuePairOptions};
use crate::regs::Registers;
use crate::spec::{ONCS_DSM, ONCS_WRITE_ZEROES};

/// The attach method.
pub const ATTACH_METHOD: &str = "bdev_nvme_attach_controller";
/// The detach method (RPC only, see the module documentation).
pub const DETACH_METHOD: &str = "bdev_nvme_detach_controller";
/// The module name bdevs report.
pub const MODULE_NAME: &str = "nvme";
/// Iovecs of one I/O at most (the channel's scratch array is this long).
pub const MAX_IOVS_PER_IO: usize = 256;
/// Data buffers must be dword aligned (PRP1 and SGL data blocks, NVMe Base 2.0 4.1.1).
pub const REQUIRED_ALIGNMENT_BYTES: u32 = 4;
/// Write Zeroes and Dataset Management ranges carry a 16-bit 0's based block count.
const MAX_NO_DATA_BLOCKS: u64 = 65536;
/// SPDK's default `max_bdevs` (names returned by the RPC).
const DEFAULT_MAX_BDEVS: u64 = 128;

// -----------------------------------------------------------------------------------------
// Configuration

/// What a controller attach asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachOptions {
    /// The controller's name; its bdevs are `<name>n<nsid>`.
    pub name: String,
    /// `PCIe` (written back by `save_config`).
    pub trtype: String,
    /// The PCI address (or, for a test controller, any label).
    pub traddr: String,
    /// Namespaces (bdevs) at most; more fails the attach (SPDK's `max_bdevs`).
    pub max_bdevs: u64,
    pub controller: ControllerOptions,
}

/// A validated `bdev_nvme_attach_controller`, created in the config's second phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAttach {
    pub options: AttachOptions,
    pub address: PciAddress,
}

/// A validated `bdev_nvme_detach_controller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachRequest {
    pub name: String,
}

/// Adds `bdev_nvme_attach_controller` to an app's method table.
pub fn register_methods(table: &mut MethodTable) -> Result<(), BdevError> {
    table.register(ATTACH_METHOD, parse_attach)
}

/// SPDK's `rpc_bdev_nvme_attach_controller_decoders` (`module/bdev/nvme/bdev_nvme_rpc.c`).
const ATTACH_PARAMS: &[&str] = &[
    "name",
    "trtype",
    "traddr",
    "adrfam",
    "trsvcid",
    "priority",
    "subnqn",
    "hostnqn",
    "hostaddr",
    "hostsvcid",
    "prchk_reftag",
    "prchk_guard",
    "hdgst",
    "ddgst",
    "fabrics_connect_timeout_us",
    "multipath",
    "num_io_queues",
    "ctrlr_loss_timeout_sec",
    "reconnect_delay_sec",
    "fast_io_fail_timeout_sec",
    "psk",
    "max_bdevs",
    "dhchap_key",
    "dhchap_ctrlr_key",
    "allow_unrecognized_csi",
];

/// NVMe-oF parameters: meaningless for PCIe, refused when present (`hostnqn` excepted:
/// SPDK's `save_config` writes it for every controller and ignores it for PCIe, as we do).
const FABRICS_STRING_PARAMS: &[&str] = &[
    "adrfam",
    "trsvcid",
    "priority",
    "subnqn",
    "hostaddr",
    "hostsvcid",
    "psk",
    "dhchap_key",
    "dhchap_ctrlr_key",
];

/// Parses `bdev_nvme_attach_controller`: `name`, `trtype` (`PCIe`, any case) and `traddr`
/// required; `num_io_queues` (1..=65535) and `max_bdevs` honoured; `hostnqn` and
/// `multipath` (one path only, so every mode is the same) accepted and ignored; every other
/// SPDK parameter only at its default (absent, `false` or 0), refused by name otherwise.
pub fn parse_attach(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    parse_attach_options(params).map(|pending| Box::new(pending) as Box<dyn PendingBdev>)
}

/// [`parse_attach`], returning the concrete value (for an RPC layer and tests).
pub fn parse_attach_options(params: &Params<'_>) -> Result<PendingAttach, BdevError> {
    params.allow_only(ATTACH_PARAMS)?;
    let name = params.required_str("name")?;
    if name.is_empty() {
        return Err(params.invalid("name", "must not be empty"));
    }
    let trtype = params.required_str("trtype")?;
    if !trtype.eq_ignore_ascii_case("pcie") {
        return Err(params.invalid(
            "trtype",
            &format!("{trtype:?} is not supported by Pollux: only \"PCIe\" is"),
        ));
    }
    let traddr = params.required_str("traddr")?;
    let address =
        PciAddress::parse(traddr).map_err(|e| params.invalid("traddr", &e.to_string()))?;
    for &key in FABRICS_STRING_PARAMS {
        if params.str(key)?.is_some() {
            return Err(params.invalid(
                static_key(key),
                "applies to NVMe-oF transports only; Pollux attaches PCIe controllers: leave it out",
            ));
        }
    }
    params.str("hostnqn")?;
    if let Some(mode) = params.str("multipath")? {
        if !matches!(mode, "disable" | "failover" | "multipath") {
            return Err(params.invalid(
                "multipath",
                "must be \"disable\", \"failover\" or \"multipath\"",
            ));
        }
    }
    for key in ["prchk_reftag", "prchk_guard"] {
        if params.bool(key)? == Some(true) {
            return Err(params.invalid(
                static_key(key),
                "is not supported by Pollux (no protection information): use false",
            ));
        }
    }
    for key in ["hdgst", "ddgst"] {
        if params.bool(key)? == Some(true) {
            return Err(params.invalid(
                static_key(key),
                "is an NVMe/TCP digest, not supported by Pollux: use false",
            ));
        }
    }
    if params.bool("allow_unrecognized_csi")? == Some(true) {
        return Err(params.invalid(
            "allow_unrecognized_csi",
            "is not supported by Pollux (NVM command set only): use false",
        ));
    }
    if params
        .u64("fabrics_connect_timeout_us")?
        .is_some_and(|v| v != 0)
    {
        return Err(params.invalid(
            "fabrics_connect_timeout_us",
            "applies to NVMe-oF transports only: use 0 or leave it out",
        ));
    }
    if params
        .i64("ctrlr_loss_timeout_sec")?
        .is_some_and(|v| v != 0)
    {
        return Err(params.invalid(
            "ctrlr_loss_timeout_sec",
            "is not supported by Pollux (no reconnect policy): use 0 or leave it out",
        ));
    }
    for key in ["reconnect_delay_sec", "fast_io_fail_timeout_sec"] {
        if params.u64(key)?.is_some_and(|v| v != 0) {
            return Err(params.invalid(
                static_key(key),
                "is not supported by Pollux (no reconnect policy): use 0 or leave it out",
            ));
        }
    }
    let mut controller = ControllerOptions::default();
    if let Some(queues) = params.u64("num_io_queues")? {
        controller.io_queues = u16::try_from(queues)
            .ok()
            .filter(|q| *q >= 1 && *q < u16::MAX)
            .ok_or_else(|| params.invalid("num_io_queues", "must be 1 to 65534"))?;
    }
    let max_bdevs = params.u64("max_bdevs")?.unwrap_or(DEFAULT_MAX_BDEVS);
    if max_bdevs == 0 {
        return Err(params.invalid("max_bdevs", "must be greater than 0"));
    }
    Ok(PendingAttach {
        options: AttachOptions {
            name: name.to_string(),
            trtype: "PCIe".to_string(),
            traddr: address.to_string(),
            max_bdevs,
            controller,
        },
        address,
    })
}

/// Parses `bdev_nvme_detach_controller`: `name`; SPDK's path selectors (`trtype`, `traddr`,
/// ...) pick one path of a multipath controller, and Pollux has one path per controller, so
/// they are refused.
pub fn parse_detach(params: &Params<'_>) -> Result<DetachRequest, BdevError> {
    params.allow_only(&[
        "name",
        "trtype",
        "traddr",
        "adrfam",
        "trsvcid",
        "subnqn",
        "hostaddr",
        "hostsvcid",
    ])?;
    for key in [
        "trtype",
        "traddr",
        "adrfam",
        "trsvcid",
        "subnqn",
        "hostaddr",
        "hostsvcid",
    ] {
        if params.str(key)?.is_some() {
            return Err(params.invalid(
                static_key(key),
                "selects one path of a multipath controller; Pollux has one path: leave it out",
            ));
        }
    }
    Ok(DetachRequest {
        name: params.required_str("name")?.to_string(),
    })
}

/// The parameter names as `&'static str` (what [`BdevError::InvalidParam`] carries).
fn static_key(key: &str) -> &'static str {
    ATTACH_PARAMS
        .iter()
        .copied()
        .find(|k| *k == key)
        .unwrap_or("params")
}

impl PendingBdev for PendingAttach {
    fn name(&self) -> Option<&str> {
        // The controller's name: the config loader's duplicate checks and error messages use
        // it (the bdevs, `<name>n<nsid>`, are known only once the controller is up).
        Some(&self.options.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        let dma = ctx.dma.ok_or_else(|| BdevError::NoDmaMemory {
            method: ATTACH_METHOD.to_string(),
        })?;
        let module = NvmeModule::global();
        module.check_name_free(ATTACH_METHOD, &self.options.name)?;
        let traddr_error = |reason: &str, source: Box<dyn std::error::Error + Send + Sync>| {
            BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "traddr",
                reason: format!("{}: {reason}", self.address),
                source: Some(source),
            }
        };
        let regs = PcieRegisters::open(&self.address)
            .map_err(|e| traddr_error("could not open the device through VFIO", Box::new(e)))?;
        // Every device opened with `VfioPciDevice::open` shares the process-wide container,
        // so one mapper serves them all: attach it once (the first controller does).
        if !dma.memmap().has_mapper() {
            match dma.memmap().set_mapper(regs.container().clone()) {
                Ok(()) | Err(pollux_env::memmap::TranslationError::MapperAlreadySet) => {}
                Err(e) => {
                    return Err(traddr_error(
                        "could not map the DMA memory into the IOMMU",
                        Box::new(e),
                    ))
                }
            }
        }
        let infos = module.attach_with_registers(
            ctx.registry,
            Arc::new(regs),
            Arc::clone(dma),
            self.options.clone(),
        )?;
        infos
            .into_iter()
            .next()
            .ok_or_else(|| BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "traddr",
                reason: format!("{}: the controller has no active namespace", self.address),
                source: None,
            })
    }
}

// -----------------------------------------------------------------------------------------
// The module: attached controllers

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every user leaves the controller consistent between calls (a panic inside an admin
    // command leaves at worst a command the next admin poll times out).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A controller and what its bdevs share.
struct NvmeCtrlr<R: Registers> {
    options: AttachOptions,
    ctrlr: Mutex<Controller<R>>,
    bdev_names: Vec<String>,
    /// Requests of closed channels that went through a bounce buffer (zero copy failed).
    bounced: AtomicU64,
}

/// What the module keeps of an attached controller, whatever its register access.
trait AttachedCtrlr: Send + Sync {
    fn name(&self) -> &str;
    fn bdev_names(&self) -> &[String];
    /// Admin poll; `None` when the controller was busy (locked by a channel being set up).
    fn poll_admin(&self) -> Option<Result<u32, NvmeError>>;
    fn state(&self) -> ControllerState;
    /// Bounced requests of the channels closed so far.
    fn bounced(&self) -> u64;
}

impl<R: Registers + 'static> AttachedCtrlr for NvmeCtrlr<R> {
    fn name(&self) -> &str {
        &self.options.name
    }

    fn bdev_names(&self) -> &[String] {
        &self.bdev_names
    }

    fn bounced(&self) -> u64 {
        self.bounced.load(Ordering::Relaxed)
    }

    fn poll_admin(&self) -> Option<Result<u32, NvmeError>> {
        let mut ctrlr = match self.ctrlr.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        if ctrlr.state() == ControllerState::Failed {
            return Some(Err(NvmeError::ControllerFailed));
        }
        // `process_admin_completions` starts with `poll_health` (CSTS: removal, fatal).
        Some(ctrlr.process_admin_completions())
    }

    fn state(&self) -> ControllerState {
        lock(&self.ctrlr).state()
    }
}

/// The nvme bdev module's controllers. See the module documentation.
#[derive(Default)]
pub struct NvmeModule {
    controllers: Mutex<Vec<Arc<dyn AttachedCtrlr>>>,
}

impl std::fmt::Debug for NvmeModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeModule")
            .field("controllers", &self.controller_names())
            .finish()
    }
}

impl NvmeModule {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide module the config method attaches to.
    pub fn global() -> &'static NvmeModule {
        static GLOBAL: OnceLock<NvmeModule> = OnceLock::new();
        GLOBAL.get_or_init(NvmeModule::new)
    }

    /// Names of the attached controllers, in attach order.
    pub fn controller_names(&self) -> Vec<String> {
        lock(&self.controllers)
            .iter()
            .map(|c| c.name().to_string())
            .collect()
    }

    /// The bdevs of controller `name`.
    pub fn bdev_names(&self, name: &str) -> Option<Vec<String>> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.name() == name)
            .map(|c| c.bdev_names().to_vec())
    }

    /// The life-cycle state of controller `name`.
    pub fn controller_state(&self, name: &str) -> Option<ControllerState> {
        let ctrlr = lock(&self.controllers)
            .iter()
            .find(|c| c.name() == name)
            .cloned()?;
        Some(ctrlr.state())
    }

    fn check_name_free(&self, method: &str, name: &str) -> Result<(), BdevError> {
        if lock(&self.controllers).iter().any(|c| c.name() == name) {
            return Err(BdevError::DuplicateName {
                method: method.to_string(),
                name: name.to_string(),
                where_: " (an attached NVMe controller has it)",
            });
        }
        Ok(())
    }

    /// Initialises the controller behind `regs` (a VFIO BAR, or the software model in tests)
    /// and registers one bdev per active namespace. On failure nothing stays registered.
    pub fn attach_with_registers<R: Registers + 'static>(
        &self,
        registry: &BdevRegistry,
        regs: Arc<R>,
        dma: Arc<DmaMemory>,
        options: AttachOptions,
    ) -> Result<Vec<BdevInfo>, BdevError> {
        self.check_name_free(ATTACH_METHOD, &options.name)?;
        let ctrlr = Controller::new(regs, dma, options.controller).map_err(|source| {
            BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "traddr",
                reason: format!("{}: controller initialisation failed", options.traddr),
                source: Some(Box::new(source)),
            }
        })?;
        let namespaces: Vec<Namespace> = ctrlr.namespaces().to_vec();
        if namespaces.len() as u64 > options.max_bdevs {
            return Err(BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "max_bdevs",
                reason: format!(
                    "is {} but the controller has {} active namespaces",
                    options.max_bdevs,
                    namespaces.len()
                ),
                source: None,
            });
        }
        let identify = ctrlr.identify();
        let features = Features {
            flush: identify.has_volatile_write_cache(),
            write_zeroes: identify.oncs & ONCS_WRITE_ZEROES != 0,
            unmap: identify.oncs & ONCS_DSM != 0,
        };
        let bdev_names: Vec<String> = namespaces
            .iter()
            .map(|ns| format!("{}n{}", options.name, ns.nsid()))
            .collect();
        let shared = Arc::new(NvmeCtrlr {
            options,
            ctrlr: Mutex::new(ctrlr),
            bdev_names,
            bounced: AtomicU64::new(0),
        });
        let mut infos = Vec::with_capacity(namespaces.len());
        for (index, ns) in namespaces.into_iter().enumerate() {
            let nguid = ns.identify().nguid;
            let spec = BdevSpec {
                name: shared.bdev_names[index].clone(),
                aliases: Vec::new(),
                uuid: (nguid != [0; 16]).then_some(pollux_bdev::Uuid(nguid)),
                block_size_bytes: ns.block_size_bytes(),
                num_blocks: ns.num_blocks(),
                required_alignment_bytes: REQUIRED_ALIGNMENT_BYTES,
                write_cache: features.flush,
            };
            let backend = Arc::new(NvmeBdev {
                ctrlr: Arc::clone(&shared),
                ns,
                name: shared.bdev_names[index].clone(),
                features,
                writes_config: index == 0,
            });
            match registry.register(spec, backend) {
                Ok(info) => infos.push(info),
                Err(error) => {
                    for done in &infos {
                        let _ = registry.unregister(&done.name);
                    }
                    return Err(error);
                }
            }
        }
        tracing::info!(
            controller = %shared.options.name,
            traddr = %shared.options.traddr,
            bdevs = ?shared.bdev_names,
            "nvme: controller attached"
        );
        lock(&self.controllers).push(shared);
        Ok(infos)
    }

    /// `bdev_nvme_detach_controller`: hot-removes the controller's bdevs (open descriptors
    /// get [`BdevEvent::Remove`](pollux_bdev::BdevEvent)) and forgets the controller. It is
    /// shut down now when nothing else holds it, otherwise when its last channel closes.
    pub fn detach_controller(&self, registry: &BdevRegistry, name: &str) -> Result<(), BdevError> {
        let ctrlr = {
            let mut controllers = lock(&self.controllers);
            let index = controllers
                .iter()
                .position(|c| c.name() == name)
                .ok_or_else(|| BdevError::InvalidParam {
                    method: DETACH_METHOD.to_string(),
                    param: "name",
                    reason: format!("names no attached NVMe controller: {name:?}"),
                    source: None,
                })?;
            controllers.remove(index)
        };
        for bdev in ctrlr.bdev_names() {
            match registry.unregister(bdev) {
                Ok(_) | Err(BdevError::NotFound { .. }) => {}
                Err(error) => tracing::warn!(%bdev, %error, "nvme: unregister on detach failed"),
            }
        }
        let others = Arc::strong_count(&ctrlr) - 1;
        drop(ctrlr);
        tracing::info!(
            controller = name,
            still_held_by = others,
            "nvme: controller detached (shut down once its bdevs and channels are gone)"
        );
        Ok(())
    }

    /// Requests of `name`'s closed channels that went through a bounce buffer instead of
    /// zero copy (`None`: no such controller).
    pub fn bounced_requests(&self, name: &str) -> Option<u64> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.name() == name)
            .map(|c| c.bounced())
    }

    /// Detaches every controller (at app exit, after the I/O stopped).
    pub fn detach_all(&self, registry: &BdevRegistry) {
        for name in self.controller_names() {
            if let Err(error) = self.detach_controller(registry, &name) {
                tracing::warn!(controller = %name, %error, "nvme: detach failed");
            }
        }
    }

    /// The admin poller: for every controller, health (CSTS) and admin completions (async
    /// events, aborts of timed-out commands, resets). Call it every few milliseconds from
    /// one thread. Never blocks: a controller locked by a channel being set up is skipped
    /// until the next call. Returns the admin completions reaped (0: idle).
    pub fn poll_admin(&self) -> u32 {
        let controllers: Vec<Arc<dyn AttachedCtrlr>> = lock(&self.controllers).clone();
        let mut reaped = 0;
        for ctrlr in controllers {
            match ctrlr.poll_admin() {
                None => {}
                Some(Ok(count)) => reaped += count,
                Some(Err(NvmeError::ControllerFailed)) => {
                    tracing::debug!(controller = ctrlr.name(), "nvme: controller failed");
                }
                Some(Err(error)) => {
                    tracing::error!(controller = ctrlr.name(), %error, "nvme: admin poll failed");
                }
            }
        }
        reaped
    }
}

// -----------------------------------------------------------------------------------------
// Backend (one per namespace) and channel (one queue pair each)

#[derive(Debug, Clone, Copy)]
struct Features {
    flush: bool,
    write_zeroes: bool,
    unmap: bool,
}

struct NvmeBdev<R: Registers> {
    ctrlr: Arc<NvmeCtrlr<R>>,
    ns: Namespace,
    name: String,
    features: Features,
    /// `save_config` writes one entry per bdev; the controller's attach is written once, by
    /// its first namespace's bdev (the others write an ignored `bdev_wait_for_examine`).
    writes_config: bool,
}

impl<R: Registers + 'static> BdevBackend for NvmeBdev<R> {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn supports(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write => true,
            IoType::Flush => self.features.flush,
            IoType::WriteZeroes => self.features.write_zeroes,
            IoType::Unmap => self.features.unmap,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let options = QueuePairOptions {
            // One command per bdev I/O: the pair's slots match the channel's. The SQ holds
            // `entries - 1` commands (clamped to CAP.MQES by the driver; the rest wait in
            // the pair's software queue).
            entries: queue_depth.saturating_add(1),
            depth: queue_depth,
            ..QueuePairOptions::default()
        };
        let qpair = lock(&self.ctrlr.ctrlr)
            .alloc_io_qpair(&options)
            .map_err(|source| BdevError::ChannelCreate {
                module: MODULE_NAME,
                bdev: self.bdev_name().to_string(),
                source: Box::new(source),
            })?;
        tracing::debug!(
            bdev = self.bdev_name(),
            qid = qpair.qid(),
            queue_depth,
            "nvme: channel created"
        );
        Ok(Box::new(NvmeChannel {
            ctrlr: Arc::clone(&self.ctrlr),
            ns: self.ns.clone(),
            qpair: Some(qpair),
            iovs: Vec::with_capacity(MAX_IOVS_PER_IO),
            max_per_poll: u32::from(queue_depth).min(MAX_COMPLETIONS_PER_POLL as u32),
            bdev_name: self.bdev_name().into(),
            max_transfer_blocks: (self.ns.max_transfer_bytes()
                / u64::from(self.ns.block_size_bytes()))
            .max(1),
            splits: vec![Split::default(); usize::from(queue_depth)],
            split_iovs: (0..queue_depth).map(|_| Vec::new()).collect(),
            pending_splits: VecDeque::with_capacity(usize::from(queue_depth)),
            timer: std::cell::OnceCell::new(),
        }))
    }

    fn write_config(&self, _info: &BdevInfo) -> serde_json::Value {
        if !self.writes_config {
            return serde_json::json!({ "method": "bdev_wait_for_examine" });
        }
        let options = &self.ctrlr.options;
        let mut params = serde_json::json!({
            "name": options.name,
            "trtype": options.trtype,
            "traddr": options.traddr,
        });
        if options.controller.io_queues != ControllerOptions::default().io_queues {
            params["num_io_queues"] = options.controller.io_queues.into();
        }
        if options.max_bdevs != DEFAULT_MAX_BDEVS {
            params["max_bdevs"] = options.max_bdevs.into();
        }
        serde_json::json!({ "method": ATTACH_METHOD, "params": params })
    }
}

impl<R: Registers> NvmeBdev<R> {
    fn bdev_name(&self) -> &str {
        &self.name
    }
}

struct NvmeChannel<R: Registers> {
    ctrlr: Arc<NvmeCtrlr<R>>,
    ns: Namespace,
    /// `None` only inside `drop`.
    qpair: Option<QueuePair<R>>,
    /// Scratch for one I/O's iovecs, `MAX_IOVS_PER_IO` long from creation (never grows).
    iovs: Vec<IoVec>,
    max_per_poll: u32,
    bdev_name: Arc<str>,
    /// The namespace's maximum transfer, in blocks: larger reads and writes are split.
    max_transfer_blocks: u64,
    /// Split state per bdev slot.
    splits: Vec<Split>,
    /// Per bdev slot: the split parent's iovecs (filled only for split I/O).
    split_iovs: Vec<Vec<IoVec>>,
    /// Slots of split I/Os with children waiting for a free queue pair slot, oldest first.
    pending_splits: VecDeque<u16>,
    /// Interrupt mode: the polled driver raises no interrupt, so a periodic timer armed
    /// while commands are outstanding wakes the owner to poll (created by the first
    /// `interrupt_fd` call; `None` inside when the system refused a timerfd).
    timer: std::cell::OnceCell<Option<WakeTimer>>,
}

/// How often an interrupt-mode owner with commands outstanding is woken to poll: the most a
/// completion waits once its reactor sleeps. No timer runs while nothing is outstanding.
pub const INTERRUPT_POLL_PERIOD: std::time::Duration = std::time::Duration::from_micros(20);

/// A read or write cut into commands of at most the maximum transfer.
#[derive(Debug, Default, Clone, Copy)]
struct Split {
    active: bool,
    write: bool,
    /// Waiting in `pending_splits`.
    queued: bool,
    failed: bool,
    next_block: u64,
    end_block: u64,
    /// Where the next child's data starts in the parent's iovecs.
    iov_index: usize,
    iov_offset: usize,
    /// Children submitted and not completed.
    outstanding: u32,
}

impl Split {
    fn finished(&self) -> bool {
        self.active
            && self.outstanding == 0
            && !self.queued
            && (self.failed || self.next_block >= self.end_block)
    }
}

impl<R: Registers> NvmeChannel<R> {
    /// Starts a read or write larger than the maximum transfer: copies its iovecs and
    /// submits as many children as the queue pair takes.
    fn start_split(
        &mut self,
        io: &IoRequest<'_>,
        qpair: &mut QueuePair<R>,
        done: &mut CompletionQueue,
    ) -> Result<(), NvmeError> {
        if io.iovs.len() > MAX_IOVS_PER_IO {
            return Err(NvmeError::InvalidRequest {
                reason: "more iovecs than MAX_IOVS_PER_IO",
            });
        }
        let slot = usize::from(io.slot);
        let (Some(split), Some(parent)) =
            (self.splits.get_mut(slot), self.split_iovs.get_mut(slot))
        else {
            return Err(NvmeError::InvalidRequest {
                reason: "request slot beyond the channel's depth",
            });
        };
        // At most MAX_IOVS_PER_IO, reserved once per slot: no allocation after warm-up.
        parent.clear();
        parent.reserve(MAX_IOVS_PER_IO);
        // The bdev's iovecs are the driver's type: their contract keeps the memory valid
        // until this bdev I/O completes, after every child command built from them.
        parent.extend_from_slice(io.iovs);
        *split = Split {
            active: true,
            write: io.io_type == IoType::Write,
            queued: false,
            failed: false,
            next_block: io.offset_blocks,
            end_block: io.offset_blocks + io.num_blocks,
            iov_index: 0,
            iov_offset: 0,
            outstanding: 0,
        };
        self.advance_split(io.slot, qpair, done);
        Ok(())
    }

    /// Submits the next children of the split in `slot` until it is fully submitted, a
    /// child fails, or the queue pair has no free slot (then the split waits in
    /// `pending_splits`); completes the bdev I/O when nothing of it is left.
    fn advance_split(&mut self, slot: u16, qpair: &mut QueuePair<R>, done: &mut CompletionQueue) {
        let index = usize::from(slot);
        let block_size = self.ns.block_size_bytes() as usize;
        loop {
            let split = self.splits[index];
            if split.failed || split.next_block >= split.end_block {
                break;
            }
            let blocks = self
                .max_transfer_blocks
                .min(split.end_block - split.next_block);
            let mut need = blocks as usize * block_size;
            let (mut iov_index, mut iov_offset) = (split.iov_index, split.iov_offset);
            let parent = &self.split_iovs[index];
            self.iovs.clear();
            let mut broken = false;
            while need > 0 {
                let Some(iov) = parent.get(iov_index) else {
                    broken = true;
                    break;
                };
                if self.iovs.len() == MAX_IOVS_PER_IO {
                    broken = true;
                    break;
                }
                let take = (iov.len_bytes() - iov_offset).min(need);
                let Some(part) = iov.part(iov_offset, take) else {
                    broken = true;
                    break;
                };
                self.iovs.push(part);
                need -= take;
                iov_offset += take;
                if iov_offset == iov.len_bytes() {
                    iov_index += 1;
                    iov_offset = 0;
                }
            }
            let result = if broken {
                Err(NvmeError::InvalidRequest {
                    reason: "split child's iovecs do not cover its blocks",
                })
            } else if split.write {
                qpair.submit_write(
                    &self.ns,
                    u64::from(slot),
                    split.next_block,
                    blocks as u32,
                    &self.iovs,
                )
            } else {
                qpair.submit_read(
                    &self.ns,
                    u64::from(slot),
                    split.next_block,
                    blocks as u32,
                    &self.iovs,
                )
            };
            let split = &mut self.splits[index];
            match result {
                Ok(()) => {
                    split.next_block += blocks;
                    split.iov_index = iov_index;
                    split.iov_offset = iov_offset;
                    split.outstanding += 1;
                }
                Err(NvmeError::NoFreeSlot { .. }) => {
                    if !split.queued {
                        split.queued = true;
                        self.pending_splits.push_back(slot);
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(bdev = %self.bdev_name, %error, "nvme: split I/O child not submitted");
                    split.failed = true;
                    break;
                }
            }
        }
        self.finish_split_if_done(slot, done);
    }

    fn finish_split_if_done(&mut self, slot: u16, done: &mut CompletionQueue) {
        let split = &mut self.splits[usize::from(slot)];
        if split.finished() {
            split.active = false;
            let status = if split.failed {
                IoStatus::Failed
            } else {
                IoStatus::Success
            };
            done.complete(slot, status);
        }
    }

    /// Gives waiting split children the queue pair slots that completions freed.
    fn resume_splits(&mut self, qpair: &mut QueuePair<R>, done: &mut CompletionQueue) {
        while let Some(&slot) = self.pending_splits.front() {
            self.pending_splits.pop_front();
            self.splits[usize::from(slot)].queued = false;
            self.advance_split(slot, qpair, done);
            if self.splits[usize::from(slot)].queued {
                break;
            }
        }
    }

    /// The queue pair is gone (reset or failure): waiting split children will not be sent.
    fn fail_pending_splits(&mut self, done: &mut CompletionQueue) {
        while let Some(slot) = self.pending_splits.pop_front() {
            let split = &mut self.splits[usize::from(slot)];
            split.queued = false;
            split.failed = true;
            self.finish_split_if_done(slot, done);
        }
    }

    fn submit_command(
        &mut self,
        io: &IoRequest<'_>,
        qpair: &mut QueuePair<R>,
    ) -> Result<(), NvmeError> {
        let tag = u64::from(io.slot);
        let nblocks = |limit: u64| {
            if io.num_blocks > limit {
                Err(NvmeError::InvalidRequest {
                    reason: "more blocks than one NVMe command carries (not split)",
                })
            } else {
                Ok(io.num_blocks as u32)
            }
        };
        match io.io_type {
            IoType::Read | IoType::Write => {
                if io.iovs.len() > self.iovs.capacity() {
                    return Err(NvmeError::InvalidRequest {
                        reason: "more iovecs than MAX_IOVS_PER_IO",
                    });
                }
                // One IoVec type for both layers: the command built from these completes
                // before the bdev I/O does (this channel's poll reaps it first, and its drop
                // deletes the queues before returning), as their contract asks.
                self.iovs.clear();
                self.iovs.extend_from_slice(io.iovs);
                let count = nblocks(MAX_NO_DATA_BLOCKS)?;
                if io.io_type == IoType::Read {
                    qpair.submit_read(&self.ns, tag, io.offset_blocks, count, &self.iovs)
                } else {
                    qpair.submit_write(&self.ns, tag, io.offset_blocks, count, &self.iovs)
                }
            }
            IoType::Flush => qpair.submit_flush(&self.ns, tag),
            IoType::WriteZeroes => {
                let count = nblocks(MAX_NO_DATA_BLOCKS)?;
                qpair.submit_write_zeroes(&self.ns, tag, io.offset_blocks, count)
            }
            IoType::Unmap => {
                let count = nblocks(MAX_NO_DATA_BLOCKS)?;
                qpair.submit_deallocate(&self.ns, tag, io.offset_blocks, count)
            }
            IoType::Reset => Err(NvmeError::InvalidRequest {
                reason: "reset is not supported by the nvme bdev",
            }),
        }
    }

    /// After a controller reset: re-creates the pair's queues once the controller runs again.
    /// `try_lock`: the I/O path never waits for the admin path.
    fn qpair_reconnect(&mut self, qpair: &mut QueuePair<R>) {
        let mut ctrlr = match self.ctrlr.ctrlr.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if ctrlr.state() != ControllerState::Running {
            return;
        }
        match ctrlr.reconnect_io_qpair(qpair) {
            Ok(()) => {
                tracing::info!(bdev = %self.bdev_name, qid = qpair.qid(), "nvme: queue pair reconnected")
            }
            Err(error) => {
                tracing::warn!(bdev = %self.bdev_name, %error, "nvme: queue pair reconnect failed")
            }
        }
    }
}

impl<R: Registers + 'static> BackendChannel for NvmeChannel<R> {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        let Some(mut qpair) = self.qpair.take() else {
            done.complete(io.slot, IoStatus::Failed);
            return;
        };
        let split = matches!(io.io_type, IoType::Read | IoType::Write)
            && io.num_blocks > self.max_transfer_blocks;
        let result = if split {
            self.start_split(io, &mut qpair, done)
        } else {
            self.submit_command(io, &mut qpair)
        };
        self.qpair = Some(qpair);
        if let Err(error) = result {
            tracing::warn!(
                bdev = %self.bdev_name,
                io_type = %io.io_type,
                offset_blocks = io.offset_blocks,
                num_blocks = io.num_blocks,
                %error,
                "nvme: I/O not submitted"
            );
            // Reported from the submitter's next poll, never inside its submit (STYLE #6).
            done.complete(io.slot, IoStatus::Failed);
        }
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        let Some(mut qpair) = self.qpair.take() else {
            return 0;
        };
        let count = self.poll_qpair(&mut qpair, done);
        if let Some(Some(timer)) = self.timer.get_mut() {
            // Armed while anything needs a later poll (commands in the pair, split children
            // waiting for a slot, a pair to reconnect); one system call per change only.
            let waiting =
                qpair.in_flight() > 0 || !self.pending_splits.is_empty() || qpair.is_disconnected();
            let result = if waiting {
                timer.start(INTERRUPT_POLL_PERIOD)
            } else {
                timer.stop()
            };
            if let Err(error) = result {
                tracing::warn!(bdev = %self.bdev_name, %error, "nvme: interrupt-mode poll timer");
            }
        }
        self.qpair = Some(qpair);
        count
    }

    fn interrupt_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.timer
            .get_or_init(|| match WakeTimer::new() {
                Ok(timer) => Some(timer),
                Err(error) => {
                    tracing::warn!(bdev = %self.bdev_name, %error, "nvme: timerfd for interrupt mode");
                    None
                }
            })
            .as_ref()
            .map(std::os::fd::AsFd::as_fd)
    }
}

impl<R: Registers> NvmeChannel<R> {
    fn poll_qpair(&mut self, qpair: &mut QueuePair<R>, done: &mut CompletionQueue) -> usize {
        if qpair.is_disconnected() {
            self.fail_pending_splits(done);
            self.qpair_reconnect(qpair);
            return 0;
        }
        let bdev_name = &self.bdev_name;
        let splits = &mut self.splits;
        let result = qpair.process_completions(self.max_per_poll, |tag, completion| {
            let status = if completion.status.is_success() {
                IoStatus::Success
            } else {
                tracing::warn!(
                    bdev = %bdev_name,
                    status = %completion.status,
                    "nvme: I/O failed"
                );
                IoStatus::Failed
            };
            let slot = tag as u16;
            match splits.get_mut(usize::from(slot)) {
                Some(split) if split.active => {
                    // One child of a split I/O: the bdev I/O completes with its last child.
                    split.outstanding = split.outstanding.saturating_sub(1);
                    split.failed |= status != IoStatus::Success;
                    if split.finished() {
                        split.active = false;
                        let status = if split.failed {
                            IoStatus::Failed
                        } else {
                            IoStatus::Success
                        };
                        done.complete(slot, status);
                    }
                }
                _ => done.complete(slot, status),
            }
        });
        if !self.pending_splits.is_empty() {
            self.resume_splits(qpair, done);
        }
        match result {
            Ok(count) => count as usize,
            Err(NvmeError::Disconnected { .. }) => 0,
            Err(error) => {
                // A broken completion entry: the controller was asked to reset; the pair's
                // requests come back failed after it.
                tracing::error!(bdev = %self.bdev_name, %error, "nvme: completion poll failed");
                0
            }
        }
    }
}

impl<R: Registers> Drop for NvmeChannel<R> {
    fn drop(&mut self) {
        let Some(qpair) = self.qpair.take() else {
            return;
        };
        let in_flight = qpair.in_flight();
        let qid = qpair.qid();
        let stats = qpair.stats();
        self.ctrlr
            .bounced
            .fetch_add(stats.bounced, Ordering::Relaxed);
        tracing::info!(
            bdev = %self.bdev_name,
            qid,
            submitted = stats.submitted,
            prp_lists = stats.prp_lists,
            sgls = stats.sgls,
            bounced = stats.bounced,
            "nvme: channel closed"
        );
        // Setup path: deleting the queues is an admin command. Once Delete I/O SQ completed
        // the controller touches none of its commands' buffers (NVMe Base 2.0, 5.7).
        let mut ctrlr = lock(&self.ctrlr.ctrlr);
        if let Err(error) = ctrlr.free_io_qpair(qpair) {
            tracing::warn!(bdev = %self.bdev_name, qid, %error, "nvme: deleting the channel's queues failed");
            if in_flight > 0 && ctrlr.state() == ControllerState::Running {
                // The device may still DMA into buffers its owner is about to free: a reset
                // disables it first.
                if let Err(error) = ctrlr.reset() {
                    tracing::error!(%error, "nvme: reset after a failed queue deletion failed");
                }
            }
        } else if in_flight > 0 {
            tracing::warn!(bdev = %self.bdev_name, qid, in_flight, "nvme: channel dropped with I/O in flight (aborted by the queue deletion)");
        }
    }
}
