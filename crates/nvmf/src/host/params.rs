//! `bdev_nvme_attach_controller` with `trtype` TCP: SPDK's parameters
//! (`module/bdev/nvme/bdev_nvme_rpc.c`), checked before anything connects, the same for a
//! `-c` file and for RPC.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use pollux_bdev::config::{CreateContext, Params, PendingBdev};
use pollux_bdev::{BdevError, BdevInfo};

use crate::pdu::Digests;
use crate::subsystem::check_nqn;

use super::{NvmfHostModule, ATTACH_METHOD};

/// NVMe/TCP's well-known port.
pub const DEFAULT_TRSVCID: u16 = 4420;
/// I/O queues asked for (Set Features Number of Queues); one is taken per bdev channel.
pub const DEFAULT_NUM_IO_QUEUES: u16 = 127;
/// SPDK's default `max_bdevs`.
pub const DEFAULT_MAX_BDEVS: u64 = 128;
/// Keep Alive Timeout given at the admin Connect (SPDK's default, 10 s); Keep Alive is
/// sent every half of it.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT_MS: u32 = 10_000;
/// How long one connection attempt (TCP connect, ICReq, Connect, enable) may take when
/// `fabrics_connect_timeout_us` is 0.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every parameter SPDK's attach decodes.
const ATTACH_PARAMS: &[&str] = &[
    "name",
    "trtype",
    "traddr",
    "adrfam",
    "trsvcid",
    "priority",
    "subnqn",
    "hostnqn",
    "hostaddr",
    "hostsvcid",
    "prchk_reftag",
    "prchk_guard",
    "hdgst",
    "ddgst",
    "fabrics_connect_timeout_us",
    "multipath",
    "num_io_queues",
    "ctrlr_loss_timeout_sec",
    "reconnect_delay_sec",
    "fast_io_fail_timeout_sec",
    "psk",
    "max_bdevs",
    "dhchap_key",
    "dhchap_ctrlr_key",
    "allow_unrecognized_csi",
    "keep_alive_timeout_ms",
];

/// A validated TCP attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpAttachOptions {
    /// The controller's name; its bdevs are `<name>n<nsid>`.
    pub name: String,
    /// As given (written back by `save_config`).
    pub traddr: String,
    /// `IPv4` or `IPv6`.
    pub adrfam: String,
    pub trsvcid: u16,
    /// `traddr:trsvcid` resolved.
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    /// Connect's Host Identifier (from a `nqn.2014-08.org.nvmexpress:uuid:` host NQN, else
    /// from the generated UUID).
    pub hostid: [u8; 16],
    pub digests: Digests,
    /// SPDK semantics: -1 reconnects forever, 0 tries once, N gives up (fails I/O) after N s.
    pub ctrlr_loss_timeout_sec: i64,
    /// Time between reconnect attempts (0 with a loss timeout of 0).
    pub reconnect_delay_sec: u64,
    /// Queued I/O fails after this long without a connection while reconnecting goes on
    /// (0: off).
    pub fast_io_fail_timeout_sec: u64,
    pub num_io_queues: u16,
    pub max_bdevs: u64,
    pub keep_alive_timeout_ms: u32,
    /// 0: [`DEFAULT_CONNECT_TIMEOUT`].
    pub fabrics_connect_timeout_us: u64,
}

impl TcpAttachOptions {
    pub fn connect_timeout(&self) -> Duration {
        if self.fabrics_connect_timeout_us == 0 {
            DEFAULT_CONNECT_TIMEOUT
        } else {
            Duration::from_micros(self.fabrics_connect_timeout_us)
        }
    }

    /// The options with SPDK's defaults for a controller at `addr` (tests).
    pub fn new(name: &str, addr: SocketAddr, subnqn: &str) -> Self {
        let (hostnqn, hostid) = default_host();
        Self {
            name: name.to_string(),
            traddr: addr.ip().to_string(),
            adrfam: if addr.is_ipv4() { "IPv4" } else { "IPv6" }.to_string(),
            trsvcid: addr.port(),
            addr,
            subnqn: subnqn.to_string(),
            hostnqn,
            hostid,
            digests: Digests::default(),
            ctrlr_loss_timeout_sec: 0,
            reconnect_delay_sec: 0,
            fast_io_fail_timeout_sec: 0,
            num_io_queues: DEFAULT_NUM_IO_QUEUES,
            max_bdevs: DEFAULT_MAX_BDEVS,
            keep_alive_timeout_ms: DEFAULT_KEEP_ALIVE_TIMEOUT_MS,
            fabrics_connect_timeout_us: 0,
        }
    }

    /// The `save_config` entry that attaches this controller again.
    pub fn to_config(&self) -> serde_json::Value {
        let mut params = serde_json::json!({
            "name": self.name,
            "trtype": "TCP",
            "adrfam": self.adrfam,
            "traddr": self.traddr,
            "trsvcid": self.trsvcid.to_string(),
            "subnqn": self.subnqn,
            "hostnqn": self.hostnqn,
            "hdgst": self.digests.header,
            "ddgst": self.digests.data,
            "ctrlr_loss_timeout_sec": self.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": self.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": self.fast_io_fail_timeout_sec,
        });
        if self.num_io_queues != DEFAULT_NUM_IO_QUEUES {
            params["num_io_queues"] = self.num_io_queues.into();
        }
        if self.max_bdevs != DEFAULT_MAX_BDEVS {
            params["max_bdevs"] = self.max_bdevs.into();
        }
        if self.keep_alive_timeout_ms != DEFAULT_KEEP_ALIVE_TIMEOUT_MS {
            params["keep_alive_timeout_ms"] = self.keep_alive_timeout_ms.into();
        }
        if self.fabrics_connect_timeout_us != 0 {
            params["fabrics_connect_timeout_us"] = self.fabrics_connect_timeout_us.into();
        }
        serde_json::json!({ "method": ATTACH_METHOD, "params": params })
    }
}

/// A host NQN and ID from a fresh UUID (the kernel's), as SPDK makes one when none is given.
fn default_host() -> (String, [u8; 16]) {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "00000000-0000-0000-0000-000000000001".to_string());
    let hostid = uuid_bytes(&uuid).unwrap_or([0; 16]);
    (format!("nqn.2014-08.org.nvmexpress:uuid:{uuid}"), hostid)
}

/// The 16 bytes of a textual UUID.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Whether `trtype` names TCP (any case).
pub fn is_tcp(params: &Params<'_>) -> bool {
    matches!(params.str("trtype"), Ok(Some(t)) if t.eq_ignore_ascii_case("tcp"))
}

/// SPDK's `bdev_nvme_check_io_error_resiliency_params`.
fn check_resiliency(
    params: &Params<'_>,
    loss: i64,
    delay: u64,
    fast_fail: u64,
) -> Result<(), BdevError> {
    let bad = |key: &'static str, reason: &str| Err(params.invalid(key, reason));
    if loss < -1 {
        return bad("ctrlr_loss_timeout_sec", "must be -1 or more");
    }
    if loss == 0 {
        if delay != 0 || fast_fail != 0 {
            return bad(
                "reconnect_delay_sec",
                "and fast_io_fail_timeout_sec must be 0 when ctrlr_loss_timeout_sec is 0",
            );
        }
        return Ok(());
    }
    if delay == 0 {
        return bad(
            "reconnect_delay_sec",
            "must not be 0 when ctrlr_loss_timeout_sec is not 0",
        );
    }
    if loss > 0 && delay > loss as u64 {
        return bad(
            "reconnect_delay_sec",
            "must not be more than ctrlr_loss_timeout_sec",
        );
    }
    if fast_fail != 0 {
        if fast_fail < delay {
            return bad(
                "fast_io_fail_timeout_sec",
                "must not be less than reconnect_delay_sec",
            );
        }
        if loss > 0 && fast_fail > loss as u64 {
            return bad(
                "fast_io_fail_timeout_sec",
                "must not be more than ctrlr_loss_timeout_sec",
            );
        }
    }
    Ok(())
}

fn static_key(key: &str) -> &'static str {
    ATTACH_PARAMS
        .iter()
        .copied()
        .find(|k| *k == key)
        .unwrap_or("params")
}

/// Parses a TCP `bdev_nvme_attach_controller`: `name`, `traddr` (an IP address or a host
/// name) and `subnqn` required; `adrfam` (IPv4, IPv6), `trsvcid` (4420), `hostnqn`
/// (generated), `hdgst`, `ddgst`, `ctrlr_loss_timeout_sec`, `reconnect_delay_sec`,
/// `fast_io_fail_timeout_sec` (SPDK's rules between them), `num_io_queues`, `max_bdevs`,
/// `fabrics_connect_timeout_us`, `keep_alive_timeout_ms` honoured; `multipath` accepted (one
/// path); TLS (`psk`), DH-HMAC-CHAP keys, protection information, `hostaddr` / `hostsvcid`
/// and `priority` refused by name.
pub fn parse_tcp_attach(params: &Params<'_>) -> Result<TcpAttachOptions, BdevError> {
    params.allow_only(ATTACH_PARAMS)?;
    let name = params.required_str("name")?;
    if name.is_empty() {
        return Err(params.invalid("name", "must not be empty"));
    }
    if !is_tcp(params) {
        return Err(params.invalid("trtype", "must be \"TCP\" here"));
    }
    for key in [
        "psk",
        "dhchap_key",
        "dhchap_ctrlr_key",
        "hostaddr",
        "hostsvcid",
    ] {
        if params.str(key)?.is_some() {
            return Err(params.invalid(
                static_key(key),
                "is not supported by Pollux's NVMe/TCP initiator (no TLS, no in-band authentication, no source address): leave it out",
            ));
        }
    }
    if params.u64("priority")?.is_some_and(|p| p != 0) {
        return Err(params.invalid("priority", "is not supported by Pollux: use 0"));
    }
    for key in ["prchk_reftag", "prchk_guard", "allow_unrecognized_csi"] {
        if params.bool(key)? == Some(true) {
            return Err(params.invalid(static_key(key), "is not supported by Pollux: use false"));
        }
    }
    if let Some(mode) = params.str("multipath")? {
        if !matches!(mode, "disable" | "failover" | "multipath") {
            return Err(params.invalid(
                "multipath",
                "must be \"disable\", \"failover\" or \"multipath\"",
            ));
        }
    }
    let adrfam = match params.str("adrfam")? {
        None => "IPv4",
        Some(a) if a.eq_ignore_ascii_case("ipv4") => "IPv4",
        Some(a) if a.eq_ignore_ascii_case("ipv6") => "IPv6",
        Some(_) => return Err(params.invalid("adrfam", "must be \"IPv4\" or \"IPv6\"")),
    };
    let traddr = params.required_str("traddr")?;
    let trsvcid = match params.str("trsvcid")? {
        None => DEFAULT_TRSVCID,
        Some(s) => s
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| params.invalid("trsvcid", "must be a TCP port (1..=65535)"))?,
    };
    let addr = (traddr, trsvcid)
        .to_socket_addrs()
        .map_err(|e| params.invalid("traddr", &format!("{traddr:?} does not resolve: {e}")))?
        .find(|a| a.is_ipv4() == (adrfam == "IPv4"))
        .ok_or_else(|| params.invalid("traddr", &format!("{traddr:?} has no {adrfam} address")))?;
    let subnqn = params.required_str("subnqn")?;
    check_nqn(subnqn).map_err(|e| params.invalid("subnqn", e))?;
    let (generated_nqn, generated_id) = default_host();
    let hostnqn = match params.str("hostnqn")? {
        Some(nqn) => {
            check_nqn(nqn).map_err(|e| params.invalid("hostnqn", e))?;
            nqn.to_string()
        }
        None => generated_nqn,
    };
    let hostid = hostnqn
        .strip_prefix("nqn.2014-08.org.nvmexpress:uuid:")
        .and_then(uuid_bytes)
        .unwrap_or(generated_id);
    let digests = Digests {
        header: params.bool("hdgst")?.unwrap_or(false),
        data: params.bool("ddgst")?.unwrap_or(false),
    };
    let loss = params.i64("ctrlr_loss_timeout_sec")?.unwrap_or(0);
    let delay = params.u64("reconnect_delay_sec")?.unwrap_or(0);
    let fast_fail = params.u64("fast_io_fail_timeout_sec")?.unwrap_or(0);
    check_resiliency(params, loss, delay, fast_fail)?;
    let num_io_queues = match params.u64("num_io_queues")? {
        None => DEFAULT_NUM_IO_QUEUES,
        Some(q) => u16::try_from(q)
            .ok()
            .filter(|q| (1..u16::MAX).contains(q))
            .ok_or_else(|| params.invalid("num_io_queues", "must be 1 to 65534"))?,
    };
    let max_bdevs = params.u64("max_bdevs")?.unwrap_or(DEFAULT_MAX_BDEVS);
    if max_bdevs == 0 {
        return Err(params.invalid("max_bdevs", "must be greater than 0"));
    }
    let keep_alive_timeout_ms = match params.u64("keep_alive_timeout_ms")? {
        None => DEFAULT_KEEP_ALIVE_TIMEOUT_MS,
        Some(ms) => u32::try_from(ms)
            .ok()
            .filter(|ms| *ms >= 100 || *ms == 0)
            .ok_or_else(|| {
                params.invalid(
                    "keep_alive_timeout_ms",
                    "must be 0 (off) or 100 to 4294967295",
                )
            })?,
    };
    let fabrics_connect_timeout_us = params.u64("fabrics_connect_timeout_us")?.unwrap_or(0);
    Ok(TcpAttachOptions {
        name: name.to_string(),
        traddr: traddr.to_string(),
        adrfam: adrfam.to_string(),
        trsvcid,
        addr,
        subnqn: subnqn.to_string(),
        hostnqn,
        hostid,
        digests,
        ctrlr_loss_timeout_sec: loss,
        reconnect_delay_sec: delay,
        fast_io_fail_timeout_sec: fast_fail,
        num_io_queues,
        max_bdevs,
        keep_alive_timeout_ms,
        fabrics_connect_timeout_us,
    })
}

/// A validated TCP attach, connected in the config's second phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTcpAttach {
    pub options: TcpAttachOptions,
}

impl PendingBdev for PendingTcpAttach {
    fn name(&self) -> Option<&str> {
        Some(&self.options.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        let infos = NvmfHostModule::global().attach(ctx.registry, self.options.clone())?;
        infos
            .into_iter()
            .next()
            .ok_or_else(|| BdevError::InvalidParam {
                method: ATTACH_METHOD.to_string(),
                param: "subnqn",
                reason: format!("{}: the subsystem has no namespace", self.options.subnqn),
                source: None,
            })
    }
}

/// The config method: TCP here, anything else to the PCIe module's parser.
pub fn parse_attach(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    if is_tcp(params) {
        parse_tcp_attach(params)
            .map(|options| Box::new(PendingTcpAttach { options }) as Box<dyn PendingBdev>)
    } else {
        pollux_nvme::bdev::parse_attach(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: serde_json::Value) -> Result<TcpAttachOptions, BdevError> {
        let params = Params::new(ATTACH_METHOD, Some(&value)).expect("params");
        parse_tcp_attach(&params)
    }

    #[test]
    fn spdk_parameters_parse_and_write_back() {
        let options = parse(json!({
            "name": "Nvme0", "trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1",
            "trsvcid": "4421", "subnqn": "nqn.2016-06.io.spdk:cnode1",
            "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:12345678-1234-1234-1234-123456789abc",
            "hdgst": true, "ddgst": false, "ctrlr_loss_timeout_sec": -1,
            "reconnect_delay_sec": 2, "fast_io_fail_timeout_sec": 4
        }))
        .expect("valid");
        assert_eq!(options.addr, "127.0.0.1:4421".parse().expect("addr"));
        assert_eq!(options.hostid[0], 0x12);
        assert_eq!(options.hostid[15], 0xbc);
        assert!(options.digests.header && !options.digests.data);
        let config = options.to_config();
        let again = parse(config["params"].clone()).expect("save_config reloads");
        assert_eq!(again, options);
    }

    #[test]
    fn spdk_resiliency_rules() {
        let base = json!({"name": "N", "trtype": "TCP", "traddr": "127.0.0.1",
            "subnqn": "nqn.2016-06.io.spdk:cnode1"});
        let with = |extra: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().expect("object") {
                v[k] = x.clone();
            }
            parse(v)
        };
        assert!(with(json!({})).is_ok());
        assert!(with(json!({"reconnect_delay_sec": 1})).is_err());
        assert!(with(json!({"ctrlr_loss_timeout_sec": 5})).is_err());
        assert!(with(json!({"ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 6})).is_err());
        assert!(with(json!({"ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 1})).is_ok());
        assert!(with(json!({"ctrlr_loss_timeout_sec": -2, "reconnect_delay_sec": 1})).is_err());
        assert!(with(
            json!({"ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 1,
            "fast_io_fail_timeout_sec": 1})
        )
        .is_ok());
        assert!(with(
            json!({"ctrlr_loss_timeout_sec": 5, "reconnect_delay_sec": 2,
            "fast_io_fail_timeout_sec": 1})
        )
        .is_err());
        assert!(with(json!({"psk": "key"})).is_err());
        assert!(with(json!({"subnqn": "bad"})).is_err());
        assert!(with(json!({"trsvcid": "0"})).is_err());
        assert!(with(json!({"adrfam": "IB"})).is_err());
    }
}
