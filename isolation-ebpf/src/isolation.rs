//! Virtual-network isolation: two LPM lookups (source, destination) give every network
//! and rule that applies to each side as bitmasks (compiled in userspace, containment
//! already merged), then the verdict in PRODUCT.md's order: except, hairpin, established,
//! allow rules, default.
//!
//! The maps come in two slots; `Config::slot` says which one is live, so a whole policy
//! swaps with one config write.

use aya_ebpf::{
    btf_maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use isolation_common::{
    AF_INET, Counter, NetEntry, PolicyMeta, Reason, iso_flags, limits, lowest_bit, ports,
};

use crate::{
    conntrack,
    parse::{IPPROTO_UDP, L4, Packet},
};

/// IPv4 prefix → what applies under it, slot 0 and 1.
#[btf_map]
static NET_V4_0: LpmTrie<[u8; 4], NetEntry, { limits::NET_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
static NET_V4_1: LpmTrie<[u8; 4], NetEntry, { limits::NET_PREFIXES as usize }> = LpmTrie::new();
/// IPv6 prefix → what applies under it, slot 0 and 1.
#[btf_map]
static NET_V6_0: LpmTrie<[u8; 16], NetEntry, { limits::NET_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
static NET_V6_1: LpmTrie<[u8; 16], NetEntry, { limits::NET_PREFIXES as usize }> = LpmTrie::new();

/// (protocol, destination port) → allow rules that admit it; see `ports::*` for the index.
#[btf_map]
static PORTS_0: Array<u64, { ports::LEN as usize }> = Array::new();
#[btf_map]
static PORTS_1: Array<u64, { ports::LEN as usize }> = Array::new();

/// Default action and reject switch of each slot.
#[btf_map]
static META: Array<PolicyMeta, 2> = Array::new();

/// Packets and bytes per allow rule (0..64) and per except rule (64..128).
#[btf_map]
static RULE_COUNTERS: PerCpuArray<Counter, 128> = PerCpuArray::new();

#[inline(always)]
fn net(slot: u32, pkt: &Packet, src: bool) -> Option<&'static NetEntry> {
    let a = if src { &pkt.src.0 } else { &pkt.dst.0 };
    if pkt.family == AF_INET {
        let k = Key::new(32, [a[0], a[1], a[2], a[3]]);
        if slot == 0 {
            NET_V4_0.get(&k)
        } else {
            NET_V4_1.get(&k)
        }
    } else {
        let k = Key::new(128, *a);
        if slot == 0 {
            NET_V6_0.get(&k)
        } else {
            NET_V6_1.get(&k)
        }
    }
}

#[inline(always)]
fn port_index(pkt: &Packet) -> u32 {
    let dport = (pkt.l4 == L4::Ok).then(|| u16::from_be(pkt.dport));
    ports::index(pkt.proto, dport)
}

#[inline(always)]
fn count_rule(index: u32, len: u64) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(index & 127) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// The slot in use and its switches.
#[derive(Clone, Copy)]
pub struct Live {
    pub slot: u32,
    pub flags: u32,
    /// `Config::peers`.
    pub peers: u32,
}

/// The switches of the live slot.
#[inline(always)]
pub fn meta(slot: u32) -> Option<&'static PolicyMeta> {
    META.get(slot & 1)
}

/// Is this UDP packet VXLAN, by the policy's ports?
#[inline(always)]
pub fn is_vxlan(meta: &PolicyMeta, pkt: &Packet) -> bool {
    if pkt.proto != IPPROTO_UDP || pkt.l4 != L4::Ok {
        return false;
    }
    let port = u16::from_be(pkt.dport);
    let p = &meta.vxlan_ports;
    port != 0 && (p[0] == port || p[1] == port || p[2] == port || p[3] == port)
}

/// The isolation verdict, or None when the packet is not subject to isolation (then the
/// whitelist's verdict stands). `can_reject`: false for packets inside a tunnel, which are
/// dropped rather than answered. `conntracked`: what the whitelist stage's connection
/// lookup already answered (established, related or fragment), if it made one.
#[inline(always)]
pub fn judge(
    live: Live,
    start: usize,
    end: usize,
    pkt: &Packet,
    len: u64,
    can_reject: bool,
    conntracked: Option<Reason>,
    src_hash: u64,
) -> Option<Reason> {
    let (slot, flags) = (live.slot & 1, live.flags);
    if flags & iso_flags::ENABLED == 0 {
        return None;
    }
    let s = net(slot, pkt, true)?;
    let d = net(slot, pkt, false)?;
    if s.nets == 0 || d.nets == 0 {
        return None;
    }
    let ex = (s.except_from & d.except_to) | (s.except_to & d.except_from);
    if ex != 0 {
        count_rule(64 + lowest_bit(ex), len);
        return Some(Reason::PassExcept);
    }
    if s.nets & d.nets != 0 && !crate::mutants::HAIRPIN_OFF {
        return Some(Reason::PassHairpin);
    }
    // The whitelist stage may already have found the packet's connection: same table,
    // same answer, so no second lookup.
    if conntracked.is_some() {
        return conntracked;
    }
    if conntrack::is_reply(pkt, src_hash, live.peers) {
        conntrack::remember_fragment(pkt);
        return Some(Reason::PassEstablished);
    }
    if conntrack::is_related(start, end, pkt) {
        return Some(Reason::PassRelated);
    }
    if conntrack::is_admitted_fragment(pkt) {
        return Some(Reason::PassFragment);
    }
    let table = if slot == 0 {
        PORTS_0.get(port_index(pkt))
    } else {
        PORTS_1.get(port_index(pkt))
    };
    let m = s.allow_from & d.allow_to & table.copied().unwrap_or(0);
    if m != 0 {
        count_rule(lowest_bit(m), len);
        // Its later fragments carry no ports: they follow the first one. The flow itself
        // is recorded where the packet leaves, if the kernel lets it.
        conntrack::remember_fragment(pkt);
        if crate::mutants::RECORD_AT_INGRESS {
            let _ = conntrack::track(pkt, live.peers);
        }
        return Some(Reason::PassAllow);
    }
    Some(if flags & iso_flags::DENY == 0 {
        Reason::PassDefault
    } else if flags & iso_flags::REJECT != 0
        && can_reject
        && crate::reject::answerable(pkt)
        && !crate::mutants::REJECT_AS_DROP
    {
        Reason::RejectIsolated
    } else {
        Reason::DropIsolated
    })
}
