//! The one system call the `vhost` crate does not make for us: peeking at a vhost-user header
//! without consuming it, so the control thread can answer messages the crate does not handle
//! (GET/SET_STATUS, unknown codes) before handing the stream to it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Copies up to `buf.len()` bytes from the front of the socket's receive queue without
/// consuming them, waiting until that many arrived or the peer closed. Returns the count.
pub(crate) fn peek(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes owned by the caller for
        // the whole call; the fd is the stream's open socket. MSG_PEEK leaves the data (and any
        // attached fds) queued for the real read.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Counts the file descriptors attached to the next message (of `message_len` bytes) without
/// consuming it: peeks with a control buffer, then closes the duplicates the kernel installed
/// for the peek. `None`: more descriptors than the buffer holds (the message is unusable).
///
/// A unix stream peek does not stop at the end of an skb without descriptors: it walks on to
/// the next queued skb and reports *its* descriptors (Linux `unix_stream_read_generic`), so a
/// peek of the current message alone could report the descriptors of a later one (QEMU queues
/// SET_VRING_NUM, BASE, ADDR and KICK back to back). It does stop after an skb that carries
/// descriptors. So this peeks one byte more than the message: descriptors seen with at most
/// `message_len` bytes copied are the message's own; with more, they belong to a later one.
pub(crate) fn peek_fd_count(
    stream: &UnixStream,
    message_len: usize,
) -> std::io::Result<Option<usize>> {
    let mut buffer = vec![0u8; message_len + 1];
    let byte = buffer.as_mut_slice();
    // u64 elements: cmsghdr alignment. Room for 120 descriptors (the crate accepts 32).
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (one live byte) and at `control` (a live, aligned
        // buffer of msg_controllen bytes), both outliving the call; the fd is the open socket.
        let n = unsafe {
            libc::recvmsg(
                stream.as_raw_fd(),
                &mut msg,
                libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    if n == 0 {
        return Ok(Some(0));
    }
    let own = (n as usize) <= message_len;
    let mut count = 0usize;
    // SAFETY: CMSG_FIRSTHDR / CMSG_NXTHDR walk the control buffer the kernel filled, bounded by
    // msg_controllen; each header they return lies inside `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and inside `control` (see above).
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is pure arithmetic.
            let data_offset = unsafe { libc::CMSG_LEN(0) } as usize;
            let fds = (header.cmsg_len as usize).saturating_sub(data_offset) / 4;
            for i in 0..fds {
                // SAFETY: the SCM_RIGHTS payload holds `fds` ints right after the header, inside
                // the control buffer (cmsg_len was bounded by the kernel to the buffer).
                let fd =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>().add(i)) };
                // SAFETY: the peek installed `fd` in this process for us alone; closing it once
                // releases that duplicate and nothing else.
                unsafe { libc::close(fd) };
            }
            count += fds;
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if !own {
        return Ok(Some(0));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Ok(None);
    }
    Ok(Some(count))
}

/// An anonymous memory file (`memfd_create`) of `size` bytes, for the inflight region.
pub(crate) fn memfd(name: &str, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}
