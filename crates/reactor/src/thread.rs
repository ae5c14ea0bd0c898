//! Lightweight threads: a message queue, pollers and channels owned by one OS thread at a time.
//!
//! A [`Thread`] keeps its pollers apart from its [`ThreadCtx`]: callbacks get `&mut ThreadCtx`
//! while the thread iterates its poller vectors, and whatever a callback asks of the pollers
//! (register, unregister, pause, resume) is queued in the ctx and applied after it returns.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use pollux_env::cpumask::CpuMask;

use crate::app::AppHandle;
use crate::channel::ChannelSlot;
use crate::error::ReactorError;
use crate::msg::{InlineMsg, MsgError};
use crate::reactor::ReactorShared;
use crate::stats::{PollerCounters, PollerKind, PollerStats, ThreadCounters, ThreadStats};

/// What a poller (or an interrupt callback) reports: whether it did work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    Busy,
    Idle,
}

impl PollStatus {
    /// `Busy` when `did_work`.
    pub fn from_busy(did_work: bool) -> Self {
        if did_work {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }

    pub fn is_busy(self) -> bool {
        self == PollStatus::Busy
    }
}

impl std::ops::BitOr for PollStatus {
    type Output = PollStatus;
    fn bitor(self, other: PollStatus) -> PollStatus {
        PollStatus::from_busy(self.is_busy() || other.is_busy())
    }
}

/// Identifies a lightweight thread for the life of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadId(pub u64);

impl fmt::Display for ThreadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A poller of one thread. Only that thread may unregister, pause or resume it (send it a
/// message to do so from elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollerId {
    thread: ThreadId,
    seq: u64,
}

impl PollerId {
    pub fn thread(&self) -> ThreadId {
        self.thread
    }
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// An interrupt fd registration of one thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InterruptId {
    thread: ThreadId,
    pub(crate) token: u64,
}

/// Gate of a thread's message queue: the low bits count senders inside `send` plus messages
/// that senders deferred on a full queue (see [`ThreadCtx::send_or_queue`]); the top bit says
/// the queue is closed. A thread closes its queue only by a compare-exchange from exactly 0 to
/// CLOSED, so it can never close while a send is half done or a deferred message is waiting,
/// and a sender that finds CLOSED knows its message was not queued. Nothing is lost at exit.
const GATE_CLOSED: u64 = 1 << 63;

pub(crate) struct ThreadShared {
    pub(crate) id: ThreadId,
    pub(crate) name: String,
    pub(crate) reactor: Arc<ReactorShared>,
    pub(crate) queue: ArrayQueue<InlineMsg>,
    /// Written (RMW) by every sender; alone on its line so that senders do not bounce the
    /// owner's counters, and the owner's stores do not bounce the senders' gate.
    gate: CachePadded<AtomicU64>,
    pub(crate) counters: CachePadded<ThreadCounters>,
    /// Poller names and counters for readers on other threads. Locked when a poller is
    /// registered or unregistered and by stats readers, never in the poll loop.
    pollers: Mutex<Vec<PollerInfo>>,
}

struct PollerInfo {
    id: PollerId,
    name: String,
    kind: PollerKind,
    counters: Arc<CachePadded<PollerCounters>>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of our locks leaves plain data behind; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ThreadShared {
    pub(crate) fn new(
        id: ThreadId,
        name: String,
        reactor: Arc<ReactorShared>,
        queue_depth: usize,
    ) -> Self {
        Self {
            id,
            name,
            reactor,
            queue: ArrayQueue::new(queue_depth),
            gate: CachePadded::new(AtomicU64::new(0)),
            counters: CachePadded::default(),
            pollers: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_CLOSED != 0
    }

    /// Closes the queue if no send is in progress and no deferred message waits.
    fn try_close(&self) -> bool {
        self.gate
            .compare_exchange(0, GATE_CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Closes the queue whatever waits (forced exit, teardown).
    fn force_close(&self) {
        self.gate.fetch_or(GATE_CLOSED, Ordering::AcqRel);
    }

    /// Pushes `msg`. With `keep_on_full`, a full queue keeps the caller's gate reference for
    /// the deferred message (released by `push_deferred`).
    fn push(self: &Arc<Self>, msg: InlineMsg, keep_on_full: bool) -> Result<(), MsgError> {
        let gate = self.gate.fetch_add(1, Ordering::Acquire);
        if gate & GATE_CLOSED != 0 {
            self.gate.fetch_sub(1, Ordering::Release);
            return Err(MsgError::ThreadExited {
                thread: ThreadHandle(self.clone()),
                msg,
            });
        }
        match self.queue.push(msg) {
            Ok(()) => {
                self.gate.fetch_sub(1, Ordering::Release);
                self.reactor.notify();
                Ok(())
            }
            Err(msg) => {
                if !keep_on_full {
                    self.gate.fetch_sub(1, Ordering::Release);
                }
                Err(MsgError::QueueFull {
                    thread: ThreadHandle(self.clone()),
                    capacity: self.queue.capacity(),
                    msg,
                })
            }
        }
    }

    /// Retries a deferred message, whose gate reference is held since its first attempt.
    fn push_deferred(self: &Arc<Self>, msg: InlineMsg) -> Result<(), MsgError> {
        if self.is_closed() {
            // Only a forced close gets here: the reference we hold kept the normal path open.
            self.gate.fetch_sub(1, Ordering::Release);
            return Err(MsgError::ThreadExited {
                thread: ThreadHandle(self.clone()),
                msg,
            });
        }
        match self.queue.push(msg) {
            Ok(()) => {
                self.gate.fetch_sub(1, Ordering::Release);
                self.reactor.notify();
                Ok(())
            }
            Err(msg) => Err(MsgError::QueueFull {
                thread: ThreadHandle(self.clone()),
                capacity: self.queue.capacity(),
                msg,
            }),
        }
    }

    pub(crate) fn stats(&self) -> ThreadStats {
        let pollers = lock(&self.pollers)
            .iter()
            .map(|info| PollerStats {
                id: info.id.seq,
                name: info.name.clone(),
                kind: info.kind,
                paused: info.counters.paused.load(Ordering::Relaxed),
                runs: info.counters.runs.get(),
                busy_runs: info.counters.busy_runs.get(),
            })
            .collect();
        ThreadStats {
            id: self.id,
            name: self.name.clone(),
            core: self.reactor.core,
            busy_ns: self.counters.busy_ns.get(),
            idle_ns: self.counters.idle_ns.get(),
            messages: self.counters.messages.get(),
            polls: self.counters.polls.get(),
            pollers,
        }
    }
}

/// A handle to send messages to a thread, from any OS thread. Cloning is one atomic increment.
#[derive(Clone)]
pub struct ThreadHandle(pub(crate) Arc<ThreadShared>);

impl ThreadHandle {
    pub fn id(&self) -> ThreadId {
        self.0.id
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Core of the reactor the thread runs on.
    pub fn core(&self) -> usize {
        self.0.reactor.core
    }

    /// Whether the thread has exited (its queue is closed).
    pub fn has_exited(&self) -> bool {
        self.0.is_closed()
    }

    /// Messages waiting in the thread's queue.
    pub fn pending_messages(&self) -> usize {
        self.0.queue.len()
    }

    /// Queues `f` to run on the thread. See [`send_msg`].
    pub fn send<F>(&self, f: F) -> Result<(), MsgError>
    where
        F: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        self.send_inline(InlineMsg::new(f))
    }

    /// Queues an already built message (for instance one handed back by a full queue).
    pub fn send_inline(&self, msg: InlineMsg) -> Result<(), MsgError> {
        self.0.push(msg, false)
    }

    /// A snapshot of the thread's statistics.
    pub fn stats(&self) -> ThreadStats {
        self.0.stats()
    }
}

impl PartialEq for ThreadHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for ThreadHandle {}

impl fmt::Debug for ThreadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ThreadHandle({} {:?})", self.0.id, self.0.name)
    }
}

impl fmt::Display for ThreadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} (id {})", self.0.name, self.0.id)
    }
}

/// Queues `f` to run on `target`'s thread, from any OS thread, without allocating. Messages
/// from one sender run in the order sent. A full queue hands the message back
/// ([`MsgError::QueueFull`], retry later with [`ThreadHandle::send_inline`]); an exited thread
/// hands it back too ([`MsgError::ThreadExited`]). The closure must fit in
/// [`INLINE_MSG_SIZE`](crate::INLINE_MSG_SIZE) bytes (a compile-time check).
pub fn send_msg<F>(target: &ThreadHandle, f: F) -> Result<(), MsgError>
where
    F: FnOnce(&mut ThreadCtx) + Send + 'static,
{
    target.send(f)
}

type PollFn = Box<dyn FnMut(&mut ThreadCtx) -> PollStatus + Send>;
type ExitHandler = Box<dyn FnOnce(&mut ThreadCtx) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollerState {
    Running,
    Paused,
    Unregistered,
}

pub(crate) struct PollerSlot {
    id: PollerId,
    period: Option<Duration>,
    next_run: Instant,
    state: PollerState,
    f: PollFn,
    counters: Arc<CachePadded<PollerCounters>>,
}

pub(crate) struct InterruptSlot {
    id: InterruptId,
    name: String,
    fd: RawFd,
    ready: bool,
    /// Owns the fd source; dropped only after the fd left the epoll set.
    f: PollFn,
}

pub(crate) enum PollerOp {
    Register(PollerSlot),
    Unregister(PollerId),
    Pause(PollerId),
    Resume(PollerId),
    RegisterInterrupt(InterruptSlot),
    UnregisterInterrupt(InterruptId),
}

/// What a callback running on a thread can do: the thread's own state, given as `&mut`.
pub struct ThreadCtx {
    pub(crate) shared: Arc<ThreadShared>,
    pub(crate) app: AppHandle,
    pub(crate) now: Instant,
    pub(crate) ops: Vec<PollerOp>,
    next_poller_seq: u64,
    /// Messages that met a full queue, retried in order at every poll.
    deferred: VecDeque<(ThreadHandle, InlineMsg)>,
    pub(crate) channels: Vec<ChannelSlot>,
    pub(crate) channel_release_pending: bool,
    /// for_each_thread / for_each_channel iterations started here and not yet completed.
    pub(crate) outstanding: usize,
    exit_requested: bool,
    exit_handlers: Vec<ExitHandler>,
}

impl ThreadCtx {
    pub fn id(&self) -> ThreadId {
        self.shared.id
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A handle others can send messages to this thread with.
    pub fn handle(&self) -> ThreadHandle {
        ThreadHandle(self.shared.clone())
    }

    /// Core of the reactor running this thread.
    pub fn core(&self) -> usize {
        self.shared.reactor.core
    }

    /// The time the current poll started (the manual clock in a [`Harness`](crate::Harness)).
    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn app(&self) -> &AppHandle {
        &self.app
    }

    /// Asks the app to stop, as `spdk_app_stop`: every thread is asked to exit.
    pub fn app_stop(&self) {
        self.app.stop();
    }

    /// Creates a thread; see [`AppHandle::create_thread`].
    pub fn create_thread(
        &self,
        name: &str,
        cpumask: Option<&CpuMask>,
    ) -> Result<ThreadHandle, ReactorError> {
        self.app.create_thread(name, cpumask)
    }

    /// Registers a poller: an active one (run at every loop) when `period_us` is 0, a timed one
    /// otherwise (first run `period_us` from now, then `period_us` after each run, without
    /// catch-up after a late run). It starts after the current callback returns.
    ///
    /// The poller returns [`PollStatus::Busy`] when it did work. In interrupt mode a reactor
    /// whose pollers all return `Idle` sleeps until a message, timer or fd wakes it, so a poller
    /// still holding work it could not hand over (a message refused by a full queue) must
    /// return `Busy` until it is handed over.
    pub fn register_poller<F>(&mut self, name: &str, period_us: u64, f: F) -> PollerId
    where
        F: FnMut(&mut ThreadCtx) -> PollStatus + Send + 'static,
    {
        let id = PollerId {
            thread: self.id(),
            seq: self.next_poller_seq,
        };
        self.next_poller_seq += 1;
        let period = (period_us > 0).then(|| Duration::from_micros(period_us));
        let counters = Arc::new(CachePadded::new(PollerCounters::default()));
        lock(&self.shared.pollers).push(PollerInfo {
            id,
            name: name.to_string(),
            kind: match period {
                None => PollerKind::Active,
                Some(_) => PollerKind::Timed { period_us },
            },
            counters: counters.clone(),
        });
        self.ops.push(PollerOp::Register(PollerSlot {
            id,
            period,
            next_run: self.now + period.unwrap_or_default(),
            state: PollerState::Running,
            f: Box::new(f),
            counters,
        }));
        id
    }

    /// Unregisters a poller of this thread (itself included); it never runs again once the
    /// current callback returns.
    pub fn unregister_poller(&mut self, id: PollerId) {
        self.assert_own(id);
        self.ops.push(PollerOp::Unregister(id));
    }

    /// Pauses a poller of this thread until [`ThreadCtx::resume_poller`].
    pub fn pause_poller(&mut self, id: PollerId) {
        self.assert_own(id);
        self.ops.push(PollerOp::Pause(id));
    }

    /// Resumes a paused poller; a timed one next runs one period from now.
    pub fn resume_poller(&mut self, id: PollerId) {
        self.assert_own(id);
        self.ops.push(PollerOp::Resume(id));
    }

    fn assert_own(&self, id: PollerId) {
        assert_eq!(
            id.thread,
            self.id(),
            "poller {id:?} belongs to another thread than {} ({}): send that thread a message",
            self.id(),
            self.name()
        );
    }

    /// Runs `f` on this thread whenever `source` is readable (interrupt mode only; in poll mode
    /// the reactor never sleeps, so poll the source from a poller). `f` gets the source back; it
    /// must consume what made the fd readable (level-triggered). The fd leaves the reactor's
    /// epoll set before `source` is dropped, at unregistration or thread exit.
    pub fn register_interrupt_fd<S, F>(
        &mut self,
        name: &str,
        source: S,
        mut f: F,
    ) -> Result<InterruptId, ReactorError>
    where
        S: AsFd + Send + 'static,
        F: FnMut(&mut ThreadCtx, &mut S) -> PollStatus + Send + 'static,
    {
        let Some(epoll) = self.shared.reactor.epoll.as_ref() else {
            return Err(ReactorError::InterruptModeDisabled {
                thread: self.name().to_string(),
            });
        };
        let fd = source.as_fd().as_raw_fd();
        let token = self.app.0.next_interrupt_token();
        epoll.add(fd, token)?;
        let id = InterruptId {
            thread: self.id(),
            token,
        };
        let mut source = source;
        self.ops.push(PollerOp::RegisterInterrupt(InterruptSlot {
            id,
            name: name.to_string(),
            fd,
            ready: false,
            f: Box::new(move |ctx| f(ctx, &mut source)),
        }));
        Ok(id)
    }

    /// Unregisters an interrupt fd; its source is dropped after the current callback returns.
    pub fn unregister_interrupt_fd(&mut self, id: InterruptId) {
        assert_eq!(
            id.thread,
            self.id(),
            "interrupt {id:?} belongs to another thread"
        );
        self.ops.push(PollerOp::UnregisterInterrupt(id));
    }

    /// Queues `f` to `target` like [`send_msg`], except that a full queue does not hand the
    /// message back: it waits in this thread's deferred list, retried in order at every poll
    /// (per-sender order is kept: once anything is deferred, later sends queue behind it). The
    /// target cannot exit while a deferred message for it waits. Fails only when the target
    /// has exited.
    pub fn send_or_queue<F>(&mut self, target: &ThreadHandle, f: F) -> Result<(), MsgError>
    where
        F: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        self.send_inline_or_queue(target, InlineMsg::new(f))
    }

    /// [`ThreadCtx::send_or_queue`] for an already built message.
    pub fn send_inline_or_queue(
        &mut self,
        target: &ThreadHandle,
        msg: InlineMsg,
    ) -> Result<(), MsgError> {
        if !self.deferred.is_empty() {
            // Take a gate reference for the deferred message, unless the target is gone.
            let gate = target.0.gate.fetch_add(1, Ordering::Acquire);
            if gate & GATE_CLOSED != 0 {
                target.0.gate.fetch_sub(1, Ordering::Release);
                return Err(MsgError::ThreadExited {
                    thread: target.clone(),
                    msg,
                });
            }
            self.deferred.push_back((target.clone(), msg));
            return Ok(());
        }
        match target.0.push(msg, true) {
            Ok(()) => Ok(()),
            Err(MsgError::QueueFull { msg, .. }) => {
                self.deferred.push_back((target.clone(), msg));
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Messages waiting in this thread's deferred list.
    pub fn deferred_messages(&self) -> usize {
        self.deferred.len()
    }

    /// Retries deferred messages in order; stops at the first still-full queue.
    fn flush_deferred(&mut self) -> bool {
        let mut progressed = false;
        while let Some((target, msg)) = self.deferred.pop_front() {
            match target.0.push_deferred(msg) {
                Ok(()) => progressed = true,
                Err(MsgError::QueueFull { msg, .. }) => {
                    self.deferred.push_front((target, msg));
                    break;
                }
                Err(MsgError::ThreadExited { .. }) => {
                    tracing::error!(
                        thread = self.name(),
                        target = target.name(),
                        "dropping a deferred message: its target was forced to exit"
                    );
                    progressed = true;
                }
            }
        }
        progressed
    }

    /// Asks this thread to exit, as `spdk_thread_exit`: its exit handlers run, then it exits
    /// once its pollers and interrupts are unregistered, its channels put, its queue drained and
    /// its deferred messages delivered.
    pub fn exit(&mut self) {
        self.exit_requested = true;
    }

    /// Whether this thread was asked to exit.
    pub fn is_exiting(&self) -> bool {
        self.exit_requested
    }

    /// Runs `f` when this thread is asked to exit (by [`ThreadCtx::exit`] or app stop), last
    /// registered first: the place to unregister pollers and put channels.
    pub fn on_exit<F>(&mut self, f: F)
    where
        F: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        self.exit_handlers.push(Box::new(f));
    }

    /// Runs `f` on every thread of the app, one after another, then `done` on this thread, as
    /// `spdk_for_each_thread`. Threads created after the call are not visited; threads that
    /// exit before their turn are skipped. One allocation per call, none per hop.
    pub fn for_each_thread<F, D>(&mut self, f: F, done: D)
    where
        F: FnMut(&mut ThreadCtx) + Send + 'static,
        D: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        let iteration = Box::new(ForEachThread {
            threads: self.app.thread_handles(),
            index: 0,
            origin: self.handle(),
            f,
            done: Some(done),
        });
        self.outstanding += 1;
        iteration.forward(self);
    }

    /// A snapshot of this thread's statistics.
    pub fn stats(&self) -> ThreadStats {
        self.shared.stats()
    }
}

/// The state of one `for_each_thread`, moved (boxed) from thread to thread.
struct ForEachThread<F, D> {
    threads: Vec<ThreadHandle>,
    index: usize,
    origin: ThreadHandle,
    f: F,
    done: Option<D>,
}

impl<F, D> ForEachThread<F, D>
where
    F: FnMut(&mut ThreadCtx) + Send + 'static,
    D: FnOnce(&mut ThreadCtx) + Send + 'static,
{
    /// Sends the iteration to the next live thread, or its completion to the origin.
    fn forward(mut self: Box<Self>, ctx: &mut ThreadCtx) {
        loop {
            let Some(target) = self.threads.get(self.index).cloned() else {
                let origin = self.origin.clone();
                let completion = InlineMsg::new(move |ctx: &mut ThreadCtx| {
                    // Saturating: a forced exit may have zeroed it before this ran.
                    ctx.outstanding = ctx.outstanding.saturating_sub(1);
                    if let Some(done) = self.done.take() {
                        done(ctx);
                    }
                });
                if let Err(error) = ctx.send_inline_or_queue(&origin, completion) {
                    // Only a forced exit of the origin gets here.
                    tracing::error!(%error, "for_each_thread completion lost");
                }
                return;
            };
            if target.has_exited() {
                self.index += 1;
                continue;
            }
            let visit = InlineMsg::new(move |ctx: &mut ThreadCtx| self.visit(ctx));
            match ctx.send_inline_or_queue(&target, visit) {
                Ok(()) => return,
                // The target exited between the check and the send: run the hop here, where
                // `visit` sees that it is not on the target and skips it.
                Err(error) => return error.into_msg().call(ctx),
            }
        }
    }

    fn visit(mut self: Box<Self>, ctx: &mut ThreadCtx) {
        if self.threads[self.index].id() == ctx.id() {
            (self.f)(ctx);
        }
        self.index += 1;
        self.forward(ctx);
    }
}

/// Exit progress of a thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitState {
    Running,
    /// Exit handlers ran; waiting for pollers, channels and messages.
    Exiting {
        since: Instant,
    },
    /// The queue is closed; remaining work is finishing.
    Closed {
        since: Instant,
    },
    Exited,
}

/// A lightweight thread as its reactor owns it.
pub(crate) struct Thread {
    shared: Arc<ThreadShared>,
    active: Vec<PollerSlot>,
    timed: Vec<PollerSlot>,
    interrupts: Vec<InterruptSlot>,
    needs_compaction: bool,
    /// Earliest `next_run` of the running timed pollers (may be early, never late).
    next_timed: Option<Instant>,
    exit: ExitState,
    exit_timeout: Duration,
    msg_batch: usize,
    pub(crate) ctx: ThreadCtx,
}

impl Thread {
    pub(crate) fn new(shared: Arc<ThreadShared>, app: AppHandle, now: Instant) -> Self {
        let exit_timeout = app.0.config.thread_exit_timeout;
        let msg_batch = app.0.config.msg_batch;
        Self {
            ctx: ThreadCtx {
                shared: shared.clone(),
                app,
                now,
                ops: Vec::new(),
                next_poller_seq: 0,
                deferred: VecDeque::new(),
                channels: Vec::new(),
                channel_release_pending: false,
                outstanding: 0,
                exit_requested: false,
                exit_handlers: Vec::new(),
            },
            shared,
            active: Vec::new(),
            timed: Vec::new(),
            interrupts: Vec::new(),
            needs_compaction: false,
            next_timed: None,
            exit: ExitState::Running,
            exit_timeout,
            msg_batch,
        }
    }

    pub(crate) fn id(&self) -> ThreadId {
        self.shared.id
    }

    pub(crate) fn shared(&self) -> &Arc<ThreadShared> {
        &self.shared
    }

    pub(crate) fn has_exited(&self) -> bool {
        self.exit == ExitState::Exited
    }

    pub(crate) fn request_exit(&mut self) {
        self.ctx.exit_requested = true;
    }

    /// Runs `f` as a callback of this thread (the harness's `with_thread`).
    pub(crate) fn run_callback<R>(&mut self, f: impl FnOnce(&mut ThreadCtx) -> R) -> R {
        let result = f(&mut self.ctx);
        self.after_callback();
        result
    }

    /// One poll, as SPDK's `thread_poll`: a batch of messages, deferred sends, ready interrupt
    /// callbacks, active pollers, due timed pollers, then exit progress.
    pub(crate) fn poll(&mut self, now: Instant) -> PollStatus {
        self.ctx.now = now;
        let mut busy = false;

        let mut messages = 0;
        while messages < self.msg_batch {
            let Some(msg) = self.shared.queue.pop() else {
                break;
            };
            msg.call(&mut self.ctx);
            messages += 1;
            self.after_callback();
        }
        if messages > 0 {
            self.shared.counters.messages.add(messages as u64);
            busy = true;
        }

        if !self.ctx.deferred.is_empty() {
            busy |= self.ctx.flush_deferred();
        }

        for index in 0..self.interrupts.len() {
            let slot = &mut self.interrupts[index];
            if !slot.ready {
                continue;
            }
            slot.ready = false;
            busy |= (slot.f)(&mut self.ctx).is_busy();
            self.after_callback();
        }

        // Pollers registered during the loop are appended and first run at the next poll.
        for index in 0..self.active.len() {
            let slot = &mut self.active[index];
            if slot.state != PollerState::Running {
                continue;
            }
            let status = (slot.f)(&mut self.ctx);
            slot.counters.runs.add(1);
            if status.is_busy() {
                slot.counters.busy_runs.add(1);
                busy = true;
            }
            if !self.ctx.ops.is_empty() || self.ctx.channel_release_pending {
                self.after_callback();
            }
        }

        if self.next_timed.is_some_and(|next| next <= now) {
            busy |= self.run_timed(now);
        }

        if self.needs_compaction {
            self.compact();
        }
        if self.ctx.exit_requested && self.exit == ExitState::Running {
            self.begin_exit(now);
            busy = true;
        }
        if self.exit != ExitState::Running && self.exit != ExitState::Exited {
            busy |= self.progress_exit(now);
        }
        self.shared.counters.polls.add(1);
        PollStatus::from_busy(busy)
    }

    fn run_timed(&mut self, now: Instant) -> bool {
        let mut busy = false;
        for index in 0..self.timed.len() {
            let slot = &mut self.timed[index];
            if slot.state != PollerState::Running || slot.next_run > now {
                continue;
            }
            let period = slot.period.unwrap_or_default();
            slot.next_run = now + period;
            let status = (slot.f)(&mut self.ctx);
            slot.counters.runs.add(1);
            if status.is_busy() {
                slot.counters.busy_runs.add(1);
                busy = true;
            }
            self.after_callback();
        }
        self.next_timed = self
            .timed
            .iter()
            .filter(|slot| slot.state == PollerState::Running)
            .map(|slot| slot.next_run)
            .min();
        busy
    }

    /// Applies what the last callback asked for: poller operations, then deferred channel
    /// releases (whose destroy callbacks may ask for more).
    pub(crate) fn after_callback(&mut self) {
        loop {
            let mut ops = std::mem::take(&mut self.ctx.ops);
            for op in ops.drain(..) {
                self.apply(op);
            }
            // Give the (now empty) buffer back so that steady state does not allocate.
            if self.ctx.ops.is_empty() {
                self.ctx.ops = ops;
            }
            if self.ctx.channel_release_pending {
                self.ctx.release_channels();
            }
            if self.ctx.ops.is_empty() && !self.ctx.channel_release_pending {
                break;
            }
        }
    }

    fn apply(&mut self, op: PollerOp) {
        match op {
            PollerOp::Register(slot) => {
                if slot.period.is_some() {
                    self.next_timed = Some(match self.next_timed {
                        Some(next) => next.min(slot.next_run),
                        None => slot.next_run,
                    });
                    self.timed.push(slot);
                } else {
                    self.active.push(slot);
                }
            }
            PollerOp::Unregister(id) => match self.find_poller(id) {
                Some(slot) if slot.state != PollerState::Unregistered => {
                    slot.state = PollerState::Unregistered;
                    self.needs_compaction = true;
                    lock(&self.shared.pollers).retain(|info| info.id != id);
                }
                _ => {
                    tracing::warn!(thread = %self.shared.name, ?id, "unregistering an unknown poller")
                }
            },
            PollerOp::Pause(id) => match self.find_poller(id) {
                Some(slot) if slot.state == PollerState::Running => {
                    slot.state = PollerState::Paused;
                    slot.counters.paused.store(true, Ordering::Relaxed);
                }
                Some(_) => {}
                None => {
                    tracing::warn!(thread = %self.shared.name, ?id, "pausing an unknown poller")
                }
            },
            PollerOp::Resume(id) => {
                let now = self.ctx.now;
                match self.find_poller(id) {
                    Some(slot) if slot.state == PollerState::Paused => {
                        slot.state = PollerState::Running;
                        slot.counters.paused.store(false, Ordering::Relaxed);
                        if let Some(period) = slot.period {
                            slot.next_run = now + period;
                            let next_run = slot.next_run;
                            self.next_timed =
                                Some(self.next_timed.map_or(next_run, |next| next.min(next_run)));
                        }
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!(thread = %self.shared.name, ?id, "resuming an unknown poller")
                    }
                }
            }
            PollerOp::RegisterInterrupt(slot) => self.interrupts.push(slot),
            PollerOp::UnregisterInterrupt(id) => {
                match self.interrupts.iter().position(|slot| slot.id == id) {
                    Some(index) => {
                        let slot = self.interrupts.remove(index);
                        self.remove_from_epoll(&slot);
                    }
                    None => {
                        tracing::warn!(thread = %self.shared.name, ?id, "unregistering an unknown interrupt")
                    }
                }
            }
        }
    }

    fn remove_from_epoll(&self, slot: &InterruptSlot) {
        if let Some(epoll) = self.shared.reactor.epoll.as_ref() {
            if let Err(error) = epoll.remove(slot.fd) {
                tracing::warn!(interrupt = %slot.name, %error, "removing an interrupt fd from epoll");
            }
        }
    }

    fn find_poller(&mut self, id: PollerId) -> Option<&mut PollerSlot> {
        self.active
            .iter_mut()
            .chain(self.timed.iter_mut())
            .find(|slot| slot.id == id)
    }

    fn compact(&mut self) {
        self.active
            .retain(|slot| slot.state != PollerState::Unregistered);
        self.timed
            .retain(|slot| slot.state != PollerState::Unregistered);
        self.needs_compaction = false;
    }

    /// Marks the interrupt with `token` ready if it is this thread's.
    pub(crate) fn mark_interrupt(&mut self, token: u64) -> bool {
        match self
            .interrupts
            .iter_mut()
            .find(|slot| slot.id.token == token)
        {
            Some(slot) => {
                slot.ready = true;
                true
            }
            None => false,
        }
    }

    pub(crate) fn has_interrupts(&self) -> bool {
        !self.interrupts.is_empty()
    }

    /// Whether a poll would have something to do right now (checked before sleeping).
    pub(crate) fn has_pending_work(&self) -> bool {
        !self.shared.queue.is_empty()
            || !self.ctx.deferred.is_empty()
            || self.interrupts.iter().any(|slot| slot.ready)
            || (self.ctx.exit_requested && self.exit == ExitState::Running)
    }

    /// The next time this thread needs a poll without any event: its next timed poller, or its
    /// forced-exit deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let exit_deadline = match self.exit {
            ExitState::Exiting { since } | ExitState::Closed { since } => {
                Some(since + self.exit_timeout)
            }
            ExitState::Running | ExitState::Exited => None,
        };
        match (self.next_timed, exit_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn begin_exit(&mut self, now: Instant) {
        tracing::debug!(thread = %self.shared.name, "thread exiting");
        self.exit = ExitState::Exiting { since: now };
        while let Some(handler) = self.ctx.exit_handlers.pop() {
            handler(&mut self.ctx);
            self.after_callback();
        }
    }

    /// Nothing of the thread's own is left.
    fn is_quiescent(&self) -> bool {
        self.active.is_empty()
            && self.timed.is_empty()
            && self.interrupts.is_empty()
            && self.ctx.channels.is_empty()
            && self.ctx.deferred.is_empty()
            && self.ctx.outstanding == 0
            && self.ctx.ops.is_empty()
            && self.shared.queue.is_empty()
    }

    fn progress_exit(&mut self, now: Instant) -> bool {
        if let ExitState::Exiting { since } = self.exit {
            if self.is_quiescent() && self.shared.try_close() {
                self.exit = ExitState::Closed { since };
            } else if now.saturating_duration_since(since) >= self.exit_timeout {
                self.force_exit();
                self.exit = ExitState::Closed { since };
            } else {
                return false;
            }
        }
        let ExitState::Closed { since } = self.exit else {
            return false;
        };
        // Messages queued before the close: run them all, then finish any work they made.
        let mut ran = false;
        while let Some(msg) = self.shared.queue.pop() {
            msg.call(&mut self.ctx);
            self.shared.counters.messages.add(1);
            self.after_callback();
            ran = true;
        }
        if !self.ctx.deferred.is_empty() {
            self.ctx.flush_deferred();
        }
        if self.is_quiescent() {
            tracing::debug!(thread = %self.shared.name, "thread exited");
            self.exit = ExitState::Exited;
        } else if now.saturating_duration_since(since) >= self.exit_timeout {
            self.force_exit();
            self.exit = ExitState::Exited;
        }
        ran
    }

    /// Tears down what an exiting thread still holds after the exit timeout, loudly.
    fn force_exit(&mut self) {
        let pollers: Vec<String> = lock(&self.shared.pollers)
            .iter()
            .map(|info| info.name.clone())
            .collect();
        let channels = self.ctx.channel_names();
        tracing::error!(
            thread = %self.shared.name,
            timeout_ms = self.exit_timeout.as_millis() as u64,
            ?pollers,
            ?channels,
            interrupts = self.interrupts.len(),
            deferred = self.ctx.deferred.len(),
            outstanding = self.ctx.outstanding,
            "thread did not release its resources in time; forcing its exit"
        );
        self.active.clear();
        self.timed.clear();
        self.next_timed = None;
        lock(&self.shared.pollers).clear();
        for slot in std::mem::take(&mut self.interrupts) {
            self.remove_from_epoll(&slot);
        }
        self.ctx.force_release_channels();
        while let Some((target, _msg)) = self.ctx.deferred.pop_front() {
            target.0.gate.fetch_sub(1, Ordering::Release);
        }
        self.ctx.outstanding = 0;
        self.ctx.ops.clear();
        // Messages already queued still run (in `progress_exit`); new ones are refused.
        self.shared.force_close();
    }
}

impl Drop for Thread {
    fn drop(&mut self) {
        // Normally already closed; after a panic this tells senders the thread is gone.
        self.shared.force_close();
        for slot in std::mem::take(&mut self.interrupts) {
            self.remove_from_epoll(&slot);
        }
        while let Some((target, _msg)) = self.ctx.deferred.pop_front() {
            target.0.gate.fetch_sub(1, Ordering::Release);
        }
    }
}
