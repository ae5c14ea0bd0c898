//! Controllers (NVMe over Fabrics 1.1, 3.2: the dynamic controller model): one per admin
//! queue Connect, with its property registers (CAP, VS, CC, CSTS), keep alive state and the
//! admin commands a host sends (Identify, Get Log Page, Set / Get Features, Keep Alive,
//! Property Get / Set, Asynchronous Event Request).
//!
//! A controller is shared by its queues, which may be on different poll groups: everything
//! the I/O path reads is an atomic (the `failed` flag, once per poll); the queue set is
//! behind a lock taken only at Connect and at disconnect.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pollux_nvme::spec::{
    self, cns, fid, lid, nidt, opc, sc, Command, IdentifyController, IdentifyNamespace, LbaFormat,
    PropertyCommand, Status, StatusCodeType, CNTRLTYPE_DISCOVERY, CNTRLTYPE_IO, DISCOVERY_NQN,
    IDENTIFY_BYTES,
};

use crate::subsystem::{lock, Subsystem};
use crate::transport::{TcpTransportOptions, ADMIN_MAX_DATA_BYTES};

/// Controller IDs are 1..=0xffef (0xfff0 and above are reserved; SPDK's range).
pub const MAX_CNTLID: u16 = 0xffef;
/// Keep Alive Support granularity reported (KAS, 100 ms units): 1 s.
pub const KAS_100MS: u16 = 10;
/// Asynchronous Event Requests held at once (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Error log entries (ELPE + 1): one, always empty.
const ERROR_LOG_ENTRIES: usize = 1;
/// NVMe 1.3: the version this controller implements (VS and Identify VER).
pub const NVME_VERSION: u32 = 0x0001_0300;
/// Registers (property offsets, NVMe Base 2.0 3.1.3).
const PROP_CAP: u32 = 0x00;
const PROP_VS: u32 = 0x08;
const PROP_CC: u32 = 0x14;
const PROP_CSTS: u32 = 0x1c;
/// CC.EN, CC.SHN; CSTS.RDY, CSTS.SHST = shutdown complete.
const CC_EN: u32 = 1;
const CC_SHN_MASK: u32 = 3 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;
/// CAP.TO in 500 ms units: 15 s to become ready (it is at once).
const CAP_TO_500MS: u64 = 30;

/// An I/O controller of a subsystem, or a discovery controller.
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    /// `None` for a discovery controller.
    pub subsystem: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub transport: TcpTransportOptions,
    /// Keep Alive Timeout (ms, 0: off): from Connect, changed by Set Features.
    kato_ms: AtomicU32,
    /// When the last Keep Alive arrived (ms on the target's clock).
    last_keep_alive_ms: AtomicU64,
    cc: AtomicU32,
    csts: AtomicU32,
    /// I/O queues granted (Set Features Number of Queues; the transport's maximum until then).
    io_queues: AtomicU32,
    async_event_config: AtomicU32,
    /// The keep alive timer expired, the admin queue went away or the subsystem was deleted:
    /// every queue of the controller closes.
    failed: AtomicBool,
    /// Queue IDs connected (setup path only).
    qids: Mutex<Vec<u16>>,
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsystem: Option<Arc<Subsystem>>,
        hostnqn: &str,
        hostid: [u8; 16],
        transport: TcpTransportOptions,
        kato_ms: u32,
        now_ms: u64,
    ) -> Self {
        Self {
            cntlid,
            subsystem,
            hostnqn: hostnqn.to_string(),
            hostid,
            transport,
            kato_ms: AtomicU32::new(kato_ms),
            last_keep_alive_ms: AtomicU64::new(now_ms),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            io_queues: AtomicU32::new(u32::from(transport.max_io_qpairs_per_ctrlr)),
            async_event_config: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            qids: Mutex::new(vec![0]),
        }
    }

    pub fn is_discovery(&self) -> bool {
        self.subsystem.is_none()
    }

    /// The subsystem NQN the controller belongs to.
    pub fn subnqn(&self) -> &str {
        self.subsystem
            .as_ref()
            .map_or(DISCOVERY_NQN, |s| s.nqn.as_str())
    }

    /// Whether its queues must close (checked once per poll by each queue).
    #[inline]
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
            || self.subsystem.as_ref().is_some_and(|s| s.is_deleted())
    }

    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn keep_alive(&self, now_ms: u64) {
        self.last_keep_alive_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether the keep alive timer expired at `now_ms` (NVMe Base 2.0, 3.9.4: no Keep Alive
    /// within KATO).
    pub(crate) fn keep_alive_expired(&self, now_ms: u64) -> bool {
        let kato = u64::from(self.kato_ms());
        kato != 0 && now_ms.saturating_sub(self.last_keep_alive_ms.load(Ordering::Relaxed)) > kato
    }

    pub fn is_enabled(&self) -> bool {
        self.csts.load(Ordering::Acquire) & CSTS_RDY != 0
    }

    /// Registers I/O queue `qid`: `Err(reason)` when it is beyond the granted queues or
    /// connected already.
    pub(crate) fn add_io_queue(&self, qid: u16) -> Result<(), &'static str> {
        if u32::from(qid) > self.io_queues.load(Ordering::Acquire) {
            return Err("beyond the I/O queues the controller has");
        }
        let mut qids = lock(&self.qids);
        if qids.contains(&qid) {
            return Err("connected already");
        }
        qids.push(qid);
        Ok(())
    }

    pub(crate) fn remove_queue(&self, qid: u16) {
        lock(&self.qids).retain(|q| *q != qid);
    }

    /// The CAP property (NVMe Base 2.0, 3.1.3.1): MQES, CQR, TO, CSS = NVM, MPSMIN = MPSMAX =
    /// 4 KiB.
    fn cap(&self) -> u64 {
        let mqes = u64::from(self.transport.max_queue_depth - 1);
        mqes | (1 << 16) | (CAP_TO_500MS << 24) | (1 << 37)
    }

    /// Property Get (NVMe-oF 1.1, 3.4): the value, or `None` for an offset that is not a
    /// register (Invalid Field).
    pub(crate) fn property_get(&self, prop: &PropertyCommand) -> Option<u64> {
        match (prop.offset, prop.eight_bytes) {
            (PROP_CAP, true) => Some(self.cap()),
            (PROP_VS, false) => Some(u64::from(NVME_VERSION)),
            (PROP_CC, false) => Some(u64::from(self.cc.load(Ordering::Acquire))),
            (PROP_CSTS, false) => Some(u64::from(self.csts.load(Ordering::Acquire))),
            _ => None,
        }
    }

    /// Property Set: only CC is writable (EN: ready at once; SHN: shutdown complete at once).
    pub(crate) fn property_set(&self, prop: &PropertyCommand) -> bool {
        if prop.offset != PROP_CC || prop.eight_bytes {
            return false;
        }
        let cc = prop.value as u32;
        self.cc.store(cc, Ordering::Release);
        let mut csts = if cc & CC_EN != 0 { CSTS_RDY } else { 0 };
        if cc & CC_SHN_MASK != 0 {
            csts |= CSTS_SHST_COMPLETE;
        }
        self.csts.store(csts, Ordering::Release);
        tracing::debug!(
            cntlid = self.cntlid,
            cc = format_args!("{cc:#x}"),
            "nvmf: CC set"
        );
        true
    }

    /// Identify Controller (NVMe Base 2.0 5.17.2.1, with the fabrics fields Linux checks:
    /// ICDOFF 0, SGLS with keyed and offset SGLs, MAXCMD, IOCCSZ / IORCSZ).
    pub(crate) fn identify(&self) -> [u8; IDENTIFY_BYTES] {
        let t = &self.transport;
        let (serial, model, nn, oncs, cntrltype) = match &self.subsystem {
            Some(s) => {
                // Write Zeroes only when every namespace's bdev has it (hosts then fall back
                // to writing zeroes); Dataset Management always (deallocation is advisory).
                let write_zeroes = s.namespaces().iter().all(|ns| ns.supports_write_zeroes);
                let oncs = spec::ONCS_DSM
                    | if write_zeroes {
                        spec::ONCS_WRITE_ZEROES
                    } else {
                        0
                    };
                (
                    s.serial_number.clone(),
                    s.model_number.clone(),
                    s.max_namespaces,
                    oncs,
                    CNTRLTYPE_IO,
                )
            }
            None => (
                "Pollux".to_string(),
                "Pollux Discovery Controller".to_string(),
                0,
                0,
                CNTRLTYPE_DISCOVERY,
            ),
        };
        IdentifyController {
            vid: 0,
            ssvid: 0,
            serial,
            model,
            firmware: env!("CARGO_PKG_VERSION").to_string(),
            ieee_oui: [0; 3],
            cmic: 0,
            mdts: t.mdts(),
            cntlid: self.cntlid,
            version: NVME_VERSION,
            oaes: 0,
            ctratt: 0,
            oacs: 0,
            acl: 3,
            aerl: (AER_LIMIT - 1) as u8,
            // One read-only firmware slot.
            frmw: 0x03,
            // Extended data for Get Log Page (NUMDU, LPOL / LPOU).
            lpa: 0x04,
            elpe: (ERROR_LOG_ENTRIES - 1) as u8,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: t.max_queue_depth,
            nn,
            oncs,
            fuses: 0,
            fna: 0,
            // A volatile write cache: hosts send flushes, which reach the bdevs.
            vwc: if self.is_discovery() { 0 } else { 1 },
            awun: 0,
            awupf: 0,
            // SGLs supported (no alignment), keyed SGL data block, SGL offset (what Linux's
            // nvme-tcp uses: transport data blocks and in-capsule offsets).
            sgls: 0x0010_0005,
            subnqn: self.subnqn().to_string(),
            cntrltype,
            kas: KAS_100MS,
            ioccsz: (64 + t.in_capsule_data_size) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
        }
        .encode()
    }
}

/// What an admin command produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdminOutcome {
    /// Respond now; `data_len` bytes of the output buffer go to the host first.
    Done {
        status: Status,
        dw0: u32,
        dw1: u32,
        data_len: usize,
    },
    /// An Asynchronous Event Request: held until there is an event (never, here: no
    /// asynchronous events are reported) or the controller goes away.
    HoldAer,
}

impl AdminOutcome {
    pub(crate) fn status(status: Status) -> Self {
        AdminOutcome::Done {
            status,
            dw0: 0,
            dw1: 0,
            data_len: 0,
        }
    }

    fn ok() -> Self {
        Self::status(Status::SUCCESS)
    }

    fn data(len: usize) -> Self {
        AdminOutcome::Done {
            status: Status::SUCCESS,
            dw0: 0,
            dw1: 0,
            data_len: len,
        }
    }

    fn dw0(dw0: u32) -> Self {
        AdminOutcome::Done {
            status: Status::SUCCESS,
            dw0,
            dw1: 0,
            data_len: 0,
        }
    }
}

fn invalid_field() -> AdminOutcome {
    AdminOutcome::status(Status::generic(sc::INVALID_FIELD).with_dnr(true))
}

/// What the admin handler needs from around the controller.
pub(crate) struct AdminContext<'a> {
    pub ctrlr: &'a Controller,
    /// The discovery log, when the controller is a discovery controller (built by the caller
    /// for the host: `discovery.rs`).
    pub discovery_log: &'a dyn Fn(&mut Vec<u8>),
    pub now_ms: u64,
    /// AERs held on this admin queue.
    pub aers_held: usize,
}

/// Handles an admin command (not Connect, which the connection handles). `transfer_len` is
/// the data length the command's SGL describes; controller-to-host data is written to `out`
/// (cleared first), at most `transfer_len` bytes of it are sent.
pub(crate) fn admin_command(
    cx: &AdminContext<'_>,
    cmd: &Command,
    transfer_len: usize,
    out: &mut Vec<u8>,
) -> AdminOutcome {
    out.clear();
    let ctrlr = cx.ctrlr;
    let fits = |len: usize| len.min(transfer_len);
    match cmd.opcode {
        opc::IDENTIFY => {
            let page = match identify_page(ctrlr, cmd) {
                Ok(page) => page,
                Err(outcome) => return outcome,
            };
            out.extend_from_slice(&page);
            AdminOutcome::data(fits(IDENTIFY_BYTES))
        }
        opc::GET_LOG_PAGE => get_log_page(cx, cmd, transfer_len, out),
        opc::SET_FEATURES => set_features(ctrlr, cmd),
        opc::GET_FEATURES => get_features(ctrlr, cmd),
        opc::KEEP_ALIVE => {
            ctrlr.keep_alive(cx.now_ms);
            AdminOutcome::ok()
        }
        opc::ASYNC_EVENT_REQUEST => {
            if cx.aers_held >= AER_LIMIT {
                AdminOutcome::status(Status::new(
                    StatusCodeType::CommandSpecific,
                    sc::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED,
                ))
            } else {
                AdminOutcome::HoldAer
            }
        }
        // Nothing is ever aborted (DW0 bit 0 set: not aborted).
        opc::ABORT => AdminOutcome::dw0(1),
        _ => AdminOutcome::status(Status::generic(sc::INVALID_OPCODE).with_dnr(true)),
    }
}

fn identify_page(ctrlr: &Controller, cmd: &Command) -> Result<[u8; IDENTIFY_BYTES], AdminOutcome> {
    let cns_value = cmd.cdw10 as u8;
    match cns_value {
        cns::CONTROLLER => Ok(ctrlr.identify()),
        cns::NAMESPACE => {
            let ns = namespace(ctrlr, cmd.nsid)?;
            let lbads = ns.block_size_bytes.trailing_zeros() as u8;
            Ok(IdentifyNamespace {
                nsze: ns.num_blocks,
                ncap: ns.num_blocks,
                nuse: ns.num_blocks,
                nsfeat: 0,
                lba_format_count: 1,
                flbas: 0,
                mc: 0,
                dpc: 0,
                dps: 0,
                nguid: ns.nguid,
                eui64: [0; 8],
                lba_formats: vec![LbaFormat {
                    metadata_bytes: 0,
                    lba_data_size_log2: lbads,
                    relative_performance: 0,
                }],
            }
            .encode())
        }
        cns::ACTIVE_NAMESPACE_LIST => {
            let mut page = [0u8; IDENTIFY_BYTES];
            if let Some(subsystem) = &ctrlr.subsystem {
                // NSIDs above the command's, increasing (NVMe Base 2.0, 5.17.2.2).
                let above = subsystem
                    .namespaces()
                    .into_iter()
                    .filter(|ns| ns.nsid > cmd.nsid)
                    .take(IDENTIFY_BYTES / 4);
                for (index, ns) in above.enumerate() {
                    page[index * 4..index * 4 + 4].copy_from_slice(&ns.nsid.to_le_bytes());
                }
            }
            Ok(page)
        }
        cns::NAMESPACE_DESCRIPTOR_LIST => {
            let ns = namespace(ctrlr, cmd.nsid)?;
            Ok(spec::encode_ns_descriptors(&[
                (nidt::NGUID, &ns.nguid),
                (nidt::UUID, &ns.uuid.0),
                (nidt::CSI, &[0]),
            ]))
        }
        // The NVM command set's controller page: all limits 0 (none).
        cns::CS_CONTROLLER if (cmd.cdw11 >> 24) == 0 && !ctrlr.is_discovery() => {
            Ok([0u8; IDENTIFY_BYTES])
        }
        _ => Err(invalid_field()),
    }
}

fn namespace(ctrlr: &Controller, nsid: u32) -> Result<crate::subsystem::Namespace, AdminOutcome> {
    ctrlr
        .subsystem
        .as_ref()
        .and_then(|s| s.namespace(nsid))
        .ok_or(AdminOutcome::status(
            Status::generic(sc::INVALID_NAMESPACE_OR_FORMAT).with_dnr(true),
        ))
}

/// Get Log Page (NVMe Base 2.0, 5.16): NUMD from NUMDL / NUMDU, the offset from LPOL / LPOU;
/// the page is built whole and the requested piece sent (nvme-cli reads the discovery log in
/// pieces).
fn get_log_page(
    cx: &AdminContext<'_>,
    cmd: &Command,
    transfer_len: usize,
    out: &mut Vec<u8>,
) -> AdminOutcome {
    let log_id = cmd.cdw10 as u8;
    let numd = ((u64::from(cmd.cdw11 & 0xffff) << 16) | u64::from(cmd.cdw10 >> 16)) + 1;
    let len = numd * 4;
    let offset = u64::from(cmd.cdw12) | (u64::from(cmd.cdw13) << 32);
    if len > u64::from(ADMIN_MAX_DATA_BYTES)
        || len as usize > transfer_len
        || !offset.is_multiple_of(4)
    {
        return invalid_field();
    }
    match log_id {
        lid::DISCOVERY if cx.ctrlr.is_discovery() => (cx.discovery_log)(out),
        lid::ERROR_INFORMATION => out.resize(ERROR_LOG_ENTRIES * spec::ERROR_LOG_ENTRY_BYTES, 0),
        lid::SMART_HEALTH if !cx.ctrlr.is_discovery() => {
            out.resize(spec::SMART_LOG_BYTES, 0);
            // Composite temperature 298 K, available spare 100 % over a 10 % threshold.
            out[1..3].copy_from_slice(&298u16.to_le_bytes());
            out[3] = 100;
            out[4] = 10;
        }
        lid::FIRMWARE_SLOT if !cx.ctrlr.is_discovery() => {
            out.resize(512, 0);
            out[0] = 1;
            let revision = env!("CARGO_PKG_VERSION").as_bytes();
            let n = revision.len().min(8);
            out[8..16].fill(b' ');
            out[8..8 + n].copy_from_slice(&revision[..n]);
        }
        _ => {
            return AdminOutcome::status(
                Status::new(StatusCodeType::CommandSpecific, sc::INVALID_LOG_PAGE).with_dnr(true),
            )
        }
    }
    // The piece asked for; past the end of the page is zeroes.
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(out.len());
    out.drain(..start);
    out.resize(len as usize, 0);
    AdminOutcome::data(len as usize)
}

fn set_features(ctrlr: &Controller, cmd: &Command) -> AdminOutcome {
    let feature = cmd.cdw10 as u8;
    match feature {
        fid::NUMBER_OF_QUEUES if !ctrlr.is_discovery() => {
            // 0's based counts in CDW11 (NSQR low, NCQR high); 0xffff is invalid.
            let nsqr = cmd.cdw11 & 0xffff;
            let ncqr = cmd.cdw11 >> 16;
            if nsqr == 0xffff || ncqr == 0xffff {
                return invalid_field();
            }
            let max = u32::from(ctrlr.transport.max_io_qpairs_per_ctrlr);
            let granted = (nsqr.max(ncqr) + 1).min(max);
            ctrlr.io_queues.store(granted, Ordering::Release);
            AdminOutcome::dw0((granted - 1) | ((granted - 1) << 16))
        }
        fid::KEEP_ALIVE_TIMER => {
            // KATO in ms, rounded up to the granularity reported (KAS).
            let granularity = u32::from(KAS_100MS) * 100;
            let kato = cmd.cdw11.div_ceil(granularity).saturating_mul(granularity);
            ctrlr.kato_ms.store(kato, Ordering::Release);
            ctrlr.keep_alive(ctrlr.last_keep_alive_ms.load(Ordering::Relaxed));
            AdminOutcome::ok()
        }
        fid::ASYNC_EVENT_CONFIG => {
            ctrlr.async_event_config.store(cmd.cdw11, Ordering::Relaxed);
            AdminOutcome::ok()
        }
        fid::ARBITRATION
        | fid::POWER_MANAGEMENT
        | fid::TEMPERATURE_THRESHOLD
        | fid::ERROR_RECOVERY
        | fid::INTERRUPT_COALESCING
            if !ctrlr.is_discovery() =>
        {
            AdminOutcome::ok()
        }
        fid::VOLATILE_WRITE_CACHE if !ctrlr.is_discovery() => AdminOutcome::status(
            Status::new(StatusCodeType::CommandSpecific, sc::FEATURE_NOT_CHANGEABLE).with_dnr(true),
        ),
        _ => invalid_field(),
    }
}

fn get_features(ctrlr: &Controller, cmd: &Command) -> AdminOutcome {
    let feature = cmd.cdw10 as u8;
    match feature {
        fid::NUMBER_OF_QUEUES if !ctrlr.is_discovery() => {
            let granted = ctrlr.io_queues.load(Ordering::Acquire).max(1);
            AdminOutcome::dw0((granted - 1) | ((granted - 1) << 16))
        }
        fid::KEEP_ALIVE_TIMER => AdminOutcome::dw0(ctrlr.kato_ms()),
        fid::ASYNC_EVENT_CONFIG => {
            AdminOutcome::dw0(ctrlr.async_event_config.load(Ordering::Relaxed))
        }
        fid::VOLATILE_WRITE_CACHE if !ctrlr.is_discovery() => AdminOutcome::dw0(1),
        fid::ARBITRATION
        | fid::POWER_MANAGEMENT
        | fid::TEMPERATURE_THRESHOLD
        | fid::ERROR_RECOVERY
        | fid::INTERRUPT_COALESCING
            if !ctrlr.is_discovery() =>
        {
            AdminOutcome::dw0(0)
        }
        _ => invalid_field(),
    }
}
