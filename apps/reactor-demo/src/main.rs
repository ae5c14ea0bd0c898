//! `pollux-reactor-demo`: the main job on an in-memory default until the vhost target and
//! bdevperf exist. One worker thread per core of the mask; tokens travel around the ring of
//! workers as lock-free messages (one message per hop, no allocation per hop) while each worker
//! also runs an idle active poller, as a device poller would. Ends after `-t` seconds or on
//! SIGINT / SIGTERM and prints per-reactor statistics.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use crossbeam_utils::CachePadded;
use pollux_env::cpumask::CpuMask;
use pollux_reactor::{send_msg, App, AppConfig, PollStatus, ThreadCtx, ThreadHandle};

/// SPDK-style flags: `-m` core mask, `-t` seconds.
#[derive(Parser, Debug)]
#[command(name = "pollux-reactor-demo", version, about)]
struct Args {
    /// Core mask: hex (0x3) or list ([0,2-4]); one reactor per core.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// Run time in seconds (0: until SIGINT / SIGTERM).
    #[arg(short = 't', long = "time", default_value_t = 5)]
    time_s: u64,
    /// Tokens in flight per worker.
    #[arg(short = 'q', long = "tokens", default_value_t = 64)]
    tokens_per_worker: usize,
    /// Idle reactors sleep in epoll instead of spinning.
    #[arg(long)]
    interrupt_mode: bool,
    /// Test hook: a poller that is never unregistered, so an orderly shutdown hangs until the
    /// exit timeout and only a second signal ends the process.
    #[arg(long, hide = true)]
    stuck_shutdown: bool,
}

/// The workers and their hop counters. Each counter is written by its own worker only and
/// sits on its own cache line, so the cores never contend for it.
struct Ring {
    workers: Vec<ThreadHandle>,
    hops: Vec<CachePadded<AtomicU64>>,
    dropped: AtomicU64,
}

/// Runs on worker `index`: counts the hop and passes the token on to the next worker.
fn hop(_ctx: &mut ThreadCtx, ring: Arc<Ring>, index: usize) {
    ring.hops[index].fetch_add(1, Ordering::Relaxed);
    let next = (index + 1) % ring.workers.len();
    let target = ring.workers[next].clone();
    let carried = ring.clone();
    if send_msg(&target, move |ctx| hop(ctx, carried, next)).is_err() {
        // Only while stopping: the next worker has exited or its queue is full.
        ring.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

fn total_hops(ring: &Ring) -> u64 {
    ring.hops.iter().map(|h| h.load(Ordering::Relaxed)).sum()
}

fn main() -> ExitCode {
    pollux_cli::init_logging("warn");
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pollux-reactor-demo: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| e.to_string())?;
    if args.tokens_per_worker == 0 {
        return Err("-q: at least one token per worker".to_string());
    }
    let config = AppConfig {
        name: "pollux-reactor-demo".to_string(),
        cpumask,
        interrupt_mode: args.interrupt_mode,
        ..AppConfig::default()
    };
    let app = App::new(config).map_err(|e| e.to_string())?;
    let handle = app.handle();
    let (ring_tx, ring_rx) = std::sync::mpsc::channel::<Arc<Ring>>();
    let time_s = args.time_s;
    let tokens = args.tokens_per_worker;
    let stuck_shutdown = args.stuck_shutdown;
    let started = Instant::now();
    app.run(move |ctx| {
        if stuck_shutdown {
            ctx.register_poller("stuck", 1000, |_ctx| PollStatus::Idle);
        }
        start(ctx, cpumask, tokens, time_s, ring_tx)
    })
    .map_err(|e| e.to_string())?;
    let elapsed_s = started.elapsed().as_secs_f64();

    let ring = ring_rx
        .recv()
        .map_err(|_| "the app stopped before it started its workers".to_string())?;
    let hops = total_hops(&ring);
    println!(
        "Pollux reactor demo: {} reactor(s) on mask {cpumask}, {} mode, {elapsed_s:.1} s",
        cpumask.count(),
        if args.interrupt_mode {
            "interrupt"
        } else {
            "poll"
        },
    );
    println!(
        "{:>6} {:>12} {:>7} {:>7} {:>8}",
        "core", "loops", "busy%", "idle%", "sleeps"
    );
    for reactor in handle.reactor_stats() {
        let total_ns = (reactor.busy_ns + reactor.idle_ns).max(1) as f64;
        println!(
            "{:>6} {:>12} {:>6.1}% {:>6.1}% {:>8}",
            reactor.core,
            reactor.loops,
            100.0 * reactor.busy_ns as f64 / total_ns,
            100.0 * reactor.idle_ns as f64 / total_ns,
            reactor.sleeps
        );
    }
    println!(
        "messages: {hops} hops, {:.2} M hops/s, {} tokens dropped at shutdown",
        hops as f64 / elapsed_s / 1e6,
        ring.dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The app's start function, on the first reactor: one worker per core, tokens launched,
/// a timed poller to stop after `time_s` and one to print progress every second.
fn start(
    ctx: &mut ThreadCtx,
    cpumask: CpuMask,
    tokens_per_worker: usize,
    time_s: u64,
    ring_tx: std::sync::mpsc::Sender<Arc<Ring>>,
) {
    let mut workers = Vec::new();
    for core in cpumask.iter() {
        let only_core: CpuMask = std::iter::once(core).collect();
        match ctx.create_thread(&format!("worker{core}"), Some(&only_core)) {
            Ok(worker) => workers.push(worker),
            Err(error) => {
                eprintln!("pollux-reactor-demo: {error}");
                ctx.app_stop();
                return;
            }
        }
    }
    let ring = Arc::new(Ring {
        hops: workers
            .iter()
            .map(|_| CachePadded::new(AtomicU64::new(0)))
            .collect(),
        workers,
        dropped: AtomicU64::new(0),
    });
    // The receiver outlives the app: it is dropped only after run() returns.
    let _ = ring_tx.send(ring.clone());
    println!("ready: {} worker(s)", ring.workers.len());

    for (index, worker) in ring.workers.iter().enumerate() {
        // A device-like poller: finds nothing to do, says so.
        let registered = send_msg(worker, |ctx| {
            let poller = ctx.register_poller("idle_device", 0, |_ctx| PollStatus::Idle);
            ctx.on_exit(move |ctx| ctx.unregister_poller(poller));
        });
        if registered.is_err() {
            ctx.app_stop();
            return;
        }
        for _ in 0..tokens_per_worker {
            let carried = ring.clone();
            if send_msg(worker, move |ctx| hop(ctx, carried, index)).is_err() {
                ring.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    let progress_ring = ring.clone();
    let mut last_hops = 0;
    let progress = ctx.register_poller("progress", 1_000_000, move |_ctx| {
        let hops = total_hops(&progress_ring);
        println!("{:.2} M hops/s", (hops - last_hops) as f64 / 1e6);
        last_hops = hops;
        PollStatus::Busy
    });
    ctx.on_exit(move |ctx| ctx.unregister_poller(progress));
    if time_s > 0 {
        let stop = ctx.register_poller("stop", time_s * 1_000_000, |ctx| {
            ctx.app_stop();
            PollStatus::Busy
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(stop));
    }
}
