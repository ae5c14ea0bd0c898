//! `bdev_virtio_attach_controller` / `bdev_virtio_detach_controller` over RPC, against
//! qemu-storage-daemon's vhost-user-blk export (Debian's `qemu-system-common`; never skipped:
//! without it the test fails and says how to install it).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Target;
use pollux_rpc::error::code;
use serde_json::json;

struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("pollux-rpc-virtio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(8 << 20))
            .expect("image");
        let socket = dir.join("vhost.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run qemu-storage-daemon ({error}); install Debian's \
                     qemu-system-common (scripts/install-deps.sh --test)"
                )
            });
        let start = Instant::now();
        while !socket.exists() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            socket.exists(),
            "qemu-storage-daemon did not create its socket"
        );
        Self { child, dir, socket }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn virtio_attach_get_detach_and_bad_parameters() {
    let daemon = Daemon::start();
    let target = Target::start();
    let traddr = daemon.socket.display().to_string();
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
