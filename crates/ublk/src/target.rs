//! The ublk target of one app: the reactor threads queues run on, and the disks, started,
//! recovered, listed and stopped at run time (what `ublk_create_target`, `ublk_start_disk`,
//! `ublk_recover_disk`, `ublk_get_disks`, `ublk_stop_disk` and `ublk_destroy_target` call).
//!
//! Threads: `create_target` makes one lightweight thread per core of its cpumask
//! (`ublk.c<core>`); a disk's queue `i` runs on thread `(cursor + i) mod n`, the cursor
//! moving on with every disk, so queues spread round robin over the cores. Control commands
//! run on the calling OS thread, which must not be a reactor thread: [`UblkTarget::start_disk`],
//! [`UblkTarget::recover_disk`], [`UblkTarget::stop_disk`] and
//! [`UblkTarget::destroy_target`] block on the kernel while the queues (on the reactors) serve
//! the requests that START_DEV's partition scan and STOP_DEV's flush send.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pollux_bdev::{BdevDesc, BdevRegistry};
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::DmaMemory;
use pollux_reactor::{send_msg, AppHandle, ThreadHandle};
use serde_json::{json, Value};

use crate::ctrl::Control;
use crate::error::{state_name, UblkError};
use crate::params::{derive_params, Geometry};
use crate::queue::{run_queue, QueueShared, QueueStart};
use crate::sys::{self, CtrlDevInfo};

/// SPDK's defaults for `ublk_start_disk`.
pub const DEFAULT_NUM_QUEUES: u32 = 1;
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;
/// Queues per disk at most (SPDK's `UBLK_DEV_MAX_QUEUES`).
pub const MAX_NUM_QUEUES: u16 = 32;
/// The largest request (and each tag's buffer): 128 KiB, the kernel splits larger ones.
/// 128 tags x 2 queues take 32 MiB of DMA memory.
pub const MAX_IO_BUF_BYTES: u32 = 128 << 10;
/// The kernel's device ids are minors: 20 bits.
pub const MAX_UBLK_ID: u32 = (1 << 20) - 1;
/// How long a queue may take to start on its reactor.
const QUEUE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long queues may take to see their aborts after STOP_DEV, before being forced.
const QUEUE_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `/dev/ublkcN` appears when ADD_DEV returns (devtmpfs); allow udev-managed /dev a moment.
const CDEV_APPEAR_TIMEOUT: Duration = Duration::from_secs(3);

/// What `ublk_start_disk` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOptions {
    pub bdev_name: String,
    pub ublk_id: u32,
    pub num_queues: u32,
    pub queue_depth: u32,
    /// `UBLK_F_USER_COPY`: the server copies request data itself (see `queue.rs`).
    pub user_copy: bool,
}

impl StartOptions {
    pub fn new(bdev_name: &str, ublk_id: u32) -> Self {
        Self {
            bdev_name: bdev_name.to_string(),
            ublk_id,
            num_queues: DEFAULT_NUM_QUEUES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            user_copy: false,
        }
    }
}

/// A disk as `ublk_get_disks` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub ublk_id: u32,
    pub bdev_name: String,
    pub num_queues: u16,
    pub queue_depth: u16,
    pub user_copy: bool,
    /// Started by recovering a quiesced kernel device.
    pub recovered: bool,
}

impl DiskInfo {
    /// SPDK's `ublk_get_disks` entry.
    pub fn to_json(&self) -> Value {
        json!({
            "ublk_device": sys::block_dev_path(self.ublk_id),
            "id": self.ublk_id,
            "queue_depth": self.queue_depth,
            "num_queues": self.num_queues,
            "bdev_name": self.bdev_name,
        })
    }

    /// The `ublk_start_disk` entry that recreates it (for `save_config`); `user_copy` only
    /// when on.
    pub fn to_config(&self) -> Value {
        let mut entry = json!({
            "method": crate::config::START_DISK,
            "params": {
                "bdev_name": self.bdev_name,
                "ublk_id": self.ublk_id,
                "num_queues": self.num_queues,
                "queue_depth": self.queue_depth,
            }
        });
        if self.user_copy {
            entry["params"]["user_copy"] = json!(true);
        }
        entry
    }
}

struct Running {
    info: DiskInfo,
    queues: Vec<Arc<QueueShared>>,
    /// Keeps the bdev open and claimed.
    _desc: Arc<BdevDesc>,
    /// `/dev/ublkcN`, open while the queues run (the kernel allows one opener).
    _cdev: Arc<File>,
}

enum Disk {
    /// Being started or stopped by some thread: the id is taken.
    Busy {
        bdev_name: String,
    },
    Running(Box<Running>),
}

struct Created {
    cpumask: CpuMask,
    threads: Vec<ThreadHandle>,
    cursor: usize,
}

#[derive(Default)]
struct Inner {
    created: Option<Created>,
    disks: BTreeMap<u32, Disk>,
}

/// The ublk target of one app. Thread-safe; the blocking methods must be called off the
/// reactor threads (see the module documentation).
pub struct UblkTarget {
    app: AppHandle,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for UblkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkTarget")
            .field("created", &self.is_created())
            .field("disks", &self.disks().len())
            .finish()
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn exit_threads(threads: &[ThreadHandle]) {
    for thread in threads {
        if !thread.has_exited() && send_msg(thread, |ctx| ctx.exit()).is_err() {
            tracing::debug!(thread = thread.name(), "ublk: thread already gone");
        }
    }
}

/// Frees a reserved id unless the start succeeded.
struct Reservation<'a> {
    target: &'a UblkTarget,
    ublk_id: u32,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.target.inner).disks.remove(&self.ublk_id);
        }
    }
}

/// What a started set of queues needs to be undone.
struct Started {
    queues: Vec<Arc<QueueShared>>,
}

impl Started {
    fn force_stop(&self) {
        for q in &self.queues {
            q.force_stop();
        }
        for q in &self.queues {
            if !q.wait_done(QUEUE_STOP_TIMEOUT) {
                tracing::error!("ublk: a queue did not stop after a forced stop");
            }
        }
    }
}

impl UblkTarget {
    pub fn new(app: AppHandle, registry: Arc<BdevRegistry>, dma: Arc<DmaMemory>) -> Arc<Self> {
        Arc::new(Self {
            app,
            registry,
            dma,
            inner: Mutex::new(Inner::default()),
        })
    }

    pub fn is_created(&self) -> bool {
        lock(&self.inner).created.is_some()
    }

    /// The target's cpumask, once created.
    pub fn cpumask(&self) -> Option<CpuMask> {
        lock(&self.inner).created.as_ref().map(|c| c.cpumask)
    }

    /// `ublk_create_target`: checks that the kernel has ublk (the control device opens) and
    /// makes one reactor thread per core of `cpumask` (`None`: the app's cores).
    pub fn create_target(&self, cpumask: Option<CpuMask>) -> Result<(), UblkError> {
        let mut inner = lock(&self.inner);
        if inner.created.is_some() {
            return Err(UblkError::TargetExists);
        }
        let app_mask = self.app.cpumask();
        let mask: CpuMask = match &cpumask {
            Some(m) => m.iter().filter(|c| app_mask.contains(*c)).collect(),
            None => app_mask,
        };
        if mask.is_empty() {
            return Err(UblkError::Cpumask {
                mask: cpumask.map(|m| m.to_string()).unwrap_or_default(),
                app_mask: app_mask.to_string(),
            });
        }
        drop(sys::open_control()?);
        let mut threads = Vec::new();
        for core in mask.iter() {
            let name = format!("ublk.c{core}");
            let only: CpuMask = std::iter::once(core).collect();
            match self.app.create_thread(&name, Some(&only)) {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    exit_threads(&threads);
                    return Err(UblkError::Thread {
                        name,
                        source: Box::new(source),
                    });
                }
            }
        }
        tracing::info!(cpumask = %mask, "ublk: target created");
        inner.created = Some(Created {
            cpumask: mask,
            threads,
            cursor: 0,
        });
        Ok(())
    }

    /// `ublk_destroy_target`: stops every disk, then the target's threads. Blocking.
    pub fn destroy_target(&self) -> Result<(), UblkError> {
        if !self.is_created() {
            return Err(UblkError::NoTarget);
        }
        self.stop_all();
        if let Some(created) = lock(&self.inner).created.take() {
            exit_threads(&created.threads);
        }
        tracing::info!("ublk: target destroyed");
        Ok(())
    }

    /// Stops every disk (app shutdown; blocking). Errors are logged.
    pub fn stop_all(&self) {
        let ids: Vec<u32> = lock(&self.inner).disks.keys().copied().collect();
        for ublk_id in ids {
            if let Err(error) = self.stop_disk(ublk_id) {
                tracing::error!(ublk_id, error = %crate::error_chain(&error), "ublk: stopping a disk at shutdown");
            }
        }
    }

    /// The disks, by id.
    pub fn disks(&self) -> Vec<DiskInfo> {
        lock(&self.inner)
            .disks
            .values()
            .filter_map(|d| match d {
                Disk::Running(r) => Some(r.info.clone()),
                Disk::Busy { .. } => None,
            })
            .collect()
    }

    pub fn disk(&self, ublk_id: u32) -> Option<DiskInfo> {
        match lock(&self.inner).disks.get(&ublk_id) {
            Some(Disk::Running(r)) => Some(r.info.clone()),
            _ => None,
        }
    }

    /// `save_config`'s `ublk` subsystem: the target, then one `ublk_start_disk` per disk.
    pub fn save_config(&self) -> Vec<Value> {
        let inner = lock(&self.inner);
        let Some(created) = &inner.created else {
            return Vec::new();
        };
        let mut entries = vec![json!({
            "method": crate::config::CREATE_TARGET,
            "params": { "cpumask": created.cpumask.to_string() }
        })];
        for disk in inner.disks.values() {
            if let Disk::Running(r) = disk {
                entries.push(r.info.to_config());
            }
        }
        entries
    }

    fn check_options(options: &StartOptions) -> Result<(), UblkError> {
        let id = options.ublk_id;
        if id > MAX_UBLK_ID {
            return Err(UblkError::BadId {
                ublk_id: id,
                max: MAX_UBLK_ID,
            });
        }
        if options.queue_depth == 0 || options.queue_depth > u32::from(sys::UBLK_MAX_QUEUE_DEPTH) {
            return Err(UblkError::QueueDepth {
                ublk_id: id,
                queue_depth: options.queue_depth,
                max: sys::UBLK_MAX_QUEUE_DEPTH,
            });
        }
        if options.num_queues == 0 || options.num_queues > u32::from(MAX_NUM_QUEUES) {
            return Err(UblkError::NumQueues {
                ublk_id: id,
                num_queues: options.num_queues,
                max: MAX_NUM_QUEUES,
            });
        }
        Ok(())
    }

    /// Takes the id for a start, or says why not.
    fn reserve(&self, ublk_id: u32, bdev_name: &str) -> Result<Reservation<'_>, UblkError> {
        let mut inner = lock(&self.inner);
        if inner.created.is_none() {
            return Err(UblkError::NoTarget);
        }
        if let Some(disk) = inner.disks.get(&ublk_id) {
            let bdev = match disk {
                Disk::Busy { bdev_name } => bdev_name.clone(),
                Disk::Running(r) => r.info.bdev_name.clone(),
            };
            return Err(UblkError::InUse { ublk_id, bdev });
        }
        inner.disks.insert(
            ublk_id,
            Disk::Busy {
                bdev_name: bdev_name.to_string(),
            },
        );
        Ok(Reservation {
            target: self,
            ublk_id,
            armed: true,
        })
    }

    fn open_bdev(&self, ublk_id: u32, bdev_name: &str) -> Result<Arc<BdevDesc>, UblkError> {
        let bdev_err = |source| UblkError::Bdev {
            ublk_id,
            bdev: bdev_name.to_string(),
            source: Box::new(source),
        };
        let desc = self
            .registry
            .open(bdev_name, true, None)
            .map_err(bdev_err)?;
        desc.claim(&format!("ublk disk {ublk_id}"))
            .map_err(bdev_err)?;
        Ok(Arc::new(desc))
    }

    /// `ublk_start_disk`: serves `bdev_name` as `/dev/ublkb<ublk_id>`. When the kernel still
    /// has that device quiesced (a previous server was killed), recovers it instead.
    /// Blocking; call off the reactors. On failure nothing is left behind (a device this call
    /// added is deleted).
    pub fn start_disk(&self, options: &StartOptions) -> Result<u32, UblkError> {
        Self::check_options(options)?;
        let id = options.ublk_id;
        let mut reservation = self.reserve(id, &options.bdev_name)?;
        let desc = self.open_bdev(id, &options.bdev_name)?;
        let page = sys::page_size();
        let params = derive_params(desc.info(), MAX_IO_BUF_BYTES, page).map_err(|bad| {
            UblkError::BlockSize {
                ublk_id: id,
                bdev: options.bdev_name.clone(),
                block_size: bad.0,
            }
        })?;
        let mut control = Control::open()?;
        let mut flags = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_CMD_IOCTL_ENCODE;
        if options.user_copy {
            flags |= sys::UBLK_F_USER_COPY;
        }
        let request = CtrlDevInfo {
            nr_hw_queues: options.num_queues as u16,
            queue_depth: options.queue_depth as u16,
            max_io_buf_bytes: MAX_IO_BUF_BYTES,
            dev_id: id,
            ublksrv_pid: std::process::id() as i32,
            flags,
            ..CtrlDevInfo::default()
        };
        let added = match control.add_dev(&request) {
            Ok(added) => added,
            Err(UblkError::Control { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                let existing = control.get_dev_info(id)?;
                if !matches!(
                    existing.state,
                    sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO
                ) {
                    return Err(UblkError::KernelInUse {
                        ublk_id: id,
                        state: state_name(existing.state),
                    });
                }
                tracing::info!(
                    ublk_id = id,
                    "ublk: the device exists quiesced: recovering it"
                );
                let info = self.recover(&mut control, &existing, desc, &options.bdev_name)?;
                return self.commit(&mut reservation, info).map(|()| id);
            }
            Err(error) => return Err(error),
        };
        match self.bring_up(&mut control, &added, &params, desc.clone(), options) {
            Ok(running) => {
                tracing::info!(ublk_id = id, bdev = %options.bdev_name, queues = added.nr_hw_queues, depth = added.queue_depth, user_copy = options.user_copy, "ublk: disk started: {}", sys::block_dev_path(id));
                self.commit(&mut reservation, running).map(|()| id)
            }
            Err(error) => {
                if let Err(del) = control.del_dev(id) {
                    tracing::error!(ublk_id = id, error = %crate::error_chain(&del), "ublk: DEL_DEV after a failed start");
                }
                Err(error)
            }
        }
    }

    fn commit(&self, reservation: &mut Reservation<'_>, running: Running) -> Result<(), UblkError> {
        reservation.armed = false;
        lock(&self.inner)
            .disks
            .insert(running.info.ublk_id, Disk::Running(Box::new(running)));
        Ok(())
    }

    /// SET_PARAMS, queues, START_DEV; on failure the queues are stopped (the caller deletes
    /// the device).
    fn bring_up(
        &self,
        control: &mut Control,
        added: &CtrlDevInfo,
        params: &sys::Params,
        desc: Arc<BdevDesc>,
        options: &StartOptions,
    ) -> Result<Running, UblkError> {
        let id = added.dev_id;
        if added.flags & sys::UBLK_F_USER_RECOVERY == 0 {
            tracing::warn!(ublk_id = id, "ublk: the kernel did not take UBLK_F_USER_RECOVERY; a killed server's disk will not be recoverable");
        }
        let user_copy = added.flags & sys::UBLK_F_USER_COPY != 0;
        if options.user_copy && !user_copy {
            return Err(UblkError::Control {
                dev_id: id,
                command: "ADD_DEV (UBLK_F_USER_COPY)",
                source: std::io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        control.set_params(id, params)?;
        let cdev = Arc::new(open_cdev(id)?);
        let started = self.start_queues(added, user_copy, &cdev, &desc)?;
        if let Err(error) = control.start_dev(id) {
            started.force_stop();
            return Err(error);
        }
        Ok(Running {
            info: DiskInfo {
                ublk_id: id,
                bdev_name: options.bdev_name.clone(),
                num_queues: added.nr_hw_queues,
                queue_depth: added.queue_depth,
                user_copy,
                recovered: false,
            },
            queues: started.queues,
            _desc: desc,
            _cdev: cdev,
        })
    }

    /// START_USER_RECOVERY, queues with the device's own geometry, END_USER_RECOVERY. On
    /// failure the device is left quiesced (for another try), never deleted: it holds a disk
    /// the host may have mounted.
    fn recover(
        &self,
        control: &mut Control,
        existing: &CtrlDevInfo,
        desc: Arc<BdevDesc>,
        bdev_name: &str,
    ) -> Result<Running, UblkError> {
        let id = existing.dev_id;
        let kernel = control.get_params(id)?;
        let info = desc.info();
        let bdev_sectors = info.size_bytes() >> crate::params::SECTOR_SHIFT;
        let bdev_shift = info.block_size_bytes.trailing_zeros() as u8;
        if kernel.types & sys::UBLK_PARAM_TYPE_BASIC != 0
            && (kernel.basic.dev_sectors != bdev_sectors
                || kernel.basic.logical_bs_shift != bdev_shift)
        {
            return Err(UblkError::RecoverMismatch {
                ublk_id: id,
                bdev: bdev_name.to_string(),
                bdev_sectors,
                bdev_shift,
                disk_sectors: kernel.basic.dev_sectors,
                disk_shift: kernel.basic.logical_bs_shift,
            });
        }
        control.start_user_recovery(id)?;
        let cdev = Arc::new(open_cdev(id)?);
        let user_copy = existing.flags & sys::UBLK_F_USER_COPY != 0;
        let started = self.start_queues(existing, user_copy, &cdev, &desc)?;
        if let Err(error) = control.end_user_recovery(id) {
            started.force_stop();
            return Err(error);
        }
        tracing::info!(
            ublk_id = id,
            bdev = bdev_name,
            "ublk: disk recovered: {}",
            sys::block_dev_path(id)
        );
        Ok(Running {
            info: DiskInfo {
                ublk_id: id,
                bdev_name: bdev_name.to_string(),
                num_queues: existing.nr_hw_queues,
                queue_depth: existing.queue_depth,
                user_copy,
                recovered: true,
            },
            queues: started.queues,
            _desc: desc,
            _cdev: cdev,
        })
    }

    /// `ublk_recover_disk`: takes over a device the kernel holds quiesced after its server
    /// died. Blocking.
    pub fn recover_disk(&self, bdev_name: &str, ublk_id: u32) -> Result<u32, UblkError> {
        if ublk_id > MAX_UBLK_ID {
            return Err(UblkError::BadId {
                ublk_id,
                max: MAX_UBLK_ID,
            });
        }
        let mut reservation = self.reserve(ublk_id, bdev_name)?;
        let desc = self.open_bdev(ublk_id, bdev_name)?;
        let mut control = Control::open()?;
        let existing = control.get_dev_info(ublk_id)?;
        if !matches!(
            existing.state,
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO
        ) {
            return Err(UblkError::NotRecoverable {
                ublk_id,
                state: state_name(existing.state),
            });
        }
        let running = self.recover(&mut control, &existing, desc, bdev_name)?;
        self.commit(&mut reservation, running).map(|()| ublk_id)
    }

    /// Starts the queues on the target's threads and waits until each has fetched every tag.
    fn start_queues(
        &self,
        info: &CtrlDevInfo,
        user_copy: bool,
        cdev: &Arc<File>,
        desc: &Arc<BdevDesc>,
    ) -> Result<Started, UblkError> {
        let id = info.dev_id;
        let threads: Vec<ThreadHandle> = {
            let mut inner = lock(&self.inner);
            let created = inner.created.as_mut().ok_or(UblkError::NoTarget)?;
            let n = created.threads.len();
            let picked = (0..usize::from(info.nr_hw_queues))
                .map(|q| created.threads[(created.cursor + q) % n].clone())
                .collect();
            created.cursor = (created.cursor + usize::from(info.nr_hw_queues)) % n;
            picked
        };
        let max_io_bytes = info.max_io_buf_bytes.min(MAX_IO_BUF_BYTES);
        let geometry = Geometry::from_info(desc.info(), max_io_bytes);
        let mut started = Started { queues: Vec::new() };
        for (q_id, thread) in threads.iter().enumerate() {
            let q_id = q_id as u16;
            let shared = Arc::new(QueueShared::default());
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let start = Box::new(QueueStart {
                dev_id: id,
                q_id,
                depth: info.queue_depth,
                max_io_bytes,
                user_copy,
                geometry,
                cdev: cdev.clone(),
                desc: desc.clone(),
                dma: self.dma.clone(),
                shared: shared.clone(),
                started: tx,
            });
            let fail = |reason: String| UblkError::QueueStart {
                dev_id: id,
                q_id,
                reason,
            };
            if send_msg(thread, move |ctx| run_queue(ctx, start)).is_err() {
                started.force_stop();
                return Err(fail(format!(
                    "reactor thread {} refused the start",
                    thread.name()
                )));
            }
            started.queues.push(shared);
            match rx.recv_timeout(QUEUE_START_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    started.force_stop();
                    return Err(error);
                }
                Err(_) => {
                    started.force_stop();
                    return Err(fail(format!(
                        "no answer from reactor thread {} in {QUEUE_START_TIMEOUT:?}",
                        thread.name()
                    )));
                }
            }
            tracing::debug!(
                ublk_id = id,
                q_id,
                thread = thread.name(),
                "ublk: queue fetching"
            );
        }
        Ok(started)
    }

    /// `ublk_stop_disk`: STOP_DEV while the queues still serve (the kernel flushes through
    /// them, then aborts their fetches), the queues torn down, the char device closed, then
    /// DEL_DEV and the bdev released. Blocking.
    pub fn stop_disk(&self, ublk_id: u32) -> Result<(), UblkError> {
        let running = {
            let mut inner = lock(&self.inner);
            match inner.disks.remove(&ublk_id) {
                Some(Disk::Running(running)) => {
                    inner.disks.insert(
                        ublk_id,
                        Disk::Busy {
                            bdev_name: running.info.bdev_name.clone(),
                        },
                    );
                    running
                }
                Some(busy @ Disk::Busy { .. }) => {
                    let bdev = match &busy {
                        Disk::Busy { bdev_name } => bdev_name.clone(),
                        Disk::Running(_) => String::new(),
                    };
                    inner.disks.insert(ublk_id, busy);
                    return Err(UblkError::InUse { ublk_id, bdev });
                }
                None => return Err(UblkError::NotFound { ublk_id }),
            }
        };
        let _release = Reservation {
            target: self,
            ublk_id,
            armed: true,
        };
        let result = self.tear_down(*running);
        if result.is_ok() {
            tracing::info!(ublk_id, "ublk: disk stopped");
        }
        result
    }

    fn tear_down(&self, running: Running) -> Result<(), UblkError> {
        let id = running.info.ublk_id;
        let mut control = match Control::open() {
            Ok(control) => Some(control),
            Err(error) => {
                tracing::error!(ublk_id = id, error = %crate::error_chain(&error), "ublk: no control device to stop the disk");
                None
            }
        };
        let stopped = control.as_mut().map(|c| c.stop_dev(id));
        if !matches!(stopped, Some(Ok(()))) {
            for q in &running.queues {
                q.force_stop();
            }
        }
        for (q_id, q) in running.queues.iter().enumerate() {
            if !q.wait_done(QUEUE_STOP_TIMEOUT) {
                tracing::warn!(
                    ublk_id = id,
                    q_id,
                    "ublk: queue still running after STOP_DEV; forcing it"
                );
                q.force_stop();
                if !q.wait_done(QUEUE_STOP_TIMEOUT) {
                    tracing::error!(ublk_id = id, q_id, "ublk: queue did not stop");
                }
            }
        }
        // Close /dev/ublkcN (the queues dropped their mappings and rings) before DEL_DEV,
        // which waits for the device's last reference.
        drop(running);
        if let Some(Err(error)) = stopped {
            return Err(error);
        }
        match control.as_mut() {
            Some(c) => c.del_dev(id),
            None => Err(UblkError::NoDriver {
                path: sys::CONTROL_PATH.to_string(),
            }),
        }
    }
}

impl Drop for UblkTarget {
    fn drop(&mut self) {
        let created = self
            .inner
            .get_mut()
            .map(|i| i.created.take())
            .ok()
            .flatten();
        if let Some(created) = created {
            exit_threads(&created.threads);
        }
    }
}

/// Opens `/dev/ublkcN`, waiting briefly for the node to appear.
fn open_cdev(dev_id: u32) -> Result<File, UblkError> {
    let path = sys::char_dev_path(dev_id);
    let deadline = std::time::Instant::now() + CDEV_APPEAR_TIMEOUT;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(file) => return Ok(file),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => return Err(UblkError::Open { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_options_are_checked_before_anything_is_made() {
        let mut o = StartOptions::new("Malloc0", 0);
        assert!(UblkTarget::check_options(&o).is_ok());
        o.queue_depth = 0;
        assert!(matches!(
            UblkTarget::check_options(&o),
            Err(UblkError::QueueDepth { .. })
        ));
        o.queue_depth = 4097;
        let e = UblkTarget::check_options(&o).expect_err("too deep");
        assert!(
            e.to_string()
                .contains("queue_depth must be 1..=4096, got 4097"),
            "{e}"
        );
        o.queue_depth = 4096;
        assert!(UblkTarget::check_options(&o).is_ok());
        o.num_queues = 0;
        assert!(matches!(
            UblkTarget::check_options(&o),
            Err(UblkError::NumQueues { .. })
        ));
        o.num_queues = 33;
        assert!(matches!(
            UblkTarget::check_options(&o),
            Err(UblkError::NumQueues { .. })
        ));
        o.num_queues = 2;
        o.ublk_id = 1 << 20;
        assert!(matches!(
            UblkTarget::check_options(&o),
            Err(UblkError::BadId { .. })
        ));
    }

    fn target() -> (pollux_reactor::Harness, Arc<UblkTarget>) {
        let harness = pollux_reactor::Harness::new(2);
        let registry = BdevRegistry::new();
        let dma = DmaMemory::new(pollux_env::dma::DmaConfig {
            size_mib: 4,
            no_huge: true,
        })
        .expect("dma");
        pollux_bdev::modules::malloc::create(
            &registry,
            &dma,
            pollux_bdev::modules::malloc::MallocOptions::from_size_mib(
                Some("Malloc0".into()),
                1,
                4096,
            ),
        )
        .expect("malloc");
        let target = UblkTarget::new(harness.app().clone(), registry, dma);
        (harness, target)
    }

    #[test]
    fn without_a_target_or_the_module_nothing_starts() {
        let (_harness, target) = target();
        let e = target
            .start_disk(&StartOptions::new("Malloc0", 0))
            .expect_err("no target");
        assert!(matches!(e, UblkError::NoTarget), "{e}");
        assert!(matches!(
            target.stop_disk(0),
            Err(UblkError::NotFound { .. })
        ));
        assert!(matches!(target.destroy_target(), Err(UblkError::NoTarget)));
        let mut bad = StartOptions::new("Malloc0", 0);
        bad.queue_depth = 5000;
        assert!(matches!(
            target.start_disk(&bad),
            Err(UblkError::QueueDepth { .. })
        ));
        if std::path::Path::new(sys::CONTROL_PATH).exists() {
            return; // a host with ublk_drv: the module check below does not apply
        }
        let e = target.create_target(None).expect_err("no ublk_drv here");
        assert!(matches!(e, UblkError::NoDriver { .. }), "{e}");
        assert!(e.to_string().contains("modprobe ublk_drv"), "{e}");
        assert!(!target.is_created());
        assert!(target.disks().is_empty());
        assert!(target.save_config().is_empty());
        let mask: CpuMask = std::iter::once(7).collect();
        assert!(matches!(
            target.create_target(Some(mask)),
            Err(UblkError::Cpumask { .. })
        ));
    }

    #[test]
    fn get_disks_entry_and_config() {
        let info = DiskInfo {
            ublk_id: 3,
            bdev_name: "Malloc0".into(),
            num_queues: 2,
            queue_depth: 128,
            user_copy: false,
            recovered: false,
        };
        assert_eq!(
            info.to_json(),
            json!({"ublk_device": "/dev/ublkb3", "id": 3, "queue_depth": 128, "num_queues": 2, "bdev_name": "Malloc0"})
        );
        assert_eq!(
            info.to_config(),
            json!({"method": "ublk_start_disk", "params": {"bdev_name": "Malloc0", "ublk_id": 3, "num_queues": 2, "queue_depth": 128}})
        );
    }
}
