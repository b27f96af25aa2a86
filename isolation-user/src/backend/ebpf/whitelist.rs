//! The whitelist maps: exact hashes and CIDR tries, edited in batches.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;
use isolation_common::{WlEntry, flags, maps};

use super::pins::{error_chain, not_found, open_map};
use crate::{backend::WhitelistDelta, state::Paths};

/// The four whitelist maps, opened.
pub struct WhitelistMaps {
    v4: HashMap<MapData, u32, WlEntry>,
    v4_lpm: LpmTrie<MapData, [u8; 4], WlEntry>,
    v6: HashMap<MapData, [u8; 16], WlEntry>,
    v6_lpm: LpmTrie<MapData, [u8; 16], WlEntry>,
    /// Second handles on the exact maps, for the batch syscalls.
    v4_raw: MapData,
    v6_raw: MapData,
}

/// Entries per batch syscall: big enough to amortise the syscall, small enough to keep
/// the progress bar moving.
const BATCH: usize = 16 * 1024;

/// Up to this many entries an edit probes key by key instead of reading the whole map.
const SMALL_EDIT: usize = 4096;

fn wl_value(n: &IpNet) -> WlEntry {
    WlEntry {
        prefix_len: n.prefix_len() as u32,
    }
}

impl WhitelistMaps {
    pub fn open(paths: &Paths) -> Result<Self> {
        Ok(WhitelistMaps {
            v4: open_map(paths, maps::WL_V4)?.try_into()?,
            v4_lpm: open_map(paths, maps::WL_V4_LPM)?.try_into()?,
            v6: open_map(paths, maps::WL_V6)?.try_into()?,
            v6_lpm: open_map(paths, maps::WL_V6_LPM)?.try_into()?,
            v4_raw: MapData::from_pin(paths.map(maps::WL_V4))?,
            v6_raw: MapData::from_pin(paths.map(maps::WL_V6))?,
        })
    }

    /// Everything in the maps, as CIDRs (host routes for exact entries).
    pub fn entries(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for k in self.v4.keys() {
            out.push(IpNet::from(IpAddr::V4(Ipv4Addr::from(k?.to_ne_bytes()))));
        }
        for k in self.v6.keys() {
            out.push(IpNet::from(IpAddr::V6(Ipv6Addr::from(k?))));
        }
        for k in self.v4_lpm.keys() {
            let k = k?;
            out.push(IpNet::new(
                IpAddr::V4(Ipv4Addr::from(k.data())),
                k.prefix_len() as u8,
            )?);
        }
        for k in self.v6_lpm.keys() {
            let k = k?;
            out.push(IpNet::new(
                IpAddr::V6(Ipv6Addr::from(k.data())),
                k.prefix_len() as u8,
            )?);
        }
        Ok(out)
    }

    /// The entries that admit `addr`: its exact entry and every CIDR containing it.
    pub fn admitting(&self, addr: IpAddr) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        let found = |r: Result<WlEntry, aya::maps::MapError>| match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        };
        let addr = addr.to_canonical();
        let exact = match addr {
            IpAddr::V4(a) => found(self.v4.get(&u32::from_ne_bytes(a.octets()), 0))?,
            IpAddr::V6(a) => found(self.v6.get(&a.octets(), 0))?,
        };
        if exact.is_some() {
            out.push(IpNet::from(addr));
        }
        // An LPM lookup at prefix length p finds the longest entry of length <= p; the
        // value says which it was, so walking p down visits every containing CIDR.
        let mut p = if addr.is_ipv4() { 32u32 } else { 128 };
        loop {
            let v = match addr {
                IpAddr::V4(a) => found(self.v4_lpm.get(&Key::new(p, a.octets()), 0))?,
                IpAddr::V6(a) => found(self.v6_lpm.get(&Key::new(p, a.octets()), 0))?,
            };
            let Some(v) = v else { break };
            out.push(IpNet::new(addr, v.prefix_len as u8)?.trunc());
            if v.prefix_len == 0 {
                break;
            }
            p = v.prefix_len - 1;
        }
        Ok(out)
    }

    /// Adds one CIDR; returns whether it was new.
    fn insert_lpm(&mut self, n: &IpNet) -> Result<bool, aya::maps::MapError> {
        let v = wl_value(n);
        let flags = super::syscall::BPF_NOEXIST;
        let r = match n {
            IpNet::V4(n) => self.v4_lpm.insert(
                &Key::new(n.prefix_len() as u32, n.addr().octets()),
                &v,
                flags,
            ),
            IpNet::V6(n) => self.v6_lpm.insert(
                &Key::new(n.prefix_len() as u32, n.addr().octets()),
                &v,
                flags,
            ),
        };
        match r {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds entries, exact addresses in batches. All or nothing: if a map fills up, the
    /// entries this call added are taken out again. Returns those that were new.
    pub fn insert_many(
        &mut self,
        nets: &[IpNet],
        mut progress: impl FnMut(u64),
    ) -> Result<Vec<IpNet>> {
        let mut v4: Vec<(u32, WlEntry)> = Vec::new();
        let mut v6: Vec<([u8; 16], WlEntry)> = Vec::new();
        let mut lpm = Vec::new();
        for n in nets {
            match n {
                IpNet::V4(a) if a.prefix_len() == 32 => {
                    v4.push((u32::from_ne_bytes(a.addr().octets()), wl_value(n)))
                }
                IpNet::V6(a) if a.prefix_len() == 128 => v6.push((a.addr().octets(), wl_value(n))),
                _ => lpm.push(*n),
            }
        }
        let mut added: Vec<IpNet> = Vec::new();
        let mut result = batch_insert(&self.v4_raw, &v4, &mut progress, &mut added, |k| {
            IpNet::from(IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())))
        })
        .map_err(|e| full(e, "IPv4 addresses"));
        if result.is_ok() {
            result = batch_insert(&self.v6_raw, &v6, &mut progress, &mut added, |k| {
                IpNet::from(IpAddr::V6(Ipv6Addr::from(*k)))
            })
            .map_err(|e| full(e, "IPv6 addresses"));
        }
        if result.is_ok() {
            for n in &lpm {
                match self.insert_lpm(n) {
                    Ok(true) => added.push(*n),
                    Ok(false) => {}
                    Err(e) => {
                        result = Err(anyhow!(
                            "cannot add {n} to the whitelist CIDR map (full?): {}",
                            error_chain(&e)
                        ));
                        break;
                    }
                }
                progress(1);
            }
        }
        match result {
            Ok(()) => Ok(added),
            Err(e) => {
                let _ = self.remove_many(&added, |_| {});
                Err(e.context("nothing was added"))
            }
        }
    }

    /// Removes one entry; returns whether it was there.
    pub fn remove(&mut self, n: &IpNet) -> Result<bool> {
        let r = match n {
            IpNet::V4(n) if n.prefix_len() == 32 => {
                self.v4.remove(&u32::from_ne_bytes(n.addr().octets()))
            }
            IpNet::V4(n) => self
                .v4_lpm
                .remove(&Key::new(n.prefix_len() as u32, n.addr().octets())),
            IpNet::V6(n) if n.prefix_len() == 128 => self.v6.remove(&n.addr().octets()),
            IpNet::V6(n) => self
                .v6_lpm
                .remove(&Key::new(n.prefix_len() as u32, n.addr().octets())),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot remove {n} from the whitelist maps")),
        }
    }

    /// Removes entries, exact addresses in batches; returns those that were there.
    pub fn remove_many(
        &mut self,
        nets: &[IpNet],
        mut progress: impl FnMut(u64),
    ) -> Result<Vec<IpNet>> {
        let mut v4: Vec<u32> = Vec::new();
        let mut v6: Vec<[u8; 16]> = Vec::new();
        let mut removed = Vec::new();
        for n in nets {
            match n {
                IpNet::V4(a) if a.prefix_len() == 32 => {
                    v4.push(u32::from_ne_bytes(a.addr().octets()))
                }
                IpNet::V6(a) if a.prefix_len() == 128 => v6.push(a.addr().octets()),
                _ => {
                    if self.remove(n)? {
                        removed.push(*n);
                    }
                    progress(1);
                }
            }
        }
        let gone4 = batch_delete(&self.v4_raw, &v4, &mut progress)
            .context("cannot remove IPv4 addresses")?;
        removed.extend(
            gone4
                .iter()
                .map(|k| IpNet::from(IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())))),
        );
        let gone6 = batch_delete(&self.v6_raw, &v6, &mut progress)
            .context("cannot remove IPv6 addresses")?;
        removed.extend(
            gone6
                .iter()
                .map(|k| IpNet::from(IpAddr::V6(Ipv6Addr::from(*k)))),
        );
        Ok(removed)
    }

    /// Adds one entry; returns whether it was new.
    pub fn insert(&mut self, n: &IpNet) -> Result<bool> {
        Ok(self.insert_many(std::slice::from_ref(n), |_| {})?.len() == 1)
    }
}

fn full(e: std::io::Error, what: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::E2BIG) | Some(libc::ENOMEM) | Some(libc::ENOSPC) => anyhow!(
            "the whitelist map for {what} is full (it holds {})",
            isolation_common::limits::WL_EXACT
        ),
        _ => anyhow!("cannot add {what} to the whitelist: {e}"),
    }
}

/// Inserts the exact keys not already in the map, in batches, pushing them onto `added` (so
/// the caller can undo them). The existing keys are read first: that tells new from old
/// (batch updates cannot be told to skip existing keys) and lets a full map be refused
/// before anything changes.
fn batch_insert<K: bytemuck::Pod + Eq + std::hash::Hash>(
    map: &MapData,
    entries: &[(K, WlEntry)],
    progress: &mut impl FnMut(u64),
    added: &mut Vec<IpNet>,
    to_net: impl Fn(&K) -> IpNet,
) -> std::io::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let fd = std::os::fd::AsFd::as_fd(map.fd());
    if entries.len() <= SMALL_EDIT {
        // A live edit of a few entries: one NOEXIST update each, no dump of the map, so
        // its cost does not grow with the whitelist.
        for (k, v) in entries {
            let (done, r) = super::syscall::update_one(fd, k, v, super::syscall::BPF_NOEXIST);
            match r {
                Ok(()) if done == 1 => added.push(to_net(k)),
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            progress(1);
        }
        return Ok(());
    }
    let existing: HashSet<K> = super::syscall::keys::<K>(fd, std::mem::size_of::<WlEntry>())?
        .into_iter()
        .collect();
    let fresh: Vec<(K, WlEntry)> = entries
        .iter()
        .filter(|e| !existing.contains(&e.0))
        .copied()
        .collect();
    progress((entries.len() - fresh.len()) as u64);
    let max = map
        .info()
        .map(|i| i.max_entries() as usize)
        .unwrap_or(usize::MAX);
    if existing.len() + fresh.len() > max {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<WlEntry>());
    for chunk in fresh.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
        let vals: Vec<WlEntry> = chunk.iter().map(|e| e.1).collect();
        let (kb, vb) = (
            bytemuck::cast_slice::<K, u8>(&keys),
            bytemuck::cast_slice::<WlEntry, u8>(&vals),
        );
        let (done, r) = super::syscall::update(fd, kb, vb, keys.len(), 0);
        added.extend(keys[..done].iter().map(&to_net));
        r?;
        debug_assert_eq!(kb.len(), done * ks);
        debug_assert_eq!(vb.len(), done * vs);
        progress(chunk.len() as u64);
    }
    Ok(())
}

/// Deletes exact keys in batches, skipping absent ones; returns those that were there.
fn batch_delete<K: bytemuck::Pod>(
    map: &MapData,
    keys: &[K],
    progress: &mut impl FnMut(u64),
) -> std::io::Result<Vec<K>> {
    let fd = std::os::fd::AsFd::as_fd(map.fd());
    let ks = std::mem::size_of::<K>();
    let mut removed = Vec::new();
    for chunk in keys.chunks(BATCH) {
        let kb = bytemuck::cast_slice::<K, u8>(chunk);
        let mut at = 0;
        while at < chunk.len() {
            // The kernel deletes in order and stops at the first absent key.
            let (done, r) = super::syscall::delete(fd, &kb[at * ks..], chunk.len() - at);
            removed.extend_from_slice(&chunk[at..at + done]);
            at += done;
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += 1,
                Err(e) => return Err(e),
            }
        }
        progress(chunk.len() as u64);
    }
    Ok(removed)
}

impl WhitelistMaps {
    /// Removes `del`, then adds `add` (removing first never overflows a map that will hold
    /// no more than before). All or nothing: if the kernel refuses an entry, what was added
    /// goes and what was removed comes back. Returns what really changed.
    pub fn change(
        &mut self,
        del: &[IpNet],
        add: &[IpNet],
        mut progress: impl FnMut(u64),
    ) -> Result<WhitelistDelta> {
        let removed = self.remove_many(del, &mut progress)?;
        match self.insert_many(add, &mut progress) {
            Ok(added) => Ok(WhitelistDelta { added, removed }),
            Err(e) => {
                self.insert_many(&removed, |_| {})
                    .context("and the entries it had removed could not all be put back")?;
                Err(e)
            }
        }
    }
}

/// Runs a whitelist change with the datapath's CIDR switches kept safe: the bits of the
/// families gaining CIDRs are set before anything is added, and afterwards each bit is made
/// to say whether its trie holds anything (a trie that cannot be read counts as non-empty).
/// So the datapath may look into an empty trie for a moment, never skip a full one.
pub fn with_cidr_flags<T>(
    paths: &Paths,
    adding: &[IpNet],
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    // The families gaining CIDRs, by the one classifier the store and the limits use.
    let gaining = crate::policy::WhitelistSizes::of(adding);
    let early = (if gaining.lpm_v4 > 0 {
        flags::WL_CIDR_V4
    } else {
        0
    }) | (if gaining.lpm_v6 > 0 {
        flags::WL_CIDR_V6
    } else {
        0
    });
    if early != 0 {
        super::slots::update_config(paths, |c| c.flags |= early)?;
    }
    let r = f();
    let m = WhitelistMaps::open(paths)?;
    let mut now = 0;
    if m.v4_lpm.keys().next().is_some() {
        now |= flags::WL_CIDR_V4;
    }
    if m.v6_lpm.keys().next().is_some() {
        now |= flags::WL_CIDR_V6;
    }
    super::slots::update_config(paths, |c| c.flags = (c.flags & !flags::WL_CIDRS) | now)?;
    r
}

/// Puts back what a `change` did (a later step of its transaction failed).
pub fn revert(paths: &Paths, done: &WhitelistDelta) -> Result<()> {
    let mut m = WhitelistMaps::open(paths)?;
    m.change(&done.added, &done.removed, |_| {})?;
    Ok(())
}

/// Makes the maps hold exactly `wanted`. Entries in both the old and the new whitelist
/// are not touched; the others go first and the new ones come after, so the maps never hold
/// more than the larger of the two whitelists (adding first could overflow them half-way),
/// and no moment admits an address that neither whitelist admits. All or nothing.
pub fn sync(paths: &Paths, wanted: &[IpNet], progress: impl FnMut(u64)) -> Result<WhitelistDelta> {
    let mut m = WhitelistMaps::open(paths)?;
    let current: HashSet<IpNet> = m.entries()?.into_iter().collect();
    let want: HashSet<IpNet> = wanted.iter().copied().collect();
    let gone: Vec<IpNet> = current.difference(&want).copied().collect();
    let add: Vec<IpNet> = wanted
        .iter()
        .filter(|n| !current.contains(n))
        .copied()
        .collect();
    m.change(&gone, &add, progress)
}
