//! One job: one bdev driven from one core at a fixed queue depth, as SPDK bdevperf's
//! `bdevperf_job`. The job owns its descriptor, channel and data buffers and lives inside
//! its poller: each poll reaps completions and resubmits from the completion callback, so
//! the I/O path is a direct call with no allocation, lock, message or `Arc` clone.
//!
//! Verify: each slot writes a pattern (per block: the LBA, a sequence stamp, a filler
//! derived from both) and, once that completed, reads the blocks back and compares. A
//! mismatch names the bdev and the first bad LBA, stops every job and fails the run.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use pollux_bdev::{BdevChannel, BdevDesc, BdevRegistry, IoCompletion, IoStats, IoType, IoVec};
use pollux_env::dma::{DmaBuffer, DmaMemory};
use pollux_reactor::{PollStatus, ThreadCtx};

use crate::args::Workload;

/// What wakes a job's thread when one of its I/Os completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Poll mode: the reactor never sleeps.
    Polled,
    /// Interrupt mode, the channel's completion fd registered: a poll that hands nothing out
    /// is idle even with I/O in flight.
    CompletionFd,
    /// Interrupt mode on a channel without a completion fd: busy while I/O is in flight.
    NoCompletionFd,
}

/// What a job is asked to do.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub index: usize,
    pub bdev: String,
    pub core: usize,
    pub workload: Workload,
    pub queue_depth: u32,
    pub io_size_bytes: u64,
    pub rw_mix_read_percent: u8,
    pub run_time: Duration,
    pub corrupt_lba: Option<u64>,
}

impl JobSpec {
    /// One job per (core, bdev), cores outermost, as the command line asks for them.
    pub fn for_each_core_and_bdev(
        args: &crate::args::Args,
        cpumask: &pollux_env::cpumask::CpuMask,
        bdevs: &[String],
    ) -> Vec<JobSpec> {
        let mut specs = Vec::new();
        for core in cpumask.iter() {
            for bdev in bdevs {
                specs.push(JobSpec {
                    index: specs.len(),
                    bdev: bdev.clone(),
                    core,
                    workload: args.workload,
                    queue_depth: args.queue_depth,
                    io_size_bytes: args.io_size_bytes,
                    rw_mix_read_percent: args.rw_mix_read_percent.unwrap_or(0),
                    run_time: Duration::from_secs(args.time_s),
                    corrupt_lba: args.corrupt_lba,
                });
            }
        }
        specs
    }
}

/// What a job reports.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub spec: JobSpec,
    pub runtime_s: f64,
    pub stats: IoStats,
    /// Set when the job failed (setup error, I/O error, verify mismatch).
    pub error: Option<String>,
}

/// What runs when the last job of a run has published its result.
pub type OnDone = dyn Fn(&mut ThreadCtx, &RunShared) + Send + Sync;

/// State shared by the jobs and the app thread. Each job's progress counter sits on its
/// own cache line: written by one core, read by the progress printer.
pub struct RunShared {
    pub registry: Arc<BdevRegistry>,
    pub dma: Arc<DmaMemory>,
    pub results: Mutex<Vec<JobResult>>,
    pub remaining: AtomicUsize,
    /// Any job failing stops all of them.
    pub stop: AtomicBool,
    pub progress_ios: Vec<CachePadded<AtomicU64>>,
    /// Runs on the thread of the job that finished last: stops the app in a plain run,
    /// answers `perform_tests` under `-z`.
    pub on_done: Box<OnDone>,
}

impl RunShared {
    /// The shared state of `jobs` jobs; `on_done` runs once the last one reported.
    pub fn new(
        registry: Arc<BdevRegistry>,
        dma: Arc<DmaMemory>,
        jobs: usize,
        on_done: Box<OnDone>,
    ) -> Self {
        Self {
            registry,
            dma,
            results: Mutex::new(Vec::new()),
            remaining: AtomicUsize::new(jobs),
            stop: AtomicBool::new(false),
            progress_ios: (0..jobs)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            on_done,
        }
    }

    fn publish(&self, ctx: &mut ThreadCtx, result: JobResult) {
        if result.error.is_some() {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(result);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            (self.on_done)(ctx, self);
        }
    }
}

/// A slot's current step in a verify job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VerifyStep {
    Write,
    Corrupt,
    Read,
}

#[derive(Debug, Clone, Copy)]
struct SlotState {
    offset_blocks: u64,
    seq: u64,
    step: VerifyStep,
}

/// The part of a job the completion callback mutates (apart from the channel).
struct JobState {
    spec: JobSpec,
    shared: Arc<RunShared>,
    io_blocks: u64,
    block_size_bytes: u64,
    /// Number of io-sized ranges in the bdev.
    ranges: u64,
    next_range: u64,
    rng: u64,
    /// Per slot: the buffer a read / write uses (and for verify a second, read-back buffer).
    write_iovs: Vec<IoVec>,
    read_iovs: Vec<IoVec>,
    slots: Vec<SlotState>,
    buffers: DmaBuffer,
    scratch: Vec<u8>,
    expected: Vec<u8>,
    next_seq: u64,
    draining: bool,
    error: Option<String>,
    completed: u64,
}

pub struct Job {
    // Dropped first: no I/O may outlive the buffers in `state`.
    channel: BdevChannel,
    _desc: BdevDesc,
    state: JobState,
    started: Instant,
    deadline: Instant,
    /// What wakes this job's thread when an I/O completes.
    wakeup: Wakeup,
}

fn setup_error(spec: &JobSpec, what: &str, error: impl std::fmt::Display) -> String {
    format!(
        "job {} on bdev {:?}: {what}: {error}",
        spec.index, spec.bdev
    )
}

impl Job {
    /// Opens the bdev and allocates the job's buffers (setup path).
    pub fn new(spec: JobSpec, shared: Arc<RunShared>, now: Instant) -> Result<Self, String> {
        let desc = shared
            .registry
            .open(&spec.bdev, spec.workload.writes(), None)
            .map_err(|e| setup_error(&spec, "open", e))?;
        let info = desc.info().clone();
        let block_size_bytes = u64::from(info.block_size_bytes);
        if !spec.io_size_bytes.is_multiple_of(block_size_bytes) {
            return Err(format!(
                "bdev {:?}: I/O size {} is not a multiple of its block size {}",
                spec.bdev, spec.io_size_bytes, block_size_bytes
            ));
        }
        let io_blocks = spec.io_size_bytes / block_size_bytes;
        let ranges = info.num_blocks / io_blocks;
        if ranges == 0 {
            return Err(format!(
                "bdev {:?}: I/O size {} is larger than the bdev ({} bytes)",
                spec.bdev,
                spec.io_size_bytes,
                info.size_bytes()
            ));
        }
        let io_type = match spec.workload {
            Workload::Flush => Some(IoType::Flush),
            Workload::Unmap => Some(IoType::Unmap),
            Workload::WriteZeroes => Some(IoType::WriteZeroes),
            Workload::Reset => Some(IoType::Reset),
            _ => None,
        };
        if let Some(io_type) = io_type.filter(|t| !desc.supports(*t)) {
            return Err(format!(
                "bdev {:?} does not support {io_type} (module {})",
                spec.bdev, info.module
            ));
        }
        let channel = desc
            .channel(spec.queue_depth)
            .map_err(|e| setup_error(&spec, "channel", e))?;

        let qd = spec.queue_depth as usize;
        let io_size = spec.io_size_bytes as usize;
        let buffer_sets = if spec.workload == Workload::Verify {
            2
        } else {
            1
        };
        let align = (info.required_alignment_bytes as usize).max(4096);
        let buffers = shared
            .dma
            .alloc(qd * io_size * buffer_sets, align, None)
            .map_err(|e| setup_error(&spec, "data buffers", e))?;
        // One slot's region per index, used by one I/O at a time. The job owns `buffers` and
        // drops its channel first, after every I/O completed (or, on a forced exit, with
        // nothing left to touch them: null and malloc complete synchronously, aio / uring and
        // nvme channels cancel or wait for their I/O when dropped; nvme deletes its queue pair,
        // so the device DMAs no more).
        let iovs = |first: usize| -> Result<Vec<IoVec>, String> {
            (first..first + qd)
                .map(|index| IoVec::from_dma_buffer(&buffers, index * io_size, io_size))
                .collect::<Result<_, _>>()
                .map_err(|e| setup_error(&spec, "data buffer slots", e))
        };
        let write_iovs = iovs(0)?;
        let read_iovs = if buffer_sets == 2 {
            iovs(qd)?
        } else {
            write_iovs.clone()
        };
        let verify = spec.workload == Workload::Verify;
        let seed = 0x9e37_79b9_7f4a_7c15u64 ^ ((spec.index as u64 + 1) << 32) ^ spec.core as u64;
        let run_time = spec.run_time;
        Ok(Self {
            channel,
            _desc: desc,
            state: JobState {
                io_blocks,
                block_size_bytes,
                ranges,
                next_range: 0,
                rng: seed,
                write_iovs,
                read_iovs,
                slots: vec![
                    SlotState {
                        offset_blocks: 0,
                        seq: 0,
                        step: VerifyStep::Write,
                    };
                    qd
                ],
                buffers,
                scratch: if verify { vec![0; io_size] } else { Vec::new() },
                expected: if verify { vec![0; io_size] } else { Vec::new() },
                next_seq: 1,
                draining: false,
                error: None,
                completed: 0,
                spec,
                shared,
            },
            started: now,
            deadline: now + run_time,
            wakeup: Wakeup::Polled,
        })
    }

    /// Submits the first `queue_depth` I/Os.
    pub fn start(&mut self) {
        for slot in 0..self.state.slots.len() {
            self.state.submit_next(&mut self.channel, slot);
        }
    }

    /// The channel's completion fd, if its module has one.
    pub fn interrupt_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.channel.interrupt_fd()
    }

    pub fn index(&self) -> usize {
        self.state.spec.index
    }

    /// Set once before [`Job::start`] (default: [`Wakeup::Polled`]).
    pub fn set_wakeup(&mut self, wakeup: Wakeup) {
        self.wakeup = wakeup;
    }

    /// The job's poller body.
    pub fn poll(&mut self, ctx: &mut ThreadCtx) -> (PollStatus, bool) {
        let state = &mut self.state;
        if !state.draining
            && (ctx.now() >= self.deadline
                || ctx.is_exiting()
                || state.shared.stop.load(Ordering::Relaxed))
        {
            state.draining = true;
        }
        let mut handed = self
            .channel
            .poll(|channel, completion| state.on_complete(channel, completion));
        // Completion callbacks resubmit; the module hands those to the kernel at its next
        // poll, so a poll that handed something out is busy: the thread must not sleep
        // before that poll. With a completion fd, make that poll now (one more at most,
        // STYLE #4) so that the thread can sleep at once when it hands nothing out.
        let mut busy = handed > 0;
        if busy && self.wakeup == Wakeup::CompletionFd {
            let again = self
                .channel
                .poll(|channel, completion| state.on_complete(channel, completion));
            handed += again;
            busy = again > 0;
        }
        if handed > 0 {
            state.shared.progress_ios[state.spec.index].store(state.completed, Ordering::Relaxed);
        }
        // Without a completion fd nothing but this poller notices a completion.
        busy |= self.wakeup == Wakeup::NoCompletionFd && self.channel.outstanding() > 0;
        let finished = state.draining && self.channel.outstanding() == 0;
        (PollStatus::from_busy(busy), finished)
    }

    /// Publishes the result (call once, after `poll` said finished).
    pub fn finish(self, ctx: &mut ThreadCtx) {
        let runtime_s = ctx
            .now()
            .saturating_duration_since(self.started)
            .as_secs_f64()
            .max(1e-9);
        let stats = self.channel.stats().clone();
        let shared = self.state.shared.clone();
        let result = JobResult {
            spec: self.state.spec.clone(),
            runtime_s,
            stats,
            error: self.state.error.clone(),
        };
        drop(self);
        shared.publish(ctx, result);
    }
}

/// Publishes a job that could not start.
pub fn publish_setup_failure(
    ctx: &mut ThreadCtx,
    shared: &RunShared,
    spec: JobSpec,
    error: String,
) {
    shared.publish(
        ctx,
        JobResult {
            spec,
            runtime_s: 0.0,
            stats: IoStats::default(),
            error: Some(error),
        },
    );
}

impl JobState {
    #[inline]
    fn random(&mut self) -> u64 {
        // xorshift64*: a few cycles, good enough to spread offsets.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[inline]
    fn next_offset(&mut self) -> u64 {
        let range = if self.spec.workload.is_random() {
            // Multiply-high instead of `%`: no 64-bit division on the I/O path.
            ((u128::from(self.random()) * u128::from(self.ranges)) >> 64) as u64
        } else {
            let range = self.next_range;
            self.next_range = if range + 1 == self.ranges {
                0
            } else {
                range + 1
            };
            range
        };
        range * self.io_blocks
    }

    /// Starts the next I/O of `slot` (tag = slot index).
    #[inline]
    fn submit_next(&mut self, channel: &mut BdevChannel, slot: usize) {
        let offset = self.next_offset();
        let tag = slot as u64;
        let blocks = self.io_blocks;
        let submitted = match self.spec.workload {
            Workload::Read | Workload::RandRead => channel.read(
                tag,
                offset,
                blocks,
                std::slice::from_ref(&self.read_iovs[slot]),
            ),
            Workload::Write | Workload::RandWrite => channel.write(
                tag,
                offset,
                blocks,
                std::slice::from_ref(&self.write_iovs[slot]),
            ),
            Workload::Rw | Workload::RandRw => {
                if self.random() % 100 < u64::from(self.spec.rw_mix_read_percent) {
                    channel.read(
                        tag,
                        offset,
                        blocks,
                        std::slice::from_ref(&self.read_iovs[slot]),
                    )
                } else {
                    channel.write(
                        tag,
                        offset,
                        blocks,
                        std::slice::from_ref(&self.write_iovs[slot]),
                    )
                }
            }
            Workload::Flush => channel.flush(tag, offset, blocks),
            Workload::Unmap => channel.unmap(tag, offset, blocks),
            Workload::WriteZeroes => channel.write_zeroes(tag, offset, blocks),
            Workload::Reset => channel.reset(tag),
            Workload::Verify => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.slots[slot] = SlotState {
                    offset_blocks: offset,
                    seq,
                    step: VerifyStep::Write,
                };
                self.fill_pattern(offset, seq);
                let io_size = self.expected.len();
                if let Err(error) = self.buffers.write_at(slot * io_size, &self.expected) {
                    self.fail(format!("verify: filling the write buffer: {error}"));
                    return;
                }
                channel.write(
                    tag,
                    offset,
                    blocks,
                    std::slice::from_ref(&self.write_iovs[slot]),
                )
            }
        };
        if let Err(error) = submitted {
            // The job never has more I/Os than slots, so this is a bug, not backpressure.
            self.fail(format!("submit: {error}"));
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            tracing::error!(job = self.spec.index, bdev = %self.spec.bdev, "{message}");
            self.error = Some(message);
        }
        self.draining = true;
    }

    #[inline]
    fn on_complete(&mut self, channel: &mut BdevChannel, completion: IoCompletion) {
        self.completed += 1;
        let slot = completion.tag as usize;
        if !completion.status.is_success() {
            self.fail(format!(
                "{} of {} blocks at LBA {} on bdev {:?} failed: {}",
                completion.io_type,
                completion.num_blocks,
                completion.offset_blocks,
                self.spec.bdev,
                completion.status
            ));
            return;
        }
        if self.spec.workload == Workload::Verify && !self.verify_step(channel, slot) {
            return;
        }
        if !self.draining {
            self.submit_next(channel, slot);
        }
    }

    /// Advances a verify slot; returns true when the slot's write / read pair is done.
    fn verify_step(&mut self, channel: &mut BdevChannel, slot: usize) -> bool {
        let state = self.slots[slot];
        let tag = slot as u64;
        let blocks = self.io_blocks;
        let corrupt = self
            .spec
            .corrupt_lba
            .is_some_and(|lba| lba >= state.offset_blocks && lba < state.offset_blocks + blocks);
        let next = match state.step {
            VerifyStep::Write if corrupt => {
                let lba = self.spec.corrupt_lba.unwrap_or(state.offset_blocks);
                self.slots[slot].step = VerifyStep::Corrupt;
                channel.write_zeroes(tag, lba, 1)
            }
            VerifyStep::Write | VerifyStep::Corrupt => {
                self.slots[slot].step = VerifyStep::Read;
                channel.read(
                    tag,
                    state.offset_blocks,
                    blocks,
                    std::slice::from_ref(&self.read_iovs[slot]),
                )
            }
            VerifyStep::Read => {
                self.check(slot, state);
                return true;
            }
        };
        if let Err(error) = next {
            self.fail(format!("verify submit: {error}"));
        }
        false
    }

    fn fill_pattern(&mut self, offset_blocks: u64, seq: u64) {
        let block = self.block_size_bytes as usize;
        for (index, chunk) in self.expected.chunks_mut(block).enumerate() {
            let lba = offset_blocks + index as u64;
            let filler = (lba.rotate_left(29) ^ seq.wrapping_mul(0x9e37_79b9)).to_le_bytes();
            for (at, byte) in chunk.iter_mut().enumerate() {
                *byte = filler[at % 8];
            }
            chunk[..8].copy_from_slice(&lba.to_le_bytes());
            chunk[8..16].copy_from_slice(&seq.to_le_bytes());
        }
    }

    fn check(&mut self, slot: usize, state: SlotState) {
        let io_size = self.expected.len();
        let read_offset = (self.write_iovs.len() + slot) * io_size;
        if let Err(error) = self.buffers.read_at(read_offset, &mut self.scratch) {
            self.fail(format!("verify: reading the read buffer: {error}"));
            return;
        }
        self.fill_pattern(state.offset_blocks, state.seq);
        if self.scratch == self.expected {
            return;
        }
        let block = self.block_size_bytes as usize;
        let bad = self
            .scratch
            .chunks(block)
            .zip(self.expected.chunks(block))
            .position(|(got, want)| got != want)
            .unwrap_or(0);
        let lba = state.offset_blocks + bad as u64;
        self.fail(format!(
            "verify failed on bdev {:?} at LBA {lba} (sequence {}): data read back differs from data written",
            self.spec.bdev, state.seq
        ));
    }
}
