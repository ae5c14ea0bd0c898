//! Device-independent feature bits (virtio 1.2 §6), as bit numbers.

/// Descriptors may point to indirect tables (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `used_event` / `avail_event` suppress notifications (§2.7.7, §2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Virtio 1.0 or later (little-endian rings and config).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// The device sits behind an IOMMU-like translation (platform DMA).
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Packed virtqueue layout (§2.8).
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// Buffers are used in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;
/// The driver may send notifications with extra data.
pub const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;
/// vhost-user: the VHOST_USER_GET_PROTOCOL_FEATURES message exists (vhost-user spec).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// `1 << bit` as a feature mask.
#[inline]
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}
