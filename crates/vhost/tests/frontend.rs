//! A raw vhost-user front-end of the test's own against a running target: it speaks the
//! protocol byte by byte (so it can send malformed messages), shares a file as guest memory
//! and writes ring entries into it directly (so it can write malformed descriptors). After
//! every hostile input the target must still be up and the next valid request must complete.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use pollux_bdev::modules::{delay, malloc};
use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig, AppHandle};
use pollux_vhost::{ControllerOptions, VhostTarget};
use pollux_virtio::blk::{
    RequestHeader, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use pollux_virtio::ring::{
    packed_avail_flags, PackedDesc, SplitDesc, UsedElem, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MEM_BYTES: u64 = 2 << 20;
const UVA: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x8100;
const INDIRECT: u64 = 0x9000;
const BUF: u64 = 0x10000;
const QSIZE: u16 = 16;
/// The write latency of the packed-rec controller's delay bdev.
const PACKED_WRITE_DELAY_MS: u64 = 600;

const VERSION_1: u64 = 1 << 32;
const RING_PACKED: u64 = 1 << 34;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const INFLIGHT_SHMFD: u64 = 0x1000;
const LOG_SHMFD: u64 = 0x2;
/// VHOST_F_LOG_ALL.
const LOG_ALL: u64 = 1 << 26;
/// MQ | REPLY_ACK | CONFIG | CONFIGURE_MEM_SLOTS.
const PROTOCOL: u64 = 0x1 | 0x8 | 0x200 | 0x8000;

struct Target {
    app: AppHandle,
    _target: Arc<VhostTarget>,
    reactor: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    _dma: Arc<DmaMemory>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.app.stop();
        if let Some(reactor) = self.reactor.take() {
            reactor.join().expect("reactor thread");
        }
        self._target.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_target(tag: &str) -> Target {
    let dir = std::env::temp_dir().join(format!("pollux-vhost-it-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    let registry = BdevRegistry::new();
    let dma = DmaMemory::new(DmaConfig {
        size_mib: 16,
        no_huge: true,
    })
    .expect("dma");
    for name in ["M0", "M1", "M2"] {
        malloc::create(
            &registry,
            &dma,
            malloc::MallocOptions::from_size_mib(Some(name.into()), 4, 512),
        )
        .expect("malloc");
    }
    let core = CpuMask::available().first().expect("a core");
    let app = App::new(AppConfig {
        name: "vhost-test".into(),
        cpumask: std::iter::once(core).collect(),
        handle_signals: false,
        ..AppConfig::default()
    })
    .expect("app");
    let handle = app.handle();
    let target = VhostTarget::new(handle.clone(), registry.clone(), &dir);
    let mut split = ControllerOptions::new("split", "M0");
    split.num_queues = Some(2);
    target
        .create_blk_controller(split)
        .expect("split controller");
    let mut packed = ControllerOptions::new("packed", "M1");
    packed.packed_ring = true;
    target
        .create_blk_controller(packed)
        .expect("packed controller");
    // Writes held PACKED_WRITE_DELAY_MS, so that they are in flight when a test wants them.
    delay::create(
        &registry,
        delay::DelayOptions {
            name: "D2".into(),
            uuid: None,
            base_bdev_name: "M2".into(),
            avg_read_latency_us: 0,
            p99_read_latency_us: 0,
            avg_write_latency_us: PACKED_WRITE_DELAY_MS * 1000,
            p99_write_latency_us: PACKED_WRITE_DELAY_MS * 1000,
        },
    )
    .expect("delay bdev");
    let mut recovery = ControllerOptions::new("packed-rec", "D2");
    recovery.packed_ring = true;
    recovery.packed_ring_recovery = true;
    target
        .create_blk_controller(recovery)
        .expect("packed recovery controller");
    let (tx, rx) = mpsc::channel();
    let reactor = std::thread::spawn(move || {
        app.run(move |_ctx| {
            let _ = tx.send(());
        })
        .expect("app run");
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("app started");
    Target {
        app: handle,
        _target: target,
        reactor: Some(reactor),
        dir,
        _dma: dma,
    }
}

fn guest_file(dir: &Path) -> File {
    let path = dir.join("guest-ram");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("guest file");
    std::fs::remove_file(&path).expect("unlink");
    file.set_len(MEM_BYTES).expect("size");
    file
}

/// The raw front-end.
struct Fe {
    sock: UnixStream,
    mem: File,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    // Packed driver state.
    next_slot: u16,
    wrap: bool,
    /// Protocol features acked on top of PROTOCOL (and INFLIGHT_SHMFD with a region).
    extra_protocol: u64,
    /// Ask the target for an inflight region (GET_INFLIGHT_FD) and hand it back
    /// (SET_INFLIGHT_FD), as QEMU does at first start; the region lands here.
    get_inflight: bool,
    inflight: Option<(File, u64)>,
}

impl Fe {
    fn connect(path: &Path, mem: File) -> Fe {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Fe {
            sock,
            mem,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick"),
            call: EventFd::new(EFD_NONBLOCK).expect("call"),
            avail_idx: 0,
            used_seen: 0,
            next_slot: 0,
            wrap: true,
            extra_protocol: 0,
            get_inflight: false,
            inflight: None,
        }
    }

    /// Whether the target closed the connection (end of stream within the read timeout).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.sock.read(&mut byte), Ok(0))
    }

    fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[i32]) {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&(flags | 1).to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        self.sock.send_with_fds(&[&msg[..]], fds).expect("send");
    }

    fn reply(&mut self, request: u32) -> Vec<u8> {
        let mut header = [0u8; 12];
        self.sock.read_exact(&mut header).expect("reply header");
        let code = u32::from_le_bytes(header[0..4].try_into().expect("4"));
        assert_eq!(code, request, "reply to the request sent");
        let size = u32::from_le_bytes(header[8..12].try_into().expect("4"));
        let mut body = vec![0u8; size as usize];
        self.sock.read_exact(&mut body).expect("reply body");
        body
    }

    fn get_u64(&mut self, request: u32) -> u64 {
        self.send(request, 0, &[], &[]);
        let body = self.reply(request);
        u64::from_le_bytes(body[..8].try_into().expect("u64 reply"))
    }

    /// Sends with NEED_REPLY and returns the ack value (0: success).
    fn ack(&mut self, request: u32, body: &[u8], fds: &[i32]) -> u64 {
        self.send(request, 0x8, body, fds);
        let body = self.reply(request);
        u64::from_le_bytes(body[..8].try_into().expect("ack"))
    }

    fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for (gpa, size, uva, offset) in regions {
            for v in [gpa, size, uva, offset] {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
        body
    }

    fn setup(&mut self, packed: bool) {
        self.setup_with(packed, None);
    }

    /// The start-up sequence QEMU sends; `inflight`: a region handed over with
    /// SET_INFLIGHT_FD (as after a back-end restart).
    fn setup_with(&mut self, packed: bool, inflight: Option<(&File, u64)>) {
        let features = self.get_u64(1);
        assert_ne!(features & VERSION_1, 0);
        let protocol = self.get_u64(15);
        assert_eq!(protocol & PROTOCOL, PROTOCOL);
        let mut acked = VERSION_1 | PROTOCOL_FEATURES;
        if packed {
            assert_ne!(features & RING_PACKED, 0, "packed offered");
            acked |= RING_PACKED;
        }
        self.send(2, 0, &acked.to_le_bytes(), &[]);
        assert_eq!(protocol & self.extra_protocol, self.extra_protocol);
        let protocol_acked = if inflight.is_some() || self.get_inflight {
            assert_ne!(protocol & INFLIGHT_SHMFD, 0, "inflight offered");
            PROTOCOL | INFLIGHT_SHMFD
        } else {
            PROTOCOL
        } | self.extra_protocol;
        self.send(16, 0, &protocol_acked.to_le_bytes(), &[]);
        assert_eq!(self.ack(3, &[], &[]), 0, "SET_OWNER");
        if self.get_inflight && inflight.is_none() {
            let mut body = Vec::new();
            body.extend_from_slice(&[0u8; 16]);
            body.extend_from_slice(&1u16.to_le_bytes());
            body.extend_from_slice(&QSIZE.to_le_bytes());
            body.extend_from_slice(&[0u8; 4]);
            self.send(31, 0, &body, &[]);
            let mut reply = [0u8; 12 + 24];
            let (n, file) = self.sock.recv_with_fd(&mut reply).expect("GET_INFLIGHT_FD");
            assert_eq!(n, reply.len(), "GET_INFLIGHT_FD reply");
            let size = u64::from_le_bytes(reply[12..20].try_into().expect("8"));
            self.inflight = Some((file.expect("an inflight fd"), size));
        }
        let got = self
            .inflight
            .as_ref()
            .map(|(f, size)| (f.try_clone().expect("fd"), *size));
        let inflight = inflight.or(got.as_ref().map(|(f, size)| (f, *size)));
        if let Some((file, size)) = inflight {
            let mut body = Vec::new();
            body.extend_from_slice(&size.to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            body.extend_from_slice(&1u16.to_le_bytes());
            body.extend_from_slice(&QSIZE.to_le_bytes());
            body.extend_from_slice(&[0u8; 4]);
            assert_eq!(
                self.ack(32, &body, &[file.as_raw_fd()]),
                0,
                "SET_INFLIGHT_FD"
            );
        }
        let queues = self.get_u64(17);
        assert!(queues >= 1);
        let table = Self::mem_table(&[(0, MEM_BYTES, UVA, 0)]);
        let fd = self.mem.as_raw_fd();
        assert_eq!(self.ack(5, &table, &[fd]), 0, "SET_MEM_TABLE");
        // Pipelined as QEMU sends them: NUM, BASE, ADDR (no descriptors) then KICK (one)
        // before any reply is read, so the target must tell whose descriptors are whose.
        let mut num = 0u32.to_le_bytes().to_vec();
        num.extend_from_slice(&u32::from(QSIZE).to_le_bytes());
        let base = [0u8; 8];
        let mut addr = Vec::new();
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [UVA + DESC, UVA + USED, UVA + AVAIL, 0u64] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        let kick = self.kick.as_raw_fd();
        self.send(8, 0x8, &num, &[]);
        self.send(10, 0x8, &base, &[]);
        self.send(9, 0x8, &addr, &[]);
        self.send(12, 0x8, &0u64.to_le_bytes(), &[kick]);
        for request in [8, 10, 9, 12] {
            let reply = self.reply(request);
            assert_eq!(
                reply,
                0u64.to_le_bytes().to_vec(),
                "request {request} acked"
            );
        }
        let call = self.call.as_raw_fd();
        assert_eq!(
            self.ack(13, &0u64.to_le_bytes(), &[call]),
            0,
            "SET_VRING_CALL"
        );
        self.vring_state(18, 0, 1);
    }

    fn vring_state(&mut self, request: u32, index: u32, num: u32) {
        let mut body = index.to_le_bytes().to_vec();
        body.extend_from_slice(&num.to_le_bytes());
        assert_eq!(self.ack(request, &body, &[]), 0, "vring message {request}");
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_all_at(bytes, gpa).expect("guest write");
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_exact_at(&mut buf, gpa).expect("guest read");
        buf
    }

    fn wait(&self, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "the target did not complete the request"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Publishes a split chain (descriptors 0..n, head 0) and waits for its used entry.
    fn split_request(&mut self, descs: &[SplitDesc]) -> (u8, u32) {
        self.put(STATUS, &[0xff]);
        for (i, d) in descs.iter().enumerate() {
            self.put(DESC + 16 * i as u64, &d.to_le_bytes());
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        self.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        let want = self.used_seen.wrapping_add(1);
        self.wait(|| u16::from_le_bytes(self.get(USED + 2, 2).try_into().expect("2")) == want);
        let elem = UsedElem::from_le_bytes(
            self.get(USED + 4 + 8 * u64::from(self.used_seen % QSIZE), 8)
                .try_into()
                .expect("8"),
        );
        self.used_seen = want;
        assert_eq!(elem.id, 0);
        (self.get(STATUS, 1)[0], elem.len)
    }

    /// Publishes a packed chain at the driver's position and waits for the used descriptor
    /// there. `id` goes in every descriptor.
    fn packed_request(
        &mut self,
        descs: &[(u64, u32, u16)],
        id: u16,
        expect_used: bool,
    ) -> Option<(u8, u32)> {
        self.put(STATUS, &[0xff]);
        let start = self.next_slot;
        let start_wrap = self.wrap;
        let mut first_flags = 0;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let mut f = *flags | packed_avail_flags(self.wrap);
            if i + 1 < descs.len() {
                f |= VIRTQ_DESC_F_NEXT;
            }
            let d = PackedDesc {
                addr: *addr,
                len: *len,
                id,
                flags: f,
            };
            let mut bytes = d.to_le_bytes();
            if i == 0 {
                first_flags = f;
                bytes[14..16].copy_from_slice(&0u16.to_le_bytes());
                // Flags of the first descriptor go last, after the rest of the chain.
                bytes[14..16].copy_from_slice(&(packed_avail_flags(!self.wrap)).to_le_bytes());
            }
            self.put(DESC + 16 * u64::from(self.next_slot), &bytes);
            self.next_slot += 1;
            if self.next_slot == QSIZE {
                self.next_slot = 0;
                self.wrap = !self.wrap;
            }
        }
        self.put(
            DESC + 16 * u64::from(start) + 14,
            &first_flags.to_le_bytes(),
        );
        if !expect_used {
            std::thread::sleep(Duration::from_millis(50));
            return None;
        }
        self.wait(|| {
            let d = PackedDesc::from_le_bytes(
                self.get(DESC + 16 * u64::from(start), 16)
                    .try_into()
                    .expect("16"),
            );
            d.is_used(start_wrap)
        });
        let d = PackedDesc::from_le_bytes(
            self.get(DESC + 16 * u64::from(start), 16)
                .try_into()
                .expect("16"),
        );
        assert_eq!(d.id, id);
        Some((self.get(STATUS, 1)[0], d.len))
    }
}

fn hdr(request_type: u32, sector: u64) -> Vec<u8> {
    RequestHeader {
        request_type,
        reserved: 0,
        sector,
    }
    .to_le_bytes()
    .to_vec()
}

fn chain(parts: &[(u64, u32, u16)]) -> Vec<SplitDesc> {
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, (addr, len, flags))| SplitDesc {
            addr: *addr,
            len: *len,
            flags: *flags | if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 },
            next: if i + 1 < n { i as u16 + 1 } else { 0 },
        })
        .collect()
}

const W: u16 = VIRTQ_DESC_F_WRITE;

fn read_req(fe: &mut Fe, sector: u64) -> (u8, u32) {
    fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, sector));
    fe.split_request(&chain(&[
        (HDR, 16, 0),
        (BUF + 0x8000, 4096, W),
        (STATUS, 1, W),
    ]))
}

fn assert_valid_read_completes(fe: &mut Fe) {
    assert_eq!(
        read_req(fe, 8),
        (VIRTIO_BLK_S_OK, 4097),
        "a valid request completes"
    );
}

#[test]
fn split_ring_survives_hostile_descriptors_and_messages() {
    let target = start_target("split");
    let socket = target.dir.join("split");
    let mut fe = Fe::connect(&socket, guest_file(&target.dir));
    fe.setup(false);

    // Write a pattern, read it back.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    fe.put(BUF, &pattern);
    fe.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 8));
    let write = chain(&[
        (HDR, 16, 0),
        (BUF, 2048, 0),
        (BUF + 2048, 2048, 0),
        (STATUS, 1, W),
    ]);
    assert_eq!(fe.split_request(&write), (VIRTIO_BLK_S_OK, 1));
    assert_valid_read_completes(&mut fe);
    assert_eq!(fe.get(BUF + 0x8000, 4096), pattern, "zero-copy round trip");
    assert!(fe.call.read().is_ok(), "the guest was notified");

    // A loop: 0 -> 1 -> 0.
    let mut looped = chain(&[(HDR, 16, 0), (BUF, 512, W)]);
    looped[1].flags |= VIRTQ_DESC_F_NEXT;
    looped[1].next = 0;
    assert_eq!(
        fe.split_request(&looped),
        (0xff, 0),
        "loop: used with length 0"
    );
    assert_valid_read_completes(&mut fe);
    // An address beyond guest memory, a huge length.
    fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    let beyond = chain(&[(HDR, 16, 0), (MEM_BYTES + 0x1000, 512, W), (STATUS, 1, W)]);
    assert_eq!(fe.split_request(&beyond).0, VIRTIO_BLK_S_IOERR);
    let huge = chain(&[(HDR, 16, 0), (BUF, u32::MAX, W), (STATUS, 1, W)]);
    assert_eq!(fe.split_request(&huge).0, VIRTIO_BLK_S_IOERR);
    let wrapping = chain(&[(HDR, 16, 0), (u64::MAX - 100, 512, W), (STATUS, 1, W)]);
    assert_eq!(fe.split_request(&wrapping).0, VIRTIO_BLK_S_IOERR);
    assert_valid_read_completes(&mut fe);
    // A nested indirect table.
    let inner = SplitDesc {
        addr: INDIRECT,
        len: 16,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: 0,
    };
    fe.put(INDIRECT, &inner.to_le_bytes());
    let nested = [SplitDesc {
        addr: INDIRECT,
        len: 16,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: 0,
    }];
    assert_eq!(fe.split_request(&nested), (0xff, 0));
    // A header of the wrong size, a status of the wrong direction.
    let short = chain(&[(HDR, 8, 0), (BUF, 512, W), (STATUS, 1, W)]);
    assert_eq!(fe.split_request(&short).0, VIRTIO_BLK_S_IOERR);
    let ro_status = chain(&[(HDR, 16, 0), (BUF, 512, W), (STATUS, 1, 0)]);
    assert_eq!(fe.split_request(&ro_status), (0xff, 0));
    // A valid indirect request.
    fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 8));
    for (i, d) in chain(&[(HDR, 16, 0), (BUF + 0x8000, 4096, W), (STATUS, 1, W)])
        .iter()
        .enumerate()
    {
        fe.put(INDIRECT + 16 * i as u64, &d.to_le_bytes());
    }
    let indirect = [SplitDesc {
        addr: INDIRECT,
        len: 48,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: 0,
    }];
    assert_eq!(fe.split_request(&indirect), (VIRTIO_BLK_S_OK, 4097));
    // I/O beyond the disk's end (4 MiB = 8192 sectors).
    assert_eq!(read_req(&mut fe, 8192 - 4).0, VIRTIO_BLK_S_IOERR);
    assert_valid_read_completes(&mut fe);

    // Malformed messages that keep the stream in step get an error reply.
    let fd = fe.mem.as_raw_fd();
    let overlapping =
        Fe::mem_table(&[(0, MEM_BYTES, UVA, 0), (0x1000, 0x1000, UVA + MEM_BYTES, 0)]);
    assert_ne!(
        fe.ack(5, &overlapping, &[fd, fd]),
        0,
        "overlapping regions refused"
    );
    let two_regions = Fe::mem_table(&[
        (0, MEM_BYTES, UVA, 0),
        (MEM_BYTES, 0x1000, UVA + MEM_BYTES, 0),
    ]);
    assert_ne!(fe.ack(5, &two_regions, &[fd]), 0, "wrong fd count refused");
    assert_ne!(fe.ack(99, &[1, 2, 3], &[]), 0, "unknown request refused");
    let mut num = 0u32.to_le_bytes().to_vec();
    num.extend_from_slice(&u32::from(QSIZE).to_le_bytes());
    assert_ne!(
        fe.ack(8, &num, &[fd]),
        0,
        "a descriptor on a request that takes none"
    );
    assert_ne!(
        fe.ack(8, &[0, 0, 0, 0, 0, 0, 1, 0], &[]),
        0,
        "ring size refused while running"
    );
    assert_eq!(fe.ack(39, &0xfu64.to_le_bytes(), &[]), 0, "SET_STATUS");
    assert_eq!(fe.get_u64(40), 0xf, "GET_STATUS");
    let mut config_req = Vec::new();
    for v in [0u32, 60, 0] {
        config_req.extend_from_slice(&v.to_le_bytes());
    }
    config_req.extend_from_slice(&[0u8; 60]);
    fe.send(24, 0, &config_req, &[]);
    let config = fe.reply(24);
    assert_eq!(config.len(), 12 + 60);
    assert_eq!(
        u64::from_le_bytes(config[12..20].try_into().expect("8")),
        8192,
        "capacity"
    );
    assert_valid_read_completes(&mut fe);

    // Interrupt coalescing at run time: reported as SPDK reports it; requests still complete.
    target
        ._target
        .set_coalescing("split", 50, 1000)
        .expect("coalescing");
    let info = target._target.controller("split").expect("info");
    assert_eq!((info.delay_base_us, info.iops_threshold), (50, 1000));
    assert_eq!(info.to_json()["delay_base_us"], 50);
    assert_eq!(info.to_json()["backend_specific"]["block"]["bdev"], "M0");
    let saved = target._target.save_config();
    assert!(saved["config"]
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["method"] == "vhost_controller_set_coalescing"));
    assert!(target._target.set_coalescing("split", 50, 0).is_err());
    assert!(target._target.set_coalescing("nope", 0, 0).is_err());
    for _ in 0..4 {
        assert_valid_read_completes(&mut fe);
    }
    target
        ._target
        .set_coalescing("split", 0, 60000)
        .expect("off");

    // GET_VRING_BASE stops the ring and reports how far it got.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&0u32.to_le_bytes());
    fe.send(11, 0, &body, &[]);
    let base = fe.reply(11);
    assert_eq!(
        u32::from_le_bytes(base[4..8].try_into().expect("4")),
        u32::from(fe.avail_idx)
    );

    // Framing errors close the connection; the target serves the next one.
    let oversized = [0u8; 16];
    fe.send(8, 0x8, &oversized, &[]);
    let mut header = Vec::new();
    header.extend_from_slice(&8u32.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&0x10000u32.to_le_bytes());
    (&fe.sock).write_all(&header).expect("oversized header");
    let mut rest = Vec::new();
    match fe.sock.read_to_end(&mut rest) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the target should close the connection, got {other:?}"),
    }
    drop(fe);
    for broken in [true, false] {
        let mut fe = Fe::connect(&socket, guest_file(&target.dir));
        if broken {
            // Truncated: a header announcing 8 bytes, 3 sent, then the socket closes.
            let mut msg = Vec::new();
            msg.extend_from_slice(&8u32.to_le_bytes());
            msg.extend_from_slice(&1u32.to_le_bytes());
            msg.extend_from_slice(&8u32.to_le_bytes());
            msg.extend_from_slice(&[1, 2, 3]);
            (&fe.sock).write_all(&msg).expect("truncated");
            continue;
        }
        fe.setup(false);
        assert_valid_read_completes(&mut fe);
    }
}

#[test]
fn packed_ring_survives_an_out_of_range_id() {
    let target = start_target("packed");
    let socket = target.dir.join("packed");
    let mut fe = Fe::connect(&socket, guest_file(&target.dir));
    fe.setup(true);
    fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
    let read = [(HDR, 16, 0), (BUF, 4096, W), (STATUS, 1, W)];
    assert_eq!(
        fe.packed_request(&read, 3, true),
        Some((VIRTIO_BLK_S_OK, 4097))
    );
    assert_eq!(
        fe.packed_request(&read, 500, false),
        None,
        "id out of range: dropped"
    );
    // The next valid request completes; its used descriptor goes where the device's used
    // position is (after the first request's three slots).
    let start = fe.next_slot;
    fe.put(STATUS, &[0xff]);
    let _ = fe.packed_request(&read, 4, false);
    fe.wait(|| {
        let d = PackedDesc::from_le_bytes(fe.get(DESC + 16 * 3, 16).try_into().expect("16"));
        d.is_used(true) && d.id == 4
    });
    assert_eq!(fe.get(STATUS, 1)[0], VIRTIO_BLK_S_OK);
    assert!(start > 3);
}

#[test]
fn reconnect_resubmits_the_requests_left_in_flight() {
    let target = start_target("inflight");
    let socket = target.dir.join("split");
    let mem = guest_file(&target.dir);
    // Two reads a previous back-end took (heads 3 then 0) and never completed.
    let chains = [(3u16, 0x8200u64, 0x8300u64), (0, 0x8400, 0x8500)];
    for (head, hdr_gpa, status_gpa) in chains {
        mem.write_all_at(&hdr(VIRTIO_BLK_T_IN, 8), hdr_gpa)
            .expect("hdr");
        mem.write_all_at(&[0xff], status_gpa).expect("status");
        let descs = [
            SplitDesc {
                addr: hdr_gpa,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: head + 1,
            },
            SplitDesc {
                addr: BUF + u64::from(head) * 0x1000,
                len: 4096,
                flags: W | VIRTQ_DESC_F_NEXT,
                next: head + 2,
            },
            SplitDesc {
                addr: status_gpa,
                len: 1,
                flags: W,
                next: 0,
            },
        ];
        for (i, d) in descs.iter().enumerate() {
            mem.write_all_at(&d.to_le_bytes(), DESC + 16 * (u64::from(head) + i as u64))
                .expect("desc");
        }
    }
    mem.write_all_at(&3u16.to_le_bytes(), AVAIL + 4)
        .expect("avail[0]");
    mem.write_all_at(&0u16.to_le_bytes(), AVAIL + 6)
        .expect("avail[1]");
    mem.write_all_at(&2u16.to_le_bytes(), AVAIL + 2)
        .expect("avail idx");
    // The inflight region as the dead back-end left it.
    let inflight = guest_file(&target.dir);
    let region_bytes = 4096u64;
    inflight.set_len(region_bytes).expect("size");
    inflight
        .write_all_at(&1u16.to_le_bytes(), 8)
        .expect("version");
    inflight
        .write_all_at(&QSIZE.to_le_bytes(), 10)
        .expect("desc_num");
    for (head, counter) in [(3u64, 5u64), (0, 6)] {
        let mut entry = [0u8; 16];
        entry[0] = 1;
        entry[8..16].copy_from_slice(&counter.to_le_bytes());
        inflight
            .write_all_at(&entry, 16 + 16 * head)
            .expect("desc state");
    }
    let mut fe = Fe::connect(&socket, mem);
    fe.setup_with(false, Some((&inflight, region_bytes)));
    fe.wait(|| u16::from_le_bytes(fe.get(USED + 2, 2).try_into().expect("2")) == 2);
    let first = UsedElem::from_le_bytes(fe.get(USED + 4, 8).try_into().expect("8"));
    let second = UsedElem::from_le_bytes(fe.get(USED + 12, 8).try_into().expect("8"));
    assert_eq!((first.id, second.id), (3, 0), "resubmitted oldest first");
    assert_eq!((first.len, second.len), (4097, 4097));
    assert_eq!(fe.get(0x8300, 1)[0], VIRTIO_BLK_S_OK);
    assert_eq!(fe.get(0x8500, 1)[0], VIRTIO_BLK_S_OK);
    let mut state = [0u8; 2];
    inflight.read_exact_at(&mut state, 14).expect("used_idx");
    assert_eq!(
        u16::from_le_bytes(state),
        2,
        "the region follows the used ring"
    );
    let mut flag = [0u8; 1];
    inflight
        .read_exact_at(&mut flag, 16 + 16 * 3)
        .expect("flag");
    assert_eq!(flag[0], 0, "completed requests are no longer in flight");
    // The ring goes on from where the previous back-end stopped.
    fe.avail_idx = 2;
    fe.used_seen = 2;
    assert_valid_read_completes(&mut fe);
}

/// The packed descriptor at ring slot `slot`.
fn ring_slot(fe: &Fe, slot: u16) -> PackedDesc {
    PackedDesc::from_le_bytes(
        fe.get(DESC + 16 * u64::from(slot), 16)
            .try_into()
            .expect("16"),
    )
}

/// A packed ring across a back-end restart, as `kill -9` leaves it: reads A and D completed
/// (D's used descriptor overwrote the ring slot of B, still in flight), writes B and C in
/// flight. The state at that moment (ring and inflight region) is copied, the target is let
/// go (it finishes B and C), the copies are put back, and a front-end reconnects with the same
/// region and a stale SET_VRING_BASE (0, what QEMU sends for a packed ring after the back-end
/// died). The target must resubmit B and C from the region's copies, exactly once each, at the
/// positions the region recorded, and never A or D again.
#[test]
fn packed_reconnect_resubmits_from_the_inflight_copies() {
    let target = start_target("inflight-packed");
    let socket = target.dir.join("packed-rec");
    let mem = guest_file(&target.dir);
    let mut fe = Fe::connect(&socket, mem.try_clone().expect("mem"));
    fe.get_inflight = true;
    fe.setup(true);
    let (region, region_bytes) = fe.inflight.take().expect("GET_INFLIGHT_FD answered");
    assert!(
        region_bytes >= 32 + 32 * u64::from(QSIZE),
        "sized for the packed layout"
    );
    // Request r: (header, data, status) addresses, sector, write.
    let req = |n: u64, sector: u64, write: bool| {
        let hdr_gpa = 0x8200 + 0x40 * n;
        let status_gpa = hdr_gpa + 0x20;
        let data = BUF + 0x1000 * n;
        let t = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        mem.write_all_at(&hdr(t, sector), hdr_gpa).expect("hdr");
        mem.write_all_at(&[0xff], status_gpa).expect("status");
        let data_flags = if write { 0 } else { W };
        (
            [
                (hdr_gpa, 16, 0),
                (data, 4096, data_flags),
                (status_gpa, 1, W),
            ],
            status_gpa,
            data,
        )
    };
    // A: read (slots 0-2), completes at once.
    let (a, a_status, _) = req(0, 0, false);
    let (_, used_len) = fe.packed_request(&a, 7, true).expect("A used");
    assert_eq!((fe.get(a_status, 1)[0], used_len), (VIRTIO_BLK_S_OK, 4097));
    // B, C: writes (slots 3-5, 6-8), held by the delay bdev.
    let (b, b_status, b_data) = req(1, 16, true);
    let (c, c_status, c_data) = req(2, 32, true);
    mem.write_all_at(&[0xb1; 4096], b_data).expect("B data");
    mem.write_all_at(&[0xc1; 4096], c_data).expect("C data");
    let _ = fe.packed_request(&b, 3, false);
    let _ = fe.packed_request(&c, 9, false);
    // D: read (slots 9-11) completes first; its used descriptor goes to slot 3, B's.
    let (d, _, _) = req(3, 0, false);
    let _ = fe.packed_request(&d, 12, false);
    fe.wait(|| {
        let used = ring_slot(&fe, 3);
        used.is_used(true) && used.id == 12
    });
    assert_eq!(fe.get(b_status, 1)[0], 0xff, "B still in flight");
    // The state a SIGKILL would leave now.
    let ring_bytes = fe.get(DESC, 16 * usize::from(QSIZE));
    let mut region_copy = vec![0u8; region_bytes as usize];
    region.read_exact_at(&mut region_copy, 0).expect("region");
    drop(fe);
    // The target finishes B and C before it serves anyone else; then the copies go back.
    std::thread::sleep(Duration::from_millis(3 * PACKED_WRITE_DELAY_MS));
    mem.write_all_at(&ring_bytes, DESC).expect("ring back");
    region.write_all_at(&region_copy, 0).expect("region back");
    for status in [b_status, c_status] {
        mem.write_all_at(&[0xff], status).expect("status");
    }
    // New data in B and C's buffers: what reaches the disk says which buffers were used.
    mem.write_all_at(&[0xb2; 4096], b_data).expect("B data");
    mem.write_all_at(&[0xc2; 4096], c_data).expect("C data");

    let mut fe = Fe::connect(&socket, mem.try_clone().expect("mem"));
    fe.setup_with(true, Some((&region, region_bytes)));
    // Used positions go on from 6 (after A and D): B and C land at slots 6 and 9.
    fe.wait(|| {
        let (x, y) = (ring_slot(&fe, 6), ring_slot(&fe, 9));
        x.is_used(true) && y.is_used(true)
    });
    let mut ids = [ring_slot(&fe, 6).id, ring_slot(&fe, 9).id];
    ids.sort_unstable();
    assert_eq!(ids, [3, 9], "B and C resubmitted");
    assert_eq!(fe.get(b_status, 1)[0], VIRTIO_BLK_S_OK);
    assert_eq!(fe.get(c_status, 1)[0], VIRTIO_BLK_S_OK);
    // Nothing else completes: A and D are not repeated.
    std::thread::sleep(Duration::from_millis(2 * PACKED_WRITE_DELAY_MS));
    assert!(
        !ring_slot(&fe, 12).is_used(true),
        "no third completion (A or D again)"
    );
    // The ring goes on at slot 12: reads of sectors 16 and 32 see B and C's new data.
    fe.next_slot = 12;
    fe.wrap = true;
    for (sector, byte) in [(16, 0xb2u8), (32, 0xc2)] {
        let (e, _, e_data) = req(4, sector, false);
        let start = fe.next_slot;
        let _ = fe.packed_request(&e, 5, false);
        fe.wait(|| {
            let used = ring_slot(&fe, start);
            // In order now: each used descriptor at its chain's first slot, both in lap 1.
            used.is_used(true) && used.id == 5
        });
        assert_eq!(fe.get(e_data, 4096), vec![byte; 4096], "sector {sector}");
    }
    // The region recorded the used position after all of it: slot 2 of the next lap.
    let mut state = [0u8; 6];
    region.read_exact_at(&mut state, 16).expect("positions");
    assert_eq!(u16::from_le_bytes([state[0], state[1]]), 2, "used_idx");
    assert_eq!(u16::from_le_bytes([state[2], state[3]]), 2, "old_used_idx");
    assert_eq!((state[4], state[5]), (0, 0), "wrap counters flipped");
}

/// SET_LOG_BASE's body: mmap_size, mmap_offset.
fn log_base(size: u64, offset: u64) -> Vec<u8> {
    let mut body = size.to_le_bytes().to_vec();
    body.extend_from_slice(&offset.to_le_bytes());
    body
}

fn log_bits(log: &File) -> Vec<u8> {
    let mut bits = vec![0u8; (MEM_BYTES / 4096 / 8) as usize];
    log.read_exact_at(&mut bits, 0).expect("log read");
    bits
}

fn dirty(bits: &[u8], gpa: u64) -> bool {
    let page = gpa / 4096;
    bits[(page / 8) as usize] & (1 << (page % 8)) != 0
}

/// Live migration's dirty log, as QEMU drives it: SET_LOG_BASE with a memfd, then
/// VHOST_F_LOG_ALL on the running ring. Every page the target writes is marked (the read's
/// data buffer, the status byte, the used ring or, packed, the descriptor ring), nothing
/// else is, and nothing is marked once logging is off again.
fn dirty_log_marks_what_the_target_writes(packed: bool) {
    let target = start_target(if packed { "log-packed" } else { "log-split" });
    let socket = target.dir.join(if packed { "packed" } else { "split" });
    let mut fe = Fe::connect(&socket, guest_file(&target.dir));
    fe.extra_protocol = LOG_SHMFD;
    fe.setup(packed);
    let features = fe.get_u64(1);
    assert_ne!(features & LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
    let log = guest_file(&target.dir);
    log.set_len(4096).expect("log size");
    let log_bytes = MEM_BYTES / 4096 / 8;
    fe.send(6, 0, &log_base(log_bytes, 0), &[log.as_raw_fd()]);
    assert_eq!(fe.reply(6), log_base(log_bytes, 0), "SET_LOG_BASE echoed");
    let mut acked = VERSION_1 | PROTOCOL_FEATURES;
    if packed {
        acked |= RING_PACKED;
    }
    assert_eq!(
        fe.ack(2, &(acked | LOG_ALL).to_le_bytes(), &[]),
        0,
        "SET_FEATURES with LOG_ALL"
    );
    let read_buf = BUF + 0x8000;
    let write_buf = BUF + 0x20000;
    let (status, used_len) = if packed {
        fe.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
        fe.packed_request(
            &[(HDR, 16, 0), (write_buf, 4096, 0), (STATUS, 1, W)],
            1,
            true,
        )
        .expect("write used");
        fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        fe.packed_request(
            &[(HDR, 16, 0), (read_buf, 8192, W), (STATUS, 1, W)],
            2,
            true,
        )
        .expect("read used")
    } else {
        fe.put(HDR, &hdr(VIRTIO_BLK_T_OUT, 0));
        fe.split_request(&chain(&[
            (HDR, 16, 0),
            (write_buf, 4096, 0),
            (STATUS, 1, W),
        ]));
        fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        fe.split_request(&chain(&[(HDR, 16, 0), (read_buf, 8192, W), (STATUS, 1, W)]))
    };
    assert_eq!((status, used_len), (VIRTIO_BLK_S_OK, 8193));
    let bits = log_bits(&log);
    let ring_written = if packed { DESC } else { USED };
    for (gpa, what) in [
        (read_buf, "read buffer, first page"),
        (read_buf + 4096, "read buffer, second page"),
        (STATUS, "status byte"),
        (ring_written, "used ring"),
    ] {
        assert!(dirty(&bits, gpa), "{what} ({gpa:#x}) logged");
    }
    for (gpa, what) in [
        (write_buf, "write buffer"),
        (BUF + 0x40000, "untouched page"),
    ] {
        assert!(!dirty(&bits, gpa), "{what} ({gpa:#x}) not logged");
    }
    if !packed {
        assert!(!dirty(&bits, AVAIL), "the avail ring is the driver's");
    }
    let marked: u32 = bits.iter().map(|b| b.count_ones()).sum();
    assert!(marked <= 5, "only the pages written are marked ({marked})");
    let mut rest = vec![0u8; 4096 - log_bytes as usize];
    log.read_exact_at(&mut rest, log_bytes).expect("rest");
    assert!(rest.iter().all(|b| *b == 0), "nothing written past the log");

    // Logging off: nothing more is marked.
    assert_eq!(
        fe.ack(2, &acked.to_le_bytes(), &[]),
        0,
        "SET_FEATURES without LOG_ALL"
    );
    log.write_all_at(&vec![0u8; log_bytes as usize], 0)
        .expect("clear");
    if packed {
        fe.put(HDR, &hdr(VIRTIO_BLK_T_IN, 0));
        fe.packed_request(
            &[(HDR, 16, 0), (read_buf, 4096, W), (STATUS, 1, W)],
            3,
            true,
        )
        .expect("read used");
    } else {
        assert_valid_read_completes(&mut fe);
    }
    assert!(
        log_bits(&log).iter().all(|b| *b == 0),
        "nothing logged while off"
    );
}

#[test]
fn dirty_log_marks_what_the_target_writes_split() {
    dirty_log_marks_what_the_target_writes(false);
}

#[test]
fn dirty_log_marks_what_the_target_writes_packed() {
    dirty_log_marks_what_the_target_writes(true);
}

/// A log region the target cannot keep is refused by closing the connection (SET_LOG_BASE
/// has no error reply, and an echo would let a migration go on untracked); the target goes
/// on serving the next front-end. Without LOG_SHMFD the message is refused and the
/// connection goes on.
#[test]
fn bad_log_regions_are_refused() {
    let target = start_target("log-bad");
    let socket = target.dir.join("split");
    let log = guest_file(&target.dir);
    log.set_len(4096).expect("log size");
    for (size, offset, why) in [
        (1u64, 0u64, "too small for 2 MiB of guest memory"),
        (8192, 0, "past the end of its file"),
        (64, u64::MAX - 8, "offset overflows"),
        (0, 0, "empty"),
    ] {
        let mut fe = Fe::connect(&socket, guest_file(&target.dir));
        fe.extra_protocol = LOG_SHMFD;
        fe.setup(false);
        fe.send(6, 0, &log_base(size, offset), &[log.as_raw_fd()]);
        assert!(fe.closed(), "log region {why}: connection closed");
        let mut bits = [0u8; 4096];
        log.read_exact_at(&mut bits, 0).expect("log");
        assert!(
            bits.iter().all(|b| *b == 0),
            "log region {why}: nothing written"
        );
    }
    // Fds that cannot be mapped shared and writable: a socket, a read-only file.
    let (socket_fd, _peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let read_only_path = target.dir.join("log-read-only");
    std::fs::write(&read_only_path, [0u8; 4096]).expect("read-only log");
    let read_only = File::open(&read_only_path).expect("open read-only");
    for (fd, why) in [
        (socket_fd.as_raw_fd(), "a socket"),
        (read_only.as_raw_fd(), "a read-only file"),
    ] {
        let mut fe = Fe::connect(&socket, guest_file(&target.dir));
        fe.extra_protocol = LOG_SHMFD;
        fe.setup(false);
        fe.send(6, 0, &log_base(64, 0), &[fd]);
        assert!(fe.closed(), "log fd {why}: connection closed");
    }
    assert!(
        std::fs::read(&read_only_path)
            .expect("read back")
            .iter()
            .all(|b| *b == 0),
        "nothing written through the read-only fd"
    );
    // Not negotiated: refused, connection kept, I/O goes on.
    let mut fe = Fe::connect(&socket, guest_file(&target.dir));
    fe.setup(false);
    fe.send(6, 0, &log_base(64, 0), &[log.as_raw_fd()]);
    assert_valid_read_completes(&mut fe);
}
