//! The delay bdev, as SPDK's `module/bdev/delay` (`bdev_delay_create`): a virtual bdev on top
//! of a base bdev that holds each I/O's completion back by a configured latency, to model a
//! slow device or to keep requests in flight on purpose (the vhost suite kills its target
//! while writes wait here, so that the restarted target must resubmit them).
//!
//! Parameters (SPDK's names, microseconds): `name`, `base_bdev_name`, `avg_read_latency`,
//! `p99_read_latency`, `avg_write_latency`, `p99_write_latency`, optional `uuid`. Reads wait
//! the read latencies; writes, write zeroes, unmap and flush the write latencies; reset none.
//! Where SPDK draws the 1 % of I/Os that get the p99 latency at random, here every 100th I/O
//! of a class on a channel gets it (deterministic, so tests can count on it).
//!
//! The base bdev is opened read-write and claimed (`delay:<name>`) while the delay bdev
//! exists, as SPDK's module claims its base; unregistering the delay bdev releases it. The
//! delay bdev has the base's geometry and I/O types.
//!
//! Each channel owns a channel to the base. An I/O goes to the base at once with the delay
//! channel's slot as tag; when the base completes it, it waits in one of five FIFOs (average
//! and p99 read, average and p99 write, no delay), each sorted by due time because its latency
//! is constant, and each poll completes the heads that are due. The FIFOs hold at most the
//! queue depth and are sized at channel creation (no allocation per I/O).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bdev::BdevDesc;
use crate::channel::BdevChannel;
use crate::clock;
use crate::config::{CreateContext, Params, PendingBdev};
use crate::error::BdevError;
use crate::module::{BackendChannel, BdevBackend, CompletionQueue, IoRequest};
use crate::types::{BdevInfo, BdevSpec, IoStatus, IoType, Uuid};
use crate::BdevRegistry;

/// The configuration method.
pub const METHOD: &str = "bdev_delay_create";

/// Every this many I/Os of one class on one channel, one gets the p99 latency (SPDK: 1 %).
const P99_EVERY: u32 = 100;

/// What a delay bdev is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayOptions {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub base_bdev_name: String,
    pub avg_read_latency_us: u64,
    pub p99_read_latency_us: u64,
    pub avg_write_latency_us: u64,
    pub p99_write_latency_us: u64,
}

/// The latencies in clock ticks, per class.
#[derive(Debug, Clone, Copy)]
struct Latencies {
    avg_read_ticks: u64,
    p99_read_ticks: u64,
    avg_write_ticks: u64,
    p99_write_ticks: u64,
}

struct DelayBackend {
    options: DelayOptions,
    /// Open read-write with the claim; dropped (claim released) with the delay bdev.
    base: BdevDesc,
    latencies: Latencies,
}

impl BdevBackend for DelayBackend {
    fn module_name(&self) -> &'static str {
        "delay"
    }

    fn supports(&self, io_type: IoType) -> bool {
        self.base.supports(io_type)
    }

    fn create_channel(&self, queue_depth: u16) -> Result<Box<dyn BackendChannel>, BdevError> {
        let depth = usize::from(queue_depth);
        Ok(Box::new(DelayChannel {
            base: self.base.channel(u32::from(queue_depth))?,
            latencies: self.latencies,
            waiting: std::array::from_fn(|_| VecDeque::with_capacity(depth)),
            read_count: 0,
            write_count: 0,
        }))
    }

    fn write_config(&self, info: &BdevInfo) -> serde_json::Value {
        let o = &self.options;
        serde_json::json!({
            "method": METHOD,
            "params": {
                "name": info.name,
                "uuid": info.uuid.to_string(),
                "base_bdev_name": o.base_bdev_name,
                "avg_read_latency": o.avg_read_latency_us,
                "p99_read_latency": o.p99_read_latency_us,
                "avg_write_latency": o.avg_write_latency_us,
                "p99_write_latency": o.p99_write_latency_us,
            }
        })
    }
}

/// Indices into [`DelayChannel::waiting`].
const AVG_READ: usize = 0;
const P99_READ: usize = 1;
const AVG_WRITE: usize = 2;
const P99_WRITE: usize = 3;
const NO_DELAY: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Waiting {
    due_ticks: u64,
    slot: u16,
    status: IoStatus,
}

struct DelayChannel {
    base: BdevChannel,
    latencies: Latencies,
    /// Completed by the base, waiting for their due time; one FIFO per latency class.
    waiting: [VecDeque<Waiting>; 5],
    read_count: u32,
    write_count: u32,
}

/// The FIFO an I/O of `io_type` waits in once the base completed it, and its latency in
/// ticks; counts the I/O in its class (every [`P99_EVERY`]th gets the p99 latency).
fn class_of(
    io_type: IoType,
    latencies: Latencies,
    read_count: &mut u32,
    write_count: &mut u32,
) -> (usize, u64) {
    match io_type {
        IoType::Read => {
            *read_count = (*read_count + 1) % P99_EVERY;
            if *read_count == 0 {
                (P99_READ, latencies.p99_read_ticks)
            } else {
                (AVG_READ, latencies.avg_read_ticks)
            }
        }
        IoType::Reset => (NO_DELAY, 0),
        _ => {
            *write_count = (*write_count + 1) % P99_EVERY;
            if *write_count == 0 {
                (P99_WRITE, latencies.p99_write_ticks)
            } else {
                (AVG_WRITE, latencies.avg_write_ticks)
            }
        }
    }
}

impl BackendChannel for DelayChannel {
    fn submit(&mut self, io: &IoRequest<'_>, done: &mut CompletionQueue) {
        // The delay channel's slots and the base channel's have the same count, so the base
        // always has a free slot for a delay slot; a refusal is completed, never lost.
        if let Err(error) = self.base.submit(
            u64::from(io.slot),
            io.io_type,
            io.offset_blocks,
            io.num_blocks,
            io.iovs,
        ) {
            tracing::error!(%error, slot = io.slot, "delay: base refused an I/O");
            done.complete(io.slot, IoStatus::Failed);
        }
    }

    fn poll(&mut self, done: &mut CompletionQueue) -> usize {
        let now = clock::ticks();
        let latencies = self.latencies;
        let Self {
            base,
            waiting,
            read_count,
            write_count,
            ..
        } = self;
        // Base completions (the tag is the delay slot) join their class's FIFO.
        base.poll(|_, completion| {
            let Ok(slot) = u16::try_from(completion.tag) else {
                tracing::error!(tag = completion.tag, "delay: base completed an unknown tag");
                return;
            };
            let (class, delay_ticks) =
                class_of(completion.io_type, latencies, read_count, write_count);
            waiting[class].push_back(Waiting {
                due_ticks: now.saturating_add(delay_ticks),
                slot,
                status: completion.status,
            });
        });
        let mut completed = 0;
        for queue in waiting.iter_mut() {
            while let Some(head) = queue.front().copied() {
                if head.due_ticks > now {
                    break;
                }
                queue.pop_front();
                done.complete(head.slot, head.status);
                completed += 1;
            }
        }
        completed
    }
}

fn us_to_ticks(us: u64) -> u64 {
    (us as f64 * clock::ticks_per_us()) as u64
}

/// Creates and registers a delay bdev on `options.base_bdev_name`, which it claims.
pub fn create(registry: &BdevRegistry, options: DelayOptions) -> Result<BdevInfo, BdevError> {
    let base = registry.open(&options.base_bdev_name, true, None)?;
    base.claim(&format!("delay:{}", options.name))?;
    let info = base.info().clone();
    let latencies = Latencies {
        avg_read_ticks: us_to_ticks(options.avg_read_latency_us),
        p99_read_ticks: us_to_ticks(options.p99_read_latency_us),
        avg_write_ticks: us_to_ticks(options.avg_write_latency_us),
        p99_write_ticks: us_to_ticks(options.p99_write_latency_us),
    };
    registry.register(
        BdevSpec {
            name: options.name.clone(),
            aliases: Vec::new(),
            uuid: options.uuid,
            block_size_bytes: info.block_size_bytes,
            num_blocks: info.num_blocks,
            required_alignment_bytes: info.required_alignment_bytes,
            write_cache: info.write_cache,
        },
        Arc::new(DelayBackend {
            options,
            base,
            latencies,
        }),
    )
}

const PARAMS: &[&str] = &[
    "name",
    "uuid",
    "base_bdev_name",
    "avg_read_latency",
    "p99_read_latency",
    "avg_write_latency",
    "p99_write_latency",
];

/// Parses `bdev_delay_create`'s parameters (SPDK's: all required but `uuid`; a p99 latency
/// below its average is refused, as SPDK does).
pub fn parse(params: &Params<'_>) -> Result<Box<dyn PendingBdev>, BdevError> {
    params.allow_only(PARAMS)?;
    let options = DelayOptions {
        name: params.required_str("name")?.to_string(),
        uuid: params.uuid("uuid")?,
        base_bdev_name: params.required_str("base_bdev_name")?.to_string(),
        avg_read_latency_us: params.required_u64("avg_read_latency")?,
        p99_read_latency_us: params.required_u64("p99_read_latency")?,
        avg_write_latency_us: params.required_u64("avg_write_latency")?,
        p99_write_latency_us: params.required_u64("p99_write_latency")?,
    };
    // An hour at most: far beyond any sensible model, and it keeps the tick math finite.
    const MAX_LATENCY_US: u64 = 3_600_000_000;
    for (key, value) in [
        ("avg_read_latency", options.avg_read_latency_us),
        ("p99_read_latency", options.p99_read_latency_us),
        ("avg_write_latency", options.avg_write_latency_us),
        ("p99_write_latency", options.p99_write_latency_us),
    ] {
        if value > MAX_LATENCY_US {
            return Err(params.invalid(key, "must be at most an hour (3600000000 us)"));
        }
    }
    if options.p99_read_latency_us < options.avg_read_latency_us {
        return Err(params.invalid("p99_read_latency", "must not be below avg_read_latency"));
    }
    if options.p99_write_latency_us < options.avg_write_latency_us {
        return Err(params.invalid("p99_write_latency", "must not be below avg_write_latency"));
    }
    Ok(Box::new(options))
}

impl PendingBdev for DelayOptions {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn create(self: Box<Self>, ctx: &CreateContext<'_>) -> Result<BdevInfo, BdevError> {
        create(ctx.registry, *self)
    }
}
