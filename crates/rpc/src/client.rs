//! A blocking client, as SPDK's `rpc/client.py`: requests go out pretty-printed with no
//! trailing newline (exactly as rpc.py sends them), the answer is read until one complete
//! JSON value with the request's id has arrived. Used by `pollux-rpc` and by tests.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::RpcError;
use crate::framing::{Frame, Framer};

/// Largest response the client reads.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method}: {op} failed")]
    Io {
        method: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{method}: no answer within {timeout:?}")]
    Timeout { method: String, timeout: Duration },
    #[error("{method}: the server closed the connection before answering")]
    Closed { method: String },
    #[error("{method}: malformed response: {reason}")]
    Protocol { method: String, reason: String },
    /// The server's error response.
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// A connection to a server.
#[derive(Debug)]
pub struct RpcClient {
    stream: UnixStream,
    framer: Framer,
    next_id: u64,
    timeout: Duration,
}

impl RpcClient {
    /// Connects; `timeout` bounds each call.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            stream,
            framer: Framer::default(),
            next_id: 1,
            timeout,
        })
    }

    /// Calls `method` and waits for its answer: the result, or the server's error as
    /// [`ClientError::Rpc`].
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "jsonrpc": "2.0", "method": method, "id": id });
        if let Some(params) = params {
            request["params"] = params;
        }
        let bytes = serde_json::to_vec_pretty(&request).map_err(|e| ClientError::Protocol {
            method: method.to_string(),
            reason: e.to_string(),
        })?;
        let io = |op| {
            let method = method.to_string();
            move |source| ClientError::Io { method, op, source }
        };
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io("set_write_timeout"))?;
        self.stream.write_all(&bytes).map_err(io("write"))?;
        self.wait(method, id)
    }

    fn wait(&mut self, method: &str, id: u64) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            while let Some(frame) = self.framer.next(MAX_RESPONSE_BYTES) {
                let value = match frame {
                    Frame::Value(value) => value,
                    Frame::Fatal(error) => {
                        return Err(ClientError::Protocol {
                            method: method.to_string(),
                            reason: error.message,
                        })
                    }
                };
                if value.get("id").and_then(Value::as_u64) != Some(id) {
                    if let Some(error) = value.get("error") {
                        // An error not tied to this request (a parse error of the stream).
                        return Err(response_error(method, error));
                    }
                    continue;
                }
                if let Some(error) = value.get("error") {
                    return Err(response_error(method, error));
                }
                return value
                    .get("result")
                    .cloned()
                    .ok_or_else(|| ClientError::Protocol {
                        method: method.to_string(),
                        reason: "neither \"result\" nor \"error\"".to_string(),
                    });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    method: method.to_string(),
                    timeout: self.timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| ClientError::Io {
                    method: method.to_string(),
                    op: "set_read_timeout",
                    source,
                })?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ClientError::Closed {
                        method: method.to_string(),
                    })
                }
                Ok(count) => self.framer.push(&chunk[..count]),
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ClientError::Io {
                        method: method.to_string(),
                        op: "read",
                        source,
                    })
                }
            }
        }
    }
}

fn response_error(method: &str, error: &Value) -> ClientError {
    let code = error
        .get("code")
        .and_then(Value::as_i64)
        .and_then(|c| i32::try_from(c).ok());
    let message = error.get("message").and_then(Value::as_str);
    match (code, message) {
        (Some(code), Some(message)) => ClientError::Rpc(RpcError::new(code, message)),
        _ => ClientError::Protocol {
            method: method.to_string(),
            reason: format!("error object without code and message: {error}"),
        },
    }
}
