//! The method registry ([`RpcMethods`]), the call a handler receives ([`Call`]), its typed
//! parameter accessors ([`Params`]) and the one-shot answer ([`Reply`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use pollux_reactor::ThreadCtx;
use serde_json::{Map, Value};

use crate::error::{code, RpcError, ServerError};
use crate::server::Waker;

/// The framework's life cycle, as SPDK's `SPDK_RPC_STARTUP` / `SPDK_RPC_RUNTIME`. An app started
/// with `--wait-for-rpc` is in `Startup` until `framework_start_init`; otherwise in `Runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcState {
    Startup,
    Runtime,
}

/// In which states a method may be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Only before `framework_start_init` (SPDK_RPC_STARTUP).
    Startup,
    /// Only once the framework is initialised (SPDK_RPC_RUNTIME), the usual case.
    Runtime,
    /// Always (SPDK_RPC_STARTUP | SPDK_RPC_RUNTIME).
    Any,
}

impl Allowed {
    pub fn permits(self, state: RpcState) -> bool {
        matches!(
            (self, state),
            (Allowed::Any, _)
                | (Allowed::Startup, RpcState::Startup)
                | (Allowed::Runtime, RpcState::Runtime)
        )
    }

    /// SPDK's message for a call in the wrong state.
    fn refusal(self) -> RpcError {
        let message = match self {
            Allowed::Startup => "Method may only be called before framework is initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the framework_start_init RPC.",
            _ => "Method may only be called after framework is initialized using framework_start_init RPC.",
        };
        RpcError::new(code::INVALID_STATE, message)
    }
}

/// The shared state word: read by the server at dispatch, written by `framework_start_init`.
#[derive(Debug, Clone)]
pub struct StateHandle(Arc<AtomicU8>);

impl StateHandle {
    fn new(state: RpcState) -> Self {
        let handle = Self(Arc::new(AtomicU8::new(0)));
        handle.set(state);
        handle
    }

    pub fn get(&self) -> RpcState {
        match self.0.load(Ordering::Acquire) {
            0 => RpcState::Startup,
            _ => RpcState::Runtime,
        }
    }

    pub fn set(&self, state: RpcState) {
        let value = match state {
            RpcState::Startup => 0,
            RpcState::Runtime => 1,
        };
        self.0.store(value, Ordering::Release);
    }
}

/// A method's handler: runs on the app thread (the thread given to
/// [`RpcServer::start`](crate::RpcServer::start)) with that thread's context and the call,
/// and answers through [`Call::reply`] now or later, from any thread.
pub type Handler = dyn Fn(&mut ThreadCtx, Call) + Send + Sync;

/// Writes one subsystem's part of `save_config`: SPDK's `{"method": ..., "params": ...}`
/// entries that recreate its current state. Called on the app thread.
pub type ConfigWriter = dyn Fn() -> Vec<Value> + Send + Sync;

pub(crate) struct Method {
    pub(crate) allowed: Allowed,
    pub(crate) handler: Arc<Handler>,
}

/// One `save_config` subsystem: its name, the subsystems it is built on (SPDK's
/// `depends_on`, each registered before it) and the writer of its entries.
struct Subsystem {
    name: String,
    depends_on: Vec<String>,
    writer: Arc<ConfigWriter>,
}

/// The methods a server answers, extended by each crate that owns some
/// (see the crate documentation for an example). Frozen into an `Arc` when the server starts.
pub struct RpcMethods {
    methods: BTreeMap<String, Method>,
    /// In registration order, which is init order: a subsystem follows what it depends on.
    subsystems: Vec<Subsystem>,
    state: StateHandle,
}

impl std::fmt::Debug for RpcMethods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcMethods")
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .field("state", &self.state.get())
            .finish()
    }
}

impl RpcMethods {
    /// No method, starting in `state` (`Startup` for `--wait-for-rpc`).
    pub fn new(state: RpcState) -> Self {
        Self {
            methods: BTreeMap::new(),
            subsystems: Vec::new(),
            state: StateHandle::new(state),
        }
    }

    /// Adds a method whose handler answers through the [`Call`] it is given (possibly later,
    /// from another thread). Fails when the name is taken.
    pub fn register<F>(
        &mut self,
        name: &str,
        allowed: Allowed,
        handler: F,
    ) -> Result<(), ServerError>
    where
        F: Fn(&mut ThreadCtx, Call) + Send + Sync + 'static,
    {
        if self.methods.contains_key(name) {
            return Err(ServerError::MethodTaken {
                method: name.to_string(),
            });
        }
        self.methods.insert(
            name.to_string(),
            Method {
                allowed,
                handler: Arc::new(handler),
            },
        );
        Ok(())
    }

    /// Adds a method that answers before it returns: the common case.
    pub fn register_sync<F>(
        &mut self,
        name: &str,
        allowed: Allowed,
        handler: F,
    ) -> Result<(), ServerError>
    where
        F: Fn(&mut ThreadCtx, &Params) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        self.register(name, allowed, move |ctx, call| {
            let result = handler(ctx, call.params());
            call.reply(result);
        })
    }

    /// Adds a subsystem to `save_config`, `framework_get_subsystems` and
    /// `framework_get_config`. Subsystems are written in registration order, SPDK's init
    /// order: each subsystem in `depends_on` must be registered already (`bdev` before the
    /// subsystems that use bdevs).
    pub fn register_subsystem<F>(
        &mut self,
        subsystem: &str,
        depends_on: &[&str],
        writer: F,
    ) -> Result<(), ServerError>
    where
        F: Fn() -> Vec<Value> + Send + Sync + 'static,
    {
        if self.subsystems.iter().any(|s| s.name == subsystem) {
            return Err(ServerError::MethodTaken {
                method: format!("save_config subsystem {subsystem}"),
            });
        }
        if let Some(missing) = depends_on
            .iter()
            .find(|d| !self.subsystems.iter().any(|s| s.name == **d))
        {
            return Err(ServerError::UnknownDependency {
                subsystem: subsystem.to_string(),
                depends_on: missing.to_string(),
            });
        }
        self.subsystems.push(Subsystem {
            name: subsystem.to_string(),
            depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
            writer: Arc::new(writer),
        });
        Ok(())
    }

    /// Every method name, sorted; with `current`, only those callable in the current state.
    pub fn names(&self, current: bool) -> Vec<&str> {
        let state = self.state.get();
        self.methods
            .iter()
            .filter(|(_, m)| !current || m.allowed.permits(state))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    /// The state word (`framework_start_init` sets it to `Runtime`).
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// `{"subsystems": [{"subsystem": name, "config": [...]}, ...]}`, SPDK's format: what
    /// SPDK's newer rpc.py assembles from `framework_get_subsystems` and one
    /// `framework_get_config` per subsystem, in one answer (older rpc.py calls `save_config`).
    pub fn save_config(&self) -> Value {
        let subsystems: Vec<Value> = self
            .subsystems
            .iter()
            .map(|s| serde_json::json!({ "subsystem": s.name, "config": (s.writer)() }))
            .collect();
        serde_json::json!({ "subsystems": subsystems })
    }

    /// `framework_get_subsystems`' answer: `[{"subsystem": name, "depends_on": [...]}, ...]`
    /// in init order.
    pub fn subsystems(&self) -> Value {
        let list: Vec<Value> = self
            .subsystems
            .iter()
            .map(|s| serde_json::json!({ "subsystem": s.name, "depends_on": s.depends_on }))
            .collect();
        Value::Array(list)
    }

    /// The subsystems' names, in init order.
    pub fn subsystem_names(&self) -> impl Iterator<Item = &str> {
        self.subsystems.iter().map(|s| s.name.as_str())
    }

    /// One subsystem's `config` array (`framework_get_config`); `None`: no such subsystem.
    pub fn subsystem_config(&self, name: &str) -> Option<Vec<Value>> {
        self.subsystems
            .iter()
            .find(|s| s.name == name)
            .map(|s| (s.writer)())
    }

    /// A method's handler, whatever the state.
    pub fn handler(&self, name: &str) -> Option<Arc<Handler>> {
        self.methods.get(name).map(|m| m.handler.clone())
    }

    /// The method and whether it may run now.
    pub(crate) fn lookup(&self, name: &str) -> Result<&Method, RpcError> {
        let method = self
            .methods
            .get(name)
            .ok_or_else(|| RpcError::method_not_found(name))?;
        if !method.allowed.permits(self.state.get()) {
            return Err(method.allowed.refusal());
        }
        Ok(method)
    }
}

/// What a handler's answer travels with to the server thread.
pub(crate) struct Answer {
    pub(crate) conn: u64,
    /// `None`: a notification, answered with nothing.
    pub(crate) id: Option<Value>,
    pub(crate) result: Result<Value, RpcError>,
}

/// The answer to one call, sent once from any thread. Dropping it unanswered answers with
/// an internal error, so a client never waits for a handler that lost its call.
pub struct Reply {
    conn: u64,
    id: Option<Value>,
    method: Arc<str>,
    sink: Option<Sink>,
}

/// Where an answer goes.
enum Sink {
    /// A client of the server.
    Server(Sender<Answer>, Waker),
    /// Code in the process (a config being replayed).
    Callback(Box<dyn FnOnce(Result<Value, RpcError>) + Send>),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("method", &self.method)
            .field("id", &self.id)
            .finish()
    }
}

impl Reply {
    pub(crate) fn new(
        conn: u64,
        id: Option<Value>,
        method: Arc<str>,
        sink: (Sender<Answer>, Waker),
    ) -> Self {
        Self {
            conn,
            id,
            method,
            sink: Some(Sink::Server(sink.0, sink.1)),
        }
    }

    /// A reply handed to `f` (from whichever thread answers): for calls made by the process
    /// itself, as [`load_config`](crate::load_config) does.
    pub fn to_callback<F>(method: &str, f: F) -> Self
    where
        F: FnOnce(Result<Value, RpcError>) + Send + 'static,
    {
        Self {
            conn: 0,
            id: None,
            method: Arc::from(method),
            sink: Some(Sink::Callback(Box::new(f))),
        }
    }

    /// The method this answers.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// Sends the answer: a result, or an error response.
    pub fn send(mut self, result: Result<Value, RpcError>) {
        self.deliver(result);
    }

    pub fn ok(self, value: Value) {
        self.send(Ok(value));
    }

    pub fn err(self, error: RpcError) {
        self.send(Err(error));
    }

    fn deliver(&mut self, result: Result<Value, RpcError>) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        if let Err(error) = &result {
            tracing::debug!(method = %self.method, code = error.code, message = %error.message, "rpc: error reply");
        }
        match sink {
            Sink::Server(sender, waker) => {
                let answer = Answer {
                    conn: self.conn,
                    id: self.id.take(),
                    result,
                };
                // The server may be gone (stopped): then nobody waits for the answer.
                if sender.send(answer).is_ok() {
                    waker.wake();
                }
            }
            Sink::Callback(f) => f(result),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.sink.is_some() {
            tracing::warn!(method = %self.method, "rpc: a handler dropped its call without replying");
            let message = format!(
                "{}: the request was dropped without a reply (the app may be shutting down)",
                self.method
            );
            self.deliver(Err(RpcError::internal(message)));
        }
    }
}

/// One call of a method: its parameters, its reply, and the registry (for methods about
/// methods: `rpc_get_methods`, `save_config`).
#[derive(Debug)]
pub struct Call {
    params: Params,
    reply: Reply,
    methods: Arc<RpcMethods>,
}

impl Call {
    pub(crate) fn new(params: Params, reply: Reply, methods: Arc<RpcMethods>) -> Self {
        Self {
            params,
            reply,
            methods,
        }
    }

    /// A call made by the process itself, answered through `reply`.
    pub fn local(params: Params, reply: Reply, methods: Arc<RpcMethods>) -> Self {
        Self::new(params, reply, methods)
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn methods(&self) -> &Arc<RpcMethods> {
        &self.methods
    }

    /// Answers now.
    pub fn reply(self, result: Result<Value, RpcError>) {
        self.reply.send(result);
    }

    /// The parameters and the reply apart, to answer later (move the reply into a message
    /// to the thread that finishes the work).
    pub fn into_parts(self) -> (Params, Reply) {
        (self.params, self.reply)
    }
}

/// A method's parameters with typed accessors; every error is `-32602` and names the method
/// and the parameter. SPDK's decoders refuse unknown names, and so does
/// [`allow_only`](Params::allow_only).
#[derive(Debug, Clone)]
pub struct Params {
    method: Arc<str>,
    value: Option<Value>,
}

impl Params {
    pub fn new(method: &str, value: Option<Value>) -> Self {
        Self {
            method: Arc::from(method),
            value,
        }
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// The raw `params` value (absent, or an object, or whatever the client sent).
    pub fn value(&self) -> Option<&Value> {
        self.value.as_ref()
    }

    /// The bdev layer's accessor over the same parameters (its parse functions take it).
    pub fn as_bdev(&self) -> Result<pollux_bdev::config::Params<'_>, RpcError> {
        pollux_bdev::config::Params::new(&self.method, self.value.as_ref()).map_err(RpcError::from)
    }

    fn map(&self) -> Result<Option<&Map<String, Value>>, RpcError> {
        match &self.value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(_) => Err(RpcError::invalid_params(format!(
                "{}: params must be an object",
                self.method
            ))),
        }
    }

    fn get(&self, key: &str) -> Result<Option<&Value>, RpcError> {
        Ok(self.map()?.and_then(|m| m.get(key)))
    }

    /// A `-32602` error about `key`.
    pub fn invalid(&self, key: &str, reason: &str) -> RpcError {
        RpcError::invalid_params(format!("{}: parameter {key:?} {reason}", self.method))
    }

    fn wrong_type(&self, key: &str, expected: &str) -> RpcError {
        self.invalid(key, &format!("must be {expected}"))
    }

    /// Refuses any parameter not in `known`.
    pub fn allow_only(&self, known: &[&str]) -> Result<(), RpcError> {
        match self
            .map()?
            .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
        {
            Some(unknown) => Err(RpcError::invalid_params(format!(
                "{}: unknown parameter {unknown:?}",
                self.method
            ))),
            None => Ok(()),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, RpcError> {
        match self.get(key)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong_type(key, "a string")),
        }
    }

    pub fn required_str(&self, key: &str) -> Result<&str, RpcError> {
        self.str(key)?
            .ok_or_else(|| self.invalid(key, "is required but missing"))
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, RpcError> {
        match self.get(key)? {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an unsigned integer")),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, RpcError> {
        match self.get(key)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong_type(key, "a boolean")),
        }
    }

    /// A parameter SPDK defines and Pollux does not implement: accepted only absent or equal
    /// to SPDK's `default` (rpc.py sends some defaults), refused by name otherwise.
    pub fn only_default(&self, key: &str, default: &Value, why: &str) -> Result<(), RpcError> {
        match self.get(key)? {
            None => Ok(()),
            Some(value) if value == default => Ok(()),
            Some(value) => Err(self.invalid(
                key,
                &format!(
                    "= {value} is not supported by Pollux ({why}); leave it out or use {default}"
                ),
            )),
        }
    }
}
