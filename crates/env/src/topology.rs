//! Host topology: which cores exist, which core and package each CPU belongs to, and which
//! NUMA node each CPU and each PCI device is closest to.
//!
//! Detected once through hwloc ([`hwlocality`]) and copied into plain vectors, so lookups
//! are cheap and the result is `Send + Sync` and cloneable. hwloc's own PCI discovery is
//! asked for; when it is unavailable (or a device appeared later, or hwloc could not tell
//! its locality) the kernel's `/sys/bus/pci/devices/<address>/numa_node` answers instead,
//! where `-1` (no locality reported, as on single-node hosts) counts as node 0.
//!
//! Placement policy (which core polls which device) is not decided here; this module only
//! reports facts for that policy to use.

use std::collections::HashMap;
use std::path::Path;

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;

use crate::pci::PciAddress;

/// Why the topology could not be detected.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("hwloc could not {stage}")]
    Hwloc {
        stage: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("hwloc reported a PU without an OS index")]
    PuWithoutOsIndex,
    #[error("hwloc reported no CPU at all")]
    NoCpus,
    #[error("could not read {path}")]
    Sysfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {text:?} is not a CPU list like 0-3,8")]
    BadCpuList { path: String, text: String },
}

/// One logical CPU (hwloc PU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// OS index, as in `/sys/devices/system/cpu/cpu<N>` and core masks.
    pub cpu: usize,
    /// OS index of its core (sysfs `topology/core_id`); unique within a package only.
    pub core_id: usize,
    /// OS index of its package (socket).
    pub package_id: usize,
    /// NUMA node whose memory is local to it.
    pub numa_node: u32,
}

/// The detected host topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Sorted by `cpu`.
    cpus: Vec<CpuInfo>,
    numa_node_count: u32,
    /// PCI devices whose locality hwloc reported as exactly one NUMA node.
    pci_nodes: HashMap<PciAddress, u32>,
    sysfs_root: String,
}

impl Topology {
    /// Detects the topology of this host (with PCI devices when hwloc can see them).
    pub fn detect() -> Result<Topology, TopologyError> {
        let topology = build_hwloc_topology()?;
        let nodes: Vec<(u32, &TopologyObject)> = topology
            .objects_with_type(ObjectType::NUMANode)
            .map(|node| (node.os_index().unwrap_or(0) as u32, node))
            .collect();
        let mut cpus = Vec::new();
        for pu in topology.objects_with_type(ObjectType::PU) {
            let cpu = pu.os_index().ok_or(TopologyError::PuWithoutOsIndex)?;
            let os_index_of = |ty| {
                pu.first_ancestor_with_type(ty)
                    .and_then(TopologyObject::os_index)
                    .unwrap_or(0)
            };
            // A NUMA node is a memory child of the CPU-side object it is local to; its
            // cpuset holds the CPUs that are local to it.
            let numa_node = nodes
                .iter()
                .find(|(_, node)| node.cpuset().is_some_and(|set| set.is_set(cpu)))
                .map_or(0, |(os_index, _)| *os_index);
            cpus.push(CpuInfo {
                cpu,
                core_id: os_index_of(ObjectType::Core),
                package_id: os_index_of(ObjectType::Package),
                numa_node,
            });
        }
        if cpus.is_empty() {
            return Err(TopologyError::NoCpus);
        }
        cpus.sort_by_key(|info| info.cpu);
        let mut pci_nodes = HashMap::new();
        for device in topology.pci_devices() {
            let Some(ObjectAttributes::PCIDevice(pci)) = device.attributes() else {
                continue;
            };
            let address = PciAddress {
                domain: pci.domain().into(),
                bus: pci.bus_id(),
                device: pci.bus_device(),
                function: pci.function(),
            };
            // The nearest CPU-side ancestor's nodeset; a device whose locality hwloc does not
            // know hangs below the machine (all nodes) and is left to sysfs.
            let node = device
                .first_non_io_ancestor()
                .and_then(TopologyObject::nodeset)
                .filter(|set| set.weight() == Some(1))
                .and_then(|set| set.first_set())
                .map(|index| usize::from(index) as u32);
            if let Some(node) = node {
                pci_nodes.insert(address, node);
            }
        }
        let numa_node_count = (nodes.len() as u32).max(1);
        tracing::debug!(
            cpus = cpus.len(),
            numa_node_count,
            pci_devices = pci_nodes.len(),
            "topology detected"
        );
        Ok(Topology {
            cpus,
            numa_node_count,
            pci_nodes,
            sysfs_root: "/sys".to_string(),
        })
    }

    /// Every CPU, sorted by OS index.
    pub fn cpus(&self) -> Vec<CpuInfo> {
        self.cpus.clone()
    }

    /// Number of NUMA nodes (1 on hosts without NUMA).
    pub fn numa_node_count(&self) -> u32 {
        self.numa_node_count
    }

    /// NUMA node of CPU `cpu` (OS index); `None` for a CPU this host does not have.
    pub fn numa_node_of_cpu(&self, cpu: usize) -> Option<u32> {
        self.cpus
            .binary_search_by_key(&cpu, |info| info.cpu)
            .ok()
            .map(|index| self.cpus[index].numa_node)
    }

    /// NUMA node closest to a PCI device: hwloc's answer, else sysfs `numa_node` (`-1`, no
    /// locality reported, counts as node 0). `None` when the device does not exist.
    pub fn numa_node_of_pci(&self, address: &PciAddress) -> Option<u32> {
        if let Some(&node) = self.pci_nodes.get(address) {
            return Some(node);
        }
        let path = address.sysfs_path(&self.sysfs_root).join("numa_node");
        let text = std::fs::read_to_string(&path).ok()?;
        match text.trim().parse::<i64>() {
            Ok(node) if node >= 0 => u32::try_from(node).ok(),
            Ok(_) => Some(0),
            Err(_) => {
                tracing::warn!(path = %path.display(), text = %text.trim(), "unreadable numa_node");
                None
            }
        }
    }
}

fn build_hwloc_topology() -> Result<hwlocality::Topology, TopologyError> {
    let hwloc_error = |stage| {
        move |source: Box<dyn std::error::Error + Send + Sync>| TopologyError::Hwloc {
            stage,
            source,
        }
    };
    // PCI discovery first; hwloc may have been built without it, so fall back to the
    // CPU/memory topology alone (PCI locality then comes from sysfs).
    let with_io = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|error| hwloc_error("enable PCI discovery")(error.into()))
        .and_then(|builder| {
            builder
                .build()
                .map_err(|error| hwloc_error("build the topology with PCI devices")(error.into()))
        });
    match with_io {
        Ok(topology) => Ok(topology),
        Err(error) => {
            tracing::debug!(%error, "hwloc PCI discovery unavailable, using sysfs for PCI locality");
            hwlocality::Topology::new()
                .map_err(|error| hwloc_error("build the topology")(error.into()))
        }
    }
}

/// Number of NUMA nodes the kernel reports (`/sys/devices/system/node/node<N>`); 1 when the
/// kernel has no NUMA support (the directory is missing) or the count cannot be read.
/// Cheap enough for [`crate::dma::DmaMemory`] to call without detecting the whole topology.
pub fn sysfs_numa_node_count() -> u32 {
    sysfs_numa_nodes(Path::new("/sys/devices/system/node"))
        .map(|nodes| (nodes.len() as u32).max(1))
        .unwrap_or(1)
}

/// OS indices of the `node<N>` entries under `dir`, sorted.
fn sysfs_numa_nodes(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut nodes: Vec<u32> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix("node")?
                .parse()
                .ok()
        })
        .collect();
    nodes.sort_unstable();
    Ok(nodes)
}

/// Parses a kernel CPU list (`0-3,8,10-11`; empty for none), as in
/// `/sys/devices/system/cpu/online` and `node<N>/cpulist`.
pub fn parse_cpu_list(path: &str, text: &str) -> Result<Vec<usize>, TopologyError> {
    let bad = || TopologyError::BadCpuList {
        path: path.to_string(),
        text: text.to_string(),
    };
    let mut cpus = Vec::new();
    for item in text.trim().split(',').filter(|item| !item.is_empty()) {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (first, last),
            None => (item, item),
        };
        let first: usize = first.parse().map_err(|_| bad())?;
        let last: usize = last.parse().map_err(|_| bad())?;
        // Bounded so a corrupt file cannot make us allocate without limit.
        if first > last || last >= crate::cpumask::MAX_CORES {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_cpu_list(path: &str) -> Vec<usize> {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        parse_cpu_list(path, &text).unwrap()
    }

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(parse_cpu_list("t", "0-3,8\n").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("t", "5").unwrap(), vec![5]);
        assert!(parse_cpu_list("t", "\n").unwrap().is_empty());
        for bad in ["3-1", "a", "1-", "0-99999", "1,,x"] {
            assert!(parse_cpu_list("t", bad).is_err(), "{bad}");
        }
    }

    /// hwloc's view must agree with the kernel's: the same online CPUs, the same node count,
    /// and each CPU on the node whose cpulist names it.
    #[test]
    fn matches_sysfs() {
        let topology = Topology::detect().expect("detect topology");
        let online = read_cpu_list("/sys/devices/system/cpu/online");
        let cpus = topology.cpus();
        let detected: Vec<usize> = cpus.iter().map(|info| info.cpu).collect();
        assert_eq!(
            detected, online,
            "CPUs: hwloc vs /sys/devices/system/cpu/online"
        );

        let node_dir = Path::new("/sys/devices/system/node");
        let mut expected_node_of_cpu: HashMap<usize, u32> = HashMap::new();
        if node_dir.exists() {
            let nodes = sysfs_numa_nodes(node_dir).unwrap();
            assert_eq!(topology.numa_node_count(), nodes.len() as u32);
            assert_eq!(sysfs_numa_node_count(), nodes.len() as u32);
            for node in nodes {
                let path = format!("/sys/devices/system/node/node{node}/cpulist");
                for cpu in read_cpu_list(&path) {
                    expected_node_of_cpu.insert(cpu, node);
                }
            }
        } else {
            assert_eq!(topology.numa_node_count(), 1);
            assert_eq!(sysfs_numa_node_count(), 1);
            expected_node_of_cpu.extend(online.iter().map(|&cpu| (cpu, 0)));
        }
        for info in &cpus {
            let expected = expected_node_of_cpu.get(&info.cpu).copied().unwrap_or(0);
            assert_eq!(info.numa_node, expected, "node of cpu {}", info.cpu);
            assert_eq!(topology.numa_node_of_cpu(info.cpu), Some(expected));
            // Core and package ids as the kernel reports them, where it does.
            let sysfs = |name: &str| {
                std::fs::read_to_string(format!(
                    "/sys/devices/system/cpu/cpu{}/topology/{name}",
                    info.cpu
                ))
                .ok()
                .and_then(|text| text.trim().parse::<usize>().ok())
            };
            if let Some(core_id) = sysfs("core_id") {
                assert_eq!(info.core_id, core_id, "core of cpu {}", info.cpu);
            }
            if let Some(package_id) = sysfs("physical_package_id") {
                assert_eq!(info.package_id, package_id, "package of cpu {}", info.cpu);
            }
        }
        let beyond = online.last().copied().unwrap_or(0) + 1;
        assert_eq!(topology.numa_node_of_cpu(beyond), None);
    }

    /// Every PCI device the kernel lists gets the node sysfs gives it (-1 meaning node 0);
    /// a device that does not exist gets none.
    #[test]
    fn pci_nodes_match_sysfs() {
        let topology = Topology::detect().expect("detect topology");
        let Ok(entries) = std::fs::read_dir("/sys/bus/pci/devices") else {
            return; // No PCI bus visible (container without /sys/bus/pci).
        };
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name();
            let Some(address) = name.to_str().and_then(|name| PciAddress::parse(name).ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("numa_node")) else {
                continue;
            };
            let expected = text.trim().parse::<i64>().unwrap().max(0) as u32;
            assert_eq!(
                topology.numa_node_of_pci(&address),
                Some(expected),
                "{address}"
            );
        }
        let absent = PciAddress::parse("ffff:ff:1f.7").unwrap();
        assert_eq!(topology.numa_node_of_pci(&absent), None);
    }
}
