//! The socket calls std has no safe form of: receiving straight into DMA memory (which is
//! never turned into a Rust reference, see `pollux_env::dma`) or into a bdev I/O's iovecs
//! (the initiator), and gathering a batch of PDU pieces (headers in ordinary memory, data in
//! DMA memory or iovecs) into one `sendmsg`.

use std::io;
use std::os::fd::RawFd;

use pollux_env::dma::DmaBuffer;
use pollux_env::iovec::IoVec;

/// Receives at most `len` bytes into `buffer[offset..offset + len]` without blocking.
/// `Ok(0)` is the peer's orderly shutdown. The range is checked against the buffer.
///
/// The caller keeps the range otherwise unused while it is being received (the connection's
/// slot state machine: a slot receives data only while no bdev I/O and no send uses it).
pub(crate) fn recv_into_dma(
    fd: RawFd,
    buffer: &DmaBuffer,
    offset: usize,
    len: usize,
) -> io::Result<usize> {
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= buffer.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside the buffer"))?;
    let ptr = (buffer.vaddr() + offset as u64) as *mut libc::c_void;
    debug_assert!(end <= buffer.len());
    // SAFETY: `[ptr, ptr + len)` lies inside `buffer` (checked above), which stays allocated
    // for the call (borrowed); DMA memory is never a Rust reference, so the kernel writing it
    // aliases nothing Rust relies on. `recv` writes at most `len` bytes.
    let n = unsafe { libc::recv(fd, ptr, len, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends the iovecs' bytes with one `sendmsg` (no SIGPIPE, no blocking); returns the bytes
/// the kernel took (possibly fewer than all).
///
/// # Safety
/// Every iovec describes memory that is readable for its whole length for the duration of
/// the call.
pub(crate) unsafe fn send_iovecs(fd: RawFd, iovs: &[libc::iovec]) -> io::Result<usize> {
    if iovs.is_empty() {
        return Ok(0);
    }
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iovs.len() as _;
    // SAFETY: `msg` points at `iovs`, valid for the call; the caller guarantees the memory
    // each iovec describes is readable (this function's contract). The kernel only reads.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives at most `len` bytes into `iov[offset..offset + len]` without blocking (the
/// initiator's reads land in the bdev I/O's own buffers). `Ok(0)` is the peer's orderly
/// shutdown. The range is checked against the iovec.
///
/// The caller owns the iovec's memory for the duration of the I/O it belongs to
/// ([`IoVec::new`]'s contract: valid and unshared until the I/O completes), and receives into
/// it only while that I/O is outstanding.
pub(crate) fn recv_into_iovec(
    fd: RawFd,
    iov: &IoVec,
    offset: usize,
    len: usize,
) -> io::Result<usize> {
    let part = iov
        .part(offset, len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range outside the iovec"))?;
    // SAFETY: `part` lies inside `iov` (checked by `part`), whose memory the bdev I/O's
    // submitter keeps valid and leaves alone until the I/O completes (`IoVec::new`'s
    // contract); the I/O is outstanding while we receive its data. The memory is never a
    // Rust reference here. `recv` writes at most `len` bytes.
    let n = unsafe {
        libc::recv(
            fd,
            part.as_mut_ptr().cast::<libc::c_void>(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives at most `buf.len()` bytes into ordinary memory without blocking (headers,
/// digests, padding). `Ok(0)` is the peer's orderly shutdown.
pub(crate) fn recv_slice(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, exclusively borrowed slice for the call; `recv` writes at
    // most `buf.len()` bytes into it.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Copies `dst.len()` bytes of `iov` at `offset` into `dst` (to compute a data digest over
/// an I/O's buffer). `false` when the range is not inside the iovec.
pub(crate) fn read_iovec(iov: &IoVec, offset: usize, dst: &mut [u8]) -> bool {
    let Some(part) = iov.part(offset, dst.len()) else {
        return false;
    };
    // SAFETY: `part` lies inside `iov`, valid for reads until its I/O completes (IoVec's
    // contract), and the caller reads it only while that I/O is outstanding; `dst` is a
    // distinct, exclusively borrowed slice of the same length. The source never becomes a
    // Rust reference.
    unsafe { std::ptr::copy_nonoverlapping(part.as_mut_ptr(), dst.as_mut_ptr(), dst.len()) };
    true
}

/// Shuts both directions of a socket down (the fd stays open until its owner drops it).
pub(crate) fn shutdown(fd: RawFd) -> io::Result<()> {
    // SAFETY: `shutdown` takes a plain fd and no memory; on an fd that is not a socket it
    // fails with ENOTSOCK, which is reported.
    if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
