//! Random policies and packets for the differential test.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use isolation_user::{
    policy::{AllowRule, DefaultAction, Endpoint, ExceptRule, Isolation, Policy, PortSpec},
    semantics::Pkt,
};

/// A small deterministic generator (xorshift*): the tests need reproducible streams
/// from a seed, not cryptographic quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Addresses are drawn from 198.51.100.0/24 and 2001:db8:0:0::/120-ish corners so that
/// random prefixes overlap often.
pub fn addr(r: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            r.below(256) as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, r.below(256) as u8))
    }
}

pub fn prefix(r: &mut Rng, v6: bool) -> IpNet {
    let a = addr(r, v6);
    let len = if v6 {
        120 + r.below(9) as u8
    } else {
        24 + r.below(9) as u8
    };
    IpNet::new(a, len).unwrap().trunc()
}

fn endpoint(r: &mut Rng, nets: &[String]) -> Endpoint {
    if !nets.is_empty() && r.chance(70) {
        Endpoint::Network(nets[r.below(nets.len() as u64) as usize].clone())
    } else {
        {
            let v6 = r.chance(30);
            Endpoint::Cidr(prefix(r, v6))
        }
    }
}

fn port(r: &mut Rng) -> PortSpec {
    let lo = 1 + r.below(8) as u16 * 10;
    let hi = if r.chance(30) {
        lo + r.below(20) as u16
    } else {
        lo
    };
    match r.below(3) {
        0 => PortSpec::Tcp(lo, hi),
        1 => PortSpec::Udp(lo, hi),
        _ => PortSpec::Icmp,
    }
}

pub fn policy(r: &mut Rng) -> Policy {
    let mut p = Policy::default();
    let n = 1 + r.below(6);
    for i in 0..n {
        let subnets = (0..1 + r.below(3))
            .map(|_| {
                let v6 = r.chance(30);
                prefix(r, v6)
            })
            .collect();
        p.networks.insert(format!("n{i}"), subnets);
    }
    let names: Vec<String> = p.networks.keys().cloned().collect();
    let mut iso = Isolation {
        default: if r.chance(70) {
            DefaultAction::Deny
        } else {
            DefaultAction::Accept
        },
        reject: r.chance(50),
        ..Isolation::default()
    };
    for _ in 0..r.below(8) {
        let ports = if r.chance(40) {
            vec![]
        } else {
            (0..1 + r.below(3)).map(|_| port(r)).collect()
        };
        iso.allow.push(AllowRule {
            from: endpoint(r, &names),
            to: endpoint(r, &names),
            ports,
        });
    }
    for _ in 0..r.below(3) {
        iso.except.push(ExceptRule {
            from: endpoint(r, &names),
            to: endpoint(r, &names),
        });
    }
    p.isolation = iso;
    p
}

pub fn packet(r: &mut Rng) -> Pkt {
    let v6 = r.chance(30);
    let (src, dst) = (addr(r, v6), addr(r, v6));
    let proto = match r.below(10) {
        0..=3 => 6,
        4..=6 => 17,
        7 | 8 => {
            if v6 {
                58
            } else {
                1
            }
        }
        _ => 47,
    };
    let ports = match proto {
        _ if r.chance(5) => None,
        6 | 17 => Some((1 + r.below(100) as u16, 1 + r.below(100) as u16)),
        // ICMP echo request (id, 0) or reply (0, id).
        1 | 58 => {
            let id = 1 + r.below(50) as u16;
            Some(if r.chance(50) { (id, 0) } else { (0, id) })
        }
        _ => None,
    };
    Pkt {
        src,
        dst,
        proto,
        ports: if proto == 47 { None } else { ports },
    }
}
