//! Pollux's JSON-RPC 2.0 management interface, compatible with SPDK's: the same method
//! names, parameter names and error codes on a unix socket (`-r path`, default
//! [`DEFAULT_SOCKET_PATH`]), so SPDK's `rpc.py` and Pollux's `pollux-rpc` both drive it.
//!
//! - [`RpcServer`]: a dedicated OS thread (not a reactor) accepts, reads, frames and parses
//!   requests and writes responses, all non-blocking and bounded per connection (see
//!   `server.rs` for the limits); each call runs as a reactor message on the app thread, and
//!   its answer comes back through a channel. A slow, huge, malformed or non-reading client
//!   costs its own buffers, never a reactor's time or another client's turn.
//! - [`RpcMethods`]: the method registry each crate extends with its methods, and the
//!   `save_config` subsystems ([`RpcMethods::register_subsystem`]).
//! - [`register_framework`]: `rpc_get_methods`, `spdk_get_version`, `framework_get_reactors`,
//!   `thread_get_stats`, `save_config`, `framework_start_init`, `spdk_kill_instance`.
//! - [`register_bdev`]: `bdev_get_bdevs`, `bdev_get_iostat`, the malloc / null / aio / uring
//!   create and delete methods, `bdev_nvme_attach_controller` / `bdev_nvme_detach_controller`.
//! - [`register_vhost`]: `vhost_create_blk_controller`, `vhost_get_controllers`,
//!   `vhost_delete_controller`, `vhost_controller_set_coalescing` on a
//!   [`pollux_vhost::VhostTarget`], and the `vhost_blk` subsystem of `save_config`.
//! - [`register_ublk`]: `ublk_create_target`, `ublk_destroy_target`, `ublk_start_disk`,
//!   `ublk_recover_disk`, `ublk_stop_disk`, `ublk_get_disks` on a
//!   [`pollux_ublk::UblkTarget`], and the `ublk` subsystem of `save_config`.
//! - [`load_config`]: loads a configuration (`-c`, or `save_config`'s output) by replaying
//!   each entry through the methods, as SPDK does, so every subsystem that registered its
//!   methods (bdev, vhost_blk) is recreated with no second parser.
//! - [`RpcClient`]: a blocking client that sends exactly what rpc.py sends.
//! - [`target_app`]: what the target apps share around the server (the `-c` loader's bdev
//!   modules, DMA demand, admin pollers, controller shutdown).
//!
//! # Errors
//!
//! SPDK's codes ([`error::code`]): -32700 parse error (the connection is closed after it: the
//! stream cannot be resynchronised), -32600 invalid request (not an object, no `"jsonrpc":
//! "2.0"`, no method, a batch, or larger than the limit), -32601 method not found, -32602
//! invalid params (the message names the method and the parameter), -1 the wrong state
//! (`--wait-for-rpc`), negative errno values where SPDK uses them (`-EEXIST`, `-ENODEV`,
//! `-EBUSY`), -32603 otherwise.
//!
//! A parameter SPDK defines that Pollux does not implement is refused by name unless it
//! carries SPDK's default ([`Params::only_default`]); rpc.py sends some defaults.
//!
//! # Startup and runtime
//!
//! An app started with `--wait-for-rpc` builds its [`RpcMethods`] with
//! [`RpcState::Startup`]: only methods registered [`Allowed::Startup`] or [`Allowed::Any`]
//! answer until `framework_start_init` runs the app's init hook and switches to
//! [`RpcState::Runtime`]; the others get SPDK's -1 "Method may only be called after framework
//! is initialized using framework_start_init RPC."
//!
//! # Adding methods (the vhost and virtio crates do this)
//!
//! A handler runs on the app thread with that thread's [`ThreadCtx`] and a [`Call`]. It
//! answers through the call, either before returning (use [`RpcMethods::register_sync`]) or
//! later from any thread: [`Call::into_parts`] gives the [`Params`] and the [`Reply`], and
//! the reply can move into a reactor message to the thread that owns the object and be sent
//! from there (box it: a message closure holds 48 bytes). A reply dropped unanswered answers
//! the client with an internal error, so no client waits forever.
//!
//! ```no_run
//! use pollux_rpc::{Allowed, RpcError, RpcMethods, RpcState};
//! use pollux_reactor::send_msg;
//! use serde_json::{json, Value};
//!
//! let mut methods = RpcMethods::new(RpcState::Runtime);
//! // Answered on the app thread, at once.
//! methods.register_sync("vhost_get_controllers", Allowed::Runtime, |_ctx, params| {
//!     params.allow_only(&["name"])?;
//!     let name = params.str("name")?;
//!     Ok(json!([{ "ctrlr": name.unwrap_or("vhost.0") }]))
//! })?;
//! // Answered later, by the thread that owns the controller.
//! methods.register("vhost_delete_controller", Allowed::Runtime, |ctx, call| {
//!     let (params, reply) = call.into_parts();
//!     let ctrlr = match params.required_str("ctrlr") {
//!         Ok(name) => name.to_string(),
//!         Err(error) => return reply.err(error),
//!     };
//!     let owner = ctx.handle(); // the controller's thread, in a real target
//!     let reply = Box::new(reply);
//!     let sent = send_msg(&owner, move |_ctx| {
//!         // ... stop the controller `ctrlr`, release its bdev claim ...
//!         let _ = &ctrlr;
//!         reply.ok(Value::Bool(true));
//!     });
//!     if let Err(error) = sent {
//!         // The message (and the reply inside it) is handed back; dropping it answers
//!         // the client with an internal error.
//!         drop(error.into_msg());
//!     }
//! })?;
//! // What save_config writes for the subsystem (after "bdev").
//! methods.register_subsystem("bdev", &[], Vec::new)?;
//! methods.register_subsystem("vhost_blk", &["bdev"], || vec![
//!     json!({ "method": "vhost_create_blk_controller",
//!             "params": { "ctrlr": "vhost.0", "dev_name": "Malloc0" } }),
//! ])?;
//! # Ok::<(), pollux_rpc::ServerError>(())
//! ```
//!
//! An app then adds the framework's and the bdev layer's methods and starts the server from
//! its start callback (the app thread):
//!
//! ```no_run
//! use pollux_bdev::BdevRegistry;
//! use pollux_reactor::{App, AppConfig};
//! use pollux_rpc::{register_bdev, register_framework, BdevRpc, RpcMethods, RpcServer,
//!                  RpcServerConfig, RpcState};
//!
//! let registry = BdevRegistry::new();
//! let mut methods = RpcMethods::new(RpcState::Runtime);
//! register_framework(&mut methods, None)?;
//! register_bdev(&mut methods, BdevRpc::new(registry.clone(), None))?;
//! let server = std::sync::Arc::new(std::sync::Mutex::new(None));
//! let slot = server.clone();
//! App::new(AppConfig::default())?.run(move |ctx| {
//!     match RpcServer::start(RpcServerConfig::default(), methods, ctx.handle()) {
//!         Ok(started) => *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started),
//!         Err(error) => { eprintln!("{error}"); ctx.app_stop(); }
//!     }
//! })?;
//! drop(server); // after the app stopped: flushes the last replies, removes the socket
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `unsafe`: one block, the `poll(2)` call in `sys.rs`.

mod bdev;
mod builtin;
pub mod client;
mod config;
pub mod error;
pub mod framing;
mod log;
mod methods;
mod nvmf;
mod server;
mod sys;
pub mod target_app;
mod ublk;
mod vhost;

pub use bdev::{pcie_attach, register_bdev, BdevRpc, NvmeAttachFn};
pub use builtin::{register_framework, version, StartInit, TICK_RATE};
pub use client::{ClientError, RpcClient};
pub use config::{load_config, LoadDone};
pub use error::{RpcError, ServerError};
pub use log::{register_log, GetFilter, LogHooks, SetFilter};
pub use methods::{
    Allowed, Call, ConfigWriter, Handler, Params, Reply, RpcMethods, RpcState, StateHandle,
};
pub use nvmf::register_nvmf;
pub use server::{
    RpcServer, RpcServerConfig, DEFAULT_SOCKET_PATH, MAX_UNSENT_BYTES, READ_CHUNK_BYTES,
    WRITE_CHUNK_BYTES,
};
pub use ublk::register_ublk;
pub use vhost::register_vhost;

pub use pollux_reactor::ThreadCtx;
