//! A target for the tests: an app (interrupt mode, one reactor, no signal handling) serving
//! RPC on a socket of its own, with the framework's and the bdev layer's methods, a malloc
//! pool, and a timed poller whose counter shows the reactor keeps running.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig, AppHandle, PollStatus};
use pollux_rpc::{
    register_bdev, register_framework, register_log, register_vhost, BdevRpc, ClientError,
    LogHooks, RpcClient, RpcError, RpcMethods, RpcServer, RpcServerConfig, RpcState,
};
use pollux_vhost::VhostTarget;
use serde_json::Value;

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "pollux-rpc-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

pub fn dma() -> Arc<DmaMemory> {
    DmaMemory::new(DmaConfig {
        size_mib: 32,
        no_huge: true,
    })
    .expect("DMA memory")
}

pub struct Target {
    pub socket: PathBuf,
    pub app: AppHandle,
    pub registry: Arc<BdevRegistry>,
    pub dma: Arc<DmaMemory>,
    /// Runs of a 200 us timed poller on the app's reactor.
    pub ticks: Arc<AtomicU64>,
    /// The vhost target, when [`Options::vhost_dir`] asked for one.
    pub vhost: Option<Arc<VhostTarget>>,
    /// The log filter the log methods set (a stand-in for the app's subscriber, which
    /// accepts lowercase `RUST_LOG` directives only).
    pub log_filter: Arc<Mutex<String>>,
    join: Option<JoinHandle<()>>,
    server: Arc<Mutex<Option<RpcServer>>>,
}

/// Changes the bdev methods' context before registration (the NVMe attach, say).
pub type AdjustBdev = dyn FnOnce(&mut BdevRpc) + Send;
/// Registers more methods.
pub type AddMethods = dyn FnOnce(&mut RpcMethods) + Send;

pub struct Options {
    pub state: RpcState,
    pub config: RpcServerConfig,
    pub bdev: Option<Box<AdjustBdev>>,
    pub extra: Option<Box<AddMethods>>,
    pub start_init: Option<Box<pollux_rpc::StartInit>>,
    /// Serve a vhost target (its methods registered after the bdev layer's) with its
    /// controllers' sockets in this directory.
    pub vhost_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            state: RpcState::Runtime,
            config: RpcServerConfig::default(),
            bdev: None,
            extra: None,
            start_init: None,
            vhost_dir: None,
        }
    }
}

impl Target {
    pub fn start() -> Self {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Self {
        let socket = socket_path();
        let registry = BdevRegistry::new();
        let dma = dma();
        let mut bdev = BdevRpc::new(registry.clone(), Some(dma.clone()));
        if let Some(adjust) = options.bdev {
            adjust(&mut bdev);
        }
        let core = CpuMask::available().first().expect("a core");
        let app = App::new(AppConfig {
            name: "rpc-test".to_string(),
            cpumask: std::iter::once(core).collect(),
            interrupt_mode: true,
            handle_signals: false,
            ..AppConfig::default()
        })
        .expect("app");
        let handle = app.handle();
        let mut methods = RpcMethods::new(options.state);
        register_framework(&mut methods, options.start_init).expect("framework methods");
        register_bdev(&mut methods, bdev).expect("bdev methods");
        let vhost = options.vhost_dir.map(|dir| {
            let target = VhostTarget::new(handle.clone(), registry.clone(), &dir);
            register_vhost(&mut methods, target.clone()).expect("vhost methods");
            target
        });
        let log_filter = Arc::new(Mutex::new("info".to_string()));
        let (set_filter, get_filter) = (log_filter.clone(), log_filter.clone());
        register_log(
            &mut methods,
            LogHooks {
                set: Box::new(move |directives: &str| {
                    let valid = directives
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || "_=,:".contains(c));
                    if !valid {
                        return Err(format!("invalid directives {directives:?}"));
                    }
                    *set_filter.lock().expect("filter") = directives.to_string();
                    Ok(())
                }),
                get: Box::new(move || get_filter.lock().expect("filter").clone()),
            },
        )
        .expect("log methods");
        if let Some(extra) = options.extra {
            extra(&mut methods);
        }
        let server: Arc<Mutex<Option<RpcServer>>> = Arc::new(Mutex::new(None));
        let ticks = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let config = RpcServerConfig {
            socket_path: socket.clone(),
            ..options.config
        };
        let slot = server.clone();
        let counter = ticks.clone();
        let join = std::thread::spawn(move || {
            app.run(move |ctx| {
                let started = RpcServer::start(config, methods, ctx.handle());
                let ok = started.is_ok();
                *slot.lock().expect("slot") = started.ok();
                let poller = ctx.register_poller("ticker", 200, move |_ctx| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    PollStatus::Idle
                });
                ctx.on_exit(move |ctx| ctx.unregister_poller(poller));
                let _ = ready_tx.send(ok);
            })
            .expect("app run");
        });
        assert!(
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("app started"),
            "server started"
        );
        Self {
            socket,
            app: handle,
            registry,
            dma,
            ticks,
            vhost,
            log_filter,
            join: Some(join),
            server,
        }
    }

    /// The methods the server serves.
    pub fn methods(&self) -> Arc<RpcMethods> {
        self.server
            .lock()
            .expect("server")
            .as_ref()
            .expect("running")
            .methods()
            .clone()
    }

    /// Replays `config` on the app thread with `load_config`.
    pub fn load(&self, config: Value) -> Result<usize, RpcError> {
        let (tx, rx) = mpsc::channel();
        let job = Box::new((self.methods(), config, tx));
        let app_thread = self.app.thread_handles()[0].clone();
        pollux_reactor::send_msg(&app_thread, move |ctx| {
            let (methods, config, tx) = *job;
            pollux_rpc::load_config(ctx, &methods, &config, move |_ctx, result| {
                let _ = tx.send(result);
            });
        })
        .expect("send");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("load finished")
    }

    pub fn client(&self) -> RpcClient {
        RpcClient::connect(&self.socket, Duration::from_secs(10)).expect("connect")
    }

    pub fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match self.client().call(method, params) {
            Ok(value) => Ok(value),
            Err(ClientError::Rpc(error)) => Err(error),
            Err(other) => panic!("{method}: transport error: {other}"),
        }
    }

    pub fn ok(&self, method: &str, params: Option<Value>) -> Value {
        self.call(method, params)
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    /// Calls and expects an error with `code` whose message contains `needle`.
    pub fn fails(&self, method: &str, params: Option<Value>, code: i32, needle: &str) -> RpcError {
        let error = self
            .call(method, params)
            .expect_err(&format!("{method} must fail"));
        assert_eq!(error.code, code, "{method}: {error}");
        assert!(
            error.message.contains(needle),
            "{method}: {needle:?} not in {:?}",
            error.message
        );
        error
    }

    /// Waits for the app to stop by itself (spdk_kill_instance).
    pub fn wait_stopped(mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let join = self.join.take().expect("running");
        while !join.is_finished() {
            if Instant::now() > deadline {
                self.join = Some(join);
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        join.join().is_ok()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.app.stop();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        drop(self.server.lock().map(|mut s| s.take()));
        if let Some(vhost) = &self.vhost {
            vhost.shutdown();
        }
    }
}

/// A raw connection: bytes in, JSON values out.
pub struct Raw {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(target: &Target) -> Self {
        let stream = UnixStream::connect(&target.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// The next response (the server ends each with a newline).
    pub fn recv(&mut self) -> Value {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line).expect("response is JSON");
            }
            let mut chunk = [0u8; 65536];
            let count = self.stream.read(&mut chunk).expect("read response");
            assert!(count > 0, "connection closed before a response");
            self.buf.extend_from_slice(&chunk[..count]);
        }
    }

    /// Whether the server closed the connection (read returns 0 within the timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(self.stream.read(&mut chunk), Ok(0))
    }
}

pub fn error_code(response: &Value) -> i64 {
    response["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error response: {response}"))
}
