//! The crate's errors: [`RpcError`], the JSON-RPC error object a method answers with, and
//! [`ServerError`], what can go wrong setting the server up.

use std::path::PathBuf;

use pollux_bdev::BdevError;
use serde_json::{json, Value};

/// JSON-RPC 2.0 error codes, SPDK's values (`include/spdk/jsonrpc.h`).
pub mod code {
    /// The bytes received are not JSON.
    pub const PARSE_ERROR: i32 = -32700;
    /// JSON, but not a JSON-RPC 2.0 request object.
    pub const INVALID_REQUEST: i32 = -32600;
    /// No method by that name.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// A parameter is missing, unknown, of the wrong type or refused.
    pub const INVALID_PARAMS: i32 = -32602;
    /// The method failed for a reason that is not its parameters.
    pub const INTERNAL_ERROR: i32 = -32603;
    /// SPDK's `SPDK_JSONRPC_ERROR_INVALID_STATE`: a startup-only method at run time, or the
    /// other way round.
    pub const INVALID_STATE: i32 = -1;
    /// `-EBUSY`: the object is in use (a claimed bdev, a test run in progress).
    pub const EBUSY: i32 = -16;
    /// `-EEXIST`: the name is taken.
    pub const EEXIST: i32 = -17;
    /// `-ENODEV`: no such bdev or controller.
    pub const ENODEV: i32 = -19;
}

/// A JSON-RPC error response: `{"code": ..., "message": ...}`. Parameter errors name the
/// parameter in `message`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (JSON-RPC error {code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        Self::new(code::PARSE_ERROR, format!("Parse error: {detail}"))
    }

    pub fn invalid_request(detail: impl std::fmt::Display) -> Self {
        Self::new(code::INVALID_REQUEST, format!("Invalid request: {detail}"))
    }

    pub fn method_not_found(method: &str) -> Self {
        Self::new(
            code::METHOD_NOT_FOUND,
            format!("Method not found: {method:?}"),
        )
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, message)
    }

    /// The error object as it goes on the wire.
    pub fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

/// An error and its sources on one line.
pub use pollux_env::error_chain;

impl From<BdevError> for RpcError {
    /// Parameter errors become `-32602`; a taken name `-EEXIST`, a missing bdev `-ENODEV`, a
    /// claimed one `-EBUSY` (SPDK's errno-valued codes); anything else `-32603`. The message
    /// is the whole error chain, which names the method and the parameter.
    fn from(error: BdevError) -> Self {
        let code = match &error {
            BdevError::MissingParam { .. }
            | BdevError::WrongType { .. }
            | BdevError::UnknownParam { .. }
            | BdevError::InvalidParam { .. }
            | BdevError::BadBlockSize { .. }
            | BdevError::ZeroBlocks { .. }
            | BdevError::TooLarge { .. }
            | BdevError::EmptyName => code::INVALID_PARAMS,
            BdevError::DuplicateName { .. } | BdevError::NameTaken { .. } => code::EEXIST,
            BdevError::NotFound { .. } => code::ENODEV,
            BdevError::Claimed { .. } | BdevError::OtherWriters { .. } => code::EBUSY,
            BdevError::Create { source, .. } => match source.as_ref() {
                BdevError::InvalidParam { .. } => code::INVALID_PARAMS,
                BdevError::NameTaken { .. } | BdevError::DuplicateName { .. } => code::EEXIST,
                _ => code::INTERNAL_ERROR,
            },
            _ => code::INTERNAL_ERROR,
        };
        Self::new(code, error_chain(&error))
    }
}

/// Setting the server up failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("RPC socket {path}: another process is listening on it")]
    SocketInUse { path: PathBuf },
    #[error("RPC socket {path}: could not remove the stale socket file")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RPC socket {path}: could not listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RPC server: {op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("RPC method {method:?} is registered twice")]
    MethodTaken { method: String },
    #[error("save_config subsystem {subsystem:?} depends on {depends_on:?}, which is not registered before it")]
    UnknownDependency {
        subsystem: String,
        depends_on: String,
    },
    #[error("RPC server configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}
