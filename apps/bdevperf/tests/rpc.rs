//! `bdevperf -z`: the app waits for RPC; bdevs are created over the socket, `perform_tests`
//! runs the command line's workload and answers with the results, `spdk_kill_instance`
//! stops it with status 0. A virtio bdev attached over RPC is removed once its back-end
//! (qemu-storage-daemon, Debian's qemu-system-common) goes away.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pollux_rpc::{ClientError, RpcClient};
use pollux_testkit::qsd::{Export, ExportOptions};
use serde_json::json;

struct Bdevperf {
    child: Child,
    socket: PathBuf,
}

impl Bdevperf {
    fn start(tag: &str, extra: &[&str]) -> Self {
        let socket =
            std::env::temp_dir().join(format!("bdevperf-rpc-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(env!("CARGO_BIN_EXE_bdevperf"))
            .args(["-z", "-r"])
            .arg(&socket)
            .args(["-q", "8", "-o", "4k", "-t", "1", "-s", "64", "--no-huge"])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bdevperf starts");
        wait_for_socket(&socket);
        Self { child, socket }
    }

    fn client(&self) -> RpcClient {
        RpcClient::connect(&self.socket, Duration::from_secs(30)).expect("connect")
    }
}

impl Drop for Bdevperf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "bdevperf -z never listened on {path:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn wait_for_rpc_create_bdevs_perform_tests_and_kill() {
    let mut perf = Bdevperf::start("main", &["-w", "randread"]);
    let mut rpc = perf.client();
    // Nothing to run on yet.
    match rpc.call("perform_tests", None) {
        Err(ClientError::Rpc(error)) => {
            assert_eq!(error.code, -19, "{error}");
            assert!(error.message.contains("no bdev"), "{error}");
        }
        other => panic!("perform_tests without bdevs: {other:?}"),
    }
    let name = rpc
        .call(
            "bdev_null_create",
            Some(json!({"name": "Null0", "num_blocks": 262144, "block_size": 512})),
        )
        .expect("bdev_null_create");
    assert_eq!(name, "Null0");
    match rpc.call("perform_tests", Some(json!({"time_in_sec": 1}))) {
        Err(ClientError::Rpc(error)) => assert!(error.message.contains("time_in_sec"), "{error}"),
        other => panic!("unknown parameter accepted: {other:?}"),
    }
    for _ in 0..2 {
        let results = rpc.call("perform_tests", None).expect("perform_tests");
        let job = &results["results"][0];
        assert_eq!(job["job"], "Null0", "{results}");
        assert_eq!(job["workload"], "randread");
        assert_eq!(job["status"], "finished");
        assert!(job["iops"].as_f64().expect("iops") > 0.0, "{results}");
        assert_eq!(results["core_count"], 1);
    }
    // The jobs closed their channels: their I/O shows in the statistics.
    let stats = rpc
        .call("bdev_get_iostat", Some(json!({"name": "Null0"})))
        .expect("iostat");
    assert!(
        stats["bdevs"][0]["num_read_ops"].as_u64().expect("ops") > 0,
        "{stats}"
    );
    assert_eq!(
        rpc.call("spdk_kill_instance", Some(json!({"sig_name": "SIGINT"})))
            .expect("kill"),
        true
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = perf.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "bdevperf did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(!perf.socket.exists(), "the socket file was removed");
}

/// A virtio bdev attached over RPC, with no job running (so no channel polls the socket):
/// the app thread's `virtio_admin` poller notices the lost back-end and removes the bdev.
#[test]
fn virtio_bdev_attached_over_rpc_goes_when_its_back_end_dies() {
    let daemon = Export::start(
        "bdevperf-rpc-virtio",
        ExportOptions {
            image_bytes: 16 << 20,
            num_queues: Some(1),
            ..ExportOptions::default()
        },
    );
    let vhost_socket = daemon.socket();
    let perf = Bdevperf::start("virtio", &["-w", "randread"]);
    let mut rpc = perf.client();
    let attached = rpc
        .call(
            "bdev_virtio_attach_controller",
            Some(json!({"name": "VirtioUser0", "trtype": "user",
                        "traddr": vhost_socket.display().to_string(),
                        "dev_type": "blk", "vq_count": 1})),
        )
        .expect("bdev_virtio_attach_controller");
    assert_eq!(attached, json!(["VirtioUser0"]));
    let names = |rpc: &mut RpcClient| -> Vec<String> {
        let bdevs = rpc.call("bdev_get_bdevs", None).expect("bdev_get_bdevs");
        bdevs
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|b| b["name"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(names(&mut rpc), ["VirtioUser0"]);

    daemon.kill("KILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !names(&mut rpc).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the virtio bdev was never removed after its back-end died"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn without_z_the_run_is_unchanged() {
    let output = Command::new(env!("CARGO_BIN_EXE_bdevperf"))
        .args(["-q", "4", "-o", "4k", "-w", "read", "-t", "1"])
        .env("RUST_LOG", "error")
        .output()
        .expect("bdevperf runs");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("Job: Malloc0"));
}
