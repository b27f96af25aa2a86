//! BPF verdict tests: the real programs, loaded and pinned by the loader's own code, run on
//! crafted frames through BPF_PROG_TEST_RUN. Fast and exact.

use std::fs;

use aya::{
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use isolation_common::{LogEvent, LogStat, Reason, flags, maps};
use isolation_user::{
    backend::ebpf::{counters, pinned, pins, slots},
    policy::{Policy, Whitelist},
    state::Paths,
};
use rstest::rstest;
use tests::pkt::{self, *};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TCX_NEXT: i32 = -1;

/// A private datapath: its own pin dir, removed on drop.
struct Dp {
    paths: Paths,
    xdp: Xdp,
    tc: SchedClassifier,
}

impl Dp {
    fn new(allow: &[&str]) -> Option<Dp> {
        Self::with(allow, true, true)
    }

    fn with(allow: &[&str], enabled: bool, log: bool) -> Option<Dp> {
        if !tests::can_run("BPF verdict test") {
            return None;
        }
        let (paths, xdp, tc) = tests::private_datapath("isov");
        let mut policy = Policy::default();
        policy.whitelist = Whitelist {
            enabled,
            log,
            allow: allow
                .iter()
                .map(|a| isolation_user::policy::parse_net(a).unwrap())
                .collect(),
        };
        tests::apply_with(&paths, &policy, Some(&policy.whitelist.allow), 1);
        Some(Dp { paths, xdp, tc })
    }

    fn ingress(&self, frame: &[u8]) -> u32 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        self.xdp.test_run(opts).expect("XDP test run").return_value
    }

    fn egress(&self, frame: &[u8]) -> i32 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        self.tc.test_run(opts).expect("TC test run").return_value as i32
    }

    fn count(&self, r: Reason) -> u64 {
        counters::counters(&self.paths)
            .unwrap()
            .iter()
            .find(|(x, _)| *x == r)
            .unwrap()
            .1
            .packets
    }

    /// The oldest event in the log's ring buffer, as `trace` prints it (on eth0).
    fn first_event(&self) -> String {
        let mut rb: RingBuf<MapData> = pinned::open_map(&self.paths, maps::EVENTS)
            .unwrap()
            .try_into()
            .unwrap();
        let item = rb.next().expect("an event in the ring buffer");
        let e: LogEvent = *bytemuck::from_bytes(&item[..std::mem::size_of::<LogEvent>()]);
        isolation_user::render::format_line(&e, "eth0")
    }

    /// Asserts the verdict and that exactly this reason's counter moved by one.
    fn expect(&self, frame: &[u8], action: u32, reason: Reason, what: &str) {
        let before = self.count(reason);
        let got = self.ingress(frame);
        assert_eq!(
            got,
            action,
            "{what}: wanted {}, got {}",
            name(action),
            name(got)
        );
        assert_eq!(
            self.count(reason),
            before + 1,
            "{what}: counted under another reason than {reason:?}"
        );
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        pins::remove_pins(&self.paths);
        let _ = fs::remove_dir_all(&self.paths.state_dir);
    }
}

fn name(a: u32) -> &'static str {
    match a {
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        _ => "other",
    }
}

const LOCAL4: &str = "192.0.2.1";
const FRIEND4: &str = "203.0.113.7";
const STRANGER4: &str = "198.51.100.9";
const LOCAL6: &str = "2001:db8::1";
const FRIEND6: &str = "2001:db8:7::7";
const STRANGER6: &str = "2001:db8:9::9";
const WL: &[&str] = &[FRIEND4, "203.0.113.128/25", "2001:db8:7::/48"];

fn v4_tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    V4::new(src, dst, TCP).frame(&tcp(sport, dport, flags))
}

fn v6_tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    V6::new(src, dst, TCP).frame(&tcp(sport, dport, flags))
}

#[rstest]
#[case::v4_exact_hit(
    v4_tcp(FRIEND4, LOCAL4, 40000, 22, SYN),
    XDP_PASS,
    Reason::PassWhitelist
)]
#[case::v4_cidr_hit(
    v4_tcp("203.0.113.200", LOCAL4, 40000, 22, SYN),
    XDP_PASS,
    Reason::PassWhitelist
)]
#[case::v4_miss(
    v4_tcp(STRANGER4, LOCAL4, 40000, 22, SYN),
    XDP_DROP,
    Reason::DropNotWhitelisted
)]
#[case::v4_next_to_cidr(
    v4_tcp("203.0.113.127", LOCAL4, 40000, 22, SYN),
    XDP_DROP,
    Reason::DropNotWhitelisted
)]
#[case::v6_cidr_hit(
    v6_tcp(FRIEND6, LOCAL6, 40000, 22, SYN),
    XDP_PASS,
    Reason::PassWhitelist
)]
#[case::v6_miss(
    v6_tcp(STRANGER6, LOCAL6, 40000, 22, SYN),
    XDP_DROP,
    Reason::DropNotWhitelisted
)]
#[case::udp_miss(V4::new(STRANGER4, LOCAL4, UDP).frame(&udp(5353, 53, b"q")), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::ping_miss(V4::new(STRANGER4, LOCAL4, ICMP).frame(&icmp(8, 0, 7, 1, b"")), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::ping_hit(V4::new(FRIEND4, LOCAL4, ICMP).frame(&icmp(8, 0, 7, 1, b"")), XDP_PASS, Reason::PassWhitelist)]
#[case::vlan_hit(vlan_eth(&[10], 0x0800, &V4::new(FRIEND4, LOCAL4, TCP).build(&tcp(1, 22, SYN))), XDP_PASS, Reason::PassWhitelist)]
#[case::vlan_miss(vlan_eth(&[10], 0x0800, &V4::new(STRANGER4, LOCAL4, TCP).build(&tcp(1, 22, SYN))), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::vlan_v6_hit(vlan_eth(&[10], 0x86dd, &V6::new(FRIEND6, LOCAL6, TCP).build(&tcp(1, 22, SYN))), XDP_PASS, Reason::PassWhitelist)]
#[case::qinq_miss(vlan_eth(&[10, 20], 0x0800, &V4::new(STRANGER4, LOCAL4, TCP).build(&tcp(1, 22, SYN))), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::three_tags(vlan_eth(&[10, 20, 30], 0x0800, &V4::new(FRIEND4, LOCAL4, TCP).build(&tcp(1, 22, SYN))), XDP_DROP, Reason::DropTooManyVlans)]
#[case::arp(pkt::arp(), XDP_PASS, Reason::PassNonIp)]
#[case::vlan_arp(vlan_eth(&[10], 0x0806, &[0; 28]), XDP_PASS, Reason::PassNonIp)]
#[case::lldp(eth(0x88cc, &[0; 32]), XDP_PASS, Reason::PassNonIp)]
#[case::neighbour_solicitation({ let mut h = V6::new(STRANGER6, "ff02::1:ff00:1", ICMPV6); h.hop_limit = 255; h.frame(&icmp(135, 0, 0, 0, &[0; 16])) }, XDP_PASS, Reason::PassNeighbour)]
#[case::router_advert({ let mut h = V6::new("fe80::1", "ff02::1", ICMPV6); h.hop_limit = 255; h.frame(&icmp(134, 0, 0, 0, &[0; 8])) }, XDP_PASS, Reason::PassNeighbour)]
#[case::mld_report({ let mut h = V6::new("fe80::1", "ff02::16", ICMPV6); h.hop_limit = 1; h.frame(&icmp(143, 0, 0, 0, &[0; 8])) }, XDP_PASS, Reason::PassNeighbour)]
#[case::routed_neighbour_solicitation(V6::new(STRANGER6, "ff02::1:ff00:1", ICMPV6).frame(&icmp(135, 0, 0, 0, &[0; 16])), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::mld_with_nd_hop_limit({ let mut h = V6::new("fe80::1", "ff02::16", ICMPV6); h.hop_limit = 255; h.frame(&icmp(143, 0, 0, 0, &[0; 8])) }, XDP_DROP, Reason::DropNotWhitelisted)]
#[case::v6_echo_miss(V6::new(STRANGER6, LOCAL6, ICMPV6).frame(&icmp(128, 0, 1, 1, b"")), XDP_DROP, Reason::DropNotWhitelisted)]
#[case::v4_options_hit({ let mut h = V4::new(FRIEND4, LOCAL4, TCP); h.options = vec![1, 1, 1, 0, 0x44, 4, 5, 0]; h.frame(&tcp(1, 22, SYN)) }, XDP_PASS, Reason::PassWhitelist)]
#[case::v4_options_miss({ let mut h = V4::new(STRANGER4, LOCAL4, TCP); h.options = vec![1; 40]; h.frame(&tcp(1, 22, SYN)) }, XDP_DROP, Reason::DropNotWhitelisted)]
#[case::truncated_ipv4(eth(0x0800, &V4::new(FRIEND4, LOCAL4, TCP).build(&[])[..12]), XDP_DROP, Reason::DropMalformed)]
#[case::truncated_ipv6(eth(0x86dd, &V6::new(FRIEND6, LOCAL6, TCP).build(&[])[..30]), XDP_DROP, Reason::DropMalformed)]
#[case::ihl_too_small({ let mut b = V4::new(FRIEND4, LOCAL4, TCP).build(&tcp(1, 22, SYN)); b[0] = 0x44; eth(0x0800, &b) }, XDP_DROP, Reason::DropMalformed)]
#[case::options_past_end({ let mut b = V4::new(FRIEND4, LOCAL4, TCP).build(&[]); b[0] = 0x4f; eth(0x0800, &b) }, XDP_DROP, Reason::DropMalformed)]
#[case::wrong_version({ let mut b = V4::new(FRIEND4, LOCAL4, TCP).build(&tcp(1, 22, SYN)); b[0] = 0x65; eth(0x0800, &b) }, XDP_DROP, Reason::DropMalformed)]
#[case::vlan_cut_short(eth(0x8100, &[0, 10]), XDP_DROP, Reason::DropMalformed)]
#[case::later_fragment_miss({ let mut h = V4::new(STRANGER4, LOCAL4, UDP); h.frag_offset = 185; h.frame(&[0; 64]) }, XDP_DROP, Reason::DropNotWhitelisted)]
#[case::later_fragment_hit({ let mut h = V4::new(FRIEND4, LOCAL4, UDP); h.frag_offset = 185; h.frame(&[0; 64]) }, XDP_PASS, Reason::PassWhitelist)]
#[case::too_many_v6_ext_miss({ let mut h = V6::new(STRANGER6, LOCAL6, TCP); h.ext = (0..7).map(|_| (60u8, vec![0; 6])).collect(); h.frame(&tcp(1, 22, SYN)) }, XDP_DROP, Reason::DropNotWhitelisted)]
#[case::too_many_v6_ext_hit({ let mut h = V6::new(FRIEND6, LOCAL6, TCP); h.ext = (0..7).map(|_| (60u8, vec![0; 6])).collect(); h.frame(&tcp(1, 22, SYN)) }, XDP_PASS, Reason::PassWhitelist)]
fn whitelist_verdicts(#[case] frame: Vec<u8>, #[case] action: u32, #[case] reason: Reason) {
    let Some(dp) = Dp::new(WL) else { return };
    dp.expect(&frame, action, reason, &format!("{reason:?}"));
}

#[test]
fn disabled_whitelist_passes_everything_even_garbage() {
    let Some(dp) = Dp::with(&[], false, false) else {
        return;
    };
    dp.expect(
        &v4_tcp(STRANGER4, LOCAL4, 1, 22, SYN),
        XDP_PASS,
        Reason::PassWhitelistOff,
        "stranger",
    );
    dp.expect(
        &eth(0x0800, &[0x45; 8]),
        XDP_PASS,
        Reason::PassWhitelistOff,
        "truncated",
    );
}

/// An outgoing packet through TC egress, then its reply through XDP ingress.
#[rstest]
#[case::tcp(v4_tcp(LOCAL4, STRANGER4, 50000, 443, SYN), v4_tcp(STRANGER4, LOCAL4, 443, 50000, SYN | ACK), v4_tcp(STRANGER4, LOCAL4, 443, 50001, SYN | ACK))]
#[case::tcp_v6(v6_tcp(LOCAL6, STRANGER6, 50000, 443, SYN), v6_tcp(STRANGER6, LOCAL6, 443, 50000, SYN | ACK), v6_tcp(STRANGER6, LOCAL6, 444, 50000, SYN | ACK))]
#[case::udp(V4::new(LOCAL4, STRANGER4, UDP).frame(&udp(40000, 53, b"q")), V4::new(STRANGER4, LOCAL4, UDP).frame(&udp(53, 40000, b"a")), V4::new(STRANGER4, LOCAL4, UDP).frame(&udp(53, 40001, b"a")))]
#[case::ping(V4::new(LOCAL4, STRANGER4, ICMP).frame(&icmp(8, 0, 77, 1, b"")), V4::new(STRANGER4, LOCAL4, ICMP).frame(&icmp(0, 0, 77, 1, b"")), V4::new(STRANGER4, LOCAL4, ICMP).frame(&icmp(0, 0, 78, 1, b"")))]
#[case::ping6(V6::new(LOCAL6, STRANGER6, ICMPV6).frame(&icmp(128, 0, 77, 1, b"")), V6::new(STRANGER6, LOCAL6, ICMPV6).frame(&icmp(129, 0, 77, 1, b"")), V6::new(STRANGER6, LOCAL6, ICMPV6).frame(&icmp(129, 0, 78, 1, b"")))]
#[case::reply_with_v4_options(v4_tcp(LOCAL4, STRANGER4, 50000, 443, SYN), { let mut h = V4::new(STRANGER4, LOCAL4, TCP); h.options = vec![1; 8]; h.frame(&tcp(443, 50000, ACK)) }, { let mut h = V4::new(STRANGER4, LOCAL4, TCP); h.options = vec![1; 8]; h.frame(&tcp(443, 50002, ACK)) })]
#[case::reply_with_v6_ext_headers(v6_tcp(LOCAL6, STRANGER6, 50000, 443, SYN), { let mut h = V6::new(STRANGER6, LOCAL6, TCP); h.ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (43, vec![0; 14]), (60, vec![0; 6])]; h.frame(&tcp(443, 50000, ACK)) }, { let mut h = V6::new(STRANGER6, LOCAL6, TCP); h.ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![0; 6])]; h.frame(&tcp(443, 50003, ACK)) })]
#[case::reply_vlan(vlan_eth(&[7], 0x0800, &V4::new(LOCAL4, STRANGER4, UDP).build(&udp(40000, 53, b""))), vlan_eth(&[7], 0x0800, &V4::new(STRANGER4, LOCAL4, UDP).build(&udp(53, 40000, b""))), vlan_eth(&[7], 0x0800, &V4::new(STRANGER4, LOCAL4, UDP).build(&udp(54, 40000, b""))))]
fn replies_of_outgoing_flows_pass(
    #[case] out: Vec<u8>,
    #[case] reply: Vec<u8>,
    #[case] unrelated: Vec<u8>,
) {
    let Some(dp) = Dp::new(WL) else { return };
    dp.expect(
        &reply,
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "reply before any outgoing packet",
    );
    assert_eq!(dp.egress(&out), TCX_NEXT, "egress never blocks");
    assert_eq!(dp.count(Reason::EgressNew), 1, "recorded as new");
    dp.expect(&reply, XDP_PASS, Reason::PassEstablished, "reply");
    dp.expect(
        &unrelated,
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "same hosts, other flow",
    );
    // Answered, then its opener speaks again: the flow moves to the established table.
    assert_eq!(dp.egress(&out), TCX_NEXT);
    assert_eq!(dp.count(Reason::EgressConfirmed), 1, "confirmed");
    assert_eq!(dp.egress(&out), TCX_NEXT);
    assert_eq!(dp.count(Reason::EgressTracked), 1, "then refreshed");
    dp.expect(
        &reply,
        XDP_PASS,
        Reason::PassEstablished,
        "reply, established",
    );
}

#[test]
fn outgoing_rst_opens_nothing() {
    let Some(dp) = Dp::new(WL) else { return };
    assert_eq!(
        dp.egress(&v4_tcp(LOCAL4, STRANGER4, 22, 40000, RST | ACK)),
        TCX_NEXT
    );
    assert_eq!(dp.count(Reason::EgressIgnored), 1);
    dp.expect(
        &v4_tcp(STRANGER4, LOCAL4, 40000, 22, SYN),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "after RST",
    );
}

#[test]
fn truncated_reply_gets_no_verdict_from_garbage() {
    let Some(dp) = Dp::new(WL) else { return };
    dp.egress(&v4_tcp(LOCAL4, STRANGER4, 50000, 443, SYN));
    // The reply cut inside the TCP header: its ports cannot be read, so it is not a reply.
    let full = v4_tcp(STRANGER4, LOCAL4, 443, 50000, ACK);
    let cut = &full[..14 + 20 + 10];
    dp.expect(cut, XDP_DROP, Reason::DropNotWhitelisted, "cut reply");
    dp.expect(&full, XDP_PASS, Reason::PassEstablished, "whole reply");
}

fn icmp_error_quoting(outgoing_l3: &[u8], v6: bool, from: &str) -> Vec<u8> {
    // Errors quote the offending IP header and at least 8 bytes of what follows.
    let quote = &outgoing_l3[..outgoing_l3.len().min(if v6 { 40 + 8 } else { 20 + 8 })];
    if v6 {
        V6::new(from, LOCAL6, ICMPV6).frame(&icmp(1, 1, 0, 0, quote))
    } else {
        V4::new(from, LOCAL4, ICMP).frame(&icmp(3, 3, 0, 0, quote))
    }
}

#[test]
fn icmp_errors_about_outgoing_flows_are_related() {
    let Some(dp) = Dp::new(WL) else { return };
    let out4 = V4::new(LOCAL4, STRANGER4, UDP).build(&udp(40000, 9999, b"x"));
    let out6 = V6::new(LOCAL6, STRANGER6, TCP).build(&tcp(50000, 80, SYN));
    let router = "198.51.100.1";
    dp.expect(
        &icmp_error_quoting(&out4, false, router),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "before",
    );
    dp.egress(&eth(0x0800, &out4));
    dp.egress(&eth(0x86dd, &out6));
    dp.expect(
        &icmp_error_quoting(&out4, false, router),
        XDP_PASS,
        Reason::PassRelated,
        "v4 port unreachable",
    );
    dp.expect(
        &icmp_error_quoting(&out6, true, "2001:db8:ff::1"),
        XDP_PASS,
        Reason::PassRelated,
        "v6 unreachable",
    );
    // An error quoting a flow we never sent, and one whose quote is cut short.
    let other = V4::new(LOCAL4, STRANGER4, UDP).build(&udp(40001, 9999, b"x"));
    dp.expect(
        &icmp_error_quoting(&other, false, router),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "unknown flow",
    );
    let cut = V4::new(router, LOCAL4, ICMP).frame(&icmp(3, 3, 0, 0, &out4[..22]));
    dp.expect(
        &cut,
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "quote cut short",
    );
}

#[test]
fn fragments_of_an_admitted_reply_follow_the_first() {
    let Some(dp) = Dp::new(WL) else { return };
    dp.egress(&V4::new(LOCAL4, STRANGER4, UDP).frame(&udp(40000, 53, b"q")));
    let mut first = V4::new(STRANGER4, LOCAL4, UDP);
    first.id = 999;
    first.more_frags = true;
    dp.expect(
        &first.frame(&udp(53, 40000, &[0; 64])),
        XDP_PASS,
        Reason::PassEstablished,
        "first fragment",
    );
    let mut later = first.clone();
    later.more_frags = false;
    later.frag_offset = 9;
    dp.expect(
        &later.frame(&[0; 32]),
        XDP_PASS,
        Reason::PassFragment,
        "later fragment",
    );
    later.id = 1000;
    dp.expect(
        &later.frame(&[0; 32]),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "fragment of another datagram",
    );

    // IPv6: the fragment header carries the id.
    dp.egress(&V6::new(LOCAL6, STRANGER6, UDP).frame(&udp(40000, 53, b"q")));
    let mut f6 = V6::new(STRANGER6, LOCAL6, UDP);
    f6.ext = vec![(44, v6_frag_body(0, true, 0xabcd)[..].to_vec())];
    dp.expect(
        &f6.frame(&udp(53, 40000, &[0; 64])),
        XDP_PASS,
        Reason::PassEstablished,
        "v6 first fragment",
    );
    f6.ext = vec![(44, v6_frag_body(9, false, 0xabcd))];
    dp.expect(
        &f6.frame(&[0; 32]),
        XDP_PASS,
        Reason::PassFragment,
        "v6 later fragment",
    );
    f6.ext = vec![(44, v6_frag_body(9, false, 0xabce))];
    dp.expect(
        &f6.frame(&[0; 32]),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "v6 fragment of another datagram",
    );
}

#[test]
fn live_whitelist_edits_take_effect() {
    let Some(dp) = Dp::new(&[]) else { return };
    let f = v4_tcp(STRANGER4, LOCAL4, 1, 22, SYN);
    dp.expect(&f, XDP_DROP, Reason::DropNotWhitelisted, "before add");
    // Through the backend, as `whitelist add/del` do: a CIDR also switches its trie on.
    use isolation_user::backend::Backend as _;
    let mut b = isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone());
    let net: ipnet::IpNet = "198.51.100.0/24".parse().unwrap();
    b.edit_whitelist(&[net], &[], 2, &mut |_| {}).unwrap();
    dp.expect(&f, XDP_PASS, Reason::PassWhitelist, "after add");
    let cidr_bits = |dp: &Dp| slots::read_config(&dp.paths).unwrap().flags & flags::WL_CIDRS;
    assert_eq!(
        cidr_bits(&dp),
        flags::WL_CIDR_V4,
        "the IPv4 trie is looked up"
    );
    b.edit_whitelist(&[], &[net], 3, &mut |_| {}).unwrap();
    dp.expect(&f, XDP_DROP, Reason::DropNotWhitelisted, "after del");
    assert_eq!(cidr_bits(&dp), 0, "an empty trie is skipped");
}

#[test]
fn drops_are_logged_with_a_rate_limit() {
    let Some(dp) = Dp::new(WL) else { return };
    let f = V4::new(STRANGER4, LOCAL4, TCP).frame(&tcp(41000, 22, SYN));
    // The log bucket is per CPU: keep this thread on one CPU.
    pin_to_one_cpu();
    for _ in 0..300 {
        assert_eq!(dp.ingress(&f), XDP_DROP);
    }
    let stats = counters::log_stats(&dp.paths).unwrap();
    let written = stats[LogStat::Written as usize];
    let suppressed = stats[LogStat::Suppressed as usize];
    assert!(
        (1..=130).contains(&written),
        "burst bounds the log: {written} written"
    );
    assert_eq!(written + suppressed + stats[LogStat::Lost as usize], 300);
    assert_eq!(
        dp.first_event(),
        "isolation DROP not-whitelisted: IN=eth0 SRC=198.51.100.9 DST=192.0.2.1 LEN=54 TTL=64 PROTO=TCP SPT=41000 DPT=22 SYN"
    );
}

#[test]
fn no_log_when_logging_is_off() {
    let Some(dp) = Dp::with(WL, true, false) else {
        return;
    };
    assert_eq!(dp.ingress(&v4_tcp(STRANGER4, LOCAL4, 1, 22, SYN)), XDP_DROP);
    assert_eq!(counters::log_stats(&dp.paths).unwrap(), [0, 0, 0]);
}

#[test]
fn rejects_are_rate_limited() {
    if !tests::can_run("BPF verdict test") {
        return;
    }
    let Some(dp) = Dp::new(&[]) else { return };
    let text = "[isolation]\ndefault = \"deny\"\nreject = true\n[networks.a]\nsubnets = [\"198.51.100.0/25\"]\n[networks.b]\nsubnets = [\"198.51.100.128/25\"]\n";
    let mut policy = isolation_user::policy::parse("p", text).unwrap();
    policy.whitelist.enabled = false;
    tests::apply(&dp.paths, &policy, 2);
    let f = v4_tcp("198.51.100.1", "198.51.100.200", 40000, 22, SYN);
    // The bucket is per CPU: keep this thread on one CPU, or two buckets would answer.
    pin_to_one_cpu();
    let mut passed = 0;
    for _ in 0..1000 {
        // Tagged for TC ingress to answer (PASS), or dropped once the bucket is empty.
        if dp.ingress(&f) == XDP_PASS {
            passed += 1;
        }
    }
    let answered = dp.count(Reason::RejectIsolated);
    let limited = dp.count(Reason::DropRejectLimited);
    assert_eq!(answered, passed);
    assert_eq!(answered + limited, 1000);
    assert!(
        (1..=260).contains(&answered),
        "a burst of about 200, then the rate: {answered}"
    );
    assert!(limited >= 700, "{limited}");
}

/// An outer UDP/VXLAN frame from `outer_src` carrying `inner` (an Ethernet frame).
fn vxlan(outer_src: &str, outer_dst: &str, sport: u16, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    payload.extend_from_slice(inner);
    V4::new(outer_src, outer_dst, UDP).frame(&udp(sport, 4789, &payload))
}

#[test]
fn vxlan_outer_by_whitelist_inner_by_isolation() {
    let Some(dp) = Dp::new(&["192.0.2.1"]) else {
        return;
    };
    let text = "[isolation]\ndefault = \"deny\"\nreject = true\nvxlan_ports = [4789]\n\
        [networks.it]\nsubnets = [\"198.51.100.0/25\"]\n[networks.hr]\nsubnets = [\"198.51.100.128/25\"]\n\
        [[isolation.allow]]\nfrom = \"hr\"\nto = \"it\"\nports = [\"tcp:80\"]\n\
        [whitelist]\nallow = [\"192.0.2.1\"]\n";
    let policy = isolation_user::policy::parse("p", text).unwrap();
    tests::apply(&dp.paths, &policy, 2);
    let hr_to_it = |dport| v4_tcp("198.51.100.200", "198.51.100.10", 40000, dport, SYN);
    let it_to_hr = v4_tcp("198.51.100.10", "198.51.100.200", 5555, 80, SYN);
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &hr_to_it(80)),
        XDP_PASS,
        Reason::PassAllow,
        "inner allowed",
    );
    // Inside a tunnel a deny is a drop, even with reject = true.
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &hr_to_it(81)),
        XDP_DROP,
        Reason::DropIsolated,
        "inner denied",
    );
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &it_to_hr),
        XDP_DROP,
        Reason::DropIsolated,
        "it -> hr",
    );
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &pkt::arp()),
        XDP_PASS,
        Reason::PassWhitelist,
        "inner ARP",
    );
    dp.expect(
        &vxlan(
            "192.0.2.1",
            "192.0.2.2",
            5000,
            &v4_tcp("192.0.2.50", "198.51.100.10", 1, 80, SYN),
        ),
        XDP_PASS,
        Reason::PassWhitelist,
        "inner source in no network",
    );
    dp.expect(
        &vxlan("192.0.2.9", "192.0.2.2", 5000, &hr_to_it(80)),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "outer not whitelisted",
    );
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &[0u8; 10]),
        XDP_DROP,
        Reason::DropMalformed,
        "inner frame cut short",
    );
    // The host's own overlay connection: egress records the inner flow, its reply passes.
    let out = vxlan(
        "192.0.2.2",
        "192.0.2.1",
        6000,
        &v4_tcp("198.51.100.200", "198.51.100.10", 40000, 80, SYN),
    );
    assert_eq!(dp.egress(&out), TCX_NEXT);
    let reply = v4_tcp("198.51.100.10", "198.51.100.200", 80, 40000, SYN | ACK);
    dp.expect(
        &vxlan("192.0.2.1", "192.0.2.2", 5000, &reply),
        XDP_PASS,
        Reason::PassEstablished,
        "inner reply",
    );
    // Not a VXLAN port: an ordinary UDP packet, judged as itself (not subject here).
    let plain = V4::new("192.0.2.1", "192.0.2.2", UDP).frame(&udp(5000, 4790, &[0; 16]));
    dp.expect(&plain, XDP_PASS, Reason::PassWhitelist, "other port");
}

fn pin_to_one_cpu() {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// REJECT answers a denied connection attempt, never an answer: a TCP RST, an ICMP or
/// ICMPv6 error, a later fragment (its first bytes are payload) or a packet from or to a
/// multicast or broadcast address is dropped silently, as iptables' REJECT does.
#[test]
fn reject_never_answers_an_answer() {
    let Some(dp) = Dp::with(&[], false, true) else {
        return;
    };
    let text = "[isolation]\ndefault = \"deny\"\nreject = true\n\
        [networks.a]\nsubnets = [\"198.51.100.0/25\", \"2001:db8:a::/48\", \"224.0.0.0/4\", \"ff00::/8\"]\n\
        [networks.b]\nsubnets = [\"198.51.100.128/25\", \"2001:db8:b::/48\", \"255.255.255.255/32\"]\n";
    let policy = isolation_user::policy::parse("p", text).unwrap();
    tests::apply(&dp.paths, &policy, 2);
    pin_to_one_cpu();
    let (a4, b4, a6, b6) = (
        "198.51.100.1",
        "198.51.100.200",
        "2001:db8:a::1",
        "2001:db8:b::1",
    );
    // Positive controls: a denied SYN, UDP datagram and echo request are answered.
    let answered = [
        ("v4 SYN", v4_tcp(a4, b4, 40000, 22, SYN)),
        ("v6 SYN", v6_tcp(a6, b6, 40000, 22, SYN)),
        ("v4 UDP", V4::new(a4, b4, UDP).frame(&udp(5000, 53, b"q"))),
        (
            "v4 echo request",
            V4::new(a4, b4, ICMP).frame(&icmp(8, 0, 7, 1, b"")),
        ),
        (
            "v6 echo request",
            V6::new(a6, b6, ICMPV6).frame(&icmp(128, 0, 7, 1, b"")),
        ),
    ];
    for (what, f) in &answered {
        dp.expect(f, XDP_PASS, Reason::RejectIsolated, what);
    }
    let quote4 = V4::new(b4, a4, UDP).build(&udp(53, 5000, b""));
    let quote6 = V6::new(b6, a6, UDP).build(&udp(53, 5000, b""));
    let mut later4 = V4::new(a4, b4, UDP);
    later4.frag_offset = 10;
    let mut later6 = V6::new(a6, b6, UDP);
    later6.ext = vec![(44, pkt::v6_frag_body(10, false, 7))];
    let silent = [
        ("v4 RST", v4_tcp(a4, b4, 40000, 22, RST)),
        ("v4 RST+ACK", v4_tcp(a4, b4, 40000, 22, RST | ACK)),
        ("v6 RST", v6_tcp(a6, b6, 40000, 22, RST)),
        (
            "v4 port unreachable",
            V4::new(a4, b4, ICMP).frame(&icmp(3, 3, 0, 0, &quote4)),
        ),
        (
            "v4 time exceeded",
            V4::new(a4, b4, ICMP).frame(&icmp(11, 0, 0, 0, &quote4)),
        ),
        (
            "v4 redirect",
            V4::new(a4, b4, ICMP).frame(&icmp(5, 1, 0, 0, &quote4)),
        ),
        (
            "v6 unreachable",
            V6::new(a6, b6, ICMPV6).frame(&icmp(1, 4, 0, 0, &quote6)),
        ),
        (
            "v6 packet too big",
            V6::new(a6, b6, ICMPV6).frame(&icmp(2, 0, 0, 1280, &quote6)),
        ),
        ("v4 later fragment", later4.frame(&[0u8; 64])),
        ("v6 later fragment", later6.frame(&[0u8; 64])),
        (
            "v4 to broadcast",
            V4::new(a4, "255.255.255.255", UDP).frame(&udp(5000, 53, b"q")),
        ),
        (
            "v4 from multicast",
            V4::new("224.0.0.9", b4, UDP).frame(&udp(5000, 53, b"q")),
        ),
        (
            "v6 from multicast",
            V6::new("ff02::1", b6, UDP).frame(&udp(5000, 53, b"q")),
        ),
    ];
    for (what, f) in &silent {
        dp.expect(f, XDP_DROP, Reason::DropIsolated, what);
    }
}

/// What cannot be judged whole is dropped as soon as anything is enforced: isolation alone
/// (whitelist off) is enough. With nothing enforced it passes.
#[test]
fn unjudgeable_frames_are_dropped_once_isolation_is_on() {
    let Some(dp) = Dp::new(&[]) else { return };
    let it_to_hr = V4::new("198.51.100.10", "198.51.100.200", UDP).build(&udp(5, 9000, b"x"));
    let three_tags = vlan_eth(&[0, 0, 0], 0x0800, &it_to_hr);
    let two_tags = vlan_eth(&[0, 0], 0x0800, &it_to_hr);
    let truncated = eth(0x0800, &it_to_hr[..12]);
    let off = "[whitelist]\nenabled = false\n";
    tests::apply(
        &dp.paths,
        &isolation_user::policy::parse("p", off).unwrap(),
        2,
    );
    for (f, what) in [(&three_tags, "3 tags"), (&truncated, "truncated")] {
        dp.expect(f, XDP_PASS, Reason::PassWhitelistOff, what);
    }
    let iso = "[whitelist]\nenabled = false\n[isolation]\ndefault = \"deny\"\nreject = false\n\
        [networks.it]\nsubnets = [\"198.51.100.0/25\"]\n[networks.hr]\nsubnets = [\"198.51.100.128/25\"]\n";
    tests::apply(
        &dp.paths,
        &isolation_user::policy::parse("p", iso).unwrap(),
        3,
    );
    dp.expect(&three_tags, XDP_DROP, Reason::DropTooManyVlans, "3 tags");
    dp.expect(&truncated, XDP_DROP, Reason::DropMalformed, "truncated");
    // Two tags are read: the packet inside is judged (IT -> HR is denied).
    dp.expect(&two_tags, XDP_DROP, Reason::DropIsolated, "2 tags");
}

/// A TCP connection's life in the tables: new, confirmed by the handshake's last ACK, closed
/// by a RST; a SYN on the same tuple afterwards opens a new connection (it does not inherit
/// the closed one's short timeout).
#[test]
fn tcp_connections_are_confirmed_closed_and_reopened() {
    let Some(dp) = Dp::new(WL) else { return };
    let out = |flags| v4_tcp(LOCAL4, STRANGER4, 50000, 443, flags);
    let back = |flags| v4_tcp(STRANGER4, LOCAL4, 443, 50000, flags);
    dp.egress(&out(SYN));
    assert_eq!(dp.count(Reason::EgressNew), 1, "SYN: new");
    dp.expect(
        &back(SYN | ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "SYN-ACK",
    );
    dp.egress(&out(ACK));
    assert_eq!(dp.count(Reason::EgressConfirmed), 1, "last ACK: confirmed");
    // A SYN without ACK never answers anything, even on a known tuple.
    dp.expect(&back(SYN), XDP_DROP, Reason::DropNotWhitelisted, "bare SYN");
    dp.expect(&back(RST | ACK), XDP_PASS, Reason::PassEstablished, "RST");
    dp.egress(&out(SYN));
    assert_eq!(
        dp.count(Reason::EgressNew),
        2,
        "a SYN after the RST: new again"
    );
    dp.expect(
        &back(SYN | ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "new SYN-ACK",
    );
    dp.egress(&out(ACK));
    assert_eq!(dp.count(Reason::EgressConfirmed), 2, "confirmed again");
}

/// A flood of answered new flows, four times the size of the table of new flows, leaves an
/// established connection alone, beside its negative control: a flow that was answered but
/// never confirmed (so it sits in the new-flow LRU, as every connection sat in the single
/// table of earlier builds) is evicted by the same flood.
#[test]
fn a_flood_of_answered_flows_evicts_new_flows_not_established_ones() {
    let Some(dp) = Dp::new(WL) else { return };
    let out = |dst: &str, flags| v4_tcp(LOCAL4, dst, 50000, 443, flags);
    let back = |src: &str, flags| v4_tcp(src, LOCAL4, 443, 50000, flags);
    let (est, new) = (STRANGER4, "198.51.100.10");
    // Both opened and answered; only `est` is confirmed (its opener speaks again).
    for peer in [est, new] {
        dp.egress(&out(peer, SYN));
        let what = format!("{peer}: SYN-ACK before the flood");
        dp.expect(
            &back(peer, SYN | ACK),
            XDP_PASS,
            Reason::PassEstablished,
            &what,
        );
    }
    dp.egress(&out(est, ACK));
    // The flood: remote ends 203.0.113.1-16 (outside the whitelist's /25), every local port
    // of each; each flow out through TC egress, then answered through XDP. One frame each
    // way, its ports and remote address patched in place.
    let (mut o, mut b) = (
        v4_tcp(LOCAL4, "203.0.113.1", 1, 443, SYN),
        v4_tcp("203.0.113.1", LOCAL4, 443, 1, SYN | ACK),
    );
    let flows = 4 * isolation_common::limits::CONNTRACK;
    let mut answered = 0;
    for i in 0..flows {
        let (host, port) = (1 + (i >> 16) as u8, (i & 0xffff) as u16);
        o[33] = host;
        o[34..36].copy_from_slice(&port.to_be_bytes());
        b[29] = host;
        b[36..38].copy_from_slice(&port.to_be_bytes());
        dp.egress(&o);
        answered += u32::from(dp.ingress(&b) == XDP_PASS);
    }
    assert_eq!(answered, flows, "every flood flow was answered");
    let c = counters::connections(&dp.paths).unwrap();
    assert!(
        c.new * 10 >= c.new_max * 9,
        "the flood filled the new-flow table: {} of {}",
        c.new,
        c.new_max
    );
    // The negative control: the flood was big enough to evict an answered flow from an
    // LRU of this size (the established table has the same size).
    assert_eq!(c.new_max, c.established_max, "the two tables have one size");
    dp.expect(
        &back(new, ACK),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "new flow evicted",
    );
    dp.expect(
        &back(est, ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "established kept",
    );
}

/// Connections seeded at load are answered before any packet of theirs has left: the
/// loader marks their remote ends in the peer filter too.
#[test]
fn seeded_connections_pass_before_any_egress() {
    let Some(dp) = Dp::new(WL) else { return };
    let reply = v4_tcp(STRANGER4, LOCAL4, 443, 50000, ACK);
    dp.expect(&reply, XDP_DROP, Reason::DropNotWhitelisted, "not seeded");
    let mut key = isolation_common::FlowKey {
        sport: 50000u16.to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        family: isolation_common::AF_INET,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&LOCAL4.parse::<std::net::Ipv4Addr>().unwrap().octets());
    key.dst[..4].copy_from_slice(&STRANGER4.parse::<std::net::Ipv4Addr>().unwrap().octets());
    isolation_user::backend::ebpf::conntrack::seed_flows(&dp.paths, &[key]).unwrap();
    dp.expect(&reply, XDP_PASS, Reason::PassEstablished, "seeded");
}

/// A whitelist big enough for its filter: the filter switches on, every listed address
/// still passes (v4 and v6), an unlisted one whose bits are all set (a false positive) is
/// still dropped by the hash, and an unlisted one is dropped. Shrunk below the threshold,
/// the filter switches off again.
#[test]
fn a_big_whitelist_is_filtered_by_its_bits_first() {
    use isolation_common::limits;
    use isolation_user::backend::Backend as _;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let Some(dp) = Dp::new(&[]) else { return };
    let n = limits::WL_BLOOM_FROM;
    let v4 = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    let v6 = |i: u32| Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 0, 0, 0, (i >> 16) as u16, i as u16);
    let nets: Vec<ipnet::IpNet> = (0..n)
        .flat_map(|i| [IpAddr::V4(v4(i)).into(), IpAddr::V6(v6(i)).into()])
        .collect();
    let mut b = isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone());
    b.edit_whitelist(&nets, &[], 2, &mut |_| {}).unwrap();
    let filter_bits = |dp: &Dp| {
        slots::read_config(&dp.paths).unwrap().flags & (flags::WL_BLOOM_V4 | flags::WL_BLOOM_V6)
    };
    assert_eq!(
        filter_bits(&dp),
        flags::WL_BLOOM_V4 | flags::WL_BLOOM_V6,
        "both hashes are big: their filters are consulted"
    );
    for i in [0, 1, n / 2, n - 1] {
        let (a, b6) = (v4(i).to_string(), v6(i).to_string());
        dp.expect(
            &v4_tcp(&a, LOCAL4, 1, 22, SYN),
            XDP_PASS,
            Reason::PassWhitelist,
            &a,
        );
        dp.expect(
            &v6_tcp(&b6, LOCAL6, 1, 22, SYN),
            XDP_PASS,
            Reason::PassWhitelist,
            &b6,
        );
    }
    let frame = |a: IpAddr| match a {
        IpAddr::V4(_) => v4_tcp(&a.to_string(), LOCAL4, 1, 22, SYN),
        IpAddr::V6(_) => v6_tcp(&a.to_string(), LOCAL6, 1, 22, SYN),
    };
    // The datapath does consult the filters, in their live half: with one listed address's
    // bits cleared by hand, that address is refused (v4 and v6), and passes again once the
    // bits are back. An unlisted address given all its bits by hand (a false positive) is
    // still refused: the hash has the last word.
    let held = |dp: &Dp, a: IpAddr, what: &str| {
        dp.expect(&frame(a), XDP_PASS, Reason::PassWhitelist, what)
    };
    let not_held = |dp: &Dp, a: IpAddr, what: &str| {
        dp.expect(&frame(a), XDP_DROP, Reason::DropNotWhitelisted, what)
    };
    for (name, hi, a, stranger) in [
        (
            maps::WL_V4_BLOOM,
            flags::WL_BLOOM_HI_V4,
            IpAddr::V4(v4(5)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
        ),
        (
            maps::WL_V6_BLOOM,
            flags::WL_BLOOM_HI_V6,
            IpAddr::V6(v6(5)),
            IpAddr::V6("2001:db8:bb::77".parse().unwrap()),
        ),
    ] {
        filter_is_consulted(&dp, name, hi, a, stranger, &held, &not_held);
    }
    // Back under the threshold (a whole-policy sync shrinks the hashes): filters off, the
    // remaining entries still pass.
    let few: Vec<ipnet::IpNet> = nets[..20].to_vec();
    let policy = Policy {
        whitelist: Whitelist {
            enabled: true,
            log: true,
            allow: few.clone(),
        },
        ..Policy::default()
    };
    tests::apply_with(&dp.paths, &policy, Some(&few), 3);
    assert_eq!(filter_bits(&dp), 0, "small hashes: no filter");
    let a = v6(3).to_string();
    dp.expect(
        &v6_tcp(&a, LOCAL6, 1, 22, SYN),
        XDP_PASS,
        Reason::PassWhitelist,
        "kept",
    );
    let gone = v6(n - 1).to_string();
    dp.expect(
        &v6_tcp(&gone, LOCAL6, 1, 22, SYN),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "gone",
    );
}

/// A blocklist big enough for its filters: they switch on, every blocked address is still
/// dropped (v4 and v6) and others pass. The datapath does read them: a blocked address whose
/// bits are cleared by hand passes (and is dropped again once they are back), a stranger
/// given all its bits by hand still passes (the hash has the last word). Deletions past a
/// fifth of the keys rebuild the other half, which then holds exactly the bits of the
/// addresses left; shrunk below the threshold, the filters switch off, and what is left is
/// still dropped.
#[test]
fn a_big_blocklist_is_filtered_by_its_bits_first() {
    use isolation_common::limits;
    use isolation_user::backend::Backend as _;
    use isolation_user::blocklist::{PERMANENT, View, changed};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let Some(dp) = Dp::new(&[]) else { return };
    let policy =
        isolation_user::policy::parse("p", "[whitelist]\nenabled = false\n[blocklist]\n").unwrap();
    tests::apply(&dp.paths, &policy, 2);
    let n = limits::WL_BLOOM_FROM;
    let v4 = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
    let v6 = |i: u32| Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 0, 0, 0, (i >> 16) as u16, i as u16);
    let view_of = |r: std::ops::Range<u32>| -> View {
        r.flat_map(|i| [IpAddr::V4(v4(i)).into(), IpAddr::V6(v6(i)).into()])
            .map(|net| (net, PERMANENT))
            .collect()
    };
    let mut b = isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone());
    let mut live = View::default();
    let mut edit = |b: &mut isolation_user::backend::ebpf::Ebpf, next: View| {
        b.edit_blocklist(&live, &next, &changed(&live, &next))
            .expect("the blocklist written");
        live = next;
    };
    // 20,000 more than the threshold, so that deleting them keeps the filters on.
    let extra = 20_000;
    edit(&mut b, view_of(0..n + extra));
    let bits = |dp: &Dp| {
        slots::read_config(&dp.paths).unwrap().flags & (flags::BL_BLOOM_V4 | flags::BL_BLOOM_V6)
    };
    assert_eq!(
        bits(&dp),
        flags::BL_BLOOM_V4 | flags::BL_BLOOM_V6,
        "both hashes are big: their filters are consulted"
    );
    let frame = |a: IpAddr| match a {
        IpAddr::V4(_) => eth(
            0x0800,
            &V4::new(&a.to_string(), LOCAL4, UDP).build(&udp(41000, 53, b"x")),
        ),
        IpAddr::V6(_) => eth(
            0x86dd,
            &V6::new(&a.to_string(), LOCAL6, UDP).build(&udp(41000, 53, b"x")),
        ),
    };
    let blocked = |dp: &Dp, a: IpAddr, what: &str| {
        dp.expect(
            &frame(a),
            XDP_DROP,
            Reason::DropBlocked,
            &format!("{a}: {what}"),
        )
    };
    let passes = |dp: &Dp, a: IpAddr, what: &str| {
        dp.expect(
            &frame(a),
            XDP_PASS,
            Reason::PassWhitelistOff,
            &format!("{a}: {what}"),
        )
    };
    for i in [0, 1, n / 2, n + extra - 1] {
        blocked(&dp, IpAddr::V4(v4(i)), "listed");
        blocked(&dp, IpAddr::V6(v6(i)), "listed");
    }
    for (name, hi, a, stranger) in [
        (
            maps::BL_V4_BLOOM,
            flags::BL_BLOOM_HI_V4,
            IpAddr::V4(v4(5)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
        ),
        (
            maps::BL_V6_BLOOM,
            flags::BL_BLOOM_HI_V6,
            IpAddr::V6(v6(5)),
            IpAddr::V6("2001:db8:bb::77".parse().unwrap()),
        ),
    ] {
        filter_is_consulted(&dp, name, hi, a, stranger, &blocked, &passes);
    }
    // Deleting the 20,000 extra addresses (over a fifth of the keys counted) rebuilds the
    // other half: the live half flips and holds exactly the bits of those left.
    let (_, hi_before) = live_bloom_half(&dp.paths, maps::BL_V6_BLOOM, flags::BL_BLOOM_HI_V6);
    edit(&mut b, view_of(0..n));
    let (half, hi_after) = live_bloom_half(&dp.paths, maps::BL_V6_BLOOM, flags::BL_BLOOM_HI_V6);
    assert_ne!(
        hi_before, hi_after,
        "the other half was built and swapped in"
    );
    let left: Vec<Ipv6Addr> = (0..n).map(v6).collect();
    assert!(
        half == bloom_of(&left),
        "the new half holds exactly the addresses left"
    );
    assert_eq!(bits(&dp), flags::BL_BLOOM_V4 | flags::BL_BLOOM_V6);
    passes(&dp, IpAddr::V6(v6(n + 1)), "deleted");
    blocked(&dp, IpAddr::V6(v6(n - 1)), "kept");
    // An upgrade: the filters are switched off (the hashes alone still block), then rebuilt
    // and switched on again.
    let upgrade = isolation_user::backend::ebpf::blocklist::forget_filters;
    upgrade(&dp.paths).unwrap();
    assert_eq!(bits(&dp), 0, "forgotten: the hashes alone");
    blocked(&dp, IpAddr::V4(v4(n - 1)), "no filter");
    let (_, hi_before) = live_bloom_half(&dp.paths, maps::BL_V6_BLOOM, flags::BL_BLOOM_HI_V6);
    isolation_user::backend::ebpf::blocklist::refresh(&dp.paths).unwrap();
    assert_eq!(bits(&dp), flags::BL_BLOOM_V4 | flags::BL_BLOOM_V6);
    let (half, hi_after) = live_bloom_half(&dp.paths, maps::BL_V6_BLOOM, flags::BL_BLOOM_HI_V6);
    assert_ne!(hi_before, hi_after, "rebuilt after the upgrade");
    assert!(half == bloom_of(&left), "rebuilt from the hash's keys");
    blocked(&dp, IpAddr::V6(v6(n - 1)), "after the upgrade");
    // Below the threshold: filters off, what is left still blocked, the rest passes.
    edit(&mut b, view_of(0..20));
    assert_eq!(bits(&dp), 0, "small hashes: no filter");
    blocked(&dp, IpAddr::V4(v4(3)), "kept, small");
    blocked(&dp, IpAddr::V6(v6(3)), "kept, small");
    passes(&dp, IpAddr::V6(v6(n - 1)), "gone");
}

/// The datapath reads the live half of the filter `name` (`hi_flag`: its half bit): `a`,
/// which the hash holds, is treated as not held (`not_held`) once its bits are cleared by
/// hand and as held (`held`) when they are back; `stranger`, which the hash does not hold,
/// stays not held even with all its bits set by hand (a false positive: the hash has the
/// last word).
fn filter_is_consulted(
    dp: &Dp,
    name: &str,
    hi_flag: u32,
    a: std::net::IpAddr,
    stranger: std::net::IpAddr,
    held: &dyn Fn(&Dp, std::net::IpAddr, &str),
    not_held: &dyn Fn(&Dp, std::net::IpAddr, &str),
) {
    use isolation_common::{AF_INET, AF_INET6, limits::WL_BLOOM_WORDS, wl_bloom};
    use std::net::IpAddr;
    let bits = |a: IpAddr| {
        let mut key = [0u8; 16];
        let family = match a {
            IpAddr::V4(x) => {
                key[..4].copy_from_slice(&x.octets());
                AF_INET
            }
            IpAddr::V6(x) => {
                key = x.octets();
                AF_INET6
            }
        };
        wl_bloom(family, &key)
    };
    let base = if slots::read_config(&dp.paths).unwrap().flags & hi_flag != 0 {
        WL_BLOOM_WORDS
    } else {
        0
    };
    let mut words: aya::maps::Array<MapData, u64> = pinned::open_map(&dp.paths, name)
        .unwrap()
        .try_into()
        .unwrap();
    let (w, m) = bits(a);
    let old = words.get(&(base + w), 0).unwrap();
    assert_eq!(old & m, m, "{a}'s bits are set");
    words.set(base + w, &(old & !m), 0).unwrap();
    not_held(dp, a, "bits cleared");
    words.set(base + w, &old, 0).unwrap();
    held(dp, a, "bits back");
    let (w, m) = bits(stranger);
    let old = words.get(&(base + w), 0).unwrap();
    not_held(dp, stranger, "stranger");
    words.set(base + w, &(old | m), 0).unwrap();
    not_held(dp, stranger, "a stranger whose bits are set");
    words.set(base + w, &old, 0).unwrap();
}

/// The live half of `name`'s filter, read whole, and whether it is the second half.
fn live_bloom_half(paths: &Paths, name: &str, hi_flag: u32) -> (Vec<u64>, bool) {
    use isolation_common::limits::WL_BLOOM_WORDS;
    let hi = slots::read_config(paths).unwrap().flags & hi_flag != 0;
    let a = pinned::SharedArray::open(paths, name).unwrap();
    // SAFETY: the mapping holds WL_BLOOM_LEN words (at least two halves), page-aligned;
    // it is only read here, while `a` lives.
    let words = unsafe {
        std::slice::from_raw_parts(a.as_mut_ptr() as *const u64, 2 * WL_BLOOM_WORDS as usize)
    };
    let base = if hi { WL_BLOOM_WORDS as usize } else { 0 };
    (words[base..base + WL_BLOOM_WORDS as usize].to_vec(), hi)
}

/// The half a filter holding exactly `addrs` has.
fn bloom_of(addrs: &[std::net::Ipv6Addr]) -> Vec<u64> {
    use isolation_common::{AF_INET6, limits::WL_BLOOM_WORDS, wl_bloom};
    let mut half = vec![0u64; WL_BLOOM_WORDS as usize];
    for a in addrs {
        let (w, m) = wl_bloom(AF_INET6, &a.octets());
        half[w as usize] |= m;
    }
    half
}

/// Deleted addresses leave their bits set; once deletions pass a fifth of the keys the
/// filter counts, the next edit rebuilds the other half from the hash's keys and swaps it
/// in. After churn the live half holds exactly the bits of the addresses listed, listed
/// ones pass and deleted ones are dropped. An upgrade (`forget_filters`, then `refresh`)
/// switches the filter off first, so the datapath reads the hash alone while a build of
/// another design may have added keys without bits, then rebuilds it.
#[test]
fn churn_rebuilds_the_whitelist_filter_beside_the_live_one() {
    use isolation_common::limits;
    use isolation_user::backend::{Backend as _, ebpf::whitelist};
    use std::net::{IpAddr, Ipv6Addr};
    let Some(dp) = Dp::new(&[]) else { return };
    let n = limits::WL_BLOOM_FROM + 4096;
    let v6 = |i: u32| Ipv6Addr::new(0x2001, 0xdb8, 0xcc, 0, 0, 0, (i >> 16) as u16, i as u16);
    let net = |a: Ipv6Addr| ipnet::IpNet::from(IpAddr::V6(a));
    let mut b = isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone());
    let all: Vec<Ipv6Addr> = (0..n).map(v6).collect();
    let nets: Vec<ipnet::IpNet> = all.iter().copied().map(net).collect();
    b.edit_whitelist(&nets, &[], 2, &mut |_| {}).unwrap();
    let (half, hi0) = live_bloom_half(&dp.paths, maps::WL_V6_BLOOM, flags::WL_BLOOM_HI_V6);
    assert!(
        half == bloom_of(&all),
        "a fresh filter holds the bits of every entry"
    );
    let on = |dp: &Dp| slots::read_config(&dp.paths).unwrap().flags & flags::WL_BLOOM_V6 != 0;
    assert!(on(&dp), "a big hash's filter is consulted");
    // A tenth deleted: under a fifth of the keys, so the stale bits stay.
    let tenth = (n / 10) as usize;
    b.edit_whitelist(&[], &nets[..tenth], 3, &mut |_| {})
        .unwrap();
    let (half, hi) = live_bloom_half(&dp.paths, maps::WL_V6_BLOOM, flags::WL_BLOOM_HI_V6);
    assert_eq!(hi, hi0, "few deletions: the same half");
    assert!(half == bloom_of(&all), "deleted entries keep their bits");
    let gone = all[0].to_string();
    dp.expect(
        &v6_tcp(&gone, LOCAL6, 1, 22, SYN),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "deleted, bits still set: the hash refuses it",
    );
    // An eighth more: past a fifth. The other half is built from the keys left and swapped
    // in.
    let cut = tenth + (n / 8) as usize;
    b.edit_whitelist(&[], &nets[tenth..cut], 4, &mut |_| {})
        .unwrap();
    let (half, hi) = live_bloom_half(&dp.paths, maps::WL_V6_BLOOM, flags::WL_BLOOM_HI_V6);
    assert_ne!(hi, hi0, "rebuilt in the other half");
    assert!(on(&dp), "still consulted");
    assert!(
        half == bloom_of(&all[cut..]),
        "the rebuilt half holds exactly the bits of the entries left"
    );
    for (a, action, reason) in [
        (all[cut], XDP_PASS, Reason::PassWhitelist),
        (all[n as usize - 1], XDP_PASS, Reason::PassWhitelist),
        (all[0], XDP_DROP, Reason::DropNotWhitelisted),
        (all[cut - 1], XDP_DROP, Reason::DropNotWhitelisted),
    ] {
        let s = a.to_string();
        dp.expect(&v6_tcp(&s, LOCAL6, 1, 22, SYN), action, reason, &s);
    }
    // An upgrade. Zero the live half by hand, as keys added by a build that kept no bits
    // would leave it: once the filter is forgotten the hash alone decides, so a listed
    // address passes; `refresh` rebuilds the filter and switches it on again.
    whitelist::forget_filters(&dp.paths).unwrap();
    assert!(!on(&dp), "forgotten: not consulted");
    let (_, hi) = live_bloom_half(&dp.paths, maps::WL_V6_BLOOM, flags::WL_BLOOM_HI_V6);
    {
        let a = pinned::SharedArray::open(&dp.paths, maps::WL_V6_BLOOM).unwrap();
        let base = if hi {
            limits::WL_BLOOM_WORDS as usize
        } else {
            0
        };
        // SAFETY: the live half, inside the mapping (WL_BLOOM_LEN words, page-aligned).
        unsafe {
            std::slice::from_raw_parts_mut(
                (a.as_mut_ptr() as *mut u64).add(base),
                limits::WL_BLOOM_WORDS as usize,
            )
            .fill(0)
        };
    }
    let kept = all[cut + 1].to_string();
    dp.expect(
        &v6_tcp(&kept, LOCAL6, 1, 22, SYN),
        XDP_PASS,
        Reason::PassWhitelist,
        "filter forgotten: the hash decides",
    );
    whitelist::refresh(&dp.paths).unwrap();
    assert!(on(&dp), "refreshed: consulted again");
    let (half, _) = live_bloom_half(&dp.paths, maps::WL_V6_BLOOM, flags::WL_BLOOM_HI_V6);
    assert!(half == bloom_of(&all[cut..]), "refresh rebuilt it");
    dp.expect(
        &v6_tcp(&kept, LOCAL6, 1, 22, SYN),
        XDP_PASS,
        Reason::PassWhitelist,
        "refreshed",
    );
    dp.expect(
        &v6_tcp(&gone, LOCAL6, 1, 22, SYN),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "refreshed, deleted",
    );
}

/// The remote-host filter in front of the connection tables is rebuilt from the flows the
/// tables remember: after the host talked to 24,000 hosts whose flows are gone, the
/// service's upkeep finds a sixth of the slots counting and rebuilds; the slots stop
/// counting but the one of the flow still remembered, whose next reply passes (it would
/// be dropped, had the rebuild not marked its slot again), and a flow opened after the
/// rebuild is marked and answered as before. Below the threshold the upkeep does nothing.
#[test]
fn the_remote_host_filter_is_rebuilt_from_the_remembered_flows() {
    use aya::maps::HashMap;
    use isolation_common::{FlowKey, FlowValue};
    use isolation_user::backend::{Backend as _, ebpf::conntrack};
    let Some(dp) = Dp::new(WL) else { return };
    let remote = |i: u32| format!("2001:db8:77::{:x}:{:x}", i >> 16, i & 0xffff);
    const HOSTS: u32 = 24_000;
    for i in 0..HOSTS {
        assert_eq!(
            dp.egress(&v6_tcp(LOCAL6, &remote(i), 40000, 443, SYN)),
            TCX_NEXT
        );
    }
    // The one flow that stays: answered and confirmed (it moves to the established table).
    let kept = remote(7);
    dp.expect(
        &v6_tcp(&kept, LOCAL6, 443, 40000, SYN | ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "the kept flow's SYN-ACK",
    );
    dp.egress(&v6_tcp(LOCAL6, &kept, 40000, 443, ACK));
    let before = conntrack::peers_counted(&dp.paths).unwrap();
    assert!(
        before >= (isolation_common::limits::PEER_SLOTS / 8) as usize,
        "{before} slots count"
    );
    // The other flows end (as if they expired): the new-flow table emptied.
    let mut new: HashMap<MapData, FlowKey, FlowValue> =
        pinned::open_map(&dp.paths, maps::CONNTRACK)
            .unwrap()
            .try_into()
            .unwrap();
    let keys: Vec<FlowKey> = new.keys().map(|k| k.unwrap()).collect();
    for k in &keys {
        new.remove(k).unwrap();
    }
    let mut ebpf = isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone());
    let did = ebpf
        .upkeep()
        .unwrap()
        .expect("the upkeep rebuilds the filter");
    assert!(did.contains(&format!("{before} before")), "{did}");
    dp.expect(
        &v6_tcp(&kept, LOCAL6, 443, 40000, ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "the kept flow's reply after the rebuild",
    );
    let after = conntrack::peers_counted(&dp.paths).unwrap();
    assert_eq!(after, 1, "only the kept flow's slot counts");
    // A host whose flow is gone: dropped (it is no friend), as before the rebuild.
    dp.expect(
        &v6_tcp(&remote(8), LOCAL6, 443, 40000, ACK),
        XDP_DROP,
        Reason::DropNotWhitelisted,
        "a forgotten host",
    );
    // New flows are marked with the new generation and answered.
    let fresh = "2001:db8:78::1";
    dp.egress(&v6_tcp(LOCAL6, fresh, 40001, 443, SYN));
    dp.expect(
        &v6_tcp(fresh, LOCAL6, 443, 40001, SYN | ACK),
        XDP_PASS,
        Reason::PassEstablished,
        "a flow opened after the rebuild",
    );
    assert_eq!(conntrack::peers_counted(&dp.paths).unwrap(), 2);
    assert_eq!(ebpf.upkeep().unwrap(), None, "below the threshold: nothing");
}

/// The blocklist is asked first, from the source alone, before the rest of the frame is
/// parsed: a blocked source is dropped as `blocked` untagged and behind one or two VLAN tags,
/// in IPv4 and IPv6, with its L4 header cut off too; the same frames from another source
/// pass (the control); three tags and a cut-off IP header are judged as they were (the
/// blocklist enforces, so they are dropped as such); the event of a logged blocked drop
/// carries the whole packet, ports included.
#[test]
fn blocked_sources_are_dropped_first_tagged_or_not() {
    use isolation_user::backend::Backend as _;
    let Some(dp) = Dp::new(&[]) else { return };
    let text = format!(
        "[whitelist]\nenabled = false\n[blocklist]\nentries = [\"{STRANGER4}\", \"2001:db8:9::/48\"]\n"
    );
    let policy = isolation_user::policy::parse("p", &text).unwrap();
    tests::apply(&dp.paths, &policy, 2);
    let view = isolation_user::blocklist::view(&policy.blocklist.entries, &[], 0);
    let changed = isolation_user::blocklist::changed(&Default::default(), &view);
    isolation_user::backend::ebpf::Ebpf::new(dp.paths.clone())
        .edit_blocklist(&Default::default(), &view, &changed)
        .expect("the blocklist written");
    pin_to_one_cpu();
    let v4 = |src: &str| V4::new(src, LOCAL4, UDP).build(&udp(41000, 53, b"x"));
    let v6 = |src: &str| V6::new(src, LOCAL6, UDP).build(&udp(41000, 53, b"x"));
    for (blocked, other, ether_type) in [
        (v4(STRANGER4), v4(FRIEND4), 0x0800),
        (v6(STRANGER6), v6(FRIEND6), 0x86dd),
    ] {
        for tags in [&[][..], &[7], &[7, 8]] {
            let what = format!("{} tag(s), EtherType {ether_type:#x}", tags.len());
            let f = vlan_eth(tags, ether_type, &blocked);
            dp.expect(
                &f,
                XDP_DROP,
                Reason::DropBlocked,
                &format!("blocked, {what}"),
            );
            let f = vlan_eth(tags, ether_type, &other);
            dp.expect(
                &f,
                XDP_PASS,
                Reason::PassWhitelistOff,
                &format!("control, {what}"),
            );
            // Only the IP header is needed: a cut-off UDP header is blocked all the same.
            let ip_len = if ether_type == 0x0800 { 20 } else { 40 };
            let f = vlan_eth(tags, ether_type, &blocked[..ip_len + 2]);
            dp.expect(
                &f,
                XDP_DROP,
                Reason::DropBlocked,
                &format!("cut L4, {what}"),
            );
        }
        let f = vlan_eth(&[7, 8, 9], ether_type, &blocked);
        dp.expect(&f, XDP_DROP, Reason::DropTooManyVlans, "blocked, 3 tags");
        let f = eth(ether_type, &blocked[..12]);
        dp.expect(
            &f,
            XDP_DROP,
            Reason::DropMalformed,
            "blocked, IP header cut off",
        );
    }
    // The log's first event (the bucket starts full) is the first blocked drop above.
    assert_eq!(
        dp.first_event(),
        "isolation DROP blocked: IN=eth0 SRC=198.51.100.9 DST=192.0.2.1 LEN=43 TTL=64 PROTO=UDP SPT=41000 DPT=53"
    );
}
