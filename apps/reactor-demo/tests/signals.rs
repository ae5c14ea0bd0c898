//! The demo as a user runs it: a timed run, a clean stop on the first signal, a forced exit on
//! the second, and a refused core mask.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const DEMO: &str = env!("CARGO_BIN_EXE_pollux-reactor-demo");

fn two_cores_or_one() -> &'static str {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        "0x3"
    } else {
        "0x1"
    }
}

fn spawn(args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(DEMO)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("demo printed its ready line")
            .expect("readable stdout");
        if line.starts_with("ready:") {
            break;
        }
    }
    (child, lines)
}

/// Sends `signal` to our own (not yet reaped) child with kill(1), as an operator would.
fn signal(child: &Child, signal: libc::c_int) {
    let pid = child.id();
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

fn wait_bounded(child: &mut Child, bound: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "demo still running after {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_timed_run_reports_every_reactor() {
    let mask = two_cores_or_one();
    let output = Command::new(DEMO)
        .args(["-m", mask, "-t", "1"])
        .output()
        .expect("demo runs");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let cores = if mask == "0x3" { 2 } else { 1 };
    assert!(
        stdout.contains(&format!("{cores} reactor(s) on mask {mask}, poll mode")),
        "{stdout}"
    );
    let hops_line = stdout
        .lines()
        .find(|line| line.starts_with("messages:"))
        .expect("message summary");
    let hops: u64 = hops_line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("hop count");
    assert!(hops > 0, "{hops_line}");
}

#[test]
fn the_first_signal_stops_in_order() {
    let (mut child, lines) = spawn(&["-m", two_cores_or_one(), "-t", "0", "--interrupt-mode"]);
    signal(&child, libc::SIGINT);
    let status = wait_bounded(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|line| line.contains("interrupt mode")),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|line| line.starts_with("messages:")),
        "{rest:?}"
    );
}

#[test]
fn a_second_signal_forces_exit() {
    let (mut child, lines) = spawn(&["-m", two_cores_or_one(), "-t", "0", "--stuck-shutdown"]);
    signal(&child, libc::SIGTERM);
    // The orderly shutdown waits for the stuck poller (up to the 5 s exit timeout).
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the first signal must not end the process while a thread holds a poller"
    );
    signal(&child, libc::SIGTERM);
    let status = wait_bounded(&mut child, Duration::from_secs(4));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        !rest.iter().any(|line| line.starts_with("messages:")),
        "a forced exit prints no summary: {rest:?}"
    );
}

#[test]
fn a_core_this_machine_lacks_is_refused() {
    let output = Command::new(DEMO)
        .args(["-m", "[1023]"])
        .output()
        .expect("demo runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("core 1023") && stderr.contains("not available"),
        "{stderr}"
    );
    let output = Command::new(DEMO)
        .args(["-m", "0xZ"])
        .output()
        .expect("demo runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a hexadecimal digit"));
}
