//! The aio and uring bdevs on real files: data through scatter-gather, what lands in the
//! file, flush, unmap and write zeroes, the statuses of refused I/Os, 64 I/Os in flight at
//! once, and configuration errors naming their method and parameter. Each data test runs
//! for both engines on tmpfs (`/dev/shm`, O_DIRECT on recent kernels) and on the temporary
//! directory's file system (ext4 or overlay: O_DIRECT or the buffered fallback).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::TestBuf;
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::modules::{aio, uring};
use pollux_bdev::{
    BdevChannel, BdevError, BdevInfo, BdevRegistry, IoCompletion, IoStatus, IoType, IoVec,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Aio,
    Uring,
}

const ENGINES: [Engine; 2] = [Engine::Aio, Engine::Uring];

impl Engine {
    fn method(self) -> &'static str {
        match self {
            Engine::Aio => aio::METHOD,
            Engine::Uring => uring::METHOD,
        }
    }

    fn module(self) -> &'static str {
        match self {
            Engine::Aio => "aio",
            Engine::Uring => "uring",
        }
    }

    /// A bdev over `path`; aio with `fallocate` on (uring enables it by itself).
    fn create(
        self,
        registry: &BdevRegistry,
        name: &str,
        path: &Path,
        block_size: Option<u32>,
    ) -> BdevInfo {
        let result = match self {
            Engine::Aio => aio::create(
                registry,
                aio::AioOptions {
                    block_size_bytes: block_size,
                    fallocate: true,
                    ..aio::AioOptions::new(name, path)
                },
            ),
            Engine::Uring => uring::create(
                registry,
                uring::UringOptions {
                    block_size_bytes: block_size,
                    ..uring::UringOptions::new(name, path)
                },
            ),
        };
        match result {
            Ok(info) => info,
            Err(error) => panic!("{self:?} bdev over {}: {error:?}", path.display()),
        }
    }
}

/// Directories to test in: tmpfs and the temporary directory.
fn dirs() -> Vec<PathBuf> {
    let mut dirs = vec![std::env::temp_dir()];
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        dirs.push(shm);
    }
    dirs
}

/// A file removed at drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(dir: &Path, contents: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = dir.join(format!(
            "pollux-aio-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write test file");
        Self(path)
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.0).expect("read test file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

/// Test memory aligned to 4096 bytes (what O_DIRECT wants at most).
struct Aligned {
    buf: TestBuf,
    pad: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let buf = TestBuf::new(len + 4096, 0);
        let pad = buf.bytes().as_ptr().align_offset(4096);
        Self { buf, pad, len }
    }

    fn iov(&mut self, offset: usize, len: usize) -> IoVec {
        assert!(offset + len <= self.len);
        self.buf.iov(self.pad + offset, len)
    }

    fn bytes(&self) -> &[u8] {
        &self.buf.bytes()[self.pad..self.pad + self.len]
    }

    fn fill(&mut self, data: &[u8]) {
        self.buf.bytes_mut()[self.pad..self.pad + data.len()].copy_from_slice(data);
    }
}

/// Polls until `count` completions arrived (bounded by time: real I/O).
fn wait(channel: &mut BdevChannel, count: usize) -> Vec<IoCompletion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < count && Instant::now() < deadline {
        channel.poll(|_, completion| done.push(completion));
    }
    // A few more polls: nothing beyond `count` may arrive.
    for _ in 0..10 {
        channel.poll(|_, completion| done.push(completion));
    }
    assert_eq!(done.len(), count, "completions");
    done
}

fn wait_one(channel: &mut BdevChannel) -> IoStatus {
    wait(channel, 1)[0].status
}

/// Iovec lengths for `total` bytes whose boundaries fall inside blocks of `block` bytes,
/// in units of `unit` (O_DIRECT wants each length a multiple of the logical block size).
fn crossing_split(total: usize, block: usize, unit: usize) -> Vec<usize> {
    let first = if unit == 1 { 100 } else { unit };
    let second = block + if unit == 1 { 50 } else { unit };
    assert!(first < block && first + second < total);
    vec![first, second, total - first - second]
}

#[test]
fn data_round_trips_through_the_file() {
    const BLOCK: usize = 8192;
    for dir in dirs() {
        for engine in ENGINES {
            let context = format!("{engine:?} in {}", dir.display());
            let initial = pattern(1 << 20, 1);
            let file = TempFile::new(&dir, &initial);
            let registry = BdevRegistry::new();
            let info = engine.create(&registry, "File0", &file.0, Some(BLOCK as u32));
            assert_eq!(info.module, engine.module());
            assert_eq!(info.block_size_bytes as usize, BLOCK);
            assert_eq!(info.num_blocks, (1 << 20) / BLOCK as u64, "{context}");
            let align = info.required_alignment_bytes as usize;
            assert!(
                align == 1 || (512..=4096).contains(&align),
                "{context}: align {align}"
            );
            let desc = registry.open("File0", true, None).expect("open");
            let mut channel = desc.channel(8).expect("channel");

            // What is in the file reads back.
            let mut read = Aligned::new(4 * BLOCK);
            let iov = [read.iov(0, 4 * BLOCK)];
            channel.read(1, 2, 4, &iov).expect("slot");
            assert_eq!(wait_one(&mut channel), IoStatus::Success, "{context}");
            assert_eq!(read.bytes(), &initial[2 * BLOCK..6 * BLOCK], "{context}");

            // A write from three iovecs whose boundaries fall inside blocks.
            let data = pattern(3 * BLOCK, 7);
            let mut write = Aligned::new(3 * BLOCK);
            write.fill(&data);
            let lens = crossing_split(3 * BLOCK, BLOCK, align);
            let mut offset = 0;
            let iovs: Vec<IoVec> = lens
                .iter()
                .map(|&len| {
                    let iov = write.iov(offset, len);
                    offset += len;
                    iov
                })
                .collect();
            channel.write(2, 5, 3, &iovs).expect("slot");
            assert_eq!(wait_one(&mut channel), IoStatus::Success, "{context}");
            channel.flush(3, 0, info.num_blocks).expect("slot");
            assert_eq!(wait_one(&mut channel), IoStatus::Success, "{context}");

            // The data is in the file, around it nothing changed.
            let contents = file.read();
            assert_eq!(&contents[5 * BLOCK..8 * BLOCK], &data[..], "{context}");
            assert_eq!(&contents[..5 * BLOCK], &initial[..5 * BLOCK], "{context}");
            assert_eq!(&contents[8 * BLOCK..], &initial[8 * BLOCK..], "{context}");

            // And reads back through other iovec boundaries.
            let mut back = Aligned::new(3 * BLOCK);
            let lens = [2 * BLOCK - lens[0], BLOCK + lens[0]];
            let iovs = [back.iov(0, lens[0]), back.iov(lens[0], lens[1])];
            channel.read(4, 5, 3, &iovs).expect("slot");
            assert_eq!(wait_one(&mut channel), IoStatus::Success, "{context}");
            assert_eq!(back.bytes(), &data[..], "{context}");
            assert_eq!(channel.outstanding(), 0);
        }
    }
}

#[test]
fn block_size_and_alignment_are_detected() {
    for dir in dirs() {
        for engine in ENGINES {
            let file = TempFile::new(&dir, &vec![0; 1 << 16]);
            let registry = BdevRegistry::new();
            let info = engine.create(&registry, "File0", &file.0, None);
            let block = info.block_size_bytes;
            assert!(block.is_power_of_two() && (512..=4096).contains(&block));
            assert_eq!(info.num_blocks, (1 << 16) / u64::from(block));
            assert!(info.required_alignment_bytes <= block);
            assert!(info.write_cache);
        }
    }
}

#[test]
fn unmap_and_write_zeroes_read_back_as_zeroes() {
    const BLOCK: usize = 4096;
    for dir in dirs() {
        for engine in ENGINES {
            let context = format!("{engine:?} in {}", dir.display());
            let initial = pattern(64 * BLOCK, 3);
            let file = TempFile::new(&dir, &initial);
            let registry = BdevRegistry::new();
            engine.create(&registry, "File0", &file.0, Some(BLOCK as u32));
            let desc = registry.open("File0", true, None).expect("open");
            let mut channel = desc.channel(4).expect("channel");
            if !desc.supports(IoType::Unmap) {
                // A file system without holes: both refused, nothing changed.
                channel.unmap(1, 0, 1).expect("slot");
                channel.write_zeroes(2, 0, 1).expect("slot");
                let statuses: Vec<IoStatus> =
                    wait(&mut channel, 2).iter().map(|c| c.status).collect();
                assert_eq!(statuses, [IoStatus::Unsupported; 2], "{context}");
                assert_eq!(file.read(), initial, "{context}");
                continue;
            }
            channel.unmap(1, 4, 2).expect("slot");
            channel.write_zeroes(2, 10, 3).expect("slot");
            let done = wait(&mut channel, 2);
            assert!(
                done.iter().all(|c| c.status.is_success()),
                "{context}: {done:?}"
            );
            let mut expected = initial.clone();
            expected[4 * BLOCK..6 * BLOCK].fill(0);
            expected[10 * BLOCK..13 * BLOCK].fill(0);
            assert_eq!(file.read(), expected, "{context}: file contents");
            let mut read = Aligned::new(16 * BLOCK);
            let iov = [read.iov(0, 16 * BLOCK)];
            channel.read(3, 0, 16, &iov).expect("slot");
            assert_eq!(wait_one(&mut channel), IoStatus::Success, "{context}");
            assert_eq!(read.bytes(), &expected[..16 * BLOCK], "{context}");
        }
    }
}

#[test]
fn refused_ios_complete_with_their_status() {
    const BLOCK: usize = 4096;
    for dir in dirs() {
        for engine in ENGINES {
            let context = format!("{engine:?} in {}", dir.display());
            let file = TempFile::new(&dir, &pattern(16 * BLOCK, 5));
            let registry = BdevRegistry::new();
            let info = engine.create(&registry, "File0", &file.0, Some(BLOCK as u32));
            let desc = registry.open("File0", true, None).expect("open");
            let mut channel = desc.channel(8).expect("channel");
            let mut buf = Aligned::new(2 * BLOCK);
            let iov = [buf.iov(0, BLOCK)];
            channel.read(1, 16, 1, &iov).expect("slot");
            channel
                .read(2, 15, 2, &[buf.iov(0, 2 * BLOCK)])
                .expect("slot");
            channel.write(3, 0, 0, &[]).expect("slot");
            channel.reset(4).expect("slot");
            let statuses: Vec<(u64, IoStatus)> = wait(&mut channel, 4)
                .iter()
                .map(|c| (c.tag, c.status))
                .collect();
            assert_eq!(
                statuses,
                [
                    (1, IoStatus::OutOfRange),
                    (2, IoStatus::OutOfRange),
                    (3, IoStatus::OutOfRange),
                    (4, IoStatus::Unsupported),
                ],
                "{context}"
            );
            if info.required_alignment_bytes > 1 {
                // O_DIRECT: a buffer off the alignment, and an iovec length that is not a
                // multiple of it, are both refused before reaching the kernel.
                let align = info.required_alignment_bytes as usize;
                channel.read(5, 0, 1, &[buf.iov(8, BLOCK)]).expect("slot");
                let split = [buf.iov(0, align / 2), buf.iov(align, BLOCK - align / 2)];
                channel.read(6, 0, 1, &split).expect("slot");
                let statuses: Vec<IoStatus> =
                    wait(&mut channel, 2).iter().map(|c| c.status).collect();
                assert_eq!(statuses, [IoStatus::Misaligned; 2], "{context}");
            }
        }
    }
}

#[test]
fn sixty_four_ios_in_flight_complete_exactly_once() {
    const BLOCK: usize = 4096;
    const DEPTH: usize = 64;
    for dir in dirs() {
        for engine in ENGINES {
            let context = format!("{engine:?} in {}", dir.display());
            let file = TempFile::new(&dir, &vec![0; 2 * DEPTH * BLOCK]);
            let registry = BdevRegistry::new();
            engine.create(&registry, "File0", &file.0, Some(BLOCK as u32));
            let desc = registry.open("File0", true, None).expect("open");
            let mut channel = desc.channel(DEPTH as u32).expect("channel");
            let mut buf = Aligned::new(DEPTH * BLOCK);
            let data = pattern(DEPTH * BLOCK, 9);
            buf.fill(&data);
            // Writes to every other block, all queued before the first poll.
            for i in 0..DEPTH {
                let iov = [buf.iov(i * BLOCK, BLOCK)];
                channel
                    .write(i as u64, 2 * i as u64, 1, &iov)
                    .expect("slot");
            }
            let mut full = Aligned::new(BLOCK);
            let iov = [full.iov(0, BLOCK)];
            assert!(matches!(
                channel.read(999, 0, 1, &iov),
                Err(BdevError::QueueFull { .. })
            ));
            let mut tags: Vec<u64> = wait(&mut channel, DEPTH)
                .iter()
                .map(|c| {
                    assert_eq!(c.status, IoStatus::Success, "{context}: tag {}", c.tag);
                    c.tag
                })
                .collect();
            tags.sort_unstable();
            assert_eq!(tags, (0..DEPTH as u64).collect::<Vec<_>>(), "{context}");
            let contents = file.read();
            for i in 0..DEPTH {
                assert_eq!(
                    &contents[2 * i * BLOCK..(2 * i + 1) * BLOCK],
                    &data[i * BLOCK..(i + 1) * BLOCK],
                    "{context}: block {}",
                    2 * i
                );
            }
            // Reads back, 64 at once again.
            let mut back = Aligned::new(DEPTH * BLOCK);
            for i in 0..DEPTH {
                let iov = [back.iov(i * BLOCK, BLOCK)];
                channel.read(i as u64, 2 * i as u64, 1, &iov).expect("slot");
            }
            let done = wait(&mut channel, DEPTH);
            assert!(done.iter().all(|c| c.status.is_success()), "{context}");
            assert_eq!(back.bytes(), &data[..], "{context}");
            assert_eq!(channel.stats().ops_total(), 2 * DEPTH as u64, "{context}");
        }
    }
}

#[test]
fn aio_readonly_refuses_writes() {
    let initial = pattern(1 << 16, 11);
    let file = TempFile::new(&std::env::temp_dir(), &initial);
    let registry = BdevRegistry::new();
    aio::create(
        &registry,
        aio::AioOptions {
            readonly: true,
            fallocate: true,
            block_size_bytes: Some(4096),
            ..aio::AioOptions::new("Ro0", &file.0)
        },
    )
    .expect("readonly aio bdev");
    let desc = registry.open("Ro0", true, None).expect("open");
    assert!(!desc.supports(IoType::Write));
    assert!(!desc.supports(IoType::Unmap));
    let mut channel = desc.channel(4).expect("channel");
    let mut buf = Aligned::new(4096);
    channel.write(1, 0, 1, &[buf.iov(0, 4096)]).expect("slot");
    assert_eq!(wait_one(&mut channel), IoStatus::Unsupported);
    channel.read(2, 1, 1, &[buf.iov(0, 4096)]).expect("slot");
    assert_eq!(wait_one(&mut channel), IoStatus::Success);
    assert_eq!(buf.bytes(), &initial[4096..8192]);
    assert_eq!(file.read(), initial);
}

fn load(text: &str, registry: &BdevRegistry) -> Result<Vec<String>, BdevError> {
    config::load_str(
        text,
        Path::new("test.json"),
        registry,
        &MethodTable::with_builtin(),
        None,
    )
}

fn bdev_config(entries: &str) -> String {
    format!(r#"{{"subsystems":[{{"subsystem":"bdev","config":[{entries}]}}]}}"#)
}

#[test]
fn config_creates_both_and_save_config_rebuilds_them() {
    let file_a = TempFile::new(&std::env::temp_dir(), &vec![0; 1 << 20]);
    let file_b = TempFile::new(&std::env::temp_dir(), &vec![0; 1 << 20]);
    let text = bdev_config(&format!(
        r#"{{"method": "bdev_aio_create", "params": {{"name": "Aio0", "filename": "{}",
              "block_size": 4096, "readonly": false, "fallocate": true}}}},
           {{"method": "bdev_uring_create", "params": {{"name": "Uring0", "filename": "{}",
              "uuid": "1b2c3d4e-0000-4000-8000-00000000abcd"}}}}"#,
        file_a.0.display(),
        file_b.0.display()
    ));
    let registry = BdevRegistry::new();
    assert_eq!(
        load(&text, &registry).expect("config"),
        vec!["Aio0", "Uring0"]
    );
    let aio_info = registry.info("Aio0").expect("Aio0");
    assert_eq!((aio_info.module, aio_info.block_size_bytes), ("aio", 4096));
    assert!(aio_info.supported_io_types.contains(&IoType::Unmap));
    let uring_info = registry.info("Uring0").expect("Uring0");
    assert_eq!(uring_info.module, "uring");
    assert_eq!(
        uring_info.uuid.to_string(),
        "1b2c3d4e-0000-4000-8000-00000000abcd"
    );

    let saved = serde_json::json!({ "subsystems": [registry.save_config()] });
    drop(registry);
    let rebuilt = BdevRegistry::new();
    config::apply(
        &saved,
        Path::new("saved.json"),
        &rebuilt,
        &MethodTable::with_builtin(),
        None,
    )
    .expect("saved config loads");
    assert_eq!(rebuilt.info("Aio0").expect("Aio0").block_size_bytes, 4096);
    assert_eq!(
        rebuilt.info("Uring0").expect("Uring0").uuid,
        uring_info.uuid
    );
}

#[test]
fn direct_false_goes_through_the_page_cache_and_is_saved() {
    let file_a = TempFile::new(&std::env::temp_dir(), &pattern(1 << 20, 3));
    let file_b = TempFile::new(&std::env::temp_dir(), &pattern(1 << 20, 3));
    let text = bdev_config(&format!(
        r#"{{"method": "bdev_aio_create", "params": {{"name": "Aio0", "filename": "{}",
              "block_size": 4096, "direct": false}}}},
           {{"method": "bdev_uring_create", "params": {{"name": "Uring0", "filename": "{}",
              "block_size": 4096, "direct": false}}}},
           {{"method": "bdev_uring_create", "params": {{"name": "Uring1", "filename": "{}",
              "block_size": 4096}}}}"#,
        file_a.0.display(),
        file_b.0.display(),
        file_b.0.display()
    ));
    let registry = BdevRegistry::new();
    load(&text, &registry).expect("config");
    for name in ["Aio0", "Uring0"] {
        let info = registry.info(name).expect(name);
        // Buffered: no O_DIRECT alignment rule on the caller's buffers.
        assert_eq!(info.required_alignment_bytes, 1, "{name}");
        // Data still flows, from a buffer at an odd address.
        let desc = registry.open(name, true, None).expect("open");
        let mut channel = desc.channel(4).expect("channel");
        let mut buffer = Aligned::new(4096 + 64);
        let iov = [buffer.iov(3, 4096)];
        channel.read(1, 5, 1, &iov).expect("slot");
        assert_eq!(wait_one(&mut channel), IoStatus::Success, "{name}");
        assert_eq!(
            &buffer.bytes()[3..4096 + 3],
            &pattern(1 << 20, 3)[5 * 4096..6 * 4096],
            "{name}"
        );
    }
    let saved = registry.save_config();
    let entries = saved["config"].as_array().expect("config array");
    let direct_of = |name: &str| {
        entries
            .iter()
            .find(|entry| entry["params"]["name"] == name)
            .map(|entry| entry["params"].get("direct").cloned())
            .expect(name)
    };
    assert_eq!(direct_of("Aio0"), Some(serde_json::json!(false)));
    assert_eq!(direct_of("Uring0"), Some(serde_json::json!(false)));
    // The default is not written, so that the saved config also loads in SPDK.
    assert_eq!(direct_of("Uring1"), None);

    let bad = bdev_config(&format!(
        r#"{{"method": "bdev_uring_create", "params": {{"name": "Uring2", "filename": "{}",
              "direct": "no"}}}}"#,
        file_a.0.display()
    ));
    let error = load(&bad, &BdevRegistry::new()).expect_err("direct must be a boolean");
    assert!(format!("{error}").contains("direct"), "{error}");
}

#[test]
fn config_errors_name_method_param_and_path() {
    let file = TempFile::new(&std::env::temp_dir(), &vec![0; 1 << 16]);
    let missing = std::env::temp_dir().join("pollux-aio-test-no-such-file");
    for engine in ENGINES {
        let method = engine.method();
        let cases = [
            (
                format!(r#"{{"method": "{method}", "params": {{"name": "F0"}}}}"#),
                vec![method, "\"filename\""],
            ),
            (
                format!(
                    r#"{{"method": "{method}", "params": {{"name": "F0", "filename": "{}"}}}}"#,
                    missing.display()
                ),
                vec![
                    method,
                    "\"filename\"",
                    missing.to_str().expect("utf-8 path"),
                    "No such file",
                ],
            ),
            (
                format!(
                    r#"{{"method": "{method}", "params": {{"filename": "{}"}}}}"#,
                    file.0.display()
                ),
                vec![method, "\"name\""],
            ),
            (
                format!(
                    r#"{{"method": "{method}", "params": {{"name": "F0", "filename": "{}", "block_size": 1000}}}}"#,
                    file.0.display()
                ),
                vec![method, "\"block_size\"", "1000"],
            ),
            (
                format!(
                    r#"{{"method": "{method}", "params": {{"name": "F0", "filename": "{}", "bogus": 1}}}}"#,
                    file.0.display()
                ),
                vec![method, "\"bogus\""],
            ),
        ];
        for (entry, wanted) in cases {
            let registry = BdevRegistry::new();
            let error = load(&bdev_config(&entry), &registry).expect_err(&entry);
            let text = pollux_bdev_error_chain(&error);
            for word in wanted {
                assert!(text.contains(word), "{entry}: {text:?} lacks {word:?}");
            }
            assert!(registry.names().is_empty());
        }
    }
    // A file smaller than one block is refused at creation, naming the method too.
    let tiny = TempFile::new(&std::env::temp_dir(), &[0; 100]);
    let registry = BdevRegistry::new();
    let entry = format!(
        r#"{{"method": "bdev_aio_create", "params": {{"name": "T0", "filename": "{}", "block_size": 512}}}}"#,
        tiny.0.display()
    );
    let text = pollux_bdev_error_chain(&load(&bdev_config(&entry), &registry).expect_err("tiny"));
    assert!(
        text.contains("bdev_aio_create") && text.contains("\"block_size\""),
        "{text}"
    );
    assert!(
        text.contains(tiny.0.to_str().expect("utf-8 path")),
        "{text}"
    );
    // The module's error crosses into the bdev layer whole, not as text.
    let error = load(&bdev_config(&entry), &registry).expect_err("tiny");
    let BdevError::Create { source, .. } = &error else {
        panic!("unexpected {error:?}");
    };
    let BdevError::InvalidParam {
        param: "block_size",
        source: Some(module_error),
        ..
    } = source.as_ref()
    else {
        panic!("unexpected {source:?}");
    };
    assert!(
        matches!(
            module_error.downcast_ref::<aio::FileBdevError>(),
            Some(aio::FileBdevError::TooSmall {
                size_bytes: 100,
                block_size_bytes: 512,
                ..
            })
        ),
        "{module_error:?}"
    );
}

/// The error and its sources on one line.
fn pollux_bdev_error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[test]
fn nonexistent_file_is_a_typed_error_with_the_path() {
    let registry = BdevRegistry::new();
    let path = std::env::temp_dir().join("pollux-aio-test-absent");
    let error = aio::create(&registry, aio::AioOptions::new("A0", &path)).expect_err("absent");
    match &error {
        aio::FileBdevError::Open { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.raw_os_error(), Some(2), "ENOENT");
        }
        other => panic!("unexpected {other:?}"),
    }
    let error =
        uring::create(&registry, uring::UringOptions::new("U0", &path)).expect_err("absent");
    assert!(matches!(error, aio::FileBdevError::Open { .. }));
}
