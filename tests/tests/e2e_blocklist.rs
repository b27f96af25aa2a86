//! End-to-end: the blocklist on both backends, with real traffic. Both clients are
//! whitelisted, so every drop here is the blocklist's (it comes before the whitelist and
//! before replies), each beside a positive control: the other client, or the other family.
//!
//!   cw (192.0.2.2, 2001:db8:1::2) --s1-- srv --s2-- cx (198.51.100.2, 2001:db8:2::2)

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use rstest::rstest;

use tests::{
    iso::Iso,
    netns::{Netns, TwoClients},
    traffic::{Echo, ping_ok, tcp_ok, udp_ok},
};

const PASS_WAIT: Duration = Duration::from_secs(3);
/// A dropped connection attempt is given this long before it counts as blocked.
const DROP_WAIT: Duration = Duration::from_millis(400);

const POLICY: &str = r#"
[whitelist]
enabled = true
log = true
allow = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8:1::/64", "2001:db8:2::/64"]
"#;

struct Lab {
    // Dropped in order: the datapath is unloaded before its namespaces go.
    iso: Iso,
    _ns: Netns,
    srv: String,
    cw: String,
    cx: String,
    policy: String,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const SRV4_W: &str = "192.0.2.1:8080";
const SRV4_X: &str = "198.51.100.1:8080";
const SRV6_X: &str = "[2001:db8:2::1]:8080";

impl Lab {
    fn new(backend: &str) -> Option<Lab> {
        if !tests::can_run("end-to-end test") {
            return None;
        }
        let TwoClients { ns, srv, cw, cx } = TwoClients::new("bl");
        let iso = Iso::with_backend(&srv, backend);
        let policy = iso.policy(POLICY);
        Some(Lab {
            iso,
            _ns: ns,
            srv,
            cw,
            cx,
            policy,
        })
    }

    /// The echo servers both clients talk to.
    fn echo(&self) -> Echo {
        Echo::start(
            &self.srv,
            &[sa("0.0.0.0:8080"), sa("[2001:db8:1::1]:8080"), sa(SRV6_X)],
        )
    }

    /// `load` on both links with the lab's policy (again: idempotent).
    fn load(&self) {
        self.iso.ok(&[
            "load",
            "--iface",
            "s1",
            "--iface",
            "s2",
            "--policy",
            &self.policy,
        ]);
    }

    /// Does the stranger's IPv4 / IPv6 TCP get through?
    fn x4(&self, wait: Duration) -> bool {
        tcp_ok(&self.cx, sa(SRV4_X), wait)
    }
    fn x6(&self, wait: Duration) -> bool {
        tcp_ok(&self.cx, sa(SRV6_X), wait)
    }
    /// Does the stranger's IPv4 TCP get dropped (passes) within `limit`, tried every
    /// 100 ms with 300 ms attempts? For changes that land with a poll.
    fn x4_dropped_within(&self, limit: Duration) -> bool {
        within(limit, || !self.x4(Duration::from_millis(300))).is_some()
    }
    fn x4_passes_within(&self, limit: Duration) -> bool {
        within(limit, || self.x4(Duration::from_millis(300))).is_some()
    }
    fn w4(&self) -> bool {
        tcp_ok(&self.cw, sa(SRV4_W), PASS_WAIT)
    }
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn blocked_sources_are_dropped_before_anything_else(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _echo = lab.echo();
    lab.load();
    assert!(
        lab.x4(PASS_WAIT) && lab.x6(PASS_WAIT) && lab.w4(),
        "all whitelisted"
    );

    // A permanent entry: IPv4 TCP, UDP and ping of the stranger dropped, though it is
    // whitelisted; its IPv6 and the other client pass.
    let out = lab.iso.ok(&["block", "add", "198.51.100.2"]);
    assert!(out.contains("blocked 1 entry permanently"), "{out}");
    let (_, d) = lab.iso.deltas(&["blocked"], || {
        assert!(!lab.x4(DROP_WAIT), "blocked tcp");
        assert!(!udp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT), "blocked udp");
        assert!(!ping_ok(&lab.cx, "198.51.100.1"), "blocked ping");
    });
    assert!(d[0] >= 3, "the drops are counted as blocked: {d:?}");
    assert!(lab.x6(PASS_WAIT), "the stranger's IPv6 is not blocked");
    assert!(lab.w4(), "the other client is not blocked");
    // Replies too: the server's own ping to the blocked host gets no answer in.
    assert!(!ping_ok(&lab.srv, "198.51.100.2"), "a blocked host's reply");
    assert!(
        ping_ok(&lab.srv, "2001:db8:2::2"),
        "an unblocked host's reply"
    );
    let check = lab.iso.ok(&["check", "198.51.100.2", "198.51.100.1"]);
    assert_eq!(check.trim(), "DROP: blocked by 198.51.100.2, permanent");
    let saved = lab.iso.ok(&["save"]);
    assert!(
        saved.contains("[blocklist]") && saved.contains("\"198.51.100.2\""),
        "{saved}"
    );

    // A CIDR with a deadline around an address with a shorter one: the address stays
    // blocked by the CIDR once its own deadline passes (the longest prefix never hides a
    // shorter one that still holds).
    lab.iso.ok(&["block", "del", "198.51.100.2"]);
    assert!(lab.x4(PASS_WAIT), "unblocked");
    lab.iso
        .ok(&["block", "add", "198.51.100.0/24", "--timeout", "60"]);
    lab.iso
        .ok(&["block", "add", "198.51.100.2", "--timeout", "1"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !lab.x4(DROP_WAIT),
        "blocked by the /24 after the /32 passed"
    );
    let list: serde_json::Value =
        serde_json::from_str(&lab.iso.ok(&["block", "list", "--json"])).unwrap();
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 1, "the passed entry is not listed: {list}");
    assert_eq!(entries[0]["entry"], "198.51.100.0/24");
    assert_eq!(entries[0]["origin"], "cli");
    let left = entries[0]["seconds_left"].as_f64().unwrap();
    assert!((50.0..=60.0).contains(&left), "{list}");
    lab.iso.ok(&["block", "del", "198.51.100.0/24"]);
    assert!(
        lab.x4(PASS_WAIT),
        "the /24 removed, its /32 passed long ago"
    );

    // A 3 s timeout is exact on the packet: dropped at 2.5 s, passing at 4 s, and neither
    // an `apply` of the policy file nor a `load` again in between changes it. The apply
    // does remove the permanent entry the file does not have (they are the policy's).
    lab.iso.ok(&["block", "add", "198.51.100.7"]);
    let t0 = Instant::now();
    lab.iso
        .ok(&["block", "add", "2001:db8:2::/64", "--timeout", "3"]);
    lab.iso.ok(&["apply", &lab.policy]);
    lab.load();
    let list = lab.iso.ok(&["block", "list"]);
    assert!(
        list.contains("2001:db8:2::/64") && !list.contains("198.51.100.7"),
        "{list}"
    );
    sleep_until(t0 + Duration::from_millis(2000));
    assert!(!lab.x6(DROP_WAIT), "dropped before its deadline");
    assert!(
        t0.elapsed() < Duration::from_millis(2900),
        "checked in time"
    );
    assert!(lab.x4(PASS_WAIT), "the other family passes meanwhile");
    sleep_until(t0 + Duration::from_millis(4000));
    assert!(
        lab.x6(Duration::from_millis(900)),
        "passing after its deadline"
    );

    // Flush removes everything; the SSH guard refuses to block this session's client.
    lab.iso
        .ok(&["block", "add", "198.51.100.0/24", "2001:db8:2::2"]);
    assert!(!lab.x4(DROP_WAIT) && !lab.x6(DROP_WAIT));
    lab.iso.ok(&["block", "flush"]);
    assert!(lab.x4(PASS_WAIT) && lab.x6(PASS_WAIT), "flushed");
    let err = String::from_utf8_lossy(
        &lab.iso
            .cmd(&["block", "add", "198.51.100.0/24"])
            .env("SSH_CONNECTION", "198.51.100.2 50000 198.51.100.1 22")
            .output()
            .unwrap()
            .stderr,
    )
    .into_owned();
    assert!(
        err.contains("refusing: blocking 198.51.100.0/24 would drop 198.51.100.2"),
        "{err}"
    );
    assert!(lab.x4(PASS_WAIT), "the refused block changed nothing");
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// Polls until `f` is true, at most `limit`; how long it took.
fn within(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The service as a bouncer of a real CrowdSec Local API polled every second: a banned
/// client is dropped within two polls and passes again after the decision's duration; a
/// deleted decision is lifted; a second, longer decision keeps the address blocked when the
/// first ends; the LAPI killed and started again changes nothing enforced.
#[rstest]
#[case::ebpf("ebpf", 19311)]
#[case::iptables("iptables", 19312)]
fn crowdsec_decisions_are_enforced(#[case] backend: &str, #[case] port: u16) {
    let Some(lab) = Lab::new(backend) else { return };
    let _echo = lab.echo();
    let mut lapi = tests::crowdsec::Lapi::start(&lab.srv);
    let key = lapi.bouncer_key_file("isolation");
    let url = format!("crowdsec+http://127.0.0.1:{}", tests::crowdsec::PORT);
    let svc = tests::service::Service::start(
        &lab.iso,
        &[
            "--iface",
            "s1",
            "--iface",
            "s2",
            "--policy",
            &lab.policy,
            "--decisions",
            &url,
            "--crowdsec-key-file",
            key.to_str().unwrap(),
            "--decisions-every",
            "1s",
        ],
        port,
    );
    assert!(
        svc.wait_log(
            "decisions from crowdsec+http://127.0.0.1:18080",
            Duration::from_secs(10)
        ),
        "the first poll: {}",
        svc.log_text()
    );
    assert!(lab.x4(PASS_WAIT) && lab.w4(), "before any decision");

    // A ban: dropped within two polls (2 s; 3 s with the time the check itself takes).
    lapi.cscli(&[
        "decisions",
        "add",
        "--ip",
        "198.51.100.2",
        "--duration",
        "8s",
    ]);
    let t0 = Instant::now();
    assert!(
        lab.x4_dropped_within(Duration::from_secs(3)),
        "not dropped within two polls: {}",
        svc.log_text()
    );
    assert!(
        lab.w4() && lab.x6(PASS_WAIT),
        "the other client and family pass"
    );
    let list = lab.iso.ok(&["block", "list"]);
    assert!(
        list.contains("198.51.100.2") && list.contains("crowdsec"),
        "{list}"
    );
    // ... and passes again after its duration.
    sleep_until(t0 + Duration::from_secs(8));
    assert!(
        lab.x4_passes_within(Duration::from_secs(3)),
        "passing after the decision's duration"
    );

    // A deleted decision is lifted within two polls.
    lapi.cscli(&[
        "decisions",
        "add",
        "--range",
        "198.51.100.0/24",
        "--duration",
        "1h",
    ]);
    assert!(lab.x4_dropped_within(Duration::from_secs(3)));
    lapi.cscli(&["decisions", "delete", "--range", "198.51.100.0/24"]);
    assert!(
        lab.x4_passes_within(Duration::from_secs(3)),
        "the deleted decision is lifted"
    );

    // A ban added again with a longer duration extends the deadline (the LAPI sends the
    // longer one alone: it must replace the first, not be taken as already there).
    lapi.cscli(&[
        "decisions",
        "add",
        "--ip",
        "198.51.100.2",
        "--duration",
        "3s",
    ]);
    let t1 = Instant::now();
    assert!(lab.x4_dropped_within(Duration::from_secs(3)));
    lapi.cscli(&[
        "decisions",
        "add",
        "--ip",
        "198.51.100.2",
        "--duration",
        "1h",
        "--reason",
        "again",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    sleep_until(t1 + Duration::from_secs(5));
    assert!(
        !lab.x4(DROP_WAIT),
        "still blocked after the first duration: the deadline was extended"
    );

    // The LAPI killed: what is enforced stays, and the service says so; started again, the
    // same.
    lapi.kill();
    assert!(
        within(Duration::from_secs(5), || svc
            .scrape()
            .contains("isolation_decisions_up 0"))
        .is_some(),
        "{}",
        svc.scrape()
    );
    let status = lab.iso.ok(&["status"]);
    assert!(status.contains("UNREACHABLE"), "{status}");
    assert!(!lab.x4(DROP_WAIT), "still blocked with the LAPI down");
    assert!(lab.w4(), "the other client passes with the LAPI down");
    lapi.restart();
    assert!(
        within(Duration::from_secs(5), || svc
            .scrape()
            .contains("isolation_decisions_up 1"))
        .is_some(),
        "{}",
        svc.log_text()
    );
    assert!(!lab.x4(DROP_WAIT), "still blocked with the LAPI back");
    let m = svc.scrape();
    assert!(
        m.contains(
            "isolation_blocklist_entries{family=\"ipv4\",kind=\"address\",origin=\"crowdsec\"} 1"
        ),
        "{m}"
    );
    lapi.cscli(&["decisions", "delete", "--ip", "198.51.100.2"]);
    assert!(
        lab.x4_passes_within(Duration::from_secs(3)),
        "lifted once both decisions are deleted"
    );
}

/// A real fail2ban with a jail on a log file this test writes, banning through the packaged
/// action (`packaging/fail2ban/action.d/isolation.conf`): after the failures the client is
/// dropped, the other client is not; after the jail's bantime it passes again.
#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn fail2ban_bans_through_the_blocklist(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _echo = lab.echo();
    lab.load();
    let f2b = tests::fail2ban::Fail2ban::start(&lab.iso, 4);
    assert!(lab.x4(PASS_WAIT) && lab.w4(), "before any failure");
    f2b.fail("198.51.100.2", 3);
    assert!(
        lab.x4_dropped_within(Duration::from_secs(10)),
        "not banned: {}",
        f2b.log()
    );
    let t0 = Instant::now();
    assert!(lab.w4(), "the other client is not banned");
    // A timed entry (the jail's bantime, counted by the datapath), not a permanent one.
    let list: serde_json::Value =
        serde_json::from_str(&lab.iso.ok(&["block", "list", "--json"])).unwrap();
    let e = &list[0];
    assert_eq!(
        (&e["entry"], &e["origin"]),
        (&"198.51.100.2".into(), &"fail2ban".into()),
        "{list}"
    );
    let left = e["seconds_left"].as_f64().expect("a deadline");
    assert!(left > 0.0 && left <= 4.0, "{list}");
    sleep_until(t0 + Duration::from_millis(1500));
    assert!(!lab.x4(DROP_WAIT), "banned for the jail's bantime");
    assert!(
        lab.x4_passes_within(Duration::from_secs(6)),
        "passing after the bantime: {}",
        f2b.log()
    );
}
