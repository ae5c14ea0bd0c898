//! bdevperf through the virtio_blk bdev (virtio-user) against qemu-storage-daemon's
//! vhost-user-blk export: `configs/virtio.json`'s shape, verify passing, and a daemon killed
//! mid-run failing the run clearly. Needs qemu-storage-daemon (Debian's qemu-system-common,
//! scripts/install-deps.sh --test); without it the test fails and says so.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pollux_testkit::qsd::{Export, ExportOptions};

fn start(tag: &str) -> Export {
    Export::start(
        &format!("bdevperf-virtio-{tag}"),
        ExportOptions {
            image_bytes: 64 << 20,
            num_queues: Some(1),
            ..ExportOptions::default()
        },
    )
}

/// `configs/virtio.json` with its socket path replaced by this daemon's.
fn config(daemon: &Export) -> PathBuf {
    let template = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/virtio.json"),
    )
    .expect("configs/virtio.json");
    assert!(template.contains("/var/tmp/vhost.0"));
    let path = daemon.dir().join("virtio.json");
    std::fs::write(
        &path,
        template.replace("/var/tmp/vhost.0", &daemon.socket().display().to_string()),
    )
    .expect("config");
    path
}

fn bdevperf(config: &PathBuf, workload: &str, time_s: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bdevperf"));
    command
        .args(["-c"])
        .arg(config)
        .args([
            "-q",
            "32",
            "-o",
            "4k",
            "-w",
            workload,
            "-t",
            time_s,
            "--no-huge",
        ])
        .env("RUST_LOG", "error");
    command
}

#[test]
fn verify_through_virtio_user_passes() {
    let daemon = start("verify");
    let output = bdevperf(&config(&daemon), "verify", "1")
        .output()
        .expect("bdevperf runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VirtioBlk0"), "{stdout}");
}

#[test]
fn a_back_end_killed_mid_run_fails_the_run_clearly() {
    let daemon = start("kill");
    let child = bdevperf(&config(&daemon), "randread", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bdevperf runs");
    std::thread::sleep(Duration::from_millis(1500));
    daemon.kill("KILL");
    let started = Instant::now();
    let output = child.wait_with_output().expect("bdevperf ends");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bdevperf noticed the loss"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run fails");
    assert!(
        stderr.contains("VirtioBlk0") && stderr.contains("failed"),
        "the error names the bdev: {stderr}"
    );
}
