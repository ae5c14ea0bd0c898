//! Messages: closures stored inline, without a heap allocation per message.
//!
//! A message is an `FnOnce(&mut ThreadCtx) + Send` of at most [`INLINE_MSG_SIZE`] bytes and
//! alignment at most [`INLINE_MSG_ALIGN`], moved by value into a fixed-size buffer together with
//! two monomorphized function pointers (call and drop). A bigger closure does not compile; capture
//! a `Box` or an `Arc` of the big context instead (one pointer, 8 bytes):
//!
//! ```compile_fail
//! let big = [0u64; 8]; // 64 bytes captured by value
//! let _msg = pollux_reactor::InlineMsg::new(move |_ctx| drop(big));
//! ```
//!
//! ```
//! let big = Box::new([0u64; 8]); // the Box is 8 bytes
//! let _msg = pollux_reactor::InlineMsg::new(move |_ctx| drop(big));
//! ```
//!
//! This module and `sys` are the crate's unsafe code.

use std::fmt;
use std::marker::PhantomData;
use std::mem::{self, ManuallyDrop, MaybeUninit};

use crate::thread::{ThreadCtx, ThreadHandle};

/// Largest closure a message can hold, in bytes.
pub const INLINE_MSG_SIZE: usize = 48;
/// Largest closure alignment a message can hold, in bytes.
pub const INLINE_MSG_ALIGN: usize = 16;

/// The buffer a closure is moved into. `MaybeUninit` bytes keep pointer provenance, so a closure
/// that captures references or boxes survives the round trip (checked under Miri).
#[repr(C, align(16))]
struct Storage(MaybeUninit<[u8; INLINE_MSG_SIZE]>);

const _: () = assert!(mem::align_of::<Storage>() == INLINE_MSG_ALIGN);

/// An `FnOnce(&mut A) + Send` stored inline. [`InlineMsg`] is the one the framework queues;
/// the argument type is generic so that the unsafe core is tested under Miri without a reactor.
///
/// Invariant: `storage` holds a live closure of the type `call` and `drop` were instantiated for,
/// until exactly one of them consumes it ([`InlineFnOnce::call`] or `Drop`).
pub struct InlineFnOnce<A> {
    storage: Storage,
    call: unsafe fn(*mut Storage, &mut A),
    drop: unsafe fn(*mut Storage),
    // Ties the type to A without inheriting A's auto traits. The type is auto `Send` because
    // `new` only accepts `Send` closures, and auto `Sync` harmlessly: `&InlineFnOnce` offers
    // no access to the closure.
    _arg: PhantomData<fn(&mut A)>,
}

/// A message for a lightweight thread.
pub type InlineMsg = InlineFnOnce<ThreadCtx>;

impl<A> InlineFnOnce<A> {
    /// Stores `f`. Fails to compile when `f` is larger than [`INLINE_MSG_SIZE`] bytes or more
    /// aligned than [`INLINE_MSG_ALIGN`].
    #[inline]
    pub fn new<F>(f: F) -> Self
    where
        F: FnOnce(&mut A) + Send + 'static,
    {
        const {
            assert!(
                mem::size_of::<F>() <= INLINE_MSG_SIZE,
                "message closure is larger than INLINE_MSG_SIZE (48 bytes): capture a Box or Arc of the context instead"
            );
            assert!(
                mem::align_of::<F>() <= INLINE_MSG_ALIGN,
                "message closure is aligned beyond INLINE_MSG_ALIGN (16 bytes)"
            );
        }
        let mut storage = Storage(MaybeUninit::uninit());
        // SAFETY: the buffer is INLINE_MSG_SIZE bytes aligned to INLINE_MSG_ALIGN, and the const
        // block above proves F fits in size and alignment; the pointer is valid for writes and
        // nothing was there to drop.
        unsafe { storage.0.as_mut_ptr().cast::<F>().write(f) };
        Self {
            storage,
            call: call_closure::<A, F>,
            drop: drop_closure::<F>,
            _arg: PhantomData,
        }
    }

    /// Runs the closure, consuming the message; its captures are dropped by the closure itself.
    #[inline]
    pub fn call(self, arg: &mut A) {
        let mut this = ManuallyDrop::new(self);
        let call = this.call;
        // SAFETY: by the type invariant the storage holds a live closure of the type `call` was
        // instantiated for; `call` moves it out exactly once, and `ManuallyDrop` keeps `Drop`
        // (which would drop it a second time) from running, even if the closure panics.
        unsafe { call(&mut this.storage, arg) }
    }
}

/// # Safety
/// `storage` must hold a live `F` that nothing else will read or drop afterwards.
unsafe fn call_closure<A, F: FnOnce(&mut A)>(storage: *mut Storage, arg: &mut A) {
    // SAFETY: guaranteed by the caller; `read` moves the closure out, so the closure's own drop
    // (after it is called) is the only one.
    let f = unsafe { storage.cast::<F>().read() };
    f(arg)
}

/// # Safety
/// `storage` must hold a live `F` that nothing else will read or drop afterwards.
unsafe fn drop_closure<F>(storage: *mut Storage) {
    // SAFETY: guaranteed by the caller; the closure was never called, so it is dropped here once.
    unsafe { storage.cast::<F>().drop_in_place() }
}

impl<A> Drop for InlineFnOnce<A> {
    fn drop(&mut self) {
        // SAFETY: a message that reaches Drop was never called (`call` forgets it), so by the type
        // invariant the storage holds the live closure `drop` was instantiated for.
        unsafe { (self.drop)(&mut self.storage) }
    }
}

impl<A> fmt::Debug for InlineFnOnce<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InlineMsg")
    }
}

/// A message that could not be queued; it is handed back (backpressure, never abort).
#[derive(Debug, thiserror::Error)]
pub enum MsgError {
    /// The target's queue is full: retry later (from a poller, not in a spin on a reactor).
    #[error("message queue of thread {thread} is full ({capacity} messages)")]
    QueueFull {
        thread: ThreadHandle,
        capacity: usize,
        msg: InlineMsg,
    },
    /// The target thread has exited; the message will never run.
    #[error("thread {thread} has exited")]
    ThreadExited {
        thread: ThreadHandle,
        msg: InlineMsg,
    },
}

impl MsgError {
    /// The message that was not queued, to retry with [`ThreadHandle::send_inline`].
    pub fn into_msg(self) -> InlineMsg {
        match self {
            MsgError::QueueFull { msg, .. } | MsgError::ThreadExited { msg, .. } => msg,
        }
    }

    /// Whether the queue was full (as opposed to the thread having exited).
    pub fn is_full(&self) -> bool {
        matches!(self, MsgError::QueueFull { .. })
    }
}

#[cfg(test)]
mod tests {
    //! Runs under Miri (`cargo +nightly miri test -p pollux-reactor msg::`): no reactor, no fds.
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts its drops.
    struct DropCounter(Arc<AtomicUsize>);
    impl Drop for DropCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn called_exactly_once_and_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = DropCounter(drops.clone());
        let msg = InlineFnOnce::<u32>::new(move |arg| {
            let _keep = &guard;
            *arg += 1;
        });
        let mut value = 41;
        msg.call(&mut value);
        assert_eq!(value, 42);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn uncalled_messages_are_dropped_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        {
            let guard = DropCounter(drops.clone());
            let calls = calls.clone();
            let msg = InlineFnOnce::<u32>::new(move |_| {
                let _keep = &guard;
                calls.fetch_add(1, Ordering::SeqCst);
            });
            // Moving the message around (as the queue does) must not drop or duplicate it.
            let moved = vec![msg];
            let msg = moved.into_iter().next();
            drop(msg);
        }
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn boxed_and_borrowed_captures_survive_the_round_trip() {
        let big = Box::new([7u64; 64]);
        let shared = Arc::new(String::from("context"));
        let shared2 = shared.clone();
        let msg = InlineFnOnce::<u64>::new(move |sum| {
            *sum = big.iter().sum::<u64>() + shared2.len() as u64;
        });
        let mut sum = 0;
        msg.call(&mut sum);
        assert_eq!(sum, 7 * 64 + 7);
        assert_eq!(Arc::strong_count(&shared), 1);
    }

    #[test]
    fn largest_and_most_aligned_closures_fit() {
        #[repr(align(16))]
        #[derive(Clone, Copy)]
        struct Aligned([u8; 48]);
        let payload = Aligned([3; 48]);
        let msg = InlineFnOnce::<usize>::new(move |out| {
            *out = payload.0.iter().map(|b| *b as usize).sum();
        });
        let mut out = 0;
        msg.call(&mut out);
        assert_eq!(out, 3 * 48);
        // Zero-sized closures too.
        let mut hit = 0;
        InlineFnOnce::<i32>::new(|x| *x = 9).call(&mut hit);
        assert_eq!(hit, 9);
    }

    #[test]
    fn a_panicking_closure_drops_its_captures_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = DropCounter(drops.clone());
        let msg = InlineFnOnce::<u32>::new(move |_| {
            let _keep = &guard;
            panic!("boom");
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut value = 0;
            msg.call(&mut value);
        }));
        assert!(result.is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn messages_cross_os_threads() {
        let drops = Arc::new(AtomicUsize::new(0));
        let guard = DropCounter(drops.clone());
        let msg = InlineFnOnce::<u32>::new(move |v| {
            let _keep = &guard;
            *v = 5;
        });
        let value = std::thread::spawn(move || {
            let mut v = 0;
            msg.call(&mut v);
            v
        })
        .join()
        .expect("the thread did not panic");
        assert_eq!(value, 5);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
