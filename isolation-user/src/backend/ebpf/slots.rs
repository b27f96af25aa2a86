//! The config word and the two isolation slots: a whole policy is compiled into the idle
//! slot, then one config write flips to it.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key};
use ipnet::IpNet;
use isolation_common::{Config, Counter, NetEntry, PolicyMeta, flags, maps};

use super::pinned::{not_found, open_map};
use crate::{policy::Policy, state::Paths};

pub fn update_config(paths: &Paths, f: impl FnOnce(&mut Config)) -> Result<Config> {
    let mut a: Array<MapData, Config> = open_map(paths, maps::CONFIG)?.try_into()?;
    let mut c = a.get(&0, 0)?;
    f(&mut c);
    a.set(0, &c, 0)?;
    Ok(c)
}

pub fn read_config(paths: &Paths) -> Result<Config> {
    let a: Array<MapData, Config> = open_map(paths, maps::CONFIG)?.try_into()?;
    Ok(a.get(&0, 0)?)
}

/// The switches of a policy (`Config::flags`): written with the slot flip, so the
/// datapath's "anything enforced?" always matches the slot it reads.
pub fn config_flags(policy: &Policy) -> u32 {
    let mut f = 0;
    if !policy.networks.is_empty() {
        f |= flags::ISOLATION;
    }
    if policy.whitelist.enabled {
        f |= flags::WHITELIST_ENABLED;
    }
    if policy.whitelist.log {
        f |= flags::LOG;
    }
    if policy.blocklist.enabled {
        f |= flags::BLOCKLIST;
    }
    if policy.blocklist.log {
        f |= flags::BL_LOG;
    }
    f
}

/// Fills the isolation maps of the slot not in use with a compiled policy and returns that
/// slot. Nothing the datapath reads changes until `flip`; the old slot is left as it was
/// (a rollback is one flip back).
pub fn prepare(paths: &Paths, compiled: &super::compile::Compiled) -> Result<u32> {
    let next = 1 - (read_config(paths)?.slot & 1);
    fill_slot(paths, next as usize, compiled)?;
    Ok(next)
}

/// Flips to a `prepare`d slot with the policy's switches: one config write, so packets see
/// the old isolation or the new one, never a mix. Returns the config it replaced, for
/// `flip_back`.
pub fn flip(paths: &Paths, policy: &Policy, slot: u32, generation: u32) -> Result<Config> {
    let mut before = Config::default();
    update_config(paths, |c| {
        before = *c;
        // The CIDR and filter bits follow the maps, not the policy text (see
        // `whitelist::with_map_flags`, `blocklist::edit`).
        c.flags = config_flags(policy) | (c.flags & flags::FOLLOW_MAPS);
        c.generation = generation;
        c.slot = slot;
    })?;
    // Rules are numbered by position: after a swap a number may name another rule, so
    // their counters start again (as iptables-restore's do).
    let mut rc: PerCpuArray<MapData, Counter> = open_map(paths, maps::RULE_COUNTERS)?.try_into()?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
    for i in 0..128u32 {
        rc.set(
            i,
            aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])?,
            0,
        )?;
    }
    Ok(before)
}

/// Puts back the config `flip` replaced (a later step of the apply failed): the old slot,
/// switches and generation in one write; the map bits stay as the maps say.
pub fn flip_back(paths: &Paths, before: &Config) -> Result<()> {
    update_config(paths, |c| {
        c.flags = (before.flags & !flags::FOLLOW_MAPS) | (c.flags & flags::FOLLOW_MAPS);
        c.generation = before.generation;
        c.slot = before.slot;
    })?;
    Ok(())
}

fn fill_slot(paths: &Paths, slot: usize, c: &super::compile::Compiled) -> Result<()> {
    let mut v4: LpmTrie<MapData, [u8; 4], NetEntry> =
        open_map(paths, maps::NET_V4[slot])?.try_into()?;
    let mut v6: LpmTrie<MapData, [u8; 16], NetEntry> =
        open_map(paths, maps::NET_V6[slot])?.try_into()?;
    // Empty the slot: it may hold the policy before last.
    let old4: Vec<_> = v4.keys().collect::<Result<_, _>>()?;
    for k in old4 {
        v4.remove(&k)?;
    }
    let old6: Vec<_> = v6.keys().collect::<Result<_, _>>()?;
    for k in old6 {
        v6.remove(&k)?;
    }
    for (net, e) in &c.prefixes {
        match net {
            IpNet::V4(n) => v4.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), e, 0)?,
            IpNet::V6(n) => v6.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), e, 0)?,
        }
    }
    let ports = MapData::from_pin(paths.map(maps::PORTS[slot]))?;
    let fd = std::os::fd::AsFd::as_fd(ports.fd());
    let idx: Vec<u32> = (0..c.ports.len() as u32).collect();
    let (done, r) = super::syscall::update(
        fd,
        bytemuck::cast_slice(&idx),
        bytemuck::cast_slice(&c.ports),
        idx.len(),
        0,
    );
    r.with_context(|| {
        format!(
            "cannot fill {} ({done} of {} written)",
            maps::PORTS[slot],
            idx.len()
        )
    })?;
    let mut meta: Array<MapData, PolicyMeta> = open_map(paths, maps::META)?.try_into()?;
    meta.set(slot as u32, &c.meta, 0)?;
    Ok(())
}

/// What the live slot's trie answers for an address (LPM, as the datapath looks it up).
pub fn live_net_entry(paths: &Paths, slot: u32, addr: IpAddr) -> Result<Option<NetEntry>> {
    let slot = (slot & 1) as usize;
    let r = match addr.to_canonical() {
        IpAddr::V4(a) => {
            let t: LpmTrie<MapData, [u8; 4], NetEntry> =
                open_map(paths, maps::NET_V4[slot])?.try_into()?;
            t.get(&Key::new(32, a.octets()), 0)
        }
        IpAddr::V6(a) => {
            let t: LpmTrie<MapData, [u8; 16], NetEntry> =
                open_map(paths, maps::NET_V6[slot])?.try_into()?;
            t.get(&Key::new(128, a.octets()), 0)
        }
    };
    match r {
        Ok(e) => Ok(Some(e)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn live_port_mask(paths: &Paths, slot: u32, index: u32) -> Result<u64> {
    let a: Array<MapData, u64> = open_map(paths, maps::PORTS[(slot & 1) as usize])?.try_into()?;
    Ok(a.get(&index, 0)?)
}

pub fn live_meta(paths: &Paths, slot: u32) -> Result<PolicyMeta> {
    let a: Array<MapData, PolicyMeta> = open_map(paths, maps::META)?.try_into()?;
    Ok(a.get(&(slot & 1), 0)?)
}
