//! The control path: commands to `/dev/ublk-control` as 128-byte-SQE uring commands, one at a
//! time, each waited for.
//!
//! Only ever used from an OS thread that serves no ublk queue (the target runs it on a thread
//! of its own per operation): START_DEV blocks until every queue has a FETCH outstanding for
//! every tag, and then `add_disk()` scans partitions, reading from the device before START_DEV
//! returns; STOP_DEV's `del_gendisk()` flushes through the queues too. A reactor that served a
//! queue and waited here would deadlock.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::error::UblkError;
use crate::sys::{self, CtrlCmd, CtrlDevInfo, Params, Pod};

/// One control device handle and its ring.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// Opens `/dev/ublk-control` ([`UblkError::NoDriver`] when the module is not loaded).
    pub fn open() -> Result<Self, UblkError> {
        let file = sys::open_control()?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(UblkError::ControlRing)?;
        Ok(Self { file, ring })
    }

    /// Runs one command and returns its non-negative result.
    fn command(
        &mut self,
        op: u32,
        name: &'static str,
        dev_id: u32,
        buf: Option<(u64, u16)>,
        data0: u64,
    ) -> Result<i32, UblkError> {
        let (addr, len) = buf.unwrap_or((0, 0));
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len,
            addr,
            data: [data0],
            ..CtrlCmd::default()
        };
        let mut area = [0u8; 80];
        area[..std::mem::size_of::<CtrlCmd>()].copy_from_slice(cmd.as_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(area)
            .build()
            .user_data(u64::from(op));
        let io = |source| UblkError::Control {
            dev_id,
            command: name,
            source,
        };
        // SAFETY: the SQE points at `addr`, a buffer owned by the caller that outlives this
        // call, and the call waits for the command's completion before returning.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io(std::io::Error::from_raw_os_error(libc::EBUSY)))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(io(e)),
            }
        }
        let result = loop {
            if let Some(cqe) = self.ring.completion().next() {
                break cqe.result();
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(io(e)),
            }
        };
        if result < 0 {
            return Err(io(std::io::Error::from_raw_os_error(-result)));
        }
        tracing::debug!(dev_id, command = name, result, "ublk: control command done");
        Ok(result)
    }

    /// ADD_DEV: the kernel answers the device it made (id, flags it accepted, queue sizes).
    pub fn add_dev(&mut self, info: &CtrlDevInfo) -> Result<CtrlDevInfo, UblkError> {
        let mut out = *info;
        let addr = std::ptr::addr_of_mut!(out) as u64;
        self.command(
            sys::UBLK_U_CMD_ADD_DEV,
            "ADD_DEV",
            info.dev_id,
            Some((addr, std::mem::size_of::<CtrlDevInfo>() as u16)),
            0,
        )?;
        Ok(out)
    }

    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<CtrlDevInfo, UblkError> {
        let mut out = CtrlDevInfo::default();
        let addr = std::ptr::addr_of_mut!(out) as u64;
        self.command(
            sys::UBLK_U_CMD_GET_DEV_INFO,
            "GET_DEV_INFO",
            dev_id,
            Some((addr, std::mem::size_of::<CtrlDevInfo>() as u16)),
            0,
        )?;
        Ok(out)
    }

    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<(), UblkError> {
        let mut copy = *params;
        let addr = std::ptr::addr_of_mut!(copy) as u64;
        self.command(
            sys::UBLK_U_CMD_SET_PARAMS,
            "SET_PARAMS",
            dev_id,
            Some((addr, std::mem::size_of::<Params>() as u16)),
            0,
        )?;
        Ok(())
    }

    /// GET_PARAMS: what SET_PARAMS gave the device (a recovered one: the dead server's).
    pub fn get_params(&mut self, dev_id: u32) -> Result<Params, UblkError> {
        let mut out = Params {
            len: std::mem::size_of::<Params>() as u32,
            ..Params::default()
        };
        let addr = std::ptr::addr_of_mut!(out) as u64;
        self.command(
            sys::UBLK_U_CMD_GET_PARAMS,
            "GET_PARAMS",
            dev_id,
            Some((addr, std::mem::size_of::<Params>() as u16)),
            0,
        )?;
        Ok(out)
    }

    /// START_DEV: blocks until every queue fetched every tag, then the disk appears.
    pub fn start_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            sys::UBLK_U_CMD_START_DEV,
            "START_DEV",
            dev_id,
            None,
            u64::from(std::process::id()),
        )
        .map(drop)
    }

    /// STOP_DEV: removes the disk (flushing through the queues, which must still serve), then
    /// completes every outstanding FETCH with `UBLK_IO_RES_ABORT`.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(sys::UBLK_U_CMD_STOP_DEV, "STOP_DEV", dev_id, None, 0)
            .map(drop)
    }

    /// DEL_DEV: removes the device once its char device is closed; waits until the id is free.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(sys::UBLK_U_CMD_DEL_DEV, "DEL_DEV", dev_id, None, 0)
            .map(drop)
    }

    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            "START_USER_RECOVERY",
            dev_id,
            None,
            0,
        )
        .map(drop)
    }

    /// END_USER_RECOVERY: like START_DEV, waits for every queue's FETCHes.
    pub fn end_user_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.command(
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            "END_USER_RECOVERY",
            dev_id,
            None,
            u64::from(std::process::id()),
        )
        .map(drop)
    }
}
