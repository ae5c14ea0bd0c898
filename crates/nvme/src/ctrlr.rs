//! Controller life cycle (NVMe Base 2.0, 3.5 "Controller initialization" and 3.6 shutdown).
//!
//! `Controller::new`: disable (CC.EN = 0, wait CSTS.RDY = 0 within CAP.TO), admin queues
//! (AQA/ASQ/ACQ), enable with IOSQES = 6, IOCQES = 4, MPS = 0 (4 KiB), wait ready, Identify
//! Controller, Set Features Number of Queues, Identify active namespace list (CNS 02h) and
//! each namespace, one Asynchronous Event Request outstanding.
//!
//! Admin commands run on the calling thread and poll the admin queue until they complete:
//! the controller is a setup-path object (`&mut self`); share it behind a lock if several
//! threads need it. I/O queue pairs ([`QueuePair`]) are independent and owned by one thread
//! each.
//!
//! Recovery, driven by [`Controller::process_admin_completions`] (call it from a poller):
//! - CSTS reads all ones: the device is gone; the controller is marked failed and every queue
//!   pair hands its requests back with DNR set.
//! - CSTS.CFS, a broken completion entry, an admin timeout, or a command that ignored its
//!   abort: reset (disable, bump the generation so every queue pair fails its requests back
//!   with *Aborted due to SQ Deletion*, re-initialise the admin queue, features and AER).
//!   Queue pairs are recreated by [`Controller::reconnect_io_qpair`].
//! - An I/O command past its timeout: an Abort is sent; if the controller says it did not
//!   abort it, or it is still outstanding one timeout later, reset.
//!
//! Shadow doorbells (Doorbell Buffer Config, NVMe Base 2.0 5.8, OACS bit 8; what QEMU's and
//! cloud NVMe controllers offer to cut doorbell exits): when the controller supports them and
//! [`ControllerOptions::shadow_doorbells`] is set, one page of shadow doorbells and one of
//! EventIdx values are allocated once, zeroed, and configured right after Identify Controller,
//! and again after every reset (a controller reset forgets them). Queue pairs then publish
//! their doorbells there and write MMIO only when the EventIdx asks (see [`QueuePair`]). A
//! failed Doorbell Buffer Config is logged and the controller runs with MMIO doorbells only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pollux_env::dma::{DmaBuffer, DmaMemory};

use crate::error::NvmeError;
use crate::prp::IoVec;
use crate::qpair::{
    usable_epoch, QueuePair, QueuePairOptions, ShadowPages, Shared, STATE_FAILED, STATE_RESETTING,
    STATE_RUNNING,
};
use crate::regs::Registers;
use crate::spec::{
    self, cns, fid, opc, AsyncEvent, Cap, Cc, Command, Completion, Csts, ErrorLogEntry,
    IdentifyController, IdentifyNamespace, NumberOfQueues, SmartLog, Version, IDENTIFY_BYTES,
    SMART_LOG_BYTES,
};

/// Admin queue tags: the AER, aborts (with qid and cid), synchronous commands.
const TAG_AER: u64 = 1 << 62;
const TAG_ABORT: u64 = 1 << 61;
const TAG_SYNC: u64 = 1 << 60;
/// Asynchronous events kept for [`Controller::take_async_events`].
const MAX_KEPT_EVENTS: usize = 64;
/// Admin completions reaped per poll.
const ADMIN_BATCH: u32 = 32;
const PAGE_SIZE_BYTES: u64 = 4096;

/// How to bring a controller up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Admin queue entries (2..=4096, clamped to CAP.MQES + 1).
    pub admin_entries: u16,
    /// I/O queue pairs to ask for (Set Features Number of Queues).
    pub io_queues: u16,
    /// Timeout of one admin command.
    pub admin_timeout: Duration,
    /// Lower bound on the CSTS.RDY wait (CAP.TO is used when longer): emulated controllers
    /// under TCG are slower than they claim.
    pub min_ready_timeout: Duration,
    /// Arm one Asynchronous Event Request.
    pub async_events: bool,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller supports them.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            admin_entries: 32,
            io_queues: 8,
            admin_timeout: Duration::from_secs(10),
            min_ready_timeout: Duration::from_millis(500),
            async_events: true,
            shadow_doorbells: true,
        }
    }
}

/// Where the controller is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerState {
    Running,
    Resetting,
    /// Fatal, removed, or a reset failed: no more I/O.
    Failed,
}

/// An active namespace, as Identify Namespace described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    nsid: u32,
    block_size_bytes: u32,
    num_blocks: u64,
    max_transfer_bytes: u64,
    /// The most blocks one read or write may carry: the 16-bit NLB field's 65536 and MDTS
    /// together, so the I/O path checks both with one compare (0 when MDTS is below a block:
    /// every request then takes the general path, which reports it).
    max_blocks_per_command: u32,
    identify: IdentifyNamespace,
}

impl Namespace {
    /// A namespace description built by hand (tests, or a caller that identified it itself).
    pub fn new(nsid: u32, identify: IdentifyNamespace, max_transfer_bytes: u64) -> Option<Self> {
        let block_size_bytes = identify.block_size_bytes()?;
        if nsid == 0 || nsid == u32::MAX || identify.nsze == 0 {
            return None;
        }
        let max_blocks_per_command =
            (max_transfer_bytes / u64::from(block_size_bytes)).min(65536) as u32;
        Some(Self {
            nsid,
            block_size_bytes,
            num_blocks: identify.nsze,
            max_transfer_bytes,
            max_blocks_per_command,
            identify,
        })
    }

    #[inline(always)]
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    #[inline(always)]
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    #[inline(always)]
    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Largest transfer of one command (MDTS, capped by the queue pairs' list pages).
    pub fn max_transfer_bytes(&self) -> u64 {
        self.max_transfer_bytes
    }

    /// The most blocks one read or write may carry (NLB's 65536 and MDTS, whichever is less).
    #[inline(always)]
    pub(crate) fn max_blocks_per_command(&self) -> u32 {
        self.max_blocks_per_command
    }

    pub fn identify(&self) -> &IdentifyNamespace {
        &self.identify
    }
}

/// One NVMe controller. See the module documentation.
pub struct Controller<R: Registers> {
    regs: Arc<R>,
    dma: Arc<DmaMemory>,
    shared: Arc<Shared>,
    options: ControllerOptions,
    cap: Cap,
    version: Version,
    identify: IdentifyController,
    admin: QueuePair<R>,
    /// One page for identify data and log pages.
    admin_buffer: DmaBuffer,
    /// Granted I/O queues; `qid_used[qid]` for qid 1..=granted.
    qid_used: Vec<bool>,
    namespaces: Vec<Namespace>,
    aer_outstanding: bool,
    events: VecDeque<AsyncEvent>,
    sync_seq: u64,
    /// Result of the synchronous command being waited for.
    sync_result: Option<(u64, Completion)>,
    resets: u64,
    detached: bool,
}

impl<R: Registers> std::fmt::Debug for Controller<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("model", &self.identify.model)
            .field("serial", &self.identify.serial)
            .field("version", &self.version)
            .field("state", &self.state())
            .field("namespaces", &self.namespaces.len())
            .finish()
    }
}

impl<R: Registers> Controller<R> {
    /// Initialises the controller behind `regs`, with queues and buffers from `dma` (whose
    /// [`MemMap`](pollux_env::memmap::MemMap) must be the one the device's DMA mapper serves).
    pub fn new(
        regs: Arc<R>,
        dma: Arc<DmaMemory>,
        options: ControllerOptions,
    ) -> Result<Self, NvmeError> {
        let cap_raw = regs.read64(spec::REG_CAP)?;
        if cap_raw == u64::MAX {
            return Err(NvmeError::DeviceRemoved);
        }
        let cap = Cap::decode(cap_raw);
        check_cap(&cap)?;
        let version = Version::decode(regs.read32(spec::REG_VS)?);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            usable_epoch: AtomicU64::new(usable_epoch(0)),
            state: AtomicU8::new(STATE_RUNNING),
            needs_reset: AtomicBool::new(false),
            abort_requests: Mutex::new(Vec::new()),
            orphans: Mutex::new(Vec::new()),
            page_size_bytes: PAGE_SIZE_BYTES,
            doorbell_stride_bytes: cap.doorbell_stride_bytes,
            shadow: Mutex::new(None),
            shadow_enabled: AtomicBool::new(false),
        });
        let admin_entries = clamp_entries(options.admin_entries, &cap).min(4096);
        let admin_options = QueuePairOptions {
            entries: admin_entries,
            depth: admin_entries - 1,
            list_pages: 1,
            timeout: None,
            // Admin commands carry driver-owned DMA buffers: never bounced.
            bounce_buffers: 0,
            bounce_buffer_bytes: 0,
        };
        let admin = QueuePair::new(
            Arc::clone(&regs),
            Arc::clone(&shared),
            Arc::clone(&dma),
            0,
            &admin_options,
            false,
        )?;
        let admin_buffer = dma
            .alloc(IDENTIFY_BYTES, PAGE_SIZE_BYTES as usize, None)
            .map_err(NvmeError::dma("admin data"))?;
        let mut ctrlr = Self {
            regs,
            dma,
            shared,
            options,
            cap,
            version,
            identify: IdentifyController::parse(&[0u8; IDENTIFY_BYTES]),
            admin,
            admin_buffer,
            qid_used: vec![true],
            namespaces: Vec::new(),
            aer_outstanding: false,
            events: VecDeque::with_capacity(MAX_KEPT_EVENTS),
            sync_seq: 0,
            sync_result: None,
            resets: 0,
            detached: false,
        };
        ctrlr.disable()?;
        ctrlr.enable()?;
        let page = ctrlr.identify_page(cns::CONTROLLER, 0)?;
        ctrlr.identify = IdentifyController::parse(&page);
        tracing::info!(
            model = %ctrlr.identify.model,
            serial = %ctrlr.identify.serial,
            firmware = %ctrlr.identify.firmware,
            version = %ctrlr.version,
            "nvme: controller identified"
        );
        ctrlr.configure_shadow_doorbells()?;
        ctrlr.set_queue_count()?;
        ctrlr.scan_namespaces()?;
        ctrlr.arm_aer()?;
        Ok(ctrlr)
    }

    pub fn cap(&self) -> &Cap {
        &self.cap
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    pub fn namespace(&self, nsid: u32) -> Result<&Namespace, NvmeError> {
        self.namespaces
            .iter()
            .find(|ns| ns.nsid == nsid)
            .ok_or(NvmeError::NoSuchNamespace { nsid })
    }

    /// I/O queues the controller granted.
    pub fn io_queues_granted(&self) -> u16 {
        (self.qid_used.len() - 1) as u16
    }

    pub fn supports_shadow_doorbells(&self) -> bool {
        self.identify.supports_doorbell_buffer_config()
    }

    /// Doorbell Buffer Config succeeded in the current generation: queue pairs created (or
    /// reconnected) now use shadow doorbells.
    pub fn shadow_doorbells_enabled(&self) -> bool {
        self.shared.shadow_enabled.load(Ordering::Acquire)
    }

    /// Allocates (once) and zeroes the shadow doorbell and EventIdx pages and hands them to the
    /// controller with Doorbell Buffer Config. Only a DMA failure is an error; a refused
    /// command leaves MMIO doorbells in use.
    fn configure_shadow_doorbells(&mut self) -> Result<(), NvmeError> {
        self.shared.shadow_enabled.store(false, Ordering::Release);
        if !self.options.shadow_doorbells || !self.supports_shadow_doorbells() {
            return Ok(());
        }
        let (doorbells_iova, event_idx_iova) = {
            let mut guard = self.shared.lock_shadow();
            if guard.is_none() {
                let page = PAGE_SIZE_BYTES as usize;
                let doorbells = self
                    .dma
                    .alloc(page, page, None)
                    .map_err(NvmeError::dma("shadow doorbells"))?;
                let event_idx = self
                    .dma
                    .alloc(page, page, None)
                    .map_err(NvmeError::dma("EventIdx"))?;
                *guard = Some(ShadowPages {
                    doorbells,
                    event_idx,
                });
            }
            let Some(pages) = guard.as_mut() else {
                return Ok(());
            };
            let page = PAGE_SIZE_BYTES as usize;
            pages
                .doorbells
                .fill(0, page, 0)
                .map_err(NvmeError::dma("shadow doorbells"))?;
            pages
                .event_idx
                .fill(0, page, 0)
                .map_err(NvmeError::dma("EventIdx"))?;
            (
                pages
                    .doorbells
                    .iova()
                    .map_err(NvmeError::dma("shadow doorbells"))?,
                pages.event_idx.iova().map_err(NvmeError::dma("EventIdx"))?,
            )
        };
        let mut command = Command::new(opc::DOORBELL_BUFFER_CONFIG);
        command.dptr = [doorbells_iova, event_idx_iova];
        match self.admin_sync(command, 0) {
            Ok(_) => {
                self.shared.shadow_enabled.store(true, Ordering::Release);
                self.admin.enable_shadow();
                tracing::debug!("nvme: shadow doorbells configured");
                Ok(())
            }
            Err(NvmeError::CommandFailed { status, .. }) => {
                tracing::warn!(%status, "nvme: Doorbell Buffer Config refused, MMIO doorbells only");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    pub fn resets(&self) -> u64 {
        self.resets
    }

    pub fn state(&self) -> ControllerState {
        match self.shared.state.load(Ordering::Acquire) {
            STATE_RUNNING => ControllerState::Running,
            STATE_RESETTING => ControllerState::Resetting,
            _ => ControllerState::Failed,
        }
    }

    /// Asynchronous events received since the last call (oldest first, at most 64 kept).
    pub fn take_async_events(&mut self) -> Vec<AsyncEvent> {
        self.events.drain(..).collect()
    }

    // -------------------------------------------------------------------------------------
    // Enable / disable

    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.cap.timeout_ms)).max(self.options.min_ready_timeout)
    }

    fn read_csts(&self) -> Result<Csts, NvmeError> {
        let csts = Csts::decode(self.regs.read32(spec::REG_CSTS)?);
        if csts.is_all_ones() {
            return Err(NvmeError::DeviceRemoved);
        }
        Ok(csts)
    }

    fn wait_csts(&self, what: &'static str, done: impl Fn(&Csts) -> bool) -> Result<(), NvmeError> {
        let timeout = self.ready_timeout();
        let start = Instant::now();
        loop {
            let csts = self.read_csts()?;
            if done(&csts) {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(NvmeError::Timeout {
                    what,
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// CC.EN = 0 and wait for CSTS.RDY = 0: afterwards the controller does no more DMA.
    fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.regs.read32(spec::REG_CC)?;
        if cc == u32::MAX {
            return Err(NvmeError::DeviceRemoved);
        }
        if cc & spec::CC_EN != 0 {
            // 3.5.2: wait for RDY = 1 before clearing EN if an enable is in progress.
            let csts = self.read_csts()?;
            if !csts.ready && !csts.fatal {
                self.wait_csts("CSTS.RDY = 1 before disabling", |c| c.ready || c.fatal)?;
            }
            self.regs.write32(spec::REG_CC, cc & !spec::CC_EN)?;
        }
        self.wait_csts("CSTS.RDY = 0 after disabling", |c| !c.ready)
    }

    /// Programs the admin queues and sets CC.EN = 1, waiting for CSTS.RDY = 1.
    fn enable(&mut self) -> Result<(), NvmeError> {
        self.admin.reset_rings()?;
        let entries = u32::from(self.admin.entries());
        let aqa = spec::Aqa {
            sq_entries: entries,
            cq_entries: entries,
        };
        self.regs.write32(spec::REG_AQA, aqa.encode())?;
        self.regs.write64(spec::REG_ASQ, self.admin.sq_iova())?;
        self.regs.write64(spec::REG_ACQ, self.admin.cq_iova())?;
        let cc = Cc {
            enable: true,
            css: 0,
            mps: 0,
            ams: 0,
            shn: 0,
            iosqes: 6,
            iocqes: 4,
        };
        self.regs.write32(spec::REG_CC, cc.encode())?;
        self.wait_csts("CSTS.RDY = 1 after enabling", |c| c.ready || c.fatal)?;
        let csts = self.read_csts()?;
        if csts.fatal {
            return Err(NvmeError::ControllerFatal { csts: csts.raw });
        }
        Ok(())
    }

    // -------------------------------------------------------------------------------------
    // Admin commands

    /// Submits `command` on the admin queue and polls until it completes or times out.
    /// `data_len` bytes of the admin buffer are the data (0: none). Asynchronous completions
    /// (AER, aborts) met meanwhile are handled.
    fn admin_sync(&mut self, command: Command, data_len: usize) -> Result<Completion, NvmeError> {
        if self.shared.state.load(Ordering::Acquire) == STATE_FAILED {
            return Err(NvmeError::ControllerFailed);
        }
        self.sync_seq += 1;
        let tag = TAG_SYNC | self.sync_seq;
        let iov;
        let iovs: &[IoVec] = if data_len > 0 {
            iov = IoVec::from_dma_buffer(&self.admin_buffer, 0, data_len)
                .map_err(NvmeError::dma("admin command data"))?;
            std::slice::from_ref(&iov)
        } else {
            &[]
        };
        self.admin.submit_raw(tag, command, iovs, data_len as u64)?;
        let start = Instant::now();
        loop {
            self.reap_admin()?;
            if let Some((done_tag, completion)) = self.sync_result.take() {
                if done_tag == tag {
                    if completion.status.is_success() {
                        return Ok(completion);
                    }
                    return Err(NvmeError::CommandFailed {
                        opcode: command.opcode,
                        status: completion.status,
                    });
                }
            }
            if start.elapsed() >= self.options.admin_timeout {
                tracing::error!(opcode = command.opcode, "nvme: admin command timed out");
                self.shared.needs_reset.store(true, Ordering::Release);
                return Err(NvmeError::Timeout {
                    what: "an admin command",
                    waited_ms: self.options.admin_timeout.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
    }

    /// Reaps admin completions and dispatches them by tag.
    fn reap_admin(&mut self) -> Result<u32, NvmeError> {
        let mut done: [(u64, Option<Completion>); ADMIN_BATCH as usize] =
            [(0, None); ADMIN_BATCH as usize];
        let mut count = 0usize;
        let reaped = self.admin.process_completions(ADMIN_BATCH, |tag, cpl| {
            if let Some(entry) = done.get_mut(count) {
                *entry = (tag, Some(*cpl));
                count += 1;
            }
        })?;
        for (tag, completion) in done.iter().take(count) {
            let Some(completion) = completion else {
                continue;
            };
            self.dispatch_admin(*tag, completion)?;
        }
        Ok(reaped)
    }

    fn dispatch_admin(&mut self, tag: u64, completion: &Completion) -> Result<(), NvmeError> {
        if tag == TAG_AER {
            self.aer_outstanding = false;
            if !completion.status.is_success() {
                tracing::debug!(status = %completion.status, "nvme: AER ended");
                return Ok(());
            }
            let event = AsyncEvent::decode(completion.dw0);
            tracing::warn!(
                event_type = event.event_type,
                event_info = event.event_info,
                log_page = event.log_page,
                "nvme: asynchronous event"
            );
            if self.events.len() == MAX_KEPT_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(event);
            if self.options.async_events {
                self.arm_aer()?;
            }
        } else if tag & TAG_ABORT != 0 {
            let qid = (tag >> 16) as u16;
            let cid = tag as u16;
            // DW0 bit 0 set: the command was not aborted (5.1).
            if !completion.status.is_success() || completion.dw0 & 1 != 0 {
                tracing::error!(
                    qid,
                    cid,
                    status = %completion.status,
                    "nvme: abort did not abort the command, resetting"
                );
                self.shared.needs_reset.store(true, Ordering::Release);
            } else {
                tracing::warn!(qid, cid, "nvme: command aborted");
            }
        } else {
            self.sync_result = Some((tag, *completion));
        }
        Ok(())
    }

    fn arm_aer(&mut self) -> Result<(), NvmeError> {
        if !self.options.async_events || self.aer_outstanding {
            return Ok(());
        }
        let cid = self.admin.alloc_cid()?;
        self.admin
            .enqueue(cid, TAG_AER, Command::new(opc::ASYNC_EVENT_REQUEST), true)?;
        self.admin.flush()?;
        self.aer_outstanding = true;
        Ok(())
    }

    fn identify_page(&mut self, cns: u8, nsid: u32) -> Result<[u8; IDENTIFY_BYTES], NvmeError> {
        let mut command = Command::new(opc::IDENTIFY);
        command.nsid = nsid;
        command.cdw10 = u32::from(cns);
        self.admin_buffer
            .fill(0, IDENTIFY_BYTES, 0)
            .map_err(NvmeError::dma("admin data"))?;
        self.admin_sync(command, IDENTIFY_BYTES)?;
        let mut page = [0u8; IDENTIFY_BYTES];
        self.admin_buffer
            .read_at(0, &mut page)
            .map_err(NvmeError::dma("admin data"))?;
        Ok(page)
    }

    /// Identify (any CNS): the 4 KiB page.
    pub fn identify_raw(&mut self, cns: u8, nsid: u32) -> Result<[u8; IDENTIFY_BYTES], NvmeError> {
        self.identify_page(cns, nsid)
    }

    /// Get Log Page `lid` for `nsid` (0xffffffff: controller wide) into `out` (at most 4 KiB,
    /// a multiple of 4 bytes).
    pub fn get_log_page(&mut self, lid: u8, nsid: u32, out: &mut [u8]) -> Result<(), NvmeError> {
        if out.is_empty() || out.len() > IDENTIFY_BYTES || !out.len().is_multiple_of(4) {
            return Err(NvmeError::InvalidRequest {
                reason: "log page length must be 4..=4096 bytes, a multiple of 4",
            });
        }
        let numd = (out.len() / 4 - 1) as u32;
        let mut command = Command::new(opc::GET_LOG_PAGE);
        command.nsid = nsid;
        command.cdw10 = u32::from(lid) | ((numd & 0xffff) << 16);
        command.cdw11 = numd >> 16;
        self.admin_sync(command, out.len())?;
        self.admin_buffer
            .read_at(0, out)
            .map_err(NvmeError::dma("admin data"))
    }

    pub fn smart_log(&mut self) -> Result<SmartLog, NvmeError> {
        let mut page = [0u8; SMART_LOG_BYTES];
        self.get_log_page(spec::lid::SMART_HEALTH, u32::MAX, &mut page)?;
        Ok(SmartLog::parse(&page))
    }

    /// The Error Information log (ELPE + 1 entries, capped at one page).
    pub fn error_log(&mut self) -> Result<Vec<ErrorLogEntry>, NvmeError> {
        let entries = (usize::from(self.identify.elpe) + 1).min(IDENTIFY_BYTES / 64);
        let mut page = vec![0u8; entries * 64];
        self.get_log_page(spec::lid::ERROR_INFORMATION, u32::MAX, &mut page)?;
        Ok(ErrorLogEntry::parse_log(&page))
    }

    /// Get Features `fid` (current value): DW0 of the completion.
    pub fn get_features(&mut self, fid: u8, cdw11: u32) -> Result<u32, NvmeError> {
        let mut command = Command::new(opc::GET_FEATURES);
        command.cdw10 = u32::from(fid);
        command.cdw11 = cdw11;
        Ok(self.admin_sync(command, 0)?.dw0)
    }

    /// Set Features `fid` to `cdw11`: DW0 of the completion.
    pub fn set_features(&mut self, fid: u8, cdw11: u32) -> Result<u32, NvmeError> {
        let mut command = Command::new(opc::SET_FEATURES);
        command.cdw10 = u32::from(fid);
        command.cdw11 = cdw11;
        Ok(self.admin_sync(command, 0)?.dw0)
    }

    pub fn volatile_write_cache(&mut self) -> Result<bool, NvmeError> {
        Ok(
            spec::VolatileWriteCache::decode(self.get_features(fid::VOLATILE_WRITE_CACHE, 0)?)
                .enabled,
        )
    }

    pub fn set_volatile_write_cache(&mut self, enabled: bool) -> Result<(), NvmeError> {
        self.set_features(
            fid::VOLATILE_WRITE_CACHE,
            spec::VolatileWriteCache { enabled }.encode(),
        )
        .map(drop)
    }

    fn set_queue_count(&mut self) -> Result<(), NvmeError> {
        let want = self.options.io_queues.clamp(1, u16::MAX - 1);
        let asked = NumberOfQueues {
            io_sqs: want,
            io_cqs: want,
        };
        let granted =
            NumberOfQueues::decode(self.set_features(fid::NUMBER_OF_QUEUES, asked.encode())?);
        let count = granted.io_sqs.min(granted.io_cqs).min(want);
        if self.qid_used.len() != usize::from(count) + 1 {
            self.qid_used.resize(usize::from(count) + 1, false);
        }
        tracing::debug!(asked = want, granted = count, "nvme: I/O queues");
        Ok(())
    }

    fn scan_namespaces(&mut self) -> Result<(), NvmeError> {
        let nsids = match self.identify_page(cns::ACTIVE_NAMESPACE_LIST, 0) {
            Ok(page) => spec::parse_active_ns_list(&page),
            // NVMe 1.0 controllers: every NSID up to NN.
            Err(NvmeError::CommandFailed { .. }) => (1..=self.identify.nn.min(1024)).collect(),
            Err(error) => return Err(error),
        };
        let max_transfer = self
            .identify
            .max_transfer_bytes(self.cap.page_size_min_bytes)
            .unwrap_or(u64::MAX)
            // One list page per request by default: 511 entries + the first = 2 MiB.
            .min(2 * 1024 * 1024);
        self.namespaces.clear();
        for nsid in nsids {
            let page = self.identify_page(cns::NAMESPACE, nsid)?;
            let identify = IdentifyNamespace::parse(&page);
            match Namespace::new(nsid, identify, max_transfer) {
                Some(ns) => self.namespaces.push(ns),
                None => tracing::warn!(nsid, "nvme: namespace unusable (no size or bad format)"),
            }
        }
        Ok(())
    }

    /// Abort command `cid` on submission queue `qid` (asynchronous: the outcome is logged and
    /// a failed abort asks for a reset).
    pub fn abort(&mut self, qid: u16, cid: u16) -> Result<(), NvmeError> {
        let mut command = Command::new(opc::ABORT);
        command.cdw10 = u32::from(qid) | (u32::from(cid) << 16);
        let tag = TAG_ABORT | (u64::from(qid) << 16) | u64::from(cid);
        let slot = self.admin.alloc_cid()?;
        self.admin.enqueue(slot, tag, command, false)?;
        self.admin.flush()
    }

    // -------------------------------------------------------------------------------------
    // I/O queue pairs

    /// Creates an I/O queue pair (CQ then SQ, 5.4 / 5.5) for the calling thread.
    pub fn alloc_io_qpair(
        &mut self,
        options: &QueuePairOptions,
    ) -> Result<QueuePair<R>, NvmeError> {
        let qid = self
            .qid_used
            .iter()
            .position(|used| !used)
            .ok_or(NvmeError::NoQueueId {
                granted: self.io_queues_granted(),
            })? as u16;
        let mut options = *options;
        options.entries = clamp_entries(options.entries, &self.cap);
        let qpair = QueuePair::new(
            Arc::clone(&self.regs),
            Arc::clone(&self.shared),
            Arc::clone(&self.dma),
            qid,
            &options,
            self.identify.supports_sgl(),
        )?;
        self.create_io_queues(&qpair)?;
        self.qid_used[usize::from(qid)] = true;
        Ok(qpair)
    }

    fn create_io_queues(&mut self, qpair: &QueuePair<R>) -> Result<(), NvmeError> {
        let qid = qpair.qid();
        let size = u32::from(qpair.entries() - 1);
        let mut create_cq = Command::new(opc::CREATE_IO_CQ);
        create_cq.dptr = [qpair.cq_iova(), 0];
        create_cq.cdw10 = (size << 16) | u32::from(qid);
        create_cq.cdw11 = 1; // physically contiguous, interrupts disabled
        self.admin_sync(create_cq, 0)?;
        let mut create_sq = Command::new(opc::CREATE_IO_SQ);
        create_sq.dptr = [qpair.sq_iova(), 0];
        create_sq.cdw10 = (size << 16) | u32::from(qid);
        create_sq.cdw11 = (u32::from(qid) << 16) | 1; // CQID, contiguous
        if let Err(error) = self.admin_sync(create_sq, 0) {
            let _ = self.delete_io_queues(qid);
            return Err(error);
        }
        Ok(())
    }

    fn delete_io_queues(&mut self, qid: u16) -> Result<(), NvmeError> {
        let mut delete_sq = Command::new(opc::DELETE_IO_SQ);
        delete_sq.cdw10 = u32::from(qid);
        let sq_result = self.admin_sync(delete_sq, 0);
        let mut delete_cq = Command::new(opc::DELETE_IO_CQ);
        delete_cq.cdw10 = u32::from(qid);
        let cq_result = self.admin_sync(delete_cq, 0);
        sq_result.and(cq_result).map(drop)
    }

    /// Deletes the pair's queues on the controller and frees it. Requests still in flight are
    /// completed by the controller with *Aborted due to SQ Deletion* but not handed back:
    /// drain the pair first.
    pub fn free_io_qpair(&mut self, mut qpair: QueuePair<R>) -> Result<(), NvmeError> {
        let qid = qpair.qid();
        let rings = qpair.take_rings();
        let result = if qpair.generation() == self.shared.generation.load(Ordering::Acquire)
            && self.state() == ControllerState::Running
        {
            self.delete_io_queues(qid)
        } else {
            Ok(())
        };
        if result.is_err() {
            // The controller may still use the rings: keep them until a reset or detach.
            if let Some(rings) = rings {
                self.shared.lock_orphans().push(rings);
            }
        }
        if let Some(used) = self.qid_used.get_mut(usize::from(qid)) {
            *used = false;
        }
        result
    }

    /// Re-creates a disconnected pair's queues after a reset. The pair must have been polled
    /// since the reset (so its failed requests were handed back).
    pub fn reconnect_io_qpair(&mut self, qpair: &mut QueuePair<R>) -> Result<(), NvmeError> {
        if self.state() != ControllerState::Running {
            return Err(NvmeError::ControllerFailed);
        }
        if qpair.in_flight() != 0 {
            return Err(NvmeError::InvalidRequest {
                reason: "poll the queue pair to hand back its failed requests before reconnecting",
            });
        }
        qpair.reset_rings()?;
        self.create_io_queues(qpair)?;
        qpair.reset_rings()
    }

    // -------------------------------------------------------------------------------------
    // Health, timeouts, reset

    /// The admin poller: checks CSTS (removal, fatal status), reaps admin completions (AER,
    /// aborts), sends aborts for timed-out commands, deletes queues of dropped pairs, and
    /// resets when something asked for it. Returns the admin completions reaped.
    pub fn process_admin_completions(&mut self) -> Result<u32, NvmeError> {
        self.poll_health()?;
        let reaped = match self.reap_admin() {
            Ok(reaped) => reaped,
            Err(NvmeError::BadCompletion { .. }) => 0, // needs_reset is set
            Err(error) => return Err(error),
        };
        let aborts: Vec<(u16, u16)> = std::mem::take(&mut *self.shared.lock_aborts());
        for (qid, cid) in aborts {
            if let Err(error) = self.abort(qid, cid) {
                tracing::error!(%error, qid, cid, "nvme: could not send abort, resetting");
                self.shared.needs_reset.store(true, Ordering::Release);
            }
        }
        let orphans = std::mem::take(&mut *self.shared.lock_orphans());
        for rings in orphans {
            if self.state() == ControllerState::Running && self.delete_io_queues(rings.qid).is_err()
            {
                tracing::warn!(
                    qid = rings.qid,
                    "nvme: deleting a dropped pair's queues failed"
                );
            }
            if let Some(used) = self.qid_used.get_mut(usize::from(rings.qid)) {
                *used = false;
            }
        }
        if self.shared.needs_reset.load(Ordering::Acquire) {
            self.reset()?;
        }
        Ok(reaped)
    }

    /// Reads CSTS: all ones marks the controller failed (removed), CFS resets it.
    pub fn poll_health(&mut self) -> Result<(), NvmeError> {
        if self.state() == ControllerState::Failed {
            return Err(NvmeError::ControllerFailed);
        }
        let raw = self.regs.read32(spec::REG_CSTS)?;
        let csts = Csts::decode(raw);
        if csts.is_all_ones() {
            tracing::error!("nvme: CSTS reads all ones, controller removed");
            self.fail();
            return Err(NvmeError::DeviceRemoved);
        }
        if csts.fatal {
            tracing::error!(csts = raw, "nvme: controller fatal status, resetting");
            self.reset()?;
        }
        Ok(())
    }

    fn fail(&mut self) {
        self.shared.mark_failed();
        self.admin.discard_all();
        self.aer_outstanding = false;
    }

    /// Controller-level reset: disable (no more DMA), fail every queue pair's requests back
    /// (through their next poll), re-initialise. On failure the controller is marked failed.
    pub fn reset(&mut self) -> Result<(), NvmeError> {
        if self.state() == ControllerState::Failed {
            return Err(NvmeError::ControllerFailed);
        }
        self.shared.state.store(STATE_RESETTING, Ordering::Release);
        self.resets += 1;
        tracing::warn!(resets = self.resets, "nvme: resetting controller");
        let result = self.reset_inner();
        match &result {
            Ok(()) => {
                self.shared.state.store(STATE_RUNNING, Ordering::Release);
            }
            Err(error) => {
                tracing::error!(%error, "nvme: reset failed, controller failed");
                self.fail();
            }
        }
        result
    }

    fn reset_inner(&mut self) -> Result<(), NvmeError> {
        self.disable()?;
        // The controller does no more DMA: queue pairs may now hand their requests back.
        let generation = self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared
            .usable_epoch
            .store(usable_epoch(generation), Ordering::Release);
        self.shared.needs_reset.store(false, Ordering::Release);
        self.shared.lock_aborts().clear();
        // Rings of dropped pairs are safe to free now: their queues no longer exist.
        for rings in std::mem::take(&mut *self.shared.lock_orphans()) {
            if let Some(used) = self.qid_used.get_mut(usize::from(rings.qid)) {
                *used = false;
            }
        }
        self.admin.discard_all();
        self.aer_outstanding = false;
        self.sync_result = None;
        // The reset made the controller forget the shadow buffers: MMIO until reconfigured.
        self.shared.shadow_enabled.store(false, Ordering::Release);
        self.shared.state.store(STATE_RESETTING, Ordering::Release);
        self.enable()?;
        // The admin queue runs in the new generation; it needs the running state for commands.
        self.shared.state.store(STATE_RUNNING, Ordering::Release);
        self.configure_shadow_doorbells()?;
        self.set_queue_count()?;
        self.arm_aer()
    }

    /// Normal shutdown (CC.SHN = 01b, wait CSTS.SHST = 10b), then a reset (CC.EN = 0, wait
    /// CSTS.RDY = 0), after which the controller does no more DMA. Queue pairs become unusable.
    /// Also done on drop.
    pub fn detach(mut self) -> Result<(), NvmeError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), NvmeError> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let was_failed = self.state() == ControllerState::Failed;
        self.shared.mark_failed();
        if was_failed {
            return Ok(());
        }
        let cc = self.regs.read32(spec::REG_CC)?;
        if cc == u32::MAX {
            return Err(NvmeError::DeviceRemoved);
        }
        self.regs.write32(
            spec::REG_CC,
            (cc & !spec::CC_SHN_MASK) | spec::CC_SHN_NORMAL,
        )?;
        self.wait_csts("CSTS.SHST = shutdown complete", |c| {
            c.raw & spec::CSTS_SHST_MASK == spec::CSTS_SHST_COMPLETE
        })?;
        // A shutdown leaves the queues and the shadow doorbell buffer configured, and a command
        // whose doorbell was just rung (the AER) may still be fetched after it: QEMU's NVMe did
        // so after the probe had unmapped its memory (a DMAR fault). A reset (CC.EN = 0, 7.6.2
        // allows it after a shutdown) deletes every queue: at CSTS.RDY = 0 the controller holds
        // no address of ours, so the memory may go.
        self.disable()?;
        tracing::info!("nvme: controller shut down");
        Ok(())
    }
}

impl<R: Registers> Drop for Controller<R> {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::warn!(%error, "nvme: shutdown on drop failed");
        }
    }
}

fn check_cap(cap: &Cap) -> Result<(), NvmeError> {
    let implausible = |detail: &str| {
        Err(NvmeError::Implausible {
            what: "CAP",
            detail: format!("{:#018x}: {detail}", cap.raw),
        })
    };
    if cap.max_queue_entries < 2 {
        return implausible("MQES below 1");
    }
    if cap.command_sets & 1 == 0 {
        return implausible("NVM command set not supported");
    }
    if cap.page_size_min_bytes > PAGE_SIZE_BYTES {
        return implausible("cannot use 4 KiB pages");
    }
    Ok(())
}

fn clamp_entries(entries: u16, cap: &Cap) -> u16 {
    let max = cap.max_queue_entries.min(u32::from(u16::MAX)) as u16;
    entries.clamp(2, max.max(2))
}
