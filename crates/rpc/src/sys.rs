//! The crate's one system call without a safe wrapper in std: `poll(2)`, so that the server
//! thread sleeps until a socket is ready or a reply arrives (no timer ticks when idle).

use std::io;

pub(crate) use libc::{pollfd, POLLIN, POLLOUT};

/// Waits until one of `fds` is ready or `timeout_ms` passes (-1: no timeout). Returns the
/// number of ready entries (0 on timeout or when interrupted by a signal).
pub(crate) fn poll(fds: &mut [pollfd], timeout_ms: i32) -> io::Result<usize> {
    let count = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds to poll"))?;
    // SAFETY: `fds` is a live, exclusively borrowed slice of `count` initialised `pollfd`s;
    // the kernel writes only their `revents` fields and keeps no pointer after returning.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), count, timeout_ms) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(error);
    }
    Ok(usize::try_from(ready).unwrap_or(0))
}
