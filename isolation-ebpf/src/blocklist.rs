//! The blocklist: sources dropped before anything else is asked, each until its deadline
//! (`isolation_common::block_deadline`). Exact addresses in hashes, CIDRs in LPM tries, both
//! allocated as they fill (an empty blocklist reserves nothing). An entry holds the latest
//! deadline of itself and of every blocked CIDR containing it (the loader writes it so), so
//! one lookup answers: the exact hash first, the trie's longest prefix on a miss.
//!
//! A deadline is checked here, on the packet: an entry stops matching when it passes, not
//! when the loader gets round to removing it.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use isolation_common::{AF_INET, Addr, addr_hash, block_deadline, flags, limits};

use crate::whitelist::{BPF_F_MMAPABLE, in_filter};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
static BL_V4: HashMap<u32, u64, { limits::BL_EXACT as usize }, NO_PREALLOC> = HashMap::new();
/// Trie values are the deadline's bytes (an LPM value may not be aligned beyond its key).
#[btf_map]
static BL_V4_LPM: LpmTrie<[u8; 4], [u8; 8], { limits::BL_LPM as usize }> = LpmTrie::new();
#[btf_map]
static BL_V6: HashMap<[u8; 16], u64, { limits::BL_EXACT as usize }, NO_PREALLOC> = HashMap::new();
#[btf_map]
static BL_V6_LPM: LpmTrie<[u8; 16], [u8; 8], { limits::BL_LPM as usize }> = LpmTrie::new();

/// The filters in front of the address hashes once they are big (`flags::BL_BLOOM_V4`):
/// as the whitelist's, a flood of random sources that the hash does not hold reads one word
/// each instead of a bucket and an element in DRAM (the blocklist's CIDRs are asked after
/// the hash misses, so a flood from a blocked range goes through that miss first).
#[btf_map]
static BL_V4_BLOOM: Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE> = Array::new();
#[btf_map]
static BL_V6_BLOOM: Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE> = Array::new();

/// Is the hash worth a lookup? Yes unless the family's filter is on and says no.
#[inline(always)]
fn maybe_held(
    filter: &Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE>,
    family: u8,
    src: &Addr,
    cfg_flags: u32,
    on: u32,
    hi: u32,
) -> bool {
    cfg_flags & on == 0 || in_filter(filter, addr_hash(family, src), cfg_flags & hi != 0)
}

/// Does an entry with this deadline still block? Permanent entries never read the clock;
/// timed ones read the coarse one (`clock`: measured on the bench VM, the precise clock's
/// read cost ~60 ns a packet, more than the lookup; the coarse helper's call ~17 ns).
#[inline(always)]
fn holds(deadline: u64) -> bool {
    deadline == block_deadline::PERMANENT
        || block_deadline::holds(deadline, crate::clock::now_coarse())
}

/// Is the source blocked? `cfg_flags` says which maps hold anything. The source is read
/// without a full parse (`parse::source`), or taken from a parsed packet.
#[inline(always)]
pub fn source_blocked(family: u8, src: &Addr, cfg_flags: u32) -> bool {
    if family == AF_INET {
        let a = src.words()[0];
        // SAFETY: the value is a plain u64 the loader writes whole; a torn read cannot
        // happen on an aligned 8-byte word.
        if cfg_flags & flags::BL_V4 != 0
            && maybe_held(
                &BL_V4_BLOOM,
                family,
                src,
                cfg_flags,
                flags::BL_BLOOM_V4,
                flags::BL_BLOOM_HI_V4,
            )
            && let Some(d) = unsafe { BL_V4.get(&a) }
        {
            return holds(*d);
        }
        if cfg_flags & flags::BL_CIDR_V4 != 0
            && let Some(d) = BL_V4_LPM.get(&Key::new(32, a.to_ne_bytes()))
        {
            return holds(u64::from_ne_bytes(*d));
        }
    } else {
        // SAFETY: as for IPv4.
        if cfg_flags & flags::BL_V6 != 0
            && maybe_held(
                &BL_V6_BLOOM,
                family,
                src,
                cfg_flags,
                flags::BL_BLOOM_V6,
                flags::BL_BLOOM_HI_V6,
            )
            && let Some(d) = unsafe { BL_V6.get(&src.0) }
        {
            return holds(*d);
        }
        if cfg_flags & flags::BL_CIDR_V6 != 0
            && let Some(d) = BL_V6_LPM.get(&Key::new(128, src.0))
        {
            return holds(u64::from_ne_bytes(*d));
        }
    }
    false
}
