//! `pollux-rpc`: drives a Pollux target over JSON-RPC with SPDK rpc.py's command lines:
//!
//! ```text
//! pollux-rpc [-s sock] [-t timeout] bdev_malloc_create -b Malloc0 64 4096
//! pollux-rpc bdev_get_bdevs
//! pollux-rpc vhost_create_blk_controller vhost.0 Malloc0
//! pollux-rpc bdev_set_qos_limit Malloc0 --rw_ios_per_sec 10000
//! pollux-rpc framework_get_config bdev
//! pollux-rpc call bdev_get_bdevs '{"name": "Malloc0"}'
//! ```
//!
//! Output as rpc.py prints it: a string result bare, `true` nothing, anything else as
//! indented JSON. On an error response it prints the request and the server's error to
//! stderr and exits 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pollux_rpc::{ClientError, RpcClient, DEFAULT_SOCKET_PATH};
use serde_json::{json, Map, Value};

#[derive(Parser, Debug)]
#[command(
    name = "pollux-rpc",
    version,
    about = "JSON-RPC client for Pollux targets (SPDK rpc.py's methods and syntax)"
)]
struct Cli {
    /// RPC socket of the target.
    #[arg(short = 's', long = "server", default_value = DEFAULT_SOCKET_PATH)]
    server: PathBuf,
    /// Seconds to wait for an answer.
    #[arg(short = 't', long = "timeout", default_value_t = 60.0)]
    timeout_s: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[command(rename_all = "snake_case")]
enum Command {
    /// List the methods the target answers.
    RpcGetMethods {
        /// Only the methods callable in the current state.
        #[arg(long)]
        current: bool,
        /// Include deprecated aliases.
        #[arg(long = "include-aliases", short = 'i')]
        include_aliases: bool,
    },
    /// The target's version.
    SpdkGetVersion,
    /// Reactors and the lightweight threads on them.
    FrameworkGetReactors,
    /// Statistics of every lightweight thread.
    ThreadGetStats,
    /// Leave the startup state of a target started with --wait-for-rpc.
    FrameworkStartInit,
    /// The subsystems of save_config, in init order, with what each depends on.
    FrameworkGetSubsystems,
    /// One subsystem's configuration entries (as save_config writes them).
    FrameworkGetConfig {
        /// Subsystem name (bdev, vhost_blk).
        name: String,
    },
    /// Set the log level: ERROR, WARNING, NOTICE, INFO, DEBUG (or a RUST_LOG filter).
    LogSetLevel { level: String },
    /// The log level in force.
    LogGetLevel,
    /// Set the level of what is printed (the same as log_set_level: one sink, stderr).
    LogSetPrintLevel { level: String },
    /// The level of what is printed.
    LogGetPrintLevel,
    /// Stop the target (SIGINT or SIGTERM: an orderly stop).
    SpdkKillInstance {
        /// Signal name: SIGINT or SIGTERM.
        sig_name: String,
    },
    /// Print the JSON configuration that recreates the target's current state.
    SaveConfig {
        /// Indentation of the output.
        #[arg(short = 'i', long = "indent", default_value_t = 2)]
        indent: usize,
    },
    /// Describe bdevs (all, or one).
    BdevGetBdevs {
        /// Only this bdev.
        #[arg(short = 'b', long = "name")]
        name: Option<String>,
        /// Milliseconds to wait for the bdev to appear.
        #[arg(short = 't', long = "timeout")]
        timeout: Option<u64>,
    },
    /// I/O statistics of bdevs.
    BdevGetIostat {
        /// Only this bdev.
        #[arg(short = 'b', long = "name")]
        name: Option<String>,
    },
    /// Set a bdev's rate limits (0: unlimited; a limit left out stays as it is).
    BdevSetQosLimit(QosLimit),
    /// Create a RAM disk.
    BdevMallocCreate(MallocCreate),
    /// Delete a malloc bdev.
    BdevMallocDelete { name: String },
    /// Create a null bdev (no data moves).
    BdevNullCreate(NullCreate),
    /// Delete a null bdev.
    BdevNullDelete { name: String },
    /// Create a delay bdev over another bdev (latencies in microseconds).
    BdevDelayCreate(DelayCreate),
    /// Delete a delay bdev.
    BdevDelayDelete { name: String },
    /// Create a bdev on a file or block device through Linux AIO.
    BdevAioCreate(AioCreate),
    /// Delete an aio bdev.
    BdevAioDelete { name: String },
    /// Create a bdev on a file or block device through io_uring.
    BdevUringCreate(UringCreate),
    /// Delete a uring bdev.
    BdevUringDelete { name: String },
    /// Attach an NVMe controller (PCIe, bound to vfio-pci): one bdev per namespace.
    BdevNvmeAttachController(NvmeAttach),
    /// Detach an NVMe controller and remove its bdevs.
    BdevNvmeDetachController { name: String },
    /// Attach a virtio-blk device through virtio-user (a vhost-user socket).
    BdevVirtioAttachController(VirtioAttach),
    /// Detach a virtio controller and remove its bdevs.
    BdevVirtioDetachController { name: String },
    /// Create a vhost-user-blk controller exporting a bdev.
    VhostCreateBlkController(VhostCreateBlk),
    /// Describe vhost controllers (all, or one).
    VhostGetControllers {
        /// Only this controller.
        #[arg(short = 'n', long = "name")]
        name: Option<String>,
    },
    /// Delete a vhost controller.
    VhostDeleteController { ctrlr: String },
    /// Set a vhost controller's interrupt coalescing (delay_base_us 0: off).
    VhostControllerSetCoalescing {
        ctrlr: String,
        /// Base delay of a notification, in microseconds.
        delay_base_us: u32,
        /// Requests per second above which notifications are delayed.
        iops_threshold: u32,
    },
    /// Create the NVMe-oF transport (TCP).
    NvmfCreateTransport(NvmfTransport),
    /// Describe the NVMe-oF transports.
    NvmfGetTransports {
        /// Only this transport type.
        #[arg(long = "trtype")]
        trtype: Option<String>,
    },
    /// Create an NVMe-oF subsystem.
    NvmfCreateSubsystem(NvmfSubsystem),
    /// Delete an NVMe-oF subsystem (its connections close, its bdevs are released).
    NvmfDeleteSubsystem { nqn: String },
    /// Describe the NVMe-oF subsystems (the discovery subsystem first).
    NvmfGetSubsystems,
    /// Add a namespace (a bdev) to a subsystem; prints its NSID.
    NvmfSubsystemAddNs(NvmfAddNs),
    /// Remove a namespace from a subsystem.
    NvmfSubsystemRemoveNs { nqn: String, nsid: u32 },
    /// Make a subsystem listen on an address (the discovery service answers there too).
    NvmfSubsystemAddListener(NvmfListener),
    /// Stop a subsystem listening on an address.
    NvmfSubsystemRemoveListener(NvmfListener),
    /// Allow a host NQN to connect to a subsystem.
    NvmfSubsystemAddHost { nqn: String, host: String },
    /// Remove a host NQN from a subsystem's allow list.
    NvmfSubsystemRemoveHost { nqn: String, host: String },
    /// Allow any host to connect to a subsystem (-e), or only listed hosts (-d).
    NvmfSubsystemAllowAnyHost {
        nqn: String,
        #[arg(short = 'e', long = "enable", conflicts_with = "disable")]
        enable: bool,
        #[arg(short = 'd', long = "disable")]
        disable: bool,
    },
    /// Create the ublk target (needs ublk_drv): queues run on the cores of the cpumask.
    UblkCreateTarget {
        /// Cores for the ublk queues (default: every core of the app).
        #[arg(long = "cpumask")]
        cpumask: Option<String>,
    },
    /// Destroy the ublk target (its disks are stopped).
    UblkDestroyTarget,
    /// Serve a bdev as /dev/ublkb<UBLK_ID>; prints the id.
    UblkStartDisk {
        bdev_name: String,
        ublk_id: u32,
        /// Queues (default 1).
        #[arg(short = 'q', long = "num-queues")]
        num_queues: Option<u32>,
        /// Tags per queue (default 128).
        #[arg(short = 'd', long = "queue-depth")]
        queue_depth: Option<u32>,
        /// Pollux's: UBLK_F_USER_COPY (the server copies request data with reads and writes
        /// on /dev/ublkcN instead of the kernel copying into its buffers).
        #[arg(long = "user-copy")]
        user_copy: bool,
    },
    /// Recover a ublk disk the kernel holds quiesced after its server died.
    UblkRecoverDisk { bdev_name: String, ublk_id: u32 },
    /// Stop a ublk disk (/dev/ublkb<UBLK_ID> goes away).
    UblkStopDisk { ublk_id: u32 },
    /// Describe ublk disks (all, or one).
    UblkGetDisks {
        /// Only this disk.
        #[arg(short = 'n', long = "ublk-id")]
        ublk_id: Option<u32>,
    },
    /// bdevperf -z: run the configured workload and print its results.
    PerformTests,
    /// Any method, with its params as one JSON object.
    Call {
        method: String,
        /// The params object, e.g. '{"name": "Malloc0"}'.
        params: Option<String>,
    },
}

#[derive(Args, Debug)]
struct MallocCreate {
    /// Bdev name (default: the first free MallocN).
    #[arg(short = 'b', long = "name")]
    name: Option<String>,
    /// UUID of the bdev.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
    /// Size in MiB (a float above 0).
    total_size: f64,
    /// Block size in bytes.
    block_size: u64,
}

#[derive(Args, Debug)]
struct NullCreate {
    name: String,
    /// Size in MiB (a float above 0).
    total_size: f64,
    /// Block size in bytes.
    block_size: u64,
    /// UUID of the bdev.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
}

#[derive(Args, Debug)]
struct DelayCreate {
    /// The bdev to delay.
    #[arg(short = 'b', long = "base-bdev-name")]
    base_bdev_name: String,
    /// Name of the delay bdev.
    #[arg(short = 'd', long = "name")]
    name: String,
    /// Average read latency (us).
    #[arg(short = 'r', long = "avg-read-latency")]
    avg_read_latency: u64,
    /// p99 read latency (us).
    #[arg(short = 't', long = "nine-nine-read-latency")]
    p99_read_latency: u64,
    /// Average write latency (us).
    #[arg(short = 'w', long = "avg-write-latency")]
    avg_write_latency: u64,
    /// p99 write latency (us).
    #[arg(short = 'n', long = "nine-nine-write-latency")]
    p99_write_latency: u64,
    /// UUID of the bdev.
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
}

#[derive(Args, Debug)]
struct QosLimit {
    /// The bdev.
    name: String,
    /// I/Os per second, reads and writes together (a multiple of 1000).
    #[arg(long = "rw_ios_per_sec", alias = "rw-ios-per-sec")]
    rw_ios_per_sec: Option<u64>,
    /// MiB per second, reads and writes together.
    #[arg(long = "rw_mbytes_per_sec", alias = "rw-mbytes-per-sec")]
    rw_mbytes_per_sec: Option<u64>,
    /// MiB per second of reads.
    #[arg(long = "r_mbytes_per_sec", alias = "r-mbytes-per-sec")]
    r_mbytes_per_sec: Option<u64>,
    /// MiB per second of writes.
    #[arg(long = "w_mbytes_per_sec", alias = "w-mbytes-per-sec")]
    w_mbytes_per_sec: Option<u64>,
}

#[derive(Args, Debug)]
struct AioCreate {
    /// Path of the file or block device.
    filename: String,
    name: String,
    /// Block size (default: the device's logical block size, 512 for a file).
    block_size: Option<u64>,
    /// Open read-only.
    #[arg(short = 'r', long = "readonly")]
    readonly: bool,
    /// Allocate the file's blocks up front.
    #[arg(long = "fallocate")]
    fallocate: bool,
    /// Through the page cache instead of O_DIRECT (Pollux's `"direct": false`).
    #[arg(long = "no-direct")]
    no_direct: bool,
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
}

#[derive(Args, Debug)]
struct UringCreate {
    filename: String,
    name: String,
    block_size: Option<u64>,
    /// Through the page cache instead of O_DIRECT (Pollux's `"direct": false`).
    #[arg(long = "no-direct")]
    no_direct: bool,
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
}

#[derive(Args, Debug)]
struct NvmeAttach {
    /// Controller name; its bdevs are <name>n<nsid>.
    #[arg(short = 'b', long = "name")]
    name: String,
    /// Transport type: PCIe or TCP.
    #[arg(short = 't', long = "trtype")]
    trtype: String,
    /// PCI address (0000:00:04.0), or the target's IP address (TCP).
    #[arg(short = 'a', long = "traddr")]
    traddr: String,
    /// Address family (NVMe-oF only).
    #[arg(short = 'f', long = "adrfam")]
    adrfam: Option<String>,
    /// Service id (NVMe-oF only).
    #[arg(short = 's', long = "trsvcid")]
    trsvcid: Option<String>,
    /// Subsystem NQN (NVMe-oF only).
    #[arg(short = 'n', long = "subnqn")]
    subnqn: Option<String>,
    /// Host NQN (accepted and ignored for PCIe).
    #[arg(short = 'q', long = "hostnqn")]
    hostnqn: Option<String>,
    /// Multipath mode: disable, failover, multipath.
    #[arg(short = 'x', long = "multipath")]
    multipath: Option<String>,
    /// I/O queues to create.
    #[arg(long = "num-io-queues")]
    num_io_queues: Option<u64>,
    /// TCP header digest.
    #[arg(short = 'g', long = "hdgst")]
    hdgst: bool,
    /// TCP data digest.
    #[arg(short = 'G', long = "ddgst")]
    ddgst: bool,
    /// Seconds to keep reconnecting after a lost connection (-1: forever, 0: no reconnect).
    #[arg(
        short = 'l',
        long = "ctrlr-loss-timeout-sec",
        allow_hyphen_values = true
    )]
    ctrlr_loss_timeout_sec: Option<i64>,
    /// Seconds between reconnect attempts.
    #[arg(short = 'o', long = "reconnect-delay-sec")]
    reconnect_delay_sec: Option<u64>,
    /// Seconds after which I/O waiting for a reconnect fails.
    #[arg(short = 'u', long = "fast-io-fail-timeout-sec")]
    fast_io_fail_timeout_sec: Option<u64>,
}

#[derive(Args, Debug)]
struct VirtioAttach {
    /// Controller name.
    name: String,
    /// Transport type: user (virtio-user) or pci.
    #[arg(short = 't', long = "trtype")]
    trtype: String,
    /// The vhost-user socket path (user) or PCI address (pci).
    #[arg(short = 'a', long = "traddr")]
    traddr: String,
    /// Device type: blk or scsi.
    #[arg(short = 'd', long = "dev-type")]
    dev_type: String,
    /// Number of virtqueues.
    #[arg(long = "vq-count")]
    vq_count: Option<u64>,
    /// Size of each virtqueue.
    #[arg(long = "vq-size")]
    vq_size: Option<u64>,
}

#[derive(Args, Debug)]
struct NvmfTransport {
    /// Transport type (TCP).
    #[arg(short = 't', long = "trtype")]
    trtype: String,
    /// Largest I/O queue.
    #[arg(short = 'q', long = "max-queue-depth")]
    max_queue_depth: Option<u64>,
    /// I/O queues per controller.
    #[arg(short = 'm', long = "max-io-qpairs-per-ctrlr")]
    max_io_qpairs_per_ctrlr: Option<u64>,
    /// In-capsule data per I/O command, in bytes.
    #[arg(short = 'c', long = "in-capsule-data-size")]
    in_capsule_data_size: Option<u64>,
    /// Largest transfer of one command, in bytes.
    #[arg(short = 'i', long = "max-io-size")]
    max_io_size: Option<u64>,
    /// SPDK's I/O unit size, in bytes (accepted, not used).
    #[arg(short = 'u', long = "io-unit-size")]
    io_unit_size: Option<u64>,
    /// Largest admin queue.
    #[arg(short = 'a', long = "max-aq-depth")]
    max_aq_depth: Option<u64>,
}

#[derive(Args, Debug)]
struct NvmfSubsystem {
    nqn: String,
    /// Serial number (20 characters at most).
    #[arg(short = 's', long = "serial-number")]
    serial_number: Option<String>,
    /// Model number (40 characters at most).
    #[arg(short = 'd', long = "model-number")]
    model_number: Option<String>,
    /// Allow any host to connect.
    #[arg(short = 'a', long = "allow-any-host")]
    allow_any_host: bool,
    /// Namespaces the subsystem may hold.
    #[arg(short = 'm', long = "max-namespaces")]
    max_namespaces: Option<u64>,
}

#[derive(Args, Debug)]
struct NvmfAddNs {
    nqn: String,
    bdev_name: String,
    /// Namespace ID (default: the lowest free one).
    #[arg(short = 'n', long = "nsid")]
    nsid: Option<u64>,
    /// Namespace UUID (default: the bdev's).
    #[arg(short = 'u', long = "uuid")]
    uuid: Option<String>,
}

#[derive(Args, Debug)]
struct NvmfListener {
    nqn: String,
    /// Transport type (tcp).
    #[arg(short = 't', long = "trtype")]
    trtype: String,
    /// IP address.
    #[arg(short = 'a', long = "traddr")]
    traddr: String,
    /// Address family (ipv4, ipv6).
    #[arg(short = 'f', long = "adrfam")]
    adrfam: Option<String>,
    /// TCP port (default 4420).
    #[arg(short = 's', long = "trsvcid")]
    trsvcid: Option<String>,
}

fn listen_address(a: &NvmfListener) -> Value {
    let mut address = Map::new();
    address.insert("trtype".to_string(), json!(a.trtype));
    address.insert("traddr".to_string(), json!(a.traddr));
    if let Some(adrfam) = &a.adrfam {
        address.insert("adrfam".to_string(), json!(adrfam));
    }
    if let Some(trsvcid) = &a.trsvcid {
        address.insert("trsvcid".to_string(), json!(trsvcid));
    }
    json!({ "nqn": a.nqn, "listen_address": address })
}

#[derive(Args, Debug)]
struct VhostCreateBlk {
    /// Controller name (its socket is created in the target's socket directory).
    ctrlr: String,
    /// The bdev to export.
    dev_name: String,
    /// Cores the controller may run on.
    #[arg(long = "cpumask")]
    cpumask: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "readonly")]
    readonly: bool,
    /// Offer packed virtqueues.
    #[arg(short = 'p', long = "packed_ring")]
    packed_ring: bool,
    /// Packed ring live recovery (SPDK's; Pollux refuses it).
    #[arg(short = 'l', long = "packed_ring_recovery")]
    packed_ring_recovery: bool,
    /// Virtio-blk transport (vhost_user_blk, the default).
    #[arg(long = "transport")]
    transport: Option<String>,
}

/// `{key: value}` for each present value.
struct ParamsBuilder(Map<String, Value>);

impl ParamsBuilder {
    fn new() -> Self {
        Self(Map::new())
    }

    fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }

    fn opt<T: Into<Value>>(self, key: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => self.set(key, value),
            None => self,
        }
    }

    /// Set only when true, as rpc.py does for its `store_true` flags.
    fn flag(self, key: &str, value: bool) -> Self {
        if value {
            self.set(key, true)
        } else {
            self
        }
    }

    fn build(self) -> Option<Value> {
        (!self.0.is_empty()).then_some(Value::Object(self.0))
    }
}

/// rpc.py's `num_blocks = (total_size * 1024 * 1024) // block_size`.
fn num_blocks(total_size_mib: f64, block_size: u64) -> Result<u64, String> {
    if !total_size_mib.is_finite() || total_size_mib <= 0.0 {
        return Err(format!(
            "total_size {total_size_mib} must be a number of MiB above 0"
        ));
    }
    if block_size == 0 {
        return Err("block_size must be greater than 0".to_string());
    }
    Ok(((total_size_mib * 1024.0 * 1024.0) / block_size as f64).floor() as u64)
}

/// The method and params a command sends; `indent` for save_config.
fn request(command: &Command) -> Result<(String, Option<Value>), String> {
    let p = ParamsBuilder::new;
    let (method, params) = match command {
        Command::RpcGetMethods {
            current,
            include_aliases,
        } => (
            "rpc_get_methods",
            p().flag("current", *current)
                .flag("include_aliases", *include_aliases)
                .build(),
        ),
        Command::SpdkGetVersion => ("spdk_get_version", None),
        Command::FrameworkGetReactors => ("framework_get_reactors", None),
        Command::ThreadGetStats => ("thread_get_stats", None),
        Command::FrameworkStartInit => ("framework_start_init", None),
        Command::FrameworkGetSubsystems => ("framework_get_subsystems", None),
        Command::FrameworkGetConfig { name } => ("framework_get_config", name_param(name)),
        Command::LogSetLevel { level } => {
            ("log_set_level", p().set("level", level.as_str()).build())
        }
        Command::LogGetLevel => ("log_get_level", None),
        Command::LogSetPrintLevel { level } => (
            "log_set_print_level",
            p().set("level", level.as_str()).build(),
        ),
        Command::LogGetPrintLevel => ("log_get_print_level", None),
        Command::BdevSetQosLimit(a) => (
            "bdev_set_qos_limit",
            p().set("name", a.name.as_str())
                .opt("rw_ios_per_sec", a.rw_ios_per_sec)
                .opt("rw_mbytes_per_sec", a.rw_mbytes_per_sec)
                .opt("r_mbytes_per_sec", a.r_mbytes_per_sec)
                .opt("w_mbytes_per_sec", a.w_mbytes_per_sec)
                .build(),
        ),
        Command::SpdkKillInstance { sig_name } => (
            "spdk_kill_instance",
            p().set("sig_name", sig_name.as_str()).build(),
        ),
        Command::SaveConfig { .. } => ("save_config", None),
        Command::BdevGetBdevs { name, timeout } => (
            "bdev_get_bdevs",
            p().opt("name", name.clone())
                .opt("timeout", *timeout)
                .build(),
        ),
        Command::BdevGetIostat { name } => {
            ("bdev_get_iostat", p().opt("name", name.clone()).build())
        }
        Command::BdevMallocCreate(a) => (
            "bdev_malloc_create",
            p().set("num_blocks", num_blocks(a.total_size, a.block_size)?)
                .set("block_size", a.block_size)
                .opt("name", a.name.clone())
                .opt("uuid", a.uuid.clone())
                .build(),
        ),
        Command::BdevNullCreate(a) => (
            "bdev_null_create",
            p().set("name", a.name.as_str())
                .set("num_blocks", num_blocks(a.total_size, a.block_size)?)
                .set("block_size", a.block_size)
                .opt("uuid", a.uuid.clone())
                .build(),
        ),
        Command::BdevDelayCreate(a) => (
            "bdev_delay_create",
            p().set("base_bdev_name", a.base_bdev_name.as_str())
                .set("name", a.name.as_str())
                .set("avg_read_latency", a.avg_read_latency)
                .set("p99_read_latency", a.p99_read_latency)
                .set("avg_write_latency", a.avg_write_latency)
                .set("p99_write_latency", a.p99_write_latency)
                .opt("uuid", a.uuid.clone())
                .build(),
        ),
        Command::BdevDelayDelete { name } => ("bdev_delay_delete", name_param(name)),
        Command::BdevAioCreate(a) => (
            "bdev_aio_create",
            p().set("name", a.name.as_str())
                .set("filename", a.filename.as_str())
                .opt("block_size", a.block_size)
                .flag("readonly", a.readonly)
                .flag("fallocate", a.fallocate)
                .opt("direct", a.no_direct.then_some(false))
                .opt("uuid", a.uuid.clone())
                .build(),
        ),
        Command::BdevUringCreate(a) => (
            "bdev_uring_create",
            p().set("name", a.name.as_str())
                .set("filename", a.filename.as_str())
                .opt("block_size", a.block_size)
                .opt("direct", a.no_direct.then_some(false))
                .opt("uuid", a.uuid.clone())
                .build(),
        ),
        Command::BdevMallocDelete { name } => ("bdev_malloc_delete", name_param(name)),
        Command::BdevNullDelete { name } => ("bdev_null_delete", name_param(name)),
        Command::BdevAioDelete { name } => ("bdev_aio_delete", name_param(name)),
        Command::BdevUringDelete { name } => ("bdev_uring_delete", name_param(name)),
        Command::BdevNvmeAttachController(a) => (
            "bdev_nvme_attach_controller",
            p().set("name", a.name.as_str())
                .set("trtype", a.trtype.as_str())
                .set("traddr", a.traddr.as_str())
                .opt("adrfam", a.adrfam.clone())
                .opt("trsvcid", a.trsvcid.clone())
                .opt("subnqn", a.subnqn.clone())
                .opt("hostnqn", a.hostnqn.clone())
                .opt("multipath", a.multipath.clone())
                .opt("num_io_queues", a.num_io_queues)
                .opt("hdgst", a.hdgst.then_some(true))
                .opt("ddgst", a.ddgst.then_some(true))
                .opt("ctrlr_loss_timeout_sec", a.ctrlr_loss_timeout_sec)
                .opt("reconnect_delay_sec", a.reconnect_delay_sec)
                .opt("fast_io_fail_timeout_sec", a.fast_io_fail_timeout_sec)
                .build(),
        ),
        Command::BdevNvmeDetachController { name } => {
            ("bdev_nvme_detach_controller", name_param(name))
        }
        Command::BdevVirtioAttachController(a) => (
            "bdev_virtio_attach_controller",
            p().set("name", a.name.as_str())
                .set("trtype", a.trtype.as_str())
                .set("traddr", a.traddr.as_str())
                .set("dev_type", a.dev_type.as_str())
                .opt("vq_count", a.vq_count)
                .opt("vq_size", a.vq_size)
                .build(),
        ),
        Command::BdevVirtioDetachController { name } => {
            ("bdev_virtio_detach_controller", name_param(name))
        }
        Command::VhostCreateBlkController(a) => (
            "vhost_create_blk_controller",
            p().set("ctrlr", a.ctrlr.as_str())
                .set("dev_name", a.dev_name.as_str())
                .opt("cpumask", a.cpumask.clone())
                .flag("readonly", a.readonly)
                .flag("packed_ring", a.packed_ring)
                .flag("packed_ring_recovery", a.packed_ring_recovery)
                .opt("transport", a.transport.clone())
                .build(),
        ),
        Command::VhostGetControllers { name } => (
            "vhost_get_controllers",
            p().opt("name", name.clone()).build(),
        ),
        Command::VhostDeleteController { ctrlr } => (
            "vhost_delete_controller",
            p().set("ctrlr", ctrlr.as_str()).build(),
        ),
        Command::VhostControllerSetCoalescing {
            ctrlr,
            delay_base_us,
            iops_threshold,
        } => (
            "vhost_controller_set_coalescing",
            p().set("ctrlr", ctrlr.as_str())
                .set("delay_base_us", *delay_base_us)
                .set("iops_threshold", *iops_threshold)
                .build(),
        ),
        Command::NvmfCreateTransport(a) => (
            "nvmf_create_transport",
            p().set("trtype", a.trtype.as_str())
                .opt("max_queue_depth", a.max_queue_depth)
                .opt("max_io_qpairs_per_ctrlr", a.max_io_qpairs_per_ctrlr)
                .opt("in_capsule_data_size", a.in_capsule_data_size)
                .opt("max_io_size", a.max_io_size)
                .opt("io_unit_size", a.io_unit_size)
                .opt("max_aq_depth", a.max_aq_depth)
                .build(),
        ),
        Command::NvmfGetTransports { trtype } => (
            "nvmf_get_transports",
            p().opt("trtype", trtype.clone()).build(),
        ),
        Command::NvmfCreateSubsystem(a) => (
            "nvmf_create_subsystem",
            p().set("nqn", a.nqn.as_str())
                .opt("serial_number", a.serial_number.clone())
                .opt("model_number", a.model_number.clone())
                .flag("allow_any_host", a.allow_any_host)
                .opt("max_namespaces", a.max_namespaces)
                .build(),
        ),
        Command::NvmfDeleteSubsystem { nqn } => (
            "nvmf_delete_subsystem",
            p().set("nqn", nqn.as_str()).build(),
        ),
        Command::NvmfGetSubsystems => ("nvmf_get_subsystems", None),
        Command::NvmfSubsystemAddNs(a) => {
            let mut namespace = Map::new();
            namespace.insert("bdev_name".to_string(), json!(a.bdev_name));
            if let Some(nsid) = a.nsid {
                namespace.insert("nsid".to_string(), json!(nsid));
            }
            if let Some(uuid) = &a.uuid {
                namespace.insert("uuid".to_string(), json!(uuid));
            }
            (
                "nvmf_subsystem_add_ns",
                Some(json!({ "nqn": a.nqn, "namespace": namespace })),
            )
        }
        Command::NvmfSubsystemRemoveNs { nqn, nsid } => (
            "nvmf_subsystem_remove_ns",
            p().set("nqn", nqn.as_str()).set("nsid", *nsid).build(),
        ),
        Command::NvmfSubsystemAddListener(a) => {
            ("nvmf_subsystem_add_listener", Some(listen_address(a)))
        }
        Command::NvmfSubsystemRemoveListener(a) => {
            ("nvmf_subsystem_remove_listener", Some(listen_address(a)))
        }
        Command::NvmfSubsystemAddHost { nqn, host } => (
            "nvmf_subsystem_add_host",
            p().set("nqn", nqn.as_str())
                .set("host", host.as_str())
                .build(),
        ),
        Command::NvmfSubsystemRemoveHost { nqn, host } => (
            "nvmf_subsystem_remove_host",
            p().set("nqn", nqn.as_str())
                .set("host", host.as_str())
                .build(),
        ),
        Command::NvmfSubsystemAllowAnyHost {
            nqn,
            enable,
            disable,
        } => {
            if enable == disable {
                return Err(
                    "nvmf_subsystem_allow_any_host: give -e (enable) or -d (disable)".to_string(),
                );
            }
            (
                "nvmf_subsystem_allow_any_host",
                p().set("nqn", nqn.as_str())
                    .set("allow_any_host", *enable)
                    .build(),
            )
        }
        Command::UblkCreateTarget { cpumask } => (
            "ublk_create_target",
            p().opt("cpumask", cpumask.clone()).build(),
        ),
        Command::UblkDestroyTarget => ("ublk_destroy_target", None),
        Command::UblkStartDisk {
            bdev_name,
            ublk_id,
            num_queues,
            queue_depth,
            user_copy,
        } => (
            "ublk_start_disk",
            p().set("bdev_name", bdev_name.as_str())
                .set("ublk_id", *ublk_id)
                .opt("num_queues", *num_queues)
                .opt("queue_depth", *queue_depth)
                .flag("user_copy", *user_copy)
                .build(),
        ),
        Command::UblkRecoverDisk { bdev_name, ublk_id } => (
            "ublk_recover_disk",
            p().set("bdev_name", bdev_name.as_str())
                .set("ublk_id", *ublk_id)
                .build(),
        ),
        Command::UblkStopDisk { ublk_id } => {
            ("ublk_stop_disk", p().set("ublk_id", *ublk_id).build())
        }
        Command::UblkGetDisks { ublk_id } => {
            ("ublk_get_disks", p().opt("ublk_id", *ublk_id).build())
        }
        Command::PerformTests => ("perform_tests", None),
        Command::Call { method, params } => {
            let params = match params {
                None => None,
                Some(text) => Some(
                    serde_json::from_str::<Value>(text)
                        .map_err(|e| format!("params {text:?} are not JSON: {e}"))?,
                ),
            };
            return Ok((method.clone(), params));
        }
    };
    Ok((method.to_string(), params))
}

fn name_param(name: &str) -> Option<Value> {
    Some(json!({ "name": name }))
}

/// rpc.py's printing: strings bare, `true` nothing, the rest as indented JSON.
fn render(command: &Command, result: &Value) -> Option<String> {
    match (command, result) {
        (Command::SaveConfig { indent }, value) => Some(pretty(value, *indent)),
        (_, Value::Bool(true)) => None,
        (_, Value::String(text)) => Some(text.clone()),
        (_, value) => Some(pretty(value, 2)),
    }
}

fn pretty(value: &Value, indent: usize) -> String {
    let indent = " ".repeat(indent);
    let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    match serde::Serialize::serialize(value, &mut serializer) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => value.to_string(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, params) = match request(&cli.command) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("pollux-rpc: {message}");
            return ExitCode::from(2);
        }
    };
    if !cli.timeout_s.is_finite() || cli.timeout_s <= 0.0 {
        eprintln!(
            "pollux-rpc: -t {}: must be a number of seconds above 0",
            cli.timeout_s
        );
        return ExitCode::from(2);
    }
    let timeout = Duration::from_secs_f64(cli.timeout_s);
    let result = RpcClient::connect(&cli.server, timeout)
        .and_then(|mut client| client.call(&method, params.clone()));
    match result {
        Ok(value) => {
            if let Some(text) = render(&cli.command, &value) {
                // One write, and a reader that closed its end early (`| grep -q`, `| head`)
                // is not an error of ours: the call itself succeeded.
                let mut stdout = std::io::stdout().lock();
                if let Err(error) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
                    if error.kind() != std::io::ErrorKind::BrokenPipe {
                        eprintln!("pollux-rpc: writing the answer: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(ClientError::Rpc(error)) => {
            let mut request = json!({ "jsonrpc": "2.0", "method": method });
            if let Some(params) = params {
                request["params"] = params;
            }
            eprintln!("request:\n{}", pretty(&request, 2));
            eprintln!("Got JSON-RPC error response");
            eprintln!("response:\n{}", pretty(&error.to_json(), 2));
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("pollux-rpc: {}", pollux_cli::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (String, Option<Value>) {
        let cli = Cli::try_parse_from(std::iter::once("pollux-rpc").chain(args.iter().copied()))
            .expect("valid command line");
        request(&cli.command).expect("valid request")
    }

    #[test]
    fn ublk_command_lines() {
        assert_eq!(
            parse(&["ublk_start_disk", "Malloc0", "0", "-q", "2", "-d", "128"]),
            (
                "ublk_start_disk".to_string(),
                Some(
                    json!({"bdev_name": "Malloc0", "ublk_id": 0, "num_queues": 2, "queue_depth": 128})
                )
            )
        );
        assert_eq!(
            parse(&["ublk_start_disk", "Malloc0", "3", "--user-copy"]).1,
            Some(json!({"bdev_name": "Malloc0", "ublk_id": 3, "user_copy": true}))
        );
        assert_eq!(
            parse(&["ublk_start_disk", "Malloc0", "3"]).1,
            Some(json!({"bdev_name": "Malloc0", "ublk_id": 3}))
        );
        assert_eq!(
            parse(&["ublk_create_target", "--cpumask", "0x3"]).1,
            Some(json!({"cpumask": "0x3"}))
        );
        assert_eq!(parse(&["ublk_create_target"]).0, "ublk_create_target");
        assert_eq!(
            parse(&["ublk_destroy_target"]),
            ("ublk_destroy_target".to_string(), None)
        );
        assert_eq!(
            parse(&["ublk_recover_disk", "Malloc0", "1"]).1,
            Some(json!({"bdev_name": "Malloc0", "ublk_id": 1}))
        );
        assert_eq!(
            parse(&["ublk_stop_disk", "1"]).1,
            Some(json!({"ublk_id": 1}))
        );
        assert_eq!(
            parse(&["ublk_get_disks", "-n", "1"]).1,
            Some(json!({"ublk_id": 1}))
        );
        assert_eq!(parse(&["ublk_get_disks"]).0, "ublk_get_disks");
    }

    #[test]
    fn file_bdevs_take_no_direct() {
        assert_eq!(
            parse(&[
                "bdev_uring_create",
                "/dev/vdb",
                "Uring0",
                "4096",
                "--no-direct"
            ])
            .1,
            Some(
                json!({"name": "Uring0", "filename": "/dev/vdb", "block_size": 4096, "direct": false})
            )
        );
        assert_eq!(
            parse(&["bdev_uring_create", "/dev/vdb", "Uring0"]).1,
            Some(json!({"name": "Uring0", "filename": "/dev/vdb"}))
        );
        assert_eq!(
            parse(&["bdev_aio_create", "/f", "Aio0", "--no-direct", "-r"]).1,
            Some(json!({"name": "Aio0", "filename": "/f", "readonly": true, "direct": false}))
        );
    }

    #[test]
    fn rpc_py_command_lines_build_rpc_py_params() {
        assert_eq!(
            parse(&["bdev_malloc_create", "-b", "Malloc0", "64", "4096"]),
            (
                "bdev_malloc_create".to_string(),
                Some(json!({"num_blocks": 16384, "block_size": 4096, "name": "Malloc0"}))
            )
        );
        assert_eq!(
            parse(&["bdev_null_create", "Null0", "1", "512"]).1,
            Some(json!({"name": "Null0", "num_blocks": 2048, "block_size": 512}))
        );
        assert_eq!(
            parse(&[
                "bdev_delay_create",
                "-b",
                "Null0",
                "-d",
                "Delay0",
                "-r",
                "10",
                "-t",
                "20",
                "-w",
                "30",
                "-n",
                "40"
            ])
            .1,
            Some(
                json!({"base_bdev_name": "Null0", "name": "Delay0", "avg_read_latency": 10,
                        "p99_read_latency": 20, "avg_write_latency": 30,
                        "p99_write_latency": 40})
            )
        );
        assert_eq!(
            parse(&[
                "vhost_create_blk_controller",
                "vhost.0",
                "Malloc0",
                "-r",
                "-p",
                "--cpumask",
                "0x1"
            ])
            .1,
            Some(
                json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1", "readonly": true, "packed_ring": true})
            )
        );
        assert_eq!(
            parse(&[
                "bdev_virtio_attach_controller",
                "VirtioUser0",
                "-t",
                "user",
                "-a",
                "/tmp/vhost.0",
                "-d",
                "blk",
                "--vq-count",
                "2",
                "--vq-size",
                "512"
            ])
            .1,
            Some(
                json!({"name": "VirtioUser0", "trtype": "user", "traddr": "/tmp/vhost.0", "dev_type": "blk", "vq_count": 2, "vq_size": 512})
            )
        );
        assert_eq!(
            parse(&[
                "bdev_nvme_attach_controller",
                "-b",
                "Nvme0",
                "-t",
                "PCIe",
                "-a",
                "0000:00:04.0"
            ])
            .1,
            Some(json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "0000:00:04.0"}))
        );
        assert_eq!(
            parse(&[
                "bdev_nvme_attach_controller",
                "-b",
                "Nvme0",
                "-t",
                "tcp",
                "-a",
                "127.0.0.1",
                "-f",
                "ipv4",
                "-s",
                "4420",
                "-n",
                "nqn.2016-06.io.spdk:cnode1",
                "-l",
                "-1",
                "-o",
                "2",
                "-g"
            ])
            .1,
            Some(
                json!({"name": "Nvme0", "trtype": "tcp", "traddr": "127.0.0.1", "adrfam": "ipv4",
                "trsvcid": "4420", "subnqn": "nqn.2016-06.io.spdk:cnode1", "hdgst": true,
                "ctrlr_loss_timeout_sec": -1, "reconnect_delay_sec": 2})
            )
        );
        assert_eq!(
            parse(&["bdev_get_bdevs"]),
            ("bdev_get_bdevs".to_string(), None)
        );
        assert_eq!(
            parse(&["call", "bdev_get_bdevs", r#"{"name": "x"}"#]).1,
            Some(json!({"name": "x"}))
        );
        assert_eq!(
            parse(&[
                "-s",
                "/tmp/x.sock",
                "vhost_get_controllers",
                "-n",
                "vhost.0"
            ])
            .1,
            Some(json!({"name": "vhost.0"}))
        );
        assert_eq!(
            parse(&["vhost_controller_set_coalescing", "vhost.0", "80", "5000"]),
            (
                "vhost_controller_set_coalescing".to_string(),
                Some(json!({"ctrlr": "vhost.0", "delay_base_us": 80, "iops_threshold": 5000}))
            )
        );
        assert_eq!(
            parse(&[
                "vhost_create_blk_controller",
                "vhost.1",
                "Malloc1",
                "--transport",
                "vhost_user_blk"
            ])
            .1,
            Some(json!({"ctrlr": "vhost.1", "dev_name": "Malloc1", "transport": "vhost_user_blk"}))
        );
    }

    #[test]
    fn framework_log_and_qos_command_lines() {
        assert_eq!(
            parse(&["framework_get_config", "bdev"]),
            (
                "framework_get_config".to_string(),
                Some(json!({"name": "bdev"}))
            )
        );
        assert_eq!(
            parse(&["framework_get_subsystems"]),
            ("framework_get_subsystems".to_string(), None)
        );
        assert_eq!(
            parse(&["log_set_level", "DEBUG"]).1,
            Some(json!({"level": "DEBUG"}))
        );
        assert_eq!(
            parse(&[
                "bdev_set_qos_limit",
                "Malloc0",
                "--rw_ios_per_sec",
                "10000",
                "--w_mbytes_per_sec",
                "20"
            ])
            .1,
            Some(json!({"name": "Malloc0", "rw_ios_per_sec": 10000, "w_mbytes_per_sec": 20}))
        );
    }

    #[test]
    fn bad_sizes_and_json_are_refused() {
        let cli =
            Cli::try_parse_from(["pollux-rpc", "bdev_malloc_create", "0", "512"]).expect("parses");
        assert!(request(&cli.command)
            .expect_err("size 0")
            .contains("total_size"));
        let cli = Cli::try_parse_from(["pollux-rpc", "call", "x", "{oops"]).expect("parses");
        assert!(request(&cli.command)
            .expect_err("bad json")
            .contains("not JSON"));
        assert!(Cli::try_parse_from(["pollux-rpc", "bdev_malloc_delete"]).is_err());
    }

    #[test]
    fn output_like_rpc_py() {
        let command = Command::SpdkGetVersion;
        assert_eq!(
            render(&command, &json!("Malloc0")),
            Some("Malloc0".to_string())
        );
        assert_eq!(render(&command, &json!(true)), None);
        assert_eq!(
            render(&command, &json!({"a": 1})),
            Some("{\n  \"a\": 1\n}".to_string())
        );
    }
}
