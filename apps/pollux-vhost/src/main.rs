//! `pollux-vhost`: the vhost-user-blk target (SPDK's `vhost` app). Serves bdevs to virtual
//! machines, one vhost-user socket per controller in the socket directory (`-S`).
//!
//! Without `-c` it serves the in-memory default: a 64 MiB malloc bdev (`Malloc0`, 512-byte
//! blocks) exported as `vhost.0`. With `-c` it loads SPDK's JSON config: the `bdev`
//! subsystem (malloc, null, aio, uring, `bdev_nvme_attach_controller`) and the `vhost_blk`
//! subsystem (`vhost_create_blk_controller`).
//!
//! ```text
//! pollux-vhost -S /var/tmp -m 0x1 --no-huge
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
//!     -numa node,memdev=mem -chardev socket,id=vu0,path=/var/tmp/vhost.0 \
//!     -device vhost-user-blk-pci,chardev=vu0,num-queues=2
//! ```
//!
//! SIGINT / SIGTERM: the rings stop once their in-flight I/O completed, then the sockets are
//! removed and the process exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::modules::malloc;
use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_nvme::bdev::NvmeModule;
use pollux_reactor::{App, AppConfig, PollStatus, ThreadCtx};
use pollux_vhost::{ControllerOptions, VhostTarget};

const DEFAULT_MALLOC_NAME: &str = "Malloc0";
const DEFAULT_MALLOC_MIB: u64 = 64;
const DEFAULT_MALLOC_BLOCK_SIZE_BYTES: u32 = 512;
const DEFAULT_CONTROLLER: &str = "vhost.0";
/// DMA memory beyond the malloc bdevs' (bdev channels, NVMe queues).
const HEADROOM_MIB: u64 = 32;
const NVME_CONTROLLER_MIB: u64 = 4;
const NVME_ADMIN_POLL_US: u64 = 10_000;

/// SPDK vhost's flags.
#[derive(Parser, Debug)]
#[command(
    name = "pollux-vhost",
    version,
    about = "vhost-user-blk target: serves Pollux bdevs to virtual machines, zero copy"
)]
struct Args {
    /// Core mask (0x3 or [0,2-4]).
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// Directory of the controllers' vhost-user sockets.
    #[arg(short = 'S', long = "socket-dir", default_value = "/var/tmp")]
    socket_dir: PathBuf,
    /// JSON configuration in SPDK's format (bdev and vhost_blk subsystems). Without it: a
    /// 64 MiB malloc bdev exported as vhost.0.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// DMA memory to reserve, in MiB (default: what the malloc bdevs need plus headroom).
    #[arg(short = 's', long = "mem-size")]
    mem_size_mib: Option<usize>,
    /// Use locked anonymous memory instead of hugepages.
    #[arg(long = "no-huge")]
    no_huge: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pollux-vhost: {message}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// MiB of DMA memory the config's bdevs need (a rough pass; the real load reports errors).
fn config_demand_mib(value: &serde_json::Value) -> u64 {
    let mut bytes = 0u64;
    let subsystems = value.get("subsystems").and_then(|s| s.as_array());
    for entry in subsystems
        .into_iter()
        .flatten()
        .filter(|s| s.get("subsystem").and_then(|n| n.as_str()) == Some("bdev"))
        .filter_map(|s| s.get("config").and_then(|c| c.as_array()))
        .flatten()
    {
        let method = entry.get("method").and_then(|m| m.as_str()).unwrap_or("");
        let param = |key: &str| {
            entry
                .get("params")
                .and_then(|p| p.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        if method == malloc::METHOD {
            bytes = bytes.saturating_add(param("num_blocks").saturating_mul(param("block_size")));
        }
        if method == pollux_nvme::bdev::ATTACH_METHOD {
            bytes = bytes.saturating_add(NVME_CONTROLLER_MIB << 20);
        }
    }
    bytes.div_ceil(1 << 20)
}

fn run(args: &Args) -> Result<(), String> {
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| format!("-m: {e}"))?;
    if !args.socket_dir.is_dir() {
        return Err(format!("-S {}: not a directory", args.socket_dir.display()));
    }
    let config_value = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("-c {}: {e}", path.display()))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|e| format!("-c {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let demand_mib = config_value
        .as_ref()
        .map_or(DEFAULT_MALLOC_MIB, config_demand_mib);
    let mem_size_mib = match args.mem_size_mib {
        Some(mib) => mib,
        None => usize::try_from(demand_mib.saturating_add(HEADROOM_MIB))
            .map_err(|_| "the configuration needs more memory than this host can address")?,
    };
    let dma = DmaMemory::new(DmaConfig {
        size_mib: mem_size_mib,
        no_huge: args.no_huge,
    })
    .map_err(|e| format!("DMA memory ({mem_size_mib} MiB): {}", error_chain(&e)))?;

    let registry = BdevRegistry::new();
    let controllers: Vec<ControllerOptions> = match (&args.config, &config_value) {
        (Some(path), Some(value)) => {
            let mut table = MethodTable::with_builtin();
            pollux_nvme::bdev::register_methods(&mut table).map_err(|e| error_chain(&e))?;
            // Both subsystems are checked before anything is created.
            let controllers =
                pollux_vhost::config::parse(value, path).map_err(|e| error_chain(&e))?;
            config::apply(value, path, &registry, &table, Some(&dma))
                .map_err(|e| error_chain(&e))?;
            controllers
        }
        _ => {
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
            vec![ControllerOptions::new(
                DEFAULT_CONTROLLER,
                DEFAULT_MALLOC_NAME,
            )]
        }
    };

    let app = App::new(AppConfig {
        name: "pollux-vhost".to_string(),
        cpumask,
        ..AppConfig::default()
    })
    .map_err(|e| error_chain(&e))?;
    let target_slot: Arc<Mutex<Option<Arc<VhostTarget>>>> = Arc::new(Mutex::new(None));
    let failed = Arc::new(AtomicBool::new(false));
    let start_slot = target_slot.clone();
    let start_failed = failed.clone();
    let start_registry = registry.clone();
    let socket_dir = args.socket_dir.clone();
    let result = app
        .run(move |ctx| {
            let target = VhostTarget::new(ctx.app().clone(), start_registry, &socket_dir);
            *start_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(target.clone());
            if let Err(message) = start(ctx, &target, controllers) {
                eprintln!("pollux-vhost: {message}");
                start_failed.store(true, Ordering::Relaxed);
                ctx.app_stop();
            }
        })
        .map_err(|e| error_chain(&e));
    // The reactor threads have exited, so every ring has stopped after its in-flight I/O:
    // disconnect the front-ends and remove the sockets, then shut NVMe controllers down
    // before the DMA memory goes away.
    let target = target_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(target) = target {
        target.shutdown();
    }
    NvmeModule::global().detach_all(&registry);
    result?;
    if failed.load(Ordering::Relaxed) {
        return Err("start-up failed".to_string());
    }
    Ok(())
}

/// On the app thread: the controllers, and the NVMe admin poller when controllers exist.
fn start(
    ctx: &mut ThreadCtx,
    target: &Arc<VhostTarget>,
    controllers: Vec<ControllerOptions>,
) -> Result<(), String> {
    for options in controllers {
        let info = target
            .create_blk_controller(options)
            .map_err(|e| error_chain(&e))?;
        println!(
            "pollux-vhost: controller {} serves bdev {} on {}",
            info.ctrlr,
            info.bdev,
            socket_display(&info.socket)
        );
    }
    if !NvmeModule::global().controller_names().is_empty() {
        let admin = ctx.register_poller("nvme_admin", NVME_ADMIN_POLL_US, |_ctx| {
            PollStatus::from_busy(NvmeModule::global().poll_admin() > 0)
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(admin));
    }
    Ok(())
}

fn socket_display(path: &Path) -> String {
    path.display().to_string()
}
