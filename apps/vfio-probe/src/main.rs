//! `pollux-vfio-probe <PCI address>`: opens an NVMe controller bound to vfio-pci, reads and
//! decodes CAP and VS from BAR0, maps DMA memory through the VFIO container (printing the IOVA
//! and whether it is the virtual address), optionally runs IDENTIFY CONTROLLER through an admin
//! queue in that memory, and checks what it read against `--expect-*` values.
//!
//! Exit status 0 when every step and expectation held, 1 otherwise (the error says which).
//! The `scripts/vm-test.sh smoke` suite runs it in a QEMU guest.

mod nvme;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use pollux_env::dma::{DmaConfig, DmaError, DmaMemory};
use pollux_env::memmap::{MemMap, TranslationError};
use pollux_env::pci::PciAddress;
use pollux_env::vfio::{Bar, IovaMode, VfioError, VfioPciDevice};
use pollux_nvme::spec::{Cap, Version, REG_CAP, REG_VS};
use pollux_nvme::{Controller, ControllerOptions, NvmeError};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Vfio(#[from] VfioError),
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error(transparent)]
    MemMap(#[from] TranslationError),
    #[error("{what}: expected {expected}, device reports {actual}")]
    Mismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("implausible register value: {0}")]
    Implausible(String),
    #[error("NVMe controller: {0}")]
    Controller(String),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Identity,
    Allocated,
}

#[derive(Debug, Parser)]
#[command(
    name = "pollux-vfio-probe",
    about = "Probe an NVMe controller through VFIO: CAP/VS, DMA mapping, IDENTIFY"
)]
struct Args {
    /// PCI address of the controller (bound to vfio-pci), e.g. 0000:00:04.0
    address: PciAddress,
    /// Fail unless CAP equals this (hex, 0x optional)
    #[arg(long, value_parser = parse_hex_u64)]
    expect_cap: Option<u64>,
    /// Fail unless VS equals this (hex, e.g. 0x00010400 for 1.4.0)
    #[arg(long, value_parser = parse_hex_u32)]
    expect_vs: Option<u32>,
    /// Fail unless the DMA buffer got this IOVA mode
    #[arg(long, value_enum)]
    expect_mode: Option<ModeArg>,
    /// Fail unless IDENTIFY CONTROLLER reports this serial number
    #[arg(long)]
    expect_serial: Option<String>,
    /// Only read registers and map DMA; do not enable the controller
    #[arg(long)]
    skip_identify: bool,
    /// DMA memory to reserve, in MiB
    #[arg(long, default_value_t = 2)]
    dma_mib: usize,
    /// Use locked anonymous memory instead of hugepages
    #[arg(long)]
    no_huge: bool,
}

/// The buffer whose mapping the probe checks (IDENTIFY allocates its own queues).
const PROBE_BUFFER_BYTES: usize = 0x3000;

fn parse_hex_u64(text: &str) -> Result<u64, String> {
    // Underscores may group digits, as in Rust literals: 0x0040_3820_0f01_07ff.
    let digits: String = text
        .trim_start_matches("0x")
        .trim_start_matches("0X")
        .chars()
        .filter(|&c| c != '_')
        .collect();
    u64::from_str_radix(&digits, 16).map_err(|e| format!("{text:?} is not a hex number: {e}"))
}

fn parse_hex_u32(text: &str) -> Result<u32, String> {
    let value = parse_hex_u64(text)?;
    u32::try_from(value).map_err(|_| format!("{text:?} does not fit in 32 bits"))
}

fn expect<T: PartialEq + std::fmt::Display>(
    what: &'static str,
    expected: Option<T>,
    actual: T,
) -> Result<(), ProbeError> {
    match expected {
        Some(expected) if expected != actual => Err(ProbeError::Mismatch {
            what,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }),
        _ => Ok(()),
    }
}

fn run(args: &Args) -> Result<(), ProbeError> {
    let device = VfioPciDevice::open(&args.address)?;
    println!(
        "device: {} IOMMU group {}",
        device.address(),
        device.iommu_group()
    );
    if let Some(info) = device.container().iommu_info() {
        let ranges: Vec<String> = info
            .iova_ranges
            .iter()
            .map(|r| format!("[{:#x}, {:#x}]", r.start, r.end))
            .collect();
        println!(
            "iommu: page sizes {:#x}, usable IOVA ranges{} {}",
            info.page_sizes,
            if info.iova_ranges_reported {
                ""
            } else {
                " (not reported by the kernel, assumed)"
            },
            ranges.join(" ")
        );
    }
    let command = device.enable_bus_master()?;
    println!("pci: command register {command:#06x} (memory space + bus master enabled)");

    let bar = Arc::new(device.map_bar(0)?);
    let cap = Cap::decode(bar.read64(REG_CAP)?);
    let vs = bar.read32(REG_VS)?;
    println!("CAP: {}", nvme::describe_cap(&cap));
    println!("VS: {vs:#010x} ({})", Version::decode(vs));
    expect(
        "CAP",
        args.expect_cap.map(|v| format!("{v:#018x}")),
        format!("{:#018x}", cap.raw),
    )?;
    expect(
        "VS",
        args.expect_vs.map(|v| format!("{v:#010x}")),
        format!("{vs:#010x}"),
    )?;
    nvme::check_plausible(&cap)?;

    // DMA memory is registered in the global memmap; attaching the container as its mapper
    // maps every registered region into the IOMMU.
    let memory = DmaMemory::new(DmaConfig {
        size_mib: args.dma_mib,
        no_huge: args.no_huge,
    })?;
    let container = Arc::clone(device.container());
    MemMap::global().set_mapper(container.clone())?;
    let result = probe_dma(args, &device, &bar, &memory);
    // Unmap everything whatever happened (the controller was disabled first, inside probe_dma).
    let cleared = MemMap::global().clear_mapper();
    result?;
    cleared?;
    if !container.mappings().is_empty() {
        return Err(ProbeError::Controller(
            "DMA mappings left in the container after clear_mapper".into(),
        ));
    }
    println!("DMA: unmapped");
    Ok(())
}

fn probe_dma(
    args: &Args,
    device: &VfioPciDevice,
    bar: &Arc<Bar<'_>>,
    memory: &Arc<DmaMemory>,
) -> Result<(), ProbeError> {
    let buffer = memory.alloc(PROBE_BUFFER_BYTES, 4096, None)?;
    let iova = buffer.iova()?;
    let mapping = device.container().mapping_at(iova).ok_or_else(|| {
        ProbeError::Controller(format!("IOVA {iova:#x} is in no container mapping"))
    })?;
    let mode = match mapping.mode {
        IovaMode::Identity => ModeArg::Identity,
        IovaMode::Allocated => ModeArg::Allocated,
    };
    println!(
        "DMA: buffer vaddr {:#x} len {:#x} iova {iova:#x} mode {} (mapping vaddr {:#x} len {:#x} iova {:#x}, {})",
        buffer.vaddr(),
        buffer.len(),
        mapping.mode,
        mapping.vaddr,
        mapping.len,
        mapping.iova,
        if memory.is_hugepage_backed() {
            "hugepages"
        } else {
            "locked anonymous memory"
        }
    );
    if mode == ModeArg::Identity && iova != buffer.vaddr() {
        return Err(ProbeError::Controller(format!(
            "identity mapping but IOVA {iova:#x} != vaddr {:#x}",
            buffer.vaddr()
        )));
    }
    if let Some(expected) = args.expect_mode {
        if expected != mode {
            return Err(ProbeError::Mismatch {
                what: "IOVA mode",
                expected: format!("{expected:?}").to_lowercase(),
                actual: mapping.mode.to_string(),
            });
        }
    }
    if args.skip_identify {
        return Ok(());
    }
    // Brings the controller up (admin queues in this DMA memory), identifies it, and shuts it
    // down again before the memory is unmapped.
    let controller = Controller::new(
        Arc::clone(bar),
        Arc::clone(memory),
        ControllerOptions::default(),
    )?;
    let identity = controller.identify().clone();
    controller.detach()?;
    println!(
        "IDENTIFY: vendor {:#06x} serial \"{}\" model \"{}\" firmware \"{}\"",
        identity.vid, identity.serial, identity.model, identity.firmware
    );
    expect(
        "serial number",
        args.expect_serial.as_deref(),
        identity.serial.as_str(),
    )?;
    Ok(())
}

fn main() -> ExitCode {
    pollux_cli::init_logging("info");
    let args = Args::parse();
    match run(&args) {
        Ok(()) => {
            println!("PROBE: OK");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let message = pollux_cli::error_chain(&error);
            eprintln!("pollux-vfio-probe: error: {message}");
            println!("PROBE: FAILED");
            ExitCode::FAILURE
        }
    }
}
