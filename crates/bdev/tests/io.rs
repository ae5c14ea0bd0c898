//! The I/O path on the null and malloc bdevs: every I/O type, scatter-gather, the checks
//! that complete with a status, backpressure, statistics.

mod common;

use common::{dma, reap, TestBuf};
use pollux_bdev::modules::malloc;
use pollux_bdev::{BdevError, BdevRegistry, IoStatus, IoType};

fn null_bdev(registry: &BdevRegistry, name: &str, align: u32) {
    common::null_bdev(registry, name, 1024, 512, align);
}

#[test]
fn null_completes_supported_types_and_refuses_the_others() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0", 1);
    let desc = registry.open("Null0", true, None).expect("open");
    let mut channel = desc.channel(16).expect("channel");
    let mut buf = TestBuf::new(4096, 0xab);
    let iov = [buf.iov(0, 4096)];
    channel.read(1, 0, 8, &iov).expect("slot");
    channel.write(2, 8, 8, &iov).expect("slot");
    channel.write_zeroes(3, 0, 1024).expect("slot");
    channel.reset(4).expect("slot");
    channel.flush(5, 0, 1).expect("slot");
    channel.unmap(6, 0, 1).expect("slot");
    // Nothing completes inside submit: all six wait for the poll.
    assert_eq!(channel.outstanding(), 6);
    let done = reap(&mut channel, 6);
    let statuses: Vec<(u64, IoType, IoStatus)> =
        done.iter().map(|c| (c.tag, c.io_type, c.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (1, IoType::Read, IoStatus::Success),
            (2, IoType::Write, IoStatus::Success),
            (3, IoType::WriteZeroes, IoStatus::Success),
            (4, IoType::Reset, IoStatus::Success),
            (5, IoType::Flush, IoStatus::Unsupported),
            (6, IoType::Unmap, IoStatus::Unsupported),
        ]
    );
    assert!(buf.bytes().iter().all(|&b| b == 0xab), "null moves no data");
    assert_eq!(channel.outstanding(), 0);
    assert!(!desc.supports(IoType::Flush));
    assert!(desc.supports(IoType::Read));
}

#[test]
fn malloc_moves_data_for_every_type() {
    let memory = dma(8);
    let registry = BdevRegistry::new();
    let info = malloc::create(
        &registry,
        &memory,
        malloc::MallocOptions::from_size_mib(None, 1, 4096),
    )
    .expect("malloc bdev");
    assert_eq!(info.name, "Malloc0");
    assert_eq!(info.num_blocks, 256);
    assert_eq!(info.supported_io_types, IoType::ALL.to_vec());
    let desc = registry.open("Malloc0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");

    let mut data = TestBuf::new(8192, 0);
    for (i, byte) in data.bytes_mut().iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let iov = [data.iov(0, 8192)];
    channel.write(1, 10, 2, &iov).expect("slot");
    assert_eq!(reap(&mut channel, 1)[0].status, IoStatus::Success);

    let mut back = TestBuf::new(8192, 0xff);
    let iov = [back.iov(0, 8192)];
    channel.read(2, 10, 2, &iov).expect("slot");
    assert_eq!(reap(&mut channel, 1)[0].status, IoStatus::Success);
    assert_eq!(back.bytes(), data.bytes());

    // Fresh blocks read as zeroes.
    channel.read(3, 0, 2, &iov).expect("slot");
    reap(&mut channel, 1);
    assert!(back.bytes().iter().all(|&b| b == 0));

    channel.write_zeroes(4, 10, 1).expect("slot");
    channel.unmap(5, 11, 1).expect("slot");
    channel.flush(6, 0, 256).expect("slot");
    channel.reset(7).expect("slot");
    let done = reap(&mut channel, 4);
    assert!(
        done.iter().all(|c| c.status == IoStatus::Success),
        "{done:?}"
    );
    channel.read(8, 10, 2, &iov).expect("slot");
    reap(&mut channel, 1);
    assert!(back.bytes().iter().all(|&b| b == 0), "zeroed and unmapped");

    let stats = channel.stats();
    assert_eq!(stats.per_type[IoType::Read.index()].ops, 3);
    assert_eq!(stats.per_type[IoType::Read.index()].bytes, 3 * 8192);
    assert_eq!(stats.per_type[IoType::Write.index()].ops, 1);
    assert_eq!(stats.per_type[IoType::WriteZeroes.index()].bytes, 4096);
    assert_eq!(stats.histogram.count(), 8);
    assert!(stats.latency_ticks_max >= stats.latency_ticks_min);
    // An open channel publishes its counts once it idles (after 1024 idle polls at most),
    // so the bdev's totals (bdev_get_iostat) include live channels.
    for _ in 0..1024 {
        assert_eq!(channel.poll(|_, _| {}), 0);
    }
    assert_eq!(
        registry.stats("Malloc0").expect("stats").ops_total(),
        8,
        "an idle open channel's stats are in the bdev's"
    );
    let mut second = desc.channel(4).expect("second channel");
    second.flush(9, 0, 1).expect("slot");
    reap(&mut second, 1);
    drop(second);
    assert_eq!(
        registry.stats("Malloc0").expect("stats").ops_total(),
        9,
        "a closed channel's final counts replace its snapshot, never counted twice"
    );
    drop(channel);
    let bdev_stats = registry.stats("Malloc0").expect("stats");
    assert_eq!(
        bdev_stats.ops_total(),
        9,
        "closed channels' stats add to the bdev's"
    );
}

#[test]
fn iovec_splits_cross_block_boundaries() {
    let memory = dma(4);
    let registry = BdevRegistry::new();
    malloc::create(
        &registry,
        &memory,
        malloc::MallocOptions {
            name: Some("M".into()),
            uuid: None,
            num_blocks: 64,
            block_size_bytes: 512,
        },
    )
    .expect("malloc");
    let desc = registry.open("M", true, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    let mut data = TestBuf::new(2048, 0);
    for (i, byte) in data.bytes_mut().iter_mut().enumerate() {
        *byte = (i * 7 % 256) as u8;
    }
    // Four blocks written from pieces of 100, 924 (ends mid block 1), 1000 and 24 bytes.
    let iovs = [
        data.iov(0, 100),
        data.iov(100, 924),
        data.iov(1024, 1000),
        data.iov(2024, 24),
    ];
    channel.write(1, 3, 4, &iovs).expect("slot");
    assert_eq!(reap(&mut channel, 1)[0].status, IoStatus::Success);
    // Read back into 1 + 2047 bytes, and into one piece, and compare.
    let mut split = TestBuf::new(2048, 0);
    let iovs = [split.iov(0, 1), split.iov(1, 2047)];
    channel.read(2, 3, 4, &iovs).expect("slot");
    let mut whole = TestBuf::new(2048, 0);
    let iov = [whole.iov(0, 2048)];
    channel.read(3, 3, 4, &iov).expect("slot");
    assert!(reap(&mut channel, 2).iter().all(|c| c.status.is_success()));
    assert_eq!(split.bytes(), data.bytes());
    assert_eq!(whole.bytes(), data.bytes());
    // A single block read from the middle sees the right slice.
    let mut one = TestBuf::new(512, 0);
    let iov = [one.iov(0, 512)];
    channel.read(4, 4, 1, &iov).expect("slot");
    reap(&mut channel, 1);
    assert_eq!(one.bytes(), &data.bytes()[512..1024]);
}

#[test]
fn bounds_length_alignment_and_read_only_complete_with_a_status() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Aligned", 4096);
    let desc = registry.open("Aligned", true, None).expect("open");
    let mut channel = desc.channel(16).expect("channel");
    let mut buf = TestBuf::new(3 * 4096, 0);
    let base = buf.iov(0, 1).addr();
    let aligned_offset = (4096 - (base % 4096) as usize) % 4096;
    let good = [buf.iov(aligned_offset, 512)];
    let misaligned = [buf.iov(aligned_offset + 8, 512)];
    channel.read(1, 1023, 1, &good).expect("slot"); // last block: fine
    channel.read(2, 1024, 1, &good).expect("slot"); // one past the end
    channel.read(3, 1023, 2, &good).expect("slot"); // runs past the end
    channel.read(4, u64::MAX, 2, &good).expect("slot"); // overflows
    channel.read(5, 0, 0, &[]).expect("slot"); // zero blocks
    channel.read(6, 0, 2, &good).expect("slot"); // 512 bytes for 1024
    channel.read(7, 0, 1, &misaligned).expect("slot");
    channel.write_zeroes(8, 1020, 5).expect("slot");
    let done = reap(&mut channel, 8);
    let statuses: Vec<IoStatus> = done.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        vec![
            IoStatus::Success,
            IoStatus::OutOfRange,
            IoStatus::OutOfRange,
            IoStatus::OutOfRange,
            IoStatus::OutOfRange,
            IoStatus::LengthMismatch,
            IoStatus::Misaligned,
            IoStatus::OutOfRange,
        ]
    );
    assert_eq!(channel.stats().per_type[IoType::Read.index()].errors, 6);
    assert!(IoStatus::Misaligned.to_string().contains("alignment"));

    let read_only = registry.open("Aligned", false, None).expect("open ro");
    let mut ro_channel = read_only.channel(4).expect("channel");
    ro_channel.write(1, 0, 1, &good).expect("slot");
    ro_channel.write_zeroes(2, 0, 1).expect("slot");
    ro_channel.read(3, 0, 1, &good).expect("slot");
    let done = reap(&mut ro_channel, 3);
    assert_eq!(done[0].status, IoStatus::ReadOnly);
    assert_eq!(done[1].status, IoStatus::ReadOnly);
    assert_eq!(done[2].status, IoStatus::Success);
}

#[test]
fn full_channel_hands_the_request_back() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0", 1);
    let desc = registry.open("Null0", false, None).expect("open");
    let mut channel = desc.channel(2).expect("channel");
    channel.reset(1).expect("slot");
    channel.reset(2).expect("slot");
    let full = channel.reset(3);
    assert!(
        matches!(full, Err(BdevError::QueueFull { queue_depth: 2 })),
        "{full:?}"
    );
    // Completions can resubmit from inside the poll, through the channel they get.
    let mut resubmitted = 0;
    channel.poll(|channel, completion| {
        assert!(completion.status.is_success());
        channel
            .reset(10 + completion.tag)
            .expect("a slot was freed");
        resubmitted += 1;
    });
    assert_eq!(resubmitted, 2);
    let done = reap(&mut channel, 2);
    assert_eq!(done[0].tag, 11);
    assert!(matches!(
        desc.channel(0),
        Err(BdevError::BadQueueDepth { queue_depth: 0, .. })
    ));
    assert!(matches!(
        desc.channel(100_000),
        Err(BdevError::BadQueueDepth { .. })
    ));
}
