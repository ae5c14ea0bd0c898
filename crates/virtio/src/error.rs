//! The crate's errors: one enum, one variant per failure, with context (STYLE #10).

use std::io;
use std::path::PathBuf;

use pollux_env::dma::DmaError;

use crate::ring::LayoutError;

/// Why a virtqueue, a back-end request or a virtio device set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtqueue of size {queue_size}: {source}")]
    Layout {
        queue_size: u16,
        #[source]
        source: LayoutError,
    },
    #[error("could not allocate {len_bytes} bytes of DMA memory for {what}")]
    Alloc {
        what: &'static str,
        len_bytes: usize,
        #[source]
        source: DmaError,
    },
    #[error("could not create the {what} eventfd of queue {queue}")]
    EventFd {
        what: &'static str,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error(
        "could not connect to the vhost-user socket {path} within {timeout_ms} ms \
         (is the back-end running and listening there?)"
    )]
    Connect {
        path: PathBuf,
        timeout_ms: u64,
        #[source]
        source: io::Error,
    },
    #[error("could not duplicate the socket of vhost-user back-end {path}")]
    SocketDup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user back-end {path}: {request} failed")]
    Request {
        path: PathBuf,
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user back-end {path}: {request}: {reason}")]
    Refused {
        path: PathBuf,
        request: &'static str,
        reason: String,
    },
    #[error("virtio device {name}: {reason}")]
    Device { name: String, reason: String },
    #[error("virtqueue {queue}: the device broke the ring: {reason}")]
    RingBroken { queue: u16, reason: String },
}
