//! SPDK's `nvmf_*` methods' parameters (names, defaults), parsed the same for a `-c` file and
//! for JSON-RPC (`crates/rpc/src/nvmf.rs` calls these), and the loader of a config's `nvmf`
//! subsystem (what `save_config` writes).
//!
//! SPDK parameters with no effect here are refused by name unless they carry SPDK's default
//! (`tgt_name`: only one target; `ana_reporting`, `secure_channel`, `zcopy`,
//! `dif_insert_or_strip`: false), except the TCP transport's buffer and socket tuning knobs
//! (`num_shared_buffers`, `buf_cache_size`, `c2h_success`, `sock_priority`,
//! `abort_timeout_sec`, `ack_timeout`, `control_msg_num`, `data_wr_pool_size`,
//! `max_qpairs_per_ctrlr`), which SPDK's own `save_config` writes: accepted and ignored, since
//! each slot owns its buffer (see docs/ARCHITECTURE.md).

use std::net::{IpAddr, SocketAddr};

use pollux_bdev::Uuid;
use serde_json::{Map, Value};

use crate::error::NvmfError;
use crate::subsystem::SubsystemOptions;
use crate::target::{NvmfTarget, DEFAULT_TRSVCID};
use crate::transport::TcpTransportOptions;

pub const CREATE_TRANSPORT: &str = "nvmf_create_transport";
pub const GET_TRANSPORTS: &str = "nvmf_get_transports";
pub const CREATE_SUBSYSTEM: &str = "nvmf_create_subsystem";
pub const DELETE_SUBSYSTEM: &str = "nvmf_delete_subsystem";
pub const GET_SUBSYSTEMS: &str = "nvmf_get_subsystems";
pub const ADD_NS: &str = "nvmf_subsystem_add_ns";
pub const REMOVE_NS: &str = "nvmf_subsystem_remove_ns";
pub const ADD_LISTENER: &str = "nvmf_subsystem_add_listener";
pub const REMOVE_LISTENER: &str = "nvmf_subsystem_remove_listener";
pub const ADD_HOST: &str = "nvmf_subsystem_add_host";
pub const REMOVE_HOST: &str = "nvmf_subsystem_remove_host";
pub const ALLOW_ANY_HOST: &str = "nvmf_subsystem_allow_any_host";
/// Methods SPDK's `save_config` writes in the `nvmf` subsystem that set target-wide knobs
/// Pollux does not have: skipped when loading.
pub const SKIPPED_METHODS: &[&str] = &[
    "nvmf_set_config",
    "nvmf_set_max_subsystems",
    "nvmf_set_crdt",
];

/// A parameter that was refused (the RPC layer turns it into `-32602` naming it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{method}: parameter {param:?} {reason}")]
pub struct ParamError {
    pub method: String,
    pub param: String,
    pub reason: String,
}

/// Typed access to one method's `params`.
pub struct Params<'a> {
    method: &'a str,
    map: Option<&'a Map<String, Value>>,
    /// For nested objects (`namespace`, `listen_address`): the parent's name, for errors.
    prefix: &'a str,
}

impl<'a> Params<'a> {
    pub fn new(method: &'a str, value: Option<&'a Value>) -> Result<Self, ParamError> {
        let map = match value {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                return Err(ParamError {
                    method: method.to_string(),
                    param: "params".to_string(),
                    reason: "must be an object".to_string(),
                })
            }
        };
        Ok(Self {
            method,
            map,
            prefix: "",
        })
    }

    fn error(&self, key: &str, reason: impl Into<String>) -> ParamError {
        let param = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        };
        ParamError {
            method: self.method.to_string(),
            param,
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key))
    }

    pub fn allow_only(&self, known: &[&str]) -> Result<(), ParamError> {
        match self
            .map
            .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
        {
            Some(unknown) => Err(self.error(unknown, "is unknown")),
            None => Ok(()),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ParamError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(key, "must be a string")),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&'a str, ParamError> {
        self.str(key)?
            .ok_or_else(|| self.error(key, "is required but missing"))
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, ParamError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(key, "must be an unsigned integer")),
        }
    }

    fn uint<T: TryFrom<u64>>(&self, key: &str, default: T) -> Result<T, ParamError> {
        match self.u64(key)? {
            None => Ok(default),
            Some(v) => T::try_from(v).map_err(|_| self.error(key, format!("= {v} is too large"))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ParamError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.error(key, "must be a boolean")),
        }
    }

    /// A nested object parameter.
    fn object(&self, key: &'a str) -> Result<Params<'a>, ParamError> {
        match self.get(key) {
            Some(Value::Object(map)) => Ok(Params {
                method: self.method,
                map: Some(map),
                prefix: key,
            }),
            None | Some(Value::Null) => Err(self.error(key, "is required but missing")),
            Some(_) => Err(self.error(key, "must be an object")),
        }
    }

    /// Refused unless absent or equal to SPDK's default.
    fn only_default(&self, key: &str, default: &Value, why: &str) -> Result<(), ParamError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(value) if value == default => Ok(()),
            Some(value) => Err(self.error(
                key,
                format!(
                    "= {value} is not supported by Pollux ({why}); leave it out or use {default}"
                ),
            )),
        }
    }

    fn tgt_name(&self) -> Result<(), ParamError> {
        match self.str("tgt_name")? {
            None | Some("nvmf_tgt") => Ok(()),
            Some(other) => Err(self.error(
                "tgt_name",
                format!("= {other:?}: Pollux has one target (nvmf_tgt)"),
            )),
        }
    }
}

/// Tuning knobs of SPDK's TCP transport accepted and ignored (see the module documentation).
const IGNORED_TRANSPORT_KNOBS: &[&str] = &[
    "num_shared_buffers",
    "buf_cache_size",
    "c2h_success",
    "sock_priority",
    "abort_timeout_sec",
    "ack_timeout",
    "control_msg_num",
    "data_wr_pool_size",
    "max_qpairs_per_ctrlr",
];

/// `nvmf_create_transport`.
pub fn parse_transport(
    method: &str,
    value: Option<&Value>,
) -> Result<TcpTransportOptions, ParamError> {
    let p = Params::new(method, value)?;
    let mut known = vec![
        "trtype",
        "tgt_name",
        "max_queue_depth",
        "max_io_qpairs_per_ctrlr",
        "in_capsule_data_size",
        "max_io_size",
        "io_unit_size",
        "max_aq_depth",
        "zcopy",
        "dif_insert_or_strip",
    ];
    known.extend_from_slice(IGNORED_TRANSPORT_KNOBS);
    p.allow_only(&known)?;
    p.tgt_name()?;
    let trtype = p.required_str("trtype")?;
    if !trtype.eq_ignore_ascii_case("tcp") {
        return Err(p.error("trtype", format!("= {trtype:?}: only TCP is supported")));
    }
    p.only_default("zcopy", &Value::Bool(false), "no zero-copy send")?;
    p.only_default("dif_insert_or_strip", &Value::Bool(false), "no DIF")?;
    let d = TcpTransportOptions::default();
    let options = TcpTransportOptions {
        max_queue_depth: p.uint("max_queue_depth", d.max_queue_depth)?,
        max_io_qpairs_per_ctrlr: p.uint("max_io_qpairs_per_ctrlr", d.max_io_qpairs_per_ctrlr)?,
        in_capsule_data_size: p.uint("in_capsule_data_size", d.in_capsule_data_size)?,
        max_io_size: p.uint("max_io_size", d.max_io_size)?,
        io_unit_size: p.uint("io_unit_size", d.io_unit_size)?,
        max_aq_depth: p.uint("max_aq_depth", d.max_aq_depth)?,
    };
    if let Err(NvmfError::TransportOption { option, reason }) = options.validate() {
        return Err(p.error(option, reason));
    }
    Ok(options)
}

/// `nvmf_create_subsystem`.
pub fn parse_create_subsystem(
    method: &str,
    value: Option<&Value>,
) -> Result<SubsystemOptions, ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&[
        "nqn",
        "tgt_name",
        "serial_number",
        "model_number",
        "allow_any_host",
        "max_namespaces",
        "ana_reporting",
        "min_cntlid",
        "max_cntlid",
    ])?;
    p.tgt_name()?;
    p.only_default("ana_reporting", &Value::Bool(false), "no ANA")?;
    p.only_default(
        "min_cntlid",
        &Value::from(1),
        "controller IDs are 1..=65519",
    )?;
    p.only_default(
        "max_cntlid",
        &Value::from(crate::ctrlr::MAX_CNTLID),
        "controller IDs are 1..=65519",
    )?;
    let mut options = SubsystemOptions::new(p.required_str("nqn")?);
    if let Some(serial) = p.str("serial_number")? {
        options.serial_number = serial.to_string();
    }
    if let Some(model) = p.str("model_number")? {
        options.model_number = model.to_string();
    }
    options.allow_any_host = p.bool("allow_any_host")?.unwrap_or(false);
    // SPDK: 0 means the default.
    let max = p.uint("max_namespaces", 0u32)?;
    if max != 0 {
        options.max_namespaces = max;
    }
    Ok(options)
}

/// `nvmf_delete_subsystem`: the NQN.
pub fn parse_nqn(method: &str, value: Option<&Value>) -> Result<String, ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&["nqn", "tgt_name"])?;
    p.tgt_name()?;
    Ok(p.required_str("nqn")?.to_string())
}

/// What `nvmf_subsystem_add_ns` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddNs {
    pub nqn: String,
    pub bdev_name: String,
    pub nsid: Option<u32>,
    pub uuid: Option<Uuid>,
}

/// `nvmf_subsystem_add_ns`.
pub fn parse_add_ns(method: &str, value: Option<&Value>) -> Result<AddNs, ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&["nqn", "namespace", "tgt_name", "no_auto_visible"])?;
    p.tgt_name()?;
    p.only_default(
        "no_auto_visible",
        &Value::Bool(false),
        "namespaces are visible to every allowed host",
    )?;
    let nqn = p.required_str("nqn")?.to_string();
    let ns = p.object("namespace")?;
    ns.allow_only(&["bdev_name", "nsid", "uuid", "ptpl_file", "anagrpid"])?;
    ns.only_default("ptpl_file", &Value::Null, "no reservations")?;
    let nsid = match ns.uint("nsid", 0u32)? {
        0 => None,
        n => Some(n),
    };
    let uuid = match ns.str("uuid")? {
        None => None,
        Some(text) => Some(
            text.parse::<Uuid>()
                .map_err(|e| ns.error("uuid", format!("= {text:?}: {e}")))?,
        ),
    };
    let anagrpid = ns.uint("anagrpid", 0u32)?;
    if anagrpid > 1 {
        return Err(ns.error("anagrpid", "is not supported by Pollux (no ANA)"));
    }
    Ok(AddNs {
        nqn,
        bdev_name: ns.required_str("bdev_name")?.to_string(),
        nsid,
        uuid,
    })
}

/// `nvmf_subsystem_remove_ns`: NQN and NSID.
pub fn parse_remove_ns(method: &str, value: Option<&Value>) -> Result<(String, u32), ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&["nqn", "nsid", "tgt_name"])?;
    p.tgt_name()?;
    let nqn = p.required_str("nqn")?.to_string();
    let nsid = p
        .u64("nsid")?
        .ok_or_else(|| p.error("nsid", "is required but missing"))?;
    let nsid = u32::try_from(nsid).map_err(|_| p.error("nsid", "is too large"))?;
    Ok((nqn, nsid))
}

/// `nvmf_subsystem_add_listener` / `_remove_listener`: NQN and the address.
pub fn parse_listener(
    method: &str,
    value: Option<&Value>,
) -> Result<(String, SocketAddr), ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&[
        "nqn",
        "listen_address",
        "tgt_name",
        "secure_channel",
        "ana_state",
    ])?;
    p.tgt_name()?;
    p.only_default("secure_channel", &Value::Bool(false), "no TLS")?;
    let nqn = p.required_str("nqn")?.to_string();
    let addr = p.object("listen_address")?;
    addr.allow_only(&["trtype", "adrfam", "traddr", "trsvcid"])?;
    let trtype = addr.required_str("trtype")?;
    if !trtype.eq_ignore_ascii_case("tcp") {
        return Err(addr.error("trtype", format!("= {trtype:?}: only TCP is supported")));
    }
    let traddr = addr.required_str("traddr")?;
    let ip: IpAddr = traddr
        .parse()
        .map_err(|_| addr.error("traddr", format!("= {traddr:?} is not an IP address")))?;
    if let Some(adrfam) = addr.str("adrfam")? {
        let matches = match adrfam.to_ascii_lowercase().as_str() {
            "ipv4" => ip.is_ipv4(),
            "ipv6" => ip.is_ipv6(),
            _ => false,
        };
        if !matches {
            return Err(addr.error(
                "adrfam",
                format!("= {adrfam:?} does not name {traddr}'s family (IPv4 or IPv6)"),
            ));
        }
    }
    let port = match addr.str("trsvcid")? {
        None => DEFAULT_TRSVCID,
        Some(text) => text
            .parse::<u16>()
            .map_err(|_| addr.error("trsvcid", format!("= {text:?} is not a TCP port")))?,
    };
    Ok((nqn, SocketAddr::new(ip, port)))
}

/// `nvmf_subsystem_add_host` / `_remove_host`: NQN and the host NQN.
pub fn parse_host(method: &str, value: Option<&Value>) -> Result<(String, String), ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&[
        "nqn",
        "host",
        "tgt_name",
        "psk",
        "dhchap_key",
        "dhchap_ctrlr_key",
    ])?;
    p.tgt_name()?;
    p.only_default("psk", &Value::Null, "no TLS")?;
    p.only_default("dhchap_key", &Value::Null, "no authentication")?;
    p.only_default("dhchap_ctrlr_key", &Value::Null, "no authentication")?;
    Ok((
        p.required_str("nqn")?.to_string(),
        p.required_str("host")?.to_string(),
    ))
}

/// `nvmf_subsystem_allow_any_host`: NQN and the switch.
pub fn parse_allow_any_host(
    method: &str,
    value: Option<&Value>,
) -> Result<(String, bool), ParamError> {
    let p = Params::new(method, value)?;
    p.allow_only(&["nqn", "allow_any_host", "tgt_name"])?;
    p.tgt_name()?;
    let allow = p
        .bool("allow_any_host")?
        .ok_or_else(|| p.error("allow_any_host", "is required but missing"))?;
    Ok((p.required_str("nqn")?.to_string(), allow))
}

/// One parsed entry of a config's `nvmf` subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Transport(TcpTransportOptions),
    Subsystem(SubsystemOptions),
    Listener(String, SocketAddr),
    Host(String, String),
    AllowAnyHost(String, bool),
    Namespace(AddNs),
}

/// Loads a config's `nvmf` subsystem (SPDK's format, what `save_config` writes): every entry
/// is parsed before anything is created, then applied in order; on a failure what was
/// created is deleted again (a transport stays). Other subsystems are ignored.
pub fn apply(target: &NvmfTarget, config: &Value, path: &str) -> Result<(), NvmfError> {
    let entries = config
        .get("subsystems")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|s| s.get("subsystem").and_then(Value::as_str) == Some("nvmf"))
        .filter_map(|s| s.get("config").and_then(Value::as_array))
        .flatten();
    let mut ops: Vec<(usize, String, Op)> = Vec::new();
    for (index, entry) in entries.enumerate() {
        let method = entry
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let params = entry.get("params");
        let fail = |reason: String| NvmfError::Config {
            path: path.to_string(),
            index,
            method: method.clone(),
            reason,
        };
        let op = match method.as_str() {
            CREATE_TRANSPORT => {
                Op::Transport(parse_transport(&method, params).map_err(|e| fail(e.to_string()))?)
            }
            CREATE_SUBSYSTEM => Op::Subsystem(
                parse_create_subsystem(&method, params).map_err(|e| fail(e.to_string()))?,
            ),
            ADD_LISTENER => {
                let (nqn, addr) =
                    parse_listener(&method, params).map_err(|e| fail(e.to_string()))?;
                Op::Listener(nqn, addr)
            }
            ADD_HOST => {
                let (nqn, host) = parse_host(&method, params).map_err(|e| fail(e.to_string()))?;
                Op::Host(nqn, host)
            }
            ALLOW_ANY_HOST => {
                let (nqn, allow) =
                    parse_allow_any_host(&method, params).map_err(|e| fail(e.to_string()))?;
                Op::AllowAnyHost(nqn, allow)
            }
            ADD_NS => {
                Op::Namespace(parse_add_ns(&method, params).map_err(|e| fail(e.to_string()))?)
            }
            m if SKIPPED_METHODS.contains(&m) => continue,
            _ => {
                return Err(fail(
                    "not a method of the nvmf subsystem Pollux loads".to_string(),
                ))
            }
        };
        ops.push((index, method, op));
    }
    let mut created: Vec<String> = Vec::new();
    for (index, method, op) in ops {
        let result = match op {
            Op::Transport(options) => match target.transport() {
                // A second load (framework_start_init retried) finds it already there.
                Some(existing) if existing == options => Ok(()),
                _ => target.create_transport(options),
            },
            Op::Subsystem(options) => target
                .create_subsystem(options)
                .map(|s| created.push(s.nqn.clone())),
            Op::Listener(nqn, addr) => target.add_listener(&nqn, addr).map(|_| ()),
            Op::Host(nqn, host) => target.add_host(&nqn, &host),
            Op::AllowAnyHost(nqn, allow) => target.allow_any_host(&nqn, allow),
            Op::Namespace(ns) => target
                .add_namespace(&ns.nqn, &ns.bdev_name, ns.nsid, ns.uuid)
                .map(|_| ()),
        };
        if let Err(error) = result {
            for nqn in created.iter().rev() {
                let _ = target.delete_subsystem(nqn);
            }
            return Err(NvmfError::Config {
                path: path.to_string(),
                index,
                method,
                reason: pollux_env::error_chain(&error),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spdk_parameters() {
        let t = parse_transport(
            CREATE_TRANSPORT,
            Some(&json!({"trtype": "TCP", "max_queue_depth": 64, "num_shared_buffers": 511})),
        )
        .unwrap();
        assert_eq!(t.max_queue_depth, 64);
        assert_eq!(t.max_io_size, 131072);
        let e = parse_transport(CREATE_TRANSPORT, Some(&json!({"trtype": "RDMA"}))).unwrap_err();
        assert_eq!(e.param, "trtype");
        let e = parse_transport(
            CREATE_TRANSPORT,
            Some(&json!({"trtype": "tcp", "max_io_size": 5000})),
        )
        .unwrap_err();
        assert_eq!(e.param, "max_io_size");
        let s = parse_create_subsystem(CREATE_SUBSYSTEM, Some(&json!({"nqn": "nqn.2016-06.io.spdk:cnode1", "allow_any_host": true, "serial_number": "SPDK001"}))).unwrap();
        assert!(s.allow_any_host);
        assert_eq!(s.serial_number, "SPDK001");
        let ns = parse_add_ns(ADD_NS, Some(&json!({"nqn": "nqn.2016-06.io.spdk:cnode1", "namespace": {"bdev_name": "Malloc0", "nsid": 3}}))).unwrap();
        assert_eq!(ns.nsid, Some(3));
        let e =
            parse_add_ns(ADD_NS, Some(&json!({"nqn": "n", "namespace": {"nsid": 3}}))).unwrap_err();
        assert_eq!(e.param, "namespace.bdev_name");
        let (_, addr) = parse_listener(ADD_LISTENER, Some(&json!({"nqn": "n", "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": "4420"}}))).unwrap();
        assert_eq!(addr, "127.0.0.1:4420".parse().unwrap());
        let e = parse_listener(ADD_LISTENER, Some(&json!({"nqn": "n", "listen_address": {"trtype": "tcp", "adrfam": "ipv6", "traddr": "127.0.0.1"}}))).unwrap_err();
        assert_eq!(e.param, "listen_address.adrfam");
        let e = parse_host(
            ADD_HOST,
            Some(&json!({"nqn": "n", "host": "h", "psk": "/tmp/key"})),
        )
        .unwrap_err();
        assert_eq!(e.param, "psk");
    }
}
