//! Wake-up fds for interrupt mode: what a bdev module hands its owner so that an idle reactor
//! can sleep in `epoll_wait` while I/O is in flight (SPDK's `spdk_interrupt_register` on a
//! module's eventfd).
//!
//! - [`WakeFd`]: a non-blocking eventfd a module signals itself (a completion queued without
//!   any kernel event, a submission to retry) or hands to the kernel (AIO's
//!   `IOCB_FLAG_RESFD`, io_uring's registered eventfd).
//! - [`WakeTimer`]: a non-blocking periodic timerfd, for a device that raises no interrupt
//!   (the polled NVMe driver): armed while I/O is outstanding, disarmed when idle.
//!
//! Both are non-blocking, so a drain on an fd that is not readable returns at once: a
//! reactor thread never blocks on them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A non-blocking eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`).
#[derive(Debug)]
pub struct WakeFd(OwnedFd);

impl WakeFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable (adds one to the counter). A saturated counter (EAGAIN) is
    /// readable already, so the result is ignored.
    #[inline]
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd this value owns.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter; returns what it held (0: it was not readable).
    pub fn drain(&self) -> u64 {
        drain(self.0.as_fd())
    }
}

impl AsFd for WakeFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A non-blocking periodic timerfd on `CLOCK_MONOTONIC`, disarmed when created.
#[derive(Debug)]
pub struct WakeTimer {
    fd: OwnedFd,
    armed: bool,
}

impl WakeTimer {
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no memory preconditions; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: false,
        })
    }

    /// Whether the timer is armed (as this value last set it).
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Fires every `period` from now on (at least 1 us), until [`WakeTimer::stop`]. One
    /// system call; nothing when already armed.
    pub fn start(&mut self, period: Duration) -> io::Result<()> {
        if self.armed {
            return Ok(());
        }
        let period = period.max(Duration::from_micros(1));
        let spec = timespec(period);
        self.settime(libc::itimerspec {
            it_interval: spec,
            it_value: spec,
        })?;
        self.armed = true;
        Ok(())
    }

    /// Disarms the timer (and clears expirations not yet read). Nothing when disarmed.
    pub fn stop(&mut self) -> io::Result<()> {
        if !self.armed {
            return Ok(());
        }
        let zero = timespec(Duration::ZERO);
        self.settime(libc::itimerspec {
            it_interval: zero,
            it_value: zero,
        })?;
        self.armed = false;
        Ok(())
    }

    /// Reads the expirations (0: none).
    pub fn drain(&self) -> u64 {
        drain(self.fd.as_fd())
    }

    fn settime(&self, spec: libc::itimerspec) -> io::Result<()> {
        // SAFETY: `spec` is a live itimerspec read by the call; a null old_value is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for WakeTimer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn timespec(duration: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: duration.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: duration.subsec_nanos() as libc::c_long,
    }
}

/// Reads the 8-byte counter of a non-blocking eventfd or timerfd; 0 when not readable.
pub fn drain(fd: BorrowedFd<'_>) -> u64 {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 from a valid fd; a non-blocking fd that
    // is not readable returns EAGAIN, which leaves `value` at 0.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    if n == 8 {
        value
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_fd_signals_and_drains() {
        let fd = WakeFd::new().expect("eventfd");
        assert_eq!(fd.drain(), 0, "a fresh eventfd is not readable");
        fd.signal();
        fd.signal();
        assert_eq!(fd.drain(), 2);
        assert_eq!(fd.drain(), 0);
    }

    #[test]
    fn wake_timer_fires_while_started_only() {
        let mut timer = WakeTimer::new().expect("timerfd");
        assert_eq!(timer.drain(), 0);
        timer.start(Duration::from_micros(50)).expect("start");
        assert!(timer.is_armed());
        let mut fired = 0;
        for _ in 0..1000 {
            fired += timer.drain();
            if fired > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(fired > 0, "a started timer fires");
        timer.stop().expect("stop");
        assert!(!timer.is_armed());
        timer.drain();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(timer.drain(), 0, "a stopped timer stays quiet");
    }
}
