//! Statistics, written by the one OS thread that owns a reactor, thread or poller and readable
//! from any thread. Times are nanoseconds of `std::time::Instant` (CLOCK_MONOTONIC), not TSC.
//!
//! Each counter block sits alone on its cache lines (`CachePadded`): the owner writes it every
//! loop, and without padding those writes would invalidate the line holding neighbouring state
//! that other cores read or write (the message-queue gate, another reactor's counters).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::thread::ThreadId;

/// A counter with a single writer. `add` is a relaxed load and store rather than `fetch_add`:
/// only the owning OS thread writes, so no locked read-modify-write is needed; readers on other
/// cores see a recent value.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, amount: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(amount),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub(crate) fn add_duration(&self, duration: Duration) {
        self.add(duration.as_nanos().min(u64::MAX as u128) as u64);
    }

    #[inline]
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Reactor counters (one writer: the reactor's OS thread).
#[derive(Debug, Default)]
pub(crate) struct ReactorCounters {
    pub(crate) busy_ns: Counter,
    pub(crate) idle_ns: Counter,
    pub(crate) loops: Counter,
    pub(crate) sleeps: Counter,
    pub(crate) threads: AtomicU64,
}

/// Thread counters (one writer: the OS thread of the reactor running the thread).
#[derive(Debug, Default)]
pub(crate) struct ThreadCounters {
    pub(crate) busy_ns: Counter,
    pub(crate) idle_ns: Counter,
    pub(crate) messages: Counter,
    pub(crate) polls: Counter,
}

/// Poller counters (one writer: the poller's thread).
#[derive(Debug, Default)]
pub(crate) struct PollerCounters {
    pub(crate) runs: Counter,
    pub(crate) busy_runs: Counter,
    pub(crate) paused: AtomicBool,
}

/// A snapshot of one reactor's statistics, as SPDK's `framework_get_reactors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactorStats {
    /// Core the reactor is pinned to (its index in the mask for a manual harness).
    pub core: usize,
    /// Time spent in loops where some thread did work, in nanoseconds.
    pub busy_ns: u64,
    /// Time spent in loops where nothing did work, including time asleep, in nanoseconds.
    pub idle_ns: u64,
    /// Loop iterations.
    pub loops: u64,
    /// Times the reactor slept in epoll (interrupt mode only).
    pub sleeps: u64,
    /// Lightweight threads currently on the reactor.
    pub threads: u64,
    /// Whether the reactor runs in interrupt mode.
    pub interrupt_mode: bool,
}

/// Whether a poller runs every loop or on a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollerKind {
    /// Runs every loop of its thread.
    Active,
    /// Runs when `period_us` has passed since its last run.
    Timed { period_us: u64 },
}

/// A snapshot of one poller's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollerStats {
    pub id: u64,
    pub name: String,
    pub kind: PollerKind,
    pub paused: bool,
    /// Calls.
    pub runs: u64,
    /// Calls that returned `PollStatus::Busy`.
    pub busy_runs: u64,
}

/// A snapshot of one lightweight thread's statistics, as SPDK's `thread_get_stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadStats {
    pub id: ThreadId,
    pub name: String,
    /// Core of the reactor the thread runs on.
    pub core: usize,
    /// Time in polls that did work, in nanoseconds.
    pub busy_ns: u64,
    /// Time in polls that did nothing, in nanoseconds.
    pub idle_ns: u64,
    /// Messages executed.
    pub messages: u64,
    /// Polls of the thread.
    pub polls: u64,
    pub pollers: Vec<PollerStats>,
}
