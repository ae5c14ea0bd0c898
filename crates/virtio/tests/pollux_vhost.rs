//! The virtio_blk bdev against Pollux's own vhost-user-blk target (`apps/pollux-vhost`), run
//! as a separate process over a malloc bdev.
//!
//! The binary is looked up in `$POLLUX_VHOST`, else next to this test's target directory
//! (`<target>/<profile>/pollux-vhost`); build it first (`cargo build --workspace --bins`,
//! which scripts/test.sh does). A missing binary fails the test with that instruction.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{dma, iov, wait};
use pollux_bdev::{BdevRegistry, IoStatus};
use pollux_env::dma::DmaBuffer;
use pollux_testkit::bin::workspace_binary;
use pollux_virtio::bdev::{AttachOptions, VirtioModule, DEFAULT_CONNECT_TIMEOUT};
use pollux_virtio::device::DeviceOptions;

const DISK_BLOCKS: u64 = 65536;

struct Target {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Target {
    fn start(test: &str, packed_ring: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("pollux-vhost-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = serde_json::json!({"subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create",
                 "params": {"name": "Disk0", "num_blocks": DISK_BLOCKS, "block_size": 512}}
            ]},
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller",
                 "params": {"ctrlr": "vhost.0", "dev_name": "Disk0", "num_queues": 2,
                            "packed_ring": packed_ring}}
            ]}
        ]});
        let config_path = dir.join("vhost.json");
        std::fs::write(&config_path, config.to_string()).expect("config");
        let child = Command::new(workspace_binary("pollux-vhost"))
            .arg("-S")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            // An RPC socket of its own: the default one is shared by every target.
            .arg("-r")
            .arg(dir.join("rpc.sock"))
            .arg("--no-huge")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start pollux-vhost");
        let socket = dir.join("vhost.0");
        Self { child, dir, socket }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Writes and reads back through two channels (two queues), many times over each ring, then
/// write zeroes, flush and the loss of the target.
fn round_trip(packed_ring: bool) {
    let target = Target::start(if packed_ring { "packed" } else { "split" }, packed_ring);
    let dma = dma(8);
    let registry = BdevRegistry::new();
    let module = VirtioModule::new();
    let info = module
        .attach_controller(
            &registry,
            &dma,
            AttachOptions {
                name: "VirtioBlk0".to_string(),
                traddr: target.socket.clone(),
                device: DeviceOptions {
                    vq_count: 2,
                    vq_size: 64,
                    packed_ring,
                    ..DeviceOptions::default()
                },
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            },
        )
        .expect("attach to pollux-vhost");
    assert_eq!(info.num_blocks, DISK_BLOCKS);
    let desc = registry.open("VirtioBlk0", true, None).expect("open");
    let mut channels = [
        desc.channel(16).expect("channel"),
        desc.channel(16).expect("channel"),
    ];
    let io_len = 4096;
    let mut buffers: Vec<DmaBuffer> = (0..32)
        .map(|_| dma.alloc(io_len, 4096, None).expect("buffer"))
        .collect();
    // 40 rounds of 16 writes and 16 reads per queue: every ring wraps many times.
    for round in 0..40u64 {
        for (i, buffer) in buffers.iter_mut().enumerate() {
            buffer
                .write_at(0, &pattern((i as u64 + round) as u8, io_len))
                .expect("fill");
            let lba = (round * 32 + i as u64) * 8 % DISK_BLOCKS;
            let vec = iov(buffer);
            channels[i % 2]
                .write(i as u64, lba, 8, &[vec])
                .expect("submit");
        }
        for channel in &mut channels {
            let done = wait(channel, 16);
            assert!(done.iter().all(|c| c.status.is_success()), "{done:?}");
        }
        for (i, buffer) in buffers.iter_mut().enumerate() {
            buffer.fill(0, io_len, 0).expect("clear");
            let lba = (round * 32 + i as u64) * 8 % DISK_BLOCKS;
            let vec = iov(buffer);
            channels[(i + 1) % 2]
                .read(i as u64, lba, 8, &[vec])
                .expect("submit");
        }
        for channel in &mut channels {
            assert!(wait(channel, 16).iter().all(|c| c.status.is_success()));
        }
        for (i, buffer) in buffers.iter().enumerate() {
            let mut back = vec![0u8; io_len];
            buffer.read_at(0, &mut back).expect("read");
            assert_eq!(
                back,
                pattern((i as u64 + round) as u8, io_len),
                "round {round} io {i}"
            );
        }
    }
    let [mut first, second] = channels;
    drop(second);
    first.write_zeroes(0, 0, 8).expect("write zeroes");
    first.flush(1, 0, 1).expect("flush");
    assert!(wait(&mut first, 2).iter().all(|c| c.status.is_success()));
    first.read(0, 0, 8, &[iov(&mut buffers[0])]).expect("read");
    assert!(wait(&mut first, 1)[0].status.is_success());
    let mut back = vec![1u8; io_len];
    buffers[0].read_at(0, &mut back).expect("read");
    assert_eq!(back, vec![0u8; io_len], "write zeroes");

    // The target goes away: I/O fails, the bdev is removed.
    drop(target);
    first
        .read(0, 0, 8, &[iov(&mut buffers[0])])
        .expect("submit");
    let done = wait(&mut first, 1);
    assert_eq!(done[0].status, IoStatus::Failed, "{done:?}");
    assert_eq!(module.poll_admin(&registry), 1);
    assert!(desc.is_removed());
}

#[test]
fn packed_rings_against_pollux_vhost() {
    round_trip(true);
}

#[test]
fn split_rings_against_pollux_vhost() {
    round_trip(false);
}
