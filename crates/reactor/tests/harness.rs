//! Deterministic tests on the manual harness: many lightweight threads on the test's OS thread,
//! polled step by step, with a manual clock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pollux_env::cpumask::CpuMask;
use pollux_reactor::{
    send_msg, AppConfig, Harness, HarnessClock, MsgError, PollStatus, PollerId, PollerKind,
    ReactorError, ThreadId,
};

const ROUNDS: usize = 1000;

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

#[test]
fn threads_are_placed_round_robin_within_their_mask() {
    let mut harness = Harness::new(3);
    let cores: Vec<usize> = (0..6)
        .map(|i| {
            harness
                .create_thread(&format!("t{i}"), None)
                .expect("created")
                .core()
        })
        .collect();
    assert_eq!(cores, vec![0, 1, 2, 0, 1, 2]);

    let only_2: CpuMask = [2].into_iter().collect();
    let pinned = harness
        .create_thread("on2", Some(&only_2))
        .expect("created");
    assert_eq!(pinned.core(), 2);
    // The cursor moved past reactor 2, so the next free placement is reactor 0.
    assert_eq!(
        harness.create_thread("next", None).expect("created").core(),
        0
    );

    let nowhere: CpuMask = [7].into_iter().collect();
    let error = harness
        .create_thread("nowhere", Some(&nowhere))
        .expect_err("no reactor on core 7");
    assert!(
        matches!(error, ReactorError::NoReactorInMask { .. }),
        "{error}"
    );

    harness.poll_until_idle(ROUNDS).expect("idle");
    let per_reactor: Vec<usize> = (0..3)
        .map(|i| harness.reactor_mut(i).thread_count())
        .collect();
    assert_eq!(per_reactor, vec![3, 2, 3]);
    harness.stop(ROUNDS).expect("stopped");
    assert_eq!(harness.thread_count(), 0);
}

#[test]
fn messages_run_once_in_order_on_the_target() {
    let mut harness = Harness::new(2);
    let a = harness.create_thread("a", None).expect("created");
    let b = harness.create_thread("b", None).expect("created");
    let seen = Arc::new(Mutex::new(Vec::new()));
    for i in 0..100u32 {
        let seen = seen.clone();
        let b_id = b.id();
        send_msg(&b, move |ctx| {
            assert_eq!(ctx.id(), b_id);
            seen.lock().expect("lock").push(i);
        })
        .expect("queued");
    }
    // A message from a thread to another thread, answered back.
    let reply = counter();
    let reply2 = reply.clone();
    let b2 = b.clone();
    send_msg(&a, move |ctx| {
        let a = ctx.handle();
        send_msg(&b2, move |_| {
            send_msg(&a, move |ctx| {
                assert_eq!(ctx.name(), "a");
                reply2.fetch_add(1, Ordering::SeqCst);
            })
            .expect("queued");
        })
        .expect("queued");
    })
    .expect("queued");
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert_eq!(*seen.lock().expect("lock"), (0..100).collect::<Vec<_>>());
    assert_eq!(reply.load(Ordering::SeqCst), 1);
    assert_eq!(b.stats().messages, 101);
    harness.stop(ROUNDS).expect("stopped");
}

#[test]
fn messages_per_poll_are_capped_by_the_batch() {
    let config = AppConfig {
        cpumask: [0].into_iter().collect(),
        msg_batch: 8,
        handle_signals: false,
        ..AppConfig::default()
    };
    let mut harness = Harness::with_config(config, HarnessClock::Manual).expect("harness");
    let t = harness.create_thread("t", None).expect("created");
    let ran = counter();
    for _ in 0..20 {
        let ran = ran.clone();
        send_msg(&t, move |_| {
            ran.fetch_add(1, Ordering::SeqCst);
        })
        .expect("queued");
    }
    harness.poll_once();
    assert_eq!(ran.load(Ordering::SeqCst), 8);
    harness.poll_once();
    assert_eq!(ran.load(Ordering::SeqCst), 16);
    harness.poll_once();
    assert_eq!(ran.load(Ordering::SeqCst), 20);
}

#[test]
fn a_full_queue_hands_the_message_back() {
    let config = AppConfig {
        cpumask: [0].into_iter().collect(),
        msg_queue_depth: 4,
        handle_signals: false,
        ..AppConfig::default()
    };
    let mut harness = Harness::with_config(config, HarnessClock::Manual).expect("harness");
    let t = harness.create_thread("t", None).expect("created");
    let ran = counter();
    for _ in 0..4 {
        let ran = ran.clone();
        send_msg(&t, move |_| {
            ran.fetch_add(1, Ordering::SeqCst);
        })
        .expect("queued");
    }
    let ran2 = ran.clone();
    let error = send_msg(&t, move |_| {
        ran2.fetch_add(100, Ordering::SeqCst);
    })
    .expect_err("the queue is full");
    assert!(error.is_full(), "{error}");
    let msg = error.into_msg();
    harness.poll_once();
    t.send_inline(msg).expect("room again");
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert_eq!(ran.load(Ordering::SeqCst), 104);
}

#[test]
fn send_or_queue_defers_on_backpressure_and_keeps_order() {
    let config = AppConfig {
        cpumask: [0, 1].into_iter().collect(),
        msg_queue_depth: 4,
        handle_signals: false,
        ..AppConfig::default()
    };
    let mut harness = Harness::with_config(config, HarnessClock::Manual).expect("harness");
    let sender = harness.create_thread("sender", None).expect("created");
    let receiver = harness.create_thread("receiver", None).expect("created");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    harness
        .with_thread(&sender, |ctx| {
            for i in 0..50u32 {
                let seen = seen2.clone();
                ctx.send_or_queue(&receiver, move |_| seen.lock().expect("lock").push(i))
                    .expect("receiver alive");
            }
            assert_eq!(ctx.deferred_messages(), 46);
        })
        .expect("sender is on a reactor");
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert_eq!(*seen.lock().expect("lock"), (0..50).collect::<Vec<_>>());
}

#[test]
fn active_pollers_run_every_poll_and_can_unregister_themselves() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    let runs = counter();
    let runs2 = runs.clone();
    let id = Arc::new(Mutex::new(None::<PollerId>));
    let id2 = id.clone();
    harness.with_thread(&t, move |ctx| {
        let poller = ctx.register_poller("self-removing", 0, move |ctx| {
            let n = runs2.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 5 {
                let me = id2.lock().expect("lock").expect("registered");
                ctx.unregister_poller(me);
            }
            PollStatus::Busy
        });
        *id.lock().expect("lock") = Some(poller);
    });
    for _ in 0..10 {
        harness.poll_once();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    assert!(t.stats().pollers.is_empty());
}

#[test]
fn timed_pollers_follow_the_manual_clock() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    let runs = counter();
    let runs2 = runs.clone();
    harness.with_thread(&t, move |ctx| {
        ctx.register_poller("every-1ms", 1000, move |_| {
            runs2.fetch_add(1, Ordering::SeqCst);
            PollStatus::Busy
        });
    });
    harness.poll_once();
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    harness.advance_time(Duration::from_micros(999));
    harness.poll_once();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "not before its period");
    harness.advance_time(Duration::from_micros(1));
    harness.poll_once();
    harness.poll_once();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "once per period, however many polls"
    );
    harness.advance_time(Duration::from_micros(5000));
    harness.poll_once();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "no catch-up burst after a long gap"
    );
    let stats = t.stats();
    assert_eq!(stats.pollers.len(), 1);
    assert_eq!(stats.pollers[0].kind, PollerKind::Timed { period_us: 1000 });
    assert_eq!(stats.pollers[0].runs, 2);
    assert_eq!(stats.pollers[0].busy_runs, 2);
}

#[test]
fn a_poller_pauses_resumes_and_unregisters_another() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    let victim_runs = counter();
    let controller_runs = counter();
    let (v, c) = (victim_runs.clone(), controller_runs.clone());
    harness.with_thread(&t, move |ctx| {
        // The controller is registered first, so it runs before the victim in a poll: its
        // requests must take effect before the victim's turn in that same poll.
        let victim_id = Arc::new(Mutex::new(None::<PollerId>));
        let victim_for_controller = victim_id.clone();
        ctx.register_poller("controller", 0, move |ctx| {
            let step = c.fetch_add(1, Ordering::SeqCst) + 1;
            let victim = victim_for_controller
                .lock()
                .expect("lock")
                .expect("registered");
            match step {
                2 => ctx.pause_poller(victim),
                4 => ctx.resume_poller(victim),
                6 => ctx.unregister_poller(victim),
                _ => {}
            }
            PollStatus::Idle
        });
        let id = ctx.register_poller("victim", 0, move |_| {
            v.fetch_add(1, Ordering::SeqCst);
            PollStatus::Idle
        });
        *victim_id.lock().expect("lock") = Some(id);
    });
    let mut victim_after_each_poll = Vec::new();
    for _ in 0..8 {
        harness.poll_once();
        victim_after_each_poll.push(victim_runs.load(Ordering::SeqCst));
    }
    // poll 1 runs; 2 pauses before its turn; 3 paused; 4 resumes before its turn; 5 runs;
    // 6 unregisters before its turn.
    assert_eq!(victim_after_each_poll, vec![1, 1, 1, 2, 3, 3, 3, 3]);
    assert_eq!(controller_runs.load(Ordering::SeqCst), 8);
    let names: Vec<String> = t.stats().pollers.into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec!["controller".to_string()]);
}

#[test]
fn paused_pollers_are_visible_in_stats() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    let id = harness
        .with_thread(&t, |ctx| ctx.register_poller("p", 10, |_| PollStatus::Idle))
        .expect("on a reactor");
    harness.with_thread(&t, |ctx| ctx.pause_poller(id));
    assert!(t.stats().pollers[0].paused);
    harness.advance_time(Duration::from_millis(1));
    harness.poll_once();
    assert_eq!(t.stats().pollers[0].runs, 0);
    harness.with_thread(&t, |ctx| ctx.resume_poller(id));
    harness.advance_time(Duration::from_millis(1));
    harness.poll_once();
    let poller = &t.stats().pollers[0];
    assert!(!poller.paused);
    assert_eq!(poller.runs, 1);
    assert_eq!(poller.busy_runs, 0);
}

#[derive(Debug)]
struct ChannelCtx {
    thread: ThreadId,
    ios: u64,
}

#[test]
fn channels_are_created_on_first_get_and_destroyed_on_last_put() {
    let mut harness = Harness::new(2);
    let created = Arc::new(Mutex::new(Vec::new()));
    let destroyed = Arc::new(Mutex::new(Vec::new()));
    let (c, d) = (created.clone(), destroyed.clone());
    let device = harness
        .app()
        .register_io_device(
            "nvme0",
            move |ctx| {
                c.lock().expect("lock").push(ctx.id());
                ChannelCtx {
                    thread: ctx.id(),
                    ios: 0,
                }
            },
            move |ctx, channel: ChannelCtx| {
                assert_eq!(channel.thread, ctx.id(), "destroyed on its own thread");
                d.lock().expect("lock").push((ctx.id(), channel.ios));
            },
        )
        .expect("registered");
    let duplicate = harness
        .app()
        .register_io_device("nvme0", |_| (), |_, _: ()| {});
    assert!(matches!(duplicate, Err(ReactorError::DeviceExists { .. })));

    let t1 = harness.create_thread("t1", None).expect("created");
    let t2 = harness.create_thread("t2", None).expect("created");
    harness.poll_once();

    let dev = device.clone();
    let (first, second) = harness
        .with_thread(&t1, move |ctx| {
            let first = ctx.get_io_channel(&dev).expect("device registered");
            let second = ctx.get_io_channel(&dev).expect("device registered");
            ctx.channel_ctx_mut(&first).ios += 1;
            ctx.channel_ctx_mut(&second).ios += 10;
            assert_eq!(ctx.channel_refs(&dev), 2);
            (first, second)
        })
        .expect("on a reactor");
    assert_eq!(*created.lock().expect("lock"), vec![t1.id()]);

    let dev = device.clone();
    let on_t2 = harness
        .with_thread(&t2, move |ctx| {
            let channel = ctx.get_io_channel(&dev).expect("device registered");
            ctx.channel_ctx_mut(&channel).ios += 100;
            channel
        })
        .expect("on a reactor");
    assert_eq!(*created.lock().expect("lock"), vec![t1.id(), t2.id()]);
    assert_eq!(harness.app().live_channels(&device), 2);

    let busy = harness.app().unregister_io_device(&device);
    assert!(
        matches!(busy, Err(ReactorError::DeviceBusy { channels: 2, .. })),
        "{busy:?}"
    );

    // for_each_channel visits both channels, each on its own thread, then completes here.
    let visited = Arc::new(Mutex::new(Vec::new()));
    let completed_on = Arc::new(Mutex::new(None));
    let (v, done_on) = (visited.clone(), completed_on.clone());
    let dev = device.clone();
    harness.with_thread(&t1, move |ctx| {
        ctx.for_each_channel(
            &dev,
            move |ctx, channel| {
                assert_eq!(channel.thread(), ctx.id());
                let ios = ctx.channel_ctx_mut(channel).ios;
                v.lock().expect("lock").push((ctx.id(), ios));
            },
            move |ctx| *done_on.lock().expect("lock") = Some(ctx.id()),
        );
    });
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert_eq!(
        *visited.lock().expect("lock"),
        vec![(t1.id(), 11), (t2.id(), 100)]
    );
    assert_eq!(*completed_on.lock().expect("lock"), Some(t1.id()));

    let dev = device.clone();
    harness.with_thread(&t1, move |ctx| {
        ctx.put_io_channel(first);
        assert_eq!(ctx.channel_refs(&dev), 1);
    });
    assert!(
        destroyed.lock().expect("lock").is_empty(),
        "one reference left"
    );
    harness.with_thread(&t1, move |ctx| ctx.put_io_channel(second));
    assert_eq!(*destroyed.lock().expect("lock"), vec![(t1.id(), 11)]);
    harness.with_thread(&t2, move |ctx| ctx.put_io_channel(on_t2));
    assert_eq!(destroyed.lock().expect("lock").len(), 2);
    assert_eq!(harness.app().live_channels(&device), 0);
    harness
        .app()
        .unregister_io_device(&device)
        .expect("no channel left");
    let dev = device.clone();
    let gone = harness
        .with_thread(&t1, move |ctx| ctx.get_io_channel(&dev).map(|_| ()))
        .expect("on a reactor");
    assert!(matches!(gone, Err(ReactorError::DeviceUnknown { .. })));
}

#[test]
fn a_put_then_get_in_one_callback_keeps_the_channel() {
    let mut harness = Harness::new(1);
    let creates = counter();
    let destroys = counter();
    let (c, d) = (creates.clone(), destroys.clone());
    let device = harness
        .app()
        .register_io_device(
            "dev",
            move |_| c.fetch_add(1, Ordering::SeqCst),
            move |_, _: usize| {
                d.fetch_add(1, Ordering::SeqCst);
            },
        )
        .expect("registered");
    let t = harness.create_thread("t", None).expect("created");
    let dev = device.clone();
    let channel = harness
        .with_thread(&t, move |ctx| {
            let channel = ctx.get_io_channel(&dev).expect("registered");
            ctx.put_io_channel(channel);
            // The destroy is deferred until the callback returns, so this revives it.
            ctx.get_io_channel(&dev).expect("registered")
        })
        .expect("on a reactor");
    assert_eq!(creates.load(Ordering::SeqCst), 1);
    assert_eq!(destroys.load(Ordering::SeqCst), 0);
    harness.with_thread(&t, move |ctx| ctx.put_io_channel(channel));
    assert_eq!(destroys.load(Ordering::SeqCst), 1);
}

#[test]
fn for_each_thread_visits_every_thread_once_and_completes_on_the_caller() {
    let mut harness = Harness::new(2);
    let threads: Vec<_> = (0..5)
        .map(|i| {
            harness
                .create_thread(&format!("t{i}"), None)
                .expect("created")
        })
        .collect();
    harness.poll_once();
    let visits = Arc::new(Mutex::new(Vec::new()));
    let done_on = Arc::new(Mutex::new(Vec::new()));
    let (v, d) = (visits.clone(), done_on.clone());
    harness.with_thread(&threads[2], move |ctx| {
        ctx.for_each_thread(
            move |ctx| v.lock().expect("lock").push(ctx.id()),
            move |ctx| d.lock().expect("lock").push(ctx.id()),
        );
    });
    harness.poll_until_idle(ROUNDS).expect("idle");
    let expected: Vec<ThreadId> = threads.iter().map(|t| t.id()).collect();
    assert_eq!(*visits.lock().expect("lock"), expected);
    assert_eq!(*done_on.lock().expect("lock"), vec![threads[2].id()]);
}

#[test]
fn for_each_thread_skips_threads_that_exited() {
    let mut harness = Harness::new(1);
    let a = harness.create_thread("a", None).expect("created");
    let b = harness.create_thread("b", None).expect("created");
    let c = harness.create_thread("c", None).expect("created");
    harness.poll_once();
    let visits = Arc::new(Mutex::new(Vec::new()));
    let done = counter();
    let (v, d) = (visits.clone(), done.clone());
    harness.with_thread(&a, move |ctx| {
        ctx.for_each_thread(
            move |ctx| v.lock().expect("lock").push(ctx.id()),
            move |_| {
                d.fetch_add(1, Ordering::SeqCst);
            },
        );
    });
    // b exits before its turn comes (the iteration's first hop still waits in a's queue).
    harness.with_thread(&b, |ctx| ctx.exit());
    assert_eq!(harness.poll_thread(&b), Some(PollStatus::Busy));
    assert!(b.has_exited());
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert_eq!(*visits.lock().expect("lock"), vec![a.id(), c.id()]);
    assert_eq!(done.load(Ordering::SeqCst), 1);
    let error = send_msg(&b, |_| {}).expect_err("b exited");
    assert!(matches!(error, MsgError::ThreadExited { .. }), "{error}");
}

#[test]
fn an_exiting_thread_waits_for_its_pollers_channels_and_messages() {
    let mut harness = Harness::new(1);
    let device = harness
        .app()
        .register_io_device("dev", |_| 0u32, |_, _: u32| {})
        .expect("registered");
    let t = harness.create_thread("t", None).expect("created");
    let dev = device.clone();
    let (poller, channel) = harness
        .with_thread(&t, move |ctx| {
            let poller = ctx.register_poller("p", 0, |_| PollStatus::Idle);
            let channel = ctx.get_io_channel(&dev).expect("registered");
            ctx.exit();
            (poller, channel)
        })
        .expect("on a reactor");
    for _ in 0..5 {
        harness.poll_once();
    }
    assert!(!t.has_exited(), "a poller and a channel are still held");
    harness.with_thread(&t, move |ctx| ctx.unregister_poller(poller));
    harness.poll_once();
    assert!(!t.has_exited(), "a channel is still held");
    let ran = counter();
    let ran2 = ran.clone();
    send_msg(&t, move |ctx| {
        ran2.fetch_add(1, Ordering::SeqCst);
        ctx.put_io_channel(channel);
    })
    .expect("an exiting thread still takes messages");
    harness.poll_until_idle(ROUNDS).expect("idle");
    assert!(t.has_exited());
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(harness.thread_count(), 0);
}

#[test]
fn exit_handlers_run_on_app_stop_and_release_resources() {
    let mut harness = Harness::new(2);
    let handlers_ran = counter();
    let ticks = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for i in 0..4 {
        let t = harness
            .create_thread(&format!("t{i}"), None)
            .expect("created");
        let h = handlers_ran.clone();
        let ticks = ticks.clone();
        harness.poll_once();
        harness.with_thread(&t, move |ctx| {
            let poller = ctx.register_poller("tick", 0, move |_| {
                ticks.fetch_add(1, Ordering::Relaxed);
                PollStatus::Idle
            });
            ctx.on_exit(move |ctx| {
                h.fetch_add(1, Ordering::SeqCst);
                ctx.unregister_poller(poller);
            });
        });
        threads.push(t);
    }
    harness.poll_once();
    harness.stop(ROUNDS).expect("every thread exits");
    assert_eq!(handlers_ran.load(Ordering::SeqCst), 4);
    assert!(threads.iter().all(|t| t.has_exited()));
    let error = harness.create_thread("late", None).expect_err("stopping");
    assert!(matches!(error, ReactorError::AppStopping { .. }), "{error}");
}

#[test]
fn a_thread_that_never_releases_is_forced_out_after_the_timeout() {
    let config = AppConfig {
        cpumask: [0].into_iter().collect(),
        thread_exit_timeout: Duration::from_millis(100),
        handle_signals: false,
        ..AppConfig::default()
    };
    let mut harness = Harness::with_config(config, HarnessClock::Manual).expect("harness");
    let destroyed = counter();
    let d = destroyed.clone();
    let device = harness
        .app()
        .register_io_device(
            "dev",
            |_| (),
            move |_, _: ()| {
                d.fetch_add(1, Ordering::SeqCst);
            },
        )
        .expect("registered");
    let t = harness.create_thread("stubborn", None).expect("created");
    let dev = device.clone();
    let channel = harness
        .with_thread(&t, move |ctx| {
            ctx.register_poller("forever", 0, |_| PollStatus::Idle);
            ctx.get_io_channel(&dev).expect("registered")
        })
        .expect("on a reactor");
    // The reference is dropped without a put: the thread holds its channel forever.
    drop(channel);
    harness.app().stop();
    for _ in 0..10 {
        harness.poll_once();
    }
    assert!(!t.has_exited());
    harness.advance_time(Duration::from_millis(100));
    harness.poll_once();
    harness.poll_once();
    assert!(t.has_exited());
    assert_eq!(
        destroyed.load(Ordering::SeqCst),
        1,
        "the channel was destroyed"
    );
    assert_eq!(harness.app().live_channels(&device), 0);
}

#[test]
fn thread_and_reactor_stats_count_work() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    harness.with_thread(&t, |ctx| {
        ctx.register_poller("busy", 0, |_| PollStatus::Busy);
        ctx.register_poller("idle", 0, |_| PollStatus::Idle);
    });
    for _ in 0..10 {
        harness.poll_once();
    }
    let stats = t.stats();
    assert_eq!(stats.name, "t");
    assert_eq!(stats.polls, 10);
    let busy = stats
        .pollers
        .iter()
        .find(|p| p.name == "busy")
        .expect("busy");
    let idle = stats
        .pollers
        .iter()
        .find(|p| p.name == "idle")
        .expect("idle");
    assert_eq!((busy.runs, busy.busy_runs), (10, 10));
    assert_eq!((idle.runs, idle.busy_runs), (10, 0));
    let reactor = &harness.app().reactor_stats()[0];
    assert_eq!(reactor.loops, 10);
    assert_eq!(reactor.threads, 1);
    assert!(!reactor.interrupt_mode);
    assert_eq!(harness.app().thread_stats().len(), 1);
}

#[test]
fn poll_thread_polls_one_thread_only() {
    let mut harness = Harness::new(1);
    let a = harness.create_thread("a", None).expect("created");
    let b = harness.create_thread("b", None).expect("created");
    let (ran_a, ran_b) = (counter(), counter());
    let (ra, rb) = (ran_a.clone(), ran_b.clone());
    send_msg(&a, move |_| {
        ra.fetch_add(1, Ordering::SeqCst);
    })
    .expect("queued");
    send_msg(&b, move |_| {
        rb.fetch_add(1, Ordering::SeqCst);
    })
    .expect("queued");
    assert_eq!(harness.poll_thread(&a), Some(PollStatus::Busy));
    assert_eq!(ran_a.load(Ordering::SeqCst), 1);
    assert_eq!(ran_b.load(Ordering::SeqCst), 0);
    assert_eq!(harness.poll_thread(&b), Some(PollStatus::Busy));
    assert_eq!(ran_b.load(Ordering::SeqCst), 1);
    assert_eq!(harness.poll_thread(&a), Some(PollStatus::Idle));
}

#[test]
fn interrupt_fds_need_interrupt_mode() {
    let mut harness = Harness::new(1);
    let t = harness.create_thread("t", None).expect("created");
    let (reader, _writer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let result = harness
        .with_thread(&t, move |ctx| {
            ctx.register_interrupt_fd("sock", reader, |_, _| PollStatus::Idle)
                .map(|_| ())
        })
        .expect("on a reactor");
    assert!(matches!(
        result,
        Err(ReactorError::InterruptModeDisabled { .. })
    ));
}
