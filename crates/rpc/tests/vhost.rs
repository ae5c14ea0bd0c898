//! The vhost methods against a real `VhostTarget` over malloc bdevs: create, list, coalescing
//! and delete with SPDK's parameters and error codes; the claim a controller holds on its
//! bdev; `save_config` replayed into a fresh target.

mod common;

use std::path::{Path, PathBuf};

use common::{Options, Target};
use pollux_rpc::error::code;
use serde_json::{json, Value};

/// A fresh directory for the controllers' sockets; removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("pollux-rpc-vhost-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("socket dir");
        Self(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn target(dir: &Path) -> Target {
    Target::with(Options {
        vhost_dir: Some(dir.to_path_buf()),
        ..Options::default()
    })
}

fn malloc(target: &Target, name: &str) {
    let created = target.ok(
        "bdev_malloc_create",
        Some(json!({"name": name, "num_blocks": 2048, "block_size": 512})),
    );
    assert_eq!(created, json!(name));
}

fn create(target: &Target, params: Value) -> Result<Value, pollux_rpc::RpcError> {
    target.call("vhost_create_blk_controller", Some(params))
}

#[test]
fn create_get_set_coalescing_delete() {
    let dir = Dir::new("cgd");
    let target = target(&dir.0);
    malloc(&target, "Malloc0");
    malloc(&target, "Malloc1");

    // rpc.py's parameters, SPDK's defaults included (transport, packed_ring_recovery).
    let created = create(
        &target,
        json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1", "readonly": true,
               "packed_ring": true, "transport": "vhost_user_blk", "packed_ring_recovery": false}),
    )
    .expect("create vhost.0");
    assert_eq!(created, json!(true));
    let socket = dir.0.join("vhost.0");
    assert!(socket.exists(), "{} created", socket.display());

    let all = target.ok("vhost_get_controllers", None);
    let expected = json!([{
        "ctrlr": "vhost.0",
        "cpumask": "0x1",
        "delay_base_us": 0,
        "iops_threshold": 60000,
        "socket": socket.display().to_string(),
        "backend_specific": {"block": {"readonly": true, "bdev": "Malloc0"}},
    }]);
    assert_eq!(all, expected);
    assert_eq!(
        target.ok("vhost_get_controllers", Some(json!({"name": "vhost.0"}))),
        expected
    );
    target.fails(
        "vhost_get_controllers",
        Some(json!({"name": "vhost.9"})),
        code::ENODEV,
        "vhost.9",
    );
    target.fails(
        "vhost_get_controllers",
        Some(json!({"bogus": 1})),
        code::INVALID_PARAMS,
        "bogus",
    );

    // Coalescing: set, shown, refused when wrong.
    let set = target.ok(
        "vhost_controller_set_coalescing",
        Some(json!({"ctrlr": "vhost.0", "delay_base_us": 80, "iops_threshold": 5000})),
    );
    assert_eq!(set, json!(true));
    let shown = target.ok("vhost_get_controllers", Some(json!({"name": "vhost.0"})));
    assert_eq!(shown[0]["delay_base_us"], 80);
    assert_eq!(shown[0]["iops_threshold"], 5000);
    target.fails(
        "vhost_controller_set_coalescing",
        Some(json!({"ctrlr": "vhost.0", "delay_base_us": 80})),
        code::INVALID_PARAMS,
        "iops_threshold",
    );
    target.fails(
        "vhost_controller_set_coalescing",
        Some(json!({"ctrlr": "vhost.0", "delay_base_us": 80, "iops_threshold": 0})),
        code::INVALID_PARAMS,
        "iops_threshold",
    );
    target.fails(
        "vhost_controller_set_coalescing",
        Some(json!({"ctrlr": "vhost.0", "delay_base_us": -1, "iops_threshold": 1})),
        code::INVALID_PARAMS,
        "delay_base_us",
    );
    target.fails(
        "vhost_controller_set_coalescing",
        Some(json!({"ctrlr": "vhost.9", "delay_base_us": 0, "iops_threshold": 1})),
        code::ENODEV,
        "vhost.9",
    );

    // Delete: bad parameters, unknown name, then the real one.
    target.fails(
        "vhost_delete_controller",
        None,
        code::INVALID_PARAMS,
        "ctrlr",
    );
    target.fails(
        "vhost_delete_controller",
        Some(json!({"ctrlr": "vhost.0", "force": true})),
        code::INVALID_PARAMS,
        "force",
    );
    target.fails(
        "vhost_delete_controller",
        Some(json!({"ctrlr": "vhost.9"})),
        code::ENODEV,
        "vhost.9",
    );
    assert_eq!(
        target.ok("vhost_delete_controller", Some(json!({"ctrlr": "vhost.0"}))),
        json!(true)
    );
    assert!(!socket.exists(), "{} removed", socket.display());
    assert_eq!(target.ok("vhost_get_controllers", None), json!([]));
    // The bdev is free again: a new controller may take it.
    create(&target, json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"})).expect("recreate");
    assert!(socket.exists());
}

#[test]
fn create_refuses_bad_parameters_by_name() {
    let dir = Dir::new("bad");
    let target = target(&dir.0);
    malloc(&target, "Malloc0");
    create(&target, json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"})).expect("create");

    let refused: [(Value, i32, &str); 14] = [
        (
            json!({"dev_name": "Malloc0"}),
            code::INVALID_PARAMS,
            "\"ctrlr\"",
        ),
        (json!({"ctrlr": "v"}), code::INVALID_PARAMS, "\"dev_name\""),
        (
            json!({"ctrlr": 7, "dev_name": "Malloc0"}),
            code::INVALID_PARAMS,
            "\"ctrlr\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "readonly": "yes"}),
            code::INVALID_PARAMS,
            "\"readonly\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "packed_ring": 1}),
            code::INVALID_PARAMS,
            "\"packed_ring\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "bogus": 1}),
            code::INVALID_PARAMS,
            "\"bogus\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "transport": "vfio_user_virtio_blk"}),
            code::INVALID_PARAMS,
            "\"transport\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "packed_ring": true,
                   "packed_ring_recovery": 1}),
            code::INVALID_PARAMS,
            "\"packed_ring_recovery\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "cpumask": "zz"}),
            code::INVALID_PARAMS,
            "\"cpumask\"",
        ),
        (
            json!({"ctrlr": "a/b", "dev_name": "Malloc0"}),
            code::INVALID_PARAMS,
            "\"ctrlr\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0", "num_queues": 0}),
            code::INVALID_PARAMS,
            "\"num_queues\"",
        ),
        // The name is taken; the bdev is missing; the bdev is claimed by vhost.0.
        (
            json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"}),
            code::EEXIST,
            "vhost.0",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Nope0"}),
            code::ENODEV,
            "\"dev_name\"",
        ),
        (
            json!({"ctrlr": "v", "dev_name": "Malloc0"}),
            code::EBUSY,
            "vhost controller vhost.0",
        ),
    ];
    for (params, expected, needle) in refused {
        let error = create(&target, params.clone()).expect_err(&format!("{params} refused"));
        assert_eq!(error.code, expected, "{params}: {error}");
        assert!(
            error.message.contains(needle),
            "{params}: {needle} not in {:?}",
            error.message
        );
    }
    target.fails(
        "vhost_create_blk_controller",
        None,
        code::INVALID_PARAMS,
        "params",
    );
    // Nothing was left behind by the refusals.
    assert_eq!(
        target
            .ok("vhost_get_controllers", None)
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert!(!dir.0.join("v").exists());
}

#[test]
fn claimed_bdev_delete_is_refused_naming_the_controller() {
    let dir = Dir::new("claim");
    let target = target(&dir.0);
    malloc(&target, "Malloc0");
    create(&target, json!({"ctrlr": "vhost.0", "dev_name": "Malloc0"})).expect("create");

    target.fails(
        "bdev_malloc_delete",
        Some(json!({"name": "Malloc0"})),
        code::EBUSY,
        "vhost controller vhost.0",
    );
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Malloc0"})));
    assert_eq!(bdev[0]["claimed"], true);
    assert_eq!(bdev[0]["claimed_by"], "vhost controller vhost.0");
    assert_eq!(bdev[0]["claim_type"], "exclusive_write");

    target.ok("vhost_delete_controller", Some(json!({"ctrlr": "vhost.0"})));
    let bdev = target.ok("bdev_get_bdevs", Some(json!({"name": "Malloc0"})));
    assert_eq!(bdev[0]["claimed"], false);
    assert_eq!(
        target.ok("bdev_malloc_delete", Some(json!({"name": "Malloc0"}))),
        json!(true)
    );
    assert_eq!(target.ok("bdev_get_bdevs", None), json!([]));
}

fn subsystem_names(config: &Value) -> Vec<String> {
    config["subsystems"]
        .as_array()
        .expect("subsystems")
        .iter()
        .map(|s| s["subsystem"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn save_config_loads_into_a_fresh_target_identically() {
    let dir = Dir::new("save");
    let (saved, bdevs, controllers) = {
        let first = target(&dir.0);
        malloc(&first, "Malloc0");
        malloc(&first, "Malloc1");
        create(
            &first,
            json!({"ctrlr": "vhost.0", "dev_name": "Malloc0", "readonly": true, "packed_ring": true,
                   "packed_ring_recovery": true}),
        )
        .expect("vhost.0");
        create(
            &first,
            json!({"ctrlr": "vhost.1", "dev_name": "Malloc1", "num_queues": 2}),
        )
        .expect("vhost.1");
        first.ok(
            "vhost_controller_set_coalescing",
            Some(json!({"ctrlr": "vhost.1", "delay_base_us": 50, "iops_threshold": 20000})),
        );
        let saved = first.ok("save_config", None);
        (
            saved,
            first.ok("bdev_get_bdevs", None),
            first.ok("vhost_get_controllers", None),
        )
        // `first` stops here: its controllers' sockets are removed.
    };
    assert!(!dir.0.join("vhost.0").exists() && !dir.0.join("vhost.1").exists());

    let names = subsystem_names(&saved);
    let bdev = names
        .iter()
        .position(|n| n == "bdev")
        .expect("bdev subsystem");
    let vhost = names
        .iter()
        .position(|n| n == "vhost_blk")
        .expect("vhost_blk subsystem");
    assert!(bdev < vhost, "bdev before vhost_blk: {names:?}");
    let vhost_config = &saved["subsystems"][vhost]["config"];
    assert_eq!(
        vhost_config,
        &json!([
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.0", "dev_name": "Malloc0", "cpumask": "0x1",
                        "readonly": true, "packed_ring": true, "packed_ring_recovery": true}},
            {"method": "vhost_create_blk_controller",
             "params": {"ctrlr": "vhost.1", "dev_name": "Malloc1", "cpumask": "0x1",
                        "readonly": false, "packed_ring": false, "num_queues": 2}},
            {"method": "vhost_controller_set_coalescing",
             "params": {"ctrlr": "vhost.1", "delay_base_us": 50, "iops_threshold": 20000}},
        ])
    );

    let second = target(&dir.0);
    let applied = second.load(saved.clone()).expect("saved config loads");
    assert_eq!(applied, 5);
    assert_eq!(second.ok("bdev_get_bdevs", None), bdevs);
    assert_eq!(second.ok("vhost_get_controllers", None), controllers);
    assert_eq!(second.ok("save_config", None), saved);
    assert!(dir.0.join("vhost.0").exists() && dir.0.join("vhost.1").exists());
}
