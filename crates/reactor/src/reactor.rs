//! Reactors: one per core, each running its lightweight threads in a loop, pinned to its core.
//!
//! In interrupt mode a reactor whose threads all report idle sleeps in `epoll_wait` on three
//! kinds of fds: its doorbell eventfd (rung by message senders and app stop), a timerfd armed
//! for the nearest timed poller or exit deadline, and the fds threads registered with
//! `register_interrupt_fd` (plus, on the first reactor, the signal self-pipe).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;

use crate::app::AppHandle;
use crate::error::ReactorError;
use crate::stats::{ReactorCounters, ReactorStats};
use crate::sys::{Epoll, EventFd, TimerFd};
use crate::thread::{lock, PollStatus, Thread, ThreadCtx, ThreadId};

const TOKEN_DOORBELL: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;
const TOKEN_SIGNAL: u64 = u64::MAX - 2;

/// Interrupt-mode fds of a reactor.
#[derive(Debug)]
pub(crate) struct Wakeup {
    doorbell: EventFd,
    timer: TimerFd,
}

/// The part of a reactor other OS threads touch.
pub(crate) struct ReactorShared {
    pub(crate) index: usize,
    pub(crate) core: usize,
    /// Set by the reactor just before it sleeps. Senders read it after queueing a message; it
    /// is on its own line because every sender reads it and only the reactor writes it.
    sleeping: CachePadded<AtomicBool>,
    wakeup: Option<Wakeup>,
    pub(crate) epoll: Option<Epoll>,
    /// Threads placed on this reactor, waiting to be adopted by its loop.
    pub(crate) inbox: SegQueue<Thread>,
    pub(crate) counters: CachePadded<ReactorCounters>,
}

impl ReactorShared {
    pub(crate) fn new(
        index: usize,
        core: usize,
        interrupt_mode: bool,
    ) -> Result<Self, ReactorError> {
        let (wakeup, epoll) = if interrupt_mode {
            let epoll = Epoll::new()?;
            let wakeup = Wakeup {
                doorbell: EventFd::new()?,
                timer: TimerFd::new()?,
            };
            epoll.add(wakeup.doorbell.raw(), TOKEN_DOORBELL)?;
            epoll.add(wakeup.timer.raw(), TOKEN_TIMER)?;
            (Some(wakeup), Some(epoll))
        } else {
            (None, None)
        };
        Ok(Self {
            index,
            core,
            sleeping: CachePadded::new(AtomicBool::new(false)),
            wakeup,
            epoll,
            inbox: SegQueue::new(),
            counters: CachePadded::default(),
        })
    }

    pub(crate) fn interrupt_mode(&self) -> bool {
        self.wakeup.is_some()
    }

    /// Called after something was queued for this reactor (a message, a thread). Wakes it if it
    /// sleeps.
    ///
    /// Lost wakeups: the sender does `push; fence(SeqCst); load(sleeping)` and the reactor does
    /// `store(sleeping, true); fence(SeqCst); check queues; epoll_wait`. The two SeqCst fences
    /// are totally ordered, so either the reactor's check sees the message (and it does not
    /// sleep), or the sender's load sees `sleeping` (and rings the doorbell, which makes the
    /// coming or current `epoll_wait` return). Poll mode skips all of it.
    #[inline]
    pub(crate) fn notify(&self) {
        if let Some(wakeup) = &self.wakeup {
            fence(Ordering::SeqCst);
            if self.sleeping.load(Ordering::Relaxed) {
                wakeup.doorbell.ring();
            }
        }
    }

    /// Rings the doorbell whatever the reactor does (stop requests; rare).
    pub(crate) fn ring(&self) {
        if let Some(wakeup) = &self.wakeup {
            wakeup.doorbell.ring();
        }
    }

    pub(crate) fn stats(&self) -> ReactorStats {
        ReactorStats {
            core: self.core,
            busy_ns: self.counters.busy_ns.get(),
            idle_ns: self.counters.idle_ns.get(),
            loops: self.counters.loops.get(),
            sleeps: self.counters.sleeps.get(),
            threads: self.counters.threads.load(Ordering::Relaxed),
            interrupt_mode: self.interrupt_mode(),
        }
    }
}

/// A reactor's loop state, owned by its OS thread. A [`Harness`](crate::Harness) gives
/// `&mut Reactor` to drive it by hand with [`Reactor::poll_once`].
pub struct Reactor {
    shared: Arc<ReactorShared>,
    app: AppHandle,
    threads: Vec<Thread>,
    stop_seen: bool,
    signal_seen: bool,
    signal_reader: Option<UnixStream>,
    tokens: Vec<u64>,
    /// Deadline the timerfd is armed for, to skip re-arming it (a syscall) for the same one.
    timer_deadline: Option<Instant>,
}

impl Reactor {
    pub(crate) fn new(shared: Arc<ReactorShared>, app: AppHandle) -> Self {
        Self {
            shared,
            app,
            threads: Vec::new(),
            stop_seen: false,
            signal_seen: false,
            signal_reader: None,
            tokens: Vec::with_capacity(32),
            timer_deadline: None,
        }
    }

    /// Makes this reactor watch the signal self-pipe (the first reactor, interrupt mode).
    pub(crate) fn watch_signal_pipe(&mut self, reader: UnixStream) -> Result<(), ReactorError> {
        if let Some(epoll) = &self.shared.epoll {
            reader
                .set_nonblocking(true)
                .map_err(|source| ReactorError::Sys {
                    op: "set_nonblocking(signal pipe)",
                    source,
                })?;
            epoll.add(reader.as_raw_fd(), TOKEN_SIGNAL)?;
            self.signal_reader = Some(reader);
        }
        Ok(())
    }

    pub(crate) fn app_handle(&self) -> AppHandle {
        self.app.clone()
    }

    /// Core (or harness index) of the reactor.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// Threads on the reactor (adopted ones).
    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    pub fn thread_ids(&self) -> Vec<ThreadId> {
        self.threads.iter().map(Thread::id).collect()
    }

    pub fn stats(&self) -> ReactorStats {
        self.shared.stats()
    }

    /// One loop iteration: adopt new threads, poll every thread once, reap exited threads.
    pub fn poll_once(&mut self) -> PollStatus {
        let start = self.app.0.clock.now();
        self.adopt();
        self.check_stop();
        let clock = &self.app.0.clock;
        let mut busy = false;
        let mut thread_start = start;
        for thread in &mut self.threads {
            let status = thread.poll(thread_start);
            let thread_end = clock.now();
            let counters = &thread.shared().counters;
            let spent = thread_end.saturating_duration_since(thread_start);
            if status.is_busy() {
                counters.busy_ns.add_duration(spent);
                busy = true;
            } else {
                counters.idle_ns.add_duration(spent);
            }
            thread_start = thread_end;
        }
        if self.threads.iter().any(Thread::has_exited) {
            self.reap();
            busy = true;
        }
        let counters = &self.shared.counters;
        counters.loops.add(1);
        let spent = thread_start.saturating_duration_since(start);
        if busy {
            counters.busy_ns.add_duration(spent);
        } else {
            counters.idle_ns.add_duration(spent);
        }
        PollStatus::from_busy(busy)
    }

    /// Polls one thread of this reactor (as `poll_thread` of SPDK's ut_multithread);
    /// `None` when it is not here.
    pub fn poll_thread(&mut self, id: ThreadId) -> Option<PollStatus> {
        self.adopt();
        self.check_stop();
        let now = self.app.0.clock.now();
        let status = self
            .threads
            .iter_mut()
            .find(|thread| thread.id() == id)
            .map(|thread| thread.poll(now));
        if self.threads.iter().any(Thread::has_exited) {
            self.reap();
        }
        status
    }

    pub(crate) fn with_thread<R>(
        &mut self,
        id: ThreadId,
        f: impl FnOnce(&mut ThreadCtx) -> R,
    ) -> Option<R> {
        self.adopt();
        let now = self.app.0.clock.now();
        let thread = self.threads.iter_mut().find(|thread| thread.id() == id)?;
        thread.ctx.now = now;
        Some(thread.run_callback(f))
    }

    fn adopt(&mut self) {
        if self.shared.inbox.is_empty() {
            return;
        }
        while let Some(mut thread) = self.shared.inbox.pop() {
            if self.stop_seen {
                thread.request_exit();
            }
            tracing::debug!(
                thread = thread.ctx.name(),
                core = self.shared.core,
                "thread placed"
            );
            self.threads.push(thread);
        }
        self.shared
            .counters
            .threads
            .store(self.threads.len() as u64, Ordering::Relaxed);
    }

    fn check_stop(&mut self) {
        let app = &self.app.0;
        if self.shared.index == 0 && !self.signal_seen && app.signal_flag.load(Ordering::Relaxed) {
            self.signal_seen = true;
            tracing::info!("termination signal received; stopping the app");
            self.app.stop();
        }
        if !self.stop_seen && app.stop_requested.load(Ordering::Acquire) {
            self.stop_seen = true;
            for thread in &mut self.threads {
                thread.request_exit();
            }
        }
    }

    fn reap(&mut self) {
        let (exited, running): (Vec<Thread>, Vec<Thread>) = std::mem::take(&mut self.threads)
            .into_iter()
            .partition(Thread::has_exited);
        self.threads = running;
        lock(&self.app.0.registry)
            .threads
            .retain(|handle| !exited.iter().any(|thread| thread.id() == handle.id()));
        // Dropped outside the registry lock: their captures' destructors may call back in.
        drop(exited);
        self.shared
            .counters
            .threads
            .store(self.threads.len() as u64, Ordering::Relaxed);
    }

    /// Whether the app stops and nothing is left here; no thread can be placed here any more
    /// (placement is refused once the registry says stopping).
    fn is_finished(&self) -> bool {
        if !self.stop_seen || !self.threads.is_empty() {
            return false;
        }
        let registry = lock(&self.app.0.registry);
        registry.stopping && self.shared.inbox.is_empty()
    }

    /// The reactor loop: poll until the app stops and every thread here exited.
    pub(crate) fn run(&mut self) -> Result<(), ReactorError> {
        tracing::debug!(core = self.shared.core, "reactor started");
        loop {
            let status = self.poll_once();
            if self.is_finished() {
                tracing::debug!(core = self.shared.core, "reactor stopped");
                return Ok(());
            }
            if self.shared.interrupt_mode() {
                if status.is_busy() {
                    if self.threads.iter().any(Thread::has_interrupts) {
                        // Busy reactors never sleep: look at the fds without blocking.
                        self.wait_fds(0)?;
                    }
                } else {
                    self.sleep()?;
                }
            }
        }
    }

    /// Whether a poll now would find something to do.
    fn has_pending_work(&self) -> bool {
        let app = &self.app.0;
        !self.shared.inbox.is_empty()
            || (!self.stop_seen && app.stop_requested.load(Ordering::Acquire))
            || (self.shared.index == 0
                && !self.signal_seen
                && app.signal_flag.load(Ordering::Relaxed))
            || self.threads.iter().any(Thread::has_pending_work)
    }

    /// Sleeps until a message, a timer or an fd (see [`ReactorShared::notify`]).
    fn sleep(&mut self) -> Result<(), ReactorError> {
        let Some(wakeup) = self.shared.wakeup.as_ref() else {
            return Ok(());
        };
        self.shared.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_pending_work() {
            self.shared.sleeping.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let clock = &self.app.0.clock;
        let now = clock.now();
        let deadline = self.threads.iter().filter_map(Thread::next_deadline).min();
        match deadline {
            Some(deadline) if deadline <= now => {
                self.shared.sleeping.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Some(deadline) if self.timer_deadline != Some(deadline) => {
                wakeup.timer.arm(Some(deadline - now))?;
                self.timer_deadline = Some(deadline);
            }
            // Armed for this deadline already, or no deadline: a timer still armed for an
            // earlier one only causes a spurious wakeup, cheaper than a disarming syscall.
            _ => {}
        }
        self.shared.counters.sleeps.add(1);
        let result = self.wait_fds(-1);
        self.shared.sleeping.store(false, Ordering::Relaxed);
        self.shared
            .counters
            .idle_ns
            .add_duration(self.app.0.clock.now().saturating_duration_since(now));
        result
    }

    fn wait_fds(&mut self, timeout_ms: i32) -> Result<(), ReactorError> {
        let (Some(epoll), Some(wakeup)) = (self.shared.epoll.as_ref(), self.shared.wakeup.as_ref())
        else {
            return Ok(());
        };
        epoll.wait(&mut self.tokens, timeout_ms)?;
        for token in self.tokens.drain(..) {
            match token {
                TOKEN_DOORBELL => wakeup.doorbell.drain(),
                TOKEN_TIMER => {
                    wakeup.timer.drain();
                    self.timer_deadline = None;
                }
                TOKEN_SIGNAL => {
                    if let Some(reader) = self.signal_reader.as_mut() {
                        let mut bytes = [0u8; 16];
                        while matches!(reader.read(&mut bytes), Ok(n) if n > 0) {}
                    }
                }
                token => {
                    if !self
                        .threads
                        .iter_mut()
                        .any(|thread| thread.mark_interrupt(token))
                    {
                        tracing::trace!(token, "event for an interrupt already unregistered");
                    }
                }
            }
        }
        Ok(())
    }
}
