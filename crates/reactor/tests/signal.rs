//! SIGTERM handling. Its own test binary: signal actions are process-wide, so no other app may
//! run in this process while a test raises a signal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_env::cpumask::CpuMask;
use pollux_reactor::{App, AppConfig, PollStatus};

const CHILD_ENV: &str = "POLLUX_REACTOR_SIGNAL_CHILD";

fn cores() -> CpuMask {
    CpuMask::available().iter().take(2).collect()
}

/// The first signal stops the app in order: messages already queued or deferred still run.
/// Both signals are exercised in one test so that nothing runs concurrently in this binary.
#[test]
fn a_signal_stops_the_app_without_losing_messages() {
    for (signal, interrupt_mode) in [
        (signal_hook::consts::SIGTERM, false),
        (signal_hook::consts::SIGINT, true),
    ] {
        const COUNT: u64 = 20_000;
        let executed = Arc::new(AtomicU64::new(0));
        let executed2 = executed.clone();
        let config = AppConfig {
            cpumask: cores(),
            interrupt_mode,
            handle_signals: true,
            msg_queue_depth: 64,
            ..AppConfig::default()
        };
        App::new(config)
            .expect("config")
            .run(move |ctx| {
                let last = ctx.app().cpumask().iter().last().unwrap_or(0);
                let worker = ctx
                    .create_thread("worker", Some(&std::iter::once(last).collect()))
                    .expect("created");
                for _ in 0..COUNT {
                    let executed = executed2.clone();
                    ctx.send_or_queue(&worker, move |_| {
                        executed.fetch_add(1, Ordering::Relaxed);
                    })
                    .expect("worker alive");
                }
                // The handler runs synchronously in this OS thread; the first reactor notices
                // the flag at its next loop and stops the app.
                signal_hook::low_level::raise(signal).expect("raise");
            })
            .expect("app ran");
        assert_eq!(executed.load(Ordering::SeqCst), COUNT, "signal {signal}");
    }
}

/// Child process body for the test below (ignored when run directly).
#[test]
#[ignore = "run as a child process by a_second_signal_forces_exit"]
fn child_with_a_stuck_shutdown() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let config = AppConfig {
        cpumask: cores(),
        interrupt_mode: true,
        handle_signals: true,
        thread_exit_timeout: Duration::from_secs(60),
        ..AppConfig::default()
    };
    let result = App::new(config).expect("config").run(|ctx| {
        // Never unregistered: the app thread cannot exit, so the shutdown hangs.
        ctx.register_poller("stuck", 1000, |_| PollStatus::Idle);
        println!("ready");
    });
    println!("run returned: {result:?}");
}

#[test]
fn a_second_signal_forces_exit() {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_with_a_stuck_shutdown",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("child printed ready")
            .expect("readable");
        if line.contains("ready") {
            break;
        }
    }
    let kill = |pid: u32| {
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    };
    kill(child.id());
    // The first signal starts an orderly shutdown, which hangs on the stuck poller.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the child still waits for its stuck thread"
    );
    kill(child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second signal did not end the child"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(128 + signal_hook::consts::SIGTERM));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        !rest.iter().any(|line| line.contains("run returned")),
        "the child did not return from run: {rest:?}"
    );
}
