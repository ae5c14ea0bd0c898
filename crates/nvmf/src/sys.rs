//! The socket calls std has no safe form of: receiving straight into DMA memory (which is
//! never turned into a Rust reference, see `pollux_env::dma`) and gathering a batch of PDU
//! pieces (headers in ordinary memory, data in DMA memory) into one `sendmsg`.

use std::io;
use std::os::fd::RawFd;

use pollux_env::dma::DmaBuffer;

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
