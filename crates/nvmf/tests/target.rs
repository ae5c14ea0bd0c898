//! The target in-process against the tests' own initiator over TCP on 127.0.0.1: connection
//! set-up, Connect, Identify, I/O through a malloc bdev (in-capsule and R2T writes, with and
//! without digests), the discovery log, and hostile input: malformed PDUs, bad digests,
//! Connects that must fail, keep alive expiry. Each hostile case checks that another
//! connection keeps working.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pollux_nvme::spec::{
    cns, fid, lid, opc, sc, Command, DiscoveryLogEntry, IdentifyController, IdentifyNamespace,
    StatusCodeType, CNTLID_DYNAMIC, CNTRLTYPE_DISCOVERY, CNTRLTYPE_IO, DISCOVERY_NQN,
    IDENTIFY_BYTES, SUBTYPE_NVME, TRTYPE_TCP,
};
use pollux_nvmf::pdu::{self, fes, DataHeader, Digests, Pdu};
use pollux_nvmf::TcpTransportOptions;

const NO_DIGESTS: Digests = Digests {
    header: false,
    data: false,
};
const DIGESTS: Digests = Digests {
    header: true,
    data: true,
};

fn page(data: &[u8]) -> [u8; IDENTIFY_BYTES] {
    data.try_into().expect("a 4 KiB page")
}

/// Admin + one I/O queue, ready for I/O.
fn io_queue(tgt: &Tgt, digests: Digests) -> (Initiator, Initiator) {
    let (mut admin, cntlid) = Initiator::admin(tgt.addr, digests, NQN, HOSTNQN, 0);
    let mut features = Command::new(opc::SET_FEATURES);
    features.cdw10 = u32::from(fid::NUMBER_OF_QUEUES);
    features.cdw11 = 0x0001_0001; // two queues each (0's based)
    let reply = admin.command(features, &[], 0, 0);
    assert!(reply.cqe.status.is_success());
    assert_eq!(reply.cqe.dw0, 0x0001_0001);
    let mut io = Initiator::connect(tgt.addr, digests);
    let cqe = io.fabrics_connect(1, 127, NQN, HOSTNQN, cntlid, 0);
    assert!(cqe.status.is_success(), "I/O connect: {}", cqe.status);
    (admin, io)
}

fn round_trip_io(digests: Digests) {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (mut admin, mut io) = io_queue(&tgt, digests);

    // Registers: CAP.MQES from max_queue_depth, VS 1.3.
    let cap = admin.property_get(0x00, true);
    assert_eq!(cap & 0xffff, 127);
    assert_eq!(admin.property_get(0x08, false), 0x0001_0300);

    // Identify Controller: what Linux checks.
    let id = IdentifyController::parse(&page(&admin.identify(CNS_CONTROLLER, 0).data));
    assert_eq!(id.subnqn, NQN);
    assert_eq!(id.serial, "POLLUX0001");
    assert_eq!(id.cntrltype, CNTRLTYPE_IO);
    assert_eq!(id.icdoff, 0);
    assert_eq!(id.ioccsz, (64 + 4096) / 16);
    assert_eq!(id.iorcsz, 1);
    assert_ne!(id.sgls & 3, 0, "SGLs supported");
    assert_eq!(id.maxcmd, 128);
    assert_eq!(id.mdts, 5, "128 KiB in 4 KiB pages");
    assert!(id.kas > 0);

    // Namespaces.
    let list = admin.identify(cns::ACTIVE_NAMESPACE_LIST, 0).data;
    assert_eq!(&list[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let ns = IdentifyNamespace::parse(&page(&admin.identify(cns::NAMESPACE, 1).data));
    assert_eq!(ns.nsze, MALLOC_MIB * 2048);
    assert_eq!(ns.block_size_bytes(), Some(512));
    let descs = admin.identify(cns::NAMESPACE_DESCRIPTOR_LIST, 1).data;
    assert_eq!(descs[0], 2, "NGUID first");
    let missing = admin.identify(cns::NAMESPACE, 9);
    assert_eq!(missing.cqe.status.sc, sc::INVALID_NAMESPACE_OR_FORMAT);

    // In-capsule write (4 KiB), read back.
    let small = pattern(4096, 1);
    let reply = io.write(1, 8, &small, 4096);
    assert!(reply.cqe.status.is_success(), "{}", reply.cqe.status);
    let back = io.read(1, 8, 8);
    assert!(back.cqe.status.is_success());
    assert_eq!(back.data, small);

    // Writes above the in-capsule size go through R2T / H2CData (in MAXH2CDATA pieces).
    for (slba, len, seed) in [
        (100u64, 65536usize, 2u8),
        (1000, 131072, 3),
        (4000, 8192, 4),
    ] {
        let data = pattern(len, seed);
        let reply = io.write(1, slba, &data, 4096);
        assert!(reply.cqe.status.is_success(), "{}", reply.cqe.status);
        let back = io.read(1, slba, len / BLOCK);
        assert_eq!(back.data, data, "{len} bytes at {slba}");
    }

    // Flush, Write Zeroes, Dataset Management (deallocate), out of range, bad namespace.
    let mut flush = Command::new(opc::FLUSH);
    flush.nsid = 1;
    assert!(io.command(flush, &[], 0, 0).cqe.status.is_success());
    let mut zeroes = Command::new(opc::WRITE_ZEROES);
    zeroes.nsid = 1;
    zeroes.cdw10 = 100;
    zeroes.cdw12 = 7;
    assert!(io.command(zeroes, &[], 0, 0).cqe.status.is_success());
    assert_eq!(io.read(1, 100, 8).data, vec![0u8; 4096]);
    let mut dsm = Command::new(opc::DATASET_MANAGEMENT);
    dsm.nsid = 1;
    dsm.cdw10 = 0; // one range
    dsm.cdw11 = 4; // deallocate
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&8u32.to_le_bytes());
    range[8..16].copy_from_slice(&1000u64.to_le_bytes());
    assert!(io.command(dsm, &range, 4096, 0).cqe.status.is_success());
    assert_eq!(io.read(1, 1000, 8).data, vec![0u8; 4096]);
    let beyond = io.read(1, MALLOC_MIB * 2048, 1);
    assert_eq!(beyond.cqe.status.sc, sc::LBA_OUT_OF_RANGE);
    let mut bad_ns = Command::new(opc::READ);
    bad_ns.nsid = 5;
    assert_eq!(
        io.command(bad_ns, &[], 0, 512).cqe.status.sc,
        sc::INVALID_NAMESPACE_OR_FORMAT
    );

    // Keep Alive and AER accepted (the AER is held, so nothing comes back for it).
    let keep_alive = Command::new(opc::KEEP_ALIVE);
    assert!(admin.command(keep_alive, &[], 0, 0).cqe.status.is_success());
    // SMART log.
    let mut smart = Command::new(opc::GET_LOG_PAGE);
    smart.cdw10 = u32::from(lid::SMART_HEALTH) | (127 << 16);
    let log = admin.command(smart, &[], 0, 512);
    assert!(log.cqe.status.is_success());
    assert_eq!(log.data.len(), 512);
    assert_eq!(tgt.target.controller_count(), 1);
}

#[test]
fn connect_identify_and_io_without_digests() {
    round_trip_io(NO_DIGESTS);
}

#[test]
fn connect_identify_and_io_with_digests() {
    round_trip_io(DIGESTS);
}

#[test]
fn discovery_log_lists_the_subsystem() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (mut disc, _) = Initiator::admin(tgt.addr, NO_DIGESTS, DISCOVERY_NQN, HOSTNQN, 0);
    let id = IdentifyController::parse(&page(&disc.identify(CNS_CONTROLLER, 0).data));
    assert_eq!(id.cntrltype, CNTRLTYPE_DISCOVERY);
    assert_eq!(id.subnqn, DISCOVERY_NQN);
    // nvme-cli's way: the header, then the page in pieces.
    let get = |disc: &mut Initiator, offset: u64, len: usize| {
        let mut cmd = Command::new(opc::GET_LOG_PAGE);
        let numd = (len / 4 - 1) as u32;
        cmd.cdw10 = u32::from(lid::DISCOVERY) | ((numd & 0xffff) << 16);
        cmd.cdw11 = numd >> 16;
        cmd.cdw12 = offset as u32;
        disc.command(cmd, &[], 0, len)
    };
    let header = get(&mut disc, 0, 1024);
    assert!(header.cqe.status.is_success());
    let numrec = u64::from_le_bytes(header.data[8..16].try_into().unwrap());
    assert_eq!(numrec, 1);
    let entry = get(&mut disc, 1024, 1024);
    let entry = DiscoveryLogEntry::parse(entry.data.as_slice().try_into().unwrap());
    assert_eq!(entry.trtype, TRTYPE_TCP);
    assert_eq!(entry.subtype, SUBTYPE_NVME);
    assert_eq!(entry.subnqn, NQN);
    assert_eq!(entry.traddr, "127.0.0.1");
    assert_eq!(entry.trsvcid, tgt.addr.port().to_string());
    // A discovery controller has no I/O queues.
    let mut io = Initiator::connect(tgt.addr, NO_DIGESTS);
    let cqe = io.fabrics_connect(1, 31, DISCOVERY_NQN, HOSTNQN, 1, 0);
    assert_eq!(cqe.status.sc, sc::CONNECT_INVALID_PARAMETERS);
}

#[test]
fn malformed_pdu_gets_a_termination_request_and_others_carry_on() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (_admin, mut io) = io_queue(&tgt, NO_DIGESTS);
    let data = pattern(4096, 9);
    assert!(io.write(1, 0, &data, 4096).cqe.status.is_success());

    // A capsule command whose HLEN is wrong.
    let mut bad = Initiator::connect(tgt.addr, NO_DIGESTS);
    let mut bytes = [0u8; 72];
    bytes[0] = 0x04;
    bytes[2] = 24;
    bytes[4..8].copy_from_slice(&72u32.to_le_bytes());
    bad.send_raw(&bytes);
    match bad.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), header) => {
            assert_eq!(term.fes, fes::INVALID_HEADER_FIELD);
            assert_eq!(term.fei, 2, "HLEN's offset");
            assert_eq!(&header[..8], &bytes[..8], "the offending header comes back");
        }
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    bad.expect_closed();

    // An unknown PDU type, before the ICReq.
    let mut early = Initiator::raw(tgt.addr, NO_DIGESTS);
    early.send_raw(&[0x0a, 0, 8, 0, 8, 0, 0, 0]);
    match early.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), _) => assert_eq!(term.fes, fes::INVALID_HEADER_FIELD),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    early.expect_closed();

    // In-capsule data beyond the negotiated size (4 KiB on an I/O queue).
    let (_admin2, mut big) = io_queue(&tgt, NO_DIGESTS);
    let mut cmd = Command::new(opc::WRITE);
    cmd.nsid = 1;
    cmd.cdw12 = 15;
    cmd.dptr = sgl_in_capsule(8192);
    big.send(&Pdu::CapsuleCmd(cmd), &pattern(8192, 1));
    match big.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), _) => assert_eq!(term.fes, fes::DATA_LIMIT_EXCEEDED),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    big.expect_closed();

    // H2CData for a transfer tag no R2T gave.
    let (_admin3, mut stray) = io_queue(&tgt, NO_DIGESTS);
    let header = DataHeader {
        cccid: 1,
        ttag: 5,
        datao: 0,
        datal: 512,
        last: true,
        success: false,
    };
    stray.send(&Pdu::H2cData(header), &[0; 512]);
    match stray.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), _) => assert_eq!(term.fes, fes::PDU_SEQUENCE_ERROR),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    stray.expect_closed();

    // The first connection never noticed.
    assert_eq!(io.read(1, 0, 8).data, data);
    let more = pattern(65536, 7);
    assert!(io.write(1, 64, &more, 4096).cqe.status.is_success());
    assert_eq!(io.read(1, 64, 128).data, more);
}

#[test]
fn digest_errors_terminate_the_connection() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (_admin, mut io) = io_queue(&tgt, DIGESTS);

    // A data digest that does not match the data (on a capsule's in-capsule data).
    let mut bad = Initiator::connect(tgt.addr, DIGESTS);
    let mut cmd = Command::new(opc::WRITE);
    cmd.nsid = 1;
    cmd.cid = 1;
    cmd.cdw12 = 0;
    cmd.dptr = sgl_in_capsule(512);
    let mut out = vec![0u8; 1024];
    let len = pdu::encode(
        &Pdu::CapsuleCmd(cmd),
        &[5; 512],
        &pdu::EncodeOptions {
            digests: DIGESTS,
            pda: 0,
        },
        &mut out,
    )
    .expect("encode");
    out[len - 1] ^= 0xff;
    bad.send_raw(&out[..len]);
    match bad.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), _) => assert_eq!(term.fes, fes::HEADER_DIGEST_ERROR),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    bad.expect_closed();

    // A header digest that does not match the header.
    let mut bad = Initiator::connect(tgt.addr, DIGESTS);
    let len = pdu::encode(
        &Pdu::CapsuleCmd(cmd),
        &[],
        &pdu::EncodeOptions {
            digests: DIGESTS,
            pda: 0,
        },
        &mut out,
    )
    .expect("encode");
    out[30] ^= 1;
    bad.send_raw(&out[..len]);
    match bad.recv().expect("C2HTermReq") {
        (Pdu::C2hTermReq(term), _) => assert_eq!(term.fes, fes::HEADER_DIGEST_ERROR),
        other => panic!("expected a C2HTermReq, got {other:?}"),
    }
    bad.expect_closed();

    let data = pattern(16384, 3);
    assert!(io.write(1, 0, &data, 4096).cqe.status.is_success());
    assert_eq!(io.read(1, 0, 32).data, data);
}

fn connect_refused(
    tgt: &Tgt,
    qid: u16,
    subnqn: &str,
    hostnqn: &str,
    cntlid: u16,
) -> pollux_nvme::spec::Completion {
    let mut init = Initiator::connect(tgt.addr, NO_DIGESTS);
    let cqe = init.fabrics_connect(qid, 31, subnqn, hostnqn, cntlid, 0);
    init.expect_closed();
    cqe
}

#[test]
fn connects_that_must_fail() {
    let allowed = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000000a";
    let tgt = Tgt::start(TcpTransportOptions::default(), &[allowed]);
    let (mut admin, cntlid) = Initiator::admin(tgt.addr, NO_DIGESTS, NQN, allowed, 0);

    // Unknown subsystem: Connect Invalid Parameters, IATTR 1 (data), IPO 256 (SUBNQN).
    let cqe = connect_refused(&tgt, 0, "nqn.2016-06.io.spdk:nope", allowed, CNTLID_DYNAMIC);
    assert_eq!(cqe.status.sct, StatusCodeType::CommandSpecific);
    assert_eq!(cqe.status.sc, sc::CONNECT_INVALID_PARAMETERS);
    assert_eq!(cqe.dw0, 1 | (256 << 16));

    // A host not on the allow list: Connect Invalid Host.
    let cqe = connect_refused(&tgt, 0, NQN, HOSTNQN, CNTLID_DYNAMIC);
    assert_eq!(cqe.status.sct, StatusCodeType::CommandSpecific);
    assert_eq!(cqe.status.sc, sc::CONNECT_INVALID_HOST);

    // A queue the controller does not have (one granted): IATTR 0, IPO 42 (QID).
    let mut features = Command::new(opc::SET_FEATURES);
    features.cdw10 = u32::from(fid::NUMBER_OF_QUEUES);
    features.cdw11 = 0;
    assert!(admin.command(features, &[], 0, 0).cqe.status.is_success());
    let cqe = connect_refused(&tgt, 2, NQN, allowed, cntlid);
    assert_eq!(cqe.status.sc, sc::CONNECT_INVALID_PARAMETERS);
    assert_eq!(cqe.dw0, 42 << 16);

    // A controller that does not exist: IATTR 1, IPO 16 (CNTLID).
    let cqe = connect_refused(&tgt, 1, NQN, allowed, cntlid.wrapping_add(100));
    assert_eq!(cqe.status.sc, sc::CONNECT_INVALID_PARAMETERS);
    assert_eq!(cqe.dw0, 1 | (16 << 16));

    // SQSIZE above the transport's maximum: IPO 44.
    let mut init = Initiator::connect(tgt.addr, NO_DIGESTS);
    let cqe = init.fabrics_connect(1, 4095, NQN, allowed, cntlid, 0);
    assert_eq!(cqe.dw0, 44 << 16);
    init.expect_closed();

    // A command other than Connect first: Command Sequence Error.
    let mut early = Initiator::connect(tgt.addr, NO_DIGESTS);
    let reply = early.identify(cns::CONTROLLER, 0);
    assert_eq!(reply.cqe.status.sc, sc::COMMAND_SEQUENCE_ERROR);
    early.expect_closed();

    // The allowed host's queue works.
    let mut io = Initiator::connect(tgt.addr, NO_DIGESTS);
    assert!(io
        .fabrics_connect(1, 31, NQN, allowed, cntlid, 0)
        .status
        .is_success());
    assert!(io.read(1, 0, 1).cqe.status.is_success());
}

#[test]
fn keep_alive_timeout_removes_the_controller() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (mut admin, cntlid) = Initiator::admin(tgt.addr, NO_DIGESTS, NQN, HOSTNQN, 1000);
    let mut io = Initiator::connect(tgt.addr, NO_DIGESTS);
    assert!(io
        .fabrics_connect(1, 31, NQN, HOSTNQN, cntlid, 0)
        .status
        .is_success());
    // Keep alives hold it.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let reply = admin.command(Command::new(opc::KEEP_ALIVE), &[], 0, 0);
        assert!(reply.cqe.status.is_success());
    }
    assert_eq!(tgt.target.controller_count(), 1);
    // Silence: both queues close within KATO plus the check period.
    let start = Instant::now();
    admin.expect_closed();
    io.expect_closed();
    assert!(start.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tgt.target.controller_count() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(tgt.target.controller_count(), 0);
}

#[test]
fn namespaces_and_subsystems_change_at_run_time() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let (mut admin, mut io) = io_queue(&tgt, NO_DIGESTS);
    pollux_bdev::modules::malloc::create(
        &tgt.registry,
        &tgt.dma,
        pollux_bdev::modules::malloc::MallocOptions::from_size_mib(Some("Malloc1".into()), 4, 512),
    )
    .expect("second bdev");
    assert_eq!(
        tgt.target
            .add_namespace(NQN, "Malloc1", None, None)
            .expect("ns"),
        2
    );
    let list = admin.identify(cns::ACTIVE_NAMESPACE_LIST, 0).data;
    assert_eq!(&list[..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
    let data = pattern(4096, 5);
    assert!(io.write(2, 0, &data, 4096).cqe.status.is_success());
    assert_eq!(io.read(2, 0, 8).data, data);
    // The claim keeps the bdev from other writers; removal releases it.
    assert!(tgt.registry.open("Malloc1", true, None).is_err());
    tgt.target.remove_namespace(NQN, 2).expect("remove");
    assert_eq!(
        io.read(2, 0, 8).cqe.status.sc,
        sc::INVALID_NAMESPACE_OR_FORMAT
    );
    tgt.target.delete_subsystem(NQN).expect("delete");
    admin.expect_closed();
    io.expect_closed();
}
