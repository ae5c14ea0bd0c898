//! A remote controller: its admin queue, what Identify said, Keep Alive, and the reconnect
//! state machine (SPDK's `ctrlr_loss_timeout_sec`, `reconnect_delay_sec`,
//! `fast_io_fail_timeout_sec`).
//!
//! ```text
//!            channel or admin queue lost, keep alive unanswered
//!   Connected(gen) ───────────────────────────────────────────> Reconnecting(gen)
//!        ^                                                        │   │
//!        │ admin queue up again: gen + 1                          │   │ fast_io_fail_timeout_sec
//!        └────────────────────────────────────────────────────────┘   v
//!                                                               FailIo(gen) (queued I/O fails,
//!   Reconnecting / FailIo ── ctrlr_loss_timeout_sec passed ──>   attempts go on)
//!                             (0: after one failed attempt)   Failed (every I/O fails)
//! ```
//!
//! The state, generation and CNTLID sit in one atomic word that every channel loads once
//! per poll; a channel whose connection belongs to an older generation drops it, keeps its
//! commands and connects a new I/O queue to the new controller (same QID). Attempts run in
//! the admin poller ([`HostCtrlr::poll_admin`], every few milliseconds from the app),
//! the first at once, then every `reconnect_delay_sec`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use pollux_nvme::spec::{
    cns, fctype, fid, opc, Command, ConnectCommand, ConnectData, IdentifyController,
    IdentifyNamespace, PropertyCommand, CNTLID_DYNAMIC, IDENTIFY_BYTES,
};

use super::params::TcpAttachOptions;
use super::qpair::{DataDir, QpairOptions, TcpQpair};
use crate::NvmfError;

/// The admin queue's depth (keep alive and the setup path's commands).
const ADMIN_DEPTH: u16 = 16;
/// Admin in-capsule data (NVMe/TCP: 8 KiB on an admin queue).
pub(crate) const ADMIN_IN_CAPSULE_BYTES: u32 = 8192;
const ADMIN_DATA_BYTES: u32 = 8192;
/// CC: EN, IOSQES 6 (64-byte SQEs), IOCQES 4 (16-byte CQEs).
const CC_ENABLE: u32 = 0x0046_0001;
const REG_CAP: u32 = 0x00;
const REG_CC: u32 = 0x14;
const REG_CSTS: u32 = 0x1c;
const KEEP_ALIVE_TAG: u64 = 1;
/// Largest command data when the controller sets no MDTS.
const NO_MDTS_DATA_BYTES: u32 = 1 << 20;

/// The controller's state (the low byte of its atomic word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCtrlrState {
    Connected,
    Reconnecting,
    /// Reconnecting, and queued I/O fails (fast_io_fail_timeout_sec passed).
    FailIo,
    /// Given up (ctrlr_loss_timeout_sec passed): every I/O fails.
    Failed,
    Detached,
}

impl HostCtrlrState {
    fn bits(self) -> u64 {
        match self {
            Self::Connected => 0,
            Self::Reconnecting => 1,
            Self::FailIo => 2,
            Self::Failed => 3,
            Self::Detached => 4,
        }
    }

    fn from_bits(bits: u64) -> Self {
        match bits & 0xff {
            0 => Self::Connected,
            1 => Self::Reconnecting,
            2 => Self::FailIo,
            3 => Self::Failed,
            _ => Self::Detached,
        }
    }

    /// Whether I/O waiting for a connection fails now.
    pub fn fails_io(self) -> bool {
        matches!(self, Self::FailIo | Self::Failed | Self::Detached)
    }
}

/// One load of the controller's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub state: HostCtrlrState,
    pub generation: u32,
    pub cntlid: u16,
}

fn pack(state: HostCtrlrState, generation: u32, cntlid: u16) -> u64 {
    (u64::from(generation) << 32) | (u64::from(cntlid) << 16) | state.bits()
}

fn unpack(word: u64) -> Snapshot {
    Snapshot {
        state: HostCtrlrState::from_bits(word),
        generation: (word >> 32) as u32,
        cntlid: (word >> 16) as u16,
    }
}

/// What Identify and the registers said at attach (kept across reconnects).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity {
    /// CAP.MQES: an I/O queue holds at most this many commands (SQSIZE, 0's based).
    pub mqes: u16,
    /// IOCCSZ * 16 - 64.
    pub in_capsule_bytes: u32,
    /// MDTS in bytes (capped).
    pub max_data_bytes: u32,
    pub granted_queues: u16,
    pub vwc: bool,
    pub oncs: u16,
}

/// A namespace as Identify Namespace described it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NamespaceInfo {
    pub nsid: u32,
    pub block_size_bytes: u32,
    pub num_blocks: u64,
    pub nguid: [u8; 16],
}

struct Admin {
    qpair: Option<TcpQpair>,
    keep_alive_sent: Option<Instant>,
    keep_alive_last: Instant,
    lost_since: Option<Instant>,
    next_attempt: Instant,
    attempts: u32,
}

/// One attached NVMe/TCP controller. See the module documentation.
pub(crate) struct HostCtrlr {
    pub options: TcpAttachOptions,
    pub identity: Identity,
    pub namespaces: Vec<NamespaceInfo>,
    pub bdev_names: Vec<String>,
    /// State, generation and CNTLID (see [`Snapshot`]): loaded once per channel poll,
    /// written on a loss or a reconnect only.
    word: AtomicU64,
    admin: Mutex<Admin>,
    /// Free QIDs (one per channel).
    qids: Mutex<Vec<u16>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn command_failed(options: &TcpAttachOptions, what: &'static str, cqe_status: String) -> NvmfError {
    NvmfError::HostCommand {
        addr: options.addr,
        what,
        status: cqe_status,
    }
}

/// Runs an admin command; a completion that is not a success is an error.
fn admin_command(
    qpair: &mut TcpQpair,
    options: &TcpAttachOptions,
    cmd: Command,
    dir: DataDir,
    data: &mut [u8],
    what: &'static str,
) -> Result<pollux_nvme::spec::Completion, NvmfError> {
    let cqe = qpair.execute(cmd, dir, data, options.connect_timeout(), what, |_, _| {})?;
    if !cqe.status.is_success() {
        return Err(command_failed(
            options,
            what,
            format!("{} (DW0 {:#x})", cqe.status, cqe.dw0),
        ));
    }
    Ok(cqe)
}

/// Fabrics Connect on `qpair`; returns the CNTLID.
pub(crate) fn fabrics_connect(
    qpair: &mut TcpQpair,
    options: &TcpAttachOptions,
    qid: u16,
    sqsize: u16,
    cntlid: u16,
) -> Result<u16, NvmfError> {
    let cmd = ConnectCommand {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato_ms: if qid == 0 {
            options.keep_alive_timeout_ms
        } else {
            0
        },
    }
    .to_command();
    let mut data = ConnectData {
        hostid: options.hostid,
        cntlid,
        subnqn: options.subnqn.clone(),
        hostnqn: options.hostnqn.clone(),
    }
    .encode();
    let cqe = admin_command(
        qpair,
        options,
        cmd,
        DataDir::Write,
        &mut data,
        "Fabrics Connect",
    )?;
    Ok(cqe.dw0 as u16)
}

fn property_get(
    qpair: &mut TcpQpair,
    options: &TcpAttachOptions,
    offset: u32,
    eight_bytes: bool,
) -> Result<u64, NvmfError> {
    let cmd = PropertyCommand {
        eight_bytes,
        offset,
        value: 0,
    }
    .to_command(fctype::PROPERTY_GET);
    let cqe = admin_command(qpair, options, cmd, DataDir::None, &mut [], "Property Get")?;
    Ok(u64::from(cqe.dw0) | (u64::from(cqe.dw1) << 32))
}

/// A new admin queue, connected and the controller enabled; returns it, the CNTLID and CAP.
pub(crate) fn connect_admin(options: &TcpAttachOptions) -> Result<(TcpQpair, u16, u64), NvmfError> {
    let timeout = options.connect_timeout();
    let mut qpair = TcpQpair::connect(
        options.addr,
        timeout,
        QpairOptions {
            depth: ADMIN_DEPTH,
            digests: options.digests,
            in_capsule_bytes: ADMIN_IN_CAPSULE_BYTES,
            max_data_bytes: ADMIN_DATA_BYTES,
            max_iovs: 1,
        },
    )?;
    qpair.wait_ready(timeout)?;
    let cntlid = fabrics_connect(&mut qpair, options, 0, ADMIN_DEPTH * 2 - 1, CNTLID_DYNAMIC)?;
    let cap = property_get(&mut qpair, options, REG_CAP, true)?;
    let set = PropertyCommand {
        eight_bytes: false,
        offset: REG_CC,
        value: u64::from(CC_ENABLE),
    }
    .to_command(fctype::PROPERTY_SET);
    admin_command(
        &mut qpair,
        options,
        set,
        DataDir::None,
        &mut [],
        "Property Set CC.EN",
    )?;
    // CAP.TO: the worst case for CSTS.RDY, in 500 ms units; bounded by our own timeout.
    let to = Duration::from_millis(((cap >> 24) & 0xff).max(1) * 500).min(timeout);
    let deadline = Instant::now() + to;
    loop {
        let csts = property_get(&mut qpair, options, REG_CSTS, false)?;
        if csts & 2 != 0 {
            return Err(NvmfError::HostController {
                addr: options.addr,
                reason: "CSTS.CFS set while enabling".to_string(),
            });
        }
        if csts & 1 != 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(NvmfError::HostTimeout {
                addr: options.addr,
                what: "CSTS.RDY",
                timeout_ms: to.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((qpair, cntlid, cap))
}

/// Set Features Number of Queues; returns the queues granted (the smaller of SQs and CQs).
fn set_queues(
    qpair: &mut TcpQpair,
    options: &TcpAttachOptions,
    wanted: u16,
) -> Result<u16, NvmfError> {
    let mut cmd = Command::new(opc::SET_FEATURES);
    cmd.cdw10 = u32::from(fid::NUMBER_OF_QUEUES);
    let n = u32::from(wanted.max(1) - 1);
    cmd.cdw11 = n | (n << 16);
    let cqe = admin_command(
        qpair,
        options,
        cmd,
        DataDir::None,
        &mut [],
        "Set Features Number of Queues",
    )?;
    let sqs = (cqe.dw0 & 0xffff) as u16;
    let cqs = (cqe.dw0 >> 16) as u16;
    Ok(sqs.min(cqs).saturating_add(1).min(wanted))
}

fn identify(
    qpair: &mut TcpQpair,
    options: &TcpAttachOptions,
    cns_value: u8,
    nsid: u32,
    page: &mut [u8; IDENTIFY_BYTES],
) -> Result<(), NvmfError> {
    let mut cmd = Command::new(opc::IDENTIFY);
    cmd.nsid = nsid;
    cmd.cdw10 = u32::from(cns_value);
    admin_command(qpair, options, cmd, DataDir::Read, page, "Identify")?;
    Ok(())
}

impl HostCtrlr {
    /// Connects, enables and identifies the controller; lists its namespaces.
    pub(crate) fn connect(options: TcpAttachOptions) -> Result<Self, NvmfError> {
        let (mut qpair, cntlid, cap) = connect_admin(&options)?;
        let mut page = [0u8; IDENTIFY_BYTES];
        identify(&mut qpair, &options, cns::CONTROLLER, 0, &mut page)?;
        let id = IdentifyController::parse(&page);
        if id.cntrltype == pollux_nvme::spec::CNTRLTYPE_DISCOVERY {
            return Err(NvmfError::HostController {
                addr: options.addr,
                reason: format!("{} is a discovery controller", options.subnqn),
            });
        }
        let page_bytes = 1u64 << (12 + ((cap >> 48) & 0xf));
        let max_data_bytes = if id.mdts == 0 {
            NO_MDTS_DATA_BYTES
        } else {
            page_bytes
                .checked_shl(u32::from(id.mdts))
                .map_or(NO_MDTS_DATA_BYTES, |b| {
                    b.min(u64::from(NO_MDTS_DATA_BYTES)) as u32
                })
        };
        let in_capsule_bytes = (id.ioccsz.saturating_mul(16)).saturating_sub(64);
        let granted = set_queues(&mut qpair, &options, options.num_io_queues)?;
        identify(
            &mut qpair,
            &options,
            cns::ACTIVE_NAMESPACE_LIST,
            0,
            &mut page,
        )?;
        let nsids = pollux_nvme::spec::parse_active_ns_list(&page);
        let mut namespaces = Vec::with_capacity(nsids.len());
        for nsid in nsids {
            identify(&mut qpair, &options, cns::NAMESPACE, nsid, &mut page)?;
            let ns = IdentifyNamespace::parse(&page);
            let Some(block_size_bytes) = ns.block_size_bytes() else {
                tracing::warn!(
                    nsid,
                    "nvmf host: namespace with an unusable LBA format skipped"
                );
                continue;
            };
            if ns.nsze == 0 {
                continue;
            }
            namespaces.push(NamespaceInfo {
                nsid,
                block_size_bytes,
                num_blocks: ns.nsze,
                nguid: ns.nguid,
            });
        }
        let identity = Identity {
            mqes: (cap & 0xffff) as u16,
            in_capsule_bytes,
            max_data_bytes,
            granted_queues: granted,
            vwc: id.vwc & 1 != 0,
            oncs: id.oncs,
        };
        let bdev_names = namespaces
            .iter()
            .map(|ns| format!("{}n{}", options.name, ns.nsid))
            .collect();
        tracing::info!(
            controller = %options.name,
            addr = %options.addr,
            subnqn = %options.subnqn,
            cntlid,
            ?identity,
            namespaces = namespaces.len(),
            "nvmf host: controller connected"
        );
        let now = Instant::now();
        Ok(Self {
            identity,
            namespaces,
            bdev_names,
            word: AtomicU64::new(pack(HostCtrlrState::Connected, 0, cntlid)),
            admin: Mutex::new(Admin {
                qpair: Some(qpair),
                keep_alive_sent: None,
                keep_alive_last: now,
                lost_since: None,
                next_attempt: now,
                attempts: 0,
            }),
            qids: Mutex::new((1..=granted).rev().collect()),
            options,
        })
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        unpack(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn state(&self) -> HostCtrlrState {
        self.snapshot().state
    }

    /// A channel lost its connection under `generation`: the controller starts
    /// reconnecting (unless it already moved on).
    pub(crate) fn report_lost(&self, generation: u32) {
        let current = self.word.load(Ordering::Acquire);
        let snap = unpack(current);
        if snap.state == HostCtrlrState::Connected && snap.generation == generation {
            let lost = pack(HostCtrlrState::Reconnecting, generation, snap.cntlid);
            if self
                .word
                .compare_exchange(current, lost, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                tracing::warn!(controller = %self.options.name, "nvmf host: I/O connection lost, reconnecting");
            }
        }
    }

    fn set_state(&self, state: HostCtrlrState, generation: u32, cntlid: u16) {
        self.word
            .store(pack(state, generation, cntlid), Ordering::Release);
    }

    pub(crate) fn take_qid(&self) -> Option<u16> {
        lock(&self.qids).pop()
    }

    pub(crate) fn put_qid(&self, qid: u16) {
        lock(&self.qids).push(qid);
    }

    /// Forgets the controller: channels fail their I/O, the admin queue closes.
    pub(crate) fn detach(&self) {
        let snap = self.snapshot();
        self.set_state(HostCtrlrState::Detached, snap.generation, snap.cntlid);
        let mut admin = lock(&self.admin);
        if let Some(mut qpair) = admin.qpair.take() {
            qpair.fail("detached");
        }
    }

    /// The admin poller: Keep Alive every KATO / 2, loss detection, reconnect attempts.
    /// Never waits for the lock (skipped while busy). Returns the work done (0: idle).
    pub(crate) fn poll_admin(&self) -> u32 {
        let mut admin = match self.admin.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return 0,
        };
        let snap = self.snapshot();
        let now = Instant::now();
        match snap.state {
            HostCtrlrState::Detached | HostCtrlrState::Failed => 0,
            HostCtrlrState::Connected => self.poll_connected(&mut admin, snap, now),
            HostCtrlrState::Reconnecting | HostCtrlrState::FailIo => {
                self.poll_reconnect(&mut admin, snap, now)
            }
        }
    }

    fn poll_connected(&self, admin: &mut Admin, snap: Snapshot, now: Instant) -> u32 {
        let kato = Duration::from_millis(u64::from(self.options.keep_alive_timeout_ms));
        let mut work = 0;
        let mut ka_failed = false;
        let lost = match admin.qpair.as_mut() {
            None => true,
            Some(qpair) => {
                let mut answered = false;
                work += qpair.poll(|tag, cqe| {
                    if tag == KEEP_ALIVE_TAG {
                        answered = true;
                        ka_failed |= !cqe.status.is_success();
                    }
                }) as u32;
                if answered {
                    admin.keep_alive_sent = None;
                }
                let unanswered = admin
                    .keep_alive_sent
                    .is_some_and(|sent| !kato.is_zero() && now.duration_since(sent) >= kato);
                if !qpair.is_failed()
                    && !kato.is_zero()
                    && admin.keep_alive_sent.is_none()
                    && now.duration_since(admin.keep_alive_last) >= kato / 2
                {
                    admin.keep_alive_last = now;
                    match qpair.submit(
                        Command::new(opc::KEEP_ALIVE),
                        KEEP_ALIVE_TAG,
                        DataDir::None,
                        &[],
                    ) {
                        Ok(_) => {
                            admin.keep_alive_sent = Some(now);
                            work += 1;
                        }
                        Err(refused) => {
                            tracing::warn!(controller = %self.options.name, ?refused, "nvmf host: Keep Alive not sent");
                        }
                    }
                }
                qpair.is_failed() || unanswered || ka_failed
            }
        };
        if lost {
            tracing::warn!(
                controller = %self.options.name,
                keep_alive_failed = ka_failed,
                "nvmf host: admin connection lost, reconnecting"
            );
            let current = pack(HostCtrlrState::Connected, snap.generation, snap.cntlid);
            let _ = self.word.compare_exchange(
                current,
                pack(HostCtrlrState::Reconnecting, snap.generation, snap.cntlid),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            work += 1;
        }
        work
    }

    fn poll_reconnect(&self, admin: &mut Admin, snap: Snapshot, now: Instant) -> u32 {
        let lost_since = match admin.lost_since {
            Some(t) => t,
            None => {
                // First poll after the loss: close the old admin queue (the target then
                // drops the controller and its I/O queues) and try at once.
                if let Some(mut qpair) = admin.qpair.take() {
                    qpair.fail("reconnecting");
                }
                admin.lost_since = Some(now);
                admin.next_attempt = now;
                admin.attempts = 0;
                now
            }
        };
        let elapsed = now.duration_since(lost_since);
        let o = &self.options;
        if snap.state == HostCtrlrState::Reconnecting
            && o.fast_io_fail_timeout_sec > 0
            && elapsed >= Duration::from_secs(o.fast_io_fail_timeout_sec)
        {
            tracing::warn!(controller = %o.name, "nvmf host: fast_io_fail_timeout_sec passed, failing queued I/O");
            self.set_state(HostCtrlrState::FailIo, snap.generation, snap.cntlid);
        }
        if now >= admin.next_attempt {
            admin.attempts += 1;
            match self.reconnect_admin() {
                Ok((qpair, cntlid)) => {
                    let generation = snap.generation.wrapping_add(1);
                    admin.qpair = Some(qpair);
                    admin.lost_since = None;
                    admin.keep_alive_sent = None;
                    admin.keep_alive_last = Instant::now();
                    self.set_state(HostCtrlrState::Connected, generation, cntlid);
                    tracing::info!(
                        controller = %o.name,
                        cntlid,
                        generation,
                        attempts = admin.attempts,
                        "nvmf host: controller reconnected"
                    );
                    return 1;
                }
                Err(error) => {
                    tracing::info!(controller = %o.name, attempt = admin.attempts, error = %pollux_error_chain(&error), "nvmf host: reconnect attempt failed");
                    admin.next_attempt =
                        Instant::now() + Duration::from_secs(o.reconnect_delay_sec);
                }
            }
        }
        let loss = o.ctrlr_loss_timeout_sec;
        if loss >= 0
            && admin.attempts > 0
            && now.duration_since(lost_since) >= Duration::from_secs(loss as u64)
        {
            tracing::error!(controller = %o.name, "nvmf host: ctrlr_loss_timeout_sec passed, controller failed (its I/O fails until it is detached)");
            let snap = self.snapshot();
            self.set_state(HostCtrlrState::Failed, snap.generation, snap.cntlid);
        }
        1
    }

    fn reconnect_admin(&self) -> Result<(TcpQpair, u16), NvmfError> {
        let (mut qpair, cntlid, _cap) = connect_admin(&self.options)?;
        let granted = set_queues(&mut qpair, &self.options, self.options.num_io_queues)?;
        if granted < self.identity.granted_queues {
            return Err(NvmfError::HostController {
                addr: self.options.addr,
                reason: format!(
                    "granted {granted} I/O queues after the reconnect, {} before",
                    self.identity.granted_queues
                ),
            });
        }
        Ok((qpair, cntlid))
    }
}

/// An error and its causes on one line (for logs).
fn pollux_error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
