//! The virtio-user front-end's handling of what a back-end answers (`pollux_virtio::device::
//! BlkDevice::start`): offered features, queue count, configuration space, and any request
//! failing, from a back-end under the input's control.
//!
//! Invariants: a device that starts negotiated a subset of what was offered and of what the
//! driver wants, with VERSION_1; its block size is a power of two from 512, its block count is
//! non-zero and fits the capacity; its queue count is between 1 and both what was asked and
//! what was offered; queues are set up only below that count, each ring given before it is
//! enabled. A refusal is an error, never a panic.
#![no_main]

use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pollux_env::dma::{DmaConfig, DmaMemory, SharedRegion};
use pollux_env::memmap::MemMap;
use pollux_virtio::backend::VirtioBackend;
use pollux_virtio::device::{BlkDevice, DeviceOptions};
use pollux_virtio::queue::RingAddresses;
use pollux_virtio::VirtioError;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Arbitrary)]
struct Input {
    features: u64,
    max_queues: u16,
    config: Vec<u8>,
    /// Bit n set: the n-th request the front-end makes fails.
    failures: u64,
    vq_count: u8,
    vq_size_log2: u8,
    packed_ring: bool,
    event_idx: bool,
}

#[derive(Default)]
struct Seen {
    accepted: Option<u64>,
    /// Per queue: given a size, an address, enabled (in that order).
    queues: Vec<(bool, bool, bool)>,
}

struct FakeBackend {
    input: Arc<InputCopy>,
    requests: u32,
    seen: Arc<std::sync::Mutex<Seen>>,
}

struct InputCopy {
    features: u64,
    max_queues: u16,
    config: Vec<u8>,
    failures: u64,
}

impl FakeBackend {
    fn step(&mut self, request: &'static str) -> Result<(), VirtioError> {
        let n = self.requests;
        self.requests += 1;
        if n < 64 && self.input.failures & (1 << n) != 0 {
            return Err(VirtioError::Device {
                name: "fuzz".to_string(),
                reason: format!("{request} refused by the fuzz back-end"),
            });
        }
        Ok(())
    }

    fn queue(&self, queue: u16) -> std::sync::MutexGuard<'_, Seen> {
        let mut seen = self.seen.lock().expect("seen");
        let index = usize::from(queue);
        if seen.queues.len() <= index {
            seen.queues.resize(index + 1, (false, false, false));
        }
        seen
    }
}

impl VirtioBackend for FakeBackend {
    fn describe(&self) -> String {
        "fuzz back-end".to_string()
    }
    fn device_features(&mut self) -> Result<u64, VirtioError> {
        self.step("GET_FEATURES")?;
        Ok(self.input.features)
    }
    fn set_features(&mut self, features: u64) -> Result<(), VirtioError> {
        self.step("SET_FEATURES")?;
        self.seen.lock().expect("seen").accepted = Some(features);
        Ok(())
    }
    fn max_queues(&mut self) -> Result<u16, VirtioError> {
        self.step("GET_QUEUE_NUM")?;
        Ok(self.input.max_queues)
    }
    fn set_mem_table(&mut self, _regions: &[SharedRegion<'_>]) -> Result<(), VirtioError> {
        self.step("SET_MEM_TABLE")
    }
    fn set_vring_num(&mut self, queue: u16, _size: u16) -> Result<(), VirtioError> {
        self.step("SET_VRING_NUM")?;
        self.queue(queue).queues[usize::from(queue)].0 = true;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        queue: u16,
        _size: u16,
        _addresses: &RingAddresses,
    ) -> Result<(), VirtioError> {
        self.step("SET_VRING_ADDR")?;
        self.queue(queue).queues[usize::from(queue)].1 = true;
        Ok(())
    }
    fn set_vring_base(&mut self, _queue: u16, _base: u16) -> Result<(), VirtioError> {
        self.step("SET_VRING_BASE")
    }
    fn get_vring_base(&mut self, _queue: u16) -> Result<u32, VirtioError> {
        self.step("GET_VRING_BASE")?;
        Ok(0)
    }
    fn set_vring_kick(&mut self, _queue: u16, _fd: &EventFd) -> Result<(), VirtioError> {
        self.step("SET_VRING_KICK")
    }
    fn set_vring_call(&mut self, _queue: u16, _fd: &EventFd) -> Result<(), VirtioError> {
        self.step("SET_VRING_CALL")
    }
    fn set_vring_enable(&mut self, queue: u16, enable: bool) -> Result<(), VirtioError> {
        self.step("SET_VRING_ENABLE")?;
        let mut seen = self.queue(queue);
        let entry = &mut seen.queues[usize::from(queue)];
        if enable {
            assert!(
                entry.0 && entry.1,
                "queue {queue} enabled before its size and address"
            );
        }
        entry.2 = enable;
        Ok(())
    }
    fn get_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), VirtioError> {
        self.step("GET_CONFIG")?;
        let start = (offset as usize).min(self.input.config.len());
        let source = &self.input.config[start..];
        let n = source.len().min(buf.len());
        buf[..n].copy_from_slice(&source[..n]);
        buf[n..].fill(0);
        Ok(())
    }
    fn hangup_fd(&self) -> Result<OwnedFd, VirtioError> {
        let (ours, _theirs) =
            std::os::unix::net::UnixStream::pair().map_err(|source| VirtioError::EventFd {
                what: "hang-up",
                queue: 0,
                source,
            })?;
        Ok(OwnedFd::from(ours))
    }
}

fn dma() -> &'static Arc<DmaMemory> {
    static DMA: OnceLock<Arc<DmaMemory>> = OnceLock::new();
    DMA.get_or_init(|| {
        DmaMemory::with_memmap(
            DmaConfig {
                size_mib: 32,
                no_huge: true,
            },
            Arc::new(MemMap::new()),
        )
        .expect("DMA memory")
    })
}

const VERSION_1: u64 = 1 << 32;

fuzz_target!(|input: Input| {
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let backend = FakeBackend {
        input: Arc::new(InputCopy {
            features: input.features,
            max_queues: input.max_queues,
            config: input.config.clone(),
            failures: input.failures,
        }),
        requests: 0,
        seen: seen.clone(),
    };
    let options = DeviceOptions {
        vq_count: u16::from(input.vq_count % 9),
        vq_size: 1 << (input.vq_size_log2 % 10),
        packed_ring: input.packed_ring,
        event_idx: input.event_idx,
    };
    let Ok(device) = BlkDevice::start("Fuzz0", Box::new(backend), dma(), options) else {
        return;
    };
    let seen = seen.lock().expect("seen");
    let accepted = seen.accepted.expect("features were set");
    assert_eq!(
        accepted & !input.features,
        0,
        "accepted {accepted:#x} beyond the offer {:#x}",
        input.features
    );
    assert_eq!(device.features() & !input.features, 0);
    assert_ne!(
        device.features() & VERSION_1,
        0,
        "started without VERSION_1"
    );
    let block = device.block_size_bytes();
    assert!(
        block >= 512 && block.is_power_of_two(),
        "block size {block}"
    );
    assert!(device.num_blocks() > 0);
    let capacity_bytes = u128::from(device.config().capacity_sectors) * 512;
    assert!(u128::from(device.num_blocks()) * u128::from(block) <= capacity_bytes);
    let queues = device.queue_count();
    assert!(
        queues >= 1 && queues <= usize::from(options.vq_count),
        "{queues} queues for {} asked",
        options.vq_count
    );
    assert!(
        queues <= usize::from(input.max_queues.max(1)),
        "{queues} queues, {} offered",
        input.max_queues
    );
    assert!(
        seen.queues.len() <= queues,
        "a queue set up beyond the count: {:?}",
        seen.queues
    );
    assert!(
        seen.queues.iter().all(|q| *q == (true, true, true)),
        "{:?}",
        seen.queues
    );
});
