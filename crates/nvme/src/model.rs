//! A software NVMe controller for tests (feature `model`).
//!
//! It implements [`Registers`], so the real driver runs against it unchanged, and executes
//! the driver's submission rings from the same DMA memory: commands run when their SQ tail
//! doorbell is written (or on [`ModelController::step`] when automatic execution is off), and
//! completions are posted with the right phase tag, respecting CQ head doorbells (a full CQ
//! stalls the SQ, as on hardware).
//!
//! Supported: admin Identify (controller, namespace, active list), Get/Set Features (number
//! of queues, volatile write cache), Create/Delete I/O SQ/CQ, Get Log Page (error, SMART),
//! Abort, Asynchronous Event Request; NVM Read, Write, Flush, Write Zeroes, Dataset
//! Management, against in-memory namespaces, with PRP lists (chained) and SGL data block /
//! last segment descriptors.
//!
//! Shadow doorbells (option `shadow_doorbells`: OACS bit 8 and Doorbell Buffer Config),
//! following QEMU's `hw/nvme/ctrl.c`: the command records the two pages and copies every
//! existing queue's tail / head into the shadow page; processing an SQ (on its MMIO doorbell,
//! or on [`ModelController::step`]) starts from the shadow tail and, once it has run out of
//! entries, writes EventIdx = the tail it saw and reads the shadow tail again (so a host that
//! wrote the shadow after that read sees the EventIdx and rings). Posting a completion reads
//! the shadow CQ head and writes it back as the CQ's EventIdx. MMIO doorbells of the admin
//! queue are copied into the shadow page (drivers leave the admin slots alone). A controller
//! reset forgets the pages.
//!
//! Fault injection: an error status for the next N I/O commands, dropped completions (the
//! command runs but never completes: trips the driver's timeout, abort and reset path),
//! CSTS.CFS, surprise removal (all registers read all ones), and raw completion entries
//! written straight into a CQ (hostile device).
//!
//! # Addresses
//!
//! The model reads and writes the IOVAs it is given. It requires the [`DmaMemory`] to have
//! no DMA mapper attached, so that IOVA == virtual address (env's `MemMap` identity mode),
//! and checks every access against the bounds of that reservation: an address outside it
//! fails the command with *Data Transfer Error* instead of touching memory. This is the only
//! `unsafe` in the crate (raw copies into and out of the reservation).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use pollux_env::dma::DmaMemory;

use crate::error::NvmeError;
use crate::regs::Registers;
use crate::spec::{
    self, cns, fid, opc, sc, AsyncEvent, Command, Completion, IdentifyController,
    IdentifyNamespace, LbaFormat, NumberOfQueues, Psdt, SglDescriptor, Status, StatusCodeType,
    CQE_BYTES, IDENTIFY_BYTES, SGL_DESCRIPTOR_BYTES, SGL_TYPE_DATA_BLOCK, SGL_TYPE_LAST_SEGMENT,
    SQE_BYTES,
};

const PAGE: u64 = 4096;
/// Bound on PRP list entries walked for one command (a hostile list cannot loop forever).
const MAX_PRP_ENTRIES: usize = 1 << 16;

/// What the model looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelOptions {
    /// CAP.MQES + 1.
    pub max_queue_entries: u16,
    /// CAP.DSTRD (doorbell stride `4 << dstrd`).
    pub doorbell_stride_log2: u8,
    /// I/O queues granted at most.
    pub max_io_queues: u16,
    /// (block count, block size) of each namespace, NSIDs 1, 2, ...
    pub namespaces: Vec<(u64, u32)>,
    /// Advertise SGL support (SGLS bit 0).
    pub sgl: bool,
    /// MDTS (0 = no limit).
    pub mdts: u8,
    /// Advertise and implement Doorbell Buffer Config (OACS bit 8).
    pub shadow_doorbells: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            max_queue_entries: 1024,
            doorbell_stride_log2: 0,
            max_io_queues: 8,
            namespaces: vec![(2048, 512)],
            sgl: false,
            mdts: 0,
            shadow_doorbells: false,
        }
    }
}

/// Counters of the model.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModelStats {
    pub commands: u64,
    pub io_commands: u64,
    pub sq_doorbell_writes: u64,
    pub cq_doorbell_writes: u64,
    pub aborts: u64,
    pub enables: u64,
    /// CC.SHN writes that started a shutdown.
    pub shutdowns: u64,
    /// Doorbell Buffer Config commands accepted.
    pub doorbell_buffer_configs: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    tail: u16,
    cqid: u16,
}

#[derive(Debug, Clone, Copy)]
struct Cq {
    base: u64,
    entries: u16,
    /// Next slot to post to.
    tail: u16,
    /// Last head the driver reported.
    head: u16,
    phase: bool,
}

struct Namespace {
    block_size: u32,
    data: Vec<u8>,
}

struct State {
    mem: Arc<DmaMemory>,
    options: ModelOptions,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    namespaces: Vec<Namespace>,
    vwc: bool,
    granted_queues: u16,
    aer_cids: Vec<u16>,
    events: VecDeque<AsyncEvent>,
    auto_execute: bool,
    transfer_data: bool,
    fail_next: u32,
    fail_status: Status,
    drop_next: u32,
    dropped: Vec<(u16, u16)>,
    removed: bool,
    /// (shadow doorbell page, EventIdx page) after Doorbell Buffer Config.
    dbbuf: Option<(u64, u64)>,
    stats: ModelStats,
}

/// The software controller. Share it as `Arc<ModelController>`: the driver gets one clone,
/// the test keeps another to inject faults.
pub struct ModelController {
    state: Mutex<State>,
}

impl std::fmt::Debug for ModelController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelController").finish_non_exhaustive()
    }
}

impl ModelController {
    /// A controller whose commands address `mem` (which must have no DMA mapper attached).
    pub fn new(mem: Arc<DmaMemory>, options: ModelOptions) -> Result<Arc<Self>, NvmeError> {
        if mem.memmap().has_mapper() {
            return Err(NvmeError::InvalidRequest {
                reason: "the model needs IOVA == virtual address (no DMA mapper)",
            });
        }
        let namespaces = options
            .namespaces
            .iter()
            .map(|&(blocks, block_size)| Namespace {
                block_size,
                data: vec![0u8; (blocks * u64::from(block_size)) as usize],
            })
            .collect();
        let queues = usize::from(options.max_io_queues) + 1;
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                mem,
                options,
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                sqs: vec![None; queues],
                cqs: vec![None; queues],
                namespaces,
                vwc: false,
                granted_queues: 0,
                aer_cids: Vec::new(),
                events: VecDeque::new(),
                auto_execute: true,
                transfer_data: true,
                fail_next: 0,
                fail_status: Status::SUCCESS,
                drop_next: 0,
                dropped: Vec::new(),
                removed: false,
                dbbuf: None,
                stats: ModelStats::default(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Execute I/O commands when their doorbell is written (default) or only on
    /// [`Self::step`]. Admin commands always run at once.
    pub fn set_auto_execute(&self, auto: bool) {
        self.lock().auto_execute = auto;
    }

    /// Skip the data copies of reads and writes (to measure the driver alone).
    pub fn set_data_transfer(&self, transfer: bool) {
        self.lock().transfer_data = transfer;
    }

    /// Runs every submitted command that fits in its CQ.
    pub fn step(&self) {
        let mut state = self.lock();
        for qid in 0..state.sqs.len() {
            state.process_sq(qid as u16);
        }
    }

    /// The next `count` I/O commands complete with `status` (without running).
    pub fn fail_next(&self, count: u32, status: Status) {
        let mut state = self.lock();
        state.fail_next = count;
        state.fail_status = status;
    }

    /// The next `count` I/O commands run but never complete.
    pub fn drop_next(&self, count: u32) {
        self.lock().drop_next = count;
    }

    /// Sets CSTS.CFS (cleared by the next disable).
    pub fn set_fatal(&self) {
        self.lock().csts |= spec::CSTS_CFS;
    }

    /// Surprise removal: every register reads all ones, writes are ignored, nothing runs.
    pub fn remove(&self) {
        self.lock().removed = true;
    }

    /// Writes a raw completion entry into CQ `qid`'s next slot with the current phase (a
    /// hostile device); `cid` and `sq_head` as given.
    pub fn post_raw_completion(&self, qid: u16, cid: u16, sq_head: u16) {
        let mut state = self.lock();
        let completion = Completion {
            dw0: 0,
            dw1: 0,
            sq_head,
            sq_id: qid,
            cid,
            phase: false,
            status: Status::SUCCESS,
        };
        state.post(qid, completion);
    }

    /// Writes 16 arbitrary bytes into CQ `qid`'s next slot (a hostile or broken device: any
    /// command id, SQ id, SQ head, status), with the phase bit the current one, or the stale
    /// one when `stale_phase` (an entry the driver must not consume yet).
    pub fn post_raw_entry(&self, qid: u16, mut entry: [u8; CQE_BYTES], stale_phase: bool) {
        let mut state = self.lock();
        let Some(Some(cq)) = state.cqs.get(usize::from(qid)).copied() else {
            return;
        };
        let phase = cq.phase != stale_phase;
        entry[14] = (entry[14] & !1) | u8::from(phase);
        let address = cq.base + u64::from(cq.tail) * CQE_BYTES as u64;
        if state.mem_write(address, &entry).is_err() {
            return;
        }
        if stale_phase {
            return;
        }
        if let Some(Some(cq)) = state.cqs.get_mut(usize::from(qid)) {
            cq.tail += 1;
            if cq.tail == cq.entries {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
        }
    }

    /// Queues an asynchronous event (completed on an outstanding AER at once, or later).
    pub fn trigger_async_event(&self, event: AsyncEvent) {
        let mut state = self.lock();
        state.events.push_back(event);
        state.deliver_events();
    }

    pub fn stats(&self) -> ModelStats {
        self.lock().stats
    }

    /// Copies namespace `nsid`'s bytes at `offset` into `out`.
    pub fn read_namespace(&self, nsid: u32, offset: usize, out: &mut [u8]) -> bool {
        let state = self.lock();
        let Some(ns) = state.namespaces.get((nsid as usize).wrapping_sub(1)) else {
            return false;
        };
        match ns.data.get(offset..offset + out.len()) {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// Writes `data` into namespace `nsid` at `offset`.
    pub fn write_namespace(&self, nsid: u32, offset: usize, data: &[u8]) -> bool {
        let mut state = self.lock();
        let Some(ns) = state.namespaces.get_mut((nsid as usize).wrapping_sub(1)) else {
            return false;
        };
        match ns.data.get_mut(offset..offset + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }
}

impl Registers for ModelController {
    fn read32(&self, offset: u64) -> Result<u32, NvmeError> {
        let state = self.lock();
        if state.removed {
            return Ok(u32::MAX);
        }
        Ok(match offset {
            spec::REG_CAP => state.cap() as u32,
            0x04 => (state.cap() >> 32) as u32,
            spec::REG_VS => 0x0001_0400,
            spec::REG_CC => state.cc,
            spec::REG_CSTS => state.csts,
            spec::REG_AQA => state.aqa,
            _ if offset < 0x2000 && offset.is_multiple_of(4) => 0,
            _ => return Err(NvmeError::ModelRegister { offset }),
        })
    }

    fn read64(&self, offset: u64) -> Result<u64, NvmeError> {
        let state = self.lock();
        if state.removed {
            return Ok(u64::MAX);
        }
        match offset {
            spec::REG_CAP => Ok(state.cap()),
            spec::REG_ASQ => Ok(state.asq),
            spec::REG_ACQ => Ok(state.acq),
            _ => Err(NvmeError::ModelRegister { offset }),
        }
    }

    fn write32(&self, offset: u64, value: u32) -> Result<(), NvmeError> {
        let mut state = self.lock();
        if state.removed {
            return Ok(());
        }
        match offset {
            spec::REG_CC => state.write_cc(value),
            spec::REG_AQA => state.aqa = value,
            _ if (spec::REG_DOORBELL_BASE..0x2000).contains(&offset) => {
                let stride = 4u64 << state.options.doorbell_stride_log2;
                let index = (offset - spec::REG_DOORBELL_BASE) / stride;
                let qid = (index / 2) as u16;
                if index.is_multiple_of(2) {
                    state.sq_doorbell(qid, value);
                } else {
                    state.cq_doorbell(qid, value);
                }
            }
            _ => return Err(NvmeError::ModelRegister { offset }),
        }
        Ok(())
    }

    fn write64(&self, offset: u64, value: u64) -> Result<(), NvmeError> {
        let mut state = self.lock();
        if state.removed {
            return Ok(());
        }
        match offset {
            spec::REG_ASQ => state.asq = value,
            spec::REG_ACQ => state.acq = value,
            _ => return Err(NvmeError::ModelRegister { offset }),
        }
        Ok(())
    }
}

type CommandResult = Result<u32, Status>;

fn invalid_field() -> Status {
    Status::generic(sc::INVALID_FIELD).with_dnr(true)
}

fn data_transfer_error() -> Status {
    Status::generic(sc::DATA_TRANSFER_ERROR)
}

fn command_specific(code: u8) -> Status {
    Status::new(StatusCodeType::CommandSpecific, code).with_dnr(true)
}

impl State {
    fn cap(&self) -> u64 {
        // MQES, CQR, TO = 1 (500 ms), DSTRD, CSS = NVM, MPSMIN = MPSMAX = 0 (4 KiB).
        u64::from(self.options.max_queue_entries.saturating_sub(1))
            | (1 << 16)
            | (1 << 24)
            | (u64::from(self.options.doorbell_stride_log2 & 0xf) << 32)
            | (1 << 37)
    }

    fn write_cc(&mut self, value: u32) {
        let was_enabled = self.cc & spec::CC_EN != 0;
        let was_shutting_down = self.cc & spec::CC_SHN_MASK != 0;
        let enable = value & spec::CC_EN != 0;
        self.cc = value;
        if enable && !was_enabled {
            let aqa = spec::Aqa::decode(self.aqa);
            self.sqs[0] = Some(Sq {
                base: self.asq,
                entries: aqa.sq_entries as u16,
                head: 0,
                tail: 0,
                cqid: 0,
            });
            self.cqs[0] = Some(Cq {
                base: self.acq,
                entries: aqa.cq_entries as u16,
                tail: 0,
                head: 0,
                phase: true,
            });
            self.stats.enables += 1;
            self.csts |= spec::CSTS_RDY;
        } else if !enable && was_enabled {
            self.controller_reset();
        }
        if value & spec::CC_SHN_MASK != 0 {
            if !was_shutting_down {
                self.stats.shutdowns += 1;
            }
            self.csts = (self.csts & !spec::CSTS_SHST_MASK) | spec::CSTS_SHST_COMPLETE;
        }
    }

    fn controller_reset(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.aer_cids.clear();
        self.dropped.clear();
        self.dbbuf = None;
        self.csts = 0;
    }

    fn stride(&self) -> u64 {
        4u64 << self.options.doorbell_stride_log2
    }

    /// Reads the 32-bit slot `index` (2 * qid for SQ tails, 2 * qid + 1 for CQ heads) of the
    /// shadow page (`event_idx` false) or the EventIdx page.
    fn shadow_read(&self, index: u64, event_idx: bool) -> Option<u32> {
        let (doorbells, events) = self.dbbuf?;
        let base = if event_idx { events } else { doorbells };
        let mut raw = [0u8; 4];
        self.mem_read(base + index * self.stride(), &mut raw).ok()?;
        Some(u32::from_le_bytes(raw))
    }

    fn shadow_write(&self, index: u64, event_idx: bool, value: u32) {
        let Some((doorbells, events)) = self.dbbuf else {
            return;
        };
        let base = if event_idx { events } else { doorbells };
        if self
            .mem_write(base + index * self.stride(), &value.to_le_bytes())
            .is_err()
        {
            tracing::debug!(index, "model: shadow slot outside DMA memory");
        }
    }

    /// Takes SQ `qid`'s tail from the shadow page (ignored when beyond the queue).
    fn refresh_sq_tail(&mut self, qid: u16) {
        let Some(value) = self.shadow_read(2 * u64::from(qid), false) else {
            return;
        };
        if let Some(Some(sq)) = self.sqs.get_mut(usize::from(qid)) {
            if value < u32::from(sq.entries) {
                sq.tail = value as u16;
            }
        }
    }

    /// Takes CQ `cqid`'s head from the shadow page and publishes it as the CQ's EventIdx.
    fn refresh_cq_head(&mut self, cqid: u16) {
        let index = 2 * u64::from(cqid) + 1;
        let Some(value) = self.shadow_read(index, false) else {
            return;
        };
        if let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) {
            if value < u32::from(cq.entries) {
                cq.head = value as u16;
            }
        }
        self.shadow_write(index, true, value);
    }

    fn doorbell_buffer_config(&mut self, command: &Command) -> CommandResult {
        if !self.options.shadow_doorbells {
            return Err(Status::generic(sc::INVALID_OPCODE).with_dnr(true));
        }
        let [doorbells, events] = command.dptr;
        if !doorbells.is_multiple_of(PAGE)
            || !events.is_multiple_of(PAGE)
            || self.check(doorbells, PAGE as usize).is_err()
            || self.check(events, PAGE as usize).is_err()
        {
            return Err(invalid_field());
        }
        self.dbbuf = Some((doorbells, events));
        self.stats.doorbell_buffer_configs += 1;
        // As QEMU: the queues that exist already publish their current state.
        for qid in 0..self.sqs.len() {
            if let Some(sq) = self.sqs[qid] {
                self.shadow_write(2 * qid as u64, false, u32::from(sq.tail));
            }
            if let Some(cq) = self.cqs[qid] {
                self.shadow_write(2 * qid as u64 + 1, false, u32::from(cq.head));
            }
        }
        Ok(0)
    }

    fn sq_doorbell(&mut self, qid: u16, value: u32) {
        self.stats.sq_doorbell_writes += 1;
        let Some(Some(sq)) = self.sqs.get_mut(usize::from(qid)) else {
            tracing::debug!(qid, "model: doorbell of a queue that does not exist");
            return;
        };
        if value >= u32::from(sq.entries) {
            tracing::debug!(qid, value, "model: SQ tail beyond the queue");
            return;
        }
        sq.tail = value as u16;
        if qid == 0 {
            self.shadow_write(0, false, value);
        }
        // The admin queue always runs at once: only I/O queues wait for `step`.
        if self.auto_execute || qid == 0 {
            self.process_sq(qid);
        }
    }

    fn cq_doorbell(&mut self, qid: u16, value: u32) {
        self.stats.cq_doorbell_writes += 1;
        let Some(Some(cq)) = self.cqs.get_mut(usize::from(qid)) else {
            return;
        };
        if value < u32::from(cq.entries) {
            cq.head = value as u16;
        }
        if qid == 0 {
            self.shadow_write(1, false, value);
        }
        if self.auto_execute || qid == 0 {
            // Room may have appeared for SQs stalled on this CQ.
            for sqid in 0..self.sqs.len() {
                if self.sqs[sqid].is_some_and(|sq| sq.cqid == qid && sq.head != sq.tail) {
                    self.process_sq(sqid as u16);
                }
            }
        }
    }

    fn cq_full(&self, cqid: u16) -> bool {
        match self.cqs.get(usize::from(cqid)) {
            Some(Some(cq)) => (cq.tail + 1) % cq.entries == cq.head,
            _ => true,
        }
    }

    fn process_sq(&mut self, qid: u16) {
        if self.csts & spec::CSTS_RDY == 0 || self.removed {
            return;
        }
        if self.dbbuf.is_some() {
            self.refresh_sq_tail(qid);
        }
        let mut budget = 1usize << 16;
        while budget > 0 {
            budget -= 1;
            let Some(Some(sq)) = self.sqs.get(usize::from(qid)).copied() else {
                return;
            };
            if sq.head == sq.tail && self.dbbuf.is_some() {
                // Out of entries: ask for a doorbell on the next write past what we saw, then
                // look again (the host may have written the shadow before seeing EventIdx).
                self.shadow_write(2 * u64::from(qid), true, u32::from(sq.tail));
                self.refresh_sq_tail(qid);
                if self.sqs[usize::from(qid)].is_some_and(|now| now.tail != sq.tail) {
                    continue;
                }
                return;
            }
            if self.dbbuf.is_some() {
                self.refresh_cq_head(sq.cqid);
            }
            if sq.head == sq.tail || self.cq_full(sq.cqid) {
                return;
            }
            let mut raw = [0u8; SQE_BYTES];
            let address = sq.base + u64::from(sq.head) * SQE_BYTES as u64;
            let new_head = (sq.head + 1) % sq.entries;
            if let Some(Some(sq)) = self.sqs.get_mut(usize::from(qid)) {
                sq.head = new_head;
            }
            if self.mem_read(address, &mut raw).is_err() {
                tracing::debug!(qid, "model: SQ entry outside DMA memory");
                continue;
            }
            let command = Command::decode(&raw);
            self.stats.commands += 1;
            let result = if qid == 0 {
                self.admin(&command)
            } else {
                self.stats.io_commands += 1;
                if self.drop_next > 0 {
                    self.drop_next -= 1;
                    let _ = self.io(&command);
                    self.dropped.push((qid, command.cid));
                    continue;
                }
                if self.fail_next > 0 {
                    self.fail_next -= 1;
                    Some(Err(self.fail_status))
                } else {
                    self.io(&command)
                }
            };
            let Some(result) = result else {
                continue; // AER: completes later
            };
            let (dw0, status) = match result {
                Ok(dw0) => (dw0, Status::SUCCESS),
                Err(status) => (0, status),
            };
            let completion = Completion {
                dw0,
                dw1: 0,
                sq_head: new_head,
                sq_id: qid,
                cid: command.cid,
                phase: false,
                status,
            };
            self.post(sq.cqid, completion);
        }
    }

    /// Posts `completion` on CQ `cqid` with the CQ's phase.
    fn post(&mut self, cqid: u16, mut completion: Completion) {
        let Some(Some(cq)) = self.cqs.get(usize::from(cqid)).copied() else {
            return;
        };
        completion.phase = cq.phase;
        let address = cq.base + u64::from(cq.tail) * CQE_BYTES as u64;
        if self.mem_write(address, &completion.encode()).is_err() {
            tracing::debug!(cqid, "model: CQ outside DMA memory");
            return;
        }
        if let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) {
            cq.tail += 1;
            if cq.tail == cq.entries {
                cq.tail = 0;
                cq.phase = !cq.phase;
            }
        }
    }

    fn deliver_events(&mut self) {
        while !self.events.is_empty() && !self.aer_cids.is_empty() && !self.cq_full(0) {
            let (Some(event), Some(cid)) = (self.events.pop_front(), self.aer_cids.pop()) else {
                return;
            };
            let sq_head = self.sqs[0].map_or(0, |sq| sq.head);
            self.post(
                0,
                Completion {
                    dw0: event.encode(),
                    dw1: 0,
                    sq_head,
                    sq_id: 0,
                    cid,
                    phase: false,
                    status: Status::SUCCESS,
                },
            );
        }
    }

    fn admin(&mut self, command: &Command) -> Option<CommandResult> {
        Some(match command.opcode {
            opc::IDENTIFY => self.identify(command),
            opc::SET_FEATURES => self.set_features(command),
            opc::GET_FEATURES => match (command.cdw10 & 0xff) as u8 {
                fid::VOLATILE_WRITE_CACHE => Ok(u32::from(self.vwc)),
                fid::NUMBER_OF_QUEUES => Ok(NumberOfQueues {
                    io_sqs: self.granted_queues,
                    io_cqs: self.granted_queues,
                }
                .encode()),
                _ => Err(invalid_field()),
            },
            opc::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(command),
            opc::CREATE_IO_CQ => self.create_cq(command),
            opc::CREATE_IO_SQ => self.create_sq(command),
            opc::DELETE_IO_SQ => {
                let qid = command.cdw10 as u16;
                match self.sqs.get_mut(usize::from(qid)) {
                    Some(slot @ Some(_)) if qid != 0 => {
                        *slot = None;
                        Ok(0)
                    }
                    _ => Err(command_specific(sc::INVALID_QUEUE_IDENTIFIER)),
                }
            }
            opc::DELETE_IO_CQ => {
                let qid = command.cdw10 as u16;
                if self.sqs.iter().flatten().any(|sq| sq.cqid == qid) {
                    Err(command_specific(sc::INVALID_QUEUE_DELETION))
                } else {
                    match self.cqs.get_mut(usize::from(qid)) {
                        Some(slot @ Some(_)) if qid != 0 => {
                            *slot = None;
                            Ok(0)
                        }
                        _ => Err(command_specific(sc::INVALID_QUEUE_IDENTIFIER)),
                    }
                }
            }
            opc::GET_LOG_PAGE => {
                let lid = command.cdw10 as u8;
                let numd = ((command.cdw10 >> 16) | (command.cdw11 << 16)) as usize + 1;
                let mut page = vec![0u8; numd * 4];
                match lid {
                    spec::lid::ERROR_INFORMATION => {}
                    spec::lid::SMART_HEALTH => {
                        if let Some(b) = page.get_mut(1..3) {
                            b.copy_from_slice(&300u16.to_le_bytes());
                        }
                        if let Some(b) = page.get_mut(3) {
                            *b = 100;
                        }
                    }
                    _ => return Some(Err(command_specific(sc::INVALID_LOG_PAGE))),
                }
                self.transfer_out(command, &page).map(|()| 0)
            }
            opc::ABORT => {
                self.stats.aborts += 1;
                // Commands run as soon as they are fetched, so none is ever abortable: DW0
                // bit 0 set says "not aborted" (a dropped one included).
                Ok(1)
            }
            opc::ASYNC_EVENT_REQUEST => {
                if self.aer_cids.len() >= 4 {
                    Err(command_specific(sc::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED))
                } else {
                    self.aer_cids.push(command.cid);
                    if !self.events.is_empty() {
                        // Deliver after this command's slot is consumed.
                        self.deliver_events();
                    }
                    return None;
                }
            }
            _ => Err(Status::generic(sc::INVALID_OPCODE).with_dnr(true)),
        })
    }

    fn identify(&mut self, command: &Command) -> CommandResult {
        let page = match (command.cdw10 & 0xff) as u8 {
            cns::CONTROLLER => {
                let mut id = IdentifyController::parse(&[0u8; IDENTIFY_BYTES]);
                id.vid = 0x1b36;
                id.ssvid = 0x1af4;
                id.serial = "POLLUXMODEL0001".into();
                id.model = "Pollux NVMe model".into();
                id.firmware = "1.0".into();
                id.mdts = self.options.mdts;
                id.version = 0x0001_0400;
                id.acl = 3;
                id.aerl = 3;
                id.elpe = 3;
                id.sqes = 0x66;
                id.cqes = 0x44;
                id.nn = self.namespaces.len() as u32;
                id.oncs = spec::ONCS_DSM | spec::ONCS_WRITE_ZEROES;
                id.vwc = 1;
                id.sgls = u32::from(self.options.sgl);
                if self.options.shadow_doorbells {
                    id.oacs |= spec::OACS_DOORBELL_BUFFER_CONFIG;
                }
                id.encode()
            }
            cns::NAMESPACE => {
                let Some(ns) = self.namespaces.get((command.nsid as usize).wrapping_sub(1)) else {
                    return Err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT).with_dnr(true));
                };
                let blocks = (ns.data.len() / ns.block_size as usize) as u64;
                IdentifyNamespace {
                    nsze: blocks,
                    ncap: blocks,
                    nuse: blocks,
                    nsfeat: 0,
                    lba_format_count: 1,
                    flbas: 0,
                    mc: 0,
                    dpc: 0,
                    dps: 0,
                    nguid: [0; 16],
                    eui64: [0; 8],
                    lba_formats: vec![LbaFormat {
                        metadata_bytes: 0,
                        lba_data_size_log2: ns.block_size.trailing_zeros() as u8,
                        relative_performance: 0,
                    }],
                }
                .encode()
            }
            cns::ACTIVE_NAMESPACE_LIST => {
                let mut page = [0u8; IDENTIFY_BYTES];
                for i in 0..self.namespaces.len().min(1024) {
                    let nsid = i as u32 + 1;
                    if nsid > command.nsid {
                        page[4 * i..4 * i + 4].copy_from_slice(&nsid.to_le_bytes());
                    }
                }
                page
            }
            _ => return Err(invalid_field()),
        };
        self.transfer_out(command, &page).map(|()| 0)
    }

    fn set_features(&mut self, command: &Command) -> CommandResult {
        match (command.cdw10 & 0xff) as u8 {
            fid::VOLATILE_WRITE_CACHE => {
                self.vwc = command.cdw11 & 1 != 0;
                Ok(0)
            }
            fid::NUMBER_OF_QUEUES => {
                let asked = NumberOfQueues::decode(command.cdw11);
                let granted = asked
                    .io_sqs
                    .min(asked.io_cqs)
                    .min(self.options.max_io_queues);
                self.granted_queues = granted;
                Ok(NumberOfQueues {
                    io_sqs: granted,
                    io_cqs: granted,
                }
                .encode())
            }
            _ => Err(invalid_field()),
        }
    }

    fn queue_args(&self, command: &Command) -> Result<(u16, u16), Status> {
        let qid = command.cdw10 as u16;
        let entries = (command.cdw10 >> 16) as u16;
        let entries = entries
            .checked_add(1)
            .ok_or(command_specific(sc::INVALID_QUEUE_SIZE))?;
        if qid == 0 || qid > self.granted_queues || usize::from(qid) >= self.sqs.len() {
            return Err(command_specific(sc::INVALID_QUEUE_IDENTIFIER));
        }
        if entries < 2 || entries > self.options.max_queue_entries {
            return Err(command_specific(sc::INVALID_QUEUE_SIZE));
        }
        if !command.dptr[0].is_multiple_of(PAGE) {
            return Err(Status::generic(sc::PRP_OFFSET_INVALID).with_dnr(true));
        }
        Ok((qid, entries))
    }

    fn create_cq(&mut self, command: &Command) -> CommandResult {
        let (qid, entries) = self.queue_args(command)?;
        if self.cqs[usize::from(qid)].is_some() {
            return Err(command_specific(sc::INVALID_QUEUE_IDENTIFIER));
        }
        self.cqs[usize::from(qid)] = Some(Cq {
            base: command.dptr[0],
            entries,
            tail: 0,
            head: 0,
            phase: true,
        });
        Ok(0)
    }

    fn create_sq(&mut self, command: &Command) -> CommandResult {
        let (qid, entries) = self.queue_args(command)?;
        let cqid = (command.cdw11 >> 16) as u16;
        if self.sqs[usize::from(qid)].is_some() {
            return Err(command_specific(sc::INVALID_QUEUE_IDENTIFIER));
        }
        if !matches!(self.cqs.get(usize::from(cqid)), Some(Some(_))) || cqid == 0 {
            return Err(command_specific(sc::COMPLETION_QUEUE_INVALID));
        }
        self.sqs[usize::from(qid)] = Some(Sq {
            base: command.dptr[0],
            entries,
            head: 0,
            tail: 0,
            cqid,
        });
        Ok(0)
    }

    fn io(&mut self, command: &Command) -> Option<CommandResult> {
        Some(self.io_inner(command))
    }

    fn io_inner(&mut self, command: &Command) -> CommandResult {
        let index = (command.nsid as usize).wrapping_sub(1);
        let Some(ns) = self.namespaces.get(index) else {
            return Err(Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT).with_dnr(true));
        };
        let block_size = ns.block_size as usize;
        let blocks = ns.data.len() / block_size;
        let slba = u64::from(command.cdw10) | (u64::from(command.cdw11) << 32);
        let nlb = (command.cdw12 & 0xffff) as usize + 1;
        let range = || -> Result<std::ops::Range<usize>, Status> {
            let start = usize::try_from(slba).map_err(|_| Status::generic(sc::LBA_OUT_OF_RANGE))?;
            match start.checked_add(nlb) {
                Some(end) if end <= blocks => Ok(start * block_size..end * block_size),
                _ => Err(Status::generic(sc::LBA_OUT_OF_RANGE).with_dnr(true)),
            }
        };
        match command.opcode {
            opc::READ => {
                let range = range()?;
                if !self.transfer_data {
                    return Ok(0);
                }
                let data = self.namespaces[index].data[range].to_vec();
                self.transfer_out(command, &data).map(|()| 0)
            }
            opc::WRITE => {
                let range = range()?;
                if !self.transfer_data {
                    return Ok(0);
                }
                let mut data = vec![0u8; range.len()];
                self.transfer_in(command, &mut data)?;
                self.namespaces[index].data[range].copy_from_slice(&data);
                Ok(0)
            }
            opc::FLUSH => Ok(0),
            opc::WRITE_ZEROES => {
                let range = range()?;
                self.namespaces[index].data[range].fill(0);
                Ok(0)
            }
            opc::DATASET_MANAGEMENT => {
                let count = (command.cdw10 & 0xff) as usize + 1;
                let mut ranges = vec![0u8; count * 16];
                self.mem_read(command.dptr[0], &mut ranges)
                    .map_err(|()| data_transfer_error())?;
                if command.cdw11 & (1 << 2) != 0 {
                    for r in ranges.chunks_exact(16) {
                        let len = spec::le32(r, 4) as usize;
                        let start = spec::le64(r, 8) as usize;
                        let ns = &mut self.namespaces[index];
                        let (Some(s), Some(e)) = (
                            start.checked_mul(block_size),
                            start
                                .checked_add(len)
                                .and_then(|e| e.checked_mul(block_size)),
                        ) else {
                            return Err(Status::generic(sc::LBA_OUT_OF_RANGE));
                        };
                        match ns.data.get_mut(s..e) {
                            Some(d) => d.fill(0),
                            None => return Err(Status::generic(sc::LBA_OUT_OF_RANGE)),
                        }
                    }
                }
                Ok(0)
            }
            _ => Err(Status::generic(sc::INVALID_OPCODE).with_dnr(true)),
        }
    }

    /// The (IOVA, length) segments a command's data pointer describes for `len` bytes.
    fn segments(&self, command: &Command, len: usize) -> Result<Vec<(u64, usize)>, Status> {
        let mut out = Vec::new();
        if command.psdt != Psdt::Prp {
            let descriptor = SglDescriptor::from_dptr(command.dptr);
            let descriptors = match descriptor.descriptor_type {
                SGL_TYPE_DATA_BLOCK => vec![descriptor],
                SGL_TYPE_LAST_SEGMENT => {
                    let count = descriptor.length as usize / SGL_DESCRIPTOR_BYTES;
                    if count == 0 || count > MAX_PRP_ENTRIES {
                        return Err(Status::generic(sc::INVALID_SGL_SEGMENT_DESCRIPTOR));
                    }
                    let mut list = vec![0u8; count * SGL_DESCRIPTOR_BYTES];
                    self.mem_read(descriptor.address, &mut list)
                        .map_err(|()| data_transfer_error())?;
                    let mut v = Vec::with_capacity(count);
                    for chunk in list.chunks_exact(SGL_DESCRIPTOR_BYTES) {
                        let mut b = [0u8; SGL_DESCRIPTOR_BYTES];
                        b.copy_from_slice(chunk);
                        let d = SglDescriptor::decode(&b);
                        if d.descriptor_type != SGL_TYPE_DATA_BLOCK {
                            return Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID));
                        }
                        v.push(d);
                    }
                    v
                }
                _ => return Err(Status::generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
            };
            let mut left = len;
            for d in descriptors {
                let n = (d.length as usize).min(left);
                if n > 0 {
                    out.push((d.address, n));
                }
                left -= n;
            }
            if left != 0 {
                return Err(Status::generic(0x0f)); // Data SGL Length Invalid
            }
            return Ok(out);
        }
        let prp1 = command.dptr[0];
        let first = len.min((PAGE - prp1 % PAGE) as usize);
        out.push((prp1, first));
        let mut left = len - first;
        if left == 0 {
            return Ok(out);
        }
        let prp2 = command.dptr[1];
        if left <= PAGE as usize {
            if !prp2.is_multiple_of(PAGE) {
                return Err(Status::generic(sc::PRP_OFFSET_INVALID));
            }
            out.push((prp2, left));
            return Ok(out);
        }
        let mut list = prp2;
        let mut walked = 0usize;
        while left > 0 {
            let slots = ((PAGE - list % PAGE) / 8) as usize;
            let mut chained = false;
            for i in 0..slots {
                walked += 1;
                if walked > MAX_PRP_ENTRIES {
                    return Err(data_transfer_error());
                }
                let mut raw = [0u8; 8];
                self.mem_read(list + 8 * i as u64, &mut raw)
                    .map_err(|()| data_transfer_error())?;
                let entry = u64::from_le_bytes(raw);
                if i == slots - 1 && left > PAGE as usize {
                    list = entry;
                    chained = true;
                    break;
                }
                if entry % PAGE != 0 {
                    return Err(Status::generic(sc::PRP_OFFSET_INVALID));
                }
                let n = left.min(PAGE as usize);
                out.push((entry, n));
                left -= n;
                if left == 0 {
                    break;
                }
            }
            if !chained && left > 0 {
                return Err(data_transfer_error());
            }
        }
        Ok(out)
    }

    /// Controller to host (read, identify, log page).
    fn transfer_out(&mut self, command: &Command, data: &[u8]) -> Result<(), Status> {
        let mut done = 0;
        for (iova, n) in self.segments(command, data.len())? {
            self.mem_write(iova, &data[done..done + n])
                .map_err(|()| data_transfer_error())?;
            done += n;
        }
        Ok(())
    }

    /// Host to controller (write).
    fn transfer_in(&self, command: &Command, data: &mut [u8]) -> Result<(), Status> {
        let mut done = 0;
        for (iova, n) in self.segments(command, data.len())? {
            self.mem_read(iova, &mut data[done..done + n])
                .map_err(|()| data_transfer_error())?;
            done += n;
        }
        Ok(())
    }

    /// Checks that `[iova, iova + len)` lies inside the reservation (IOVA == VA here).
    fn check(&self, iova: u64, len: usize) -> Result<(), ()> {
        let start = self.mem.vaddr();
        let end = start + self.mem.len_bytes() as u64;
        match iova.checked_add(len as u64) {
            Some(last) if iova >= start && last <= end => Ok(()),
            _ => Err(()),
        }
    }

    fn mem_read(&self, iova: u64, out: &mut [u8]) -> Result<(), ()> {
        self.check(iova, out.len())?;
        // SAFETY: `check` proved the range lies inside the DMA reservation, which `self.mem`
        // keeps mapped; with no mapper attached the IOVA is the virtual address. DMA memory is
        // never turned into a Rust reference (env accesses it only through raw pointers), so
        // this raw copy aliases no reference; `out` is ordinary memory, so no overlap.
        unsafe { std::ptr::copy_nonoverlapping(iova as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn mem_write(&self, iova: u64, data: &[u8]) -> Result<(), ()> {
        self.check(iova, data.len())?;
        // SAFETY: as in `mem_read`: inside the live reservation, never referenced by Rust
        // references, and `data` is ordinary memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), iova as *mut u8, data.len()) };
        Ok(())
    }
}
