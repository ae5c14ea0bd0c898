//! The nvme bdev module against the software controller model: attach, I/O through a
//! `BdevChannel` with data checked in the model's namespaces, injected errors, reset
//! recovery, detach (hot remove), and the config method's parameter checks.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_bdev::config::{self, MethodTable, Params};
use pollux_bdev::{BdevChannel, BdevError, BdevRegistry, IoCompletion, IoStatus, IoType, IoVec};
use pollux_env::dma::{DmaBuffer, DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;
use pollux_nvme::bdev::{self, AttachOptions, NvmeModule, ATTACH_METHOD};
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_nvme::spec::sc;
use pollux_nvme::{ControllerOptions, ControllerState, Status};

fn memory() -> Arc<DmaMemory> {
    DmaMemory::with_memmap(
        DmaConfig {
            size_mib: 32,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory")
}

struct Setup {
    mem: Arc<DmaMemory>,
    model: Arc<ModelController>,
    module: NvmeModule,
    registry: Arc<BdevRegistry>,
}

fn attach(namespaces: Vec<(u64, u32)>) -> Setup {
    attach_with(ModelOptions {
        namespaces,
        ..ModelOptions::default()
    })
}

fn attach_with(options: ModelOptions) -> Setup {
    let mem = memory();
    let model = ModelController::new(Arc::clone(&mem), options).expect("model");
    let module = NvmeModule::new();
    let registry = BdevRegistry::new();
    module
        .attach_with_registers(
            &registry,
            Arc::clone(&model),
            Arc::clone(&mem),
            AttachOptions {
                name: "Nvme0".to_string(),
                trtype: "PCIe".to_string(),
                traddr: "model".to_string(),
                max_bdevs: 128,
                controller: ControllerOptions::default(),
            },
        )
        .expect("attach");
    Setup {
        mem,
        model,
        module,
        registry,
    }
}

fn buffer(mem: &Arc<DmaMemory>, len: usize) -> DmaBuffer {
    mem.alloc(len, 4096, None).expect("buffer")
}

fn iov(buffer: &mut DmaBuffer) -> IoVec {
    // SAFETY: every test keeps the buffer alive and leaves it alone until the I/O using this
    // iovec was handed back by `run` (which polls until nothing is outstanding).
    unsafe { IoVec::new(buffer.as_mut_ptr(), buffer.len()) }
}

/// Polls until nothing is outstanding (2 s at most); the completions, in order.
fn run(channel: &mut BdevChannel) -> Vec<IoCompletion> {
    let mut out = Vec::new();
    let start = Instant::now();
    while channel.outstanding() > 0 && start.elapsed() < Duration::from_secs(2) {
        channel.poll(|_, completion| out.push(completion));
    }
    assert_eq!(channel.outstanding(), 0, "I/O still outstanding after 2 s");
    out
}

fn one(channel: &mut BdevChannel) -> IoStatus {
    let done = run(channel);
    assert_eq!(done.len(), 1);
    done[0].status
}

#[test]
fn one_bdev_per_namespace_with_its_geometry() {
    let setup = attach(vec![(1024, 512), (256, 4096)]);
    assert_eq!(setup.registry.names(), ["Nvme0n1", "Nvme0n2"]);
    let n1 = setup.registry.info("Nvme0n1").expect("n1");
    assert_eq!((n1.block_size_bytes, n1.num_blocks), (512, 1024));
    assert_eq!(n1.module, "nvme");
    assert_eq!(n1.required_alignment_bytes, 4);
    assert!(n1.write_cache, "the model has a volatile write cache");
    for io_type in [
        IoType::Read,
        IoType::Write,
        IoType::Flush,
        IoType::WriteZeroes,
        IoType::Unmap,
    ] {
        assert!(n1.supported_io_types.contains(&io_type), "{io_type}");
    }
    assert!(!n1.supported_io_types.contains(&IoType::Reset));
    let n2 = setup.registry.info("Nvme0n2").expect("n2");
    assert_eq!((n2.block_size_bytes, n2.num_blocks), (4096, 256));
    assert_eq!(setup.module.controller_names(), ["Nvme0"]);
    assert_eq!(
        setup.module.bdev_names("Nvme0").expect("bdevs"),
        ["Nvme0n1", "Nvme0n2"]
    );
    // save_config: the attach once (by the first namespace), nothing that would attach twice.
    let saved = setup.registry.save_config();
    let entries = saved["config"].as_array().expect("config");
    assert_eq!(entries[0]["method"], ATTACH_METHOD);
    assert_eq!(entries[0]["params"]["name"], "Nvme0");
    assert_eq!(entries[0]["params"]["trtype"], "PCIe");
    assert_eq!(entries[1]["method"], "bdev_wait_for_examine");
    // A second controller of the same name is refused.
    let error = setup
        .module
        .attach_with_registers(
            &setup.registry,
            Arc::clone(&setup.model),
            Arc::clone(&setup.mem),
            AttachOptions {
                name: "Nvme0".to_string(),
                trtype: "PCIe".to_string(),
                traddr: "model".to_string(),
                max_bdevs: 128,
                controller: ControllerOptions::default(),
            },
        )
        .expect_err("duplicate");
    assert!(matches!(error, BdevError::DuplicateName { .. }), "{error}");
}

#[test]
fn read_write_flush_write_zeroes_unmap_reach_the_namespace() {
    let setup = attach(vec![(1024, 512), (256, 4096)]);
    let desc = setup.registry.open("Nvme0n2", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    let len = 2 * 4096;
    let mut data = buffer(&setup.mem, len);
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    data.write_at(0, &pattern).expect("fill");

    channel.write(1, 10, 2, &[iov(&mut data)]).expect("write");
    assert_eq!(one(&mut channel), IoStatus::Success);
    let mut on_media = vec![0u8; len];
    assert!(setup.model.read_namespace(2, 10 * 4096, &mut on_media));
    assert_eq!(on_media, pattern, "written data in the model's namespace 2");

    // Read back, through two iovecs (the second one page aligned: PRP rules).
    let mut first = buffer(&setup.mem, 4096);
    let mut second = buffer(&setup.mem, 4096);
    channel
        .read(2, 10, 2, &[iov(&mut first), iov(&mut second)])
        .expect("read");
    assert_eq!(one(&mut channel), IoStatus::Success);
    let mut back = vec![0u8; len];
    first.read_at(0, &mut back[..4096]).expect("read first");
    second.read_at(0, &mut back[4096..]).expect("read second");
    assert_eq!(back, pattern);

    channel.flush(3, 0, 256).expect("flush");
    assert_eq!(one(&mut channel), IoStatus::Success);

    channel.write_zeroes(4, 10, 1).expect("write zeroes");
    assert_eq!(one(&mut channel), IoStatus::Success);
    assert!(setup.model.read_namespace(2, 10 * 4096, &mut on_media));
    assert!(on_media[..4096].iter().all(|b| *b == 0), "block 10 zeroed");
    assert_eq!(&on_media[4096..], &pattern[4096..], "block 11 untouched");

    channel.unmap(5, 11, 1).expect("unmap");
    assert_eq!(one(&mut channel), IoStatus::Success);
    assert!(setup
        .model
        .read_namespace(2, 11 * 4096, &mut on_media[..4096]));
    assert!(
        on_media[..4096].iter().all(|b| *b == 0),
        "the model deallocates to zeroes"
    );

    // Queue depth worth of I/O at once, each to its own block.
    let mut buffers: Vec<DmaBuffer> = (0..8).map(|_| buffer(&setup.mem, 4096)).collect();
    for (index, buf) in buffers.iter_mut().enumerate() {
        buf.fill(0, 4096, index as u8 + 1).expect("fill");
        channel
            .write(100 + index as u64, 20 + index as u64, 1, &[iov(buf)])
            .expect("write");
    }
    let done = run(&mut channel);
    assert_eq!(done.len(), 8);
    assert!(done.iter().all(|c| c.status == IoStatus::Success));
    for index in 0..8 {
        let mut block = vec![0u8; 4096];
        assert!(setup
            .model
            .read_namespace(2, (20 + index) * 4096, &mut block));
        assert!(block.iter().all(|b| *b == index as u8 + 1));
    }

    // Everything above went zero copy; a read into unregistered heap memory is bounced.
    assert_eq!(setup.module.bounced_requests("Nvme0"), Some(0));
    let mut heap = vec![0u8; 4096];
    // SAFETY: `heap` outlives the read (completed by `one` below) and is not touched meanwhile.
    let heap_iov = unsafe { IoVec::new(heap.as_mut_ptr(), heap.len()) };
    channel.read(6, 20, 1, &[heap_iov]).expect("read");
    assert_eq!(one(&mut channel), IoStatus::Success);
    assert!(heap.iter().all(|b| *b == 1), "bounced read copied back");
    drop(channel);
    assert_eq!(
        setup.module.bounced_requests("Nvme0"),
        Some(1),
        "closed channels report their bounced requests"
    );
    assert_eq!(setup.module.bounced_requests("Nvme9"), None);
}

#[test]
fn every_channel_gets_its_own_queue_pair() {
    let setup = attach(vec![(1024, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut a = desc.channel(4).expect("channel a");
    let mut b = desc.channel(4).expect("channel b");
    let mut buf_a = buffer(&setup.mem, 512);
    let mut buf_b = buffer(&setup.mem, 512);
    buf_a.fill(0, 512, 0xaa).expect("fill");
    buf_b.fill(0, 512, 0xbb).expect("fill");
    a.write(0, 0, 1, &[iov(&mut buf_a)]).expect("write a");
    b.write(0, 1, 1, &[iov(&mut buf_b)]).expect("write b");
    assert_eq!(one(&mut a), IoStatus::Success);
    assert_eq!(one(&mut b), IoStatus::Success);
    drop(a);
    drop(b);
    // The dropped channels' queues were deleted: as many new ones can be created again.
    let channels: Vec<BdevChannel> = (0..8).map(|_| desc.channel(2).expect("channel")).collect();
    assert_eq!(channels.len(), 8);
    let error = desc.channel(2).expect_err("the model grants 8 I/O queues");
    assert!(matches!(error, BdevError::ChannelCreate { .. }), "{error}");
}

#[test]
fn injected_errors_fail_the_io_with_a_status() {
    let setup = attach(vec![(1024, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    let mut buf = buffer(&setup.mem, 512);
    setup
        .model
        .fail_next(1, Status::generic(sc::UNRECOVERED_READ_ERROR));
    channel.read(7, 3, 1, &[iov(&mut buf)]).expect("read");
    let done = run(&mut channel);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].tag, 7);
    assert_eq!(done[0].status, IoStatus::Failed);
    // The next one works again.
    channel.read(8, 3, 1, &[iov(&mut buf)]).expect("read");
    assert_eq!(one(&mut channel), IoStatus::Success);
    // The bdev layer's own checks come first (range), the module never sees those.
    channel.read(9, 1024, 1, &[iov(&mut buf)]).expect("queued");
    assert_eq!(one(&mut channel), IoStatus::OutOfRange);
}

#[test]
fn reset_fails_in_flight_io_then_the_channel_reconnects() {
    let setup = attach(vec![(1024, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    let mut buf = buffer(&setup.mem, 512);
    setup.model.set_auto_execute(false);
    channel.read(1, 0, 1, &[iov(&mut buf)]).expect("read");
    channel.poll(|_, _| panic!("nothing completes while the model holds the command"));
    setup.model.set_fatal();
    setup.model.set_auto_execute(true);
    setup.module.poll_admin(); // sees CSTS.CFS, resets
    assert_eq!(
        setup.module.controller_state("Nvme0"),
        Some(ControllerState::Running)
    );
    assert_eq!(one(&mut channel), IoStatus::Failed, "aborted by the reset");
    // The next poll reconnects the pair; I/O works again.
    channel.poll(|_, _| {});
    channel.read(2, 0, 1, &[iov(&mut buf)]).expect("read");
    assert_eq!(one(&mut channel), IoStatus::Success);
}

#[test]
fn surprise_removal_fails_io_and_detach_removes_the_bdevs() {
    let setup = attach(vec![(1024, 512), (512, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    let mut buf = buffer(&setup.mem, 512);
    setup.model.remove();
    setup.module.poll_admin();
    assert_eq!(
        setup.module.controller_state("Nvme0"),
        Some(ControllerState::Failed)
    );
    channel.read(1, 0, 1, &[iov(&mut buf)]).expect("read");
    assert_eq!(one(&mut channel), IoStatus::Failed);

    setup
        .module
        .detach_controller(&setup.registry, "Nvme0")
        .expect("detach");
    assert!(setup.registry.names().is_empty());
    assert!(setup.module.controller_names().is_empty());
    assert!(channel.is_removed());
    channel.read(2, 0, 1, &[iov(&mut buf)]).expect("queued");
    assert_eq!(one(&mut channel), IoStatus::Removed);
    let error = setup
        .module
        .detach_controller(&setup.registry, "Nvme0")
        .expect_err("detached already");
    assert!(
        error.to_string().contains("bdev_nvme_detach_controller")
            && error.to_string().contains("\"name\""),
        "{error}"
    );
}

#[test]
fn detach_of_a_healthy_controller_with_open_channels() {
    let setup = attach(vec![(1024, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(4).expect("channel");
    let mut buf = buffer(&setup.mem, 512);
    channel.write(1, 0, 1, &[iov(&mut buf)]).expect("write");
    assert_eq!(one(&mut channel), IoStatus::Success);
    setup
        .module
        .detach_controller(&setup.registry, "Nvme0")
        .expect("detach");
    assert!(!setup.registry.contains("Nvme0n1"));
    // The owner drops its channel (deleting its queues) and descriptor; the controller is
    // shut down with the last reference.
    drop(channel);
    drop(desc);
}

// -----------------------------------------------------------------------------------------
// Configuration

fn table() -> MethodTable {
    let mut table = MethodTable::with_builtin();
    bdev::register_methods(&mut table).expect("register");
    table
}

fn load(params: serde_json::Value) -> Result<Vec<String>, BdevError> {
    let config = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": ATTACH_METHOD, "params": params}
    ]}]});
    let registry = BdevRegistry::new();
    let mem = memory();
    config::apply(
        &config,
        Path::new("nvme.json"),
        &registry,
        &table(),
        Some(&mem),
    )
}

fn refused(params: serde_json::Value, param: &str) {
    let error = load(params).expect_err("refused");
    let text = error.to_string();
    assert!(
        text.contains(ATTACH_METHOD) && text.contains(&format!("{param:?}")),
        "error {text:?} should name {ATTACH_METHOD} and {param:?}"
    );
}

#[test]
fn config_errors_name_the_method_and_parameter() {
    refused(
        serde_json::json!({"name": "Nvme0", "trtype": "PCIe"}),
        "traddr",
    );
    refused(
        serde_json::json!({"name": "Nvme0", "trtype": "RDMA", "traddr": "0000:00:04.0"}),
        "trtype",
    );
    refused(
        serde_json::json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "00:zz.0"}),
        "traddr",
    );
    refused(
        serde_json::json!({"trtype": "PCIe", "traddr": "0000:00:04.0"}),
        "name",
    );
    for (param, value) in [
        ("prchk_reftag", serde_json::json!(true)),
        ("prchk_guard", serde_json::json!(true)),
        ("hdgst", serde_json::json!(true)),
        ("ctrlr_loss_timeout_sec", serde_json::json!(-1)),
        ("reconnect_delay_sec", serde_json::json!(5)),
        ("fast_io_fail_timeout_sec", serde_json::json!(5)),
        ("adrfam", serde_json::json!("IPv4")),
        ("trsvcid", serde_json::json!("4420")),
        ("subnqn", serde_json::json!("nqn.2016-06.io.spdk:cnode1")),
        ("num_io_queues", serde_json::json!(0)),
        ("multipath", serde_json::json!("sometimes")),
        ("no_such_param", serde_json::json!(1)),
    ] {
        let mut params =
            serde_json::json!({"name": "Nvme0", "trtype": "PCIe", "traddr": "0000:00:04.0"});
        params[param] = value;
        refused(params, param);
    }
}

#[test]
fn spdk_defaults_are_accepted() {
    let params = serde_json::json!({
        "name": "Nvme0", "trtype": "pcie", "traddr": "00:04.0",
        "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:0", "prchk_reftag": false,
        "prchk_guard": false, "hdgst": false, "ddgst": false, "ctrlr_loss_timeout_sec": 0,
        "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0, "multipath": "multipath",
        "num_io_queues": 4, "max_bdevs": 8, "allow_unrecognized_csi": false,
    });
    let params = Params::new(ATTACH_METHOD, Some(&params)).expect("params");
    let pending = bdev::parse_attach_options(&params).expect("parse");
    assert_eq!(pending.options.name, "Nvme0");
    assert_eq!(pending.options.trtype, "PCIe");
    assert_eq!(pending.options.traddr, "0000:00:04.0");
    assert_eq!(pending.options.controller.io_queues, 4);
    assert_eq!(pending.options.max_bdevs, 8);

    let detach = serde_json::json!({"name": "Nvme0"});
    let detach = Params::new(bdev::DETACH_METHOD, Some(&detach)).expect("params");
    assert_eq!(bdev::parse_detach(&detach).expect("detach").name, "Nvme0");
}

#[test]
fn attach_of_an_absent_device_fails_naming_traddr() {
    // Parses, then fails to open the device: no such PCI function on any test machine.
    let error = load(serde_json::json!({
        "name": "NvmeAbsent", "trtype": "PCIe", "traddr": "00ff:ff:1f.7"
    }))
    .expect_err("no such device");
    let text = format!(
        "{error}: {}",
        std::error::Error::source(&error).expect("source")
    );
    assert!(
        text.contains(ATTACH_METHOD) && text.contains("\"traddr\""),
        "{text}"
    );
    assert!(NvmeModule::global().controller_names().is_empty());
}

/// Reads and writes above the maximum transfer (MDTS 1: 8 KiB, 16 blocks of 512 bytes) are
/// split into several commands; with a queue depth of 2 most children wait for a free queue
/// pair slot. Data lands where it belongs, across iovec boundaries that split children.
#[test]
fn io_above_the_maximum_transfer_is_split() {
    let setup = attach_with(ModelOptions {
        namespaces: vec![(1024, 512)],
        mdts: 1,
        sgl: true,
        ..ModelOptions::default()
    });
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(2).expect("channel");
    // 100 blocks (7 commands) from two iovecs, the boundary inside the third command.
    let len = 100 * 512;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 13 + 7) as u8).collect();
    let mut first = buffer(&setup.mem, 20_000);
    let mut second = buffer(&setup.mem, len - 20_000);
    first.write_at(0, &pattern[..20_000]).expect("fill");
    second.write_at(0, &pattern[20_000..]).expect("fill");
    channel
        .write(1, 50, 100, &[iov(&mut first), iov(&mut second)])
        .expect("write");
    assert_eq!(one(&mut channel), IoStatus::Success);
    let mut on_media = vec![0u8; len];
    assert!(setup.model.read_namespace(1, 50 * 512, &mut on_media));
    assert!(on_media == pattern, "split write landed in order");

    // Two split reads at once: the queue pair's two slots are shared by 14 children.
    let mut a = buffer(&setup.mem, len);
    let mut b = buffer(&setup.mem, len);
    channel.read(2, 50, 100, &[iov(&mut a)]).expect("read a");
    channel.read(3, 50, 100, &[iov(&mut b)]).expect("read b");
    let done = run(&mut channel);
    assert_eq!(
        done.len(),
        2,
        "one completion per bdev I/O, not per command"
    );
    assert!(
        done.iter().all(|c| c.status == IoStatus::Success),
        "{done:?}"
    );
    let mut back = vec![0u8; len];
    a.read_at(0, &mut back).expect("read a");
    assert!(back == pattern, "split read a");
    b.read_at(0, &mut back).expect("read b");
    assert!(back == pattern, "split read b");

    // A split whose child fails fails the bdev I/O (once), and the channel goes on.
    setup
        .model
        .fail_next(1, Status::generic(sc::UNRECOVERED_READ_ERROR));
    channel.read(4, 50, 100, &[iov(&mut a)]).expect("read");
    let done = run(&mut channel);
    assert_eq!(done.len(), 1, "one completion for the whole split");
    assert_eq!((done[0].tag, done[0].status), (4, IoStatus::Failed));
    channel.read(5, 50, 100, &[iov(&mut b)]).expect("read");
    assert_eq!(one(&mut channel), IoStatus::Success);
    drop(channel);
    assert_eq!(
        setup.module.bounced_requests("Nvme0"),
        Some(0),
        "SGLs, no bounce"
    );
}

/// Interrupt mode: the channel's wake-up fd is a timer armed only while commands are
/// outstanding (the polled driver raises no interrupt). Bounded waits, nothing timed.
#[test]
fn interrupt_timer_runs_only_while_commands_are_outstanding() {
    use std::os::fd::AsFd;
    let setup = attach(vec![(1024, 512)]);
    let desc = setup.registry.open("Nvme0n1", true, None).expect("open");
    let mut channel = desc.channel(8).expect("channel");
    let fd = channel
        .interrupt_fd()
        .expect("a wake-up fd")
        .try_clone_to_owned()
        .expect("dup");
    let drain = || pollux_env::wake::drain(fd.as_fd());
    channel.poll(|_, _| {});
    std::thread::sleep(bdev::INTERRUPT_POLL_PERIOD * 5);
    assert_eq!(drain(), 0, "idle: no timer");

    setup.model.set_auto_execute(false);
    let mut data = buffer(&setup.mem, 512);
    channel.read(1, 0, 1, &[iov(&mut data)]).expect("read");
    assert_eq!(channel.poll(|_, _| {}), 0, "the model holds the command");
    let mut fired = 0;
    for _ in 0..2000 {
        fired = drain();
        if fired > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        fired > 0,
        "the timer wakes the owner while a command is outstanding"
    );
    setup.model.step();
    assert_eq!(one(&mut channel), IoStatus::Success);
    drain();
    std::thread::sleep(bdev::INTERRUPT_POLL_PERIOD * 5);
    assert_eq!(drain(), 0, "idle again: the timer stopped");
}
