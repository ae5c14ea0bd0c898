//! The bdevs of a remote controller (module `nvme`, as SPDK names them): one per namespace,
//! one NVMe/TCP I/O queue (its own TCP connection) per channel.
//!
//! A channel's commands are its bdev slots: the slot is the queue's tag, its request (type,
//! range, iovecs copied into a per-slot array sized at creation) is kept until it completes,
//! so that a connection lost with commands outstanding resubmits them whole on the next
//! connection. Slots wait in the channel (FIFO) while there is no connection, while the
//! queue is full (the remote SQ may be smaller than the channel) and after a loss; they fail
//! when the controller says I/O fails (fast_io_fail_timeout_sec, ctrlr_loss_timeout_sec,
//! detach).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_bdev::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use pollux_bdev::{BdevError, BdevInfo, IoStatus, IoType};
use pollux_env::iovec::IoVec;
use pollux_nvme::spec::{opc, Command, ONCS_DSM, ONCS_WRITE_ZEROES};

use super::ctrlr::{fabrics_connect, HostCtrlr, HostCtrlrState, NamespaceInfo};
use super::qpair::{DataDir, QpairOptions, Refused, TcpQpair};
use crate::NvmfError;

/// The module name bdevs report (SPDK's, for PCIe and fabrics alike).
pub const MODULE_NAME: &str = "nvme";
/// Iovecs of one I/O at most.
pub const MAX_IOVS_PER_IO: usize = 256;
/// Write Zeroes and Dataset Management carry a 16-bit 0's based block count here.
const MAX_NO_DATA_BLOCKS: u64 = 65536;
/// Dataset Management range descriptor (NVM 3.2.3, Figure 41).
const DSM_RANGE_BYTES: usize = 16;
/// After a failed channel connection, the next try waits at least this long.
const CHANNEL_RETRY: Duration = Duration::from_millis(100);

pub(crate) struct TcpBdev {
    pub ctrlr: Arc<HostCtrlr>,
    pub ns: NamespaceInfo,
    pub name: String,
    /// The first namespace's bdev writes the attach entry; the others an ignored one.
    pub writes_config: bool,
}

impl BdevBackend for TcpBdev {
    fn module_name(&self) -> &'static str {
        MODULE_NAME
    }

    fn supports(&self, io_type: IoType) -> bool {
        let id = &self.ctrlr.identity;
        match io_type {
            IoType::Read | IoType::Write => true,
            IoType::Flush => id.vwc,
            IoType::WriteZeroes => id.oncs & ONCS_WRITE_ZEROES != 0,
            IoType::Unmap => id.oncs & ONCS_DSM != 0,
            IoType::Reset => false,
        }
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let channel_error = |source: NvmfError| BdevError::ChannelCreate {
            module: MODULE_NAME,
            bdev: self.name.clone(),
            source: Box::new(source),
        };
        let qid = self.ctrlr.take_qid().ok_or_else(|| {
            channel_error(NvmfError::HostNoQueue {
                name: self.ctrlr.options.name.clone(),
                granted: self.ctrlr.identity.granted_queues,
            })
        })?;
        let depth = usize::from(queue_depth.max(1));
        let mut channel = TcpChannel {
            ctrlr: Arc::clone(&self.ctrlr),
            ns: self.ns,
            bdev_name: self.name.clone(),
            qid,
            queue_depth: queue_depth.max(1),
            qpair: None,
            generation: 0,
            reqs: (0..depth).map(|_| Req::new()).collect(),
            ranges: vec![[0u8; DSM_RANGE_BYTES]; depth].into_boxed_slice(),
            waiting: VecDeque::with_capacity(depth),
            requeue: Vec::with_capacity(depth),
            next_try: Instant::now(),
        };
        let snap = self.ctrlr.snapshot();
        if snap.state == HostCtrlrState::Connected {
            if let Err(error) = channel.connect(snap.generation, snap.cntlid) {
                if self.ctrlr.options.ctrlr_loss_timeout_sec == 0 {
                    return Err(channel_error(error));
                }
                // Reconnects are allowed: the channel starts without a connection and
                // its I/O waits for the next one.
                tracing::warn!(bdev = %self.name, error = %error, "nvmf host: channel connection failed, reconnecting");
                self.ctrlr.report_lost(snap.generation);
            }
        }
        Ok(Box::new(channel))
    }

    fn write_config(&self, _info: &BdevInfo) -> serde_json::Value {
        if self.writes_config {
            self.ctrlr.options.to_config()
        } else {
            serde_json::json!({ "method": "bdev_wait_for_examine" })
        }
    }
}

/// A bdev I/O kept for (re)submission.
struct Req {
    io_type: IoType,
    offset_blocks: u64,
    num_blocks: u64,
    iovs: Vec<IoVec>,
}

impl Req {
    fn new() -> Self {
        Self {
            io_type: IoType::Read,
            offset_blocks: 0,
            num_blocks: 0,
            iovs: Vec::with_capacity(MAX_IOVS_PER_IO),
        }
    }
}

struct TcpChannel {
    ctrlr: Arc<HostCtrlr>,
    ns: NamespaceInfo,
    bdev_name: String,
    qid: u16,
    queue_depth: u16,
    qpair: Option<TcpQpair>,
    /// The controller generation `qpair` was connected under.
    generation: u32,
    reqs: Vec<Req>,
    /// Per slot: an unmap's range descriptor (heap memory that never moves).
    ranges: Box<[[u8; DSM_RANGE_BYTES]]>,
    /// Slots waiting for a connection or a free queue slot, oldest first.
    waiting: VecDeque<u16>,
    /// Scratch for slots taken back from a lost connection.
    requeue: Vec<u16>,
    next_try: Instant,
}

impl TcpChannel {
    /// A new I/O queue to the controller (blocking, bounded by the connect timeout).
    fn connect(&mut self, generation: u32, cntlid: u16) -> Result<(), NvmfError> {
        let options = &self.ctrlr.options;
        let id = &self.ctrlr.identity;
        // SQSIZE is 0's based and the queue keeps one entry free: `sqsize` commands.
        let sqsize = self.queue_depth.min(id.mqes).max(1);
        let timeout = options.connect_timeout();
        let mut qpair = TcpQpair::connect(
            options.addr,
            timeout,
            QpairOptions {
                depth: sqsize,
                digests: options.digests,
                // The Connect's 1 KiB goes in-capsule like an admin queue's, as Linux does
                // it; I/O writes use IOCCSZ from then on.
                in_capsule_bytes: super::ctrlr::ADMIN_IN_CAPSULE_BYTES,
                max_data_bytes: id.max_data_bytes.max(4096),
                max_iovs: MAX_IOVS_PER_IO,
            },
        )?;
        qpair.wait_ready(timeout)?;
        fabrics_connect(&mut qpair, options, self.qid, sqsize, cntlid)?;
        qpair.set_in_capsule_bytes(id.in_capsule_bytes);
        tracing::debug!(bdev = %self.bdev_name, qid = self.qid, sqsize, generation, "nvmf host: I/O queue connected");
        self.qpair = Some(qpair);
        self.generation = generation;
        Ok(())
    }

    /// Sends slot `slot`'s request; hands the refusal back (the slot then waits).
    fn issue(&mut self, slot: u16) -> Result<(), Refused> {
        let Some(qpair) = self.qpair.as_mut() else {
            return Err(Refused::NotReady);
        };
        let req = &self.reqs[usize::from(slot)];
        let mut cmd = Command::new(opc::READ);
        cmd.nsid = self.ns.nsid;
        cmd.cdw10 = req.offset_blocks as u32;
        cmd.cdw11 = (req.offset_blocks >> 32) as u32;
        let nlb = (req.num_blocks.max(1) - 1) as u32;
        let range;
        let (dir, iovs): (DataDir, &[IoVec]) = match req.io_type {
            IoType::Read => {
                cmd.cdw12 = nlb;
                (DataDir::Read, &req.iovs)
            }
            IoType::Write => {
                cmd.opcode = opc::WRITE;
                cmd.cdw12 = nlb;
                (DataDir::Write, &req.iovs)
            }
            IoType::Flush => {
                cmd.opcode = opc::FLUSH;
                cmd.cdw10 = 0;
                cmd.cdw11 = 0;
                (DataDir::None, &[])
            }
            IoType::WriteZeroes => {
                cmd.opcode = opc::WRITE_ZEROES;
                cmd.cdw12 = nlb;
                (DataDir::None, &[])
            }
            IoType::Unmap => {
                cmd.opcode = opc::DATASET_MANAGEMENT;
                cmd.cdw10 = 0; // one range
                cmd.cdw11 = 1 << 2; // deallocate
                let buf = &mut self.ranges[usize::from(slot)];
                buf.fill(0);
                buf[4..8].copy_from_slice(&(req.num_blocks as u32).to_le_bytes());
                buf[8..16].copy_from_slice(&req.offset_blocks.to_le_bytes());
                // SAFETY: the range buffer is this slot's own heap memory, boxed for the
                // channel's life (it never moves), written only here, before the command
                // is queued, and not again until the slot's command completed or was
                // taken back (the slot is busy meanwhile).
                range = [unsafe { IoVec::new(buf.as_mut_ptr(), DSM_RANGE_BYTES) }];
                (DataDir::Write, &range)
            }
            IoType::Reset => return Err(Refused::TooLarge),
        };
        qpair.submit(cmd, u64::from(slot), dir, iovs).map(|_| ())
    }

    /// Submits waiting slots while the queue takes them; fails those it never can.
    fn start_waiting(&mut self, done: &mut CompletionQueue) {
        let mut budget = self.waiting.len();
        while budget > 0 {
            budget -= 1;
            let Some(&slot) = self.waiting.front() else {
                break;
            };
            match self.issue(slot) {
                Ok(()) => {
                    self.waiting.pop_front();
                }
                Err(Refused::Full | Refused::NotReady) => break,
                Err(refused) => {
                    self.waiting.pop_front();
                    tracing::warn!(bdev = %self.bdev_name, ?refused, "nvmf host: I/O refused by the queue");
                    done.complete(slot, IoStatus::Failed);
                }
            }
        }
    }

    /// Drops the connection, keeping its commands (they go first when one is back).
    fn drop_connection(&mut self, reason: &str) {
        let Some(mut qpair) = self.qpair.take() else {
            return;
        };
        qpair.fail(reason);
        self.requeue.clear();
        let requeue = &mut self.requeue;
        qpair.take_outstanding(|tag| requeue.push(tag as u16));
        // Slot order approximates submission order well enough for a retry.
        for &slot in self.requeue.iter().rev() {
            self.waiting.push_front(slot);
        }
    }

    fn fail_waiting(&mut self, done: &mut CompletionQueue) -> usize {
        let count = self.waiting.len();
        for slot in self.waiting.drain(..) {
            done.complete(slot, IoStatus::Failed);
        }
        count
    }
}

impl BackendChannel for TcpChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        let slot = io.slot;
        let Some(req) = self.reqs.get_mut(usize::from(slot)) else {
            done.complete(slot, IoStatus::Failed);
            return;
        };
        let no_data = matches!(io.io_type, IoType::WriteZeroes | IoType::Unmap);
        if io.iovs.len() > MAX_IOVS_PER_IO
            || (no_data && io.num_blocks > MAX_NO_DATA_BLOCKS)
            || u64::from(self.ns.block_size_bytes) * io.num_blocks
                > u64::from(self.ctrlr.identity.max_data_bytes)
                && matches!(io.io_type, IoType::Read | IoType::Write)
        {
            tracing::warn!(
                bdev = %self.bdev_name,
                blocks = io.num_blocks,
                iovs = io.iovs.len(),
                "nvmf host: I/O above the controller's maximum transfer or the iovec limit"
            );
            done.complete(slot, IoStatus::Failed);
            return;
        }
        req.io_type = io.io_type;
        req.offset_blocks = io.offset_blocks;
        req.num_blocks = io.num_blocks;
        req.iovs.clear();
        req.iovs.extend_from_slice(io.iovs);
        if self.ctrlr.state().fails_io() {
            done.complete(slot, IoStatus::Failed);
            return;
        }
        if self.waiting.is_empty() && self.issue(slot).is_ok() {
            return;
        }
        self.waiting.push_back(slot);
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        let snap = self.ctrlr.snapshot();
        let before = done.len();
        if let Some(qpair) = &self.qpair {
            let stale = snap.generation != self.generation;
            if qpair.is_failed() || stale || snap.state.fails_io() {
                if !stale && qpair.is_failed() {
                    self.ctrlr.report_lost(self.generation);
                }
                self.drop_connection("lost or stale");
            }
        }
        if self.qpair.is_none() {
            match snap.state {
                HostCtrlrState::Connected => {
                    let now = Instant::now();
                    if now >= self.next_try {
                        if let Err(error) = self.connect(snap.generation, snap.cntlid) {
                            tracing::warn!(bdev = %self.bdev_name, error = %error, "nvmf host: I/O queue reconnect failed");
                            self.next_try = now + CHANNEL_RETRY;
                            self.ctrlr.report_lost(snap.generation);
                        }
                    }
                }
                HostCtrlrState::Reconnecting => {}
                HostCtrlrState::FailIo | HostCtrlrState::Failed | HostCtrlrState::Detached => {
                    self.fail_waiting(done);
                }
            }
        }
        if !self.waiting.is_empty() && self.qpair.as_ref().is_some_and(TcpQpair::is_ready) {
            self.start_waiting(done);
        }
        if let Some(qpair) = self.qpair.as_mut() {
            let bdev_name = &self.bdev_name;
            qpair.poll(|tag, cqe| {
                let status = if cqe.status.is_success() {
                    IoStatus::Success
                } else {
                    tracing::debug!(bdev = %bdev_name, status = %cqe.status, "nvmf host: command failed");
                    IoStatus::Failed
                };
                done.complete(tag as u16, status);
            });
            if !self.waiting.is_empty() && qpair.is_ready() {
                self.start_waiting(done);
            }
        }
        done.len() - before
    }
}

impl Drop for TcpChannel {
    fn drop(&mut self) {
        // Nothing may touch the I/Os' buffers once we return: close the connection (its
        // outstanding commands are forgotten with it).
        if let Some(mut qpair) = self.qpair.take() {
            qpair.fail("channel closed");
            qpair.take_outstanding(|_| {});
        }
        self.ctrlr.put_qid(self.qid);
    }
}
