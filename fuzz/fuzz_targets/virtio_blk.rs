//! The vhost-user-blk data path (`pollux_vhost::blk::BlkQueue`) against a hostile driver:
//! split or packed rings, any chains, any virtio-blk request headers (reads, writes, flush,
//! discard and write-zeroes segments, GET_ID, unknown types), status bytes anywhere, the driver
//! rewriting memory between polls.
//!
//! The bdev under it is the target's own checker: every buffer the queue hands the bdev layer
//! must translate back into the guest's memory (zero copy never reaches outside what the guest
//! gave), and every request it submits completes (the bdev layer checks each slot completes
//! once). After the driver stops, the queue drains: nothing stays in flight.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pollux_bdev::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use pollux_bdev::{BdevError, BdevInfo, BdevRegistry, BdevSpec, IoStatus, IoType};
use pollux_fuzz::{fresh_guest, GuestWrite, RingPlacement};
use pollux_vhost::blk::{BlkDevice, BlkQueue, BlkQueueParts};
use pollux_vhost::guest_memory::GuestMemory;
use pollux_vhost::queue::VirtQueue;

#[derive(Debug, Arbitrary)]
struct Input {
    ring: RingPlacement,
    packed: bool,
    readonly: bool,
    memory: Vec<GuestWrite>,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Poll,
    Driver(GuestWrite),
}

struct Checker {
    mem: Arc<GuestMemory>,
}

struct CheckerChannel {
    mem: Arc<GuestMemory>,
}

impl BdevBackend for Checker {
    fn module_name(&self) -> &'static str {
        "fuzz_checker"
    }

    fn supports(&self, io_type: IoType) -> bool {
        io_type != IoType::Reset
    }

    fn create_channel(&self, _queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(CheckerChannel {
            mem: self.mem.clone(),
        }))
    }

    fn write_config(&self, _info: &BdevInfo) -> serde_json::Value {
        serde_json::Value::Null
    }
}

impl BackendChannel for CheckerChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        for iov in io.iovs {
            assert!(
                self.mem
                    .host_to_gpa(iov.addr(), iov.len_bytes() as u64)
                    .is_some(),
                "{:?} buffer {iov:?} is not guest memory",
                io.io_type
            );
        }
        done.complete(io.slot, IoStatus::Success);
    }
}

const MAX_OPS: usize = 128;

fuzz_target!(|input: Input| {
    let mem = fresh_guest(&input.memory);
    let registry = BdevRegistry::new();
    registry
        .register(
            BdevSpec {
                name: "Fuzz0".to_string(),
                aliases: Vec::new(),
                uuid: None,
                block_size_bytes: 512,
                num_blocks: 1 << 16,
                required_alignment_bytes: 1,
                write_cache: true,
            },
            Arc::new(Checker { mem: mem.clone() }),
        )
        .expect("register");
    let desc = registry.open("Fuzz0", true, None).expect("open");
    let dev = Arc::new(BlkDevice::new(&desc, input.readonly, input.packed, 1));
    let addrs = input.ring.addrs();
    let Ok(queue) = VirtQueue::new(
        mem,
        input.ring.size(),
        addrs,
        pollux_vhost::queue::VringBase {
            num: input.ring.base,
        },
        input.packed,
        input.ring.event_idx,
    ) else {
        return;
    };
    let channel = desc.channel(u32::from(input.ring.size())).expect("channel");
    let mut blk = BlkQueue::new(BlkQueueParts {
        index: 0,
        dev,
        queue,
        addrs,
        mem: mem.clone(),
        channel,
        call: None,
        inflight: None,
        log: None,
    });
    for op in input.ops.iter().take(MAX_OPS) {
        match op {
            Op::Poll => {
                blk.poll(true);
            }
            Op::Driver(write) => write.apply(mem),
        }
    }
    // The driver stops offering: whatever was taken completes.
    for _ in 0..8 {
        blk.poll(false);
    }
    assert_eq!(blk.in_flight(), 0, "requests left in flight after draining");
});
