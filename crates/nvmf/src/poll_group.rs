//! A poll group: one per reactor core (SPDK's `nvmf_tgt_poll_group`), a lightweight thread
//! whose one active poller owns its connections and polls each in turn: socket reads,
//! commands, bdev completions, socket writes, all bounded per poll (`conn.rs`). New
//! connections arrive from the service thread through a bounded lock-free inbox.
//!
//! When the app stops, the group closes its connections and keeps polling until their
//! in-flight bdev I/O has completed (their buffers are in use until then), then unregisters
//! its poller so the thread can exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crossbeam_queue::ArrayQueue;
use pollux_reactor::{PollStatus, PollerId, ThreadCtx};

use crate::conn::Connection;

/// New connections taken from the inbox per poll (STYLE #4).
const ADOPT_PER_POLL: usize = 8;

pub(crate) struct PollGroup;

impl PollGroup {
    /// Registers the group's poller on the calling thread.
    pub(crate) fn start(ctx: &mut ThreadCtx, inbox: Arc<ArrayQueue<Box<Connection>>>) {
        let stopping = Arc::new(AtomicBool::new(false));
        let own_id: Arc<OnceLock<PollerId>> = Arc::new(OnceLock::new());
        let mut conns: Vec<Box<Connection>> = Vec::new();
        let (poll_stopping, poll_id) = (stopping.clone(), own_id.clone());
        let id = ctx.register_poller("nvmf_poll_group", 0, move |ctx| {
            let mut busy = false;
            let stop = poll_stopping.load(Ordering::Acquire);
            for _ in 0..ADOPT_PER_POLL {
                let Some(mut conn) = inbox.pop() else { break };
                if stop {
                    conn.close("the target is stopping");
                }
                conns.push(conn);
                busy = true;
            }
            let now_ms = conns.first().map_or(0, |c| c.now_ms());
            let mut index = 0;
            while index < conns.len() {
                let conn = &mut conns[index];
                if stop {
                    conn.close("the target is stopping");
                }
                busy |= conn.poll(now_ms);
                if conn.is_finished() {
                    conns.swap_remove(index);
                    busy = true;
                } else {
                    index += 1;
                }
            }
            if stop && conns.is_empty() && inbox.is_empty() {
                if let Some(id) = poll_id.get() {
                    ctx.unregister_poller(*id);
                }
            }
            PollStatus::from_busy(busy)
        });
        let _ = own_id.set(id);
        ctx.on_exit(move |_ctx| stopping.store(true, Ordering::Release));
    }
}
