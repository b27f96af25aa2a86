//! The connection map seen from userspace: flows written before the programs see a packet.

use anyhow::Result;
use aya::maps::{HashMap, MapData};
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
    let mut n = 0;
    for k in flows {
        m.insert(k, &v, 0)?;
        n += 1;
    }
    Ok(n)
}
