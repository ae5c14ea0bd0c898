//! SPDK JSON configuration as `-c` loads it: the bdev layer's loader (malloc, null, delay,
//! bdev_set_qos_limit; the file modules left out, so no input opens a host file) and the vhost
//! target's `vhost_blk` parser.
//!
//! Invariants: loading is all or nothing (a refused file leaves no bdev behind); a loaded one
//! is written back by save_config into a document that loads again into the same bdevs (names,
//! geometry, rate limits).
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pollux_bdev::config::{self, MethodTable};
use pollux_bdev::BdevRegistry;
use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;

fn dma() -> &'static Arc<DmaMemory> {
    static DMA: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    DMA.get_or_init(|| {
        DmaMemory::with_memmap(
            DmaConfig {
                size_mib: 16,
                no_huge: true,
            },
            Arc::new(MemMap::new()),
        )
        .expect("DMA memory")
    })
}

fn table() -> MethodTable {
    let mut table = MethodTable::with_builtin();
    for file_module in ["bdev_aio_create", "bdev_uring_create"] {
        assert!(table.remove(file_module));
    }
    table
}

fuzz_target!(|text: &[u8]| {
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
        let _ = pollux_vhost::config::parse(&value, Path::new("fuzz.json"));
    }
    let table = table();
    let registry = BdevRegistry::new();
    match config::load_str(text, Path::new("fuzz.json"), &registry, &table, Some(dma())) {
        Err(_) => assert!(
            registry.names().is_empty(),
            "a refused config left bdevs behind: {:?}",
            registry.names()
        ),
        Ok(created) => {
            assert_eq!(registry.names(), created);
            let saved = serde_json::json!({ "subsystems": [registry.save_config()] });
            let describe = |registry: &BdevRegistry| -> Vec<_> {
                registry
                    .names()
                    .into_iter()
                    .map(|name| {
                        let info = registry.info(&name).expect("listed");
                        let limits = registry.qos_limits(&name).expect("listed");
                        (
                            name,
                            info.uuid,
                            info.block_size_bytes,
                            info.num_blocks,
                            info.module,
                            limits,
                        )
                    })
                    .collect()
            };
            let before = describe(&registry);
            // The first copy's DMA memory goes back before the second is made.
            drop(registry);
            let again = BdevRegistry::new();
            config::apply(&saved, Path::new("saved.json"), &again, &table, Some(dma()))
                .unwrap_or_else(|e| panic!("save_config's output does not load: {e}: {saved}"));
            assert_eq!(
                describe(&again),
                before,
                "save_config's output loads into other bdevs"
            );
        }
    }
});
