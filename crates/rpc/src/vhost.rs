//! The vhost target's methods, with SPDK's names, parameters and output:
//! `vhost_create_blk_controller`, `vhost_get_controllers`, `vhost_delete_controller`,
//! `vhost_controller_set_coalescing`; and the `vhost_blk` subsystem of `save_config`.
//!
//! Parameters go through `pollux_vhost::config`'s parse functions (the ones a `-c` file goes
//! through), so a parameter means the same in a file and over RPC. SPDK's parameters are
//! `ctrlr`, `dev_name`, `cpumask`, `transport` (only `vhost_user_blk`, SPDK's default),
//! `readonly`, `packed_ring` and `packed_ring_recovery` (packed rings tracked in the inflight
//! region and resumed from it after a back-end restart; written by `save_config` when on);
//! Pollux adds `num_queues`.
//!
//! Deletion runs on an OS thread of its own, not on the app thread: it waits for the
//! controller's rings to finish their in-flight requests, and those rings may be polled by
//! the very reactor the app thread runs on. The answer is sent once the socket is gone and
//! the bdev claim released, so a `bdev_*_delete` that follows it succeeds.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pollux_bdev::BdevError;
use pollux_vhost::config::{self as vhost_config, ConfigError};
use pollux_vhost::{VhostError, VhostTarget};
use serde_json::Value;

use crate::error::{code, error_chain, RpcError, ServerError};
use crate::methods::{Allowed, Params, RpcMethods};

/// SPDK's `vhost_get_controllers`.
pub const GET_METHOD: &str = "vhost_get_controllers";
/// SPDK's `vhost_delete_controller`.
pub const DELETE_METHOD: &str = "vhost_delete_controller";

/// Registers the vhost methods and the `vhost_blk` subsystem of `save_config`. Register the
/// bdev layer's methods first ([`register_bdev`](crate::register_bdev)), so `save_config`
/// writes `bdev` before `vhost_blk` and a saved configuration loads in order.
pub fn register_vhost(
    methods: &mut RpcMethods,
    target: Arc<VhostTarget>,
) -> Result<(), ServerError> {
    let t = target.clone();
    methods.register_sync(
        vhost_config::CREATE_METHOD,
        Allowed::Runtime,
        move |_ctx, params| create(&t, params),
    )?;
    let t = target.clone();
    methods.register_sync(GET_METHOD, Allowed::Runtime, move |_ctx, params| {
        get(&t, params)
    })?;
    let t = target.clone();
    methods.register_sync(
        vhost_config::COALESCING_METHOD,
        Allowed::Runtime,
        move |_ctx, params| set_coalescing(&t, params),
    )?;
    let deleter = Arc::new(Deleter {
        target: target.clone(),
        running: Mutex::new(Vec::new()),
    });
    methods.register(DELETE_METHOD, Allowed::Runtime, move |_ctx, call| {
        let (params, reply) = call.into_parts();
        let checked = params
            .allow_only(&["ctrlr"])
            .and_then(|()| params.required_str("ctrlr"))
            .and_then(|ctrlr| {
                deleter
                    .target
                    .controller(ctrlr)
                    .map(|info| info.ctrlr)
                    .map_err(|e| vhost_error(&params, e))
            });
        match checked {
            Ok(ctrlr) => deleter.delete(ctrlr, reply),
            Err(error) => reply.err(error),
        }
    })?;
    methods.register_subsystem("vhost_blk", &["bdev"], move || {
        match target.save_config().get_mut("config").map(Value::take) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        }
    })?;
    Ok(())
}

/// `-32602` naming the parameter a `pollux_vhost::config` parse function refused.
fn config_error(params: &Params, error: ConfigError) -> RpcError {
    match error {
        ConfigError::Param { param, reason, .. } if param == "params" => {
            RpcError::invalid_params(format!("{}: params {reason}", params.method()))
        }
        ConfigError::Param { param, reason, .. } => params.invalid(&param, &reason),
        other => RpcError::invalid_params(format!("{}: {}", params.method(), error_chain(&other))),
    }
}

/// SPDK's errno-valued codes for the target's errors; parameter errors name the parameter.
fn vhost_error(params: &Params, error: VhostError) -> RpcError {
    let method = params.method();
    let message = format!("{method}: {}", error_chain(&error));
    match &error {
        VhostError::BadName { .. } => params.invalid("ctrlr", &error.to_string()),
        VhostError::Cpumask { .. } => params.invalid("cpumask", &error.to_string()),
        VhostError::NumQueues { .. } => params.invalid("num_queues", &error.to_string()),
        VhostError::Coalescing { .. } => params.invalid("iops_threshold", &error.to_string()),
        VhostError::Exists { .. } => RpcError::new(code::EEXIST, message),
        VhostError::NotFound { name } => RpcError::new(
            code::ENODEV,
            format!("{method}: parameter \"ctrlr\": no vhost controller named {name:?}"),
        ),
        VhostError::Bdev { source, .. } => match source.as_ref() {
            BdevError::NotFound { .. } => RpcError::new(
                code::ENODEV,
                format!("{method}: parameter \"dev_name\": {}", error_chain(&error)),
            ),
            BdevError::Claimed { .. } | BdevError::OtherWriters { .. } => {
                RpcError::new(code::EBUSY, message)
            }
            _ => RpcError::internal(message),
        },
        VhostError::Thread { .. } | VhostError::Socket { .. } => RpcError::internal(message),
    }
}

/// `vhost_create_blk_controller`: `true`, as SPDK answers.
fn create(target: &VhostTarget, params: &Params) -> Result<Value, RpcError> {
    let options = vhost_config::parse_create(params.value(), params.method(), 0)
        .map_err(|e| config_error(params, e))?;
    let info = target
        .create_blk_controller(options)
        .map_err(|e| vhost_error(params, e))?;
    tracing::info!(ctrlr = %info.ctrlr, bdev = %info.bdev, socket = %info.socket.display(), "rpc: vhost controller created");
    Ok(Value::Bool(true))
}

/// `vhost_get_controllers`: every controller, or the one `name`d, in SPDK's format.
fn get(target: &VhostTarget, params: &Params) -> Result<Value, RpcError> {
    params.allow_only(&["name"])?;
    let infos = match params.str("name")? {
        Some(name) => vec![target.controller(name).map_err(|_| {
            RpcError::new(
                code::ENODEV,
                format!(
                    "{}: parameter \"name\": no vhost controller named {name:?}",
                    params.method()
                ),
            )
        })?],
        None => target.controllers(),
    };
    Ok(Value::Array(infos.iter().map(|i| i.to_json()).collect()))
}

/// `vhost_controller_set_coalescing`: `true`; running queues take it at their next poll.
fn set_coalescing(target: &VhostTarget, params: &Params) -> Result<Value, RpcError> {
    let (ctrlr, settings) = vhost_config::parse_coalescing(params.value(), params.method(), 0)
        .map_err(|e| config_error(params, e))?;
    target
        .set_coalescing(&ctrlr, settings.delay_base_us, settings.iops_threshold)
        .map_err(|e| vhost_error(params, e))?;
    Ok(Value::Bool(true))
}

/// Runs deletions off the reactors. Dropped with the methods (when the server stops): it
/// then waits for the deletions still running, so an app that stops right after a
/// `vhost_delete_controller` still removes that controller's socket.
struct Deleter {
    target: Arc<VhostTarget>,
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl Deleter {
    fn delete(&self, ctrlr: String, reply: crate::methods::Reply) {
        let params = Params::new(DELETE_METHOD, None);
        let target = self.target.clone();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // Reap the finished ones: the list holds only deletions in progress.
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|j| j.is_finished());
        *running = live;
        for join in done {
            if join.join().is_err() {
                tracing::error!("rpc: a vhost deletion thread panicked");
            }
        }
        let spawned = std::thread::Builder::new()
            .name("rpc-vhost-del".to_string())
            .spawn(move || {
                let result = target
                    .delete_controller(&ctrlr)
                    .map_err(|e| vhost_error(&params, e));
                if result.is_ok() {
                    tracing::info!(ctrlr = %ctrlr, "rpc: vhost controller deleted");
                }
                reply.send(result.map(|()| Value::Bool(true)));
            });
        match spawned {
            Ok(join) => running.push(join),
            // The closure (and the reply in it) was dropped: the client gets an internal error.
            Err(error) => tracing::error!(%error, "rpc: could not start a vhost deletion thread"),
        }
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        for join in running {
            if join.join().is_err() {
                tracing::error!("rpc: a vhost deletion thread panicked");
            }
        }
    }
}
