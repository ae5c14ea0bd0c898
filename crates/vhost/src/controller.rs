//! One vhost-user-blk controller: its socket, its control thread speaking the vhost-user
//! protocol (rust-vmm `vhost`'s `BackendReqHandler`, one message per `handle_request()`), and
//! its queues, each run by a poller on one of the controller's reactor threads.
//!
//! # Threads
//!
//! - The control thread (an OS thread per controller, like rte_vhost's socket thread) accepts
//!   one front-end at a time and handles its messages in order. It may block: it never runs on
//!   a reactor.
//! - The data path runs on lightweight reactor threads, one per core of the controller's
//!   cpumask; queue `i` runs on thread `i % threads`. A queue is owned by its poller; the
//!   control thread reaches it only through a small command queue ([`QueueCmd`]): stop (GET_VRING_BASE,
//!   disable, disconnect), a new memory table, a new call eventfd. A stop completes once the
//!   queue's in-flight requests have, and hands back the ring position.
//!
//! # Hostile front-ends
//!
//! Every message is validated by the `vhost` crate (header, size, fd count) and then by the
//! handlers here (queue index, ring size, addresses against the memory table). An error in a
//! handler is answered with an error reply (REPLY_ACK) and logged; a message the crate cannot
//! parse (truncated, oversized, unknown, wrong fd count outside SET_MEM_TABLE) leaves the
//! stream in an unknown state, so the connection is closed and the controller waits for the
//! next one: the target never exits on front-end input.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use pollux_bdev::BdevDesc;
use pollux_reactor::{send_msg, InterruptId, PollStatus, PollerId, ThreadCtx, ThreadHandle};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use crate::blk::{BlkDevice, BlkQueue, BlkQueueParts, CoalescingSettings};
use crate::dirty_log::DirtyLog;
use crate::guest_memory::{GuestMemory, RegionSpec};
use crate::inflight::{InflightRegion, Tracker};
use crate::queue::{VirtQueue, VringAddrs, VringBase};

/// Largest virtqueue size accepted (the bdev channel's slot limit).
pub const MAX_QUEUE_SIZE: u32 = pollux_bdev::MAX_QUEUE_DEPTH;
/// Bytes of configuration space a front-end may read (virtio-blk's is 60 bytes up to
/// `write_zeroes_may_unmap`; newer fields read as zero).
const CONFIG_SPACE_BYTES: usize = 256;
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 32;
/// How long GET_VRING_BASE waits for a queue's in-flight requests.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the control thread looks at its stop flag while waiting for a front-end.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30 of the virtio features).
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL` (bit 26): the front-end asks for dirty-page logging (live migration).
const LOG_ALL_BIT: u64 = 1 << 26;
/// How long a change of the dirty log waits for every running queue to take it.
const LOG_SWITCH_TIMEOUT: Duration = Duration::from_secs(2);

/// A command from the control thread to a running queue.
pub(crate) enum QueueCmd {
    /// Stop taking requests, finish those in flight, then stop.
    Stop,
    Memory(Arc<GuestMemory>),
    Call(Option<File>),
    /// A new kick eventfd (SET_VRING_KICK while running); watched in interrupt mode.
    Kick(Option<File>),
    /// Start (`Some`) or stop (`None`) dirty-page logging; the generation is acknowledged in
    /// [`QueueShared::log_applied`] once the queue logs (or stopped logging).
    Log(u64, Option<Arc<DirtyLog>>),
}

/// What the control thread and a queue's poller share.
pub(crate) struct QueueShared {
    cmds: ArrayQueue<QueueCmd>,
    /// Set once the poller stopped (by a command or because its thread exits), with the ring
    /// position it stopped at.
    stopped: Mutex<Option<VringBase>>,
    stopped_flag: AtomicBool,
    done: (Mutex<bool>, std::sync::Condvar),
    /// The last [`QueueCmd::Log`] generation the poller applied.
    log_applied: AtomicU64,
    /// The thread that polls the queue: a command is followed by an empty message, which
    /// wakes it if it sleeps (interrupt mode) and makes the poller run.
    thread: ThreadHandle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl QueueShared {
    fn new(thread: ThreadHandle) -> Arc<Self> {
        Arc::new(Self {
            thread,
            cmds: ArrayQueue::new(16),
            stopped: Mutex::new(None),
            stopped_flag: AtomicBool::new(false),
            done: (Mutex::new(false), std::sync::Condvar::new()),
            log_applied: AtomicU64::new(0),
        })
    }

    /// Waits until the poller applied log generation `generation` or stopped; false on a
    /// timeout. The front-end is answered only after this: from then on every page the queue
    /// writes is logged.
    fn wait_log_applied(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.log_applied.load(Ordering::Acquire) >= generation
                || self.stopped_flag.load(Ordering::Acquire)
            {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn finish(&self, base: VringBase) {
        *lock(&self.stopped) = Some(base);
        self.stopped_flag.store(true, Ordering::Release);
        *lock(&self.done.0) = true;
        self.done.1.notify_all();
    }

    /// Sends `cmd`; false when the queue already stopped or its command queue is full.
    fn send(&self, cmd: QueueCmd) -> bool {
        let sent = !self.stopped_flag.load(Ordering::Acquire) && self.cmds.push(cmd).is_ok();
        if sent {
            // A full message queue means the thread has work and is awake; a gone thread
            // stops the queue anyway.
            let _ = send_msg(&self.thread, |_ctx| {});
        }
        sent
    }

    /// Waits until the poller stopped; its final position.
    fn wait_stopped(&self, timeout: Duration) -> Option<VringBase> {
        let guard = lock(&self.done.0);
        let (guard, _) = self
            .done
            .1
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        drop(guard);
        *lock(&self.stopped)
    }
}

/// What a queue's poller is started with.
struct QueueStart {
    queue: BlkQueue,
    shared: Arc<QueueShared>,
    coalescing: Arc<AtomicU64>,
    /// The ring's kick eventfd (watched in interrupt mode).
    kick: Option<File>,
}

/// Interrupt-mode registrations of a running queue.
#[derive(Default)]
struct QueueInterrupts {
    kick: Option<InterruptId>,
    completions: Option<InterruptId>,
}

impl QueueInterrupts {
    /// Watches `kick` (draining it when it fires); the old one goes.
    fn watch_kick(&mut self, ctx: &mut ThreadCtx, index: u16, kick: Option<File>) {
        if let Some(id) = self.kick.take() {
            ctx.unregister_interrupt_fd(id);
        }
        let Some(kick) = kick else {
            tracing::info!(queue = index, "vhost: no kick fd: the queue polls");
            return;
        };
        let name = format!("vhost_vq{index}_kick");
        match ctx.register_interrupt_fd(&name, kick, |_ctx, kick| {
            pollux_env::wake::drain(kick.as_fd());
            // Idle: the queue's poller, run next in this thread poll, says whether it worked.
            PollStatus::Idle
        }) {
            Ok(id) => self.kick = Some(id),
            Err(error) => {
                tracing::warn!(queue = index, %error, "vhost: watching the kick fd; the queue polls")
            }
        }
    }

    /// Watches the bdev channel's completion fd (a duplicate).
    fn watch_completions(&mut self, ctx: &mut ThreadCtx, queue: &BlkQueue) {
        let Some(fd) = queue.completion_fd() else {
            return;
        };
        let index = queue.index();
        let fd = match fd.try_clone_to_owned() {
            Ok(fd) => fd,
            Err(error) => {
                tracing::warn!(queue = index, %error, "vhost: duplicating the bdev channel's fd; the queue polls while I/O is in flight");
                return;
            }
        };
        let name = format!("vhost_vq{index}_bdev");
        match ctx.register_interrupt_fd(&name, fd, |_ctx, fd| {
            pollux_env::wake::drain(fd.as_fd());
            PollStatus::Idle
        }) {
            Ok(id) => self.completions = Some(id),
            Err(error) => {
                tracing::warn!(queue = index, %error, "vhost: watching the bdev channel's fd; the queue polls while I/O is in flight")
            }
        }
    }

    fn unregister(&mut self, ctx: &mut ThreadCtx) {
        for id in [self.kick.take(), self.completions.take()]
            .into_iter()
            .flatten()
        {
            ctx.unregister_interrupt_fd(id);
        }
    }
}

/// Runs `queue` in a poller on the calling thread until stopped. In interrupt mode the
/// ring's kick fd and the bdev channel's completion fd are registered with this thread, and
/// a poll that did nothing lets it sleep once [`BlkQueue::may_sleep`] agrees.
fn run_queue(ctx: &mut ThreadCtx, start: Box<QueueStart>) {
    let QueueStart {
        mut queue,
        shared,
        coalescing,
        kick,
    } = *start;
    let interrupt_mode = ctx.app().interrupt_mode();
    let mut interrupts = QueueInterrupts::default();
    if interrupt_mode {
        queue.start_interrupt_mode();
        interrupts.watch_kick(ctx, queue.index(), kick);
        interrupts.watch_completions(ctx, &queue);
    }
    let mut coalescing_seen = u64::MAX;
    let own_id: Arc<OnceLock<PollerId>> = Arc::new(OnceLock::new());
    let id_in_poller = own_id.clone();
    let mut stopping = false;
    let mut finished = false;
    let name = format!("vhost_vq{}", queue.index());
    let id = ctx.register_poller(&name, 0, move |ctx| {
        if finished {
            return PollStatus::Idle;
        }
        while let Some(cmd) = shared.cmds.pop() {
            match cmd {
                QueueCmd::Stop => stopping = true,
                QueueCmd::Memory(mem) => {
                    if let Err(error) = queue.set_memory(mem) {
                        tracing::error!(queue = queue.index(), %error, "vhost: the ring is not in the new memory table; stopping it");
                        stopping = true;
                    }
                }
                QueueCmd::Call(call) => queue.set_call(call),
                QueueCmd::Kick(kick) => {
                    if interrupt_mode {
                        interrupts.watch_kick(ctx, queue.index(), kick);
                    }
                }
                QueueCmd::Log(generation, log) => {
                    queue.set_log(log);
                    shared.log_applied.store(generation, Ordering::Release);
                }
            }
        }
        if ctx.is_exiting() {
            stopping = true;
        }
        let settings = coalescing.load(Ordering::Relaxed);
        if settings != coalescing_seen {
            coalescing_seen = settings;
            queue.set_coalescing(unpack_coalescing(settings));
        }
        let work = queue.poll(!stopping);
        if stopping && queue.in_flight() == 0 {
            queue.flush_notification();
            finished = true;
            shared.finish(queue.base());
            tracing::debug!(queue = queue.index(), stats = ?queue.stats(), "vhost: queue stopped");
            if let Some(id) = id_in_poller.get() {
                ctx.unregister_poller(*id);
            }
            interrupts.unregister(ctx);
            return PollStatus::Busy;
        }
        if !interrupt_mode {
            return PollStatus::from_busy(work > 0);
        }
        if work > 0 {
            queue.notifications_off();
            return PollStatus::Busy;
        }
        let may_sleep = queue.may_sleep(
            !stopping,
            interrupts.kick.is_some(),
            interrupts.completions.is_some(),
        );
        PollStatus::from_busy(!may_sleep)
    });
    let _ = own_id.set(id);
}

/// Per-ring state kept by the control thread.
#[derive(Default)]
struct Vring {
    size: u32,
    addrs: Option<VringAddrs>,
    /// SET_VRING_ADDR's `log_guest_addr` when its log flag is set: where the front-end
    /// expects used-ring writes logged. The queue logs the ring it writes by translating its
    /// own address (which also covers the packed ring's descriptors); a front-end naming
    /// another address is reported, not followed.
    used_log_gpa: Option<u64>,
    base: VringBase,
    kicked: bool,
    /// The kick eventfd (SET_VRING_KICK), handed to the queue for interrupt mode.
    kick: Option<File>,
    enabled: bool,
    call: Option<File>,
    running: Option<Arc<QueueShared>>,
}

/// What the controller is made of; shared by the target (for listing / deleting) and the
/// control thread.
pub(crate) struct ControllerShared {
    pub(crate) name: String,
    pub(crate) socket: PathBuf,
    pub(crate) dev: Arc<BlkDevice>,
    pub(crate) desc: Arc<BdevDesc>,
    pub(crate) threads: Vec<ThreadHandle>,
    pub(crate) stop: AtomicBool,
    /// A clone of the connected stream, to unblock the control thread at deletion.
    pub(crate) conn: Mutex<Option<UnixStream>>,
    /// Interrupt coalescing, packed by [`pack_coalescing`]; read by every queue's poller
    /// once per poll (written rarely, so the line stays shared in every core's cache).
    pub(crate) coalescing: Arc<AtomicU64>,
}

/// `delay_base_us << 32 | iops_threshold` (0: off).
pub(crate) fn pack_coalescing(settings: Option<CoalescingSettings>) -> u64 {
    settings.map_or(0, |c| {
        (u64::from(c.delay_base_us) << 32) | u64::from(c.iops_threshold)
    })
}

fn unpack_coalescing(packed: u64) -> Option<CoalescingSettings> {
    (packed >> 32 != 0).then_some(CoalescingSettings {
        delay_base_us: (packed >> 32) as u32,
        iops_threshold: packed as u32,
    })
}

/// The vhost-user request handler of one controller (one connection at a time).
pub(crate) struct BlkBackend {
    ctrl: Arc<ControllerShared>,
    acked_features: u64,
    protocol_features: u64,
    mem: Arc<GuestMemory>,
    vrings: Vec<Vring>,
    status: u8,
    /// The inflight region (SET_INFLIGHT_FD), shared with the front-end across reconnects.
    inflight: Option<InflightRegion>,
    /// The dirty-page log region (SET_LOG_BASE); logged to only while VHOST_F_LOG_ALL is
    /// acked.
    log_region: Option<Arc<DirtyLog>>,
    /// The log the running queues were last handed (`None`: not logging).
    log_active: Option<Arc<DirtyLog>>,
    log_generation: u64,
    /// A refusal the protocol cannot answer (SET_LOG_BASE has no error reply): the
    /// connection is closed after the message.
    close_connection: bool,
}

fn invalid(reason: &'static str) -> VuError {
    VuError::InvalidOperation(reason)
}

fn req_error(error: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(error.to_string()))
}

impl BlkBackend {
    pub(crate) fn new(ctrl: Arc<ControllerShared>) -> Self {
        let queues = usize::from(ctrl.dev.num_queues);
        Self {
            ctrl,
            acked_features: 0,
            protocol_features: 0,
            mem: Arc::new(GuestMemory::empty()),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            status: 0,
            inflight: None,
            log_region: None,
            log_active: None,
            log_generation: 0,
            close_connection: false,
        }
    }

    /// The log queues should write to: the region, while VHOST_F_LOG_ALL is acked.
    fn wanted_log(&self) -> Option<Arc<DirtyLog>> {
        if self.acked_features & LOG_ALL_BIT == 0 {
            return None;
        }
        self.log_region.clone()
    }

    /// Hands the running queues the log they should write to, when it changed, and waits
    /// until each took it (so that the reply to the front-end means "logging").
    fn refresh_log(&mut self) -> VuResult<()> {
        let wanted = self.wanted_log();
        let same = match (&wanted, &self.log_active) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if same {
            return Ok(());
        }
        if self.acked_features & LOG_ALL_BIT != 0 && wanted.is_none() {
            tracing::warn!(ctrlr = %self.ctrl.name, "vhost: VHOST_F_LOG_ALL acked before SET_LOG_BASE; logging starts with the log region");
        }
        self.log_generation += 1;
        let generation = self.log_generation;
        let mut waiting = Vec::new();
        for (index, vring) in self.vrings.iter().enumerate() {
            if let Some(shared) = &vring.running {
                if !shared.send(QueueCmd::Log(generation, wanted.clone())) {
                    tracing::error!(ctrlr = %self.ctrl.name, index, "vhost: could not hand a ring the dirty log");
                    return Err(invalid("ring busy"));
                }
                waiting.push((index, shared.clone()));
            }
        }
        for (index, shared) in waiting {
            if !shared.wait_log_applied(generation, LOG_SWITCH_TIMEOUT) {
                tracing::error!(ctrlr = %self.ctrl.name, index, "vhost: a ring did not take the dirty log in time");
                return Err(invalid("ring did not take the dirty log in time"));
            }
        }
        match &wanted {
            Some(log) => {
                tracing::info!(ctrlr = %self.ctrl.name, bytes = log.len_bytes(), covered_bytes = log.covered_bytes(), "vhost: dirty-page logging on")
            }
            None => {
                tracing::info!(ctrlr = %self.ctrl.name, pages_outside = self.log_active.as_ref().map_or(0, |l| l.pages_outside()), "vhost: dirty-page logging off")
            }
        }
        self.log_active = wanted;
        Ok(())
    }

    /// Whether the last message's refusal closes the connection (and clears the mark).
    pub(crate) fn take_close_connection(&mut self) -> bool {
        std::mem::take(&mut self.close_connection)
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let name = &self.ctrl.name;
        self.vrings.get_mut(index as usize).ok_or_else(|| {
            tracing::warn!(ctrlr = %name, index, "vhost: vring index out of range");
            VuError::InvalidParam
        })
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// Starts ring `index` when it has everything it needs (size, addresses, kick, enable,
    /// memory) and is not running.
    fn maybe_start(&mut self, index: usize) -> VuResult<()> {
        let protocol = self.acked_features & PROTOCOL_FEATURES_BIT != 0;
        let mem = self.mem.clone();
        let packed = self.has_feature(pollux_virtio::features::VIRTIO_F_RING_PACKED);
        let event_idx = self.has_feature(pollux_virtio::features::VIRTIO_RING_F_EVENT_IDX);
        let ctrl = self.ctrl.clone();
        let inflight_region = self.inflight.clone();
        let Some(vring) = self.vrings.get_mut(index) else {
            return Err(VuError::InvalidParam);
        };
        let ready = vring.running.is_none()
            && vring.size > 0
            && vring.kicked
            && (vring.enabled || !protocol)
            && !mem.is_empty();
        let Some(addrs) = vring.addrs.filter(|_| ready) else {
            return Ok(());
        };
        let size = vring.size as u16;
        let start_error = |error: crate::queue::RingSetupError| {
            tracing::warn!(ctrlr = %ctrl.name, index, %error, "vhost: cannot start ring");
            req_error(error)
        };
        let mut queue = VirtQueue::new(&mem, size, addrs, vring.base, packed, event_idx)
            .map_err(start_error)?;
        if let Some(log_gpa) = vring.used_log_gpa.filter(|_| !packed) {
            let (used_gpa, _) = queue.device_written_area();
            if log_gpa != used_gpa {
                tracing::warn!(ctrlr = %ctrl.name, index, log_gpa, used_gpa, "vhost: log_guest_addr is not the used ring's address; logging the used ring where it is");
            }
        }
        // Reconnection: requests a previous back-end left in flight are resubmitted first,
        // and the ring resumes after them.
        let mut tracking = None;
        if let Some(region) = &inflight_region {
            if packed && !ctrl.dev.packed_ring_recovery {
                tracing::info!(ctrlr = %ctrl.name, index, "vhost: packed ring not tracked (packed_ring_recovery is off)");
            } else {
                match region.tracker(index as u16, size, packed) {
                    Some(tracker) => {
                        let (tracker, resubmit) =
                            recover_ring(&ctrl.name, index, tracker, &mut queue, |base| {
                                VirtQueue::new(&mem, size, addrs, base, packed, event_idx)
                            })
                            .map_err(start_error)?;
                        tracking = Some((tracker, resubmit));
                    }
                    None => {
                        tracing::warn!(ctrlr = %ctrl.name, index, size, packed, region_packed = region.is_packed(), "vhost: ring not covered by the inflight region (size or layout); not tracked");
                    }
                }
            }
        }
        let channel = ctrl.desc.channel(u32::from(size)).map_err(|error| {
            tracing::error!(ctrlr = %ctrl.name, index, %error, "vhost: cannot open a bdev channel");
            req_error(error)
        })?;
        let call = match &vring.call {
            Some(file) => Some(file.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        // Where the ring starts against what the driver has published: after a migration the
        // two must agree (a ring started past the driver's index would take stale entries).
        let (start_base, start_avail_idx) = (queue.base().num, queue.driver_avail_idx());
        let blk = BlkQueue::new(BlkQueueParts {
            index: index as u16,
            dev: ctrl.dev.clone(),
            queue,
            addrs,
            mem,
            channel,
            call,
            inflight: tracking,
            log: self.log_active.clone(),
        });
        let thread = &ctrl.threads[index % ctrl.threads.len()];
        let shared = QueueShared::new(thread.clone());
        let kick = match &vring.kick {
            Some(file) => Some(file.try_clone().map_err(VuError::ReqHandlerError)?),
            None => None,
        };
        let start = Box::new(QueueStart {
            queue: blk,
            shared: shared.clone(),
            coalescing: ctrl.coalescing.clone(),
            kick,
        });
        send_msg(thread, move |ctx| run_queue(ctx, start)).map_err(|_| {
            tracing::error!(ctrlr = %ctrl.name, index, "vhost: the queue's reactor thread is gone");
            invalid("reactor thread gone")
        })?;
        tracing::info!(ctrlr = %ctrl.name, index, size, packed, event_idx, base = start_base, avail_idx = ?start_avail_idx, thread = thread.name(), "vhost: ring started");
        vring.running = Some(shared);
        Ok(())
    }

    /// Stops ring `index` (waiting for its in-flight requests) and records its position.
    fn stop_ring(&mut self, index: usize) -> VuResult<VringBase> {
        let name = self.ctrl.name.clone();
        let Some(vring) = self.vrings.get_mut(index) else {
            return Err(VuError::InvalidParam);
        };
        if let Some(shared) = vring.running.take() {
            shared.send(QueueCmd::Stop);
            match shared.wait_stopped(STOP_TIMEOUT) {
                Some(base) => vring.base = base,
                None => {
                    tracing::error!(ctrlr = %name, index, "vhost: ring did not stop in time");
                    return Err(invalid("ring did not stop in time"));
                }
            }
            tracing::info!(ctrlr = %name, index, base = vring.base.num, "vhost: ring stopped");
        }
        Ok(vring.base)
    }

    /// Stops every ring and forgets the connection's state (disconnect, RESET_OWNER).
    pub(crate) fn reset(&mut self) {
        for index in 0..self.vrings.len() {
            if let Err(error) = self.stop_ring(index) {
                tracing::error!(ctrlr = %self.ctrl.name, index, %error, "vhost: stopping a ring at reset");
            }
        }
        for vring in &mut self.vrings {
            *vring = Vring::default();
        }
        self.acked_features = 0;
        self.protocol_features = 0;
        self.status = 0;
        self.inflight = None;
        self.log_region = None;
        self.log_active = None;
        self.mem = Arc::new(GuestMemory::empty());
    }

    fn set_memory(&mut self, mem: GuestMemory) {
        let mem = Arc::new(mem);
        for vring in &mut self.vrings {
            if let Some(shared) = &vring.running {
                if !shared.send(QueueCmd::Memory(mem.clone())) {
                    tracing::error!(ctrlr = %self.ctrl.name, "vhost: could not hand a ring its new memory table");
                }
            }
        }
        // The page sizes say whether guest RAM came in huge pages (the vhost VM suite's
        // hugepage variants check for 2097152 here).
        let page_sizes: Vec<u64> = mem.regions().map(|r| r.page_size()).collect();
        tracing::info!(ctrlr = %self.ctrl.name, regions = mem.len(), ?page_sizes, "vhost: memory table set");
        if let Some(log) = &self.log_region {
            if let Err(error) = log.check_covers(mem.end_gpa()) {
                // Marks past the end are counted and skipped; the front-end resizes the log
                // (a new SET_LOG_BASE) when its memory grows.
                tracing::warn!(ctrlr = %self.ctrl.name, %error, "vhost: the dirty log does not cover the new memory table");
            }
        }
        self.mem = mem;
        for index in 0..self.vrings.len() {
            if let Err(error) = self.maybe_start(index) {
                tracing::warn!(ctrlr = %self.ctrl.name, index, %error, "vhost: ring start after memory update");
            }
        }
    }
}

/// Reads what a previous back-end left in the inflight region for one ring, and moves the
/// ring to where it stopped: split, the avail index after the requests in flight (the used
/// index is in guest memory); packed, both positions from the region (the front-end's
/// SET_VRING_BASE is stale after a crash, SPDK's `packed_ring_recovery`). `restart` rebuilds
/// the ring at another base (split). Returns the tracker and what to resubmit, oldest first.
fn recover_ring(
    ctrlr: &str,
    index: usize,
    tracker: Tracker,
    queue: &mut VirtQueue,
    restart: impl FnOnce(VringBase) -> Result<VirtQueue, crate::queue::RingSetupError>,
) -> Result<(Tracker, Vec<u16>), crate::queue::RingSetupError> {
    match tracker {
        Tracker::Split(mut tracker) => {
            let used_idx = queue.published_used_idx().unwrap_or(0);
            let recovery = tracker.recover(used_idx);
            if let Some(last_avail) = recovery.last_avail {
                *queue = restart(VringBase { num: last_avail })?;
            }
            tracing::info!(
                ctrlr = %ctrlr,
                index,
                fresh = recovery.fresh,
                used_idx,
                resubmit = recovery.resubmit.len(),
                "vhost: inflight tracking on; requests left in flight are resubmitted"
            );
            Ok((Tracker::Split(tracker), recovery.resubmit))
        }
        Tracker::Packed(mut tracker) => {
            let Some((_, start)) = queue.packed_positions() else {
                return Ok((Tracker::Packed(tracker), Vec::new()));
            };
            let recovery = tracker.recover(start, |slot| queue.packed_used_flag(slot));
            if let Some(error) = &recovery.refused {
                tracing::warn!(ctrlr = %ctrlr, index, %error, "vhost: inflight region inconsistent; restarted empty, nothing resubmitted");
            }
            if let Some((avail, used)) = recovery.positions {
                queue.set_packed_positions(avail, used);
            }
            let (avail, used) = queue.packed_positions().unwrap_or((start, start));
            tracing::info!(
                ctrlr = %ctrlr,
                index,
                fresh = recovery.fresh,
                avail_idx = avail.idx,
                avail_wrap = avail.wrap,
                used_idx = used.idx,
                used_wrap = used.wrap,
                resubmit = recovery.resubmit.len(),
                "vhost: packed inflight tracking on; requests left in flight are resubmitted"
            );
            Ok((Tracker::Packed(tracker), recovery.resubmit))
        }
    }
}

/// Protocol features offered. INFLIGHT_SHMFD with either ring layout: a packed controller's
/// rings are tracked when it has `packed_ring_recovery` (and a driver that negotiates split
/// rings with it is tracked anyway).
fn protocol_features_offered(_dev: &BlkDevice) -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::STATUS
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.ctrl.dev.features() | PROTOCOL_FEATURES_BIT | LOG_ALL_BIT)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.ctrl.dev.features() | PROTOCOL_FEATURES_BIT | LOG_ALL_BIT;
        if features & !offered != 0 {
            tracing::warn!(ctrlr = %self.ctrl.name, features, offered, "vhost: front-end acked features not offered");
            return Err(VuError::FeatureMismatch);
        }
        self.acked_features = features;
        // QEMU turns VHOST_F_LOG_ALL on and off on running rings when migration starts and
        // ends, and waits for this reply before it relies on the log.
        self.refresh_log()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(VuError::IncorrectFds);
        }
        let regions: Vec<(RegionSpec, &File)> = ctx
            .iter()
            .zip(files.iter())
            .map(|(r, f)| {
                (
                    RegionSpec {
                        gpa: r.guest_phys_addr,
                        size: r.memory_size,
                        uva: r.user_addr,
                        mmap_offset: r.mmap_offset,
                    },
                    f,
                )
            })
            .collect();
        let mem = GuestMemory::from_regions(&regions, true).map_err(|error| {
            tracing::warn!(ctrlr = %self.ctrl.name, %error, "vhost: SET_MEM_TABLE refused");
            req_error(error)
        })?;
        self.set_memory(mem);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > MAX_QUEUE_SIZE {
            tracing::warn!(ctrlr = %self.ctrl.name, index, num, "vhost: ring size refused");
            return Err(VuError::InvalidParam);
        }
        let vring = self.vring(index)?;
        if vring.running.is_some() {
            return Err(invalid("ring is running"));
        }
        vring.size = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let vring = self.vring(index)?;
        // The log flag alone may change while the ring runs (QEMU re-sends the addresses
        // with it set when migration starts logging).
        vring.used_log_gpa = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        let addrs = VringAddrs {
            desc_uva: descriptor,
            avail_uva: available,
            used_uva: used,
        };
        if vring.running.is_some() {
            if vring.addrs == Some(addrs) {
                return Ok(());
            }
            return Err(invalid("ring is running"));
        }
        vring.addrs = Some(addrs);
        self.maybe_start(index as usize)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let vring = self.vring(index)?;
        if vring.running.is_some() {
            return Err(invalid("ring is running"));
        }
        vring.base = VringBase { num: base as u16 };
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let base = self.stop_ring(index as usize)?;
        let vring = self.vring(index)?;
        // GET_VRING_BASE stops the ring: it needs a new kick (and enable) to run again.
        vring.kicked = false;
        vring.kick = None;
        vring.call = None;
        Ok(VhostUserVringState::new(index, u32::from(base.num)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // Poll mode never reads the kick eventfd: its arrival only marks the ring started.
        // Interrupt mode watches it (a running ring gets the new one by command).
        let vring = self.vring(u32::from(index))?;
        if let Some(shared) = &vring.running {
            let copy = match &fd {
                Some(file) => Some(file.try_clone().map_err(VuError::ReqHandlerError)?),
                None => None,
            };
            if !shared.send(QueueCmd::Kick(copy)) {
                return Err(invalid("ring busy"));
            }
        }
        vring.kick = fd;
        vring.kicked = true;
        self.maybe_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let vring = self.vring(u32::from(index))?;
        if let Some(shared) = &vring.running {
            let copy = match &fd {
                Some(file) => Some(file.try_clone().map_err(VuError::ReqHandlerError)?),
                None => None,
            };
            if !shared.send(QueueCmd::Call(copy)) {
                return Err(invalid("ring busy"));
            }
        }
        vring.call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features_offered(&self.ctrl.dev))
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = protocol_features_offered(&self.ctrl.dev).bits();
        if features & !offered != 0 {
            return Err(VuError::FeatureMismatch);
        }
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.ctrl.dev.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_ring(index as usize).map(|_| ())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Fields past the 60 bytes Pollux fills (zoned, secure erase: features not offered)
        // read as zero, so a front-end sizing its read from a newer `virtio_blk_config` works.
        let mut bytes = [0u8; CONFIG_SPACE_BYTES];
        let filled = self.ctrl.dev.config().to_le_bytes();
        bytes[..filled.len()].copy_from_slice(&filled);
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .ok_or(VuError::InvalidParam)?;
        bytes
            .get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or(VuError::InvalidParam)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only `writeback`, and only with CONFIG_WCE (§5.2.5).
        let writeback = pollux_virtio::blk::BlkConfig::WRITEBACK_OFFSET as u32;
        if offset != writeback
            || buf.len() != 1
            || !self.has_feature(pollux_virtio::blk::VIRTIO_BLK_F_CONFIG_WCE)
        {
            return Err(VuError::InvalidParam);
        }
        self.ctrl
            .dev
            .writeback
            .store(u8::from(buf[0] != 0), Ordering::Relaxed);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(invalid("GPU_SET_SOCKET is not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if u32::from(inflight.queue_size) > MAX_QUEUE_SIZE
            || inflight.num_queues > self.ctrl.dev.num_queues
        {
            return Err(VuError::InvalidParam);
        }
        // The layout follows the negotiated ring format (QEMU sends SET_FEATURES first).
        let packed = self.has_feature(pollux_virtio::features::VIRTIO_F_RING_PACKED);
        let (file, size) = InflightRegion::create(inflight.num_queues, inflight.queue_size, packed)
            .map_err(|error| {
                tracing::error!(ctrlr = %self.ctrl.name, %error, "vhost: GET_INFLIGHT_FD");
                req_error(error)
            })?;
        tracing::info!(ctrlr = %self.ctrl.name, queues = inflight.num_queues, queue_size = inflight.queue_size, bytes = size, packed, "vhost: inflight region created");
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if u32::from(inflight.queue_size) > MAX_QUEUE_SIZE {
            return Err(VuError::InvalidParam);
        }
        let region = InflightRegion::map(
            &file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
            self.has_feature(pollux_virtio::features::VIRTIO_F_RING_PACKED),
        )
        .map_err(|error| {
            tracing::warn!(ctrlr = %self.ctrl.name, %error, "vhost: SET_INFLIGHT_FD refused");
            req_error(error)
        })?;
        tracing::info!(ctrlr = %self.ctrl.name, bytes = inflight.mmap_size, queues = inflight.num_queues, queue_size = inflight.queue_size, "vhost: inflight region set");
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.mem.len() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid("no free memory slot"));
        }
        let spec = RegionSpec {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            uva: region.user_addr,
            mmap_offset: region.mmap_offset,
        };
        let mem = self.mem.with_region(spec, &fd, true).map_err(|error| {
            tracing::warn!(ctrlr = %self.ctrl.name, %error, "vhost: ADD_MEM_REG refused");
            req_error(error)
        })?;
        self.set_memory(mem);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let mem = self
            .mem
            .without_region(region.guest_phys_addr, region.memory_size)
            .map_err(|error| {
                tracing::warn!(ctrlr = %self.ctrl.name, %error, "vhost: REM_MEM_REG refused");
                req_error(error)
            })?;
        self.set_memory(mem);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("DEVICE_STATE is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("DEVICE_STATE is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("SHMEM is not supported"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        // The vhost-user spec gives SET_LOG_BASE no error reply (QEMU and rust-vmm's front-end
        // wait for the echoed message), and acknowledging a log that is not kept would let a
        // migration go on with pages untracked: a refusal closes the connection, as DPDK's
        // rte_vhost does, and the front-end sees SET_LOG_BASE fail.
        let refuse = |backend: &mut Self, error: crate::dirty_log::LogError| {
            tracing::error!(ctrlr = %backend.ctrl.name, mmap_size = log.mmap_size, mmap_offset = log.mmap_offset, %error, "vhost: SET_LOG_BASE refused; closing the connection");
            backend.close_connection = true;
            req_error(error)
        };
        let region = match DirtyLog::map(&file, log.mmap_size, log.mmap_offset) {
            Ok(region) => region,
            Err(error) => return Err(refuse(self, error)),
        };
        if let Err(error) = region.check_covers(self.mem.end_gpa()) {
            return Err(refuse(self, error));
        }
        tracing::info!(ctrlr = %self.ctrl.name, bytes = log.mmap_size, covered_bytes = region.covered_bytes(), "vhost: dirty log region set");
        self.log_region = Some(Arc::new(region));
        if let Err(error) = self.refresh_log() {
            self.close_connection = true;
            return Err(error);
        }
        Ok(())
    }
}

/// Whether an error from `handle_request` leaves the stream in step. `pre_dispatch` has
/// already checked everything the crate checks before it reads a message's body (header
/// version, flags, size, code, attached descriptors), so only socket errors leave the position
/// in the stream unknown; any other error was raised after the whole message was read (and,
/// for a handler's error with NEED_REPLY, already answered by the crate).
fn connection_survives(error: &VuError) -> bool {
    !matches!(
        error,
        VuError::Disconnected
            | VuError::PartialMessage
            | VuError::SocketError(_)
            | VuError::SocketBroken(_)
            | VuError::SocketConnect(_)
            | VuError::InvalidSocketFd(_)
            | VuError::NotUnixSocket
            | VuError::NotStreamSocket
            | VuError::OversizedMsg
    )
}

/// The control thread: listen, accept one front-end at a time, serve it until it goes away.
pub(crate) fn control_loop(ctrl: Arc<ControllerShared>, listener: UnixListener) {
    let backend = Arc::new(Mutex::new(BlkBackend::new(ctrl.clone())));
    if let Err(error) = listener.set_nonblocking(true) {
        tracing::error!(ctrlr = %ctrl.name, %error, "vhost: listener set_nonblocking");
        return;
    }
    while !ctrl.stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(error) => {
                tracing::warn!(ctrlr = %ctrl.name, %error, "vhost: accept");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if let Err(error) = stream.set_nonblocking(false) {
            tracing::warn!(ctrlr = %ctrl.name, %error, "vhost: connection set_nonblocking");
            continue;
        }
        tracing::info!(ctrlr = %ctrl.name, "vhost: front-end connected");
        serve(&ctrl, &backend, stream);
        lock(&backend).reset();
        *lock(&ctrl.conn) = None;
        tracing::info!(ctrlr = %ctrl.name, "vhost: front-end disconnected");
    }
    tracing::debug!(ctrlr = %ctrl.name, "vhost: control thread exits");
}

fn serve(ctrl: &Arc<ControllerShared>, backend: &Arc<Mutex<BlkBackend>>, stream: UnixStream) {
    let (conn, mut own) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(conn), Ok(own)) => (conn, own),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(ctrlr = %ctrl.name, %error, "vhost: cloning the connection");
            return;
        }
    };
    *lock(&ctrl.conn) = Some(conn);
    let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
    while !ctrl.stop.load(Ordering::Acquire) {
        let last_request = match pre_dispatch(ctrl, backend, &mut own) {
            Ok(Dispatch::Handled) => continue,
            Ok(Dispatch::Crate(request)) => request,
            Ok(Dispatch::Close) => return,
            Err(error) => {
                tracing::info!(ctrlr = %ctrl.name, %error, "vhost: connection read failed");
                return;
            }
        };
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) => return,
            Err(VuError::SocketRetry(error)) => {
                tracing::debug!(ctrlr = %ctrl.name, %error, "vhost: retrying a message");
            }
            Err(VuError::InactiveOperation(feature)) => {
                tracing::warn!(ctrlr = %ctrl.name, ?feature, request = last_request, "vhost: request needs a protocol feature that was not negotiated");
            }
            Err(error) if connection_survives(&error) => {
                tracing::warn!(ctrlr = %ctrl.name, %error, "vhost: vhost-user request refused");
                // A negotiated SET_LOG_BASE has no error reply: whether the crate refused its
                // body (empty, overflowing) or the back-end refused the region, the front-end
                // waits for an echo that never comes, so it must see the connection close.
                let log_refused = last_request == SET_LOG_BASE;
                if lock(backend).take_close_connection() || log_refused {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(ctrlr = %ctrl.name, %error, "vhost: bad vhost-user message; closing the connection");
                return;
            }
        }
    }
}

/// What to do with the next message.
enum Dispatch {
    /// Answered here.
    Handled,
    /// A message the `vhost` crate parses and hands to [`BlkBackend`] (its request code).
    Crate(u32),
    /// Unusable framing (oversized, a bad version): close the connection.
    Close,
}

/// vhost-user header: `request: u32, flags: u32, size: u32` (vhost-user spec, "Message
/// Specification").
const HEADER_BYTES: usize = 12;
const FLAG_VERSION_MASK: u32 = 0x3;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const FLAG_ALL: u32 = 0xf;
const MAX_MSG_SIZE: u32 = 0x1000;
/// Requests that may carry file descriptors (checked by the crate after the body is read).
const FD_REQUESTS: [u32; 8] = [5, 6, 12, 13, 14, 32, 37, 38];
const SET_LOG_BASE: u32 = 6;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
/// The requests handed to the `vhost` crate: those [`BlkBackend`] implements.
const CRATE_REQUESTS: [u32; 25] = [
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 31, 32, 34, 36, 37, 38,
];

/// Looks at the next header without consuming it; answers GET/SET_STATUS and every request
/// the back-end does not implement (an error reply when the front-end asked for one, and a
/// log line), and refuses oversized messages before the crate would read them.
fn pre_dispatch(
    ctrl: &ControllerShared,
    backend: &Mutex<BlkBackend>,
    stream: &mut UnixStream,
) -> std::io::Result<Dispatch> {
    use std::io::{Read, Write};
    let mut header = [0u8; HEADER_BYTES];
    let n = crate::sys::peek(stream, &mut header)?;
    if n < HEADER_BYTES {
        // End of stream or a truncated header: the crate reports it.
        return Ok(Dispatch::Crate(0));
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if flags & FLAG_VERSION_MASK != 1 || flags & !FLAG_ALL != 0 || size > MAX_MSG_SIZE {
        tracing::warn!(ctrlr = %ctrl.name, request, flags, size, "vhost: bad message header (version or size); closing the connection");
        return Ok(Dispatch::Close);
    }
    let fds = crate::sys::peek_fd_count(stream, HEADER_BYTES + size as usize)?;
    let Some(fds) = fds else {
        tracing::warn!(ctrlr = %ctrl.name, request, "vhost: too many file descriptors; closing the connection");
        return Ok(Dispatch::Close);
    };
    let fds_refused = fds > 0 && !FD_REQUESTS.contains(&request);
    tracing::trace!(ctrlr = %ctrl.name, request, flags, size, fds, "vhost: request");
    if CRATE_REQUESTS.contains(&request) && !fds_refused {
        return Ok(Dispatch::Crate(request));
    }
    // Consume it: header and body (any attached fds are closed by the kernel, as no control
    // buffer is given).
    let mut body = vec![0u8; size as usize];
    stream.read_exact(&mut header)?;
    stream.read_exact(&mut body)?;
    let reply_value: Option<u64> = match request {
        _ if fds_refused => {
            tracing::warn!(ctrlr = %ctrl.name, request, fds, "vhost: file descriptors attached to a request that takes none");
            (flags & FLAG_NEED_REPLY != 0).then_some(1)
        }
        SET_STATUS => {
            let Ok(value) = <[u8; 8]>::try_from(body.as_slice()) else {
                tracing::warn!(ctrlr = %ctrl.name, size, "vhost: SET_STATUS with a wrong size");
                return Ok(Dispatch::Close);
            };
            let status = u64::from_le_bytes(value);
            lock(backend).status = status as u8;
            tracing::debug!(ctrlr = %ctrl.name, status, "vhost: SET_STATUS");
            (flags & FLAG_NEED_REPLY != 0).then_some(0)
        }
        GET_STATUS => Some(u64::from(lock(backend).status)),
        _ => {
            tracing::warn!(ctrlr = %ctrl.name, request, size, "vhost: unsupported vhost-user request");
            (flags & FLAG_NEED_REPLY != 0).then_some(1)
        }
    };
    if let Some(value) = reply_value {
        let mut reply = [0u8; HEADER_BYTES + 8];
        reply[0..4].copy_from_slice(&request.to_le_bytes());
        reply[4..8].copy_from_slice(&(1 | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&value.to_le_bytes());
        stream.write_all(&reply)?;
    }
    Ok(Dispatch::Handled)
}

/// Creates the listening socket at `path` (removing a stale one).
pub(crate) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    UnixListener::bind(path)
}
