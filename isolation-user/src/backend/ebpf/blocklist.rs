//! The blocklist maps: a hash of addresses and an LPM trie of CIDRs per family, each entry
//! the deadline the datapath checks on the packet (`isolation_common::block_deadline`, in
//! `CLOCK_BOOTTIME`), the latest of its own and of the CIDRs containing it
//! (`crate::blocklist::writes` says which entries a change touches and what they hold).
//! Once an address hash is big, a bit filter sits in front of it (`super::bloom`): a flood
//! from random sources the hash does not hold reads one word each, not DRAM.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;
use isolation_common::{block_deadline, flags, maps};

use super::{
    bloom::{ExactKey, Filter},
    pinned::open_map,
};
use crate::{
    blocklist::{self, Deadline, PERMANENT, View},
    state::Paths,
};

/// `CLOCK_MONOTONIC` now, in nanoseconds: the datapath's clock (`bpf_ktime_get_coarse_ns`
/// reads it as of the last tick, so an entry holds at most a tick longer).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A deadline (Unix ms) on the datapath's clock, given the two clocks read together.
fn on_datapath_clock(d: Deadline, unix_ms: u64, mono: u64) -> u64 {
    if d == PERMANENT {
        return block_deadline::PERMANENT;
    }
    // Passed already: 0 never holds.
    match d.checked_sub(unix_ms) {
        Some(ms) => mono.saturating_add(ms.saturating_mul(1_000_000)),
        None => 0,
    }
}

/// The four maps, opened.
struct Maps {
    v4: HashMap<MapData, u32, u64>,
    v6: HashMap<MapData, [u8; 16], u64>,
    v4_lpm: LpmTrie<MapData, [u8; 4], [u8; 8]>,
    v6_lpm: LpmTrie<MapData, [u8; 16], [u8; 8]>,
}

impl Maps {
    fn open(paths: &Paths) -> Result<Maps> {
        Ok(Maps {
            v4: open_map(paths, maps::BL_V4)?.try_into()?,
            v6: open_map(paths, maps::BL_V6)?.try_into()?,
            v4_lpm: open_map(paths, maps::BL_V4_LPM)?.try_into()?,
            v6_lpm: open_map(paths, maps::BL_V6_LPM)?.try_into()?,
        })
    }

    /// Writes `n`'s entry (Some) or removes it (None; absent already is no error).
    fn put(&mut self, n: &IpNet, v: Option<u64>) -> Result<()> {
        let exact = n.prefix_len() == n.max_prefix_len();
        let len = n.prefix_len() as u32;
        let r = match (n.addr(), v) {
            (IpAddr::V4(a), Some(v)) if exact => {
                self.v4.insert(&u32::from_ne_bytes(a.octets()), &v, 0)
            }
            (IpAddr::V6(a), Some(v)) if exact => self.v6.insert(&a.octets(), &v, 0),
            (IpAddr::V4(a), Some(v)) => {
                self.v4_lpm
                    .insert(&Key::new(len, a.octets()), &v.to_ne_bytes(), 0)
            }
            (IpAddr::V6(a), Some(v)) => {
                self.v6_lpm
                    .insert(&Key::new(len, a.octets()), &v.to_ne_bytes(), 0)
            }
            (IpAddr::V4(a), None) if exact => {
                self.v4.remove(&u32::from_ne_bytes(a.octets())).or(Ok(()))
            }
            (IpAddr::V6(a), None) if exact => self.v6.remove(&a.octets()).or(Ok(())),
            (IpAddr::V4(a), None) => self.v4_lpm.remove(&Key::new(len, a.octets())).or(Ok(())),
            (IpAddr::V6(a), None) => self.v6_lpm.remove(&Key::new(len, a.octets())).or(Ok(())),
        };
        r.with_context(|| format!("the kernel refused the blocklist entry {n}"))
    }

    /// The map switches (`flags::BL_*`) for what the maps hold now.
    fn flags(&self) -> u32 {
        let mut f = 0;
        if self.v4.keys().next().is_some() {
            f |= flags::BL_V4;
        }
        if self.v6.keys().next().is_some() {
            f |= flags::BL_V6;
        }
        if self.v4_lpm.keys().next().is_some() {
            f |= flags::BL_CIDR_V4;
        }
        if self.v6_lpm.keys().next().is_some() {
            f |= flags::BL_CIDR_V6;
        }
        f
    }
}

/// The filters in front of the two address hashes.
struct Filters {
    v4: Filter,
    v6: Filter,
}

/// (filter map, its switch, its live-half bit), IPv4 then IPv6.
const FILTERS: [(&str, u32, u32); 2] = [
    (maps::BL_V4_BLOOM, flags::BL_BLOOM_V4, flags::BL_BLOOM_HI_V4),
    (maps::BL_V6_BLOOM, flags::BL_BLOOM_V6, flags::BL_BLOOM_HI_V6),
];

impl Filters {
    fn open(paths: &Paths) -> Result<Filters> {
        let cfg = super::slots::read_config(paths)?.flags;
        let [(n4, on4, hi4), (n6, on6, hi6)] = FILTERS;
        Ok(Filters {
            v4: Filter::open(paths, n4, cfg, on4, hi4)?,
            v6: Filter::open(paths, n6, cfg, on6, hi6)?,
        })
    }

    /// Before `n` is written: an address going in gets its bits first (counted as a new
    /// key unless `old` already held it); one going out is counted as a stale key.
    fn note(&mut self, n: &IpNet, going_in: bool, held: bool) {
        if n.prefix_len() != n.max_prefix_len() {
            return;
        }
        match (n.addr(), going_in, held) {
            (IpAddr::V4(a), true, false) => self.v4.set(std::iter::once(v4_key(a))),
            (IpAddr::V4(a), true, true) => self.v4.reassert(std::iter::once(v4_key(a))),
            (IpAddr::V6(a), true, false) => self.v6.set(std::iter::once(a.octets())),
            (IpAddr::V6(a), true, true) => self.v6.reassert(std::iter::once(a.octets())),
            (IpAddr::V4(_), false, _) => self.v4.deleted(1),
            (IpAddr::V6(_), false, _) => self.v6.deleted(1),
        }
    }

    /// The filter switches for hashes holding `n4` and `n6` addresses (`Filter::switch`).
    fn flags(&mut self, paths: &Paths, n4: usize, n6: usize) -> Result<u32> {
        Ok(self
            .v4
            .switch(n4, || hash_keys::<u32>(paths, maps::BL_V4))?
            | self
                .v6
                .switch(n6, || hash_keys::<[u8; 16]>(paths, maps::BL_V6))?)
    }
}

fn v4_key(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Every key of an address hash.
fn hash_keys<K: bytemuck::Pod + ExactKey>(paths: &Paths, name: &str) -> Result<Vec<K>> {
    let data = MapData::from_pin(paths.map(name)).with_context(|| format!("cannot open {name}"))?;
    super::syscall::keys::<K>(std::os::fd::AsFd::as_fd(data.fd()), 8)
        .with_context(|| format!("cannot read the keys of {name}"))
}

/// Addresses (not CIDRs) per family in `view`: what the hashes hold once it is written.
fn exact_counts(view: &View) -> (usize, usize) {
    view.keys()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .fold((0, 0), |(a, b), n| match n {
            IpNet::V4(_) => (a + 1, b),
            IpNet::V6(_) => (a, b + 1),
        })
}

/// The switch of the map an entry goes to.
fn flag_of(n: &IpNet) -> u32 {
    match (
        matches!(n, IpNet::V6(_)),
        n.prefix_len() == n.max_prefix_len(),
    ) {
        (false, true) => flags::BL_V4,
        (true, true) => flags::BL_V6,
        (false, false) => flags::BL_CIDR_V4,
        (true, false) => flags::BL_CIDR_V6,
    }
}

/// Makes the maps hold `view` where `changed` says it differs from `old`, what they hold
/// now. A map's switch is set before its first entry goes in and cleared once it is empty;
/// a refused write puts back what `old` says for the entries this call touched (one write
/// an entry: nothing is read back first).
pub fn edit(paths: &Paths, old: &View, view: &View, changed: &[IpNet]) -> Result<()> {
    let writes = blocklist::writes(view, changed);
    if writes.is_empty() {
        return Ok(());
    }
    let mut m = Maps::open(paths)?;
    let mut filters = Filters::open(paths)?;
    let (unix, mono) = (blocklist::now_ms(), mono_ns());
    let gaining = writes
        .iter()
        .filter(|(_, h)| h.is_some())
        .fold(0, |f, (n, _)| f | flag_of(n));
    if gaining != 0 {
        super::slots::update_config(paths, |c| c.flags |= gaining)?;
    }
    let mut result = Ok(());
    for (i, (n, h)) in writes.iter().enumerate() {
        let v = h.map(|d| on_datapath_clock(d, unix, mono));
        filters.note(n, v.is_some(), old.contains_key(n));
        if let Err(e) = m.put(n, v) {
            // What `old` holds for the entries written so far, written back.
            let touched: Vec<IpNet> = writes[..i].iter().map(|(n, _)| *n).collect();
            for (n, h) in blocklist::writes(old, &touched) {
                filters.note(&n, h.is_some(), true);
                let _ = m.put(&n, h.map(|d| on_datapath_clock(d, unix, mono)));
            }
            result = Err(e);
            break;
        }
    }
    let held = if result.is_ok() { view } else { old };
    let (n4, n6) = exact_counts(held);
    let now = m.flags() | filters.flags(paths, n4, n6)?;
    super::slots::update_config(paths, |c| {
        c.flags = (c.flags & !flags::BL_FOLLOW_MAPS) | now
    })?;
    result
}

/// Before the programs are replaced (an upgrade): as `whitelist::forget_filters`, for the
/// blocklist's filters.
pub fn forget_filters(paths: &Paths) -> Result<()> {
    super::slots::update_config(paths, |c| {
        c.flags &= !(flags::BL_BLOOM_V4 | flags::BL_BLOOM_V6)
    })?;
    for (name, on, hi) in FILTERS {
        if paths.map(name).exists() {
            Filter::open(paths, name, 0, on, hi)?.forget();
        }
    }
    Ok(())
}

/// After the programs were replaced: builds the filters of big hashes and switches them on.
pub fn refresh(paths: &Paths) -> Result<()> {
    let count = |name: &str| -> Result<usize> {
        let data = MapData::from_pin(paths.map(name))?;
        let fd = std::os::fd::AsFd::as_fd(data.fd());
        let n = super::syscall::count_keys(fd, if name == maps::BL_V4 { 4 } else { 16 })?;
        Ok(n as usize)
    };
    let (n4, n6) = (count(maps::BL_V4)?, count(maps::BL_V6)?);
    let f = Filters::open(paths)?.flags(paths, n4, n6)?;
    let mask = FILTERS.iter().fold(0, |m, (_, on, hi)| m | on | hi);
    super::slots::update_config(paths, |c| c.flags = (c.flags & !mask) | f)?;
    Ok(())
}

/// How many entries each map holds: IPv4 addresses, IPv4 CIDRs, IPv6 addresses, IPv6
/// CIDRs (for `status`).
pub const MAPS: [&str; 4] = [maps::BL_V4, maps::BL_V4_LPM, maps::BL_V6, maps::BL_V6_LPM];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_move_to_the_datapath_clock() {
        assert_eq!(
            on_datapath_clock(PERMANENT, 5, 7),
            block_deadline::PERMANENT
        );
        assert_eq!(on_datapath_clock(1_500, 1_000, 10), 10 + 500_000_000);
        assert_eq!(on_datapath_clock(999, 1_000, 10), 0);
        assert!(!block_deadline::holds(0, 0));
    }
}
