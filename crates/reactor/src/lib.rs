//! Pollux reactor framework, with the semantics of SPDK's event framework and `spdk_thread`
//! (`lib/event/reactor.c`, `lib/thread/thread.c`):
//!
//! - [`App`]: one [`Reactor`] per core of a [`CpuMask`](pollux_env::cpumask::CpuMask), each an
//!   OS thread pinned to its core (the first runs on the caller), stopped by
//!   [`AppHandle::stop`] or SIGINT / SIGTERM;
//! - lightweight threads ([`ThreadHandle`], [`ThreadCtx`]) placed round robin on reactors;
//! - pollers, active or timed ([`ThreadCtx::register_poller`]);
//! - messages between threads without allocation ([`send_msg`], [`InlineMsg`]);
//! - io devices and per-thread channels ([`AppHandle::register_io_device`],
//!   [`ThreadCtx::get_io_channel`]);
//! - statistics readable from any thread ([`ReactorStats`], [`ThreadStats`], [`PollerStats`]);
//! - interrupt mode ([`AppConfig::interrupt_mode`]);
//! - a deterministic [`Harness`] polling many threads from one OS thread.
//!
//! ```no_run
//! use pollux_reactor::{send_msg, App, AppConfig, PollStatus};
//!
//! let config = AppConfig { cpumask: "0x3".parse()?, ..AppConfig::default() };
//! App::new(config)?.run(|ctx| {
//!     let worker = ctx.create_thread("worker", None).expect("app is running");
//!     let app_thread = ctx.handle();
//!     send_msg(&worker, move |ctx| {
//!         ctx.register_poller("tick", 1000, |_ctx| PollStatus::Idle);
//!         let _ = send_msg(&app_thread, |ctx| ctx.app_stop());
//!     })
//!     .expect("fresh queue");
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Shutdown
//!
//! [`AppHandle::stop`] (or [`ThreadCtx::app_stop`], or the first SIGINT / SIGTERM when
//! [`AppConfig::handle_signals`]) refuses new threads and asks every thread to exit: its
//! [`ThreadCtx::on_exit`] handlers run, then it keeps polling until its pollers and interrupt fds
//! are unregistered, its channels put, its `for_each_*` iterations completed, its deferred
//! messages delivered and its queue empty. Only then does it close its queue, with a
//! compare-exchange on a gate word that also counts senders in the middle of a send and
//! messages deferred for it elsewhere, so a message is either run or handed back to its sender
//! as [`MsgError::ThreadExited`], never dropped silently. A reactor returns when the app stops
//! and its threads have exited; [`App::run`] returns when every reactor has. A thread still
//! holding resources after [`AppConfig::thread_exit_timeout`] is torn down forcibly, with an
//! error log naming what it held. A second signal exits the process at once with 128 + signal.
//!
//! # Interrupt mode
//!
//! With [`AppConfig::interrupt_mode`], a reactor whose threads all report idle (no message, no
//! busy poller) sleeps in `epoll_wait` on an eventfd doorbell, a timerfd armed for its nearest
//! timed poller (or exit deadline) and the fds registered with
//! [`ThreadCtx::register_interrupt_fd`]. A sender rings the doorbell only when the target's
//! reactor has published that it sleeps; a SeqCst fence on each side makes a lost wakeup
//! impossible (see `ReactorShared::notify`). Poll mode, the default, never sleeps and skips the
//! fence.
//!
//! The unsafe code is in `msg` (inline closures) and `sys` (epoll, eventfd, timerfd,
//! affinity), each block with its `SAFETY` argument.

mod app;
mod channel;
mod error;
mod msg;
mod reactor;
mod stats;
mod sys;
mod thread;

pub use app::{App, AppConfig, AppHandle, Harness, HarnessClock};
pub use channel::{IoChannel, IoDevice};
pub use error::ReactorError;
pub use msg::{InlineFnOnce, InlineMsg, MsgError, INLINE_MSG_ALIGN, INLINE_MSG_SIZE};
pub use reactor::Reactor;
pub use stats::{PollerKind, PollerStats, ReactorStats, ThreadStats};
pub use thread::{send_msg, InterruptId, PollStatus, PollerId, ThreadCtx, ThreadHandle, ThreadId};
