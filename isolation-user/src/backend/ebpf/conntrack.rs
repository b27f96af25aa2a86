//! The connection map seen from userspace: flows written before the programs see a packet.

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData};
use isolation_common::{FlowKey, FlowValue, flow_origin, flow_state, maps};

use super::pins::open_map;
use crate::state::Paths;

/// Clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
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
    // Their remote ends first: the datapath skips the tables for a source whose peer slot
    // is empty. One element per write, so no write undoes one of the datapath's.
    let mut peers: Array<MapData, u64> = open_map(paths, maps::PEERS)?.try_into()?;
    for k in flows {
        let slot = isolation_common::peer_slot(k.family, &k.dst);
        if peers.get(&slot, 0)? == 0 {
            peers.set(slot, &1, 0)?;
        }
    }
    let mut n = 0;
    for k in flows {
        m.insert(k, &v, 0)?;
        n += 1;
    }
    Ok(n)
}
