//! One NVMe/TCP connection (a queue pair): the socket state machine, polled by its poll
//! group.
//!
//! - **Receive**: PDUs are read in steps, each a non-blocking read of exactly what the step
//!   needs: the 8-byte common header, the rest of the header (checked and decoded by
//!   `pdu.rs`), padding, the data segment, its digest. The data segment goes straight to its
//!   destination: the command slot's DMA buffer for in-capsule data and H2CData (so a write's
//!   data is copied once, by the kernel, out of the socket), a small scratch buffer for the
//!   Connect data and termination requests. At most [`MAX_PDUS_PER_POLL`] PDUs and
//!   [`MAX_RX_BYTES_PER_POLL`] bytes per poll.
//! - **Slots**: an admin or I/O queue owns `SQSIZE + 1` slots, allocated at Connect with their
//!   DMA buffers (8 KiB per admin slot, `max_io_size` per I/O slot), indexed by the R2T
//!   transfer tag: no allocation per command. A slot goes Free -> Receiving (in-capsule data)
//!   or AwaitH2c (R2T sent) -> Executing (bdev I/O or admin command) -> Responding (response
//!   queued) -> Free once the response has left the socket.
//! - **Send**: responses, R2Ts and C2HData headers are encoded into preallocated entries of a
//!   bounded queue; each poll gathers several into one `sendmsg`, the read data straight from
//!   the slot's DMA buffer (the one copy, into the socket).
//! - **Errors**: a PDU `pdu.rs` refuses, one out of sequence, a digest that does not match, a
//!   transfer outside its R2T: a C2HTermReq with the specification's FES / FEI, then the
//!   connection closes. A Connect that fails gets its status and the connection closes. No
//!   error here reaches another connection or the target.
//! - **Close**: the socket is shut down and the connection lingers, polling its bdev channels
//!   until the I/O in flight (whose buffers are the slots') has completed.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use pollux_bdev::{BdevChannel, IoCompletion, IoStatus, IoType, IoVec, MAX_COMPLETIONS_PER_POLL};
use pollux_env::dma::DmaBuffer;
use pollux_nvme::spec::{
    connect_invalid_dw0, fabrics_type, fctype, opc, sc, Command, Completion, ConnectCommand,
    ConnectData, PropertyCommand, Status, StatusCodeType, CNTLID_DYNAMIC, CONNECT_DATA_BYTES,
    DISCOVERY_NQN,
};

use crate::ctrlr::{admin_command, AdminContext, AdminOutcome, Controller};
use crate::pdu::{
    check_data_digest, crc32c_append, data_digest_follows, decode_header, encode, encode_header,
    parse_common_header, DataHeader, EncodeOptions, IcReq, IcResp, Layout, Limits, Pdu, PduError,
    PduType, R2t, TermReq, CH_BYTES, DIGEST_BYTES, MAX_HEADER_BYTES, MAX_TERM_REQ_DATA_BYTES,
    PFV_1_0,
};
use crate::subsystem::Subsystem;
use crate::sys;
use crate::target::TargetShared;
use crate::transport::{TcpTransportOptions, ADMIN_IN_CAPSULE_BYTES, ADMIN_MAX_DATA_BYTES};

/// PDUs received per poll at most (STYLE #4).
pub const MAX_PDUS_PER_POLL: usize = 32;
/// Bytes received per poll at most.
pub const MAX_RX_BYTES_PER_POLL: usize = 1 << 20;
/// `sendmsg` calls per poll at most.
const MAX_SENDS_PER_POLL: usize = 8;
/// Iovecs gathered into one `sendmsg`.
const MAX_IOVS: usize = 48;
/// An encoded header kept in a send entry: the largest is a termination request with its
/// error data (24 + 128 bytes), or a data PDU header padded to a 128-byte alignment.
const TX_HEADER_BYTES: usize = 160;
const NO_SLOT: u16 = u16::MAX;
/// Chunk for digests over DMA memory (read through volatile copies, never a reference).
const DIGEST_CHUNK_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the ICReq.
    AwaitIcReq,
    Ready,
    /// A termination request is queued: nothing more is read; closes once it is sent.
    Terminating,
    /// Socket shut down; waiting for in-flight I/O.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxStep {
    Ch,
    Header,
    Pad,
    Data,
    Ddgst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Discard,
    Scratch,
    Slot { slot: u16, offset: usize },
}

struct Rx {
    step: RxStep,
    got: usize,
    header: [u8; MAX_HEADER_BYTES + DIGEST_BYTES],
    layout: Option<Layout>,
    pdu: Option<Pdu>,
    dest: Dest,
    /// The slot a capsule being received took.
    slot: u16,
    ddgst: [u8; DIGEST_BYTES],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Receiving,
    AwaitH2c,
    Executing,
    Responding,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: SlotState,
    cmd: Command,
    /// In-capsule data bytes received with the command.
    in_capsule: u32,
    /// Bytes the command's SGL describes.
    data_len: u32,
    /// H2CData bytes received so far (R2T transfers).
    received: u32,
    /// Dataset Management: the next range to deallocate, and how many there are.
    dsm_next: u16,
    dsm_count: u16,
}

const FREE_SLOT: Slot = Slot {
    state: SlotState::Free,
    cmd: Command::new(0),
    in_capsule: 0,
    data_len: 0,
    received: 0,
    dsm_next: 0,
    dsm_count: 0,
};

/// A namespace's bdev channel on this queue.
struct NsChannel {
    nsid: u32,
    bdev: String,
    block_size_bytes: u64,
    num_blocks: u64,
    flush: bool,
    unmap: bool,
    write_zeroes: bool,
    channel: BdevChannel,
}

/// What a connected queue owns.
struct Queue {
    ctrlr: Arc<Controller>,
    qid: u16,
    depth: u16,
    /// SQ head reported in responses (commands taken, modulo the queue size).
    sq_head: u16,
    buf: DmaBuffer,
    slot_bytes: usize,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    /// Channels by NSID - 1 (I/O queues only).
    channels: Vec<Option<NsChannel>>,
    /// Channels of namespaces removed while they had I/O in flight.
    retired: Vec<NsChannel>,
    ns_generation: u64,
    /// Asynchronous Event Requests held (their CIDs' slots stay taken).
    aers: Vec<u16>,
}

impl Queue {
    fn slot_base(&self, slot: u16) -> usize {
        usize::from(slot) * self.slot_bytes
    }

    fn outstanding(&self) -> usize {
        self.channels
            .iter()
            .flatten()
            .chain(self.retired.iter())
            .map(|ns| ns.channel.outstanding())
            .sum()
    }
}

/// One queued send: an encoded header, then optionally data from a slot's buffer and its
/// digest.
struct TxEntry {
    header: [u8; TX_HEADER_BYTES],
    header_len: usize,
    /// Offset in the queue's DMA buffer and length of the data (0: none).
    data_offset: usize,
    data_len: usize,
    ddgst: [u8; DIGEST_BYTES],
    ddgst_len: usize,
    sent: usize,
    /// The slot to free once this entry is sent (its response).
    free_slot: u16,
    close_after: bool,
}

impl TxEntry {
    fn total(&self) -> usize {
        self.header_len + self.data_len + self.ddgst_len
    }
}

enum Stop {
    Blocked,
    Closed,
    Io(io::Error),
    Fatal(PduError),
}

/// An NVMe/TCP connection; see the module documentation.
pub(crate) struct Connection {
    stream: TcpStream,
    fd: RawFd,
    peer: SocketAddr,
    /// The listener address it came in on (a subsystem must listen there).
    listen: SocketAddr,
    target: Arc<TargetShared>,
    transport: TcpTransportOptions,
    phase: Phase,
    limits: Limits,
    enc: EncodeOptions,
    rx: Rx,
    /// Connect data and termination requests (before a queue exists).
    scratch: Vec<u8>,
    /// Admin command output, before it is copied to the slot's buffer.
    out: Vec<u8>,
    /// The Connect command whose data is being received.
    pre_cmd: Option<Command>,
    queue: Option<Queue>,
    tx: VecDeque<TxEntry>,
    tx_capacity: usize,
    /// Completions collected from a channel's poll (capacity kept).
    done: Vec<IoCompletion>,
}

fn read_stream(stream: &TcpStream, buf: &mut [u8]) -> Result<usize, Stop> {
    match (&*stream).read(buf) {
        Ok(0) if !buf.is_empty() => Err(Stop::Closed),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Stop::Blocked),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(Stop::Blocked),
        Err(e) => Err(Stop::Io(e)),
    }
}

/// CRC32C of `len` bytes of DMA memory at `offset`, read in chunks through volatile copies.
fn dma_crc32c(buf: &DmaBuffer, offset: usize, len: usize) -> u32 {
    let mut chunk = [0u8; DIGEST_CHUNK_BYTES];
    let mut crc = 0u32;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(DIGEST_CHUNK_BYTES);
        if buf.read_at(offset + done, &mut chunk[..n]).is_err() {
            // Ranges are checked when the transfer starts; a failure here is a bug.
            tracing::error!(offset, len, "nvmf: digest range outside the buffer");
            return 0;
        }
        crc = crc32c_append(crc, &chunk[..n]);
        done += n;
    }
    crc
}

fn generic(code: u8) -> Status {
    Status::generic(code).with_dnr(true)
}

fn specific(code: u8) -> Status {
    Status::new(StatusCodeType::CommandSpecific, code).with_dnr(true)
}

/// How a bdev I/O's status is reported to the host.
fn io_status(status: IoStatus, io_type: IoType) -> Status {
    match status {
        IoStatus::Success => Status::SUCCESS,
        IoStatus::OutOfRange => generic(sc::LBA_OUT_OF_RANGE),
        IoStatus::Unsupported => generic(sc::INVALID_OPCODE),
        IoStatus::ReadOnly => generic(0x20), // Namespace is Write Protected
        IoStatus::Removed => generic(sc::INVALID_NAMESPACE_OR_FORMAT),
        IoStatus::Misaligned | IoStatus::LengthMismatch => generic(sc::INTERNAL_ERROR),
        IoStatus::Failed if io_type == IoType::Read => Status::new(
            StatusCodeType::MediaDataIntegrity,
            sc::UNRECOVERED_READ_ERROR,
        ),
        // Write Fault.
        IoStatus::Failed => Status::new(StatusCodeType::MediaDataIntegrity, 0x80),
    }
}

impl Connection {
    pub(crate) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
        target: Arc<TargetShared>,
        transport: TcpTransportOptions,
    ) -> Self {
        let fd = stream.as_raw_fd();
        Self {
            stream,
            fd,
            peer,
            listen,
            target,
            transport,
            phase: Phase::AwaitIcReq,
            limits: Limits::INITIAL,
            enc: EncodeOptions::default(),
            rx: Rx {
                step: RxStep::Ch,
                got: 0,
                header: [0; MAX_HEADER_BYTES + DIGEST_BYTES],
                layout: None,
                pdu: None,
                dest: Dest::Discard,
                slot: NO_SLOT,
                ddgst: [0; DIGEST_BYTES],
            },
            scratch: Vec::with_capacity(ADMIN_IN_CAPSULE_BYTES as usize),
            out: Vec::with_capacity(ADMIN_MAX_DATA_BYTES as usize),
            pre_cmd: None,
            queue: None,
            // Until Connect: the ICResp, the Connect response, a termination request.
            tx: VecDeque::with_capacity(4),
            tx_capacity: 4,
            done: Vec::with_capacity(MAX_COMPLETIONS_PER_POLL),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.target.now_ms()
    }

    /// Closed and no I/O in flight: the group drops it.
    pub(crate) fn is_finished(&self) -> bool {
        self.phase == Phase::Closing && self.queue.as_ref().is_none_or(|q| q.outstanding() == 0)
    }

    /// Shuts the socket down; the connection finishes once its I/O has completed.
    pub(crate) fn close(&mut self, reason: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        tracing::info!(peer = %self.peer, qid = self.queue.as_ref().map(|q| q.qid), cntlid = self.queue.as_ref().map(|q| q.ctrlr.cntlid), %reason, "nvmf: connection closed");
        let _ = self.stream.shutdown(Shutdown::Both);
        self.phase = Phase::Closing;
        self.tx.clear();
    }

    /// One poll: bdev completions, received PDUs, sends. Returns whether it did work.
    pub(crate) fn poll(&mut self, now_ms: u64) -> bool {
        let mut busy = self.poll_completions(now_ms);
        if self.phase == Phase::Closing {
            return busy;
        }
        if let Some(queue) = &self.queue {
            if queue.ctrlr.is_failed() {
                self.close("its controller is gone (keep alive timeout, admin queue closed or subsystem deleted)");
                return true;
            }
            let generation = queue.ctrlr.subsystem.as_ref().map(|s| s.ns_generation());
            if queue.qid != 0 && generation.is_some_and(|g| g != queue.ns_generation) {
                self.sync_namespaces();
            }
        }
        if matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
            busy |= self.poll_rx(now_ms);
        }
        busy |= self.poll_tx();
        if self.phase == Phase::Terminating && self.tx.is_empty() {
            self.close("terminated after a fatal transport error");
        }
        busy
    }

    // ------------------------------------------------------------------------------------
    // Receive

    fn poll_rx(&mut self, now_ms: u64) -> bool {
        let mut pdus = 0;
        let mut bytes = 0;
        let mut busy = false;
        while pdus < MAX_PDUS_PER_POLL
            && bytes < MAX_RX_BYTES_PER_POLL
            && matches!(self.phase, Phase::AwaitIcReq | Phase::Ready)
            // Backpressure: every command needs room for its response (never hit while the
            // host keeps to its queue size).
            && self.tx.len() + 3 <= self.tx_capacity
        {
            match self.rx_step(now_ms) {
                Ok((n, done)) => {
                    bytes += n;
                    busy = true;
                    if done {
                        pdus += 1;
                    }
                }
                Err(Stop::Blocked) => break,
                Err(Stop::Closed) => {
                    self.close("the host closed the connection");
                    return true;
                }
                Err(Stop::Io(error)) => {
                    self.close(&format!("socket error: {error}"));
                    return true;
                }
                Err(Stop::Fatal(error)) => {
                    self.fatal(&error);
                    return true;
                }
            }
        }
        busy
    }

    /// One read for the current receive step; returns the bytes read and whether a PDU was
    /// completed.
    fn rx_step(&mut self, now_ms: u64) -> Result<(usize, bool), Stop> {
        match self.rx.step {
            RxStep::Ch => {
                let n = read_stream(&self.stream, &mut self.rx.header[self.rx.got..CH_BYTES])?;
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
                let layout = self.layout();
                let need = layout.header_bytes();
                let n = read_stream(&self.stream, &mut self.rx.header[self.rx.got..need])?;
                self.rx.got += n;
                if self.rx.got < need {
                    return Ok((n, false));
                }
                let pdu = decode_header(&layout, &self.rx.header[..need]).map_err(Stop::Fatal)?;
                self.rx.dest = self.on_header(&layout, &pdu)?;
                self.rx.pdu = Some(pdu);
                self.rx.got = 0;
                if layout.pad_bytes() > 0 {
                    self.rx.step = RxStep::Pad;
                } else if layout.data_bytes() > 0 {
                    self.rx.step = RxStep::Data;
                } else {
                    return self.finish_pdu(now_ms).map(|()| (n, true));
                }
                Ok((n, false))
            }
            RxStep::Pad => {
                let pad = self.layout().pad_bytes();
                let mut sink = [0u8; 256];
                let want = (pad - self.rx.got).min(sink.len());
                let n = read_stream(&self.stream, &mut sink[..want])?;
                self.rx.got += n;
                if self.rx.got == pad {
                    self.rx.got = 0;
                    self.rx.step = RxStep::Data;
                }
                Ok((n, false))
            }
            RxStep::Data => {
                let layout = self.layout();
                let total = layout.data_bytes();
                let got = self.rx.got;
                let n = match self.rx.dest {
                    Dest::Scratch => read_stream(&self.stream, &mut self.scratch[got..total])?,
                    Dest::Discard => {
                        let mut sink = [0u8; 512];
                        let want = (total - got).min(sink.len());
                        read_stream(&self.stream, &mut sink[..want])?
                    }
                    Dest::Slot { slot, offset } => {
                        let queue = self.queue.as_ref().ok_or(Stop::Closed)?;
                        let at = queue.slot_base(slot) + offset + got;
                        match sys::recv_into_dma(self.fd, &queue.buf, at, total - got) {
                            Ok(0) => return Err(Stop::Closed),
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                return Err(Stop::Blocked)
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                                return Err(Stop::Blocked)
                            }
                            Err(e) => return Err(Stop::Io(e)),
                        }
                    }
                };
                self.rx.got += n;
                if self.rx.got == total {
                    self.rx.got = 0;
                    if layout.ddgst {
                        self.rx.step = RxStep::Ddgst;
                    } else {
                        return self.finish_pdu(now_ms).map(|()| (n, true));
                    }
                }
                Ok((n, false))
            }
            RxStep::Ddgst => {
                let n = read_stream(&self.stream, &mut self.rx.ddgst[self.rx.got..])?;
                self.rx.got += n;
                if self.rx.got < DIGEST_BYTES {
                    return Ok((n, false));
                }
                let total = self.layout().data_bytes();
                let computed = match self.rx.dest {
                    Dest::Scratch => crate::pdu::crc32c(&self.scratch[..total]),
                    Dest::Slot { slot, offset } => {
                        let queue = self.queue.as_ref().ok_or(Stop::Closed)?;
                        dma_crc32c(&queue.buf, queue.slot_base(slot) + offset, total)
                    }
                    // Discarded data is never digested: nothing is discarded that carries one.
                    Dest::Discard => u32::from_le_bytes(self.rx.ddgst),
                };
                check_data_digest(computed, &self.rx.ddgst).map_err(Stop::Fatal)?;
                self.finish_pdu(now_ms).map(|()| (n, true))
            }
        }
    }

    fn layout(&self) -> Layout {
        // Set whenever the step is past the common header.
        self.rx.layout.unwrap_or(Layout {
            pdu_type: PduType::IcReq,
            flags: 0,
            hlen: 128,
            pdo: 0,
            plen: 128,
            hdgst: false,
            ddgst: false,
        })
    }

    /// The PDU is whole: reset the receive state and act on it.
    fn finish_pdu(&mut self, now_ms: u64) -> Result<(), Stop> {
        self.rx.step = RxStep::Ch;
        self.rx.got = 0;
        let layout = self.layout();
        let Some(pdu) = self.rx.pdu.take() else {
            return Ok(());
        };
        self.on_pdu(pdu, &layout, now_ms)
    }

    /// Where a PDU's data goes, decided from its header (and whether it may come now).
    fn on_header(&mut self, layout: &Layout, pdu: &Pdu) -> Result<Dest, Stop> {
        let sequence = |state| {
            Err(Stop::Fatal(PduError::Sequence {
                pdu_type: pdu.pdu_type(),
                state,
            }))
        };
        let data = layout.data_bytes();
        match (self.phase, pdu) {
            (Phase::AwaitIcReq, Pdu::IcReq(_)) => Ok(Dest::Discard),
            (Phase::AwaitIcReq, _) => sequence("before the ICReq"),
            (_, Pdu::IcReq(_)) => sequence("after the connection was initialized"),
            (_, Pdu::H2cTermReq(_)) => {
                self.scratch.clear();
                self.scratch.resize(data, 0);
                Ok(Dest::Scratch)
            }
            (_, Pdu::CapsuleCmd(cmd)) => self.on_capsule_header(*cmd, data),
            (_, Pdu::H2cData(header)) => self.on_h2c_header(header),
            (_, _) => sequence("from a host (a controller-to-host PDU)"),
        }
    }

    fn on_capsule_header(&mut self, cmd: Command, data: usize) -> Result<Dest, Stop> {
        let Some(queue) = self.queue.as_mut() else {
            // Before Connect: the Connect data (1 KiB) goes to the scratch buffer.
            self.scratch.clear();
            self.scratch.resize(data, 0);
            self.pre_cmd = Some(cmd);
            return Ok(if data > 0 {
                Dest::Scratch
            } else {
                Dest::Discard
            });
        };
        if data > queue.slot_bytes {
            return Err(Stop::Fatal(PduError::DataTooLong {
                pdu_type: PduType::CapsuleCmd,
                len: data as u64,
                max: queue.slot_bytes as u64,
            }));
        }
        let Some(slot) = queue.free.pop() else {
            return Err(Stop::Fatal(PduError::Sequence {
                pdu_type: PduType::CapsuleCmd,
                state: "with every command slot of the queue in use (more than SQSIZE + 1)",
            }));
        };
        queue.sq_head = (queue.sq_head + 1) % queue.depth;
        queue.slots[usize::from(slot)] = Slot {
            state: SlotState::Receiving,
            cmd,
            in_capsule: data as u32,
            ..FREE_SLOT
        };
        self.rx.slot = slot;
        Ok(if data > 0 {
            Dest::Slot { slot, offset: 0 }
        } else {
            Dest::Discard
        })
    }

    fn on_h2c_header(&mut self, header: &DataHeader) -> Result<Dest, Stop> {
        let sequence = |state| {
            Err(Stop::Fatal(PduError::Sequence {
                pdu_type: PduType::H2cData,
                state,
            }))
        };
        let Some(queue) = self.queue.as_ref() else {
            return sequence("before Connect");
        };
        let Some(slot) = queue.slots.get(usize::from(header.ttag)) else {
            return sequence("for a transfer tag no R2T gave");
        };
        if slot.state != SlotState::AwaitH2c || slot.cmd.cid != header.cccid {
            return sequence("for a command that awaits no data");
        }
        let end = u64::from(header.datao) + u64::from(header.datal);
        if header.datao != slot.received || end > u64::from(slot.data_len) {
            return Err(Stop::Fatal(PduError::DataOutOfRange {
                pdu_type: PduType::H2cData,
                offset: header.datao,
                len: header.datal,
                expected_offset: slot.received,
                limit: slot.data_len,
            }));
        }
        self.rx.slot = header.ttag;
        Ok(Dest::Slot {
            slot: header.ttag,
            offset: header.datao as usize,
        })
    }

    fn on_pdu(&mut self, pdu: Pdu, layout: &Layout, now_ms: u64) -> Result<(), Stop> {
        match pdu {
            Pdu::IcReq(ic) => self.on_icreq(&ic),
            Pdu::H2cTermReq(term) => {
                tracing::warn!(peer = %self.peer, fes = term.fes, fei = term.fei, "nvmf: the host terminated the connection (H2CTermReq)");
                self.close("H2CTermReq from the host");
                Ok(())
            }
            Pdu::CapsuleCmd(_) if self.queue.is_none() => {
                if let Some(cmd) = self.pre_cmd.take() {
                    self.on_connect(cmd, now_ms);
                }
                Ok(())
            }
            Pdu::CapsuleCmd(_) => {
                self.start_command(self.rx.slot, now_ms);
                Ok(())
            }
            Pdu::H2cData(header) => {
                let slot = header.ttag;
                let complete = match self.queue.as_mut() {
                    Some(queue) => {
                        let s = &mut queue.slots[usize::from(slot)];
                        s.received += header.datal;
                        s.received == s.data_len
                    }
                    None => false,
                };
                if complete {
                    self.set_state(slot, SlotState::Executing);
                    self.execute(slot, now_ms);
                }
                let _ = layout;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_icreq(&mut self, ic: &IcReq) -> Result<(), Stop> {
        if ic.pfv != PFV_1_0 {
            return Err(Stop::Fatal(PduError::UnsupportedPfv { pfv: ic.pfv }));
        }
        // Both digests are supported: the host's choice is taken as it is.
        self.enc = EncodeOptions {
            digests: ic.digests,
            pda: ic.hpda,
        };
        self.limits = Limits {
            digests: ic.digests,
            max_capsule_data_bytes: ADMIN_IN_CAPSULE_BYTES,
            max_data_pdu_bytes: self.transport.max_io_size,
        };
        let resp = Pdu::IcResp(IcResp {
            pfv: PFV_1_0,
            cpda: 0,
            digests: ic.digests,
            maxh2cdata: self.transport.max_io_size,
        });
        self.queue_pdu(&resp, &[], None, NO_SLOT, false);
        self.phase = Phase::Ready;
        tracing::debug!(peer = %self.peer, hdgst = ic.digests.header, ddgst = ic.digests.data, hpda = ic.hpda, "nvmf: ICReq");
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Connect (NVMe-oF 1.1, 3.3; the checks SPDK's `nvmf_ctrlr_cmd_connect` makes)

    fn on_connect(&mut self, cmd: Command, now_ms: u64) {
        let cid = cmd.cid;
        match self.connect(&cmd, now_ms) {
            Ok(cntlid) => {
                self.respond_raw(cid, 0, Status::SUCCESS, u32::from(cntlid), NO_SLOT, false)
            }
            Err((status, dw0, why)) => {
                tracing::warn!(peer = %self.peer, %status, reason = why, "nvmf: Connect refused");
                self.respond_raw(cid, 0, status, dw0, NO_SLOT, true);
                self.phase = Phase::Terminating;
            }
        }
    }

    fn connect(&mut self, cmd: &Command, now_ms: u64) -> Result<u16, (Status, u32, &'static str)> {
        if cmd.opcode != opc::FABRICS || fabrics_type(cmd) != fctype::CONNECT {
            return Err((
                generic(sc::COMMAND_SEQUENCE_ERROR),
                0,
                "a command before Connect",
            ));
        }
        let connect = ConnectCommand::from_command(cmd);
        let Some(bytes) = self.scratch.first_chunk::<CONNECT_DATA_BYTES>() else {
            return Err((
                generic(sc::DATA_SGL_LENGTH_INVALID),
                0,
                "Connect without its 1 KiB of in-capsule data",
            ));
        };
        let data = ConnectData::parse(bytes);
        let invalid = |in_data: bool, offset: u16, why| {
            Err((
                specific(sc::CONNECT_INVALID_PARAMETERS),
                connect_invalid_dw0(in_data, offset),
                why,
            ))
        };
        if connect.recfmt != 0 {
            return Err((
                specific(sc::CONNECT_INCOMPATIBLE_FORMAT),
                0,
                "record format is not 0",
            ));
        }
        let discovery = data.subnqn == DISCOVERY_NQN;
        let subsystem: Option<Arc<Subsystem>> = if discovery {
            None
        } else {
            match self.target.subsystem(&data.subnqn) {
                Some(s) => Some(s),
                None => return invalid(true, ConnectData::SUBNQN_OFFSET, "unknown subsystem NQN"),
            }
        };
        if let Some(s) = &subsystem {
            if !s.listens_on(self.listen) {
                return invalid(
                    true,
                    ConnectData::SUBNQN_OFFSET,
                    "the subsystem does not listen on this address",
                );
            }
            if !s.host_allowed(&data.hostnqn) {
                return Err((
                    specific(sc::CONNECT_INVALID_HOST),
                    0,
                    "host NQN not allowed by the subsystem",
                ));
            }
        }
        let max_depth = if connect.qid == 0 {
            self.transport.max_aq_depth
        } else {
            self.transport.max_queue_depth
        };
        if connect.sqsize == 0 || u32::from(connect.sqsize) + 1 > u32::from(max_depth) {
            return invalid(false, ConnectCommand::SQSIZE_OFFSET, "SQSIZE out of range");
        }
        let ctrlr = if connect.qid == 0 {
            if data.cntlid != CNTLID_DYNAMIC {
                return invalid(
                    true,
                    ConnectData::CNTLID_OFFSET,
                    "a static controller ID (only the dynamic model is offered)",
                );
            }
            match self.target.create_controller(
                subsystem,
                &data.hostnqn,
                data.hostid,
                self.transport,
                connect.kato_ms,
            ) {
                Some(ctrlr) => ctrlr,
                None => {
                    return Err((
                        specific(sc::CONNECT_CONTROLLER_BUSY),
                        0,
                        "no free controller ID",
                    ))
                }
            }
        } else {
            if discovery {
                return invalid(
                    false,
                    ConnectCommand::QID_OFFSET,
                    "a discovery controller has no I/O queues",
                );
            }
            let Some(ctrlr) = self
                .target
                .find_controller(data.cntlid, &data.subnqn, &data.hostnqn)
            else {
                return invalid(
                    true,
                    ConnectData::CNTLID_OFFSET,
                    "no such controller for this subsystem and host",
                );
            };
            if !ctrlr.is_enabled() || ctrlr.is_failed() {
                return Err((
                    generic(sc::COMMAND_SEQUENCE_ERROR),
                    0,
                    "I/O queue Connect to a controller that is not enabled",
                ));
            }
            if let Err(why) = ctrlr.add_io_queue(connect.qid) {
                return invalid(false, ConnectCommand::QID_OFFSET, why);
            }
            ctrlr
        };
        let queue = match self.make_queue(&ctrlr, connect.qid, connect.sqsize + 1) {
            Ok(queue) => queue,
            Err(why) => {
                tracing::error!(peer = %self.peer, %why, "nvmf: no resources for a queue");
                if connect.qid == 0 {
                    self.target.remove_controller(&ctrlr);
                } else {
                    ctrlr.remove_queue(connect.qid);
                }
                return Err((generic(sc::INTERNAL_ERROR), 0, "no memory for the queue"));
            }
        };
        if connect.qid != 0 {
            self.limits.max_capsule_data_bytes = self.transport.in_capsule_data_size;
        }
        let depth = queue.depth;
        self.tx_capacity = 2 * usize::from(depth) + 8;
        self.tx
            .reserve_exact(self.tx_capacity.saturating_sub(self.tx.len()));
        self.queue = Some(queue);
        let _ = now_ms;
        tracing::info!(peer = %self.peer, subnqn = %data.subnqn, hostnqn = %data.hostnqn, cntlid = ctrlr.cntlid, qid = connect.qid, depth, kato_ms = connect.kato_ms, hdgst = self.enc.digests.header, ddgst = self.enc.digests.data, "nvmf: queue connected");
        Ok(ctrlr.cntlid)
    }

    fn make_queue(&self, ctrlr: &Arc<Controller>, qid: u16, depth: u16) -> Result<Queue, String> {
        let slot_bytes = if qid == 0 {
            ADMIN_MAX_DATA_BYTES as usize
        } else {
            self.transport.max_io_size as usize
        };
        let buf = self
            .target
            .dma
            .alloc(usize::from(depth) * slot_bytes, 4096, None)
            .map_err(|e| e.to_string())?;
        let mut queue = Queue {
            ctrlr: ctrlr.clone(),
            qid,
            depth,
            sq_head: 0,
            buf,
            slot_bytes,
            slots: vec![FREE_SLOT; usize::from(depth)].into_boxed_slice(),
            free: (0..depth).rev().collect(),
            channels: Vec::new(),
            retired: Vec::new(),
            ns_generation: 0,
            aers: Vec::with_capacity(crate::ctrlr::AER_LIMIT),
        };
        if qid != 0 {
            open_channels(&mut queue);
        }
        Ok(queue)
    }

    /// A namespace was added or removed: open channels for new ones, retire those of removed
    /// ones (kept until their I/O completes).
    fn sync_namespaces(&mut self) {
        if let Some(queue) = self.queue.as_mut() {
            open_channels(queue);
        }
    }

    // ------------------------------------------------------------------------------------
    // Commands

    fn set_state(&mut self, slot: u16, state: SlotState) {
        if let Some(s) = self
            .queue
            .as_mut()
            .and_then(|q| q.slots.get_mut(usize::from(slot)))
        {
            s.state = state;
        }
    }

    /// A capsule is whole: checks its data pointer, asks for the data (R2T) or runs it.
    fn start_command(&mut self, slot: u16, now_ms: u64) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let s = queue.slots[usize::from(slot)];
        let cmd = s.cmd;
        // SGL descriptor in DPTR (NVMe Base 2.0 4.1.8): address, length, type / subtype.
        let length = cmd.dptr[1] as u32;
        let id = (cmd.dptr[1] >> 56) as u8;
        let (sgl_type, subtype) = (id >> 4, id & 0xf);
        let direction = if cmd.opcode == opc::FABRICS {
            fabrics_type(&cmd) & 3
        } else {
            cmd.opcode & 3
        };
        let checked: Result<u32, Status> = if direction == 3 {
            Err(generic(sc::INVALID_FIELD))
        } else if sgl_type == 0 && subtype == 1 {
            // In-capsule data: an SGL data block with an offset address (NVMe/TCP 1.0,
            // in-capsule data); the offset must be 0 here.
            if cmd.dptr[0] != 0 {
                Err(generic(sc::SGL_OFFSET_INVALID))
            } else if length > s.in_capsule || (direction != 1 && length > 0) {
                Err(generic(sc::DATA_SGL_LENGTH_INVALID))
            } else {
                Ok(length)
            }
        } else if sgl_type == 5 && subtype == 0xa {
            // Transport SGL data block: the data moves by R2T / H2CData or C2HData.
            if s.in_capsule > 0 {
                Err(generic(sc::INVALID_FIELD))
            } else if length as usize > queue.slot_bytes {
                Err(generic(sc::DATA_SGL_LENGTH_INVALID))
            } else {
                Ok(length)
            }
        } else {
            Err(generic(sc::SGL_DESCRIPTOR_TYPE_INVALID))
        };
        let data_len = match checked {
            Ok(len) => len,
            Err(status) => return self.respond(slot, status, 0, 0),
        };
        let s = &mut queue.slots[usize::from(slot)];
        s.data_len = data_len;
        if direction == 1 && s.in_capsule == 0 && data_len > 0 {
            s.state = SlotState::AwaitH2c;
            s.received = 0;
            let r2t = Pdu::R2t(R2t {
                cccid: cmd.cid,
                ttag: slot,
                r2to: 0,
                r2tl: data_len,
            });
            self.queue_pdu(&r2t, &[], None, NO_SLOT, false);
            return;
        }
        s.state = SlotState::Executing;
        self.execute(slot, now_ms);
    }

    fn execute(&mut self, slot: u16, now_ms: u64) {
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        if queue.qid == 0 {
            self.admin(slot, now_ms);
        } else {
            self.io(slot);
        }
    }

    fn admin(&mut self, slot: u16, now_ms: u64) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let s = queue.slots[usize::from(slot)];
        let cmd = s.cmd;
        if cmd.opcode == opc::FABRICS {
            let prop = PropertyCommand::from_command(&cmd);
            return match fabrics_type(&cmd) {
                fctype::PROPERTY_GET => match queue.ctrlr.property_get(&prop) {
                    Some(value) => {
                        self.respond(slot, Status::SUCCESS, value as u32, (value >> 32) as u32)
                    }
                    None => self.respond(slot, generic(sc::INVALID_FIELD), 0, 0),
                },
                fctype::PROPERTY_SET => {
                    let status = if queue.ctrlr.property_set(&prop) {
                        Status::SUCCESS
                    } else {
                        generic(sc::INVALID_FIELD)
                    };
                    self.respond(slot, status, 0, 0)
                }
                fctype::CONNECT => self.respond(slot, generic(sc::COMMAND_SEQUENCE_ERROR), 0, 0),
                _ => self.respond(slot, generic(sc::INVALID_OPCODE), 0, 0),
            };
        }
        let ctrlr = queue.ctrlr.clone();
        let target = self.target.clone();
        let hostnqn = ctrlr.hostnqn.clone();
        let discovery_log = move |out: &mut Vec<u8>| target.discovery_log(&hostnqn, out);
        let cx = AdminContext {
            ctrlr: &ctrlr,
            discovery_log: &discovery_log,
            now_ms,
            aers_held: queue.aers.len(),
        };
        let outcome = admin_command(&cx, &cmd, s.data_len as usize, &mut self.out);
        match outcome {
            AdminOutcome::HoldAer => queue.aers.push(slot),
            AdminOutcome::Done {
                status,
                dw0,
                dw1,
                data_len,
            } => {
                let send = data_len.min(s.data_len as usize).min(self.out.len());
                if status.is_success() && send > 0 && cmd.opcode & 3 == 2 {
                    let base = queue.slot_base(slot);
                    if queue.buf.write_at(base, &self.out[..send]).is_err() {
                        return self.respond(slot, generic(sc::INTERNAL_ERROR), 0, 0);
                    }
                    self.queue_c2h_data(slot, send as u32);
                }
                self.respond(slot, status, dw0, dw1);
            }
        }
    }

    fn io(&mut self, slot: u16) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let s = queue.slots[usize::from(slot)];
        let cmd = s.cmd;
        let index = (cmd.nsid as usize).wrapping_sub(1);
        let base = queue.slot_base(slot);
        let Some(ns) = queue.channels.get_mut(index).and_then(Option::as_mut) else {
            return self.respond(slot, generic(sc::INVALID_NAMESPACE_OR_FORMAT), 0, 0);
        };
        let tag = u64::from(slot);
        let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
        let nlb = u64::from(cmd.cdw12 & 0xffff) + 1;
        let submitted = match cmd.opcode {
            opc::READ | opc::WRITE => {
                let bytes = nlb * ns.block_size_bytes;
                if bytes != u64::from(s.data_len) {
                    return self.respond(slot, generic(sc::DATA_SGL_LENGTH_INVALID), 0, 0);
                }
                let iov = match IoVec::from_dma_buffer(&queue.buf, base, bytes as usize) {
                    Ok(iov) => iov,
                    Err(_) => return self.respond(slot, generic(sc::INVALID_FIELD), 0, 0),
                };
                if cmd.opcode == opc::READ {
                    ns.channel.read(tag, slba, nlb, &[iov])
                } else {
                    ns.channel.write(tag, slba, nlb, &[iov])
                }
            }
            opc::FLUSH if ns.flush => ns.channel.flush(tag, 0, ns.num_blocks),
            // Nothing is cached above the bdev: a flush it does not support has nothing to do.
            opc::FLUSH => return self.respond(slot, Status::SUCCESS, 0, 0),
            opc::WRITE_ZEROES if ns.write_zeroes => ns.channel.write_zeroes(tag, slba, nlb),
            opc::WRITE_ZEROES => return self.respond(slot, generic(sc::INVALID_OPCODE), 0, 0),
            opc::DATASET_MANAGEMENT => {
                // NR (0's based) ranges of 16 bytes; AD (CDW11 bit 2) asks to deallocate, which
                // is advisory: without it, or without unmap support, there is nothing to do.
                let count = (cmd.cdw10 & 0xff) as u16 + 1;
                if u32::from(count) * 16 > s.data_len {
                    return self.respond(slot, generic(sc::DATA_SGL_LENGTH_INVALID), 0, 0);
                }
                if cmd.cdw11 & 4 == 0 || !ns.unmap {
                    return self.respond(slot, Status::SUCCESS, 0, 0);
                }
                let s = &mut queue.slots[usize::from(slot)];
                s.dsm_next = 0;
                s.dsm_count = count;
                return self.dsm_next(slot);
            }
            _ => return self.respond(slot, generic(sc::INVALID_OPCODE), 0, 0),
        };
        if let Err(error) = submitted {
            // Each slot has at most one bdev I/O and the channel as many slots as the queue.
            tracing::error!(%error, "nvmf: bdev submit refused");
            self.respond(slot, generic(sc::INTERNAL_ERROR), 0, 0);
        }
    }

    /// Dataset Management: deallocates the next range (one at a time per command), or
    /// responds when none is left.
    fn dsm_next(&mut self, slot: u16) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let base = queue.slot_base(slot);
        loop {
            let s = queue.slots[usize::from(slot)];
            if s.dsm_next >= s.dsm_count {
                return self.respond(slot, Status::SUCCESS, 0, 0);
            }
            let mut range = [0u8; 16];
            let at = base + usize::from(s.dsm_next) * 16;
            queue.slots[usize::from(slot)].dsm_next += 1;
            if queue.buf.read_at(at, &mut range).is_err() {
                return self.respond(slot, generic(sc::INTERNAL_ERROR), 0, 0);
            }
            let nlb = u64::from(u32::from_le_bytes([range[4], range[5], range[6], range[7]]));
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&range[8..16]);
            let slba = u64::from_le_bytes(lba);
            if nlb == 0 {
                continue;
            }
            let index = (s.cmd.nsid as usize).wrapping_sub(1);
            let Some(ns) = queue.channels.get_mut(index).and_then(Option::as_mut) else {
                return self.respond(slot, generic(sc::INVALID_NAMESPACE_OR_FORMAT), 0, 0);
            };
            if let Err(error) = ns.channel.unmap(u64::from(slot), slba, nlb) {
                tracing::error!(%error, "nvmf: bdev unmap refused");
                return self.respond(slot, generic(sc::INTERNAL_ERROR), 0, 0);
            }
            return;
        }
    }

    /// Hands bdev completions to their commands.
    fn poll_completions(&mut self, _now_ms: u64) -> bool {
        let Some(queue) = self.queue.as_mut() else {
            return false;
        };
        if queue.channels.is_empty() && queue.retired.is_empty() {
            return false;
        }
        let mut done = std::mem::take(&mut self.done);
        let mut handed = 0;
        for ns in queue
            .channels
            .iter_mut()
            .flatten()
            .chain(queue.retired.iter_mut())
        {
            handed += ns.channel.poll(|_, completion| done.push(completion));
        }
        queue.retired.retain(|ns| ns.channel.outstanding() > 0);
        for completion in done.drain(..) {
            self.complete_io(completion);
        }
        self.done = done;
        handed > 0
    }

    fn complete_io(&mut self, completion: IoCompletion) {
        if self.phase == Phase::Closing {
            // Nothing is sent any more; the slot is simply free again.
            if let Some(queue) = self.queue.as_mut() {
                let slot = completion.tag as u16;
                queue.slots[usize::from(slot)] = FREE_SLOT;
                queue.free.push(slot);
            }
            return;
        }
        let slot = completion.tag as u16;
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        let s = queue.slots[usize::from(slot)];
        if s.cmd.opcode == opc::DATASET_MANAGEMENT && completion.status.is_success() {
            return self.dsm_next(slot);
        }
        let status = io_status(completion.status, completion.io_type);
        if status.is_success() && completion.io_type == IoType::Read {
            self.queue_c2h_data(slot, s.data_len);
        }
        self.respond(slot, status, 0, 0);
    }

    // ------------------------------------------------------------------------------------
    // Send

    /// Queues a C2HData PDU carrying `len` bytes of the slot's buffer.
    fn queue_c2h_data(&mut self, slot: u16, len: u32) {
        let Some(queue) = self.queue.as_ref() else {
            return;
        };
        let cid = queue.slots[usize::from(slot)].cmd.cid;
        let offset = queue.slot_base(slot);
        let pdu = Pdu::C2hData(DataHeader {
            cccid: cid,
            ttag: 0,
            datao: 0,
            datal: len,
            last: true,
            success: false,
        });
        self.queue_pdu(&pdu, &[], Some((offset, len as usize)), NO_SLOT, false);
    }

    /// Responds to the command in `slot`; the slot is free once the response is sent.
    fn respond(&mut self, slot: u16, status: Status, dw0: u32, dw1: u32) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let s = &mut queue.slots[usize::from(slot)];
        s.state = SlotState::Responding;
        let cid = s.cmd.cid;
        let cqe = Completion {
            dw0,
            dw1,
            sq_head: queue.sq_head,
            sq_id: queue.qid,
            cid,
            phase: false,
            status,
        };
        self.queue_pdu(&Pdu::CapsuleResp(cqe), &[], None, slot, false);
    }

    /// A response with no slot (Connect).
    fn respond_raw(
        &mut self,
        cid: u16,
        dw1: u32,
        status: Status,
        dw0: u32,
        slot: u16,
        close: bool,
    ) {
        let cqe = Completion {
            dw0,
            dw1,
            sq_head: 0,
            sq_id: 0,
            cid,
            phase: false,
            status,
        };
        self.queue_pdu(&Pdu::CapsuleResp(cqe), &[], None, slot, close);
    }

    /// Encodes `pdu` into a send entry: `inline` data goes into the entry with the header
    /// (termination requests), `dma` names data in the queue's buffer (offset, length).
    fn queue_pdu(
        &mut self,
        pdu: &Pdu,
        inline: &[u8],
        dma: Option<(usize, usize)>,
        free_slot: u16,
        close_after: bool,
    ) {
        let mut entry = TxEntry {
            header: [0; TX_HEADER_BYTES],
            header_len: 0,
            data_offset: 0,
            data_len: 0,
            ddgst: [0; DIGEST_BYTES],
            ddgst_len: 0,
            sent: 0,
            free_slot,
            close_after,
        };
        let encoded = match dma {
            None => encode(pdu, inline, &self.enc, &mut entry.header),
            Some((offset, len)) => {
                let header = encode_header(pdu, len, &self.enc, &mut entry.header);
                if header.is_ok() && data_digest_follows(pdu.pdu_type(), len, &self.enc) {
                    if let Some(queue) = self.queue.as_ref() {
                        entry.ddgst = dma_crc32c(&queue.buf, offset, len).to_le_bytes();
                        entry.ddgst_len = DIGEST_BYTES;
                    }
                }
                entry.data_offset = offset;
                entry.data_len = len;
                header
            }
        };
        match encoded {
            Ok(len) => entry.header_len = len,
            Err(error) => {
                // Every PDU the target builds fits its entry: a failure is a bug.
                tracing::error!(%error, "nvmf: could not encode a PDU");
                self.close("internal error encoding a PDU");
                return;
            }
        }
        self.tx.push_back(entry);
    }

    /// A fatal transport error: C2HTermReq with its FES / FEI and the offending header, then
    /// close (NVMe/TCP 1.0, 3.6.2.3).
    fn fatal(&mut self, error: &PduError) {
        tracing::warn!(peer = %self.peer, %error, fes = error.fes(), fei = error.fei(), "nvmf: fatal transport error, terminating the connection");
        let header_len = self
            .rx
            .layout
            .map_or(CH_BYTES, |l| usize::from(l.hlen))
            .min(MAX_TERM_REQ_DATA_BYTES)
            .min(self.rx.header.len());
        let mut data = [0u8; MAX_TERM_REQ_DATA_BYTES];
        data[..header_len].copy_from_slice(&self.rx.header[..header_len]);
        let term = Pdu::C2hTermReq(TermReq {
            fes: error.fes(),
            fei: error.fei(),
        });
        // Room is always kept for it: drop queued sends that are not started.
        while self.tx.len() + 1 > self.tx_capacity {
            if self.tx.back().is_some_and(|e| e.sent == 0) {
                self.tx.pop_back();
            } else {
                break;
            }
        }
        self.queue_pdu(&term, &data[..header_len], None, NO_SLOT, true);
        self.phase = Phase::Terminating;
    }

    fn poll_tx(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..MAX_SENDS_PER_POLL {
            if self.tx.is_empty() || self.phase == Phase::Closing {
                break;
            }
            let dma_base = self.queue.as_ref().map_or(0, |q| q.buf.vaddr());
            let empty = libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            let mut iovs = [empty; MAX_IOVS];
            let mut count = 0;
            for entry in self.tx.iter() {
                if count + 3 > MAX_IOVS {
                    break;
                }
                let mut skip = entry.sent;
                let header = &entry.header[..entry.header_len];
                if skip < header.len() {
                    iovs[count] = libc::iovec {
                        iov_base: header[skip..].as_ptr() as *mut libc::c_void,
                        iov_len: header.len() - skip,
                    };
                    count += 1;
                    skip = 0;
                } else {
                    skip -= header.len();
                }
                if entry.data_len > 0 {
                    if skip < entry.data_len {
                        iovs[count] = libc::iovec {
                            iov_base: (dma_base + (entry.data_offset + skip) as u64)
                                as *mut libc::c_void,
                            iov_len: entry.data_len - skip,
                        };
                        count += 1;
                        skip = 0;
                    } else {
                        skip -= entry.data_len;
                    }
                }
                if entry.ddgst_len > 0 && skip < entry.ddgst_len {
                    iovs[count] = libc::iovec {
                        iov_base: entry.ddgst[skip..].as_ptr() as *mut libc::c_void,
                        iov_len: entry.ddgst_len - skip,
                    };
                    count += 1;
                }
            }
            // SAFETY: header and digest iovecs point into entries of `self.tx`, which is not
            // touched during the call; data iovecs point into the queue's DMA buffer at ranges
            // checked when the entry was made (a slot's region, `slot_base + len <= len(buf)`),
            // and that buffer lives as long as the queue, which outlives the call.
            let sent = unsafe { sys::send_iovecs(self.fd, &iovs[..count]) };
            match sent {
                Ok(n) => {
                    busy = true;
                    self.advance_tx(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break,
                Err(error) => {
                    self.close(&format!("send failed: {error}"));
                    break;
                }
            }
        }
        busy
    }

    fn advance_tx(&mut self, mut n: usize) {
        let mut close = false;
        while n > 0 {
            let Some(front) = self.tx.front_mut() else {
                break;
            };
            let left = front.total() - front.sent;
            if n < left {
                front.sent += n;
                break;
            }
            n -= left;
            let slot = front.free_slot;
            close |= front.close_after;
            self.tx.pop_front();
            if slot != NO_SLOT {
                if let Some(queue) = self.queue.as_mut() {
                    queue.slots[usize::from(slot)] = FREE_SLOT;
                    queue.free.push(slot);
                }
            }
        }
        if close {
            self.close("closing after the last response");
        }
    }
}

/// Opens channels for the subsystem's namespaces that have none on this queue and retires
/// those whose namespace is gone.
fn open_channels(queue: &mut Queue) {
    let Some(subsystem) = queue.ctrlr.subsystem.clone() else {
        return;
    };
    queue.ns_generation = subsystem.ns_generation();
    let namespaces = subsystem.namespaces();
    let mut old: Vec<NsChannel> = queue.channels.drain(..).flatten().collect();
    let max_nsid = namespaces.iter().map(|ns| ns.nsid).max().unwrap_or(0);
    queue.channels.resize_with(max_nsid as usize, || None);
    for ns in namespaces {
        let reuse = old
            .iter()
            .position(|c| c.nsid == ns.nsid && c.bdev == ns.bdev)
            .map(|at| old.swap_remove(at));
        let channel = match reuse {
            Some(channel) => channel,
            None => match ns.desc.channel(u32::from(queue.depth)) {
                Ok(channel) => NsChannel {
                    nsid: ns.nsid,
                    bdev: ns.bdev.clone(),
                    block_size_bytes: u64::from(ns.block_size_bytes),
                    num_blocks: ns.num_blocks,
                    flush: ns.supports_flush,
                    unmap: ns.supports_unmap,
                    write_zeroes: ns.supports_write_zeroes,
                    channel,
                },
                Err(error) => {
                    tracing::error!(nsid = ns.nsid, bdev = %ns.bdev, %error, "nvmf: no channel for the namespace");
                    continue;
                }
            },
        };
        let index = ns.nsid as usize - 1;
        queue.channels[index] = Some(channel);
    }
    queue
        .retired
        .extend(old.into_iter().filter(|c| c.channel.outstanding() > 0));
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            if queue.outstanding() > 0 {
                tracing::error!(peer = %self.peer, "nvmf: connection dropped with I/O in flight");
            }
            if queue.qid == 0 {
                self.target.remove_controller(&queue.ctrlr);
            } else {
                queue.ctrlr.remove_queue(queue.qid);
            }
        }
    }
}
