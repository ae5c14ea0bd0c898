//! The virtio_blk bdev against Pollux's own vhost-user-blk target (`apps/pollux-vhost`), run
//! as a separate process over a malloc bdev; in poll mode, and in interrupt mode on both
//! sides (the target with `--interrupt-mode`, the initiator waiting on its channels' call
//! fds whenever a poll hands nothing out: a lost wake-up on either side stalls the test).
//!
//! The binary is looked up in `$POLLUX_VHOST`, else next to this test's target directory
//! (`<target>/<profile>/pollux-vhost`); build it first (`cargo build --workspace --bins`,
//! which scripts/test.sh does). A missing binary fails the test with that instruction.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{dma, iov};
use pollux_bdev::{BdevChannel, BdevRegistry, IoCompletion, IoStatus};
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
    fn start(test: &str, packed_ring: bool, interrupt_mode: bool) -> Self {
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
        let mut command = Command::new(workspace_binary("pollux-vhost"));
        if interrupt_mode {
            command.arg("--interrupt-mode");
        }
        let child = command
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

/// How a test waits for its completions: polling, or (interrupt mode) polling until a poll
/// hands nothing out, then waiting for the channel's call fd before polling again.
struct Waiter {
    fds: Option<Vec<OwnedFd>>,
}

impl Waiter {
    fn new(channels: &[BdevChannel], interrupt_mode: bool) -> Self {
        let fds = interrupt_mode.then(|| {
            channels
                .iter()
                .map(|c| {
                    c.interrupt_fd()
                        .expect("virtio_blk channels have a wake-up fd")
                        .try_clone_to_owned()
                        .expect("dup")
                })
                .collect()
        });
        Self { fds }
    }

    /// `count` completions of `channels[index]` (10 s at most).
    fn wait(&self, channels: &mut [BdevChannel], index: usize, count: usize) -> Vec<IoCompletion> {
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while done.len() < count {
            let handed = channels[index].poll(|_, completion| done.push(completion));
            if handed > 0 || done.len() >= count {
                continue;
            }
            if let Some(fds) = &self.fds {
                // The poll found nothing: an interrupt-mode owner sleeps here, and the fd
                // must turn readable once a completion is due.
                while pollux_env::wake::drain(fds[index].as_fd()) == 0 {
                    assert!(
                        Instant::now() < deadline,
                        "no wake-up: {} of {count} I/Os completed in 10 s",
                        done.len()
                    );
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} I/Os completed in 10 s",
                done.len()
            );
        }
        done
    }
}

/// Writes and reads back through two channels (two queues), many times over each ring, then
/// write zeroes, flush and the loss of the target.
fn round_trip(packed_ring: bool, interrupt_mode: bool) {
    let test = match (packed_ring, interrupt_mode) {
        (false, false) => "split",
        (true, false) => "packed",
        (false, true) => "split-intr",
        (true, true) => "packed-intr",
    };
    let target = Target::start(test, packed_ring, interrupt_mode);
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
    let waiter = Waiter::new(&channels, interrupt_mode);
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
        for index in 0..2 {
            let done = waiter.wait(&mut channels, index, 16);
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
        for index in 0..2 {
            let done = waiter.wait(&mut channels, index, 16);
            assert!(done.iter().all(|c| c.status.is_success()));
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
    let [first, second] = channels;
    drop(second);
    let mut channels = [first];
    let first = 0;
    channels[first].write_zeroes(0, 0, 8).expect("write zeroes");
    channels[first].flush(1, 0, 1).expect("flush");
    assert!(waiter
        .wait(&mut channels, first, 2)
        .iter()
        .all(|c| c.status.is_success()));
    channels[first]
        .read(0, 0, 8, &[iov(&mut buffers[0])])
        .expect("read");
    assert!(waiter.wait(&mut channels, first, 1)[0].status.is_success());
    let mut back = vec![1u8; io_len];
    buffers[0].read_at(0, &mut back).expect("read");
    assert_eq!(back, vec![0u8; io_len], "write zeroes");

    // The target goes away: I/O fails, the bdev is removed. In interrupt mode nothing
    // completes on the ring, so the admin poller's finding (it runs every 10 ms in an app)
    // is what wakes the channel.
    drop(target);
    channels[first]
        .read(0, 0, 8, &[iov(&mut buffers[0])])
        .expect("submit");
    if interrupt_mode {
        assert_eq!(module.poll_admin(&registry), 1);
    }
    let done = waiter.wait(&mut channels, first, 1);
    assert_eq!(done[0].status, IoStatus::Failed, "{done:?}");
    if !interrupt_mode {
        assert_eq!(module.poll_admin(&registry), 1);
    }
    assert!(desc.is_removed());
}

#[test]
fn packed_rings_against_pollux_vhost() {
    round_trip(true, false);
}

#[test]
fn split_rings_against_pollux_vhost() {
    round_trip(false, false);
}

#[test]
fn packed_rings_against_pollux_vhost_in_interrupt_mode() {
    round_trip(true, true);
}

#[test]
fn split_rings_against_pollux_vhost_in_interrupt_mode() {
    round_trip(false, true);
}
