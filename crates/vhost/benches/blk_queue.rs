//! Device-side cost of the vhost-user-blk data path on one core, without a front-end process:
//! a driver written in the benchmark keeps `QD` 4 KiB reads in flight on a split ring of 256
//! entries, each an indirect table of three descriptors (header, data, status: what Linux's
//! virtio_blk sends), against a null bdev; the queue is polled as its reactor poller would.
//! Prints requests per second, with dirty-page logging off (the normal case) and on (while a
//! live migration runs: every read buffer, status byte and used entry marked in the log).
//! Run: `cargo bench -p pollux-vhost --bench blk_queue`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_bdev::modules::null::{self, NullOptions};
use pollux_bdev::BdevRegistry;
use pollux_vhost::blk::{BlkDevice, BlkQueue, BlkQueueParts};
use pollux_vhost::dirty_log::DirtyLog;
use pollux_vhost::guest_memory::{GuestMemory, RegionSpec};
use pollux_vhost::queue::{VirtQueue, VringAddrs, VringBase};
use pollux_virtio::blk::{RequestHeader, VIRTIO_BLK_T_IN};
use pollux_virtio::ring::{
    SplitDesc, SplitLayout, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

const QSIZE: u16 = 256;
const MEM_BYTES: u64 = 8 << 20;
const UVA: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const TABLES: u64 = 0x10000;
const HEADERS: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const DATA: u64 = 0x100000;

/// Runs `qd` requests in flight for `seconds`, or for exactly `polls` polls when given (a
/// deterministic count for callgrind). Returns (requests per second, requests completed).
fn run(qd: u16, seconds: u64, logging: bool, polls_limit: Option<u64>) -> (f64, u64) {
    let file = tempfile_unlinked("guest");
    file.set_len(MEM_BYTES).expect("size");
    let spec = RegionSpec {
        gpa: 0,
        size: MEM_BYTES,
        uva: UVA,
        mmap_offset: 0,
    };
    let mem = Arc::new(GuestMemory::from_regions(&[(spec, &file)], false).expect("map"));
    let registry = BdevRegistry::new();
    null::create(
        &registry,
        NullOptions {
            name: "Null0".into(),
            uuid: None,
            num_blocks: 1 << 20,
            block_size_bytes: 512,
            required_alignment_bytes: 1,
        },
    )
    .expect("null bdev");
    let desc = registry.open("Null0", true, None).expect("open");
    let dev = Arc::new(BlkDevice::new(&desc, false, false, 1));
    let addrs = VringAddrs {
        desc_uva: UVA + DESC,
        avail_uva: UVA + AVAIL,
        used_uva: UVA + USED,
    };
    let mut hint = 0;
    // Every head gets its own indirect table: header, 4 KiB of data, status.
    for head in 0..QSIZE {
        let h = u64::from(head);
        let table = TABLES + 48 * h;
        let header = RequestHeader {
            request_type: VIRTIO_BLK_T_IN,
            reserved: 0,
            sector: 8 * h,
        };
        mem.write_bytes(HEADERS + 16 * h, &header.to_le_bytes(), &mut hint)
            .expect("header");
        let entries = [
            SplitDesc {
                addr: HEADERS + 16 * h,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: 1,
            },
            SplitDesc {
                addr: DATA + 4096 * h,
                len: 4096,
                flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                next: 2,
            },
            SplitDesc {
                addr: STATUS + h,
                len: 1,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            },
        ];
        for (i, e) in entries.iter().enumerate() {
            mem.write_bytes(table + 16 * i as u64, &e.to_le_bytes(), &mut hint)
                .expect("table");
        }
        let d = SplitDesc {
            addr: table,
            len: 48,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        };
        mem.write_bytes(DESC + 16 * h, &d.to_le_bytes(), &mut hint)
            .expect("desc");
    }
    let layout = SplitLayout::new(QSIZE).expect("layout");
    // No interrupts: the driver polls the used ring (as bdevperf over virtio-user does).
    mem.write_bytes(AVAIL, &1u16.to_le_bytes(), &mut hint)
        .expect("flags");
    let mut avail_idx = 0u16;
    for head in 0..qd {
        mem.write_bytes(
            AVAIL + layout.avail_entry_offset(avail_idx),
            &head.to_le_bytes(),
            &mut hint,
        )
        .expect("avail");
        avail_idx = avail_idx.wrapping_add(1);
    }
    mem.write_bytes(AVAIL + 2, &avail_idx.to_le_bytes(), &mut hint)
        .expect("idx");
    let queue =
        VirtQueue::new(&mem, QSIZE, addrs, VringBase::default(), false, false).expect("queue");
    let channel = desc.channel(u32::from(QSIZE)).expect("channel");
    // One bit per 4 KiB page of guest memory, in a file as QEMU's memfd.
    let log = logging.then(|| {
        let log_file = tempfile_unlinked("log");
        let log_bytes = MEM_BYTES / 4096 / 8;
        log_file.set_len(log_bytes).expect("log size");
        Arc::new(DirtyLog::map(&log_file, log_bytes, 0).expect("map log"))
    });
    let mut q = BlkQueue::new(BlkQueueParts {
        index: 0,
        dev,
        queue,
        addrs,
        mem: mem.clone(),
        channel,
        call: None,
        inflight: None,
        log: log.clone(),
    });
    let mut used_seen = 0u16;
    let mut completed = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut polls = 0u64;
    loop {
        q.poll(true);
        polls += 1;
        let used_idx =
            u16::from_le_bytes(mem.read_array::<2>(USED + 2, &mut hint).expect("used idx"));
        let fresh = used_idx.wrapping_sub(used_seen);
        if fresh > 0 {
            for i in 0..fresh {
                let slot = USED + layout.used_entry_offset(used_seen.wrapping_add(i));
                let id = u32::from_le_bytes(mem.read_array::<4>(slot, &mut hint).expect("id"));
                mem.write_bytes(
                    AVAIL + layout.avail_entry_offset(avail_idx),
                    &(id as u16).to_le_bytes(),
                    &mut hint,
                )
                .expect("avail");
                avail_idx = avail_idx.wrapping_add(1);
            }
            mem.write_bytes(AVAIL + 2, &avail_idx.to_le_bytes(), &mut hint)
                .expect("idx");
            used_seen = used_idx;
            completed += u64::from(fresh);
        }
        match polls_limit {
            Some(limit) if polls >= limit => break,
            Some(_) => {}
            None if polls.is_multiple_of(1024) && Instant::now() >= deadline => break,
            None => {}
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(q.stats().errors, 0, "every request succeeded");
    if let Some(log) = &log {
        let data_page = DATA / 4096;
        assert!(log.is_dirty(data_page), "read buffers logged");
        assert_eq!(log.pages_outside(), 0);
    }
    (completed as f64 / elapsed, completed)
}

fn tempfile_unlinked(what: &str) -> std::fs::File {
    let path =
        std::env::temp_dir().join(format!("pollux-vhost-bench-{what}-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("temp file");
    std::fs::remove_file(&path).expect("unlink");
    file
}

fn main() {
    let seconds = std::env::var("POLLUX_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // POLLUX_BENCH_POLLS=N: QD 128 (or POLLUX_BENCH_QD), logging off, exactly N polls, for
    // instruction counts (`valgrind --tool=callgrind` at two values of N: the difference in
    // instructions over the difference in requests is the cost per request, setup excluded).
    if let Some(polls) = std::env::var("POLLUX_BENCH_POLLS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let qd = std::env::var("POLLUX_BENCH_QD")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(128);
        let (_, completed) = run(qd, 0, false, Some(polls));
        println!("blk_queue QD {qd}: {polls} polls, {completed} requests");
        return;
    }
    for qd in [1u16, 32, 128] {
        let (iops, _) = run(qd, seconds, false, None);
        println!("blk_queue split indirect 4KiB read null bdev QD {qd:>3}: {:>10.0} requests/s ({:.1} ns/request)", iops, 1e9 / iops);
        let (logged, _) = run(qd, seconds, true, None);
        println!("blk_queue split indirect 4KiB read null bdev QD {qd:>3}, dirty log on: {:>10.0} requests/s ({:.1} ns/request, {:.2}x of logging off)", logged, 1e9 / logged, logged / iops);
    }
}
