//! What a packet gets, read straight off the policy: the decision of PRODUCT.md, pure and
//! without compilation. It is the oracle every backend is tested against, and shares nothing
//! with a backend's compiler but the policy types, so a compiler bug cannot be mirrored here.
//!
//! Its size: PRODUCT.md's rules in their order, each beside its reason; read top to bottom it
//! is the specification.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use isolation_common::Reason;

use ipnet::IpNet;

use crate::policy::{DefaultAction, Endpoint, Policy, PortSpec};

fn resolve(p: &Policy, e: &Endpoint) -> Vec<IpNet> {
    match e {
        Endpoint::Cidr(c) => vec![*c],
        Endpoint::Network(n) => p.networks.get(n).cloned().unwrap_or_default(),
    }
}

/// A packet as the isolation stage sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Source and destination port (ICMP echo: (id, 0) for requests, (0, id) for replies);
    /// None when they cannot be read (a later fragment).
    pub ports: Option<(u16, u16)>,
}

impl Pkt {
    pub fn reversed(&self) -> Pkt {
        Pkt {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            ports: self.ports.map(|(s, d)| (d, s)),
        }
    }
}

/// What isolation decides, and which rule (bit) decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    NotSubject,
    Except(u32),
    Hairpin,
    Established,
    Allow(u32),
    DefaultAccept,
    Deny,
}

/// Isolation as PRODUCT.md orders it: except, hairpin, established, allow, default.
/// `established` says whether the packet belongs to a connection already allowed.
pub fn isolation(p: &Policy, pkt: &Pkt, established: bool) -> Decision {
    let has = |e: &Endpoint, a: &IpAddr| resolve(p, e).iter().any(|n| n.contains(a));
    let nets_of = |a: &IpAddr| -> HashSet<&String> {
        p.networks
            .iter()
            .filter(|(_, s)| s.iter().any(|n| n.contains(a)))
            .map(|(n, _)| n)
            .collect()
    };
    let (sn, dn) = (nets_of(&pkt.src), nets_of(&pkt.dst));
    if p.networks.is_empty() || sn.is_empty() || dn.is_empty() {
        return Decision::NotSubject;
    }
    for (j, r) in p.isolation.except.iter().enumerate() {
        if (has(&r.from, &pkt.src) && has(&r.to, &pkt.dst))
            || (has(&r.from, &pkt.dst) && has(&r.to, &pkt.src))
        {
            return Decision::Except(j as u32);
        }
    }
    if !sn.is_disjoint(&dn) {
        return Decision::Hairpin;
    }
    if established {
        return Decision::Established;
    }
    for (k, r) in p.isolation.allow.iter().enumerate() {
        if !(has(&r.from, &pkt.src) && has(&r.to, &pkt.dst)) {
            continue;
        }
        let port_ok = r.ports.is_empty()
            || r.ports.iter().any(|s| match (*s, pkt.ports) {
                (PortSpec::Tcp(lo, hi), Some((_, d))) => pkt.proto == 6 && (lo..=hi).contains(&d),
                (PortSpec::Udp(lo, hi), Some((_, d))) => pkt.proto == 17 && (lo..=hi).contains(&d),
                (PortSpec::Icmp, Some(_)) => pkt.proto == 1 || pkt.proto == 58,
                (_, None) => false,
            });
        if port_ok {
            return Decision::Allow(k as u32);
        }
    }
    match p.isolation.default {
        DefaultAction::Accept => Decision::DefaultAccept,
        DefaultAction::Deny => Decision::Deny,
    }
}

// --- The whole decision: whitelist, connections, isolation, REJECT ---

/// Where a packet sits in a fragmented datagram, and the datagram's IP id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Frag {
    No,
    /// Offset 0, more to come: carries the L4 header.
    First(u32),
    /// Offset > 0: no L4 header, only the protocol is known.
    Later(u32),
}

/// What follows the IP header, as far as the decision reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Body {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// UDP carrying an Ethernet frame with this packet (VXLAN), to `dport`.
    Vxlan {
        sport: u16,
        dport: u16,
        inner: Box<Packet>,
    },
    Echo {
        request: bool,
        id: u16,
    },
    /// An ICMP or ICMPv6 error (of this type) quoting the header of `quoted`.
    IcmpError {
        type_: u8,
        quoted: Box<Packet>,
    },
    /// A protocol whose header the datapath does not read (ports unknown).
    Other(u8),
}

/// A packet as the oracle sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub frag: Frag,
    pub body: Body,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    pub fn proto(&self) -> u8 {
        let v6 = self.src.is_ipv6();
        match &self.body {
            Body::Tcp { .. } => 6,
            Body::Udp { .. } | Body::Vxlan { .. } => 17,
            Body::Echo { .. } | Body::IcmpError { .. } => {
                if v6 {
                    58
                } else {
                    1
                }
            }
            Body::Other(p) => *p,
        }
    }

    /// Its ports as the flow table keys them (ICMP echo: request (id, 0), reply (0, id));
    /// None when the L4 header is not read (a later fragment, a protocol without ports).
    pub fn ports(&self) -> Option<(u16, u16)> {
        if matches!(self.frag, Frag::Later(_)) {
            return None;
        }
        match &self.body {
            Body::Tcp { sport, dport, .. }
            | Body::Udp { sport, dport }
            | Body::Vxlan { sport, dport, .. } => Some((*sport, *dport)),
            Body::Echo { request: true, id } => Some((*id, 0)),
            Body::Echo { request: false, id } => Some((0, *id)),
            Body::IcmpError { .. } => Some((0, 0)),
            Body::Other(_) => None,
        }
    }

    /// The isolation question about this packet.
    pub fn pkt(&self) -> Pkt {
        Pkt {
            src: self.src,
            dst: self.dst,
            proto: self.proto(),
            ports: self.ports(),
        }
    }

    /// The packet's own flow (None: nothing to key it by).
    fn flow(&self) -> Option<Flow> {
        self.ports().map(|(sport, dport)| Flow {
            src: self.src,
            dst: self.dst,
            proto: self.proto(),
            sport,
            dport,
        })
    }

    /// May a denied packet be answered (REJECT)? Never an answer to an answer, as iptables'
    /// REJECT and the kernel's icmp_send refuse: not a TCP RST, not an ICMP error, not a
    /// later fragment, nothing from or to a multicast or broadcast address.
    pub fn answerable(&self) -> bool {
        if matches!(self.frag, Frag::Later(_)) || !unicast(self.src) || !unicast(self.dst) {
            return false;
        }
        match &self.body {
            Body::Tcp { flags, .. } => flags & TCP_RST == 0,
            Body::IcmpError { .. } => false,
            _ => true,
        }
    }
}

fn unicast(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => !v.is_unspecified() && !v.is_broadcast() && !v.is_multicast(),
        IpAddr::V6(v) => !v.is_unspecified() && !v.is_multicast(),
    }
}

/// A connection, keyed in its original direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    fn reversed(self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// What happens to a packet arriving on an attached interface, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The reason it is counted under.
    pub reason: Reason,
    /// The allow rule or except entry that decided it: ("allow" | "except", index).
    pub rule: Option<(&'static str, u32)>,
    /// Judged by the packet it carries (VXLAN), not by itself.
    pub tunnelled: bool,
}

/// What the datapath does with a packet arriving on an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    /// Answered (TCP RST or ICMP administratively prohibited), never delivered.
    Reject,
}

/// What is known of a connection: the datapath's two tables (new, established) without
/// their clocks (a case runs in well under the shortest timeout).
#[derive(Clone, Copy, Debug, Default)]
struct Conn {
    /// Answered, then confirmed by its opener: in the established table.
    established: bool,
    /// A packet in the reply direction passed.
    replied: bool,
    /// A RST was seen: it will never be confirmed.
    reset: bool,
    /// A FIN or a RST was seen: a SYN on its tuple opens a new connection.
    closing: bool,
}

/// PRODUCT.md's whole decision for a host with the policy attached: the host whitelist,
/// the connections that left through an attached interface (their replies, the ICMP errors
/// about them and the later fragments of admitted datagrams pass), isolation, and what
/// REJECT may answer. It remembers connections as the datapath must: only those seen
/// leaving (`egress`), never a packet merely seen arriving.
pub struct Oracle<'p> {
    policy: &'p Policy,
    flows: HashMap<Flow, Conn>,
    /// Datagrams (src, dst, IP id, protocol) whose first fragment was admitted as a reply
    /// or by an allow rule.
    frags: HashSet<(IpAddr, IpAddr, u32, u8)>,
}

impl<'p> Oracle<'p> {
    pub fn new(policy: &'p Policy) -> Oracle<'p> {
        Oracle {
            policy,
            flows: HashMap::new(),
            frags: HashSet::new(),
        }
    }

    /// A packet leaving through an attached interface: a new connection is recorded, a
    /// known one refreshed, an answered one confirmed (established) by its opener's next
    /// packet. The reason is the one the datapath counts.
    pub fn egress(&mut self, p: &Packet) -> Reason {
        let r = self.track(p);
        // The overlay connection inside an outgoing VXLAN datagram is tracked too (not in a
        // later fragment, which has no UDP header; inside a tunnel an IPv6 fragment header
        // hides the ports: nothing to track).
        if let Body::Vxlan { dport, inner, .. } = &p.body
            && !matches!(p.frag, Frag::Later(_))
            && self.policy.isolation.vxlan_ports.contains(dport)
            && !(inner.src.is_ipv6() && matches!(inner.frag, Frag::First(_)))
        {
            self.track(inner);
        }
        r
    }

    fn track(&mut self, p: &Packet) -> Reason {
        let Some(f) = p.flow() else {
            return Reason::EgressIgnored;
        };
        let (reset, fin, syn) = match &p.body {
            Body::Tcp { flags, .. } => (
                flags & TCP_RST != 0,
                flags & TCP_FIN != 0,
                flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
            ),
            // Only echo requests expect a reply; errors and replies we send open nothing.
            Body::Echo { request: false, .. } | Body::IcmpError { .. } | Body::Other(_) => {
                return Reason::EgressIgnored;
            }
            _ => (false, false, false),
        };
        match self.flows.get_mut(&f) {
            Some(c) if !(syn && c.closing) => {
                c.reset |= reset;
                c.closing |= reset || fin;
                if !c.established && c.replied && !c.reset {
                    c.established = true;
                    Reason::EgressConfirmed
                } else {
                    Reason::EgressTracked
                }
            }
            // A RST opens nothing.
            None if reset => Reason::EgressIgnored,
            _ => {
                let c = Conn {
                    closing: fin,
                    ..Conn::default()
                };
                self.flows.insert(f, c);
                Reason::EgressNew
            }
        }
    }

    /// A reply of a connection that left (a TCP SYN without ACK never is one); marks the
    /// connection answered.
    fn is_reply(&mut self, p: &Packet) -> bool {
        let Some(f) = p.flow() else {
            return false;
        };
        let (mut reset, mut fin) = (false, false);
        if let Body::Tcp { flags, .. } = p.body {
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                return false;
            }
            reset = flags & TCP_RST != 0;
            fin = flags & TCP_FIN != 0;
        }
        match self.flows.get_mut(&f.reversed()) {
            Some(c) => {
                c.replied = true;
                c.reset |= reset;
                c.closing |= reset || fin;
                true
            }
            None => false,
        }
    }

    /// An ICMP error about a connection that left from the host it is addressed to.
    fn is_related(&self, p: &Packet) -> bool {
        let Body::IcmpError { quoted, .. } = &p.body else {
            return false;
        };
        if matches!(p.frag, Frag::Later(_)) || quoted.src != p.dst {
            return false;
        }
        let quotable = matches!(
            quoted.body,
            Body::Tcp { .. }
                | Body::Udp { .. }
                | Body::Vxlan { .. }
                | Body::Echo { request: true, .. }
        );
        quotable && quoted.flow().is_some_and(|f| self.flows.contains_key(&f))
    }

    fn frag_key(p: &Packet, id: u32) -> (IpAddr, IpAddr, u32, u8) {
        (p.src, p.dst, id, p.proto())
    }

    /// A first fragment was admitted (a reply, or by an allow rule): its later fragments
    /// follow it.
    fn remember_fragment(&mut self, p: &Packet) {
        if let Frag::First(id) = p.frag {
            self.frags.insert(Self::frag_key(p, id));
        }
    }

    fn is_admitted_fragment(&self, p: &Packet) -> bool {
        matches!(p.frag, Frag::Later(id) if self.frags.contains(&Self::frag_key(p, id)))
    }

    /// The connection memory's answer, in the order the datapath asks it.
    fn conntracked(&mut self, p: &Packet) -> Option<Reason> {
        if self.is_reply(p) {
            self.remember_fragment(p);
            Some(Reason::PassEstablished)
        } else if self.is_related(p) {
            Some(Reason::PassRelated)
        } else if self.is_admitted_fragment(p) {
            Some(Reason::PassFragment)
        } else {
            None
        }
    }

    /// A packet arriving on an attached interface: what happens to it, and why.
    pub fn ingress(&mut self, p: &Packet) -> Verdict {
        let wl = &self.policy.whitelist;
        let done = |reason: Reason| Verdict {
            action: action_of(reason),
            reason,
            rule: None,
            tunnelled: false,
        };
        // Stage 0: the blocklist, before anything else (replies included).
        let bl = &self.policy.blocklist;
        if bl.enabled && bl.entries.iter().any(|n| n.contains(&p.src)) {
            return done(Reason::DropBlocked);
        }
        // Stage 1: the host whitelist.
        let mut conntracked = None;
        let admitted = if !wl.enabled {
            Reason::PassWhitelistOff
        } else if wl.allow.iter().any(|n| n.contains(&p.src)) {
            Reason::PassWhitelist
        } else if let Some(r) = self.conntracked(p) {
            conntracked = Some(r);
            r
        } else {
            return done(Reason::DropNotWhitelisted);
        };
        // Stage 2: isolation, once there are networks.
        if self.policy.networks.is_empty() {
            return done(admitted);
        }
        let (judged, conntracked, can_reject, tunnelled) = match &p.body {
            Body::Vxlan { dport, inner, .. }
                if self.policy.isolation.vxlan_ports.contains(dport)
                    && !matches!(p.frag, Frag::Later(_)) =>
            {
                // The inner packet, judged by isolation alone (the outer connection says
                // nothing about it); inside a tunnel a deny is a drop, never answered.
                (inner.as_ref(), None, false, true)
            }
            // Datagrams to a VXLAN port are tunnels: one that carries no frame cannot be
            // judged, and what cannot be judged is dropped.
            Body::Udp { dport, .. }
                if self.policy.isolation.vxlan_ports.contains(dport)
                    && !matches!(p.frag, Frag::Later(_)) =>
            {
                return done(Reason::DropMalformed);
            }
            _ => (p, conntracked, true, false),
        };
        let mut judged = judged.clone();
        // Inside a tunnel IPv6 extension headers are not walked: a fragment header hides
        // the L4 header, so the inner packet is judged as one without ports.
        if tunnelled && judged.src.is_ipv6() && matches!(judged.frag, Frag::First(_)) {
            judged.body = Body::Other(judged.proto());
        }
        let reason = self
            .isolation_verdict(&judged, conntracked, can_reject)
            .unwrap_or(admitted);
        let rule = match reason {
            Reason::PassAllow | Reason::PassExcept => self.deciding_rule(&judged),
            _ => None,
        };
        Verdict {
            action: action_of(reason),
            reason,
            rule,
            tunnelled,
        }
    }

    fn isolation_verdict(
        &mut self,
        p: &Packet,
        conntracked: Option<Reason>,
        can_reject: bool,
    ) -> Option<Reason> {
        let pkt = p.pkt();
        // Except and hairpin first; a connection already allowed next; then the rules.
        match isolation(self.policy, &pkt, false) {
            Decision::NotSubject => return None,
            Decision::Except(_) => return Some(Reason::PassExcept),
            Decision::Hairpin => return Some(Reason::PassHairpin),
            _ => {}
        }
        if let Some(r) = conntracked.or_else(|| self.conntracked(p)) {
            return Some(r);
        }
        Some(match isolation(self.policy, &pkt, false) {
            Decision::Allow(_) => {
                self.remember_fragment(p);
                Reason::PassAllow
            }
            Decision::DefaultAccept => Reason::PassDefault,
            _ if self.policy.isolation.reject && can_reject && p.answerable() => {
                Reason::RejectIsolated
            }
            _ => Reason::DropIsolated,
        })
    }

    /// The allow rule or except entry that decides a packet (for per-rule counters):
    /// ("allow" or "except", its index).
    pub fn deciding_rule(&self, p: &Packet) -> Option<(&'static str, u32)> {
        match isolation(self.policy, &p.pkt(), false) {
            Decision::Except(j) => Some(("except", j)),
            Decision::Allow(k) => Some(("allow", k)),
            _ => None,
        }
    }
}

fn action_of(r: Reason) -> Action {
    match r {
        Reason::RejectIsolated => Action::Reject,
        r if r.is_drop() => Action::Drop,
        _ => Action::Pass,
    }
}
