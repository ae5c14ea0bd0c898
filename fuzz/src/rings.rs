//! The device side of a virtqueue against a hostile driver: the split and packed ring targets.
//!
//! Invariants checked at every step:
//! - a chain handed out has a head below the queue size and at most queue-size descriptors
//!   (direct) or [`MAX_INDIRECT_DESCS`] (indirect): loops and endless tables are cut;
//! - a packed buffer id is never handed out while it is in flight, and an id the walker asks
//!   to return used after an error is not in flight (nothing completes twice);
//! - the device writes guest memory only inside the area it says it writes (the used ring,
//!   or the packed descriptor ring), whatever the driver put where.

use std::collections::BTreeSet;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use pollux_vhost::queue::{Desc, VirtQueue, VringBase, MAX_INDIRECT_DESCS};

use crate::{fresh_guest, snapshot, snapshot_gpa, GuestWrite, RingPlacement};

#[derive(Debug, Arbitrary)]
pub struct RingInput {
    pub ring: RingPlacement,
    pub memory: Vec<GuestWrite>,
    pub ops: Vec<RingOp>,
}

#[derive(Debug, Arbitrary)]
pub enum RingOp {
    /// The device takes the next chain.
    Pop,
    /// The device completes one of its in-flight chains.
    Complete { pick: u8, len: u32 },
    /// The device publishes what it completed.
    Publish,
    /// The driver writes guest memory meanwhile.
    Driver(GuestWrite),
}

/// Steps per input at most (an input is a few KiB at most anyway).
const MAX_OPS: usize = 256;

pub fn run(input: &RingInput, packed: bool) {
    let mem = fresh_guest(&input.memory);
    let size = input.ring.size();
    let base = VringBase {
        num: input.ring.base,
    };
    let Ok(mut queue) = VirtQueue::new(
        mem,
        size,
        input.ring.addrs(),
        base,
        packed,
        input.ring.event_idx,
    ) else {
        return;
    };
    let (area_gpa, area_len) = queue.device_written_area();
    let in_area = |gpa: u64| gpa >= area_gpa && gpa - area_gpa < area_len;
    let mut in_flight: Vec<u16> = Vec::new();
    let mut packed_ids: BTreeSet<u16> = BTreeSet::new();
    let mut chain: Vec<Desc> = Vec::new();
    for op in input.ops.iter().take(MAX_OPS) {
        if let RingOp::Driver(write) = op {
            write.apply(mem);
            continue;
        }
        let before = snapshot(mem);
        match op {
            RingOp::Pop => match queue.pop(mem, &mut chain) {
                None => {}
                Some(Ok(head)) => {
                    assert!(head < size, "head {head} of a queue of {size}");
                    let limit = usize::from(size).max(MAX_INDIRECT_DESCS as usize);
                    assert!(chain.len() <= limit, "chain of {} descriptors", chain.len());
                    if packed {
                        assert!(packed_ids.insert(head), "packed id {head} handed out twice");
                    }
                    in_flight.push(head);
                }
                Some(Err(error)) => {
                    if let Some(head) = error.head {
                        assert!(head < size, "error head {head} of a queue of {size}");
                        if packed {
                            assert!(
                                !packed_ids.contains(&head),
                                "id {head} to return used is in flight: {error:?}"
                            );
                        }
                        queue.push_used(head, 0);
                    }
                }
            },
            RingOp::Complete { pick, len } => {
                if !in_flight.is_empty() {
                    let head = in_flight.swap_remove(usize::from(*pick) % in_flight.len());
                    packed_ids.remove(&head);
                    queue.push_used(head, *len);
                }
            }
            RingOp::Publish => {
                queue.publish_used();
            }
            RingOp::Driver(_) => unreachable!("handled above"),
        }
        let after = snapshot(mem);
        if before == after {
            continue;
        }
        if let Some(index) =
            (0..before.len()).find(|&i| before[i] != after[i] && !in_area(snapshot_gpa(i)))
        {
            panic!(
                "the device wrote guest address {:#x}, outside its area [{area_gpa:#x}, +{area_len:#x}) ({op:?})",
                snapshot_gpa(index)
            );
        }
    }
}
