//! bdevperf's command line, with SPDK bdevperf's flags, and the checks that turn it into a
//! run plan. Every refusal names the flag and the value.

use std::fmt;
use std::path::PathBuf;

use clap::Parser;

/// SPDK's bdevperf flags.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "bdevperf",
    version,
    about = "Drives I/O against Pollux bdevs and reports IOPS, bandwidth and latency, as SPDK's bdevperf"
)]
pub struct Args {
    /// I/O queue depth per job.
    #[arg(short = 'q', long = "queue-depth", value_parser = parse_queue_depth)]
    pub queue_depth: u32,
    /// I/O size: bytes, or with a k / m suffix (4096, 4k, 128k, 1m).
    #[arg(short = 'o', long = "io-size", value_parser = parse_io_size)]
    pub io_size_bytes: u64,
    /// Workload: read, write, randread, randwrite, rw, randrw, verify, flush, unmap,
    /// write_zeroes, reset.
    #[arg(short = 'w', long = "workload", value_parser = parse_workload)]
    pub workload: Workload,
    /// Read percentage of the rw / randrw mixes (0-100).
    #[arg(short = 'M', long = "rwmixread", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rw_mix_read_percent: Option<u8>,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", value_parser = clap::value_parser!(u64).range(1..))]
    pub time_s: u64,
    /// Core mask (0x3 or [0,2-4]); one job per core per bdev.
    #[arg(short = 'm', long = "cpumask", default_value = "0x1")]
    pub cpumask: String,
    /// JSON configuration in SPDK's format; without it a 64 MiB malloc bdev (Malloc0) is used.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Run against this bdev only (default: every bdev).
    #[arg(short = 'T', long = "target")]
    pub target: Option<String>,
    /// Print progress every N seconds.
    #[arg(short = 'S', long = "show-performance", value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_s: Option<u64>,
    /// DMA memory to reserve, in MiB (default: what the run needs).
    #[arg(short = 's', long = "mem-size")]
    pub mem_size_mib: Option<usize>,
    /// Use locked anonymous memory instead of hugepages.
    #[arg(long = "no-huge")]
    pub no_huge: bool,
    /// Interrupt mode (SPDK's `--interrupt-mode`): a reactor with nothing to do sleeps in
    /// `epoll_wait` on its jobs' completion fds instead of busy-polling. Jobs on a bdev whose
    /// channel has no completion fd keep polling while their I/O is in flight.
    #[arg(long = "interrupt-mode")]
    pub interrupt_mode: bool,
    /// Write the results as JSON to this file.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
    /// Wait for RPC (SPDK's `-z`): serve JSON-RPC on `-r`, run the workload each time a
    /// `perform_tests` call arrives and answer it with the results; stop on
    /// `spdk_kill_instance` or a signal. Without `-c` no bdev exists until one is created
    /// over RPC (`bdev_malloc_create`, ...).
    #[arg(short = 'z', long = "wait-for-tests")]
    pub wait_for_tests: bool,
    /// RPC socket for `-z`.
    #[arg(short = 'r', long = "rpc-socket", default_value = pollux_rpc::DEFAULT_SOCKET_PATH)]
    pub rpc_socket: PathBuf,
    /// Test hook: in a verify run, zero this LBA between writing and reading it back, so that
    /// the check must fail.
    #[arg(long = "corrupt-lba", hide = true)]
    pub corrupt_lba: Option<u64>,
}

/// What the jobs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
    Verify,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

impl Workload {
    pub const NAMES: [(&'static str, Workload); 11] = [
        ("read", Workload::Read),
        ("write", Workload::Write),
        ("randread", Workload::RandRead),
        ("randwrite", Workload::RandWrite),
        ("rw", Workload::Rw),
        ("randrw", Workload::RandRw),
        ("verify", Workload::Verify),
        ("flush", Workload::Flush),
        ("unmap", Workload::Unmap),
        ("write_zeroes", Workload::WriteZeroes),
        ("reset", Workload::Reset),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, w)| *w == self)
            .map_or("?", |(name, _)| name)
    }

    pub fn is_random(self) -> bool {
        matches!(
            self,
            Workload::RandRead | Workload::RandWrite | Workload::RandRw
        )
    }

    pub fn is_mix(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// Whether the jobs write (the bdev is opened read-write).
    pub fn writes(self) -> bool {
        matches!(
            self,
            Workload::Write
                | Workload::RandWrite
                | Workload::Rw
                | Workload::RandRw
                | Workload::Verify
                | Workload::Unmap
                | Workload::WriteZeroes
        )
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub fn parse_workload(text: &str) -> Result<Workload, String> {
    Workload::NAMES
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, w)| *w)
        .ok_or_else(|| {
            let names: Vec<&str> = Workload::NAMES.iter().map(|(n, _)| *n).collect();
            format!("unknown workload {text:?}; one of {}", names.join(", "))
        })
}

/// Largest I/O size accepted (SPDK's bdevperf has no fixed limit; 64 MiB keeps the
/// per-job buffers sane).
pub const MAX_IO_SIZE_BYTES: u64 = 64 << 20;

/// `4096`, `4k`, `4K`, `128k`, `1m`: bytes, KiB or MiB.
pub fn parse_io_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, multiplier) = match trimmed.char_indices().last() {
        Some((at, 'k' | 'K')) => (&trimmed[..at], 1u64 << 10),
        Some((at, 'm' | 'M')) => (&trimmed[..at], 1u64 << 20),
        _ => (trimmed, 1),
    };
    let value: u64 = digits.parse().map_err(|_| {
        format!("invalid I/O size {text:?}: expected a number of bytes with an optional k or m suffix (4096, 4k, 128k)")
    })?;
    let bytes = value
        .checked_mul(multiplier)
        .filter(|b| (1..=MAX_IO_SIZE_BYTES).contains(b))
        .ok_or_else(|| {
            format!(
                "invalid I/O size {text:?}: must be from 1 byte to {} MiB",
                MAX_IO_SIZE_BYTES >> 20
            )
        })?;
    Ok(bytes)
}

pub fn parse_queue_depth(text: &str) -> Result<u32, String> {
    let max = pollux_bdev::MAX_QUEUE_DEPTH;
    text.parse::<u32>()
        .ok()
        .filter(|q| (1..=max).contains(q))
        .ok_or_else(|| format!("invalid queue depth {text:?}: must be from 1 to {max}"))
}

impl Args {
    /// Cross-flag checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.workload.is_mix() && self.rw_mix_read_percent.is_none() {
            return Err(format!(
                "-w {}: -M (read percentage, 0-100) is required",
                self.workload
            ));
        }
        if !self.workload.is_mix() && self.rw_mix_read_percent.is_some() {
            return Err(format!(
                "-M applies only to the rw and randrw workloads, not {}",
                self.workload
            ));
        }
        if self.progress_s.is_some() && self.wait_for_tests {
            return Err("-S (progress) is not available with -z".to_string());
        }
        if self.corrupt_lba.is_some() && self.workload != Workload::Verify {
            return Err("--corrupt-lba applies only to -w verify".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        let args = Args::try_parse_from(std::iter::once("bdevperf").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn io_sizes_with_suffixes() {
        assert_eq!(parse_io_size("4096"), Ok(4096));
        assert_eq!(parse_io_size("4k"), Ok(4096));
        assert_eq!(parse_io_size("4K"), Ok(4096));
        assert_eq!(parse_io_size("128k"), Ok(131072));
        assert_eq!(parse_io_size("1m"), Ok(1 << 20));
        for bad in [
            "",
            "k",
            "0",
            "4x",
            "-4k",
            "4kk",
            "1.5k",
            "65m",
            "99999999999999999999k",
        ] {
            let error = parse_io_size(bad).expect_err(bad);
            assert!(error.contains("invalid I/O size"), "{bad}: {error}");
        }
    }

    #[test]
    fn spdk_command_lines_parse() {
        let args = parse(&[
            "-q", "128", "-o", "4k", "-w", "randread", "-t", "5", "-m", "0x1",
        ])
        .expect("valid");
        assert_eq!(args.queue_depth, 128);
        assert_eq!(args.io_size_bytes, 4096);
        assert_eq!(args.workload, Workload::RandRead);
        assert_eq!(args.time_s, 5);
        assert!(args.config.is_none());

        let args = parse(&[
            "-q",
            "32",
            "-o",
            "128k",
            "-w",
            "randrw",
            "-M",
            "70",
            "-t",
            "1",
            "-c",
            "bdev.json",
            "-T",
            "Malloc0",
            "-S",
            "1",
            "--json",
            "out.json",
        ])
        .expect("valid");
        assert_eq!(args.rw_mix_read_percent, Some(70));
        assert_eq!(args.target.as_deref(), Some("Malloc0"));
        assert_eq!(args.io_size_bytes, 128 << 10);
        for (name, workload) in Workload::NAMES {
            assert_eq!(parse_workload(name), Ok(workload));
        }
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let base = ["-o", "4k", "-w", "read", "-t", "1"];
        let with = |extra: &[&str]| {
            let mut all: Vec<&str> = base.to_vec();
            all.extend_from_slice(extra);
            parse(&all)
        };
        let error = with(&["-q", "0"]).expect_err("qd 0");
        assert!(error.contains("queue depth"), "{error}");
        let error = with(&["-q", "abc"]).expect_err("qd abc");
        assert!(error.contains("\"abc\""), "{error}");
        let error = parse(&["-q", "1", "-o", "4q", "-w", "read", "-t", "1"]).expect_err("4q");
        assert!(error.contains("invalid I/O size \"4q\""), "{error}");
        let error = parse(&["-q", "1", "-o", "4k", "-w", "readwrite", "-t", "1"]).expect_err("w");
        assert!(error.contains("unknown workload \"readwrite\""), "{error}");
        let error = parse(&["-q", "1", "-o", "4k", "-w", "rw", "-t", "1"]).expect_err("no -M");
        assert!(error.contains("-M"), "{error}");
        let error =
            parse(&["-q", "1", "-o", "4k", "-w", "rw", "-M", "101", "-t", "1"]).expect_err("-M");
        assert!(error.contains("101"), "{error}");
        let error = parse(&["-q", "1", "-o", "4k", "-w", "read", "-t", "0"]).expect_err("-t 0");
        assert!(error.contains("0"), "{error}");
        let error = parse(&["-q", "1", "-o", "4k", "-w", "read"]).expect_err("no -t");
        assert!(error.contains("--time"), "{error}");
    }
}
