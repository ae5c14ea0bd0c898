//! The Linux ublk UAPI (`include/uapi/linux/ublk_cmd.h`, as of Linux 6.12) and the few system
//! calls around it: the control device, the per-queue io-descriptor mapping.
//!
//! Every structure is `#[repr(C)]` with its size checked at compile time against the C
//! layout. Command opcodes are the ioctl-encoded ones (`UBLK_U_*`, type `'u'`), which every
//! kernel since 6.0 accepts (and the only ones a kernel without
//! `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES` accepts).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::error::UblkError;

/// The control device: ADD_DEV / SET_PARAMS / START_DEV / ... go to it as uring commands.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// The per-device character device a server opens to fetch requests.
pub fn char_dev_path(dev_id: u32) -> String {
    format!("/dev/ublkc{dev_id}")
}

/// The block device the kernel creates at START_DEV.
pub fn block_dev_path(dev_id: u32) -> String {
    format!("/dev/ublkb{dev_id}")
}

// Control command numbers (`_IOC_NR`).
const CMD_GET_DEV_INFO: u32 = 0x02;
const CMD_ADD_DEV: u32 = 0x04;
const CMD_DEL_DEV: u32 = 0x05;
const CMD_START_DEV: u32 = 0x06;
const CMD_STOP_DEV: u32 = 0x07;
const CMD_SET_PARAMS: u32 = 0x08;
const CMD_GET_PARAMS: u32 = 0x09;
const CMD_START_USER_RECOVERY: u32 = 0x10;
const CMD_END_USER_RECOVERY: u32 = 0x11;
// I/O command numbers.
const IO_FETCH_REQ: u32 = 0x20;
const IO_COMMIT_AND_FETCH_REQ: u32 = 0x21;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = 30;
const UBLK_IOC_TYPE: u32 = b'u' as u32;

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << IOC_DIRSHIFT)
        | (UBLK_IOC_TYPE << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

const CTRL: usize = std::mem::size_of::<CtrlCmd>();
const IOCMD: usize = std::mem::size_of::<IoCmd>();

pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior(CMD_GET_DEV_INFO, CTRL);
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr(CMD_ADD_DEV, CTRL);
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr(CMD_DEL_DEV, CTRL);
pub const UBLK_U_CMD_START_DEV: u32 = iowr(CMD_START_DEV, CTRL);
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr(CMD_STOP_DEV, CTRL);
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr(CMD_SET_PARAMS, CTRL);
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior(CMD_GET_PARAMS, CTRL);
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 = iowr(CMD_START_USER_RECOVERY, CTRL);
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 = iowr(CMD_END_USER_RECOVERY, CTRL);
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr(IO_FETCH_REQ, IOCMD);
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = iowr(IO_COMMIT_AND_FETCH_REQ, IOCMD);

// Device flags (`ublksrv_ctrl_dev_info.flags`).
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const UBLK_F_USER_COPY: u64 = 1 << 7;

// Device states (`ublksrv_ctrl_dev_info.state`).
pub const UBLK_S_DEV_DEAD: u16 = 0;
pub const UBLK_S_DEV_LIVE: u16 = 1;
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
/// Linux 6.13+: the server died and the device fails I/O until recovered.
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// I/O results in a fetch's CQE.
pub const UBLK_IO_RES_OK: i32 = 0;
pub const UBLK_IO_RES_NEED_GET_DATA: i32 = 1;
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

// Request operations (`ublksrv_io_desc.op_flags` bits 0-7).
pub const UBLK_IO_OP_READ: u8 = 0;
pub const UBLK_IO_OP_WRITE: u8 = 1;
pub const UBLK_IO_OP_FLUSH: u8 = 2;
pub const UBLK_IO_OP_DISCARD: u8 = 3;
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;

// Parameter types (`ublk_params.types`).
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
pub const UBLK_PARAM_TYPE_DEVT: u32 = 1 << 2;
pub const UBLK_PARAM_TYPE_ZONED: u32 = 1 << 3;

// Basic attributes (`ublk_param_basic.attrs`).
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub const UBLK_ATTR_ROTATIONAL: u32 = 1 << 1;
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const UBLK_ATTR_FUA: u32 = 1 << 3;

/// The kernel's limit on a queue's depth (tags per queue).
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
/// The kernel's limit on queues per device.
pub const UBLK_MAX_NR_QUEUES: u16 = 4096;

/// USER_COPY: request data is read and written with pread/pwrite on `/dev/ublkcN` at
/// `UBLKSRV_IO_BUF_OFFSET + (q_id << UBLK_QID_OFF) + (tag << UBLK_TAG_OFF) + byte offset`.
pub const UBLKSRV_IO_BUF_OFFSET: u64 = 0x8000_0000;
pub const UBLK_IO_BUF_BITS: u32 = 25;
pub const UBLK_TAG_OFF: u32 = UBLK_IO_BUF_BITS;
pub const UBLK_TAG_BITS: u32 = 16;
pub const UBLK_QID_OFF: u32 = UBLK_TAG_OFF + UBLK_TAG_BITS;

/// Where request `(q_id, tag)`'s data starts on the char device in USER_COPY mode.
pub const fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    UBLKSRV_IO_BUF_OFFSET + ((q_id as u64) << UBLK_QID_OFF) + ((tag as u64) << UBLK_TAG_OFF)
}

/// `struct ublksrv_ctrl_cmd`: what a control command carries in the SQE's command area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// 0xffff when the command is not per queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    pub addr: u64,
    /// START_DEV / END_USER_RECOVERY: the server's pid.
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlDevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, written by the kernel into the queue's mapped
/// descriptor array at its tag.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Operation in bits 0-7, request flags above.
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    /// The buffer the server gave with the tag's last FETCH / COMMIT_AND_FETCH.
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: what an I/O command carries in the SQE's command area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// COMMIT_AND_FETCH: bytes done, or a negative errno.
    pub result: i32,
    /// The data buffer (kernel-copy mode); 0 in USER_COPY mode.
    pub addr: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read only: filled by GET_PARAMS).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_params` (6.12's: later kernels append types, and take `len` as the size the
/// server knows).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// `size_of::<Params>()`.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` present.
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
}

const _: () = assert!(std::mem::size_of::<CtrlCmd>() == 32);
const _: () = assert!(std::mem::size_of::<CtrlDevInfo>() == 64);
const _: () = assert!(std::mem::size_of::<IoDesc>() == 24);
const _: () = assert!(std::mem::size_of::<IoCmd>() == 16);
const _: () = assert!(std::mem::size_of::<ParamBasic>() == 32);
const _: () = assert!(std::mem::size_of::<ParamDiscard>() == 20);
const _: () = assert!(std::mem::size_of::<ParamDevt>() == 16);
const _: () = assert!(std::mem::size_of::<ParamZoned>() == 32);
const _: () = assert!(std::mem::size_of::<Params>() == 112);

/// Plain-old-data structures of this module: bytes in, bytes out, no padding holes that
/// could leak or be misread (each struct's fields tile it; the size asserts above check).
pub(crate) trait Pod: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self` is one of this module's `#[repr(C)]` integer-only structs (sealed by
        // being crate-private); reading its bytes is defined for any value.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}
impl Pod for CtrlCmd {}
impl Pod for CtrlDevInfo {}
impl Pod for IoCmd {}
impl Pod for Params {}

/// The per-queue descriptor array in the mapping of `/dev/ublkcN`: queue `q_id`'s starts at
/// `q_id * round_up(UBLK_MAX_QUEUE_DEPTH * 24, page size)`.
pub fn iod_area_offset(q_id: u16, page_size: usize) -> u64 {
    let stride = (usize::from(UBLK_MAX_QUEUE_DEPTH) * std::mem::size_of::<IoDesc>())
        .next_multiple_of(page_size);
    u64::from(q_id) * stride as u64
}

/// The length of a queue's descriptor mapping.
pub fn iod_area_len(queue_depth: u16, page_size: usize) -> usize {
    (usize::from(queue_depth) * std::mem::size_of::<IoDesc>()).next_multiple_of(page_size)
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// A queue's descriptor array, mapped read only from `/dev/ublkcN`. The kernel writes it;
/// it is only ever read with volatile loads, never through a Rust reference.
pub struct IodArea {
    ptr: NonNull<IoDesc>,
    len_bytes: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory owned by this value; reads are volatile copies.
unsafe impl Send for IodArea {}

impl IodArea {
    /// Maps queue `q_id`'s descriptors (PROT_READ, MAP_SHARED | MAP_POPULATE).
    pub fn map(
        cdev: BorrowedFd<'_>,
        dev_id: u32,
        q_id: u16,
        depth: u16,
    ) -> Result<Self, UblkError> {
        let page = page_size();
        let len_bytes = iod_area_len(depth, page);
        let offset = iod_area_offset(q_id, page);
        let offset = libc::off_t::try_from(offset).map_err(|_| UblkError::Mmap {
            dev_id,
            q_id,
            source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file we hold open;
        // nothing else in the process is affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(UblkError::Mmap {
                dev_id,
                q_id,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<IoDesc>()).ok_or(UblkError::Mmap {
            dev_id,
            q_id,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(Self {
            ptr,
            len_bytes,
            depth,
        })
    }

    /// The descriptor of `tag`, copied out (`None` past the queue depth).
    #[inline]
    pub fn read(&self, tag: u16) -> Option<IoDesc> {
        if tag >= self.depth {
            return None;
        }
        // SAFETY: `tag < depth`, and the mapping holds `depth` descriptors (its length is
        // `depth * 24` rounded up to a page), aligned (page aligned base, 8-byte aligned
        // stride). A volatile read: the kernel writes the array behind our back.
        Some(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(usize::from(tag))) })
    }
}

impl Drop for IodArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created; no reference into it exists.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "ublk: munmap of the descriptor array failed");
        }
    }
}

/// Opens the control device, naming the module when it is missing.
pub fn open_control() -> Result<File, UblkError> {
    open_control_at(std::path::Path::new(CONTROL_PATH))
}

/// [`open_control`] on another path (tests).
pub fn open_control_at(path: &std::path::Path) -> Result<File, UblkError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                UblkError::NoDriver {
                    path: path.display().to_string(),
                }
            } else {
                UblkError::Open {
                    path: path.display().to_string(),
                    source,
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn opcodes_match_the_c_macros() {
        // Values the C macros give (_IOR / _IOWR with 'u' and the struct sizes).
        assert_eq!(UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(UBLK_U_CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(UBLK_U_CMD_START_DEV, 0xc020_7506);
        assert_eq!(UBLK_U_CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(UBLK_U_CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(UBLK_U_CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn layouts_match_the_uapi() {
        assert_eq!(offset_of!(CtrlCmd, queue_id), 4);
        assert_eq!(offset_of!(CtrlCmd, len), 6);
        assert_eq!(offset_of!(CtrlCmd, addr), 8);
        assert_eq!(offset_of!(CtrlCmd, data), 16);
        assert_eq!(offset_of!(CtrlCmd, dev_path_len), 24);
        assert_eq!(offset_of!(CtrlCmd, reserved), 28);
        assert_eq!(offset_of!(CtrlDevInfo, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(CtrlDevInfo, dev_id), 12);
        assert_eq!(offset_of!(CtrlDevInfo, ublksrv_pid), 16);
        assert_eq!(offset_of!(CtrlDevInfo, flags), 24);
        assert_eq!(offset_of!(CtrlDevInfo, ublksrv_flags), 32);
        assert_eq!(offset_of!(CtrlDevInfo, owner_uid), 40);
        assert_eq!(offset_of!(CtrlDevInfo, reserved1), 48);
        assert_eq!(offset_of!(IoDesc, nr_sectors), 4);
        assert_eq!(offset_of!(IoDesc, start_sector), 8);
        assert_eq!(offset_of!(IoDesc, addr), 16);
        assert_eq!(offset_of!(IoCmd, tag), 2);
        assert_eq!(offset_of!(IoCmd, result), 4);
        assert_eq!(offset_of!(IoCmd, addr), 8);
        assert_eq!(offset_of!(ParamBasic, max_sectors), 8);
        assert_eq!(offset_of!(ParamBasic, dev_sectors), 16);
        assert_eq!(offset_of!(ParamBasic, virt_boundary_mask), 24);
        assert_eq!(offset_of!(ParamDiscard, max_discard_segments), 16);
        assert_eq!(offset_of!(Params, basic), 8);
        assert_eq!(offset_of!(Params, discard), 40);
        assert_eq!(offset_of!(Params, devt), 60);
        assert_eq!(offset_of!(Params, zoned), 76);
    }

    #[test]
    fn user_copy_offsets_and_iod_areas() {
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0), 0x8000_0000 + (1 << 41));
        assert_eq!(user_copy_offset(2, 3), 0x8000_0000 + (2 << 41) + (3 << 25));
        // 4096 * 24 bytes is 24 pages of 4 KiB.
        assert_eq!(iod_area_offset(0, 4096), 0);
        assert_eq!(iod_area_offset(1, 4096), 98_304);
        assert_eq!(iod_area_offset(3, 65536), 3 * 131_072);
        assert_eq!(iod_area_len(128, 4096), 4096);
        assert_eq!(iod_area_len(171, 4096), 8192);
        assert_eq!(iod_area_len(4096, 4096), 98_304);
    }

    #[test]
    fn a_missing_control_device_names_the_module() {
        let error = open_control_at(std::path::Path::new("/nonexistent/ublk-control"))
            .expect_err("no such device");
        let text = error.to_string();
        assert!(text.contains("ublk_drv is not loaded"), "{text}");
        assert!(text.contains("modprobe ublk_drv"), "{text}");
        assert!(text.contains("CONFIG_BLK_DEV_UBLK"), "{text}");
    }
}
