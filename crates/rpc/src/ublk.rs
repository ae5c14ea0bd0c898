//! The ublk target's methods, with SPDK's names, parameters and output:
//! `ublk_create_target` {cpumask?}, `ublk_destroy_target`, `ublk_start_disk` {bdev_name,
//! ublk_id, num_queues? (1), queue_depth? (128)} answering the id, `ublk_recover_disk`
//! {bdev_name, ublk_id}, `ublk_stop_disk` {ublk_id}, `ublk_get_disks` {ublk_id?}; and the
//! `ublk` subsystem of `save_config` (after `bdev`: `ublk_create_target`, then one
//! `ublk_start_disk` per disk). Pollux adds `user_copy` to `ublk_start_disk`.
//!
//! Parameters go through `pollux_ublk::config` (what a `-c` file goes through). Starting,
//! recovering and stopping a disk, and destroying the target, run on an OS thread of their
//! own and answer from there: the kernel's START_DEV reads from the disk (partition scan) and
//! STOP_DEV flushes through it before they return, and those requests are served by queues
//! on the reactors, the app thread's included.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pollux_bdev::BdevError;
use pollux_ublk::config::{self as ublk_config, ParamError};
use pollux_ublk::{UblkError, UblkTarget};
use serde_json::{json, Value};

use crate::error::{code, error_chain, RpcError, ServerError};
use crate::methods::{Allowed, Params, Reply, RpcMethods};

/// `-EINVAL`.
const EINVAL: i32 = -22;

fn param_error(error: ParamError) -> RpcError {
    RpcError::invalid_params(error.to_string())
}

/// SPDK's errno-valued codes for the target's errors; parameter errors name the parameter.
fn ublk_error(method: &str, error: &UblkError) -> RpcError {
    let message = format!("{method}: {}", error_chain(error));
    let invalid =
        |param: &str| RpcError::invalid_params(format!("{method}: parameter \"{param}\": {error}"));
    match error {
        UblkError::Cpumask { .. } => invalid("cpumask"),
        UblkError::QueueDepth { .. } => invalid("queue_depth"),
        UblkError::NumQueues { .. } => invalid("num_queues"),
        UblkError::BadId { .. } => invalid("ublk_id"),
        UblkError::BlockSize { .. } | UblkError::RecoverMismatch { .. } => invalid("bdev_name"),
        UblkError::NoDriver { .. } | UblkError::NoTarget | UblkError::NotFound { .. } => {
            RpcError::new(code::ENODEV, message)
        }
        UblkError::TargetExists | UblkError::NotRecoverable { .. } => {
            RpcError::new(code::EBUSY, message)
        }
        UblkError::InUse { .. } | UblkError::KernelInUse { .. } => {
            RpcError::new(code::EEXIST, message)
        }
        UblkError::Bdev { source, .. } => match source.as_ref() {
            BdevError::NotFound { .. } => RpcError::new(
                code::ENODEV,
                format!("{method}: parameter \"bdev_name\": {}", error_chain(error)),
            ),
            BdevError::Claimed { .. } | BdevError::OtherWriters { .. } => {
                RpcError::new(code::EBUSY, message)
            }
            _ => RpcError::internal(message),
        },
        UblkError::Control { source, .. } if source.raw_os_error() == Some(libc::EINVAL) => {
            RpcError::new(EINVAL, message)
        }
        _ => RpcError::internal(message),
    }
}

/// Registers the ublk methods and the `ublk` subsystem of `save_config`. Register the bdev
/// layer's methods first ([`register_bdev`](crate::register_bdev)).
pub fn register_ublk(methods: &mut RpcMethods, target: Arc<UblkTarget>) -> Result<(), ServerError> {
    let t = target.clone();
    methods.register_sync(
        ublk_config::CREATE_TARGET,
        Allowed::Runtime,
        move |_ctx, params| {
            let cpumask = ublk_config::parse_create_target(params.method(), params.value())
                .map_err(param_error)?;
            t.create_target(cpumask)
                .map_err(|e| ublk_error(params.method(), &e))?;
            Ok(Value::Bool(true))
        },
    )?;
    let t = target.clone();
    methods.register_sync(
        ublk_config::GET_DISKS,
        Allowed::Runtime,
        move |_ctx, params| {
            let id = ublk_config::parse_get_disks(params.method(), params.value())
                .map_err(param_error)?;
            let disks = match id {
                Some(id) => vec![t.disk(id).ok_or_else(|| {
                    RpcError::new(
                        code::ENODEV,
                        format!(
                            "{}: parameter \"ublk_id\": no ublk disk {id}",
                            params.method()
                        ),
                    )
                })?],
                None => t.disks(),
            };
            Ok(Value::Array(disks.iter().map(|d| d.to_json()).collect()))
        },
    )?;
    let runner = Arc::new(Runner {
        target: target.clone(),
        running: Mutex::new(Vec::new()),
    });
    let r = runner.clone();
    methods.register(
        ublk_config::START_DISK,
        Allowed::Runtime,
        move |_ctx, call| {
            let (params, reply) = call.into_parts();
            match ublk_config::parse_start_disk(params.method(), params.value()) {
                Ok(options) => r.run(params, reply, move |t| {
                    t.start_disk(&options).map(|id| json!(id))
                }),
                Err(error) => reply.err(param_error(error)),
            }
        },
    )?;
    let r = runner.clone();
    methods.register(
        ublk_config::RECOVER_DISK,
        Allowed::Runtime,
        move |_ctx, call| {
            let (params, reply) = call.into_parts();
            match ublk_config::parse_recover_disk(params.method(), params.value()) {
                Ok((bdev, id)) => r.run(params, reply, move |t| {
                    t.recover_disk(&bdev, id).map(|id| json!(id))
                }),
                Err(error) => reply.err(param_error(error)),
            }
        },
    )?;
    let r = runner.clone();
    methods.register(
        ublk_config::STOP_DISK,
        Allowed::Runtime,
        move |_ctx, call| {
            let (params, reply) = call.into_parts();
            match ublk_config::parse_stop_disk(params.method(), params.value()) {
                Ok(id) => r.run(params, reply, move |t| {
                    t.stop_disk(id).map(|()| Value::Bool(true))
                }),
                Err(error) => reply.err(param_error(error)),
            }
        },
    )?;
    let r = runner;
    methods.register(
        ublk_config::DESTROY_TARGET,
        Allowed::Runtime,
        move |_ctx, call| {
            let (params, reply) = call.into_parts();
            if let Err(error) = params.allow_only(&[]) {
                return reply.err(error);
            }
            r.run(params, reply, |t| {
                t.destroy_target().map(|()| Value::Bool(true))
            });
        },
    )?;
    methods.register_subsystem("ublk", &["bdev"], move || target.save_config())?;
    Ok(())
}

/// Runs the blocking methods off the reactors. Dropped with the methods (when the server
/// stops): it then waits for those still running.
struct Runner {
    target: Arc<UblkTarget>,
    running: Mutex<Vec<JoinHandle<()>>>,
}

impl Runner {
    fn run<F>(&self, params: Params, reply: Reply, work: F)
    where
        F: FnOnce(&UblkTarget) -> Result<Value, UblkError> + Send + 'static,
    {
        let target = self.target.clone();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|j| j.is_finished());
        *running = live;
        for join in done {
            if join.join().is_err() {
                tracing::error!("rpc: a ublk thread panicked");
            }
        }
        let spawned = std::thread::Builder::new()
            .name("rpc-ublk".to_string())
            .spawn(move || {
                let result = work(&target).map_err(|e| ublk_error(params.method(), &e));
                if let Err(error) = &result {
                    tracing::warn!(method = params.method(), %error, "rpc: ublk method failed");
                }
                reply.send(result);
            });
        match spawned {
            Ok(join) => running.push(join),
            // The closure (and the reply in it) was dropped: the client gets an internal error.
            Err(error) => tracing::error!(%error, "rpc: could not start a ublk thread"),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        for join in running {
            if join.join().is_err() {
                tracing::error!("rpc: a ublk thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_get_spdk_codes_and_name_the_parameter() {
        let m = ublk_config::START_DISK;
        let e = ublk_error(
            m,
            &UblkError::QueueDepth {
                ublk_id: 0,
                queue_depth: 0,
                max: 4096,
            },
        );
        assert_eq!(e.code, code::INVALID_PARAMS);
        assert!(e.message.contains("\"queue_depth\""), "{}", e.message);
        let e = ublk_error(m, &UblkError::NoTarget);
        assert_eq!(e.code, code::ENODEV);
        let e = ublk_error(
            m,
            &UblkError::NoDriver {
                path: "/dev/ublk-control".into(),
            },
        );
        assert_eq!(e.code, code::ENODEV);
        assert!(e.message.contains("modprobe ublk_drv"), "{}", e.message);
        let e = ublk_error(
            m,
            &UblkError::InUse {
                ublk_id: 0,
                bdev: "Malloc0".into(),
            },
        );
        assert_eq!(e.code, code::EEXIST);
        let e = ublk_error(
            m,
            &UblkError::Bdev {
                ublk_id: 0,
                bdev: "Nope".into(),
                source: Box::new(BdevError::NotFound {
                    name: "Nope".into(),
                }),
            },
        );
        assert_eq!(e.code, code::ENODEV);
        assert!(e.message.contains("\"bdev_name\""), "{}", e.message);
    }
}
