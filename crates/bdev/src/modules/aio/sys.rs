//! Linux native AIO through raw system calls (no libaio): `io_setup`, `io_submit`,
//! `io_getevents` with a zero timeout, `io_destroy`, and a peek at the completion ring the
//! kernel maps at the context's address, so that an idle poll makes no system call.
//!
//! Layouts from the kernel's `include/uapi/linux/aio_abi.h` and `fs/aio.c` (`struct aio_ring`).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

/// `IOCB_CMD_FDSYNC`.
pub(crate) const IOCB_CMD_FDSYNC: u16 = 3;
/// `IOCB_CMD_PREADV`.
pub(crate) const IOCB_CMD_PREADV: u16 = 7;
/// `IOCB_CMD_PWRITEV`.
pub(crate) const IOCB_CMD_PWRITEV: u16 = 8;

/// `IOCB_FLAG_RESFD`: the kernel signals the eventfd in `aio_resfd` when the iocb completes.
pub(crate) const IOCB_FLAG_RESFD: u32 = 1;

/// `AIO_RING_MAGIC` of `fs/aio.c`: the header below is the kernel's ring.
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;

// `struct iocb` puts `aio_key` and `aio_rw_flags` in endian-dependent order; only the
// little-endian layout is written here.
#[cfg(target_endian = "big")]
compile_error!("the aio module's struct iocb layout is written for little-endian targets");

/// `struct iocb` (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Iocb {
    /// Returned in `IoEvent::data`: the request slot.
    pub(crate) aio_data: u64,
    pub(crate) aio_key: u32,
    pub(crate) aio_rw_flags: i32,
    pub(crate) aio_lio_opcode: u16,
    pub(crate) aio_reqprio: i16,
    pub(crate) aio_fildes: u32,
    /// For PREADV / PWRITEV: the address of the iovec array.
    pub(crate) aio_buf: u64,
    /// For PREADV / PWRITEV: the number of iovecs.
    pub(crate) aio_nbytes: u64,
    pub(crate) aio_offset: i64,
    pub(crate) aio_reserved2: u64,
    pub(crate) aio_flags: u32,
    pub(crate) aio_resfd: u32,
}

/// `struct io_event` (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct IoEvent {
    pub(crate) data: u64,
    pub(crate) obj: u64,
    /// Bytes transferred, or a negative errno.
    pub(crate) res: i64,
    pub(crate) res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// Header of the completion ring (`struct aio_ring`), mapped read-write into the process
/// at the context's address.
#[repr(C)]
struct AioRingHeader {
    id: u32,
    nr: u32,
    head: AtomicU32,
    tail: AtomicU32,
    magic: u32,
    compat_features: u32,
    incompat_features: u32,
    header_length: u32,
}

/// One AIO context (`aio_context_t`); destroyed on drop, which waits for the kernel to
/// finish every I/O still in flight on it (so their buffers are no longer touched).
#[derive(Debug)]
pub(crate) struct AioContext {
    id: u64,
    /// The kernel's ring header is readable at `id` (magic checked at setup).
    ring_readable: bool,
}

impl AioContext {
    /// `io_setup(events)`.
    pub(crate) fn new(events: u32) -> io::Result<Self> {
        let mut id: u64 = 0;
        // SAFETY: io_setup writes one aio_context_t (u64) through the pointer, which is
        // valid and zero as the call requires.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                libc::c_long::from(events),
                &mut id as *mut u64,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after a successful io_setup the kernel maps its `struct aio_ring` at the
        // context id, for the context's lifetime; only the fixed header is read here.
        let magic = unsafe { std::ptr::read_volatile(&(*(id as *const AioRingHeader)).magic) };
        Ok(Self {
            id,
            ring_readable: magic == AIO_RING_MAGIC,
        })
    }

    /// Whether the kernel may have completions ready: reads the ring's head and tail from
    /// user space, as libaio does, so that an idle poll enters no system call.
    #[inline]
    pub(crate) fn may_have_events(&self) -> bool {
        if !self.ring_readable {
            return true;
        }
        // SAFETY: the ring header stays mapped while the context exists (until our drop);
        // head and tail are u32 words the kernel updates, read here atomically.
        let ring = unsafe { &*(self.id as *const AioRingHeader) };
        ring.head.load(Ordering::Relaxed) != ring.tail.load(Ordering::Acquire)
    }

    /// `io_submit`: returns how many of `iocbs` (pointers to [`Iocb`]s) the kernel took,
    /// from the front. An error is the error of the first one (none was taken).
    ///
    /// # Safety
    /// Each entry of `iocbs` is the address of a valid [`Iocb`]; the iovec array and the data
    /// buffers it describes stay valid (and the buffers unused by anyone else) until the
    /// completion of that iocb is reaped or the context is dropped.
    pub(crate) unsafe fn submit(&self, iocbs: &[usize]) -> io::Result<usize> {
        if iocbs.is_empty() {
            return Ok(0);
        }
        // SAFETY: `iocbs` is an array of `iocbs.len()` pointers (usize has the pointers'
        // size), each to a valid iocb by this function's contract.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.id,
                iocbs.len() as libc::c_long,
                iocbs.as_ptr(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// `io_getevents(min_nr = 0, timeout = 0)`: never blocks.
    pub(crate) fn get_events(&self, events: &mut [IoEvent]) -> io::Result<usize> {
        if events.is_empty() {
            return Ok(0);
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the kernel writes at most `events.len()` io_events into `events`, which
        // is valid for those writes; the timeout is read only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.id,
                0 as libc::c_long,
                events.len() as libc::c_long,
                events.as_mut_ptr(),
                &timeout as *const libc::timespec,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

impl Drop for AioContext {
    fn drop(&mut self) {
        // SAFETY: the context is ours and destroyed once; io_destroy waits for the I/Os
        // still in flight, so no buffer is touched after this returns.
        let rc = unsafe { libc::syscall(libc::SYS_io_destroy, self.id) };
        if rc < 0 {
            tracing::error!(error = %io::Error::last_os_error(), "io_destroy failed");
        }
    }
}
