//! Randomized differential test: the BPF program (through BPF_PROG_TEST_RUN) against the
//! reference evaluator of PRODUCT.md's semantics (`semantics::isolation`), over random
//! policies with overlapping networks, CIDR rules, ports and IPv6, and random packets.
//!
//! Seed: `ISOLATION_SEED` (or `cargo xtask test --seed N`); a failure prints the seed, the
//! policy as a policy file, and the packet.

use std::{collections::HashSet, net::IpAddr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use isolation_common::{Reason, maps};
use isolation_user::{
    backend::ebpf::{counters, pins},
    policy::{self, Policy},
    semantics::{self, Decision, Pkt},
    state::Paths,
};
use tests::{
    pkt::{self, V4, V6},
    random,
};

const POLICIES: usize = 50;
const PACKETS: usize = 2000;
const DEFAULT_SEED: u64 = 20261123;

struct Dp {
    paths: Paths,
    xdp: Xdp,
}

impl Drop for Dp {
    fn drop(&mut self) {
        pins::remove_pins(&self.paths);
    }
}

fn frame(p: &Pkt) -> Vec<u8> {
    let l4: Vec<u8> = match (p.proto, p.ports) {
        (6, Some((s, d))) => pkt::tcp(s, d, pkt::ACK),
        (17, Some((s, d))) => pkt::udp(s, d, b"x"),
        (1, Some((id, 0))) => pkt::icmp(8, 0, id, 1, b""),
        (1, Some((0, id))) => pkt::icmp(0, 0, id, 1, b""),
        (58, Some((id, 0))) => pkt::icmp(128, 0, id, 1, b""),
        (58, Some((0, id))) => pkt::icmp(129, 0, id, 1, b""),
        _ => vec![0u8; 24],
    };
    // A packet without readable ports is a later fragment (or a protocol without ports).
    let later_fragment = p.ports.is_none() && p.proto != 47;
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = V4::new(&s.to_string(), &d.to_string(), p.proto);
            if later_fragment {
                h.frag_offset = 10;
            }
            h.frame(&l4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = V6::new(&s.to_string(), &d.to_string(), p.proto);
            if later_fragment {
                h.ext = vec![(44, pkt::v6_frag_body(10, false, 7))];
            }
            h.frame(&l4)
        }
        _ => unreachable!("same family"),
    }
}

fn expected_reason(d: Decision, p: &Policy, pkt: &Pkt) -> Reason {
    match d {
        Decision::NotSubject => Reason::PassWhitelistOff,
        Decision::Except(_) => Reason::PassExcept,
        Decision::Hairpin => Reason::PassHairpin,
        Decision::Established => Reason::PassEstablished,
        Decision::Allow(_) => Reason::PassAllow,
        Decision::DefaultAccept => Reason::PassDefault,
        Decision::Deny if p.isolation.reject && pkt.answerable() => Reason::RejectIsolated,
        Decision::Deny => Reason::DropIsolated,
    }
}

fn counters(dp: &Dp) -> Vec<u64> {
    counters::counters(&dp.paths)
        .unwrap()
        .iter()
        .map(|(_, c)| c.packets)
        .collect()
}

fn rule_counters(dp: &Dp) -> Vec<u64> {
    counters::rule_counters(&dp.paths)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .collect()
}

fn flush_flows(dp: &Dp) {
    for name in [maps::CONNTRACK, maps::FRAGS] {
        counters::clear_map(&dp.paths, name).unwrap();
    }
}

#[test]
fn bpf_agrees_with_the_reference() {
    if !tests::can_run("differential BPF test") {
        return;
    }
    let seed = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let id = tests::unique("isod");
    let paths = Paths {
        pin_dir: format!("/sys/fs/bpf/{id}").into(),
        state_dir: std::env::temp_dir().join(&id),
    };
    pins::ensure_pin_dir(&paths).unwrap();
    pins::load_and_pin(&paths).unwrap();
    let xdp = Xdp::from_pin(
        paths.prog("xdp"),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .unwrap();
    let dp = Dp { paths, xdp };

    let mut r = random::Rng::new(seed);
    let mut checked = 0;
    for round in 0..POLICIES {
        let policy = random::policy(&mut r);
        tests::apply(&dp.paths, &policy, round as u32 + 1);
        flush_flows(&dp);
        let mut flows: HashSet<Pkt> = HashSet::new();
        let before = counters(&dp);
        let rules_before = rule_counters(&dp);
        let mut want = vec![0u64; before.len()];
        let mut want_rules = vec![0u64; rules_before.len()];
        for i in 0..PACKETS {
            let p = random::packet(&mut r);
            let established = p.ports.is_some() && flows.contains(&p.reversed());
            let d = semantics::isolation(&policy, &p, established);
            match d {
                Decision::Allow(k) => {
                    want_rules[k as usize] += 1;
                    if p.ports.is_some() {
                        flows.insert(p);
                    }
                }
                Decision::Except(j) => want_rules[64 + j as usize] += 1,
                _ => {}
            }
            let reason = expected_reason(d, &policy, &p);
            want[reason as usize] += 1;
            let f = frame(&p);
            let mut out = vec![0u8; f.len() + 64];
            let got = dp
                .xdp
                .test_run(TestRunOptions {
                    data_in: Some(&f),
                    data_out: Some(&mut out),
                    repeat: 1,
                    ..Default::default()
                })
                .unwrap()
                .return_value;
            // A reject leaves XDP as PASS, tagged for TC ingress to answer, or as DROP once
            // the answers' rate limit is reached.
            let ok = match reason {
                Reason::RejectIsolated => got == 2 || got == 1,
                r if r.is_drop() => got == 1,
                _ => got == 2,
            };
            assert!(
                ok,
                "seed {seed}, policy {round}, packet {i}: the reference says {d:?} ({reason:?}), BPF returned {}\n\
                 packet: {p:?} (established: {established})\npolicy:\n{}",
                if got == 1 { "DROP" } else { "PASS" },
                policy::to_toml(&policy)
            );
            checked += 1;
        }
        // Reasons and deciding rules, per policy: the counters must have moved exactly so.
        let after = counters(&dp);
        let mut moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        // Rate-limited rejects are rejects.
        moved[Reason::RejectIsolated as usize] += moved[Reason::DropRejectLimited as usize];
        moved[Reason::DropRejectLimited as usize] = 0;
        for (i, (m, w)) in moved.iter().zip(&want).enumerate() {
            assert_eq!(
                m,
                w,
                "seed {seed}, policy {round}: reason {:?} counted {m}, expected {w}\npolicy:\n{}",
                Reason::from_u32(i as u32),
                policy::to_toml(&policy)
            );
        }
        let rules_moved: Vec<u64> = rule_counters(&dp)
            .iter()
            .zip(&rules_before)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(
            rules_moved,
            want_rules,
            "seed {seed}, policy {round}: per-rule counters\npolicy:\n{}",
            policy::to_toml(&policy)
        );
    }
    assert_eq!(checked, POLICIES * PACKETS);
}
