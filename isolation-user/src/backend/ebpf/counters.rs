//! Counters and fill levels read from the pinned maps.

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use isolation_common::{Counter, LogStat, Reason, maps};

use super::pinned::open_map;
use crate::state::Paths;

/// Sums of the per-CPU counters, by reason.
pub fn counters(paths: &Paths) -> Result<Vec<(Reason, Counter)>> {
    let a: PerCpuArray<MapData, Counter> = open_map(paths, maps::COUNTERS)?.try_into()?;
    let mut out = Vec::new();
    for r in Reason::ALL {
        let mut c = Counter::default();
        // A datapath of an earlier build (its programs replaced in place) keeps its
        // shorter counter array: the reasons it lacks count 0 until `unload` and `load`.
        let Ok(per_cpu) = a.get(&(r as u32), 0) else {
            out.push((r, c));
            continue;
        };
        for v in per_cpu.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push((r, c));
    }
    Ok(out)
}

/// Per-rule counters: allow rules at 0..64, except rules at 64..128.
pub fn rule_counters(paths: &Paths) -> Result<Vec<Counter>> {
    let a: PerCpuArray<MapData, Counter> = open_map(paths, maps::RULE_COUNTERS)?.try_into()?;
    let mut out = Vec::with_capacity(128);
    for i in 0..128u32 {
        let mut c = Counter::default();
        for v in a.get(&i, 0)?.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push(c);
    }
    Ok(out)
}

/// Deletes every entry of a hash-type map (connection tables).
pub fn clear_map(paths: &Paths, name: &str) -> Result<()> {
    let data = MapData::from_pin(paths.map(name))?;
    let key_size = data.info()?.key_size() as usize;
    let fd = std::os::fd::AsFd::as_fd(data.fd());
    loop {
        let keys = super::syscall::raw_keys(fd, key_size)?;
        if keys.is_empty() {
            return Ok(());
        }
        for k in keys.chunks(key_size) {
            super::syscall::delete_raw(fd, k)?;
        }
    }
}

/// Written / suppressed / lost log events.
pub fn log_stats(paths: &Paths) -> Result<[u64; LogStat::COUNT as usize]> {
    let a: PerCpuArray<MapData, u64> = open_map(paths, maps::LOG_STATS)?.try_into()?;
    let mut out = [0u64; LogStat::COUNT as usize];
    for (i, o) in out.iter_mut().enumerate() {
        *o = a.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

/// Entries per map, and its capacity.
pub fn fill_levels(paths: &Paths) -> Result<Vec<(&'static str, u64, u32)>> {
    [
        maps::WL_V4,
        maps::WL_V4_LPM,
        maps::WL_V6,
        maps::WL_V6_LPM,
        maps::BL_V4,
        maps::BL_V4_LPM,
        maps::BL_V6,
        maps::BL_V6_LPM,
        maps::CONNTRACK,
        maps::ESTABLISHED,
        maps::FRAGS,
    ]
    .into_iter()
    .map(|name| fill(paths, name).map(|(n, max)| (name, n, max)))
    .collect()
}

fn fill(paths: &Paths, name: &str) -> Result<(u64, u32)> {
    let data = super::pinned::held_map(MapData::from_pin(paths.map(name))?)
        .with_context(|| format!("cannot read {name}"))?;
    let info = data.info()?;
    let fd = std::os::fd::AsFd::as_fd(data.fd());
    let n = super::syscall::count_keys(fd, info.key_size() as usize)
        .with_context(|| format!("cannot count the entries of {name}"))?;
    Ok((n, info.max_entries()))
}

/// The two connection tables' fill.
pub fn connections(paths: &Paths) -> Result<crate::backend::Connections> {
    let (new, new_max) = fill(paths, maps::CONNTRACK)?;
    let (established, established_max) = fill(paths, maps::ESTABLISHED)?;
    Ok(crate::backend::Connections {
        new,
        new_max: new_max as u64,
        established,
        established_max: established_max as u64,
        filter_set: super::conntrack::peers_counted(paths)? as u64,
        filter_slots: isolation_common::limits::PEER_SLOTS as u64,
    })
}

/// Written / suppressed / lost log events, as the backend-neutral type.
pub fn log_counts(paths: &Paths) -> Result<crate::backend::LogCounts> {
    let raw = log_stats(paths)?;
    Ok(crate::backend::LogCounts {
        written: raw[LogStat::Written as usize],
        suppressed: raw[LogStat::Suppressed as usize],
        lost: raw[LogStat::Lost as usize],
    })
}
