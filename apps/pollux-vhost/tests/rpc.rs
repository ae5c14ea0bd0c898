//! `pollux-vhost` end to end, driven by `pollux-rpc` as an operator would: the default target,
//! a bdev and a controller created over RPC, the claim refusing the bdev's deletion,
//! `save_config`, `spdk_kill_instance`, and a restart with `-c` on the saved file that serves
//! the same controllers. Socket files appear and disappear with the target; a live RPC
//! socket is refused, a stale one replaced; `--wait-for-rpc` holds the start-up back until
//! `framework_start_init`.
//!
//! `pollux-rpc` is looked up in `$POLLUX_RPC`, else next to this test's target directory
//! (`<target>/<profile>/pollux-rpc`); scripts/test.sh builds every binary first
//! (`cargo build --workspace --bins`).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use pollux_testkit::bin::workspace_binary;
use serde_json::Value;

/// Bound on every wait for the target (start-up, exit); never a performance assertion.
const WAIT: Duration = Duration::from_secs(30);

/// A scratch directory: vhost sockets, the RPC socket, saved configs.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("pollux-vhost-rpc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Self(path)
    }

    fn rpc(&self) -> PathBuf {
        self.0.join("rpc.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `pollux-vhost`; killed on drop if a test failed before stopping it.
struct Vhost {
    child: Option<Child>,
}

impl Vhost {
    /// Starts the target; `stderr` piped only for a run whose output the test reads (a
    /// pipe nobody reads could fill up and block the target).
    fn spawn(dir: &Dir, extra: &[&str], stderr: Stdio) -> Child {
        Command::new(env!("CARGO_BIN_EXE_pollux-vhost"))
            .arg("-S")
            .arg(&dir.0)
            .arg("-r")
            .arg(dir.rpc())
            .arg("--no-huge")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start pollux-vhost")
    }

    /// Starts the target and waits for `paths` to exist.
    fn start(dir: &Dir, extra: &[&str], paths: &[&Path]) -> Self {
        let mut vhost = Self {
            child: Some(Self::spawn(dir, extra, Stdio::inherit())),
        };
        let deadline = Instant::now() + WAIT;
        while !paths.iter().all(|p| p.exists()) {
            if let Some(status) = vhost.child_mut().try_wait().expect("try_wait") {
                vhost.child = None;
                panic!("pollux-vhost exited early ({status}); its stderr is above");
            }
            assert!(Instant::now() < deadline, "{paths:?} did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        vhost
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "pollux-vhost did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, name: &str) {
        let pid = self.child_mut().id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(&pid)
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rpc(dir: &Dir, args: &[&str]) -> Output {
    Command::new(workspace_binary("pollux-rpc"))
        .arg("-s")
        .arg(dir.rpc())
        .args(args)
        .output()
        .expect("pollux-rpc runs")
}

fn rpc_ok(dir: &Dir, args: &[&str]) -> String {
    let output = rpc(dir, args);
    assert!(
        output.status.success(),
        "pollux-rpc {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

fn rpc_json(dir: &Dir, args: &[&str]) -> Value {
    let text = rpc_ok(dir, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

fn rpc_fails(dir: &Dir, args: &[&str], needle: &str) {
    let output = rpc(dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?} must fail: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "{args:?}: {needle:?} not in {stderr}"
    );
}

#[test]
fn rpc_configures_the_target_and_save_config_restarts_it() {
    let dir = Dir::new("e2e");
    let rpc_sock = dir.rpc();
    let vhost0 = dir.0.join("vhost.0");
    let vhost1 = dir.0.join("vhost.1");
    // The default target (Malloc0 as vhost.0) with room for one more 16 MiB malloc bdev.
    let mut first = Vhost::start(&dir, &["-s", "128"], &[&rpc_sock, &vhost0]);

    // A second target on the same RPC socket is refused and leaves the first one's alone.
    let second = Vhost::spawn(&dir, &["-s", "128"], Stdio::piped())
        .wait_with_output()
        .expect("second target");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another process is listening"),
        "second target: {stderr}"
    );
    assert!(rpc_sock.exists() && vhost0.exists());
    assert!(first.child_mut().try_wait().expect("try_wait").is_none());

    assert_eq!(
        rpc_ok(&dir, &["bdev_malloc_create", "-b", "Malloc1", "16", "512"]).trim(),
        "Malloc1"
    );
    rpc_ok(&dir, &["vhost_create_blk_controller", "vhost.1", "Malloc1"]);
    assert!(vhost1.exists(), "vhost.1's socket");
    rpc_fails(
        &dir,
        &["bdev_malloc_delete", "Malloc1"],
        "vhost controller vhost.1",
    );
    let controllers = rpc_json(&dir, &["vhost_get_controllers"]);
    let names: Vec<&str> = controllers
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["ctrlr"].as_str())
        .collect();
    assert_eq!(names, ["vhost.0", "vhost.1"]);
    assert_eq!(
        controllers[1]["backend_specific"]["block"]["bdev"],
        "Malloc1"
    );
    assert_eq!(controllers[1]["socket"], vhost1.display().to_string());
    let bdevs = rpc_json(&dir, &["bdev_get_bdevs"]);
    let saved = rpc_ok(&dir, &["save_config"]);
    let saved_path = dir.0.join("saved.json");
    std::fs::write(&saved_path, &saved).expect("write saved config");

    rpc_ok(&dir, &["spdk_kill_instance", "SIGTERM"]);
    assert!(first.wait_exit().success());
    for gone in [&rpc_sock, &vhost0, &vhost1] {
        assert!(!gone.exists(), "{} removed at exit", gone.display());
    }

    // A stale RPC socket (nobody listens) is replaced.
    drop(UnixListener::bind(&rpc_sock).expect("stale socket"));
    assert!(rpc_sock.exists());
    let saved_arg = saved_path.display().to_string();
    let mut again = Vhost::start(&dir, &["-c", &saved_arg], &[&rpc_sock, &vhost0, &vhost1]);
    assert_eq!(rpc_json(&dir, &["vhost_get_controllers"]), controllers);
    assert_eq!(rpc_json(&dir, &["bdev_get_bdevs"]), bdevs);
    assert_eq!(
        serde_json::from_str::<Value>(&rpc_ok(&dir, &["save_config"])).expect("json"),
        serde_json::from_str::<Value>(&saved).expect("json")
    );

    // Deleting a controller removes its socket and frees its bdev.
    rpc_ok(&dir, &["vhost_delete_controller", "vhost.1"]);
    assert!(!vhost1.exists());
    rpc_ok(&dir, &["bdev_malloc_delete", "Malloc1"]);

    again.signal("INT");
    assert!(again.wait_exit().success());
    assert!(!rpc_sock.exists() && !vhost0.exists());
}

#[test]
fn wait_for_rpc_starts_at_framework_start_init() {
    let dir = Dir::new("wait");
    let rpc_sock = dir.rpc();
    let vhost0 = dir.0.join("vhost.0");
    let mut target = Vhost::start(&dir, &["--wait-for-rpc"], &[&rpc_sock]);
    assert!(
        !vhost0.exists(),
        "nothing is created before framework_start_init"
    );
    rpc_fails(&dir, &["bdev_get_bdevs"], "framework_start_init");
    rpc_fails(&dir, &["vhost_get_controllers"], "framework_start_init");
    rpc_ok(&dir, &["framework_start_init"]);
    assert!(
        vhost0.exists(),
        "the default controller after framework_start_init"
    );
    let controllers = rpc_json(&dir, &["vhost_get_controllers"]);
    assert_eq!(controllers[0]["ctrlr"], "vhost.0");
    assert_eq!(
        controllers[0]["backend_specific"]["block"]["bdev"],
        "Malloc0"
    );
    target.signal("TERM");
    assert!(target.wait_exit().success());
    assert!(!rpc_sock.exists() && !vhost0.exists());
}
