//! The bdev layer's methods, with SPDK's names and parameters: `bdev_get_bdevs`,
//! `bdev_get_iostat`, `bdev_{malloc,null,aio,uring}_{create,delete}`,
//! `bdev_nvme_attach_controller` / `bdev_nvme_detach_controller` (PCIe through
//! `pollux_nvme::bdev`, `trtype` TCP through `pollux_nvmf::host`), `bdev_virtio_attach_controller` / `bdev_virtio_detach_controller`, `bdev_wait_for_examine`,
//! `bdev_set_qos_limit` (rate limits, shown in `bdev_get_bdevs`' `assigned_rate_limits`);
//! and the `bdev` subsystem of `save_config`.
//!
//! Creation reuses the modules' own parse functions (the ones `-c` config files go through),
//! so a parameter means the same in a file and over RPC, and `save_config`'s output loads
//! with either. A create method returns the new bdev's name, as SPDK's do; the nvme attach
//! returns the list of its bdevs.
//!
//! A bdev that something claimed for exclusive write (a vhost controller) is not deleted:
//! the delete is refused with `-EBUSY` naming the owner. SPDK would hot-remove it under its
//! user; Pollux asks the operator to remove the user first.

use std::sync::Arc;

use pollux_bdev::config::{self, CreateContext, ParseFn};
use pollux_bdev::modules::{aio, delay, malloc, null, uring};
use pollux_bdev::{clock, BdevError, BdevInfo, BdevRegistry, IoType};
use pollux_env::dma::DmaMemory;
use pollux_nvme::bdev::{self as nvme, NvmeModule, PendingAttach};
use pollux_nvmf::host::{self as nvmf_host, NvmfHostModule};
use pollux_virtio::bdev::{self as virtio, VirtioModule};
use serde_json::{json, Map, Value};

use crate::error::{code, RpcError, ServerError};
use crate::methods::{Allowed, Params, RpcMethods};

/// Attaches a validated `bdev_nvme_attach_controller` and returns its bdevs' names.
pub type NvmeAttachFn =
    dyn Fn(&PendingAttach, &CreateContext<'_>) -> Result<Vec<String>, BdevError> + Send + Sync;

/// What the bdev methods work on.
#[derive(Clone)]
pub struct BdevRpc {
    pub registry: Arc<BdevRegistry>,
    /// Memory for malloc bdevs and NVMe queues (`None`: those creations fail clearly).
    pub dma: Option<Arc<DmaMemory>>,
    /// The module `bdev_nvme_detach_controller` detaches from (the attach must put its
    /// controllers there): [`NvmeModule::global`] in an app.
    pub nvme_module: &'static NvmeModule,
    /// How a controller is attached: [`pcie_attach`] in an app (VFIO); a test attaches the
    /// software model.
    pub nvme_attach: Arc<NvmeAttachFn>,
}

impl BdevRpc {
    /// An app's context: PCIe controllers through VFIO, the process-wide NVMe module.
    pub fn new(registry: Arc<BdevRegistry>, dma: Option<Arc<DmaMemory>>) -> Self {
        Self {
            registry,
            dma,
            nvme_module: NvmeModule::global(),
            nvme_attach: Arc::new(pcie_attach),
        }
    }

    fn create_ctx(&self) -> CreateContext<'_> {
        CreateContext {
            registry: &self.registry,
            dma: self.dma.as_ref(),
        }
    }
}

/// Attaches a PCIe controller through VFIO into [`NvmeModule::global`].
pub fn pcie_attach(
    pending: &PendingAttach,
    ctx: &CreateContext<'_>,
) -> Result<Vec<String>, BdevError> {
    use pollux_bdev::config::PendingBdev;
    Box::new(pending.clone()).create(ctx)?;
    Ok(NvmeModule::global()
        .bdev_names(&pending.options.name)
        .unwrap_or_default())
}

/// Registers the bdev methods and the `bdev` subsystem of `save_config`.
pub fn register_bdev(methods: &mut RpcMethods, bdev: BdevRpc) -> Result<(), ServerError> {
    let creators: [(&str, ParseFn); 5] = [
        (delay::METHOD, delay::parse),
        (malloc::METHOD, malloc::parse),
        (null::METHOD, null::parse),
        (aio::METHOD, aio::parse),
        (uring::METHOD, uring::parse),
    ];
    for (method, parse) in creators {
        let ctx = bdev.clone();
        methods.register_sync(method, Allowed::Runtime, move |_ctx, params| {
            create(&ctx, params, parse)
        })?;
    }
    let deleters = [
        ("bdev_delay_delete", "delay"),
        ("bdev_malloc_delete", "malloc"),
        ("bdev_null_delete", "null"),
        ("bdev_aio_delete", "aio"),
        ("bdev_uring_delete", "uring"),
    ];
    for (method, module) in deleters {
        let ctx = bdev.clone();
        methods.register_sync(method, Allowed::Runtime, move |_ctx, params| {
            delete(&ctx, params, module)
        })?;
    }
    let ctx = bdev.clone();
    methods.register_sync("bdev_get_bdevs", Allowed::Runtime, move |_ctx, params| {
        get_bdevs(&ctx.registry, params)
    })?;
    let ctx = bdev.clone();
    methods.register_sync("bdev_get_iostat", Allowed::Runtime, move |_ctx, params| {
        get_iostat(&ctx.registry, params)
    })?;
    let ctx = bdev.clone();
    methods.register_sync(
        nvme::ATTACH_METHOD,
        Allowed::Runtime,
        move |_ctx, params| nvme_attach(&ctx, params),
    )?;
    let ctx = bdev.clone();
    methods.register_sync(
        nvme::DETACH_METHOD,
        Allowed::Runtime,
        move |_ctx, params| nvme_detach(&ctx, params),
    )?;
    let ctx = bdev.clone();
    methods.register_sync(
        virtio::ATTACH_METHOD,
        Allowed::Runtime,
        move |_ctx, params| virtio_attach(&ctx, params),
    )?;
    let ctx = bdev.clone();
    methods.register_sync(
        virtio::DETACH_METHOD,
        Allowed::Runtime,
        move |_ctx, params| virtio_detach(&ctx, params),
    )?;
    let ctx = bdev.clone();
    methods.register_sync(config::QOS_METHOD, Allowed::Runtime, move |_ctx, params| {
        set_qos_limit(&ctx.registry, params)
    })?;
    // SPDK's save_config writes it; there is no asynchronous examine to wait for.
    methods.register_sync("bdev_wait_for_examine", Allowed::Any, |_ctx, params| {
        params.allow_only(&[])?;
        Ok(Value::Bool(true))
    })?;
    let registry = bdev.registry.clone();
    methods.register_subsystem("bdev", &[], move || {
        match registry.save_config().get_mut("config").map(Value::take) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        }
    })?;
    Ok(())
}

fn create(bdev: &BdevRpc, params: &Params, parse: ParseFn) -> Result<Value, RpcError> {
    let pending = parse(&params.as_bdev()?)?;
    if let Some(name) = pending.name() {
        if bdev.registry.contains(name) {
            return Err(RpcError::new(
                code::EEXIST,
                format!("{}: bdev name {name:?} already exists", params.method()),
            ));
        }
    }
    let info = pending.create(&bdev.create_ctx())?;
    tracing::info!(method = params.method(), bdev = %info.name, "rpc: bdev created");
    Ok(Value::String(info.name))
}

/// The owner of a bdev's exclusive write claim, if any.
fn claim_owner(registry: &BdevRegistry, name: &str) -> Option<String> {
    registry
        .open(name, false, None)
        .ok()
        .and_then(|desc| desc.claim_owner())
}

fn refuse_claimed(registry: &BdevRegistry, method: &str, name: &str) -> Result<(), RpcError> {
    match claim_owner(registry, name) {
        Some(owner) => Err(RpcError::new(
            code::EBUSY,
            format!(
                "{method}: bdev {name:?} is in use: claimed by {owner:?} (exclusive write); remove that user first (a vhost controller: vhost_delete_controller)"
            ),
        )),
        None => Ok(()),
    }
}

fn no_bdev(method: &str, name: &str) -> RpcError {
    RpcError::new(code::ENODEV, format!("{method}: no bdev named {name:?}"))
}

fn delete(bdev: &BdevRpc, params: &Params, module: &str) -> Result<Value, RpcError> {
    params.allow_only(&["name"])?;
    let name = params.required_str("name")?;
    let method = params.method();
    let info = bdev
        .registry
        .info(name)
        .map_err(|_| no_bdev(method, name))?;
    if info.module != module {
        return Err(RpcError::new(
            code::ENODEV,
            format!(
                "{method}: bdev {name:?} is a {} bdev, not a {module} bdev",
                info.module
            ),
        ));
    }
    refuse_claimed(&bdev.registry, method, &info.name)?;
    bdev.registry.unregister(&info.name)?;
    tracing::info!(method, bdev = %info.name, "rpc: bdev deleted");
    Ok(Value::Bool(true))
}

/// `bdev_set_qos_limit {"name", "rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec",
/// "w_mbytes_per_sec"}`: the limits given replace those in force (0: unlimited).
fn set_qos_limit(registry: &BdevRegistry, params: &Params) -> Result<Value, RpcError> {
    let (name, update) = config::parse_qos_limit(&params.as_bdev()?)?;
    let limits = registry
        .set_qos_limits(&name, &update)
        .map_err(|_| no_bdev(params.method(), &name))?;
    tracing::info!(bdev = %name, ?limits, "rpc: bdev QoS rate limits set");
    Ok(Value::Bool(true))
}

/// The controller names both NVMe modules (PCIe and TCP) hold.
fn nvme_name_taken(bdev: &BdevRpc, name: &String) -> bool {
    bdev.nvme_module.controller_names().contains(name)
        || NvmfHostModule::global().controller_names().contains(name)
}

fn nvme_attach(bdev: &BdevRpc, params: &Params) -> Result<Value, RpcError> {
    let bdev_params = params.as_bdev()?;
    if nvmf_host::params::is_tcp(&bdev_params) {
        let options = nvmf_host::parse_tcp_attach(&bdev_params)?;
        let name = options.name.clone();
        if nvme_name_taken(bdev, &name) {
            return Err(RpcError::new(
                code::EEXIST,
                format!(
                    "{}: an NVMe controller named {name:?} is already attached",
                    params.method()
                ),
            ));
        }
        let infos = NvmfHostModule::global().attach(&bdev.registry, options)?;
        let names: Vec<String> = infos.into_iter().map(|info| info.name).collect();
        tracing::info!(controller = %name, bdevs = ?names, "rpc: nvme/tcp controller attached");
        return Ok(json!(names));
    }
    let pending = nvme::parse_attach_options(&bdev_params)?;
    let name = &pending.options.name;
    if nvme_name_taken(bdev, name) {
        return Err(RpcError::new(
            code::EEXIST,
            format!(
                "{}: an NVMe controller named {name:?} is already attached",
                params.method()
            ),
        ));
    }
    let names = (bdev.nvme_attach)(&pending, &bdev.create_ctx())?;
    tracing::info!(controller = %name, bdevs = ?names, "rpc: nvme controller attached");
    Ok(json!(names))
}

fn nvme_detach(bdev: &BdevRpc, params: &Params) -> Result<Value, RpcError> {
    let request = nvme::parse_detach(&params.as_bdev()?)?;
    let method = params.method();
    if let Some(bdevs) = NvmfHostModule::global().bdev_names(&request.name) {
        for name in &bdevs {
            refuse_claimed(&bdev.registry, method, name)?;
        }
        NvmfHostModule::global().detach_controller(&bdev.registry, &request.name)?;
        return Ok(Value::Bool(true));
    }
    let Some(bdevs) = bdev.nvme_module.bdev_names(&request.name) else {
        return Err(RpcError::new(
            code::ENODEV,
            format!(
                "{method}: parameter \"name\": no NVMe controller named {:?} is attached",
                request.name
            ),
        ));
    };
    for name in &bdevs {
        refuse_claimed(&bdev.registry, method, name)?;
    }
    bdev.nvme_module
        .detach_controller(&bdev.registry, &request.name)?;
    Ok(Value::Bool(true))
}

/// `bdev_virtio_attach_controller`: connects to the vhost-user socket and answers the list of
/// created bdevs (one for `dev_type` blk), as SPDK does.
fn virtio_attach(bdev: &BdevRpc, params: &Params) -> Result<Value, RpcError> {
    let options = virtio::parse_attach_options(&params.as_bdev()?)?;
    let name = options.name.clone();
    if VirtioModule::global().controller_names().contains(&name) {
        return Err(RpcError::new(
            code::EEXIST,
            format!(
                "{}: a virtio controller named {name:?} is already attached",
                params.method()
            ),
        ));
    }
    let Some(dma) = bdev.dma.as_ref() else {
        return Err(RpcError::new(
            code::INVALID_PARAMS,
            format!("{}: this app has no DMA memory to share", params.method()),
        ));
    };
    let info = VirtioModule::global().attach_controller(&bdev.registry, dma, options)?;
    tracing::info!(controller = %name, bdev = %info.name, "rpc: virtio controller attached");
    Ok(json!([info.name]))
}

/// `bdev_virtio_detach_controller`: refused while a user (a vhost controller) claims its bdev.
fn virtio_detach(bdev: &BdevRpc, params: &Params) -> Result<Value, RpcError> {
    let request = virtio::parse_detach(&params.as_bdev()?)?;
    let method = params.method();
    if !VirtioModule::global()
        .controller_names()
        .contains(&request.name)
    {
        return Err(RpcError::new(
            code::ENODEV,
            format!(
                "{method}: parameter \"name\": no virtio controller named {:?} is attached",
                request.name
            ),
        ));
    }
    refuse_claimed(&bdev.registry, method, &request.name)?;
    VirtioModule::global().detach_controller(&bdev.registry, &request.name)?;
    Ok(Value::Bool(true))
}

/// SPDK's product names, by module.
fn product_name(module: &str) -> &str {
    match module {
        "malloc" => "Malloc disk",
        "null" => "Null disk",
        "aio" => "AIO disk",
        "uring" => "URING bdev",
        "nvme" => "NVMe disk",
        "virtio_blk" => "VirtioBlk Disk",
        other => other,
    }
}

fn get_bdevs(registry: &BdevRegistry, params: &Params) -> Result<Value, RpcError> {
    params.allow_only(&["name", "timeout"])?;
    // SPDK waits up to `timeout` ms for a bdev still being examined; Pollux registers bdevs
    // synchronously, so a missing one is reported at once.
    params.u64("timeout")?;
    let infos: Vec<BdevInfo> = match params.str("name")? {
        Some(name) => vec![registry
            .info(name)
            .map_err(|_| no_bdev(params.method(), name))?],
        None => registry
            .names()
            .iter()
            .filter_map(|name| registry.info(name).ok())
            .collect(),
    };
    // driver_specific: the module's own parameters, as its save_config entry writes them.
    let mut module_params: Map<String, Value> = Map::new();
    if let Some(Value::Array(entries)) = registry.save_config().get_mut("config").map(Value::take) {
        for mut entry in entries {
            if entry["method"] == config::QOS_METHOD {
                continue;
            }
            if let Some(Value::Object(mut p)) = entry.get_mut("params").map(Value::take) {
                if let Some(Value::String(name)) = p.remove("name") {
                    p.remove("uuid");
                    module_params.insert(name, Value::Object(p));
                }
            }
        }
    }
    let bdevs: Vec<Value> = infos
        .iter()
        .map(|info| bdev_json(registry, info, module_params.get(&info.name)))
        .collect();
    Ok(Value::Array(bdevs))
}

fn bdev_json(registry: &BdevRegistry, info: &BdevInfo, module_params: Option<&Value>) -> Value {
    let supports = |t: IoType| info.supported_io_types.contains(&t);
    let owner = claim_owner(registry, &info.name);
    let limits = registry.qos_limits(&info.name).unwrap_or_default();
    let mut driver_specific = Map::new();
    if let Some(params) = module_params {
        driver_specific.insert(info.module.to_string(), params.clone());
    }
    let mut value = json!({
        "name": info.name,
        "aliases": info.aliases,
        "product_name": product_name(info.module),
        "block_size": info.block_size_bytes,
        "num_blocks": info.num_blocks,
        "uuid": info.uuid.to_string(),
        "assigned_rate_limits": {
            "rw_ios_per_sec": limits.rw_ios_per_sec,
            "rw_mbytes_per_sec": limits.rw_mbytes_per_sec,
            "r_mbytes_per_sec": limits.r_mbytes_per_sec,
            "w_mbytes_per_sec": limits.w_mbytes_per_sec,
        },
        "claimed": owner.is_some(),
        "zoned": false,
        "required_alignment": info.required_alignment_bytes.trailing_zeros(),
        "write_cache": info.write_cache,
        "supported_io_types": {
            "read": supports(IoType::Read),
            "write": supports(IoType::Write),
            "unmap": supports(IoType::Unmap),
            "flush": supports(IoType::Flush),
            "reset": supports(IoType::Reset),
            "write_zeroes": supports(IoType::WriteZeroes),
            "compare": false,
            "compare_and_write": false,
            "abort": false,
            "nvme_admin": false,
            "nvme_io": false,
        },
        "driver_specific": driver_specific,
    });
    if let (Some(owner), Some(map)) = (owner, value.as_object_mut()) {
        map.insert("claim_type".to_string(), json!("exclusive_write"));
        map.insert("claimed_by".to_string(), json!(owner));
    }
    value
}

fn get_iostat(registry: &BdevRegistry, params: &Params) -> Result<Value, RpcError> {
    params.allow_only(&["name", "per_channel"])?;
    params.only_default("per_channel", &Value::Bool(false), "per-channel statistics")?;
    let names = match params.str("name")? {
        Some(name) => vec![
            registry
                .info(name)
                .map_err(|_| no_bdev(params.method(), name))?
                .name,
        ],
        None => registry.names(),
    };
    let bdevs: Vec<Value> = names
        .iter()
        .filter_map(|name| Some((name, registry.stats(name).ok()?)))
        .map(|(name, stats)| {
            let of = |t: IoType| stats.per_type[t.index()];
            let errors: u64 = stats.errors_total();
            json!({
                "name": name,
                "bytes_read": of(IoType::Read).bytes,
                "num_read_ops": of(IoType::Read).ops,
                "bytes_written": of(IoType::Write).bytes,
                "num_write_ops": of(IoType::Write).ops,
                "bytes_unmapped": of(IoType::Unmap).bytes,
                "num_unmap_ops": of(IoType::Unmap).ops,
                "num_flush_ops": of(IoType::Flush).ops,
                "num_write_zeroes_ops": of(IoType::WriteZeroes).ops,
                "num_reset_ops": of(IoType::Reset).ops,
                "latency_ticks": stats.latency_ticks_total,
                "min_latency_ticks": if stats.histogram.count() == 0 { 0 } else { stats.latency_ticks_min },
                "max_latency_ticks": stats.latency_ticks_max,
                "io_error": errors,
            })
        })
        .collect();
    let tick_rate = (clock::ticks_per_us() * 1e6) as u64;
    Ok(json!({ "tick_rate": tick_rate, "ticks": clock::ticks(), "bdevs": bdevs }))
}
