//! What the probe checks in an NVMe controller's registers. Decoding and IDENTIFY come from
//! `pollux-nvme`; this module only says what a sane controller must report.

use pollux_nvme::spec::Cap;

use crate::ProbeError;

/// One line with every CAP field, for the log.
pub fn describe_cap(cap: &Cap) -> String {
    format!(
        "{:#018x} MQES={} entries CQR={} AMS={:#x} TO={} ms DSTRD={} bytes NSSRS={} \
         CSS={:#04x} BPS={} MPSMIN={} MPSMAX={} PMRS={} CMBS={}",
        cap.raw,
        cap.max_queue_entries,
        u8::from(cap.contiguous_queues_required),
        cap.arbitration_mechanisms,
        cap.timeout_ms,
        cap.doorbell_stride_bytes,
        u8::from(cap.nvm_subsystem_reset),
        cap.command_sets,
        u8::from(cap.boot_partitions),
        cap.page_size_min_bytes,
        cap.page_size_max_bytes,
        u8::from(cap.persistent_memory_region),
        u8::from(cap.controller_memory_buffer),
    )
}

/// Checks what any NVMe controller must report, and what Pollux relies on.
pub fn check_plausible(cap: &Cap) -> Result<(), ProbeError> {
    let implausible = |why: &str| {
        Err(ProbeError::Implausible(format!(
            "CAP {:#018x}: {why}",
            cap.raw
        )))
    };
    if cap.max_queue_entries < 2 {
        return implausible("MQES below the minimum of 1 (2 entries)");
    }
    if cap.command_sets & 1 == 0 {
        return implausible("NVM command set (CSS bit 0) not supported");
    }
    if cap.page_size_min_bytes > cap.page_size_max_bytes {
        return implausible("MPSMIN above MPSMAX");
    }
    if cap.page_size_min_bytes > 4096 {
        return implausible("controller cannot use 4 KiB pages (MPSMIN > 0)");
    }
    if cap.timeout_ms == 0 {
        return implausible("TO is 0");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_cap_is_plausible_and_a_broken_one_is_not() {
        // What QEMU 7.2's emulated controller reports.
        let qemu = Cap::decode(0x0040_1820_0f01_07ff);
        assert!(check_plausible(&qemu).is_ok());
        assert!(describe_cap(&qemu).contains("MQES=2048 entries"));
        assert!(describe_cap(&qemu).contains("TO=7500 ms"));
        let no_nvm = Cap::decode(0x0040_1800_0f01_07ff);
        assert!(check_plausible(&no_nvm).is_err());
        let zero_timeout = Cap::decode(0x0040_1820_0001_07ff);
        assert!(check_plausible(&zero_timeout).is_err());
    }
}
