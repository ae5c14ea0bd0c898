//! I/O statistics: operations and bytes per I/O type, latency min / max / total and a
//! log-linear latency histogram (HdrHistogram's layout with 16 sub-buckets per power of two:
//! at most 1/16 = 6.25 % relative error, one `leading_zeros` to find a bucket, 8 KiB).
//!
//! A channel keeps its own `IoStats` (plain integers: only its owner writes them) and hands
//! its bdev a copy every 10 ms while busy and once after going idle (a `try_lock`, never a
//! wait); the bdev adds its closed channels' totals to those snapshots. Nothing is shared
//! per I/O.

use crate::clock;
use crate::types::{IoStatus, IoType};

/// log2 of the sub-buckets per power of two.
const SUB_BUCKET_BITS: u32 = 4;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Values below `SUB_BUCKETS` get one bucket each; then 16 per power of two up to 2^64.
pub const HISTOGRAM_BUCKETS: usize = SUB_BUCKETS + (64 - SUB_BUCKET_BITS as usize) * SUB_BUCKETS;

/// A log-linear histogram of tick counts.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Box<[u64; HISTOGRAM_BUCKETS]>,
    count: u64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: Box::new([0; HISTOGRAM_BUCKETS]),
            count: 0,
        }
    }
}

#[inline]
fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BUCKET_BITS;
    let sub = ((value >> shift) as usize) & (SUB_BUCKETS - 1);
    SUB_BUCKETS + (shift as usize) * SUB_BUCKETS + sub
}

/// The smallest and largest values of a bucket.
fn bucket_range(bucket: usize) -> (u64, u64) {
    if bucket < SUB_BUCKETS {
        return (bucket as u64, bucket as u64);
    }
    let shift = ((bucket - SUB_BUCKETS) / SUB_BUCKETS) as u32;
    let sub = ((bucket - SUB_BUCKETS) % SUB_BUCKETS) as u64;
    let low = (SUB_BUCKETS as u64 + sub) << shift;
    let width = 1u64 << shift;
    (low, low.saturating_add(width - 1))
}

impl LatencyHistogram {
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.buckets[bucket_of(value)] += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
    }

    /// The value at or below which `percent` % of the samples lie (the upper edge of the
    /// bucket holding that rank); 0 when empty.
    pub fn percentile(&self, percent: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((percent / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_range(bucket).1;
            }
        }
        bucket_range(HISTOGRAM_BUCKETS - 1).1
    }
}

/// Operations and bytes of one I/O type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeStats {
    /// Completed successfully.
    pub ops: u64,
    pub bytes: u64,
    /// Completed with any other status.
    pub errors: u64,
}

/// Statistics of a channel or (summed) of a bdev.
#[derive(Debug, Clone)]
pub struct IoStats {
    pub per_type: [TypeStats; IoType::COUNT],
    /// Latency of successful I/Os, in clock ticks ([`clock::ticks_per_us`]).
    pub latency_ticks_min: u64,
    pub latency_ticks_max: u64,
    pub latency_ticks_total: u64,
    pub histogram: LatencyHistogram,
}

impl Default for IoStats {
    fn default() -> Self {
        Self {
            per_type: [TypeStats::default(); IoType::COUNT],
            latency_ticks_min: u64::MAX,
            latency_ticks_max: 0,
            latency_ticks_total: 0,
            histogram: LatencyHistogram::default(),
        }
    }
}

/// A summary in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummaryUs {
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
}

impl IoStats {
    #[inline]
    pub(crate) fn record(
        &mut self,
        io_type: IoType,
        bytes: u64,
        latency_ticks: u64,
        status: IoStatus,
    ) {
        let per_type = &mut self.per_type[io_type.index()];
        if !status.is_success() {
            per_type.errors += 1;
            return;
        }
        per_type.ops += 1;
        per_type.bytes += bytes;
        self.latency_ticks_min = self.latency_ticks_min.min(latency_ticks);
        self.latency_ticks_max = self.latency_ticks_max.max(latency_ticks);
        self.latency_ticks_total += latency_ticks;
        self.histogram.record(latency_ticks);
    }

    pub fn merge(&mut self, other: &IoStats) {
        for (mine, theirs) in self.per_type.iter_mut().zip(other.per_type.iter()) {
            mine.ops += theirs.ops;
            mine.bytes += theirs.bytes;
            mine.errors += theirs.errors;
        }
        self.latency_ticks_min = self.latency_ticks_min.min(other.latency_ticks_min);
        self.latency_ticks_max = self.latency_ticks_max.max(other.latency_ticks_max);
        self.latency_ticks_total += other.latency_ticks_total;
        self.histogram.merge(&other.histogram);
    }

    /// Successful operations of every type.
    pub fn ops_total(&self) -> u64 {
        self.per_type.iter().map(|t| t.ops).sum()
    }

    pub fn bytes_total(&self) -> u64 {
        self.per_type.iter().map(|t| t.bytes).sum()
    }

    pub fn errors_total(&self) -> u64 {
        self.per_type.iter().map(|t| t.errors).sum()
    }

    /// Latencies in microseconds (calibrates the clock on first use).
    pub fn latency_us(&self) -> LatencySummaryUs {
        let count = self.histogram.count();
        if count == 0 {
            return LatencySummaryUs::default();
        }
        let us = clock::ticks_to_us;
        // A bucket's upper edge can lie past the largest sample: a percentile never does.
        let (lowest, highest) = (
            self.latency_ticks_min,
            self.latency_ticks_max.max(self.latency_ticks_min),
        );
        let at = |percent: f64| us(self.histogram.percentile(percent).clamp(lowest, highest));
        LatencySummaryUs {
            avg: us(self.latency_ticks_total) / count as f64,
            min: us(self.latency_ticks_min),
            max: us(self.latency_ticks_max),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            p99_9: at(99.9),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for value in (0..5000u64).chain([u64::MAX / 3, u64::MAX]) {
            let bucket = bucket_of(value);
            assert!(bucket < HISTOGRAM_BUCKETS);
            assert!(bucket >= last, "monotonic at {value}");
            let (low, high) = bucket_range(bucket);
            assert!(low <= value && value <= high, "{value} in [{low}, {high}]");
            last = bucket;
        }
    }

    #[test]
    fn percentiles_within_bucket_precision() {
        let mut histogram = LatencyHistogram::default();
        for value in 1..=10_000u64 {
            histogram.record(value);
        }
        for (percent, exact) in [
            (50.0, 5000.0),
            (90.0, 9000.0),
            (99.0, 9900.0),
            (99.9, 9990.0),
        ] {
            let got = histogram.percentile(percent) as f64;
            assert!(
                (got - exact).abs() / exact <= 1.0 / 16.0,
                "p{percent}: {got} vs {exact}"
            );
        }
        assert_eq!(LatencyHistogram::default().percentile(99.0), 0);
    }

    #[test]
    fn stats_count_successes_and_errors_apart() {
        let mut stats = IoStats::default();
        stats.record(IoType::Read, 4096, 100, IoStatus::Success);
        stats.record(IoType::Read, 4096, 300, IoStatus::Success);
        stats.record(IoType::Write, 4096, 50, IoStatus::OutOfRange);
        assert_eq!(stats.per_type[IoType::Read.index()].ops, 2);
        assert_eq!(stats.per_type[IoType::Read.index()].bytes, 8192);
        assert_eq!(stats.per_type[IoType::Write.index()].errors, 1);
        assert_eq!(
            (stats.latency_ticks_min, stats.latency_ticks_max),
            (100, 300)
        );
        // Percentiles stay within the samples (a bucket's edge may not).
        let summary = stats.latency_us();
        for p in [summary.p50, summary.p90, summary.p99, summary.p99_9] {
            assert!(summary.min <= p && p <= summary.max, "{summary:?}");
        }
        let mut sum = IoStats::default();
        sum.merge(&stats);
        sum.merge(&stats);
        assert_eq!(sum.ops_total(), 4);
        assert_eq!(sum.latency_ticks_total, 800);
    }
}
