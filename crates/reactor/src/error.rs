//! The crate's error type.

use std::io;

use crate::msg::MsgError;

/// Every operating error of the reactor framework. Programmer errors (a channel used on a thread
/// that does not own it, a poller id of another thread) are assertions instead.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("invalid app configuration: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("core {core} of the reactor mask {mask} is not available to this process (available: {available})")]
    CoreUnavailable {
        core: usize,
        /// Masks as SPDK prints them (`0x3`); `CpuMask` is 128 bytes, too big to carry twice.
        mask: String,
        available: String,
    },
    #[error("could not pin the reactor of core {core} to its core")]
    Pin { core: usize },
    #[error("could not start the reactor OS thread for core {core}")]
    Spawn {
        core: usize,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "thread {thread:?}: its cpumask {mask} selects no reactor (reactors run on {reactors})"
    )]
    NoReactorInMask {
        thread: String,
        mask: String,
        reactors: String,
    },
    #[error("cannot {what}: the app is stopping")]
    AppStopping { what: String },
    #[error("thread {thread} has exited")]
    ThreadExited { thread: String },
    #[error("thread {thread}: interrupt fds need interrupt mode (AppConfig::interrupt_mode)")]
    InterruptModeDisabled { thread: String },
    #[error("io device {name:?} is already registered")]
    DeviceExists { name: String },
    #[error("io device {name:?} (id {id}) is not registered")]
    DeviceUnknown { name: String, id: u64 },
    #[error(
        "io device {name:?} still has {channels} live channel(s); put them before unregistering"
    )]
    DeviceBusy { name: String, channels: usize },
    #[error("{what} did not finish within {rounds} polling rounds")]
    NotQuiescent { what: &'static str, rounds: usize },
    #[error("installing the {signal} handler failed")]
    Signal {
        signal: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Msg(#[from] MsgError),
}

pub(crate) fn sys_error(op: &'static str) -> ReactorError {
    ReactorError::Sys {
        op,
        source: io::Error::last_os_error(),
    }
}
