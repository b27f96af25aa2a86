//! Host whitelist: exact addresses in hashes (one lookup, flat cost at 1M entries), CIDRs in
//! LPM tries. The exact hash is looked up first: it is the cheapest and decides most packets.
//!
//! Each exact hash sits alone in a one-element array of maps, so userspace sizes it to what it
//! holds (a small whitelist keeps a small bucket array that stays in cache under a flood from
//! random sources) and, when it grows, fills a bigger one and swaps it in with one write: the
//! datapath sees the old hash or the new one, never a half-filled one.

use aya_ebpf::{
    btf_maps::{ArrayOfMaps, HashMap, LpmTrie, lpm_trie::Key},
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

/// Is the source whitelisted? `cfg_flags` says which CIDR tries hold anything: an empty
/// trie is not looked up.
#[inline(always)]
pub fn whitelisted(pkt: &Packet, cfg_flags: u32) -> bool {
    if pkt.family == AF_INET {
        let a = [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]];
        if WL_V4.get_value_ptr_mut(0, &u32::from_ne_bytes(a)).is_some() {
            return true;
        }
        if cfg!(feature = "mutant-skip-cidr-trie") || cfg_flags & flags::WL_CIDR_V4 == 0 {
            return false;
        }
        WL_V4_LPM.get(&Key::new(32, a)).is_some()
    } else {
        if WL_V6.get_value_ptr_mut(0, &pkt.src).is_some() {
            return true;
        }
        if cfg!(feature = "mutant-skip-cidr-trie") || cfg_flags & flags::WL_CIDR_V6 == 0 {
            return false;
        }
        WL_V6_LPM.get(&Key::new(128, pkt.src)).is_some()
    }
}
