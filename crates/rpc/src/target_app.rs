//! What the target apps (`pollux-vhost`, `pollux-nvmf`, `pollux-ublk`) share around their RPC
//! server, so that each `main` keeps only what is its own: the bdev modules a `-c` file may
//! name, the DMA memory its bdevs need, the admin pollers that service controllers attached at
//! run time, and the controllers' shutdown. It lives here because this crate already depends
//! on every bdev module (for their RPC methods).

use std::sync::Arc;

use pollux_bdev::config::MethodTable;
use pollux_bdev::modules::malloc;
use pollux_bdev::{BdevError, BdevRegistry};
use pollux_nvme::bdev::NvmeModule;
use pollux_nvmf::host::NvmfHostModule;
use pollux_reactor::{PollStatus, ThreadCtx};
use pollux_virtio::bdev::VirtioModule;
use serde_json::Value;

/// DMA memory an NVMe controller attached from a config takes (admin and I/O queues).
pub const NVME_CONTROLLER_MIB: u64 = 4;
/// How often the admin pollers run.
pub const NVME_ADMIN_POLL_US: u64 = 10_000;
pub const VIRTIO_ADMIN_POLL_US: u64 = 10_000;

/// MiB of DMA memory the `bdev` subsystem of a config needs: its malloc bdevs plus
/// [`NVME_CONTROLLER_MIB`] per NVMe controller (a rough pass; the real load reports errors).
pub fn bdev_config_demand_mib(value: &Value) -> u64 {
    let mut bytes = 0u64;
    let subsystems = value.get("subsystems").and_then(|s| s.as_array());
    for entry in subsystems
        .into_iter()
        .flatten()
        .filter(|s| s.get("subsystem").and_then(|n| n.as_str()) == Some("bdev"))
        .filter_map(|s| s.get("config").and_then(|c| c.as_array()))
        .flatten()
    {
        let method = entry.get("method").and_then(|m| m.as_str()).unwrap_or("");
        let param = |key: &str| {
            entry
                .get("params")
                .and_then(|p| p.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        if method == malloc::METHOD {
            bytes = bytes.saturating_add(param("num_blocks").saturating_mul(param("block_size")));
        }
        if method == pollux_nvme::bdev::ATTACH_METHOD {
            bytes = bytes.saturating_add(NVME_CONTROLLER_MIB << 20);
        }
    }
    bytes.div_ceil(1 << 20)
}

/// The `-c` loader's method table: the built-in modules plus NVMe (PCIe), virtio-user and the
/// NVMe-oF initiator.
pub fn bdev_method_table() -> Result<MethodTable, BdevError> {
    let mut table = MethodTable::with_builtin();
    pollux_nvme::bdev::register_methods(&mut table)?;
    pollux_virtio::bdev::register_methods(&mut table)?;
    pollux_nvmf::host::register_methods(&mut table)?;
    Ok(table)
}

/// Controllers may be attached over RPC at any time: polls the NVMe (PCIe and TCP) admin
/// queues and watches the virtio-user back-ends, on the calling thread (the app thread),
/// until it exits.
pub fn register_admin_pollers(ctx: &mut ThreadCtx, registry: Arc<BdevRegistry>) {
    let nvme = ctx.register_poller("nvme_admin", NVME_ADMIN_POLL_US, |_ctx| {
        PollStatus::from_busy(
            NvmeModule::global().poll_admin() + NvmfHostModule::global().poll_admin() > 0,
        )
    });
    let virtio = ctx.register_poller("virtio_admin", VIRTIO_ADMIN_POLL_US, move |_ctx| {
        PollStatus::from_busy(VirtioModule::global().poll_admin(&registry) > 0)
    });
    ctx.on_exit(move |ctx| {
        ctx.unregister_poller(nvme);
        ctx.unregister_poller(virtio);
    });
}

/// Shuts the NVMe, NVMe-oF and virtio controllers down (their bdevs removed), once the
/// reactors have exited and before the DMA memory goes.
pub fn detach_controllers(registry: &BdevRegistry) {
    NvmeModule::global().detach_all(registry);
    NvmfHostModule::global().detach_all(registry);
    VirtioModule::global().detach_all(registry);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn demand_counts_malloc_bytes_and_nvme_controllers() {
        let config = json!({"subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_malloc_create", "params": {"num_blocks": 16384, "block_size": 4096}},
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0"}},
                {"method": "bdev_malloc_create", "params": {"num_blocks": 1, "block_size": 512}}
            ]},
            {"subsystem": "ublk", "config": [{"method": "bdev_malloc_create"}]}
        ]});
        assert_eq!(bdev_config_demand_mib(&config), 64 + 4 + 1);
        assert_eq!(bdev_config_demand_mib(&json!({})), 0);
        assert!(bdev_method_table().is_ok());
    }
}
