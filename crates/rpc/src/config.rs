//! Loading a configuration by replaying it through the RPC methods, as SPDK does with a
//! `-c` file (`spdk_subsystem_load_config`): every entry of every subsystem, in order, is
//! called as if a client had sent it. So anything a crate can create over RPC it can also
//! recreate from `save_config`'s output, with no second parser: a vhost target loads its
//! `vhost_blk` subsystem this way once its methods are registered.
//!
//! Entries run one after another on the calling thread (the app thread); a handler that
//! answers later holds the replay until it does. The first failure stops the load (what was
//! created before it stays, as in SPDK) and names the entry, its subsystem and method.
//! Methods run whatever the RPC state (a config is the app's own doing).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use pollux_reactor::{InlineMsg, MsgError, ThreadCtx, ThreadHandle};
use serde_json::Value;

use crate::error::{code, RpcError};
use crate::methods::{Call, Params, Reply, RpcMethods};

/// What [`load_config`] calls once the replay ended: the number of entries applied, or the
/// first error.
pub type LoadDone = dyn FnOnce(&mut ThreadCtx, Result<usize, RpcError>) + Send;

struct Entry {
    subsystem: String,
    method: String,
    params: Option<Value>,
}

struct Replay {
    entries: VecDeque<Entry>,
    applied: usize,
    methods: Arc<RpcMethods>,
    thread: ThreadHandle,
    done: Option<Box<LoadDone>>,
}

/// Where an entry's answer meets the replay: whichever arrives second continues.
#[derive(Default)]
struct Meeting {
    result: Option<Result<Value, RpcError>>,
    parked: Option<Box<Replay>>,
}

fn shape(reason: &str) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, format!("config: {reason}"))
}

fn entries(config: &Value) -> Result<VecDeque<Entry>, RpcError> {
    let subsystems = config
        .get("subsystems")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("no \"subsystems\" array at the top level"))?;
    let mut out = VecDeque::new();
    for subsystem in subsystems {
        let name = subsystem
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| shape("a subsystem entry has no \"subsystem\" string"))?;
        let list = match subsystem.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(shape(&format!(
                    "subsystem {name:?}: \"config\" must be an array"
                )))
            }
        };
        for (index, entry) in list.iter().enumerate() {
            let method = entry.get("method").and_then(Value::as_str).ok_or_else(|| {
                shape(&format!(
                    "entry {index} of subsystem {name:?} has no \"method\" string"
                ))
            })?;
            let params = match entry.get("params") {
                None | Some(Value::Null) => None,
                Some(params @ Value::Object(_)) => Some(params.clone()),
                Some(_) => {
                    return Err(shape(&format!(
                    "entry {index} of subsystem {name:?} ({method}): \"params\" must be an object"
                )))
                }
            };
            out.push_back(Entry {
                subsystem: name.to_string(),
                method: method.to_string(),
                params,
            });
        }
    }
    Ok(out)
}

/// Replays `config` (SPDK's `{"subsystems": [...]}`) through `methods` on the calling
/// thread, then calls `done` there. Every method must be known: the check is made for the
/// whole file before anything runs.
pub fn load_config<D>(ctx: &mut ThreadCtx, methods: &Arc<RpcMethods>, config: &Value, done: D)
where
    D: FnOnce(&mut ThreadCtx, Result<usize, RpcError>) + Send + 'static,
{
    let entries = match entries(config) {
        Ok(entries) => entries,
        Err(error) => return done(ctx, Err(error)),
    };
    if let Some(unknown) = entries.iter().find(|e| !methods.contains(&e.method)) {
        let error = RpcError::new(
            code::METHOD_NOT_FOUND,
            format!(
                "config: subsystem {:?}: unknown method {:?}",
                unknown.subsystem, unknown.method
            ),
        );
        return done(ctx, Err(error));
    }
    let replay = Box::new(Replay {
        entries,
        applied: 0,
        methods: methods.clone(),
        thread: ctx.handle(),
        done: Some(Box::new(done)),
    });
    replay.run(ctx);
}

impl Replay {
    fn finish(mut self, ctx: &mut ThreadCtx, result: Result<usize, RpcError>) {
        if let Err(error) = &result {
            tracing::error!(%error, "config load failed");
        } else {
            tracing::info!(entries = self.applied, "config loaded");
        }
        if let Some(done) = self.done.take() {
            done(ctx, result);
        }
    }

    fn run(mut self: Box<Self>, ctx: &mut ThreadCtx) {
        loop {
            let Some(entry) = self.entries.pop_front() else {
                let applied = self.applied;
                return self.finish(ctx, Ok(applied));
            };
            let Some(handler) = self.methods.handler(&entry.method) else {
                let error = RpcError::method_not_found(&entry.method);
                return self.finish(ctx, Err(error));
            };
            let meeting: Arc<Mutex<Meeting>> = Arc::default();
            let answer = meeting.clone();
            let thread = self.thread.clone();
            let reply = Reply::to_callback(&entry.method, move |result| {
                let mut slot = answer.lock().unwrap_or_else(|p| p.into_inner());
                match slot.parked.take() {
                    // The replay already waits: continue it on its thread.
                    Some(replay) => {
                        drop(slot);
                        resume_later(&thread, replay, result);
                    }
                    None => slot.result = Some(result),
                }
            });
            let call = Call::local(
                Params::new(&entry.method, entry.params.clone()),
                reply,
                self.methods.clone(),
            );
            handler(ctx, call);
            let mut slot = meeting.lock().unwrap_or_else(|p| p.into_inner());
            match slot.result.take() {
                Some(result) => {
                    drop(slot);
                    if let Err(error) = self.check(&entry, result) {
                        return self.finish(ctx, Err(error));
                    }
                }
                None => {
                    // Answered later, from elsewhere: the answer resumes the replay.
                    self.entries.push_front(entry);
                    slot.parked = Some(self);
                    return;
                }
            }
        }
    }

    /// Counts a successful entry, or names the failed one.
    fn check(&mut self, entry: &Entry, result: Result<Value, RpcError>) -> Result<(), RpcError> {
        match result {
            Ok(_) => {
                self.applied += 1;
                Ok(())
            }
            Err(error) => Err(RpcError::new(
                error.code,
                format!(
                    "config: entry {} (subsystem {:?}, method {}): {}",
                    self.applied, entry.subsystem, entry.method, error.message
                ),
            )),
        }
    }
}

/// Continues a parked replay with its entry's late answer, on the replay's thread.
fn resume_later(thread: &ThreadHandle, replay: Box<Replay>, result: Result<Value, RpcError>) {
    let boxed = Box::new((replay, result));
    let mut msg = InlineMsg::new(move |ctx: &mut ThreadCtx| {
        let (mut replay, result) = *boxed;
        if let Some(entry) = replay.entries.pop_front() {
            if let Err(error) = replay.check(&entry, result) {
                return replay.finish(ctx, Err(error));
            }
        }
        replay.run(ctx);
    });
    // A full queue is retried a while (backpressure); the answering thread can afford it.
    for _ in 0..RESUME_RETRIES {
        match thread.send_inline(msg) {
            Ok(()) => return,
            Err(MsgError::QueueFull { msg: back, .. }) => {
                msg = back;
                std::thread::yield_now();
            }
            Err(MsgError::ThreadExited { .. }) => {
                tracing::error!("config load abandoned: its thread exited");
                return;
            }
        }
    }
    tracing::error!("config load abandoned: its thread's message queue stayed full");
}

const RESUME_RETRIES: usize = 100_000;
