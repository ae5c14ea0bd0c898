//! NVMe completion handling in the driver, against the software controller model acting as a
//! hostile device: completion entries with any command id, SQ id, SQ head, status and phase,
//! between real commands the model executes when told.
//!
//! Invariants: a completion handed to the submitter carries a tag it submitted and still had
//! outstanding (no tag completes twice, none appears from nowhere); a bad entry is an error
//! (the controller resets), never a panic; once the device behaves, every submitted request
//! completes exactly once (executed, or failed back by the reset), none is lost.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pollux_env::dma::{DmaBuffer, DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_nvme::{Controller, ControllerOptions, IoVec, QueuePairOptions};

#[derive(Debug, Arbitrary)]
enum Op {
    /// The driver submits a read or a write of one block.
    Submit { write: bool, lba: u8 },
    /// The device executes what it was given.
    Execute,
    /// The device writes a raw entry into the I/O completion queue.
    Raw { entry: [u8; 16], stale_phase: bool },
    /// The device writes a raw entry into the admin completion queue.
    RawAdmin { entry: [u8; 16] },
    /// The driver polls its I/O queue pair.
    Poll,
    /// The driver polls the admin queue (where a reset after a bad entry happens).
    AdminPoll,
}

fn dma() -> &'static Arc<DmaMemory> {
    static DMA: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    DMA.get_or_init(|| {
        DmaMemory::with_memmap(
            DmaConfig {
                size_mib: 32,
                no_huge: true,
            },
            Arc::new(MemMap::new()),
        )
        .expect("DMA memory")
    })
}

fn buffer() -> &'static DmaBuffer {
    static BUF: OnceLock<DmaBuffer> = OnceLock::new();
    BUF.get_or_init(|| dma().alloc(4096, 4096, None).expect("buffer"))
}

const MAX_OPS: usize = 256;

fuzz_target!(|ops: Vec<Op>| {
    let mem = dma();
    let model = ModelController::new(Arc::clone(mem), ModelOptions::default()).expect("model");
    let mut ctrlr = Controller::new(
        Arc::clone(&model),
        Arc::clone(mem),
        ControllerOptions::default(),
    )
    .expect("controller init");
    let ns = ctrlr.namespace(1).expect("namespace 1").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 16,
            depth: 8,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let qid = qpair.qid();
    model.set_auto_execute(false);
    let iov = IoVec::from_dma_buffer(buffer(), 0, 512).expect("iov");
    let mut next_tag = 0u64;
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let complete = |outstanding: &mut BTreeSet<u64>, tag: u64| {
        assert!(
            outstanding.remove(&tag),
            "tag {tag} completed but not outstanding"
        );
    };
    for op in ops.iter().take(MAX_OPS) {
        match op {
            Op::Submit { write, lba } => {
                let tag = next_tag;
                let submitted = if *write {
                    qpair.submit_write(&ns, tag, u64::from(*lba), 1, &[iov])
                } else {
                    qpair.submit_read(&ns, tag, u64::from(*lba), 1, &[iov])
                };
                if submitted.is_ok() {
                    outstanding.insert(tag);
                    next_tag += 1;
                }
            }
            Op::Execute => model.step(),
            Op::Raw { entry, stale_phase } => model.post_raw_entry(qid, *entry, *stale_phase),
            Op::RawAdmin { entry } => model.post_raw_entry(0, *entry, false),
            Op::Poll => {
                let _ = qpair.process_completions(16, |tag, _| complete(&mut outstanding, tag));
            }
            Op::AdminPoll => {
                let _ = ctrlr.process_admin_completions();
            }
        }
    }
    // The device behaves from now on: everything submitted completes, exactly once.
    model.set_auto_execute(true);
    for _ in 0..1000 {
        if outstanding.is_empty() {
            break;
        }
        model.step();
        let _ = ctrlr.process_admin_completions();
        if qpair
            .process_completions(64, |tag, _| complete(&mut outstanding, tag))
            .is_err()
            && qpair.in_flight() == 0
        {
            break;
        }
    }
    assert!(
        outstanding.is_empty(),
        "requests never completed: {outstanding:?} (in flight in the driver: {})",
        qpair.in_flight()
    );
});
