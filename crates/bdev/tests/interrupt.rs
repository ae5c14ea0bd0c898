//! Interrupt mode's wake-up fds, module by module: no event while idle, an event once a
//! completion waits for the owner's poll, none again after the owner drained it and reaped.
//! Correctness only: the waits are bounded loops, nothing is timed.

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use common::{dma, null_bdev, TestBuf};
use pollux_bdev::modules::{aio, malloc};
use pollux_bdev::{BdevChannel, BdevRegistry, IoCompletion, IoStatus};
use pollux_env::wake;

/// Waits (bounded) until `fd` is readable, draining it; the count it held.
fn wait_readable(fd: BorrowedFd<'_>) -> u64 {
    for _ in 0..5000 {
        let count = wake::drain(fd);
        if count > 0 {
            return count;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("the wake-up fd never turned readable");
}

/// Submits one 4 KiB read at block 0 outside any poll, expects the fd to announce it, then
/// reaps it and expects the fd to stay quiet.
fn check_one_read(channel: &mut BdevChannel, block_size: u64) {
    let fd = channel
        .interrupt_fd()
        .expect("the module has a wake-up fd")
        .try_clone_to_owned()
        .expect("dup");
    assert_eq!(wake::drain(fd.as_fd()), 0, "idle: no event");
    assert_eq!(channel.poll(|_, _| {}), 0);
    assert_eq!(wake::drain(fd.as_fd()), 0, "an idle poll raises no event");

    let mut data = TestBuf::new(8192, 0);
    let offset = data.bytes().as_ptr().align_offset(4096);
    let iov = [data.iov(offset, 4096)];
    channel
        .read(7, 0, 4096 / block_size, &iov)
        .expect("a free slot");
    // aio hands the iocb to the kernel at the next poll; malloc and null completed it already.
    let mut done: Vec<IoCompletion> = Vec::new();
    channel.poll(|_, completion| done.push(completion));
    if done.is_empty() {
        wait_readable(fd.as_fd());
        channel.poll(|_, completion| done.push(completion));
    } else {
        // A synchronous module signalled when the completion landed in the empty queue.
        assert!(
            wake::drain(fd.as_fd()) > 0,
            "the queued completion was announced"
        );
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].tag, 7);
    assert_eq!(done[0].status, IoStatus::Success);
    assert_eq!(channel.poll(|_, _| {}), 0);
    assert_eq!(wake::drain(fd.as_fd()), 0, "nothing left: no event");
}

#[test]
fn null_and_malloc_announce_completions_queued_in_submit() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0", 1024, 512, 1);
    let desc = registry.open("Null0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    check_one_read(&mut channel, 512);

    let memory = dma(8);
    malloc::create(
        &registry,
        &memory,
        malloc::MallocOptions::from_size_mib(Some("Malloc0".into()), 1, 512),
    )
    .expect("malloc bdev");
    let desc = registry.open("Malloc0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    check_one_read(&mut channel, 512);
}

#[test]
fn synchronous_modules_signal_once_per_batch() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0", 1024, 512, 1);
    let desc = registry.open("Null0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    let fd = channel
        .interrupt_fd()
        .expect("fd")
        .try_clone_to_owned()
        .expect("dup");
    let mut data = TestBuf::new(4096, 0);
    for tag in 0..4 {
        let iov = [data.iov(0, 512)];
        channel.read(tag, 0, 1, &iov).expect("slot");
    }
    assert_eq!(
        wake::drain(fd.as_fd()),
        1,
        "one event for the queue's empty -> non-empty transition"
    );
    assert_eq!(channel.poll(|_, _| {}), 4);
}

#[test]
fn aio_completions_signal_the_eventfd() {
    let path = std::env::temp_dir().join(format!("pollux-interrupt-aio-{}", std::process::id()));
    std::fs::write(&path, vec![0x5au8; 1 << 20]).expect("test file");
    let registry = BdevRegistry::new();
    let info = aio::create(&registry, aio::AioOptions::new("Aio0", &path)).expect("aio bdev");
    let desc = registry.open("Aio0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    check_one_read(&mut channel, u64::from(info.block_size_bytes));
    drop(channel);
    let _ = std::fs::remove_file(&path);
}
