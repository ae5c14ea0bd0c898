//! The registry of bdevs, descriptors and claims, as SPDK's `spdk_bdev_register`,
//! `spdk_bdev_open_ext` and `spdk_bdev_module_claim_bdev`.
//!
//! Everything here is the setup path: the registry and each bdev's descriptor list sit
//! behind mutexes. The I/O path ([`BdevChannel`]) only reads a bdev's `removed` flag.
//!
//! Hot remove: [`BdevRegistry::unregister`] takes the bdev out of the registry, marks it
//! removed (new I/O completes with [`IoStatus::Removed`](crate::IoStatus::Removed)), and
//! sends [`BdevEvent::Remove`] to every descriptor's event thread; I/O already submitted
//! completes normally. The owner drops its channels and descriptor; the module's resources
//! go with the last of them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pollux_reactor::{send_msg, ThreadCtx, ThreadHandle};

use crate::channel::BdevChannel;
use crate::error::BdevError;
use crate::module::BdevBackend;
use crate::qos::{QosBucket, QosLimits, QosUpdate};
use crate::stats::IoStats;
use crate::types::{BdevInfo, BdevSpec, IoType, Uuid};

/// Largest channel queue depth (slots are `u16`).
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// What happened to an open bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevEvent {
    /// The bdev is being removed: stop submitting, let outstanding I/O complete, then drop
    /// the channels and the descriptor.
    Remove { bdev: Arc<str> },
}

/// Called on the descriptor's event thread. An `Arc` so that the message carrying it stays
/// small (two words) and allocates nothing.
pub type EventCallback = Arc<dyn Fn(&mut ThreadCtx, &BdevEvent) + Send + Sync>;

/// Where a descriptor's events go.
#[derive(Clone)]
pub struct EventTarget {
    pub thread: ThreadHandle,
    pub callback: EventCallback,
}

struct DescEntry {
    id: u64,
    write: bool,
    events: Option<EventTarget>,
}

struct Claim {
    desc: u64,
    owner: String,
}

#[derive(Default)]
struct BdevState {
    descs: Vec<DescEntry>,
    claim: Option<Claim>,
    /// Statistics of the channels already dropped.
    closed_stats: IoStats,
    /// The latest snapshot each open channel published, by channel id (see
    /// [`BdevChannel`](crate::BdevChannel)'s poll): what `stats` adds to the closed ones.
    live_stats: Vec<(u64, IoStats)>,
    next_channel_id: u64,
}

/// A registered bdev, shared by the registry, descriptors and channels.
pub(crate) struct BdevShared {
    pub(crate) info: BdevInfo,
    pub(crate) backend: Arc<dyn BdevBackend>,
    /// Written once by unregister, read by every submit: the line stays shared in every
    /// core's cache, so the read costs nothing in steady state.
    pub(crate) removed: AtomicBool,
    /// Rate limits; read by every submit only as one flag while none is set.
    pub(crate) qos: QosBucket,
    state: Mutex<BdevState>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks left only plain bookkeeping behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BdevShared {
    /// A new channel's id for [`publish_stats`](Self::publish_stats), with an empty snapshot.
    pub(crate) fn open_channel_stats(&self) -> u64 {
        let mut state = lock(&self.state);
        let id = state.next_channel_id;
        state.next_channel_id += 1;
        state.live_stats.push((id, IoStats::default()));
        id
    }

    /// Replaces channel `id`'s snapshot, unless the lock is busy (a reader is summing up):
    /// the I/O path never waits; the next publication catches up.
    pub(crate) fn publish_stats(&self, id: u64, stats: &IoStats) -> bool {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        if let Some(entry) = state.live_stats.iter_mut().find(|(live, _)| *live == id) {
            entry.1 = stats.clone();
        }
        true
    }

    /// A closing channel's final statistics move from the live list to the closed total in
    /// one step, so a reader never counts them twice or not at all.
    pub(crate) fn close_channel_stats(&self, id: u64, stats: &IoStats) {
        let mut state = lock(&self.state);
        state.live_stats.retain(|(live, _)| *live != id);
        state.closed_stats.merge(stats);
    }
}

#[derive(Default)]
struct RegistryInner {
    /// In registration order (what `save_config` writes).
    bdevs: Vec<Arc<BdevShared>>,
}

impl RegistryInner {
    fn find(&self, name: &str) -> Option<&Arc<BdevShared>> {
        self.bdevs
            .iter()
            .find(|b| b.info.name == name || b.info.aliases.iter().any(|a| a == name))
    }
}

/// The bdevs of one app. Not a global: an app (or a test) makes one and shares it.
#[derive(Default)]
pub struct BdevRegistry {
    inner: Mutex<RegistryInner>,
    next_desc_id: AtomicU64,
}

impl std::fmt::Debug for BdevRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevRegistry")
            .field("bdevs", &self.names())
            .finish()
    }
}

impl BdevRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a bdev built by a module. Names and aliases are unique.
    pub fn register(
        &self,
        spec: BdevSpec,
        backend: Arc<dyn BdevBackend>,
    ) -> Result<BdevInfo, BdevError> {
        validate_spec(&spec)?;
        let mut inner = lock(&self.inner);
        for name in std::iter::once(&spec.name).chain(spec.aliases.iter()) {
            if let Some(existing) = inner.find(name) {
                return Err(BdevError::NameTaken {
                    name: name.clone(),
                    existing: existing.info.name.clone(),
                });
            }
        }
        let info = BdevInfo {
            uuid: spec.uuid.unwrap_or_else(Uuid::random),
            supported_io_types: IoType::ALL
                .into_iter()
                .filter(|t| backend.supports(*t))
                .collect(),
            module: backend.module_name(),
            name: spec.name,
            aliases: spec.aliases,
            block_size_bytes: spec.block_size_bytes,
            num_blocks: spec.num_blocks,
            required_alignment_bytes: spec.required_alignment_bytes,
            write_cache: spec.write_cache,
        };
        tracing::info!(
            bdev = %info.name,
            module = info.module,
            block_size = info.block_size_bytes,
            num_blocks = info.num_blocks,
            "bdev registered"
        );
        inner.bdevs.push(Arc::new(BdevShared {
            info: info.clone(),
            backend,
            removed: AtomicBool::new(false),
            qos: QosBucket::default(),
            state: Mutex::new(BdevState::default()),
        }));
        Ok(info)
    }

    /// Hot-removes a bdev: see the module documentation. Returns the number of open
    /// descriptors that were told.
    pub fn unregister(&self, name: &str) -> Result<usize, BdevError> {
        let bdev = {
            let mut inner = lock(&self.inner);
            let index = inner
                .bdevs
                .iter()
                .position(|b| b.info.name == name || b.info.aliases.iter().any(|a| a == name))
                .ok_or_else(|| BdevError::NotFound {
                    name: name.to_string(),
                })?;
            inner.bdevs.remove(index)
        };
        bdev.removed.store(true, Ordering::Release);
        let targets: Vec<EventTarget> = lock(&bdev.state)
            .descs
            .iter()
            .filter_map(|d| d.events.clone())
            .collect();
        let bdev_name: Arc<str> = Arc::from(bdev.info.name.as_str());
        tracing::info!(bdev = %bdev_name, descriptors = targets.len(), "bdev unregistered (hot remove)");
        for target in &targets {
            let callback = target.callback.clone();
            let event_bdev = bdev_name.clone();
            let sent = send_msg(&target.thread, move |ctx| {
                callback(ctx, &BdevEvent::Remove { bdev: event_bdev })
            });
            if sent.is_err() {
                tracing::warn!(
                    bdev = %bdev_name,
                    thread = target.thread.name(),
                    "could not deliver the remove event: the descriptor's thread is gone or its queue is full"
                );
            }
        }
        Ok(targets.len())
    }

    /// Names of the registered bdevs, in registration order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner)
            .bdevs
            .iter()
            .map(|b| b.info.name.clone())
            .collect()
    }

    /// A bdev's description, by name or alias.
    pub fn info(&self, name: &str) -> Result<BdevInfo, BdevError> {
        Ok(self.get(name)?.info.clone())
    }

    /// Whether a name or alias is taken.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.inner).find(name).is_some()
    }

    /// `prefix` followed by the smallest number that makes a free name (`Malloc0`, ...).
    pub fn unique_name(&self, prefix: &str) -> String {
        let inner = lock(&self.inner);
        (0u64..)
            .map(|n| format!("{prefix}{n}"))
            .find(|name| inner.find(name).is_none())
            .unwrap_or_else(|| format!("{prefix}{}", u64::MAX))
    }

    fn get(&self, name: &str) -> Result<Arc<BdevShared>, BdevError> {
        lock(&self.inner)
            .find(name)
            .cloned()
            .ok_or_else(|| BdevError::NotFound {
                name: name.to_string(),
            })
    }

    /// Opens a bdev, as `spdk_bdev_open_ext`. A read-write open fails while another
    /// descriptor holds the exclusive write claim. `events`: where hot-remove events go
    /// (`None`: the owner polls [`BdevDesc::is_removed`]).
    pub fn open(
        &self,
        name: &str,
        write: bool,
        events: Option<EventTarget>,
    ) -> Result<BdevDesc, BdevError> {
        let bdev = self.get(name)?;
        let id = self.next_desc_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = lock(&bdev.state);
            if let (true, Some(claim)) = (write, &state.claim) {
                return Err(BdevError::Claimed {
                    bdev: bdev.info.name.clone(),
                    owner: claim.owner.clone(),
                });
            }
            state.descs.push(DescEntry { id, write, events });
        }
        tracing::debug!(bdev = %bdev.info.name, desc = id, write, "bdev opened");
        Ok(BdevDesc { bdev, id, write })
    }

    /// Statistics of a bdev: its closed channels' plus what its open channels last published
    /// (each publishes at most every few milliseconds while busy and soon after going idle;
    /// [`BdevChannel::stats`] is a channel's exact count).
    pub fn stats(&self, name: &str) -> Result<IoStats, BdevError> {
        let bdev = self.get(name)?;
        let state = lock(&bdev.state);
        let mut total = state.closed_stats.clone();
        for (_, live) in &state.live_stats {
            total.merge(live);
        }
        Ok(total)
    }

    /// Changes a bdev's rate limits (by name or alias); the limits `update` leaves out stay.
    /// Returns the limits now in force. Takes effect at the channels' next submit.
    pub fn set_qos_limits(&self, name: &str, update: &QosUpdate) -> Result<QosLimits, BdevError> {
        let bdev = self.get(name)?;
        // The registry lock serialises setters, so no update is lost between read and set.
        let _setters = lock(&self.inner);
        let limits = bdev.qos.limits().updated(update);
        bdev.qos.set(limits);
        tracing::info!(bdev = %bdev.info.name, ?limits, "bdev QoS rate limits set");
        Ok(limits)
    }

    /// A bdev's rate limits (all 0: none).
    pub fn qos_limits(&self, name: &str) -> Result<QosLimits, BdevError> {
        Ok(self.get(name)?.qos.limits())
    }

    /// `{"subsystem": "bdev", "config": [...]}`: one entry per bdev that recreates it,
    /// followed by a `bdev_set_qos_limit` entry when it has rate limits (as SPDK writes it).
    pub fn save_config(&self) -> serde_json::Value {
        let inner = lock(&self.inner);
        let mut config: Vec<serde_json::Value> = Vec::with_capacity(inner.bdevs.len());
        for bdev in &inner.bdevs {
            config.push(bdev.backend.write_config(&bdev.info));
            let limits = bdev.qos.limits();
            if !limits.is_unlimited() {
                let mut params = serde_json::Map::new();
                params.insert("name".to_string(), bdev.info.name.clone().into());
                for (key, limit) in QosLimits::NAMES.iter().zip(limits.as_array()) {
                    if limit != 0 {
                        params.insert(key.to_string(), limit.into());
                    }
                }
                config.push(serde_json::json!({
                    "method": crate::config::QOS_METHOD,
                    "params": params,
                }));
            }
        }
        serde_json::json!({ "subsystem": "bdev", "config": config })
    }
}

pub(crate) fn validate_spec(spec: &BdevSpec) -> Result<(), BdevError> {
    if spec.name.is_empty() || spec.aliases.iter().any(String::is_empty) {
        return Err(BdevError::EmptyName);
    }
    let block_size = spec.block_size_bytes;
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(BdevError::BadBlockSize {
            name: spec.name.clone(),
            block_size_bytes: block_size,
        });
    }
    if spec.num_blocks == 0 {
        return Err(BdevError::ZeroBlocks {
            name: spec.name.clone(),
        });
    }
    if spec.num_blocks.checked_mul(u64::from(block_size)).is_none() {
        return Err(BdevError::TooLarge {
            name: spec.name.clone(),
            num_blocks: spec.num_blocks,
            block_size_bytes: block_size,
        });
    }
    if !spec.required_alignment_bytes.is_power_of_two() {
        return Err(BdevError::BadAlignment {
            name: spec.name.clone(),
            align_bytes: spec.required_alignment_bytes,
        });
    }
    Ok(())
}

/// An open bdev, as `spdk_bdev_desc`. Dropping it closes it (and releases its claim).
pub struct BdevDesc {
    bdev: Arc<BdevShared>,
    id: u64,
    write: bool,
}

impl std::fmt::Debug for BdevDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevDesc")
            .field("bdev", &self.bdev.info.name)
            .field("id", &self.id)
            .field("write", &self.write)
            .finish()
    }
}

impl BdevDesc {
    pub fn info(&self) -> &BdevInfo {
        &self.bdev.info
    }

    pub fn name(&self) -> &str {
        &self.bdev.info.name
    }

    /// Opened read-write.
    pub fn is_writable(&self) -> bool {
        self.write
    }

    /// The bdev was hot-removed.
    pub fn is_removed(&self) -> bool {
        self.bdev.removed.load(Ordering::Acquire)
    }

    /// Whether the bdev's module supports `io_type`.
    pub fn supports(&self, io_type: IoType) -> bool {
        self.bdev.info.supported_io_types.contains(&io_type)
    }

    /// Takes the exclusive write claim for `owner` (a vhost controller's name, say), as
    /// `spdk_bdev_module_claim_bdev`: afterwards no other descriptor can be opened for write.
    /// Needs this descriptor to be read-write and no other writer open.
    pub fn claim(&self, owner: &str) -> Result<(), BdevError> {
        let name = || self.bdev.info.name.clone();
        if !self.write {
            return Err(BdevError::ClaimNeedsWrite { bdev: name() });
        }
        let mut state = lock(&self.bdev.state);
        if let Some(claim) = &state.claim {
            return Err(BdevError::Claimed {
                bdev: name(),
                owner: claim.owner.clone(),
            });
        }
        let writers = state
            .descs
            .iter()
            .filter(|d| d.write && d.id != self.id)
            .count();
        if writers > 0 {
            return Err(BdevError::OtherWriters {
                bdev: name(),
                owner: owner.to_string(),
                writers,
            });
        }
        state.claim = Some(Claim {
            desc: self.id,
            owner: owner.to_string(),
        });
        tracing::debug!(bdev = %self.bdev.info.name, owner, "bdev claimed");
        Ok(())
    }

    /// Gives the claim back (no-op when this descriptor holds none).
    pub fn release_claim(&self) {
        let mut state = lock(&self.bdev.state);
        if state.claim.as_ref().is_some_and(|c| c.desc == self.id) {
            state.claim = None;
        }
    }

    /// The owner of the bdev's claim, if any.
    pub fn claim_owner(&self) -> Option<String> {
        lock(&self.bdev.state)
            .claim
            .as_ref()
            .map(|c| c.owner.clone())
    }

    /// Descriptors open on this bdev (this one included).
    pub fn open_descriptors(&self) -> usize {
        lock(&self.bdev.state).descs.len()
    }

    /// A channel with `queue_depth` request slots for the calling thread (see
    /// [`BdevChannel`]). Fails on a removed bdev.
    pub fn channel(&self, queue_depth: u32) -> Result<BdevChannel, BdevError> {
        if self.is_removed() {
            return Err(BdevError::Removed {
                bdev: self.bdev.info.name.clone(),
            });
        }
        let depth = u16::try_from(queue_depth)
            .ok()
            .filter(|d| (1..=MAX_QUEUE_DEPTH).contains(&u32::from(*d)))
            .ok_or_else(|| BdevError::BadQueueDepth {
                bdev: self.bdev.info.name.clone(),
                queue_depth,
                max: MAX_QUEUE_DEPTH,
            })?;
        BdevChannel::new(self.bdev.clone(), self.write, depth)
    }
}

impl Drop for BdevDesc {
    fn drop(&mut self) {
        let mut state = lock(&self.bdev.state);
        state.descs.retain(|d| d.id != self.id);
        if state.claim.as_ref().is_some_and(|c| c.desc == self.id) {
            state.claim = None;
        }
        tracing::debug!(bdev = %self.bdev.info.name, desc = self.id, "bdev closed");
    }
}
