//! What the fuzz targets share: a fake guest (two small regions of shared memory with a hole
//! between them, as a front-end's memory table gives them) that a target fills from its input,
//! and the structured inputs that describe a hostile driver.
//!
//! The targets live in `fuzz_targets/`, one per parser; `scripts/fuzz.sh` builds them with
//! libFuzzer's coverage instrumentation (and AddressSanitizer) and runs them. Each asserts the
//! invariants it can see, not only the absence of a panic: a panic, an assertion or a sanitizer
//! report is a crash libFuzzer saves.

pub mod rings;

use std::fs::File;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use pollux_vhost::guest_memory::{GuestMemory, RegionSpec};

/// Bytes of each region.
pub const REGION_BYTES: u64 = 16 << 10;
/// Guest physical addresses of the two regions: `[0, 16 KiB)` and `[32 KiB, 48 KiB)`, so a
/// buffer can fall in the hole between them or run off either end.
pub const REGION_GPAS: [u64; 2] = [0, 32 << 10];
/// The front-end's addresses of the regions (what vring addresses are given in).
pub const REGION_UVAS: [u64; 2] = [0x7f00_0000_0000, 0x7f00_0010_0000];

/// The fake guest, mapped once per process (a fuzz target runs millions of inputs) and zeroed
/// before each one by [`fresh_guest`].
pub fn guest() -> &'static Arc<GuestMemory> {
    static GUEST: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    GUEST.get_or_init(|| {
        let files: Vec<File> = (0..2).map(|_| region_file()).collect();
        let specs: Vec<(RegionSpec, &File)> = (0..2)
            .map(|i| {
                (
                    RegionSpec {
                        gpa: REGION_GPAS[i],
                        size: REGION_BYTES,
                        uva: REGION_UVAS[i],
                        mmap_offset: 0,
                    },
                    &files[i],
                )
            })
            .collect();
        Arc::new(GuestMemory::from_regions(&specs, false).expect("map the fake guest"))
    })
}

/// [`guest`], every byte zero, then `writes` applied.
pub fn fresh_guest(writes: &[GuestWrite]) -> &'static Arc<GuestMemory> {
    let mem = guest();
    let zeros = vec![0u8; REGION_BYTES as usize];
    let mut hint = 0;
    for gpa in REGION_GPAS {
        mem.write_bytes(gpa, &zeros, &mut hint).expect("zero");
    }
    for write in writes {
        write.apply(mem);
    }
    mem
}

fn region_file() -> File {
    let path = std::env::temp_dir().join(format!(
        "pollux-fuzz-guest-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("guest region file");
    std::fs::remove_file(&path).expect("unlink");
    file.set_len(REGION_BYTES).expect("size");
    file
}

/// The driver writing guest memory: `bytes` at `offset` of region `second`, clipped to it.
#[derive(Debug, Arbitrary)]
pub struct GuestWrite {
    pub second: bool,
    pub offset: u16,
    pub bytes: Vec<u8>,
}

impl GuestWrite {
    pub fn apply(&self, mem: &GuestMemory) {
        let offset = u64::from(self.offset) % REGION_BYTES;
        let room = (REGION_BYTES - offset) as usize;
        let bytes = &self.bytes[..self.bytes.len().min(room)];
        let gpa = REGION_GPAS[usize::from(self.second)] + offset;
        let mut hint = 0;
        mem.write_bytes(gpa, bytes, &mut hint)
            .expect("inside the region");
    }
}

/// Where a ring's three parts sit: offsets into the first region, in units of 16 bytes (so
/// they may overlap each other or run past the region's end, which setup must refuse).
#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct RingPlacement {
    pub size_log2: u8,
    pub desc: u16,
    pub avail: u16,
    pub used: u16,
    pub base: u16,
    pub event_idx: bool,
}

impl RingPlacement {
    /// The queue size: a power of two from 1 to 256.
    pub fn size(&self) -> u16 {
        1 << (self.size_log2 % 9)
    }

    pub fn addrs(&self) -> pollux_vhost::queue::VringAddrs {
        let at = |units: u16| REGION_UVAS[0] + u64::from(units % 1024) * 16;
        pollux_vhost::queue::VringAddrs {
            desc_uva: at(self.desc),
            avail_uva: at(self.avail),
            used_uva: at(self.used),
        }
    }
}

/// A snapshot of both regions, to check what the device wrote.
pub fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * REGION_BYTES as usize);
    let mut hint = 0;
    for gpa in REGION_GPAS {
        for at in (0..REGION_BYTES).step_by(4096) {
            out.extend_from_slice(&mem.read_array::<4096>(gpa + at, &mut hint).expect("read"));
        }
    }
    out
}

/// The guest physical address of byte `index` of a [`snapshot`].
pub fn snapshot_gpa(index: usize) -> u64 {
    let region = index / REGION_BYTES as usize;
    REGION_GPAS[region] + (index % REGION_BYTES as usize) as u64
}
