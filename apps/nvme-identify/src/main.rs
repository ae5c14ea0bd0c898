//! `nvme-identify <PCI address>`: initialises an NVMe controller bound to vfio-pci with
//! `pollux-nvme` and prints what Identify Controller, Identify Namespace, CAP/VS and a few Get
//! Features / Get Log Page commands report, in the layout of SPDK's `spdk_nvme_identify`
//! (`examples/nvme/identify`), so the outputs can be compared line by line. The controller is
//! shut down (CC.SHN, `Controller::detach`) and the DMA mappings removed before it exits.
//!
//! Fields `pollux-nvme`'s parsed structures do not carry (RAB, CNTRLTYPE, DLFEAT, ...) are
//! read from the raw 4 KiB Identify pages (`Controller::identify_raw`).
//!
//! Exit status 0 on success, 1 with an error on stderr otherwise. The `scripts/vm-test.sh
//! nvme` and `setup` suites run it in a QEMU guest.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use pollux_env::dma::{DmaConfig, DmaError, DmaMemory};
use pollux_env::memmap::{MemMap, TranslationError};
use pollux_env::pci::{PciAddress, PciAddressError};
use pollux_env::vfio::{Bar, VfioError, VfioPciDevice};
use pollux_nvme::spec::{cns, fid, Cap, IdentifyController, NumberOfQueues, IDENTIFY_BYTES};
use pollux_nvme::{Controller, ControllerOptions, Namespace, NvmeError};

/// Everything that can stop the tool, each with what it was doing.
#[derive(Debug, thiserror::Error)]
enum IdentifyError {
    #[error("give either a PCI address or -r 'trtype:PCIe traddr:<address>', not both or neither")]
    Usage,
    #[error("transport ID {text:?}: {reason}")]
    TransportId { text: String, reason: String },
    #[error("bad PCI address in the transport ID")]
    Address(#[from] PciAddressError),
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error("DMA memory")]
    Dma(#[from] DmaError),
    #[error("attaching the VFIO container to the memory map")]
    MemMap(#[from] TranslationError),
    #[error("NVMe controller at {address}")]
    Nvme {
        address: PciAddress,
        #[source]
        source: NvmeError,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "nvme-identify",
    about = "Print an NVMe controller's identify data through VFIO (like spdk_nvme_identify)"
)]
struct Args {
    /// PCI address of the controller (bound to vfio-pci), e.g. 0000:00:04.0
    address: Option<PciAddress>,
    /// Transport ID as spdk_nvme_identify takes it: 'trtype:PCIe traddr:0000:00:04.0'
    #[arg(short = 'r', long = "transport-id", value_name = "TRID")]
    transport_id: Option<String>,
    /// DMA memory to reserve, in MiB
    #[arg(short = 's', long = "mem-size", default_value_t = 4)]
    dma_mib: usize,
    /// Use locked anonymous memory instead of hugepages
    #[arg(long)]
    no_huge: bool,
}

/// Parses SPDK's `key:value` transport ID string (`spdk_nvme_transport_id_parse`): only
/// `trtype:PCIe` with `traddr` is meaningful here; other keys are refused.
fn parse_transport_id(text: &str) -> Result<PciAddress, IdentifyError> {
    let refuse = |reason: String| IdentifyError::TransportId {
        text: text.to_string(),
        reason,
    };
    let mut address = None;
    for pair in text.split_whitespace() {
        let (key, value) = pair
            .split_once([':', '='])
            .ok_or_else(|| refuse(format!("{pair:?} is not key:value")))?;
        match key.to_ascii_lowercase().as_str() {
            "trtype" if value.eq_ignore_ascii_case("pcie") => {}
            "trtype" => {
                return Err(refuse(format!(
                    "transport {value:?} unsupported (PCIe only)"
                )))
            }
            "traddr" => address = Some(PciAddress::parse(value)?),
            _ => return Err(refuse(format!("key {key:?} unsupported (trtype, traddr)"))),
        }
    }
    address.ok_or_else(|| refuse("no traddr".to_string()))
}

fn main() -> ExitCode {
    pollux_cli::init_logging("warn");
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = pollux_cli::error_chain(&error);
            eprintln!("nvme-identify: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), IdentifyError> {
    let address = match (&args.address, &args.transport_id) {
        (Some(address), None) => *address,
        (None, Some(text)) => parse_transport_id(text)?,
        _ => return Err(IdentifyError::Usage),
    };
    // Opening the device first gives "not bound to vfio-pci ... scripts/setup.sh" when the
    // kernel's nvme driver still holds it.
    let device = VfioPciDevice::open(&address)?;
    let vendor_id = device.config_read_u16(0x00)?;
    let device_id = device.config_read_u16(0x02)?;
    device.enable_bus_master()?;
    let bar = Arc::new(device.map_bar(0)?);
    let memory = DmaMemory::new(DmaConfig {
        size_mib: args.dma_mib,
        no_huge: args.no_huge,
    })?;
    MemMap::global().set_mapper(device.container().clone())?;
    let result = identify(&bar, &memory).map_err(|source| IdentifyError::Nvme { address, source });
    // The controller is shut down (or failed) by now: no DMA can land after the unmap.
    let cleared = MemMap::global().clear_mapper();
    let report = result?;
    cleared?;
    println!("=====================================================");
    println!("NVMe Controller at {address} [{vendor_id:04x}:{device_id:04x}]");
    println!("=====================================================");
    print!("{report}");
    Ok(())
}

/// Initialises the controller, renders the report, shuts the controller down.
fn identify(bar: &Arc<Bar<'_>>, memory: &Arc<DmaMemory>) -> Result<String, NvmeError> {
    let options = ControllerOptions {
        io_queues: 1,
        ..ControllerOptions::default()
    };
    let mut ctrlr = Controller::new(Arc::clone(bar), Arc::clone(memory), options)?;
    let rendered = render(&mut ctrlr);
    // Shut down even when a command failed; the first error wins.
    let detached = ctrlr.detach();
    let report = rendered?;
    detached?;
    Ok(report)
}

/// `name:` padded to SPDK's value column (40).
fn line(out: &mut String, name: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("{:<39}{value}\n", format!("{name}:")));
}

fn heading(out: &mut String, title: &str) {
    out.push_str(&format!("{title}\n{}\n", "=".repeat(title.len())));
}

fn supported(yes: bool) -> &'static str {
    if yes {
        "Supported"
    } else {
        "Not Supported"
    }
}

fn yes_no(yes: bool) -> &'static str {
    if yes {
        "Yes"
    } else {
        "No"
    }
}

/// A byte count with the largest binary unit it reaches (`32MiB`, `5GiB`), as SPDK prints
/// namespace sizes next to LBA counts.
fn human_bytes(bytes: u128) -> String {
    const UNITS: [(&str, u128); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, scale) in UNITS {
        if bytes >= scale {
            return format!("{}{unit}", bytes / scale);
        }
    }
    format!("{bytes}B")
}

fn render<R: pollux_nvme::Registers>(ctrlr: &mut Controller<R>) -> Result<String, NvmeError> {
    let raw = ctrlr.identify_raw(cns::CONTROLLER, 0)?;
    let id = ctrlr.identify().clone();
    let cap = *ctrlr.cap();
    let mut out = String::new();
    controller_section(&mut out, ctrlr, &id, &cap, &raw);
    admin_section(&mut out, &id);
    nvm_section(&mut out, &id);
    heading(&mut out, "Number of Queues");
    match ctrlr.get_features(fid::NUMBER_OF_QUEUES, 0) {
        Ok(dw0) => {
            let queues = NumberOfQueues::decode(dw0);
            line(&mut out, "Number of I/O Submission Queues", queues.io_sqs);
            line(&mut out, "Number of I/O Completion Queues", queues.io_cqs);
        }
        Err(error) => line(
            &mut out,
            "Get Features Number of Queues",
            format!("failed: {error}"),
        ),
    }
    out.push('\n');
    if id.has_volatile_write_cache() {
        heading(&mut out, "Volatile Write Cache");
        let state = match ctrlr.volatile_write_cache() {
            Ok(true) => "Enabled".to_string(),
            Ok(false) => "Disabled".to_string(),
            Err(error) => format!("Get Features failed: {error}"),
        };
        line(&mut out, "Volatile Write Cache", state);
        out.push('\n');
    }
    heading(&mut out, "Health Information");
    match ctrlr.smart_log() {
        Ok(log) => {
            line(
                &mut out,
                "Critical Warnings",
                format!("{:#04x}", log.critical_warning),
            );
            line(
                &mut out,
                "Current Temperature",
                format!(
                    "{} Kelvin ({} Celsius)",
                    log.temperature_k,
                    i32::from(log.temperature_k) - 273
                ),
            );
            line(
                &mut out,
                "Available Spare",
                format!("{}%", log.available_spare_percent),
            );
            line(
                &mut out,
                "Life Percentage Used",
                format!("{}%", log.percentage_used),
            );
            line(&mut out, "Data Units Read", log.data_units_read);
            line(&mut out, "Data Units Written", log.data_units_written);
            line(&mut out, "Host Read Commands", log.host_read_commands);
            line(&mut out, "Host Write Commands", log.host_write_commands);
            line(&mut out, "Power Cycles", log.power_cycles);
            line(&mut out, "Unsafe Shutdowns", log.unclean_shutdowns);
            line(&mut out, "Media Errors", log.media_errors);
        }
        Err(error) => line(&mut out, "SMART / Health log", format!("failed: {error}")),
    }
    out.push('\n');
    heading(&mut out, "Active Namespaces");
    let namespaces: Vec<Namespace> = ctrlr.namespaces().to_vec();
    if namespaces.is_empty() {
        out.push_str("No active namespaces\n");
    }
    for ns in &namespaces {
        let raw_ns = ctrlr.identify_raw(cns::NAMESPACE, ns.nsid())?;
        namespace_section(&mut out, ns, &id, &raw_ns);
    }
    Ok(out)
}

fn controller_section<R: pollux_nvme::Registers>(
    out: &mut String,
    ctrlr: &Controller<R>,
    id: &IdentifyController,
    cap: &Cap,
    raw: &[u8; IDENTIFY_BYTES],
) {
    heading(out, "Controller Capabilities/Features");
    line(out, "Vendor ID", format!("{:04x}", id.vid));
    line(out, "Subsystem Vendor ID", format!("{:04x}", id.ssvid));
    line(out, "Serial Number", &id.serial);
    line(out, "Model Number", &id.model);
    line(out, "Firmware Version", &id.firmware);
    // RAB: byte 72 (Identify Controller, NVMe Base 2.0 figure 275).
    line(out, "Recommended Arb Burst", raw[72]);
    // IEEE OUI, bytes 73..76, least significant byte first; SPDK prints them as stored.
    line(
        out,
        "IEEE OUI Identifier",
        format!(
            "{:02x} {:02x} {:02x}",
            id.ieee_oui[0], id.ieee_oui[1], id.ieee_oui[2]
        ),
    );
    out.push_str("Multi-path I/O\n");
    line(
        out,
        "  May have multiple subsystem ports",
        yes_no(id.cmic & 1 != 0),
    );
    line(
        out,
        "  May have multiple controllers",
        yes_no(id.cmic & 2 != 0),
    );
    line(out, "  Associated with SR-IOV VF", yes_no(id.cmic & 4 != 0));
    line(
        out,
        "Maximum Data Transfer Size",
        id.max_transfer_bytes(cap.page_size_min_bytes)
            .map_or_else(|| "Unlimited".to_string(), |bytes| bytes.to_string()),
    );
    line(out, "Max Number of Namespaces", id.nn);
    line(out, "NVMe Specification Version (VS)", ctrlr.version());
    let identify_version = pollux_nvme::spec::Version::decode(id.version);
    line(
        out,
        "NVMe Specification Version (Identify)",
        if id.version == 0 {
            "not reported".to_string()
        } else {
            identify_version.to_string()
        },
    );
    line(out, "Maximum Queue Entries", cap.max_queue_entries);
    line(
        out,
        "Contiguous Queues Required",
        yes_no(cap.contiguous_queues_required),
    );
    out.push_str("Arbitration Mechanisms Supported\n");
    line(
        out,
        "  Weighted Round Robin",
        supported(cap.arbitration_mechanisms & 1 != 0),
    );
    line(
        out,
        "  Vendor Specific",
        supported(cap.arbitration_mechanisms & 2 != 0),
    );
    line(out, "Reset Timeout", format!("{} ms", cap.timeout_ms));
    line(
        out,
        "Doorbell Stride",
        format!("{} bytes", cap.doorbell_stride_bytes),
    );
    line(
        out,
        "NVM Subsystem Reset",
        supported(cap.nvm_subsystem_reset),
    );
    out.push_str("Command Sets Supported\n");
    line(
        out,
        "  NVM Command Set",
        supported(cap.command_sets & 1 != 0),
    );
    line(out, "Boot Partition", supported(cap.boot_partitions));
    line(
        out,
        "Memory Page Size Minimum",
        format!("{} bytes", cap.page_size_min_bytes),
    );
    line(
        out,
        "Memory Page Size Maximum",
        format!("{} bytes", cap.page_size_max_bytes),
    );
    line(
        out,
        "Persistent Memory Region",
        supported(cap.persistent_memory_region),
    );
    line(
        out,
        "Controller Memory Buffer",
        supported(cap.controller_memory_buffer),
    );
    out.push_str("Optional Asynchronous Events Supported\n");
    line(
        out,
        "  Namespace Attribute Notices",
        supported(id.oaes & (1 << 8) != 0),
    );
    line(
        out,
        "  Firmware Activation Notices",
        supported(id.oaes & (1 << 9) != 0),
    );
    out.push_str("Controller Attributes\n");
    line(
        out,
        "  128-bit Host Identifier",
        supported(id.ctratt & 1 != 0),
    );
    // CNTRLTYPE: byte 111.
    let controller_type = match raw[111] {
        0 => "Not Reported",
        1 => "I/O Controller",
        2 => "Discovery Controller",
        3 => "Administrative Controller",
        _ => "Reserved",
    };
    line(out, "Controller ID", format!("{:#06x}", id.cntlid));
    line(out, "Controller Type", controller_type);
    out.push('\n');
}

fn admin_section(out: &mut String, id: &IdentifyController) {
    heading(out, "Admin Command Set Attributes");
    let oacs = |bit: u16| supported(id.oacs & (1 << bit) != 0);
    line(out, "Security Send/Receive", oacs(0));
    line(out, "Format NVM", oacs(1));
    line(out, "Firmware Activate/Download", oacs(2));
    line(out, "Namespace Management", oacs(3));
    line(out, "Device Self-Test", oacs(4));
    line(out, "Directives", oacs(5));
    line(out, "NVMe-MI", oacs(6));
    line(out, "Virtualization Management", oacs(7));
    line(out, "Doorbell Buffer Config", oacs(8));
    line(out, "Abort Command Limit", u16::from(id.acl) + 1);
    line(out, "Async Event Request Limit", u16::from(id.aerl) + 1);
    line(out, "Number of Firmware Slots", (id.frmw >> 1) & 7);
    line(out, "Firmware Slot 1 Read-Only", yes_no(id.frmw & 1 != 0));
    line(out, "Per-Namespace SMART Log", yes_no(id.lpa & 1 != 0));
    line(out, "Command Effects Log Page", supported(id.lpa & 2 != 0));
    line(
        out,
        "Get Log Page Extended Data",
        supported(id.lpa & 4 != 0),
    );
    line(
        out,
        "Error Log Page Entries Supported",
        u16::from(id.elpe) + 1,
    );
    line(out, "Subsystem NQN", &id.subnqn);
    out.push('\n');
}

fn nvm_section(out: &mut String, id: &IdentifyController) {
    heading(out, "NVM Command Set Attributes");
    out.push_str("Submission Queue Entry Size\n");
    line(out, "  Max", 1u32 << (id.sqes >> 4));
    line(out, "  Min", 1u32 << (id.sqes & 0xf));
    out.push_str("Completion Queue Entry Size\n");
    line(out, "  Max", 1u32 << (id.cqes >> 4));
    line(out, "  Min", 1u32 << (id.cqes & 0xf));
    line(out, "Number of Namespaces", id.nn);
    let oncs = |bit: u16| supported(id.oncs & (1 << bit) != 0);
    line(out, "Compare Command", oncs(0));
    line(out, "Write Uncorrectable Command", oncs(1));
    line(out, "Dataset Management Command", oncs(2));
    line(out, "Write Zeroes Command", oncs(3));
    line(out, "Set Features Save Field", oncs(4));
    line(out, "Reservations", oncs(5));
    line(out, "Timestamp", oncs(6));
    line(out, "Copy", oncs(8));
    line(
        out,
        "Volatile Write Cache",
        if id.has_volatile_write_cache() {
            "Present"
        } else {
            "Not Present"
        },
    );
    line(out, "Atomic Write Unit (Normal)", u32::from(id.awun) + 1);
    line(out, "Atomic Write Unit (PFail)", u32::from(id.awupf) + 1);
    line(out, "Fused Compare & Write", supported(id.fuses & 1 != 0));
    out.push_str("Scatter-Gather List\n");
    let sgl_command_set = match id.sgls & 3 {
        0 => "Not Supported",
        1 => "Supported",
        2 => "Supported (Dword aligned)",
        _ => "Reserved",
    };
    line(out, "  SGL Command Set", sgl_command_set);
    line(out, "  SGL Keyed", supported(id.sgls & (1 << 2) != 0));
    line(
        out,
        "  SGL Bit Bucket Descriptor",
        supported(id.sgls & (1 << 16) != 0),
    );
    line(
        out,
        "  SGL Metadata Pointer",
        supported(id.sgls & (1 << 17) != 0),
    );
    line(out, "  Oversized SGL", supported(id.sgls & (1 << 18) != 0));
    line(out, "  SGL Offset", supported(id.sgls & (1 << 20) != 0));
    out.push('\n');
}

fn namespace_section(
    out: &mut String,
    ns: &Namespace,
    id: &IdentifyController,
    raw: &[u8; IDENTIFY_BYTES],
) {
    let data = ns.identify();
    out.push_str(&format!("Namespace ID:{}\n", ns.nsid()));
    line(
        out,
        "Deallocate",
        supported(id.oncs & pollux_nvme::spec::ONCS_DSM != 0),
    );
    // NSFEAT bit 2: DULBE; DLFEAT (byte 33) bits 2:0: what deallocated blocks read as.
    line(
        out,
        "Deallocated/Unwritten Error",
        supported(data.nsfeat & 4 != 0),
    );
    let read_value = match raw[33] & 7 {
        1 => "All 0x00",
        2 => "All 0xFF",
        _ => "Unknown",
    };
    line(out, "Deallocated Read Value", read_value);
    line(
        out,
        "Deallocate in Write Zeroes",
        supported(raw[33] & 8 != 0),
    );
    line(out, "Flush", supported(id.has_volatile_write_cache()));
    line(
        out,
        "Namespace Sharing Capabilities",
        if raw[30] & 1 != 0 {
            "Multiple Controllers"
        } else {
            "Private"
        },
    );
    let block_bytes = u128::from(ns.block_size_bytes());
    let with_size = |lbas: u64| format!("{lbas} ({})", human_bytes(u128::from(lbas) * block_bytes));
    line(out, "Size (in LBAs)", with_size(data.nsze));
    line(out, "Capacity (in LBAs)", with_size(data.ncap));
    line(out, "Utilization (in LBAs)", with_size(data.nuse));
    line(out, "Thin Provisioning", supported(data.nsfeat & 1 != 0));
    line(out, "Per-NS Atomic Units", yes_no(data.nsfeat & 2 != 0));
    line(
        out,
        "NGUID/EUI64 Never Reused",
        yes_no(data.nsfeat & 8 != 0),
    );
    line(
        out,
        "NGUID",
        data.nguid
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
    );
    line(
        out,
        "EUI64",
        data.eui64
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
    );
    line(out, "Number of LBA Formats", data.lba_format_count);
    line(
        out,
        "Current LBA Format",
        format!("LBA Format #{:02}", data.current_format_index()),
    );
    for (index, format) in data.lba_formats.iter().enumerate() {
        let data_size = format
            .block_size_bytes()
            .map_or_else(|| "n/a".to_string(), |bytes| bytes.to_string());
        out.push_str(&format!(
            "LBA Format #{index:02}: Data Size: {data_size:>5}  Metadata Size: {:>5}\n",
            format.metadata_bytes
        ));
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_id_takes_spdk_syntax() {
        let address = parse_transport_id("trtype:PCIe traddr:0000:00:04.0").unwrap();
        assert_eq!(address.to_string(), "0000:00:04.0");
        let address = parse_transport_id("traddr=00:05.0 trtype=pcie").unwrap();
        assert_eq!(address.to_string(), "0000:00:05.0");
        assert!(parse_transport_id("trtype:TCP traddr:127.0.0.1").is_err());
        assert!(parse_transport_id("trtype:PCIe").is_err());
        assert!(parse_transport_id("trtype:PCIe subnqn:x traddr:00:04.0").is_err());
    }

    #[test]
    fn sizes_use_the_largest_unit() {
        assert_eq!(human_bytes(32 << 20), "32MiB");
        assert_eq!(human_bytes(5 << 30), "5GiB");
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 << 10), "3KiB");
    }
}
