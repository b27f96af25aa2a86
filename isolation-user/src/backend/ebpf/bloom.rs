//! The bit filter in front of a big exact hash (the whitelist's and the blocklist's): four
//! bits of one 64-bit word per address (`isolation_common::wl_bloom`), in two halves, the
//! live one and one rebuilt beside it when deletions have left too many stale bits. A word
//! without all four bits of an address means "not in the hash": under a flood from random
//! sources a big hash's miss reads one word, not a bucket and an element in DRAM.
//!
//! The invariant both users keep: an address's bits are set in the live half before the
//! address enters the hash, so the filter never hides a key the hash holds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, anyhow};
use ipnet::IpNet;
use isolation_common::{bloom_meta, limits};

use crate::state::Paths;

/// A key of an exact hash: the address it stands for, and its word and bits in the filter.
pub trait ExactKey: Copy {
    fn to_net(&self) -> IpNet;
    fn bloom(&self) -> (u32, u64);
}

impl ExactKey for u32 {
    fn to_net(&self) -> IpNet {
        IpNet::from(IpAddr::V4(Ipv4Addr::from(self.to_ne_bytes())))
    }
    fn bloom(&self) -> (u32, u64) {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&self.to_ne_bytes());
        isolation_common::wl_bloom(isolation_common::AF_INET, &a)
    }
}

impl ExactKey for [u8; 16] {
    fn to_net(&self) -> IpNet {
        IpNet::from(IpAddr::V6(Ipv6Addr::from(*self)))
    }
    fn bloom(&self) -> (u32, u64) {
        isolation_common::wl_bloom(isolation_common::AF_INET6, self)
    }
}

/// A family's filter (`maps::WL_V4_BLOOM`, `maps::BL_V4_BLOOM`...), mapped into this
/// process: bits are set here, in the live half, before their addresses enter the hash, and read by the
/// datapath. The loader is its only writer (under the engine's lock), so plain
/// read-modify-writes are safe.
pub struct Filter {
    map: super::pinned::SharedArray,
    /// `flags::WL_BLOOM_V4`, `flags::BL_BLOOM_V6`...: the datapath consults this filter.
    on_flag: u32,
    /// `flags::WL_BLOOM_HI_V4`, `flags::BL_BLOOM_HI_V6`...: the live half is the second.
    hi_flag: u32,
    /// The live half, as the config says (changed only by `build`).
    hi: bool,
    paths: Paths,
}

/// Words of one half.
const HALF: usize = limits::WL_BLOOM_WORDS as usize;

impl Filter {
    /// `cfg_flags`: the datapath's config switches now (they say which half is live).
    pub fn open(
        paths: &Paths,
        name: &str,
        cfg_flags: u32,
        on_flag: u32,
        hi_flag: u32,
    ) -> Result<Filter> {
        let map = super::pinned::SharedArray::open(paths, name)?;
        let want = limits::WL_BLOOM_LEN as usize * 8;
        if map.len() != want {
            return Err(anyhow!(
                "the pinned map {name} holds {} bytes where this build needs {want} (run \
                 `isolation-user unload` then `load`)",
                map.len()
            ));
        }
        let hi = cfg_flags & hi_flag != 0;
        Ok(Filter {
            map,
            on_flag,
            hi_flag,
            hi,
            paths: paths.clone(),
        })
    }

    /// The config bit that says which half is live, as it should be now.
    pub fn hi_bits(&self) -> u32 {
        if self.hi { self.hi_flag } else { 0 }
    }

    /// The config bits of this filter in front of a hash of `size` entries: which half is
    /// live, and whether the datapath consults it, which it does once the hash is big
    /// (`limits::WL_BLOOM_FROM`: below, the hash's buckets stay in cache). A big hash's
    /// filter is first rebuilt from `keys` (every key of the hash) if it may lack some
    /// (never built by this design, or after an upgrade) or holds too many stale bits.
    pub fn switch<K: ExactKey>(
        &mut self,
        size: usize,
        keys: impl FnOnce() -> Result<Vec<K>>,
    ) -> Result<u32> {
        if size < limits::WL_BLOOM_FROM as usize {
            return Ok(self.hi_bits());
        }
        if !self.fresh() {
            self.build(keys()?.into_iter())?;
        }
        Ok(self.on_flag | self.hi_bits())
    }

    /// The live half no longer counts as holding every key (the programs are being
    /// replaced by another build's, which may add keys without their bits): the next
    /// `fresh` says no, so the filter is rebuilt before the datapath consults it again.
    pub fn forget(&mut self) {
        self.set_meta(bloom_meta::COMPLETE, 0);
    }

    fn word(&self, i: usize) -> *mut u64 {
        debug_assert!(i < limits::WL_BLOOM_LEN as usize);
        // SAFETY: i < WL_BLOOM_LEN, the array's length in words (checked in `open`): inside
        // the mapping, which is page-aligned.
        unsafe { (self.map.as_mut_ptr() as *mut u64).add(i) }
    }

    fn meta(&self, m: u32) -> u64 {
        // SAFETY: a word of the mapping (`word`); volatile: shared with other processes.
        unsafe { std::ptr::read_volatile(self.word(2 * HALF + m as usize)) }
    }

    fn set_meta(&mut self, m: u32, v: u64) {
        // SAFETY: as in `meta`.
        unsafe { std::ptr::write_volatile(self.word(2 * HALF + m as usize), v) }
    }

    /// Sets the bits of `keys` in the live half.
    pub fn set<K: ExactKey>(&mut self, keys: impl Iterator<Item = K>) {
        let n = self.set_bits(keys);
        let keys = self.meta(bloom_meta::KEYS).saturating_add(n);
        self.set_meta(bloom_meta::KEYS, keys);
    }

    /// Sets the bits of keys the hash may hold already (a new value for an existing key):
    /// not counted again, so the count of stale bits stays comparable to the live keys'.
    pub fn reassert<K: ExactKey>(&mut self, keys: impl Iterator<Item = K>) {
        self.set_bits(keys);
    }

    fn set_bits<K: ExactKey>(&mut self, keys: impl Iterator<Item = K>) -> u64 {
        let base = if self.hi { HALF } else { 0 };
        let mut n = 0;
        for k in keys {
            let (w, m) = k.bloom();
            let p = self.word(base + w as usize);
            // SAFETY: a word of the mapping (`word`). Volatile: the datapath reads it; the
            // word is written only when it changes.
            unsafe {
                let v = std::ptr::read_volatile(p);
                if v & m != m {
                    std::ptr::write_volatile(p, v | m);
                }
            }
            n += 1;
        }
        n
    }

    /// Counts keys deleted from the hash: their bits stay set until the next build.
    pub fn deleted(&mut self, n: usize) {
        let d = self.meta(bloom_meta::DELETED).saturating_add(n as u64);
        self.set_meta(bloom_meta::DELETED, d);
    }

    /// Does the live half hold the bits of every key, with few enough stale ones? A build
    /// is due when the keys deleted since the last one pass a fifth of those it counts
    /// (then more than a quarter of the live keys' worth of bits are stale).
    fn fresh(&self) -> bool {
        let deleted = self.meta(bloom_meta::DELETED);
        self.meta(bloom_meta::COMPLETE) == 1
            && (deleted < STALE_FLOOR || deleted.saturating_mul(5) <= self.meta(bloom_meta::KEYS))
    }

    /// Builds the half not in use from `keys` (every key the hash will hold when this
    /// returns) and makes it the live one with one config write.
    pub fn build<K: ExactKey>(&mut self, keys: impl Iterator<Item = K>) -> Result<()> {
        let base = if self.hi { 0 } else { HALF };
        // SAFETY: the half not in use: HALF words from `base`, inside the mapping; the
        // datapath reads it only after the config write below.
        let half = unsafe { std::slice::from_raw_parts_mut(self.word(base), HALF) };
        half.fill(0);
        let mut n = 0u64;
        for k in keys {
            let (w, m) = k.bloom();
            half[w as usize] |= m;
            n += 1;
        }
        let hi = !self.hi;
        let bit = self.hi_flag;
        super::slots::update_config(&self.paths, |c| {
            if hi {
                c.flags |= bit;
            } else {
                c.flags &= !bit;
            }
        })?;
        self.hi = hi;
        self.set_meta(bloom_meta::KEYS, n);
        self.set_meta(bloom_meta::DELETED, 0);
        self.set_meta(bloom_meta::COMPLETE, 1);
        Ok(())
    }
}

/// Deletions under this many never call for a build of the filter.
const STALE_FLOOR: u64 = 4096;
