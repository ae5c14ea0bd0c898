//! vhost-user messages into pollux-vhost's back-end, through the same socket, controller
//! thread and request handler the target uses, with real fds of the kinds each message
//! carries (a shared-memory file for memory tables, inflight and log regions, eventfds for
//! kick/call/err, a socket for the back-end channel).
//!
//! The input is the byte stream a front-end writes (the seeds are sessions recorded from QEMU
//! and from Pollux's virtio-user front-end): headers, sizes and bodies as they come, lies
//! included; the harness only attaches each message's fds (an extra one when the header's
//! reserved flag bit 7 is set, none for a kick/call with the no-fd bit). It sends the whole
//! stream, drains what the target answers, and hangs up.
//!
//! Invariant: whatever came before, the target then serves a new front-end (GET_FEATURES is
//! answered within 10 s): hostile messages never kill, wedge or crash the target. A panic on a
//! controller thread aborts the process (the fuzz build's panic hook), so libFuzzer sees it.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pollux_bdev::modules::malloc;
use pollux_bdev::BdevRegistry;
use pollux_env::cpumask::CpuMask;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_reactor::{App, AppConfig};
use pollux_vhost::{ControllerOptions, VhostTarget};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_BYTES: usize = 12;
/// The shared file memory tables, inflight and log regions point into.
const SHARED_FILE_BYTES: u64 = 2 << 20;

struct Fixture {
    /// Split; packed; packed with inflight tracking (`packed_ring_recovery`).
    sockets: [PathBuf; 3],
    shared: File,
}

/// One target for the whole run: a split and a packed controller on malloc bdevs.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        let dir = std::env::temp_dir().join(format!("pollux-fuzz-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket dir");
        let registry = BdevRegistry::new();
        let dma = DmaMemory::new(DmaConfig {
            size_mib: 8,
            no_huge: true,
        })
        .expect("dma");
        for name in ["M0", "M1", "M2"] {
            malloc::create(
                &registry,
                &dma,
                malloc::MallocOptions::from_size_mib(Some(name.into()), 1, 512),
            )
            .expect("malloc");
        }
        let core = CpuMask::available().first().expect("a core");
        let app = App::new(AppConfig {
            name: "fuzz-vhost".into(),
            cpumask: std::iter::once(core).collect(),
            handle_signals: false,
            ..AppConfig::default()
        })
        .expect("app");
        let target = VhostTarget::new(app.handle(), registry, &dir);
        let mut split = ControllerOptions::new("split", "M0");
        split.num_queues = Some(2);
        target.create_blk_controller(split).expect("split");
        let mut packed = ControllerOptions::new("packed", "M1");
        packed.packed_ring = true;
        target.create_blk_controller(packed).expect("packed");
        let mut recovery = ControllerOptions::new("packed-recovery", "M2");
        recovery.packed_ring = true;
        recovery.packed_ring_recovery = true;
        target
            .create_blk_controller(recovery)
            .expect("packed with recovery");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _keep = (target, dma);
            app.run(move |_ctx| {
                let _ = tx.send(());
            })
            .expect("app run");
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("app up");
        let path = dir.join("shared");
        let shared = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("shared file");
        std::fs::remove_file(&path).expect("unlink");
        shared.set_len(SHARED_FILE_BYTES).expect("size");
        Fixture {
            sockets: [
                dir.join("split"),
                dir.join("packed"),
                dir.join("packed-recovery"),
            ],
            shared,
        }
    })
}

/// The fds a message of `request` carries, as a front-end sends them.
fn fds_for(
    request: u32,
    flags: u32,
    body: &[u8],
    fixture: &Fixture,
    keep: &mut Vec<Box<dyn AsRawFd>>,
) -> Vec<RawFd> {
    let shared = fixture.shared.as_raw_fd();
    let mut fds = Vec::new();
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    match request {
        // SET_MEM_TABLE: one fd per region (the count leads the body).
        5 => {
            let regions = body
                .get(..4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
            fds.extend(std::iter::repeat_n(shared, regions.min(8) as usize));
        }
        // SET_LOG_BASE, SET_INFLIGHT_FD, ADD_MEM_REG, REM_MEM_REG: one shared-memory fd.
        6 | 32 | 37 | 38 => fds.push(shared),
        // SET_LOG_FD: an eventfd; SET_VRING_KICK / CALL / ERR: one unless the no-fd bit is set.
        7 => push_eventfd(&mut fds, keep),
        12..=14 if u64_at(0) & 0x100 == 0 => push_eventfd(&mut fds, keep),
        // SET_BACKEND_REQ_FD: a socket.
        21 => {
            let (ours, _theirs) = UnixStream::pair().expect("socket pair");
            fds.push(ours.as_raw_fd());
            keep.push(Box::new(ours));
        }
        _ => {}
    }
    if flags & 0x80 != 0 {
        fds.push(shared);
    }
    fds
}

/// A fresh eventfd for a message, kept open until the stream is sent.
fn push_eventfd(fds: &mut Vec<RawFd>, keep: &mut Vec<Box<dyn AsRawFd>>) {
    let fd = EventFd::new(0).expect("eventfd");
    fds.push(fd.as_raw_fd());
    keep.push(Box::new(fd));
}

/// Reads whatever the target has answered so far, without waiting.
fn drain(sock: &mut UnixStream) {
    let _ = sock.set_nonblocking(true);
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let _ = sock.set_nonblocking(false);
}

fn still_serves(path: &PathBuf) {
    let mut sock = UnixStream::connect(path).expect("the target accepts a new front-end");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // GET_FEATURES, version 1.
    let mut msg = Vec::new();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    sock.write_all(&msg).expect("send GET_FEATURES");
    let mut reply = [0u8; HEADER_BYTES + 8];
    sock.read_exact(&mut reply)
        .expect("the target answers GET_FEATURES after the fuzz input");
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().expect("4")),
        1,
        "a GET_FEATURES reply"
    );
}

fuzz_target!(|stream: &[u8]| {
    let fixture = fixture();
    // The first byte picks the controller; the rest is the stream.
    let Some((&pick, mut rest)) = stream.split_first() else {
        return;
    };
    let path = &fixture.sockets[usize::from(pick) % 3];
    let mut sock = UnixStream::connect(path).expect("connect");
    sock.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut keep: Vec<Box<dyn AsRawFd>> = Vec::new();
    while !rest.is_empty() {
        if rest.len() < HEADER_BYTES {
            let _ = sock.write_all(rest);
            break;
        }
        let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        let end = (HEADER_BYTES + size).min(rest.len());
        let (msg, tail) = rest.split_at(end);
        let fds = fds_for(request, flags, &msg[HEADER_BYTES..], fixture, &mut keep);
        // A refused connection (the target hung up) ends the input.
        if sock.send_with_fds(&[msg], &fds).is_err() {
            break;
        }
        drain(&mut sock);
        rest = tail;
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    drop(sock);
    still_serves(path);
});
