//! The NVMe/TCP initiator (SPDK's `lib/nvme/nvme_tcp.c` and the fabrics side of
//! `module/bdev/nvme`, written anew): `bdev_nvme_attach_controller` with `trtype` TCP makes
//! one bdev per namespace of a remote subsystem, `<name>n<nsid>` as for PCIe.
//!
//! - [`qpair`]: one queue over one TCP connection (the PDU state machine, commands in slots
//!   indexed by CID, data received straight into the caller's iovecs).
//! - `ctrlr.rs`: the controller: admin queue, Identify, Keep Alive at KATO / 2, and the
//!   reconnect state machine ([`HostCtrlrState`]).
//! - `bdev.rs`: the bdevs; each channel owns its I/O queue (its own connection, Connect with
//!   the controller's CNTLID and a QID of its own) and resubmits its commands after a lost
//!   connection.
//! - [`params`]: SPDK's parameters; [`register_methods`] puts the attach into a `-c` method
//!   table so that TCP goes here and PCIe to `pollux_nvme::bdev`.
//!
//! The admin poller ([`NvmfHostModule::poll_admin`]) runs on an app thread every few
//! milliseconds (the apps register it next to the PCIe module's); reconnect attempts run
//! there, synchronously, each bounded by the connect timeout.

mod bdev;
mod ctrlr;
pub mod params;
pub mod qpair;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use pollux_bdev::config::MethodTable;
use pollux_bdev::{BdevError, BdevInfo, BdevRegistry, BdevSpec};

pub use bdev::{MAX_IOVS_PER_IO, MODULE_NAME};
pub use ctrlr::HostCtrlrState;
pub use params::{parse_attach, parse_tcp_attach, PendingTcpAttach, TcpAttachOptions};

use bdev::TcpBdev;
use ctrlr::HostCtrlr;

/// SPDK's method (shared with PCIe).
pub const ATTACH_METHOD: &str = pollux_nvme::bdev::ATTACH_METHOD;

/// Makes `bdev_nvme_attach_controller` in `table` take TCP too (PCIe still goes to
/// `pollux_nvme::bdev::parse_attach`): call it after `pollux_nvme::bdev::register_methods`.
pub fn register_methods(table: &mut MethodTable) -> Result<(), BdevError> {
    table.remove(ATTACH_METHOD);
    table.register(ATTACH_METHOD, parse_attach)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The NVMe/TCP controllers attached in this process.
#[derive(Default)]
pub struct NvmfHostModule {
    controllers: Mutex<Vec<Arc<HostCtrlr>>>,
}

impl std::fmt::Debug for NvmfHostModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmfHostModule")
            .field("controllers", &self.controller_names())
            .finish()
    }
}

impl NvmfHostModule {
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide module (a config method's parse function is a plain `fn`).
    pub fn global() -> &'static NvmfHostModule {
        static GLOBAL: OnceLock<NvmfHostModule> = OnceLock::new();
        GLOBAL.get_or_init(NvmfHostModule::new)
    }

    pub fn controller_names(&self) -> Vec<String> {
        lock(&self.controllers)
            .iter()
            .map(|c| c.options.name.clone())
            .collect()
    }

    /// The bdevs of controller `name`.
    pub fn bdev_names(&self, name: &str) -> Option<Vec<String>> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.options.name == name)
            .map(|c| c.bdev_names.clone())
    }

    pub fn controller_state(&self, name: &str) -> Option<HostCtrlrState> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.options.name == name)
            .map(|c| c.state())
    }

    /// Connects to the controller and registers one bdev per namespace. On failure nothing
    /// stays registered or connected.
    pub fn attach(
        &self,
        registry: &BdevRegistry,
        options: TcpAttachOptions,
    ) -> Result<Vec<BdevInfo>, BdevError> {
        let taken = |where_| BdevError::DuplicateName {
            method: ATTACH_METHOD.to_string(),
            name: options.name.clone(),
            where_,
        };
        if lock(&self.controllers)
            .iter()
            .any(|c| c.options.name == options.name)
        {
            return Err(taken(" (an attached NVMe/TCP controller has it)"));
        }
        if pollux_nvme::bdev::NvmeModule::global()
            .controller_names()
            .contains(&options.name)
        {
            return Err(taken(" (an attached NVMe controller has it)"));
        }
        let max_bdevs = options.max_bdevs;
        let ctrlr =
            HostCtrlr::connect(options.clone()).map_err(|source| BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "traddr",
                reason: format!(
                    "{}:{} ({}): connecting to the controller failed",
                    options.traddr, options.trsvcid, options.subnqn
                ),
                source: Some(Box::new(source)),
            })?;
        let ctrlr = Arc::new(ctrlr);
        if ctrlr.namespaces.len() as u64 > max_bdevs {
            ctrlr.detach();
            return Err(BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "max_bdevs",
                reason: format!(
                    "is {max_bdevs} but the subsystem has {} namespaces",
                    ctrlr.namespaces.len()
                ),
                source: None,
            });
        }
        let mut infos = Vec::with_capacity(ctrlr.namespaces.len());
        for (index, ns) in ctrlr.namespaces.iter().enumerate() {
            let name = ctrlr.bdev_names[index].clone();
            let spec = BdevSpec {
                name: name.clone(),
                aliases: Vec::new(),
                uuid: (ns.nguid != [0; 16]).then_some(pollux_bdev::Uuid(ns.nguid)),
                block_size_bytes: ns.block_size_bytes,
                num_blocks: ns.num_blocks,
                // TCP moves bytes: any buffer will do.
                required_alignment_bytes: 1,
                write_cache: ctrlr.identity.vwc,
            };
            let backend = Arc::new(TcpBdev {
                ctrlr: Arc::clone(&ctrlr),
                ns: *ns,
                name,
                writes_config: index == 0,
            });
            match registry.register(spec, backend) {
                Ok(info) => infos.push(info),
                Err(error) => {
                    for done in &infos {
                        let _ = registry.unregister(&done.name);
                    }
                    ctrlr.detach();
                    return Err(error);
                }
            }
        }
        tracing::info!(
            controller = %ctrlr.options.name,
            bdevs = ?ctrlr.bdev_names,
            "nvmf host: controller attached"
        );
        lock(&self.controllers).push(ctrlr);
        Ok(infos)
    }

    /// `bdev_nvme_detach_controller`: hot-removes the bdevs, fails what their channels still
    /// hold, closes the admin queue.
    pub fn detach_controller(&self, registry: &BdevRegistry, name: &str) -> Result<(), BdevError> {
        let ctrlr = {
            let mut controllers = lock(&self.controllers);
            let index = controllers
                .iter()
                .position(|c| c.options.name == name)
                .ok_or_else(|| BdevError::InvalidParam {
                    method: pollux_nvme::bdev::DETACH_METHOD.to_string(),
                    param: "name",
                    reason: format!("names no attached NVMe/TCP controller: {name:?}"),
                    source: None,
                })?;
            controllers.remove(index)
        };
        for bdev in &ctrlr.bdev_names {
            match registry.unregister(bdev) {
                Ok(_) | Err(BdevError::NotFound { .. }) => {}
                Err(error) => {
                    tracing::warn!(%bdev, %error, "nvmf host: unregister on detach failed")
                }
            }
        }
        ctrlr.detach();
        tracing::info!(controller = name, "nvmf host: controller detached");
        Ok(())
    }

    /// Detaches every controller (at app exit, after the I/O stopped).
    pub fn detach_all(&self, registry: &BdevRegistry) {
        for name in self.controller_names() {
            if let Err(error) = self.detach_controller(registry, &name) {
                tracing::warn!(controller = %name, %error, "nvmf host: detach failed");
            }
        }
    }

    /// The admin poller: Keep Alive, loss detection, reconnects. Call it every few
    /// milliseconds from one thread; returns the work done (0: idle).
    pub fn poll_admin(&self) -> u32 {
        let controllers: Vec<Arc<HostCtrlr>> = lock(&self.controllers).clone();
        controllers.iter().map(|c| c.poll_admin()).sum()
    }
}
