//! Rate limits on the I/O path: I/O over the limit waits in its slot and completes exactly
//! once, the limits survive save_config and a config reload, and bad limits are refused by
//! name. (How close a limit is held is measured by bdevperf, not here: no timed tests.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{dma, TestBuf};
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::qos::{QosLimits, QosUpdate};
use pollux_bdev::{BdevError, BdevRegistry, IoStatus};

fn null_bdev(registry: &BdevRegistry, name: &str) {
    common::null_bdev(registry, name, 1024, 512, 1);
}

fn ios(limit: u64) -> QosUpdate {
    QosUpdate {
        rw_ios_per_sec: Some(limit),
        ..QosUpdate::default()
    }
}

#[test]
fn io_over_the_limit_waits_and_completes_once_when_the_limit_goes() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    let limits = registry
        .set_qos_limits("Null0", &ios(1000))
        .expect("set limit");
    assert_eq!(limits.rw_ios_per_sec, 1000);
    let desc = registry.open("Null0", true, None).expect("open");
    let mut channel = desc.channel(64).expect("channel");
    assert!(
        channel.interrupt_fd().is_none(),
        "held-back I/O starts from a poll"
    );
    let mut buf = TestBuf::new(512, 0);
    let iov = [buf.iov(0, 512)];
    for tag in 0..50u64 {
        channel.read(tag, tag, 1, &iov).expect("slot");
    }
    // Write zeroes is not limited: it completes at the first poll whatever waits.
    channel.write_zeroes(1000, 0, 1).expect("slot");
    assert_eq!(channel.outstanding(), 51, "waiting I/O keeps its slot");
    let mut seen = BTreeSet::new();
    let mut first_poll = Vec::new();
    channel.poll(|_, done| first_poll.push(done));
    assert!(first_poll.iter().any(|d| d.tag == 1000));
    // 1000/s is one read per millisecond: 49 waiting reads are 49 ms of budget.
    let reads_first = first_poll.iter().filter(|d| d.tag < 1000).count();
    assert!(
        reads_first < 50,
        "{reads_first} reads passed a limit of 1 per ms"
    );
    for done in first_poll {
        assert_eq!(done.status, IoStatus::Success);
        assert!(seen.insert(done.tag), "tag {} twice", done.tag);
    }
    registry
        .set_qos_limits("Null0", &ios(0))
        .expect("clear limit");
    assert!(registry.qos_limits("Null0").expect("limits").is_unlimited());
    channel.poll(|_, done| {
        assert_eq!(done.status, IoStatus::Success);
        assert!(seen.insert(done.tag), "tag {} twice", done.tag);
    });
    assert_eq!(seen.len(), 51, "every I/O completed once: {seen:?}");
    assert_eq!(channel.outstanding(), 0);
}

#[test]
fn waiting_io_of_a_removed_bdev_fails_with_removed() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    registry
        .set_qos_limits("Null0", &ios(1000))
        .expect("set limit");
    let desc = registry.open("Null0", true, None).expect("open");
    let mut channel = desc.channel(64).expect("channel");
    let mut buf = TestBuf::new(512, 0);
    let iov = [buf.iov(0, 512)];
    for tag in 0..40u64 {
        channel.write(tag, tag, 1, &iov).expect("slot");
    }
    registry.unregister("Null0").expect("remove");
    let mut statuses = Vec::new();
    while channel.outstanding() > 0 {
        channel.poll(|_, done| statuses.push(done.status));
    }
    assert_eq!(statuses.len(), 40);
    assert!(statuses.contains(&IoStatus::Removed), "{statuses:?}");
}

#[test]
fn limits_are_saved_reloaded_and_bad_ones_refused_by_name() {
    let registry = BdevRegistry::new();
    null_bdev(&registry, "Null0");
    null_bdev(&registry, "Null1");
    registry
        .set_qos_limits(
            "Null0",
            &QosUpdate {
                rw_ios_per_sec: Some(20000),
                w_mbytes_per_sec: Some(5),
                ..QosUpdate::default()
            },
        )
        .expect("set");
    // A later update keeps what it leaves out.
    let limits = registry
        .set_qos_limits(
            "Null0",
            &QosUpdate {
                r_mbytes_per_sec: Some(7),
                ..QosUpdate::default()
            },
        )
        .expect("update");
    let expected = QosLimits {
        rw_ios_per_sec: 20000,
        rw_mbytes_per_sec: 0,
        r_mbytes_per_sec: 7,
        w_mbytes_per_sec: 5,
    };
    assert_eq!(limits, expected);
    let saved = registry.save_config();
    let entries = saved["config"].as_array().expect("entries");
    let methods: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["method"].as_str())
        .collect();
    assert_eq!(
        methods,
        ["bdev_null_create", "bdev_set_qos_limit", "bdev_null_create"]
    );
    assert_eq!(
        entries[1]["params"],
        serde_json::json!({"name": "Null0", "rw_ios_per_sec": 20000,
                           "r_mbytes_per_sec": 7, "w_mbytes_per_sec": 5})
    );

    let memory = dma(8);
    let reloaded = BdevRegistry::new();
    config::apply(
        &serde_json::json!({ "subsystems": [saved] }),
        Path::new("saved.json"),
        &reloaded,
        &MethodTable::with_builtin(),
        Some(&memory),
    )
    .expect("reload");
    assert_eq!(reloaded.qos_limits("Null0").expect("Null0"), expected);
    assert!(reloaded.qos_limits("Null1").expect("Null1").is_unlimited());

    let load = |entries: &str| {
        config::load_str(
            &format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{entries}]}}]}}"#),
            Path::new("bad.json"),
            &BdevRegistry::new(),
            &MethodTable::with_builtin(),
            Some(&memory),
        )
    };
    let null0 = r#"{"method": "bdev_null_create", "params": {"name": "Null0", "num_blocks": 8, "block_size": 512}}"#;
    let cases = [
        (
            format!(
                r#"{null0}, {{"method": "bdev_set_qos_limit", "params": {{"name": "Null0", "rw_ios_per_sec": 1500}}}}"#
            ),
            "multiple of 1000",
        ),
        (
            format!(
                r#"{null0}, {{"method": "bdev_set_qos_limit", "params": {{"name": "Null0"}}}}"#
            ),
            "no rate limit given",
        ),
        (
            format!(
                r#"{null0}, {{"method": "bdev_set_qos_limit", "params": {{"name": "Nope", "rw_ios_per_sec": 1000}}}}"#
            ),
            "\"Nope\"",
        ),
        (
            format!(
                r#"{null0}, {{"method": "bdev_set_qos_limit", "params": {{"name": "Null0", "rw_ios_per_sec": -1}}}}"#
            ),
            "rw_ios_per_sec",
        ),
        (
            format!(
                r#"{null0}, {{"method": "bdev_set_qos_limit", "params": {{"name": "Null0", "iops": 1000}}}}"#
            ),
            "iops",
        ),
    ];
    for (entries, expected) in cases {
        let error = load(&entries).expect_err(&entries);
        let text = format!("{error}");
        assert!(text.contains(expected), "{entries}: {text}");
    }
    assert!(matches!(
        registry.set_qos_limits("Nope", &ios(1000)),
        Err(BdevError::NotFound { .. })
    ));
}
