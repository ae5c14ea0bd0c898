//! Thin wrappers over the Linux calls interrupt mode and pinning need: eventfd, timerfd, epoll,
//! sched_{get,set}affinity. Every fd is an `OwnedFd`, closed on drop.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use pollux_env::cpumask::{CpuMask, MAX_CORES};

use crate::error::{sys_error, ReactorError};

/// A non-blocking eventfd used as a doorbell.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> Result<Self, ReactorError> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(sys_error("eventfd"));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the counter. A full counter (EAGAIN) already means "readable", so errors are
    /// ignored: the doorbell is rung either way.
    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (non-blocking; nothing to read is fine).
    pub(crate) fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from an fd we own.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A non-blocking monotonic timerfd (one-shot).
#[derive(Debug)]
pub(crate) struct TimerFd(OwnedFd);

impl TimerFd {
    pub(crate) fn new() -> Result<Self, ReactorError> {
        // SAFETY: timerfd_create has no memory preconditions; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(sys_error("timerfd_create"));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Arms the timer to fire once after `after` (at least 1 ns: zero would disarm it), or
    /// disarms it with `None`.
    pub(crate) fn arm(&self, after: Option<Duration>) -> Result<(), ReactorError> {
        let value = match after {
            Some(delay) => {
                let delay = delay.max(Duration::from_nanos(1));
                libc::timespec {
                    tv_sec: delay.as_secs().min(i64::MAX as u64) as libc::time_t,
                    tv_nsec: delay.subsec_nanos() as libc::c_long,
                }
            }
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is a live itimerspec; a null old_value is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(sys_error("timerfd_settime"));
        }
        Ok(())
    }

    pub(crate) fn drain(&self) {
        let mut expirations: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from an fd we own.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut expirations as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll instance; tokens are the `u64` data of each registration.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> Result<Self, ReactorError> {
        // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(sys_error("epoll_create1"));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for readability (level-triggered). The caller keeps `fd` open until `remove`.
    pub(crate) fn add(&self, fd: RawFd, token: u64) -> Result<(), ReactorError> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `event` is a live epoll_event; epoll_ctl does not keep the pointer. A bad fd
        // is reported as an error, not undefined behaviour.
        let rc =
            unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 {
            return Err(sys_error("epoll_ctl(ADD)"));
        }
        Ok(())
    }

    pub(crate) fn remove(&self, fd: RawFd) -> Result<(), ReactorError> {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since Linux 2.6.9.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(sys_error("epoll_ctl(DEL)"));
        }
        Ok(())
    }

    /// Waits for events (`timeout_ms` -1: forever, 0: do not block); fills `tokens` with the
    /// tokens of the ready fds. EINTR counts as zero events.
    pub(crate) fn wait(&self, tokens: &mut Vec<u64>, timeout_ms: i32) -> Result<(), ReactorError> {
        const MAX_EVENTS: usize = 32;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        tokens.clear();
        // SAFETY: `events` is a live array of MAX_EVENTS entries, the count passed.
        let count = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                MAX_EVENTS as libc::c_int,
                timeout_ms,
            )
        };
        if count < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(sys_error("epoll_wait"));
        }
        tokens.extend(events[..count as usize].iter().map(|event| event.u64));
        Ok(())
    }
}

/// The calling OS thread's scheduler affinity.
pub(crate) fn current_affinity() -> Result<CpuMask, ReactorError> {
    // SAFETY: cpu_set_t is plain data and all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(sys_error("sched_getaffinity"));
    }
    let limit = (libc::CPU_SETSIZE as usize).min(MAX_CORES);
    let mut mask = CpuMask::new();
    for core in 0..limit {
        // SAFETY: core is below CPU_SETSIZE, the size of `set`.
        if unsafe { libc::CPU_ISSET(core, &set) } {
            mask.set(core);
        }
    }
    Ok(mask)
}

/// Sets the calling OS thread's scheduler affinity.
pub(crate) fn set_affinity(mask: &CpuMask) -> Result<(), ReactorError> {
    // SAFETY: cpu_set_t is plain data and all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for core in mask
        .iter()
        .filter(|core| *core < libc::CPU_SETSIZE as usize)
    {
        // SAFETY: core is below CPU_SETSIZE, the size of `set`.
        unsafe { libc::CPU_SET(core, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(sys_error("sched_setaffinity"));
    }
    Ok(())
}
