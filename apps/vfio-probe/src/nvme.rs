//! The few NVMe controller registers and admin-queue steps the probe needs (NVMe Base 1.4,
//! section 3.1 "Controller registers", 7.6.1 "Initialization").

use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use pollux_env::dma::DmaBuffer;
use pollux_env::vfio::Bar;

use crate::ProbeError;

pub const REG_CAP: u64 = 0x00;
pub const REG_VS: u64 = 0x08;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
/// Doorbells start here; SQ y tail at 0x1000 + (2y) * stride, CQ y head at + (2y + 1) * stride.
const REG_DOORBELL_BASE: u64 = 0x1000;

const CC_EN: u32 = 1 << 0;
/// I/O submission / completion queue entry sizes as log2: 64 and 16 bytes (CC.IOSQES, IOCQES).
const CC_IOSQES_64: u32 = 6 << 16;
const CC_IOCQES_16: u32 = 4 << 20;
const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;

const SQE_BYTES: usize = 64;
const CQE_BYTES: usize = 16;
const OPC_IDENTIFY: u32 = 0x06;
const CNS_CONTROLLER: u32 = 0x01;
const IDENTIFY_BYTES: usize = 4096;

/// Layout of the probe's DMA buffer: the admin SQ, the admin CQ and the IDENTIFY data each on
/// their own 4 KiB page (the controller runs with CC.MPS = 0, 4 KiB pages).
pub const ADMIN_SQ_OFFSET: usize = 0;
pub const ADMIN_CQ_OFFSET: usize = 0x1000;
pub const IDENTIFY_OFFSET: usize = 0x2000;
pub const BUFFER_BYTES: usize = 0x3000;
/// Two entries: the minimum queue size (AQA is 0's based and must be at least 1).
const ADMIN_QUEUE_ENTRIES: u32 = 2;

/// Under TCG a "500 ms" controller step can take several times longer than on hardware.
const MIN_READY_TIMEOUT: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Controller Capabilities (CAP, offset 0), decoded.
#[derive(Debug, Clone, Copy)]
pub struct Cap {
    pub raw: u64,
    /// Maximum queue entries supported (MQES is 0's based; this is MQES + 1).
    pub max_queue_entries: u32,
    pub contiguous_queues_required: bool,
    pub arbitration_mechanisms: u8,
    /// Worst-case time to become ready (TO, in 500 ms units), in milliseconds.
    pub timeout_ms: u32,
    /// Doorbell stride: 4 << DSTRD bytes.
    pub doorbell_stride_bytes: u64,
    pub nvm_subsystem_reset: bool,
    /// Command sets supported (CSS bitmap: bit 0 NVM, bit 6 I/O command sets, bit 7 admin only).
    pub command_sets: u8,
    pub boot_partitions: bool,
    pub page_size_min_bytes: u64,
    pub page_size_max_bytes: u64,
    pub persistent_memory_region: bool,
    pub controller_memory_buffer: bool,
}

impl Cap {
    pub fn decode(raw: u64) -> Self {
        let bits = |shift: u32, width: u32| (raw >> shift) & ((1u64 << width) - 1);
        Self {
            raw,
            max_queue_entries: bits(0, 16) as u32 + 1,
            contiguous_queues_required: bits(16, 1) != 0,
            arbitration_mechanisms: bits(17, 2) as u8,
            timeout_ms: bits(24, 8) as u32 * 500,
            doorbell_stride_bytes: 4 << bits(32, 4),
            nvm_subsystem_reset: bits(36, 1) != 0,
            command_sets: bits(37, 8) as u8,
            boot_partitions: bits(45, 1) != 0,
            page_size_min_bytes: 1 << (12 + bits(48, 4)),
            page_size_max_bytes: 1 << (12 + bits(52, 4)),
            persistent_memory_region: bits(56, 1) != 0,
            controller_memory_buffer: bits(57, 1) != 0,
        }
    }

    /// Checks what any NVMe controller must report, and what this probe relies on.
    pub fn check_plausible(&self) -> Result<(), ProbeError> {
        let implausible = |why: &str| {
            Err(ProbeError::Implausible(format!(
                "CAP {:#018x}: {why}",
                self.raw
            )))
        };
        if self.max_queue_entries < 2 {
            return implausible("MQES below the minimum of 1 (2 entries)");
        }
        if self.command_sets & 1 == 0 {
            return implausible("NVM command set (CSS bit 0) not supported");
        }
        if self.page_size_min_bytes > self.page_size_max_bytes {
            return implausible("MPSMIN above MPSMAX");
        }
        if self.page_size_min_bytes > 4096 {
            return implausible("controller cannot use 4 KiB pages (MPSMIN > 0)");
        }
        if self.timeout_ms == 0 {
            return implausible("TO is 0");
        }
        Ok(())
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#018x} MQES={} entries CQR={} AMS={:#x} TO={} ms DSTRD={} bytes NSSRS={} \
             CSS={:#04x} BPS={} MPSMIN={} MPSMAX={} PMRS={} CMBS={}",
            self.raw,
            self.max_queue_entries,
            u8::from(self.contiguous_queues_required),
            self.arbitration_mechanisms,
            self.timeout_ms,
            self.doorbell_stride_bytes,
            u8::from(self.nvm_subsystem_reset),
            self.command_sets,
            u8::from(self.boot_partitions),
            self.page_size_min_bytes,
            self.page_size_max_bytes,
            u8::from(self.persistent_memory_region),
            u8::from(self.controller_memory_buffer),
        )
    }
}

/// Version (VS, offset 8): major.minor.tertiary.
pub fn format_version(raw: u32) -> String {
    format!("{}.{}.{}", raw >> 16, (raw >> 8) & 0xff, raw & 0xff)
}

/// What IDENTIFY CONTROLLER said about the controller.
pub struct Identity {
    pub vendor_id: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
}

fn wait_ready(bar: &Bar<'_>, cap: &Cap, ready: bool) -> Result<(), ProbeError> {
    let timeout = Duration::from_millis(u64::from(cap.timeout_ms)).max(MIN_READY_TIMEOUT);
    let deadline = Instant::now() + timeout;
    loop {
        let csts = bar.read32(REG_CSTS)?;
        if csts == u32::MAX {
            return Err(ProbeError::Controller(
                "CSTS reads all ones: the device is gone or not decoding".into(),
            ));
        }
        if ready && csts & CSTS_CFS != 0 {
            return Err(ProbeError::Controller(format!(
                "controller fatal status (CSTS {csts:#x})"
            )));
        }
        if (csts & CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ProbeError::Timeout {
                what: if ready {
                    "CSTS.RDY = 1 after enabling"
                } else {
                    "CSTS.RDY = 0 after disabling"
                },
                waited: timeout,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Clears CC.EN and waits for CSTS.RDY = 0: afterwards the controller does no more DMA.
pub fn disable(bar: &Bar<'_>, cap: &Cap) -> Result<(), ProbeError> {
    let cc = bar.read32(REG_CC)?;
    if cc & CC_EN != 0 {
        bar.write32(REG_CC, cc & !CC_EN)?;
    }
    wait_ready(bar, cap, false)
}

/// Enables the controller with an admin queue pair in `buffer` (at `iova`) and runs
/// IDENTIFY CONTROLLER. Leaves the controller enabled: the caller disables it (before
/// unmapping the buffer) whatever this returns.
pub fn identify_controller(
    bar: &Bar<'_>,
    cap: &Cap,
    buffer: &mut DmaBuffer,
    iova: u64,
) -> Result<Identity, ProbeError> {
    disable(bar, cap)?;
    buffer.fill(0, BUFFER_BYTES, 0)?;

    let queue_size = ADMIN_QUEUE_ENTRIES - 1;
    bar.write32(REG_AQA, (queue_size << 16) | queue_size)?;
    bar.write64(REG_ASQ, iova + ADMIN_SQ_OFFSET as u64)?;
    bar.write64(REG_ACQ, iova + ADMIN_CQ_OFFSET as u64)?;
    // CSS = 0 (NVM), MPS = 0 (4 KiB), AMS = 0 (round robin).
    bar.write32(REG_CC, CC_IOCQES_16 | CC_IOSQES_64 | CC_EN)?;
    wait_ready(bar, cap, true)?;

    // Submission queue entry (NVMe 1.4, 4.2): CDW0 = opcode | command id << 16, NSID = 0,
    // PRP1 in dwords 6-7 (the 4 KiB identify page, so no PRP2), CDW10 = CNS.
    let command_id: u32 = 1;
    let mut sqe = [0u8; SQE_BYTES];
    sqe[0..4].copy_from_slice(&(OPC_IDENTIFY | (command_id << 16)).to_le_bytes());
    sqe[24..32].copy_from_slice(&(iova + IDENTIFY_OFFSET as u64).to_le_bytes());
    sqe[40..44].copy_from_slice(&CNS_CONTROLLER.to_le_bytes());
    buffer.write_at(ADMIN_SQ_OFFSET, &sqe)?;
    // The entry must be in memory before the doorbell tells the controller to fetch it.
    fence(Ordering::SeqCst);
    bar.write32(REG_DOORBELL_BASE, 1)?;

    // Completion queue entry (4.6): DW3 = command id | phase << 16 | status << 17. The queue
    // was zeroed, so the first entry posted carries phase 1.
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let dw3 = loop {
        let mut cqe = [0u8; CQE_BYTES];
        buffer.read_at(ADMIN_CQ_OFFSET, &mut cqe)?;
        let dw3 = u32::from_le_bytes([cqe[12], cqe[13], cqe[14], cqe[15]]);
        if dw3 & (1 << 16) != 0 {
            break dw3;
        }
        if Instant::now() >= deadline {
            return Err(ProbeError::Timeout {
                what: "the IDENTIFY completion",
                waited: COMMAND_TIMEOUT,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    // Read the data only after seeing the completion.
    fence(Ordering::SeqCst);
    bar.write32(REG_DOORBELL_BASE + cap.doorbell_stride_bytes, 1)?;
    let status = dw3 >> 17;
    if dw3 & 0xffff != command_id {
        return Err(ProbeError::Controller(format!(
            "completion for command id {} instead of {command_id}",
            dw3 & 0xffff
        )));
    }
    if status != 0 {
        return Err(ProbeError::Controller(format!(
            "IDENTIFY failed: status code type {:#x}, status code {:#x}",
            (status >> 8) & 0x7,
            status & 0xff
        )));
    }

    let mut data = vec![0u8; IDENTIFY_BYTES];
    buffer.read_at(IDENTIFY_OFFSET, &mut data)?;
    // Identify Controller data structure (5.15.2.2): VID 0..2, SN 4..24, MN 24..64, FR 64..72,
    // ASCII padded with spaces.
    let text = |range: std::ops::Range<usize>| {
        String::from_utf8_lossy(&data[range])
            .trim_end_matches([' ', '\0'])
            .to_string()
    };
    Ok(Identity {
        vendor_id: u16::from_le_bytes([data[0], data[1]]),
        serial: text(4..24),
        model: text(24..64),
        firmware: text(64..72),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_qemu_cap() {
        // QEMU 7.2's NVMe: MQES 0x7ff, CQR, TO 0xf, CSS NVM|CSI|admin-only, MPSMAX 4.
        let cap = Cap::decode(0x0040_1820_0f01_07ff);
        assert_eq!(cap.max_queue_entries, 2048);
        assert!(cap.contiguous_queues_required);
        assert_eq!(cap.timeout_ms, 7500);
        assert_eq!(cap.doorbell_stride_bytes, 4);
        assert_eq!(cap.page_size_min_bytes, 4096);
        cap.check_plausible().unwrap();
        assert_eq!(format_version(0x0001_0400), "1.4.0");
    }
}
