//! The app on real pinned reactors (this machine has at least cores 0 and 1).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pollux_env::cpumask::CpuMask;
use pollux_reactor::{
    send_msg, App, AppConfig, InlineMsg, MsgError, PollStatus, ThreadCtx, ThreadHandle,
};

fn mask(cores: &[usize]) -> CpuMask {
    cores.iter().copied().collect()
}

fn config(cores: &[usize], interrupt_mode: bool) -> AppConfig {
    AppConfig {
        name: "test".to_string(),
        cpumask: mask(cores),
        interrupt_mode,
        handle_signals: false,
        ..AppConfig::default()
    }
}

/// Both cores, or the test is skipped (with a note) on a one-core runner.
fn two_cores() -> Option<[usize; 2]> {
    let available: Vec<usize> = CpuMask::available().iter().take(2).collect();
    match available[..] {
        [a, b] => Some([a, b]),
        _ => {
            eprintln!("fewer than two cores available; skipping");
            None
        }
    }
}

fn check_affinity_on_each_reactor(cores: &[usize]) {
    let results = Arc::new(Mutex::new(Vec::new()));
    let results2 = results.clone();
    let expected = cores.len();
    App::new(config(cores, false))
        .expect("config")
        .run(move |ctx| {
            for (i, core) in ctx.app().cpumask().iter().enumerate() {
                let thread = ctx
                    .create_thread(&format!("probe{i}"), Some(&mask(&[core])))
                    .expect("created");
                assert_eq!(thread.core(), core);
                let results = results2.clone();
                let app_thread = ctx.handle();
                send_msg(&thread, move |ctx| {
                    // The affinity of the OS thread running this callback: exactly its core.
                    let affinity: Vec<usize> = CpuMask::available().iter().collect();
                    let mut results = results.lock().expect("lock");
                    results.push((ctx.core(), affinity));
                    if results.len() == expected {
                        send_msg(&app_thread, |ctx| ctx.app_stop()).expect("app thread alive");
                    }
                })
                .expect("queued");
            }
        })
        .expect("app ran");
    let mut results = results.lock().expect("lock").clone();
    results.sort();
    let wanted: Vec<(usize, Vec<usize>)> = cores.iter().map(|c| (*c, vec![*c])).collect();
    assert_eq!(results, wanted);
}

#[test]
fn reactors_are_pinned_to_exactly_their_core() {
    let Some(cores) = two_cores() else { return };
    let before = CpuMask::available();
    check_affinity_on_each_reactor(&cores);
    assert_eq!(
        CpuMask::available(),
        before,
        "the caller's affinity is restored"
    );
}

#[test]
fn a_single_core_mask_runs_on_the_calling_thread_pinned() {
    let Some([_, second]) = two_cores() else {
        return;
    };
    let caller = std::thread::current().id();
    let on_caller = Arc::new(AtomicBool::new(false));
    let flag = on_caller.clone();
    App::new(config(&[second], false))
        .expect("config")
        .run(move |ctx| {
            flag.store(std::thread::current().id() == caller, Ordering::SeqCst);
            assert_eq!(CpuMask::available(), mask(&[second]));
            ctx.app_stop();
        })
        .expect("app ran");
    assert!(on_caller.load(Ordering::SeqCst));
    check_affinity_on_each_reactor(&[second]);
}

#[test]
fn unavailable_cores_and_bad_configs_are_refused() {
    let error = App::new(config(&[1000], false))
        .expect("config is fine")
        .run(|_| {})
        .expect_err("core 1000 does not exist here");
    assert!(error.to_string().contains("core 1000"), "{error}");
    let bad = AppConfig {
        msg_batch: 1000,
        ..config(&[0], false)
    };
    assert!(App::new(bad).is_err());
}

/// Per-sender sequence checking on the receiver; only the receiver's OS thread touches it.
struct Order {
    next: [AtomicU64; 2],
    total: AtomicU64,
}

const PER_SENDER: u64 = 100_000;

fn start_sender(ctx: &mut ThreadCtx, sender: usize, receiver: ThreadHandle, order: Arc<Order>) {
    let mut next_seq = 0u64;
    let mut pending: Option<InlineMsg> = None;
    let me = Arc::new(Mutex::new(None));
    let me2 = me.clone();
    let id = ctx.register_poller("sender", 0, move |ctx| {
        let mut sent = 0;
        while sent < 64 && (pending.is_some() || next_seq < PER_SENDER) {
            let msg = pending.take().unwrap_or_else(|| {
                let seq = next_seq;
                next_seq += 1;
                let order = order.clone();
                InlineMsg::new(move |ctx: &mut ThreadCtx| {
                    let expected = order.next[sender].load(Ordering::Relaxed);
                    assert_eq!(seq, expected, "sender {sender}: out of order");
                    order.next[sender].store(seq + 1, Ordering::Relaxed);
                    let total = order.total.fetch_add(1, Ordering::Relaxed) + 1;
                    if total == 2 * PER_SENDER {
                        ctx.app_stop();
                    }
                })
            });
            match receiver.send_inline(msg) {
                Ok(()) => sent += 1,
                Err(MsgError::QueueFull { msg, .. }) => {
                    pending = Some(msg);
                    break;
                }
                Err(error) => panic!("receiver gone: {error}"),
            }
        }
        if pending.is_none() && next_seq == PER_SENDER {
            let id = me2.lock().expect("lock").take().expect("registered");
            ctx.unregister_poller(id);
        }
        // A poller holding a message it could not hand over is not idle: reporting Idle would
        // let an interrupt-mode reactor sleep with nothing to wake it when room appears.
        PollStatus::from_busy(sent > 0 || pending.is_some())
    });
    *me.lock().expect("lock") = Some(id);
}

fn messages_under_load(interrupt_mode: bool) {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let order = Arc::new(Order {
        next: [AtomicU64::new(0), AtomicU64::new(0)],
        total: AtomicU64::new(0),
    });
    let order2 = order.clone();
    let cfg = AppConfig {
        msg_queue_depth: 256,
        ..config(&[core_a, core_b], interrupt_mode)
    };
    App::new(cfg)
        .expect("config")
        .run(move |ctx| {
            let receiver = ctx
                .create_thread("receiver", Some(&mask(&[core_a])))
                .expect("created");
            for (sender, core) in [core_a, core_b].into_iter().enumerate() {
                let thread = ctx
                    .create_thread(&format!("sender{sender}"), Some(&mask(&[core])))
                    .expect("created");
                let receiver = receiver.clone();
                let order = order2.clone();
                send_msg(&thread, move |ctx| {
                    start_sender(ctx, sender, receiver, order)
                })
                .expect("queued");
            }
        })
        .expect("app ran");
    assert_eq!(order.total.load(Ordering::SeqCst), 2 * PER_SENDER);
    assert_eq!(order.next[0].load(Ordering::SeqCst), PER_SENDER);
    assert_eq!(order.next[1].load(Ordering::SeqCst), PER_SENDER);
}

#[test]
fn messages_from_both_cores_arrive_once_and_in_order() {
    messages_under_load(false);
}

#[test]
fn messages_from_both_cores_arrive_once_and_in_order_in_interrupt_mode() {
    messages_under_load(true);
}

fn shutdown_loses_no_message(interrupt_mode: bool) {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    const COUNT: u64 = 50_000;
    let executed = Arc::new(AtomicU64::new(0));
    let executed2 = executed.clone();
    let cfg = AppConfig {
        msg_queue_depth: 64,
        ..config(&[core_a, core_b], interrupt_mode)
    };
    App::new(cfg)
        .expect("config")
        .run(move |ctx| {
            let worker = ctx
                .create_thread("worker", Some(&mask(&[core_b])))
                .expect("created");
            for _ in 0..COUNT {
                let executed = executed2.clone();
                ctx.send_or_queue(&worker, move |_| {
                    executed.fetch_add(1, Ordering::Relaxed);
                })
                .expect("worker alive");
            }
            assert!(ctx.deferred_messages() > 0, "backpressure was exercised");
            // Stop with most messages still queued or deferred.
            ctx.app_stop();
        })
        .expect("app ran");
    assert_eq!(executed.load(Ordering::SeqCst), COUNT);
}

#[test]
fn app_stop_with_messages_in_flight_loses_none() {
    shutdown_loses_no_message(false);
}

#[test]
fn app_stop_with_messages_in_flight_loses_none_in_interrupt_mode() {
    shutdown_loses_no_message(true);
}

#[test]
fn messages_from_a_foreign_os_thread_run_before_stop() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    const COUNT: u64 = 20_000;
    let executed = Arc::new(AtomicU64::new(0));
    let app = App::new(config(&[core_a, core_b], true)).expect("config");
    let handle = app.handle();
    let (tx, rx) = std::sync::mpsc::channel::<ThreadHandle>();
    let executed2 = executed.clone();
    let feeder = std::thread::spawn(move || {
        let worker = rx.recv().expect("worker handle");
        for _ in 0..COUNT {
            let executed = executed2.clone();
            let mut msg = InlineMsg::new(move |_: &mut ThreadCtx| {
                executed.fetch_add(1, Ordering::Relaxed);
            });
            loop {
                match worker.send_inline(msg) {
                    Ok(()) => break,
                    Err(error) if error.is_full() => {
                        msg = error.into_msg();
                        std::thread::yield_now();
                    }
                    Err(error) => panic!("{error}"),
                }
            }
        }
        handle.stop();
    });
    app.run(move |ctx| {
        let worker = ctx.create_thread("worker", None).expect("created");
        tx.send(worker).expect("feeder waiting");
    })
    .expect("app ran");
    feeder.join().expect("feeder");
    assert_eq!(executed.load(Ordering::SeqCst), COUNT);
}

#[test]
fn timed_pollers_respect_their_period() {
    let Some([core_a, _]) = two_cores() else {
        return;
    };
    for interrupt_mode in [false, true] {
        let runs = Arc::new(AtomicU64::new(0));
        let elapsed_us = Arc::new(AtomicU64::new(0));
        let (r, e) = (runs.clone(), elapsed_us.clone());
        App::new(config(&[core_a], interrupt_mode))
            .expect("config")
            .run(move |ctx| {
                let started = Instant::now();
                let id = ctx.register_poller("period-2ms", 2000, move |ctx| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let elapsed = started.elapsed();
                    if elapsed >= Duration::from_millis(100) && !ctx.app().is_stopping() {
                        e.store(elapsed.as_micros() as u64, Ordering::SeqCst);
                        ctx.app_stop();
                    }
                    PollStatus::Busy
                });
                // Exit handlers release what the thread holds.
                ctx.on_exit(move |ctx| {
                    assert_eq!(ctx.stats().pollers.len(), 1);
                    ctx.unregister_poller(id);
                });
            })
            .map(|_| ())
            .unwrap_or_else(|error| panic!("{error}"));
        let runs = runs.load(Ordering::SeqCst);
        let elapsed_us = elapsed_us.load(Ordering::SeqCst);
        assert!(elapsed_us >= 100_000);
        assert!(runs >= 1);
        assert!(
            runs <= elapsed_us / 2000 + 1,
            "{runs} runs in {elapsed_us} us at a 2 ms period (interrupt mode {interrupt_mode})"
        );
    }
}

#[test]
fn an_interrupt_mode_reactor_wakes_on_a_message_from_another_os_thread() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let app = App::new(config(&[core_a, core_b], true)).expect("config");
    let handle = app.handle();
    let latency_us = Arc::new(AtomicU64::new(u64::MAX));
    let latency = latency_us.clone();
    let (tx, rx) = std::sync::mpsc::channel::<ThreadHandle>();
    let sender = std::thread::spawn(move || {
        let target = rx.recv().expect("target");
        // Let reactor 1 go to sleep.
        std::thread::sleep(Duration::from_millis(100));
        let sleeps_before = handle.reactor_stats()[1].sleeps;
        assert!(sleeps_before >= 1, "the idle reactor sleeps");
        let sent_at = Instant::now();
        send_msg(&target, move |ctx| {
            latency.store(sent_at.elapsed().as_micros() as u64, Ordering::SeqCst);
            ctx.app_stop();
        })
        .expect("queued");
    });
    app.run(move |ctx| {
        let target = ctx
            .create_thread("sleeper", Some(&mask(&[core_b])))
            .expect("created");
        // An idle active poller does not keep the reactor awake.
        send_msg(&target, |ctx| {
            let id = ctx.register_poller("idle", 0, |_| PollStatus::Idle);
            ctx.on_exit(move |ctx| ctx.unregister_poller(id));
        })
        .expect("queued");
        tx.send(target).expect("sender waiting");
    })
    .expect("app ran");
    sender.join().expect("sender");
    let latency_us = latency_us.load(Ordering::SeqCst);
    assert!(latency_us < 1_000_000, "woke after {latency_us} us");
}

#[test]
fn an_idle_interrupt_mode_reactor_sleeps_instead_of_spinning() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let app = App::new(config(&[core_a, core_b], true)).expect("config");
    let handle = app.handle();
    let window = Arc::new(Mutex::new(None));
    let window2 = window.clone();
    let watcher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let before = handle.reactor_stats();
        std::thread::sleep(Duration::from_millis(200));
        let after = handle.reactor_stats();
        *window2.lock().expect("lock") = Some((before, after));
        handle.stop();
    });
    app.run(move |ctx| {
        for core in [core_a, core_b] {
            let t = ctx
                .create_thread("idle", Some(&mask(&[core])))
                .expect("created");
            send_msg(&t, |ctx| {
                let id = ctx.register_poller("idle", 0, |_| PollStatus::Idle);
                ctx.on_exit(move |ctx| ctx.unregister_poller(id));
            })
            .expect("queued");
        }
    })
    .expect("app ran");
    watcher.join().expect("watcher");
    let (before, after) = window.lock().expect("lock").take().expect("measured");
    for (b, a) in before.iter().zip(&after) {
        let loops = a.loops - b.loops;
        assert!(
            loops < 20,
            "core {}: {loops} loops in 200 ms while idle",
            a.core
        );
        assert!(a.interrupt_mode);
    }
    let stats = &after[1];
    assert!(stats.sleeps >= 1);
}

#[test]
fn interrupt_fds_wake_their_thread() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let app = App::new(config(&[core_a, core_b], true)).expect("config");
    let received = Arc::new(Mutex::new(Vec::new()));
    let received2 = received.clone();
    let (reader, mut writer) = UnixStream::pair().expect("socketpair");
    reader.set_nonblocking(true).expect("nonblocking");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let writer_thread = std::thread::spawn(move || {
        rx.recv().expect("registered");
        std::thread::sleep(Duration::from_millis(50));
        writer.write_all(b"ping").expect("write");
    });
    app.run(move |ctx| {
        let t = ctx
            .create_thread("fd", Some(&mask(&[core_b])))
            .expect("created");
        send_msg(&t, move |ctx| {
            let id = ctx
                .register_interrupt_fd("sock", reader, move |ctx, sock: &mut UnixStream| {
                    let mut bytes = [0u8; 16];
                    let n = sock.read(&mut bytes).unwrap_or(0);
                    received2
                        .lock()
                        .expect("lock")
                        .extend_from_slice(&bytes[..n]);
                    ctx.app_stop();
                    PollStatus::from_busy(n > 0)
                })
                .expect("interrupt mode");
            ctx.on_exit(move |ctx| ctx.unregister_interrupt_fd(id));
            tx.send(()).expect("writer waiting");
        })
        .expect("queued");
    })
    .expect("app ran");
    writer_thread.join().expect("writer");
    assert_eq!(&received.lock().expect("lock")[..], b"ping");
}

#[test]
fn stats_are_readable_from_outside_while_running() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let app = App::new(config(&[core_a, core_b], false)).expect("config");
    let handle = app.handle();
    let after_run = app.handle();
    let polled = Arc::new(AtomicUsize::new(0));
    let p = polled.clone();
    let reader = std::thread::spawn(move || {
        while p.load(Ordering::SeqCst) < 1000 {
            std::thread::yield_now();
        }
        let reactors = handle.reactor_stats();
        let threads = handle.thread_stats();
        handle.stop();
        (reactors, threads)
    });
    app.run(move |ctx| {
        let id = ctx.register_poller("count", 0, move |_| {
            polled.fetch_add(1, Ordering::SeqCst);
            PollStatus::Busy
        });
        ctx.on_exit(move |ctx| ctx.unregister_poller(id));
    })
    .expect("app ran");
    let (reactors, threads) = reader.join().expect("reader");
    assert_eq!(reactors.len(), 2);
    assert!(reactors[0].loops > 0);
    let final_stats = after_run.reactor_stats();
    assert!(final_stats[1].loops > 0, "{final_stats:?}");
    assert!(final_stats[0].loops >= reactors[0].loops);
    assert!(
        reactors[0].busy_ns > 0,
        "the busy poller's reactor was busy: {reactors:?}"
    );
    let app_thread = threads
        .iter()
        .find(|t| t.name == "app_thread")
        .expect("app thread");
    assert_eq!(app_thread.core, core_a);
    assert!(app_thread.pollers[0].runs >= 1000);
    // Two counters read one after the other while the poller runs: equal within one run.
    let poller = &app_thread.pollers[0];
    assert!(poller.runs.abs_diff(poller.busy_runs) <= 1, "{poller:?}");
}

#[test]
fn for_each_thread_and_channel_cross_reactors() {
    let Some([core_a, core_b]) = two_cores() else {
        return;
    };
    let visits = Arc::new(Mutex::new(Vec::new()));
    let channel_visits = Arc::new(Mutex::new(Vec::new()));
    let (v, cv) = (visits.clone(), channel_visits.clone());
    App::new(config(&[core_a, core_b], true))
        .expect("config")
        .run(move |ctx| {
            let device = ctx
                .app()
                .register_io_device("dev", |ctx| ctx.core(), |_, _: usize| {})
                .expect("registered");
            let origin = ctx.id();
            let mut workers = Vec::new();
            for i in 0..4 {
                let t = ctx.create_thread(&format!("w{i}"), None).expect("created");
                let dev = device.clone();
                send_msg(&t, move |ctx| {
                    let channel = ctx.get_io_channel(&dev).expect("registered");
                    ctx.on_exit(move |ctx| ctx.put_io_channel(channel));
                })
                .expect("queued");
                workers.push(t);
            }
            let dev = device.clone();
            ctx.for_each_thread(
                move |ctx| v.lock().expect("lock").push((ctx.id(), ctx.core())),
                move |ctx| {
                    assert_eq!(ctx.id(), origin, "completion on the caller");
                    ctx.for_each_channel(
                        &dev,
                        move |ctx, channel| {
                            let core = *ctx.channel_ctx_mut(channel);
                            assert_eq!(core, ctx.core(), "channel created on its thread");
                            cv.lock().expect("lock").push(ctx.id());
                        },
                        move |ctx| {
                            assert_eq!(ctx.id(), origin);
                            ctx.app_stop();
                        },
                    );
                },
            );
        })
        .expect("app ran");
    let visits = visits.lock().expect("lock").clone();
    assert_eq!(visits.len(), 5, "app thread and four workers: {visits:?}");
    assert!(visits.iter().any(|(_, core)| *core == core_a));
    assert!(visits.iter().any(|(_, core)| *core == core_b));
    assert_eq!(channel_visits.lock().expect("lock").len(), 4);
}
