//! What a packet gets, read straight off the policy: the decision of PRODUCT.md, pure and
//! without compilation. It is the oracle every backend is tested against, and shares nothing
//! with a backend's compiler but the policy types, so a compiler bug cannot be mirrored here.

use std::{collections::HashSet, net::IpAddr};

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
    /// May a denied packet be answered (REJECT)? Never an answer to an answer: not a later
    /// fragment (in this model, a TCP, UDP or ICMP packet whose ports could not be read),
    /// as iptables' REJECT and the kernel's icmp_send refuse. (TCP RSTs and ICMP errors,
    /// the other answers never answered, are not packets this model describes.)
    pub fn answerable(&self) -> bool {
        self.ports.is_some() || !matches!(self.proto, 1 | 6 | 17 | 58)
    }

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
