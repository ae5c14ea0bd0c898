//! The delay bdev: completions held back by the configured latency (every 100th by the p99
//! one), data passed through to the base, the base claimed while the delay bdev exists, and
//! its configuration (parameters checked, `save_config` rebuilding it).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{dma, TestBuf};
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::modules::{delay, malloc};
use pollux_bdev::{BdevChannel, BdevError, BdevRegistry, IoCompletion, IoStatus, IoType};

fn delay_options(name: &str, base: &str, read_us: u64, write_us: u64) -> delay::DelayOptions {
    delay::DelayOptions {
        name: name.to_string(),
        uuid: None,
        base_bdev_name: base.to_string(),
        avg_read_latency_us: read_us,
        p99_read_latency_us: read_us * 3,
        avg_write_latency_us: write_us,
        p99_write_latency_us: write_us * 3,
    }
}

/// Polls until `count` completions arrived or `limit` passed; returns them with the time
/// each arrived.
fn reap_for(
    channel: &mut BdevChannel,
    count: usize,
    limit: Duration,
) -> Vec<(IoCompletion, Duration)> {
    let start = Instant::now();
    let mut done = Vec::new();
    while done.len() < count && start.elapsed() < limit {
        channel.poll(|_, completion| done.push((completion, start.elapsed())));
    }
    done
}

#[test]
fn completions_wait_for_their_latency_and_data_reaches_the_base() {
    let memory = dma(8);
    let registry = BdevRegistry::new();
    malloc::create(
        &registry,
        &memory,
        malloc::MallocOptions::from_size_mib(Some("Base0".into()), 1, 512),
    )
    .expect("malloc bdev");
    let info = delay::create(&registry, delay_options("Delay0", "Base0", 20_000, 60_000))
        .expect("delay bdev");
    assert_eq!(info.module, "delay");
    assert_eq!(info.num_blocks, 2048);
    assert_eq!(info.block_size_bytes, 512);
    assert_eq!(info.supported_io_types, IoType::ALL.to_vec());
    // The base is claimed: nobody else may write to it behind the delay bdev's back.
    assert!(matches!(
        registry.open("Base0", true, None),
        Err(BdevError::Claimed { .. })
    ));

    let desc = registry.open("Delay0", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    let mut data = TestBuf::new(4096, 0x5a);
    let iov = [data.iov(0, 4096)];
    let start = Instant::now();
    channel.write(1, 16, 8, &iov).expect("slot");
    channel.reset(2).expect("slot");
    let done = reap_for(&mut channel, 2, Duration::from_secs(5));
    assert_eq!(done.len(), 2, "both completed");
    // The reset waits for nothing and overtakes the delayed write.
    assert_eq!(done[0].0.tag, 2);
    assert_eq!(done[1].0.tag, 1);
    assert_eq!(done[1].0.status, IoStatus::Success);
    assert!(
        done[1].1 >= Duration::from_millis(60),
        "write completed after {:?}",
        done[1].1
    );

    let mut back = TestBuf::new(4096, 0);
    let iov = [back.iov(0, 4096)];
    channel.read(3, 16, 8, &iov).expect("slot");
    let done = reap_for(&mut channel, 1, Duration::from_secs(5));
    assert_eq!(done.len(), 1);
    assert!(
        done[0].1 >= Duration::from_millis(20),
        "read after {:?}",
        done[0].1
    );
    assert!(
        back.bytes().iter().all(|&b| b == 0x5a),
        "read what was written"
    );
    assert!(start.elapsed() >= Duration::from_millis(80));

    // Unregistering the delay bdev releases the base.
    drop(channel);
    drop(desc);
    registry.unregister("Delay0").expect("unregister");
    registry.open("Base0", true, None).expect("base free again");
}

#[test]
fn every_hundredth_io_of_a_class_gets_the_p99_latency() {
    let memory = dma(8);
    let registry = BdevRegistry::new();
    malloc::create(
        &registry,
        &memory,
        malloc::MallocOptions::from_size_mib(Some("Base0".into()), 1, 512),
    )
    .expect("malloc bdev");
    let mut options = delay_options("Delay0", "Base0", 0, 0);
    options.p99_write_latency_us = 30_000;
    delay::create(&registry, options).expect("delay bdev");
    let desc = registry.open("Delay0", true, None).expect("open");
    let mut channel = desc.channel(128).expect("channel");
    let mut data = TestBuf::new(512, 1);
    let iov = [data.iov(0, 512)];
    for tag in 1..=100 {
        channel.write(tag, tag, 1, &iov).expect("slot");
    }
    let done = reap_for(&mut channel, 100, Duration::from_secs(5));
    assert_eq!(done.len(), 100);
    // 99 complete at once; the 100th waits the p99 latency and comes last.
    let (last, at) = done[99];
    assert_eq!(last.tag, 100);
    assert!(at >= Duration::from_millis(30), "p99 write after {at:?}");
    assert!(done[..99]
        .iter()
        .all(|(c, _)| c.status == IoStatus::Success));
}

fn load(text: &str, registry: &BdevRegistry) -> Result<Vec<String>, BdevError> {
    let memory = dma(8);
    config::load_str(
        text,
        Path::new("test.json"),
        registry,
        &MethodTable::with_builtin(),
        Some(&memory),
    )
}

const MALLOC: &str = r#"{"method": "bdev_malloc_create", "params": {"name": "M0", "num_blocks": 64, "block_size": 512}}"#;

fn with_delay(params: &str) -> String {
    format!(
        r#"{{"subsystems":[{{"subsystem":"bdev","config":[{MALLOC},
           {{"method": "bdev_delay_create", "params": {params}}}]}}]}}"#
    )
}

#[test]
fn configuration_checks_parameters_and_save_config_rebuilds_it() {
    let registry = BdevRegistry::new();
    let good = r#"{"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 10,
        "p99_read_latency": 20, "avg_write_latency": 30, "p99_write_latency": 40}"#;
    load(&with_delay(good), &registry).expect("loads");
    assert_eq!(registry.info("D0").expect("D0").module, "delay");
    let saved = registry.save_config();
    let text = serde_json::json!({ "subsystems": [saved] }).to_string();
    let rebuilt = BdevRegistry::new();
    load(&text, &rebuilt).expect("saved config loads");
    assert_eq!(
        registry.info("D0").expect("old"),
        rebuilt.info("D0").expect("new")
    );

    for (params, needle) in [
        (
            r#"{"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 10,
               "p99_read_latency": 5, "avg_write_latency": 1, "p99_write_latency": 1}"#,
            "p99_read_latency",
        ),
        (
            r#"{"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 1,
               "p99_read_latency": 1, "avg_write_latency": 1}"#,
            "p99_write_latency",
        ),
        (
            r#"{"name": "D0", "base_bdev_name": "nope", "avg_read_latency": 1,
               "p99_read_latency": 1, "avg_write_latency": 1, "p99_write_latency": 1}"#,
            "nope",
        ),
        (
            r#"{"name": "D0", "base_bdev_name": "M0", "avg_read_latency": 1, "p99_read_latency": 1,
               "avg_write_latency": 1, "p99_write_latency": 1, "extra": 1}"#,
            "extra",
        ),
    ] {
        let registry = BdevRegistry::new();
        let error = load(&with_delay(params), &registry).expect_err(params);
        let text = format!("{error}");
        let chain = std::iter::successors(
            std::error::Error::source(&error),
            |e: &&dyn std::error::Error| e.source(),
        )
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
        assert!(
            text.contains(needle) || chain.contains(needle),
            "{params}: {text}: {chain}"
        );
        assert!(registry.names().is_empty(), "nothing left half-configured");
    }
}
