//! Connection memory, in the spirit of the kernel's conntrack, in two tables:
//!
//! - `CONNTRACK`, the new connections: flows seen leaving an attached interface (TC
//!   egress), keyed in their original direction. Only a packet the host really sends or
//!   forwards is recorded, never one merely seen arriving: a forged packet that the kernel
//!   then drops (reverse-path filter, no route) opens nothing.
//! - `ESTABLISHED`: a flow moves here when, after an answer came in, its opener sends again
//!   (TCP: the handshake's last ACK). Both tables are LRUs of their own, so a flood of new
//!   flows evicts only other new flows, never an established connection.
//!
//! Ingress lets replies and the ICMP errors about a flow through; keys are symmetric to
//! build: a reply's key is the reverse of its own. TCP entries follow FIN and RST: a closed
//! connection stops passing replies after seconds, not days.

use aya_ebpf::{
    btf_maps::{Array, LruHashMap},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use isolation_common::{
    Addr, FlowKey, FlowValue, FragKey, Reason, flow_origin, flow_state, limits, timing,
};

use crate::parse::{
    self, Frag, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4, Packet, QuotedFlow,
};
use crate::whitelist::BPF_F_MMAPABLE;

/// New flows: seen leaving, not yet confirmed. LRU: when full, the oldest new flow goes.
#[btf_map]
static CONNTRACK: LruHashMap<FlowKey, FlowValue, { limits::CONNTRACK as usize }> =
    LruHashMap::new();

/// Established flows: answered and confirmed. Only other established flows compete here.
#[btf_map]
static ESTABLISHED: LruHashMap<FlowKey, FlowValue, { limits::ESTABLISHED as usize }> =
    LruHashMap::new();

/// Datagrams whose first fragment was admitted (as a reply, or by an allow rule): their
/// later fragments carry no ports, so they are recognised by (src, dst, IP id, proto).
#[btf_map]
static FRAGS: LruHashMap<FragKey, u64, { limits::FRAGS as usize }> = LruHashMap::new();

/// Remote hosts this host has (or had) flows with, one byte per hash slot: a packet whose
/// source hashes to an empty slot cannot be a reply, and skips both connection tables.
/// Under a flood from random sources that saves two lookups whose buckets are not in
/// cache, for one in a 128 KiB array that stays in cache. A slot is set before the flow
/// that needs it is recorded and never cleared by the datapath, so a set slot only costs a
/// lookup that finds nothing. A slot is a byte written whole (no read-modify-write of its
/// neighbours), here and by the loader (seeded connections) through a shared mapping of
/// the array (BPF_F_MMAPABLE), so no writer can undo another's slot.
#[btf_map]
static PEERS: Array<u64, { limits::PEER_WORDS as usize }, BPF_F_MMAPABLE> = Array::new();

/// The byte of the slot of an address hashed to `hash` (`addr_hash`), inside its element
/// of PEERS. A slot holds the generation it was marked in (`peer_gen`).
#[inline(always)]
fn peer_byte(hash: u64) -> Option<*mut u8> {
    let slot = isolation_common::peer_slot_of(hash);
    let w = PEERS.get_ptr_mut(slot >> 3)?;
    // SAFETY: slot & 7 < 8, the element's size: inside the map value.
    Some(unsafe { (w as *mut u8).add((slot & 7) as usize) })
}

/// Could the address hashed to `hash` be the remote end of a recorded flow? `peers` is
/// `Config::peers`.
#[inline(always)]
fn maybe_peer(hash: u64, peers: u32) -> bool {
    match peer_byte(hash) {
        // SAFETY: a byte of a PEERS element, which lives as long as the program.
        Some(b) => isolation_common::peer_gen::accepts(peers, unsafe { *b }),
        None => true,
    }
}

/// Marks `a` as the remote end of a flow with the current generation (written only when
/// it changes: every packet of a flow comes through here, and a write would pull the line
/// away from other CPUs).
#[inline(always)]
fn mark_peer(family: u8, a: &Addr, peers: u32) {
    if let Some(b) = peer_byte(isolation_common::addr_hash(family, a)) {
        let g = isolation_common::peer_gen::mark(peers);
        // SAFETY: as in maybe_peer; a byte store touches no other slot.
        unsafe {
            if *b != g {
                core::ptr::write_volatile(b, g);
            }
        }
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// How long an entry lives after its last packet, by protocol, table and TCP state.
#[inline(always)]
fn timeout(proto: u8, state: u32, established: bool) -> u64 {
    match proto {
        IPPROTO_TCP => {
            let fins = state & (flow_state::FIN_OUT | flow_state::FIN_IN);
            if state & flow_state::RST != 0 || fins == flow_state::FIN_OUT | flow_state::FIN_IN {
                timing::TCP_CLOSED_TIMEOUT_NS
            } else if fins != 0 {
                timing::TCP_FIN_TIMEOUT_NS
            } else if established {
                timing::TCP_TIMEOUT_NS
            } else {
                timing::TCP_NEW_TIMEOUT_NS
            }
        }
        IPPROTO_UDP if established => timing::UDP_TIMEOUT_NS,
        IPPROTO_UDP => timing::UDP_NEW_TIMEOUT_NS,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => timing::ICMP_TIMEOUT_NS,
        _ => timing::OTHER_TIMEOUT_NS,
    }
}

/// Is this entry still alive at `now`?
#[inline(always)]
fn alive(v: *const FlowValue, proto: u8, established: bool, now: u64) -> bool {
    let (last, state) = unsafe { ((*v).last_seen_ns, (*v).state) };
    now.wrapping_sub(last) < timeout(proto, state, established) || now < last
}

/// The close bits a TCP packet adds, in the direction given by `fin`.
#[inline(always)]
fn close_bits(pkt: &Packet, fin: u32) -> u32 {
    if pkt.proto != IPPROTO_TCP {
        return 0;
    }
    let mut b = 0;
    if pkt.tcp_flags & TCP_FIN != 0 {
        b |= fin;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        b |= flow_state::RST;
    }
    b
}

/// Adds state bits; a close restarts the entry's (now short) clock. Racing writers may
/// lose a bit: the next packet of the flow sets it again.
#[inline(always)]
fn add_state(v: *mut FlowValue, bits: u32, now: u64) {
    unsafe {
        let st = (*v).state;
        if st | bits != st {
            (*v).state = st | bits;
            if bits & !flow_state::REPLIED != 0 {
                (*v).last_seen_ns = now;
            }
        }
    }
}

/// Has a FIN or a RST been seen on this connection?
#[inline(always)]
fn closing(v: *const FlowValue) -> bool {
    let state = unsafe { (*v).state };
    state & (flow_state::FIN_OUT | flow_state::FIN_IN | flow_state::RST) != 0
}

/// An entry of either table, alive: established first (most replies belong there).
#[inline(always)]
fn find(key: &FlowKey, now: u64) -> Option<*mut FlowValue> {
    if let Some(v) = ESTABLISHED.get_ptr_mut(key)
        && alive(v, key.proto, true, now)
    {
        return Some(v);
    }
    match CONNTRACK.get_ptr_mut(key) {
        Some(v) if alive(v, key.proto, false, now) => Some(v),
        _ => None,
    }
}

/// Is this incoming packet a reply of a flow that left us? Marks the flow answered.
/// `src_hash` is `addr_hash` of its source (computed once per packet), `peers`
/// `Config::peers`.
#[inline(always)]
pub fn is_reply(pkt: &Packet, src_hash: u64, peers: u32) -> bool {
    if pkt.l4 != L4::Ok {
        return false;
    }
    // A SYN without ACK opens a connection; it never answers one.
    if pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return false;
    }
    if !maybe_peer(src_hash, peers) {
        return false;
    }
    let key = FlowKey {
        src: pkt.dst.0,
        dst: pkt.src.0,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    let now = now();
    match find(&key, now) {
        Some(v) => {
            add_state(
                v,
                flow_state::REPLIED | close_bits(pkt, flow_state::FIN_IN),
                now,
            );
            true
        }
        None => false,
    }
}

/// Is this an ICMP error quoting a flow that left us?
#[inline(always)]
pub fn is_related(start: usize, end: usize, pkt: &Packet) -> bool {
    if pkt.l4 != L4::Ok
        || !(pkt.proto == IPPROTO_ICMP || pkt.proto == IPPROTO_ICMPV6)
        || !parse::is_icmp_error(pkt.family, pkt.tcp_flags)
    {
        return false;
    }
    let mut q = QuotedFlow {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: 0,
    };
    if !parse::parse_quoted(start, end, pkt, &mut q) {
        return false;
    }
    // The quoted packet is one we sent, and it must be about the host this error is for.
    if q.src != pkt.dst.0 {
        return false;
    }
    let key = FlowKey {
        src: q.src,
        dst: q.dst,
        sport: q.sport,
        dport: q.dport,
        proto: q.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    find(&key, now()).is_some()
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src.0,
        dst: pkt.dst.0,
        id: pkt.frag_id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Remember an admitted first fragment (a reply, or a request an allow rule admitted by
/// its ports), so its later fragments, which carry no ports, follow it.
#[inline(always)]
pub fn remember_fragment(pkt: &Packet) {
    if pkt.frag == Frag::First {
        let _ = FRAGS.insert(&frag_key(pkt), &now(), 0);
    }
}

#[inline(always)]
pub fn is_admitted_fragment(pkt: &Packet) -> bool {
    if pkt.frag != Frag::Later {
        return false;
    }
    match FRAGS.get_ptr(&frag_key(pkt)) {
        Some(t) => now().wrapping_sub(unsafe { *t }) < timing::FRAG_TIMEOUT_NS,
        None => false,
    }
}

/// The flow of a packet, in the packet's own direction.
#[inline(always)]
fn flow_of(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.src.0,
        dst: pkt.dst.0,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Refreshes an entry at most once a second: every packet of a flow comes through here,
/// and a map write per packet would cost more than the whole verdict.
#[inline(always)]
fn refresh(v: *mut FlowValue, now: u64) {
    unsafe {
        if now.wrapping_sub((*v).last_seen_ns) > timing::REFRESH_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// Egress: record, refresh or confirm the flow of an outgoing packet. The reason says
/// which (`EgressIgnored` when the packet opens nothing). `peers` is `Config::peers`.
#[inline(always)]
pub fn track(pkt: &Packet, peers: u32) -> Reason {
    if pkt.l4 != L4::Ok {
        return Reason::EgressIgnored;
    }
    // Only echo requests expect a reply; errors and replies we send open nothing.
    if (pkt.proto == IPPROTO_ICMP || pkt.proto == IPPROTO_ICMPV6)
        && !(pkt.tcp_flags == parse::ICMP_ECHO || pkt.tcp_flags == parse::ICMPV6_ECHO_REQUEST)
    {
        return Reason::EgressIgnored;
    }
    let key = flow_of(pkt);
    // Before the flow is recorded: its replies must never find the slot empty.
    mark_peer(pkt.family, &pkt.dst, peers);
    let close = close_bits(pkt, flow_state::FIN_OUT);
    // A SYN on a tuple whose connection was closing (FIN or RST seen) opens a new one, as
    // the kernel's conntrack does: it must not inherit the short close timeout.
    let reopen =
        pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
    let now = now();
    if let Some(v) = ESTABLISHED.get_ptr_mut(&key) {
        if alive(v, key.proto, true, now) && !(reopen && closing(v)) {
            refresh(v, now);
            add_state(v, close, now);
            return Reason::EgressTracked;
        }
        // Over (closed or timed out): the tuple starts again as a new flow.
        let _ = ESTABLISHED.remove(&key);
    }
    if let Some(v) = CONNTRACK.get_ptr_mut(&key)
        && alive(v, key.proto, false, now)
        && !(reopen && closing(v))
    {
        let st = unsafe { (*v).state } | close;
        if st & flow_state::REPLIED != 0 && st & flow_state::RST == 0 {
            // Answered, and its opener speaks again: established. If the table refuses
            // (it cannot while it is an LRU), the flow stays new and keeps working.
            let e = FlowValue {
                last_seen_ns: now,
                origin: unsafe { (*v).origin },
                state: st,
            };
            if ESTABLISHED.insert(&key, &e, 0).is_ok() {
                let _ = CONNTRACK.remove(&key);
                return Reason::EgressConfirmed;
            }
        }
        refresh(v, now);
        add_state(v, close, now);
        return Reason::EgressTracked;
    }
    // A RST opens nothing: recording it would let the peer in on that tuple.
    if close & flow_state::RST != 0 {
        return Reason::EgressIgnored;
    }
    let v = FlowValue {
        last_seen_ns: now,
        origin: flow_origin::EGRESS,
        state: close,
    };
    let _ = CONNTRACK.insert(&key, &v, 0);
    Reason::EgressNew
}
