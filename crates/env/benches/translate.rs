//! Address translation cost: one lookup in a map of 1 and of 64 regions, at random
//! addresses inside registered regions (what every PRP/SGL entry of an I/O pays).
//!
//! Run: `cargo bench -p pollux-env --bench translate`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pollux_env::memmap::MemMap;

const REGION_LEN_BYTES: u64 = 2 << 20;
/// Regions are spaced out so that lookups between them would miss (none are asked here).
const REGION_STRIDE_BYTES: u64 = 4 * REGION_LEN_BYTES;
const BASE_VADDR: u64 = 0x7f00_0000_0000;
/// Addresses are drawn up front; a power of two so the index wraps with a mask.
const ADDRESS_COUNT: usize = 4096;

fn map_with_regions(region_count: u64) -> (MemMap, Vec<u64>) {
    let map = MemMap::new();
    for region in 0..region_count {
        map.register(BASE_VADDR + region * REGION_STRIDE_BYTES, REGION_LEN_BYTES)
            .expect("register bench region");
    }
    // xorshift64: deterministic, no dependency.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let addresses = (0..ADDRESS_COUNT)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let region = state % region_count;
            let offset = (state >> 20) % REGION_LEN_BYTES;
            BASE_VADDR + region * REGION_STRIDE_BYTES + offset
        })
        .collect();
    (map, addresses)
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("memmap_translate");
    for region_count in [1u64, 64] {
        let (map, addresses) = map_with_regions(region_count);
        let mut next = 0usize;
        group.bench_function(format!("regions_{region_count}"), |b| {
            b.iter(|| {
                next = (next + 1) & (ADDRESS_COUNT - 1);
                map.translate(black_box(addresses[next]), black_box(4096))
                    .expect("address is registered")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, translate);
criterion_main!(benches);
