//! The vhost target: the controllers of one process, created, listed and deleted at run time
//! (what `vhost_create_blk_controller`, `vhost_get_controllers` and `vhost_delete_controller`
//! call), each with its socket `<socket dir>/<ctrlr>`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_reactor::{send_msg, AppHandle, ThreadHandle};
use serde_json::{json, Value};

use crate::blk::{BlkDevice, CoalescingSettings};
use crate::controller::{bind, control_loop, pack_coalescing, ControllerShared};

/// Queues a controller offers when its options do not say.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// SPDK's defaults for the interrupt coalescing fields `vhost_get_controllers` reports.
pub const DEFAULT_DELAY_BASE_US: u32 = 0;
pub const DEFAULT_IOPS_THRESHOLD: u32 = 60_000;

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("controller name {name:?} is invalid (empty, or holds '/')")]
    BadName { name: String },
    #[error("controller {name:?} already exists")]
    Exists { name: String },
    #[error("controller {name:?} does not exist")]
    NotFound { name: String },
    #[error("controller {ctrlr:?}: bdev {bdev:?}")]
    Bdev {
        ctrlr: String,
        bdev: String,
        #[source]
        source: Box<pollux_bdev::BdevError>,
    },
    #[error("controller {ctrlr:?}: cpumask {mask} selects no core of the app's mask {app_mask}")]
    Cpumask {
        ctrlr: String,
        mask: String,
        app_mask: String,
    },
    #[error("controller {ctrlr:?}: coalescing needs an iops_threshold above 0")]
    Coalescing { ctrlr: String },
    #[error("controller {ctrlr:?}: num_queues must be 1..=256, got {num_queues}")]
    NumQueues { ctrlr: String, num_queues: u16 },
    #[error("controller {ctrlr:?}: creating its reactor thread")]
    Thread {
        ctrlr: String,
        #[source]
        source: pollux_reactor::ReactorError,
    },
    #[error("controller {ctrlr:?}: socket {path}")]
    Socket {
        ctrlr: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `vhost_create_blk_controller` takes (SPDK's parameter names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerOptions {
    /// The controller's name, also its socket's file name in the socket directory.
    pub ctrlr: String,
    /// The bdev it serves.
    pub dev_name: String,
    /// Cores its queues run on (`None`: every core of the app).
    pub cpumask: Option<CpuMask>,
    pub readonly: bool,
    /// Offer VIRTIO_F_RING_PACKED.
    pub packed_ring: bool,
    /// Packed rings survive a back-end restart: tracked in the inflight region and resumed
    /// from it (SPDK's `packed_ring_recovery`).
    pub packed_ring_recovery: bool,
    /// Queues offered (`None`: [`DEFAULT_NUM_QUEUES`]).
    pub num_queues: Option<u16>,
    /// Interrupt coalescing (`vhost_controller_set_coalescing`; `None`: off).
    pub coalescing: Option<CoalescingSettings>,
}

impl ControllerOptions {
    pub fn new(ctrlr: &str, dev_name: &str) -> Self {
        Self {
            ctrlr: ctrlr.to_string(),
            dev_name: dev_name.to_string(),
            cpumask: None,
            readonly: false,
            packed_ring: false,
            packed_ring_recovery: false,
            num_queues: None,
            coalescing: None,
        }
    }
}

/// A controller as `vhost_get_controllers` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub ctrlr: String,
    pub cpumask: CpuMask,
    pub socket: PathBuf,
    pub bdev: String,
    pub readonly: bool,
    pub packed_ring: bool,
    pub packed_ring_recovery: bool,
    pub num_queues: u16,
    /// Interrupt coalescing: base delay (0: off) and rate threshold.
    pub delay_base_us: u32,
    pub iops_threshold: u32,
}

impl ControllerInfo {
    /// SPDK's `vhost_get_controllers` entry.
    pub fn to_json(&self) -> Value {
        json!({
            "ctrlr": self.ctrlr,
            "cpumask": format!("{}", self.cpumask),
            "delay_base_us": self.delay_base_us,
            "iops_threshold": self.iops_threshold,
            "socket": self.socket.display().to_string(),
            "backend_specific": {
                "block": { "readonly": self.readonly, "bdev": self.bdev }
            }
        })
    }

    /// The `vhost_controller_set_coalescing` entry, when coalescing is on (for `save_config`).
    pub fn coalescing_config(&self) -> Option<Value> {
        (self.delay_base_us != 0).then(|| {
            json!({
                "method": "vhost_controller_set_coalescing",
                "params": {
                    "ctrlr": self.ctrlr,
                    "delay_base_us": self.delay_base_us,
                    "iops_threshold": self.iops_threshold,
                }
            })
        })
    }

    /// The `vhost_create_blk_controller` entry that recreates it (for `save_config`);
    /// `num_queues` (Pollux's, not SPDK's) only when it is not the default,
    /// `packed_ring_recovery` only when on.
    pub fn to_config(&self) -> Value {
        let mut entry = json!({
            "method": "vhost_create_blk_controller",
            "params": {
                "ctrlr": self.ctrlr,
                "dev_name": self.bdev,
                "cpumask": format!("{}", self.cpumask),
                "readonly": self.readonly,
                "packed_ring": self.packed_ring,
            }
        });
        if self.packed_ring_recovery {
            entry["params"]["packed_ring_recovery"] = json!(true);
        }
        if self.num_queues != DEFAULT_NUM_QUEUES {
            entry["params"]["num_queues"] = json!(self.num_queues);
        }
        entry
    }
}

struct Controller {
    info: ControllerInfo,
    shared: Arc<ControllerShared>,
    control: Option<JoinHandle<()>>,
}

/// The vhost target of one app. Thread-safe: every method may be called from any thread
/// (an RPC handler, the app's start callback), but not from a controller's own reactor
/// threads while deleting (deletion waits for their queues to stop).
pub struct VhostTarget {
    app: AppHandle,
    registry: Arc<BdevRegistry>,
    socket_dir: PathBuf,
    controllers: Mutex<Vec<Controller>>,
}

impl std::fmt::Debug for VhostTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostTarget")
            .field("socket_dir", &self.socket_dir)
            .field(
                "controllers",
                &self
                    .controllers()
                    .iter()
                    .map(|c| c.ctrlr.clone())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostTarget {
    pub fn new(app: AppHandle, registry: Arc<BdevRegistry>, socket_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            app,
            registry,
            socket_dir: socket_dir.to_path_buf(),
            controllers: Mutex::new(Vec::new()),
        })
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// `vhost_create_blk_controller`: opens and claims the bdev (so it cannot be claimed or
    /// opened for write by anyone else while the controller lives), places one reactor thread
    /// per core of the cpumask, and listens on `<socket dir>/<ctrlr>`.
    pub fn create_blk_controller(
        &self,
        opts: ControllerOptions,
    ) -> Result<ControllerInfo, VhostError> {
        let name = opts.ctrlr.clone();
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(VhostError::BadName { name });
        }
        let mut controllers = lock(&self.controllers);
        if controllers.iter().any(|c| c.info.ctrlr == name) {
            return Err(VhostError::Exists { name });
        }
        let num_queues = opts.num_queues.unwrap_or(DEFAULT_NUM_QUEUES);
        if opts
            .coalescing
            .is_some_and(|c| c.delay_base_us != 0 && c.iops_threshold == 0)
        {
            return Err(VhostError::Coalescing { ctrlr: name });
        }
        if !(1..=256).contains(&num_queues) {
            return Err(VhostError::NumQueues {
                ctrlr: name,
                num_queues,
            });
        }
        let app_mask = self.app.cpumask();
        let mask: CpuMask = match opts.cpumask {
            Some(mask) => mask
                .iter()
                .filter(|core| app_mask.contains(*core))
                .collect(),
            None => app_mask,
        };
        if mask.is_empty() {
            return Err(VhostError::Cpumask {
                ctrlr: name,
                mask: opts.cpumask.map(|m| m.to_string()).unwrap_or_default(),
                app_mask: app_mask.to_string(),
            });
        }
        let bdev_error = |source| VhostError::Bdev {
            ctrlr: name.clone(),
            bdev: opts.dev_name.clone(),
            source: Box::new(source),
        };
        let desc = self
            .registry
            .open(&opts.dev_name, true, None)
            .map_err(bdev_error)?;
        desc.claim(&format!("vhost controller {name}"))
            .map_err(bdev_error)?;
        let mut dev = BlkDevice::new(&desc, opts.readonly, opts.packed_ring, num_queues);
        dev.packed_ring_recovery = opts.packed_ring_recovery;
        let dev = Arc::new(dev);
        let path = self.socket_dir.join(&name);
        let listener = bind(&path).map_err(|source| VhostError::Socket {
            ctrlr: name.clone(),
            path: path.clone(),
            source,
        })?;
        let mut threads: Vec<ThreadHandle> = Vec::new();
        for core in mask.iter() {
            let only: CpuMask = std::iter::once(core).collect();
            match self
                .app
                .create_thread(&format!("vhost.{name}.c{core}"), Some(&only))
            {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    exit_threads(&threads);
                    let _ = std::fs::remove_file(&path);
                    return Err(VhostError::Thread {
                        ctrlr: name,
                        source,
                    });
                }
            }
        }
        let shared = Arc::new(ControllerShared {
            name: name.clone(),
            socket: path.clone(),
            dev,
            desc: Arc::new(desc),
            threads,
            stop: AtomicBool::new(false),
            conn: Mutex::new(None),
            coalescing: Arc::new(AtomicU64::new(pack_coalescing(opts.coalescing))),
        });
        let thread_shared = shared.clone();
        let control = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || control_loop(thread_shared, listener))
            .map_err(|source| VhostError::Socket {
                ctrlr: name.clone(),
                path: path.clone(),
                source,
            })?;
        let info = ControllerInfo {
            ctrlr: name.clone(),
            cpumask: mask,
            socket: path,
            bdev: shared.desc.name().to_string(),
            readonly: opts.readonly,
            packed_ring: opts.packed_ring,
            packed_ring_recovery: opts.packed_ring_recovery,
            num_queues,
            delay_base_us: opts
                .coalescing
                .map_or(DEFAULT_DELAY_BASE_US, |c| c.delay_base_us),
            iops_threshold: opts
                .coalescing
                .map_or(DEFAULT_IOPS_THRESHOLD, |c| c.iops_threshold),
        };
        tracing::info!(ctrlr = %name, bdev = %info.bdev, socket = %info.socket.display(), cpumask = %mask, "vhost: controller created");
        controllers.push(Controller {
            info: info.clone(),
            shared,
            control: Some(control),
        });
        Ok(info)
    }

    /// `vhost_get_controllers` (all, or the one named).
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        lock(&self.controllers)
            .iter()
            .map(|c| c.info.clone())
            .collect()
    }

    pub fn controller(&self, name: &str) -> Result<ControllerInfo, VhostError> {
        lock(&self.controllers)
            .iter()
            .find(|c| c.info.ctrlr == name)
            .map(|c| c.info.clone())
            .ok_or_else(|| VhostError::NotFound {
                name: name.to_string(),
            })
    }

    /// `vhost_delete_controller`: disconnects the front-end (its rings stop once their
    /// in-flight requests complete), removes the socket, releases the bdev claim.
    pub fn delete_controller(&self, name: &str) -> Result<(), VhostError> {
        let controller = {
            let mut controllers = lock(&self.controllers);
            let index = controllers
                .iter()
                .position(|c| c.info.ctrlr == name)
                .ok_or_else(|| VhostError::NotFound {
                    name: name.to_string(),
                })?;
            controllers.remove(index)
        };
        stop_controller(controller);
        Ok(())
    }

    /// `vhost_controller_set_coalescing`: running queues pick the settings up at their next
    /// poll. `delay_base_us` 0 turns coalescing off.
    pub fn set_coalescing(
        &self,
        name: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> Result<(), VhostError> {
        if delay_base_us != 0 && iops_threshold == 0 {
            return Err(VhostError::Coalescing {
                ctrlr: name.to_string(),
            });
        }
        let mut controllers = lock(&self.controllers);
        let controller = controllers
            .iter_mut()
            .find(|c| c.info.ctrlr == name)
            .ok_or_else(|| VhostError::NotFound {
                name: name.to_string(),
            })?;
        let settings = CoalescingSettings {
            delay_base_us,
            iops_threshold,
        };
        controller
            .shared
            .coalescing
            .store(pack_coalescing(Some(settings)), Ordering::Release);
        controller.info.delay_base_us = delay_base_us;
        controller.info.iops_threshold = iops_threshold;
        tracing::info!(ctrlr = %name, delay_base_us, iops_threshold, "vhost: coalescing set");
        Ok(())
    }

    /// Deletes every controller (app shutdown).
    pub fn shutdown(&self) {
        let all: Vec<Controller> = std::mem::take(&mut *lock(&self.controllers));
        for controller in all {
            stop_controller(controller);
        }
    }

    /// `{"subsystem": "vhost_blk", "config": [...]}`.
    pub fn save_config(&self) -> Value {
        let config: Vec<Value> = self
            .controllers()
            .iter()
            .flat_map(|c| std::iter::once(c.to_config()).chain(c.coalescing_config()))
            .collect();
        json!({ "subsystem": "vhost_blk", "config": config })
    }
}

impl Drop for VhostTarget {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn exit_threads(threads: &[ThreadHandle]) {
    for thread in threads {
        if send_msg(thread, |ctx| ctx.exit()).is_err() {
            tracing::debug!(thread = thread.name(), "vhost: thread already gone");
        }
    }
}

fn stop_controller(mut controller: Controller) {
    let shared = &controller.shared;
    shared.stop.store(true, Ordering::Release);
    if let Some(conn) = lock(&shared.conn).take() {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
    if let Some(control) = controller.control.take() {
        if control.join().is_err() {
            tracing::error!(ctrlr = %shared.name, "vhost: control thread panicked");
        }
    }
    if let Err(error) = std::fs::remove_file(&shared.socket) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(ctrlr = %shared.name, %error, "vhost: removing the socket");
        }
    }
    exit_threads(&shared.threads);
    shared.desc.release_claim();
    tracing::info!(ctrlr = %shared.name, "vhost: controller deleted");
}
