//! A fixed number of 4 KiB reads through one queue pair against the software model, for
//! instruction counts under `valgrind --tool=callgrind` (stable on noisy machines, unlike
//! time). The model skips the data copy; batches of 32 share one SQ and one CQ doorbell.
//!
//!     cargo build --release -p pollux-nvme --example driver_loop
//!     valgrind --tool=callgrind target/release/examples/driver_loop 100000

use std::sync::Arc;

use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_nvme::{Controller, ControllerOptions, IoVec, QueuePairOptions};

const BATCH: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batches: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(10_000);
    let mem = DmaMemory::with_memmap(
        DmaConfig {
            size_mib: 16,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )?;
    let model = ModelController::new(
        Arc::clone(&mem),
        ModelOptions {
            namespaces: vec![(1 << 16, 512)],
            ..ModelOptions::default()
        },
    )?;
    model.set_data_transfer(false);
    let mut ctrlr = Controller::new(
        Arc::clone(&model),
        Arc::clone(&mem),
        ControllerOptions::default(),
    )?;
    let ns = ctrlr.namespace(1)?.clone();
    let mut qpair = ctrlr.alloc_io_qpair(&QueuePairOptions {
        entries: 256,
        depth: 64,
        ..QueuePairOptions::default()
    })?;
    let buf = mem.alloc(BATCH * 4096, 4096, None)?;
    let iovs: Vec<IoVec> = (0..BATCH)
        .map(|i| IoVec::from_dma_buffer(&buf, i * 4096, 4096))
        .collect::<Result<_, _>>()?;
    let mut failed = 0u64;
    for _ in 0..batches {
        for (i, iov) in iovs.iter().enumerate() {
            qpair.submit_read(&ns, i as u64, 8 * i as u64, 8, std::slice::from_ref(iov))?;
        }
        let mut done = 0;
        while done < BATCH as u32 {
            done += qpair.process_completions(BATCH as u32, |_, cpl| {
                if !cpl.status.is_success() {
                    failed += 1;
                }
            })?;
        }
    }
    println!("{} reads, {failed} failed", batches * BATCH as u64);
    Ok(())
}
