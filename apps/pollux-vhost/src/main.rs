//! `pollux-vhost`: the vhost-user-blk target (SPDK's `vhost` app). Serves bdevs to virtual
//! machines, one vhost-user socket per controller in the socket directory (`-S`), and is
//! configured at run time over JSON-RPC on `-r` (default `/var/tmp/pollux.sock`): the
//! framework's, the bdev layer's (malloc, null, aio, uring, nvme, virtio) and the vhost
//! methods, as SPDK's `rpc.py` or `pollux-rpc` send them.
//!
//! Without `-c` it serves the in-memory default: a 64 MiB malloc bdev (`Malloc0`, 512-byte
//! blocks) exported as `vhost.0`. With `-c` it loads SPDK's JSON config (what `save_config`
//! writes): the `bdev` subsystem (malloc, null, aio, uring, `bdev_nvme_attach_controller`,
//! `bdev_virtio_attach_controller`) and the `vhost_blk` subsystem
//! (`vhost_create_blk_controller`, `vhost_controller_set_coalescing`), both checked whole
//! before anything is created; other subsystems of an SPDK config are skipped. With
//! `--wait-for-rpc` it starts with only the RPC server and does that (the config or the
//! default) at `framework_start_init`.
//!
//! ```text
//! pollux-vhost -S /var/tmp -m 0x1 --no-huge
//! qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on \
//!     -numa node,memdev=mem -chardev socket,id=vu0,path=/var/tmp/vhost.0,reconnect=1 \
//!     -device vhost-user-blk-pci,chardev=vu0,num-queues=2
//! pollux-rpc bdev_malloc_create -b Malloc1 16 512
//! pollux-rpc vhost_create_blk_controller vhost.1 Malloc1
//! ```
//!
//! The RPC socket is refused when another live process listens on it and replaced when it is
//! stale. It is bound before any controller socket, so a second target on the same `-r`
//! exits without touching the first one's sockets.
//!
//! SIGINT / SIGTERM / `spdk_kill_instance`: the rings stop once their in-flight I/O
//! completed, then the RPC server stops (its socket removed), the controllers are deleted
//! (their sockets removed), NVMe and virtio controllers are detached, and the process exits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use pollux_bdev::config;
use pollux_bdev::modules::malloc;
use pollux_bdev::BdevRegistry;
use pollux_cli::error_chain;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig, ThreadCtx};
use pollux_rpc::target_app;
use pollux_rpc::{
    register_bdev, register_framework, register_log, register_vhost, BdevRpc, LogHooks, RpcError,
    RpcMethods, RpcServer, RpcServerConfig, RpcState, StartInit, DEFAULT_SOCKET_PATH,
};
use pollux_vhost::{ControllerOptions, VhostTarget};

const DEFAULT_MALLOC_NAME: &str = "Malloc0";
const DEFAULT_MALLOC_MIB: u64 = 64;
const DEFAULT_MALLOC_BLOCK_SIZE_BYTES: u32 = 512;
const DEFAULT_CONTROLLER: &str = "vhost.0";
/// DMA memory beyond the malloc bdevs' (bdev channels, NVMe queues).
const HEADROOM_MIB: u64 = 32;
/// DMA memory for bdevs created over RPC, when `-s` does not say.
const RPC_HEADROOM_MIB: u64 = 64;

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
    /// JSON configuration in SPDK's format (bdev and vhost_blk subsystems, as save_config
    /// writes them). Without it: a 64 MiB malloc bdev exported as vhost.0.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// DMA memory to reserve, in MiB (default: what the config's malloc bdevs need, plus
    /// 32 MiB of headroom and 64 MiB for bdevs created over RPC).
    #[arg(short = 's', long = "mem-size")]
    mem_size_mib: Option<usize>,
    /// Use locked anonymous memory instead of hugepages.
    #[arg(long = "no-huge")]
    no_huge: bool,
    /// JSON-RPC socket.
    #[arg(short = 'r', long = "rpc-socket", default_value = DEFAULT_SOCKET_PATH)]
    rpc_socket: PathBuf,
    /// Start with only the RPC server; load the config (or the default) at
    /// framework_start_init.
    #[arg(long = "wait-for-rpc")]
    wait_for_rpc: bool,
    /// Interrupt mode (SPDK's `--interrupt-mode`): a reactor with nothing to do sleeps in
    /// `epoll_wait` on its queues' kick fds and their bdevs' completion fds instead of
    /// busy-polling; a busy queue polls and turns the driver's kicks off.
    #[arg(long = "interrupt-mode")]
    interrupt_mode: bool,
}

fn main() -> ExitCode {
    let log_filter = Arc::new(pollux_cli::init_logging("info"));
    let args = Args::parse();
    match run(&args, log_filter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pollux-vhost: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, log_filter: Arc<pollux_cli::LogFilter>) -> Result<(), String> {
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| format!("-m: {e}"))?;
    if !args.socket_dir.is_dir() {
        return Err(format!("-S {}: not a directory", args.socket_dir.display()));
    }
    let config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("-c {}: {e}", path.display()))?;
            let value = serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| format!("-c {}: {e}", path.display()))?;
            Some((path.clone(), value))
        }
        None => None,
    };
    let demand_mib = config.as_ref().map_or(DEFAULT_MALLOC_MIB, |(_, value)| {
        target_app::bdev_config_demand_mib(value)
    });
    let mem_size_mib = match args.mem_size_mib {
        Some(mib) => mib,
        None => usize::try_from(
            demand_mib
                .saturating_add(HEADROOM_MIB)
                .saturating_add(RPC_HEADROOM_MIB),
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
        name: "pollux-vhost".to_string(),
        cpumask,
        interrupt_mode: args.interrupt_mode,
        ..AppConfig::default()
    })
    .map_err(|e| error_chain(&e))?;
    let target = VhostTarget::new(app.handle(), registry.clone(), &args.socket_dir);
    let init = Arc::new(Init {
        config,
        registry: registry.clone(),
        dma: dma.clone(),
        target: target.clone(),
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
    // bdev before vhost_blk: save_config writes the subsystems in this order.
    register_bdev(
        &mut methods,
        BdevRpc::new(registry.clone(), Some(dma.clone())),
    )
    .map_err(setup)?;
    register_vhost(&mut methods, target.clone()).map_err(setup)?;

    let server: Arc<Mutex<Option<RpcServer>>> = Arc::new(Mutex::new(None));
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (server_slot, failure_slot) = (server.clone(), failure.clone());
    let rpc_socket = args.rpc_socket.clone();
    let wait_for_rpc = args.wait_for_rpc;
    let admin_registry = registry.clone();
    let result = app
        .run(move |ctx| {
            let fail = |ctx: &mut ThreadCtx, message: String| {
                *failure_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                ctx.app_stop();
            };
            // The RPC socket first: a target already serving it keeps its sockets.
            let config = RpcServerConfig {
                socket_path: rpc_socket.clone(),
                ..RpcServerConfig::default()
            };
            match RpcServer::start(config, methods, ctx.handle()) {
                Ok(started) => {
                    *server_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                }
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
                    "pollux-vhost: waiting for framework_start_init on {}",
                    rpc_socket.display()
                );
            } else if let Err(message) = init.run() {
                fail(ctx, message);
            } else {
                println!("pollux-vhost: RPC on {}", rpc_socket.display());
            }
        })
        .map_err(|e| error_chain(&e));
    // The reactor threads have exited, so every ring has stopped after its in-flight I/O.
    // Stop the RPC server (its last answers flushed, its socket removed), disconnect the
    // front-ends and remove their sockets, then shut NVMe and virtio controllers down before
    // the DMA memory goes away.
    drop(server.lock().unwrap_or_else(|p| p.into_inner()).take());
    target.shutdown();
    target_app::detach_controllers(&registry);
    result?;
    if let Some(message) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(message);
    }
    Ok(())
}

/// What the target serves before any RPC: `-c`'s bdevs and controllers, or the default.
/// Run at start, or by `framework_start_init` under `--wait-for-rpc`.
struct Init {
    config: Option<(PathBuf, serde_json::Value)>,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    target: Arc<VhostTarget>,
}

impl Init {
    /// Creates the bdevs and controllers; on an error removes what it created, so a
    /// `framework_start_init` may be retried.
    fn run(&self) -> Result<(), String> {
        let (bdevs, controllers) = match &self.config {
            Some((path, value)) => {
                let table = target_app::bdev_method_table().map_err(|e| error_chain(&e))?;
                // Both subsystems are checked before anything is created.
                let controllers =
                    pollux_vhost::config::parse(value, path).map_err(|e| error_chain(&e))?;
                let bdevs = config::apply(value, path, &self.registry, &table, Some(&self.dma))
                    .map_err(|e| error_chain(&e))?;
                (bdevs, controllers)
            }
            None => {
                let info = malloc::create(
                    &self.registry,
                    &self.dma,
                    malloc::MallocOptions::from_size_mib(
                        Some(DEFAULT_MALLOC_NAME.to_string()),
                        DEFAULT_MALLOC_MIB,
                        DEFAULT_MALLOC_BLOCK_SIZE_BYTES,
                    ),
                )
                .map_err(|e| error_chain(&e))?;
                (
                    vec![info.name],
                    vec![ControllerOptions::new(
                        DEFAULT_CONTROLLER,
                        DEFAULT_MALLOC_NAME,
                    )],
                )
            }
        };
        let mut created: Vec<String> = Vec::new();
        for options in controllers {
            match self.target.create_blk_controller(options) {
                Ok(info) => {
                    println!(
                        "pollux-vhost: controller {} serves bdev {} on {}",
                        info.ctrlr,
                        info.bdev,
                        socket_display(&info.socket)
                    );
                    created.push(info.ctrlr);
                }
                Err(error) => {
                    self.roll_back(&created, &bdevs);
                    return Err(error_chain(&error));
                }
            }
        }
        Ok(())
    }

    fn roll_back(&self, controllers: &[String], bdevs: &[String]) {
        for ctrlr in controllers.iter().rev() {
            if let Err(error) = self.target.delete_controller(ctrlr) {
                tracing::error!(%ctrlr, %error, "start-up rollback: could not delete the controller");
            }
        }
        for bdev in bdevs.iter().rev() {
            if let Err(error) = self.registry.unregister(bdev) {
                tracing::error!(%bdev, %error, "start-up rollback: could not delete the bdev");
            }
        }
    }
}

fn socket_display(path: &Path) -> String {
    path.display().to_string()
}
