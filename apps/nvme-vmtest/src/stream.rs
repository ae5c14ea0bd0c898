//! A stream of commands over an LBA range of one namespace, driven on a queue pair.
//!
//! Each stream owns `depth` request slots (one DMA buffer, `chunk` blocks per slot), submits
//! pieces of its range as slots free up, and checks every completion: reads against the
//! expected [`BlockState`]s. Several streams can share one queue pair: the tag is
//! `stream index << 32 | slot`. Requests failed back by a controller reset (*Command Aborted
//! due to SQ Deletion*) are resubmitted when the caller allows it, so a reset in the middle
//! loses nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_env::dma::{DmaBuffer, DmaMemory};
use pollux_nvme::spec::{sc, StatusCodeType};
use pollux_nvme::{IoVec, Namespace, NvmeError, QueuePair, Registers, Status};

use crate::pattern::{check_block, fill_block, BlockState};
use crate::TestError;

/// Completions reaped per poll.
const POLL_BATCH: u32 = 64;
/// A drive with no completion for this long has hung.
const STALL_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write(u32),
    /// Read and check against the stream's expectations.
    Read,
    WriteZeroes,
    Deallocate,
    Flush,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StreamStats {
    pub commands: u64,
    pub blocks: u64,
    /// Requests failed back by a reset and submitted again.
    pub retried: u64,
}

pub struct Stream<'m> {
    ns: Namespace,
    op: Op,
    next_lba: u64,
    end_lba: u64,
    chunk_blocks: u32,
    expect: &'m [BlockState],
    buffer: Option<DmaBuffer>,
    slots: Vec<Option<(u64, u32)>>,
    retry: VecDeque<(u64, u32)>,
    /// Block-sized (or chunk-sized) work areas, allocated once.
    data: Vec<u8>,
    scratch: Vec<u8>,
    pub stats: StreamStats,
}

impl<'m> Stream<'m> {
    /// `range` of `ns` in pieces of `chunk_blocks`, `depth` in flight. `expect` (the whole
    /// namespace's states) is what reads are checked against.
    pub fn new(
        memory: &Arc<DmaMemory>,
        ns: &Namespace,
        op: Op,
        range: std::ops::Range<u64>,
        chunk_blocks: u32,
        depth: usize,
        expect: &'m [BlockState],
    ) -> Result<Self, TestError> {
        assert!(range.end <= ns.num_blocks() && chunk_blocks > 0 && depth > 0);
        let block_bytes = ns.block_size_bytes() as usize;
        let chunk_bytes = chunk_blocks as usize * block_bytes;
        let buffer = match op {
            Op::Write(_) | Op::Read => Some(
                memory
                    .alloc(depth * chunk_bytes, 4096, None)
                    .map_err(|source| TestError::Dma {
                        what: "I/O buffers",
                        source,
                    })?,
            ),
            _ => None,
        };
        let (next_lba, end_lba) = if op == Op::Flush {
            (0, 1)
        } else {
            (range.start, range.end)
        };
        Ok(Self {
            ns: ns.clone(),
            op,
            next_lba,
            end_lba,
            chunk_blocks,
            expect,
            buffer,
            slots: vec![None; depth],
            retry: VecDeque::with_capacity(depth),
            data: vec![0; chunk_bytes],
            scratch: vec![0; block_bytes],
            stats: StreamStats::default(),
        })
    }

    pub fn finished(&self) -> bool {
        self.next_lba >= self.end_lba
            && self.retry.is_empty()
            && self.slots.iter().all(Option::is_none)
    }

    fn next_piece(&mut self) -> Option<(u64, u32)> {
        if let Some(piece) = self.retry.pop_front() {
            return Some(piece);
        }
        if self.next_lba >= self.end_lba {
            return None;
        }
        let blocks = (self.end_lba - self.next_lba).min(u64::from(self.chunk_blocks)) as u32;
        let piece = (self.next_lba, blocks);
        self.next_lba += u64::from(blocks);
        Some(piece)
    }

    /// Submits pieces into free slots. A disconnected queue pair (reset) puts the piece back.
    fn submit<R: Registers>(&mut self, id: u64, qpair: &mut QueuePair<R>) -> Result<(), TestError> {
        while let Some(slot) = self.slots.iter().position(Option::is_none) {
            let Some((lba, blocks)) = self.next_piece() else {
                break;
            };
            match self.submit_one(id, slot, qpair, lba, blocks) {
                Ok(()) => self.slots[slot] = Some((lba, blocks)),
                Err(NvmeError::Disconnected { .. }) => {
                    self.retry.push_front((lba, blocks));
                    break;
                }
                Err(source) => {
                    return Err(TestError::Submit {
                        op: self.op,
                        nsid: self.ns.nsid(),
                        lba,
                        blocks,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn submit_one<R: Registers>(
        &mut self,
        id: u64,
        slot: usize,
        qpair: &mut QueuePair<R>,
        lba: u64,
        blocks: u32,
    ) -> Result<(), NvmeError> {
        let tag = (id << 32) | slot as u64;
        let block_bytes = self.ns.block_size_bytes() as usize;
        let len = blocks as usize * block_bytes;
        let offset = slot * self.chunk_blocks as usize * block_bytes;
        match (self.op, self.buffer.as_mut()) {
            (Op::Write(seed), Some(buffer)) => {
                for (index, block) in self.data[..len].chunks_exact_mut(block_bytes).enumerate() {
                    fill_block(block, self.ns.nsid(), lba + index as u64, seed);
                }
                buffer
                    .write_at(offset, &self.data[..len])
                    .map_err(|source| NvmeError::Dma {
                        what: "test data",
                        source,
                    })?;
                let iov = IoVec::from_dma_buffer(buffer, offset, len).map_err(|source| {
                    NvmeError::Dma {
                        what: "test data",
                        source,
                    }
                })?;
                qpair.submit_write(&self.ns, tag, lba, blocks, &[iov])
            }
            (Op::Read, Some(buffer)) => {
                let iov = IoVec::from_dma_buffer(buffer, offset, len).map_err(|source| {
                    NvmeError::Dma {
                        what: "test data",
                        source,
                    }
                })?;
                qpair.submit_read(&self.ns, tag, lba, blocks, &[iov])
            }
            (Op::WriteZeroes, _) => qpair.submit_write_zeroes(&self.ns, tag, lba, blocks),
            (Op::Deallocate, _) => qpair.submit_deallocate(&self.ns, tag, lba, blocks),
            (Op::Flush, _) => qpair.submit_flush(&self.ns, tag),
            _ => unreachable!("data commands always have a buffer"),
        }
    }

    fn complete(
        &mut self,
        slot: usize,
        status: Status,
        allow_retry: bool,
    ) -> Result<(), TestError> {
        let Some((lba, blocks)) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Err(TestError::Check(format!(
                "completion for slot {slot} of a {:?} stream that has nothing outstanding there",
                self.op
            )));
        };
        if !status.is_success() {
            let reset_abort =
                status.sct == StatusCodeType::Generic && status.sc == sc::ABORTED_SQ_DELETION;
            if allow_retry && reset_abort {
                self.retry.push_back((lba, blocks));
                self.stats.retried += 1;
                return Ok(());
            }
            return Err(TestError::Command {
                op: self.op,
                nsid: self.ns.nsid(),
                lba,
                blocks,
                status,
            });
        }
        if let (Op::Read, Some(buffer)) = (self.op, self.buffer.as_ref()) {
            let block_bytes = self.ns.block_size_bytes() as usize;
            let len = blocks as usize * block_bytes;
            let offset = slot * self.chunk_blocks as usize * block_bytes;
            buffer
                .read_at(offset, &mut self.data[..len])
                .map_err(|source| TestError::Dma {
                    what: "read data",
                    source,
                })?;
            for (index, block) in self.data[..len].chunks_exact(block_bytes).enumerate() {
                let block_lba = lba + index as u64;
                let state = self
                    .expect
                    .get(block_lba as usize)
                    .copied()
                    .unwrap_or(BlockState::Unknown);
                check_block(block, self.ns.nsid(), block_lba, state, &mut self.scratch)
                    .map_err(TestError::Check)?;
            }
        }
        self.stats.commands += 1;
        self.stats.blocks += u64::from(blocks);
        Ok(())
    }
}

/// One round on `qpair`: submit what fits for every stream, reap one batch, dispatch it.
/// Returns the completions handed back. `completions` is a reusable work area.
pub fn step<R: Registers>(
    qpair: &mut QueuePair<R>,
    streams: &mut [Stream<'_>],
    allow_retry: bool,
    completions: &mut Vec<(u64, Status)>,
) -> Result<u32, TestError> {
    for (id, stream) in streams.iter_mut().enumerate() {
        stream.submit(id as u64, qpair)?;
    }
    completions.clear();
    let reaped = match qpair.process_completions(POLL_BATCH, |tag, completion| {
        completions.push((tag, completion.status))
    }) {
        Ok(reaped) => reaped,
        Err(NvmeError::Disconnected { .. }) if allow_retry => 0,
        Err(source) => {
            return Err(TestError::Poll {
                qid: qpair.qid(),
                source,
            })
        }
    };
    for &(tag, status) in completions.iter() {
        let stream = streams
            .get_mut((tag >> 32) as usize)
            .ok_or_else(|| TestError::Check(format!("completion with unknown tag {tag:#x}")))?;
        stream.complete((tag & 0xffff_ffff) as usize, status, allow_retry)?;
    }
    Ok(reaped)
}

/// Drives `streams` on `qpair` to the end (no reset expected).
pub fn drive<R: Registers>(
    qpair: &mut QueuePair<R>,
    streams: &mut [Stream<'_>],
) -> Result<(), TestError> {
    let mut completions = Vec::with_capacity(POLL_BATCH as usize);
    let mut last_progress = Instant::now();
    while !streams.iter().all(Stream::finished) {
        if step(qpair, streams, false, &mut completions)? > 0 {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > STALL_LIMIT {
            return Err(TestError::Check(format!(
                "queue pair {} made no progress for {STALL_LIMIT:?} ({} in flight)",
                qpair.qid(),
                qpair.in_flight()
            )));
        }
    }
    Ok(())
}
