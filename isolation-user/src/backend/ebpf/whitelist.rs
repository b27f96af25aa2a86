//! The whitelist maps: exact hashes and CIDR tries, edited in batches.
//!
//! Each exact hash is the one element of a pinned array of maps. It is sized to what it holds
//! (`capacity`): when an edit would overflow it, or a whole-policy sync leaves it mostly
//! empty, a new hash of the right size is filled beside it and swapped in with one write, so
//! the datapath sees the old contents or the new, never a half-filled map.
//!
//! Its size: the exact hashes, the LPM tries and the bit filter in front of them are one
//! structure kept consistent by one sync (`narrow`/`widen`); split, each half would have to
//! know the other's invariants.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{ArrayOfMaps, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::IpNet;
use isolation_common::{WlEntry, flags, limits, maps};

use super::{
    bloom::{ExactKey, Filter},
    pinned::{not_found, open_map},
    pins::error_chain,
};
use crate::{backend::WhitelistDelta, state::Paths};

/// The four whitelist maps, opened.
pub struct WhitelistMaps {
    v4: Exact<u32>,
    v4_lpm: LpmTrie<MapData, [u8; 4], WlEntry>,
    v6: Exact<[u8; 16]>,
    v6_lpm: LpmTrie<MapData, [u8; 16], WlEntry>,
}

/// The size to give an exact hash that must hold `n` entries: a quarter of head-room (so a
/// run of live additions does not swap at every edit), rounded up to whole KiB of entries,
/// never under `WL_EXACT_MIN` nor over `WL_EXACT`. The kernel rounds the bucket array up to
/// a power of two.
pub fn capacity(n: usize) -> u32 {
    let want = n.saturating_add(n / 4).div_ceil(1024).saturating_mul(1024);
    want.clamp(limits::WL_EXACT_MIN as usize, limits::WL_EXACT as usize) as u32
}

/// One family's exact hash: the pinned array of maps and handles on its current element.
struct Exact<K> {
    /// "WL_V4" or "WL_V6": the pinned outer map, also the new hash's name stem.
    name: &'static str,
    outer: ArrayOfMaps<MapData, MapData>,
    map: HashMap<MapData, K, WlEntry>,
    /// A second handle on the same hash, for the batch syscalls.
    raw: MapData,
    /// The value of every entry (its prefix length: 32 or 128).
    value: WlEntry,
    /// The family's bit filter, mapped.
    filter: Filter,
}

impl<K: aya::Pod + bytemuck::Pod + Eq + std::hash::Hash + Send + Sync + ExactKey> Exact<K> {
    fn open(paths: &Paths, name: &'static str, filter: Filter, bits: u32) -> Result<Self> {
        let outer: ArrayOfMaps<MapData, MapData> = open_map(paths, name)?.try_into()?;
        let (map, raw) = Self::current(&outer, name)?;
        Ok(Exact {
            name,
            outer,
            map,
            raw,
            value: WlEntry { prefix_len: bits },
            filter,
        })
    }

    /// A freshly loaded outer map holds nothing: give it an empty hash.
    fn open_empty(paths: &Paths, name: &'static str) -> Result<()> {
        let mut outer: ArrayOfMaps<MapData, MapData> = open_map(paths, name)?.try_into()?;
        let fresh = Self::create(name, 0)?;
        outer
            .set(0, &fresh, 0)
            .with_context(|| format!("cannot put a hash into {name}"))?;
        Ok(())
    }

    /// A new, empty, preallocated hash sized for `n` entries (preallocated as the template in
    /// the BPF object says: the kernel compares the flags).
    fn create(name: &str, n: usize) -> Result<MapData> {
        let cap = capacity(n);
        let obj = aya_obj::Map::new_from_params(
            aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            std::mem::size_of::<K>() as u32,
            std::mem::size_of::<WlEntry>() as u32,
            cap,
            0,
        );
        MapData::create(obj, &format!("{name}_hash"), None)
            .with_context(|| format!("cannot create a hash of {cap} entries for {name}"))
    }

    fn current(
        outer: &ArrayOfMaps<MapData, MapData>,
        name: &str,
    ) -> Result<(HashMap<MapData, K, WlEntry>, MapData)> {
        let get = || {
            outer
                .get(&0, 0)
                .with_context(|| format!("the datapath's {name} holds no hash (load again)"))
        };
        Ok((Map::from_map_data(get()?)?.try_into()?, get()?))
    }

    /// The config bits of this family's filter (`Filter::switch`), the hash's size being
    /// its capacity.
    fn filter_flags(&mut self) -> Result<u32> {
        let size = self.max_entries();
        let (filter, raw, name) = (&mut self.filter, &self.raw, self.name);
        filter.switch(size, || {
            super::syscall::keys::<K>(
                std::os::fd::AsFd::as_fd(raw.fd()),
                std::mem::size_of::<WlEntry>(),
            )
            .with_context(|| format!("cannot read the keys of {name}"))
        })
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.raw.fd())
    }

    fn max_entries(&self) -> usize {
        self.raw
            .info()
            .map(|i| i.max_entries() as usize)
            .unwrap_or(usize::MAX)
    }

    /// Removes one key; its bits stay in the filter, counted as stale.
    fn remove(&mut self, k: &K) -> Result<(), aya::maps::MapError> {
        self.map.remove(k)?;
        self.filter.deleted(1);
        Ok(())
    }

    fn keys(&self) -> std::io::Result<Vec<K>> {
        super::syscall::keys::<K>(self.fd(), std::mem::size_of::<WlEntry>())
    }

    /// Fills a new hash sized for `entries` and swaps it in: from the next packet on the
    /// datapath reads exactly `entries`. If anything fails the old hash stays in place.
    /// The new hash is sized for `size_for` entries (at least `entries.len()`).
    fn replace(
        &mut self,
        entries: &[(K, WlEntry)],
        size_for: usize,
        progress: &mut impl FnMut(u64),
    ) -> Result<()> {
        if entries.len() > limits::WL_EXACT as usize {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG).into());
        }
        let fresh = Self::create(self.name, size_for.max(entries.len()))?;
        let fd = std::os::fd::AsFd::as_fd(fresh.fd());
        let (_, r) = parallel_update(fd, entries, progress);
        r?;
        // The swap leaves the live filter half in front of the new hash for a moment: it
        // holds the bits of every key the old and the new hash share, so no address both
        // admit is refused (one the new hash adds may be, until the build below).
        self.outer
            .set(0, &fresh, 0)
            .with_context(|| format!("cannot swap the new hash into {}", self.name))?;
        self.filter.build(entries.iter().map(|e| e.0))?;
        let (map, raw) = Self::current(&self.outer, self.name)?;
        self.map = map;
        self.raw = raw;
        Ok(())
    }

    /// Inserts the keys not already in the map, pushing them onto `added` (so the caller can
    /// undo them). A few keys go in one by one with NOEXIST, so a live edit's cost does not
    /// grow with the whitelist; many are told new from old by reading the keys first (batch
    /// updates cannot skip existing keys). When the hash would overflow, a bigger one holding
    /// the old keys and the new is swapped in.
    fn insert(
        &mut self,
        entries: &[(K, WlEntry)],
        progress: &mut impl FnMut(u64),
        added: &mut Vec<IpNet>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut rest = entries;
        if entries.len() <= SMALL_EDIT {
            while let Some((k, v)) = rest.first() {
                self.filter.set(std::iter::once(*k));
                let (done, r) =
                    super::syscall::update_one(self.fd(), k, v, super::syscall::BPF_NOEXIST);
                match r {
                    Ok(()) if done == 1 => added.push(k.to_net()),
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    // Full: the rest goes into a bigger hash, below.
                    Err(e) if e.raw_os_error() == Some(libc::E2BIG) => break,
                    Err(e) => return Err(e.into()),
                }
                progress(1);
                rest = &rest[1..];
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
        let existing: HashSet<K, foldhash::fast::RandomState> = self.keys()?.into_iter().collect();
        let fresh: Vec<(K, WlEntry)> = rest
            .iter()
            .filter(|e| !existing.contains(&e.0))
            .copied()
            .collect();
        progress((rest.len() - fresh.len()) as u64);
        if existing.len() + fresh.len() > self.max_entries() {
            let mut all: Vec<(K, WlEntry)> = existing.iter().map(|k| (*k, self.value)).collect();
            all.extend_from_slice(&fresh);
            self.replace(&all, all.len(), &mut |_| {})?;
            added.extend(fresh.iter().map(|e| e.0.to_net()));
            progress(fresh.len() as u64);
            return Ok(());
        }
        self.filter.set(fresh.iter().map(|e| e.0));
        let (done, r) = parallel_update(self.fd(), &fresh, progress);
        added.extend(done.iter().map(K::to_net));
        r?;
        Ok(())
    }

    /// If the hash is far bigger than `final_len` entries need (a whitelist that shrank),
    /// swaps in one of the right size holding the keys of `keep` that it has now (`keys`,
    /// read by the caller: so no moment admits an address the old whitelist did not).
    /// Returns the keys it dropped.
    fn shrink_for(
        &mut self,
        final_len: usize,
        keep: &HashSet<K, foldhash::fast::RandomState>,
        keys: &[K],
    ) -> Result<Vec<K>> {
        if self.max_entries() <= 4 * capacity(final_len) as usize {
            return Ok(Vec::new());
        }
        let (kept, dropped): (Vec<K>, Vec<K>) = keys.iter().partition(|k| keep.contains(k));
        let entries: Vec<(K, WlEntry)> = kept.iter().map(|k| (*k, self.value)).collect();
        self.replace(&entries, final_len, &mut |_| {})?;
        Ok(dropped)
    }
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
        let cfg = super::slots::read_config(paths)?.flags;
        Ok(WhitelistMaps {
            v4: Exact::open(
                paths,
                maps::WL_V4,
                Filter::open(
                    paths,
                    maps::WL_V4_BLOOM,
                    cfg,
                    flags::WL_BLOOM_V4,
                    flags::WL_BLOOM_HI_V4,
                )?,
                32,
            )?,
            v4_lpm: open_map(paths, maps::WL_V4_LPM)?.try_into()?,
            v6: Exact::open(
                paths,
                maps::WL_V6,
                Filter::open(
                    paths,
                    maps::WL_V6_BLOOM,
                    cfg,
                    flags::WL_BLOOM_V6,
                    flags::WL_BLOOM_HI_V6,
                )?,
                128,
            )?,
            v6_lpm: open_map(paths, maps::WL_V6_LPM)?.try_into()?,
        })
    }

    /// Everything in the maps, as CIDRs (host routes for exact entries).
    pub fn entries(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        out.extend(self.v4.keys()?.iter().map(ExactKey::to_net));
        out.extend(self.v6.keys()?.iter().map(ExactKey::to_net));
        out.extend(self.cidrs()?);
        Ok(out)
    }

    /// The CIDR entries (the LPM tries).
    fn cidrs(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
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
            IpAddr::V4(a) => found(self.v4.map.get(&u32::from_ne_bytes(a.octets()), 0))?,
            IpAddr::V6(a) => found(self.v6.map.get(&a.octets(), 0))?,
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
        let mut result = self
            .v4
            .insert(&v4, &mut progress, &mut added)
            .map_err(|e| full(e, "IPv4 addresses"));
        if result.is_ok() {
            result = self
                .v6
                .insert(&v6, &mut progress, &mut added)
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
        let gone4 = batch_delete(&self.v4.raw, &v4, &mut progress)
            .context("cannot remove IPv4 addresses")?;
        self.v4.filter.deleted(gone4.len());
        removed.extend(gone4.iter().map(ExactKey::to_net));
        let gone6 = batch_delete(&self.v6.raw, &v6, &mut progress)
            .context("cannot remove IPv6 addresses")?;
        self.v6.filter.deleted(gone6.len());
        removed.extend(gone6.iter().map(ExactKey::to_net));
        Ok(removed)
    }

    /// Adds one entry; returns whether it was new.
    pub fn insert(&mut self, n: &IpNet) -> Result<bool> {
        Ok(self.insert_many(std::slice::from_ref(n), |_| {})?.len() == 1)
    }
}

fn full(e: anyhow::Error, what: &str) -> anyhow::Error {
    let errno = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error);
    match errno {
        Some(libc::E2BIG) | Some(libc::ENOSPC) => anyhow!(
            "the whitelist map for {what} is full (it holds at most {})",
            limits::WL_EXACT
        ),
        _ => anyhow!("cannot add {what} to the whitelist: {e:#}"),
    }
}

/// Writes `entries` in batch updates spread over the CPUs (the kernel locks a hash per
/// bucket, so writers on different CPUs rarely meet: on 2 CPUs a million entries load in
/// about half the time). Returns the keys written, and the first error.
fn parallel_update<K: bytemuck::Pod + Send + Sync>(
    fd: std::os::fd::BorrowedFd<'_>,
    entries: &[(K, WlEntry)],
    progress: &mut impl FnMut(u64),
) -> (Vec<K>, std::io::Result<()>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let workers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 8)
        .min(entries.len().div_ceil(BATCH).max(1));
    let per = entries.len().div_ceil(workers).max(1);
    let moved = AtomicU64::new(0);
    let results: Vec<(Vec<K>, std::io::Result<()>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = entries
            .chunks(per)
            .map(|part| {
                let moved = &moved;
                sc.spawn(move || {
                    let mut done = Vec::with_capacity(part.len());
                    for chunk in part.chunks(BATCH) {
                        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
                        let vals: Vec<WlEntry> = chunk.iter().map(|e| e.1).collect();
                        let (n, r) = super::syscall::update(
                            fd,
                            bytemuck::cast_slice(&keys),
                            bytemuck::cast_slice(&vals),
                            keys.len(),
                            0,
                        );
                        done.extend_from_slice(&keys[..n]);
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                        if r.is_err() {
                            return (done, r);
                        }
                    }
                    (done, Ok(()))
                })
            })
            .collect();
        // The progress bar moves from here: the callback is not shared with the workers.
        let mut shown = 0;
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = moved.load(Ordering::Relaxed);
            progress(now - shown);
            shown = now;
        }
        progress(moved.load(Ordering::Relaxed) - shown);
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (Vec::new(), Err(std::io::Error::other("a writer panicked")))
                })
            })
            .collect()
    });
    let mut all = Vec::with_capacity(entries.len());
    let mut first_err = Ok(());
    for (done, r) in results {
        all.extend(done);
        if first_err.is_ok() {
            first_err = r;
        }
    }
    (all, first_err)
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

/// Runs a whitelist change with the datapath's map switches kept safe: the CIDR bits of the
/// families gaining CIDRs are set before anything is added, and afterwards each bit is made
/// to say whether its trie holds anything (a trie that cannot be read counts as non-empty).
/// So the datapath may look into an empty trie for a moment, never skip a full one. The
/// filter bits then say which exact hashes are big enough for their filter to pay (the
/// filters cover every entry whatever the bits say, so either value is safe).
pub fn with_map_flags<T>(
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
    let mut m = WhitelistMaps::open(paths)?;
    let mut now = 0;
    if m.v4_lpm.keys().next().is_some() {
        now |= flags::WL_CIDR_V4;
    }
    if m.v6_lpm.keys().next().is_some() {
        now |= flags::WL_CIDR_V6;
    }
    now |= m.v4.filter_flags()? | m.v6.filter_flags()?;
    super::slots::update_config(paths, |c| {
        c.flags = (c.flags & !flags::WL_FOLLOW_MAPS) | now
    })?;
    r
}

/// Before the programs are replaced (an upgrade): the datapath stops consulting the
/// filters, and their live halves count as incomplete (a build of another design, run in
/// between, may have added keys without their bits), so `refresh` rebuilds them.
pub fn forget_filters(paths: &Paths) -> Result<()> {
    super::slots::update_config(paths, |c| {
        c.flags &= !(flags::WL_BLOOM_V4
            | flags::WL_BLOOM_V6
            | flags::RETIRED_FILTER_V4
            | flags::RETIRED_FILTER_V6)
    })?;
    for (name, on, hi) in [
        (maps::WL_V4_BLOOM, flags::WL_BLOOM_V4, flags::WL_BLOOM_HI_V4),
        (maps::WL_V6_BLOOM, flags::WL_BLOOM_V6, flags::WL_BLOOM_HI_V6),
    ] {
        if paths.map(name).exists() {
            Filter::open(paths, name, 0, on, hi)?.forget();
        }
    }
    Ok(())
}

/// After the programs were replaced: builds the filters of big hashes and switches them on,
/// and removes the pins of the filters earlier builds used.
pub fn refresh(paths: &Paths) -> Result<()> {
    with_map_flags(paths, &[], || Ok(()))?;
    for name in maps::RETIRED {
        match std::fs::remove_file(paths.map(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove the retired pin {name}"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Puts an empty hash of the smallest size into each exact map (a fresh load).
pub fn install_empty(paths: &Paths) -> Result<()> {
    Exact::<u32>::open_empty(paths, maps::WL_V4)?;
    Exact::<[u8; 16]>::open_empty(paths, maps::WL_V6)?;
    Ok(())
}

/// The second half of a sync (`narrow`): adds `add`, all or nothing. Returns what was
/// really added.
pub fn widen(paths: &Paths, add: &[IpNet], progress: impl FnMut(u64)) -> Result<Vec<IpNet>> {
    Ok(WhitelistMaps::open(paths)?
        .change(&[], add, progress)?
        .added)
}

/// Puts back what a `change` did (a later step of its transaction failed).
pub fn revert(paths: &Paths, done: &WhitelistDelta) -> Result<()> {
    let mut m = WhitelistMaps::open(paths)?;
    m.change(&done.added, &done.removed, |_| {})?;
    Ok(())
}

/// The first half of making the maps hold exactly `wanted`: removes what `wanted` lacks and
/// returns the entries still to add (`widen`). Entries in both the old and the new whitelist
/// are not touched; removing first means the maps never hold more than the larger of the
/// two whitelists (adding first could overflow them half-way), and between the halves they
/// hold only what both whitelists admit, which is what lets `apply` flip the isolation slot
/// there (see `EbpfBackend::apply`). All or nothing.
///
/// An exact hash much bigger than its family's new whitelist needs is first replaced by one
/// of the right size holding the entries both whitelists share (`Exact::shrink_for`).
pub fn narrow(
    paths: &Paths,
    wanted: &[IpNet],
    progress: impl FnMut(u64),
) -> Result<(WhitelistDelta, Vec<IpNet>)> {
    // foldhash: millions of the operator's own entries (no flooding adversary), where
    // SipHash was a quarter of a whole-policy apply.
    type Set<T> = HashSet<T, foldhash::fast::RandomState>;
    let mut m = WhitelistMaps::open(paths)?;
    // The exact keys are read once: for the delta, and for what a smaller hash keeps.
    let (keys4, keys6) = (m.v4.keys()?, m.v6.keys()?);
    let current: Set<IpNet> = keys4
        .iter()
        .map(ExactKey::to_net)
        .chain(keys6.iter().map(ExactKey::to_net))
        .chain(m.cidrs()?)
        .collect();
    let want: Set<IpNet> = wanted.iter().copied().collect();
    let mut keep4 = Set::default();
    let mut keep6 = Set::default();
    for n in &want {
        match n {
            IpNet::V4(a) if a.prefix_len() == 32 => {
                keep4.insert(u32::from_ne_bytes(a.addr().octets()));
            }
            IpNet::V6(a) if a.prefix_len() == 128 => {
                keep6.insert(a.addr().octets());
            }
            _ => {}
        }
    }
    let mut dropped: Vec<IpNet> =
        m.v4.shrink_for(keep4.len(), &keep4, &keys4)?
            .iter()
            .map(ExactKey::to_net)
            .collect();
    let dropped6 = match m.v6.shrink_for(keep6.len(), &keep6, &keys6) {
        Ok(d) => d,
        Err(e) => {
            let _ = m.insert_many(&dropped, |_| {});
            return Err(e);
        }
    };
    dropped.extend(dropped6.iter().map(ExactKey::to_net));
    let dropped_set: Set<IpNet> = dropped.iter().copied().collect();
    let gone: Vec<IpNet> = current
        .difference(&want)
        .filter(|n| !dropped_set.contains(n))
        .copied()
        .collect();
    let add: Vec<IpNet> = wanted
        .iter()
        .filter(|n| !current.contains(n))
        .copied()
        .collect();
    match m.change(&gone, &[], progress) {
        Ok(mut delta) => {
            delta.removed.extend(dropped);
            Ok((delta, add))
        }
        Err(e) => {
            m.insert_many(&dropped, |_| {})
                .context("and the entries a smaller hash left out could not all be put back")?;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::capacity;
    use isolation_common::limits;

    #[test]
    fn capacity_is_contents_plus_a_quarter_in_whole_kib_within_the_limits() {
        assert_eq!(capacity(0), limits::WL_EXACT_MIN);
        assert_eq!(capacity(10), limits::WL_EXACT_MIN);
        assert_eq!(capacity(819), 1024);
        assert_eq!(capacity(820), 2048);
        assert_eq!(capacity(4000), 5120);
        assert_eq!(capacity(1 << 20), 1_310_720);
        assert_eq!(capacity(2_000_000), limits::WL_EXACT);
        assert_eq!(capacity(usize::MAX), limits::WL_EXACT);
    }
}
