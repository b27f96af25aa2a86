//! Host whitelist: exact addresses in hashes (one lookup, flat cost at 1M entries), CIDRs in
//! LPM tries. The exact hash is looked up first: it is the cheapest and decides most packets.
//!
//! Each exact hash sits alone in a one-element array of maps, so userspace sizes it to what it
//! holds (a small whitelist keeps a small bucket array that stays in cache under a flood from
//! random sources) and, when it grows, fills a bigger one and swaps it in with one write: the
//! datapath sees the old hash or the new one, never a half-filled one.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use isolation_common::{AF_INET, WlEntry, flags, limits};

use crate::parse::Packet;

/// Exact IPv4 sources, key = address bytes in network order read as a u32. The inner
/// definition is the template the kernel checks swapped-in hashes against (type, key, value,
/// flags: preallocated, so inserts are a free-list pop); its size is userspace's choice.
#[btf_map]
static WL_V4: ArrayOfMaps<HashMap<u32, WlEntry, { limits::WL_EXACT_MIN as usize }>, 1> =
    ArrayOfMaps::new();

/// IPv4 CIDRs. LPM keys are (prefix length, address in network order); /32s go to `WL_V4`.
#[btf_map]
static WL_V4_LPM: LpmTrie<[u8; 4], WlEntry, { limits::WL_LPM as usize }> = LpmTrie::new();

/// Exact IPv6 sources.
#[btf_map]
static WL_V6: ArrayOfMaps<HashMap<[u8; 16], WlEntry, { limits::WL_EXACT_MIN as usize }>, 1> =
    ArrayOfMaps::new();

/// IPv6 CIDRs; /128s go to `WL_V6`.
#[btf_map]
static WL_V6_LPM: LpmTrie<[u8; 16], WlEntry, { limits::WL_LPM as usize }> = LpmTrie::new();

/// Map flag: userspace may mmap the array (the loader writes `PEERS` and these filters
/// through a shared mapping).
pub const BPF_F_MMAPABLE: usize = 1 << 10;

/// Four bits of one word per exact address (`isolation_common::wl_bloom`), in two halves:
/// the live one (`flags::WL_BLOOM_HI_*` says which) and one the loader rebuilds from the
/// hash's keys beside it when deletions have left too many stale bits, then swaps in with
/// one config write. Written only by the loader (through a shared mapping), before an
/// address enters the hash. A word without all four bits means "not in the hash": under a
/// flood from random sources a big whitelist's miss reads one word, not a bucket and an
/// element in DRAM.
#[btf_map]
static WL_V4_BLOOM: Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE> = Array::new();
#[btf_map]
static WL_V6_BLOOM: Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE> = Array::new();

/// May the source hashed to `src_hash` (`addr_hash`) be in the family's exact hash? Asked
/// only of big hashes (`flags::WL_BLOOM_*`, `flags::BL_BLOOM_*`); `hi` picks the live half.
#[inline(always)]
pub fn in_filter(
    filter: &Array<u64, { limits::WL_BLOOM_LEN as usize }, BPF_F_MMAPABLE>,
    src_hash: u64,
    hi: bool,
) -> bool {
    let (w, m) = isolation_common::wl_bloom_of(src_hash);
    let i = if hi { w + limits::WL_BLOOM_WORDS } else { w };
    match filter.get(i) {
        Some(v) => *v & m == m,
        None => true,
    }
}

/// Is the source whitelisted? `cfg_flags` says which CIDR tries hold anything (an empty
/// trie is not looked up) and which exact hashes are big enough for their filter;
/// `src_hash` is `addr_hash` of the source.
#[inline(always)]
pub fn whitelisted(pkt: &Packet, cfg_flags: u32, src_hash: u64) -> bool {
    if pkt.family == AF_INET {
        let a = pkt.src.words()[0];
        if (cfg_flags & flags::WL_BLOOM_V4 == 0
            || in_filter(
                &WL_V4_BLOOM,
                src_hash,
                cfg_flags & flags::WL_BLOOM_HI_V4 != 0,
            ))
            && WL_V4.get_value_ptr_mut(0, &a).is_some()
        {
            return true;
        }
        if crate::mutants::SKIP_CIDR_TRIE || cfg_flags & flags::WL_CIDR_V4 == 0 {
            return false;
        }
        WL_V4_LPM.get(&Key::new(32, a.to_ne_bytes())).is_some()
    } else {
        if (cfg_flags & flags::WL_BLOOM_V6 == 0
            || in_filter(
                &WL_V6_BLOOM,
                src_hash,
                cfg_flags & flags::WL_BLOOM_HI_V6 != 0,
            ))
            && WL_V6.get_value_ptr_mut(0, &pkt.src.0).is_some()
        {
            return true;
        }
        if crate::mutants::SKIP_CIDR_TRIE || cfg_flags & flags::WL_CIDR_V6 == 0 {
            return false;
        }
        WL_V6_LPM.get(&Key::new(128, pkt.src.0)).is_some()
    }
}
