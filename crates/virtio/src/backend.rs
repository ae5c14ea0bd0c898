//! How the driver reaches a virtio device's control plane: [`VirtioBackend`], one method per
//! request (features, memory table, each vring setting, enable, config space), and its first
//! implementation, the vhost-user front-end [`VhostUserBackend`].
//!
//! The trait keeps callers (`crate::device`) free of any transport: a vhost-vdpa back-end
//! (`/dev/vhost-vdpa-N` ioctls, the same requests) is one more implementation, nothing else
//! changes. Transport-only steps (vhost-user's SET_OWNER and protocol feature negotiation)
//! happen inside the implementation's constructor.
//!
//! The wire protocol is rust-vmm's `vhost` crate (`vhost::vhost_user::Frontend`): an audited,
//! maintained implementation of the vhost-user messages, used by cloud-hypervisor and others.
//! It is the set-up path only: once the rings are set up, the data path is Pollux's own rings
//! in shared memory ([`crate::queue`]) and an eventfd write per kick.
//!
//! Addresses: the driver's memory is given to the back-end with guest physical address =
//! process virtual address (what SPDK's and DPDK's `virtio_user` do), so descriptors and
//! ring addresses carry plain virtual addresses and no translation happens on the I/O path.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pollux_env::dma::SharedRegion;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::VirtioError;
use crate::features::{bit, VHOST_USER_F_PROTOCOL_FEATURES};
use crate::queue::RingAddresses;

/// A virtio device's control plane, one method per request. Set-up path only.
pub trait VirtioBackend: Send {
    /// For logs and errors (`vhost-user /tmp/vhost.0`).
    fn describe(&self) -> String;
    /// The device's feature bits (transport bits such as vhost-user's
    /// `VHOST_USER_F_PROTOCOL_FEATURES` are the implementation's business and masked out).
    fn device_features(&mut self) -> Result<u64, VirtioError>;
    /// The features the driver accepts (a subset of [`Self::device_features`]).
    fn set_features(&mut self, features: u64) -> Result<(), VirtioError>;
    /// Queues the device offers (1 without multi-queue support).
    fn max_queues(&mut self) -> Result<u16, VirtioError>;
    /// The driver's memory, as regions of shared files.
    fn set_mem_table(&mut self, regions: &[SharedRegion<'_>]) -> Result<(), VirtioError>;
    fn set_vring_num(&mut self, queue: u16, size: u16) -> Result<(), VirtioError>;
    fn set_vring_addr(
        &mut self,
        queue: u16,
        size: u16,
        addresses: &RingAddresses,
    ) -> Result<(), VirtioError>;
    fn set_vring_base(&mut self, queue: u16, base: u16) -> Result<(), VirtioError>;
    /// Stops the ring and returns its base (vhost-user GET_VRING_BASE).
    fn get_vring_base(&mut self, queue: u16) -> Result<u32, VirtioError>;
    fn set_vring_kick(&mut self, queue: u16, fd: &EventFd) -> Result<(), VirtioError>;
    fn set_vring_call(&mut self, queue: u16, fd: &EventFd) -> Result<(), VirtioError>;
    fn set_vring_enable(&mut self, queue: u16, enable: bool) -> Result<(), VirtioError>;
    /// Reads `buf.len()` bytes of the device's configuration space at `offset`.
    fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), VirtioError>;
    /// An fd that reports POLLHUP / POLLRDHUP when the back-end goes away (its socket), for
    /// cheap liveness checks from pollers. Owned by the caller (a duplicate).
    fn hangup_fd(&self) -> Result<OwnedFd, VirtioError>;
}

/// Protocol features Pollux asks for: queue count, acknowledged set-up messages (so a failed
/// SET_MEM_TABLE is an error here, not silent I/O failures later), and config space access.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// Replies slower than this fail the request (the back-end is stuck or gone).
pub const VHOST_USER_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval between connection attempts while the back-end is not listening yet.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// The vhost-user front-end over a unix socket.
pub struct VhostUserBackend {
    frontend: Frontend,
    /// A second handle on the socket, for the hang-up check.
    socket: UnixStream,
    path: PathBuf,
    /// Device features as offered (with the transport bit).
    offered: u64,
    protocol: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for VhostUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBackend")
            .field("path", &self.path)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl VhostUserBackend {
    /// Connects to `path`, retrying while the back-end is not up yet (no socket file, or
    /// nobody accepting) for at most `timeout`; then SET_OWNER, GET_FEATURES and the
    /// protocol feature negotiation (MQ, REPLY_ACK, CONFIG when offered).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VirtioError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && started.elapsed() < timeout =>
                {
                    std::thread::sleep(CONNECT_RETRY_INTERVAL);
                }
                Err(source) => {
                    return Err(VirtioError::Connect {
                        path: path.to_path_buf(),
                        timeout_ms: timeout.as_millis() as u64,
                        source,
                    })
                }
            }
        };
        let connect_error = |source| VirtioError::Connect {
            path: path.to_path_buf(),
            timeout_ms: timeout.as_millis() as u64,
            source,
        };
        stream
            .set_read_timeout(Some(VHOST_USER_REPLY_TIMEOUT))
            .map_err(connect_error)?;
        stream
            .set_write_timeout(Some(VHOST_USER_REPLY_TIMEOUT))
            .map_err(connect_error)?;
        let socket = stream.try_clone().map_err(connect_error)?;
        let mut backend = Self {
            frontend: Frontend::from_stream(stream, 1),
            socket,
            path: path.to_path_buf(),
            offered: 0,
            protocol: VhostUserProtocolFeatures::empty(),
        };
        backend
            .frontend
            .set_owner()
            .map_err(|e| backend.request_error("SET_OWNER", e))?;
        backend.offered = backend
            .frontend
            .get_features()
            .map_err(|e| backend.request_error("GET_FEATURES", e))?;
        if backend.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = backend
                .frontend
                .get_protocol_features()
                .map_err(|e| backend.request_error("GET_PROTOCOL_FEATURES", e))?;
            let protocol = offered & wanted_protocol_features();
            backend
                .frontend
                .set_protocol_features(protocol)
                .map_err(|e| backend.request_error("SET_PROTOCOL_FEATURES", e))?;
            backend.protocol = protocol;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                backend
                    .frontend
                    .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        tracing::debug!(
            path = %path.display(),
            features = format_args!("{:#x}", backend.offered),
            protocol = ?backend.protocol,
            "vhost-user: connected"
        );
        Ok(backend)
    }

    /// The protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    fn request_error(&self, request: &'static str, source: vhost::Error) -> VirtioError {
        VirtioError::Request {
            path: self.path.clone(),
            request,
            source,
        }
    }

    fn refused(&self, request: &'static str, reason: String) -> VirtioError {
        VirtioError::Refused {
            path: self.path.clone(),
            request,
            reason,
        }
    }
}

impl VirtioBackend for VhostUserBackend {
    fn describe(&self) -> String {
        format!("vhost-user {}", self.path.display())
    }

    fn device_features(&mut self) -> Result<u64, VirtioError> {
        Ok(self.offered & !bit(VHOST_USER_F_PROTOCOL_FEATURES))
    }

    fn set_features(&mut self, features: u64) -> Result<(), VirtioError> {
        // Keep the protocol-features bit when offered: SET_VRING_ENABLE depends on it.
        let transport = self.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES);
        self.frontend
            .set_features(features | transport)
            .map_err(|e| self.request_error("SET_FEATURES", e))
    }

    fn max_queues(&mut self) -> Result<u16, VirtioError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Ok(1);
        }
        let queues = self
            .frontend
            .get_queue_num()
            .map_err(|e| self.request_error("GET_QUEUE_NUM", e))?;
        u16::try_from(queues)
            .ok()
            .filter(|q| *q > 0)
            .ok_or_else(|| self.refused("GET_QUEUE_NUM", format!("answered {queues} queues")))
    }

    fn set_mem_table(&mut self, regions: &[SharedRegion<'_>]) -> Result<(), VirtioError> {
        let infos: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|region| VhostUserMemoryRegionInfo {
                guest_phys_addr: region.vaddr,
                memory_size: region.len_bytes,
                userspace_addr: region.vaddr,
                mmap_offset: region.fd_offset_bytes,
                mmap_handle: region.fd.as_raw_fd(),
            })
            .collect();
        self.frontend
            .set_mem_table(&infos)
            .map(|_| ())
            .map_err(|e| self.request_error("SET_MEM_TABLE", e))
    }

    fn set_vring_num(&mut self, queue: u16, size: u16) -> Result<(), VirtioError> {
        self.frontend
            .set_vring_num(usize::from(queue), size)
            .map_err(|e| self.request_error("SET_VRING_NUM", e))
    }

    fn set_vring_addr(
        &mut self,
        queue: u16,
        size: u16,
        addresses: &RingAddresses,
    ) -> Result<(), VirtioError> {
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: addresses.desc,
            used_ring_addr: addresses.device,
            avail_ring_addr: addresses.driver,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(usize::from(queue), &config)
            .map_err(|e| self.request_error("SET_VRING_ADDR", e))
    }

    fn set_vring_base(&mut self, queue: u16, base: u16) -> Result<(), VirtioError> {
        self.frontend
            .set_vring_base(usize::from(queue), base)
            .map_err(|e| self.request_error("SET_VRING_BASE", e))
    }

    fn get_vring_base(&mut self, queue: u16) -> Result<u32, VirtioError> {
        self.frontend
            .get_vring_base(usize::from(queue))
            .map_err(|e| self.request_error("GET_VRING_BASE", e))
    }

    fn set_vring_kick(&mut self, queue: u16, fd: &EventFd) -> Result<(), VirtioError> {
        self.frontend
            .set_vring_kick(usize::from(queue), fd)
            .map_err(|e| self.request_error("SET_VRING_KICK", e))
    }

    fn set_vring_call(&mut self, queue: u16, fd: &EventFd) -> Result<(), VirtioError> {
        self.frontend
            .set_vring_call(usize::from(queue), fd)
            .map_err(|e| self.request_error("SET_VRING_CALL", e))
    }

    fn set_vring_enable(&mut self, queue: u16, enable: bool) -> Result<(), VirtioError> {
        if self.offered & bit(VHOST_USER_F_PROTOCOL_FEATURES) == 0 {
            // Without protocol features a ring is enabled by its kick fd (vhost-user spec,
            // "Ring states").
            return Ok(());
        }
        self.frontend
            .set_vring_enable(usize::from(queue), enable)
            .map_err(|e| self.request_error("SET_VRING_ENABLE", e))
    }

    fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), VirtioError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(self.refused(
                "GET_CONFIG",
                "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG, so the device's \
                 size cannot be read"
                    .to_string(),
            ));
        }
        let size = u32::try_from(buf.len())
            .map_err(|_| self.refused("GET_CONFIG", format!("{} bytes asked", buf.len())))?;
        let zeroes = vec![0u8; buf.len()];
        let (_, payload) = self
            .frontend
            .get_config(
                offset,
                size,
                vhost::vhost_user::message::VhostUserConfigFlags::empty(),
                &zeroes,
            )
            .map_err(|e| self.request_error("GET_CONFIG", e))?;
        if payload.len() != buf.len() {
            return Err(self.refused(
                "GET_CONFIG",
                format!("{} bytes answered, {} asked", payload.len(), buf.len()),
            ));
        }
        buf.copy_from_slice(&payload);
        Ok(())
    }

    fn hangup_fd(&self) -> Result<OwnedFd, VirtioError> {
        self.socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| VirtioError::SocketDup {
                path: self.path.clone(),
                source,
            })
    }
}
