//! The virtio_blk bdev against a back-end nobody here wrote: qemu-storage-daemon's
//! vhost-user-blk export (Debian's `qemu-system-common`) over a raw image file.
//!
//! These tests are never skipped: without `qemu-storage-daemon` they fail and say how to
//! install it (`scripts/install-deps.sh --test`).

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{dma, iov, wait};
use pollux_bdev::{BdevRegistry, IoStatus, IoType, IoVec};
use pollux_cli::error_chain as chain;
use pollux_env::dma::{DmaBuffer, DmaMemory};
use pollux_testkit::qsd::{Export, ExportOptions};
use pollux_virtio::bdev::{AttachOptions, VirtioModule, DEFAULT_CONNECT_TIMEOUT};
use pollux_virtio::device::DeviceOptions;

const IMAGE_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 512;

fn export(tag: &str, num_queues: u16) -> Export {
    // Not waiting for the socket: the attach retries until the daemon listens.
    Export::spawn(
        &format!("virtio-{tag}"),
        ExportOptions {
            image_bytes: IMAGE_BYTES,
            num_queues: Some(num_queues),
            discard: true,
            writable: true,
        },
    )
}

struct Setup {
    daemon: Export,
    dma: Arc<DmaMemory>,
    registry: Arc<BdevRegistry>,
    module: VirtioModule,
}

fn setup(test: &str, num_queues: u16, vq_count: u16) -> Setup {
    let daemon = export(test, num_queues);
    let dma = dma(8);
    let registry = BdevRegistry::new();
    let module = VirtioModule::new();
    let info = module
        .attach_controller(
            &registry,
            &dma,
            AttachOptions {
                name: "VirtioBlk0".to_string(),
                traddr: daemon.socket().to_path_buf(),
                device: DeviceOptions {
                    vq_count,
                    vq_size: 128,
                    ..DeviceOptions::default()
                },
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            },
        )
        .unwrap_or_else(|error| {
            panic!("attach to {}: {}", daemon.socket().display(), chain(&error))
        });
    assert_eq!(
        info.name, "VirtioBlk0",
        "SPDK names the blk bdev exactly `name`"
    );
    assert_eq!(info.module, "virtio_blk");
    assert_eq!(info.block_size_bytes, BLOCK as u32);
    assert_eq!(
        info.num_blocks,
        IMAGE_BYTES / BLOCK,
        "size from the config space"
    );
    Setup {
        daemon,
        dma,
        registry,
        module,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn read_image(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("image");
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, offset).expect("read image");
    bytes
}

#[test]
fn data_written_through_pollux_is_in_the_image_and_the_image_reads_back() {
    let s = setup("data", 1, 1);
    let desc = s.registry.open("VirtioBlk0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    let len = 64 * 1024;
    let mut buffer = s.dma.alloc(len, 4096, None).expect("buffer");

    // Pollux -> image: 64 KiB at LBA 100.
    let written = pattern(7, len);
    buffer.write_at(0, &written).expect("fill");
    channel
        .write(1, 100, (len as u64) / BLOCK, &[iov(&mut buffer)])
        .expect("submit write");
    channel.flush(2, 0, 1).expect("submit flush");
    let done = wait(&mut channel, 2);
    assert!(
        done.iter().all(|c| c.status == IoStatus::Success),
        "{done:?}"
    );
    assert_eq!(read_image(s.daemon.image(), 100 * BLOCK, len), written);

    // Image -> Pollux: bytes put in the file at LBA 5000 read back through the bdev.
    let planted = pattern(99, len);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(s.daemon.image())
        .expect("image");
    file.write_all_at(&planted, 5000 * BLOCK).expect("plant");
    file.sync_all().expect("sync");
    buffer.fill(0, len, 0).expect("clear");
    channel
        .read(3, 5000, (len as u64) / BLOCK, &[iov(&mut buffer)])
        .expect("submit read");
    let done = wait(&mut channel, 1);
    assert_eq!(done[0].status, IoStatus::Success);
    let mut back = vec![0u8; len];
    buffer.read_at(0, &mut back).expect("read back");
    assert_eq!(back, planted);

    // Scatter-gather: two iovecs in one request, at the last blocks of the disk.
    let mut second = s.dma.alloc(4096, 4096, None).expect("buffer");
    buffer.write_at(0, &pattern(3, 4096)).expect("fill");
    second.write_at(0, &pattern(4, 4096)).expect("fill");
    let last = IMAGE_BYTES / BLOCK - 16;
    let iovs = [
        // SAFETY: as in `iov`; the first 4 KiB of `buffer`.
        unsafe { IoVec::new(buffer.as_mut_ptr(), 4096) },
        iov(&mut second),
    ];
    channel.write(4, last, 16, &iovs).expect("submit");
    assert_eq!(wait(&mut channel, 1)[0].status, IoStatus::Success);
    let image = read_image(s.daemon.image(), last * BLOCK, 8192);
    assert_eq!(&image[..4096], &pattern(3, 4096)[..]);
    assert_eq!(&image[4096..], &pattern(4, 4096)[..]);

    // A buffer outside the shared memory never reaches the back-end.
    let mut heap = vec![0u8; 512];
    // SAFETY: `heap` outlives the I/O (waited for below) and is not touched meanwhile.
    let outside = unsafe { IoVec::new(heap.as_mut_ptr(), heap.len()) };
    channel.read(5, 0, 1, &[outside]).expect("submit");
    assert_eq!(wait(&mut channel, 1)[0].status, IoStatus::Failed);
    drop(heap);

    drop(channel);
    drop(desc);
    s.module
        .detach_controller(&s.registry, "VirtioBlk0")
        .expect("detach");
    assert!(!s.registry.contains("VirtioBlk0"));
}

#[test]
fn two_channels_drive_two_queues_at_once() {
    let s = setup("mq", 2, 2);
    let desc = s.registry.open("VirtioBlk0", true, None).expect("open");
    let mut channels = [
        desc.channel(32).expect("channel 0"),
        desc.channel(32).expect("channel 1"),
    ];
    let third = desc.channel(32).expect_err("only two queues");
    let message = chain(&third);
    assert!(message.contains("all 2 virtqueues are in use"), "{message}");

    // 32 writes in flight on each queue, interleaved, then read everything back.
    let io_len = 4096usize;
    let mut buffers: Vec<DmaBuffer> = (0..64)
        .map(|_| s.dma.alloc(io_len, 4096, None).expect("buffer"))
        .collect();
    for (i, buffer) in buffers.iter_mut().enumerate() {
        buffer.write_at(0, &pattern(i as u8, io_len)).expect("fill");
        let lba = i as u64 * 8;
        let vec = iov(buffer);
        channels[i % 2]
            .write(i as u64, lba, 8, &[vec])
            .expect("submit");
    }
    for channel in &mut channels {
        let done = wait(channel, 32);
        assert!(done.iter().all(|c| c.status.is_success()), "{done:?}");
    }
    for (i, _) in buffers.iter().enumerate() {
        assert_eq!(
            read_image(s.daemon.image(), i as u64 * 8 * BLOCK, io_len),
            pattern(i as u8, io_len),
            "request {i}"
        );
    }
    // Reads on both queues.
    for (i, buffer) in buffers.iter_mut().enumerate() {
        buffer.fill(0, io_len, 0).expect("clear");
        let vec = iov(buffer);
        channels[(i + 1) % 2]
            .read(i as u64, i as u64 * 8, 8, &[vec])
            .expect("submit");
    }
    for channel in &mut channels {
        assert!(wait(channel, 32).iter().all(|c| c.status.is_success()));
    }
    for (i, buffer) in buffers.iter().enumerate() {
        let mut back = vec![0u8; io_len];
        buffer.read_at(0, &mut back).expect("read");
        assert_eq!(back, pattern(i as u8, io_len), "read {i}");
    }
    // A channel gone gives its queue back.
    let [first, mut second] = channels;
    drop(first);
    let mut again = desc.channel(8).expect("the queue came back to the pool");
    let mut buffer = s.dma.alloc(512, 4096, None).expect("buffer");
    again.read(0, 0, 1, &[iov(&mut buffer)]).expect("submit");
    assert!(wait(&mut again, 1)[0].status.is_success());
    second.read(0, 0, 1, &[iov(&mut buffer)]).expect("submit");
    assert!(wait(&mut second, 1)[0].status.is_success());
}

#[test]
fn flush_discard_and_write_zeroes() {
    let s = setup("discard", 1, 1);
    let desc = s.registry.open("VirtioBlk0", true, None).expect("open");
    for io_type in [IoType::Flush, IoType::Unmap, IoType::WriteZeroes] {
        assert!(desc.supports(io_type), "qemu offers {io_type}");
    }
    let mut channel = desc.channel(4).expect("channel");
    let len = 1 << 20;
    let mut buffer = s.dma.alloc(len, 4096, None).expect("buffer");
    buffer.fill(0, len, 0xa5).expect("fill");
    let lba = (4 << 20) / BLOCK;
    let blocks = len as u64 / BLOCK;
    channel
        .write(0, lba, blocks, &[iov(&mut buffer)])
        .expect("submit");
    channel
        .write(1, lba + 2 * blocks, blocks, &[iov(&mut buffer)])
        .expect("submit");
    assert!(wait(&mut channel, 2).iter().all(|c| c.status.is_success()));
    channel.flush(0, 0, 1).expect("flush");
    assert!(wait(&mut channel, 1)[0].status.is_success());
    let allocated = |path: &Path| std::fs::metadata(path).expect("stat").blocks() * 512;
    let before = allocated(s.daemon.image());
    assert!(
        before >= 2 * len as u64,
        "written data is allocated: {before}"
    );

    channel.unmap(0, lba, blocks).expect("discard");
    assert!(wait(&mut channel, 1)[0].status.is_success());
    channel.flush(0, 0, 1).expect("flush");
    assert!(wait(&mut channel, 1)[0].status.is_success());
    let after = allocated(s.daemon.image());
    assert!(
        after + len as u64 <= before,
        "discard punched a hole: {before} -> {after} bytes allocated"
    );
    assert_eq!(read_image(s.daemon.image(), lba * BLOCK, len), vec![0; len]);

    channel
        .write_zeroes(0, lba + 2 * blocks, blocks)
        .expect("write zeroes");
    assert!(wait(&mut channel, 1)[0].status.is_success());
    assert_eq!(
        read_image(s.daemon.image(), (lba + 2 * blocks) * BLOCK, len),
        vec![0; len]
    );
}

#[test]
fn a_killed_back_end_fails_outstanding_io_and_removes_the_bdev() {
    let s = setup("kill", 1, 1);
    let desc = s.registry.open("VirtioBlk0", true, None).expect("open");
    let mut channel = desc.channel(16).expect("channel");
    let mut buffers: Vec<DmaBuffer> = (0..16)
        .map(|_| s.dma.alloc(4096, 4096, None).expect("buffer"))
        .collect();
    // Stop the daemon so that the requests stay outstanding, hand them over, then kill it.
    s.daemon.kill("STOP");
    for (i, buffer) in buffers.iter_mut().enumerate() {
        let vec = iov(buffer);
        channel
            .read(i as u64, i as u64 * 8, 8, &[vec])
            .expect("submit");
    }
    // One poll publishes them (and kicks): they are on the ring now.
    let mut early = Vec::new();
    channel.poll(|_, c| early.push(c));
    assert!(early.is_empty(), "a stopped daemon completes nothing");
    s.daemon.kill("KILL");

    let done = wait(&mut channel, 16);
    assert!(
        done.iter().all(|c| c.status == IoStatus::Failed),
        "outstanding I/O fails clearly: {done:?}"
    );
    // New I/O fails too, and the admin poller removes the bdev.
    let vec = iov(&mut buffers[0]);
    channel.read(99, 0, 8, &[vec]).expect("submit");
    let next = wait(&mut channel, 1);
    assert!(
        matches!(next[0].status, IoStatus::Failed | IoStatus::Removed),
        "{next:?}"
    );
    assert_eq!(
        s.module.poll_admin(&s.registry),
        1,
        "one controller removed"
    );
    assert!(!s.registry.contains("VirtioBlk0"), "hot removed");
    assert!(desc.is_removed());
    assert!(s.module.controller_names().is_empty());
    let vec = iov(&mut buffers[1]);
    channel.read(100, 0, 8, &[vec]).expect("submit");
    assert_eq!(wait(&mut channel, 1)[0].status, IoStatus::Removed);
}

#[test]
fn attach_retries_until_the_back_end_listens_and_fails_clearly_when_it_never_does() {
    let dir = std::env::temp_dir().join(format!("pollux-virtio-nosock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let dma = dma(2);
    let registry = BdevRegistry::new();
    let module = VirtioModule::new();
    let started = Instant::now();
    let error = module
        .attach_controller(
            &registry,
            &dma,
            AttachOptions {
                name: "Nobody".to_string(),
                traddr: dir.join("absent.sock"),
                device: DeviceOptions::default(),
                connect_timeout: Duration::from_millis(300),
            },
        )
        .expect_err("nobody listens");
    assert!(started.elapsed() >= Duration::from_millis(300), "retried");
    let message = chain(&error);
    assert!(
        message.contains("could not connect to the vhost-user socket"),
        "{message}"
    );
    assert!(!registry.contains("Nobody"));
    let _ = std::fs::remove_dir_all(&dir);

    // The daemon starts after the attach began: the retry finds it.
    let daemon = export("late", 1);
    let info = module
        .attach_controller(
            &registry,
            &dma,
            AttachOptions {
                name: "Late0".to_string(),
                traddr: daemon.socket().to_path_buf(),
                device: DeviceOptions::default(),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            },
        )
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(info.num_blocks, IMAGE_BYTES / BLOCK);
    let saved = registry.save_config();
    let entry = &saved["config"][0];
    assert_eq!(entry["method"], "bdev_virtio_attach_controller");
    assert_eq!(
        entry["params"]["traddr"],
        daemon.socket().display().to_string()
    );
    assert_eq!(entry["params"]["dev_type"], "blk");
    assert_eq!(entry["params"]["trtype"], "user");
}
