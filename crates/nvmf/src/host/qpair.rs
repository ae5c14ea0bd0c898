//! One NVMe/TCP queue seen from the host: a non-blocking socket polled by its owner, commands
//! in preallocated slots indexed by CID, the PDU state machine of the initiator side
//! (NVMe/TCP Transport 1.0, 3.3 and 3.6), built on the crate's codec ([`crate::pdu`]).
//!
//! - **Sending**: a command capsule carries a write's data in-capsule when it fits the
//!   queue's in-capsule size (IOCCSZ; 8 KiB on an admin queue), otherwise the write waits for
//!   an R2T and answers it with H2CData PDUs of at most MAXH2CDATA, one piece queued at a
//!   time. Queued PDUs (encoded headers in the slot, data straight from the caller's iovecs,
//!   digests) are gathered into one `sendmsg` (at most [`MAX_SENDS_PER_POLL`] per poll).
//! - **Receiving**: each step is one non-blocking `recv` of what the step needs (common
//!   header, rest of the header, padding, data, data digest), at most [`MAX_PDUS_PER_POLL`]
//!   PDUs and [`MAX_RX_BYTES_PER_POLL`] bytes per poll. C2HData goes straight into the read's
//!   iovecs: the kernel's copy out of its socket buffer is the only one.
//! - **Hostile controller**: a PDU the codec refuses, one out of sequence, a digest that does
//!   not match, C2HData for a CID that is not an outstanding read, out of order or beyond the
//!   command's length, an R2T outside the write, a response while the command's data is still
//!   being sent: the queue sends an H2CTermReq (FES / FEI from the error, the offending header
//!   as its data) and fails. Nothing is written outside the command's own iovecs, nothing
//!   panics. A failed queue hands its outstanding commands back to the owner
//!   ([`TcpQpair::take_outstanding`]), which retries them on a new connection or fails them.
//!
//! No allocation per command: the slots, their iovec arrays (`max_iovs` each) and the send
//! queue are sized at creation.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use pollux_env::iovec::IoVec;
use pollux_nvme::spec::{Command, Completion, Psdt, Status, StatusCodeType};

use crate::pdu::{
    check_data_digest, crc32c_append, decode_header, encode_header, parse_common_header,
    DataHeader, Digests, EncodeOptions, IcReq, Layout, Limits, Pdu, PduError, PduType, R2t,
    TermReq, CH_BYTES, DIGEST_BYTES, MAX_HEADER_BYTES, MAX_TERM_REQ_DATA_BYTES, PFV_1_0,
};
use crate::sys;
use crate::NvmfError;

/// PDUs received per poll at most.
pub const MAX_PDUS_PER_POLL: usize = 32;
/// Bytes received per poll at most.
pub const MAX_RX_BYTES_PER_POLL: usize = 1 << 20;
/// `sendmsg` calls per poll at most.
pub const MAX_SENDS_PER_POLL: usize = 8;
/// Pieces gathered into one `sendmsg`.
const GATHER_IOVS: usize = 64;
/// Chunk for digests over the caller's buffers (copied out, never referenced).
const DIGEST_CHUNK_BYTES: usize = 4096;
/// Polls a failing queue waits for its H2CTermReq to leave before it closes anyway.
const MAX_FAILING_POLLS: u32 = 1000;
/// MAXH2CDATA below this is refused (NVMe/TCP 1.0, Figure 27: at least 4 KiB).
const MIN_MAXH2CDATA: u32 = 4096;
/// SGL descriptor type bytes (NVMe Base 2.0, Figure 119): a data block with an offset
/// address (in-capsule data), a transport data block (data moved by R2T / C2HData).
const SGL_IN_CAPSULE: u64 = 0x01 << 56;
const SGL_TRANSPORT: u64 = 0x5a << 56;
/// How long a setup-path wait sleeps when the queue is idle.
const SETUP_IDLE_SLEEP: Duration = Duration::from_micros(20);

/// Which way a command's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Controller to host (C2HData).
    Read,
    /// Host to controller (in-capsule or H2CData).
    Write,
}

/// What a queue is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpairOptions {
    /// Commands outstanding at most (CIDs `0..depth`).
    pub depth: u16,
    /// Digests asked for in the ICReq.
    pub digests: Digests,
    /// Largest in-capsule write: the controller's IOCCSZ * 16 - 64 (8192 on admin queues).
    pub in_capsule_bytes: u32,
    /// Largest data of one command.
    pub max_data_bytes: u32,
    /// Iovecs of one command at most.
    pub max_iovs: usize,
}

/// Why a command was not taken (nothing was queued; the caller keeps its buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is outstanding: retry after a completion.
    Full,
    /// The connection is not (or no longer) ready.
    NotReady,
    /// More iovecs than `max_iovs`, or lengths that overflow.
    TooManyIovs,
    /// More data than `max_data_bytes`.
    TooLarge,
}

/// The connection's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpairState {
    /// ICReq sent, waiting for the ICResp.
    IcWait,
    Ready,
    /// A fatal error: an H2CTermReq is being sent, nothing is received.
    Failing,
    /// Closed: nothing is sent or received any more.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Active,
}

/// One command in flight, indexed by its CID.
struct Slot {
    state: SlotState,
    tag: u64,
    dir: DataDir,
    len: u32,
    iovs: Vec<IoVec>,
    in_capsule: bool,
    /// Read: C2HData bytes received so far (in order).
    received: u32,
    /// Write through R2T: data sent so far, the end of the active R2T, its tag.
    h2c_next: u32,
    h2c_end: u32,
    ttag: u16,
    r2t_active: bool,
    /// Send-queue entries of this slot not yet sent (it completes only with none left).
    tx_pending: u8,
    cmd_hdr: [u8; MAX_HEADER_BYTES],
    cmd_hdr_len: usize,
    cmd_ddgst: [u8; DIGEST_BYTES],
    data_hdr: [u8; MAX_HEADER_BYTES],
    data_hdr_len: usize,
    data_ddgst: [u8; DIGEST_BYTES],
}

impl Slot {
    fn new(max_iovs: usize) -> Self {
        Self {
            state: SlotState::Free,
            tag: 0,
            dir: DataDir::None,
            len: 0,
            iovs: Vec::with_capacity(max_iovs),
            in_capsule: false,
            received: 0,
            h2c_next: 0,
            h2c_end: 0,
            ttag: 0,
            r2t_active: false,
            tx_pending: 0,
            cmd_hdr: [0; MAX_HEADER_BYTES],
            cmd_hdr_len: 0,
            cmd_ddgst: [0; DIGEST_BYTES],
            data_hdr: [0; MAX_HEADER_BYTES],
            data_hdr_len: 0,
            data_ddgst: [0; DIGEST_BYTES],
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum TxKind {
    IcReq,
    TermReq,
    Capsule { cid: u16 },
    H2cData { cid: u16, offset: u32, len: u32 },
}

#[derive(Debug, Clone, Copy)]
struct TxEntry {
    kind: TxKind,
    total: usize,
    sent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStep {
    Ch,
    Header,
    Pad,
    Data,
    Ddgst,
}

#[derive(Debug, Clone, Copy)]
enum Dest {
    /// No data segment.
    None,
    /// C2HData into slot `cid`'s iovecs at `offset`.
    Slot { cid: u16, offset: u32 },
    /// A termination request's error data (read and logged).
    Term,
}

struct Rx {
    step: RxStep,
    header: [u8; MAX_HEADER_BYTES + DIGEST_BYTES],
    got: usize,
    layout: Option<Layout>,
    pdu: Option<Pdu>,
    dest: Dest,
    ddgst: [u8; DIGEST_BYTES],
    term_data: [u8; MAX_TERM_REQ_DATA_BYTES],
}

enum Stop {
    Blocked,
    Closed,
    Io(io::Error),
    Fatal(PduError),
}

/// Where data bytes lie in a slot's iovecs: the iovec holding byte `offset` and the offset
/// inside it (`None` when `offset` is at or past the end).
fn locate(iovs: &[IoVec], mut offset: usize) -> Option<(usize, usize)> {
    for (index, iov) in iovs.iter().enumerate() {
        if offset < iov.len_bytes() {
            return Some((index, offset));
        }
        offset -= iov.len_bytes();
    }
    None
}

/// CRC32C of `len` bytes of `iovs` from `offset`, copied out in chunks.
fn iovs_crc32c(iovs: &[IoVec], offset: usize, len: usize) -> u32 {
    let mut chunk = [0u8; DIGEST_CHUNK_BYTES];
    let mut crc = 0u32;
    let mut done = 0;
    while done < len {
        let Some((index, inner)) = locate(iovs, offset + done) else {
            break;
        };
        let iov = &iovs[index];
        let n = (len - done)
            .min(iov.len_bytes() - inner)
            .min(DIGEST_CHUNK_BYTES);
        if !sys::read_iovec(iov, inner, &mut chunk[..n]) {
            break;
        }
        crc = crc32c_append(crc, &chunk[..n]);
        done += n;
    }
    crc
}

/// Builds the iovec array of one `sendmsg`, skipping what an earlier call already sent.
struct Gather {
    iovs: [libc::iovec; GATHER_IOVS],
    count: usize,
    skip: usize,
}

impl Gather {
    fn new(skip: usize) -> Self {
        Self {
            iovs: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; GATHER_IOVS],
            count: 0,
            skip,
        }
    }

    /// Adds `len` bytes at `ptr`; `false` when the array is full.
    fn push(&mut self, ptr: *const u8, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        if self.skip >= len {
            self.skip -= len;
            return true;
        }
        if self.count == GATHER_IOVS {
            return false;
        }
        let start = self.skip;
        self.skip = 0;
        self.iovs[self.count] = libc::iovec {
            iov_base: ptr.wrapping_add(start) as *mut libc::c_void,
            iov_len: len - start,
        };
        self.count += 1;
        true
    }

    /// Adds bytes `offset..offset + len` of `iovs`.
    fn push_iovs(&mut self, iovs: &[IoVec], offset: usize, len: usize) -> bool {
        let mut done = 0;
        while done < len {
            let Some((index, inner)) = locate(iovs, offset + done) else {
                return true;
            };
            let iov = &iovs[index];
            let n = (len - done).min(iov.len_bytes() - inner);
            if !self.push(iov.as_mut_ptr().wrapping_add(inner), n) {
                return false;
            }
            done += n;
        }
        true
    }
}

/// One NVMe/TCP queue of the initiator. See the module documentation.
pub struct TcpQpair {
    fd: OwnedFd,
    peer: Option<SocketAddr>,
    state: QpairState,
    options: QpairOptions,
    /// What we accept from the controller.
    limits: Limits,
    /// How we send (digests, the controller's CPDA).
    encode: EncodeOptions,
    maxh2cdata: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    rx: Rx,
    tx: VecDeque<TxEntry>,
    ic_buf: [u8; MAX_HEADER_BYTES],
    term_buf: [u8; MAX_HEADER_BYTES + MAX_TERM_REQ_DATA_BYTES],
    failing_polls: u32,
    /// Completions of this poll, handed out at its end (capacity `depth`).
    done: Vec<(u64, Completion)>,
}

impl std::fmt::Debug for TcpQpair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpQpair")
            .field("peer", &self.peer)
            .field("state", &self.state)
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl TcpQpair {
    /// Connects to `addr` (blocking, at most `timeout`) and queues the ICReq; the ICResp is
    /// taken by a later [`poll`](Self::poll) ([`wait_ready`](Self::wait_ready) on the setup
    /// path).
    pub fn connect(
        addr: SocketAddr,
        timeout: Duration,
        options: QpairOptions,
    ) -> Result<Self, NvmfError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| NvmfError::HostConnect { addr, source })?;
        // Small PDUs (a 4 KiB read's capsule) go out at once; batching is ours (one sendmsg
        // per poll), not Nagle's.
        stream
            .set_nodelay(true)
            .map_err(|source| NvmfError::HostConnect { addr, source })?;
        let mut qpair = Self::from_fd(OwnedFd::from(stream), options);
        qpair.peer = Some(addr);
        Ok(qpair)
    }

    /// A queue over an already connected stream socket (tests and the fuzz target use a
    /// socket pair); queues the ICReq.
    pub fn from_fd(fd: OwnedFd, options: QpairOptions) -> Self {
        let depth = options.depth.max(1);
        let options = QpairOptions { depth, ..options };
        let mut qpair = Self {
            fd,
            peer: None,
            state: QpairState::IcWait,
            options,
            limits: Limits::INITIAL,
            encode: EncodeOptions::default(),
            maxh2cdata: 0,
            slots: (0..depth).map(|_| Slot::new(options.max_iovs)).collect(),
            free: (0..depth).rev().collect(),
            rx: Rx {
                step: RxStep::Ch,
                header: [0; MAX_HEADER_BYTES + DIGEST_BYTES],
                got: 0,
                layout: None,
                pdu: None,
                dest: Dest::None,
                ddgst: [0; DIGEST_BYTES],
                term_data: [0; MAX_TERM_REQ_DATA_BYTES],
            },
            tx: VecDeque::with_capacity(usize::from(depth) + 4),
            ic_buf: [0; MAX_HEADER_BYTES],
            term_buf: [0; MAX_HEADER_BYTES + MAX_TERM_REQ_DATA_BYTES],
            failing_polls: 0,
            done: Vec::with_capacity(usize::from(depth)),
        };
        let ic = Pdu::IcReq(IcReq {
            pfv: PFV_1_0,
            hpda: 0,
            digests: options.digests,
            // 0's based: one R2T outstanding per command.
            maxr2t: 0,
        });
        match encode_header(&ic, 0, &EncodeOptions::default(), &mut qpair.ic_buf) {
            Ok(len) => qpair.tx.push_back(TxEntry {
                kind: TxKind::IcReq,
                total: len,
                sent: 0,
            }),
            Err(error) => {
                tracing::error!(%error, "nvmf host: ICReq encoding");
                qpair.state = QpairState::Failed;
            }
        }
        qpair
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn state(&self) -> QpairState {
        self.state
    }

    pub fn is_ready(&self) -> bool {
        self.state == QpairState::Ready
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.state, QpairState::Failing | QpairState::Failed)
    }

    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        usize::from(self.options.depth) - self.free.len()
    }

    /// Slots (commands outstanding at most).
    pub fn depth(&self) -> u16 {
        self.options.depth
    }

    /// MAXH2CDATA the controller gave (0 before the ICResp).
    pub fn maxh2cdata(&self) -> u32 {
        self.maxh2cdata
    }

    /// The in-capsule limit (set from Identify Controller's IOCCSZ for I/O queues).
    pub fn set_in_capsule_bytes(&mut self, bytes: u32) {
        self.options.in_capsule_bytes = bytes;
    }

    /// Closes the connection now (the owner gave up on it: a timeout, a reset). The
    /// outstanding commands stay for [`take_outstanding`](Self::take_outstanding).
    pub fn fail(&mut self, reason: &str) {
        if self.state != QpairState::Failed {
            tracing::debug!(peer = ?self.peer, reason, "nvmf host: connection closed");
        }
        self.close();
    }

    fn close(&mut self) {
        self.tx.clear();
        self.state = QpairState::Failed;
        // The peer sees the close now, not when the queue is dropped.
        let _ = sys::shutdown(self.raw_fd());
    }

    /// Hands back the tag of every outstanding command and frees its slot. Only on a failed
    /// queue (nothing can touch their buffers any more); returns how many.
    pub fn take_outstanding<F: FnMut(u64)>(&mut self, mut f: F) -> usize {
        if !self.is_failed() {
            return 0;
        }
        // A failing queue sends only its termination request (its own buffer).
        self.tx.retain(|e| matches!(e.kind, TxKind::TermReq));
        let mut count = 0;
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if slot.state == SlotState::Active {
                slot.state = SlotState::Free;
                slot.iovs.clear();
                slot.tx_pending = 0;
                self.free.push(cid as u16);
                f(slot.tag);
                count += 1;
            }
        }
        count
    }

    /// Queues one command. Its data (`iovs`, adding up to the command's length) stays the
    /// caller's to keep valid until the command's completion is handed back by
    /// [`poll`](Self::poll) or its tag by [`take_outstanding`](Self::take_outstanding).
    /// The CID, PSDT and data pointer (an SGL) are set here; returns the CID.
    pub fn submit(
        &mut self,
        mut cmd: Command,
        tag: u64,
        dir: DataDir,
        iovs: &[IoVec],
    ) -> Result<u16, Refused> {
        if self.state != QpairState::Ready {
            return Err(Refused::NotReady);
        }
        if iovs.len() > self.options.max_iovs {
            return Err(Refused::TooManyIovs);
        }
        let mut len = 0usize;
        for iov in iovs {
            len = len
                .checked_add(iov.len_bytes())
                .ok_or(Refused::TooManyIovs)?;
        }
        let len = u32::try_from(len)
            .ok()
            .filter(|&n| n <= self.options.max_data_bytes)
            .ok_or(Refused::TooLarge)?;
        let dir = if len == 0 { DataDir::None } else { dir };
        let Some(cid) = self.free.pop() else {
            return Err(Refused::Full);
        };
        let in_capsule = dir == DataDir::Write && len <= self.options.in_capsule_bytes;
        cmd.cid = cid;
        cmd.psdt = Psdt::SglMptrAddress;
        cmd.dptr = if in_capsule {
            [0, u64::from(len) | SGL_IN_CAPSULE]
        } else {
            [0, u64::from(len) | SGL_TRANSPORT]
        };
        let encode = self.encode;
        let slot = &mut self.slots[usize::from(cid)];
        slot.iovs.clear();
        slot.iovs.extend_from_slice(iovs);
        let capsule_data = if in_capsule { len as usize } else { 0 };
        let hdr_len = match encode_header(
            &Pdu::CapsuleCmd(cmd),
            capsule_data,
            &encode,
            &mut slot.cmd_hdr,
        ) {
            Ok(n) => n,
            Err(error) => {
                tracing::error!(%error, "nvmf host: capsule encoding");
                slot.iovs.clear();
                self.free.push(cid);
                return Err(Refused::TooLarge);
            }
        };
        let ddgst = encode.digests.data && capsule_data > 0;
        if ddgst {
            slot.cmd_ddgst = iovs_crc32c(&slot.iovs, 0, capsule_data).to_le_bytes();
        }
        slot.state = SlotState::Active;
        slot.tag = tag;
        slot.dir = dir;
        slot.len = len;
        slot.in_capsule = in_capsule;
        slot.received = 0;
        slot.h2c_next = 0;
        slot.h2c_end = 0;
        slot.r2t_active = false;
        slot.tx_pending = 1;
        slot.cmd_hdr_len = hdr_len;
        self.tx.push_back(TxEntry {
            kind: TxKind::Capsule { cid },
            total: hdr_len + capsule_data + if ddgst { DIGEST_BYTES } else { 0 },
            sent: 0,
        });
        Ok(cid)
    }

    /// Sends what is queued, receives what arrived, and hands each completed command's tag
    /// and completion to `on_complete`. Returns the units of work done (0: idle).
    pub fn poll<F: FnMut(u64, &Completion)>(&mut self, mut on_complete: F) -> usize {
        let mut work = 0;
        match self.state {
            QpairState::Failed => return 0,
            QpairState::Failing => {
                work += self.poll_tx();
                self.failing_polls += 1;
                if self.tx.is_empty() || self.failing_polls >= MAX_FAILING_POLLS {
                    self.close();
                }
                return work;
            }
            QpairState::IcWait | QpairState::Ready => {}
        }
        work += self.poll_tx();
        work += self.poll_rx();
        if !self.tx.is_empty() && !self.is_failed() {
            // R2Ts just received: start their data now rather than at the next poll.
            work += self.poll_tx();
        }
        for (tag, cqe) in self.done.drain(..) {
            on_complete(tag, &cqe);
        }
        work
    }

    // ----------------------------------------------------------------------------------
    // Setup path (admin commands, Connect): synchronous, with deadlines.

    /// Polls until the ICResp came (or `timeout`).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), NvmfError> {
        let deadline = Instant::now() + timeout;
        loop {
            let work = self.poll(|_, _| {});
            match self.state {
                QpairState::Ready => return Ok(()),
                QpairState::Failing | QpairState::Failed => {
                    return Err(NvmfError::HostConnection {
                        addr: self.peer_addr(),
                        what: "the ICReq / ICResp exchange",
                    })
                }
                QpairState::IcWait => {}
            }
            if Instant::now() >= deadline {
                self.fail("ICResp timeout");
                return Err(NvmfError::HostTimeout {
                    addr: self.peer_addr(),
                    what: "ICResp",
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            if work == 0 {
                std::thread::sleep(SETUP_IDLE_SLEEP);
            }
        }
    }

    /// Runs one command to completion (setup path): `data` is written (`DataDir::Write`)
    /// or read into (`DataDir::Read`). Completions of other commands (tags other than
    /// `u64::MAX`) go to `others`. On a timeout the queue is failed, so nothing touches
    /// `data` after this returns.
    pub fn execute(
        &mut self,
        cmd: Command,
        dir: DataDir,
        data: &mut [u8],
        timeout: Duration,
        what: &'static str,
        mut others: impl FnMut(u64, &Completion),
    ) -> Result<Completion, NvmfError> {
        const TAG: u64 = u64::MAX;
        let iov = if data.is_empty() {
            None
        } else {
            // SAFETY: `data` is exclusively borrowed for this whole call, and the command
            // using it completes inside the call or the queue is failed and its slot taken
            // back before the call returns (below), after which nothing reads or writes
            // through this iovec.
            Some(unsafe { IoVec::new(data.as_mut_ptr(), data.len()) })
        };
        let iovs = iov.as_slice();
        let addr = self.peer_addr();
        self.submit(cmd, TAG, dir, iovs)
            .map_err(|refused| NvmfError::HostController {
                addr,
                reason: format!("{what}: the queue refused the command ({refused:?})"),
            })?;
        let deadline = Instant::now() + timeout;
        let mut result = None;
        loop {
            let work = self.poll(|tag, cqe| {
                if tag == TAG {
                    result = Some(*cqe);
                } else {
                    others(tag, cqe);
                }
            });
            if let Some(cqe) = result {
                return Ok(cqe);
            }
            if self.is_failed() {
                self.drop_setup_command(TAG, &mut others);
                return Err(NvmfError::HostConnection { addr, what });
            }
            if Instant::now() >= deadline {
                self.fail(what);
                self.drop_setup_command(TAG, &mut others);
                return Err(NvmfError::HostTimeout {
                    addr,
                    what,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            if work == 0 {
                std::thread::sleep(SETUP_IDLE_SLEEP);
            }
        }
    }

    /// After a failed setup command: every outstanding command is taken back (the setup
    /// command's buffer is released; the others are reported failed to `others`).
    fn drop_setup_command(&mut self, setup_tag: u64, others: &mut impl FnMut(u64, &Completion)) {
        let mut tags = Vec::new();
        self.take_outstanding(|tag| tags.push(tag));
        let aborted = Completion {
            dw0: 0,
            dw1: 0,
            sq_head: 0,
            sq_id: 0,
            cid: 0,
            phase: false,
            status: Status::new(
                StatusCodeType::Path,
                pollux_nvme::spec::sc::ABORTED_SQ_DELETION,
            ),
        };
        for tag in tags.into_iter().filter(|&t| t != setup_tag) {
            others(tag, &aborted);
        }
    }

    fn peer_addr(&self) -> SocketAddr {
        self.peer
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    // ----------------------------------------------------------------------------------
    // Sending

    fn poll_tx(&mut self) -> usize {
        let mut sends = 0;
        while !self.tx.is_empty() && sends < MAX_SENDS_PER_POLL && !self.is_closed() {
            let mut gather = Gather::new(self.tx.front().map_or(0, |e| e.sent));
            for entry in &self.tx {
                if !self.gather_entry(entry, &mut gather) {
                    break;
                }
            }
            // SAFETY: every gathered piece points into this queue's own buffers (ic_buf,
            // term_buf, a slot's headers and digests), borrowed for the call, or into an
            // active slot's iovecs, which the submitter keeps valid until the command
            // completes (`submit`'s contract) - and a slot completes only once its send
            // entries are gone from `tx`.
            let result = unsafe { sys::send_iovecs(self.raw_fd(), &gather.iovs[..gather.count]) };
            match result {
                Ok(n) => {
                    sends += 1;
                    self.advance_tx(n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break
                }
                Err(error) => {
                    tracing::debug!(peer = ?self.peer, %error, "nvmf host: send failed");
                    self.close();
                    break;
                }
            }
        }
        sends
    }

    fn is_closed(&self) -> bool {
        self.state == QpairState::Failed
    }

    /// Adds one entry's pieces; `false` when the gather array filled up.
    fn gather_entry(&self, entry: &TxEntry, gather: &mut Gather) -> bool {
        match entry.kind {
            TxKind::IcReq => gather.push(self.ic_buf.as_ptr(), entry.total),
            TxKind::TermReq => gather.push(self.term_buf.as_ptr(), entry.total),
            TxKind::Capsule { cid } => {
                let slot = &self.slots[usize::from(cid)];
                let data = if slot.in_capsule {
                    slot.len as usize
                } else {
                    0
                };
                let ddgst = entry.total - slot.cmd_hdr_len - data;
                gather.push(slot.cmd_hdr.as_ptr(), slot.cmd_hdr_len)
                    && gather.push_iovs(&slot.iovs, 0, data)
                    && gather.push(slot.cmd_ddgst.as_ptr(), ddgst)
            }
            TxKind::H2cData { cid, offset, len } => {
                let slot = &self.slots[usize::from(cid)];
                let ddgst = entry.total - slot.data_hdr_len - len as usize;
                gather.push(slot.data_hdr.as_ptr(), slot.data_hdr_len)
                    && gather.push_iovs(&slot.iovs, offset as usize, len as usize)
                    && gather.push(slot.data_ddgst.as_ptr(), ddgst)
            }
        }
    }

    fn advance_tx(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.tx.front_mut() else {
                return;
            };
            let left = front.total - front.sent;
            if n < left {
                front.sent += n;
                return;
            }
            n -= left;
            let kind = front.kind;
            self.tx.pop_front();
            self.entry_sent(kind);
        }
    }

    fn entry_sent(&mut self, kind: TxKind) {
        match kind {
            TxKind::IcReq => {}
            TxKind::TermReq => self.close(),
            TxKind::Capsule { cid } => {
                let slot = &mut self.slots[usize::from(cid)];
                slot.tx_pending = slot.tx_pending.saturating_sub(1);
            }
            TxKind::H2cData { cid, len, .. } => {
                let slot = &mut self.slots[usize::from(cid)];
                slot.tx_pending = slot.tx_pending.saturating_sub(1);
                slot.h2c_next += len;
                if slot.h2c_next < slot.h2c_end {
                    self.queue_h2c(cid);
                } else {
                    slot.r2t_active = false;
                }
            }
        }
    }

    /// Queues the next H2CData piece of slot `cid`'s active R2T.
    fn queue_h2c(&mut self, cid: u16) {
        let encode = self.encode;
        let maxh2cdata = self.maxh2cdata;
        let slot = &mut self.slots[usize::from(cid)];
        let offset = slot.h2c_next;
        let len = (slot.h2c_end - offset).min(maxh2cdata);
        let header = DataHeader {
            cccid: cid,
            ttag: slot.ttag,
            datao: offset,
            datal: len,
            last: offset + len == slot.h2c_end,
            success: false,
        };
        let hdr_len = match encode_header(
            &Pdu::H2cData(header),
            len as usize,
            &encode,
            &mut slot.data_hdr,
        ) {
            Ok(n) => n,
            Err(error) => {
                tracing::error!(%error, "nvmf host: H2CData encoding");
                self.close();
                return;
            }
        };
        slot.data_hdr_len = hdr_len;
        let ddgst = encode.digests.data;
        if ddgst {
            slot.data_ddgst = iovs_crc32c(&slot.iovs, offset as usize, len as usize).to_le_bytes();
        }
        slot.tx_pending += 1;
        self.tx.push_back(TxEntry {
            kind: TxKind::H2cData { cid, offset, len },
            total: hdr_len + len as usize + if ddgst { DIGEST_BYTES } else { 0 },
            sent: 0,
        });
    }

    /// A fatal error in what the controller sent: queue an H2CTermReq carrying the
    /// offending header and stop receiving (NVMe/TCP 1.0, 3.6.2.3).
    fn fatal(&mut self, error: &PduError) {
        tracing::warn!(peer = ?self.peer, %error, "nvmf host: fatal PDU error, terminating the connection");
        // Whatever was partly sent cannot be finished: the connection ends here. Only a
        // termination request that starts on a PDU boundary can be understood.
        let mid_pdu = self.tx.front().is_some_and(|e| e.sent > 0);
        self.tx.clear();
        self.state = QpairState::Failing;
        self.failing_polls = 0;
        if mid_pdu {
            self.close();
            return;
        }
        let header_len = self
            .rx
            .layout
            .map_or(self.rx.got.min(CH_BYTES), |l| usize::from(l.hlen))
            .min(MAX_TERM_REQ_DATA_BYTES)
            .min(self.rx.header.len());
        let term = Pdu::H2cTermReq(TermReq {
            fes: error.fes(),
            fei: error.fei(),
        });
        let mut data = [0u8; MAX_TERM_REQ_DATA_BYTES];
        data[..header_len].copy_from_slice(&self.rx.header[..header_len]);
        match crate::pdu::encode(
            &term,
            &data[..header_len],
            &EncodeOptions::default(),
            &mut self.term_buf,
        ) {
            Ok(len) => self.tx.push_back(TxEntry {
                kind: TxKind::TermReq,
                total: len,
                sent: 0,
            }),
            Err(_) => self.close(),
        }
    }

    // ----------------------------------------------------------------------------------
    // Receiving

    fn poll_rx(&mut self) -> usize {
        let mut pdus = 0;
        let mut bytes = 0;
        while pdus < MAX_PDUS_PER_POLL && bytes < MAX_RX_BYTES_PER_POLL {
            if !matches!(self.state, QpairState::IcWait | QpairState::Ready) {
                break;
            }
            match self.rx_step() {
                Ok((n, finished)) => {
                    bytes += n;
                    if finished {
                        pdus += 1;
                    }
                }
                Err(Stop::Blocked) => break,
                Err(Stop::Closed) => {
                    tracing::debug!(peer = ?self.peer, "nvmf host: the controller closed the connection");
                    self.close();
                    break;
                }
                Err(Stop::Io(error)) => {
                    tracing::debug!(peer = ?self.peer, %error, "nvmf host: receive failed");
                    self.close();
                    break;
                }
                Err(Stop::Fatal(error)) => {
                    self.fatal(&error);
                    break;
                }
            }
        }
        pdus
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, Stop> {
        map_recv(sys::recv_slice(self.raw_fd(), buf), buf.len())
    }

    fn layout(&self) -> Result<Layout, Stop> {
        self.rx.layout.ok_or(Stop::Fatal(PduError::Sequence {
            pdu_type: PduType::CapsuleResp,
            state: "without a header (receive state)",
        }))
    }

    /// One receive for the current step: the bytes read and whether a PDU finished.
    fn rx_step(&mut self) -> Result<(usize, bool), Stop> {
        match self.rx.step {
            RxStep::Ch => {
                let mut buf = [0u8; CH_BYTES];
                let got = self.rx.got;
                let n = self.recv(&mut buf[..CH_BYTES - got])?;
                self.rx.header[got..got + n].copy_from_slice(&buf[..n]);
                self.rx.got += n;
                if self.rx.got == CH_BYTES {
                    let mut ch = [0u8; CH_BYTES];
                    ch.copy_from_slice(&self.rx.header[..CH_BYTES]);
                    let layout = parse_common_header(&ch, &self.limits).map_err(Stop::Fatal)?;
                    self.rx.layout = Some(layout);
                    self.rx.step = RxStep::Header;
                }
                Ok((n, false))
            }
            RxStep::Header => {
                let layout = self.layout()?;
                let need = layout.header_bytes();
                if need > self.rx.header.len() {
                    return Err(Stop::Fatal(PduError::BadHlen {
                        pdu_type: layout.pdu_type,
                        hlen: layout.hlen,
                        expected: layout.pdu_type.hlen(),
                    }));
                }
                let got = self.rx.got;
                let mut buf = [0u8; MAX_HEADER_BYTES + DIGEST_BYTES];
                let n = self.recv(&mut buf[..need - got])?;
                self.rx.header[got..got + n].copy_from_slice(&buf[..n]);
                self.rx.got += n;
                if self.rx.got < need {
                    return Ok((n, false));
                }
                let pdu = decode_header(&layout, &self.rx.header[..need]).map_err(Stop::Fatal)?;
                self.rx.dest = self.on_header(&layout, &pdu).map_err(Stop::Fatal)?;
                self.rx.pdu = Some(pdu);
                self.rx.got = 0;
                if layout.pad_bytes() > 0 {
                    self.rx.step = RxStep::Pad;
                } else if layout.data_bytes() > 0 {
                    self.rx.step = RxStep::Data;
                } else {
                    self.finish_pdu().map_err(Stop::Fatal)?;
                    return Ok((n, true));
                }
                Ok((n, false))
            }
            RxStep::Pad => {
                let pad = self.layout()?.pad_bytes();
                let mut sink = [0u8; 256];
                let want = (pad - self.rx.got).min(sink.len());
                let n = self.recv(&mut sink[..want])?;
                self.rx.got += n;
                if self.rx.got == pad {
                    self.rx.got = 0;
                    self.rx.step = RxStep::Data;
                }
                Ok((n, false))
            }
            RxStep::Data => {
                let layout = self.layout()?;
                let total = layout.data_bytes();
                let got = self.rx.got;
                let n = match self.rx.dest {
                    Dest::None => {
                        return Err(Stop::Fatal(PduError::Sequence {
                            pdu_type: layout.pdu_type,
                            state: "with data where none is expected",
                        }))
                    }
                    Dest::Term => {
                        let mut data = self.rx.term_data;
                        let n = self.recv(&mut data[got..total])?;
                        self.rx.term_data = data;
                        n
                    }
                    Dest::Slot { cid, offset } => {
                        let slot = &self.slots[usize::from(cid)];
                        // Checked at the header: offset + total lies inside the command.
                        let Some((index, inner)) = locate(&slot.iovs, offset as usize + got) else {
                            return Err(Stop::Fatal(PduError::DataOutOfRange {
                                pdu_type: layout.pdu_type,
                                offset,
                                len: total as u32,
                                expected_offset: slot.received,
                                limit: slot.len,
                            }));
                        };
                        let iov = &slot.iovs[index];
                        let want = (total - got).min(iov.len_bytes() - inner);
                        map_recv(sys::recv_into_iovec(self.raw_fd(), iov, inner, want), want)?
                    }
                };
                self.rx.got += n;
                if self.rx.got == total {
                    self.rx.got = 0;
                    if layout.ddgst {
                        self.rx.step = RxStep::Ddgst;
                    } else {
                        self.finish_pdu().map_err(Stop::Fatal)?;
                        return Ok((n, true));
                    }
                }
                Ok((n, false))
            }
            RxStep::Ddgst => {
                let got = self.rx.got;
                let mut digest = self.rx.ddgst;
                let n = self.recv(&mut digest[got..])?;
                self.rx.ddgst = digest;
                self.rx.got += n;
                if self.rx.got < DIGEST_BYTES {
                    return Ok((n, false));
                }
                let total = self.layout()?.data_bytes();
                let computed = match self.rx.dest {
                    Dest::Slot { cid, offset } => {
                        iovs_crc32c(&self.slots[usize::from(cid)].iovs, offset as usize, total)
                    }
                    Dest::Term | Dest::None => u32::from_le_bytes(self.rx.ddgst),
                };
                check_data_digest(computed, &self.rx.ddgst).map_err(Stop::Fatal)?;
                self.finish_pdu().map_err(Stop::Fatal)?;
                Ok((n, true))
            }
        }
    }

    fn sequence(pdu_type: PduType, state: &'static str) -> PduError {
        PduError::Sequence { pdu_type, state }
    }

    /// The active slot a controller PDU names, or a sequence error.
    fn active_slot(&self, cid: u16, pdu_type: PduType) -> Result<&Slot, PduError> {
        match self.slots.get(usize::from(cid)) {
            Some(slot) if slot.state == SlotState::Active => Ok(slot),
            _ => Err(Self::sequence(
                pdu_type,
                "for a command ID that is not outstanding",
            )),
        }
    }

    /// Checks a PDU header against the queue's state; says where its data goes.
    fn on_header(&mut self, layout: &Layout, pdu: &Pdu) -> Result<Dest, PduError> {
        let pdu_type = layout.pdu_type;
        let ready = self.state == QpairState::Ready;
        match pdu {
            Pdu::IcResp(_) if self.state == QpairState::IcWait => Ok(Dest::None),
            Pdu::C2hTermReq(_) => Ok(if layout.data_bytes() > 0 {
                Dest::Term
            } else {
                Dest::None
            }),
            Pdu::CapsuleResp(_) | Pdu::R2t(_) if ready => Ok(Dest::None),
            Pdu::C2hData(header) if ready => {
                let slot = self.active_slot(header.cccid, pdu_type)?;
                if slot.dir != DataDir::Read {
                    return Err(Self::sequence(pdu_type, "for a command that reads no data"));
                }
                let end = header.datao.checked_add(header.datal);
                if header.datao != slot.received || end.is_none_or(|end| end > slot.len) {
                    return Err(PduError::DataOutOfRange {
                        pdu_type,
                        offset: header.datao,
                        len: header.datal,
                        expected_offset: slot.received,
                        limit: slot.len,
                    });
                }
                Ok(Dest::Slot {
                    cid: header.cccid,
                    offset: header.datao,
                })
            }
            _ => Err(Self::sequence(
                pdu_type,
                if ready {
                    "from a controller on an established connection"
                } else {
                    "before the ICResp"
                },
            )),
        }
    }

    /// A whole PDU arrived (data and digests checked).
    fn finish_pdu(&mut self) -> Result<(), PduError> {
        let pdu = self.rx.pdu.take();
        let layout = self.rx.layout.take();
        self.rx.step = RxStep::Ch;
        self.rx.got = 0;
        let (Some(pdu), Some(layout)) = (pdu, layout) else {
            return Err(Self::sequence(PduType::CapsuleResp, "without a header"));
        };
        match pdu {
            Pdu::IcResp(ic) => {
                if ic.pfv != PFV_1_0 {
                    return Err(PduError::UnsupportedPfv { pfv: ic.pfv });
                }
                if ic.digests != self.options.digests || ic.maxh2cdata < MIN_MAXH2CDATA {
                    tracing::warn!(
                        peer = ?self.peer,
                        asked = ?self.options.digests,
                        granted = ?ic.digests,
                        maxh2cdata = ic.maxh2cdata,
                        "nvmf host: ICResp refused (digests differ from the ICReq's, or MAXH2CDATA below 4 KiB)"
                    );
                    self.close();
                    return Ok(());
                }
                self.maxh2cdata = ic.maxh2cdata;
                self.encode = EncodeOptions {
                    digests: ic.digests,
                    pda: ic.cpda,
                };
                self.limits = Limits {
                    digests: ic.digests,
                    max_capsule_data_bytes: 0,
                    max_data_pdu_bytes: self.options.max_data_bytes.max(1),
                };
                self.state = QpairState::Ready;
                Ok(())
            }
            Pdu::C2hTermReq(term) => {
                let data_len = layout.data_bytes().min(MAX_TERM_REQ_DATA_BYTES);
                tracing::warn!(
                    peer = ?self.peer,
                    fes = term.fes,
                    fei = term.fei,
                    offending_header = ?&self.rx.term_data[..data_len.min(24)],
                    "nvmf host: the controller terminated the connection (C2HTermReq)"
                );
                self.close();
                Ok(())
            }
            Pdu::CapsuleResp(cqe) => self.on_response(cqe),
            Pdu::C2hData(header) => {
                let cid = header.cccid;
                let slot = &mut self.slots[usize::from(cid)];
                slot.received += header.datal;
                if header.success {
                    if slot.received != slot.len {
                        return Err(PduError::DataOutOfRange {
                            pdu_type: PduType::C2hData,
                            offset: header.datao,
                            len: header.datal,
                            expected_offset: slot.received,
                            limit: slot.len,
                        });
                    }
                    // SUCCESS: the command completed, no response capsule follows.
                    let cqe = Completion {
                        dw0: 0,
                        dw1: 0,
                        sq_head: 0,
                        sq_id: 0,
                        cid,
                        phase: false,
                        status: Status::SUCCESS,
                    };
                    self.complete(cid, cqe);
                }
                Ok(())
            }
            Pdu::R2t(r2t) => self.on_r2t(r2t),
            other => Err(Self::sequence(other.pdu_type(), "from a controller")),
        }
    }

    fn on_response(&mut self, cqe: Completion) -> Result<(), PduError> {
        let slot = self.active_slot(cqe.cid, PduType::CapsuleResp)?;
        if slot.tx_pending > 0 || slot.r2t_active {
            return Err(Self::sequence(
                PduType::CapsuleResp,
                "while the command's data is still being sent",
            ));
        }
        if slot.dir == DataDir::Read && cqe.status.is_success() && slot.received != slot.len {
            return Err(PduError::DataOutOfRange {
                pdu_type: PduType::CapsuleResp,
                offset: slot.received,
                len: 0,
                expected_offset: slot.len,
                limit: slot.len,
            });
        }
        self.complete(cqe.cid, cqe);
        Ok(())
    }

    fn on_r2t(&mut self, r2t: R2t) -> Result<(), PduError> {
        let slot = self.active_slot(r2t.cccid, PduType::R2t)?;
        if slot.dir != DataDir::Write || slot.in_capsule || slot.r2t_active || slot.tx_pending > 0 {
            return Err(Self::sequence(
                PduType::R2t,
                "for a command with no data left to send",
            ));
        }
        let end = r2t.r2to.checked_add(r2t.r2tl);
        if r2t.r2to != slot.h2c_next || r2t.r2tl == 0 || end.is_none_or(|end| end > slot.len) {
            return Err(PduError::DataOutOfRange {
                pdu_type: PduType::R2t,
                offset: r2t.r2to,
                len: r2t.r2tl,
                expected_offset: slot.h2c_next,
                limit: slot.len,
            });
        }
        let slot = &mut self.slots[usize::from(r2t.cccid)];
        slot.r2t_active = true;
        slot.ttag = r2t.ttag;
        slot.h2c_end = r2t.r2to + r2t.r2tl;
        self.queue_h2c(r2t.cccid);
        Ok(())
    }

    fn complete(&mut self, cid: u16, cqe: Completion) {
        let slot = &mut self.slots[usize::from(cid)];
        slot.state = SlotState::Free;
        slot.iovs.clear();
        self.free.push(cid);
        self.done.push((slot.tag, cqe));
    }
}

fn map_recv(result: io::Result<usize>, wanted: usize) -> Result<usize, Stop> {
    match result {
        Ok(0) if wanted > 0 => Err(Stop::Closed),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Stop::Blocked),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(Stop::Blocked),
        Err(e) => Err(Stop::Io(e)),
    }
}
