//! SIGTERM handling. Its own test binary: signal actions are process-wide, so no other app may
//! run in this process while a test raises a signal. A second signal exits the process, so
//! that case is tested on the demo app (`apps/reactor-demo/tests/signals.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pollux_env::cpumask::CpuMask;
use pollux_reactor::{App, AppConfig};

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
