//! Splitting a byte stream into JSON values: a request may arrive in pieces, several may
//! arrive in one read, and rpc.py sends pretty-printed JSON with no newline after it.
//!
//! The framer scans each byte once (depth of `{`/`[`, strings and escapes) to find where a
//! top-level object or array ends, and only then hands that slice to `serde_json`: a request
//! of several megabytes that trickles in is scanned in O(n), not re-parsed at every read.
//! Anything before the end that is not JSON is found by the parse of the complete slice.

use serde_json::Value;

use crate::error::RpcError;

/// What the framer found.
#[derive(Debug)]
pub enum Frame {
    /// A complete top-level value.
    Value(Value),
    /// The stream cannot be resynchronised: answer with this error and close.
    Fatal(RpcError),
}

#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Bytes before this were handed out; dropped at the next push (one move per read,
    /// not one per request when a read carries many).
    head: usize,
    /// Next byte to scan.
    scan: usize,
    /// Where the current value starts (`None`: between values).
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escape: bool,
}

impl Framer {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.scan -= self.head;
            if let Some(start) = &mut self.start {
                *start -= self.head;
            }
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Whether only whitespace is buffered.
    pub fn is_blank(&self) -> bool {
        self.buf[self.head..].iter().all(u8::is_ascii_whitespace)
    }

    /// The next complete value, if one is buffered; `max_bytes` bounds one value.
    pub fn next(&mut self, max_bytes: usize) -> Option<Frame> {
        while self.scan < self.buf.len() {
            let at = self.scan;
            let byte = self.buf[at];
            self.scan += 1;
            let Some(start) = self.start else {
                match byte {
                    b if b.is_ascii_whitespace() => continue,
                    b'{' | b'[' => {
                        self.start = Some(at);
                        self.depth = 1;
                    }
                    b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                        return Some(Frame::Fatal(RpcError::invalid_request(
                            "a request must be a JSON object",
                        )))
                    }
                    other => {
                        return Some(Frame::Fatal(RpcError::parse_error(format!(
                            "unexpected byte 0x{other:02x} where a JSON value should start"
                        ))))
                    }
                }
                continue;
            };
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if byte == b'\\' {
                    self.escape = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let end = at + 1;
                        let parsed = serde_json::from_slice::<Value>(&self.buf[start..end]);
                        self.head = end;
                        self.start = None;
                        return Some(match parsed {
                            Ok(value) => Frame::Value(value),
                            Err(error) => Frame::Fatal(RpcError::parse_error(error)),
                        });
                    }
                }
                _ => {}
            }
        }
        match self.start {
            None => {
                // Only whitespace after the last value: consumed.
                self.head = self.buf.len();
                None
            }
            Some(start) if self.buf.len() - start > max_bytes => {
                Some(Frame::Fatal(RpcError::invalid_request(format!(
                    "the request exceeds the server's limit of {max_bytes} bytes"
                ))))
            }
            Some(_) => None,
        }
    }

    /// At end of stream: an error for an incomplete value left in the buffer.
    pub fn at_eof(&self) -> Option<RpcError> {
        (!self.is_blank()).then(|| {
            RpcError::parse_error(format!(
                "the connection was closed inside a request ({} bytes of incomplete JSON)",
                self.buf.len() - self.head
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(framer: &mut Framer) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(frame) = framer.next(1 << 20) {
            match frame {
                Frame::Value(v) => out.push(v),
                Frame::Fatal(e) => panic!("unexpected fatal frame: {e}"),
            }
        }
        out
    }

    #[test]
    fn pieces_and_several_values_per_read() {
        let text = br#"{"a": "x}{\"]", "b": [1, {"c": 2}]}
  {"d":3}{"e":[]}"#;
        for split in 1..text.len() {
            let mut framer = Framer::default();
            framer.push(&text[..split]);
            let mut got = values(&mut framer);
            framer.push(&text[split..]);
            got.extend(values(&mut framer));
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0]["a"], "x}{\"]");
            assert_eq!(got[2]["e"], serde_json::json!([]));
        }
    }

    #[test]
    fn malformed_scalar_and_oversized_values_are_fatal() {
        let mut framer = Framer::default();
        framer.push(br#"{"a": nope}"#);
        assert!(matches!(framer.next(1 << 20), Some(Frame::Fatal(e)) if e.code == -32700));
        let mut framer = Framer::default();
        framer.push(b"  42");
        assert!(matches!(framer.next(1 << 20), Some(Frame::Fatal(e)) if e.code == -32600));
        let mut framer = Framer::default();
        framer.push(b"}");
        assert!(matches!(framer.next(1 << 20), Some(Frame::Fatal(e)) if e.code == -32700));
        let mut framer = Framer::default();
        framer.push(b"{\"a\": \"");
        framer.push(&[b'x'; 100]);
        assert!(matches!(framer.next(64), Some(Frame::Fatal(e)) if e.code == -32600));
        let mut framer = Framer::default();
        framer.push(b"{\"a\": ");
        assert!(framer.next(64).is_none());
        assert!(framer.at_eof().is_some());
    }

    #[test]
    fn deep_nesting_is_a_parse_error_not_a_stack_overflow() {
        let mut framer = Framer::default();
        let depth = 100_000;
        framer.push(&vec![b'['; depth]);
        framer.push(&vec![b']'; depth]);
        assert!(matches!(framer.next(1 << 20), Some(Frame::Fatal(e)) if e.code == -32700));
    }
}
