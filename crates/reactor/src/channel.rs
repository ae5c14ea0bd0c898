//! I/O devices and per-thread I/O channels, as SPDK's `spdk_io_device_register` and
//! `spdk_get_io_channel`: a device registers a create and a destroy callback; the first
//! `get_io_channel` on a thread creates that thread's channel context, later gets count
//! references, and the last put destroys it (after the current callback returns).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::app::AppHandle;
use crate::error::ReactorError;
use crate::thread::{lock, ThreadCtx, ThreadId};

type CreateFn = Arc<dyn Fn(&mut ThreadCtx) -> Box<dyn Any + Send> + Send + Sync>;
type DestroyFn = Arc<dyn Fn(&mut ThreadCtx, Box<dyn Any + Send>) + Send + Sync>;

struct DeviceEntry {
    name: Arc<str>,
    create: CreateFn,
    destroy: DestroyFn,
    /// Channels alive on all threads.
    channels: usize,
}

/// The app's io devices. Locked on register, unregister, first get and last put: setup paths,
/// never the I/O path (which goes through a channel the thread already holds).
#[derive(Default)]
pub(crate) struct DeviceTable {
    devices: HashMap<u64, DeviceEntry>,
    next_id: u64,
}

/// A registered io device whose channels hold a `T` per thread. Cheap to clone.
pub struct IoDevice<T> {
    id: u64,
    name: Arc<str>,
    _ctx: PhantomData<fn() -> T>,
}

impl<T> Clone for IoDevice<T> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            name: self.name.clone(),
            _ctx: PhantomData,
        }
    }
}

impl<T> fmt::Debug for IoDevice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoDevice({:?}, id {})", self.name, self.id)
    }
}

impl<T> IoDevice<T> {
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// One reference to a thread's channel of a device. Not `Clone`: every get is matched by one
/// [`ThreadCtx::put_io_channel`]. It may travel (inside a poller, say) but is only usable on
/// the thread that got it (an assertion).
#[must_use = "a channel reference must be given back with ThreadCtx::put_io_channel"]
pub struct IoChannel<T> {
    device: u64,
    thread: ThreadId,
    _ctx: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for IoChannel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IoChannel(device {}, thread {})",
            self.device, self.thread
        )
    }
}

impl<T> IoChannel<T> {
    pub fn thread(&self) -> ThreadId {
        self.thread
    }
}

/// A thread's channel of one device.
pub(crate) struct ChannelSlot {
    device: u64,
    name: Arc<str>,
    refs: u32,
    value: Box<dyn Any + Send>,
    destroy: DestroyFn,
}

impl AppHandle {
    /// Registers an io device: `create` builds a thread's channel context on its first
    /// [`ThreadCtx::get_io_channel`], `destroy` gets it back after the last put. Names are
    /// unique.
    pub fn register_io_device<T, C, D>(
        &self,
        name: &str,
        create: C,
        destroy: D,
    ) -> Result<IoDevice<T>, ReactorError>
    where
        T: Send + 'static,
        C: Fn(&mut ThreadCtx) -> T + Send + Sync + 'static,
        D: Fn(&mut ThreadCtx, T) + Send + Sync + 'static,
    {
        let mut table = lock(&self.0.devices);
        if table.devices.values().any(|entry| &*entry.name == name) {
            return Err(ReactorError::DeviceExists {
                name: name.to_string(),
            });
        }
        let id = table.next_id;
        table.next_id += 1;
        let name: Arc<str> = Arc::from(name);
        let device_name = name.clone();
        table.devices.insert(
            id,
            DeviceEntry {
                name: name.clone(),
                create: Arc::new(move |ctx| Box::new(create(ctx)) as Box<dyn Any + Send>),
                destroy: Arc::new(move |ctx, value| match value.downcast::<T>() {
                    Ok(value) => destroy(ctx, *value),
                    Err(_) => unreachable!("channel of device {device_name:?} holds another type"),
                }),
                channels: 0,
            },
        );
        tracing::debug!(device = %name, id, "io device registered");
        Ok(IoDevice {
            id,
            name,
            _ctx: PhantomData,
        })
    }

    /// Unregisters an io device. Refused while any thread holds a channel of it
    /// ([`ReactorError::DeviceBusy`]): put them first (for instance from
    /// [`ThreadCtx::for_each_channel`]).
    pub fn unregister_io_device<T>(&self, device: &IoDevice<T>) -> Result<(), ReactorError> {
        let mut table = lock(&self.0.devices);
        match table.devices.get(&device.id) {
            None => Err(ReactorError::DeviceUnknown {
                name: device.name.to_string(),
                id: device.id,
            }),
            Some(entry) if entry.channels > 0 => Err(ReactorError::DeviceBusy {
                name: device.name.to_string(),
                channels: entry.channels,
            }),
            Some(_) => {
                table.devices.remove(&device.id);
                tracing::debug!(device = %device.name, "io device unregistered");
                Ok(())
            }
        }
    }

    /// Channels of `device` alive on all threads.
    pub fn live_channels<T>(&self, device: &IoDevice<T>) -> usize {
        lock(&self.0.devices)
            .devices
            .get(&device.id)
            .map_or(0, |entry| entry.channels)
    }

    fn channel_destroyed(&self, device: u64) {
        if let Some(entry) = lock(&self.0.devices).devices.get_mut(&device) {
            entry.channels -= 1;
        }
    }
}

impl ThreadCtx {
    /// This thread's channel of `device`: created by the device's `create` on the first get,
    /// one more reference on later gets.
    pub fn get_io_channel<T: 'static>(
        &mut self,
        device: &IoDevice<T>,
    ) -> Result<IoChannel<T>, ReactorError> {
        let channel = IoChannel {
            device: device.id,
            thread: self.id(),
            _ctx: PhantomData,
        };
        if let Some(slot) = self
            .channels
            .iter_mut()
            .find(|slot| slot.device == device.id)
        {
            // A slot at zero references is awaiting its deferred destroy: revive it.
            slot.refs += 1;
            return Ok(channel);
        }
        let (create, destroy) =
            {
                let mut table = lock(&self.app.0.devices);
                let entry = table.devices.get_mut(&device.id).ok_or_else(|| {
                    ReactorError::DeviceUnknown {
                        name: device.name.to_string(),
                        id: device.id,
                    }
                })?;
                // Counted before `create` runs, so that the device cannot be unregistered under it.
                entry.channels += 1;
                (entry.create.clone(), entry.destroy.clone())
            };
        let value = create(self);
        self.channels.push(ChannelSlot {
            device: device.id,
            name: device.name.clone(),
            refs: 1,
            value,
            destroy,
        });
        tracing::trace!(thread = self.name(), device = %device.name, "io channel created");
        Ok(channel)
    }

    /// Gives back one reference; the last one destroys the channel after the current callback
    /// returns (unless a get revives it first).
    pub fn put_io_channel<T>(&mut self, channel: IoChannel<T>) {
        let slot = self.own_slot(channel.device, channel.thread);
        slot.refs -= 1;
        if slot.refs == 0 {
            self.channel_release_pending = true;
        }
    }

    /// The channel context, mutably.
    pub fn channel_ctx_mut<T: 'static>(&mut self, channel: &IoChannel<T>) -> &mut T {
        let slot = self.own_slot(channel.device, channel.thread);
        match slot.value.downcast_mut::<T>() {
            Some(value) => value,
            None => unreachable!("IoChannel<T> comes from an IoDevice<T>"),
        }
    }

    /// References this thread holds on its channel of `device` (0: none).
    pub fn channel_refs<T>(&self, device: &IoDevice<T>) -> u32 {
        self.channels
            .iter()
            .find(|slot| slot.device == device.id)
            .map_or(0, |slot| slot.refs)
    }

    /// Runs `f` on every thread holding a channel of `device`, with that channel, one thread
    /// after another, then `done` on this thread, as `spdk_for_each_channel`.
    pub fn for_each_channel<T, F, D>(&mut self, device: &IoDevice<T>, mut f: F, done: D)
    where
        T: 'static,
        F: FnMut(&mut ThreadCtx, &IoChannel<T>) + Send + 'static,
        D: FnOnce(&mut ThreadCtx) + Send + 'static,
    {
        let device = device.id;
        self.for_each_thread(
            move |ctx| {
                if ctx
                    .channels
                    .iter()
                    .any(|slot| slot.device == device && slot.refs > 0)
                {
                    let channel = IoChannel {
                        device,
                        thread: ctx.id(),
                        _ctx: PhantomData,
                    };
                    f(ctx, &channel);
                }
            },
            done,
        );
    }

    fn own_slot(&mut self, device: u64, thread: ThreadId) -> &mut ChannelSlot {
        assert_eq!(
            thread,
            self.id(),
            "io channel of thread {thread} used on thread {} ({})",
            self.id(),
            self.name()
        );
        match self
            .channels
            .iter_mut()
            .find(|slot| slot.device == device && slot.refs > 0)
        {
            Some(slot) => slot,
            None => panic!("io channel of device {device} used after its last put"),
        }
    }

    /// Destroys the channels whose last reference was put.
    pub(crate) fn release_channels(&mut self) {
        self.channel_release_pending = false;
        while let Some(index) = self.channels.iter().position(|slot| slot.refs == 0) {
            let slot = self.channels.swap_remove(index);
            (slot.destroy)(self, slot.value);
            self.app.channel_destroyed(slot.device);
            tracing::trace!(thread = self.name(), device = %slot.name, "io channel destroyed");
        }
    }

    pub(crate) fn force_release_channels(&mut self) {
        for slot in &mut self.channels {
            slot.refs = 0;
        }
        self.release_channels();
    }

    pub(crate) fn channel_names(&self) -> Vec<String> {
        self.channels
            .iter()
            .map(|slot| format!("{} x{}", slot.name, slot.refs))
            .collect()
    }
}
