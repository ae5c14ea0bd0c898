//! The discovery service (NVMe-oF 1.1, 5.3): a discovery controller on every listener
//! (`nqn.2014-08.org.nvmexpress.discovery`) whose log page lists, for the host asking, each
//! subsystem it may connect to at each address that subsystem listens on. The page is built
//! whole on each Get Log Page (it changes rarely and is small) and sent in the pieces asked
//! for: nvme-cli reads the header first, then the whole page in 4 KiB pieces, and checks the
//! generation counter did not change in between.

use pollux_nvme::spec::{
    encode_discovery_log_header, DiscoveryLogEntry, DISCOVERY_LOG_ENTRY_BYTES,
    DISCOVERY_LOG_HEADER_BYTES,
};

/// Writes the page (header, then the entries) into `out`.
pub(crate) fn encode_log(genctr: u64, entries: &[DiscoveryLogEntry], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(DISCOVERY_LOG_HEADER_BYTES + entries.len() * DISCOVERY_LOG_ENTRY_BYTES);
    out.extend_from_slice(&encode_discovery_log_header(genctr, entries.len() as u64));
    for entry in entries {
        out.extend_from_slice(&entry.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollux_nvme::spec::{ADRFAM_IPV4, SUBTYPE_NVME, TRTYPE_TCP};

    #[test]
    fn log_layout() {
        let entry = DiscoveryLogEntry {
            trtype: TRTYPE_TCP,
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            treq: 2,
            portid: 0,
            cntlid: 0xffff,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420".into(),
            subnqn: "nqn.2016-06.io.spdk:cnode1".into(),
            traddr: "127.0.0.1".into(),
            tsas_sectype: 0,
        };
        let mut out = Vec::new();
        encode_log(7, &[entry.clone(), entry], &mut out);
        assert_eq!(out.len(), 3 * 1024);
        assert_eq!(u64::from_le_bytes(out[0..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 2);
        assert_eq!(out[1024], TRTYPE_TCP);
        assert_eq!(&out[2048 + 512..2048 + 521], b"127.0.0.1");
    }
}
