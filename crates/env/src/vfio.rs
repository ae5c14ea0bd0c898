//! VFIO: a type1 IOMMU container, PCI devices bound to `vfio-pci`, BAR mapping and DMA mapping.
//!
//! The flow is SPDK's VFIO mode:
//!
//! 1. [`VfioPciDevice::open`] checks that the device and every other device of its IOMMU group
//!    are bound to `vfio-pci` (or to nothing), opens `/dev/vfio/<group>` and attaches it to a
//!    [`VfioContainer`] (the process-wide one unless [`VfioPciDevice::open_in`] names another).
//!    The first attached group selects the type1 IOMMU; the container then reads the IOMMU's
//!    usable IOVA ranges (`VFIO_IOMMU_GET_INFO`, capability `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`).
//! 2. [`VfioPciDevice::enable_bus_master`] lets the device issue DMA; [`VfioPciDevice::map_bar`]
//!    maps a memory BAR, accessed only through volatile, bounds-checked [`Bar`] reads/writes.
//! 3. The container implements [`DmaMapper`]: a region keeps IOVA = virtual address when the
//!    usable ranges hold it ([`IovaMode::Identity`]); otherwise (an IOMMU with fewer address bits
//!    than the process's virtual addresses, e.g. QEMU's intel-iommu with its default
//!    `aw-bits=39`) it gets an IOVA from a first-fit allocator over the usable ranges
//!    ([`IovaMode::Allocated`]).
//!
//! `vfio-ioctls` opens the container, group and device; the IOMMU ioctls it does not expose
//! (`VFIO_IOMMU_GET_INFO` with its capability chain) and the DMA map/unmap (so errors keep their
//! errno) are raw ioctls on the container fd with the `vfio-bindings` structs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio as uapi;

use crate::memmap::DmaMapper;
use crate::pci::PciAddress;

/// The container device every VFIO user opens first.
pub const VFIO_CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// Where sysfs lives; only tests would want another root.
const SYSFS_ROOT: &str = "/sys";

/// `_IO(VFIO_TYPE, VFIO_BASE + n)` (include/uapi/linux/vfio.h); `_IO` has no size or direction bits.
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((uapi::VFIO_TYPE as libc::c_ulong) << 8) | (uapi::VFIO_BASE + n) as libc::c_ulong
}
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

/// PCI config space: command register and its bits (PCI Local Bus 3.0, 6.2.2).
const PCI_COMMAND_OFFSET: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Class code of PCI-to-PCI bridges (base class 06, subclass 04).
const PCI_CLASS_BRIDGE_PCI: u32 = 0x0604;

/// Bounds every walk of the kernel's capability chain (it is a linked list by offsets).
const MAX_IOMMU_INFO_CAPS: usize = 64;
/// `VFIO_IOMMU_GET_INFO` answers are a few hundred bytes; refuse to grow the buffer beyond this.
const MAX_IOMMU_INFO_BYTES: u32 = 64 * 1024;
/// Allocated IOVAs are aligned to at most this (a 1 GiB IOMMU superpage).
const MAX_IOVA_ALIGN: u64 = 1 << 30;

/// Everything VFIO setup and DMA mapping can refuse, with the device, file and errno involved.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error(
        "{path} is not accessible; load vfio-pci and bind the device with \
         `scripts/setup.sh`, and run as root or as a user with access to /dev/vfio"
    )]
    ContainerOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VFIO container at {path} is unusable (API version or type1v2 IOMMU support)")]
    ContainerSetup {
        path: PathBuf,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    #[error("PCI device {address} not found at {path}")]
    DeviceNotFound {
        address: PciAddress,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path} for PCI device {address}")]
    Sysfs {
        address: PciAddress,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "PCI device {address} is not bound to vfio-pci (driver: {}); bind it with `scripts/setup.sh`",
        driver.as_deref().unwrap_or("none")
    )]
    NotBoundToVfio {
        address: PciAddress,
        driver: Option<String>,
    },
    #[error(
        "PCI device {address} has no IOMMU group (no {path}); enable the IOMMU \
         (intel_iommu=on or amd_iommu=on on the kernel command line)"
    )]
    NoIommuGroup {
        address: PciAddress,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("IOMMU group link {path} of PCI device {address} does not name a group number")]
    BadIommuGroup { address: PciAddress, path: PathBuf },
    #[error(
        "IOMMU group {group} of PCI device {address} also holds {other}, bound to {driver} \
         (not vfio-pci): VFIO needs every device of the group bound to vfio-pci or to no \
         driver; bind them all with `scripts/setup.sh`"
    )]
    GroupNotViable {
        address: PciAddress,
        group: u32,
        other: String,
        driver: String,
    },
    #[error(
        "{path} (IOMMU group of PCI device {address}) is not accessible; is the \
         device bound to vfio-pci (`scripts/setup.sh`), is the group free (EBUSY: another \
         process holds it), and may this user open /dev/vfio?"
    )]
    GroupOpen {
        address: PciAddress,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VFIO refused to attach PCI device {address} (IOMMU group {group}) to the container")]
    Attach {
        address: PciAddress,
        group: u32,
        #[source]
        source: vfio_ioctls::VfioError,
    },
    #[error("cannot duplicate the VFIO device fd of {address}")]
    DeviceFd {
        address: PciAddress,
        #[source]
        source: io::Error,
    },
    #[error("VFIO_IOMMU_GET_INFO on {path} failed")]
    IommuInfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VFIO_IOMMU_GET_INFO answer is malformed: {reason}")]
    IommuInfoMalformed { reason: &'static str },
    #[error("PCI device {address}: config space {what} of {width} bytes at {offset:#x} failed")]
    Config {
        address: PciAddress,
        what: &'static str,
        offset: u64,
        width: usize,
        #[source]
        source: io::Error,
    },
    #[error("PCI device {address}: BAR{index} cannot be mapped ({reason}; region flags {flags:#x}, size {size:#x})")]
    BarNotMappable {
        address: PciAddress,
        index: u32,
        reason: &'static str,
        flags: u32,
        size: u64,
    },
    #[error("PCI device {address}: mmap of BAR{index} ({size:#x} bytes at fd offset {offset:#x}) failed")]
    BarMmap {
        address: PciAddress,
        index: u32,
        size: u64,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("BAR{index} access of {width} bytes at offset {offset:#x} is misaligned or outside its {len:#x} bytes")]
    BarOffset {
        index: u32,
        offset: u64,
        width: usize,
        len: usize,
    },
    #[error("no PCI device is attached to the VFIO container yet, so its IOMMU is unknown; open a VfioPciDevice before mapping DMA")]
    NoDevice,
    #[error("DMA map of {len:#x} bytes at {vaddr:#x} refused: {reason}")]
    DmaInvalid {
        vaddr: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("no usable IOVA range has {len:#x} free bytes aligned to {align:#x} (usable ranges: {ranges})")]
    IovaExhausted {
        len: u64,
        align: u64,
        ranges: String,
    },
    #[error("VFIO_IOMMU_MAP_DMA of {len:#x} bytes at {vaddr:#x} to IOVA {iova:#x} failed")]
    DmaMap {
        vaddr: u64,
        iova: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("VFIO_IOMMU_UNMAP_DMA of {len:#x} bytes at IOVA {iova:#x} failed")]
    DmaUnmap {
        iova: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("DMA unmap of {len:#x} bytes at IOVA {iova:#x}: no mapping starts there with that length{}",
        found.map(|found| format!(" (the mapping at that IOVA has {found:#x} bytes)")).unwrap_or_default())]
    DmaNotMapped {
        iova: u64,
        len: u64,
        found: Option<u64>,
    },
}

impl VfioError {
    /// The `io::ErrorKind` closest to this error, for the [`DmaMapper`] interface.
    fn io_kind(&self) -> io::ErrorKind {
        match self {
            Self::DmaMap { source, .. } | Self::DmaUnmap { source, .. } => source.kind(),
            Self::DmaInvalid { .. } => io::ErrorKind::InvalidInput,
            Self::DmaNotMapped { .. } => io::ErrorKind::NotFound,
            Self::IovaExhausted { .. } => io::ErrorKind::OutOfMemory,
            _ => io::ErrorKind::Other,
        }
    }
}

impl From<VfioError> for io::Error {
    fn from(error: VfioError) -> Self {
        // The kind follows the kernel's errno where there is one; the message keeps the context
        // and `source()` the original error.
        io::Error::new(error.io_kind(), error)
    }
}

/// One usable IOVA range, both ends inclusive (as the kernel reports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

impl IovaRange {
    /// Whether `[start, start + len)` lies inside this range (never for `len == 0`).
    fn holds(&self, start: u64, len: u64) -> bool {
        match len
            .checked_sub(1)
            .and_then(|extra| start.checked_add(extra))
        {
            Some(last) => start >= self.start && last <= self.end,
            None => false,
        }
    }
}

/// What the type1 IOMMU backend reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Bitmap of supported IOMMU page sizes (bit n set: 2^n bytes).
    pub page_sizes: u64,
    /// Usable IOVA ranges, sorted. Kernels before 5.4 do not report them; then the whole
    /// 64-bit space is assumed and an identity mapping the IOMMU refuses (EINVAL) falls back
    /// to an allocated IOVA.
    pub iova_ranges: Vec<IovaRange>,
    /// Whether `iova_ranges` came from the kernel (false: assumed).
    pub iova_ranges_reported: bool,
    /// How many more DMA mappings the kernel allows (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`).
    pub dma_mappings_available: Option<u32>,
}

impl IommuInfo {
    /// The smallest IOMMU page size: every mapping's address and length are multiples of it.
    pub fn min_page_size(&self) -> u64 {
        if self.page_sizes == 0 {
            4096
        } else {
            1 << self.page_sizes.trailing_zeros()
        }
    }

    fn describe_ranges(&self) -> String {
        let ranges: Vec<String> = self
            .iova_ranges
            .iter()
            .map(|r| format!("[{:#x}, {:#x}]", r.start, r.end))
            .collect();
        ranges.join(" ")
    }
}

/// How a DMA mapping chose its IOVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IovaMode {
    /// IOVA = virtual address (SPDK's VFIO mode).
    Identity,
    /// The virtual address lies outside the IOMMU's usable ranges; IOVA from the allocator.
    Allocated,
}

impl std::fmt::Display for IovaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Identity => "identity",
            Self::Allocated => "allocated",
        })
    }
}

/// One live DMA mapping of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMapping {
    pub vaddr: u64,
    pub iova: u64,
    pub len: u64,
    pub mode: IovaMode,
}

struct DmaState {
    /// Read after each group attach (the IOMMU type is set only once the first is attached).
    iommu: Option<IommuInfo>,
    /// Live mappings by IOVA; identity and allocated mappings share one IOVA space.
    mappings: BTreeMap<u64, DmaMapping>,
}

/// A VFIO container with the type1 IOMMU: one IOVA space shared by the devices attached to it.
pub struct VfioContainer {
    inner: Arc<vfio_ioctls::VfioContainer>,
    dma: Mutex<DmaState>,
    /// Devices attached and not yet dropped. When the last one goes, its group leaves the
    /// container and the kernel drops every DMA mapping with the IOMMU domain, so a later
    /// unmap has nothing left to undo (see [`Self::unmap`]).
    devices: AtomicUsize,
}

/// The process-wide container [`VfioPciDevice::open`] attaches devices to.
static SHARED_CONTAINER: Mutex<Option<Arc<VfioContainer>>> = Mutex::new(None);

impl VfioContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn new() -> Result<Arc<Self>, VfioError> {
        let inner = vfio_ioctls::VfioContainer::new(None).map_err(|error| match error {
            vfio_ioctls::VfioError::OpenContainer(source) => VfioError::ContainerOpen {
                path: VFIO_CONTAINER_PATH.into(),
                source,
            },
            source => VfioError::ContainerSetup {
                path: VFIO_CONTAINER_PATH.into(),
                source,
            },
        })?;
        Ok(Arc::new(Self {
            inner: Arc::new(inner),
            dma: Mutex::new(DmaState {
                iommu: None,
                mappings: BTreeMap::new(),
            }),
            devices: AtomicUsize::new(0),
        }))
    }

    /// The process-wide container, opened on first use (SPDK also keeps one per process).
    pub fn shared() -> Result<Arc<Self>, VfioError> {
        let mut shared = SHARED_CONTAINER
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(container) = shared.as_ref() {
            return Ok(container.clone());
        }
        let container = Self::new()?;
        *shared = Some(container.clone());
        Ok(container)
    }

    /// The IOMMU's page sizes and usable IOVA ranges; `None` until a device is attached.
    pub fn iommu_info(&self) -> Option<IommuInfo> {
        self.state().iommu.clone()
    }

    /// The live mapping that holds `iova`, if any.
    pub fn mapping_at(&self, iova: u64) -> Option<DmaMapping> {
        let state = self.state();
        let (_, mapping) = state.mappings.range(..=iova).next_back()?;
        (iova - mapping.iova < mapping.len).then_some(*mapping)
    }

    /// All live mappings, by IOVA.
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.state().mappings.values().copied().collect()
    }

    fn state(&self) -> MutexGuard<'_, DmaState> {
        // The state is consistent between statements (no panics inside the critical sections
        // besides allocation failure), so a poisoned lock still holds valid data.
        self.dma
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the IOMMU information after each attach: the type1 backend exists only once a
    /// group is attached, and every group attached can narrow the usable ranges (the kernel
    /// reports what all of the container's IOMMUs accept).
    fn load_iommu_info(&self) -> Result<(), VfioError> {
        let mut state = self.state();
        let info = query_iommu_info(self.inner.as_raw_fd())?;
        tracing::info!(
            page_sizes = format_args!("{:#x}", info.page_sizes),
            iova_ranges = %info.describe_ranges(),
            reported = info.iova_ranges_reported,
            dma_mappings_available = ?info.dma_mappings_available,
            "VFIO type1 IOMMU"
        );
        state.iommu = Some(info);
        Ok(())
    }

    /// Maps `[vaddr, vaddr + len)` for DMA and says which IOVA mode it got.
    ///
    /// `vaddr` and `len` must be multiples of the IOMMU's smallest page size. The memory must
    /// stay mapped in this process until [`Self::unmap`]; the kernel pins its pages. Like every
    /// DMA region it must only be touched through raw pointers (volatile), never `&`/`&mut`,
    /// while the device may access it.
    pub fn map(&self, vaddr: u64, len: u64) -> Result<DmaMapping, VfioError> {
        let invalid = |reason| VfioError::DmaInvalid { vaddr, len, reason };
        let mut state = self.state();
        let iommu = state.iommu.clone().ok_or(VfioError::NoDevice)?;
        let page = iommu.min_page_size();
        if len == 0 {
            return Err(invalid("empty range"));
        }
        if !vaddr.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(invalid(
                "address or length is not a multiple of the IOMMU page size",
            ));
        }
        if vaddr.checked_add(len).is_none() {
            return Err(invalid("range wraps around the address space"));
        }

        let identity_fits = iommu.iova_ranges.iter().any(|r| r.holds(vaddr, len))
            && !overlaps(&state.mappings, vaddr, len);
        if identity_fits {
            match self.ioctl_map(vaddr, vaddr, len) {
                Ok(()) => {
                    return Ok(record(&mut state, vaddr, vaddr, len, IovaMode::Identity));
                }
                // Without the IOVA-range capability (kernels before 5.4) the ranges are a guess,
                // and EINVAL is how such a kernel refuses an IOVA beyond the IOMMU's width.
                Err(source)
                    if !iommu.iova_ranges_reported
                        && source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    tracing::info!(
                        vaddr = format_args!("{vaddr:#x}"),
                        "IOVA = VA refused by the IOMMU (EINVAL); allocating an IOVA"
                    );
                }
                Err(source) => {
                    return Err(VfioError::DmaMap {
                        vaddr,
                        iova: vaddr,
                        len,
                        source,
                    })
                }
            }
        }

        let align = iova_alignment(vaddr, len, iommu.page_sizes, page);
        let iova =
            allocate_iova(&iommu.iova_ranges, &state.mappings, len, align).ok_or_else(|| {
                VfioError::IovaExhausted {
                    len,
                    align,
                    ranges: iommu.describe_ranges(),
                }
            })?;
        self.ioctl_map(vaddr, iova, len)
            .map_err(|source| VfioError::DmaMap {
                vaddr,
                iova,
                len,
                source,
            })?;
        Ok(record(&mut state, vaddr, iova, len, IovaMode::Allocated))
    }

    /// Undoes one [`Self::map`] of exactly `len` bytes at `iova`.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<DmaMapping, VfioError> {
        let mut state = self.state();
        let mapping = match state.mappings.get(&iova) {
            Some(mapping) if mapping.len == len => *mapping,
            other => {
                return Err(VfioError::DmaNotMapped {
                    iova,
                    len,
                    found: other.map(|m| m.len),
                })
            }
        };
        let mut request = uapi::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len,
            ..Default::default()
        };
        // SAFETY: the container fd is open for the life of `self.inner`; the kernel reads
        // `argsz` bytes of `request` and writes back `size`, all inside the struct.
        let rc = unsafe {
            libc::ioctl(
                self.inner.as_raw_fd(),
                VFIO_IOMMU_UNMAP_DMA,
                &mut request as *mut uapi::vfio_iommu_type1_dma_unmap,
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            if self.devices.load(Ordering::Acquire) == 0 {
                // The last device's group left the container, and the kernel unmapped
                // everything with the IOMMU domain: the mapping is already gone.
                state.mappings.remove(&iova);
                tracing::debug!(
                    iova = format_args!("{iova:#x}"),
                    len = format_args!("{len:#x}"),
                    %source,
                    "DMA unmap after the last device left: already unmapped by the kernel"
                );
                return Ok(mapping);
            }
            return Err(VfioError::DmaUnmap { iova, len, source });
        }
        if request.size != len {
            return Err(VfioError::DmaUnmap {
                iova,
                len,
                source: io::Error::other(format!(
                    "the kernel unmapped {:#x} bytes instead",
                    request.size
                )),
            });
        }
        state.mappings.remove(&iova);
        tracing::debug!(
            iova = format_args!("{iova:#x}"),
            len = format_args!("{len:#x}"),
            "DMA unmapped"
        );
        Ok(mapping)
    }

    fn ioctl_map(&self, vaddr: u64, iova: u64, len: u64) -> io::Result<()> {
        let request = uapi::vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_map>() as u32,
            flags: uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size: len,
        };
        // SAFETY: the container fd is open for the life of `self.inner`; the kernel only reads
        // `request`. The mapping lets the device reach `[vaddr, vaddr + len)`; `map`'s contract
        // (and the DmaMapper one) is that this is DMA memory never referenced as `&`/`&mut`,
        // and the kernel pins the pages, so no memory of ours changes under a Rust reference.
        let rc = unsafe {
            libc::ioctl(
                self.inner.as_raw_fd(),
                VFIO_IOMMU_MAP_DMA,
                &request as *const uapi::vfio_iommu_type1_dma_map,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl DmaMapper for VfioContainer {
    fn map_dma(&self, vaddr: u64, len: u64) -> io::Result<u64> {
        Ok(self.map(vaddr, len)?.iova)
    }

    fn unmap_dma(&self, iova: u64, len: u64) -> io::Result<()> {
        self.unmap(iova, len)?;
        Ok(())
    }
}

fn record(state: &mut DmaState, vaddr: u64, iova: u64, len: u64, mode: IovaMode) -> DmaMapping {
    let mapping = DmaMapping {
        vaddr,
        iova,
        len,
        mode,
    };
    state.mappings.insert(iova, mapping);
    tracing::info!(
        vaddr = format_args!("{vaddr:#x}"),
        iova = format_args!("{iova:#x}"),
        len = format_args!("{len:#x}"),
        %mode,
        "DMA mapped ({})",
        match mode {
            IovaMode::Identity => "IOVA = VA",
            IovaMode::Allocated => "VA outside the IOMMU's usable IOVA ranges: allocated IOVA",
        }
    );
    mapping
}

/// Whether `[start, start + len)` overlaps a live mapping (`len > 0`, no wrap: checked by caller).
fn overlaps(mappings: &BTreeMap<u64, DmaMapping>, start: u64, len: u64) -> bool {
    let end = start + len;
    if let Some((_, before)) = mappings.range(..start).next_back() {
        if before.iova + before.len > start {
            return true;
        }
    }
    mappings.range(start..end).next().is_some()
}

/// The alignment for an allocated IOVA: the largest IOMMU page size that the length covers and
/// the virtual address is aligned to (so the IOMMU can use superpages), capped at 1 GiB.
fn iova_alignment(vaddr: u64, len: u64, page_sizes: u64, min_page: u64) -> u64 {
    let mut align = min_page;
    let mut size = min_page;
    while let Some(next) = size.checked_mul(2) {
        if next > len || next > MAX_IOVA_ALIGN || !vaddr.is_multiple_of(next) {
            break;
        }
        size = next;
        if page_sizes & size != 0 {
            align = size;
        }
    }
    align
}

/// First fit over the usable ranges, skipping live mappings; never hands out IOVA 0.
fn allocate_iova(
    ranges: &[IovaRange],
    mappings: &BTreeMap<u64, DmaMapping>,
    len: u64,
    align: u64,
) -> Option<u64> {
    let align_up =
        |value: u64| -> Option<u64> { value.checked_add(align - 1).map(|v| v / align * align) };
    for range in ranges {
        let mut candidate = align_up(range.start.max(align))?;
        // Each step moves past one mapping, so the walk is bounded by the mapping count.
        loop {
            if !range.holds(candidate, len) {
                break;
            }
            let end = candidate + len;
            let blocker = mappings
                .range(..end)
                .next_back()
                .filter(|(_, m)| m.iova + m.len > candidate);
            match blocker {
                None => return Some(candidate),
                Some((_, m)) => match align_up(m.iova + m.len) {
                    Some(next) => candidate = next,
                    None => break,
                },
            }
        }
    }
    None
}

/// `VFIO_IOMMU_GET_INFO`, growing the buffer once to the size the kernel asks for.
fn query_iommu_info(container_fd: RawFd) -> Result<IommuInfo, VfioError> {
    let base = std::mem::size_of::<uapi::vfio_iommu_type1_info>() as u32;
    let mut argsz = base;
    for _ in 0..2 {
        let mut buf = vec![0u8; argsz as usize];
        buf[0..4].copy_from_slice(&argsz.to_ne_bytes());
        // SAFETY: `buf` holds `argsz` writable bytes, the size the kernel is told in its first
        // field; the kernel writes at most that many. The fd is the open container.
        let rc = unsafe { libc::ioctl(container_fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
        if rc != 0 {
            return Err(VfioError::IommuInfo {
                path: VFIO_CONTAINER_PATH.into(),
                source: io::Error::last_os_error(),
            });
        }
        let wanted = read_u32(&buf, 0).ok_or(VfioError::IommuInfoMalformed {
            reason: "answer shorter than its header",
        })?;
        if wanted <= argsz {
            return parse_iommu_info(&buf)
                .map_err(|reason| VfioError::IommuInfoMalformed { reason });
        }
        if wanted > MAX_IOMMU_INFO_BYTES {
            return Err(VfioError::IommuInfoMalformed {
                reason: "kernel asks for an implausibly large buffer",
            });
        }
        argsz = wanted;
    }
    Err(VfioError::IommuInfoMalformed {
        reason: "kernel kept asking for a larger buffer",
    })
}

fn read_u16(buf: &[u8], offset: usize) -> Option<u16> {
    let bytes = buf.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes = buf.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_u64(buf: &[u8], offset: usize) -> Option<u64> {
    let bytes = buf.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Parses a `struct vfio_iommu_type1_info` and its capability chain (include/uapi/linux/vfio.h):
/// `argsz u32, flags u32, iova_pgsizes u64, cap_offset u32, pad u32`, then capabilities
/// `{id u16, version u16, next u32}` linked by offsets from the start of the struct.
fn parse_iommu_info(buf: &[u8]) -> Result<IommuInfo, &'static str> {
    const SHORT: &str = "answer shorter than struct vfio_iommu_type1_info";
    if buf.len() < std::mem::size_of::<uapi::vfio_iommu_type1_info>() {
        return Err(SHORT);
    }
    let flags = read_u32(buf, 4).ok_or(SHORT)?;
    let page_sizes = if flags & uapi::VFIO_IOMMU_INFO_PGSIZES != 0 {
        read_u64(buf, 8).ok_or(SHORT)?
    } else {
        0
    };
    let mut info = IommuInfo {
        page_sizes,
        iova_ranges: vec![IovaRange {
            start: 0,
            end: u64::MAX,
        }],
        iova_ranges_reported: false,
        dma_mappings_available: None,
    };
    if flags & uapi::VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(info);
    }
    let mut offset = read_u32(buf, 16).ok_or(SHORT)? as usize;
    let header_len = std::mem::size_of::<uapi::vfio_iommu_type1_info>();
    let mut seen = 0;
    while offset != 0 {
        seen += 1;
        if seen > MAX_IOMMU_INFO_CAPS {
            return Err("capability chain too long (a loop?)");
        }
        if offset < header_len {
            return Err("capability offset points into the header");
        }
        let id = read_u16(buf, offset).ok_or("capability header beyond the answer")?;
        let next = read_u32(buf, offset + 4).ok_or("capability header beyond the answer")?;
        match u32::from(id) {
            uapi::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                let count =
                    read_u32(buf, offset + 8).ok_or("IOVA range count beyond the answer")?;
                let mut ranges = Vec::new();
                for index in 0..count as usize {
                    let at = index
                        .checked_mul(16)
                        .and_then(|o| o.checked_add(offset + 16))
                        .ok_or("IOVA range beyond the answer")?;
                    let start = read_u64(buf, at).ok_or("IOVA range beyond the answer")?;
                    let end = read_u64(buf, at + 8).ok_or("IOVA range beyond the answer")?;
                    if end < start {
                        return Err("IOVA range ends before it starts");
                    }
                    ranges.push(IovaRange { start, end });
                }
                ranges.sort_by_key(|r| r.start);
                info.iova_ranges = ranges;
                info.iova_ranges_reported = true;
            }
            uapi::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                info.dma_mappings_available =
                    Some(read_u32(buf, offset + 8).ok_or("DMA-available count beyond the answer")?);
            }
            _ => {}
        }
        if next != 0 && (next as usize) <= offset {
            return Err("capability chain goes backwards");
        }
        offset = next as usize;
    }
    Ok(info)
}

/// A PCI device bound to `vfio-pci`, attached to a [`VfioContainer`].
pub struct VfioPciDevice {
    // Field order is drop order: our duplicate of the device fd must close before `device`
    // closes its own and detaches the group, or the kernel still sees the device open (EBUSY).
    config: File,
    device: vfio_ioctls::VfioDevice,
    container: Arc<VfioContainer>,
    address: PciAddress,
    group: u32,
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // The fields (and with them the group's place in the container) go right after this.
        self.container.devices.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VfioPciDevice {
    /// Opens `address` in the process-wide container ([`VfioContainer::shared`]).
    pub fn open(address: &PciAddress) -> Result<Self, VfioError> {
        // Check the device before opening /dev/vfio/vfio: "not bound to vfio-pci" says more
        // than "no /dev/vfio/vfio" when nothing is set up yet.
        let (sysfs, group) = Self::check_bindings(address)?;
        Self::attach(&VfioContainer::shared()?, *address, &sysfs, group)
    }

    /// Opens `address` and attaches its IOMMU group to `container`.
    pub fn open_in(
        container: &Arc<VfioContainer>,
        address: &PciAddress,
    ) -> Result<Self, VfioError> {
        let (sysfs, group) = Self::check_bindings(address)?;
        Self::attach(container, *address, &sysfs, group)
    }

    /// Checks that the device exists, is bound to vfio-pci and that its IOMMU group is
    /// viable; returns its sysfs directory and group number.
    fn check_bindings(address: &PciAddress) -> Result<(PathBuf, u32), VfioError> {
        let address = *address;
        let sysfs = address.sysfs_path(SYSFS_ROOT);
        std::fs::metadata(&sysfs).map_err(|source| VfioError::DeviceNotFound {
            address,
            path: sysfs.clone(),
            source,
        })?;
        let driver = bound_driver(&address, &sysfs)?;
        if driver.as_deref() != Some("vfio-pci") {
            return Err(VfioError::NotBoundToVfio { address, driver });
        }
        let group = iommu_group(&address, &sysfs)?;
        check_group_viable(&address, &sysfs, group)?;
        Ok((sysfs, group))
    }

    fn attach(
        container: &Arc<VfioContainer>,
        address: PciAddress,
        sysfs: &Path,
        group: u32,
    ) -> Result<Self, VfioError> {
        let device = vfio_ioctls::VfioDevice::new(sysfs, container.inner.clone(), false).map_err(
            |error| match error {
                vfio_ioctls::VfioError::OpenGroup(source, _) => VfioError::GroupOpen {
                    address,
                    path: PathBuf::from(format!("/dev/vfio/{group}")),
                    source,
                },
                source => VfioError::Attach {
                    address,
                    group,
                    source,
                },
            },
        )?;
        // SAFETY: the fd belongs to `device`, which outlives this borrow (it is only used to
        // duplicate the fd on the next line).
        let borrowed = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
        let config = File::from(
            borrowed
                .try_clone_to_owned()
                .map_err(|source| VfioError::DeviceFd { address, source })?,
        );
        container.load_iommu_info()?;
        container.devices.fetch_add(1, Ordering::AcqRel);
        tracing::info!(%address, group, "VFIO device open");
        Ok(Self {
            config,
            device,
            container: container.clone(),
            address,
            group,
        })
    }

    pub fn address(&self) -> PciAddress {
        self.address
    }

    pub fn iommu_group(&self) -> u32 {
        self.group
    }

    /// The container (and so the IOMMU, the [`DmaMapper`]) this device DMAs through.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    fn config_offset(
        &self,
        offset: u64,
        width: usize,
        what: &'static str,
    ) -> Result<u64, VfioError> {
        let region = uapi::VFIO_PCI_CONFIG_REGION_INDEX;
        let size = self.device.get_region_size(region);
        let fits = offset
            .checked_add(width as u64)
            .is_some_and(|end| end <= size);
        if !fits {
            return Err(VfioError::Config {
                address: self.address,
                what,
                offset,
                width,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("outside the {size:#x}-byte config region"),
                ),
            });
        }
        Ok(self.device.get_region_offset(region) + offset)
    }

    /// Reads `N` bytes of PCI config space (little-endian, as PCI defines it).
    fn config_read<const N: usize>(&self, offset: u64) -> Result<[u8; N], VfioError> {
        let at = self.config_offset(offset, N, "read")?;
        let mut bytes = [0u8; N];
        self.config
            .read_exact_at(&mut bytes, at)
            .map_err(|source| VfioError::Config {
                address: self.address,
                what: "read",
                offset,
                width: N,
                source,
            })?;
        Ok(bytes)
    }

    pub fn config_read_u16(&self, offset: u64) -> Result<u16, VfioError> {
        self.config_read::<2>(offset).map(u16::from_le_bytes)
    }

    pub fn config_read_u32(&self, offset: u64) -> Result<u32, VfioError> {
        self.config_read::<4>(offset).map(u32::from_le_bytes)
    }

    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<(), VfioError> {
        let at = self.config_offset(offset, 2, "write")?;
        self.config
            .write_all_at(&value.to_le_bytes(), at)
            .map_err(|source| VfioError::Config {
                address: self.address,
                what: "write",
                offset,
                width: 2,
                source,
            })
    }

    /// Sets memory-space decoding and bus mastering in the command register (bits 1 and 2),
    /// so the BARs answer and the device may issue DMA. Returns the new command register.
    pub fn enable_bus_master(&self) -> Result<u16, VfioError> {
        let command = self.config_read_u16(PCI_COMMAND_OFFSET)?;
        let wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_BUS_MASTER;
        if wanted != command {
            self.config_write_u16(PCI_COMMAND_OFFSET, wanted)?;
        }
        Ok(wanted)
    }

    /// Maps memory BAR `index` (0..=5) read/write.
    pub fn map_bar(&self, index: u32) -> Result<Bar<'_>, VfioError> {
        let flags = self.device.get_region_flags(index);
        let size = self.device.get_region_size(index);
        let offset = self.device.get_region_offset(index);
        let refuse = |reason| VfioError::BarNotMappable {
            address: self.address,
            index,
            reason,
            flags,
            size,
        };
        if index > uapi::VFIO_PCI_BAR5_REGION_INDEX {
            return Err(refuse("not a BAR index (0..=5)"));
        }
        if size == 0 {
            return Err(refuse("BAR not implemented"));
        }
        if flags & uapi::VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(refuse(
                "VFIO does not allow mmap (an I/O port BAR, or smaller than a page)",
            ));
        }
        let len = usize::try_from(size).map_err(|_| refuse("larger than the address space"))?;
        let file_offset =
            libc::off_t::try_from(offset).map_err(|_| refuse("region offset beyond off_t"))?;
        // SAFETY: a fresh shared mapping of the device fd (no fixed address, so nothing of ours
        // is replaced); VFIO checked that the region allows mmap. The mapping is only accessed
        // through volatile reads/writes in `Bar`, and unmapped in its Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.config.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::BarMmap {
                address: self.address,
                index,
                size,
                offset,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| refuse("mmap returned NULL"))?;
        tracing::debug!(address = %self.address, index, size = format_args!("{size:#x}"), "BAR mapped");
        Ok(Bar {
            ptr,
            len,
            index,
            _device: PhantomData,
        })
    }
}

/// The driver `<sysfs>/driver` points at, `None` when unbound.
fn driver_of(device_sysfs: &Path) -> io::Result<Option<String>> {
    match std::fs::read_link(device_sysfs.join("driver")) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

fn bound_driver(address: &PciAddress, sysfs: &Path) -> Result<Option<String>, VfioError> {
    driver_of(sysfs).map_err(|source| VfioError::Sysfs {
        address: *address,
        path: sysfs.join("driver"),
        source,
    })
}

fn iommu_group(address: &PciAddress, sysfs: &Path) -> Result<u32, VfioError> {
    let path = sysfs.join("iommu_group");
    let target = std::fs::read_link(&path).map_err(|source| VfioError::NoIommuGroup {
        address: *address,
        path: path.clone(),
        source,
    })?;
    target
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.parse().ok())
        .ok_or(VfioError::BadIommuGroup {
            address: *address,
            path,
        })
}

/// VFIO refuses a group unless each of its devices is bound to a VFIO driver, to `pci-stub`,
/// or to nothing; PCI bridges are exempt (drivers/vfio/group.c, `vfio_dev_driver_allowed`).
/// Checking first turns the kernel's bare "group is not viable" into the device to fix.
fn check_group_viable(address: &PciAddress, sysfs: &Path, group: u32) -> Result<(), VfioError> {
    let devices = sysfs.join("iommu_group").join("devices");
    let entries = std::fs::read_dir(&devices).map_err(|source| VfioError::Sysfs {
        address: *address,
        path: devices.clone(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| VfioError::Sysfs {
            address: *address,
            path: devices.clone(),
            source,
        })?;
        let member = entry.path();
        let Some(driver) = driver_of(&member).map_err(|source| VfioError::Sysfs {
            address: *address,
            path: member.join("driver"),
            source,
        })?
        else {
            continue;
        };
        if driver == "vfio-pci" || driver == "pci-stub" {
            continue;
        }
        let class = std::fs::read_to_string(member.join("class"))
            .ok()
            .and_then(|text| u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok());
        if class.is_some_and(|class| class >> 8 == PCI_CLASS_BRIDGE_PCI) {
            continue;
        }
        return Err(VfioError::GroupNotViable {
            address: *address,
            group,
            other: entry.file_name().to_string_lossy().into_owned(),
            driver,
        });
    }
    Ok(())
}

/// A mapped memory BAR. Only volatile, bounds- and alignment-checked accesses: device registers
/// change under us and have side effects, so no Rust reference ever points into the mapping.
pub struct Bar<'device> {
    ptr: NonNull<u8>,
    len: usize,
    index: u32,
    _device: PhantomData<&'device VfioPciDevice>,
}

// SAFETY: the mapping is plain device memory accessed only through volatile raw-pointer
// operations; nothing in `Bar` is tied to the thread that created it.
unsafe impl Send for Bar<'_> {}
// SAFETY: as for Send; concurrent MMIO accesses are each a single volatile access, and the
// device defines their meaning (callers order them as the device requires).
unsafe impl Sync for Bar<'_> {}

impl Bar<'_> {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Pointer to `width` bytes at `offset`, aligned to `width` and inside the mapping.
    fn at(&self, offset: u64, width: usize) -> Result<*mut u8, VfioError> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|start| start.is_multiple_of(width))
            .filter(|start| start.checked_add(width).is_some_and(|end| end <= self.len))
            .ok_or(VfioError::BarOffset {
                index: self.index,
                offset,
                width,
                len: self.len,
            })?;
        // SAFETY: `start + width <= len`, so the result stays inside the mapping. The mapping
        // starts on a page boundary, so `start % width == 0` makes the access aligned.
        Ok(unsafe { self.ptr.as_ptr().add(start) })
    }

    pub fn read32(&self, offset: u64) -> Result<u32, VfioError> {
        let ptr = self.at(offset, 4)?;
        // SAFETY: `at` checked the 4 bytes are inside the live mapping and 4-byte aligned.
        Ok(unsafe { ptr.cast::<u32>().read_volatile() })
    }

    /// One 64-bit access (NVMe allows 64-bit reads of CAP; split it where a device does not).
    pub fn read64(&self, offset: u64) -> Result<u64, VfioError> {
        let ptr = self.at(offset, 8)?;
        // SAFETY: `at` checked the 8 bytes are inside the live mapping and 8-byte aligned.
        Ok(unsafe { ptr.cast::<u64>().read_volatile() })
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), VfioError> {
        let ptr = self.at(offset, 4)?;
        // SAFETY: `at` checked the 4 bytes are inside the live mapping and 4-byte aligned.
        unsafe { ptr.cast::<u32>().write_volatile(value) };
        Ok(())
    }

    pub fn write64(&self, offset: u64, value: u64) -> Result<(), VfioError> {
        let ptr = self.at(offset, 8)?;
        // SAFETY: `at` checked the 8 bytes are inside the live mapping and 8-byte aligned.
        unsafe { ptr.cast::<u64>().write_volatile(value) };
        Ok(())
    }
}

impl Drop for Bar<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping `map_bar` created, and no reference into
        // it exists (all accesses were volatile through raw pointers).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(index = self.index, error = %io::Error::last_os_error(), "munmap of BAR failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Bar` over anonymous memory, to test the access checks without a device.
    fn anonymous_bar(len: usize) -> Bar<'static> {
        // SAFETY: a fresh private anonymous mapping; `Bar`'s Drop unmaps exactly it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Bar {
            ptr: NonNull::new(ptr.cast()).unwrap(),
            len,
            index: 0,
            _device: PhantomData,
        }
    }

    #[test]
    fn bar_accesses_are_checked() {
        let bar = anonymous_bar(0x1000);
        bar.write32(0x14, 0x0046_0001).unwrap();
        assert_eq!(bar.read32(0x14).unwrap(), 0x0046_0001);
        bar.write64(0x28, 0x1234_5678_9abc_d000).unwrap();
        assert_eq!(bar.read64(0x28).unwrap(), 0x1234_5678_9abc_d000);
        assert_eq!(bar.read32(0x2c).unwrap(), 0x1234_5678);
        assert_eq!(bar.read32(0xffc).unwrap(), 0);
        for (offset, width) in [(0x1000, 4), (0xffe, 4), (0x2, 4), (0xffc, 8), (0x4, 8)] {
            let result = if width == 4 {
                bar.read32(offset).map(u64::from)
            } else {
                bar.read64(offset)
            };
            assert!(
                matches!(result, Err(VfioError::BarOffset { .. })),
                "{width}-byte access at {offset:#x} accepted"
            );
        }
        assert!(bar.write32(u64::MAX - 3, 0).is_err());
        assert!(bar.write64(1 << 63, 0).is_err());
    }

    fn mapping(iova: u64, len: u64) -> (u64, DmaMapping) {
        (
            iova,
            DmaMapping {
                vaddr: iova,
                iova,
                len,
                mode: IovaMode::Allocated,
            },
        )
    }

    #[test]
    fn allocates_first_fit_around_mappings() {
        let ranges = [
            IovaRange {
                start: 0,
                end: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                end: (1 << 39) - 1,
            },
        ];
        let mut used = BTreeMap::new();
        assert_eq!(allocate_iova(&ranges, &used, 0x2000, 0x1000), Some(0x1000));
        used.extend([mapping(0x1000, 0x2000)]);
        assert_eq!(allocate_iova(&ranges, &used, 0x1000, 0x1000), Some(0x3000));
        assert_eq!(
            allocate_iova(&ranges, &used, 0x20_0000, 0x20_0000),
            Some(0x20_0000)
        );
        // Too big for the low range: lands in the high one.
        assert_eq!(
            allocate_iova(&ranges, &used, 0x1_0000_0000, 0x1000),
            Some(0xfef0_0000)
        );
        assert_eq!(allocate_iova(&ranges, &used, 1 << 40, 0x1000), None);
    }

    #[test]
    fn alignment_follows_page_sizes_and_vaddr() {
        let sizes = 0x4020_1000; // 4K, 2M, 1G
        assert_eq!(
            iova_alignment(0x7f00_0020_0000, 0x40_0000, sizes, 0x1000),
            0x20_0000
        );
        assert_eq!(
            iova_alignment(0x7f00_0020_1000, 0x40_0000, sizes, 0x1000),
            0x1000
        );
        assert_eq!(
            iova_alignment(0x4000_0000, 0x8000_0000, sizes, 0x1000),
            0x4000_0000
        );
        assert_eq!(iova_alignment(0, 0x1000, sizes, 0x1000), 0x1000);
    }

    #[test]
    fn overlap_checks_neighbours() {
        let used: BTreeMap<_, _> = [mapping(0x10000, 0x2000)].into_iter().collect();
        assert!(overlaps(&used, 0x11000, 0x1000));
        assert!(overlaps(&used, 0xf000, 0x2000));
        assert!(!overlaps(&used, 0x12000, 0x1000));
        assert!(!overlaps(&used, 0xf000, 0x1000));
    }

    fn info_bytes(caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut buf = vec![0u8; 24];
        buf[4..8].copy_from_slice(
            &(uapi::VFIO_IOMMU_INFO_PGSIZES | uapi::VFIO_IOMMU_INFO_CAPS).to_ne_bytes(),
        );
        buf[8..16].copy_from_slice(&0x4020_1000u64.to_ne_bytes());
        buf[16..20].copy_from_slice(&24u32.to_ne_bytes());
        for (index, (id, body)) in caps.iter().enumerate() {
            let start = buf.len();
            let next = if index + 1 == caps.len() {
                0
            } else {
                (start + 8 + body.len()) as u32
            };
            buf.extend_from_slice(&id.to_ne_bytes());
            buf.extend_from_slice(&1u16.to_ne_bytes());
            buf.extend_from_slice(&next.to_ne_bytes());
            buf.extend_from_slice(body);
        }
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf
    }

    #[test]
    fn parses_iova_ranges_and_dma_avail() {
        let mut ranges = Vec::new();
        ranges.extend_from_slice(&2u32.to_ne_bytes());
        ranges.extend_from_slice(&0u32.to_ne_bytes());
        for (start, end) in [(0xfef0_0000u64, (1u64 << 39) - 1), (0, 0xfedf_ffff)] {
            ranges.extend_from_slice(&start.to_ne_bytes());
            ranges.extend_from_slice(&end.to_ne_bytes());
        }
        let avail = 65535u32.to_ne_bytes().to_vec();
        let buf = info_bytes(&[(3, avail), (1, ranges)]);
        let info = parse_iommu_info(&buf).unwrap();
        assert_eq!(info.min_page_size(), 0x1000);
        assert!(info.iova_ranges_reported);
        assert_eq!(info.dma_mappings_available, Some(65535));
        assert_eq!(
            info.iova_ranges,
            vec![
                IovaRange {
                    start: 0,
                    end: 0xfedf_ffff
                },
                IovaRange {
                    start: 0xfef0_0000,
                    end: (1 << 39) - 1
                }
            ]
        );
    }

    #[test]
    fn refuses_malformed_iommu_info() {
        let mut ranges = Vec::new();
        ranges.extend_from_slice(&5u32.to_ne_bytes()); // claims 5 ranges, holds none
        ranges.extend_from_slice(&0u32.to_ne_bytes());
        assert!(parse_iommu_info(&info_bytes(&[(1, ranges)])).is_err());

        let mut looping = info_bytes(&[(3, 1u32.to_ne_bytes().to_vec())]);
        looping[28..32].copy_from_slice(&24u32.to_ne_bytes()); // next points at itself
        assert!(parse_iommu_info(&looping).is_err());

        assert!(parse_iommu_info(&[0u8; 10]).is_err());
    }

    #[test]
    fn range_holds_is_inclusive_and_wrap_safe() {
        let range = IovaRange {
            start: 0x1000,
            end: 0x1fff,
        };
        assert!(range.holds(0x1000, 0x1000));
        assert!(!range.holds(0x1000, 0x1001));
        assert!(!IovaRange {
            start: 0,
            end: u64::MAX
        }
        .holds(u64::MAX, 2));
    }
}
