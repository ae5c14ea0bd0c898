//! `pollux-rpc` end to end against a server started in this process: rpc.py's command
//! lines, its output conventions, the server's errors on stderr with exit status 1.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_reactor::{App, AppConfig, AppHandle};
use pollux_rpc::{
    register_bdev, register_framework, BdevRpc, RpcMethods, RpcServer, RpcServerConfig, RpcState,
};
use serde_json::Value;

struct Target {
    socket: PathBuf,
    app: AppHandle,
    join: Option<std::thread::JoinHandle<()>>,
    server: Arc<Mutex<Option<RpcServer>>>,
}

impl Target {
    fn start(tag: &str) -> Self {
        let socket =
            std::env::temp_dir().join(format!("pollux-rpc-cli-{}-{tag}.sock", std::process::id()));
        let registry = BdevRegistry::new();
        let mut methods = RpcMethods::new(RpcState::Runtime);
        register_framework(&mut methods, None).expect("framework");
        register_bdev(&mut methods, BdevRpc::new(registry, None)).expect("bdev");
        let core = CpuMask::available().first().expect("core");
        let app = App::new(AppConfig {
            name: "cli-test".to_string(),
            cpumask: std::iter::once(core).collect(),
            interrupt_mode: true,
            handle_signals: false,
            ..AppConfig::default()
        })
        .expect("app");
        let handle = app.handle();
        let server = Arc::new(Mutex::new(None));
        let slot = server.clone();
        let config = RpcServerConfig {
            socket_path: socket.clone(),
            ..RpcServerConfig::default()
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let join = std::thread::spawn(move || {
            app.run(move |ctx| {
                let started = RpcServer::start(config, methods, ctx.handle()).expect("server");
                *slot.lock().expect("slot") = Some(started);
                let _ = ready_tx.send(());
            })
            .expect("app");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server up");
        Self {
            socket,
            app: handle,
            join: Some(join),
            server,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pollux-rpc"))
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("pollux-rpc runs")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.app.stop();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        drop(self.server.lock().map(|mut s| s.take()));
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

#[test]
fn create_list_delete_like_rpc_py() {
    let target = Target::start("bdevs");
    assert_eq!(
        ok(&target.run(&["bdev_null_create", "Null0", "1", "512"])),
        "Null0\n"
    );
    let listed: Value =
        serde_json::from_str(&ok(&target.run(&["bdev_get_bdevs"]))).expect("JSON output");
    assert_eq!(listed[0]["name"], "Null0");
    assert_eq!(listed[0]["num_blocks"], 2048);
    let one: Value = serde_json::from_str(&ok(&target.run(&["bdev_get_bdevs", "-b", "Null0"])))
        .expect("JSON output");
    assert_eq!(one.as_array().expect("array").len(), 1);
    let saved: Value =
        serde_json::from_str(&ok(&target.run(&["save_config"]))).expect("JSON output");
    assert_eq!(
        saved["subsystems"][0]["config"][0]["method"],
        "bdev_null_create"
    );
    let version: Value =
        serde_json::from_str(&ok(&target.run(&["spdk_get_version"]))).expect("JSON output");
    assert!(version["version"]
        .as_str()
        .expect("version")
        .starts_with("Pollux v"));
    let methods: Value = serde_json::from_str(&ok(&target.run(&[
        "call",
        "rpc_get_methods",
        r#"{"current": true}"#,
    ])))
    .expect("JSON output");
    assert!(methods
        .as_array()
        .expect("array")
        .contains(&Value::from("bdev_get_bdevs")));
    // SPDK's newer rpc.py's save_config: the subsystems, then each one's config.
    let subsystems: Value =
        serde_json::from_str(&ok(&target.run(&["framework_get_subsystems"]))).expect("JSON");
    assert_eq!(subsystems[0]["subsystem"], "bdev");
    assert_eq!(
        ok(&target.run(&["bdev_set_qos_limit", "Null0", "--rw_ios_per_sec", "10000"])),
        ""
    );
    let config: Value =
        serde_json::from_str(&ok(&target.run(&["framework_get_config", "bdev"]))).expect("JSON");
    assert_eq!(config[0]["method"], "bdev_null_create");
    assert_eq!(config[1]["method"], "bdev_set_qos_limit");
    assert_eq!(config[1]["params"]["rw_ios_per_sec"], 10000);
    // `true` prints nothing, as rpc.py.
    assert_eq!(ok(&target.run(&["bdev_null_delete", "Null0"])), "");
    assert_eq!(ok(&target.run(&["bdev_get_bdevs"])).trim(), "[]");
}

#[test]
fn server_errors_exit_1_with_the_message() {
    let target = Target::start("errors");
    let output = target.run(&["bdev_get_bdevs", "-b", "Nope"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("no bdev named \\\"Nope\\\""), "{text}");
    assert!(text.contains("-19"), "{text}");
    assert!(text.contains("Got JSON-RPC error response"), "{text}");

    let output = target.run(&["bdev_null_create", "Null0", "1", "1000"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("block_size"),
        "{}",
        stderr(&output)
    );

    // The vhost methods are sent as rpc.py sends them; this server has none.
    let output = target.run(&["vhost_create_blk_controller", "vhost.0", "Malloc0"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("-32601"), "{}", stderr(&output));
    assert!(stderr(&output).contains("vhost_create_blk_controller"));
}

#[test]
fn help_per_method_and_no_server() {
    let output = Command::new(env!("CARGO_BIN_EXE_pollux-rpc"))
        .args(["bdev_malloc_create", "--help"])
        .output()
        .expect("runs");
    let text = ok(&output).to_lowercase();
    assert!(
        text.contains("total_size") && text.contains("block_size"),
        "{text}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_pollux-rpc"))
        .args(["-s", "/nonexistent/pollux.sock", "bdev_get_bdevs"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );
}
