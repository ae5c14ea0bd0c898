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
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollux_nvmf::pdu::{
    decode, decode_header, encode, parse_common_header, Digests, EncodeOptions, Limits, CH_BYTES,
};

const MAX_PDUS: usize = 64;

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, mut stream)) = input.split_first() else {
        return;
    };
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
                return;
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
});
