//! The two backends against each other and against the oracle, with real traffic: the same
//! random policies are loaded on a router by the eBPF backend and by the iptables backend,
//! and the same new connections (TCP, UDP, ping; IPv4 and IPv6; between hosts on three
//! ports of the router) are opened through it. Each connection ends as the oracle says its
//! first packet is judged (passed, refused by a REJECT, or dropped), on both backends.
//!
//!   h1 198.51.100.2   2001:db8:1:1::2 --r1--+
//!   h2 198.51.100.18  2001:db8:1:2::2 --r2--+ router
//!   h3 198.51.100.130 2001:db8:2:1::2 --r3--+

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use ipnet::IpNet;
use isolation_user::{
    policy::{self, AllowRule, DefaultAction, Endpoint, ExceptRule, Policy, PortSpec},
    semantics::{Action, Body, Frag, Oracle, Packet, TCP_ACK, TCP_SYN},
};
use tests::{
    iso::Iso,
    netns::Netns,
    traffic::{Echo, any_port, in_ns},
    unique,
};

/// Random policies per run, and the seed of the first.
const POLICIES: u64 = 8;
const SEED: u64 = 0x1505_1a7e;

const HOSTS: [(&str, &str); 3] = [
    ("198.51.100.2", "2001:db8:1:1::2"),
    ("198.51.100.18", "2001:db8:1:2::2"),
    ("198.51.100.130", "2001:db8:2:1::2"),
];

/// Prefixes the policies are made of: each host, its link, groups of hosts, everything,
/// nothing of ours.
const POOL: [&str; 16] = [
    "198.51.100.2/32",
    "198.51.100.18/32",
    "198.51.100.130/32",
    "198.51.100.0/28",
    "198.51.100.16/28",
    "198.51.100.128/28",
    "198.51.100.0/25",
    "198.51.100.0/24",
    "0.0.0.0/0",
    "192.0.2.0/24",
    "2001:db8:1:1::2/128",
    "2001:db8:2:1::/64",
    "2001:db8:1:2::/64",
    "2001:db8:1::/48",
    "2001:db8::/32",
    "2001:db8:9::/48",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, so a failing seed is replayed as it was.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn random_policy(r: &mut Rng, index: u64) -> Policy {
    let mut p = Policy::default();
    // Networks mostly of one host or one link (so that traffic crosses networks and
    // reaches the default), sometimes of anything in the pool.
    const NARROW: [&str; 9] = [
        "198.51.100.2/32",
        "198.51.100.18/32",
        "198.51.100.130/32",
        "198.51.100.0/28",
        "198.51.100.16/28",
        "198.51.100.128/28",
        "2001:db8:1:1::2/128",
        "2001:db8:1:2::/64",
        "2001:db8:2:1::/64",
    ];
    for i in 0..2 + r.below(3) {
        let first = if r.chance(80) {
            r.pick(&NARROW)
        } else {
            r.pick(&POOL)
        };
        let mut subnets = vec![net(first)];
        if r.chance(40) {
            let more = net(r.pick(&POOL));
            if !subnets.contains(&more) {
                subnets.push(more);
            }
        }
        p.networks.insert(format!("n{i}"), subnets);
    }
    let names: Vec<String> = p.networks.keys().cloned().collect();
    let endpoint = |r: &mut Rng| {
        if r.chance(70) {
            Endpoint::Network(r.pick(&names).clone())
        } else {
            Endpoint::Cidr(net(r.pick(&POOL)))
        }
    };
    for _ in 0..r.below(5) {
        let specs = [
            PortSpec::Tcp(80, 80),
            PortSpec::Tcp(81, 82),
            PortSpec::Udp(53, 53),
            PortSpec::Icmp,
        ];
        let ports = if r.chance(60) {
            let mut v = vec![*r.pick(&specs)];
            if r.chance(30) {
                let s = *r.pick(&specs);
                if !v.contains(&s) {
                    v.push(s);
                }
            }
            v
        } else {
            vec![]
        };
        let (from, to) = (endpoint(r), endpoint(r));
        p.isolation.allow.push(AllowRule { from, to, ports });
    }
    for _ in 0..r.below(3) {
        let (from, to) = (endpoint(r), endpoint(r));
        p.isolation.except.push(ExceptRule { from, to });
    }
    p.isolation.default = if r.chance(80) {
        DefaultAction::Deny
    } else {
        DefaultAction::Accept
    };
    p.isolation.reject = r.chance(75);
    p.whitelist.enabled = r.chance(35);
    for (v4, v6) in HOSTS {
        if r.chance(50) {
            p.whitelist.allow.push(net(&format!("{v4}/32")));
        }
        if r.chance(50) {
            p.whitelist.allow.push(net(&format!("{v6}/128")));
        }
    }
    if r.chance(30) {
        p.whitelist.allow.push(net(r.pick(&POOL)));
    }
    // Every other policy blocks a host (one family of it) or a narrow prefix: drawn from a
    // generator of its own, so the rest of the policies stay what they were.
    let r = &mut Rng((SEED ^ index).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    r.next();
    if index % 2 == 1 {
        let (v4, v6) = *r.pick(&HOSTS);
        let e = match r.below(3) {
            0 => net(&format!("{v4}/32")),
            1 => net(&format!("{v6}/128")),
            _ => net(r.pick(&NARROW[3..])),
        };
        p.blocklist.entries.push(e);
    }
    p
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tcp80,
    Tcp81,
    Udp53,
    Ping,
}

/// How a new connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Passed,
    Refused,
    Dropped,
}

const WAIT: Duration = Duration::from_millis(1500);

fn probe(ns: &str, kind: Kind, dst: IpAddr) -> Outcome {
    let ns = ns.to_string();
    match kind {
        Kind::Ping => {
            let o = std::process::Command::new("nsenter")
                .args([
                    &format!("--net=/run/netns/{ns}"),
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    &dst.to_string(),
                ])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout).to_lowercase();
            if out.contains(" 1 received") {
                Outcome::Passed
            } else if out.contains("filtered") || out.contains("prohibited") {
                Outcome::Refused
            } else {
                Outcome::Dropped
            }
        }
        Kind::Tcp80 | Kind::Tcp81 => {
            let port = if kind == Kind::Tcp80 { 80 } else { 81 };
            in_ns(&ns, move || {
                match TcpStream::connect_timeout(&SocketAddr::new(dst, port), WAIT) {
                    Ok(_) => Outcome::Passed,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
                    Err(_) => Outcome::Dropped,
                }
            })
        }
        Kind::Udp53 => in_ns(&ns, move || {
            let to = SocketAddr::new(dst, 53);
            let u = UdpSocket::bind(any_port(to)).unwrap();
            u.connect(to).unwrap();
            u.set_read_timeout(Some(WAIT / 2)).unwrap();
            let mut buf = [0u8; 16];
            // Twice: the first may wait on neighbour resolution.
            for _ in 0..2 {
                let _ = u.send(b"x");
                match u.recv(&mut buf) {
                    Ok(_) => return Outcome::Passed,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EHOSTUNREACH | libc::EACCES | libc::ECONNREFUSED)
                        ) =>
                    {
                        return Outcome::Refused;
                    }
                    Err(_) => {}
                }
            }
            Outcome::Dropped
        }),
    }
}

/// What the oracle says a new connection gets: its first packet judged at the router's
/// ingress; when it passes, its answer must pass too (the router saw it leave).
fn expected(p: &Policy, kind: Kind, src: IpAddr, dst: IpAddr) -> Outcome {
    let (first, answer) = match kind {
        Kind::Tcp80 | Kind::Tcp81 => {
            let dport = if kind == Kind::Tcp80 { 80 } else { 81 };
            (
                Body::Tcp {
                    sport: 40000,
                    dport,
                    flags: TCP_SYN,
                },
                Body::Tcp {
                    sport: dport,
                    dport: 40000,
                    flags: TCP_SYN | TCP_ACK,
                },
            )
        }
        Kind::Udp53 => (
            Body::Udp {
                sport: 40000,
                dport: 53,
            },
            Body::Udp {
                sport: 53,
                dport: 40000,
            },
        ),
        Kind::Ping => (
            Body::Echo {
                request: true,
                id: 7,
            },
            Body::Echo {
                request: false,
                id: 7,
            },
        ),
    };
    let pkt = |src, dst, body| Packet {
        src,
        dst,
        frag: Frag::No,
        body,
    };
    let mut o = Oracle::new(p);
    let first = pkt(src, dst, first);
    match o.ingress(&first).action {
        Action::Drop => Outcome::Dropped,
        Action::Reject => Outcome::Refused,
        Action::Pass => {
            o.egress(&first);
            let back = o.ingress(&pkt(dst, src, answer));
            // Only the blocklist drops an answer of a connection seen leaving.
            if back.reason == isolation_common::Reason::DropBlocked {
                return Outcome::Dropped;
            }
            assert_eq!(
                back.action,
                Action::Pass,
                "the oracle drops an answer: {p:?}"
            );
            Outcome::Passed
        }
    }
}

type Key = (usize, usize, Kind, bool);

fn probes() -> Vec<Key> {
    let mut v = Vec::new();
    for a in 0..HOSTS.len() {
        for b in 0..HOSTS.len() {
            if a == b {
                continue;
            }
            for (kind, v6) in [
                (Kind::Tcp80, false),
                (Kind::Tcp80, true),
                (Kind::Tcp81, false),
                (Kind::Udp53, true),
                (Kind::Ping, false),
                (Kind::Ping, true),
            ] {
                v.push((a, b, kind, v6));
            }
        }
    }
    v
}

fn addr(h: usize, v6: bool) -> IpAddr {
    let (a, b) = HOSTS[h];
    if v6 { b } else { a }.parse().unwrap()
}

#[test]
fn both_backends_give_the_oracles_verdicts_on_real_connections() {
    if !tests::can_run("cross-backend differential test") {
        return;
    }
    let router = unique("dfr");
    let hosts: Vec<String> = (0..3).map(|i| unique(&format!("dfh{i}-"))).collect();
    let mut names = vec![router.as_str()];
    names.extend(hosts.iter().map(String::as_str));
    let ns = Netns::new(&names);
    let links = [
        ("r1", ["198.51.100.1/28", "2001:db8:1:1::1/64"]),
        ("r2", ["198.51.100.17/28", "2001:db8:1:2::1/64"]),
        ("r3", ["198.51.100.129/28", "2001:db8:2:1::1/64"]),
    ];
    for (i, (port, raddrs)) in links.iter().enumerate() {
        let (v4, v6) = HOSTS[i];
        let (h4, h6) = (format!("{v4}/28"), format!("{v6}/64"));
        ns.spoke(&router, port, *raddrs, &hosts[i], [&h4, &h6]);
    }
    ns.forwarding(&router);
    // iptables' REJECT sends the kernel's own ICMP errors, which the kernel rate-limits per
    // destination (a burst of 6, then one a second): the probes run at once, so that limit
    // would turn answers into silence. (The eBPF datapath answers under its own limit.)
    ns.sysctl(
        &router,
        &["net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"],
    );
    let _echo: Vec<Echo> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (v4, v6) = HOSTS[i];
            let mut at = Vec::new();
            for a in [v4, v6] {
                let ip: IpAddr = a.parse().unwrap();
                for port in [80, 81, 53] {
                    at.push(SocketAddr::new(ip, port));
                }
            }
            Echo::start(h, &at)
        })
        .collect();

    let mut rng = Rng(SEED);
    let policies: Vec<Policy> = (0..POLICIES).map(|i| random_policy(&mut rng, i)).collect();
    assert!(
        policies
            .iter()
            .filter(|p| !p.blocklist.entries.is_empty())
            .count()
            >= 2,
        "the seed draws too few blocklists to check them"
    );
    let keys = probes();
    // Outcomes per backend, policy by policy.
    let mut got: BTreeMap<&str, Vec<Vec<Outcome>>> = BTreeMap::new();
    for backend in ["ebpf", "iptables"] {
        let iso = Iso::with_backend(&router, backend);
        for p in &policies {
            policy::validate(p).expect("a valid random policy");
            let file = iso.policy(&policy::to_toml(p));
            iso.ok(&[
                "load", "--iface", "r1", "--iface", "r2", "--iface", "r3", "--policy", &file,
            ]);
            // Every probe at once, each on its own thread (and its own ports).
            let threads: Vec<_> = keys
                .iter()
                .map(|&(a, b, kind, v6)| {
                    let h = hosts[a].clone();
                    std::thread::spawn(move || probe(&h, kind, addr(b, v6)))
                })
                .collect();
            let outcomes = threads.into_iter().map(|t| t.join().unwrap()).collect();
            got.entry(backend).or_default().push(outcomes);
        }
        iso.ok(&["unload"]);
    }
    let mut wrong = Vec::new();
    let mut seen = BTreeMap::new();
    for (i, p) in policies.iter().enumerate() {
        for (j, &(a, b, kind, v6)) in keys.iter().enumerate() {
            let want = expected(p, kind, addr(a, v6), addr(b, v6));
            *seen.entry(format!("{want:?}")).or_insert(0) += 1;
            for backend in ["ebpf", "iptables"] {
                let g = got[backend][i][j];
                if g != want {
                    wrong.push(format!(
                        "policy #{i}, {backend}: h{} -> h{} {kind:?}{}: {g:?}, the oracle says {want:?}",
                        a + 1,
                        b + 1,
                        if v6 { " v6" } else { "" }
                    ));
                }
            }
        }
        if wrong
            .iter()
            .any(|w| w.starts_with(&format!("policy #{i},")))
        {
            wrong.push(format!("policy #{i}:\n{}", policy::to_toml(p)));
        }
    }
    eprintln!("connections by the oracle's outcome: {seen:?}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The policies reached every outcome: none of them checks nothing.
    for o in ["Passed", "Refused", "Dropped"] {
        assert!(
            seen.get(o).copied().unwrap_or(0) >= 5,
            "too few {o} connections: {seen:?}"
        );
    }
}
