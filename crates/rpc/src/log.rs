//! `log_set_level` / `log_get_level` (and SPDK's `log_set_print_level` /
//! `log_get_print_level`, the same here: Pollux has one log sink, stderr).
//!
//! SPDK's level names, any case: `ERROR`, `WARNING`, `NOTICE` (SPDK's default, Pollux's
//! `info`), `INFO`, `DEBUG`. Beyond SPDK, a `RUST_LOG`-style filter (`pollux_vhost=debug,info`)
//! is accepted too, for one crate's debug lines without everyone's. The filter itself belongs
//! to the app (it installed the subscriber): it hands its setter and getter in as
//! [`LogHooks`], so this crate never depends on the subscriber.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::error::{RpcError, ServerError};
use crate::methods::{Allowed, Params, RpcMethods};

/// SPDK's level names and the `tracing` level each maps to.
const LEVELS: [(&str, &str); 5] = [
    ("ERROR", "error"),
    ("WARNING", "warn"),
    ("NOTICE", "info"),
    ("INFO", "info"),
    ("DEBUG", "debug"),
];

/// Sets the app's filter from `RUST_LOG`-style directives, or says why they are invalid.
pub type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;
/// The app's filter in force, as directives.
pub type GetFilter = dyn Fn() -> String + Send + Sync;

/// How the log methods reach the app's filter.
pub struct LogHooks {
    pub set: Box<SetFilter>,
    pub get: Box<GetFilter>,
}

/// Registers the log methods over `hooks`.
pub fn register_log(methods: &mut RpcMethods, hooks: LogHooks) -> Result<(), ServerError> {
    let state = Arc::new(LogState {
        // What log_get_level answers: the SPDK name last set, else the directives.
        name: Mutex::new(None),
        hooks,
    });
    for method in ["log_set_level", "log_set_print_level"] {
        let state = state.clone();
        methods.register_sync(method, Allowed::Any, move |_ctx, params| state.set(params))?;
    }
    for method in ["log_get_level", "log_get_print_level"] {
        let state = state.clone();
        methods.register_sync(method, Allowed::Any, move |_ctx, params| {
            params.allow_only(&[])?;
            Ok(Value::String(state.get()))
        })?;
    }
    Ok(())
}

struct LogState {
    name: Mutex<Option<String>>,
    hooks: LogHooks,
}

impl LogState {
    fn set(&self, params: &Params) -> Result<Value, RpcError> {
        params.allow_only(&["level"])?;
        let level = params.required_str("level")?;
        let spdk = LEVELS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(level));
        let directives = spdk.map_or(level, |(_, directive)| directive);
        (self.hooks.set)(directives).map_err(|reason| {
            params.invalid(
                "level",
                &format!(
                    "{level:?} is neither a level (ERROR, WARNING, NOTICE, INFO, DEBUG) nor a RUST_LOG filter: {reason}"
                ),
            )
        })?;
        let mut name = self.name.lock().unwrap_or_else(|p| p.into_inner());
        *name = spdk.map(|(spdk_name, _)| spdk_name.to_string());
        tracing::info!(level, filter = directives, "rpc: log level set");
        Ok(Value::Bool(true))
    }

    fn get(&self) -> String {
        let name = self.name.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(name) = name.as_ref() {
            return name.clone();
        }
        let directives = (self.hooks.get)();
        match directives.as_str() {
            "error" => "ERROR".to_string(),
            "warn" => "WARNING".to_string(),
            "info" => "INFO".to_string(),
            "debug" | "trace" => "DEBUG".to_string(),
            _ => directives,
        }
    }
}
