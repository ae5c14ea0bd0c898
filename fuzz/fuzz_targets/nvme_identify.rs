//! What an NVMe device reports about itself, into the driver's parsers: Identify Controller,
//! Identify Namespace, the active namespace list, the error and SMART log pages, and what the
//! driver derives from them (the namespace it serves as a bdev, the transfer limit).
//!
//! The input is the device's pages back to back (controller, namespace, namespace list, log
//! bytes; short input is zero-filled, as a device that returned less), then one byte picking
//! CAP.MPSMIN and one the NSID.
//!
//! Invariants: parsing never panics; a parsed structure encodes to a page that parses to the
//! same structure (nothing read that the driver could not have meant); the namespace list is
//! strictly increasing with no reserved NSID; a namespace the driver accepts has a
//! power-of-two block size of at least 512 bytes, a non-zero size and a valid NSID; the
//! transfer limit, when there is one, is at least a page.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollux_nvme::spec::{
    parse_active_ns_list, ErrorLogEntry, IdentifyController, IdentifyNamespace, SmartLog,
    ERROR_LOG_ENTRY_BYTES, IDENTIFY_BYTES, SMART_LOG_BYTES,
};
use pollux_nvme::Namespace;

/// Page `index` of the input (4096 bytes each), zero-filled past its end.
fn page(input: &[u8], index: usize) -> [u8; IDENTIFY_BYTES] {
    let mut out = [0u8; IDENTIFY_BYTES];
    let start = (index * IDENTIFY_BYTES).min(input.len());
    let bytes = &input[start..input.len().min(start + IDENTIFY_BYTES)];
    out[..bytes.len()].copy_from_slice(bytes);
    out
}

fuzz_target!(|input: &[u8]| {
    let tail = input.len().saturating_sub(2);
    let (pages, knobs) = input.split_at(tail);
    let page_size_min_bytes = 4096u64 << (knobs.first().copied().unwrap_or(0) % 16);
    let nsid = u32::from(knobs.get(1).copied().unwrap_or(1));

    let controller = IdentifyController::parse(&page(pages, 0));
    assert_eq!(
        IdentifyController::parse(&controller.encode()),
        controller,
        "identify controller does not survive encode + parse"
    );
    if let Some(max_transfer_bytes) = controller.max_transfer_bytes(page_size_min_bytes) {
        assert!(
            max_transfer_bytes >= page_size_min_bytes,
            "MDTS {} gives {max_transfer_bytes} bytes, below a page",
            controller.mdts
        );
    }

    let identify = IdentifyNamespace::parse(&page(pages, 1));
    assert_eq!(
        IdentifyNamespace::parse(&identify.encode()),
        identify,
        "identify namespace does not survive encode + parse"
    );
    if let Some(ns) = Namespace::new(nsid, identify.clone(), 1 << 21) {
        let block = ns.block_size_bytes();
        assert!(
            block >= 512 && block.is_power_of_two(),
            "block size {block}"
        );
        assert!(ns.num_blocks() > 0);
        assert_eq!(ns.num_blocks(), identify.nsze);
        assert!(ns.nsid() != 0 && ns.nsid() != u32::MAX);
    }

    let list = parse_active_ns_list(&page(pages, 2));
    assert!(
        list.windows(2).all(|pair| pair[0] < pair[1]),
        "namespace list not strictly increasing: {list:?}"
    );
    assert!(list.iter().all(|&id| id != 0 && id != u32::MAX));
    assert!(list.len() <= IDENTIFY_BYTES / 4);

    let log = page(pages, 3);
    let entries = ErrorLogEntry::parse_log(&log);
    assert!(entries.len() <= IDENTIFY_BYTES / ERROR_LOG_ENTRY_BYTES);
    assert!(entries.iter().all(|entry| entry.error_count != 0));
    let smart: &[u8; SMART_LOG_BYTES] = log[..SMART_LOG_BYTES]
        .try_into()
        .expect("a page holds a SMART log");
    let _ = SmartLog::parse(smart);
});
