//! The NVMe-oF target's methods, with SPDK's names, parameters and output:
//! `nvmf_create_transport` (`-t TCP`), `nvmf_get_transports`, `nvmf_create_subsystem`,
//! `nvmf_delete_subsystem`, `nvmf_get_subsystems`, `nvmf_subsystem_add_ns`,
//! `nvmf_subsystem_remove_ns`, `nvmf_subsystem_add_listener`,
//! `nvmf_subsystem_remove_listener`, `nvmf_subsystem_add_host`,
//! `nvmf_subsystem_remove_host`, `nvmf_subsystem_allow_any_host`; and the `nvmf` subsystem of
//! `save_config` (after `bdev`, whose bdevs its namespaces claim).
//!
//! Parameters go through `pollux_nvmf::config` (what a `-c` file goes through), so a
//! parameter means the same in a file and over RPC. Every method answers at once: none waits
//! for a connection (a deleted subsystem's connections close on their own poll groups, after
//! their in-flight I/O).

use std::sync::Arc;

use pollux_bdev::BdevError;
use pollux_nvmf::config::{self as nvmf_config, ParamError};
use pollux_nvmf::{NvmfError, NvmfTarget};
use serde_json::{json, Value};

use crate::error::{code, error_chain, RpcError, ServerError};
use crate::methods::{Allowed, Params, RpcMethods};

/// `-EINVAL`, SPDK's answer to a request its target refuses (no transport, say).
const EINVAL: i32 = -22;
/// `-EADDRINUSE`, for a listen address another socket holds.
const EADDRINUSE: i32 = -98;

fn param_error(error: ParamError) -> RpcError {
    RpcError::invalid_params(error.to_string())
}

/// SPDK's errno-valued codes for the target's errors; parameter errors name the parameter.
fn nvmf_error(params: &Params, error: NvmfError) -> RpcError {
    let message = format!("{}: {}", params.method(), error_chain(&error));
    match &error {
        NvmfError::SubsystemExists { .. }
        | NvmfError::TransportExists
        | NvmfError::NsidInUse { .. }
        | NvmfError::ListenerExists { .. } => RpcError::new(code::EEXIST, message),
        NvmfError::SubsystemNotFound { .. }
        | NvmfError::NamespaceNotFound { .. }
        | NvmfError::ListenerNotFound { .. } => RpcError::new(code::ENODEV, message),
        NvmfError::Bdev { source, .. } => match source.as_ref() {
            BdevError::NotFound { .. } => RpcError::new(code::ENODEV, message),
            BdevError::Claimed { .. } | BdevError::OtherWriters { .. } => {
                RpcError::new(code::EBUSY, message)
            }
            _ => RpcError::internal(message),
        },
        NvmfError::BadNqn { .. }
        | NvmfError::SubsystemField { .. }
        | NvmfError::BadNsid { .. }
        | NvmfError::BlockSize { .. }
        | NvmfError::TransportOption { .. }
        | NvmfError::UnsupportedTransport { .. }
        | NvmfError::BadListenAddress { .. } => RpcError::invalid_params(message),
        NvmfError::NoTransport | NvmfError::NoFreeNsid { .. } => RpcError::new(EINVAL, message),
        NvmfError::Listen { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            RpcError::new(EADDRINUSE, message)
        }
        NvmfError::Listen { .. } | NvmfError::Thread { .. } | NvmfError::Config { .. } => {
            RpcError::internal(message)
        }
        // The initiator's errors reach RPC through the bdev layer (bdev_nvme_attach_controller).
        NvmfError::HostConnect { .. }
        | NvmfError::HostTimeout { .. }
        | NvmfError::HostConnection { .. }
        | NvmfError::HostCommand { .. }
        | NvmfError::HostController { .. }
        | NvmfError::HostNoQueue { .. } => RpcError::internal(message),
    }
}

/// Registers the nvmf methods and the `nvmf` subsystem of `save_config`. Register the bdev
/// layer's methods first ([`register_bdev`](crate::register_bdev)).
pub fn register_nvmf(methods: &mut RpcMethods, target: Arc<NvmfTarget>) -> Result<(), ServerError> {
    type Handler = fn(&NvmfTarget, &Params) -> Result<Value, RpcError>;
    let table: [(&str, Handler); 12] = [
        (nvmf_config::CREATE_TRANSPORT, create_transport),
        (nvmf_config::GET_TRANSPORTS, get_transports),
        (nvmf_config::CREATE_SUBSYSTEM, create_subsystem),
        (nvmf_config::DELETE_SUBSYSTEM, delete_subsystem),
        (nvmf_config::GET_SUBSYSTEMS, get_subsystems),
        (nvmf_config::ADD_NS, add_ns),
        (nvmf_config::REMOVE_NS, remove_ns),
        (nvmf_config::ADD_LISTENER, add_listener),
        (nvmf_config::REMOVE_LISTENER, remove_listener),
        (nvmf_config::ADD_HOST, add_host),
        (nvmf_config::REMOVE_HOST, remove_host),
        (nvmf_config::ALLOW_ANY_HOST, allow_any_host),
    ];
    for (name, handler) in table {
        let t = target.clone();
        methods.register_sync(name, Allowed::Runtime, move |_ctx, params| {
            handler(&t, params)
        })?;
    }
    methods.register_subsystem("nvmf", &["bdev"], move || {
        match target.save_config().get_mut("config").map(Value::take) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        }
    })?;
    Ok(())
}

fn create_transport(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let options =
        nvmf_config::parse_transport(params.method(), params.value()).map_err(param_error)?;
    target
        .create_transport(options)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn get_transports(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    params.allow_only(&["trtype", "tgt_name"])?;
    if let Some(trtype) = params.str("trtype")? {
        if !trtype.eq_ignore_ascii_case("tcp") {
            return Err(RpcError::new(
                code::ENODEV,
                format!(
                    "{}: parameter \"trtype\": no transport {trtype:?}",
                    params.method()
                ),
            ));
        }
    }
    Ok(Value::Array(
        target.transport().iter().map(|t| t.to_json()).collect(),
    ))
}

fn create_subsystem(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let options = nvmf_config::parse_create_subsystem(params.method(), params.value())
        .map_err(param_error)?;
    target
        .create_subsystem(options)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn delete_subsystem(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let nqn = nvmf_config::parse_nqn(params.method(), params.value()).map_err(param_error)?;
    target
        .delete_subsystem(&nqn)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn get_subsystems(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    params.allow_only(&["nqn", "tgt_name"])?;
    let all = target.subsystems_json();
    match params.str("nqn")? {
        None => Ok(all),
        Some(nqn) => {
            let found: Vec<Value> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s.get("nqn").and_then(Value::as_str) == Some(nqn))
                .cloned()
                .collect();
            if found.is_empty() {
                return Err(RpcError::new(
                    code::ENODEV,
                    format!(
                        "{}: parameter \"nqn\": no subsystem {nqn:?}",
                        params.method()
                    ),
                ));
            }
            Ok(Value::Array(found))
        }
    }
}

/// Answers the NSID, as SPDK does.
fn add_ns(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let ns = nvmf_config::parse_add_ns(params.method(), params.value()).map_err(param_error)?;
    let nsid = target
        .add_namespace(&ns.nqn, &ns.bdev_name, ns.nsid, ns.uuid)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(json!(nsid))
}

fn remove_ns(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, nsid) =
        nvmf_config::parse_remove_ns(params.method(), params.value()).map_err(param_error)?;
    target
        .remove_namespace(&nqn, nsid)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn add_listener(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, addr) =
        nvmf_config::parse_listener(params.method(), params.value()).map_err(param_error)?;
    target
        .add_listener(&nqn, addr)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn remove_listener(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, addr) =
        nvmf_config::parse_listener(params.method(), params.value()).map_err(param_error)?;
    target
        .remove_listener(&nqn, addr)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn add_host(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, host) =
        nvmf_config::parse_host(params.method(), params.value()).map_err(param_error)?;
    target
        .add_host(&nqn, &host)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn remove_host(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, host) =
        nvmf_config::parse_host(params.method(), params.value()).map_err(param_error)?;
    target
        .remove_host(&nqn, &host)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}

fn allow_any_host(target: &NvmfTarget, params: &Params) -> Result<Value, RpcError> {
    let (nqn, allow) =
        nvmf_config::parse_allow_any_host(params.method(), params.value()).map_err(param_error)?;
    target
        .allow_any_host(&nqn, allow)
        .map_err(|e| nvmf_error(params, e))?;
    Ok(Value::Bool(true))
}
