//! The NVMe/TCP initiator (`pollux_nvmf::host`) against the in-process target on 127.0.0.1:
//! attach (one bdev per namespace, `save_config`'s entry reloads), read / write verify of
//! in-capsule and R2T sizes over several iovecs, digests, channels on several threads,
//! reconnect after every connection was dropped (through a TCP proxy the test controls),
//! I/O failing after `ctrlr_loss_timeout_sec` when the target never comes back; and hostile
//! controllers of the test's own over a std `TcpListener` (malformed PDUs, bad digests,
//! C2HData beyond the command or for an unknown CID, bad R2Ts, termination requests): the
//! queue sends an H2CTermReq and fails, nothing is written outside the command's buffer.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use pollux_bdev::{BdevChannel, BdevRegistry, IoStatus, IoType};
use pollux_env::dma::{DmaBuffer, DmaConfig, DmaMemory};
use pollux_env::iovec::IoVec;
use pollux_nvme::spec::{opc, Command, Completion, Status};
use pollux_nvmf::host::params::TcpAttachOptions;
use pollux_nvmf::host::qpair::{DataDir, QpairOptions, QpairState, TcpQpair};
use pollux_nvmf::host::{HostCtrlrState, NvmfHostModule};
use pollux_nvmf::pdu::{
    self, fes, DataHeader, Digests, EncodeOptions, IcResp, Limits, Pdu, R2t, TermReq, CH_BYTES,
};
use pollux_nvmf::TcpTransportOptions;

const DEADLINE: Duration = Duration::from_secs(30);

/// The initiator side: its own registry, DMA memory for the I/O buffers, and a thread that
/// runs the admin poller every 5 ms (the apps' timed poller).
struct Host {
    module: Arc<NvmfHostModule>,
    registry: Arc<BdevRegistry>,
    dma: Arc<DmaMemory>,
    stop: Arc<AtomicBool>,
    poller: Option<JoinHandle<()>>,
}

impl Host {
    fn new() -> Self {
        let module = Arc::new(NvmfHostModule::new());
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let module = module.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    module.poll_admin();
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            module,
            registry: BdevRegistry::new(),
            dma: DmaMemory::new(DmaConfig {
                size_mib: 32,
                no_huge: true,
            })
            .expect("DMA memory"),
            stop,
            poller: Some(poller),
        }
    }

    fn attach(&self, options: TcpAttachOptions) -> Vec<String> {
        self.module
            .attach(&self.registry, options)
            .expect("attach")
            .into_iter()
            .map(|info| info.name)
            .collect()
    }

    fn channel(&self, bdev: &str, depth: u32) -> BdevChannel {
        self.registry
            .open(bdev, true, None)
            .expect("open")
            .channel(depth)
            .expect("channel")
    }

    fn buffer(&self, len: usize) -> DmaBuffer {
        self.dma.alloc(len, 4096, None).expect("buffer")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
        self.module.detach_all(&self.registry);
    }
}

/// Polls `channel` until `count` completions came; returns their statuses.
fn wait_completions(channel: &mut BdevChannel, count: usize) -> Vec<(u64, IoStatus)> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    while out.len() < count {
        channel.poll(|_, c| out.push((c.tag, c.status)));
        assert!(Instant::now() < deadline, "I/O did not complete in time");
    }
    out
}

fn io(
    channel: &mut BdevChannel,
    io_type: IoType,
    slba: u64,
    blocks: u64,
    iovs: &[IoVec],
) -> IoStatus {
    channel
        .submit(7, io_type, slba, blocks, iovs)
        .expect("submit");
    wait_completions(channel, 1)[0].1
}

/// Writes `data` at `slba` through `iov_count` iovecs, reads it back through as many,
/// compares.
fn write_read_verify(
    host: &Host,
    channel: &mut BdevChannel,
    slba: u64,
    data: &[u8],
    iov_count: usize,
) {
    let len = data.len();
    let mut wbuf = host.buffer(len);
    wbuf.write_at(0, data).expect("fill");
    let rbuf = host.buffer(len);
    let piece = len / iov_count;
    let split = |buf: &DmaBuffer| -> Vec<IoVec> {
        (0..iov_count)
            .map(|i| {
                let end = if i + 1 == iov_count {
                    len
                } else {
                    (i + 1) * piece
                };
                IoVec::from_dma_buffer(buf, i * piece, end - i * piece).expect("iov")
            })
            .collect()
    };
    let blocks = (len / channel.block_size_bytes() as usize) as u64;
    assert_eq!(
        io(channel, IoType::Write, slba, blocks, &split(&wbuf)),
        IoStatus::Success,
        "write {len} at {slba}"
    );
    assert_eq!(
        io(channel, IoType::Read, slba, blocks, &split(&rbuf)),
        IoStatus::Success,
        "read {len} at {slba}"
    );
    let mut back = vec![0u8; len];
    rbuf.read_at(0, &mut back).expect("read back");
    assert!(
        back == data,
        "{len} bytes at {slba} differ after the round trip"
    );
}

fn target_with_two_namespaces(options: TcpTransportOptions) -> Tgt {
    let tgt = Tgt::start(options, &[]);
    pollux_bdev::modules::malloc::create(
        &tgt.registry,
        &tgt.dma,
        pollux_bdev::modules::malloc::MallocOptions::from_size_mib(
            Some("Malloc1".to_string()),
            8,
            4096,
        ),
    )
    .expect("second malloc bdev");
    tgt.target
        .add_namespace(NQN, "Malloc1", None, None)
        .expect("second namespace");
    tgt
}

fn round_trips(digests: Digests) {
    let tgt = target_with_two_namespaces(TcpTransportOptions::default());
    let host = Host::new();
    let mut options = TcpAttachOptions::new("Nvme0", tgt.addr, NQN);
    options.digests = digests;
    let names = host.attach(options.clone());
    assert_eq!(names, ["Nvme0n1", "Nvme0n2"]);
    let info = host.registry.info("Nvme0n1").expect("info");
    assert_eq!(info.block_size_bytes, 512);
    assert_eq!(info.num_blocks, MALLOC_MIB * 2048);
    assert_eq!(info.module, "nvme");
    let info2 = host.registry.info("Nvme0n2").expect("info");
    assert_eq!(info2.block_size_bytes, 4096);
    assert_eq!(info2.num_blocks, 2048);

    let mut channel = host.channel("Nvme0n1", 32);
    // In-capsule (up to 4 KiB, the target's in-capsule size), then R2T sizes up to MDTS.
    for (slba, len, seed, iovs) in [
        (0u64, 512usize, 1u8, 1usize),
        (8, 4096, 2, 1),
        (16, 4096, 3, 4),
        (100, 8192, 4, 1),
        (200, 65536, 5, 3),
        (1000, 131072, 6, 8),
    ] {
        write_read_verify(&host, &mut channel, slba, &pattern(len, seed), iovs);
    }
    // The data really is on the target's bdev: read the 4 KiB at LBA 8 there.
    {
        let desc = tgt
            .registry
            .open("Malloc0", false, None)
            .expect("target bdev");
        let mut tchan = desc.channel(1).expect("target channel");
        let buf = tgt.dma.alloc(4096, 4096, None).expect("buf");
        let iov = IoVec::from_dma_buffer(&buf, 0, 4096).expect("iov");
        assert_eq!(
            io(&mut tchan, IoType::Read, 8, 8, &[iov]),
            IoStatus::Success
        );
        let mut back = vec![0u8; 4096];
        buf.read_at(0, &mut back).expect("read");
        assert!(
            back == pattern(4096, 2),
            "the target's bdev holds the written data"
        );
    }
    // Write Zeroes (the malloc bdev has it), out of range refused by the bdev layer.
    assert!(channel.bdev_name() == "Nvme0n1");
    if host
        .registry
        .open("Nvme0n1", false, None)
        .expect("d")
        .supports(IoType::WriteZeroes)
    {
        assert_eq!(
            io(&mut channel, IoType::WriteZeroes, 200, 16, &[]),
            IoStatus::Success
        );
        let buf = host.buffer(8192);
        let iov = IoVec::from_dma_buffer(&buf, 0, 8192).expect("iov");
        assert_eq!(
            io(&mut channel, IoType::Read, 200, 16, &[iov]),
            IoStatus::Success
        );
        let mut back = vec![1u8; 8192];
        buf.read_at(0, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 0));
    }
    // The second namespace, 4 KiB blocks.
    let mut channel2 = host.channel("Nvme0n2", 8);
    write_read_verify(&host, &mut channel2, 3, &pattern(16384, 9), 2);

    // save_config writes the TCP attach once (the second bdev an ignored entry), and it
    // parses back to the same options.
    let config = host.registry.save_config();
    let entries = config["config"].as_array().expect("entries");
    let attach: Vec<_> = entries
        .iter()
        .filter(|e| e["method"] == "bdev_nvme_attach_controller")
        .collect();
    assert_eq!(attach.len(), 1, "{config}");
    assert_eq!(attach[0]["params"]["trtype"], "TCP");
    assert_eq!(attach[0]["params"]["subnqn"], NQN);
    assert_eq!(attach[0]["params"]["hdgst"], digests.header);
    let params =
        pollux_bdev::config::Params::new("bdev_nvme_attach_controller", Some(&attach[0]["params"]))
            .expect("params");
    let reparsed = pollux_nvmf::host::parse_tcp_attach(&params).expect("reloads");
    assert_eq!(reparsed, options);

    drop(channel);
    drop(channel2);
    host.module
        .detach_controller(&host.registry, "Nvme0")
        .expect("detach");
    assert!(host.registry.names().is_empty());
}

#[test]
fn attach_one_bdev_per_namespace_and_verify_in_capsule_and_r2t_writes() {
    round_trips(Digests::default());
}

#[test]
fn header_and_data_digests() {
    round_trips(Digests {
        header: true,
        data: true,
    });
}

/// Each thread keeps 16 writes-then-reads in flight on its own channel (its own TCP
/// connection and queue) over its own LBA range, and checks every block.
#[test]
fn channels_on_several_threads() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let host = Arc::new(Host::new());
    host.attach(TcpAttachOptions::new("Nvme0", tgt.addr, NQN));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let host = host.clone();
            std::thread::spawn(move || {
                let mut channel = host.channel("Nvme0n1", 16);
                let base = t * 4096;
                let mut bufs: Vec<DmaBuffer> = (0..16).map(|_| host.buffer(4096)).collect();
                for (i, buf) in bufs.iter_mut().enumerate() {
                    buf.write_at(0, &pattern(4096, (t * 16 + i as u64) as u8))
                        .expect("fill");
                    let iov = IoVec::from_dma_buffer(buf, 0, 4096).expect("iov");
                    channel
                        .write(i as u64, base + i as u64 * 8, 8, &[iov])
                        .expect("submit");
                }
                for (_, status) in wait_completions(&mut channel, 16) {
                    assert_eq!(status, IoStatus::Success);
                }
                for (i, buf) in bufs.iter_mut().enumerate() {
                    buf.fill(0, 4096, 0).expect("clear");
                    let iov = IoVec::from_dma_buffer(buf, 0, 4096).expect("iov");
                    channel
                        .read(i as u64, base + i as u64 * 8, 8, &[iov])
                        .expect("submit");
                }
                for (_, status) in wait_completions(&mut channel, 16) {
                    assert_eq!(status, IoStatus::Success);
                }
                for (i, buf) in bufs.iter().enumerate() {
                    let mut back = vec![0u8; 4096];
                    buf.read_at(0, &mut back).expect("read");
                    assert!(
                        back == pattern(4096, (t * 16 + i as u64) as u8),
                        "thread {t} block {i}"
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    assert!(tgt.target.controller_count() >= 1);
}

/// A TCP proxy in front of the target: `cut` closes every proxied connection and turns new
/// ones away (accepted and closed at once) until `restore`.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        {
            let up = up.clone();
            let conns = conns.clone();
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    {
                        let mut list = conns.lock().expect("conns");
                        list.push(client.try_clone().expect("clone"));
                        list.push(server.try_clone().expect("clone"));
                    }
                    for (mut from, mut to) in [
                        (
                            client.try_clone().expect("c"),
                            server.try_clone().expect("s"),
                        ),
                        (server, client),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                        });
                    }
                }
            });
        }
        Self { addr, up, conns }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.conns.lock().expect("conns").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Keeps `depth` 4 KiB write+read-verify pairs going on `channel` until `stop`; returns the
/// completed pairs and the failed I/Os. Each slot owns 8 blocks and a pattern seed that
/// changes per round, so a resubmitted or lost write shows in the read.
fn verify_loop(
    host: &Host,
    channel: &mut BdevChannel,
    depth: usize,
    stop: &AtomicBool,
    done: &std::sync::atomic::AtomicU64,
) -> u64 {
    let mut bufs: Vec<DmaBuffer> = (0..depth).map(|_| host.buffer(4096)).collect();
    let mut round = vec![0u8; depth];
    let mut reading = vec![false; depth];
    let mut failed = 0u64;
    let submit = |channel: &mut BdevChannel,
                  bufs: &mut [DmaBuffer],
                  round: &[u8],
                  reading: &[bool],
                  i: usize| {
        let iov = IoVec::from_dma_buffer(&bufs[i], 0, 4096).expect("iov");
        let lba = i as u64 * 8;
        if reading[i] {
            channel.read(i as u64, lba, 8, &[iov]).expect("submit read");
        } else {
            bufs[i]
                .write_at(0, &pattern(4096, round[i].wrapping_add(i as u8)))
                .expect("fill");
            channel
                .write(i as u64, lba, 8, &[iov])
                .expect("submit write");
        }
    };
    for i in 0..depth {
        submit(channel, &mut bufs, &round, &reading, i);
    }
    let mut outstanding = depth;
    while outstanding > 0 {
        let mut finished = Vec::new();
        channel.poll(|_, c| finished.push((c.tag as usize, c.status, c.io_type)));
        for (i, status, io_type) in finished {
            outstanding -= 1;
            if status != IoStatus::Success {
                failed += 1;
                reading[i] = false;
            } else if io_type == IoType::Read {
                let mut back = vec![0u8; 4096];
                bufs[i].read_at(0, &mut back).expect("read");
                assert!(
                    back == pattern(4096, round[i].wrapping_add(i as u8)),
                    "slot {i} round {} read back wrong data",
                    round[i]
                );
                done.fetch_add(1, Ordering::Relaxed);
                round[i] = round[i].wrapping_add(1);
                reading[i] = false;
            } else {
                reading[i] = true;
            }
            if !stop.load(Ordering::Relaxed) {
                submit(channel, &mut bufs, &round, &reading, i);
                outstanding += 1;
            }
        }
    }
    failed
}

#[test]
fn io_continues_after_every_connection_dropped_and_the_target_returns() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let proxy = Proxy::start(tgt.addr);
    let host = Arc::new(Host::new());
    let mut options = TcpAttachOptions::new("Nvme0", proxy.addr, NQN);
    options.ctrlr_loss_timeout_sec = -1;
    options.reconnect_delay_sec = 1;
    host.attach(options);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let worker = {
        let (host, stop, done) = (host.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut channel = host.channel("Nvme0n1", 8);
            verify_loop(&host, &mut channel, 8, &stop, &done)
        })
    };
    let wait_for = |n: u64| {
        let deadline = Instant::now() + DEADLINE;
        while done.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "I/O stalled at {}",
                done.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(50);
    proxy.cut();
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(
        host.module.controller_state("Nvme0"),
        Some(HostCtrlrState::Connected)
    );
    let before = done.load(Ordering::Relaxed);
    proxy.restore();
    wait_for(before + 200);
    assert_eq!(
        host.module.controller_state("Nvme0"),
        Some(HostCtrlrState::Connected)
    );
    // Twice more, quickly, while I/O is in flight.
    for _ in 0..2 {
        proxy.cut();
        std::thread::sleep(Duration::from_millis(100));
        proxy.restore();
        let now = done.load(Ordering::Relaxed);
        wait_for(now + 100);
    }
    stop.store(true, Ordering::Relaxed);
    let failed = worker.join().expect("worker");
    assert_eq!(
        failed, 0,
        "no I/O fails while reconnects are allowed forever"
    );
}

#[test]
fn io_fails_after_the_loss_timeout_when_the_target_never_returns() {
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let proxy = Proxy::start(tgt.addr);
    let host = Host::new();
    let mut options = TcpAttachOptions::new("Nvme0", proxy.addr, NQN);
    options.ctrlr_loss_timeout_sec = 2;
    options.reconnect_delay_sec = 1;
    host.attach(options);
    let mut channel = host.channel("Nvme0n1", 8);
    write_read_verify(&host, &mut channel, 0, &pattern(4096, 1), 1);
    proxy.cut();
    // Eight reads queued or in flight when the connections go.
    let bufs: Vec<DmaBuffer> = (0..8).map(|_| host.buffer(4096)).collect();
    for (i, buf) in bufs.iter().enumerate() {
        let iov = IoVec::from_dma_buffer(buf, 0, 4096).expect("iov");
        channel.read(i as u64, 0, 8, &[iov]).expect("submit");
    }
    let started = Instant::now();
    let statuses = wait_completions(&mut channel, 8);
    assert!(
        statuses.iter().all(|(_, s)| *s == IoStatus::Failed),
        "{statuses:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "failed only once the loss timeout passed"
    );
    assert_eq!(
        host.module.controller_state("Nvme0"),
        Some(HostCtrlrState::Failed)
    );
    assert_eq!(channel.outstanding(), 0);
    // New I/O fails at once, through the channel's poll (never inside submit).
    let iov = IoVec::from_dma_buffer(&bufs[0], 0, 4096).expect("iov");
    channel.read(99, 0, 8, &[iov]).expect("submit");
    assert_eq!(wait_completions(&mut channel, 1), [(99, IoStatus::Failed)]);
    // The bdev stays registered until detached; detaching removes it.
    assert!(host.registry.contains("Nvme0n1"));
    drop(channel);
    host.module
        .detach_controller(&host.registry, "Nvme0")
        .expect("detach");
    assert!(!host.registry.contains("Nvme0n1"));
}

#[test]
fn attach_to_nothing_fails_cleanly() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let host = Host::new();
    let error = host
        .module
        .attach(&host.registry, TcpAttachOptions::new("Nvme0", addr, NQN))
        .expect_err("nothing listens");
    assert!(pollux_cli_chain(&error).contains("connect"), "{error}");
    assert!(host.module.controller_names().is_empty());
    // A subsystem the target does not have: Connect is refused.
    let tgt = Tgt::start(TcpTransportOptions::default(), &[]);
    let error = host
        .module
        .attach(
            &host.registry,
            TcpAttachOptions::new("Nvme0", tgt.addr, "nqn.2016-06.io.spdk:other"),
        )
        .expect_err("unknown subsystem");
    assert!(
        pollux_cli_chain(&error).contains("Connect"),
        "{}",
        pollux_cli_chain(&error)
    );
    assert!(host.registry.names().is_empty());
}

fn pollux_cli_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// -----------------------------------------------------------------------------------------
// Hostile controllers: a fake target that answers the ICReq, takes one command and then
// sends what the case asks for; it reports the first PDU the host sends back.

struct Fake {
    stream: TcpStream,
    digests: Digests,
}

impl Fake {
    fn recv(&mut self) -> std::io::Result<(Pdu, Vec<u8>)> {
        let mut ch = [0u8; CH_BYTES];
        self.stream.read_exact(&mut ch)?;
        let limits = Limits {
            digests: self.digests,
            max_capsule_data_bytes: 1 << 20,
            max_data_pdu_bytes: 1 << 20,
        };
        let layout = pdu::parse_common_header(&ch, &limits)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut whole = vec![0u8; layout.total_bytes()];
        whole[..CH_BYTES].copy_from_slice(&ch);
        self.stream.read_exact(&mut whole[CH_BYTES..])?;
        let decoded = pdu::decode(&whole, &limits)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok((decoded.pdu, decoded.data.to_vec()))
    }

    fn send(&mut self, pdu: &Pdu, data: &[u8]) {
        let mut out = vec![0u8; 256 + data.len()];
        let options = EncodeOptions {
            digests: self.digests,
            pda: 0,
        };
        let len = pdu::encode(pdu, data, &options, &mut out).expect("encode");
        self.stream.write_all(&out[..len]).expect("send");
    }
}

/// What the fake saw after its hostile move: the host's termination request (FES, FEI),
/// or `None` when the host closed without one.
type Seen = Option<(u16, u32)>;

/// Runs the fake: ICResp with `maxh2cdata`, then `script` with the first command received.
fn fake_target(
    digests: Digests,
    maxh2cdata: u32,
    script: impl FnOnce(&mut Fake, Command) + Send + 'static,
) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut fake = Fake {
            stream,
            digests: Digests::default(),
        };
        match fake.recv().expect("ICReq") {
            (Pdu::IcReq(req), _) => assert_eq!(req.digests, digests),
            other => panic!("expected ICReq, got {other:?}"),
        }
        fake.send(
            &Pdu::IcResp(IcResp {
                pfv: 0,
                cpda: 0,
                digests,
                maxh2cdata,
            }),
            &[],
        );
        fake.digests = digests;
        let cmd = match fake.recv().expect("a command") {
            (Pdu::CapsuleCmd(cmd), _) => cmd,
            other => panic!("expected a command, got {other:?}"),
        };
        script(&mut fake, cmd);
        let seen = loop {
            match fake.recv() {
                Ok((Pdu::H2cTermReq(term), _)) => break Some((term.fes, term.fei)),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let _ = tx.send(seen);
    });
    (addr, rx)
}

const GUARD: u8 = 0xee;

/// Connects a queue to the fake, sends one read of 4 KiB into the middle of a guarded
/// buffer (or a write, `write`), polls until the queue fails; checks the guards.
fn hostile_case(
    digests: Digests,
    write: Option<usize>,
    maxh2cdata: u32,
    script: impl FnOnce(&mut Fake, Command) + Send + 'static,
) -> (Seen, Vec<(u64, Completion)>) {
    let (addr, seen) = fake_target(digests, maxh2cdata, script);
    let dma = DmaMemory::new(DmaConfig {
        size_mib: 4,
        no_huge: true,
    })
    .expect("dma");
    let len = write.unwrap_or(4096);
    let mut buf = dma.alloc(len + 8192, 4096, None).expect("buf");
    buf.fill(0, len + 8192, GUARD).expect("guard");
    if write.is_some() {
        buf.write_at(4096, &pattern(len, 3)).expect("data");
    }
    let iov = IoVec::from_dma_buffer(&buf, 4096, len).expect("iov");
    let mut qpair = TcpQpair::connect(
        addr,
        Duration::from_secs(5),
        QpairOptions {
            depth: 4,
            digests,
            in_capsule_bytes: 0,
            max_data_bytes: 1 << 20,
            max_iovs: 4,
        },
    )
    .expect("connect");
    qpair.wait_ready(Duration::from_secs(10)).expect("ICResp");
    let mut cmd = Command::new(if write.is_some() {
        opc::WRITE
    } else {
        opc::READ
    });
    cmd.nsid = 1;
    cmd.cdw12 = (len / BLOCK - 1) as u32;
    let dir = if write.is_some() {
        DataDir::Write
    } else {
        DataDir::Read
    };
    qpair.submit(cmd, 42, dir, &[iov]).expect("submit");
    let mut completions = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while qpair.state() != QpairState::Failed {
        qpair.poll(|tag, cqe| completions.push((tag, *cqe)));
        assert!(Instant::now() < deadline, "the queue did not fail");
    }
    let mut taken = Vec::new();
    qpair.take_outstanding(|tag| taken.push(tag));
    drop(qpair);
    let seen = seen.recv_timeout(DEADLINE).expect("the fake reports");
    // Nothing outside the command's 4 KiB was touched.
    let mut head = vec![0u8; 4096];
    buf.read_at(0, &mut head).expect("head");
    let mut tail = vec![0u8; 4096];
    buf.read_at(4096 + len, &mut tail).expect("tail");
    assert!(
        head.iter().chain(tail.iter()).all(|b| *b == GUARD),
        "a write outside the command's buffer"
    );
    if completions.is_empty() {
        assert_eq!(taken, [42], "the command is handed back exactly once");
    }
    (seen, completions)
}

fn c2h(cid: u16, datao: u32, len: usize, last: bool) -> Pdu {
    Pdu::C2hData(DataHeader {
        cccid: cid,
        ttag: 0,
        datao,
        datal: len as u32,
        last,
        success: false,
    })
}

#[test]
fn c2h_data_beyond_the_command_fails_the_connection() {
    let (seen, done) = hostile_case(Digests::default(), None, 4096, |fake, cmd| {
        fake.send(&c2h(cmd.cid, 0, 8192, true), &[0x11; 8192]);
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::DATA_OUT_OF_RANGE));
    assert!(done.is_empty());
}

#[test]
fn c2h_data_past_the_end_in_a_second_pdu_fails_the_connection() {
    let (seen, _) = hostile_case(Digests::default(), None, 4096, |fake, cmd| {
        fake.send(&c2h(cmd.cid, 0, 2048, false), &[0x11; 2048]);
        fake.send(&c2h(cmd.cid, 2048, 4096, true), &[0x22; 4096]);
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::DATA_OUT_OF_RANGE));
}

#[test]
fn c2h_data_for_an_unknown_cid_fails_the_connection() {
    let (seen, _) = hostile_case(Digests::default(), None, 4096, |fake, cmd| {
        fake.send(&c2h(cmd.cid.wrapping_add(3), 0, 4096, true), &[0x11; 4096]);
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::PDU_SEQUENCE_ERROR));
}

#[test]
fn a_wrong_data_digest_fails_the_connection() {
    let digests = Digests {
        header: true,
        data: true,
    };
    let (seen, done) = hostile_case(digests, None, 4096, move |fake, cmd| {
        let mut out = vec![0u8; 8192];
        let options = EncodeOptions { digests, pda: 0 };
        let len = pdu::encode(
            &c2h(cmd.cid, 0, 4096, true),
            &[0x33; 4096],
            &options,
            &mut out,
        )
        .expect("encode");
        out[len - 1] ^= 0xff;
        fake.stream.write_all(&out[..len]).expect("send");
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::HEADER_DIGEST_ERROR));
    assert!(
        done.is_empty(),
        "no completion for a command whose data failed its digest"
    );
}

#[test]
fn a_wrong_header_digest_fails_the_connection() {
    let digests = Digests {
        header: true,
        data: false,
    };
    let (seen, _) = hostile_case(digests, None, 4096, move |fake, cmd| {
        let cqe = Completion {
            dw0: 0,
            dw1: 0,
            sq_head: 1,
            sq_id: 1,
            cid: cmd.cid,
            phase: false,
            status: Status::SUCCESS,
        };
        let mut out = vec![0u8; 256];
        let options = EncodeOptions { digests, pda: 0 };
        let len = pdu::encode(&Pdu::CapsuleResp(cqe), &[], &options, &mut out).expect("encode");
        out[len - 2] ^= 0x01;
        fake.stream.write_all(&out[..len]).expect("send");
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::HEADER_DIGEST_ERROR));
}

#[test]
fn a_malformed_header_fails_the_connection() {
    let (seen, _) = hostile_case(Digests::default(), None, 4096, |fake, _cmd| {
        // A CapsuleResp whose HLEN is wrong.
        let mut bytes = [0u8; 24];
        bytes[0] = 0x05;
        bytes[2] = 30;
        bytes[4] = 24;
        fake.stream.write_all(&bytes).expect("send");
    });
    assert_eq!(seen, Some((fes::INVALID_HEADER_FIELD, 2)));
}

#[test]
fn a_success_response_before_the_read_data_fails_the_connection() {
    let (seen, done) = hostile_case(Digests::default(), None, 4096, |fake, cmd| {
        let cqe = Completion {
            dw0: 0,
            dw1: 0,
            sq_head: 1,
            sq_id: 1,
            cid: cmd.cid,
            phase: false,
            status: Status::SUCCESS,
        };
        fake.send(&Pdu::CapsuleResp(cqe), &[]);
    });
    assert!(seen.is_some());
    assert!(done.is_empty());
}

#[test]
fn an_r2t_outside_the_write_fails_the_connection() {
    let (seen, _) = hostile_case(Digests::default(), Some(4096), 4096, |fake, cmd| {
        fake.send(
            &Pdu::R2t(R2t {
                cccid: cmd.cid,
                ttag: 1,
                r2to: 0,
                r2tl: 8192,
            }),
            &[],
        );
    });
    assert_eq!(seen.map(|s| s.0), Some(fes::DATA_OUT_OF_RANGE));
}

#[test]
fn a_controller_termination_request_closes_the_connection() {
    let (seen, done) = hostile_case(Digests::default(), None, 4096, |fake, _cmd| {
        fake.send(
            &Pdu::C2hTermReq(TermReq {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
            }),
            &[0u8; 8],
        );
    });
    assert_eq!(seen, None, "no termination request answers one");
    assert!(done.is_empty());
}

/// The well-behaved path of a fake with a small MAXH2CDATA: a 16 KiB write answers one R2T
/// with four H2CData PDUs of 4 KiB (the last flagged), the data as written.
#[test]
fn r2t_is_answered_in_maxh2cdata_pieces() {
    let dma = DmaMemory::new(DmaConfig {
        size_mib: 4,
        no_huge: true,
    })
    .expect("dma");
    let data = pattern(16384, 5);
    let (addr, _seen) = fake_target(
        Digests {
            header: false,
            data: true,
        },
        4096,
        {
            let data = data.clone();
            move |fake, cmd| {
                fake.send(
                    &Pdu::R2t(R2t {
                        cccid: cmd.cid,
                        ttag: 9,
                        r2to: 0,
                        r2tl: 16384,
                    }),
                    &[],
                );
                let mut got = Vec::new();
                for piece in 0..4u32 {
                    match fake.recv().expect("H2CData") {
                        (Pdu::H2cData(h), payload) => {
                            assert_eq!(
                                (h.cccid, h.ttag, h.datao, h.datal),
                                (cmd.cid, 9, piece * 4096, 4096)
                            );
                            assert_eq!(h.last, piece == 3);
                            got.extend_from_slice(&payload);
                        }
                        other => panic!("expected H2CData, got {other:?}"),
                    }
                }
                assert!(got == data);
                let cqe = Completion {
                    dw0: 0,
                    dw1: 0,
                    sq_head: 1,
                    sq_id: 1,
                    cid: cmd.cid,
                    phase: false,
                    status: Status::SUCCESS,
                };
                fake.send(&Pdu::CapsuleResp(cqe), &[]);
            }
        },
    );
    let mut buf = dma.alloc(16384, 4096, None).expect("buf");
    buf.write_at(0, &data).expect("fill");
    let iov = IoVec::from_dma_buffer(&buf, 0, 16384).expect("iov");
    let mut qpair = TcpQpair::connect(
        addr,
        Duration::from_secs(5),
        QpairOptions {
            depth: 4,
            digests: Digests {
                header: false,
                data: true,
            },
            in_capsule_bytes: 4096,
            max_data_bytes: 1 << 20,
            max_iovs: 4,
        },
    )
    .expect("connect");
    qpair.wait_ready(Duration::from_secs(10)).expect("ICResp");
    let mut cmd = Command::new(opc::WRITE);
    cmd.cdw12 = 31;
    qpair
        .submit(cmd, 5, DataDir::Write, &[iov])
        .expect("submit");
    let mut done = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while done.is_empty() {
        qpair.poll(|tag, cqe| done.push((tag, cqe.status)));
        assert!(!qpair.is_failed(), "the queue failed");
        assert!(Instant::now() < deadline);
    }
    assert_eq!(done, [(5, Status::SUCCESS)]);
}

#[test]
fn garbage_instead_of_an_icresp_fails_the_attach() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut icreq = [0u8; 128];
        let _ = stream.read_exact(&mut icreq);
        let _ = stream.write_all(&[0xff; 64]);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let host = Host::new();
    let error = host
        .module
        .attach(&host.registry, TcpAttachOptions::new("Nvme0", addr, NQN))
        .expect_err("garbage");
    assert!(
        pollux_cli_chain(&error).contains("ICReq"),
        "{}",
        pollux_cli_chain(&error)
    );
    assert!(host.registry.names().is_empty());
}
