//! The ring driver against a tiny device emulation that works on the same memory through
//! the [`crate::ring`] layouts, as a back-end process would.

use std::sync::Arc;

use pollux_env::dma::{DmaConfig, DmaMemory};
use pollux_env::memmap::MemMap;

use super::*;
use crate::ring::{
    packed_used_flags, PackedDesc, SplitDesc, UsedElem, RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
};

fn memory() -> Arc<DmaMemory> {
    DmaMemory::with_memmap(
        DmaConfig {
            size_mib: 2,
            no_huge: true,
        },
        Arc::new(MemMap::new()),
    )
    .expect("DMA memory")
}

// The emulated device reads and writes the rings by address, as a back-end does after
// mapping the memory; the queue's buffer stays alive for the whole test.

fn rd16(addr: u64) -> u16 {
    // SAFETY: `addr` lies in a live ring buffer of the queue under test, 2-aligned.
    u16::from_le(unsafe { (addr as *const u16).read_volatile() })
}

fn wr16(addr: u64, value: u16) {
    // SAFETY: as in `rd16`.
    unsafe { (addr as *mut u16).write_volatile(value.to_le()) }
}

fn rd_bytes<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        // SAFETY: `addr + i` lies in a live ring buffer of the queue under test.
        *byte = unsafe { ((addr + i as u64) as *const u8).read_volatile() };
    }
    out
}

fn wr_bytes(addr: u64, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        // SAFETY: as in `rd_bytes`.
        unsafe { ((addr + i as u64) as *mut u8).write_volatile(*byte) };
    }
}

struct SplitDevice {
    addrs: RingAddresses,
    layout: SplitLayout,
    last_avail: u16,
    used_idx: u16,
}

impl SplitDevice {
    fn new(queue: &Virtqueue) -> Self {
        Self {
            addrs: queue.addresses(),
            layout: SplitLayout::new(queue.size()).expect("layout"),
            last_avail: 0,
            used_idx: 0,
        }
    }

    /// Every chain made available: (head, descriptors).
    fn take(&mut self) -> Vec<(u16, Vec<SplitDesc>)> {
        let avail_idx = rd16(self.addrs.driver + SplitLayout::AVAIL_IDX_OFFSET);
        let mut chains = Vec::new();
        while self.last_avail != avail_idx {
            let head = rd16(self.addrs.driver + self.layout.avail_entry_offset(self.last_avail));
            let mut descs = Vec::new();
            let mut index = head;
            for _ in 0..self.layout.queue_size() {
                let desc = SplitDesc::from_le_bytes(rd_bytes(
                    self.addrs.desc + self.layout.desc_offset(index),
                ));
                descs.push(desc);
                if !desc.has_next() {
                    break;
                }
                index = desc.next;
            }
            chains.push((head, descs));
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        chains
    }

    fn complete(&mut self, head: u16, len: u32) {
        let elem = UsedElem {
            id: u32::from(head),
            len,
        };
        wr_bytes(
            self.addrs.device + self.layout.used_entry_offset(self.used_idx),
            &elem.to_le_bytes(),
        );
        self.used_idx = self.used_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        wr16(
            self.addrs.device + SplitLayout::USED_IDX_OFFSET,
            self.used_idx,
        );
    }
}

struct PackedDevice {
    addrs: RingAddresses,
    layout: PackedLayout,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
}

impl PackedDevice {
    fn new(queue: &Virtqueue) -> Self {
        Self {
            addrs: queue.addresses(),
            layout: PackedLayout::new(queue.size()).expect("layout"),
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
        }
    }

    fn desc(&self, position: u16) -> PackedDesc {
        PackedDesc::from_le_bytes(rd_bytes(
            self.addrs.desc + self.layout.desc_offset(position),
        ))
    }

    fn advance(position: &mut u16, wrap: &mut bool, size: u16) {
        *position += 1;
        if *position == size {
            *position = 0;
            *wrap = !*wrap;
        }
    }

    /// Every available chain: (buffer id, descriptors).
    fn take(&mut self) -> Vec<(u16, Vec<PackedDesc>)> {
        let size = self.layout.queue_size();
        let mut chains = Vec::new();
        for _ in 0..size {
            let head = self.desc(self.next_avail);
            if !head.is_avail(self.avail_wrap) {
                break;
            }
            let mut descs = Vec::new();
            loop {
                let desc = self.desc(self.next_avail);
                assert!(desc.is_avail(self.avail_wrap), "chain member not available");
                descs.push(desc);
                Self::advance(&mut self.next_avail, &mut self.avail_wrap, size);
                if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
                    break;
                }
            }
            let id = descs.last().map_or(0, |d| d.id);
            chains.push((id, descs));
        }
        chains
    }

    fn complete(&mut self, id: u16, descriptors: u16, len: u32) {
        let desc = PackedDesc {
            addr: 0,
            len,
            id,
            flags: packed_used_flags(self.used_wrap),
        };
        let bytes = desc.to_le_bytes();
        let at = self.addrs.desc + self.layout.desc_offset(self.next_used);
        wr_bytes(at, &bytes[..14]);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        wr16(at + 14, desc.flags);
        for _ in 0..descriptors {
            Self::advance(
                &mut self.next_used,
                &mut self.used_wrap,
                self.layout.queue_size(),
            );
        }
    }
}

fn chain(token: u16, buffers: usize) -> Vec<Buffer> {
    (0..buffers)
        .map(|i| Buffer {
            addr: 0x1000 * u64::from(token) + i as u64,
            len_bytes: 16 + i as u32,
            device_writes: i + 1 == buffers,
        })
        .collect()
}

#[test]
fn split_chains_round_trip_out_of_order_and_wrap_the_indices() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 0, 8, RingFormat::Split, false).expect("queue");
    let mut device = SplitDevice::new(&queue);
    assert_eq!(
        rd16(queue.addresses().driver),
        VIRTQ_AVAIL_F_NO_INTERRUPT,
        "used-buffer notifications suppressed"
    );
    let mut completed = Vec::new();
    // 70000 requests: the free-running u16 indices wrap, descriptors are recycled.
    for round in 0..35_000u32 {
        let tokens = [(round % 100) as u16, 100 + (round % 7) as u16];
        queue.add(tokens[0], &chain(tokens[0], 3)).expect("add");
        queue.add(tokens[1], &chain(tokens[1], 2)).expect("add");
        assert_eq!(queue.num_free(), 3);
        assert!(device.take().is_empty(), "nothing visible before publish");
        assert!(queue.publish(), "the device did not ask for no kicks");
        let chains = device.take();
        assert_eq!(chains.len(), 2);
        for ((_, descs), token) in chains.iter().zip(tokens) {
            let expected = chain(token, descs.len());
            for (desc, buffer) in descs.iter().zip(&expected) {
                assert_eq!(desc.addr, buffer.addr);
                assert_eq!(desc.len, buffer.len_bytes);
                assert_eq!(desc.is_write(), buffer.device_writes);
            }
        }
        // Complete in reverse order.
        device.complete(chains[1].0, 7);
        device.complete(chains[0].0, 9);
        completed.clear();
        let count = queue
            .poll_used(16, |token, len| completed.push((token, len)))
            .expect("poll");
        assert_eq!(count, 2);
        assert_eq!(completed, vec![(tokens[1], 7), (tokens[0], 9)]);
        assert_eq!(queue.num_free(), 8);
        assert_eq!(queue.chains_in_flight(), 0);
    }
}

#[test]
fn split_backpressure_bounded_polls_and_kick_suppression() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 1, 4, RingFormat::Split, false).expect("queue");
    let mut device = SplitDevice::new(&queue);
    queue.add(1, &chain(1, 3)).expect("add");
    assert_eq!(
        queue.add(2, &chain(2, 2)),
        Err(AddError::Full { needed: 2, free: 1 })
    );
    assert_eq!(
        queue.add(2, &chain(2, 5)),
        Err(AddError::TooLong {
            buffers: 5,
            queue_size: 4
        })
    );
    queue.add(2, &chain(2, 1)).expect("add");
    // The device polls: it sets NO_NOTIFY and the driver skips the kick.
    wr16(queue.addresses().device, VIRTQ_USED_F_NO_NOTIFY);
    assert!(!queue.publish());
    assert!(!queue.publish(), "nothing new: no store, no kick");
    let chains = device.take();
    device.complete(chains[0].0, 0);
    device.complete(chains[1].0, 0);
    let mut seen = Vec::new();
    assert_eq!(queue.poll_used(1, |t, _| seen.push(t)).expect("poll"), 1);
    assert_eq!(queue.poll_used(1, |t, _| seen.push(t)).expect("poll"), 1);
    assert_eq!(queue.poll_used(1, |t, _| seen.push(t)).expect("poll"), 0);
    assert_eq!(seen, vec![1, 2]);
}

#[test]
fn split_event_idx_kicks_only_when_avail_event_is_crossed() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 0, 16, RingFormat::Split, true).expect("queue");
    let layout = SplitLayout::new(16).expect("layout");
    let addrs = queue.addresses();
    let mut device = SplitDevice::new(&queue);
    // avail_event = 0: the first batch (0 -> 2) crosses it.
    queue.add(0, &chain(0, 1)).expect("add");
    queue.add(1, &chain(1, 1)).expect("add");
    assert!(queue.publish());
    // The device asks to be told when index 5 is published.
    wr16(addrs.device + layout.avail_event_offset(), 5);
    queue.add(2, &chain(2, 1)).expect("add");
    assert!(!queue.publish(), "2 -> 3 does not cross 5");
    queue.add(3, &chain(3, 1)).expect("add");
    queue.add(4, &chain(4, 1)).expect("add");
    queue.add(5, &chain(5, 1)).expect("add");
    assert!(queue.publish(), "3 -> 6 crosses 5");
    for (head, _) in device.take() {
        device.complete(head, 0);
    }
    assert_eq!(queue.poll_used(64, |_, _| {}).expect("poll"), 6);
    assert_eq!(
        rd16(addrs.driver + layout.used_event_offset()),
        5,
        "used_event stays just behind the driver: no interrupts"
    );
}

#[test]
fn split_bogus_used_entries_break_the_queue() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 3, 8, RingFormat::Split, false).expect("queue");
    let mut device = SplitDevice::new(&queue);
    queue.add(9, &chain(9, 2)).expect("add");
    queue.publish();
    let chains = device.take();
    // A head that is not in flight (the second descriptor of the chain).
    device.complete(chains[0].1[0].next, 0);
    let error = queue.poll_used(8, |_, _| {}).expect_err("bogus id");
    assert!(
        error.to_string().contains("names no buffer in flight"),
        "{error}"
    );
    // A used index far ahead of anything made available.
    let mut queue = Virtqueue::new(&dma, 4, 8, RingFormat::Split, false).expect("queue");
    wr16(queue.addresses().device + SplitLayout::USED_IDX_OFFSET, 100);
    let error = queue.poll_used(8, |_, _| {}).expect_err("index ahead");
    assert!(error.to_string().contains("ahead"), "{error}");
}

#[test]
fn packed_chains_round_trip_and_wrap_the_ring() {
    let dma = memory();
    // 5 entries, not a power of two: packed allows it, and chains straddle the wrap.
    let mut queue = Virtqueue::new(&dma, 0, 5, RingFormat::Packed, false).expect("queue");
    let mut device = PackedDevice::new(&queue);
    let addrs = queue.addresses();
    assert_eq!(rd16(addrs.driver + 2), RING_EVENT_FLAGS_DISABLE);
    assert_eq!(queue.base(), 0x8000, "wrap counter starts at 1");
    let mut completed = Vec::new();
    for round in 0..1000u16 {
        let a = round;
        let b = round.wrapping_add(5000);
        queue.add(a, &chain(a, 3)).expect("add");
        queue.add(b, &chain(b, 2)).expect("add");
        assert_eq!(
            queue.add(7, &chain(7, 1)),
            Err(AddError::Full { needed: 1, free: 0 })
        );
        assert!(
            device.take().is_empty(),
            "the batch's head is deferred to publish"
        );
        assert!(queue.publish(), "device event flags ENABLE");
        let chains = device.take();
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].1.len(), 3);
        assert_eq!(chains[1].1.len(), 2);
        for ((_, descs), token) in chains.iter().zip([a, b]) {
            for (desc, buffer) in descs.iter().zip(&chain(token, descs.len())) {
                assert_eq!((desc.addr, desc.len), (buffer.addr, buffer.len_bytes));
                assert_eq!(desc.flags & VIRTQ_DESC_F_WRITE != 0, buffer.device_writes);
            }
        }
        // Out of order: the 2-descriptor chain first.
        device.complete(chains[1].0, 2, 11);
        device.complete(chains[0].0, 3, 22);
        completed.clear();
        let count = queue
            .poll_used(1, |token, len| completed.push((token, len)))
            .expect("poll");
        assert_eq!(count, 1, "bounded by max");
        queue
            .poll_used(8, |token, len| completed.push((token, len)))
            .expect("poll");
        assert_eq!(completed, vec![(b, 11), (a, 22)]);
        assert_eq!(queue.num_free(), 5);
    }
}

#[test]
fn packed_kick_follows_device_event_suppression() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 0, 8, RingFormat::Packed, true).expect("queue");
    let mut device = PackedDevice::new(&queue);
    let addrs = queue.addresses();
    wr16(addrs.device + 2, RING_EVENT_FLAGS_DISABLE);
    queue.add(0, &chain(0, 2)).expect("add");
    assert!(!queue.publish(), "the device polls");
    // Ask for a notification once descriptor 4 (wrap 1) is made available.
    wr16(addrs.device, 0x8000 | 4);
    wr16(addrs.device + 2, RING_EVENT_FLAGS_DESC);
    queue.add(1, &chain(1, 1)).expect("add");
    assert!(!queue.publish(), "2 -> 3 does not reach 4");
    queue.add(2, &chain(2, 2)).expect("add");
    assert!(queue.publish(), "3 -> 5 passes 4");
    let chains = device.take();
    assert_eq!(chains.len(), 3);
    for (id, descs) in chains {
        device.complete(id, descs.len() as u16, 0);
    }
    let mut tokens = Vec::new();
    queue.poll_used(8, |t, _| tokens.push(t)).expect("poll");
    assert_eq!(tokens, vec![0, 1, 2]);
}

#[test]
fn packed_bogus_id_breaks_the_queue() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 2, 4, RingFormat::Packed, false).expect("queue");
    let mut device = PackedDevice::new(&queue);
    queue.add(5, &chain(5, 1)).expect("add");
    queue.publish();
    let chains = device.take();
    device.complete(chains[0].0 + 1, 1, 0);
    let error = queue.poll_used(4, |_, _| {}).expect_err("bogus id");
    assert!(error.to_string().contains("queue size 4"), "{error}");
}

/// Interrupt mode, split: enabling asks the device (flag cleared, or `used_event` at the next
/// entry) and re-checks the ring; an entry published before the request is reported, so the
/// owner polls instead of sleeping through it.
#[test]
fn split_used_notifications_enable_recheck_and_disable() {
    let dma = memory();
    for event_idx in [false, true] {
        let mut queue = Virtqueue::new(&dma, 0, 8, RingFormat::Split, event_idx).expect("queue");
        let mut device = SplitDevice::new(&queue);
        let addrs = queue.addresses();
        let layout = SplitLayout::new(8).expect("layout");
        let flags = || rd16(addrs.driver + SplitLayout::AVAIL_FLAGS_OFFSET);
        let used_event = || rd16(addrs.driver + layout.used_event_offset());
        queue.add(1, &chain(1, 1)).expect("add");
        queue.publish();
        assert!(!queue.enable_used_notifications(), "nothing used yet");
        if event_idx {
            assert_eq!(used_event(), 0, "notify when entry 0 is used");
        } else {
            assert_eq!(flags(), 0, "NO_INTERRUPT cleared");
        }
        let taken = device.take();
        device.complete(taken[0].0, 0);
        assert!(
            queue.enable_used_notifications(),
            "the re-check sees the entry the device published"
        );
        assert_eq!(queue.poll_used(8, |_, _| {}).expect("poll"), 1);
        queue.disable_used_notifications();
        if event_idx {
            assert_eq!(used_event(), 0, "used_event behind the driver (1 - 1)");
        } else {
            assert_eq!(flags(), VIRTQ_AVAIL_F_NO_INTERRUPT, "suppressed again");
        }
    }
}

/// Interrupt mode, packed: the driver event area goes to ENABLE and back to DISABLE; the
/// re-check reads the next used slot.
#[test]
fn packed_used_notifications_enable_recheck_and_disable() {
    let dma = memory();
    let mut queue = Virtqueue::new(&dma, 0, 8, RingFormat::Packed, false).expect("queue");
    let mut device = PackedDevice::new(&queue);
    let addrs = queue.addresses();
    let event_flags = || rd16(addrs.driver + PackedEvent::FLAGS_OFFSET);
    assert_eq!(event_flags(), RING_EVENT_FLAGS_DISABLE);
    queue.add(1, &chain(1, 2)).expect("add");
    queue.publish();
    assert!(!queue.enable_used_notifications());
    assert_eq!(event_flags(), RING_EVENT_FLAGS_ENABLE);
    let taken = device.take();
    device.complete(taken[0].0, 2, 0);
    assert!(
        queue.enable_used_notifications(),
        "the used descriptor is seen"
    );
    assert_eq!(queue.poll_used(8, |_, _| {}).expect("poll"), 1);
    queue.disable_used_notifications();
    assert_eq!(event_flags(), RING_EVENT_FLAGS_DISABLE);
}

#[test]
fn indirect_chains_take_one_slot_and_tables_match_the_ring_format() {
    for format in [RingFormat::Split, RingFormat::Packed] {
        let dma = memory();
        let mut queue = Virtqueue::new(&dma, 0, 4, format, false).expect("queue");
        let mut tables = RingMem::new(dma.alloc(4 * 64, 64, None).expect("tables"));
        // Four requests of three buffers in a queue of four entries: one slot each.
        for token in 0..4u16 {
            queue
                .add_indirect(
                    token + 10,
                    &mut tables,
                    u64::from(token) * 64,
                    &chain(token, 3),
                )
                .expect("fits");
        }
        assert_eq!(queue.num_free(), 0);
        assert!(matches!(
            queue.add_indirect(99, &mut tables, 0, &chain(0, 3)),
            Err(AddError::Full { .. })
        ));
        assert!(matches!(
            queue.add_indirect(99, &mut tables, 0, &chain(0, MAX_INDIRECT_ENTRIES + 1)),
            Err(AddError::TooLong { .. })
        ));
        queue.publish();
        let table_entries = |addr: u64, len: u32| -> Vec<[u8; 16]> {
            (0..u64::from(len) / 16)
                .map(|i| rd_bytes::<16>(addr + 16 * i))
                .collect()
        };
        let mut completed = Vec::new();
        match format {
            RingFormat::Split => {
                let mut device = SplitDevice::new(&queue);
                let chains = device.take();
                assert_eq!(chains.len(), 4);
                for (i, (head, descs)) in chains.into_iter().enumerate() {
                    let [desc] = descs[..] else {
                        panic!("one ring descriptor per request")
                    };
                    assert_eq!(desc.flags, VIRTQ_DESC_F_INDIRECT);
                    assert_eq!(desc.addr, tables.addr() + 64 * i as u64);
                    assert_eq!(desc.len, 48);
                    let entries: Vec<SplitDesc> = table_entries(desc.addr, desc.len)
                        .into_iter()
                        .map(SplitDesc::from_le_bytes)
                        .collect();
                    for (j, (entry, buffer)) in entries.iter().zip(chain(i as u16, 3)).enumerate() {
                        assert_eq!((entry.addr, entry.len), (buffer.addr, buffer.len_bytes));
                        assert_eq!(entry.is_write(), buffer.device_writes);
                        assert_eq!(entry.has_next(), j < 2);
                        if j < 2 {
                            assert_eq!(usize::from(entry.next), j + 1, "next indexes the table");
                        }
                    }
                    device.complete(head, 1);
                }
            }
            RingFormat::Packed => {
                let mut device = PackedDevice::new(&queue);
                let chains = device.take();
                assert_eq!(chains.len(), 4);
                for (i, (id, descs)) in chains.into_iter().enumerate() {
                    let [desc] = descs[..] else {
                        panic!("one ring descriptor per request")
                    };
                    assert_ne!(desc.flags & VIRTQ_DESC_F_INDIRECT, 0);
                    assert_eq!(desc.flags & VIRTQ_DESC_F_NEXT, 0);
                    assert_eq!((desc.addr, desc.len), (tables.addr() + 64 * i as u64, 48));
                    let entries: Vec<PackedDesc> = table_entries(desc.addr, desc.len)
                        .into_iter()
                        .map(PackedDesc::from_le_bytes)
                        .collect();
                    for (entry, buffer) in entries.iter().zip(chain(i as u16, 3)) {
                        assert_eq!((entry.addr, entry.len), (buffer.addr, buffer.len_bytes));
                        assert_eq!(entry.flags & VIRTQ_DESC_F_WRITE != 0, buffer.device_writes);
                    }
                    device.complete(id, 1, 1);
                }
            }
        }
        queue
            .poll_used(16, |token, _| completed.push(token))
            .expect("poll");
        completed.sort_unstable();
        assert_eq!(completed, vec![10, 11, 12, 13], "{format:?}");
        assert_eq!(queue.num_free(), 4);
        assert_eq!(queue.chains_in_flight(), 0);
    }
}
