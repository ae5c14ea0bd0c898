//! `pollux-ublk`: the ublk target (SPDK's ublk target in `spdk_tgt`). Serves bdevs as host
//! kernel block devices `/dev/ublkbN` through the Linux ublk driver (`modprobe ublk_drv`,
//! Linux 6.0+), configured at run time over JSON-RPC on `-r` (default
//! `/var/tmp/pollux.sock`): the framework's, the bdev layer's and the `ublk_*` methods, as
//! SPDK's `rpc.py` or `pollux-rpc` send them.
//!
//! Without `-c` it starts empty: no bdev, no target. With `-c` it loads SPDK's JSON config
//! (what `save_config` writes): the `bdev` subsystem, then the `ublk` subsystem
//! (`ublk_create_target`, `ublk_start_disk`), each checked whole before anything is created;
//! other subsystems are skipped. The disks start on a thread of their own (the kernel reads
//! from a disk before it reports it started, and the reactors serve those reads).
//!
//! ```text
//! pollux-ublk -m 0x3 --no-huge -s 512
//! pollux-rpc bdev_malloc_create -b Malloc0 256 4096
//! pollux-rpc ublk_create_target
//! pollux-rpc ublk_start_disk Malloc0 0 -q 2 -d 128
//! mkfs.ext4 /dev/ublkb0
//! ```
//!
//! SIGINT / SIGTERM / `spdk_kill_instance`: every disk is stopped (STOP_DEV while its queues
//! still serve, then DEL_DEV) before the reactors exit. A pollux-ublk killed with SIGKILL
//! leaves its disks quiesced in the kernel (`UBLK_F_USER_RECOVERY`); the next one recovers a
//! disk with `ublk_start_disk` or `ublk_recover_disk` on the same id.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use clap::Parser;
use pollux_bdev::config;
use pollux_bdev::BdevRegistry;
use pollux_cli::error_chain;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig, AppHandle, ThreadCtx};
use pollux_rpc::target_app;
use pollux_rpc::{
    register_bdev, register_framework, register_log, register_ublk, BdevRpc, LogHooks, RpcError,
    RpcMethods, RpcServer, RpcServerConfig, RpcState, StartInit, DEFAULT_SOCKET_PATH,
};
use pollux_ublk::UblkTarget;

/// DMA memory beyond the malloc bdevs' (bdev channels, NVMe queues).
const HEADROOM_MIB: u64 = 32;
/// DMA memory for bdevs created over RPC, when `-s` does not say.
const RPC_HEADROOM_MIB: u64 = 64;
/// DMA memory for ublk queues, when `-s` does not say: each queue holds one buffer of
/// `pollux_ublk::target::MAX_IO_BUF_BYTES` (128 KiB) per tag, 16 MiB at the default depth.
const QUEUES_MIB: u64 = 128;

/// SPDK's app flags.
#[derive(Parser, Debug)]
#[command(
    name = "pollux-ublk",
    version,
    about = "ublk target: serves Pollux bdevs as host kernel block devices /dev/ublkbN"
)]
struct Args {
    /// Core mask (0x3 or [0,2-4]): the reactors ublk queues may run on.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// JSON configuration in SPDK's format (bdev and ublk subsystems, as save_config writes
    /// them). Without it the target starts empty.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// DMA memory to reserve, in MiB (default: what the config's malloc bdevs need, plus
    /// 32 MiB of headroom, 64 MiB for bdevs created over RPC and 128 MiB for ublk queues).
    #[arg(short = 's', long = "mem-size")]
    mem_size_mib: Option<usize>,
    /// Use locked anonymous memory instead of hugepages.
    #[arg(long = "no-huge")]
    no_huge: bool,
    /// JSON-RPC socket.
    #[arg(short = 'r', long = "rpc-socket", default_value = DEFAULT_SOCKET_PATH)]
    rpc_socket: PathBuf,
    /// Start with only the RPC server; load the config at framework_start_init.
    #[arg(long = "wait-for-rpc")]
    wait_for_rpc: bool,
}

fn main() -> ExitCode {
    let log_filter = Arc::new(pollux_cli::init_logging("info"));
    let args = Args::parse();
    match run(&args, log_filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pollux-ublk: {message}");
            ExitCode::FAILURE
        }
    }
}

type Slot<T> = Arc<Mutex<Option<T>>>;

fn take<T>(slot: &Slot<T>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn put<T>(slot: &Slot<T>, value: T) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
}

fn run(args: &Args, log_filter: Arc<pollux_cli::LogFilter>) -> Result<(), String> {
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| format!("-m: {e}"))?;
    let config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("-c {}: {e}", path.display()))?;
            let value = serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("-c {}: {e}", path.display()))?;
            // Checked whole now, so a bad ublk section fails before anything is created.
            let entries = pollux_ublk::config::parse(&value)
                .map_err(|e| format!("-c {}: {e}", path.display()))?;
            Some((path.clone(), value, entries))
        }
        None => None,
    };
    let demand_mib = config
        .as_ref()
        .map_or(0, |(_, value, _)| target_app::bdev_config_demand_mib(value));
    let mem_size_mib = match args.mem_size_mib {
        Some(mib) => mib,
        None => usize::try_from(
            demand_mib
                .saturating_add(HEADROOM_MIB)
                .saturating_add(RPC_HEADROOM_MIB)
                .saturating_add(QUEUES_MIB),
        )
        .map_err(|_| "the configuration needs more memory than this host can address")?,
    };
    let dma = DmaMemory::new(DmaConfig {
        size_mib: mem_size_mib,
        no_huge: args.no_huge,
    })
    .map_err(|e| format!("DMA memory ({mem_size_mib} MiB): {}", error_chain(&e)))?;

    let registry = BdevRegistry::new();
    let app = App::new(AppConfig {
        name: "pollux-ublk".to_string(),
        cpumask,
        ..AppConfig::default()
    })
    .map_err(|e| error_chain(&e))?;
    let target = UblkTarget::new(app.handle(), registry.clone(), dma.clone());
    let disk_starter: Slot<JoinHandle<()>> = Arc::new(Mutex::new(None));
    let init = Arc::new(Init {
        config,
        registry: registry.clone(),
        dma: dma.clone(),
        target: target.clone(),
        app: app.handle(),
        starter: disk_starter.clone(),
    });

    let (state, start_init): (RpcState, Option<Box<StartInit>>) = if args.wait_for_rpc {
        let init = init.clone();
        let hook: Box<StartInit> =
            Box::new(move |_ctx: &mut ThreadCtx| init.run().map_err(RpcError::internal));
        (RpcState::Startup, Some(hook))
    } else {
        (RpcState::Runtime, None)
    };
    let setup = |e: pollux_rpc::ServerError| error_chain(&e);
    let mut methods = RpcMethods::new(state);
    register_framework(&mut methods, start_init).map_err(setup)?;
    let (set, get) = log_filter.hooks();
    register_log(&mut methods, LogHooks { set, get }).map_err(setup)?;
    // bdev before ublk: save_config writes the subsystems in this order.
    register_bdev(
        &mut methods,
        BdevRpc::new(registry.clone(), Some(dma.clone())),
    )
    .map_err(setup)?;
    register_ublk(&mut methods, target.clone()).map_err(setup)?;

    let server: Slot<RpcServer> = Arc::new(Mutex::new(None));
    let failure: Slot<String> = Arc::new(Mutex::new(None));
    let stopper: Slot<JoinHandle<()>> = Arc::new(Mutex::new(None));
    let (server_slot, failure_slot, stopper_slot) =
        (server.clone(), failure.clone(), stopper.clone());
    let rpc_socket = args.rpc_socket.clone();
    let wait_for_rpc = args.wait_for_rpc;
    let admin_registry = registry.clone();
    let stop_target = target.clone();
    let result = app
        .run(move |ctx| {
            // Stop the disks while the reactors still serve their queues: STOP_DEV flushes
            // through them. The queues keep polling after the exit request until their tags
            // are aborted (or a grace period ends), so the threads exit after the disks.
            let on_stop = stop_target.clone();
            let slot = stopper_slot.clone();
            ctx.on_exit(move |_ctx| {
                let spawned = std::thread::Builder::new()
                    .name("ublk-shutdown".to_string())
                    .spawn(move || on_stop.stop_all());
                match spawned {
                    Ok(join) => put(&slot, join),
                    Err(error) => {
                        tracing::error!(%error, "could not start the ublk shutdown thread")
                    }
                }
            });
            let fail = |ctx: &mut ThreadCtx, message: String| {
                put(&failure_slot, message);
                ctx.app_stop();
            };
            let config = RpcServerConfig {
                socket_path: rpc_socket.clone(),
                ..RpcServerConfig::default()
            };
            match RpcServer::start(config, methods, ctx.handle()) {
                Ok(started) => put(&server_slot, started),
                Err(error) => {
                    return fail(
                        ctx,
                        format!("-r {}: {}", rpc_socket.display(), error_chain(&error)),
                    )
                }
            }
            target_app::register_admin_pollers(ctx, admin_registry);
            if wait_for_rpc {
                println!(
                    "pollux-ublk: waiting for framework_start_init on {}",
                    rpc_socket.display()
                );
            } else if let Err(message) = init.run() {
                fail(ctx, message);
            } else {
                println!("pollux-ublk: RPC on {}", rpc_socket.display());
            }
        })
        .map_err(|e| error_chain(&e));
    // The reactor threads have exited. Wait for the disk start-up and the shutdown threads,
    // stop whatever disk is left (queues are gone: it is forced), stop the RPC server, then
    // shut NVMe and virtio controllers down before the DMA memory goes.
    for slot in [&disk_starter, &stopper] {
        if let Some(join) = take(slot) {
            if join.join().is_err() {
                tracing::error!("a ublk thread panicked");
            }
        }
    }
    drop(take(&server));
    target.stop_all();
    target_app::detach_controllers(&registry);
    result?;
    if let Some(message) = take(&failure) {
        return Err(message);
    }
    Ok(())
}

/// What the target serves before any RPC: `-c`'s bdevs and ublk disks, or nothing.
struct Init {
    config: Option<(PathBuf, serde_json::Value, Vec<pollux_ublk::config::Entry>)>,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    target: Arc<UblkTarget>,
    app: AppHandle,
    starter: Slot<JoinHandle<()>>,
}

impl Init {
    /// Creates the bdevs (removed again if that fails, so a `framework_start_init` may be
    /// retried), then starts the ublk subsystem on a thread of its own: a disk that fails
    /// to start stops the app, with what was started of the subsystem undone.
    fn run(&self) -> Result<(), String> {
        let Some((path, value, entries)) = &self.config else {
            return Ok(());
        };
        let table = target_app::bdev_method_table().map_err(|e| error_chain(&e))?;
        config::apply(value, path, &self.registry, &table, Some(&self.dma))
            .map_err(|e| error_chain(&e))?;
        if entries.is_empty() {
            return Ok(());
        }
        let (target, entries, app) = (self.target.clone(), entries.clone(), self.app.clone());
        let path = path.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("ublk-config".to_string())
            .spawn(
                move || match pollux_ublk::config::apply(&target, &entries) {
                    Ok(()) => {
                        for disk in target.disks() {
                            println!(
                                "pollux-ublk: {} serves bdev {} ({} queues of {})",
                                pollux_ublk::sys::block_dev_path(disk.ublk_id),
                                disk.bdev_name,
                                disk.num_queues,
                                disk.queue_depth
                            );
                        }
                    }
                    Err(error) => {
                        eprintln!("pollux-ublk: -c {path}: {}", error_chain(&error));
                        app.stop();
                    }
                },
            )
            .map_err(|e| format!("starting the ublk config thread: {e}"))?;
        put(&self.starter, spawned);
        Ok(())
    }
}
