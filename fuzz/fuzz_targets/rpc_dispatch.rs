//! JSON-RPC method dispatch: requests with SPDK's method names and any parameters, through a
//! running server (real socket, framer, dispatcher, handlers on the app thread) with the
//! framework, bdev (malloc, null, delay, QoS), vhost and log methods registered, as
//! pollux-vhost serves them.
//!
//! The input picks each request's method (a served one, or a name that is not) and builds
//! its parameters from SPDK's parameter names and values of every JSON type. Methods that
//! reach outside the process are never sent: files (aio, uring), devices (nvme), other
//! sockets (virtio) and `spdk_kill_instance`.
//!
//! Invariants: every request gets exactly one answer, with its id and either a result or an
//! error whose code is an integer; the target keeps serving (a new connection's
//! `rpc_get_methods` answers); a vhost controller's socket never appears outside the socket
//! directory. Between inputs every controller and bdev is deleted, so each input starts from
//! an empty target.
#![no_main]

use std::collections::BTreeSet;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig};
use pollux_rpc::{
    register_bdev, register_framework, register_log, register_vhost, BdevRpc, LogHooks, RpcMethods,
    RpcServer, RpcServerConfig, RpcState,
};
use pollux_vhost::VhostTarget;
use serde_json::{json, Map, Value};

/// Methods that would reach outside the process (files, devices, sockets) or end it.
const NOT_SENT: &[&str] = &[
    "bdev_aio_create",
    "bdev_uring_create",
    "bdev_nvme_attach_controller",
    "bdev_virtio_attach_controller",
    "spdk_kill_instance",
];

/// Parameter names SPDK's methods take (so the fuzzer reaches past "unknown parameter").
const KEYS: &[&str] = &[
    "name",
    "num_blocks",
    "block_size",
    "uuid",
    "ctrlr",
    "dev_name",
    "cpumask",
    "readonly",
    "packed_ring",
    "packed_ring_recovery",
    "num_queues",
    "base_bdev_name",
    "avg_read_latency",
    "p99_read_latency",
    "avg_write_latency",
    "p99_write_latency",
    "rw_ios_per_sec",
    "rw_mbytes_per_sec",
    "r_mbytes_per_sec",
    "w_mbytes_per_sec",
    "delay_base_us",
    "iops_threshold",
    "level",
    "print_level",
    "flag",
    "timeout",
    "with_batches",
    "subsystem",
    "optimal_io_boundary",
    "md_size",
    "dif_type",
    "physical_block_size",
    "bdev_name",
    "include_aliases",
    "current",
];

/// String values that name things the methods create or know.
const WORDS: &[&str] = &[
    "Malloc0",
    "Malloc1",
    "Null0",
    "Delay0",
    "vhost.0",
    "vhost.1",
    "0x1",
    "0x3",
    "[0]",
    "DEBUG",
    "INFO",
    "ERROR",
    "bdev",
    "vhost_blk",
    "vhost",
    "../escape",
    ".",
    "",
    "fd8a684b-414a-44a5-a4e2-3c0e79f5f401",
];

#[derive(Debug, Arbitrary)]
enum Json {
    Null,
    Bool(bool),
    Small(u16),
    Int(i64),
    Float(f64),
    Word(u8),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(Key, Json)>),
}

#[derive(Debug, Arbitrary)]
enum Key {
    Known(u8),
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct Request {
    /// An index into the served methods; `None`: the name below.
    method: Option<u8>,
    unknown_name: String,
    params: Option<Json>,
}

impl Json {
    fn to_value(&self, depth: u32) -> Value {
        if depth > 6 {
            return Value::Null;
        }
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Small(n) => json!(n),
            Json::Int(n) => json!(n),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Json::Word(i) => json!(WORDS[usize::from(*i) % WORDS.len()]),
            Json::Str(s) => json!(s),
            Json::Array(items) => Value::Array(
                items
                    .iter()
                    .take(16)
                    .map(|j| j.to_value(depth + 1))
                    .collect(),
            ),
            Json::Object(fields) => {
                let mut map = Map::new();
                for (key, value) in fields.iter().take(16) {
                    let key = match key {
                        Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_string(),
                        Key::Other(s) => s.clone(),
                    };
                    map.insert(key, value.to_value(depth + 1));
                }
                Value::Object(map)
            }
        }
    }
}

struct Fixture {
    socket: PathBuf,
    vhost_dir: PathBuf,
    registry: Arc<BdevRegistry>,
    vhost: Arc<VhostTarget>,
    /// What the fuzzer may call, sorted.
    methods: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        let dir = std::env::temp_dir().join(format!("pollux-fuzz-rpc-{}", std::process::id()));
        let vhost_dir = dir.join("vhost");
        std::fs::create_dir_all(&vhost_dir).expect("fixture dir");
        let socket = dir.join("rpc.sock");
        let registry = BdevRegistry::new();
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 64,
            no_huge: true,
        })
        .expect("DMA memory");
        let core = CpuMask::available().first().expect("a core");
        let app = App::new(AppConfig {
            name: "fuzz-rpc".into(),
            cpumask: std::iter::once(core).collect(),
            interrupt_mode: true,
            handle_signals: false,
            ..AppConfig::default()
        })
        .expect("app");
        let vhost = VhostTarget::new(app.handle(), registry.clone(), &vhost_dir);
        let mut methods = RpcMethods::new(RpcState::Runtime);
        register_framework(&mut methods, None).expect("framework methods");
        register_bdev(
            &mut methods,
            BdevRpc::new(registry.clone(), Some(dma.clone())),
        )
        .expect("bdev methods");
        register_vhost(&mut methods, vhost.clone()).expect("vhost methods");
        register_log(
            &mut methods,
            LogHooks {
                set: Box::new(|_directives: &str| Ok(())),
                get: Box::new(|| "info".to_string()),
            },
        )
        .expect("log methods");
        let mut names: Vec<String> = methods
            .names(false)
            .into_iter()
            .filter(|name| !NOT_SENT.contains(name))
            .map(str::to_string)
            .collect();
        names.sort();
        let config = RpcServerConfig {
            socket_path: socket.clone(),
            ..RpcServerConfig::default()
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _keep = dma;
            app.run(move |ctx| {
                let server = RpcServer::start(config, methods, ctx.handle()).expect("server");
                // The server lives as long as the app (the whole fuzzing run).
                std::mem::forget(server);
                let _ = ready_tx.send(());
            })
            .expect("app run");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("app up");
        Fixture {
            socket,
            vhost_dir,
            registry,
            vhost,
            methods: names,
        }
    })
}

fn connect(fixture: &Fixture) -> UnixStream {
    let stream = UnixStream::connect(&fixture.socket).expect("connect to the RPC server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Reads JSON values off `reader` until `count` came or the server closed.
fn answers(reader: &mut BufReader<UnixStream>, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    while out.len() < count {
        match stream.next() {
            Some(Ok(value)) => out.push(value),
            Some(Err(error)) if error.is_io() => panic!("the server did not answer: {error}"),
            Some(Err(error)) => panic!("the server sent something that is not JSON: {error}"),
            None => break,
        }
    }
    out
}

/// Deletes every controller, then every bdev (users before what they use).
fn reset(fixture: &Fixture) {
    for controller in fixture.vhost.controllers() {
        fixture
            .vhost
            .delete_controller(&controller.ctrlr)
            .expect("delete a controller");
    }
    for _ in 0..8 {
        let names = fixture.registry.names();
        if names.is_empty() {
            return;
        }
        for name in names {
            let _ = fixture.registry.unregister(&name);
        }
    }
    panic!(
        "bdevs left that cannot be deleted: {:?}",
        fixture.registry.names()
    );
}

fuzz_target!(|requests: Vec<Request>| {
    let fixture = fixture();
    let requests = &requests[..requests.len().min(16)];
    let mut stream = connect(fixture);
    let mut sent = BTreeSet::new();
    let mut bytes = Vec::new();
    for (id, request) in requests.iter().enumerate() {
        let method = match request.method {
            Some(i) => fixture.methods[usize::from(i) % fixture.methods.len()].clone(),
            None if NOT_SENT.contains(&request.unknown_name.as_str()) => continue,
            None => request.unknown_name.clone(),
        };
        let mut call = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if let Some(params) = &request.params {
            call["params"] = params.to_value(0);
        }
        serde_json::to_writer(&mut bytes, &call).expect("serialise");
        bytes.push(b'\n');
        sent.insert(id as u64);
    }
    stream.write_all(&bytes).expect("send the requests");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let got = answers(&mut reader, sent.len());
    assert_eq!(
        got.len(),
        sent.len(),
        "answers {got:?} for {} requests",
        sent.len()
    );
    let mut answered = BTreeSet::new();
    for answer in &got {
        assert_eq!(answer["jsonrpc"], "2.0", "{answer}");
        let id = answer["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no id: {answer}"));
        assert!(sent.contains(&id), "an answer for id {id}, never sent");
        assert!(answered.insert(id), "id {id} answered twice");
        let has_result = answer.get("result").is_some();
        let error = answer.get("error");
        assert!(has_result != error.is_some(), "result xor error: {answer}");
        if let Some(error) = error {
            assert!(error["code"].is_i64(), "error code: {answer}");
            assert!(error["message"].is_string(), "error message: {answer}");
        }
    }
    drop(reader);
    drop(stream);

    // Still serving, and nothing escaped the socket directory.
    let mut probe = connect(fixture);
    probe
        .write_all(br#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":1}"#)
        .expect("probe");
    let mut reader = BufReader::new(probe.try_clone().expect("clone"));
    let answer = answers(&mut reader, 1);
    assert!(
        answer.first().is_some_and(|a| a["result"].is_array()),
        "the target stopped serving: {answer:?}"
    );
    for controller in fixture.vhost.controllers() {
        let socket = fixture.vhost_dir.join(&controller.ctrlr);
        assert_eq!(
            socket.parent(),
            Some(fixture.vhost_dir.as_path()),
            "controller {:?} outside the socket directory",
            controller.ctrlr
        );
    }
    reset(fixture);
});
