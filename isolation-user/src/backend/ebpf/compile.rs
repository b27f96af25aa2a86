//! The isolation policy compiler: pure, no I/O. Networks, allow rules and except rules
//! become LPM-trie entries (prefix → `NetEntry` of bitmasks) and a port table.
//!
//! Containment, as ipset's `hash:net` has it: a rule or network about 198.51.100.0/24 still
//! applies to an address that lies in a more specific /28 named elsewhere. An LPM lookup
//! returns only the longest matching prefix, so each prefix's entry is the union of its own
//! bits and those of every shorter prefix that contains it: whatever prefix the lookup
//! returns, it carries everything that applies to the address.
//!
//! The datapath then decides with two trie lookups (source, destination) and, for allow
//! rules with ports, one array lookup: `src.allow_from & dst.allow_to & ports[proto, dport]`.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use isolation_common::{NetEntry, PolicyMeta, iso_flags, limits, lowest_bit, ports};

use crate::{
    policy::{DefaultAction, Endpoint, Policy, PortSpec},
    semantics::{Decision, Pkt},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub meta: PolicyMeta,
    /// Prefix → entry, IPv4 and IPv6 alike (the loader splits them by family).
    pub prefixes: Vec<(IpNet, NetEntry)>,
    /// Indexed by `ports::*`: mask of allow rules admitting that protocol/port.
    pub ports: Vec<u64>,
    /// What each allow / except bit stands for (for `stats` and `check`).
    pub allow_names: Vec<String>,
    pub except_names: Vec<String>,
}

fn resolve(p: &Policy, e: &Endpoint) -> Vec<IpNet> {
    match e {
        Endpoint::Cidr(c) => vec![*c],
        Endpoint::Network(n) => p.networks.get(n).cloned().unwrap_or_default(),
    }
}

/// Checks the sizes the maps impose. `policy::parse` calls it, so a policy that does not fit
/// is refused whole before anything is applied.
pub fn check_limits(p: &Policy) -> Result<(), String> {
    let n = p.networks.len();
    if n > limits::NETWORKS {
        return Err(format!(
            "{n} networks; the datapath holds at most {}",
            limits::NETWORKS
        ));
    }
    let a = p.isolation.allow.len();
    if a > limits::ALLOW_RULES {
        return Err(format!(
            "{a} allow rules; the datapath holds at most {}",
            limits::ALLOW_RULES
        ));
    }
    let v = p.isolation.vxlan_ports.len();
    if v > limits::VXLAN_PORTS {
        return Err(format!(
            "{v} vxlan ports; the datapath holds at most {}",
            limits::VXLAN_PORTS
        ));
    }
    let e = p.isolation.except.len();
    if e > limits::EXCEPT_RULES {
        return Err(format!(
            "{e} except rules; the datapath holds at most {}",
            limits::EXCEPT_RULES
        ));
    }
    Ok(())
}

pub fn compile(p: &Policy) -> Result<Compiled, String> {
    check_limits(p)?;
    let mut own: HashMap<IpNet, NetEntry> = HashMap::new();
    let mut add = |net: IpNet, f: &dyn Fn(&mut NetEntry)| f(own.entry(net.trunc()).or_default());
    for (i, subnets) in p.networks.values().enumerate() {
        for s in subnets {
            add(*s, &|e| e.nets |= 1 << i);
        }
    }
    let (allow_names, except_names) = crate::backend::rule_names(p);
    for (k, r) in p.isolation.allow.iter().enumerate() {
        for s in resolve(p, &r.from) {
            add(s, &|e| e.allow_from |= 1 << k);
        }
        for s in resolve(p, &r.to) {
            add(s, &|e| e.allow_to |= 1 << k);
        }
    }
    for (j, r) in p.isolation.except.iter().enumerate() {
        for s in resolve(p, &r.from) {
            add(s, &|e| e.except_from |= 1 << j);
        }
        for s in resolve(p, &r.to) {
            add(s, &|e| e.except_to |= 1 << j);
        }
    }

    // Merge every containing (shorter) prefix into each entry.
    let mut prefixes = Vec::with_capacity(own.len());
    for net in own.keys() {
        let mut e = NetEntry::default();
        // (The mutant keeps only the prefix's own bits: the differential test must notice.)
        let shortest = if crate::mutants::NO_CONTAINMENT {
            net.prefix_len()
        } else {
            0
        };
        for len in shortest..=net.prefix_len() {
            let sup = IpNet::new(net.addr(), len).expect("shorter prefix").trunc();
            if let Some(o) = own.get(&sup) {
                e.nets |= o.nets;
                e.allow_from |= o.allow_from;
                e.allow_to |= o.allow_to;
                e.except_from |= o.except_from;
                e.except_to |= o.except_to;
            }
        }
        prefixes.push((*net, e));
    }
    prefixes.sort_by_key(|(n, _)| *n);
    for v6 in [false, true] {
        let count = prefixes
            .iter()
            .filter(|(n, _)| matches!(n, IpNet::V6(_)) == v6)
            .count();
        if count > limits::NET_PREFIXES as usize {
            return Err(format!(
                "{count} distinct IPv{} prefixes in networks and rules; the datapath holds at most {}",
                if v6 { 6 } else { 4 },
                limits::NET_PREFIXES
            ));
        }
    }

    let mut table = vec![0u64; ports::LEN as usize];
    for (k, r) in p.isolation.allow.iter().enumerate() {
        let bit = 1u64 << k;
        if r.ports.is_empty() {
            table.iter_mut().for_each(|m| *m |= bit);
            continue;
        }
        for spec in &r.ports {
            let (base, lo, hi) = match *spec {
                PortSpec::Tcp(lo, hi) => (ports::TCP_BASE, lo, hi),
                PortSpec::Udp(lo, hi) => (ports::UDP_BASE, lo, hi),
                PortSpec::Icmp => (ports::ICMP, 0, 0),
            };
            let hi = if crate::mutants::PORT_RANGE_END && hi > lo {
                hi - 1
            } else {
                hi
            };
            for port in lo..=hi {
                table[(base + port as u32) as usize] |= bit;
            }
        }
    }

    let mut flags = 0;
    if !p.networks.is_empty() {
        flags |= iso_flags::ENABLED;
    }
    if p.isolation.default == DefaultAction::Deny {
        flags |= iso_flags::DENY;
    }
    if p.isolation.reject {
        flags |= iso_flags::REJECT;
    }
    let mut vxlan_ports = [0u16; limits::VXLAN_PORTS];
    for (slot, port) in vxlan_ports.iter_mut().zip(&p.isolation.vxlan_ports) {
        *slot = *port;
    }
    Ok(Compiled {
        meta: PolicyMeta {
            flags,
            _pad: 0,
            vxlan_ports,
        },
        prefixes,
        ports: table,
        allow_names,
        except_names,
    })
}

/// Longest-prefix match over the compiled entries (what the LPM trie answers).
pub fn lookup(c: &Compiled, a: &IpAddr) -> Option<NetEntry> {
    c.prefixes
        .iter()
        .filter(|(n, _)| n.contains(a))
        .max_by_key(|(n, _)| n.prefix_len())
        .map(|(_, e)| *e)
}

/// The datapath's decision procedure over compiled entries: what the BPF program does, in
/// plain Rust (tested against `reference` without root; the BPF program is tested against
/// `reference` through BPF_PROG_TEST_RUN).
pub fn evaluate(c: &Compiled, pkt: &Pkt, established: bool) -> Decision {
    let mask = c.ports[ports::index(pkt.proto, pkt.ports.map(|(_, d)| d)) as usize];
    decide(
        c.meta.flags,
        lookup(c, &pkt.src),
        lookup(c, &pkt.dst),
        mask,
        established,
    )
}

/// The decision from what the maps answer: the slot's flags, the trie entries of source and
/// destination, and the port table's mask for the packet. `check` feeds it the live maps.
pub fn decide(
    flags: u32,
    s: Option<NetEntry>,
    d: Option<NetEntry>,
    port_mask: u64,
    established: bool,
) -> Decision {
    if flags & iso_flags::ENABLED == 0 {
        return Decision::NotSubject;
    }
    let (Some(s), Some(d)) = (s, d) else {
        return Decision::NotSubject;
    };
    if s.nets == 0 || d.nets == 0 {
        return Decision::NotSubject;
    }
    let ex = (s.except_from & d.except_to) | (s.except_to & d.except_from);
    if ex != 0 {
        return Decision::Except(lowest_bit(ex));
    }
    if s.nets & d.nets != 0 {
        return Decision::Hairpin;
    }
    if established {
        return Decision::Established;
    }
    let m = s.allow_from & d.allow_to & port_mask;
    if m != 0 {
        return Decision::Allow(lowest_bit(m));
    }
    if flags & iso_flags::DENY != 0 {
        Decision::Deny
    } else {
        Decision::DefaultAccept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    /// The example policy, with a network `ops` inside `it`.
    fn example() -> Policy {
        let text = format!(
            "{}\n[networks.ops]\nsubnets = [\"198.51.100.0/28\"]\n",
            policy::EXAMPLE
        );
        policy::parse("p", &text).unwrap()
    }

    fn pkt(src: &str, dst: &str, proto: u8, dport: u16) -> Pkt {
        Pkt {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            ports: Some((40000, dport)),
        }
    }

    #[test]
    fn the_product_scenario() {
        let p = example();
        let c = compile(&p).unwrap();
        let cases = [
            (
                pkt("198.51.100.130", "198.51.100.20", 6, 80),
                Decision::Allow(0),
            ),
            (
                pkt("198.51.100.130", "198.51.100.20", 6, 81),
                Decision::Deny,
            ),
            (
                pkt("198.51.100.20", "198.51.100.130", 6, 80),
                Decision::Deny,
            ),
            (
                pkt("198.51.100.20", "198.51.100.30", 17, 53),
                Decision::Hairpin,
            ),
            // Inside ops (/28) and it (/25): the more specific /28 does not hide `it`.
            (
                pkt("198.51.100.5", "198.51.100.100", 6, 22),
                Decision::Hairpin,
            ),
            (
                pkt("198.51.100.130", "198.51.100.5", 6, 80),
                Decision::Allow(0),
            ),
            (
                pkt("198.51.100.10", "198.51.100.200", 6, 22),
                Decision::Except(0),
            ),
            (
                pkt("198.51.100.200", "198.51.100.10", 6, 22),
                Decision::Except(0),
            ),
            (
                pkt("192.0.2.1", "198.51.100.10", 6, 22),
                Decision::NotSubject,
            ),
            (
                pkt("2001:db8:100::1", "2001:db8:100::2", 6, 22),
                Decision::Hairpin,
            ),
        ];
        for (p_, want) in cases {
            assert_eq!(
                crate::semantics::isolation(&p, &p_, false),
                want,
                "reference {p_:?}"
            );
            assert_eq!(evaluate(&c, &p_, false), want, "compiled {p_:?}");
        }
    }

    #[test]
    fn a_longer_prefix_carries_the_shorter_ones() {
        let p = example();
        let c = compile(&p).unwrap();
        let ops = c
            .prefixes
            .iter()
            .find(|(n, _)| n.to_string() == "198.51.100.0/28")
            .unwrap()
            .1;
        assert_eq!(ops.nets.count_ones(), 2, "ops and it");
        let allow_to = ops.allow_to;
        assert_ne!(allow_to, 0, "hr -> it applies inside ops too");
    }

    #[test]
    fn ports_table() {
        let p = example();
        let c = compile(&p).unwrap();
        assert_eq!(c.ports[(ports::TCP_BASE + 80) as usize], 1);
        assert_eq!(c.ports[(ports::TCP_BASE + 443) as usize], 1);
        assert_eq!(c.ports[(ports::TCP_BASE + 81) as usize], 0);
        assert_eq!(c.ports[(ports::UDP_BASE + 80) as usize], 0);
        assert_eq!(c.ports[ports::NO_PORT as usize], 0);
    }

    #[test]
    fn too_many_rules_are_refused() {
        let mut p = example();
        let r = p.isolation.allow[0].clone();
        p.isolation.allow = vec![r; limits::ALLOW_RULES + 1];
        assert!(compile(&p).unwrap_err().contains("at most 64"));
    }
}
