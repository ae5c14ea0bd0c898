//! The server: one OS thread, not a reactor, owns the listening socket and every connection.
//! It sleeps in `poll(2)` until a socket is ready or a handler's answer arrives, reads and
//! frames requests, validates them, and sends each call to the app thread as a reactor
//! message; answers come back through a channel and are serialised here. Nothing on a
//! reactor waits for a socket, parses a request or writes a response.
//!
//! Limits (STYLE #4), so that one client cannot stall the others or the reactors:
//! - reads of at most [`READ_CHUNK_BYTES`] and writes of at most [`WRITE_CHUNK_BYTES`] per
//!   connection per loop, all non-blocking: a client that sends one byte a second or never
//!   reads its replies costs a buffer, never a wait;
//! - a request is at most `max_request_bytes` (the error names the limit, then the
//!   connection closes: the stream cannot be resynchronised);
//! - at most `max_in_flight` calls per connection, and no reading from a connection whose
//!   unsent replies pass [`MAX_UNSENT_BYTES`]: the client is slowed down, not disconnected;
//! - at most `max_connections` connections (the rest wait in the listen backlog);
//! - a call refused by the app thread's full message queue waits in order and is retried
//!   (backpressure), and no more requests are read meanwhile.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pollux_reactor::{InlineMsg, MsgError, ThreadHandle};
use serde_json::{json, Value};

use crate::error::{RpcError, ServerError};
use crate::framing::{Frame, Framer};
use crate::methods::{Answer, Call, Params, Reply, RpcMethods};
use crate::sys;

/// SPDK's default socket is `/var/tmp/spdk.sock`; Pollux's is this.
pub const DEFAULT_SOCKET_PATH: &str = "/var/tmp/pollux.sock";
/// Bytes read from one connection per loop.
pub const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes written to one connection per loop.
pub const WRITE_CHUNK_BYTES: usize = 256 << 10;
/// Unsent reply bytes past which a connection's requests are no longer read.
pub const MAX_UNSENT_BYTES: usize = 4 << 20;
/// Connections accepted per loop.
const ACCEPTS_PER_LOOP: usize = 16;
/// How long a stopping server keeps flushing replies.
const STOP_FLUSH: Duration = Duration::from_millis(500);

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct RpcServerConfig {
    /// The unix socket (`-r`).
    pub socket_path: PathBuf,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// Calls of one connection waiting for their answer.
    pub max_in_flight: usize,
}

impl Default for RpcServerConfig {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from(DEFAULT_SOCKET_PATH),
            max_request_bytes: 32 << 20,
            max_connections: 64,
            max_in_flight: 64,
        }
    }
}

impl RpcServerConfig {
    fn validate(&self) -> Result<(), ServerError> {
        let positive = [
            ("max_request_bytes", self.max_request_bytes),
            ("max_connections", self.max_connections),
            ("max_in_flight", self.max_in_flight),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ServerError::InvalidConfig {
                    field,
                    reason: "must be greater than 0".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Wakes the server thread from `poll(2)`: one byte on a socket pair. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Waker(Arc<UnixStream>);

impl Waker {
    pub(crate) fn wake(&self) {
        // A full pipe already holds a wake-up; any other error means the server is gone.
        let _ = (&*self.0).write(&[1]);
    }
}

/// A running server. Dropping it (or [`RpcServer::stop`]) stops it: replies already answered
/// are flushed for up to half a second, then the connections close and the socket file is
/// removed.
pub struct RpcServer {
    stop: Arc<AtomicBool>,
    waker: Waker,
    join: Option<JoinHandle<()>>,
    path: PathBuf,
    methods: Arc<RpcMethods>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .finish()
    }
}

impl RpcServer {
    /// Listens on `config.socket_path` and serves `methods`, whose handlers run on
    /// `app_thread` (SPDK runs them on its app thread too). A stale socket file is replaced;
    /// one another process listens on is refused.
    pub fn start(
        config: RpcServerConfig,
        methods: RpcMethods,
        app_thread: ThreadHandle,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let path = config.socket_path.clone();
        let listener = bind(&path)?;
        let sys_error = |op| move |source| ServerError::Sys { op, source };
        listener
            .set_nonblocking(true)
            .map_err(sys_error("set_nonblocking(listener)"))?;
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(sys_error("socketpair(waker)"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(sys_error("set_nonblocking(waker)"))?;
        wake_tx
            .set_nonblocking(true)
            .map_err(sys_error("set_nonblocking(waker)"))?;
        let waker = Waker(Arc::new(wake_tx));
        let (answers_tx, answers_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let methods = Arc::new(methods);
        let mut worker = Worker {
            config,
            listener,
            wake_rx,
            waker: waker.clone(),
            answers_tx,
            answers_rx,
            stop: stop.clone(),
            methods: methods.clone(),
            app_thread,
            conns: Vec::new(),
            next_conn: 1,
            pending: VecDeque::new(),
            scratch: vec![0; READ_CHUNK_BYTES],
        };
        let join = std::thread::Builder::new()
            .name("rpc".to_string())
            .spawn(move || worker.run())
            .map_err(sys_error("spawn(rpc thread)"))?;
        tracing::info!(socket = %path.display(), "rpc: listening");
        Ok(Self {
            stop,
            waker,
            join: Some(join),
            path,
            methods,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The methods served (their state word included).
    pub fn methods(&self) -> &Arc<RpcMethods> {
        &self.methods
    }

    /// Stops the server; see the type's documentation.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(join) = self.join.take() {
            if join.join().is_err() {
                tracing::error!("rpc: the server thread panicked");
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// One client.
struct Conn {
    id: u64,
    stream: UnixStream,
    framer: Framer,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    out_sent: usize,
    in_flight: usize,
    /// The client closed its side: answer what is pending, then close.
    read_closed: bool,
    /// A fatal error was answered: flush, then close.
    closing: bool,
    /// The socket failed: close now.
    dead: bool,
}

impl Conn {
    fn unsent(&self) -> usize {
        self.out.len() - self.out_sent
    }

    fn may_read(&self, max_in_flight: usize) -> bool {
        !self.read_closed
            && !self.closing
            && !self.dead
            && self.in_flight < max_in_flight
            && self.unsent() < MAX_UNSENT_BYTES
    }

    fn queue_response(&mut self, id: Value, result: Result<Value, RpcError>) {
        let response = match result {
            Ok(value) => json!({ "jsonrpc": "2.0", "id": id, "result": value }),
            Err(error) => json!({ "jsonrpc": "2.0", "id": id, "error": error.to_json() }),
        };
        match serde_json::to_writer(&mut self.out, &response) {
            Ok(()) => self.out.push(b'\n'),
            Err(error) => {
                tracing::error!(%error, "rpc: could not serialise a response");
                self.dead = true;
            }
        }
    }

    fn write_some(&mut self) -> bool {
        let mut progressed = false;
        let mut budget = WRITE_CHUNK_BYTES;
        while self.unsent() > 0 && budget > 0 && !self.dead {
            let end = self.out.len().min(self.out_sent + budget);
            match (&self.stream).write(&self.out[self.out_sent..end]) {
                Ok(0) => self.dead = true,
                Ok(written) => {
                    self.out_sent += written;
                    budget -= written.min(budget);
                    progressed = true;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::debug!(conn = self.id, %error, "rpc: write failed; closing");
                    self.dead = true;
                }
            }
        }
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        } else if self.out_sent > self.out.len() / 2 {
            self.out.drain(..self.out_sent);
            self.out_sent = 0;
        }
        progressed
    }

    fn finished(&self) -> bool {
        self.dead
            || (self.unsent() == 0 && (self.closing || (self.read_closed && self.in_flight == 0)))
    }
}

struct Worker {
    config: RpcServerConfig,
    listener: UnixListener,
    wake_rx: UnixStream,
    waker: Waker,
    answers_tx: Sender<Answer>,
    answers_rx: Receiver<Answer>,
    stop: Arc<AtomicBool>,
    methods: Arc<RpcMethods>,
    app_thread: ThreadHandle,
    conns: Vec<Conn>,
    next_conn: u64,
    /// Calls the app thread's full queue refused, in arrival order.
    pending: VecDeque<InlineMsg>,
    scratch: Vec<u8>,
}

impl Worker {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(error) = self.wait() {
                tracing::error!(%error, "rpc: poll failed; the server stops");
                break;
            }
            self.drain_waker();
            self.accept();
            self.retry_pending();
            // Answers first: they free in-flight slots that buffered requests wait for.
            self.collect_answers();
            for index in 0..self.conns.len() {
                self.read(index);
                self.dispatch(index);
            }
            for conn in &mut self.conns {
                conn.write_some();
            }
            self.reap();
        }
        self.flush_and_close();
    }

    fn wait(&mut self) -> std::io::Result<()> {
        let mut fds = Vec::with_capacity(self.conns.len() + 2);
        fds.push(pollfd(self.wake_rx.as_raw_fd(), sys::POLLIN));
        let listen = if self.conns.len() < self.config.max_connections {
            self.listener.as_raw_fd()
        } else {
            -1
        };
        fds.push(pollfd(listen, sys::POLLIN));
        for conn in &self.conns {
            let may_read = conn.may_read(self.config.max_in_flight);
            let mut events = 0;
            if may_read && self.pending.is_empty() {
                events |= sys::POLLIN;
            }
            if conn.unsent() > 0 {
                events |= sys::POLLOUT;
            }
            let fd = if events == 0 {
                -1
            } else {
                conn.stream.as_raw_fd()
            };
            fds.push(pollfd(fd, events));
        }
        // Requests buffered behind a full in-flight window wait for an answer, which wakes
        // this thread; calls refused by a full app queue are retried every millisecond.
        let timeout_ms = if self.pending.is_empty() { -1 } else { 1 };
        sys::poll(&mut fds, timeout_ms).map(|_| ())
    }

    fn drain_waker(&mut self) {
        let mut bytes = [0u8; 256];
        while matches!((&self.wake_rx).read(&mut bytes), Ok(n) if n > 0) {}
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_LOOP {
            if self.conns.len() >= self.config.max_connections {
                return;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(error) = stream.set_nonblocking(true) {
                        tracing::warn!(%error, "rpc: could not make a connection non-blocking");
                        continue;
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    tracing::debug!(conn = id, "rpc: client connected");
                    self.conns.push(Conn {
                        id,
                        stream,
                        framer: Framer::default(),
                        out: Vec::new(),
                        out_sent: 0,
                        in_flight: 0,
                        read_closed: false,
                        closing: false,
                        dead: false,
                    });
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(%error, "rpc: accept failed");
                    return;
                }
            }
        }
    }

    fn read(&mut self, index: usize) {
        let max_in_flight = self.config.max_in_flight;
        let conn = &mut self.conns[index];
        if !conn.may_read(max_in_flight) || !self.pending.is_empty() {
            return;
        }
        match (&conn.stream).read(&mut self.scratch) {
            Ok(0) => {
                conn.read_closed = true;
                if let Some(error) = conn.framer.at_eof() {
                    conn.queue_response(Value::Null, Err(error));
                }
            }
            Ok(count) => conn.framer.push(&self.scratch[..count]),
            Err(error)
                if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(error) => {
                tracing::debug!(conn = conn.id, %error, "rpc: read failed; closing");
                conn.dead = true;
            }
        }
    }

    /// Frames and dispatches the connection's buffered requests, within its limits.
    fn dispatch(&mut self, index: usize) {
        loop {
            let conn = &mut self.conns[index];
            if conn.closing
                || conn.dead
                || conn.in_flight >= self.config.max_in_flight
                || !self.pending.is_empty()
            {
                return;
            }
            let Some(frame) = conn.framer.next(self.config.max_request_bytes) else {
                return;
            };
            match frame {
                Frame::Fatal(error) => {
                    tracing::debug!(conn = conn.id, %error, "rpc: unusable input; closing after the error reply");
                    conn.queue_response(Value::Null, Err(error));
                    conn.closing = true;
                    return;
                }
                Frame::Value(value) => self.request(index, value),
            }
        }
    }

    fn request(&mut self, index: usize, value: Value) {
        let conn = &mut self.conns[index];
        let (id, method, params) = match validate(value) {
            Ok(parts) => parts,
            Err((id, error)) => {
                conn.queue_response(id.unwrap_or(Value::Null), Err(error));
                return;
            }
        };
        let handler = match self.methods.lookup(&method) {
            Ok(found) => found.handler.clone(),
            Err(error) => {
                if let Some(id) = id {
                    conn.queue_response(id, Err(error));
                }
                return;
            }
        };
        tracing::debug!(conn = conn.id, %method, "rpc: call");
        conn.in_flight += 1;
        let method: Arc<str> = Arc::from(method.as_str());
        let reply = Reply::new(
            conn.id,
            id,
            method.clone(),
            (self.answers_tx.clone(), self.waker.clone()),
        );
        let call = Box::new(Call::new(
            Params::new(&method, params),
            reply,
            self.methods.clone(),
        ));
        let msg = InlineMsg::new(move |ctx| handler(ctx, *call));
        self.send(msg);
    }

    fn send(&mut self, msg: InlineMsg) {
        match self.app_thread.send_inline(msg) {
            Ok(()) => {}
            Err(MsgError::QueueFull { msg, .. }) => self.pending.push_back(msg),
            // Dropping the call answers it with an error (`Reply`'s drop).
            Err(MsgError::ThreadExited { .. }) => {
                tracing::debug!("rpc: the app thread has exited; call refused");
            }
        }
    }

    fn retry_pending(&mut self) {
        while let Some(msg) = self.pending.pop_front() {
            match self.app_thread.send_inline(msg) {
                Ok(()) => {}
                Err(MsgError::QueueFull { msg, .. }) => {
                    self.pending.push_front(msg);
                    return;
                }
                Err(MsgError::ThreadExited { .. }) => {}
            }
        }
    }

    fn collect_answers(&mut self) {
        while let Ok(answer) = self.answers_rx.try_recv() {
            let Some(conn) = self.conns.iter_mut().find(|c| c.id == answer.conn) else {
                continue; // The client left before its answer.
            };
            conn.in_flight = conn.in_flight.saturating_sub(1);
            if let Some(id) = answer.id {
                conn.queue_response(id, answer.result);
            }
        }
    }

    fn reap(&mut self) {
        self.conns.retain(|conn| {
            let done = conn.finished();
            if done {
                tracing::debug!(conn = conn.id, "rpc: connection closed");
            }
            !done
        });
    }

    fn flush_and_close(&mut self) {
        let deadline = Instant::now() + STOP_FLUSH;
        // Calls never delivered are answered by their drop.
        self.pending.clear();
        loop {
            self.collect_answers();
            let mut unsent = false;
            for conn in &mut self.conns {
                conn.write_some();
                unsent |= conn.unsent() > 0 && !conn.dead;
            }
            if !unsent || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.conns.clear();
        if let Err(error) = std::fs::remove_file(&self.config.socket_path) {
            tracing::debug!(%error, "rpc: could not remove the socket file");
        }
        tracing::info!(socket = %self.config.socket_path.display(), "rpc: stopped");
    }
}

fn pollfd(fd: i32, events: i16) -> sys::pollfd {
    sys::pollfd {
        fd,
        events,
        revents: 0,
    }
}

type Invalid = (Option<Value>, RpcError);

/// A JSON-RPC 2.0 request: `(id, method, params)`; `id` `None` for a notification.
fn validate(value: Value) -> Result<(Option<Value>, String, Option<Value>), Invalid> {
    let Value::Object(mut object) = value else {
        return Err((
            None,
            RpcError::invalid_request(
                "a request must be a JSON object (batch requests are not supported)",
            ),
        ));
    };
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
        Some(_) => {
            return Err((
                None,
                RpcError::invalid_request("\"id\" must be a string, a number or null"),
            ))
        }
    };
    match object.get("jsonrpc") {
        Some(Value::String(version)) if version == "2.0" => {}
        _ => return Err((id, RpcError::invalid_request("\"jsonrpc\" must be \"2.0\""))),
    }
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        _ => return Err((id, RpcError::invalid_request("\"method\" must be a string"))),
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => None,
        Some(params @ Value::Object(_)) => Some(params),
        Some(_) => {
            return Err((
                id,
                RpcError::invalid_params(format!("{method}: params must be an object")),
            ))
        }
    };
    Ok((id, method, params))
}
