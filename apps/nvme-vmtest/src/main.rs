//! `nvme-vmtest`: drives a (QEMU) NVMe controller through `pollux-nvme` and checks every byte.
//!
//! `nvme-vmtest run <PCI address> --expect-serial S --expect-model M --expect-ns 1:65536 ...`
//! (in the guest of `scripts/vm-test.sh nvme`), in order:
//! 1. identify: serial, model, active namespaces and their sizes match what QEMU was given;
//! 2. several queue pairs on their own threads write a pattern stamped with (NSID, LBA, seed)
//!    over every namespace, each a slice; then read back and check every block;
//! 3. queue wrap-around: a 4-entry queue pair, 1000+ small commands through its software queue;
//! 4. flush; write zeroes (read back zeroes); deallocate (read back the old data or zeroes);
//! 5. a controller reset in the middle of a write workload on two queue pairs: requests failed
//!    back by the reset are resubmitted after reconnecting, then every block is checked;
//! 6. the final pattern (`--final-seed`) over every namespace, flushed and checked, then the
//!    queue pairs are freed and the controller detached (shut down).
//!
//! `nvme-vmtest check-image --file IMG --nsid N --seed S`, on the host after the guest powered
//! off, checks that the namespace's backing file holds exactly the final pattern.
//!
//! Prints `NVME-VMTEST: PASS` (run) / `CHECK-IMAGE: OK` (check-image) and exits 0 on success.

mod pattern;
mod stream;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use pollux_env::dma::{DmaConfig, DmaError, DmaMemory};
use pollux_env::memmap::{MemMap, TranslationError};
use pollux_env::pci::PciAddress;
use pollux_env::vfio::{VfioError, VfioPciDevice};
use pollux_nvme::{
    Controller, ControllerOptions, Namespace, NvmeError, QueuePair, QueuePairOptions, Registers,
    Status,
};

use pattern::{check_block, BlockState};
use stream::{drive, step, Op, Stream};

/// Every way the test can fail, with what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error("DMA memory for {what}")]
    Dma {
        what: &'static str,
        #[source]
        source: DmaError,
    },
    #[error("attaching the VFIO container to the memory map")]
    MemMap(#[from] TranslationError),
    #[error("{what}")]
    Nvme {
        what: &'static str,
        #[source]
        source: NvmeError,
    },
    #[error("submitting {op:?} nsid {nsid} lba {lba} +{blocks}")]
    Submit {
        op: Op,
        nsid: u32,
        lba: u64,
        blocks: u32,
        #[source]
        source: NvmeError,
    },
    #[error("{op:?} nsid {nsid} lba {lba} +{blocks} failed: {status}")]
    Command {
        op: Op,
        nsid: u32,
        lba: u64,
        blocks: u32,
        status: Status,
    },
    #[error("polling queue pair {qid}")]
    Poll {
        qid: u16,
        #[source]
        source: NvmeError,
    },
    #[error("{0}")]
    Check(String),
    #[error("image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn nvme(what: &'static str) -> impl FnOnce(NvmeError) -> TestError {
    move |source| TestError::Nvme { what, source }
}

#[derive(Debug, Parser)]
#[command(
    name = "nvme-vmtest",
    about = "Test pollux-nvme against an NVMe controller"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the tests on a controller bound to vfio-pci (destroys its data)
    Run(RunArgs),
    /// Check that a namespace's backing image holds exactly the final pattern
    CheckImage(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// PCI address of the controller, e.g. 0000:00:04.0
    address: PciAddress,
    #[arg(long)]
    expect_serial: Option<String>,
    #[arg(long)]
    expect_model: Option<String>,
    /// NSID:BLOCKS of each namespace expected active (repeat; all of them)
    #[arg(long, value_parser = parse_ns)]
    expect_ns: Vec<(u32, u64)>,
    /// Seed of the pattern left on every namespace at the end (hex)
    #[arg(long, value_parser = parse_hex_u32, default_value = "0xf1a1")]
    final_seed: u32,
    /// I/O queue pairs (threads) of the parallel phases
    #[arg(long, default_value_t = 4)]
    qpairs: usize,
    /// DMA memory to reserve, in MiB
    #[arg(long, default_value_t = 48)]
    dma_mib: usize,
    /// Use locked anonymous memory instead of hugepages
    #[arg(long)]
    no_huge: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    #[arg(long)]
    file: PathBuf,
    #[arg(long)]
    nsid: u32,
    #[arg(long, value_parser = parse_hex_u32)]
    seed: u32,
    #[arg(long, default_value_t = 512)]
    block_size: usize,
}

fn parse_hex_u32(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|e| format!("{text:?} is not a hex number: {e}"))
}

fn parse_ns(text: &str) -> Result<(u32, u64), String> {
    let (nsid, blocks) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not NSID:BLOCKS"))?;
    Ok((
        nsid.parse().map_err(|e| format!("NSID {nsid:?}: {e}"))?,
        blocks
            .parse()
            .map_err(|e| format!("blocks {blocks:?}: {e}"))?,
    ))
}

fn main() -> ExitCode {
    pollux_cli::init_logging("info");
    let args = Args::parse();
    let (result, ok_line) = match &args.command {
        Command::Run(run_args) => (run(run_args), "NVME-VMTEST: PASS"),
        Command::CheckImage(check_args) => (check_image(check_args), "CHECK-IMAGE: OK"),
    };
    match result {
        Ok(()) => {
            println!("{ok_line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let message = pollux_cli::error_chain(&error);
            eprintln!("nvme-vmtest: error: {message}");
            println!("NVME-VMTEST: FAIL");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> Result<(), TestError> {
    let device = VfioPciDevice::open(&args.address)?;
    device.enable_bus_master()?;
    let bar = Arc::new(device.map_bar(0)?);
    let memory = DmaMemory::new(DmaConfig {
        size_mib: args.dma_mib,
        no_huge: args.no_huge,
    })
    .map_err(|source| TestError::Dma {
        what: "the reservation",
        source,
    })?;
    println!(
        "NVME-VMTEST: {} MiB of DMA memory ({})",
        memory.len_bytes() >> 20,
        if memory.is_hugepage_backed() {
            "hugepages"
        } else {
            "locked anonymous memory"
        }
    );
    MemMap::global().set_mapper(device.container().clone())?;
    let options = ControllerOptions {
        io_queues: 8,
        ..ControllerOptions::default()
    };
    let result = Controller::new(Arc::clone(&bar), Arc::clone(&memory), options)
        .map_err(nvme("initialising the controller"))
        .and_then(|ctrlr| run_tests(args, ctrlr, &memory));
    let cleared = MemMap::global().clear_mapper();
    result?;
    cleared?;
    Ok(())
}

/// Expected contents of every namespace, indexed like `Controller::namespaces`.
struct Model {
    namespaces: Vec<Namespace>,
    blocks: Vec<Vec<BlockState>>,
}

impl Model {
    fn set(&mut self, index: usize, range: std::ops::Range<u64>, state: BlockState) {
        self.blocks[index][range.start as usize..range.end as usize].fill(state);
    }

    fn set_all(&mut self, state: BlockState) {
        for blocks in &mut self.blocks {
            blocks.fill(state);
        }
    }
}

fn phase(name: &str, start: Instant, detail: impl std::fmt::Display) {
    println!(
        "NVME-VMTEST: {name} ok in {:.1}s: {detail}",
        start.elapsed().as_secs_f64()
    );
}

fn run_tests<R: Registers>(
    args: &RunArgs,
    mut ctrlr: Controller<R>,
    memory: &Arc<DmaMemory>,
) -> Result<(), TestError> {
    // 1. Identify.
    let start = Instant::now();
    let identify = ctrlr.identify().clone();
    println!(
        "NVME-VMTEST: controller serial {:?} model {:?} firmware {:?} version {} ({} I/O queues granted)",
        identify.serial,
        identify.model,
        identify.firmware,
        ctrlr.version(),
        ctrlr.io_queues_granted()
    );
    expect_eq(
        "serial number",
        args.expect_serial.as_deref(),
        &identify.serial,
    )?;
    expect_eq(
        "model number",
        args.expect_model.as_deref(),
        &identify.model,
    )?;
    let namespaces: Vec<Namespace> = ctrlr.namespaces().to_vec();
    for ns in &namespaces {
        println!(
            "NVME-VMTEST: namespace {} blocks {} block size {} max transfer {}",
            ns.nsid(),
            ns.num_blocks(),
            ns.block_size_bytes(),
            ns.max_transfer_bytes()
        );
    }
    if !args.expect_ns.is_empty() {
        let found: Vec<(u32, u64)> = namespaces
            .iter()
            .map(|ns| (ns.nsid(), ns.num_blocks()))
            .collect();
        if found != args.expect_ns {
            return Err(TestError::Check(format!(
                "namespaces (nsid, blocks): expected {:?}, controller reports {found:?}",
                args.expect_ns
            )));
        }
    }
    if namespaces.is_empty() {
        return Err(TestError::Check("no active namespace".into()));
    }
    phase(
        "identify",
        start,
        format!("{} namespaces", namespaces.len()),
    );
    let mut model = Model {
        blocks: namespaces
            .iter()
            .map(|ns| vec![BlockState::Unknown; ns.num_blocks() as usize])
            .collect(),
        namespaces,
    };

    let io_options = QueuePairOptions {
        entries: 64,
        depth: 64,
        list_pages: 1,
        timeout: Some(Duration::from_secs(30)),
        ..QueuePairOptions::default()
    };
    let qpair_count = args.qpairs.clamp(
        1,
        usize::from(ctrlr.io_queues_granted())
            .saturating_sub(1)
            .max(1),
    );
    let mut qpairs = Vec::with_capacity(qpair_count);
    for _ in 0..qpair_count {
        qpairs.push(
            ctrlr
                .alloc_io_qpair(&io_options)
                .map_err(nvme("allocating an I/O queue pair"))?,
        );
    }

    // 2. Parallel write and read-verify over every namespace.
    let seed_a = 0xa11a;
    let start = Instant::now();
    parallel(&mut qpairs, memory, &model, Op::Write(seed_a))?;
    model.set_all(BlockState::Pattern(seed_a));
    let blocks = parallel(&mut qpairs, memory, &model, Op::Read)?;
    phase(
        "parallel write+verify",
        start,
        format!("{qpair_count} queue pairs, {blocks} blocks verified"),
    );

    // 3. Wrap-around: 4 entries (3 commands in the SQ), 32 slots, 4 KiB commands.
    let start = Instant::now();
    let wrap_options = QueuePairOptions {
        entries: 4,
        depth: 32,
        list_pages: 1,
        timeout: Some(Duration::from_secs(30)),
        ..QueuePairOptions::default()
    };
    let mut small = ctrlr
        .alloc_io_qpair(&wrap_options)
        .map_err(nvme("allocating the 4-entry queue pair"))?;
    let seed_b = 0xb22b;
    let block_bytes = u64::from(model.namespaces[0].block_size_bytes());
    let chunk = (4096 / block_bytes).max(1) as u32;
    let wrap_blocks = (u64::from(chunk) * 600).min(model.namespaces[0].num_blocks());
    {
        let ns = model.namespaces[0].clone();
        let mut write = [Stream::new(
            memory,
            &ns,
            Op::Write(seed_b),
            0..wrap_blocks,
            chunk,
            32,
            &[],
        )?];
        drive(&mut small, &mut write)?;
    }
    model.set(0, 0..wrap_blocks, BlockState::Pattern(seed_b));
    {
        let ns = model.namespaces[0].clone();
        let mut read = [Stream::new(
            memory,
            &ns,
            Op::Read,
            0..wrap_blocks,
            chunk,
            32,
            &model.blocks[0],
        )?];
        drive(&mut small, &mut read)?;
    }
    let stats = small.stats();
    if stats.queued_sq_full == 0 || stats.completed < 1000 {
        return Err(TestError::Check(format!(
            "wrap-around: expected 1000+ commands with some queued for a full SQ, got {stats:?}"
        )));
    }
    phase(
        "queue wrap-around",
        start,
        format!(
            "{} entries, {} commands completed, {} waited for SQ room, {} SQ doorbells",
            small.entries(),
            stats.completed,
            stats.queued_sq_full,
            stats.sq_doorbells
        ),
    );
    ctrlr
        .free_io_qpair(small)
        .map_err(nvme("freeing the 4-entry queue pair"))?;

    // 4. Flush, write zeroes, deallocate (on the first queue pair).
    let start = Instant::now();
    for index in 0..model.namespaces.len() {
        let ns = model.namespaces[index].clone();
        let mut flush = [Stream::new(memory, &ns, Op::Flush, 0..1, 1, 1, &[])?];
        drive(&mut qpairs[0], &mut flush)?;
    }
    phase(
        "flush",
        start,
        format!("{} namespaces", model.namespaces.len()),
    );

    let start = Instant::now();
    let last = model.namespaces.len() - 1;
    let ns_zero = model.namespaces[0].clone();
    // Unaligned on purpose, crossing the wrap-around area's end; at most 65536 per command.
    let zero_range = range_within(&ns_zero, wrap_blocks - 100, 3000);
    {
        let mut zero = [Stream::new(
            memory,
            &ns_zero,
            Op::WriteZeroes,
            zero_range.clone(),
            1024,
            4,
            &[],
        )?];
        drive(&mut qpairs[0], &mut zero)?;
    }
    model.set(0, zero_range.clone(), BlockState::Zero);
    let check_range =
        zero_range.start.saturating_sub(64)..(zero_range.end + 64).min(ns_zero.num_blocks());
    {
        let mut read = [Stream::new(
            memory,
            &ns_zero,
            Op::Read,
            check_range.clone(),
            64,
            8,
            &model.blocks[0],
        )?];
        drive(&mut qpairs[0], &mut read)?;
    }
    phase(
        "write zeroes",
        start,
        format!(
            "nsid {} lba {zero_range:?} zeroed, {check_range:?} checked",
            ns_zero.nsid()
        ),
    );

    let start = Instant::now();
    let ns_dealloc = model.namespaces[last].clone();
    let dealloc_range = range_within(&ns_dealloc, 2048, 4096);
    let before = model.blocks[last][dealloc_range.start as usize];
    {
        let mut dealloc = [Stream::new(
            memory,
            &ns_dealloc,
            Op::Deallocate,
            dealloc_range.clone(),
            4096,
            1,
            &[],
        )?];
        drive(&mut qpairs[0], &mut dealloc)?;
    }
    let after = match before {
        BlockState::Pattern(seed) | BlockState::PatternOrZero(seed) => {
            BlockState::PatternOrZero(seed)
        }
        other => other,
    };
    model.set(last, dealloc_range.clone(), after);
    {
        let mut read = [Stream::new(
            memory,
            &ns_dealloc,
            Op::Read,
            dealloc_range.clone(),
            128,
            8,
            &model.blocks[last],
        )?];
        drive(&mut qpairs[0], &mut read)?;
    }
    phase(
        "deallocate",
        start,
        format!(
            "nsid {} lba {dealloc_range:?} deallocated, reads old data or zeroes",
            ns_dealloc.nsid()
        ),
    );

    // 5. Reset in the middle of a write workload.
    let start = Instant::now();
    let seed_c = 0xc33c;
    let retried = reset_under_load(&mut ctrlr, &mut qpairs, memory, &model, seed_c)?;
    model.set_all(BlockState::Pattern(seed_c));
    let blocks = parallel(&mut qpairs, memory, &model, Op::Read)?;
    phase(
        "reset under load",
        start,
        format!(
            "{} reset(s), {retried} requests failed back and resubmitted, {blocks} blocks verified after",
            ctrlr.resets()
        ),
    );

    // 6. Final pattern, flushed and checked; then a clean shutdown.
    let start = Instant::now();
    parallel(&mut qpairs, memory, &model, Op::Write(args.final_seed))?;
    model.set_all(BlockState::Pattern(args.final_seed));
    for index in 0..model.namespaces.len() {
        let ns = model.namespaces[index].clone();
        let mut flush = [Stream::new(memory, &ns, Op::Flush, 0..1, 1, 1, &[])?];
        drive(&mut qpairs[0], &mut flush)?;
    }
    let blocks = parallel(&mut qpairs, memory, &model, Op::Read)?;
    for ns in &model.namespaces {
        println!(
            "NVME-VMTEST: final nsid {} seed {:#x} blocks {} block size {}",
            ns.nsid(),
            args.final_seed,
            ns.num_blocks(),
            ns.block_size_bytes()
        );
    }
    phase(
        "final pattern",
        start,
        format!("{blocks} blocks written, flushed, verified"),
    );

    for qpair in qpairs {
        ctrlr
            .free_io_qpair(qpair)
            .map_err(nvme("freeing a queue pair"))?;
    }
    ctrlr
        .detach()
        .map_err(nvme("detaching (shutting down) the controller"))?;
    println!("NVME-VMTEST: controller shut down");
    Ok(())
}

fn expect_eq(what: &str, expected: Option<&str>, actual: &str) -> Result<(), TestError> {
    match expected {
        Some(expected) if expected != actual => Err(TestError::Check(format!(
            "{what}: expected {expected:?}, controller reports {actual:?}"
        ))),
        _ => Ok(()),
    }
}

/// `len` blocks from `start`, clipped to the namespace.
fn range_within(ns: &Namespace, start: u64, len: u64) -> std::ops::Range<u64> {
    let start = start.min(ns.num_blocks().saturating_sub(1));
    start..(start + len).min(ns.num_blocks())
}

/// Runs `op` over every namespace with one thread per queue pair, each on slice `i` of every
/// namespace; returns the blocks done. Reads are checked against `model`.
fn parallel<R: Registers>(
    qpairs: &mut Vec<QueuePair<R>>,
    memory: &Arc<DmaMemory>,
    model: &Model,
    op: Op,
) -> Result<u64, TestError> {
    let count = qpairs.len() as u64;
    let owned: Vec<QueuePair<R>> = std::mem::take(qpairs);
    let results: Vec<(QueuePair<R>, Result<u64, TestError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = owned
            .into_iter()
            .enumerate()
            .map(|(index, mut qpair)| {
                scope.spawn(move || {
                    let result = slice_worker(&mut qpair, memory, model, op, index as u64, count);
                    (qpair, result)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a queue pair thread panicked"))
            .collect()
    });
    let mut blocks = 0;
    let mut first_error = None;
    for (qpair, result) in results {
        qpairs.push(qpair);
        match result {
            Ok(done) => blocks += done,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(blocks), Err)
}

fn slice_worker<R: Registers>(
    qpair: &mut QueuePair<R>,
    memory: &Arc<DmaMemory>,
    model: &Model,
    op: Op,
    index: u64,
    count: u64,
) -> Result<u64, TestError> {
    let mut streams = Vec::with_capacity(model.namespaces.len());
    for (ns, expect) in model.namespaces.iter().zip(&model.blocks) {
        let range = slice(ns.num_blocks(), index, count);
        if range.is_empty() {
            continue;
        }
        streams.push(Stream::new(
            memory,
            ns,
            op,
            range,
            chunk_blocks(ns),
            8,
            expect,
        )?);
    }
    drive(qpair, &mut streams)?;
    Ok(streams.iter().map(|s| s.stats.blocks).sum())
}

fn slice(blocks: u64, index: u64, count: u64) -> std::ops::Range<u64> {
    (blocks * index / count)..(blocks * (index + 1) / count)
}

/// 64 KiB per command (within MDTS).
fn chunk_blocks(ns: &Namespace) -> u32 {
    let bytes = (64 * 1024).min(ns.max_transfer_bytes());
    (bytes / u64::from(ns.block_size_bytes())).max(1) as u32
}

/// Writes `seed` over every namespace on two queue pairs (polled from this thread) and resets
/// the controller once a quarter of the commands completed. Requests the reset failed back are
/// resubmitted after the pairs reconnect; every other pair is reconnected too. Returns how
/// many requests were resubmitted.
fn reset_under_load<R: Registers>(
    ctrlr: &mut Controller<R>,
    qpairs: &mut [QueuePair<R>],
    memory: &Arc<DmaMemory>,
    model: &Model,
    seed: u32,
) -> Result<u64, TestError> {
    let pairs = qpairs.len().min(2);
    let mut streams: Vec<Vec<Stream<'_>>> = (0..pairs)
        .map(|index| {
            model
                .namespaces
                .iter()
                .map(|ns| {
                    let range = slice(ns.num_blocks(), index as u64, pairs as u64);
                    Stream::new(
                        memory,
                        ns,
                        Op::Write(seed),
                        range,
                        chunk_blocks(ns),
                        16,
                        &[],
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    let total_commands: u64 = model
        .namespaces
        .iter()
        .map(|ns| ns.num_blocks().div_ceil(u64::from(chunk_blocks(ns))))
        .sum();
    let reset_after = total_commands / 4;
    let mut completions = Vec::with_capacity(64);
    let mut done_commands = 0u64;
    let mut reset_done = false;
    let mut last_progress = Instant::now();
    while !streams.iter().flatten().all(Stream::finished) {
        let mut progress = 0;
        for (qpair, pair_streams) in qpairs.iter_mut().zip(streams.iter_mut()) {
            progress += step(qpair, pair_streams, true, &mut completions)?;
            done_commands += completions.iter().filter(|(_, s)| s.is_success()).count() as u64;
        }
        if !reset_done && done_commands >= reset_after {
            let in_flight: usize = qpairs[..pairs].iter().map(QueuePair::in_flight).sum();
            println!("NVME-VMTEST: resetting the controller with {in_flight} requests in flight");
            ctrlr.reset().map_err(nvme("resetting the controller"))?;
            reset_done = true;
        }
        for qpair in qpairs[..pairs].iter_mut() {
            // A pair that handed its requests back after the reset is reconnected here.
            if qpair.is_disconnected() && qpair.in_flight() == 0 {
                ctrlr
                    .reconnect_io_qpair(qpair)
                    .map_err(nvme("reconnecting a queue pair"))?;
            }
        }
        ctrlr
            .process_admin_completions()
            .map_err(nvme("admin poll"))?;
        if progress > 0 {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(60) {
            return Err(TestError::Check(
                "reset workload made no progress for 60 s".into(),
            ));
        }
    }
    if !reset_done || ctrlr.resets() != 1 {
        return Err(TestError::Check(format!(
            "expected exactly one reset during the workload, controller counted {}",
            ctrlr.resets()
        )));
    }
    // The pairs that sat out the workload were disconnected by the reset too.
    for qpair in qpairs[pairs..].iter_mut() {
        let _ = qpair.process_completions(1, |_, _| {});
        if qpair.is_disconnected() {
            ctrlr
                .reconnect_io_qpair(qpair)
                .map_err(nvme("reconnecting an idle queue pair"))?;
        }
    }
    Ok(streams.iter().flatten().map(|s| s.stats.retried).sum())
}

/// Host side: the image of namespace `nsid` holds exactly the pattern of `seed`.
fn check_image(args: &CheckArgs) -> Result<(), TestError> {
    let image_error = |source| TestError::Image {
        path: args.file.clone(),
        source,
    };
    let mut file = std::fs::File::open(&args.file).map_err(image_error)?;
    let len = file.metadata().map_err(image_error)?.len();
    let block_bytes = args.block_size;
    if block_bytes < 16 || len % block_bytes as u64 != 0 {
        return Err(TestError::Check(format!(
            "{}: {len} bytes is not a whole number of {block_bytes}-byte blocks",
            args.file.display()
        )));
    }
    let blocks = len / block_bytes as u64;
    let per_read = (1 << 20) / block_bytes;
    let mut data = vec![0u8; per_read * block_bytes];
    let mut scratch = vec![0u8; block_bytes];
    let mut lba = 0u64;
    while lba < blocks {
        let count = (blocks - lba).min(per_read as u64) as usize;
        let bytes = &mut data[..count * block_bytes];
        file.read_exact(bytes).map_err(image_error)?;
        for (index, block) in bytes.chunks_exact(block_bytes).enumerate() {
            check_block(
                block,
                args.nsid,
                lba + index as u64,
                BlockState::Pattern(args.seed),
                &mut scratch,
            )
            .map_err(|e| TestError::Check(format!("{}: {e}", args.file.display())))?;
        }
        lba += count as u64;
    }
    println!(
        "CHECK-IMAGE: {} holds the pattern of nsid {} seed {:#x} in all {blocks} blocks",
        args.file.display(),
        args.nsid,
        args.seed
    );
    Ok(())
}
