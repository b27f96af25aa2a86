//! The connection map seen from userspace: flows written before the programs see a packet.

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use isolation_common::{FlowKey, FlowValue, flow_origin, flow_state, maps};

use super::pins::{SharedArray, open_map};
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

/// Sets the peer slots of the flows' remote ends, one byte store each on a shared mapping
/// of the PEERS array, as the datapath sets them: neither can undo the other's slot.
fn mark_peers(paths: &Paths, flows: &[FlowKey]) -> Result<()> {
    use std::sync::atomic::{AtomicU8, Ordering};
    if flows.is_empty() {
        return Ok(());
    }
    let peers = SharedArray::open(paths, maps::PEERS)?;
    let slots = peers.as_mut_ptr() as *const AtomicU8;
    for k in flows {
        let slot = isolation_common::peer_slot(k.family, &k.dst) as usize;
        debug_assert!(slot < peers.len());
        // SAFETY: slot < PEER_SLOTS = PEER_WORDS * 8, the array's length in bytes.
        unsafe { (*slots.add(slot)).store(1, Ordering::Relaxed) };
    }
    Ok(())
}
