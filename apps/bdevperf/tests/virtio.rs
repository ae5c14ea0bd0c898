//! bdevperf through the virtio_blk bdev (virtio-user) against qemu-storage-daemon's
//! vhost-user-blk export: `configs/virtio.json`'s shape, verify passing, and a daemon killed
//! mid-run failing the run clearly. Needs qemu-storage-daemon (Debian's qemu-system-common,
//! scripts/install-deps.sh --test); without it the test fails and says so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("bdevperf-virtio-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image");
        let socket = dir.join("vhost.0");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
                 writable=on,num-queues=1",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run qemu-storage-daemon ({error}): install Debian's \
                     qemu-system-common (scripts/install-deps.sh --test)"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon made no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, dir, socket }
    }

    /// `configs/virtio.json` with its socket path replaced by this daemon's.
    fn config(&self) -> PathBuf {
        let template = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/virtio.json"),
        )
        .expect("configs/virtio.json");
        assert!(template.contains("/var/tmp/vhost.0"));
        let path = self.dir.join("virtio.json");
        std::fs::write(
            &path,
            template.replace("/var/tmp/vhost.0", &self.socket.display().to_string()),
        )
        .expect("config");
        path
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let daemon = Daemon::start("verify");
    let output = bdevperf(&daemon.config(), "verify", "1")
        .output()
        .expect("bdevperf runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VirtioBlk0"), "{stdout}");
}

#[test]
fn a_back_end_killed_mid_run_fails_the_run_clearly() {
    let mut daemon = Daemon::start("kill");
    let child = bdevperf(&daemon.config(), "randread", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bdevperf runs");
    std::thread::sleep(Duration::from_millis(1500));
    daemon.child.kill().expect("kill the daemon");
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
