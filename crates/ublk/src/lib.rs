//! Pollux ublk target: serves any Pollux bdev as a host kernel block device `/dev/ublkbN`
//! through the Linux ublk driver (`ublk_drv`, Linux 6.0+), as SPDK's ublk target does.
//!
//! The crate sits above the bdev layer and the reactor; bdevs know nothing of it.
//!
//! - [`sys`]: the ublk UAPI (`ublk_cmd.h`) as `#[repr(C)]` structs with checked sizes, the
//!   ioctl-encoded opcodes, the descriptor mapping.
//! - `ctrl`: control commands on `/dev/ublk-control` (ADD_DEV, SET_PARAMS, START_DEV,
//!   STOP_DEV, DEL_DEV, GET_DEV_INFO, START/END_USER_RECOVERY), on an io_uring with 128-byte
//!   SQEs, always from an OS thread that serves no queue.
//! - [`params`]: the kernel's parameters derived from a bdev, and requests decoded into bdev
//!   operations (hostile descriptors refused with an errno, never a panic).
//! - `queue`: the data path, one queue per poller on a reactor thread, its own io_uring;
//!   where the data is copied is described there.
//! - [`target`]: [`UblkTarget`], disks started, recovered, listed and stopped at run time.
//! - [`config`]: the `ublk` subsystem of SPDK's JSON config and the methods' parameters.
//!
//! Unsafe code: the descriptor mapping (`mmap`, volatile reads) and the byte view of the UAPI
//! structs in `sys`, and the SQE pushes (which name buffers the kernel writes) in `ctrl` and
//! `queue`; each block with its SAFETY argument.

pub mod config;
mod ctrl;
pub mod error;
pub mod params;
mod queue;
pub mod sys;
pub mod target;

pub use error::UblkError;
pub use target::{DiskInfo, StartOptions, UblkTarget};

/// An error and its sources, `: `-separated (for logs).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
