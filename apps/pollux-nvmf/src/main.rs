//! `pollux-nvmf`: the NVMe over Fabrics target, TCP transport (SPDK's `nvmf_tgt` app). Serves
//! bdevs to other machines (the Linux kernel's nvme-tcp initiator, `nvme connect -t tcp`),
//! configured at run time over JSON-RPC on `-r` (default `/var/tmp/pollux.sock`): the
//! framework's, the bdev layer's and the `nvmf_*` methods, as SPDK's `rpc.py` or `pollux-rpc`
//! send them.
//!
//! Without `-c` it starts empty, as SPDK's nvmf_tgt does: no transport, no subsystem, no
//! listener (nothing listens until `nvmf_create_transport` and `nvmf_subsystem_add_listener`).
//! With `-c` it loads SPDK's JSON config (what `save_config` writes): the `bdev` subsystem,
//! then the `nvmf` subsystem (transport, subsystems, listeners, hosts, namespaces), each
//! checked whole before anything is created; other subsystems are skipped. With
//! `--wait-for-rpc` it starts with only the RPC server and loads the config at
//! `framework_start_init`.
//!
//! ```text
//! pollux-nvmf -m 0x3 --no-huge
//! pollux-rpc nvmf_create_transport -t TCP
//! pollux-rpc bdev_malloc_create -b Malloc0 64 512
//! pollux-rpc nvmf_create_subsystem nqn.2016-06.io.spdk:cnode1 -a -s SPDK00000000000001
//! pollux-rpc nvmf_subsystem_add_ns nqn.2016-06.io.spdk:cnode1 Malloc0
//! pollux-rpc nvmf_subsystem_add_listener nqn.2016-06.io.spdk:cnode1 -t tcp -a 127.0.0.1 -s 4420
//! nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2016-06.io.spdk:cnode1
//! ```
//!
//! Connections are spread over one poll group per core of `-m`. SIGINT / SIGTERM /
//! `spdk_kill_instance`: the poll groups close their connections once their in-flight I/O
//! completed, then the RPC server stops (its socket removed), the subsystems are deleted
//! (listeners closed, bdev claims released) and the process exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use pollux_bdev::config;
use pollux_bdev::BdevRegistry;
use pollux_cli::error_chain;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_nvmf::NvmfTarget;
use pollux_reactor::{App, AppConfig, ThreadCtx};
use pollux_rpc::target_app;
use pollux_rpc::{
    register_bdev, register_framework, register_log, register_nvmf, BdevRpc, LogHooks, RpcError,
    RpcMethods, RpcServer, RpcServerConfig, RpcState, StartInit, DEFAULT_SOCKET_PATH,
};

/// DMA memory beyond the malloc bdevs' (bdev channels, NVMe queues).
const HEADROOM_MIB: u64 = 32;
/// DMA memory for bdevs created over RPC, when `-s` does not say.
const RPC_HEADROOM_MIB: u64 = 64;
/// DMA memory for connections, when `-s` does not say: each I/O queue owns
/// `queue depth * max_io_size` (16 MiB with SPDK's defaults, 128 x 128 KiB), each admin queue
/// `depth * 8 KiB`; 256 MiB holds 15 default I/O queues.
const CONNECTIONS_MIB: u64 = 256;

/// SPDK nvmf_tgt's flags.
#[derive(Parser, Debug)]
#[command(
    name = "pollux-nvmf",
    version,
    about = "NVMe over Fabrics target (TCP): serves Pollux bdevs to other machines"
)]
struct Args {
    /// Core mask (0x3 or [0,2-4]): one poll group per core.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    cpumask: String,
    /// JSON configuration in SPDK's format (bdev and nvmf subsystems, as save_config writes
    /// them). Without it the target starts empty.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// DMA memory to reserve, in MiB (default: what the config's malloc bdevs need, plus
    /// 32 MiB of headroom, 64 MiB for bdevs created over RPC and 256 MiB for connections).
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
            eprintln!("pollux-nvmf: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, log_filter: Arc<pollux_cli::LogFilter>) -> Result<(), String> {
    let cpumask = CpuMask::parse_available(&args.cpumask).map_err(|e| format!("-m: {e}"))?;
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
    let demand_mib = config
        .as_ref()
        .map_or(0, |(_, value)| target_app::bdev_config_demand_mib(value));
    let mem_size_mib = match args.mem_size_mib {
        Some(mib) => mib,
        None => usize::try_from(
            demand_mib
                .saturating_add(HEADROOM_MIB)
                .saturating_add(RPC_HEADROOM_MIB)
                .saturating_add(CONNECTIONS_MIB),
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
        name: "pollux-nvmf".to_string(),
        cpumask,
        ..AppConfig::default()
    })
    .map_err(|e| error_chain(&e))?;
    let target = NvmfTarget::new(app.handle(), registry.clone(), dma.clone());
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
    // bdev before nvmf: save_config writes the subsystems in this order.
    register_bdev(
        &mut methods,
        BdevRpc::new(registry.clone(), Some(dma.clone())),
    )
    .map_err(setup)?;
    register_nvmf(&mut methods, target.clone()).map_err(setup)?;

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
                    "pollux-nvmf: waiting for framework_start_init on {}",
                    rpc_socket.display()
                );
            } else if let Err(message) = init.run() {
                fail(ctx, message);
            } else {
                println!("pollux-nvmf: RPC on {}", rpc_socket.display());
            }
        })
        .map_err(|e| error_chain(&e));
    // The reactor threads have exited, so every poll group has closed its connections after
    // their in-flight I/O. Stop the RPC server, delete the subsystems (listeners closed,
    // claims released), then shut NVMe and virtio controllers down before the DMA memory goes.
    drop(server.lock().unwrap_or_else(|p| p.into_inner()).take());
    target.shutdown();
    target_app::detach_controllers(&registry);
    result?;
    if let Some(message) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(message);
    }
    Ok(())
}

/// What the target serves before any RPC: `-c`'s bdevs and nvmf subsystem, or nothing.
struct Init {
    config: Option<(PathBuf, serde_json::Value)>,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    target: Arc<NvmfTarget>,
}

impl Init {
    /// Creates the bdevs, then the nvmf subsystem's transport, subsystems, listeners, hosts
    /// and namespaces; on an error removes the bdevs it created (the nvmf loader removes its
    /// own), so a `framework_start_init` may be retried.
    fn run(&self) -> Result<(), String> {
        let Some((path, value)) = &self.config else {
            return Ok(());
        };
        let table = target_app::bdev_method_table().map_err(|e| error_chain(&e))?;
        let bdevs = config::apply(value, path, &self.registry, &table, Some(&self.dma))
            .map_err(|e| error_chain(&e))?;
        if let Err(error) =
            pollux_nvmf::config::apply(&self.target, value, &path.display().to_string())
        {
            for bdev in bdevs.iter().rev() {
                if let Err(error) = self.registry.unregister(bdev) {
                    tracing::error!(%bdev, %error, "start-up rollback: could not delete the bdev");
                }
            }
            return Err(error_chain(&error));
        }
        for subsystem in self.target.subsystems() {
            for listener in subsystem.listeners() {
                println!(
                    "pollux-nvmf: subsystem {} listening on {} ({} namespaces)",
                    subsystem.nqn,
                    listener.addr,
                    subsystem.namespaces().len()
                );
            }
        }
        Ok(())
    }
}
