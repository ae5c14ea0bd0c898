//! The framework's methods: `rpc_get_methods`, `spdk_get_version`, `framework_get_reactors`,
//! `thread_get_stats`, `save_config`, `framework_get_subsystems`, `framework_get_config`,
//! `framework_start_init` and `spdk_kill_instance`.
//! Times are nanoseconds, so `tick_rate` is 10^9 (SPDK reports TSC ticks and their rate).

use pollux_reactor::{PollerKind, ThreadCtx};
use serde_json::{json, Value};

use crate::error::{RpcError, ServerError};
use crate::methods::{Allowed, Params, RpcMethods, RpcState};

/// The rate of every tick count the framework methods report (nanoseconds).
pub const TICK_RATE: u64 = 1_000_000_000;

/// What `framework_start_init` runs before the app leaves the startup state (load the
/// configuration, create what `--wait-for-rpc` held back). An error keeps the startup state.
pub type StartInit = dyn Fn(&mut ThreadCtx) -> Result<(), RpcError> + Send + Sync;

/// Registers the framework's methods. `on_start_init` is the app's part of
/// `framework_start_init` (`None`: nothing to do beyond leaving the startup state).
pub fn register_framework(
    methods: &mut RpcMethods,
    on_start_init: Option<Box<StartInit>>,
) -> Result<(), ServerError> {
    methods.register("rpc_get_methods", Allowed::Any, |_ctx, call| {
        let result = rpc_get_methods(call.params(), call.methods());
        call.reply(result);
    })?;
    methods.register_sync("spdk_get_version", Allowed::Any, |_ctx, params| {
        params.allow_only(&[])?;
        Ok(version())
    })?;
    methods.register_sync("framework_get_reactors", Allowed::Runtime, |ctx, params| {
        params.allow_only(&[])?;
        Ok(reactors(ctx))
    })?;
    methods.register_sync("thread_get_stats", Allowed::Runtime, |ctx, params| {
        params.allow_only(&[])?;
        Ok(thread_stats(ctx))
    })?;
    methods.register("save_config", Allowed::Any, |_ctx, call| {
        let result = call
            .params()
            .allow_only(&[])
            .map(|()| call.methods().save_config());
        call.reply(result);
    })?;
    methods.register("framework_get_subsystems", Allowed::Any, |_ctx, call| {
        let result = call
            .params()
            .allow_only(&[])
            .map(|()| call.methods().subsystems());
        call.reply(result);
    })?;
    methods.register("framework_get_config", Allowed::Any, |_ctx, call| {
        let result = framework_get_config(call.params(), call.methods());
        call.reply(result);
    })?;
    methods.register(
        "framework_start_init",
        Allowed::Startup,
        move |ctx, call| {
            let result = call.params().allow_only(&[]).and_then(|()| {
                if let Some(init) = &on_start_init {
                    init(ctx)?;
                }
                call.methods().state().set(RpcState::Runtime);
                tracing::info!("rpc: framework initialised (framework_start_init)");
                Ok(Value::Bool(true))
            });
            call.reply(result);
        },
    )?;
    methods.register("spdk_kill_instance", Allowed::Any, |ctx, call| {
        match kill_signal(call.params()) {
            Ok(signal) => {
                tracing::info!(signal, "rpc: spdk_kill_instance: stopping the app");
                // Answer first: the server flushes it while the app stops.
                call.reply(Ok(Value::Bool(true)));
                ctx.app_stop();
            }
            Err(error) => call.reply(Err(error)),
        }
    })?;
    Ok(())
}

fn rpc_get_methods(params: &Params, methods: &RpcMethods) -> Result<Value, RpcError> {
    params.allow_only(&["current", "include_aliases"])?;
    let current = params.bool("current")?.unwrap_or(false);
    // Pollux registers no deprecated aliases, so `include_aliases` changes nothing.
    params.bool("include_aliases")?;
    Ok(json!(methods.names(current)))
}

/// One subsystem's `config` array, as SPDK's `framework_get_config {"name": ...}` answers
/// it (an unknown name is an invalid parameter, with the names that exist). SPDK's current
/// rpc.py sends `with_batches` (keep `batch` entries whole): Pollux writes no batches, so it
/// changes nothing.
fn framework_get_config(params: &Params, methods: &RpcMethods) -> Result<Value, RpcError> {
    params.allow_only(&["name", "with_batches"])?;
    params.bool("with_batches")?;
    let name = params.required_str("name")?;
    match methods.subsystem_config(name) {
        Some(config) => Ok(Value::Array(config)),
        None => {
            let known: Vec<&str> = methods.subsystem_names().collect();
            Err(params.invalid(
                "name",
                &format!(
                    "subsystem {name:?} not found (this app has: {})",
                    known.join(", ")
                ),
            ))
        }
    }
}

/// `Pollux v0.1.0` and its fields, in `spdk_get_version`'s shape.
pub fn version() -> Value {
    let version = env!("CARGO_PKG_VERSION");
    let (numbers, suffix) = match version.split_once('-') {
        Some((numbers, suffix)) => (numbers, format!("-{suffix}")),
        None => (version, String::new()),
    };
    let mut parts = numbers.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    json!({
        "version": format!("Pollux v{version}"),
        "fields": { "major": major, "minor": minor, "patch": patch, "suffix": suffix },
    })
}

fn cpumask_of(core: usize) -> String {
    std::iter::once(core)
        .collect::<pollux_env::cpumask::CpuMask>()
        .to_string()
}

fn reactors(ctx: &mut ThreadCtx) -> Value {
    let app = ctx.app();
    let threads = app.thread_stats();
    let reactors: Vec<Value> = app
        .reactor_stats()
        .into_iter()
        .map(|reactor| {
            let lw_threads: Vec<Value> = threads
                .iter()
                .filter(|t| t.core == reactor.core)
                .map(|t| {
                    json!({
                        "name": t.name,
                        "id": t.id.0,
                        "cpumask": cpumask_of(t.core),
                        "elapsed": t.busy_ns.saturating_add(t.idle_ns),
                    })
                })
                .collect();
            json!({
                "lcore": reactor.core,
                "busy": reactor.busy_ns,
                "idle": reactor.idle_ns,
                "loops": reactor.loops,
                "sleeps": reactor.sleeps,
                "in_interrupt": reactor.interrupt_mode,
                "lw_threads": lw_threads,
            })
        })
        .collect();
    json!({ "tick_rate": TICK_RATE, "pid": std::process::id(), "reactors": reactors })
}

fn thread_stats(ctx: &mut ThreadCtx) -> Value {
    let threads: Vec<Value> = ctx
        .app()
        .thread_stats()
        .into_iter()
        .map(|t| {
            let active = t
                .pollers
                .iter()
                .filter(|p| !p.paused && p.kind == PollerKind::Active)
                .count();
            let timed = t
                .pollers
                .iter()
                .filter(|p| !p.paused && matches!(p.kind, PollerKind::Timed { .. }))
                .count();
            let paused = t.pollers.iter().filter(|p| p.paused).count();
            json!({
                "name": t.name,
                "id": t.id.0,
                "cpumask": cpumask_of(t.core),
                "busy": t.busy_ns,
                "idle": t.idle_ns,
                "messages": t.messages,
                "polls": t.polls,
                "active_pollers_count": active,
                "timed_pollers_count": timed,
                "paused_pollers_count": paused,
            })
        })
        .collect();
    json!({ "tick_rate": TICK_RATE, "threads": threads })
}

/// SPDK's signals for `spdk_kill_instance`; Pollux stops in order on SIGINT and SIGTERM and
/// refuses the others by name.
fn kill_signal(params: &Params) -> Result<&'static str, RpcError> {
    params.allow_only(&["sig_name"])?;
    let name = params.required_str("sig_name")?;
    match name.trim_start_matches("SIG") {
        "INT" | "2" => Ok("SIGINT"),
        "TERM" | "15" => Ok("SIGTERM"),
        "QUIT" | "HUP" | "KILL" | "USR1" | "3" | "1" | "9" | "10" => Err(params.invalid(
            "sig_name",
            &format!(
                "{name:?} is not supported by Pollux: use SIGINT or SIGTERM (an orderly stop)"
            ),
        )),
        _ => Err(params.invalid(
            "sig_name",
            &format!("{name:?} is not a signal spdk_kill_instance knows (SIGINT, SIGTERM)"),
        )),
    }
}
