//! The connection map seen from userspace: flows written before the programs see a packet.

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use isolation_common::{FlowKey, FlowValue, flow_origin, flow_state, limits, maps};

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
/// of the PEERS array, as the datapath sets them: neither can undo the other's slot. (aya
/// has no call for a map's memory mapping: mmap(2) on the map's fd.)
fn mark_peers(paths: &Paths, flows: &[FlowKey]) -> Result<()> {
    use std::sync::atomic::{AtomicU8, Ordering};
    if flows.is_empty() {
        return Ok(());
    }
    let map = MapData::from_pin(paths.map(maps::PEERS))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(map.fd()));
    let len = limits::PEER_WORDS as usize * 8;
    // SAFETY: a shared read-write mapping of an mmapable array of `len` bytes (its
    // elements back to back: 8-byte values have no padding), unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(anyhow::anyhow!(
            "cannot map the PEERS array: {}",
            std::io::Error::last_os_error()
        ));
    }
    let slots = p as *const AtomicU8;
    for k in flows {
        let slot = isolation_common::peer_slot(k.family, &k.dst) as usize;
        // SAFETY: slot < PEER_SLOTS = the mapping's length in bytes.
        unsafe { (*slots.add(slot)).store(1, Ordering::Relaxed) };
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    Ok(())
}
