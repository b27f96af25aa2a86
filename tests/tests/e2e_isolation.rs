//! End-to-end isolation: a router namespace with the datapath on its three ports, two IT
//! hosts on different ports (so hairpin crosses the router) and an HR host.
//!
//!   it1 198.51.100.2   2001:db8:1:1::2 --r1--+
//!   it2 198.51.100.18  2001:db8:1:2::2 --r2--+ router
//!   hr1 198.51.100.130 2001:db8:2:1::2 --r3--+
//!
//! HR may reach IT on tcp:80; IT may not open connections to HR but its replies flow; each
//! network talks freely inside; everything else is refused.

use std::{net::SocketAddr, time::Duration};

use rstest::rstest;

use tests::{
    iso::Iso,
    netns::{Netns, ok},
    traffic::{Echo, ping_ok, tcp_ok, udp_ok},
    unique,
};

const PASS_WAIT: Duration = Duration::from_secs(3);
const DROP_WAIT: Duration = Duration::from_millis(700);

const POLICY: &str = r#"
[isolation]
default = "deny"
reject = false

[networks.it]
subnets = ["198.51.100.0/25", "2001:db8:1::/48"]

[networks.hr]
subnets = ["198.51.100.128/25", "2001:db8:2::/48"]

[[isolation.allow]]
from = "hr"
to = "it"
ports = ["tcp:80"]
"#;

struct Lab {
    // Dropped in order: the datapath is unloaded before its namespaces go.
    iso: Iso,
    ns: Netns,
    it1: String,
    it2: String,
    hr1: String,
}

impl Lab {
    fn new(backend: &str) -> Option<Lab> {
        if !tests::can_run("end-to-end isolation test") {
            return None;
        }
        let (router, it1, it2, hr1) =
            (unique("rt"), unique("it1-"), unique("it2-"), unique("hr1-"));
        let ns = Netns::new(&[&router, &it1, &it2, &hr1]);
        ns.spoke(
            &router,
            "r1",
            ["198.51.100.1/28", "2001:db8:1:1::1/64"],
            &it1,
            ["198.51.100.2/28", "2001:db8:1:1::2/64"],
        );
        ns.spoke(
            &router,
            "r2",
            ["198.51.100.17/28", "2001:db8:1:2::1/64"],
            &it2,
            ["198.51.100.18/28", "2001:db8:1:2::2/64"],
        );
        ns.spoke(
            &router,
            "r3",
            ["198.51.100.129/28", "2001:db8:2:1::1/64"],
            &hr1,
            ["198.51.100.130/28", "2001:db8:2:1::2/64"],
        );
        ns.forwarding(&router);
        Some(Lab {
            iso: Iso::with_backend(&router, backend),
            ns,
            it1,
            it2,
            hr1,
        })
    }

    fn load(&self, policy: &str) {
        let p = self.iso.policy(policy);
        self.iso.ok(&[
            "load", "--iface", "r1", "--iface", "r2", "--iface", "r3", "--policy", &p,
        ]);
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// (what, can it get through?) for the whole matrix of the scenario.
fn matrix(lab: &Lab, wait_pass: Duration, wait_drop: Duration) -> Vec<(&'static str, bool)> {
    let w = |expect_pass: bool| if expect_pass { wait_pass } else { wait_drop };
    vec![
        (
            "hr -> it tcp:80",
            tcp_ok(&lab.hr1, sa("198.51.100.2:80"), w(true)),
        ),
        (
            "hr -> it tcp:80 v6",
            tcp_ok(&lab.hr1, sa("[2001:db8:1:1::2]:80"), w(true)),
        ),
        (
            "hr -> it2 tcp:80",
            tcp_ok(&lab.hr1, sa("198.51.100.18:80"), w(true)),
        ),
        (
            "hr -> it tcp:81",
            tcp_ok(&lab.hr1, sa("198.51.100.2:81"), w(false)),
        ),
        (
            "hr -> it udp:80",
            udp_ok(&lab.hr1, sa("198.51.100.2:80"), w(false)),
        ),
        ("hr -> it ping", ping_ok(&lab.hr1, "198.51.100.2")),
        (
            "it -> hr tcp:80",
            tcp_ok(&lab.it1, sa("198.51.100.130:80"), w(false)),
        ),
        (
            "it -> hr tcp:80 v6",
            tcp_ok(&lab.it1, sa("[2001:db8:2:1::2]:80"), w(false)),
        ),
        ("it -> hr ping6", ping_ok(&lab.it1, "2001:db8:2:1::2")),
        (
            "it1 -> it2 tcp:81 (hairpin)",
            tcp_ok(&lab.it1, sa("198.51.100.18:81"), w(true)),
        ),
        (
            "it1 -> it2 udp:80 v6 (hairpin)",
            udp_ok(&lab.it1, sa("[2001:db8:1:2::2]:80"), w(true)),
        ),
        (
            "it1 -> it2 ping (hairpin)",
            ping_ok(&lab.it1, "198.51.100.18"),
        ),
    ]
}

const EXPECTED: [bool; 12] = [
    true, true, true, false, false, false, false, false, false, true, true, true,
];

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn isolation_end_to_end(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _it1 = Echo::start(
        &lab.it1,
        &[
            sa("0.0.0.0:80"),
            sa("0.0.0.0:81"),
            sa("[2001:db8:1:1::2]:80"),
        ],
    );
    let _it2 = Echo::start(
        &lab.it2,
        &[
            sa("0.0.0.0:80"),
            sa("0.0.0.0:81"),
            sa("[2001:db8:1:2::2]:80"),
        ],
    );
    let _hr1 = Echo::start(&lab.hr1, &[sa("0.0.0.0:80"), sa("[2001:db8:2:1::2]:80")]);
    let before = matrix(&lab, PASS_WAIT, PASS_WAIT);
    assert!(
        before.iter().all(|(_, ok)| *ok),
        "everything flows through the router before load: {before:?}"
    );

    lab.load(POLICY);
    let got = matrix(&lab, PASS_WAIT, DROP_WAIT);
    let wrong: Vec<_> = got
        .iter()
        .zip(EXPECTED)
        .filter(|((_, g), e)| g != e)
        .map(|((w, g), _)| format!("{w}: {}", if *g { "passed" } else { "blocked" }))
        .collect();
    assert!(wrong.is_empty(), "wrong verdicts: {wrong:?}");
    assert!(lab.iso.packets("allow-rule") > 0);
    assert!(lab.iso.packets("hairpin") > 0);
    assert!(lab.iso.packets("isolated-drop") > 0);
    // IT's replies to HR's allowed connections came back through the router: established.
    assert!(lab.iso.packets("established") > 0);

    lab.iso.ok(&["unload"]);
    let after = matrix(&lab, PASS_WAIT, PASS_WAIT);
    assert!(
        after.iter().all(|(_, ok)| *ok),
        "unload restores everything: {after:?}"
    );
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn live_edits_check_and_overlaps(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _it1 = Echo::start(&lab.it1, &[sa("0.0.0.0:80")]);
    let _it2 = Echo::start(&lab.it2, &[sa("0.0.0.0:80")]);
    let _hr1 = Echo::start(&lab.hr1, &[sa("0.0.0.0:80"), sa("[2001:db8:2:1::2]:80")]);
    lab.load(POLICY);
    let check = |args: &[&str]| -> serde_json::Value {
        let mut full = vec!["check", "--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&lab.iso.ok(&full)).unwrap()
    };
    let c = check(&[
        "198.51.100.130",
        "198.51.100.2",
        "--proto",
        "tcp",
        "--dport",
        "80",
    ]);
    assert_eq!(c["verdict"], "pass", "{c}");
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .contains("allow hr -> it tcp:80"),
        "{c}"
    );
    let c = check(&[
        "198.51.100.2",
        "198.51.100.130",
        "--proto",
        "tcp",
        "--dport",
        "80",
    ]);
    assert_eq!(c["verdict"], "drop", "{c}");
    let c = check(&[
        "198.51.100.2",
        "198.51.100.18",
        "--proto",
        "udp",
        "--dport",
        "9",
    ]);
    assert!(c["reason"].as_str().unwrap().contains("hairpin"), "{c}");
    let c = check(&["192.0.2.1", "198.51.100.2"]);
    assert!(c["reason"].as_str().unwrap().contains("not subject"), "{c}");
    let text = lab.iso.ok(&[
        "check",
        "198.51.100.2",
        "198.51.100.130",
        "--proto",
        "tcp",
        "--dport",
        "80",
    ]);
    assert!(text.starts_with("DROP: "), "{text}");

    // allow / disallow take effect at once.
    assert!(!tcp_ok(&lab.it1, sa("198.51.100.130:80"), DROP_WAIT));
    lab.iso.ok(&["allow", "it", "hr", "--port", "tcp:80"]);
    assert!(
        tcp_ok(&lab.it1, sa("198.51.100.130:80"), PASS_WAIT),
        "after allow"
    );
    assert!(
        tcp_ok(&lab.it1, sa("[2001:db8:2:1::2]:80"), PASS_WAIT),
        "after allow, v6"
    );
    lab.iso.ok(&["disallow", "it", "hr"]);
    assert!(
        !tcp_ok(&lab.it1, sa("198.51.100.130:80"), DROP_WAIT),
        "after disallow"
    );

    // except: never filtered, either direction.
    lab.iso
        .ok(&["except", "add", "198.51.100.2", "198.51.100.130"]);
    assert!(
        tcp_ok(&lab.it1, sa("198.51.100.130:80"), PASS_WAIT),
        "except it1 -> hr1"
    );
    assert!(ping_ok(&lab.hr1, "198.51.100.2"), "except hr1 -> it1");
    assert!(
        !tcp_ok(&lab.it2, sa("198.51.100.130:80"), DROP_WAIT),
        "it2 is not excepted"
    );
    lab.iso
        .ok(&["except", "del", "198.51.100.2", "198.51.100.130"]);
    assert!(
        !tcp_ok(&lab.it1, sa("198.51.100.130:80"), DROP_WAIT),
        "after except del"
    );

    // Overlap: ops is a /28 inside it. A rule about ops reaches it1 only; it1 stays in it.
    lab.iso.ok(&["network", "add", "ops", "198.51.100.0/28"]);
    lab.iso.ok(&["allow", "ops", "hr"]);
    assert!(
        tcp_ok(&lab.it1, sa("198.51.100.130:80"), PASS_WAIT),
        "it1 is in ops"
    );
    assert!(
        !tcp_ok(&lab.it2, sa("198.51.100.130:80"), DROP_WAIT),
        "it2 is not in ops"
    );
    assert!(
        tcp_ok(&lab.it1, sa("198.51.100.18:80"), PASS_WAIT),
        "it1 and it2 still share it"
    );
    assert!(
        tcp_ok(&lab.hr1, sa("198.51.100.2:80"), PASS_WAIT),
        "hr -> it still applies inside ops"
    );
    let nets: serde_json::Value =
        serde_json::from_str(&lab.iso.ok(&["network", "list", "--json"])).unwrap();
    assert_eq!(nets["ops"][0], "198.51.100.0/28");

    // Bad edits are refused whole; nothing live changes.
    let generation = |l: &Lab| -> u64 {
        let s: serde_json::Value = serde_json::from_str(&l.iso.ok(&["status", "--json"])).unwrap();
        s["generation"].as_u64().unwrap()
    };
    let g = generation(&lab);
    for (args, msg) in [
        (&["allow", "nosuch", "hr"][..], "unknown network 'nosuch'"),
        (
            &["network", "add", "dcos-x", "192.0.2.0/24"][..],
            "reserved",
        ),
        (
            &["network", "add", "x", "192.0.2.1/24"][..],
            "did you mean 192.0.2.0/24",
        ),
        (&["network", "del", "ops"][..], "used by `allow ops -> hr`"),
        (
            &["allow", "it", "hr", "--port", "tcp:0"][..],
            "bad port 'tcp:0'",
        ),
        (
            &["disallow", "hr", "ops"][..],
            "no allow rule from hr to ops",
        ),
    ] {
        let o = lab.iso.run(args);
        assert!(!o.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(generation(&lab), g, "refused edits changed nothing");
    assert!(
        tcp_ok(&lab.it1, sa("198.51.100.130:80"), PASS_WAIT),
        "policy still live"
    );
}

/// How a TCP connect from `ns` ends, and how long it took.
fn connect_outcome(ns: &str, addr: SocketAddr) -> (std::io::ErrorKind, Duration) {
    tests::traffic::in_ns(ns, move || {
        let t = std::time::Instant::now();
        let r = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3));
        (
            r.err()
                .map(|e| e.kind())
                .unwrap_or(std::io::ErrorKind::Other),
            t.elapsed(),
        )
    })
}

/// The error a connected UDP socket in `ns` gets after sending to `addr`.
fn udp_error(ns: &str, addr: SocketAddr) -> Option<i32> {
    tests::traffic::in_ns(ns, move || {
        let u = std::net::UdpSocket::bind(tests::traffic::any_port(addr)).unwrap();
        u.connect(addr).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = u.send(b"x");
        let mut b = [0u8; 16];
        match u.recv(&mut b) {
            Ok(_) => None,
            Err(e) => e.raw_os_error(),
        }
    })
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn denied_connections_are_rejected_at_once(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _it1 = Echo::start(
        &lab.it1,
        &[
            sa("0.0.0.0:80"),
            sa("0.0.0.0:81"),
            sa("[2001:db8:1:1::2]:81"),
        ],
    );
    lab.load(&POLICY.replace("reject = false", "reject = true"));
    for target in ["198.51.100.2:81", "[2001:db8:1:1::2]:81"] {
        let (kind, took) = connect_outcome(&lab.hr1, sa(target));
        assert_eq!(
            kind,
            std::io::ErrorKind::ConnectionRefused,
            "{target}: a RST, not a timeout ({took:?})"
        );
        assert!(
            took < Duration::from_secs(1),
            "{target}: refused at once, took {took:?}"
        );
    }
    assert!(
        tcp_ok(&lab.hr1, sa("198.51.100.2:80"), PASS_WAIT),
        "the allowed port still works"
    );
    // UDP: ICMP administratively prohibited reaches the socket (EHOSTUNREACH for v4 code 13,
    // EACCES for ICMPv6 code 1).
    assert_eq!(
        udp_error(&lab.hr1, sa("198.51.100.2:80")),
        Some(libc::EHOSTUNREACH)
    );
    assert_eq!(
        udp_error(&lab.hr1, sa("[2001:db8:1:1::2]:80")),
        Some(libc::EACCES)
    );
    let ping = |addr: &str| {
        let o = lab.ns.exec(&lab.hr1, &["ping", "-c", "1", "-W", "2", addr]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let p4 = ping("198.51.100.2");
    assert!(p4.contains("Packet filtered"), "{p4}");
    let p6 = ping("2001:db8:1:1::2");
    assert!(
        p6.to_lowercase().contains("administratively prohibited"),
        "{p6}"
    );
    assert!(lab.iso.packets("isolated-reject") >= 6);

    // reject = false: the same connection now times out (silent drop).
    lab.load(POLICY);
    let (kind, took) = connect_outcome(&lab.hr1, sa("198.51.100.2:81"));
    assert_eq!(kind, std::io::ErrorKind::TimedOut, "silent drop ({took:?})");
}

/// Two hosts joined by a VXLAN tunnel (VNI 42, port 4789) across the filtered underlay:
/// `va` (underlay 192.0.2.1, overlay it 198.51.100.10) and `vb` (underlay 192.0.2.2, overlay
/// hr 198.51.100.200), the datapath on vb's underlay interface.
#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn vxlan_outer_whitelisted_inner_isolated(#[case] backend: &str) {
    if !tests::can_run("end-to-end VXLAN test") {
        return;
    }
    let (va, vb) = (unique("va"), unique("vb"));
    let ns = Netns::new(&[&va, &vb]);
    ns.link(&va, "e0", &["192.0.2.1/24"], &vb, "e0", &["192.0.2.2/24"]);
    for (n, local, remote, overlay) in [
        (&va, "192.0.2.1", "192.0.2.2", "198.51.100.10/24"),
        (&vb, "192.0.2.2", "192.0.2.1", "198.51.100.200/24"),
    ] {
        ok(&[
            "ip", "-n", n, "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local,
            "remote", remote, "dstport", "4789", "dev", "e0",
        ]);
        ok(&["ip", "-n", n, "addr", "add", overlay, "dev", "vx0"]);
        ok(&["ip", "-n", n, "link", "set", "vx0", "up"]);
    }
    // Declared after `ns`: dropped (unloaded) before the namespaces go.
    let iso_b = Iso::with_backend(&vb, backend);
    let iso_a = Iso::with_backend(&va, backend);
    let _a = Echo::start(&va, &[sa("198.51.100.10:80"), sa("198.51.100.10:81")]);
    let _b = Echo::start(&vb, &[sa("198.51.100.200:80")]);
    assert!(
        tcp_ok(&va, sa("198.51.100.200:80"), PASS_WAIT),
        "the tunnel works before load"
    );

    let policy = r#"
[isolation]
default = "deny"
reject = true
vxlan_ports = [4789]
[networks.it]
subnets = ["198.51.100.0/25"]
[networks.hr]
subnets = ["198.51.100.128/25"]
[[isolation.allow]]
from = "hr"
to = "it"
ports = ["tcp:80"]
[whitelist]
allow = ["192.0.2.1"]
"#;
    // Each host filters what enters it, as in a fleet: the other host's underlay address is
    // whitelisted on each.
    for (iso, peer) in [(&iso_b, "192.0.2.1"), (&iso_a, "192.0.2.2")] {
        let p = iso.policy(&policy.replace("192.0.2.1", peer));
        iso.ok(&["load", "--iface", "e0", "--policy", &p]);
    }
    assert!(
        tcp_ok(&vb, sa("198.51.100.10:80"), PASS_WAIT),
        "hr -> it tcp:80 through the tunnel"
    );
    assert!(
        !tcp_ok(&vb, sa("198.51.100.10:81"), DROP_WAIT),
        "hr -> it tcp:81 denied inside the tunnel (at va)"
    );
    assert!(
        iso_a.packets("isolated-drop") > 0,
        "va dropped the inner packet"
    );
    assert!(
        !tcp_ok(&va, sa("198.51.100.200:80"), DROP_WAIT),
        "it -> hr denied inside the tunnel"
    );
    assert!(
        !ping_ok(&vb, "198.51.100.10"),
        "hr -> it ping is denied (only tcp:80 is allowed)"
    );
    assert!(iso_b.packets("isolated-drop") > 0);
    assert!(
        iso_a.packets("allow-rule") > 0,
        "va let hr's connection in by the rule"
    );
    assert!(iso_b.packets("established") > 0, "vb let its replies in");
    // The outer header answers to the whitelist: without va's underlay address, nothing.
    iso_b.ok(&["whitelist", "del", "192.0.2.1"]);
    assert!(
        !tcp_ok(&vb, sa("198.51.100.10:80"), DROP_WAIT),
        "outer source no longer whitelisted"
    );
    assert!(iso_b.packets("not-whitelisted") > 0);
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn stats_count_per_rule_and_trace_shows_denials(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _it1 = Echo::start(&lab.it1, &[sa("0.0.0.0:80")]);
    lab.load(POLICY);
    let tracer = lab
        .iso
        .cmd(&["trace", "--json", "--count", "1", "--timeout", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        assert!(tcp_ok(&lab.hr1, sa("198.51.100.2:80"), PASS_WAIT));
    }
    assert!(!tcp_ok(&lab.it1, sa("198.51.100.130:80"), DROP_WAIT));
    let out = tracer.wait_with_output().unwrap();
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(line["reason"], "isolated-drop", "{line}");
    assert_eq!(line["action"], "drop", "{line}");
    assert_eq!(line["src"], "198.51.100.2");
    assert_eq!(line["dst"], "198.51.100.130");
    assert_eq!(line["in"], "r1");
    let s: serde_json::Value = serde_json::from_str(&lab.iso.ok(&["stats", "--json"])).unwrap();
    let rule = &s["rules"][0];
    assert_eq!(rule["rule"], "allow hr -> it tcp:80");
    assert_eq!(rule["kind"], "allow");
    assert!(rule["packets"].as_u64().unwrap() >= 3, "{s}");
    let table = lab.iso.ok(&["stats"]);
    assert!(table.contains("allow hr -> it tcp:80"), "{table}");
}

/// A denied host that sends TCP RSTs and ICMP errors gets no answer (an answer to an
/// answer could loop between two filtered hosts, or be aimed at a victim); its denied SYN
/// and echo request still get theirs (the positive controls), v4 and v6.
#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn reject_never_answers_an_answer(#[case] backend: &str) {
    use tests::{pkt, traffic::raw_probe};
    let Some(lab) = Lab::new(backend) else { return };
    lab.load(&POLICY.replace("reject = false", "reject = true"));
    let wait = Duration::from_millis(800);
    for (it, hr) in [
        ("198.51.100.2", "198.51.100.130"),
        ("2001:db8:1:1::2", "2001:db8:2:1::2"),
    ] {
        let (itip, hrip): (std::net::IpAddr, std::net::IpAddr) =
            (it.parse().unwrap(), hr.parse().unwrap());
        let v6 = itip.is_ipv6();
        let (icmp, echo, unreach, unreach_code) = if v6 {
            (58u8, 128u8, 1u8, 4u8)
        } else {
            (1, 8, 3, 3)
        };
        // The datagram an ICMP error would quote: one hr sent to it.
        let quote = if v6 {
            pkt::V6::new(hr, it, pkt::UDP).build(&pkt::udp(53, 5000, b""))
        } else {
            pkt::V4::new(hr, it, pkt::UDP).build(&pkt::udp(53, 5000, b""))
        };
        let probe = |proto: u8, l4: Vec<u8>| {
            // Correct checksums: the kernel's conntrack (the iptables backend) holds a
            // segment with a bad one INVALID, as a receiving host would.
            let ip = if v6 {
                pkt::V6::new(it, hr, proto).build(&l4)
            } else {
                pkt::V4::new(it, hr, proto).build(&l4)
            };
            let l4 = pkt::checksummed(ip)[if v6 { 40 } else { 20 }..].to_vec();
            // iptables' REJECT sends its ICMP errors from the router's own address (the
            // kernel's icmp_send); the eBPF datapath answers from the destination's.
            let router: std::net::IpAddr = if v6 {
                "2001:db8:1:1::1"
            } else {
                "198.51.100.1"
            }
            .parse()
            .unwrap();
            let from = if backend == "iptables" && proto == icmp {
                router
            } else {
                hrip
            };
            let (got, d) = lab.iso.deltas(&["isolated-reject", "isolated-drop"], || {
                raw_probe(&lab.it1, hrip, proto, &l4, from, wait)
            });
            (got, d[0], d[1])
        };

        // Positive control: a denied SYN is answered by a RST from hr's address.
        let (got, rejected, dropped) = probe(6, pkt::tcp(40000, 22, pkt::SYN));
        assert_eq!((rejected, dropped), (1, 0), "{it}: SYN answered");
        assert!(
            got.iter().any(|(p, b)| *p == 6 && b[13] & pkt::RST != 0),
            "{it}: a RST came back for the SYN: {got:?}"
        );
        // Positive control: a denied echo request gets administratively prohibited.
        let (got, rejected, _) = probe(icmp, pkt::icmp(echo, 0, 7, 1, b""));
        assert_eq!(rejected, 1, "{it}: echo request answered");
        let prohibited = if v6 { (1, 1) } else { (3, 13) };
        assert!(
            got.iter()
                .any(|(p, b)| *p == icmp && (b[0], b[1]) == prohibited),
            "{it}: administratively prohibited came back: {got:?}"
        );

        for (what, proto, l4) in [
            ("RST", 6u8, pkt::tcp(40000, 22, pkt::RST)),
            ("RST+ACK", 6, pkt::tcp(40000, 22, pkt::RST | pkt::ACK)),
            (
                "ICMP error",
                icmp,
                pkt::icmp(unreach, unreach_code, 0, 0, &quote),
            ),
        ] {
            let (got, rejected, dropped) = probe(proto, l4);
            assert_eq!(
                (rejected, dropped),
                (0, 1),
                "{it}: the {what} is dropped silently"
            );
            assert!(got.is_empty(), "{it}: no answer to a {what}: {got:?}");
        }
    }
}

/// The lockout guard judges isolation too, with the oracle: an `apply` whose isolation
/// rules would refuse a new connection of the SSH session running it (its client to its
/// server port) is refused, and so is a live `disallow` that would; under `sudo`, which
/// drops `SSH_CONNECTION`, the session is found in the nearest ancestor of the same network
/// namespace. `--force` overrides, and then a new connection to port 22 is refused indeed
/// (the guard's premise, beside its positive control before).
#[test]
fn isolation_that_would_lock_out_the_ssh_session_is_refused() {
    use std::process::Command;
    if !tests::can_run("end-to-end lockout test") {
        return;
    }
    let tests::netns::TwoClients {
        ns: _ns,
        srv,
        cw,
        cx: _,
    } = tests::netns::TwoClients::new("lko");
    let iso = Iso::with_backend(&srv, "ebpf");
    let _sshd = tests::traffic::Echo::start(&srv, &["0.0.0.0:22".parse().unwrap()]);
    let ssh: SocketAddr = "192.0.2.1:22".parse().unwrap();
    const SESSION: &str = "192.0.2.2 50022 192.0.2.1 22";
    let base = "[isolation]\ndefault = \"deny\"\nreject = true\n[networks.admins]\nsubnets = [\"192.0.2.2/32\"]\n[networks.host]\nsubnets = [\"192.0.2.1/32\"]\n";
    let with_ssh = iso.policy(&format!(
        "{base}[[isolation.allow]]\nfrom = \"admins\"\nto = \"host\"\nports = [\"tcp:22\"]\n"
    ));
    let cut = iso.policy(base);
    iso.ok(&["load", "--iface", "s1", "--policy", &with_ssh]);
    assert!(tcp_ok(&cw, ssh, PASS_WAIT), "the session's port is open");

    // As the SSH session itself, and as `sudo` run from it (SSH_CONNECTION dropped, found
    // in the parent shell).
    let bin = iso.bin.display().to_string();
    let as_session = |args: &str, sudo: bool| {
        let inner = if sudo {
            format!("env -u SSH_CONNECTION {bin} {args}; exit $?")
        } else {
            format!("{bin} {args}")
        };
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{srv}"))
            .args(["sh", "-c", &inner])
            .env("SSH_CONNECTION", SESSION)
            .env("ISOLATION_PIN_DIR", &iso.pin)
            .env("ISOLATION_STATE_DIR", &iso.state)
            .output()
            .unwrap()
    };
    for sudo in [false, true] {
        for args in [format!("apply {cut}"), "disallow admins host".to_string()] {
            let o = as_session(&args, sudo);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !o.status.success() && err.contains("192.0.2.1 port 22"),
                "{args} (sudo: {sudo}): {err}"
            );
        }
    }
    assert!(tcp_ok(&cw, ssh, PASS_WAIT), "nothing changed");
    let o = as_session(&format!("apply {cut} --force"), true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !tcp_ok(&cw, ssh, DROP_WAIT),
        "the forced policy cuts port 22"
    );
}
