//! The backing file shared by the aio and io_uring modules: opening it (O_DIRECT when the
//! file system allows it), its geometry (block size, block count, buffer alignment), whether
//! `fallocate` can punch holes in it, and the errors of all of that.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Params;
use crate::error::BdevError;

/// Largest number of iovecs one readv / writev takes (the kernel's `UIO_MAXIOV`); an I/O with
/// more completes with [`IoStatus::Failed`](crate::IoStatus::Failed).
pub(crate) const MAX_IOVS_PER_IO: usize = 1024;

/// Per-slot iovec storage reserved at channel creation; a slot whose I/O has more grows its
/// own array once (to its high-water mark), never per I/O.
pub(crate) const IOVS_RESERVED_PER_SLOT: usize = 8;

/// Block size used for a regular file when none is given and the kernel does not report its
/// O_DIRECT alignment (`statx` without `STATX_DIOALIGN`): 4096 is accepted by every Linux
/// file system for direct I/O.
const FALLBACK_DIRECT_BLOCK_SIZE_BYTES: u32 = 4096;
/// Block size of a buffered regular file when none is given.
const DEFAULT_BUFFERED_BLOCK_SIZE_BYTES: u32 = 512;

/// Why a file-backed bdev (aio or io_uring) could not be created. Each variant names the
/// file; the kernel's error (with its errno) is the `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum FileBdevError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot query {path} ({what})")]
    Query {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    #[error("{path}: block size {requested_bytes} is smaller than the detected logical block size {detected_bytes}")]
    BlockSizeTooSmall {
        path: PathBuf,
        requested_bytes: u32,
        detected_bytes: u32,
    },
    #[error(
        "{path}: block size {block_size_bytes} must be a power of two from 512 to 65536 bytes"
    )]
    BadBlockSize {
        path: PathBuf,
        block_size_bytes: u32,
    },
    #[error(
        "{path}: its size ({size_bytes} bytes) is less than one block of {block_size_bytes} bytes"
    )]
    TooSmall {
        path: PathBuf,
        size_bytes: u64,
        block_size_bytes: u32,
    },
    #[error("{path}: fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) is not supported here (needed for unmap and write zeroes)")]
    NoFallocate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: Linux AIO context setup (io_setup of {events} events) failed; see /proc/sys/fs/aio-max-nr")]
    AioSetup {
        path: PathBuf,
        events: u32,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the kernel refused io_uring setup ({entries} entries); seccomp, kernel.io_uring_disabled or a kernel older than 5.6 can cause this")]
    UringSetup {
        path: PathBuf,
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Bdev(#[from] BdevError),
}

impl FileBdevError {
    /// The configuration parameter the error is about.
    pub fn param(&self) -> &'static str {
        match self {
            FileBdevError::BlockSizeTooSmall { .. }
            | FileBdevError::BadBlockSize { .. }
            | FileBdevError::TooSmall { .. } => "block_size",
            FileBdevError::NoFallocate { .. } => "fallocate",
            _ => "filename",
        }
    }

    /// As the bdev layer's error for configuration method `method`: registration errors pass
    /// through, the others become [`BdevError::InvalidParam`] naming the parameter, with this
    /// error (path, errno) kept whole as its source.
    pub fn into_bdev_error(self, method: &str) -> BdevError {
        match self {
            FileBdevError::Bdev(error) => error,
            other => BdevError::InvalidParam {
                method: method.to_string(),
                param: other.param(),
                reason: "was refused when the bdev was created".to_string(),
                source: Some(Box::new(other)),
            },
        }
    }
}

/// One scatter-gather entry in the kernel's layout (`struct iovec`). Addresses are kept as
/// integers so that channels holding these stay `Send`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KernelIovec {
    pub(crate) base: usize,
    pub(crate) len: usize,
}

const _: () = assert!(std::mem::size_of::<KernelIovec>() == std::mem::size_of::<libc::iovec>());

/// An opened backing file and its geometry.
#[derive(Debug)]
pub(crate) struct BackingFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Opened with O_DIRECT (the page cache is bypassed).
    pub(crate) direct: bool,
    pub(crate) readonly: bool,
    pub(crate) block_size_bytes: u32,
    pub(crate) num_blocks: u64,
    /// Buffers (and, with O_DIRECT, each iovec's length) must be multiples of this.
    pub(crate) required_alignment_bytes: u32,
    pub(crate) is_block_device: bool,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` works (probed on regular files; assumed on block
    /// devices, where the kernel zeroes the range).
    pub(crate) punch_hole: bool,
    /// Why the probe found no hole punching (for [`FileBdevError::NoFallocate`]).
    pub(crate) punch_hole_error: Option<io::Error>,
}

impl BackingFile {
    pub(crate) fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Byte offset of block `offset_blocks` (`None` past `i64::MAX`).
    #[inline]
    pub(crate) fn byte_offset(&self, offset_blocks: u64) -> Option<i64> {
        offset_blocks
            .checked_mul(u64::from(self.block_size_bytes))
            .and_then(|bytes| i64::try_from(bytes).ok())
    }

    /// Whether iovec lengths fit O_DIRECT's rule (each a multiple of the alignment).
    #[inline]
    pub(crate) fn iov_lengths_ok(&self, iovs: &[crate::IoVec]) -> bool {
        if !self.direct {
            return true;
        }
        let mask = self.required_alignment_bytes as usize - 1;
        iovs.iter().all(|iov| iov.len_bytes() & mask == 0)
    }

    /// The fallocate mode for unmap and write zeroes: a block device zeroes with
    /// `ZERO_RANGE` (which falls back to writing zeroes); a regular file punches a hole,
    /// which reads back as zeroes on every file system that has holes (tmpfs has no
    /// `ZERO_RANGE`).
    pub(crate) fn zeroing_mode(&self) -> i32 {
        if self.is_block_device {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        }
    }

    /// Runs `fallocate(2)` synchronously.
    pub(crate) fn fallocate(&self, mode: i32, offset: i64, len: i64) -> io::Result<()> {
        // SAFETY: fallocate takes only integers; the fd is owned by `self.file` and open.
        let rc = unsafe { libc::fallocate(self.fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Checks at configuration time that `filename` names something that exists, so that a
/// config with a wrong path fails before any bdev is created.
pub(crate) fn check_exists(params: &Params<'_>, filename: &str) -> Result<(), BdevError> {
    std::fs::metadata(filename)
        .map(|_| ())
        .map_err(|error| params.invalid("filename", &format!("cannot access {filename}: {error}")))
}

/// `block_size` as SPDK takes it: absent or 0 means detect.
pub(crate) fn parse_block_size(params: &Params<'_>) -> Result<Option<u32>, BdevError> {
    match params.u64("block_size")? {
        None | Some(0) => Ok(None),
        Some(value) => u32::try_from(value)
            .ok()
            .filter(|v| v.is_power_of_two() && (512..=65536).contains(v))
            .map(Some)
            .ok_or_else(|| {
                params.invalid(
                    "block_size",
                    &format!(
                        "must be 0 (detect) or a power of two from 512 to 65536 bytes, got {value}"
                    ),
                )
            }),
    }
}

/// O_DIRECT alignment reported by `statx(STATX_DIOALIGN)` (Linux 6.1+): (memory, offset).
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH queries the open fd; `stx` is a valid,
    // writable statx buffer that outlives the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// The logical block size of a block device (`BLKSSZGET`).
fn block_device_sector_size(file: &File, path: &Path) -> Result<u32, FileBdevError> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which is valid for that write.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if rc != 0 {
        return Err(FileBdevError::Query {
            path: path.to_path_buf(),
            what: "ioctl BLKSSZGET",
            source: io::Error::last_os_error(),
        });
    }
    Ok(u32::try_from(size).unwrap_or(0))
}

fn open_with(path: &Path, readonly: bool, direct: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
}

/// Adds `"direct": false` to a module's saved parameters when the bdev was asked for the
/// page cache; the default stays unwritten, so that saved configs also load in SPDK.
pub(crate) fn write_direct_param(params: &mut serde_json::Value, direct: bool) {
    if !direct {
        params["direct"] = serde_json::Value::Bool(false);
    }
}

/// Opens `path` for a file-backed bdev. `direct`: O_DIRECT first, buffered when the file
/// system refuses O_DIRECT (EINVAL); false: buffered through the page cache (the bdev's
/// `"direct": false`). `block_size`: `None` detects it.
pub(crate) fn open(
    module: &'static str,
    path: &Path,
    block_size: Option<u32>,
    readonly: bool,
    direct: bool,
) -> Result<BackingFile, FileBdevError> {
    let open_error = |source| FileBdevError::Open {
        path: path.to_path_buf(),
        source,
    };
    let (file, direct) = match open_with(path, readonly, direct) {
        Ok(file) => (file, direct),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(module, path = %path.display(), "O_DIRECT refused by the file system (EINVAL): using buffered I/O through the page cache");
            (open_with(path, readonly, false).map_err(open_error)?, false)
        }
        Err(error) => return Err(open_error(error)),
    };
    let file_type = file
        .metadata()
        .map_err(|source| FileBdevError::Query {
            path: path.to_path_buf(),
            what: "fstat",
            source,
        })?
        .file_type();
    let is_block_device = file_type.is_block_device();
    if !is_block_device && !file_type.is_file() {
        return Err(FileBdevError::NotFileOrBlockDevice {
            path: path.to_path_buf(),
        });
    }
    let dio = if direct { dio_alignment(&file) } else { None };
    // The smallest block the kernel accepts: the device's sector, or the file system's
    // O_DIRECT offset alignment; 0: not known (buffered regular file).
    let detected_bytes = if is_block_device {
        block_device_sector_size(&file, path)?
    } else {
        dio.map_or(0, |(_, offset_align)| offset_align)
    };
    let block_size_bytes = match block_size {
        Some(requested_bytes) if requested_bytes < detected_bytes => {
            return Err(FileBdevError::BlockSizeTooSmall {
                path: path.to_path_buf(),
                requested_bytes,
                detected_bytes,
            })
        }
        Some(requested_bytes) => requested_bytes,
        None if detected_bytes != 0 => detected_bytes.max(512),
        None if direct => FALLBACK_DIRECT_BLOCK_SIZE_BYTES,
        None => DEFAULT_BUFFERED_BLOCK_SIZE_BYTES,
    };
    if !block_size_bytes.is_power_of_two() || !(512..=65536).contains(&block_size_bytes) {
        return Err(FileBdevError::BadBlockSize {
            path: path.to_path_buf(),
            block_size_bytes,
        });
    }
    let required_alignment_bytes = if direct {
        // O_DIRECT: buffers at the memory alignment the kernel reports, at least 512 (the
        // kernel also wants each iovec length a multiple of the logical block size, so
        // both are kept to one figure: the logical block size, 512 or 4096 typically).
        let mem_align = dio.map_or(0, |(mem_align, _)| mem_align);
        // Not reported (tmpfs reports no STATX_DIOALIGN): a page, which every file
        // system accepts.
        let logical = if detected_bytes != 0 {
            detected_bytes
        } else {
            FALLBACK_DIRECT_BLOCK_SIZE_BYTES
        };
        logical.max(mem_align).max(512).min(block_size_bytes)
    } else {
        1
    };
    let size_bytes = (&file)
        .seek(SeekFrom::End(0))
        .map_err(|source| FileBdevError::Query {
            path: path.to_path_buf(),
            what: "lseek(SEEK_END)",
            source,
        })?;
    let num_blocks = size_bytes / u64::from(block_size_bytes);
    if num_blocks == 0 {
        return Err(FileBdevError::TooSmall {
            path: path.to_path_buf(),
            size_bytes,
            block_size_bytes,
        });
    }
    let mut backing = BackingFile {
        file,
        path: path.to_path_buf(),
        direct,
        readonly,
        block_size_bytes,
        num_blocks,
        required_alignment_bytes,
        is_block_device,
        punch_hole: is_block_device,
        punch_hole_error: None,
    };
    if !is_block_device && !readonly {
        // Punching a hole past the end of the file with KEEP_SIZE changes nothing a reader
        // can see, and fails with EOPNOTSUPP where the file system has no holes.
        let probe = i64::try_from(size_bytes)
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
            .and_then(|end| {
                backing.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    end,
                    i64::from(block_size_bytes),
                )
            });
        match probe {
            Ok(()) => backing.punch_hole = true,
            Err(error) => {
                tracing::debug!(module, path = %path.display(), %error, "fallocate(PUNCH_HOLE) not supported: no unmap / write zeroes");
                backing.punch_hole_error = Some(error);
            }
        }
    }
    tracing::info!(
        module,
        path = %path.display(),
        direct,
        block_size_bytes,
        num_blocks,
        required_alignment_bytes,
        "backing file opened"
    );
    Ok(backing)
}
