//! Driver cost per 4 KiB read, submit + complete, against the software model answering at
//! once (the model executes the command inside the SQ doorbell write).
//!
//! - `read_4k_qd1/model_copies_data`: the whole loop, including the model's 4 KiB copy;
//! - `read_4k_qd1/model_no_data`: the model skips the data copy, leaving the driver's work
//!   (SQE build, PRP, doorbells, CQE validation) plus the model's decode and CQE post;
//! - `read_4k_batch32/model_no_data`: 32 submits, one SQ doorbell, one reap: per-I/O cost
//!   with doorbells amortised.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_nvme::{Controller, ControllerOptions, IoVec, QueuePairOptions};

fn bench(c: &mut Criterion) {
    let mem = DmaMemory::with_memmap(
        DmaConfig {
            size_mib: 16,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory");
    let model = ModelController::new(
        Arc::clone(&mem),
        ModelOptions {
            namespaces: vec![(1 << 16, 512)],
            ..ModelOptions::default()
        },
    )
    .expect("model");
    let mut ctrlr = Controller::new(
        Arc::clone(&model),
        Arc::clone(&mem),
        ControllerOptions::default(),
    )
    .expect("controller");
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 256,
            depth: 64,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let buf = mem.alloc(32 * 4096, 4096, None).expect("buffer");
    let iovs: Vec<IoVec> = (0..32)
        .map(|i| IoVec::from_dma_buffer(&buf, i * 4096, 4096).expect("iov"))
        .collect();

    let mut group = c.benchmark_group("read_4k_qd1");
    group.throughput(Throughput::Elements(1));
    for (name, copy) in [("model_copies_data", true), ("model_no_data", false)] {
        model.set_data_transfer(copy);
        group.bench_function(name, |b| {
            b.iter(|| {
                qpair.submit_read(&ns, 1, 8, 8, &iovs[..1]).expect("submit");
                let mut done = 0;
                while done == 0 {
                    done = qpair
                        .process_completions(32, |_, cpl| assert!(cpl.status.is_success()))
                        .expect("poll");
                }
            })
        });
    }
    group.finish();

    model.set_data_transfer(false);
    let mut group = c.benchmark_group("read_4k_batch32");
    group.throughput(Throughput::Elements(32));
    group.bench_function("model_no_data", |b| {
        b.iter(|| {
            for (i, iov) in iovs.iter().enumerate() {
                qpair
                    .submit_read(&ns, i as u64, 8 * i as u64, 8, std::slice::from_ref(iov))
                    .expect("submit");
            }
            let mut done = 0;
            while done < 32 {
                done += qpair
                    .process_completions(32, |_, cpl| assert!(cpl.status.is_success()))
                    .expect("poll");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
