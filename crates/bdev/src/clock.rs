//! A cheap timestamp for I/O latencies: the TSC on x86_64 (one `rdtsc`, about 7 ns, against
//! 20 ns or more for `Instant::now()` through the vDSO, and several times that under a
//! hypervisor's clocksource), nanoseconds since a process epoch elsewhere. The tick rate is
//! calibrated once, against `Instant`, the first time a report asks for it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The current tick count. Only differences mean anything.
#[inline]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `rdtsc` has no preconditions and exists on every x86_64 CPU; it reads a
        // counter and touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per microsecond, measured once over 20 ms (setup path; blocks the caller that long
/// the first time).
pub fn ticks_per_us() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return 1000.0;
        }
        let start_instant = Instant::now();
        let start_ticks = ticks();
        std::thread::sleep(Duration::from_millis(20));
        let elapsed_us = start_instant.elapsed().as_secs_f64() * 1e6;
        let elapsed_ticks = ticks().wrapping_sub(start_ticks) as f64;
        let rate = elapsed_ticks / elapsed_us;
        tracing::debug!(ticks_per_us = rate, "bdev clock calibrated");
        if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1000.0
        }
    })
}

/// Converts a tick count to microseconds.
pub fn ticks_to_us(ticks: u64) -> f64 {
    ticks as f64 / ticks_per_us()
}
