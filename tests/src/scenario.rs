//! Scenarios for the differential test: a policy (its intent, and the TOML text written for
//! it) and a sequence of packets, ingress and egress, built so that every decision of
//! PRODUCT.md is reached: replies of allowed and outgoing connections, ICMP errors about
//! them, later fragments of admitted replies, VXLAN, rules with ports and CIDR endpoints,
//! whitelists, addresses and prefixes across the whole range.
//!
//! A scenario is built from a sequence of numbers (`Choices`) that proptest generates and
//! shrinks: a shorter sequence, or smaller numbers, make a smaller scenario (0 is always the
//! simplest choice), so a failure shrinks to a short policy and a few packets.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use isolation_user::{
    policy::{AllowRule, DefaultAction, Endpoint, ExceptRule, Isolation, Policy, PortSpec},
    semantics::{Body, Frag, Packet},
};

use crate::pkt;

/// Reads choices; past the end every choice is 0.
pub struct Choices<'a> {
    v: &'a [u32],
    at: usize,
}

impl<'a> Choices<'a> {
    pub fn new(v: &'a [u32]) -> Choices<'a> {
        Choices { v, at: 0 }
    }
    fn next(&mut self) -> u32 {
        let x = self.v.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        x
    }
    /// 0..n
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n.max(1)
    }
    /// True with `percent` % (0 reads as false).
    fn chance(&mut self, percent: u32) -> bool {
        let x = self.next() % 100;
        x != 0 && x <= percent
    }
    fn pick<'b, T>(&mut self, v: &'b [T]) -> &'b T {
        &v[self.below(v.len() as u32) as usize]
    }
    /// Have the choices run out? (Then a scenario stops growing: past the end every choice
    /// is 0, and more packets would all be the same one.)
    fn exhausted(&self) -> bool {
        self.at >= self.v.len()
    }
    fn u128(&mut self) -> u128 {
        (0..4).fold(0u128, |a, _| (a << 32) | self.next() as u128)
    }
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    /// A packet arriving on the attached interface.
    In(Packet),
    /// A packet leaving through it (TC egress).
    Out(Packet),
}

#[derive(Clone, Debug)]
pub struct Scenario {
    /// The policy as intended (what the oracle reads).
    pub policy: Policy,
    /// The policy file written for it (what the datapath gets, through the parser).
    pub toml: String,
    pub steps: Vec<Step>,
}

const VXLAN_PORT: u16 = 4789;
/// Ports rules and packets draw from, so that they meet (and miss by one).
const PORTS: [u16; 8] = [22, 53, 79, 80, 81, 443, 8000, 8080];

fn net(a: IpAddr, len: u8) -> IpNet {
    IpNet::new(a, len).expect("prefix length").trunc()
}

fn v4(x: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(x))
}

fn v6(x: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(x))
}

/// A prefix anywhere in the address space.
fn anchor(c: &mut Choices, is_v6: bool) -> IpNet {
    if is_v6 {
        let len = *c.pick(&[64, 48, 96, 112, 120, 128, 127, 32, 80, 56, 64, 124, 0]);
        net(v6(c.u128()), len)
    } else {
        let len = *c.pick(&[24, 16, 28, 30, 32, 31, 26, 8, 20, 24, 28, 12, 0]);
        net(v4(c.next()), len)
    }
}

/// A random address inside `n`.
fn inside(c: &mut Choices, n: &IpNet) -> IpAddr {
    match n {
        IpNet::V4(n) => {
            let host = if n.prefix_len() == 32 {
                0
            } else {
                c.next() & (u32::MAX >> n.prefix_len())
            };
            v4(u32::from(n.network()) | host)
        }
        IpNet::V6(n) => {
            let host = if n.prefix_len() == 128 {
                0
            } else {
                c.u128() & (u128::MAX >> n.prefix_len())
            };
            v6(u128::from(n.network()) | host)
        }
    }
}

/// A prefix inside `n` (or `n` itself): overlaps and containment.
fn within(c: &mut Choices, n: &IpNet) -> IpNet {
    let max = n.max_prefix_len();
    let extra = c.below((max - n.prefix_len()) as u32 + 1) as u8;
    net(inside(c, n), n.prefix_len() + extra)
}

fn port_spec(c: &mut Choices) -> PortSpec {
    let lo = *c.pick(&PORTS);
    let hi = if c.chance(30) {
        lo + c.below(3) as u16
    } else {
        lo
    };
    match c.below(3) {
        0 => PortSpec::Tcp(lo, hi),
        1 => PortSpec::Udp(lo, hi),
        _ => PortSpec::Icmp,
    }
}

/// Builds a scenario from choices.
pub fn build(v: &[u32]) -> Scenario {
    let mut c = Choices::new(v);
    // The address space this scenario lives in: a few prefixes of each family, anywhere,
    // and prefixes inside them (so networks and rules overlap and contain each other).
    let mut prefixes = Vec::new();
    let anchors = 2 + c.below(5) as usize;
    for _ in 0..anchors {
        let v6 = c.chance(35);
        let a = anchor(&mut c, v6);
        prefixes.push(a);
    }
    for _ in 0..c.below(4) {
        let a = prefixes[c.below(anchors as u32) as usize];
        let w = within(&mut c, &a);
        prefixes.push(w);
    }
    let mut p = Policy::default();
    let n_nets = if c.chance(85) { 2 + c.below(4) } else { 0 };
    for i in 0..n_nets {
        // Each network its own anchor (so traffic crosses networks), sometimes one more
        // prefix from anywhere in the pool (so networks overlap and contain each other).
        let mut subnets = vec![prefixes[i as usize % anchors]];
        if c.chance(35) {
            let extra = *c.pick(&prefixes);
            if !subnets.contains(&extra) {
                subnets.push(extra);
            }
        }
        p.networks.insert(format!("n{i}"), subnets);
    }
    let names: Vec<String> = p.networks.keys().cloned().collect();
    let endpoint = |c: &mut Choices| -> Endpoint {
        if !names.is_empty() && !c.chance(30) {
            Endpoint::Network(c.pick(&names).clone())
        } else {
            Endpoint::Cidr(*c.pick(&prefixes))
        }
    };
    let mut iso = Isolation {
        default: if c.chance(30) {
            DefaultAction::Accept
        } else {
            DefaultAction::Deny
        },
        reject: !c.chance(20),
        ..Isolation::default()
    };
    if !names.is_empty() {
        for _ in 0..c.below(7) {
            let ports = if c.chance(60) {
                (0..1 + c.below(2)).map(|_| port_spec(&mut c)).collect()
            } else {
                vec![]
            };
            iso.allow.push(AllowRule {
                from: endpoint(&mut c),
                to: endpoint(&mut c),
                ports,
            });
        }
        for _ in 0..c.below(2) {
            iso.except.push(ExceptRule {
                from: endpoint(&mut c),
                to: endpoint(&mut c),
            });
        }
        if c.chance(40) {
            iso.vxlan_ports = vec![VXLAN_PORT];
        }
    }
    p.isolation = iso;
    if c.chance(50) {
        p.whitelist.enabled = true;
        p.whitelist.log = c.chance(50);
        for _ in 0..1 + c.below(4) {
            let pre = *c.pick(&prefixes);
            let e = if c.chance(50) {
                IpNet::from(inside(&mut c, &pre))
            } else {
                pre
            };
            if !p.whitelist.allow.contains(&e) {
                p.whitelist.allow.push(e);
            }
        }
    }
    // A blocklist: an address or a prefix of the pool, sometimes switched off.
    if c.chance(30) {
        for _ in 0..1 + c.below(2) {
            let pre = *c.pick(&prefixes);
            let e = if c.chance(60) {
                IpNet::from(inside(&mut c, &pre))
            } else {
                pre
            };
            if e.prefix_len() > 0 && !p.blocklist.entries.contains(&e) {
                p.blocklist.entries.push(e);
            }
        }
        p.blocklist.enabled = !c.chance(15);
        p.blocklist.log = c.chance(50);
    }
    let toml = render(&p, &mut c);
    let steps = packets(&mut c, &p, &prefixes);
    Scenario {
        policy: p,
        toml,
        steps,
    }
}

/// The policy file for a policy, written the ways an operator writes one.
fn render(p: &Policy, c: &mut Choices) -> String {
    let mut s = String::from("# generated\n");
    let iso = &p.isolation;
    let wrote_iso = !p.networks.is_empty() || c.chance(50);
    if wrote_iso {
        s.push_str("[isolation]\n");
        let d = if iso.default == DefaultAction::Deny {
            "deny"
        } else {
            "accept"
        };
        // "deny" is the default once the section is there.
        if d == "accept" || c.chance(50) {
            writeln!(s, "default = \"{d}\"   # default action").unwrap();
        }
        if !iso.reject || c.chance(50) {
            writeln!(s, "reject = {}", iso.reject).unwrap();
        }
        if !iso.vxlan_ports.is_empty() {
            writeln!(s, "vxlan_ports = [{}]", VXLAN_PORT).unwrap();
        }
    }
    let cidr = |n: &IpNet, c: &mut Choices| -> String {
        if n.prefix_len() == n.max_prefix_len() && c.chance(50) {
            n.addr().to_string()
        } else {
            n.to_string()
        }
    };
    for (name, subnets) in &p.networks {
        let list: Vec<String> = subnets
            .iter()
            .map(|n| format!("\"{}\"", cidr(n, c)))
            .collect();
        writeln!(s, "\n[networks.{name}]\nsubnets = [{}]", list.join(", ")).unwrap();
    }
    let ep = |e: &Endpoint, c: &mut Choices| match e {
        Endpoint::Network(n) => n.clone(),
        Endpoint::Cidr(n) => cidr(n, c),
    };
    for r in &iso.allow {
        let (f, t) = (ep(&r.from, c), ep(&r.to, c));
        writeln!(s, "\n[[isolation.allow]]\nfrom = \"{f}\"\nto = \"{t}\"").unwrap();
        if !r.ports.is_empty() {
            let ports: Vec<String> = r.ports.iter().map(|x| format!("\"{x}\"")).collect();
            writeln!(s, "ports = [{}]", ports.join(", ")).unwrap();
        }
    }
    for r in &iso.except {
        let (f, t) = (ep(&r.from, c), ep(&r.to, c));
        writeln!(s, "\n[[isolation.except]]\nfrom = \"{f}\"\nto = \"{t}\"").unwrap();
    }
    let wl = &p.whitelist;
    if wl.enabled {
        s.push_str("\n[whitelist]\n");
        if c.chance(50) {
            s.push_str("enabled = true\n");
        }
        if !wl.log || c.chance(50) {
            writeln!(s, "log = {}", wl.log).unwrap();
        }
        let list: Vec<String> = wl
            .allow
            .iter()
            .map(|n| format!("\"{}\"", cidr(n, c)))
            .collect();
        writeln!(s, "allow = [\n  {}\n]", list.join(",\n  ")).unwrap();
    } else if c.chance(20) {
        s.push_str("\n[whitelist]\nenabled = false\nallow = []\n");
    }
    let bl = &p.blocklist;
    if !bl.entries.is_empty() || !bl.enabled {
        s.push_str("\n[blocklist]\n");
        if !bl.enabled || c.chance(50) {
            writeln!(s, "enabled = {}", bl.enabled).unwrap();
        }
        if !bl.log || c.chance(50) {
            writeln!(s, "log = {}", bl.log).unwrap();
        }
        let list: Vec<String> = bl
            .entries
            .iter()
            .map(|n| format!("\"{}\"", cidr(n, c)))
            .collect();
        writeln!(s, "entries = [{}]", list.join(", ")).unwrap();
    }
    s
}

/// An address for a packet: mostly inside the scenario's prefixes, sometimes anywhere.
fn addr(c: &mut Choices, prefixes: &[IpNet], is_v6: bool) -> IpAddr {
    let same: Vec<&IpNet> = prefixes
        .iter()
        .filter(|n| matches!(n, IpNet::V6(_)) == is_v6)
        .collect();
    if !same.is_empty() && !c.chance(20) {
        let n = *c.pick(&same);
        inside(c, n)
    } else if is_v6 {
        v6(c.u128())
    } else {
        v4(c.next())
    }
}

fn body(
    c: &mut Choices,
    prefixes: &[IpNet],
    inner_ok: bool,
    vxlan: Option<u16>,
    src: IpAddr,
    dst: IpAddr,
) -> Body {
    let sport = if c.chance(50) {
        *c.pick(&PORTS)
    } else {
        40000 + c.below(4) as u16
    };
    let dport = *c.pick(&PORTS);
    match c.below(10) {
        0..=3 => Body::Tcp {
            sport,
            dport,
            flags: *c.pick(&[
                pkt::SYN,
                pkt::ACK,
                pkt::SYN | pkt::ACK,
                pkt::RST,
                pkt::RST | pkt::ACK,
            ]),
        },
        4 | 5 => Body::Udp { sport, dport },
        6 => Body::Echo {
            request: !c.chance(30),
            id: c.below(4) as u16,
        },
        7 | 9 if vxlan.is_some() && inner_ok => {
            let is_v6 = c.chance(30);
            let (isrc, idst) = (addr(c, prefixes, is_v6), addr(c, prefixes, is_v6));
            Body::Vxlan {
                sport,
                dport: vxlan.unwrap_or(VXLAN_PORT),
                inner: Box::new(Packet {
                    src: isrc,
                    dst: idst,
                    frag: Frag::No,
                    body: body(c, prefixes, false, None, isrc, idst),
                }),
            }
        }
        8 if inner_ok => {
            // An ICMP error about a packet `dst` sent to someone.
            let quoted = Packet {
                src: dst,
                dst: src,
                frag: Frag::No,
                body: body(c, prefixes, false, None, dst, src),
            };
            let types: &[u8] = if src.is_ipv6() {
                &[1, 2, 3, 4]
            } else {
                &[3, 11, 4, 12]
            };
            match quoted.body {
                Body::Tcp { .. } | Body::Udp { .. } | Body::Echo { request: true, .. } => {
                    Body::IcmpError {
                        type_: *c.pick(types),
                        quoted: Box::new(quoted),
                    }
                }
                _ => Body::Other(47),
            }
        }
        _ => Body::Other(*c.pick(&[47, 132, 50])),
    }
}

/// The reply a peer sends to `p`.
fn reply(c: &mut Choices, p: &Packet) -> Packet {
    let body = match &p.body {
        Body::Tcp { sport, dport, .. } => Body::Tcp {
            sport: *dport,
            dport: *sport,
            flags: *c.pick(&[pkt::SYN | pkt::ACK, pkt::ACK, pkt::RST]),
        },
        Body::Udp { sport, dport } => Body::Udp {
            sport: *dport,
            dport: *sport,
        },
        Body::Vxlan {
            sport,
            dport,
            inner,
        } => {
            if c.chance(50) {
                Body::Vxlan {
                    sport: *sport,
                    dport: *dport,
                    inner: Box::new(reply(c, inner)),
                }
            } else {
                Body::Udp {
                    sport: *dport,
                    dport: *sport,
                }
            }
        }
        Body::Echo { id, .. } => Body::Echo {
            request: false,
            id: *id,
        },
        b => b.clone(),
    };
    Packet {
        src: p.dst,
        dst: p.src,
        frag: if c.chance(35) {
            Frag::First(c.below(8))
        } else {
            Frag::No
        },
        body,
    }
}

/// The prefixes an endpoint stands for.
fn resolve(p: &Policy, e: &Endpoint) -> Vec<IpNet> {
    match e {
        Endpoint::Cidr(n) => vec![*n],
        Endpoint::Network(n) => p.networks.get(n).cloned().unwrap_or_default(),
    }
}

/// A packet aimed at a rule: source in its `from`, destination in its `to` (of the same
/// family), on one of its ports or one port off.
fn aimed(
    c: &mut Choices,
    p: &Policy,
    from: &Endpoint,
    to: &Endpoint,
    ports: &[PortSpec],
) -> Option<Packet> {
    let (f, t) = (resolve(p, from), resolve(p, to));
    let fp = *c.pick(&f);
    let same: Vec<IpNet> = t
        .into_iter()
        .filter(|n| matches!(n, IpNet::V6(_)) == matches!(fp, IpNet::V6(_)))
        .collect();
    if same.is_empty() {
        return None;
    }
    let tp = *c.pick(&same);
    let (src, dst) = (inside(c, &fp), inside(c, &tp));
    let sport = 40000 + c.below(4) as u16;
    let off_by_one = c.chance(35) as u16;
    let body = match (ports.is_empty(), ports.first().map(|_| *c.pick(ports))) {
        (false, Some(PortSpec::Tcp(lo, hi))) => Body::Tcp {
            sport,
            dport: if c.chance(50) { lo } else { hi }.wrapping_add(off_by_one),
            flags: pkt::SYN,
        },
        (false, Some(PortSpec::Udp(lo, hi))) => Body::Udp {
            sport,
            dport: if c.chance(50) { lo } else { hi }.wrapping_add(off_by_one),
        },
        (false, Some(PortSpec::Icmp)) => Body::Echo {
            request: true,
            id: c.below(4) as u16,
        },
        _ => match c.below(3) {
            0 => Body::Tcp {
                sport,
                dport: *c.pick(&PORTS),
                flags: pkt::SYN,
            },
            1 => Body::Udp {
                sport,
                dport: *c.pick(&PORTS),
            },
            _ => Body::Echo {
                request: true,
                id: c.below(4) as u16,
            },
        },
    };
    let frag = if c.chance(15) {
        Frag::First(c.below(8))
    } else {
        Frag::No
    };
    Some(Packet {
        src,
        dst,
        frag,
        body,
    })
}

fn packets(c: &mut Choices, policy: &Policy, prefixes: &[IpNet]) -> Vec<Step> {
    let vxlan = policy.isolation.vxlan_ports.first().copied();
    let mut steps: Vec<Step> = Vec::new();
    let n = 10 + c.below(80);
    let mut reply_firsts: Vec<Packet> = Vec::new();
    for _ in 0..n {
        if c.exhausted() {
            break;
        }
        let earlier: Vec<&Packet> = steps
            .iter()
            .map(|s| match s {
                Step::In(p) | Step::Out(p) => p,
            })
            .collect();
        // What answers and errors are about: mostly connections that were opened (packets
        // sent out, packets an allow rule may have admitted), sometimes anything.
        let opened: Vec<&Packet> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Out(p) => Some(p),
                Step::In(p)
                    if matches!(
                        p.body,
                        Body::Tcp {
                            flags: pkt::SYN,
                            ..
                        } | Body::Echo { request: true, .. }
                            | Body::Udp { .. }
                    ) =>
                {
                    Some(p)
                }
                _ => None,
            })
            .collect();
        let firsts: Vec<&Packet> = steps
            .iter()
            .filter_map(|s| match s {
                Step::In(p) if matches!(p.frag, Frag::First(_)) => Some(p),
                _ => None,
            })
            .collect();
        let sent: Vec<&Packet> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Out(p) => Some(p),
                _ => None,
            })
            .collect();
        let about = |c: &mut Choices| -> Packet {
            if !sent.is_empty() && c.chance(50) {
                (*c.pick(&sent)).clone()
            } else if !opened.is_empty() && !c.chance(20) {
                (*c.pick(&opened)).clone()
            } else {
                (*c.pick(&earlier)).clone()
            }
        };
        let kind = if earlier.is_empty() { 0 } else { c.below(20) };
        let step = match kind {
            // A reply to an earlier packet.
            9..=12 => {
                let p = about(c);
                let r = reply(c, &p);
                if let Frag::First(id) = r.frag {
                    reply_firsts.push(r.clone());
                    // Its later fragment often follows at once.
                    if c.chance(50) {
                        steps.push(Step::In(r.clone()));
                        Step::In(Packet {
                            frag: Frag::Later(id),
                            ..r
                        })
                    } else {
                        Step::In(r)
                    }
                } else if c.chance(30) {
                    // Answered: its opener speaks again, which confirms the connection.
                    steps.push(Step::In(r));
                    Step::Out(p)
                } else {
                    Step::In(r)
                }
            }
            // An ICMP error about an earlier packet, sent to its source.
            13..=15 => {
                let p = about(c);
                let from = if c.chance(50) {
                    p.dst
                } else {
                    addr(c, prefixes, p.src.is_ipv6())
                };
                let types: &[u8] = if p.src.is_ipv6() {
                    &[1, 3, 2, 4]
                } else {
                    &[3, 11, 12, 4]
                };
                let quoted = Packet {
                    frag: Frag::No,
                    ..p.clone()
                };
                let ok = matches!(
                    quoted.body,
                    Body::Tcp { .. } | Body::Udp { .. } | Body::Echo { request: true, .. }
                );
                if ok {
                    Step::In(Packet {
                        src: from,
                        dst: p.src,
                        frag: if c.chance(15) {
                            Frag::First(c.below(8))
                        } else {
                            Frag::No
                        },
                        body: Body::IcmpError {
                            type_: *c.pick(types),
                            quoted: Box::new(quoted),
                        },
                    })
                } else {
                    Step::In(reply(c, &p))
                }
            }
            // A later fragment of an earlier first fragment (or of any packet).
            16..=18 => {
                let p = if !reply_firsts.is_empty() && !c.chance(20) {
                    c.pick(&reply_firsts).clone()
                } else if !firsts.is_empty() && !c.chance(20) {
                    (*c.pick(&firsts)).clone()
                } else {
                    (*c.pick(&earlier)).clone()
                };
                let id = match p.frag {
                    Frag::First(id) => id,
                    _ => c.below(8),
                };
                Step::In(Packet {
                    frag: Frag::Later(id),
                    ..p
                })
            }
            // A packet aimed at an allow rule or an except entry.
            5..=8 if !policy.isolation.allow.is_empty() || !policy.isolation.except.is_empty() => {
                let (from, to, ports) = if !policy.isolation.allow.is_empty()
                    && (policy.isolation.except.is_empty() || !c.chance(15))
                {
                    let r = c.pick(&policy.isolation.allow);
                    (r.from.clone(), r.to.clone(), r.ports.clone())
                } else {
                    let r = c.pick(&policy.isolation.except);
                    (r.from.clone(), r.to.clone(), vec![])
                };
                match aimed(c, policy, &from, &to, &ports) {
                    Some(p) if c.chance(15) => Step::Out(p),
                    // Often the host forwards (or sends) what it admitted: only then is
                    // the flow recorded and its replies let through.
                    Some(p) if c.chance(25) => {
                        steps.push(Step::In(p.clone()));
                        Step::Out(p)
                    }
                    Some(p) => Step::In(p),
                    None => Step::In(fresh(c, policy, prefixes, vxlan)),
                }
            }
            // A whole exchange: out, its answer in, out again (which confirms it).
            4 => {
                let p = fresh(c, policy, prefixes, vxlan);
                let r = reply(c, &p);
                steps.push(Step::Out(p.clone()));
                steps.push(Step::In(r));
                Step::Out(p)
            }
            // The opener of an earlier connection speaks again (confirms it if answered).
            19 if !sent.is_empty() && c.chance(50) => Step::Out((*c.pick(&sent)).clone()),
            // A fresh packet, in or out.
            _ => {
                let p = fresh(c, policy, prefixes, vxlan);
                if c.chance(15) {
                    Step::Out(p)
                } else {
                    Step::In(p)
                }
            }
        };
        steps.push(step);
    }
    steps
}

fn fresh(c: &mut Choices, policy: &Policy, prefixes: &[IpNet], vxlan: Option<u16>) -> Packet {
    let is_v6 = c.chance(30);
    let (mut src, mut dst) = (addr(c, prefixes, is_v6), addr(c, prefixes, is_v6));
    // Mostly between two networks: what isolation is about.
    let nets: Vec<&Vec<IpNet>> = policy.networks.values().collect();
    if nets.len() >= 2 && c.chance(60) {
        let i = c.below(nets.len() as u32) as usize;
        let j = (i + 1 + c.below(nets.len() as u32 - 1) as usize) % nets.len();
        let s = *c.pick(nets[i]);
        let same: Vec<IpNet> = nets[j]
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == matches!(s, IpNet::V6(_)))
            .copied()
            .collect();
        if !same.is_empty() {
            let d = *c.pick(&same);
            src = inside(c, &s);
            dst = inside(c, &d);
        }
    }
    let frag = if c.chance(15) {
        Frag::First(c.below(8))
    } else {
        Frag::No
    };
    Packet {
        src,
        dst,
        frag,
        body: body(c, prefixes, true, vxlan, src, dst),
    }
}

/// The Ethernet frame of a packet, as it arrives on the wire.
pub fn frame(p: &Packet) -> Vec<u8> {
    let (proto, l4) = l4_bytes(p);
    ip_frame(p, proto, &l4)
}

fn l4_bytes(p: &Packet) -> (u8, Vec<u8>) {
    let v6 = p.src.is_ipv6();
    let proto = p.proto();
    if matches!(p.frag, Frag::Later(_)) {
        return (proto, vec![0u8; 24]);
    }
    let b = match &p.body {
        Body::Tcp {
            sport,
            dport,
            flags,
        } => pkt::tcp(*sport, *dport, *flags),
        Body::Udp { sport, dport } => pkt::udp(*sport, *dport, b"x"),
        Body::Vxlan {
            sport,
            dport,
            inner,
        } => {
            let mut payload = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
            payload.extend_from_slice(&frame(inner));
            pkt::udp(*sport, *dport, &payload)
        }
        Body::Echo { request, id } => {
            let t = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            pkt::icmp(t, 0, *id, 1, b"")
        }
        Body::IcmpError { type_, quoted } => {
            let (qp, ql4) = l4_bytes(quoted);
            let mut q = ip_packet(quoted, qp, &ql4);
            // An error quotes the header and (at least) 8 bytes of what followed.
            let keep = q.len() - ql4.len() + 8;
            q.truncate(keep);
            pkt::icmp(*type_, 0, 0, 0, &q)
        }
        Body::Other(_) => vec![0u8; 24],
    };
    (proto, b)
}

fn ip_packet(p: &Packet, proto: u8, l4: &[u8]) -> Vec<u8> {
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = pkt::V4::new(&s.to_string(), &d.to_string(), proto);
            match p.frag {
                Frag::No => {}
                Frag::First(id) => {
                    h.id = id as u16;
                    h.more_frags = true;
                }
                Frag::Later(id) => {
                    h.id = id as u16;
                    h.frag_offset = 100;
                }
            }
            h.build(l4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = pkt::V6::new(&s.to_string(), &d.to_string(), proto);
            match p.frag {
                Frag::No => {}
                Frag::First(id) => h.ext = vec![(44, pkt::v6_frag_body(0, true, id))],
                Frag::Later(id) => h.ext = vec![(44, pkt::v6_frag_body(100, false, id))],
            }
            h.build(l4)
        }
        _ => panic!("a packet of two families: {p:?}"),
    }
}

fn ip_frame(p: &Packet, proto: u8, l4: &[u8]) -> Vec<u8> {
    let et = if p.src.is_ipv6() { 0x86dd } else { 0x0800 };
    pkt::eth(et, &ip_packet(p, proto, l4))
}

/// The decisions the differential must reach, each on at least 1% of the packets.
pub const DECISIONS: &[&str] = &[
    "blocked",
    "whitelist-off",
    "whitelisted",
    "established",
    "related",
    "fragment",
    "not-whitelisted",
    "except",
    "hairpin",
    "allow-rule",
    "default-accept",
    "isolated-drop",
    "isolated-reject",
    "vxlan",
    "egress-new",
    "egress-tracked",
    "egress-confirmed",
    "egress-ignored",
];

/// Counts per decision, for the histogram.
pub type Histogram = BTreeMap<String, u64>;
