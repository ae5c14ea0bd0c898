//! The data path: one ublk queue, served by a poller on one reactor thread.
//!
//! The kernel requires every I/O command of a queue to come from the same task, so the
//! queue's io_uring is created on the reactor thread that polls it and only that thread
//! submits to it. Each tag cycles through:
//!
//! ```text
//!  FETCH_REQ ──CQE──> descriptor decoded ──> bdev I/O ──> COMMIT_AND_FETCH_REQ ──CQE──> ...
//!                            │ bad: -EINVAL / -EOPNOTSUPP ─────────^
//! ```
//!
//! # Where the copy happens
//!
//! Kernel-copy mode (the default): each tag's FETCH / COMMIT carries the address of the tag's
//! buffer in Pollux's DMA memory (`max_io_buf_bytes` per tag), and the bdev reads and writes
//! straight into it. The ublk driver copies a write request's pages into that buffer before
//! it completes the FETCH (in task work on this thread), and copies the buffer into a read
//! request's pages when the COMMIT arrives. So there is one memcpy per request, done by the
//! kernel, on the reactor's CPU.
//!
//! USER_COPY mode (`user_copy: true`, `UBLK_F_USER_COPY`): FETCH carries no buffer; the server
//! moves the data itself with io_uring reads and writes on `/dev/ublkcN` at
//! [`sys::user_copy_offset`] (a write's data is read into the tag's buffer before the bdev
//! write, a read's is written from it after the bdev read, before the COMMIT). Still one copy
//! per request, by the kernel on the server's behalf, plus one more ring round trip; it exists
//! to be measured against kernel-copy mode and as the basis for servers that place data
//! themselves.
//!
//! The upgrade path is zero copy (Linux 6.15+, `UBLK_F_SUPPORT_ZERO_COPY` with
//! `UBLK_U_IO_REGISTER_IO_BUF`): the request's pages are registered as an io_uring fixed
//! buffer, which an io_uring-based bdev (uring, aio files) could read and write directly;
//! bdevs that need DMA-able memory (NVMe over VFIO) still need a copy.
//!
//! # Costs per request
//!
//! No allocation, no lock: tag state sits in a slice indexed by tag, SQEs go straight into
//! the submission ring (at most one per tag is ever queued, so the ring sized to the queue
//! depth never overflows), completions are read from the shared completion ring without a
//! system call, and a poll enters the kernel once, only when it queued something.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use pollux_bdev::{BdevChannel, BdevDesc, IoCompletion, IoType, IoVec};
use pollux_env::dma::{DmaBuffer, DmaMemory};
use pollux_reactor::{PollStatus, PollerId, ThreadCtx};

use crate::error::UblkError;
use crate::params::{decode, BdevOp, Geometry};
use crate::sys::{self, IoCmd, IodArea, Pod};

/// CQEs handled per poll at most (STYLE #4); the rest wait for the next poll.
pub const MAX_CQES_PER_POLL: usize = 256;
/// After the app asked the thread to exit, how long a queue keeps serving while the target
/// stops its disk; after that it drops its ring (the kernel then quiesces the device).
const EXIT_GRACE: Duration = Duration::from_secs(10);

// What a CQE's user data says besides the tag (bits 16..).
const KIND_CMD: u64 = 0;
/// USER_COPY: a write's data read from the request into the tag's buffer.
const KIND_COPY_IN: u64 = 1;
/// USER_COPY: a read's data written from the tag's buffer into the request.
const KIND_COPY_OUT: u64 = 2;

/// What the control thread and the queue's poller share.
#[derive(Debug, Default)]
pub(crate) struct QueueShared {
    /// Stop without waiting for the kernel's aborts (STOP_DEV failed, start-up failed):
    /// the ring is dropped once no bdev I/O or copy is in flight.
    force_stop: AtomicBool,
    done: Mutex<bool>,
    done_cv: Condvar,
    /// Requests completed (committed), for `ublk_get_disks` and logs.
    pub requests: AtomicU64,
}

impl QueueShared {
    pub(crate) fn force_stop(&self) {
        self.force_stop.store(true, Ordering::Release);
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.done_cv.notify_all();
    }

    /// Waits until the queue has stopped and dropped its ring; false on timeout.
    pub(crate) fn wait_done(&self, timeout: Duration) -> bool {
        let guard = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .done_cv
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// What a reactor thread needs to build and run a queue (boxed into the start message).
pub(crate) struct QueueStart {
    pub dev_id: u32,
    pub q_id: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    pub user_copy: bool,
    pub geometry: Geometry,
    pub cdev: Arc<File>,
    pub desc: Arc<BdevDesc>,
    pub dma: Arc<DmaMemory>,
    pub shared: Arc<QueueShared>,
    pub started: SyncSender<Result<(), UblkError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    /// A FETCH or COMMIT_AND_FETCH is with the kernel.
    InKernel,
    /// The bdev has the request.
    InBdev,
    /// USER_COPY: a read or write on the char device is in flight.
    Copying,
    /// The kernel aborted the tag (or refused its command): it is never fetched again.
    Aborted,
}

#[derive(Debug, Clone, Copy)]
struct Tag {
    state: TagState,
    op: BdevOp,
}

/// The queue's state apart from its ring and bdev channel (so that completion callbacks can
/// borrow it while the channel hands them out).
struct Core {
    dev_id: u32,
    q_id: u16,
    user_copy: bool,
    max_io_bytes: u32,
    geometry: Geometry,
    cdev_fd: i32,
    iods: IodArea,
    tags: Box<[Tag]>,
    /// The tags' buffers, `max_io_bytes` each, tag order. Dropped after the ring (field
    /// order of [`Queue`]), so no command the kernel holds can point at freed memory.
    buffers: DmaBuffer,
    aborted: usize,
    busy: usize,
    shared: Arc<QueueShared>,
}

/// One ublk queue. Fields drop in order: the ring first (its commands cancelled), then the
/// channel, then the buffers and the descriptor mapping.
pub(crate) struct Queue {
    ring: IoUring,
    chan: BdevChannel,
    core: Core,
    _cdev: Arc<File>,
    _desc: Arc<BdevDesc>,
}

impl Queue {
    /// Builds the queue on the calling (reactor) thread and queues a FETCH for every tag.
    fn new(start: &QueueStart) -> Result<Self, UblkError> {
        let ring_err = |source| UblkError::QueueRing {
            dev_id: start.dev_id,
            q_id: start.q_id,
            source,
        };
        let entries = u32::from(start.depth).next_power_of_two();
        let ring = IoUring::new(entries).map_err(ring_err)?;
        let iods = IodArea::map(
            std::os::fd::AsFd::as_fd(&*start.cdev),
            start.dev_id,
            start.q_id,
            start.depth,
        )?;
        let buffers = start
            .dma
            .alloc(
                usize::from(start.depth) * start.max_io_bytes as usize,
                4096,
                None,
            )
            .map_err(|source| UblkError::Dma {
                ublk_id: start.dev_id,
                q_id: start.q_id,
                source: Box::new(source),
            })?;
        let chan = start
            .desc
            .channel(u32::from(start.depth))
            .map_err(|source| UblkError::Bdev {
                ublk_id: start.dev_id,
                bdev: start.desc.name().to_string(),
                source: Box::new(source),
            })?;
        let idle = Tag {
            state: TagState::InKernel,
            op: BdevOp {
                io_type: IoType::Read,
                offset_blocks: 0,
                num_blocks: 0,
                data_bytes: 0,
            },
        };
        let mut queue = Self {
            ring,
            chan,
            core: Core {
                dev_id: start.dev_id,
                q_id: start.q_id,
                user_copy: start.user_copy,
                max_io_bytes: start.max_io_bytes,
                geometry: start.geometry,
                cdev_fd: start.cdev.as_raw_fd(),
                iods,
                tags: vec![idle; usize::from(start.depth)].into_boxed_slice(),
                buffers,
                aborted: 0,
                busy: 0,
                shared: start.shared.clone(),
            },
            _cdev: start.cdev.clone(),
            _desc: start.desc.clone(),
        };
        {
            let (submitter, mut sq, _) = queue.ring.split();
            for tag in 0..start.depth {
                let sqe = queue.core.io_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0);
                queue.core.push(&mut sq, &sqe);
            }
            sq.sync();
            submitter.submit().map_err(ring_err)?;
        }
        Ok(queue)
    }

    /// One poll: kernel completions, bdev completions, then one submission of what they
    /// queued. Returns the work done.
    fn poll(&mut self) -> usize {
        let (submitter, mut sq, mut cq) = self.ring.split();
        let core = &mut self.core;
        let chan = &mut self.chan;
        let mut work = 0;
        cq.sync();
        for cqe in cq.by_ref().take(MAX_CQES_PER_POLL) {
            core.on_cqe(cqe.user_data(), cqe.result(), &mut sq, chan);
            work += 1;
        }
        work += chan.poll(|chan, done| core.on_bdev_done(done, &mut sq, chan));
        sq.sync();
        if !sq.is_empty() {
            loop {
                match submitter.submit() {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    // EAGAIN / EBUSY: the kernel is short of resources; the entries stay
                    // in the ring and go with the next poll's submit.
                    Err(e) => {
                        tracing::debug!(dev_id = core.dev_id, q_id = core.q_id, error = %e, "ublk: submit deferred");
                        break;
                    }
                }
            }
        }
        work
    }

    /// Every tag is aborted by the kernel, or a forced stop found nothing in flight.
    fn finished(&self, force: bool) -> bool {
        let core = &self.core;
        if core.aborted == core.tags.len() {
            return true;
        }
        force
            && core
                .tags
                .iter()
                .all(|t| matches!(t.state, TagState::InKernel | TagState::Aborted))
            && self.chan.outstanding() == 0
    }
}

impl Core {
    #[inline]
    fn buffer_addr(&self, tag: u16) -> u64 {
        self.buffers.vaddr() + u64::from(tag) * u64::from(self.max_io_bytes)
    }

    #[inline]
    fn io_cmd(&self, op: u32, tag: u16, result: i32) -> squeue::Entry {
        let cmd = IoCmd {
            q_id: self.q_id,
            tag,
            result,
            // USER_COPY takes no buffer address.
            addr: if self.user_copy {
                0
            } else {
                self.buffer_addr(tag)
            },
        };
        let mut area = [0u8; 16];
        area.copy_from_slice(cmd.as_bytes());
        opcode::UringCmd16::new(types::Fd(self.cdev_fd), op)
            .cmd(area)
            .build()
            .user_data(u64::from(tag) | (KIND_CMD << 16))
    }

    #[inline]
    fn push(&mut self, sq: &mut io_uring::SubmissionQueue<'_>, sqe: &squeue::Entry) {
        // SAFETY: every buffer an SQE of this queue names is the tag's slice of `buffers`,
        // which lives until after the ring is dropped (field order of `Queue`), and a tag has
        // one operation in flight at a time, so nothing else uses that slice meanwhile.
        if unsafe { sq.push(sqe) }.is_err() {
            // Cannot happen: the ring has a slot per tag and a tag queues one entry at a
            // time. Treat it as the kernel refusing the tag rather than spinning.
            tracing::error!(
                dev_id = self.dev_id,
                q_id = self.q_id,
                "ublk: submission ring full; tag dropped"
            );
            let tag = (sqe.get_user_data() & 0xffff) as usize;
            if let Some(t) = self.tags.get_mut(tag) {
                if t.state != TagState::Aborted {
                    t.state = TagState::Aborted;
                    self.aborted += 1;
                }
            }
        }
    }

    /// Commits `result` for `tag` and fetches its next request.
    #[inline]
    fn commit(&mut self, tag: u16, result: i32, sq: &mut io_uring::SubmissionQueue<'_>) {
        let sqe = self.io_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
        self.tags[usize::from(tag)].state = TagState::InKernel;
        self.busy = self.busy.saturating_sub(1);
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        self.push(sq, &sqe);
    }

    fn on_cqe(
        &mut self,
        user_data: u64,
        res: i32,
        sq: &mut io_uring::SubmissionQueue<'_>,
        chan: &mut BdevChannel,
    ) {
        let tag = (user_data & 0xffff) as u16;
        let kind = user_data >> 16;
        let Some(state) = self.tags.get(usize::from(tag)).map(|t| t.state) else {
            tracing::error!(
                dev_id = self.dev_id,
                q_id = self.q_id,
                user_data,
                "ublk: completion for a tag that does not exist"
            );
            return;
        };
        match kind {
            KIND_CMD if state == TagState::InKernel => {
                if res == sys::UBLK_IO_RES_OK {
                    self.busy += 1;
                    self.start_request(tag, sq, chan);
                } else {
                    if res != sys::UBLK_IO_RES_ABORT {
                        tracing::warn!(
                            dev_id = self.dev_id,
                            q_id = self.q_id,
                            tag,
                            res,
                            "ublk: the kernel refused a command; the tag stops"
                        );
                    }
                    self.tags[usize::from(tag)].state = TagState::Aborted;
                    self.aborted += 1;
                }
            }
            KIND_COPY_IN if state == TagState::Copying => {
                let op = self.tags[usize::from(tag)].op;
                if res == op.data_bytes as i32 {
                    self.submit_bdev(tag, op, sq, chan);
                } else {
                    tracing::warn!(
                        dev_id = self.dev_id,
                        q_id = self.q_id,
                        tag,
                        res,
                        "ublk: copying a write's data failed"
                    );
                    self.commit(tag, -libc::EIO, sq);
                }
            }
            KIND_COPY_OUT if state == TagState::Copying => {
                let op = self.tags[usize::from(tag)].op;
                let result = if res == op.data_bytes as i32 {
                    res
                } else {
                    tracing::warn!(
                        dev_id = self.dev_id,
                        q_id = self.q_id,
                        tag,
                        res,
                        "ublk: copying a read's data failed"
                    );
                    -libc::EIO
                };
                self.commit(tag, result, sq);
            }
            _ => {
                tracing::error!(
                    dev_id = self.dev_id,
                    q_id = self.q_id,
                    tag,
                    kind,
                    ?state,
                    res,
                    "ublk: completion in the wrong tag state; ignored"
                );
            }
        }
    }

    /// A FETCH completed: the tag's descriptor holds a new request.
    #[inline]
    fn start_request(
        &mut self,
        tag: u16,
        sq: &mut io_uring::SubmissionQueue<'_>,
        chan: &mut BdevChannel,
    ) {
        let decoded = match self.iods.read(tag) {
            Some(iod) => decode(&iod, &self.geometry),
            None => Err(-libc::EINVAL),
        };
        let op = match decoded {
            Ok(op) => op,
            Err(errno) => {
                tracing::debug!(
                    dev_id = self.dev_id,
                    q_id = self.q_id,
                    tag,
                    errno,
                    "ublk: request refused"
                );
                return self.commit(tag, errno, sq);
            }
        };
        self.tags[usize::from(tag)].op = op;
        if self.user_copy && op.io_type == IoType::Write {
            return self.queue_user_copy(tag, op, KIND_COPY_IN, sq);
        }
        self.submit_bdev(tag, op, sq, chan);
    }

    /// USER_COPY: moves a request's data between the kernel and the tag's buffer (a write's
    /// in with KIND_COPY_IN, a read's out with KIND_COPY_OUT) through the char device.
    #[inline]
    fn queue_user_copy(
        &mut self,
        tag: u16,
        op: BdevOp,
        kind: u64,
        sq: &mut io_uring::SubmissionQueue<'_>,
    ) {
        let fd = types::Fd(self.cdev_fd);
        let buf = self.buffer_addr(tag) as *mut u8;
        let offset = sys::user_copy_offset(self.q_id, tag);
        let sqe = if kind == KIND_COPY_IN {
            opcode::Read::new(fd, buf, op.data_bytes)
                .offset(offset)
                .build()
        } else {
            opcode::Write::new(fd, buf, op.data_bytes)
                .offset(offset)
                .build()
        };
        self.tags[usize::from(tag)].state = TagState::Copying;
        self.push(sq, &sqe.user_data(u64::from(tag) | (kind << 16)));
    }

    #[inline]
    fn submit_bdev(
        &mut self,
        tag: u16,
        op: BdevOp,
        sq: &mut io_uring::SubmissionQueue<'_>,
        chan: &mut BdevChannel,
    ) {
        let user_tag = u64::from(tag);
        let submitted = if op.io_type.carries_data() {
            match IoVec::from_dma_buffer(
                &self.buffers,
                usize::from(tag) * self.max_io_bytes as usize,
                op.data_bytes as usize,
            ) {
                Ok(iov) => chan.submit(
                    user_tag,
                    op.io_type,
                    op.offset_blocks,
                    op.num_blocks,
                    &[iov],
                ),
                Err(_) => return self.commit(tag, -libc::EINVAL, sq),
            }
        } else {
            chan.submit(user_tag, op.io_type, op.offset_blocks, op.num_blocks, &[])
        };
        match submitted {
            Ok(()) => self.tags[usize::from(tag)].state = TagState::InBdev,
            Err(error) => {
                // The channel has a slot per tag, so it is never full; anything else is a
                // failure of the request.
                tracing::warn!(dev_id = self.dev_id, q_id = self.q_id, tag, %error, "ublk: bdev submit failed");
                self.commit(tag, -libc::EIO, sq);
            }
        }
    }

    #[inline]
    fn on_bdev_done(
        &mut self,
        done: IoCompletion,
        sq: &mut io_uring::SubmissionQueue<'_>,
        _chan: &mut BdevChannel,
    ) {
        let Ok(tag) = u16::try_from(done.tag) else {
            return;
        };
        let Some(t) = self.tags.get(usize::from(tag)).copied() else {
            return;
        };
        if t.state != TagState::InBdev {
            tracing::error!(dev_id = self.dev_id, q_id = self.q_id, tag, state = ?t.state, "ublk: bdev completion for a tag not in the bdev");
            return;
        }
        if !done.status.is_success() {
            tracing::debug!(dev_id = self.dev_id, q_id = self.q_id, tag, status = %done.status, "ublk: bdev I/O failed");
            return self.commit(tag, -libc::EIO, sq);
        }
        let op = t.op;
        if self.user_copy && op.io_type == IoType::Read {
            return self.queue_user_copy(tag, op, KIND_COPY_OUT, sq);
        }
        let result = if op.io_type.carries_data() {
            op.data_bytes as i32
        } else {
            0
        };
        self.commit(tag, result, sq);
    }
}

/// Builds the queue on this reactor thread, reports the outcome to the control thread, and
/// polls it until every tag is aborted (STOP_DEV) or a forced stop finds it idle.
pub(crate) fn run_queue(ctx: &mut ThreadCtx, start: Box<QueueStart>) {
    let queue = match Queue::new(&start) {
        Ok(queue) => queue,
        Err(error) => {
            start.shared.finish();
            let _ = start.started.send(Err(error));
            return;
        }
    };
    let shared = start.shared.clone();
    let (dev_id, q_id) = (start.dev_id, start.q_id);
    let _ = start.started.send(Ok(()));
    drop(start);
    let own_id: Arc<OnceLock<PollerId>> = Arc::new(OnceLock::new());
    let id_in_poller = own_id.clone();
    let mut queue = Some(queue);
    let mut exiting_since: Option<Instant> = None;
    let name = format!("ublk{dev_id}_q{q_id}");
    let id = ctx.register_poller(&name, 0, move |ctx| {
        let Some(q) = queue.as_mut() else {
            return PollStatus::Idle;
        };
        let work = q.poll();
        let mut force = shared.force_stop.load(Ordering::Acquire);
        if ctx.is_exiting() {
            let since = *exiting_since.get_or_insert_with(Instant::now);
            force |= since.elapsed() >= EXIT_GRACE;
        }
        if q.finished(force) {
            tracing::debug!(
                dev_id,
                q_id,
                requests = shared.requests.load(Ordering::Relaxed),
                "ublk: queue stopped"
            );
            // Drop the ring (cancelling what the kernel still holds), the channel, the
            // buffers and the mapping, on this thread.
            queue = None;
            shared.finish();
            if let Some(id) = id_in_poller.get() {
                ctx.unregister_poller(*id);
            }
            return PollStatus::Busy;
        }
        PollStatus::from_busy(work > 0)
    });
    let _ = own_id.set(id);
}
