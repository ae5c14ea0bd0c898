//! `bdev_virtio_attach_controller` / `bdev_virtio_detach_controller` over RPC, against
//! qemu-storage-daemon's vhost-user-blk export (Debian's `qemu-system-common`; never skipped:
//! without it the test fails and says how to install it).

mod common;

use common::Target;
use pollux_rpc::error::code;
use pollux_testkit::qsd::{Export, ExportOptions};
use serde_json::json;

#[test]
fn virtio_attach_get_detach_and_bad_parameters() {
    let daemon = Export::start(
        "rpc-virtio",
        ExportOptions {
            image_bytes: 8 << 20,
            ..ExportOptions::default()
        },
    );
    let target = Target::start();
    let traddr = daemon.socket().display().to_string();
    // `rpc.py bdev_virtio_attach_controller -t user -a SOCK -d blk VirtioBlk0`
    let attach = json!({"name": "VirtioBlk0", "trtype": "user", "traddr": traddr,
                        "dev_type": "blk", "vq_count": 1, "vq_size": 128});
    assert_eq!(
        target.ok("bdev_virtio_attach_controller", Some(attach.clone())),
        json!(["VirtioBlk0"])
    );
    let bdevs = target.ok("bdev_get_bdevs", Some(json!({"name": "VirtioBlk0"})));
    assert_eq!(bdevs[0]["product_name"], "VirtioBlk Disk");
    assert_eq!(bdevs[0]["block_size"], 512);
    assert_eq!(bdevs[0]["num_blocks"], (8 << 20) / 512);
    target.fails(
        "bdev_virtio_attach_controller",
        Some(attach),
        code::EEXIST,
        "VirtioBlk0",
    );
    target.fails(
        "bdev_virtio_attach_controller",
        Some(
            json!({"name": "VirtioBlk1", "trtype": "user", "traddr": traddr,
                    "dev_type": "scsi"}),
        ),
        code::INVALID_PARAMS,
        "\"dev_type\"",
    );
    target.fails(
        "bdev_virtio_attach_controller",
        Some(json!({"name": "VirtioBlk1", "trtype": "user", "dev_type": "blk"})),
        code::INVALID_PARAMS,
        "\"traddr\"",
    );
    let config = target.ok("save_config", None);
    let text = config.to_string();
    assert!(
        text.contains("\"bdev_virtio_attach_controller\"") && text.contains(&traddr),
        "save_config recreates the attach: {text}"
    );
    target.fails(
        "bdev_virtio_detach_controller",
        Some(json!({"name": "VirtioBlk9"})),
        code::ENODEV,
        "VirtioBlk9",
    );
    assert_eq!(
        target.ok(
            "bdev_virtio_detach_controller",
            Some(json!({"name": "VirtioBlk0"}))
        ),
        json!(true)
    );
    assert!(target.registry.names().is_empty(), "the bdev went with it");
}
