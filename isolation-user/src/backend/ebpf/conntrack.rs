//! The connection map seen from userspace: flows written before the programs see a packet.

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use isolation_common::{FlowKey, FlowValue, flow_origin, flow_state, maps, peer_gen};

use super::pinned::{SharedArray, open_map};
use crate::state::Paths;

/// Clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; clock_gettime writes one we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Connections the kernel had open before load go straight to the established table: an
/// administrator's SSH session must not be evicted by a flood of new flows.
pub fn seed_flows(paths: &Paths, flows: &[FlowKey]) -> Result<usize> {
    let mut m: HashMap<MapData, FlowKey, FlowValue> =
        open_map(paths, maps::ESTABLISHED)?.try_into()?;
    let v = FlowValue {
        last_seen_ns: monotonic_ns(),
        origin: flow_origin::SEEDED,
        state: flow_state::REPLIED,
    };
    // Their remote ends first: the datapath skips the tables for a source whose peer bit
    // is clear.
    mark_peers(paths, flows)?;
    let mut n = 0;
    for k in flows {
        m.insert(k, &v, 0)?;
        n += 1;
    }
    Ok(n)
}

/// Sets the peer slots of the flows' remote ends to the generation the datapath marks
/// with, one byte store each on a shared mapping of the PEERS array, as the datapath sets
/// them: neither can undo the other's slot.
fn mark_peers(paths: &Paths, flows: &[FlowKey]) -> Result<()> {
    if flows.is_empty() {
        return Ok(());
    }
    let g = peer_gen::mark(super::slots::read_config(paths)?.peers);
    let peers = Peers::open(paths)?;
    for k in flows {
        peers.set(isolation_common::peer_slot(k.family, &k.dst), g);
    }
    Ok(())
}

/// The PEERS array, mapped shared: one byte per slot.
struct Peers(SharedArray);

impl Peers {
    fn open(paths: &Paths) -> Result<Peers> {
        Ok(Peers(SharedArray::open(paths, maps::PEERS)?))
    }

    fn slots(&self) -> &[AtomicU8] {
        // SAFETY: the mapping is `len()` bytes, alive as long as `self`; the datapath
        // writes its bytes concurrently, so they are read and written as atomics.
        unsafe { std::slice::from_raw_parts(self.0.as_mut_ptr() as *const AtomicU8, self.0.len()) }
    }

    fn set(&self, slot: u32, g: u8) {
        if let Some(b) = self.slots().get(slot as usize) {
            b.store(g, Ordering::Relaxed);
        }
    }

    /// How many slots count under the `Config::peers` word `word`.
    fn counted(&self, word: u32) -> usize {
        self.slots()
            .iter()
            .filter(|b| peer_gen::accepts(word, b.load(Ordering::Relaxed)))
            .count()
    }
}

/// What a rebuild of the remote-host filter did: slots that counted before and after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeersRebuilt {
    pub before: usize,
    pub after: usize,
}

/// How many slots of the remote-host filter count now.
pub fn peers_counted(paths: &Paths) -> Result<usize> {
    let word = super::slots::read_config(paths)?.peers;
    Ok(Peers::open(paths)?.counted(word))
}

/// Rebuilds the remote-host filter from the flows the connection tables remember: the
/// datapath moves to the next generation (marking with it, still accepting the current
/// one), the slots of the remembered flows' remote ends are marked with it (twice over, so
/// a flow recorded by a program that read the old word still gets its slot), then only
/// the new generation counts. Slots of remote hosts no flow remembers stop counting;
/// nothing marked meanwhile is lost.
pub fn rebuild_peers(paths: &Paths) -> Result<PeersRebuilt> {
    use super::slots::update_config;
    let peers = Peers::open(paths)?;
    let word = super::slots::read_config(paths)?.peers;
    let before = peers.counted(word);
    let (cur, next) = (peer_gen::mark(word), peer_gen::next(word));
    update_config(paths, |c| c.peers = peer_gen::word(next, cur))?;
    let mark_all = || -> Result<()> {
        for name in TABLES {
            let m = MapData::from_pin(paths.map(name))
                .with_context(|| format!("cannot open the pinned map {name}"))?;
            let keys = super::syscall::keys::<FlowKey>(m.fd().as_fd(), size_of::<FlowValue>())
                .with_context(|| format!("cannot read {name}"))?;
            for k in keys {
                peers.set(isolation_common::peer_slot(k.family, &k.dst), next);
            }
        }
        Ok(())
    };
    // On failure the word still accepts both generations: no slot stopped counting.
    mark_all().and_then(|()| mark_all())?;
    let done = update_config(paths, |c| c.peers = peer_gen::word(next, next))?;
    Ok(PeersRebuilt {
        before,
        after: peers.counted(done.peers),
    })
}

/// The two connection tables, each of `[connections] max` entries.
pub const TABLES: [&str; 2] = [maps::CONNTRACK, maps::ESTABLISHED];

/// How many entries each pinned connection table holds at most.
pub fn table_size(paths: &Paths) -> Result<u32> {
    let m = MapData::from_pin(paths.map(maps::CONNTRACK))
        .with_context(|| format!("cannot open the pinned map {}", maps::CONNTRACK))?;
    Ok(m.info()?.max_entries())
}

/// Copies the entries of connection table `from` into `to` (a table of another size that
/// takes its place), oldest first: when `to` is smaller, what its LRU pushes out is the
/// flows idle longest. With `missing_only`, entries `to` has already (the datapath wrote
/// them since the last copy) are left as they are. Returns how many were written.
pub fn copy_table(from: BorrowedFd<'_>, to: BorrowedFd<'_>, missing_only: bool) -> Result<usize> {
    use super::syscall;
    let (keys, vals) = syscall::entries::<FlowKey, FlowValue>(from)
        .context("cannot read the connection table being replaced")?;
    let mut order: Vec<usize> = (0..keys.len()).collect();
    if missing_only {
        let (have, _) = syscall::entries::<FlowKey, FlowValue>(to)
            .context("cannot read the new connection table")?;
        let have: std::collections::HashSet<FlowKey> = have.into_iter().collect();
        order.retain(|&i| !have.contains(&keys[i]));
    }
    order.sort_unstable_by_key(|&i| vals[i].last_seen_ns);
    let k: Vec<FlowKey> = order.iter().map(|&i| keys[i]).collect();
    let v: Vec<FlowValue> = order.iter().map(|&i| vals[i]).collect();
    // In chunks: an update batch holds its keys and values in kernel memory at once.
    let mut n = 0;
    for (kc, vc) in k.chunks(16 * 1024).zip(v.chunks(16 * 1024)) {
        let (done, r) = syscall::update(
            to,
            bytemuck::cast_slice(kc),
            bytemuck::cast_slice(vc),
            kc.len(),
            0,
        );
        n += done;
        r.context("cannot copy the remembered connections into the new table")?;
    }
    Ok(n)
}
