//! Connection memory: the TC egress program records every flow leaving an attached
//! interface in its original direction; ingress lets its replies and the ICMP errors
//! about it through. Keys are symmetric to build: a reply's key is the reverse of its own.

use aya_ebpf::{btf_maps::LruHashMap, helpers::bpf_ktime_get_ns, macros::btf_map};
use isolation_common::{FlowKey, FlowValue, FragKey, flow_origin, limits, timing};

use crate::parse::{
    self, Frag, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, L4, Packet, QuotedFlow,
};

/// Flows seen leaving, keyed in their original direction. LRU: a full table forgets the
/// oldest flow instead of refusing new ones.
#[btf_map]
static CONNTRACK: LruHashMap<FlowKey, FlowValue, { limits::CONNTRACK as usize }> =
    LruHashMap::new();

/// Datagrams whose first fragment was let in as a reply: their later fragments carry no
/// ports, so they are recognised by (src, dst, IP id, proto).
#[btf_map]
static FRAGS: LruHashMap<FragKey, u64, { limits::FRAGS as usize }> = LruHashMap::new();

#[inline(always)]
fn timeout(proto: u8) -> u64 {
    match proto {
        IPPROTO_TCP => timing::TCP_TIMEOUT_NS,
        IPPROTO_UDP => timing::UDP_TIMEOUT_NS,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => timing::ICMP_TIMEOUT_NS,
        _ => timing::OTHER_TIMEOUT_NS,
    }
}

#[inline(always)]
fn alive(key: &FlowKey) -> bool {
    match CONNTRACK.get_ptr(key) {
        Some(v) => {
            let last = unsafe { (*v).last_seen_ns };
            let now = unsafe { bpf_ktime_get_ns() };
            now.wrapping_sub(last) < timeout(key.proto) || now < last
        }
        None => false,
    }
}

/// Is this incoming packet a reply of a flow that left us?
#[inline(always)]
pub fn is_reply(pkt: &Packet) -> bool {
    if pkt.l4 != L4::Ok {
        return false;
    }
    let key = FlowKey {
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    alive(&key)
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
    if q.src != pkt.dst {
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
    alive(&key)
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Remember a first fragment admitted as a reply, so its later fragments follow it.
#[inline(always)]
pub fn remember_fragment(pkt: &Packet) {
    if pkt.frag == Frag::First {
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = FRAGS.insert(&frag_key(pkt), &now, 0);
    }
}

#[inline(always)]
pub fn is_admitted_fragment(pkt: &Packet) -> bool {
    if pkt.frag != Frag::Later {
        return false;
    }
    match FRAGS.get_ptr(&frag_key(pkt)) {
        Some(t) => {
            let now = unsafe { bpf_ktime_get_ns() };
            now.wrapping_sub(unsafe { *t }) < timing::FRAG_TIMEOUT_NS
        }
        None => false,
    }
}

/// Isolation: an allow rule admitted this packet; remember its flow (original direction =
/// this packet) so replies pass.
#[inline(always)]
pub fn remember(pkt: &Packet) {
    if pkt.l4 != L4::Ok {
        return;
    }
    touch(&flow_of(pkt), flow_origin::ALLOWED);
}

/// The flow of a packet, in the packet's own direction.
#[inline(always)]
fn flow_of(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Records a flow, or refreshes it at most once a second: every packet of a flow comes
/// through here, and a map write per packet would cost more than the whole verdict.
#[inline(always)]
fn touch(key: &FlowKey, origin: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    match CONNTRACK.get_ptr_mut(key) {
        Some(v) => unsafe {
            if now.wrapping_sub((*v).last_seen_ns) > timing::REFRESH_NS {
                (*v).last_seen_ns = now;
            }
        },
        None => {
            let v = FlowValue {
                last_seen_ns: now,
                origin,
                _pad: 0,
            };
            let _ = CONNTRACK.insert(key, &v, 0);
        }
    }
}

/// Egress: record (or refresh, at most once a second) the flow of an outgoing packet.
/// Returns false when the packet is not worth tracking.
#[inline(always)]
pub fn track(pkt: &Packet) -> bool {
    if pkt.l4 != L4::Ok {
        return false;
    }
    match pkt.proto {
        // A RST opens nothing: tracking it would let the peer in on that tuple.
        IPPROTO_TCP if pkt.tcp_flags & 0x04 != 0 => return false,
        // Only echo requests expect a reply; errors and replies we send open nothing.
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if !(pkt.tcp_flags == parse::ICMP_ECHO
                || pkt.tcp_flags == parse::ICMPV6_ECHO_REQUEST) =>
        {
            return false;
        }
        _ => {}
    }
    touch(&flow_of(pkt), flow_origin::EGRESS);
    true
}
