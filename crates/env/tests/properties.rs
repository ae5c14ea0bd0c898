//! Property tests: random operation sequences against simple models.

use std::collections::BTreeMap;

use pollux_env::cpumask::CpuMask;
use pollux_env::memmap::MemMap;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Register { vaddr: u64, len: u64 },
    Unregister { vaddr: u64, len: u64 },
    Translate { vaddr: u64, len: u64 },
}

/// Small addresses on a coarse grid, so that overlaps, exact matches and near misses are common.
fn op() -> impl Strategy<Value = Op> {
    let vaddr = (0u64..64).prop_map(|page| page * 0x1000);
    let len = (1u64..8).prop_map(|pages| pages * 0x1000 - 0x800 * (pages % 2));
    prop_oneof![
        (vaddr.clone(), len.clone()).prop_map(|(vaddr, len)| Op::Register { vaddr, len }),
        (vaddr.clone(), len.clone()).prop_map(|(vaddr, len)| Op::Unregister { vaddr, len }),
        (0u64..0x48000, 1u64..0x9000).prop_map(|(vaddr, len)| Op::Translate { vaddr, len }),
    ]
}

proptest! {
    /// The map agrees with a plain model (start -> len) on every registration, unregistration
    /// and translation: overlaps refused, exact unregistration only, a translation never
    /// crosses a region's end, and misses are errors.
    #[test]
    fn memmap_matches_a_model(ops in proptest::collection::vec(op(), 1..64)) {
        let map = MemMap::new();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Register { vaddr, len } => {
                    let overlaps = model
                        .iter()
                        .any(|(&start, &size)| start < vaddr + len && vaddr < start + size);
                    let result = map.register(vaddr, len);
                    prop_assert_eq!(result.is_ok(), !overlaps, "register {:#x}+{:#x}", vaddr, len);
                    if let Ok(iova) = result {
                        prop_assert_eq!(iova, vaddr);
                        model.insert(vaddr, len);
                    }
                }
                Op::Unregister { vaddr, len } => {
                    let exact = model.get(&vaddr) == Some(&len);
                    prop_assert_eq!(map.unregister(vaddr, len).is_ok(), exact);
                    if exact {
                        model.remove(&vaddr);
                    }
                }
                Op::Translate { vaddr, len } => {
                    let holder = model
                        .range(..=vaddr)
                        .next_back()
                        .filter(|(&start, &size)| vaddr < start + size);
                    match (map.translate(vaddr, len), holder) {
                        (Ok(translation), Some((&start, &size))) => {
                            prop_assert_eq!(translation.iova, vaddr);
                            prop_assert_eq!(translation.len, len.min(start + size - vaddr));
                        }
                        (Err(_), None) => {}
                        (got, want) => prop_assert!(false, "translate {:#x}: {:?} vs model {:?}", vaddr, got, want),
                    }
                }
            }
        }
        prop_assert_eq!(map.regions().len(), model.len());
    }

    /// Whatever a mask prints, parsing it back gives the same mask, and a list naming the same
    /// cores parses to it too.
    #[test]
    fn cpumask_round_trips(cores in proptest::collection::btree_set(0usize..1024, 1..40)) {
        let mask: CpuMask = cores.iter().copied().collect();
        prop_assert_eq!(CpuMask::parse(&mask.to_string()).unwrap(), mask);
        let list = format!("[{}]", cores.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","));
        prop_assert_eq!(CpuMask::parse(&list).unwrap(), mask);
        prop_assert_eq!(mask.iter().collect::<Vec<_>>(), cores.into_iter().collect::<Vec<_>>());
    }

    /// Arbitrary text never panics the parser: it parses or names what is wrong.
    #[test]
    fn cpumask_never_panics(text in "\\PC{0,40}") {
        if let Err(error) = CpuMask::parse(&text) {
            prop_assert!(!error.to_string().is_empty());
        }
    }
}
