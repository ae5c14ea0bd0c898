//! The JSON-RPC server's stream framer (`pollux_rpc::framing`): bytes a client sends, in any
//! pieces.
//!
//! Invariants: the frames do not depend on how the stream was cut into reads (the same values,
//! then the same fatal error, as when it arrives in one piece); a value handed out is an object
//! or an array (what a request can be); after a fatal error nothing more is read (the server
//! closes), and a stream cut short leaves an end-of-stream error unless only blanks are left.
//! A small size limit is exercised too (refusal, never a panic).
//!
//! The input is the byte stream itself (the seeds are requests recorded from SPDK's rpc.py), so
//! the reads it is cut into are derived from it: pieces of 1 to 13 bytes, sized by the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollux_rpc::framing::{Frame, Framer};
use serde_json::Value;

/// What a framer makes of `pieces`: the values, then the fatal error's JSON or the
/// end-of-stream error's JSON (if any).
fn frames(pieces: &[&[u8]], max_bytes: usize) -> (Vec<Value>, Option<Value>) {
    let mut framer = Framer::default();
    let mut values = Vec::new();
    for piece in pieces {
        framer.push(piece);
        while let Some(frame) = framer.next(max_bytes) {
            match frame {
                Frame::Value(value) => {
                    assert!(
                        value.is_object() || value.is_array(),
                        "a request must be an object or array: {value}"
                    );
                    values.push(value);
                }
                Frame::Fatal(error) => return (values, Some(error.to_json())),
            }
        }
    }
    (values, framer.at_eof().map(|e| e.to_json()))
}

fuzz_target!(|stream: &[u8]| {
    let whole = frames(&[stream], usize::MAX);
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let at = (usize::from(rest[0]) % 13 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(at);
        pieces.push(piece);
        rest = tail;
    }
    let cut = frames(&pieces, usize::MAX);
    assert_eq!(whole.0, cut.0, "values depend on how the stream was cut");
    assert_eq!(
        whole.1.is_some(),
        cut.1.is_some(),
        "an error depends on how the stream was cut: {:?} vs {:?}",
        whole.1,
        cut.1
    );
    let _ = frames(&pieces, stream.len() / 2);
});
