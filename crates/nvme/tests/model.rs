//! The driver against the software controller model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pollux_env::dma::{DmaBuffer, DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;
use pollux_nvme::model::{ModelController, ModelOptions};
use pollux_nvme::prp::{self, DataPointer, ListArea};
use pollux_nvme::spec::{self, sc, AsyncEvent, Command, StatusCodeType};
use pollux_nvme::{
    Completion, Controller, ControllerOptions, ControllerState, IoVec, NvmeError, QueuePair,
    QueuePairOptions, Registers, Status,
};

type Ctrlr = Controller<ModelController>;

fn memory(size_mib: usize) -> Arc<DmaMemory> {
    DmaMemory::with_memmap(
        DmaConfig {
            size_mib,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory")
}

fn setup(options: ModelOptions) -> (Arc<DmaMemory>, Arc<ModelController>, Ctrlr) {
    let mem = memory(32);
    let model = ModelController::new(Arc::clone(&mem), options).expect("model");
    let ctrlr = Controller::new(
        Arc::clone(&model),
        Arc::clone(&mem),
        ControllerOptions::default(),
    )
    .expect("controller init");
    (mem, model, ctrlr)
}

fn buffer(mem: &Arc<DmaMemory>, len: usize) -> DmaBuffer {
    mem.alloc(len, 4096, None).expect("buffer")
}

/// Polls until `want` completions arrived (or 2 s passed), collecting them.
fn drain(qpair: &mut QueuePair<ModelController>, want: usize, out: &mut Vec<(u64, Completion)>) {
    let start = Instant::now();
    while out.len() < want && start.elapsed() < Duration::from_secs(2) {
        qpair
            .process_completions(64, |tag, cpl| out.push((tag, *cpl)))
            .expect("poll");
    }
    assert_eq!(out.len(), want, "completions");
}

#[test]
fn init_identify_features_logs() {
    let (_mem, _model, mut ctrlr) = setup(ModelOptions {
        namespaces: vec![(1024, 512), (256, 4096)],
        ..ModelOptions::default()
    });
    assert_eq!(ctrlr.identify().model, "Pollux NVMe model");
    assert_eq!(ctrlr.identify().serial, "POLLUXMODEL0001");
    assert_eq!(ctrlr.version().to_string(), "1.4.0");
    assert_eq!(ctrlr.io_queues_granted(), 8);
    assert!(!ctrlr.supports_shadow_doorbells());
    let namespaces = ctrlr.namespaces();
    assert_eq!(namespaces.len(), 2);
    assert_eq!(namespaces[0].nsid(), 1);
    assert_eq!(namespaces[0].block_size_bytes(), 512);
    assert_eq!(namespaces[0].num_blocks(), 1024);
    assert_eq!(namespaces[1].block_size_bytes(), 4096);
    assert!(matches!(
        ctrlr.namespace(3),
        Err(NvmeError::NoSuchNamespace { nsid: 3 })
    ));
    assert_eq!(ctrlr.smart_log().expect("smart").temperature_k, 300);
    assert!(ctrlr.error_log().expect("error log").is_empty());
    assert!(!ctrlr.volatile_write_cache().expect("vwc"));
    ctrlr.set_volatile_write_cache(true).expect("set vwc");
    assert!(ctrlr.volatile_write_cache().expect("vwc"));
    // An unsupported feature reports the device's status by name.
    match ctrlr.set_features(spec::fid::ARBITRATION, 0) {
        Err(NvmeError::CommandFailed { status, .. }) => {
            assert_eq!(status.name(), "Invalid Field in Command")
        }
        other => panic!("expected a command failure, got {other:?}"),
    }
}

#[test]
fn ring_wraps_and_phase_flips_with_data_intact() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 4,
            depth: 8,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let mut buf = buffer(&mem, 8 * 4096);
    let mut done = Vec::new();
    // 300 rounds of 8 writes then 8 reads on a 4-entry ring: the CQ wraps ~150 times.
    for round in 0..300u64 {
        for i in 0..8u64 {
            let pattern = [(round * 8 + i) as u8; 512];
            buf.write_at(i as usize * 4096, &pattern).expect("fill");
            let iov = IoVec::from_dma_buffer(&buf, i as usize * 4096, 512).expect("iov");
            qpair
                .submit_write(&ns, i, (round * 8 + i) % 2048, 1, &[iov])
                .expect("write");
        }
        done.clear();
        drain(&mut qpair, 8, &mut done);
        assert!(done.iter().all(|(_, c)| c.status.is_success()));
        buf.fill(0, 8 * 4096, 0).expect("clear");
        for i in 0..8u64 {
            let iov = IoVec::from_dma_buffer(&buf, i as usize * 4096, 512).expect("iov");
            qpair
                .submit_read(&ns, 100 + i, (round * 8 + i) % 2048, 1, &[iov])
                .expect("read");
        }
        done.clear();
        drain(&mut qpair, 8, &mut done);
        for i in 0..8u64 {
            let mut got = [0u8; 512];
            buf.read_at(i as usize * 4096, &mut got).expect("read back");
            assert!(
                got.iter().all(|&b| b == (round * 8 + i) as u8),
                "round {round} block {i}"
            );
        }
    }
    let stats = qpair.stats();
    assert_eq!(stats.completed, 300 * 16);
    // 8 requests on a ring holding 3: the software queue was used.
    assert!(stats.queued_sq_full > 0);
    // One CQ doorbell per batch reaped, never one per completion.
    assert!(stats.cq_doorbells < stats.completed);
    assert_eq!(model.stats().io_commands, 300 * 16);
}

#[test]
fn full_sq_queues_in_software_and_drains_in_order() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 4,
            depth: 16,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    model.set_auto_execute(false);
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    for tag in 0..16u64 {
        qpair.submit_read(&ns, tag, tag, 1, &[iov]).expect("submit");
    }
    // The pool is exhausted: backpressure, the request is handed back as an error.
    assert!(matches!(
        qpair.submit_read(&ns, 99, 0, 1, &[iov]),
        Err(NvmeError::NoFreeSlot { depth: 16, .. })
    ));
    assert_eq!(qpair.in_flight(), 16);
    assert_eq!(qpair.stats().queued_sq_full, 13, "3 fit in a 4-entry SQ");
    let mut order = Vec::new();
    let start = Instant::now();
    while order.len() < 16 && start.elapsed() < Duration::from_secs(2) {
        qpair
            .process_completions(64, |tag, cpl| {
                assert!(cpl.status.is_success());
                order.push(tag);
            })
            .expect("poll");
        model.step();
    }
    assert_eq!(order, (0..16).collect::<Vec<_>>());
    assert_eq!(qpair.in_flight(), 0);
}

#[test]
fn prp_rules_offsets_page_crossing_and_chaining() {
    let mem = memory(16);
    let data = buffer(&mem, 4 << 20);
    let mut lists = buffer(&mem, 2 * 4096);
    let lists_iova = lists.iova().expect("iova");
    let base = data.iova().expect("iova");
    let mut area = ListArea {
        buffer: &mut lists,
        offset: 0,
        iova: lists_iova,
        pages: 2,
        page_size_bytes: 4096,
    };
    let iov = |off: usize, len: usize| IoVec::from_dma_buffer(&data, off, len).expect("iov");
    // One page at an offset: PRP1 only.
    let p = prp::build(mem.memmap(), &[iov(512, 2048)], 2048, false, &mut area).expect("prp");
    assert_eq!(
        p,
        DataPointer::Prp {
            prp1: base + 512,
            prp2: 0
        }
    );
    // First entry with an offset crossing one page boundary: PRP2 is the second page.
    let p = prp::build(mem.memmap(), &[iov(512, 4096)], 4096, false, &mut area).expect("prp");
    assert_eq!(
        p,
        DataPointer::Prp {
            prp1: base + 512,
            prp2: base + 4096
        }
    );
    // Three pages: PRP2 points to the list.
    let p = prp::build(
        mem.memmap(),
        &[iov(0, 3 * 4096)],
        3 * 4096,
        false,
        &mut area,
    )
    .expect("prp");
    assert_eq!(
        p,
        DataPointer::Prp {
            prp1: base,
            prp2: lists_iova
        }
    );
    // Page-aligned middle iovecs are fine.
    let p = prp::build(
        mem.memmap(),
        &[iov(1024, 3072), iov(8192, 4096), iov(16384, 100)],
        3072 + 4096 + 100,
        false,
        &mut area,
    )
    .expect("prp");
    assert_eq!(
        p,
        DataPointer::Prp {
            prp1: base + 1024,
            prp2: lists_iova
        }
    );
    let mut entry = [0u8; 8];
    lists.read_at(0, &mut entry).expect("list");
    assert_eq!(u64::from_le_bytes(entry), base + 8192);
    lists.read_at(8, &mut entry).expect("list");
    assert_eq!(u64::from_le_bytes(entry), base + 16384);

    // 600 pages: 599 list entries, more than one list page holds (512): the last entry of
    // the first page chains to the second.
    let mut area = ListArea {
        buffer: &mut lists,
        offset: 0,
        iova: lists_iova,
        pages: 2,
        page_size_bytes: 4096,
    };
    let len = 600 * 4096;
    let p = prp::build(mem.memmap(), &[iov(0, len)], len as u64, false, &mut area).expect("prp");
    assert_eq!(
        p,
        DataPointer::Prp {
            prp1: base,
            prp2: lists_iova
        }
    );
    lists.read_at(510 * 8, &mut entry).expect("list");
    assert_eq!(
        u64::from_le_bytes(entry),
        base + 511 * 4096,
        "last data entry of page 0"
    );
    lists.read_at(511 * 8, &mut entry).expect("list");
    assert_eq!(
        u64::from_le_bytes(entry),
        lists_iova + 4096,
        "chain to page 1"
    );
    lists.read_at(4096, &mut entry).expect("list");
    assert_eq!(
        u64::from_le_bytes(entry),
        base + 512 * 4096,
        "page 1 continues"
    );
    lists.read_at(4096 + 87 * 8, &mut entry).expect("list");
    assert_eq!(u64::from_le_bytes(entry), base + 599 * 4096, "last entry");

    // Too many pages for the preallocated list pages: an error, not an overrun.
    let mut area = ListArea {
        buffer: &mut lists,
        offset: 4096,
        iova: lists_iova + 4096,
        pages: 1,
        page_size_bytes: 4096,
    };
    assert!(matches!(
        prp::build(mem.memmap(), &[iov(0, len)], len as u64, false, &mut area),
        Err(NvmeError::TooManyDescriptors { .. })
    ));

    // A middle iovec that starts inside a page breaks the PRP rules: without SGL support it
    // is refused; with it an SGL is built.
    let broken = [iov(0, 4096), iov(4096 + 100, 512)];
    assert!(matches!(
        prp::build(mem.memmap(), &broken, 4608, false, &mut area),
        Err(NvmeError::NotPrpCompatible { .. })
    ));
    // An iovec ending inside a page followed by another one also breaks them.
    let broken_end = [iov(0, 1000), iov(8192, 512)];
    assert!(matches!(
        prp::build(mem.memmap(), &broken_end, 1512, false, &mut area),
        Err(NvmeError::NotPrpCompatible { .. })
    ));
    match prp::build(mem.memmap(), &broken, 4608, true, &mut area).expect("sgl") {
        DataPointer::Sgl(d) => {
            assert_eq!(d.descriptor_type, spec::SGL_TYPE_LAST_SEGMENT);
            assert_eq!(d.length, 32);
            assert_eq!(d.address, lists_iova + 4096);
        }
        other => panic!("expected an SGL, got {other:?}"),
    }
    // Lengths that do not add up are refused.
    assert!(matches!(
        prp::build(mem.memmap(), &[iov(0, 512)], 1024, false, &mut area),
        Err(NvmeError::InvalidRequest { .. })
    ));
}

#[test]
fn end_to_end_prp_list_chain_and_sgl() {
    let (mem, model, mut ctrlr) = setup(ModelOptions {
        namespaces: vec![(8192, 512)],
        sgl: true,
        ..ModelOptions::default()
    });
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 8,
            depth: 4,
            list_pages: 2,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    // 600 pages starting at an offset of 512 bytes: 601 PRP entries, chained list.
    let pattern: Vec<u8> = (0..600 * 4096).map(|i| (i % 251) as u8).collect();
    assert!(model.write_namespace(1, 0, &pattern));
    let buf = buffer(&mem, 601 * 4096);
    let iov = IoVec::from_dma_buffer(&buf, 512, 600 * 4096).expect("iov");
    let mut read = Command::new(spec::opc::READ);
    read.nsid = 1;
    read.cdw12 = (600 * 8) - 1;
    qpair
        .submit_raw(7, read, &[iov], 600 * 4096)
        .expect("submit");
    let mut done = Vec::new();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success(), "{}", done[0].1.status);
    let mut got = vec![0u8; 600 * 4096];
    buf.read_at(512, &mut got).expect("read back");
    assert!(
        got == pattern,
        "chained PRP read returned the namespace data"
    );
    assert_eq!(qpair.stats().prp_lists, 1);

    // Iovecs breaking the PRP rules go out as an SGL and still land in the right place.
    let mut out = buffer(&mem, 3 * 4096);
    out.fill(0, 3 * 4096, 0).expect("clear");
    let iovs = [
        IoVec::from_dma_buffer(&out, 100, 512).expect("iov"),
        IoVec::from_dma_buffer(&out, 5000, 1024).expect("iov"),
    ];
    qpair.submit_read(&ns, 8, 0, 3, &iovs).expect("submit sgl");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success(), "{}", done[0].1.status);
    let mut a = [0u8; 512];
    out.read_at(100, &mut a).expect("a");
    assert_eq!(&a[..], &pattern[..512]);
    let mut b = [0u8; 1024];
    out.read_at(5000, &mut b).expect("b");
    assert_eq!(&b[..], &pattern[512..1536]);
    assert_eq!(qpair.stats().sgls, 1);
}

#[test]
fn write_zeroes_deallocate_flush_and_injected_errors() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("qpair");
    assert!(model.write_namespace(1, 0, &[0xaa; 8 * 512]));
    qpair.submit_write_zeroes(&ns, 1, 0, 2).expect("wz");
    qpair.submit_deallocate(&ns, 2, 4, 2).expect("dsm");
    qpair.submit_flush(&ns, 3).expect("flush");
    let mut done = Vec::new();
    drain(&mut qpair, 3, &mut done);
    assert!(done.iter().all(|(_, c)| c.status.is_success()));
    let mut got = [0u8; 8 * 512];
    assert!(model.read_namespace(1, 0, &mut got));
    assert!(got[..1024].iter().all(|&b| b == 0));
    assert!(got[1024..2048].iter().all(|&b| b == 0xaa));
    assert!(got[2048..3072].iter().all(|&b| b == 0));
    // Out-of-range requests are refused before reaching the device.
    assert!(matches!(
        qpair.submit_write_zeroes(&ns, 4, 2047, 2),
        Err(NvmeError::InvalidRequest { .. })
    ));
    // Injected device errors come back with their status.
    model.fail_next(
        2,
        Status::new(
            StatusCodeType::MediaDataIntegrity,
            sc::UNRECOVERED_READ_ERROR,
        ),
    );
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    for tag in 10..13 {
        qpair.submit_read(&ns, tag, 0, 1, &[iov]).expect("read");
    }
    done.clear();
    drain(&mut qpair, 3, &mut done);
    let names: Vec<&str> = done.iter().map(|(_, c)| c.status.name()).collect();
    assert_eq!(
        names,
        [
            "Unrecovered Read Error",
            "Unrecovered Read Error",
            "Successful Completion"
        ]
    );
}

#[test]
fn dropped_completion_times_out_aborts_then_resets() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            timeout: Some(Duration::from_millis(20)),
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    model.drop_next(1);
    qpair.submit_read(&ns, 42, 0, 1, &[iov]).expect("submit");
    let mut done = Vec::new();
    let start = Instant::now();
    while done.is_empty() && start.elapsed() < Duration::from_secs(5) {
        qpair
            .process_completions(16, |tag, cpl| done.push((tag, *cpl)))
            .expect("poll");
        ctrlr.process_admin_completions().expect("admin poll");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(done.len(), 1, "the dropped command was failed back");
    let (tag, cpl) = done[0];
    assert_eq!(tag, 42);
    assert_eq!(cpl.status.sc, sc::ABORTED_SQ_DELETION);
    assert!(!cpl.status.dnr, "a reset's failure may be retried");
    assert_eq!(model.stats().aborts, 1, "abort first");
    assert_eq!(ctrlr.resets(), 1, "reset after");
    assert!(qpair.stats().timeouts >= 1);
    assert!(qpair.is_disconnected());
    assert!(matches!(
        qpair.submit_read(&ns, 1, 0, 1, &[iov]),
        Err(NvmeError::Disconnected { .. })
    ));
    ctrlr.reconnect_io_qpair(&mut qpair).expect("reconnect");
    qpair
        .submit_read(&ns, 43, 0, 1, &[iov])
        .expect("submit after reset");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success());
}

#[test]
fn fatal_status_resets_and_fails_outstanding_io() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("qpair");
    model.set_auto_execute(false);
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    for tag in 0..5 {
        qpair.submit_read(&ns, tag, 0, 1, &[iov]).expect("submit");
    }
    qpair.flush().expect("doorbell");
    model.set_fatal();
    ctrlr.poll_health().expect("reset succeeds");
    assert_eq!(ctrlr.resets(), 1);
    assert_eq!(ctrlr.state(), ControllerState::Running);
    model.set_auto_execute(true);
    let mut done = Vec::new();
    qpair
        .process_completions(16, |tag, cpl| done.push((tag, *cpl)))
        .expect("poll");
    assert_eq!(done.len(), 5);
    assert!(done
        .iter()
        .all(|(_, c)| c.status == Status::generic(sc::ABORTED_SQ_DELETION)));
    ctrlr.reconnect_io_qpair(&mut qpair).expect("reconnect");
    qpair.submit_read(&ns, 9, 0, 1, &[iov]).expect("submit");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success());
}

#[test]
fn surprise_removal_fails_outstanding_io_cleanly() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("qpair");
    model.set_auto_execute(false);
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    for tag in 0..3 {
        qpair.submit_read(&ns, tag, 0, 1, &[iov]).expect("submit");
    }
    model.remove();
    assert!(matches!(
        ctrlr.process_admin_completions(),
        Err(NvmeError::DeviceRemoved)
    ));
    assert_eq!(ctrlr.state(), ControllerState::Failed);
    let mut done = Vec::new();
    qpair
        .process_completions(16, |tag, cpl| done.push((tag, *cpl)))
        .expect("poll");
    assert_eq!(done.len(), 3);
    assert!(
        done.iter().all(|(_, c)| c.status.dnr),
        "removal: do not retry"
    );
    assert!(matches!(
        qpair.submit_read(&ns, 5, 0, 1, &[iov]),
        Err(NvmeError::Disconnected { .. })
    ));
    assert!(matches!(ctrlr.reset(), Err(NvmeError::ControllerFailed)));
    assert!(matches!(
        ctrlr.smart_log(),
        Err(NvmeError::ControllerFailed)
    ));
}

#[test]
fn hostile_completions_are_errors_not_panics() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 16,
            depth: 8,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let qid = qpair.qid();
    // Command id beyond the pool.
    model.post_raw_completion(qid, 999, 0);
    match qpair.process_completions(16, |_, _| panic!("no completion for a bad entry")) {
        Err(NvmeError::BadCompletion {
            cid: 999, reason, ..
        }) => {
            assert_eq!(reason, "command id out of range")
        }
        other => panic!("expected a bad completion, got {other:?}"),
    }
    // Command id in range but not outstanding.
    model.post_raw_completion(qid, 3, 0);
    assert!(matches!(
        qpair.process_completions(16, |_, _| {}),
        Err(NvmeError::BadCompletion {
            reason: "command id not outstanding",
            ..
        })
    ));
    // An SQ head the driver never submitted up to.
    model.set_auto_execute(false);
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    qpair.submit_read(&ns, 1, 0, 1, &[iov]).expect("submit");
    qpair.flush().expect("doorbell");
    model.post_raw_completion(qid, 0, 9);
    assert!(matches!(
        qpair.process_completions(16, |_, _| {}),
        Err(NvmeError::BadCompletion {
            reason: "sq_head outside the submitted range",
            ..
        })
    ));
    assert_eq!(qpair.stats().bad_completions, 3);
    // The controller resets on its next poll, and the request is failed back.
    ctrlr.process_admin_completions().expect("admin poll");
    assert_eq!(ctrlr.resets(), 1);
    let mut done = Vec::new();
    qpair
        .process_completions(16, |tag, cpl| done.push((tag, *cpl)))
        .expect("poll");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 1);
}

/// The completion path checks SQ id and SQ head range with one compare on DW2: every way a
/// hostile DW2 can be wrong is still caught, with its own reason, and nothing completes.
#[test]
fn hostile_sq_id_and_sq_head_are_each_caught() {
    let (mem, model, mut ctrlr) = setup(ModelOptions::default());
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 16,
            depth: 8,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    let qid = qpair.qid();
    assert!(qid > 0, "an I/O queue: SQ ids below it exist");
    model.set_auto_execute(false);
    let buf = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    qpair.submit_read(&ns, 7, 0, 1, &[iov]).expect("submit");
    qpair.flush().expect("doorbell");
    // (SQ id, SQ head, reason): the SQ ids above and below this queue's (the second wraps
    // the subtraction), an SQ head at and far past the ring's end with the right SQ id.
    let cases = [
        (qid + 1, 1, "completion names another submission queue"),
        (qid - 1, 1, "completion names another submission queue"),
        (u16::MAX, 0, "completion names another submission queue"),
        (qid, 16, "sq_head beyond the queue"),
        (qid, u16::MAX, "sq_head beyond the queue"),
    ];
    for (sq_id, sq_head, want) in cases {
        let mut entry = [0u8; 16];
        entry[8..10].copy_from_slice(&sq_head.to_le_bytes());
        entry[10..12].copy_from_slice(&sq_id.to_le_bytes());
        // Command id 0: the outstanding read's.
        model.post_raw_entry(qid, entry, false);
        match qpair.process_completions(16, |_, _| panic!("no completion for a bad entry")) {
            Err(NvmeError::BadCompletion { reason, .. }) => {
                assert_eq!(reason, want, "SQ id {sq_id}, SQ head {sq_head}")
            }
            other => panic!("SQ id {sq_id}, SQ head {sq_head}: {other:?}"),
        }
    }
    assert_eq!(qpair.stats().bad_completions, cases.len() as u64);
    // The read is still outstanding; its real completion is accepted.
    assert_eq!(qpair.in_flight(), 1);
    model.post_raw_completion(qid, 0, 1);
    let mut done = Vec::new();
    qpair
        .process_completions(16, |tag, cpl| done.push((tag, *cpl)))
        .expect("poll");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 7);
    let stats = qpair.stats();
    assert_eq!((stats.submitted, stats.completed), (1, 1));
    assert_eq!(qpair.in_flight(), 0);
}

#[test]
fn async_events_and_queue_lifecycle() {
    let (_mem, model, mut ctrlr) = setup(ModelOptions {
        max_io_queues: 2,
        ..ModelOptions::default()
    });
    model.trigger_async_event(AsyncEvent {
        event_type: 1,
        event_info: 2,
        log_page: spec::lid::SMART_HEALTH,
    });
    ctrlr.process_admin_completions().expect("admin poll");
    let events = ctrlr.take_async_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].log_page, spec::lid::SMART_HEALTH);
    // The AER was re-armed: a second event arrives too.
    model.trigger_async_event(AsyncEvent {
        event_type: 2,
        event_info: 0,
        log_page: 4,
    });
    ctrlr.process_admin_completions().expect("admin poll");
    assert_eq!(ctrlr.take_async_events().len(), 1);

    assert_eq!(ctrlr.io_queues_granted(), 2);
    let a = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("a");
    let b = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("b");
    assert_eq!((a.qid(), b.qid()), (1, 2));
    assert!(matches!(
        ctrlr.alloc_io_qpair(&QueuePairOptions::default()),
        Err(NvmeError::NoQueueId { granted: 2 })
    ));
    ctrlr.free_io_qpair(a).expect("free");
    let c = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("c");
    assert_eq!(c.qid(), 1);
    // Dropping a pair hands its queues to the controller, which deletes them on its poll.
    drop(b);
    ctrlr.process_admin_completions().expect("admin poll");
    let d = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("d");
    assert_eq!(d.qid(), 2);
    drop(c);
    drop(d);
    ctrlr.detach().expect("shutdown");
    // Shut down, then reset: the controller holds no queue (no address of ours) any more.
    assert_eq!(model.stats().shutdowns, 1);
    let cc = model.read32(spec::REG_CC).expect("cc");
    assert_eq!(cc & spec::CC_EN, 0, "CC {cc:#x}");
    let csts = model.read32(spec::REG_CSTS).expect("csts");
    assert_eq!(csts & spec::CSTS_RDY, 0, "CSTS {csts:#x}");
}

fn setup_with(
    options: ModelOptions,
    ctrlr_options: ControllerOptions,
) -> (Arc<DmaMemory>, Arc<ModelController>, Ctrlr) {
    let mem = memory(32);
    let model = ModelController::new(Arc::clone(&mem), options).expect("model");
    let ctrlr = Controller::new(Arc::clone(&model), Arc::clone(&mem), ctrlr_options).expect("init");
    (mem, model, ctrlr)
}

/// 16 rounds of 4 batches of 8 one-block writes, each batch flushed, the (deferred) model
/// stepped once per round; then every block read back and checked. Returns the pair's
/// counters after the write phase.
fn batched_writes_with_deferred_controller(shadow: bool) -> pollux_nvme::QpairStats {
    let (mem, model, mut ctrlr) = setup_with(
        ModelOptions {
            shadow_doorbells: true,
            ..ModelOptions::default()
        },
        ControllerOptions {
            shadow_doorbells: shadow,
            ..ControllerOptions::default()
        },
    );
    assert!(ctrlr.supports_shadow_doorbells());
    assert_eq!(ctrlr.shadow_doorbells_enabled(), shadow);
    assert_eq!(model.stats().doorbell_buffer_configs, u64::from(shadow));
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 64,
            depth: 64,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    assert_eq!(qpair.uses_shadow_doorbells(), shadow);
    let mut buf = buffer(&mem, 32 * 512);
    model.set_auto_execute(false);
    let mut done = Vec::new();
    for round in 0..16u64 {
        for batch in 0..4u64 {
            for i in 0..8u64 {
                let n = batch * 8 + i;
                let lba = round * 32 + n;
                buf.write_at(n as usize * 512, &[lba as u8 ^ 0x5a; 512])
                    .expect("fill");
                let iov = IoVec::from_dma_buffer(&buf, n as usize * 512, 512).expect("iov");
                qpair.submit_write(&ns, lba, lba, 1, &[iov]).expect("write");
            }
            qpair.flush().expect("flush");
        }
        model.step();
        done.clear();
        drain(&mut qpair, 32, &mut done);
        assert!(done.iter().all(|(_, c)| c.status.is_success()));
    }
    let stats = qpair.stats();
    model.set_auto_execute(true);
    for lba in 0..512u64 {
        let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
        qpair.submit_read(&ns, lba, lba, 1, &[iov]).expect("read");
        done.clear();
        drain(&mut qpair, 1, &mut done);
        assert!(done[0].1.status.is_success());
        let mut got = [0u8; 512];
        buf.read_at(0, &mut got).expect("read back");
        assert!(got.iter().all(|&b| b == lba as u8 ^ 0x5a), "block {lba}");
    }
    stats
}

#[test]
fn shadow_doorbells_skip_mmio_while_the_controller_is_behind() {
    let stats = batched_writes_with_deferred_controller(true);
    assert_eq!(stats.completed, 512);
    // Every batch went to the shadow page; only the first of each round found the controller
    // caught up (EventIdx == old tail) and rang MMIO.
    assert_eq!(stats.sq_shadow_updates, 64);
    assert_eq!(stats.sq_doorbells, 16);
    assert!(stats.cq_shadow_updates >= 16);
    assert!(stats.cq_doorbells <= stats.cq_shadow_updates);
}

#[test]
fn without_shadow_doorbells_every_batch_rings() {
    let stats = batched_writes_with_deferred_controller(false);
    assert_eq!(stats.completed, 512);
    assert_eq!(stats.sq_shadow_updates, 0);
    assert_eq!(stats.cq_shadow_updates, 0);
    assert_eq!(stats.sq_doorbells, 64);
}

#[test]
fn shadow_doorbells_are_configured_again_after_a_reset() {
    let (mem, model, mut ctrlr) = setup(ModelOptions {
        shadow_doorbells: true,
        ..ModelOptions::default()
    });
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions::default())
        .expect("qpair");
    let mut buf = buffer(&mem, 4096);
    let mut done = Vec::new();
    for lba in 0..40u64 {
        let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
        qpair.submit_write(&ns, lba, lba, 1, &[iov]).expect("write");
        drain(&mut qpair, done.len() + 1, &mut done);
    }
    ctrlr.reset().expect("reset");
    assert_eq!(model.stats().doorbell_buffer_configs, 2);
    assert!(ctrlr.shadow_doorbells_enabled());
    let mut failed = Vec::new();
    let _ = qpair.process_completions(64, |tag, cpl| failed.push((tag, *cpl)));
    ctrlr.reconnect_io_qpair(&mut qpair).expect("reconnect");
    assert!(qpair.uses_shadow_doorbells());
    // The pair restarts at tail 0: a stale shadow tail (40) would make the controller run
    // garbage entries; the slot was cleared.
    buf.write_at(0, &[0xc3; 512]).expect("fill");
    let iov = IoVec::from_dma_buffer(&buf, 0, 512).expect("iov");
    qpair.submit_write(&ns, 7, 7, 1, &[iov]).expect("write");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success());
    let mut block = [0u8; 512];
    assert!(model.read_namespace(1, 7 * 512, &mut block));
    assert!(block.iter().all(|&b| b == 0xc3));
    assert_eq!(model.stats().io_commands, 41);
}

/// Without SGL support, iovecs that break the PRP rules (and memory outside the translation
/// map) go through a bounce buffer: one copy, counted, data intact both ways.
#[test]
fn bounce_buffers_carry_what_cannot_go_zero_copy() {
    let (mem, model, mut ctrlr) = setup(ModelOptions {
        namespaces: vec![(8192, 512)],
        sgl: false,
        ..ModelOptions::default()
    });
    let ns = ctrlr.namespace(1).expect("ns").clone();
    let mut qpair = ctrlr
        .alloc_io_qpair(&QueuePairOptions {
            entries: 8,
            depth: 4,
            bounce_buffers: 1,
            bounce_buffer_bytes: 16 * 1024,
            ..QueuePairOptions::default()
        })
        .expect("qpair");
    // Write from two iovecs that break the PRP rules (the second starts inside a page).
    let mut src = buffer(&mem, 3 * 4096);
    let pattern: Vec<u8> = (0..1536).map(|i| (i % 253) as u8 + 1).collect();
    src.write_at(100, &pattern[..512]).expect("a");
    src.write_at(5000, &pattern[512..]).expect("b");
    let iovs = [
        IoVec::from_dma_buffer(&src, 100, 512).expect("iov"),
        IoVec::from_dma_buffer(&src, 5000, 1024).expect("iov"),
    ];
    qpair
        .submit_write(&ns, 1, 10, 3, &iovs)
        .expect("bounced write");
    let mut done = Vec::new();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success(), "{}", done[0].1.status);
    let mut on_disk = vec![0u8; 1536];
    assert!(model.read_namespace(1, 10 * 512, &mut on_disk));
    assert_eq!(on_disk, pattern, "bounced write reached the namespace");

    // Read into ordinary heap memory (not registered): bounced back into it on completion.
    let mut heap = vec![0u8; 1536];
    // SAFETY: `heap` outlives the command (drained below) and is not touched meanwhile.
    let heap_iov = unsafe { IoVec::new(heap.as_mut_ptr(), heap.len()) };
    qpair
        .submit_read(&ns, 2, 10, 3, &[heap_iov])
        .expect("bounced read");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert!(done[0].1.status.is_success(), "{}", done[0].1.status);
    assert_eq!(
        heap, pattern,
        "bounced read copied back into the caller's memory"
    );
    assert_eq!(qpair.stats().bounced, 2);

    // A bounced request larger than a bounce buffer is refused, and so is a second one while
    // the only buffer is taken; a refused request leaves the pair usable.
    let mut big = vec![0u8; 32 * 1024];
    // SAFETY: as above; the submission is refused, nothing keeps the pointer.
    let big_iov = unsafe { IoVec::new(big.as_mut_ptr(), big.len()) };
    assert!(matches!(
        qpair.submit_read(&ns, 3, 0, 64, &[big_iov]),
        Err(NvmeError::NotPrpCompatible { .. })
    ));
    // SAFETY: as above; drained below.
    let heap_iov = unsafe { IoVec::new(heap.as_mut_ptr(), 512) };
    qpair
        .submit_read(&ns, 4, 0, 1, &[heap_iov])
        .expect("takes the buffer");
    let mut other = vec![0u8; 512];
    // SAFETY: refused below, never used by the device.
    let other_iov = unsafe { IoVec::new(other.as_mut_ptr(), 512) };
    assert!(matches!(
        qpair.submit_read(&ns, 5, 0, 1, &[other_iov]),
        Err(NvmeError::NotPrpCompatible { .. })
    ));
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert_eq!(done[0].0, 4);
    assert_eq!(qpair.stats().bounced, 3);
    // Registered, PRP-friendly memory still goes zero copy.
    let dst = buffer(&mem, 4096);
    let iov = IoVec::from_dma_buffer(&dst, 0, 1536).expect("iov");
    qpair
        .submit_read(&ns, 6, 10, 3, &[iov])
        .expect("zero copy read");
    done.clear();
    drain(&mut qpair, 1, &mut done);
    assert_eq!(
        qpair.stats().bounced,
        3,
        "no bounce for PRP-friendly registered memory"
    );
    let mut got = vec![0u8; 1536];
    dst.read_at(0, &mut got).expect("read");
    assert_eq!(got, pattern);
}
