//! Per-bdev rate limits, SPDK's bdev QoS (`bdev_set_qos_limit`): I/Os per second and
//! MiB per second for reads and writes together, and MiB per second for each alone.
//!
//! A token bucket per limit, refilled every [`QOS_TIMESLICE_US`] with one timeslice's share
//! of the rate, shared by every channel of the bdev (atomics: channels on several reactors
//! draw from it without a lock or a message). An I/O may start while every limit that
//! applies to it has tokens left, and then takes its whole cost, so a bucket can go below
//! zero; a deficit is carried into the next timeslice (large I/Os are not starved) and a
//! surplus is not (an idle bdev does not save up a burst), as SPDK does. The refill is lazy
//! (the first look in a new timeslice), so timeslices in which no channel looked, because the
//! bdev was idle or its reactor was descheduled, are credited up to
//! [`QOS_MAX_MISSED_TIMESLICES`]: SPDK's QoS poller credits every timeslice it ran late for,
//! and without this a reactor that loses the CPU for a few milliseconds loses that much rate.
//! Only reads and writes are limited; flush, unmap, write zeroes and reset pass.
//!
//! Two channels may both see the last token in a race and both start: the overshoot is one
//! I/O per racing channel, and paid back in the next timeslice.
//!
//! An I/O over the limit waits in its channel (FIFO, in its own slot) and starts from the
//! channel's poll once tokens are back; its latency includes the wait. With no limit set the
//! I/O path reads one flag per submit and nothing more.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use crate::clock;
use crate::types::IoType;

/// The refill period of every bucket (SPDK's `SPDK_BDEV_QOS_TIMESLICE_IN_USEC`).
pub const QOS_TIMESLICE_US: u64 = 1000;
/// I/O limits are multiples of this (SPDK's `SPDK_BDEV_QOS_MIN_IOS_PER_SEC`), so that each
/// timeslice gets a whole number of I/Os.
pub const QOS_MIN_IOS_PER_SEC: u64 = 1000;
/// Timeslices credited at most at one refill: what a reactor may miss (descheduled, a long
/// poll) without losing rate, and the largest burst an idle bdev may start with.
pub const QOS_MAX_MISSED_TIMESLICES: u64 = 4;
/// The `*_mbytes_per_sec` unit: MiB, as SPDK counts it.
pub const QOS_MBYTE: u64 = 1024 * 1024;

/// The four limits; 0: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub rw_ios_per_sec: u64,
    pub rw_mbytes_per_sec: u64,
    pub r_mbytes_per_sec: u64,
    pub w_mbytes_per_sec: u64,
}

/// `bdev_set_qos_limit`'s parameters: `None` leaves that limit as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QosUpdate {
    pub rw_ios_per_sec: Option<u64>,
    pub rw_mbytes_per_sec: Option<u64>,
    pub r_mbytes_per_sec: Option<u64>,
    pub w_mbytes_per_sec: Option<u64>,
}

impl QosLimits {
    /// SPDK's parameter names, in its order.
    pub const NAMES: [&'static str; 4] = [
        "rw_ios_per_sec",
        "rw_mbytes_per_sec",
        "r_mbytes_per_sec",
        "w_mbytes_per_sec",
    ];

    pub fn is_unlimited(&self) -> bool {
        self.as_array().iter().all(|&limit| limit == 0)
    }

    /// The limits in [`QosLimits::NAMES`] order.
    pub fn as_array(&self) -> [u64; 4] {
        [
            self.rw_ios_per_sec,
            self.rw_mbytes_per_sec,
            self.r_mbytes_per_sec,
            self.w_mbytes_per_sec,
        ]
    }

    /// These limits with `update` applied.
    pub fn updated(&self, update: &QosUpdate) -> Self {
        Self {
            rw_ios_per_sec: update.rw_ios_per_sec.unwrap_or(self.rw_ios_per_sec),
            rw_mbytes_per_sec: update.rw_mbytes_per_sec.unwrap_or(self.rw_mbytes_per_sec),
            r_mbytes_per_sec: update.r_mbytes_per_sec.unwrap_or(self.r_mbytes_per_sec),
            w_mbytes_per_sec: update.w_mbytes_per_sec.unwrap_or(self.w_mbytes_per_sec),
        }
    }

    /// Each limit's tokens per timeslice (I/Os, then bytes); 0: unlimited.
    fn per_timeslice(&self) -> [i64; 4] {
        let slices_per_sec = 1_000_000 / QOS_TIMESLICE_US;
        let ios = self.rw_ios_per_sec / slices_per_sec;
        let bytes = |mbytes: u64| {
            mbytes
                .saturating_mul(QOS_MBYTE)
                .div_ceil(slices_per_sec)
                .min(i64::MAX as u64 / 2)
        };
        [
            ios.min(i64::MAX as u64 / 2) as i64,
            bytes(self.rw_mbytes_per_sec) as i64,
            bytes(self.r_mbytes_per_sec) as i64,
            bytes(self.w_mbytes_per_sec) as i64,
        ]
    }
}

impl QosUpdate {
    /// The I/O limit must be a multiple of [`QOS_MIN_IOS_PER_SEC`]; the byte limits are
    /// whole MiB by their unit. Returns the parameter at fault and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(ios) = self.rw_ios_per_sec {
            if ios % QOS_MIN_IOS_PER_SEC != 0 {
                return Err((
                    "rw_ios_per_sec",
                    format!("{ios} is not a multiple of {QOS_MIN_IOS_PER_SEC} (0: unlimited)"),
                ));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

const IOS: usize = 0;
const RW_BYTES: usize = 1;
const R_BYTES: usize = 2;
const W_BYTES: usize = 3;

/// A bdev's buckets, shared by its channels.
pub(crate) struct QosBucket {
    /// Some limit is set: the only field the I/O path reads when none is.
    active: AtomicBool,
    limits: [AtomicU64; 4],
    per_timeslice: [AtomicI64; 4],
    remaining: [AtomicI64; 4],
    /// The timeslice (clock ticks / timeslice ticks) whose tokens `remaining` holds.
    timeslice: AtomicU64,
    timeslice_ticks: u64,
}

impl std::fmt::Debug for QosBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QosBucket")
            .field("limits", &self.limits())
            .finish()
    }
}

impl Default for QosBucket {
    fn default() -> Self {
        Self {
            active: AtomicBool::new(false),
            limits: Default::default(),
            per_timeslice: Default::default(),
            remaining: Default::default(),
            timeslice: AtomicU64::new(0),
            timeslice_ticks: ((QOS_TIMESLICE_US as f64 * clock::ticks_per_us()) as u64).max(1),
        }
    }
}

impl QosBucket {
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub(crate) fn limits(&self) -> QosLimits {
        let [a, b, c, d] = &self.limits;
        QosLimits {
            rw_ios_per_sec: a.load(Ordering::Relaxed),
            rw_mbytes_per_sec: b.load(Ordering::Relaxed),
            r_mbytes_per_sec: c.load(Ordering::Relaxed),
            w_mbytes_per_sec: d.load(Ordering::Relaxed),
        }
    }

    /// Installs new limits with full buckets (the setup path; callers serialise it).
    pub(crate) fn set(&self, limits: QosLimits) {
        self.active.store(false, Ordering::Release);
        let per_timeslice = limits.per_timeslice();
        for (index, limit) in limits.as_array().into_iter().enumerate() {
            self.limits[index].store(limit, Ordering::Relaxed);
            self.per_timeslice[index].store(per_timeslice[index], Ordering::Relaxed);
            self.remaining[index].store(per_timeslice[index], Ordering::Relaxed);
        }
        self.timeslice
            .store(clock::ticks() / self.timeslice_ticks, Ordering::Relaxed);
        self.active.store(!limits.is_unlimited(), Ordering::Release);
    }

    /// Takes the tokens of one I/O if every limit that applies has some left; `false`: it
    /// must wait. Types other than read and write always pass.
    pub(crate) fn try_take(&self, now_ticks: u64, io_type: IoType, bytes: u64) -> bool {
        let costs: [i64; 4] = {
            let bytes = bytes.min(i64::MAX as u64) as i64;
            match io_type {
                IoType::Read => [1, bytes, bytes, 0],
                IoType::Write => [1, bytes, 0, bytes],
                _ => return true,
            }
        };
        self.refill(now_ticks);
        let applies = |k: usize| costs[k] > 0 && self.per_timeslice[k].load(Ordering::Relaxed) > 0;
        if (0..4).any(|k| applies(k) && self.remaining[k].load(Ordering::Relaxed) <= 0) {
            return false;
        }
        for k in [IOS, RW_BYTES, R_BYTES, W_BYTES] {
            if applies(k) {
                self.remaining[k].fetch_sub(costs[k], Ordering::Relaxed);
            }
        }
        true
    }

    /// At the first look in a new timeslice: the tokens of the timeslices since the last
    /// refill (at most [`QOS_MAX_MISSED_TIMESLICES`]) onto each bucket, the deficit kept and
    /// the surplus dropped. The channel that wins the exchange refills.
    fn refill(&self, now_ticks: u64) {
        let now = now_ticks / self.timeslice_ticks;
        let seen = self.timeslice.load(Ordering::Relaxed);
        if now <= seen
            || self
                .timeslice
                .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // `now > seen`, so at least one; bounded, so the product cannot overflow.
        let slices = (now - seen).min(QOS_MAX_MISSED_TIMESLICES) as i64;
        for k in 0..4 {
            let per = self.per_timeslice[k].load(Ordering::Relaxed);
            if per == 0 {
                continue;
            }
            let per = per.saturating_mul(slices);
            // Only fails when the closure returns None, which it never does.
            let _ = self.remaining[k].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.min(0).saturating_add(per))
            });
        }
    }

    #[cfg(test)]
    pub(crate) fn timeslice_ticks(&self) -> u64 {
        self.timeslice_ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(ios: u64, rw_mb: u64, r_mb: u64, w_mb: u64) -> QosLimits {
        QosLimits {
            rw_ios_per_sec: ios,
            rw_mbytes_per_sec: rw_mb,
            r_mbytes_per_sec: r_mb,
            w_mbytes_per_sec: w_mb,
        }
    }

    #[test]
    fn an_io_limit_admits_its_share_per_timeslice_and_refills_without_saving_up() {
        let bucket = QosBucket::default();
        bucket.set(limits(10_000, 0, 0, 0));
        assert!(bucket.is_active());
        let slice = bucket.timeslice_ticks();
        let start = bucket.timeslice.load(Ordering::Relaxed) * slice;
        let admitted = (0..100)
            .filter(|_| bucket.try_take(start, IoType::Read, 4096))
            .count();
        assert_eq!(admitted, 10, "10000/s is 10 per 1 ms timeslice");
        // Flush is not limited.
        assert!(bucket.try_take(start, IoType::Flush, 0));
        // The next timeslice: its share.
        let next = start + slice;
        let admitted = (0..100)
            .filter(|_| bucket.try_take(next, IoType::Read, 4096))
            .count();
        assert_eq!(admitted, 10);
        // Two timeslices later (one missed, as by a descheduled reactor): both shares.
        let after_a_gap = next + 2 * slice;
        let admitted = (0..100)
            .filter(|_| bucket.try_take(after_a_gap, IoType::Read, 4096))
            .count();
        assert_eq!(admitted, 20);
        // Long idle: at most QOS_MAX_MISSED_TIMESLICES shares, however long.
        let later = after_a_gap + 1000 * slice;
        let admitted = (0..100)
            .filter(|_| bucket.try_take(later, IoType::Write, 4096))
            .count();
        assert_eq!(admitted, 10 * QOS_MAX_MISSED_TIMESLICES as usize);
    }

    #[test]
    fn a_byte_deficit_is_carried_into_the_next_timeslices() {
        let bucket = QosBucket::default();
        // 1 MiB/s of writes: 1049 bytes per timeslice; a 64 KiB write leaves a deficit that
        // 62 timeslices pay back.
        bucket.set(limits(0, 0, 0, 1));
        let slice = bucket.timeslice_ticks();
        let start = bucket.timeslice.load(Ordering::Relaxed) * slice;
        assert!(bucket.try_take(start, IoType::Write, 65536));
        assert!(
            bucket.try_take(start, IoType::Read, 65536),
            "reads are not limited"
        );
        let mut now = start;
        let mut waited = 0;
        while !bucket.try_take(now, IoType::Write, 65536) {
            now += slice;
            waited += 1;
        }
        assert_eq!(waited, 62);
    }

    #[test]
    fn clearing_every_limit_deactivates_and_updates_keep_what_they_omit() {
        let bucket = QosBucket::default();
        bucket.set(limits(2000, 10, 0, 0));
        let update = QosUpdate {
            rw_ios_per_sec: Some(0),
            ..QosUpdate::default()
        };
        let kept = bucket.limits().updated(&update);
        assert_eq!(kept, limits(0, 10, 0, 0));
        bucket.set(kept.updated(&QosUpdate {
            rw_mbytes_per_sec: Some(0),
            ..QosUpdate::default()
        }));
        assert!(!bucket.is_active());
        assert!(bucket.limits().is_unlimited());
    }

    #[test]
    fn an_io_limit_not_a_multiple_of_1000_is_refused() {
        let update = QosUpdate {
            rw_ios_per_sec: Some(1500),
            ..QosUpdate::default()
        };
        let (param, reason) = update.check().expect_err("1500");
        assert_eq!(param, "rw_ios_per_sec");
        assert!(reason.contains("multiple of 1000"), "{reason}");
        assert!(QosUpdate::default().is_empty());
    }
}
