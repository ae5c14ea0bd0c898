//! Reactor benchmarks:
//! - `msg_round_trip/{poll,interrupt}`: a message from a thread on the first core to a thread on
//!   the second and back, reactors pinned (cores 0 and 1 on a 2-core box);
//! - `poller_loop/{1,10,100}`: one `poll_once` of a manually driven reactor whose one thread
//!   has that many idle active pollers (real clock, so the clock reads are included);
//! - `msg_local`: send one message to a thread and poll it, on one OS thread.

use std::hint::black_box;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pollux_env::cpumask::CpuMask;
use pollux_reactor::{
    send_msg, App, AppConfig, Harness, HarnessClock, PollStatus, ThreadCtx, ThreadHandle,
};

/// The two ends of one ping-pong run, leaked so that messages carry a `&'static` (8 bytes) and
/// no hop touches a reference count.
struct Peers {
    a: ThreadHandle,
    b: OnceLock<ThreadHandle>,
    start: OnceLock<Instant>,
    elapsed: Mutex<Option<Duration>>,
}

fn to_b(peers: &'static Peers, left: u64) {
    let b = peers.b.get().expect("set before the first ping");
    send_msg(b, move |_: &mut ThreadCtx| to_a(peers, left)).expect("one message in flight");
}

fn to_a(peers: &'static Peers, left: u64) {
    send_msg(&peers.a, move |ctx: &mut ThreadCtx| {
        if left == 1 {
            let start = peers.start.get().expect("started");
            *peers.elapsed.lock().expect("lock") = Some(start.elapsed());
            ctx.app_stop();
        } else {
            to_b(peers, left - 1);
        }
    })
    .expect("one message in flight");
}

fn round_trips(cores: [usize; 2], interrupt_mode: bool, iters: u64) -> Duration {
    let config = AppConfig {
        cpumask: cores.iter().copied().collect(),
        interrupt_mode,
        handle_signals: false,
        ..AppConfig::default()
    };
    let result: &'static Mutex<Option<&'static Peers>> = Box::leak(Box::new(Mutex::new(None)));
    App::new(config)
        .expect("config")
        .run(move |ctx| {
            let peers: &'static Peers = Box::leak(Box::new(Peers {
                a: ctx.handle(),
                b: OnceLock::new(),
                start: OnceLock::new(),
                elapsed: Mutex::new(None),
            }));
            let b = ctx
                .create_thread("pong", Some(&std::iter::once(cores[1]).collect()))
                .expect("created");
            let _ = peers.b.set(b);
            *result.lock().expect("lock") = Some(peers);
            // Let the second reactor adopt its thread before timing.
            std::thread::sleep(Duration::from_millis(5));
            let _ = peers.start.set(Instant::now());
            to_b(peers, iters.max(1));
        })
        .expect("app ran");
    let peers = result.lock().expect("lock").expect("started");
    let elapsed = peers.elapsed.lock().expect("lock").expect("finished");
    elapsed
}

fn msg_round_trip(c: &mut Criterion) {
    let available: Vec<usize> = CpuMask::available().iter().take(2).collect();
    let [a, b] = available[..] else {
        eprintln!("msg_round_trip needs two cores; skipped");
        return;
    };
    let mut group = c.benchmark_group("msg_round_trip");
    for (name, interrupt_mode) in [("poll", false), ("interrupt", true)] {
        group.bench_function(name, |bencher| {
            bencher.iter_custom(|iters| round_trips([a, b], interrupt_mode, iters))
        });
    }
    group.finish();
}

fn poller_loop(c: &mut Criterion) {
    let mut group = c.benchmark_group("poller_loop");
    for pollers in [1usize, 10, 100] {
        let config = AppConfig {
            cpumask: std::iter::once(0).collect(),
            handle_signals: false,
            ..AppConfig::default()
        };
        let mut harness = Harness::with_config(config, HarnessClock::Real).expect("harness");
        let thread = harness.create_thread("pollers", None).expect("created");
        harness.with_thread(&thread, |ctx| {
            for i in 0..pollers {
                ctx.register_poller(&format!("idle{i}"), 0, |_| black_box(PollStatus::Idle));
            }
        });
        harness.poll_once();
        group.bench_with_input(
            BenchmarkId::from_parameter(pollers),
            &pollers,
            |bencher, _| bencher.iter(|| black_box(harness.poll_once())),
        );
    }
    group.finish();
}

fn msg_local(c: &mut Criterion) {
    let mut harness = Harness::new(1);
    let thread = harness.create_thread("local", None).expect("created");
    harness.poll_once();
    c.bench_function("msg_local", |bencher| {
        bencher.iter(|| {
            send_msg(&thread, |ctx| {
                black_box(ctx.id());
            })
            .expect("room");
            harness.poll_once()
        })
    });
}

criterion_group!(benches, msg_round_trip, poller_loop, msg_local);
criterion_main!(benches);
