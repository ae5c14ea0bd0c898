//! Volatile, bounds-checked access to ring memory shared with the device (the rings, and the
//! virtio_blk channel's request headers, indirect tables and status bytes), the hang-up
//! check of a back-end's socket, and an owned copy of an eventfd: the crate's only `unsafe`.
//!
//! The memory is a [`DmaBuffer`] that a back-end process maps too and writes at any moment,
//! so it never becomes a Rust reference (STYLE #2): every access is a volatile load or store
//! of a byte or an aligned 16-, 32- or 64-bit word (one instruction, never torn), after a bounds check.
//! Ordering between the two sides is given by the fences of [`fence_release`],
//! [`fence_acquire`] and [`fence_full`] (SPDK's `virtio_wmb` / `virtio_rmb` / `virtio_mb`).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use pollux_env::dma::DmaBuffer;

/// A DMA buffer shared with the device: one virtqueue's rings, or a channel's request slots.
pub(crate) struct RingMem {
    buf: DmaBuffer,
    base: *mut u8,
    len_bytes: usize,
}

// SAFETY: `base` points into `buf`, which the struct owns and which is `Send`; the raw pointer
// is only a cached copy of `buf.as_mut_ptr()`, used by whichever thread owns the struct.
unsafe impl Send for RingMem {}

impl RingMem {
    pub(crate) fn new(mut buf: DmaBuffer) -> Self {
        let len_bytes = buf.len();
        let base = buf.as_mut_ptr();
        Self {
            buf,
            base,
            len_bytes,
        }
    }

    /// Virtual address (= the address the back-end is given, see `crate::backend`) of byte 0.
    pub(crate) fn addr(&self) -> u64 {
        self.buf.vaddr()
    }

    /// The checked pointer to an aligned `size`-byte word at `offset`. Offsets come from the
    /// ring layout and indices below the queue size: a failed check is a bug in this crate.
    #[inline]
    fn word(&self, offset: u64, size: usize) -> *mut u8 {
        let offset = offset as usize;
        assert!(
            offset
                .checked_add(size)
                .is_some_and(|end| end <= self.len_bytes)
                && offset.is_multiple_of(size),
            "ring access of {size} bytes at {offset} outside a {}-byte ring",
            self.len_bytes
        );
        // SAFETY: `offset + size <= len_bytes` (checked above), inside the buffer.
        unsafe { self.base.add(offset) }
    }

    #[inline]
    pub(crate) fn read_u8(&self, offset: u64) -> u8 {
        let ptr = self.word(offset, 1);
        // SAFETY: in bounds (checked by `word`); a byte needs no alignment.
        unsafe { ptr.read_volatile() }
    }

    #[inline]
    pub(crate) fn write_u8(&mut self, offset: u64, value: u8) {
        let ptr = self.word(offset, 1);
        // SAFETY: in bounds (checked by `word`).
        unsafe { ptr.write_volatile(value) }
    }

    #[inline]
    pub(crate) fn read_u16(&self, offset: u64) -> u16 {
        let ptr = self.word(offset, 2).cast::<u16>();
        // SAFETY: in bounds and 2-aligned (checked by `word`; the buffer is 64-aligned).
        u16::from_le(unsafe { ptr.read_volatile() })
    }

    #[inline]
    pub(crate) fn write_u16(&mut self, offset: u64, value: u16) {
        let ptr = self.word(offset, 2).cast::<u16>();
        // SAFETY: in bounds and 2-aligned (checked by `word`).
        unsafe { ptr.write_volatile(value.to_le()) }
    }

    #[inline]
    pub(crate) fn read_u32(&self, offset: u64) -> u32 {
        let ptr = self.word(offset, 4).cast::<u32>();
        // SAFETY: in bounds and 4-aligned (checked by `word`).
        u32::from_le(unsafe { ptr.read_volatile() })
    }

    #[inline]
    pub(crate) fn write_u32(&mut self, offset: u64, value: u32) {
        let ptr = self.word(offset, 4).cast::<u32>();
        // SAFETY: in bounds and 4-aligned (checked by `word`).
        unsafe { ptr.write_volatile(value.to_le()) }
    }

    #[inline]
    pub(crate) fn write_u64(&mut self, offset: u64, value: u64) {
        let ptr = self.word(offset, 8).cast::<u64>();
        // SAFETY: in bounds and 8-aligned (checked by `word`).
        unsafe { ptr.write_volatile(value.to_le()) }
    }
}

/// Stores before it are visible to the device before stores after it (publishing entries,
/// then the index or flag that makes them available).
#[inline]
pub(crate) fn fence_release() {
    fence(Ordering::Release);
}

/// Loads after it see at least what the device wrote before the index or flag read before it.
#[inline]
pub(crate) fn fence_acquire() {
    fence(Ordering::Acquire);
}

/// A store before it is visible before a load after it (publish the index, then read the
/// device's notification suppression: a store-load order only a full fence gives).
#[inline]
pub(crate) fn fence_full() {
    fence(Ordering::SeqCst);
}

/// Whether `fd` (a back-end's socket) reports a hang-up or an error, without blocking.
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1, timeout 0 (never blocks).
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    rc > 0
        && pollfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// A duplicate of `fd` as an [`OwnedFd`] (what the reactor registers: `vmm-sys-util`'s
/// `EventFd` has no `AsFd`).
pub(crate) fn owned_eventfd(fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<OwnedFd> {
    let raw = fd.try_clone()?.into_raw_fd();
    // SAFETY: `into_raw_fd` handed over the only owner of a valid, open descriptor (a fresh
    // duplicate), so the `OwnedFd` becomes its sole owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
