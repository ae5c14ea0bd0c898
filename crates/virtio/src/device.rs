//! A virtio-blk device driven through any [`VirtioBackend`]: feature negotiation, the
//! configuration space, the memory table and N virtqueues, each with its kick and call
//! eventfds, kept in a pool from which channels take one queue each.

use std::sync::Arc;

use pollux_env::dma::DmaMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::VirtioBackend;
use crate::blk::{
    BlkConfig, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use crate::error::VirtioError;
use crate::features::{
    bit, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::queue::{RingFormat, Virtqueue};

/// What the driver asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Queues wanted (clamped to what the device offers, as SPDK does, with a warning).
    pub vq_count: u16,
    /// Entries per queue.
    pub vq_size: u16,
    /// Use the packed layout when the device offers VIRTIO_F_RING_PACKED.
    pub packed_ring: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            vq_count: 1,
            vq_size: 512,
            packed_ring: false,
            event_idx: true,
        }
    }
}

/// One virtqueue with its notification fds; a channel owns it while it lives.
pub struct QueueSet {
    pub queue: Virtqueue,
    /// Written to notify the device (when [`Virtqueue::publish`] says so).
    pub kick: EventFd,
    /// Given to the device as its call fd. The driver polls and suppresses used-buffer
    /// notifications, so it stays quiet (back-ends insist on having one), except while an
    /// interrupt-mode owner waits on it (`Virtqueue::enable_used_notifications`).
    pub call: EventFd,
}

impl QueueSet {
    /// Notifies the device. An eventfd write fails only on counter overflow (never, with 1).
    #[inline]
    pub fn kick(&self) {
        if let Err(error) = self.kick.write(1) {
            tracing::warn!(queue = self.queue.index(), %error, "virtio: kick failed");
        }
    }
}

/// A started virtio-blk device.
pub struct BlkDevice {
    name: String,
    backend: Box<dyn VirtioBackend>,
    features: u64,
    config: BlkConfig,
    block_size_bytes: u32,
    num_blocks: u64,
    /// `None`: taken by a channel.
    pool: Vec<Option<QueueSet>>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("name", &self.name)
            .field("backend", &self.backend.describe())
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.pool.len())
            .finish()
    }
}

/// The features the driver understands.
fn driver_features(options: &DeviceOptions) -> u64 {
    let mut wanted = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_RO)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        // One ring slot per request (the channel's tables, `crate::bdev`): QD N fits a queue
        // of N entries, and the device reads a request's descriptors and header from one line.
        | bit(VIRTIO_RING_F_INDIRECT_DESC);
    if options.event_idx {
        wanted |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if options.packed_ring {
        wanted |= bit(VIRTIO_F_RING_PACKED);
    }
    wanted
}

impl BlkDevice {
    /// Negotiates, reads the configuration, shares `dma` and sets up the queues. On error the
    /// back-end is dropped (its connection closed), which resets the device.
    pub fn start(
        name: &str,
        mut backend: Box<dyn VirtioBackend>,
        dma: &Arc<DmaMemory>,
        options: DeviceOptions,
    ) -> Result<Self, VirtioError> {
        let device_error = |reason: String| VirtioError::Device {
            name: name.to_string(),
            reason,
        };
        if options.vq_count == 0 {
            return Err(device_error("vq_count must be at least 1".to_string()));
        }
        let offered = backend.device_features()?;
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(device_error(format!(
                "{} offers features {offered:#x} without VIRTIO_F_VERSION_1: legacy devices \
                 are not supported",
                backend.describe()
            )));
        }
        let features = offered & driver_features(&options);
        backend.set_features(features)?;
        let mut raw = [0u8; BlkConfig::SIZE_BYTES];
        backend.get_config(0, &mut raw)?;
        let config = BlkConfig::from_le_bytes(&raw);

        let block_size_bytes = if features & bit(VIRTIO_BLK_F_BLK_SIZE) != 0 {
            config.blk_size
        } else {
            512
        };
        if block_size_bytes < 512 || !block_size_bytes.is_power_of_two() {
            return Err(device_error(format!(
                "invalid block size {block_size_bytes} in the configuration space"
            )));
        }
        let num_blocks = config
            .capacity_sectors
            .checked_mul(512)
            .map(|bytes| bytes / u64::from(block_size_bytes))
            .filter(|blocks| *blocks > 0)
            .ok_or_else(|| {
                device_error(format!(
                    "capacity of {} sectors gives no {block_size_bytes}-byte block",
                    config.capacity_sectors
                ))
            })?;

        let mut device_queues = if features & bit(VIRTIO_BLK_F_MQ) != 0 {
            config.num_queues.max(1)
        } else {
            1
        };
        let backend_queues = backend.max_queues()?;
        if backend_queues == 0 {
            // A device with no queue carries no I/O: refuse it rather than start one that
            // every submission would find without a ring (found by the virtio_user fuzz target).
            return Err(device_error(
                "the back-end offers no virtqueue (GET_QUEUE_NUM answered 0)".to_string(),
            ));
        }
        device_queues = device_queues.min(backend_queues);
        let queue_count = if options.vq_count > device_queues {
            tracing::warn!(
                device = name,
                requested = options.vq_count,
                available = device_queues,
                "virtio: fewer queues than requested"
            );
            device_queues
        } else {
            options.vq_count
        };

        backend.set_mem_table(&dma.shared_regions())?;

        let format = if features & bit(VIRTIO_F_RING_PACKED) != 0 {
            RingFormat::Packed
        } else {
            RingFormat::Split
        };
        let event_idx = features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut pool = Vec::with_capacity(usize::from(queue_count));
        for index in 0..queue_count {
            let queue = Virtqueue::new(dma, index, options.vq_size, format, event_idx)?;
            let eventfd = |what| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioError::EventFd {
                    what,
                    queue: index,
                    source,
                })
            };
            let set = QueueSet {
                kick: eventfd("kick")?,
                call: eventfd("call")?,
                queue,
            };
            backend.set_vring_num(index, options.vq_size)?;
            backend.set_vring_base(index, set.queue.base())?;
            backend.set_vring_addr(index, options.vq_size, &set.queue.addresses())?;
            backend.set_vring_kick(index, &set.kick)?;
            backend.set_vring_call(index, &set.call)?;
            backend.set_vring_enable(index, true)?;
            pool.push(Some(set));
        }
        tracing::info!(
            device = name,
            backend = %backend.describe(),
            features = format_args!("{features:#x}"),
            block_size_bytes,
            num_blocks,
            queues = queue_count,
            vq_size = options.vq_size,
            ?format,
            event_idx,
            "virtio: blk device started"
        );
        Ok(Self {
            name: name.to_string(),
            backend,
            features,
            config,
            block_size_bytes,
            num_blocks,
            pool,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn has_feature(&self, feature: u32) -> bool {
        self.features & bit(feature) != 0
    }

    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    pub fn queue_count(&self) -> usize {
        self.pool.len()
    }

    pub fn backend(&self) -> &dyn VirtioBackend {
        self.backend.as_ref()
    }

    /// Takes a free queue (`None`: every queue is in use).
    pub fn take_queue(&mut self) -> Option<QueueSet> {
        self.pool.iter_mut().find_map(Option::take)
    }

    /// Duplicates of every pooled queue's call eventfd (written to wake channels that sleep
    /// on them when the controller fails).
    pub fn call_fds(&self) -> Vec<EventFd> {
        self.pool
            .iter()
            .flatten()
            .filter_map(|set| set.call.try_clone().ok())
            .collect()
    }

    /// Gives a queue back to the pool.
    pub fn return_queue(&mut self, set: QueueSet) {
        let index = usize::from(set.queue.index());
        if let Some(slot) = self.pool.get_mut(index) {
            *slot = Some(set);
        }
    }
}
