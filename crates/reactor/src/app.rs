//! The app: reactors on a core mask, thread placement, start and stop, as SPDK's
//! `spdk_app_start` / `spdk_app_stop`, plus the manual [`Harness`] for tests.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pollux_env::cpumask::CpuMask;

use crate::channel::DeviceTable;
use crate::error::ReactorError;
use crate::reactor::{Reactor, ReactorShared};
use crate::stats::{ReactorStats, ThreadStats};
use crate::sys;
use crate::thread::{lock, PollStatus, Thread, ThreadCtx, ThreadHandle, ThreadId, ThreadShared};

/// How an app is set up.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Name, for logs.
    pub name: String,
    /// One reactor per core; the first core's reactor runs on the thread calling [`App::run`].
    pub cpumask: CpuMask,
    /// Idle reactors sleep in epoll instead of spinning (default: poll mode).
    pub interrupt_mode: bool,
    /// Stop the app on SIGINT / SIGTERM (a second one exits the process with 128 + signal).
    pub handle_signals: bool,
    /// Capacity of each thread's message queue.
    pub msg_queue_depth: usize,
    /// Messages a thread runs per poll (8..=64), as SPDK's `SPDK_MSG_BATCH_SIZE`.
    pub msg_batch: usize,
    /// How long an exiting thread may hold pollers, channels or messages before it is torn
    /// down forcibly (logged as an error), as SPDK's `THREAD_EXIT_TIMEOUT_SEC`.
    pub thread_exit_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        let first = CpuMask::available().first().unwrap_or(0);
        Self {
            name: "pollux".to_string(),
            cpumask: std::iter::once(first).collect(),
            interrupt_mode: false,
            handle_signals: true,
            msg_queue_depth: 4096,
            msg_batch: 32,
            thread_exit_timeout: Duration::from_secs(5),
        }
    }
}

impl AppConfig {
    fn validate(&self) -> Result<(), ReactorError> {
        if self.cpumask.is_empty() {
            return Err(ReactorError::InvalidConfig {
                field: "cpumask",
                reason: "selects no core".to_string(),
            });
        }
        if !(8..=64).contains(&self.msg_batch) {
            return Err(ReactorError::InvalidConfig {
                field: "msg_batch",
                reason: format!("{} is outside 8..=64", self.msg_batch),
            });
        }
        if self.msg_queue_depth < 2 {
            return Err(ReactorError::InvalidConfig {
                field: "msg_queue_depth",
                reason: format!("{} is below 2", self.msg_queue_depth),
            });
        }
        Ok(())
    }
}

/// Time source: the real monotonic clock, or a manual one for deterministic tests.
pub(crate) enum Clock {
    Real,
    Manual { base: Instant, offset_ns: AtomicU64 },
}

impl Clock {
    #[inline]
    pub(crate) fn now(&self) -> Instant {
        match self {
            Clock::Real => Instant::now(),
            Clock::Manual { base, offset_ns } => {
                *base + Duration::from_nanos(offset_ns.load(Ordering::Relaxed))
            }
        }
    }
}

/// Threads of the app and the placement cursor. Locked to create, reap or list threads.
pub(crate) struct Registry {
    pub(crate) stopping: bool,
    pub(crate) threads: Vec<ThreadHandle>,
    next_thread_id: u64,
    /// Index of the reactor the next round-robin placement starts from.
    cursor: usize,
}

pub(crate) struct AppShared {
    pub(crate) config: AppConfig,
    /// In core order.
    pub(crate) reactors: Vec<Arc<ReactorShared>>,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) stop_requested: AtomicBool,
    /// Set by the SIGINT / SIGTERM handlers; read by the first reactor.
    pub(crate) signal_flag: Arc<AtomicBool>,
    pub(crate) devices: Mutex<DeviceTable>,
    pub(crate) clock: Clock,
    next_interrupt_token: AtomicU64,
}

impl AppShared {
    fn new(config: AppConfig, clock: Clock) -> Result<Self, ReactorError> {
        config.validate()?;
        let reactors = config
            .cpumask
            .iter()
            .enumerate()
            .map(|(index, core)| {
                ReactorShared::new(index, core, config.interrupt_mode).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            reactors,
            registry: Mutex::new(Registry {
                stopping: false,
                threads: Vec::new(),
                next_thread_id: 0,
                cursor: 0,
            }),
            stop_requested: AtomicBool::new(false),
            signal_flag: Arc::new(AtomicBool::new(false)),
            devices: Mutex::new(DeviceTable::default()),
            clock,
            next_interrupt_token: AtomicU64::new(1),
        })
    }

    pub(crate) fn next_interrupt_token(&self) -> u64 {
        self.next_interrupt_token.fetch_add(1, Ordering::Relaxed)
    }
}

/// A handle to the app from any thread: stop it, create threads, register io devices, read
/// statistics.
#[derive(Clone)]
pub struct AppHandle(pub(crate) Arc<AppShared>);

impl AppHandle {
    /// Asks every thread to exit; [`App::run`] returns once they all have.
    pub fn stop(&self) {
        let mut registry = lock(&self.0.registry);
        if registry.stopping {
            return;
        }
        registry.stopping = true;
        drop(registry);
        tracing::info!(app = %self.0.config.name, "app stopping");
        self.0.stop_requested.store(true, Ordering::Release);
        for reactor in &self.0.reactors {
            reactor.ring();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.0.stop_requested.load(Ordering::Acquire)
    }

    pub fn cpumask(&self) -> CpuMask {
        self.0.config.cpumask
    }

    pub fn interrupt_mode(&self) -> bool {
        self.0.config.interrupt_mode
    }

    /// Creates a lightweight thread and places it on a reactor: round robin over the reactors
    /// its mask allows, with one cursor for the app (the policy is documented where it is
    /// computed, `place` in `app.rs`).
    /// `cpumask` restricts the reactors it may run on (`None`: any). Messages may be sent to
    /// the returned handle at once; they run once the reactor adopts the thread.
    pub fn create_thread(
        &self,
        name: &str,
        cpumask: Option<&CpuMask>,
    ) -> Result<ThreadHandle, ReactorError> {
        let mut registry = lock(&self.0.registry);
        if registry.stopping {
            return Err(ReactorError::AppStopping {
                what: format!("create thread {name:?}"),
            });
        }
        let index = place(&self.0.reactors, &mut registry.cursor, cpumask).ok_or_else(|| {
            ReactorError::NoReactorInMask {
                thread: name.to_string(),
                mask: cpumask.map(ToString::to_string).unwrap_or_default(),
                reactors: self.0.config.cpumask.to_string(),
            }
        })?;
        Ok(self.create_thread_on(&mut registry, index, name))
    }

    fn create_thread_on(&self, registry: &mut Registry, index: usize, name: &str) -> ThreadHandle {
        let reactor = &self.0.reactors[index];
        let id = ThreadId(registry.next_thread_id);
        registry.next_thread_id += 1;
        let shared = Arc::new(ThreadShared::new(
            id,
            name.to_string(),
            reactor.clone(),
            self.0.config.msg_queue_depth,
        ));
        let handle = ThreadHandle(shared.clone());
        registry.threads.push(handle.clone());
        reactor
            .inbox
            .push(Thread::new(shared, self.clone(), self.0.clock.now()));
        reactor.notify();
        handle
    }

    /// Handles of the live threads, in creation order.
    pub fn thread_handles(&self) -> Vec<ThreadHandle> {
        lock(&self.0.registry).threads.clone()
    }

    /// Statistics of every reactor, in core order (`framework_get_reactors`).
    pub fn reactor_stats(&self) -> Vec<ReactorStats> {
        self.0
            .reactors
            .iter()
            .map(|reactor| reactor.stats())
            .collect()
    }

    /// Statistics of every live thread (`thread_get_stats`).
    pub fn thread_stats(&self) -> Vec<ThreadStats> {
        self.thread_handles()
            .iter()
            .map(ThreadHandle::stats)
            .collect()
    }
}

/// Thread placement policy: round robin over the reactors, in core order, restricted to the
/// thread's cpumask. One cursor serves every creation, so consecutive threads spread over the
/// cores; a thread whose mask excludes the cursor's reactor takes the next allowed one after
/// it. There is no load feedback and no migration: a thread stays on the reactor it was placed
/// on for its life (SPDK's scheduler may move threads; Pollux does not yet).
fn place(
    reactors: &[Arc<ReactorShared>],
    cursor: &mut usize,
    cpumask: Option<&CpuMask>,
) -> Option<usize> {
    let count = reactors.len();
    let index = (0..count)
        .map(|step| (*cursor + step) % count)
        .find(|index| cpumask.is_none_or(|mask| mask.contains(reactors[*index].core)))?;
    *cursor = (index + 1) % count;
    Some(index)
}

/// The app: reactors pinned on the configured cores.
pub struct App {
    handle: AppHandle,
}

impl App {
    pub fn new(config: AppConfig) -> Result<Self, ReactorError> {
        Ok(Self {
            handle: AppHandle(Arc::new(AppShared::new(config, Clock::Real)?)),
        })
    }

    /// A handle to stop the app or read statistics from outside.
    pub fn handle(&self) -> AppHandle {
        self.handle.clone()
    }

    /// Starts one reactor per core, each pinned to its core (the first on the calling thread,
    /// whose affinity is restored afterwards), runs `start` on the first thread ("app_thread",
    /// on the first reactor), and returns once the app stopped and every thread exited. A panic
    /// in a callback stops the app and is resumed here once every reactor returned.
    pub fn run<F>(self, start: F) -> Result<(), ReactorError>
    where
        F: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        let app = self.handle;
        let config = &app.0.config;
        let available = CpuMask::available();
        if let Some(core) = config
            .cpumask
            .iter()
            .find(|core| !available.contains(*core))
        {
            return Err(ReactorError::CoreUnavailable {
                core,
                mask: config.cpumask.to_string(),
                available: available.to_string(),
            });
        }
        tracing::info!(app = %config.name, mask = %config.cpumask, interrupt_mode = config.interrupt_mode, "app starting");

        let signals = if config.handle_signals {
            Some(SignalGuard::install(&app)?)
        } else {
            None
        };
        let mut first = Reactor::new(app.0.reactors[0].clone(), app.clone());
        if let Some(reader) = signals.as_ref().and_then(|guard| guard.reader.as_ref()) {
            let reader = reader.try_clone().map_err(|source| ReactorError::Sys {
                op: "dup(signal pipe)",
                source,
            })?;
            first.watch_signal_pipe(reader)?;
        }

        let app_thread = app.create_thread_on(&mut lock(&app.0.registry), 0, "app_thread");
        let start = Box::new(start);
        app_thread.send(move |ctx| start(ctx))?;

        let mut others: Vec<(usize, JoinHandle<Result<(), ReactorError>>)> = Vec::new();
        let mut result = Ok(());
        for shared in app.0.reactors.iter().skip(1) {
            let core = shared.core;
            let reactor = Reactor::new(shared.clone(), app.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || run_pinned(reactor, core));
            match spawned {
                Ok(join) => others.push((core, join)),
                Err(source) => {
                    app.stop();
                    result = Err(ReactorError::Spawn { core, source });
                    break;
                }
            }
        }

        let saved_affinity = sys::current_affinity().ok();
        let first_core = app.0.reactors[0].core;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_pinned(first, first_core)
        }));
        if let Some(mask) = saved_affinity {
            if let Err(error) = sys::set_affinity(&mask) {
                tracing::warn!(%error, "could not restore the caller's affinity");
            }
        }
        let mut panic = None;
        match outcome {
            Ok(first_result) => result = result.and(first_result),
            Err(payload) => panic = Some(payload),
        }
        for (core, join) in others {
            match join.join() {
                Ok(reactor_result) => result = result.and(reactor_result),
                Err(payload) => {
                    tracing::error!(core, "reactor panicked");
                    panic.get_or_insert(payload);
                }
            }
        }
        drop(signals);
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
        tracing::info!(app = %config.name, "app stopped");
        result
    }
}

/// Pins the calling OS thread to `core` and runs the reactor loop. A reactor that cannot pin
/// stops the app (its threads still run to their exit) and reports [`ReactorError::Pin`]; a
/// panic stops the app before unwinding further.
fn run_pinned(mut reactor: Reactor, core: usize) -> Result<(), ReactorError> {
    struct StopOnPanic(crate::AppHandle);
    impl Drop for StopOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.stop();
            }
        }
    }
    let _guard = StopOnPanic(reactor.app_handle());
    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
    if !pinned {
        tracing::error!(core, "could not pin the reactor; stopping the app");
        reactor.app_handle().stop();
    }
    let result = reactor.run();
    if !pinned {
        return Err(ReactorError::Pin { core });
    }
    result
}

/// SIGINT / SIGTERM handling for one run: the first signal sets the app's flag (and writes the
/// self-pipe, which wakes the first reactor in interrupt mode); a second one exits the process
/// with status 128 + signal. Dropping the guard removes the actions; once no app handles
/// signals, the default (terminating) behaviour is back.
struct SignalGuard {
    ids: Vec<signal_hook::SigId>,
    reader: Option<UnixStream>,
}

/// Apps handling signals right now, and whether the emulated default action is on (no app).
/// signal-hook cannot give the original disposition back, so a process-wide "default" action is
/// registered once, first (actions run in registration order), and enabled only between apps.
static SIGNAL_APPS: Mutex<usize> = Mutex::new(0);
static SIGNAL_DEFAULT_ON: AtomicBool = AtomicBool::new(false);
static SIGNAL_DEFAULT_REGISTERED: std::sync::Once = std::sync::Once::new();

impl SignalGuard {
    fn install(app: &AppHandle) -> Result<Self, ReactorError> {
        SIGNAL_DEFAULT_REGISTERED.call_once(|| {
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                if let Err(error) =
                    signal_hook::flag::register_conditional_default(signal, &SIGNAL_DEFAULT_ON)
                {
                    tracing::warn!(signal, %error, "could not register the default signal action");
                }
            }
        });

        let (reader, writer) = UnixStream::pair().map_err(|source| ReactorError::Sys {
            op: "socketpair(signal pipe)",
            source,
        })?;
        let mut guard = Self {
            ids: Vec::new(),
            reader: Some(reader),
        };
        // Counted from here on: the guard's Drop gives it back, even on an error below.
        *lock(&SIGNAL_APPS) += 1;
        SIGNAL_DEFAULT_ON.store(false, Ordering::SeqCst);
        for (signal, name) in [
            (signal_hook::consts::SIGINT, "SIGINT"),
            (signal_hook::consts::SIGTERM, "SIGTERM"),
        ] {
            let error = |source| ReactorError::Signal {
                signal: name,
                source,
            };
            let flag = app.0.signal_flag.clone();
            // Order matters: the exit action must see the flag as it was before this signal.
            guard.ids.push(
                signal_hook::flag::register_conditional_shutdown(
                    signal,
                    128 + signal,
                    flag.clone(),
                )
                .map_err(error)?,
            );
            guard
                .ids
                .push(signal_hook::flag::register(signal, flag).map_err(error)?);
            let writer = writer.try_clone().map_err(error)?;
            guard
                .ids
                .push(signal_hook::low_level::pipe::register(signal, writer).map_err(error)?);
        }
        Ok(guard)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        let mut apps = lock(&SIGNAL_APPS);
        *apps -= 1;
        if *apps == 0 {
            SIGNAL_DEFAULT_ON.store(true, Ordering::SeqCst);
        }
    }
}

/// Which clock a [`Harness`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HarnessClock {
    /// Time moves only by [`Harness::advance_time`] (deterministic timed pollers).
    Manual,
    /// The real monotonic clock (benchmarks).
    Real,
}

/// A deterministic test harness, as SPDK's `test/common/lib/ut_multithread.c`: several reactors
/// and their lightweight threads on the calling OS thread, polled step by step, no pinning,
/// poll mode, no signal handling.
pub struct Harness {
    app: AppHandle,
    reactors: Vec<Reactor>,
}

impl Harness {
    /// `reactor_count` reactors (labelled cores 0..reactor_count), manual clock.
    pub fn new(reactor_count: usize) -> Self {
        assert!(reactor_count > 0, "a harness needs at least one reactor");
        let config = AppConfig {
            name: "harness".to_string(),
            cpumask: (0..reactor_count).collect(),
            handle_signals: false,
            ..AppConfig::default()
        };
        match Self::with_config(config, HarnessClock::Manual) {
            Ok(harness) => harness,
            Err(error) => panic!("default harness configuration refused: {error}"),
        }
    }

    /// A harness with one reactor per core of `config.cpumask` (used as labels only).
    /// Interrupt mode is refused: nothing would sleep.
    pub fn with_config(config: AppConfig, clock: HarnessClock) -> Result<Self, ReactorError> {
        if config.interrupt_mode {
            return Err(ReactorError::InvalidConfig {
                field: "interrupt_mode",
                reason: "is not supported by the manual harness".to_string(),
            });
        }
        let clock = match clock {
            HarnessClock::Manual => Clock::Manual {
                base: Instant::now(),
                offset_ns: AtomicU64::new(0),
            },
            HarnessClock::Real => Clock::Real,
        };
        let app = AppHandle(Arc::new(AppShared::new(config, clock)?));
        let reactors = app
            .0
            .reactors
            .iter()
            .map(|shared| Reactor::new(shared.clone(), app.clone()))
            .collect();
        Ok(Self { app, reactors })
    }

    pub fn app(&self) -> &AppHandle {
        &self.app
    }

    /// Creates a thread (placed round robin); it is adopted at its reactor's next poll.
    pub fn create_thread(
        &self,
        name: &str,
        cpumask: Option<&CpuMask>,
    ) -> Result<ThreadHandle, ReactorError> {
        self.app.create_thread(name, cpumask)
    }

    pub fn reactor_mut(&mut self, index: usize) -> &mut Reactor {
        &mut self.reactors[index]
    }

    pub fn reactor_count(&self) -> usize {
        self.reactors.len()
    }

    /// Polls every reactor once, in order.
    pub fn poll_once(&mut self) -> PollStatus {
        self.reactors
            .iter_mut()
            .fold(PollStatus::Idle, |status, reactor| {
                status | reactor.poll_once()
            })
    }

    /// Polls one thread wherever it is (`poll_thread` of ut_multithread).
    pub fn poll_thread(&mut self, thread: &ThreadHandle) -> Option<PollStatus> {
        self.reactors
            .iter_mut()
            .find_map(|reactor| reactor.poll_thread(thread.id()))
    }

    /// Polls until a round does nothing; returns the busy rounds. Fails after `max_rounds`.
    pub fn poll_until_idle(&mut self, max_rounds: usize) -> Result<usize, ReactorError> {
        for round in 0..max_rounds {
            if !self.poll_once().is_busy() {
                return Ok(round);
            }
        }
        Err(ReactorError::NotQuiescent {
            what: "harness threads",
            rounds: max_rounds,
        })
    }

    /// Runs `f` as a callback of `thread` right now (as ut_multithread's `set_thread` lets a
    /// test call APIs as that thread); pending poller operations apply when it returns. `None`
    /// when the thread is not (or no longer) on any reactor.
    pub fn with_thread<R>(
        &mut self,
        thread: &ThreadHandle,
        f: impl FnOnce(&mut ThreadCtx) -> R,
    ) -> Option<R> {
        let reactor = self
            .reactors
            .iter_mut()
            .find(|reactor| reactor.core() == thread.core())?;
        reactor.with_thread(thread.id(), f)
    }

    /// Moves the manual clock forward (no effect with the real clock).
    pub fn advance_time(&self, by: Duration) {
        if let Clock::Manual { offset_ns, .. } = &self.app.0.clock {
            offset_ns.fetch_add(
                by.as_nanos().min(u64::MAX as u128) as u64,
                Ordering::Relaxed,
            );
        }
    }

    /// Live threads on all reactors (adopted or waiting to be).
    pub fn thread_count(&self) -> usize {
        lock(&self.app.0.registry).threads.len()
    }

    /// Stops the app and polls until every thread exited. Fails after `max_rounds`.
    pub fn stop(&mut self, max_rounds: usize) -> Result<(), ReactorError> {
        self.app.stop();
        for _ in 0..max_rounds {
            self.poll_once();
            if self.thread_count() == 0 {
                return Ok(());
            }
        }
        Err(ReactorError::NotQuiescent {
            what: "app stop",
            rounds: max_rounds,
        })
    }
}
