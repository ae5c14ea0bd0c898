//! Every method over a real socket: its success path and its bad-parameter path, with
//! requests shaped as SPDK's rpc.py sends them.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{Options, Target};
use pollux_bdev::config::MethodTable;
use pollux_nvme::bdev::{NvmeModule, PendingAttach};
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_rpc::error::code;
use pollux_rpc::{RpcError, RpcState};
use serde_json::{json, Value};

#[test]
fn rpc_get_methods_lists_methods_and_checks_current() {
    let target = Target::start();
    let all = target.ok("rpc_get_methods", None);
    let names: Vec<&str> = all
        .as_array()
        .expect("array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for method in [
        "rpc_get_methods",
        "spdk_get_version",
        "framework_get_reactors",
        "thread_get_stats",
        "save_config",
        "framework_get_subsystems",
        "framework_get_config",
        "framework_start_init",
        "spdk_kill_instance",
        "bdev_get_bdevs",
        "bdev_get_iostat",
        "bdev_malloc_create",
        "bdev_malloc_delete",
        "bdev_null_create",
        "bdev_null_delete",
        "bdev_aio_create",
        "bdev_aio_delete",
        "bdev_uring_create",
        "bdev_uring_delete",
        "bdev_nvme_attach_controller",
        "bdev_nvme_detach_controller",
        "bdev_set_qos_limit",
        "log_set_level",
        "log_get_level",
    ] {
        assert!(names.contains(&method), "{method} in {names:?}");
    }
    // At run time, framework_start_init (startup only) is not current.
    let current = target.ok("rpc_get_methods", Some(json!({"current": true})));
    assert!(!current
        .as_array()
        .expect("array")
        .contains(&json!("framework_start_init")));
    assert!(current
        .as_array()
        .expect("array")
        .contains(&json!("bdev_get_bdevs")));
    target.fails(
        "rpc_get_methods",
        Some(json!({"current": "yes"})),
        code::INVALID_PARAMS,
        "\"current\"",
    );
    target.fails(
        "rpc_get_methods",
        Some(json!({"verbose": true})),
        code::INVALID_PARAMS,
        "\"verbose\"",
    );
}

#[test]
fn version_reactors_and_threads() {
    let target = Target::start();
    let version = target.ok("spdk_get_version", None);
    assert_eq!(
        version["version"],
        format!("Pollux v{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(version["fields"]["major"], 0);
    assert_eq!(version["fields"]["minor"], 1);
    assert_eq!(version["fields"]["suffix"], "");
    target.fails(
        "spdk_get_version",
        Some(json!({"x": 1})),
        code::INVALID_PARAMS,
        "\"x\"",
    );

    let reactors = target.ok("framework_get_reactors", None);
    assert_eq!(reactors["tick_rate"], 1_000_000_000u64);
    let list = reactors["reactors"].as_array().expect("reactors");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["in_interrupt"], true);
    let threads = list[0]["lw_threads"].as_array().expect("lw_threads");
    assert!(
        threads.iter().any(|t| t["name"] == "app_thread"),
        "{reactors}"
    );
    target.fails(
        "framework_get_reactors",
        Some(json!({"lcore": 0})),
        code::INVALID_PARAMS,
        "\"lcore\"",
    );

    let stats = target.ok("thread_get_stats", None);
    let app_thread = stats["threads"]
        .as_array()
        .expect("threads")
        .iter()
        .find(|t| t["name"] == "app_thread")
        .cloned()
        .expect("app_thread");
    assert_eq!(app_thread["timed_pollers_count"], 1, "{app_thread}");
    assert!(app_thread["messages"].as_u64().expect("messages") >= 1);
    target.fails(
        "thread_get_stats",
        Some(json!({"name": "app_thread"})),
        code::INVALID_PARAMS,
        "\"name\"",
    );
}

#[test]
fn malloc_create_get_delete() {
    let target = Target::start();
    // What `rpc.py bdev_malloc_create -b Malloc0 8 4096` sends.
    let name = target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 2048, "block_size": 4096, "name": "Malloc0"})),
    );
    assert_eq!(name, "Malloc0");
    // No name: the module picks the first free one.
    let auto = target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 16, "block_size": 512})),
    );
    assert_eq!(auto, "Malloc1");
    // Metadata at SPDK's default is accepted; anything else is refused by name.
    target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 16, "block_size": 512, "name": "Malloc2", "md_size": 0})),
    );
    target.fails(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 16, "block_size": 512, "name": "Malloc3", "md_size": 8})),
        code::INVALID_PARAMS,
        "\"md_size\"",
    );
    target.fails(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 16, "block_size": 1000, "name": "Malloc3"})),
        code::INVALID_PARAMS,
        "\"block_size\"",
    );
    target.fails(
        "bdev_malloc_create",
        Some(json!({"block_size": 512, "name": "Malloc3"})),
        code::INVALID_PARAMS,
        "\"num_blocks\"",
    );
    target.fails(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 16, "block_size": 512, "name": "Malloc0"})),
        code::EEXIST,
        "Malloc0",
    );

    let bdevs = target.ok("bdev_get_bdevs", Some(json!({"name": "Malloc0"})));
    let bdev = &bdevs[0];
    assert_eq!(bdev["name"], "Malloc0");
    assert_eq!(bdev["product_name"], "Malloc disk");
    assert_eq!(bdev["block_size"], 4096);
    assert_eq!(bdev["num_blocks"], 2048);
    assert_eq!(bdev["claimed"], false);
    assert_eq!(bdev["supported_io_types"]["read"], true);
    assert_eq!(bdev["supported_io_types"]["unmap"], true);
    assert_eq!(
        bdev["uuid"].as_str().expect("uuid").len(),
        36,
        "uuid in {bdev}"
    );
    let all = target.ok("bdev_get_bdevs", None);
    assert_eq!(all.as_array().expect("array").len(), 3);
    target.fails(
        "bdev_get_bdevs",
        Some(json!({"name": "Nope"})),
        code::ENODEV,
        "\"Nope\"",
    );
    target.fails(
        "bdev_get_bdevs",
        Some(json!({"name": 7})),
        code::INVALID_PARAMS,
        "\"name\"",
    );

    assert_eq!(
        target.ok("bdev_malloc_delete", Some(json!({"name": "Malloc1"}))),
        true
    );
    target.fails(
        "bdev_malloc_delete",
        Some(json!({"name": "Malloc1"})),
        code::ENODEV,
        "Malloc1",
    );
    target.fails("bdev_malloc_delete", None, code::INVALID_PARAMS, "\"name\"");
    assert_eq!(target.registry.names(), ["Malloc0", "Malloc2"]);
}

#[test]
fn null_create_delete_and_module_mismatch() {
    let target = Target::start();
    // `rpc.py bdev_null_create Null0 1 512`
    assert_eq!(
        target.ok(
            "bdev_null_create",
            Some(json!({"name": "Null0", "num_blocks": 2048, "block_size": 512}))
        ),
        "Null0"
    );
    target.fails(
        "bdev_null_create",
        Some(json!({"num_blocks": 2048, "block_size": 512})),
        code::INVALID_PARAMS,
        "\"name\"",
    );
    target.fails(
        "bdev_null_create",
        Some(json!({"name": "Null1", "num_blocks": 2048, "block_size": 512, "dif_type": 1})),
        code::INVALID_PARAMS,
        "\"dif_type\"",
    );
    target.fails(
        "bdev_malloc_delete",
        Some(json!({"name": "Null0"})),
        code::ENODEV,
        "null bdev",
    );
    assert_eq!(
        target.ok("bdev_null_delete", Some(json!({"name": "Null0"}))),
        true
    );
    target.fails(
        "bdev_null_delete",
        Some(json!({"name": "Null0", "extra": 1})),
        code::INVALID_PARAMS,
        "\"extra\"",
    );
    assert!(target.registry.names().is_empty());
}

#[test]
fn delay_create_claims_its_base_and_deletes() {
    let target = Target::start();
    target.ok(
        "bdev_null_create",
        Some(json!({"name": "Base0", "num_blocks": 2048, "block_size": 512})),
    );
    // `rpc.py bdev_delay_create -b Base0 -d Delay0 -r 100 -t 200 -w 300 -n 400`
    let params = json!({"base_bdev_name": "Base0", "name": "Delay0", "avg_read_latency": 100,
                        "p99_read_latency": 200, "avg_write_latency": 300,
                        "p99_write_latency": 400});
    assert_eq!(target.ok("bdev_delay_create", Some(params)), "Delay0");
    target.fails(
        "bdev_delay_create",
        Some(
            json!({"base_bdev_name": "Base0", "name": "Delay1", "avg_read_latency": 100,
                    "p99_read_latency": 50, "avg_write_latency": 1, "p99_write_latency": 1}),
        ),
        code::INVALID_PARAMS,
        "\"p99_read_latency\"",
    );
    let bdevs = target.ok("bdev_get_bdevs", Some(json!({"name": "Base0"})));
    assert_eq!(bdevs[0]["claimed"], true, "the delay bdev claims its base");
    target.fails(
        "bdev_null_delete",
        Some(json!({"name": "Base0"})),
        code::EBUSY,
        "Base0",
    );
    assert_eq!(
        target.ok("bdev_delay_delete", Some(json!({"name": "Delay0"}))),
        true
    );
    assert_eq!(
        target.ok("bdev_null_delete", Some(json!({"name": "Base0"}))),
        true,
        "the claim went with the delay bdev"
    );
    assert!(target.registry.names().is_empty());
}

fn temp_file(name: &str, len: u64) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("pollux-rpc-{}-{name}", std::process::id()));
    let file = std::fs::File::create(&path).expect("create file");
    file.set_len(len).expect("size file");
    path
}

#[test]
fn aio_and_uring_create_delete() {
    let target = Target::start();
    let aio_file = temp_file("aio.img", 1 << 20);
    // `rpc.py bdev_aio_create /path Aio0 512`
    assert_eq!(
        target.ok(
            "bdev_aio_create",
            Some(json!({"name": "Aio0", "filename": aio_file, "block_size": 512})),
        ),
        "Aio0"
    );
    target.fails(
        "bdev_aio_create",
        Some(json!({"name": "Aio1", "filename": "/nonexistent/pollux.img"})),
        code::INVALID_PARAMS,
        "\"filename\"",
    );
    target.fails(
        "bdev_aio_create",
        Some(json!({"name": "Aio1"})),
        code::INVALID_PARAMS,
        "\"filename\"",
    );
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Aio0"})));
    assert_eq!(bdev[0]["product_name"], "AIO disk");
    assert_eq!(bdev[0]["num_blocks"], 2048);
    assert_eq!(
        target.ok("bdev_aio_delete", Some(json!({"name": "Aio0"}))),
        true
    );
    target.fails(
        "bdev_aio_delete",
        Some(json!({"name": "Aio0"})),
        code::ENODEV,
        "Aio0",
    );

    let uring_file = temp_file("uring.img", 1 << 20);
    assert_eq!(
        target.ok(
            "bdev_uring_create",
            Some(json!({"name": "Uring0", "filename": uring_file, "block_size": 4096})),
        ),
        "Uring0"
    );
    target.fails(
        "bdev_uring_create",
        Some(json!({"name": "Uring1", "filename": uring_file, "block_size": 3000})),
        code::INVALID_PARAMS,
        "\"block_size\"",
    );
    assert_eq!(
        target.ok("bdev_uring_delete", Some(json!({"name": "Uring0"}))),
        true
    );
    target.fails(
        "bdev_uring_delete",
        Some(json!({"name": 5})),
        code::INVALID_PARAMS,
        "\"name\"",
    );
    let _ = std::fs::remove_file(aio_file);
    let _ = std::fs::remove_file(uring_file);
}

#[test]
fn claimed_bdev_delete_is_refused_naming_the_owner() {
    let target = Target::start();
    target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 64, "block_size": 512, "name": "Malloc0"})),
    );
    // What a vhost controller does with its bdev.
    let desc = target
        .registry
        .open("Malloc0", true, None)
        .expect("open for write");
    desc.claim("vhost.0").expect("claim");
    let error = target.fails(
        "bdev_malloc_delete",
        Some(json!({"name": "Malloc0"})),
        code::EBUSY,
        "\"vhost.0\"",
    );
    assert!(error.message.contains("claimed"), "{error}");
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Malloc0"})));
    assert_eq!(bdev[0]["claimed"], true);
    assert_eq!(bdev[0]["claimed_by"], "vhost.0");
    assert_eq!(target.registry.names(), ["Malloc0"]);
    drop(desc);
    assert_eq!(
        target.ok("bdev_malloc_delete", Some(json!({"name": "Malloc0"}))),
        true
    );
}

#[test]
fn nvme_attach_detach_through_the_model() {
    let module: &'static NvmeModule = Box::leak(Box::new(NvmeModule::new()));
    let target = Target::with(Options {
        bdev: Some(Box::new(move |bdev| {
            let dma = bdev.dma.clone().expect("dma");
            bdev.nvme_module = module;
            bdev.nvme_attach = Arc::new(
                move |pending: &PendingAttach, ctx: &pollux_bdev::config::CreateContext<'_>| {
                    let model = ModelController::new(
                        dma.clone(),
                        ModelOptions {
                            namespaces: vec![(1024, 512), (256, 4096)],
                            ..ModelOptions::default()
                        },
                    )
                    .map_err(|e| pollux_bdev::BdevError::InvalidParam {
                        method: "bdev_nvme_attach_controller".to_string(),
                        param: "traddr",
                        reason: e.to_string(),
                        source: None,
                    })?;
                    let infos = module.attach_with_registers(
                        ctx.registry,
                        model,
                        dma.clone(),
                        pending.options.clone(),
                    )?;
                    Ok(infos.into_iter().map(|i| i.name).collect())
                },
            );
        })),
        ..Options::default()
    });
    // `rpc.py bdev_nvme_attach_controller -b Nvme0 -t PCIe -a 0000:00:04.0`
    let attach = json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "0000:00:04.0"});
    assert_eq!(
        target.ok("bdev_nvme_attach_controller", Some(attach.clone())),
        json!(["Nvme0n1", "Nvme0n2"])
    );
    target.fails(
        "bdev_nvme_attach_controller",
        Some(attach),
        code::EEXIST,
        "Nvme0",
    );
    target.fails(
        "bdev_nvme_attach_controller",
        Some(json!({"name": "Nvme1", "trtype": "RDMA", "traddr": "0000:00:05.0"})),
        code::INVALID_PARAMS,
        "\"trtype\"",
    );
    // TCP goes to the NVMe/TCP initiator, which wants an IP address and a subsystem NQN.
    target.fails(
        "bdev_nvme_attach_controller",
        Some(
            json!({"name": "Nvme1", "trtype": "TCP", "traddr": "0000:00:05.0",
            "subnqn": "nqn.2016-06.io.spdk:cnode1"}),
        ),
        code::INVALID_PARAMS,
        "\"traddr\"",
    );
    target.fails(
        "bdev_nvme_attach_controller",
        Some(json!({"name": "Nvme1", "trtype": "TCP", "traddr": "127.0.0.1"})),
        code::INVALID_PARAMS,
        "\"subnqn\"",
    );
    target.fails(
        "bdev_nvme_attach_controller",
        Some(json!({"name": "Nvme1", "trtype": "PCIe", "traddr": "0000:00:05.0", "prchk_guard": true})),
        code::INVALID_PARAMS,
        "\"prchk_guard\"",
    );
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Nvme0n2"})));
    assert_eq!(bdev[0]["product_name"], "NVMe disk");
    assert_eq!(bdev[0]["block_size"], 4096);
    target.fails(
        "bdev_nvme_detach_controller",
        Some(json!({"name": "Nvme9"})),
        code::ENODEV,
        "Nvme9",
    );
    target.fails(
        "bdev_nvme_detach_controller",
        Some(json!({"name": "Nvme0", "traddr": "0000:00:04.0"})),
        code::INVALID_PARAMS,
        "\"traddr\"",
    );
    assert_eq!(
        target.ok(
            "bdev_nvme_detach_controller",
            Some(json!({"name": "Nvme0"}))
        ),
        true
    );
    assert!(target.registry.names().is_empty());
    assert!(module.controller_names().is_empty());
}

#[test]
fn nvme_attach_without_a_device_fails_naming_traddr() {
    let target = Target::start();
    target.fails(
        "bdev_nvme_attach_controller",
        Some(json!({"name": "NvmeX", "trtype": "PCIe", "traddr": "not-an-address"})),
        code::INVALID_PARAMS,
        "\"traddr\"",
    );
}

#[test]
fn iostat_reports_closed_channels() {
    let target = Target::start();
    target.ok(
        "bdev_null_create",
        Some(json!({"name": "Null0", "num_blocks": 64, "block_size": 512})),
    );
    let stats = target.ok("bdev_get_iostat", None);
    assert!(stats["tick_rate"].as_u64().expect("tick_rate") > 0);
    assert_eq!(stats["bdevs"][0]["name"], "Null0");
    assert_eq!(stats["bdevs"][0]["num_read_ops"], 0);
    let one = target.ok(
        "bdev_get_iostat",
        Some(json!({"name": "Null0", "per_channel": false})),
    );
    assert_eq!(one["bdevs"].as_array().expect("bdevs").len(), 1);
    target.fails(
        "bdev_get_iostat",
        Some(json!({"per_channel": true})),
        code::INVALID_PARAMS,
        "\"per_channel\"",
    );
    target.fails(
        "bdev_get_iostat",
        Some(json!({"name": "Nope"})),
        code::ENODEV,
        "Nope",
    );
}

#[test]
fn save_config_loaded_with_the_config_loader_recreates_identical_bdevs() {
    let target = Target::start();
    target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 128, "block_size": 4096, "name": "Malloc0"})),
    );
    target.ok(
        "bdev_null_create",
        Some(json!({"name": "Null0", "num_blocks": 1000, "block_size": 512})),
    );
    let config = target.ok("save_config", None);
    assert_eq!(config["subsystems"][0]["subsystem"], "bdev");
    target.fails(
        "save_config",
        Some(json!({"indent": 2})),
        code::INVALID_PARAMS,
        "\"indent\"",
    );
    let registry = pollux_bdev::BdevRegistry::new();
    let dma = common::dma();
    pollux_bdev::config::apply(
        &config,
        std::path::Path::new("save_config"),
        &registry,
        &MethodTable::with_builtin(),
        Some(&dma),
    )
    .expect("load save_config output");
    assert_eq!(registry.names(), target.registry.names());
    for name in registry.names() {
        let (a, b) = (
            registry.info(&name).expect("recreated"),
            target.registry.info(&name).expect("original"),
        );
        assert_eq!(
            (
                a.uuid,
                a.block_size_bytes,
                a.num_blocks,
                a.module,
                a.supported_io_types
            ),
            (
                b.uuid,
                b.block_size_bytes,
                b.num_blocks,
                b.module,
                b.supported_io_types
            ),
            "{name}"
        );
    }
}

#[test]
fn wait_for_rpc_then_framework_start_init() {
    let initialised = Arc::new(AtomicBool::new(false));
    let flag = initialised.clone();
    let target = Target::with(Options {
        state: RpcState::Startup,
        start_init: Some(Box::new(move |_ctx| {
            flag.store(true, Ordering::Release);
            Ok(())
        })),
        ..Options::default()
    });
    target.fails(
        "bdev_get_bdevs",
        None,
        code::INVALID_STATE,
        "framework_start_init",
    );
    let current = target.ok("rpc_get_methods", Some(json!({"current": true})));
    assert!(current
        .as_array()
        .expect("array")
        .contains(&json!("framework_start_init")));
    target.fails(
        "framework_start_init",
        Some(json!({"now": true})),
        code::INVALID_PARAMS,
        "\"now\"",
    );
    assert!(!initialised.load(Ordering::Acquire));
    assert_eq!(target.ok("framework_start_init", None), true);
    assert!(initialised.load(Ordering::Acquire));
    assert_eq!(target.ok("bdev_get_bdevs", None), json!([]));
    target.fails(
        "framework_start_init",
        None,
        code::INVALID_STATE,
        "before framework is initialized",
    );
}

#[test]
fn framework_start_init_failure_keeps_the_startup_state() {
    let target = Target::with(Options {
        state: RpcState::Startup,
        start_init: Some(Box::new(|_ctx| {
            Err(RpcError::internal("config: Malloc0 could not be created"))
        })),
        ..Options::default()
    });
    target.fails(
        "framework_start_init",
        None,
        code::INTERNAL_ERROR,
        "Malloc0",
    );
    target.fails(
        "bdev_get_bdevs",
        None,
        code::INVALID_STATE,
        "framework_start_init",
    );
}

#[test]
fn spdk_kill_instance_refuses_bad_signals_and_stops_the_app() {
    let target = Target::start();
    target.fails(
        "spdk_kill_instance",
        None,
        code::INVALID_PARAMS,
        "\"sig_name\"",
    );
    target.fails(
        "spdk_kill_instance",
        Some(json!({"sig_name": "SIGKILL"})),
        code::INVALID_PARAMS,
        "SIGKILL",
    );
    target.fails(
        "spdk_kill_instance",
        Some(json!({"sig_name": "SIGWHAT"})),
        code::INVALID_PARAMS,
        "SIGWHAT",
    );
    assert_eq!(
        target.ok("spdk_kill_instance", Some(json!({"sig_name": "SIGTERM"}))),
        true
    );
    assert!(
        target.wait_stopped(Duration::from_secs(10)),
        "the app stopped after spdk_kill_instance"
    );
}

#[test]
fn bdev_wait_for_examine_is_accepted() {
    let target = Target::start();
    assert_eq!(target.ok("bdev_wait_for_examine", None), true);
    target.fails(
        "bdev_wait_for_examine",
        Some(json!({"x": 1})),
        code::INVALID_PARAMS,
        "\"x\"",
    );
}

/// A stand-in for the vhost crate: `test_ctrlr_create` (answered later from another thread)
/// and a `test_vhost` subsystem in save_config.
fn fake_vhost(ctrlrs: Arc<std::sync::Mutex<Vec<String>>>) -> Options {
    Options {
        extra: Some(Box::new(move |methods| {
            let created = ctrlrs.clone();
            methods
                .register(
                    "test_ctrlr_create",
                    pollux_rpc::Allowed::Runtime,
                    move |ctx, call| {
                        let (params, reply) = call.into_parts();
                        let name = match params.required_str("ctrlr") {
                            Ok(name) => name.to_string(),
                            Err(error) => return reply.err(error),
                        };
                        let worker = ctx.create_thread("ctrlr", None).expect("thread");
                        let job = Box::new((reply, name, created.clone()));
                        pollux_reactor::send_msg(&worker, move |ctx| {
                            let (reply, name, created) = *job;
                            created.lock().expect("list").push(name.clone());
                            reply.ok(Value::String(name));
                            ctx.exit();
                        })
                        .expect("send");
                    },
                )
                .expect("register");
            let listed = ctrlrs.clone();
            methods
                .register_subsystem("test_vhost", &["bdev"], move || {
                    listed
                        .lock()
                        .expect("list")
                        .iter()
                        .map(|name| json!({"method": "test_ctrlr_create", "params": {"ctrlr": name}}))
                        .collect()
                })
                .expect("subsystem");
        })),
        ..Options::default()
    }
}

#[test]
fn save_config_replayed_with_load_config_recreates_bdevs_and_controllers() {
    let first_ctrlrs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let first = Target::with(fake_vhost(first_ctrlrs.clone()));
    first.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 64, "block_size": 512, "name": "Malloc0"})),
    );
    first.ok(
        "bdev_null_create",
        Some(json!({"name": "Null0", "num_blocks": 100, "block_size": 4096})),
    );
    assert_eq!(
        first.ok("test_ctrlr_create", Some(json!({"ctrlr": "vhost.0"}))),
        "vhost.0"
    );
    let config = first.ok("save_config", None);
    let subsystems: Vec<&str> = config["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .filter_map(|s| s["subsystem"].as_str())
        .collect();
    assert_eq!(subsystems, ["bdev", "test_vhost"]);

    let second_ctrlrs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let second = Target::with(fake_vhost(second_ctrlrs.clone()));
    assert_eq!(second.load(config.clone()), Ok(3));
    assert_eq!(second.registry.names(), first.registry.names());
    for name in first.registry.names() {
        let (a, b) = (
            first.registry.info(&name).expect("original"),
            second.registry.info(&name).expect("recreated"),
        );
        assert_eq!(
            (a.uuid, a.block_size_bytes, a.num_blocks, a.module),
            (b.uuid, b.block_size_bytes, b.num_blocks, b.module),
            "{name}"
        );
    }
    assert_eq!(*second_ctrlrs.lock().expect("list"), ["vhost.0"]);
    assert_eq!(second.ok("save_config", None), config);
}

/// `rpc.py bdev_set_qos_limit Null0 --rw_ios_per_sec 10000 --w_mbytes_per_sec 5`: shown in
/// bdev_get_bdevs, written by save_config; bad limits and unknown bdevs refused.
#[test]
fn qos_limits_are_set_shown_and_saved() {
    let target = Target::start();
    target.ok(
        "bdev_null_create",
        Some(json!({"name": "Null0", "num_blocks": 100, "block_size": 4096})),
    );
    assert_eq!(
        target.ok(
            "bdev_set_qos_limit",
            Some(json!({"name": "Null0", "rw_ios_per_sec": 10000, "w_mbytes_per_sec": 5})),
        ),
        true
    );
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Null0"})));
    assert_eq!(
        bdev[0]["assigned_rate_limits"],
        json!({"rw_ios_per_sec": 10000, "rw_mbytes_per_sec": 0,
               "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 5})
    );
    assert_eq!(
        bdev[0]["driver_specific"],
        json!({"null": {"num_blocks": 100, "block_size": 4096}}),
        "the QoS entry is not the module's"
    );
    let saved = target.ok("save_config", None);
    let entries = saved["subsystems"][0]["config"]
        .as_array()
        .expect("entries");
    assert!(
        entries.iter().any(|e| e["method"] == "bdev_set_qos_limit"
            && e["params"]
                == json!({"name": "Null0", "rw_ios_per_sec": 10000, "w_mbytes_per_sec": 5})),
        "{saved}"
    );
    target.fails(
        "bdev_set_qos_limit",
        Some(json!({"name": "Null0", "rw_ios_per_sec": 2500})),
        code::INVALID_PARAMS,
        "multiple of 1000",
    );
    target.fails(
        "bdev_set_qos_limit",
        Some(json!({"name": "Null0"})),
        code::INVALID_PARAMS,
        "no rate limit given",
    );
    target.fails(
        "bdev_set_qos_limit",
        Some(json!({"name": "Nope", "rw_ios_per_sec": 1000})),
        code::ENODEV,
        "\"Nope\"",
    );
    // 0 removes a limit.
    target.ok(
        "bdev_set_qos_limit",
        Some(json!({"name": "Null0", "rw_ios_per_sec": 0, "w_mbytes_per_sec": 0})),
    );
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Null0"})));
    assert_eq!(bdev[0]["assigned_rate_limits"]["rw_ios_per_sec"], 0);
}

/// `rpc.py log_set_level DEBUG` / `log_get_level`: SPDK's names in any case, mapped onto the
/// app's filter; a RUST_LOG filter accepted too; nonsense refused with the names.
#[test]
fn log_levels_map_onto_the_filter() {
    let target = Target::start();
    assert_eq!(target.ok("log_get_level", None), "INFO");
    assert_eq!(
        target.ok("log_set_level", Some(json!({"level": "DEBUG"}))),
        true
    );
    assert_eq!(*target.log_filter.lock().expect("filter"), "debug");
    assert_eq!(target.ok("log_get_level", None), "DEBUG");
    target.ok("log_set_level", Some(json!({"level": "notice"})));
    assert_eq!(*target.log_filter.lock().expect("filter"), "info");
    assert_eq!(target.ok("log_get_level", None), "NOTICE");
    target.ok("log_set_print_level", Some(json!({"level": "WARNING"})));
    assert_eq!(target.ok("log_get_print_level", None), "WARNING");
    assert_eq!(*target.log_filter.lock().expect("filter"), "warn");
    target.ok(
        "log_set_level",
        Some(json!({"level": "pollux_vhost=debug,warn"})),
    );
    assert_eq!(target.ok("log_get_level", None), "pollux_vhost=debug,warn");
    target.fails(
        "log_set_level",
        Some(json!({"level": "LOUD!"})),
        code::INVALID_PARAMS,
        "ERROR, WARNING, NOTICE, INFO, DEBUG",
    );
    assert_eq!(
        *target.log_filter.lock().expect("filter"),
        "pollux_vhost=debug,warn",
        "a refused level changes nothing"
    );
    target.fails("log_set_level", None, code::INVALID_PARAMS, "\"level\"");
    target.fails(
        "log_get_level",
        Some(json!({"level": "x"})),
        code::INVALID_PARAMS,
        "\"level\"",
    );
}

/// SPDK's newer rpc.py builds save_config from framework_get_subsystems and one
/// framework_get_config per subsystem: the assembled document equals save_config's.
#[test]
fn framework_get_subsystems_and_get_config_assemble_save_config() {
    let ctrlrs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let target = Target::with(fake_vhost(ctrlrs));
    target.ok(
        "bdev_malloc_create",
        Some(json!({"num_blocks": 64, "block_size": 512, "name": "Malloc0"})),
    );
    target.ok("test_ctrlr_create", Some(json!({"ctrlr": "vhost.0"})));
    let subsystems = target.ok("framework_get_subsystems", None);
    assert_eq!(
        subsystems,
        json!([
            {"subsystem": "bdev", "depends_on": []},
            {"subsystem": "test_vhost", "depends_on": ["bdev"]},
        ])
    );
    let assembled: Vec<Value> = subsystems
        .as_array()
        .expect("list")
        .iter()
        .map(|s| {
            let name = s["subsystem"].clone();
            // As SPDK's current rpc.py sends it.
            let config = target.ok(
                "framework_get_config",
                Some(json!({"name": name, "with_batches": false})),
            );
            json!({"subsystem": name, "config": config})
        })
        .collect();
    let bdev = target.ok("framework_get_config", Some(json!({"name": "bdev"})));
    assert!(
        bdev.as_array()
            .expect("entries")
            .iter()
            .any(|e| e["method"] == "bdev_malloc_create" && e["params"]["name"] == "Malloc0"),
        "{bdev}"
    );
    assert_eq!(
        json!({"subsystems": assembled}),
        target.ok("save_config", None)
    );

    target.fails(
        "framework_get_config",
        Some(json!({"name": "nvmf"})),
        code::INVALID_PARAMS,
        "\"nvmf\" not found",
    );
    target.fails(
        "framework_get_config",
        None,
        code::INVALID_PARAMS,
        "\"name\"",
    );
    target.fails(
        "framework_get_subsystems",
        Some(json!({"name": "bdev"})),
        code::INVALID_PARAMS,
        "\"name\"",
    );
}

#[test]
fn load_config_names_the_failing_entry() {
    let target = Target::start();
    let error = target
        .load(json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 8, "block_size": 512}},
            {"method": "bdev_frobnicate", "params": {}}
        ]}]}))
        .expect_err("unknown method");
    assert_eq!(error.code, code::METHOD_NOT_FOUND);
    assert!(error.message.contains("bdev_frobnicate"), "{error}");
    assert!(
        target.registry.names().is_empty(),
        "checked before anything runs"
    );
    let error = target
        .load(json!({"subsystems": [{"subsystem": "bdev", "config": [
            {"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 8, "block_size": 512}},
            {"method": "bdev_null_create", "params": {"name": "Null1", "num_blocks": 8, "block_size": 100}}
        ]}]}))
        .expect_err("bad block size");
    assert_eq!(error.code, code::INVALID_PARAMS);
    assert!(error.message.contains("entry 1"), "{error}");
    assert!(error.message.contains("\"block_size\""), "{error}");
    assert_eq!(target.registry.names(), ["Null0"]);
    let error = target.load(json!({"subsystem": []})).expect_err("shape");
    assert!(error.message.contains("subsystems"), "{error}");
}
