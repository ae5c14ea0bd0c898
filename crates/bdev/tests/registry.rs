//! Registration, descriptors, claims and hot remove (on the reactor's deterministic harness).

mod common;

use std::sync::{Arc, Mutex};

use common::{reap, TestBuf};
use pollux_bdev::{BdevError, BdevEvent, BdevRegistry, BdevSpec, EventTarget, IoStatus, Uuid};
use pollux_reactor::Harness;

fn null_bdev(registry: &BdevRegistry, name: &str) {
    common::null_bdev(registry, name, 128, 4096, 1);
}

#[test]
fn names_aliases_and_geometry_are_checked() {
    let registry = BdevRegistry::new();
    let uuid: Uuid = "6c2fd2a2-8c5c-4e2a-9b7e-3f1f0a4d5e6f"
        .parse()
        .expect("uuid");
    let spec = BdevSpec {
        name: "Disk".into(),
        aliases: vec!["disk-alias".into()],
        uuid: Some(uuid),
        block_size_bytes: 512,
        num_blocks: 10,
        required_alignment_bytes: 512,
        write_cache: true,
    };
    let backend = || Arc::new(NullLike) as Arc<dyn pollux_bdev::module::BdevBackend>;
    let info = registry
        .register(spec.clone(), backend())
        .expect("register");
    assert_eq!(info.uuid, uuid);
    assert_eq!(info.size_bytes(), 5120);
    assert_eq!(registry.info("disk-alias").expect("by alias").name, "Disk");
    let taken = registry.register(
        BdevSpec {
            name: "Other".into(),
            aliases: vec!["Disk".into()],
            ..spec.clone()
        },
        backend(),
    );
    assert!(matches!(taken, Err(BdevError::NameTaken { ref name, .. }) if name == "Disk"));
    let bad_block = registry.register(
        BdevSpec {
            name: "Bad".into(),
            aliases: vec![],
            block_size_bytes: 1000,
            ..spec.clone()
        },
        backend(),
    );
    assert!(matches!(
        bad_block,
        Err(BdevError::BadBlockSize {
            block_size_bytes: 1000,
            ..
        })
    ));
    let zero = registry.register(
        BdevSpec {
            name: "Zero".into(),
            aliases: vec![],
            num_blocks: 0,
            ..spec.clone()
        },
        backend(),
    );
    assert!(matches!(zero, Err(BdevError::ZeroBlocks { .. })));
    assert_eq!(registry.names(), vec!["Disk".to_string()]);
    assert!(matches!(
        registry.open("nope", false, None),
        Err(BdevError::NotFound { .. })
    ));
}

struct NullLike;

impl pollux_bdev::module::BdevBackend for NullLike {
    fn module_name(&self) -> &'static str {
        "test"
    }
    fn supports(&self, _io_type: pollux_bdev::IoType) -> bool {
        true
    }
    fn create_channel(
        &self,
        _queue_depth: u16,
    ) -> Result<Box<dyn pollux_bdev::module::BackendChannel>, BdevError> {
        Err(BdevError::ChannelCreate {
            module: "test",
            bdev: "Disk".into(),
            source: "no channels in this test".into(),
        })
    }
    fn write_config(&self, _info: &pollux_bdev::BdevInfo) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[test]
fn exclusive_write_claim() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    let owner = registry.open("Null0", true, None).expect("open rw");
    let reader = registry.open("Null0", false, None).expect("open ro");
    assert!(matches!(
        reader.claim("x"),
        Err(BdevError::ClaimNeedsWrite { .. })
    ));
    {
        let other_writer = registry.open("Null0", true, None).expect("second writer");
        let refused = owner.claim("vhost.0");
        assert!(
            matches!(refused, Err(BdevError::OtherWriters { writers: 1, .. })),
            "{refused:?}"
        );
        drop(other_writer);
    }
    owner.claim("vhost.0").expect("claim");
    assert_eq!(owner.claim_owner().as_deref(), Some("vhost.0"));
    let refused = registry.open("Null0", true, None);
    match refused {
        Err(error @ BdevError::Claimed { .. }) => {
            assert!(error.to_string().contains("vhost.0"), "{error}");
        }
        other => panic!("expected a claim refusal, got {other:?}"),
    }
    // Readers are still welcome, and a second claim is refused.
    let _second_reader = registry.open("Null0", false, None).expect("open ro");
    assert_eq!(owner.open_descriptors(), 3);
    // Closing the claiming descriptor releases the claim.
    drop(owner);
    let writer = registry
        .open("Null0", true, None)
        .expect("rw after release");
    writer.claim("vhost.1").expect("claim again");
    writer.release_claim();
    assert_eq!(writer.claim_owner(), None);
}

#[test]
fn hot_remove_tells_descriptors_and_loses_no_io() {
    let mut harness = Harness::new(1);
    let thread = harness.create_thread("io", None).expect("thread");
    harness.poll_until_idle(10).expect("idle");
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");

    let events = Arc::new(Mutex::new(Vec::<(String, BdevEvent)>::new()));
    let seen = events.clone();
    let target = EventTarget {
        thread: thread.clone(),
        callback: Arc::new(move |ctx, event| {
            seen.lock()
                .expect("events")
                .push((ctx.name().to_string(), event.clone()));
        }),
    };
    let desc = registry
        .open("Null0", true, Some(target.clone()))
        .expect("open");
    let reader = registry
        .open("Null0", false, Some(target))
        .expect("open ro");
    let mut channel = desc.channel(64).expect("channel");
    let mut buf = TestBuf::new(4096, 0);
    let iov = [buf.iov(0, 4096)];
    for tag in 0..40 {
        channel.read(tag, tag, 1, &iov).expect("slot");
    }

    assert_eq!(registry.unregister("Null0").expect("unregister"), 2);
    assert!(!registry.contains("Null0"));
    assert!(desc.is_removed() && channel.is_removed());
    // The events arrive on the descriptors' thread, as messages.
    assert!(events.lock().expect("events").is_empty());
    harness.poll_until_idle(10).expect("idle");
    let delivered = events.lock().expect("events").clone();
    assert_eq!(delivered.len(), 2);
    assert!(delivered.iter().all(|(thread, event)| {
        thread == "io"
            && *event
                == BdevEvent::Remove {
                    bdev: Arc::from("Null0"),
                }
    }));

    // New I/O completes as removed; everything submitted before completes normally.
    channel.read(100, 0, 1, &iov).expect("slot");
    let done = reap(&mut channel, 41);
    assert!(done[..40].iter().all(|c| c.status == IoStatus::Success));
    let mut tags: Vec<u64> = done[..40].iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..40).collect::<Vec<u64>>());
    assert_eq!((done[40].tag, done[40].status), (100, IoStatus::Removed));
    assert_eq!(channel.outstanding(), 0);
    assert!(matches!(desc.channel(4), Err(BdevError::Removed { .. })));
    assert!(matches!(
        registry.unregister("Null0"),
        Err(BdevError::NotFound { .. })
    ));

    // The owner closes; the name is free again.
    drop(channel);
    drop(desc);
    drop(reader);
    null_bdev(&registry, "Null0");
    harness.stop(100).expect("stop");
}

#[test]
fn hot_remove_without_event_thread_is_seen_by_polling() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    let desc = registry.open("Null0", false, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    assert_eq!(registry.unregister("Null0").expect("unregister"), 0);
    assert!(desc.is_removed());
    channel.reset(1).expect("slot");
    assert_eq!(reap(&mut channel, 1)[0].status, IoStatus::Removed);
}

#[test]
fn channels_in_pollers_complete_on_their_own_thread() {
    let mut harness = Harness::new(2);
    let threads: Vec<_> = (0..2)
        .map(|i| {
            harness
                .create_thread(&format!("t{i}"), None)
                .expect("thread")
        })
        .collect();
    harness.poll_until_idle(10).expect("idle");
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    let completed = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    for thread in &threads {
        let desc = registry.open("Null0", false, None).expect("open");
        let done = completed.clone();
        harness.with_thread(thread, move |ctx| {
            let mut channel = desc.channel(8).expect("channel");
            let mut submitted = 0u64;
            let own = ctx.id();
            let poller = ctx.register_poller("io", 0, move |ctx| {
                // The descriptor lives with its channel, on this thread.
                let _ = &desc;
                while submitted < 20 && channel.reset(submitted).is_ok() {
                    submitted += 1;
                }
                let handed = channel.poll(|_, completion| {
                    assert_eq!(ctx.id(), own, "completion on the submitting thread");
                    done.lock()
                        .expect("done")
                        .push((ctx.name().to_string(), completion.tag));
                });
                pollux_reactor::PollStatus::from_busy(handed > 0)
            });
            ctx.on_exit(move |ctx| ctx.unregister_poller(poller));
        });
    }
    harness.poll_until_idle(100).expect("idle");
    let completed = completed.lock().expect("done").clone();
    for name in ["t0", "t1"] {
        let tags: Vec<u64> = completed
            .iter()
            .filter(|(thread, _)| thread == name)
            .map(|(_, tag)| *tag)
            .collect();
        assert_eq!(tags, (0..20).collect::<Vec<u64>>(), "{name}");
    }
    harness.stop(100).expect("stop");
}
