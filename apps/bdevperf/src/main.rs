//! `bdevperf`: SPDK's bdevperf for Pollux. One job per core of `-m` per bdev (or only `-T`),
//! each keeping `-q` I/Os of `-o` bytes in flight for `-t` seconds, then a table of IOPS,
//! MiB/s and latency (and `--json`). Without `-c` it runs on a 64 MiB malloc bdev, so it
//! works on a fresh machine with no set-up.
//!
//! NVMe: `bdev_nvme_attach_controller` (SPDK's method) attaches a PCIe controller bound to
//! `vfio-pci`, or with `trtype` TCP a remote NVMe/TCP subsystem (`pollux_nvmf::host`), and
//! creates one bdev per namespace (`Nvme0n1`, ...); its admin queue is
//! polled every [`NVME_ADMIN_POLL_US`] on the app thread while the jobs run, and the
//! controllers are detached (shut down) when the run ends.
//!
//! virtio: `bdev_virtio_attach_controller` (SPDK's method, `trtype` `user`, `dev_type` `blk`)
//! connects to a vhost-user-blk back-end's socket and creates one bdev named `name`; jobs
//! take one virtqueue per channel. A back-end that goes away is noticed by the
//! `virtio_admin` poller (every [`VIRTIO_ADMIN_POLL_US`]), which removes the bdev.

mod args;
mod job;
mod report;
mod rpc_mode;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Parser;
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::modules::malloc;
use pollux_bdev::BdevRegistry;
use pollux_cli::error_chain;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_nvme::bdev::NvmeModule;
use pollux_nvmf::host::NvmfHostModule;
use pollux_reactor::{send_msg, App, AppConfig, InterruptId, PollStatus, PollerId, ThreadCtx};
use pollux_virtio::bdev::VirtioModule;

use crate::args::Args;
use crate::job::{Job, JobSpec, RunShared, Wakeup};

/// The default bdev when no `-c` is given.
const DEFAULT_MALLOC_NAME: &str = "Malloc0";
const DEFAULT_MALLOC_MIB: u64 = 64;
const DEFAULT_MALLOC_BLOCK_SIZE_BYTES: u32 = 512;
/// Period of the NVMe admin poller (health, async events, timeouts, resets).
const NVME_ADMIN_POLL_US: u64 = 10_000;
/// DMA memory an attached NVMe controller takes for itself (admin queue, identify buffer,
/// headroom for its I/O queue pairs, which are sized by `-q`).
const NVME_CONTROLLER_BYTES: u64 = 4 << 20;
/// Period of the virtio admin poller (back-end hang-up -> hot remove).
const VIRTIO_ADMIN_POLL_US: u64 = 10_000;
/// DMA memory an attached virtio controller takes (its rings and request headers).
const VIRTIO_CONTROLLER_BYTES: u64 = 4 << 20;

fn main() -> ExitCode {
    let log_filter = Arc::new(pollux_cli::init_logging("warn"));
    let args = Args::parse();
    match run(&args, log_filter) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("bdevperf: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Bytes of malloc bdevs a config file asks for, and how many bdevs it creates (a rough
/// pass to size the DMA reservation; the real load reports errors precisely).
fn config_demand(path: &Path) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (0, 1);
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
        return (0, 1);
    };
    let mut malloc_bytes = 0u64;
    let mut bdevs = 0u64;
    let subsystems = value.get("subsystems").and_then(|s| s.as_array());
    for entry in subsystems
        .into_iter()
        .flatten()
        .filter(|s| s.get("subsystem").and_then(|n| n.as_str()) == Some("bdev"))
        .filter_map(|s| s.get("config").and_then(|c| c.as_array()))
        .flatten()
    {
        let method = entry.get("method").and_then(|m| m.as_str()).unwrap_or("");
        if method.ends_with("_create") {
            bdevs += 1;
        }
        if method == pollux_nvme::bdev::ATTACH_METHOD {
            // At least one bdev (namespace); its queues come out of the same memory.
            bdevs += 1;
            malloc_bytes = malloc_bytes.saturating_add(NVME_CONTROLLER_BYTES);
        }
        if method == pollux_virtio::bdev::ATTACH_METHOD {
            bdevs += 1;
            malloc_bytes = malloc_bytes.saturating_add(VIRTIO_CONTROLLER_BYTES);
        }
        if method == malloc::METHOD {
            let param = |key: &str| {
                entry
                    .get("params")
                    .and_then(|p| p.get(key))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0)
            };
            malloc_bytes = malloc_bytes
                .saturating_add(param("num_blocks").saturating_mul(param("block_size")));
        }
    }
    (malloc_bytes, bdevs.max(1))
}

fn run(args: &Args, log_filter: Arc<pollux_cli::LogFilter>) -> Result<bool, String> {
    args.validate()?;
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| format!("-m: {e}"))?;
    let (malloc_bytes, bdev_estimate) = match (&args.config, args.wait_for_tests) {
        (Some(path), false) => config_demand(path),
        (None, false) => (DEFAULT_MALLOC_MIB << 20, 1),
        // Bdevs come later over RPC: leave room for them.
        (Some(path), true) => {
            let (bytes, bdevs) = config_demand(path);
            (bytes.saturating_add(rpc_mode::HEADROOM_BYTES), bdevs.max(4))
        }
        (None, true) => (rpc_mode::HEADROOM_BYTES, 4),
    };
    let buffer_bytes = (cpumask.count() as u64)
        .saturating_mul(bdev_estimate)
        .saturating_mul(u64::from(args.queue_depth))
        .saturating_mul(args.io_size_bytes)
        .saturating_mul(2);
    let mem_size_mib = match args.mem_size_mib {
        Some(mib) => mib,
        None => usize::try_from(
            malloc_bytes
                .saturating_add(buffer_bytes)
                .div_ceil(1 << 20)
                .saturating_add(16),
        )
        .map_err(|_| "the run needs more memory than this host can address".to_string())?,
    };
    let dma = DmaMemory::new(DmaConfig {
        size_mib: mem_size_mib,
        no_huge: args.no_huge,
    })
    .map_err(|e| format!("DMA memory ({mem_size_mib} MiB): {e}"))?;

    let registry = BdevRegistry::new();
    match &args.config {
        Some(path) => {
            let mut table = MethodTable::with_builtin();
            pollux_nvme::bdev::register_methods(&mut table).map_err(|e| error_chain(&e))?;
            pollux_virtio::bdev::register_methods(&mut table).map_err(|e| error_chain(&e))?;
            pollux_nvmf::host::register_methods(&mut table).map_err(|e| error_chain(&e))?;
            config::load_file(path, &registry, &table, Some(&dma)).map_err(|e| error_chain(&e))?;
        }
        None if args.wait_for_tests => {}
        None => {
            malloc::create(
                &registry,
                &dma,
                malloc::MallocOptions::from_size_mib(
                    Some(DEFAULT_MALLOC_NAME.to_string()),
                    DEFAULT_MALLOC_MIB,
                    DEFAULT_MALLOC_BLOCK_SIZE_BYTES,
                ),
            )
            .map_err(|e| error_chain(&e))?;
        }
    }
    if args.wait_for_tests {
        return rpc_mode::run(args, cpumask, dma, registry, log_filter);
    }
    let targets = match &args.target {
        Some(target) => {
            let info = registry.info(target).map_err(|_| {
                format!(
                    "-T {target}: no such bdev; bdevs: {}",
                    registry.names().join(", ")
                )
            })?;
            vec![info.name]
        }
        None => registry.names(),
    };
    if targets.is_empty() {
        return Err("no bdev to run on: the configuration created none".to_string());
    }

    let specs = JobSpec::for_each_core_and_bdev(args, &cpumask, &targets);
    let shared = Arc::new(RunShared::new(
        registry.clone(),
        dma.clone(),
        specs.len(),
        Box::new(|ctx, _shared| ctx.app_stop()),
    ));

    let app = App::new(AppConfig {
        name: "bdevperf".to_string(),
        cpumask,
        interrupt_mode: args.interrupt_mode,
        ..AppConfig::default()
    })
    .map_err(|e| e.to_string())?;
    println!("Running I/O for {} seconds...", args.time_s);
    let start_shared = shared.clone();
    let progress_s = args.progress_s;
    let started = Arc::new(AtomicBool::new(true));
    let start_ok = started.clone();
    let app_result = app
        .run(move |ctx| {
            if let Err(message) = start(ctx, cpumask, specs, start_shared, progress_s) {
                eprintln!("bdevperf: {message}");
                start_ok.store(false, Ordering::Relaxed);
                ctx.app_stop();
            }
        })
        .map_err(|e| e.to_string());
    // The jobs have dropped their channels (deleting their queue pairs): shut the NVMe
    // controllers down before the DMA memory goes away with this function.
    NvmeModule::global().detach_all(&registry);
    NvmfHostModule::global().detach_all(&registry);
    VirtioModule::global().detach_all(&registry);
    app_result?;
    if !started.load(Ordering::Relaxed) {
        return Ok(false);
    }

    let mut results =
        std::mem::take(&mut *shared.results.lock().unwrap_or_else(|p| p.into_inner()));
    results.sort_by_key(|r| r.spec.index);
    report::print_table(&results);
    if let Some(path) = &args.json {
        let value = report::to_json(&results, cpumask.count());
        let text = serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    let mut ok = results.len() == shared.progress_ios.len();
    for result in &results {
        if let Some(error) = &result.error {
            eprintln!("bdevperf: {error}");
            ok = false;
        }
    }
    Ok(ok)
}

/// On the app thread: one thread per core, its jobs started there; progress printing.
fn start(
    ctx: &mut ThreadCtx,
    cpumask: CpuMask,
    specs: Vec<JobSpec>,
    shared: Arc<RunShared>,
    progress_s: Option<u64>,
) -> Result<(), String> {
    for core in cpumask.iter() {
        let only_core: CpuMask = std::iter::once(core).collect();
        let thread = ctx
            .create_thread(&format!("bdevperf_c{core}"), Some(&only_core))
            .map_err(|e| e.to_string())?;
        let core_specs: Vec<JobSpec> = specs.iter().filter(|s| s.core == core).cloned().collect();
        let job_shared = shared.clone();
        send_msg(&thread, move |ctx| start_jobs(ctx, core_specs, job_shared))
            .map_err(|_| format!("could not start the jobs of core {core}"))?;
    }
    if !NvmeModule::global().controller_names().is_empty()
        || !NvmfHostModule::global().controller_names().is_empty()
    {
        // PCIe: health, events, resets; TCP: Keep Alive at KATO / 2 and reconnects.
        let admin = ctx.register_poller("nvme_admin", NVME_ADMIN_POLL_US, |_ctx| {
            if NvmeModule::global().poll_admin() + NvmfHostModule::global().poll_admin() > 0 {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(admin));
    }
    if !VirtioModule::global().controller_names().is_empty() {
        let registry = shared.registry.clone();
        let admin = ctx.register_poller("virtio_admin", VIRTIO_ADMIN_POLL_US, move |_ctx| {
            if VirtioModule::global().poll_admin(&registry) > 0 {
                PollStatus::Busy
            } else {
                PollStatus::Idle
            }
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(admin));
    }
    let io_size_bytes = specs.first().map_or(0, |s| s.io_size_bytes);
    if let Some(period_s) = progress_s {
        let progress_shared = shared.clone();
        let mut last_ios = 0u64;
        let poller = ctx.register_poller("progress", period_s * 1_000_000, move |_ctx| {
            let ios: u64 = progress_shared
                .progress_ios
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum();
            let iops = (ios - last_ios.min(ios)) as f64 / period_s as f64;
            println!(
                "{iops:>12.2} IOPS, {:>10.2} MiB/s",
                iops * io_size_bytes as f64 / (1u64 << 20) as f64
            );
            last_ios = ios;
            PollStatus::Busy
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(poller));
    }
    Ok(())
}

/// On a core's thread: builds and starts its jobs, each in its own poller.
fn start_jobs(ctx: &mut ThreadCtx, specs: Vec<JobSpec>, shared: Arc<RunShared>) {
    for spec in specs {
        let mut job = match Job::new(spec.clone(), shared.clone(), ctx.now()) {
            Ok(job) => job,
            Err(error) => {
                job::publish_setup_failure(ctx, &shared, spec, error);
                continue;
            }
        };
        // Interrupt mode: the channel's completion fd wakes this thread; its callback only
        // consumes the event, and the job's poller (which runs after interrupt callbacks in
        // the same thread poll) reaps. The fd is a dup, so the job keeps owning the channel.
        let interrupt_mode = ctx.app().interrupt_mode();
        let interrupt = if interrupt_mode {
            match register_job_interrupt(ctx, &job) {
                Ok(interrupt) => interrupt,
                Err(error) => {
                    job::publish_setup_failure(ctx, &shared, spec, error);
                    continue;
                }
            }
        } else {
            None
        };
        job.set_wakeup(match (interrupt_mode, interrupt) {
            (false, _) => Wakeup::Polled,
            (true, Some(_)) => Wakeup::CompletionFd,
            (true, None) => Wakeup::NoCompletionFd,
        });
        job.start();
        let own_id: Arc<OnceLock<PollerId>> = Arc::new(OnceLock::new());
        let id_in_poller = own_id.clone();
        let mut slot = Some(job);
        let id = ctx.register_poller(&format!("job{}", spec.index), 0, move |ctx| {
            let Some(job) = slot.as_mut() else {
                return PollStatus::Idle;
            };
            let (status, finished) = job.poll(ctx);
            if finished {
                if let Some(job) = slot.take() {
                    job.finish(ctx);
                }
                if let Some(id) = id_in_poller.get() {
                    ctx.unregister_poller(*id);
                }
                if let Some(interrupt) = interrupt {
                    ctx.unregister_interrupt_fd(interrupt);
                }
            }
            status
        });
        let _ = own_id.set(id);
    }
}

/// Registers `job`'s completion fd with this thread (interrupt mode). `Ok(None)`: its channel
/// has none, so the job keeps polling while I/O is in flight.
fn register_job_interrupt(ctx: &mut ThreadCtx, job: &Job) -> Result<Option<InterruptId>, String> {
    let Some(fd) = job.interrupt_fd() else {
        return Ok(None);
    };
    let name = format!("job{}", job.index());
    let duplicate = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map_err(|e| format!("{name}: duplicating its completion fd: {e}"))
    };
    // The reactor watches one copy; the other, as a file, is what the handler reads.
    let eventfd = std::fs::File::from(duplicate(fd)?);
    let id = ctx
        .register_interrupt_fd(&name, duplicate(fd)?, move |_ctx, _fd| {
            drain_eventfd(&eventfd);
            // Idle: the job's poller, run next in this thread poll, says whether it reaped.
            PollStatus::Idle
        })
        .map_err(|e| format!("{name}: registering its completion fd: {e}"))?;
    Ok(Some(id))
}

/// Resets an eventfd's counter (non-blocking: EAGAIN when it was already zero).
fn drain_eventfd(mut eventfd: &std::fs::File) {
    let mut count = [0u8; 8];
    if let Err(error) = eventfd.read(&mut count) {
        if error.kind() != std::io::ErrorKind::WouldBlock {
            tracing::warn!(%error, "bdevperf: draining a completion eventfd");
        }
    }
}
