//! NVMe/TCP PDUs from a hostile peer, into the target's codec (`pollux_nvmf::pdu`): the bytes
//! a host (or, for an initiator, a controller) writes on the connection.
//!
//! The input's first byte picks what was negotiated (bit 0 header digests, bit 1 data
//! digests, bits 6:2 the PDU data alignment used to re-encode); the rest is the byte stream,
//! decoded PDU after PDU (at most 64) as the target would take it.
//!
//! Invariants: decoding never panics; a decoded PDU's length and data lie inside the input;
//! the two-step decode the target uses (common header, then header) agrees with the one-shot
//! decode; a decoded PDU re-encodes to bytes that decode to the same PDU and data.
//!
//! Then the same stream goes to the initiator (`pollux_nvmf::host::qpair::TcpQpair`) as a
//! controller's bytes after a valid ICResp, over a socket pair, with a 8 KiB read (CID 0) and a
//! 8 KiB write through R2T (CID 1) outstanding: the queue never panics, never writes outside
//! the read's buffer (guard bytes around it), completes each command at most once, and hands
//! back the rest once it failed.
#![no_main]

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::iovec::IoVec;
use pollux_nvme::spec::{opc, Command};
use pollux_nvmf::host::qpair::{DataDir, QpairOptions, TcpQpair};
use pollux_nvmf::pdu::IcResp;

use libfuzzer_sys::fuzz_target;
use pollux_nvmf::pdu::{
    decode, decode_header, encode, parse_common_header, Digests, EncodeOptions, Limits, Pdu,
    CH_BYTES,
};

const MAX_PDUS: usize = 64;

const GUARD: u8 = 0xee;
const IO_BYTES: usize = 8192;
const MAX_POLLS: usize = 256;

fn dma() -> &'static Arc<DmaMemory> {
    static DMA: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    DMA.get_or_init(|| {
        DmaMemory::new(DmaConfig {
            size_mib: 4,
            no_huge: true,
        })
        .expect("DMA memory")
    })
}

/// The initiator's receive path fed `stream` (see the module documentation).
fn host_queue(digests: Digests, stream: &[u8]) {
    let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
    let mut qpair = TcpQpair::from_fd(
        OwnedFd::from(ours),
        QpairOptions {
            depth: 4,
            digests,
            in_capsule_bytes: 4096,
            max_data_bytes: 65536,
            max_iovs: 2,
        },
    );
    let mut ic = [0u8; 128];
    let len = encode(
        &Pdu::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests,
            maxh2cdata: 4096,
        }),
        &[],
        &EncodeOptions::default(),
        &mut ic,
    )
    .expect("ICResp");
    theirs.write_all(&ic[..len]).expect("ICResp sent");
    for _ in 0..MAX_POLLS {
        qpair.poll(|_, _| {});
        if qpair.is_ready() {
            break;
        }
    }
    assert!(qpair.is_ready(), "a valid ICResp makes the queue ready");
    let mut read_buf = dma().alloc(3 * IO_BYTES, 4096, None).expect("buffer");
    read_buf.fill(0, 3 * IO_BYTES, GUARD).expect("guards");
    let write_buf = dma().alloc(IO_BYTES, 4096, None).expect("buffer");
    let read_iov = IoVec::from_dma_buffer(&read_buf, IO_BYTES, IO_BYTES).expect("iov");
    let write_iov = IoVec::from_dma_buffer(&write_buf, 0, IO_BYTES).expect("iov");
    let mut read = Command::new(opc::READ);
    read.cdw12 = 15;
    let mut write = Command::new(opc::WRITE);
    write.cdw12 = 15;
    assert_eq!(qpair.submit(read, 100, DataDir::Read, &[read_iov]), Ok(0));
    assert_eq!(
        qpair.submit(write, 101, DataDir::Write, &[write_iov]),
        Ok(1)
    );
    theirs.set_nonblocking(true).expect("non-blocking");
    let mut rest = stream;
    let mut completed = Vec::new();
    for _ in 0..MAX_POLLS {
        if !rest.is_empty() {
            if let Ok(n) = theirs.write(rest) {
                rest = &rest[n..];
            }
        }
        qpair.poll(|tag, _| completed.push(tag));
        if qpair.is_failed() && rest.is_empty() {
            break;
        }
    }
    // Each command completes at most once; a failed queue hands back the others.
    let mut taken = Vec::new();
    qpair.fail("fuzz case over");
    qpair.take_outstanding(|tag| taken.push(tag));
    drop(qpair);
    for tag in [100, 101] {
        let times = completed
            .iter()
            .chain(taken.iter())
            .filter(|t| **t == tag)
            .count();
        assert_eq!(
            times, 1,
            "command {tag}: completed {completed:?}, taken {taken:?}"
        );
    }
    let mut guard = vec![0u8; IO_BYTES];
    for offset in [0, 2 * IO_BYTES] {
        read_buf.read_at(offset, &mut guard).expect("guard");
        assert!(
            guard.iter().all(|b| *b == GUARD),
            "a write outside the read's buffer"
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, mut stream)) = input.split_first() else {
        return;
    };
    let whole = stream;
    let digests = Digests {
        header: knobs & 1 != 0,
        data: knobs & 2 != 0,
    };
    let limits = Limits {
        digests,
        max_capsule_data_bytes: 8192,
        max_data_pdu_bytes: 65536,
    };
    let options = EncodeOptions {
        digests,
        pda: (knobs >> 2) & 31,
    };
    let mut out = vec![0u8; 70_000];
    for _ in 0..MAX_PDUS {
        let decoded = match decode(stream, &limits) {
            Ok(decoded) => decoded,
            Err(error) => {
                // Every refusal names a Fatal Error Status the spec defines.
                assert!((1..=6).contains(&error.fes()), "{error}");
                break;
            }
        };
        assert!(decoded.len <= stream.len() && decoded.len >= CH_BYTES);
        assert!(decoded.data.len() <= decoded.len);
        let data_start = decoded.data.as_ptr() as usize - stream.as_ptr() as usize;
        assert!(
            data_start + decoded.data.len() <= decoded.len,
            "data outside the PDU"
        );

        // The target's two steps agree with the one-shot decode.
        let ch: &[u8; CH_BYTES] = stream[..CH_BYTES].try_into().expect("8 bytes");
        let layout = parse_common_header(ch, &limits).expect("the one-shot decode took it");
        assert_eq!(layout.total_bytes(), decoded.len);
        assert_eq!(layout.data_bytes(), decoded.data.len());
        assert_eq!(decode_header(&layout, stream), Ok(decoded.pdu));

        // Re-encoding gives bytes that decode to the same PDU.
        let len = encode(&decoded.pdu, decoded.data, &options, &mut out)
            .unwrap_or_else(|e| panic!("a decoded PDU re-encodes: {e} ({:?})", decoded.pdu));
        let again = decode(&out[..len], &limits).expect("the re-encoded PDU decodes");
        assert_eq!(again.pdu, decoded.pdu);
        assert_eq!(again.data, decoded.data);
        assert_eq!(again.len, len);

        stream = &stream[decoded.len..];
    }
    host_queue(digests, whole);
});
