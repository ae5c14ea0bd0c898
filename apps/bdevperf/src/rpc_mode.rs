//! `bdevperf -z`, as SPDK's: the app starts, serves JSON-RPC on `-r` (the framework's and the
//! bdev layer's methods, and `perform_tests`), and runs the command line's workload each time
//! `perform_tests` is called, answering with the results in `--json`'s shape (SPDK's
//! `bdevperf.py perform_tests`). It stops on `spdk_kill_instance` or SIGINT / SIGTERM.
//!
//! The jobs run on one thread per core of `-m`, created by the first run and reused; the
//! answer is sent by the thread whose job finished last.
//!
//! The app thread polls the NVMe admin queues and, every `VIRTIO_ADMIN_POLL_US`, the
//! virtio-user back-ends, so a virtio bdev attached over RPC whose back-end goes away is
//! failed and removed, as in the normal mode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::DmaMemory;
use pollux_nvme::bdev::NvmeModule;
use pollux_nvmf::host::NvmfHostModule;
use pollux_reactor::{send_msg, App, AppConfig, PollStatus, ThreadCtx, ThreadHandle};
use pollux_rpc::error::code;
use pollux_rpc::{
    register_bdev, register_framework, register_log, Allowed, BdevRpc, Call, LogHooks, Reply,
    RpcError, RpcMethods, RpcServer, RpcServerConfig, RpcState,
};
use pollux_virtio::bdev::VirtioModule;

use crate::args::Args;
use crate::job::{JobSpec, RunShared};
use crate::{report, start_jobs, NVME_ADMIN_POLL_US, VIRTIO_ADMIN_POLL_US};

/// DMA memory reserved beyond `-c`'s needs for bdevs created over RPC (without `-s`).
pub const HEADROOM_BYTES: u64 = 256 << 20;

/// What `perform_tests` needs between calls.
struct Perf {
    args: Args,
    cpumask: CpuMask,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    running: Arc<AtomicBool>,
    /// One job thread per core, created by the first run.
    threads: Mutex<Vec<(usize, ThreadHandle)>>,
}

impl Perf {
    fn perform(&self, ctx: &mut ThreadCtx, call: Call) {
        let (params, reply) = call.into_parts();
        if let Err(error) = params.allow_only(&[]) {
            return reply.err(error);
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return reply.err(RpcError::new(
                code::EBUSY,
                "perform_tests: a test run is already in progress",
            ));
        }
        if let Err(error) = self.start(ctx, reply) {
            self.running.store(false, Ordering::Release);
            tracing::warn!(%error, "bdevperf: perform_tests refused");
        }
    }

    /// Starts one run; on an error the reply has been sent.
    fn start(&self, ctx: &mut ThreadCtx, reply: Reply) -> Result<(), RpcError> {
        let fail = |reply: Reply, error: RpcError| {
            reply.err(error.clone());
            Err(error)
        };
        let targets = match &self.args.target {
            Some(target) => match self.registry.info(target) {
                Ok(info) => vec![info.name],
                Err(_) => {
                    return fail(
                        reply,
                        RpcError::new(
                            code::ENODEV,
                            format!("perform_tests: -T {target}: no such bdev"),
                        ),
                    )
                }
            },
            None => self.registry.names(),
        };
        if targets.is_empty() {
            return fail(
                reply,
                RpcError::new(
                    code::ENODEV,
                    "perform_tests: no bdev to run on: create one first (bdev_malloc_create, ...)",
                ),
            );
        }
        let specs = JobSpec::for_each_core_and_bdev(&self.args, &self.cpumask, &targets);
        let core_count = self.cpumask.count();
        let pending = Mutex::new(Some(reply));
        let running = self.running.clone();
        let shared = Arc::new(RunShared::new(
            self.registry.clone(),
            self.dma.clone(),
            specs.len(),
            Box::new(move |_ctx, shared| {
                let mut results =
                    std::mem::take(&mut *shared.results.lock().unwrap_or_else(|p| p.into_inner()));
                results.sort_by_key(|r| r.spec.index);
                report::print_table(&results);
                let value = report::to_json(&results, core_count);
                let reply = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
                running.store(false, Ordering::Release);
                if let Some(reply) = reply {
                    reply.ok(value);
                }
            }),
        ));
        tracing::info!(jobs = specs.len(), "bdevperf: perform_tests: run starting");
        for core in self.cpumask.iter() {
            let thread = self.thread_for(ctx, core)?;
            let core_specs: Vec<JobSpec> =
                specs.iter().filter(|s| s.core == core).cloned().collect();
            let job_shared = shared.clone();
            if send_msg(&thread, move |ctx| start_jobs(ctx, core_specs, job_shared)).is_err() {
                // Jobs already started elsewhere still finish; this run cannot be answered
                // properly, so say so (the reply is answered by its drop).
                return Err(RpcError::internal(format!(
                    "perform_tests: could not start the jobs of core {core}"
                )));
            }
        }
        Ok(())
    }

    fn thread_for(&self, ctx: &mut ThreadCtx, core: usize) -> Result<ThreadHandle, RpcError> {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, thread)) = threads.iter().find(|(c, _)| *c == core) {
            return Ok(thread.clone());
        }
        let only_core: CpuMask = std::iter::once(core).collect();
        let thread = ctx
            .create_thread(&format!("bdevperf_c{core}"), Some(&only_core))
            .map_err(|e| RpcError::internal(format!("perform_tests: {e}")))?;
        threads.push((core, thread.clone()));
        Ok(thread)
    }
}

/// Serves RPC until the app is stopped.
pub fn run(
    args: &Args,
    cpumask: CpuMask,
    dma: Arc<DmaMemory>,
    registry: Arc<BdevRegistry>,
    log_filter: Arc<pollux_cli::LogFilter>,
) -> Result<bool, String> {
    let mut methods = RpcMethods::new(RpcState::Runtime);
    let setup = |e: pollux_rpc::ServerError| e.to_string();
    register_framework(&mut methods, None).map_err(setup)?;
    let (set, get) = log_filter.hooks();
    register_log(&mut methods, LogHooks { set, get }).map_err(setup)?;
    register_bdev(
        &mut methods,
        BdevRpc::new(registry.clone(), Some(dma.clone())),
    )
    .map_err(setup)?;
    let perf = Arc::new(Perf {
        args: args.clone(),
        cpumask,
        registry: registry.clone(),
        dma: dma.clone(),
        running: Arc::new(AtomicBool::new(false)),
        threads: Mutex::new(Vec::new()),
    });
    methods
        .register("perform_tests", Allowed::Runtime, move |ctx, call| {
            perf.perform(ctx, call)
        })
        .map_err(setup)?;

    let app = App::new(AppConfig {
        name: "bdevperf".to_string(),
        cpumask,
        interrupt_mode: args.interrupt_mode,
        ..AppConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let server: Arc<Mutex<Option<RpcServer>>> = Arc::new(Mutex::new(None));
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (server_slot, failure_slot) = (server.clone(), failure.clone());
    let socket = args.rpc_socket.clone();
    let admin_registry = registry.clone();
    let app_result = app
        .run(move |ctx| {
            let config = RpcServerConfig {
                socket_path: socket.clone(),
                ..RpcServerConfig::default()
            };
            match RpcServer::start(config, methods, ctx.handle()) {
                Ok(started) => {
                    println!(
                        "bdevperf: waiting for perform_tests on {}",
                        socket.display()
                    );
                    *server_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                }
                Err(error) => {
                    *failure_slot.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(pollux_rpc::error::error_chain(&error));
                    ctx.app_stop();
                    return;
                }
            }
            // Controllers may be attached over RPC at any time: poll their admin queues.
            let admin = ctx.register_poller("nvme_admin", NVME_ADMIN_POLL_US, |_ctx| {
                if NvmeModule::global().poll_admin() + NvmfHostModule::global().poll_admin() > 0 {
                    PollStatus::Busy
                } else {
                    PollStatus::Idle
                }
            });
            // A virtio bdev attached over RPC must notice a lost back-end (hot remove), as
            // in the normal mode.
            let virtio_registry = admin_registry.clone();
            let virtio_admin =
                ctx.register_poller("virtio_admin", VIRTIO_ADMIN_POLL_US, move |_ctx| {
                    if VirtioModule::global().poll_admin(&virtio_registry) > 0 {
                        PollStatus::Busy
                    } else {
                        PollStatus::Idle
                    }
                });
            ctx.on_exit(move |ctx| {
                ctx.unregister_poller(admin);
                ctx.unregister_poller(virtio_admin);
            });
        })
        .map_err(|e| e.to_string());
    // Flush the last answers (spdk_kill_instance's) and remove the socket.
    drop(server.lock().unwrap_or_else(|p| p.into_inner()).take());
    NvmeModule::global().detach_all(&registry);
    NvmfHostModule::global().detach_all(&registry);
    VirtioModule::global().detach_all(&registry);
    app_result?;
    if let Some(message) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(message);
    }
    Ok(true)
}
