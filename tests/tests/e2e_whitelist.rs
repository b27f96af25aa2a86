//! End-to-end: a server namespace with the datapath on both its interfaces, a whitelisted
//! client and a stranger, real TCP/UDP/ping over veth, and the CLI as an operator runs it.
//!
//!   cw (192.0.2.2, 2001:db8:1::2) --s1-- srv --s2-- cx (198.51.100.2, 2001:db8:2::2)
//!          whitelisted                                   not whitelisted

use std::{net::SocketAddr, time::Duration};

use rstest::rstest;

use tests::{
    iso::Iso,
    netns::{Netns, TwoClients},
    traffic::{Echo, ping_ok, round_trip, tcp_ok, tcp_open, udp_ok},
};

const PASS_WAIT: Duration = Duration::from_secs(3);
/// A dropped connection attempt is given this long before it counts as blocked.
const DROP_WAIT: Duration = Duration::from_millis(700);

const POLICY: &str = r#"
[whitelist]
enabled = true
log = true
allow = ["192.0.2.2", "2001:db8:1::/64"]
"#;

struct Lab {
    // Dropped in order: the datapath is unloaded before its namespaces go.
    iso: Iso,
    _ns: Netns,
    srv: String,
    cw: String,
    cx: String,
}

impl Lab {
    fn new(backend: &str) -> Option<Lab> {
        if !tests::can_run("end-to-end test") {
            return None;
        }
        let TwoClients { ns, srv, cw, cx } = TwoClients::new("wl");
        Some(Lab {
            iso: Iso::with_backend(&srv, backend),
            _ns: ns,
            srv,
            cw,
            cx,
        })
    }

    fn load(&self, policy: &str) -> String {
        let p = self.iso.policy(policy);
        self.iso
            .ok(&["load", "--iface", "s1", "--iface", "s2", "--policy", &p])
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const SRV4_W: &str = "192.0.2.1:8080";
const SRV6_W: &str = "[2001:db8:1::1]:8080";
const SRV4_X: &str = "198.51.100.1:8080";
const SRV6_X: &str = "[2001:db8:2::1]:8080";

/// Everything the stranger can normally do to the server.
fn stranger_reaches(lab: &Lab, wait: Duration) -> [bool; 5] {
    [
        tcp_ok(&lab.cx, sa(SRV4_X), wait),
        tcp_ok(&lab.cx, sa(SRV6_X), wait),
        udp_ok(&lab.cx, sa(SRV4_X), wait),
        ping_ok(&lab.cx, "198.51.100.1"),
        ping_ok(&lab.cx, "2001:db8:2::1"),
    ]
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn whitelist_end_to_end(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _srv = Echo::start(&lab.srv, &[sa("0.0.0.0:8080"), sa("[::]:8081")]);
    let _srv6 = Echo::start(
        &lab.srv,
        &[sa("[2001:db8:1::1]:8080"), sa("[2001:db8:2::1]:8080")],
    );
    assert_eq!(
        stranger_reaches(&lab, PASS_WAIT),
        [true; 5],
        "before load everything flows"
    );

    let out = lab.load(POLICY);
    assert!(out.contains("loaded on s1, s2"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&lab.iso.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["backend"], backend);
    assert_eq!(status["whitelist_enabled"], true);
    for i in status["interfaces"].as_array().unwrap() {
        assert_eq!(i["attached"], true, "{status}");
    }

    // The whitelisted client: TCP, UDP and ping, v4 and v6.
    assert!(tcp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT), "whitelisted tcp");
    assert!(tcp_ok(&lab.cw, sa(SRV6_W), PASS_WAIT), "whitelisted tcp6");
    assert!(udp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT), "whitelisted udp");
    assert!(udp_ok(&lab.cw, sa(SRV6_W), PASS_WAIT), "whitelisted udp6");
    assert!(ping_ok(&lab.cw, "192.0.2.1"), "whitelisted ping");
    assert!(ping_ok(&lab.cw, "2001:db8:1::1"), "whitelisted ping6");

    // The stranger: nothing gets through, and the drops are counted and traced.
    let tracer = lab
        .iso
        .cmd(&["trace", "--json", "--count", "1", "--timeout", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stranger_reaches(&lab, DROP_WAIT),
        [false; 5],
        "stranger blocked (tcp, tcp6, udp, ping, ping6)"
    );
    let traced = tracer.wait_with_output().unwrap();
    let line: serde_json::Value =
        serde_json::from_slice(traced.stdout.split(|b| *b == b'\n').next().unwrap())
            .unwrap_or_else(|e| {
                panic!(
                    "trace printed no JSON line ({e}): {}",
                    String::from_utf8_lossy(&traced.stdout)
                )
            });
    assert_eq!(line["action"], "drop");
    assert_eq!(line["reason"], "not-whitelisted");
    assert_eq!(line["in"], "s2");
    assert_eq!(line["src"], "198.51.100.2");
    assert!(lab.iso.packets("not-whitelisted") >= 5);
    assert!(lab.iso.packets("whitelisted") >= 6);
    let table = lab.iso.ok(&["stats"]);
    assert!(table.contains("DROP   not-whitelisted"), "{table}");

    // The server's own connections to the stranger work: their replies pass.
    let _cx = Echo::start(&lab.cx, &[sa("0.0.0.0:9090"), sa("[::]:9091")]);
    assert!(
        tcp_ok(&lab.srv, sa("198.51.100.2:9090"), PASS_WAIT),
        "server -> stranger tcp"
    );
    assert!(
        tcp_ok(&lab.srv, sa("[2001:db8:2::2]:9091"), PASS_WAIT),
        "server -> stranger tcp6"
    );
    assert!(
        udp_ok(&lab.srv, sa("198.51.100.2:9090"), PASS_WAIT),
        "server -> stranger udp"
    );
    assert!(ping_ok(&lab.srv, "198.51.100.2"), "server -> stranger ping");
    assert!(
        ping_ok(&lab.srv, "2001:db8:2::2"),
        "server -> stranger ping6"
    );
    assert!(lab.iso.packets("established") > 0);
    // ...which opens nothing for the stranger's own connections.
    assert!(
        !tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT),
        "stranger still blocked"
    );

    // Live edits take effect at once.
    lab.iso
        .ok(&["whitelist", "add", "198.51.100.2", "2001:db8:2::/64"]);
    assert_eq!(
        stranger_reaches(&lab, PASS_WAIT),
        [true; 5],
        "after whitelist add"
    );
    let list: Vec<String> =
        serde_json::from_str(&lab.iso.ok(&["whitelist", "list", "--json"])).unwrap();
    assert_eq!(
        list,
        [
            "192.0.2.2",
            "198.51.100.2",
            "2001:db8:1::/64",
            "2001:db8:2::/64"
        ]
    );
    lab.iso
        .ok(&["whitelist", "del", "198.51.100.2", "2001:db8:2::/64"]);
    assert_eq!(
        stranger_reaches(&lab, DROP_WAIT),
        [false; 5],
        "after whitelist del"
    );

    // Batch add from a file (and stdin): comments and blank lines allowed.
    let f = lab
        .iso
        .policy("# operators' list\n198.51.100.2\n\n2001:db8:2::2  # v6\n");
    lab.iso.ok(&["whitelist", "add", "--file", &f]);
    assert!(tcp_ok(&lab.cx, sa(SRV4_X), PASS_WAIT) && tcp_ok(&lab.cx, sa(SRV6_X), PASS_WAIT));
    lab.iso.ok(&["whitelist", "flush"]);
    assert!(
        !tcp_ok(&lab.cw, sa(SRV4_W), DROP_WAIT),
        "flush empties the whitelist"
    );
    let mut child = lab
        .iso
        .cmd(&["whitelist", "add", "--file", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"192.0.2.2\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(tcp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT), "added from stdin");

    // Unload restores everything.
    assert!(lab.iso.ok(&["unload"]).contains("unloaded"));
    assert_eq!(stranger_reaches(&lab, PASS_WAIT), [true; 5], "after unload");
    assert!(!lab.iso.pin.join("prog_xdp").exists());
    assert_eq!(
        tests::netns::ok(&[
            "nsenter",
            &format!("--net=/run/netns/{}", lab.srv),
            "ipset",
            "list",
            "-n"
        ]),
        "",
        "no set left behind"
    );
    assert!(lab.iso.ok(&["status"]).contains("not loaded"));
    assert!(
        lab.iso.ok(&["unload"]).contains("nothing loaded"),
        "unload is idempotent"
    );
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn established_connections_survive_load(#[case] backend: &str) {
    let Some(lab) = Lab::new(backend) else { return };
    let _srv = Echo::start(&lab.srv, &[sa("0.0.0.0:8080")]);
    // The stranger's "SSH session", opened before the whitelist exists.
    let mut session = tcp_open(&lab.cx, sa(SRV4_X));
    assert!(round_trip(&mut session, PASS_WAIT));
    let out = lab.load(POLICY);
    // The namespace's conntrack was not running before load (no stateful rule): the
    // iptables backend writes the open connections into it, as the eBPF one into its table.
    assert!(
        out.contains("established connection(s) kept") && !out.contains(" 0 established"),
        "{out}"
    );
    // The client speaks first after load: only the seeded entry can let it in.
    assert!(
        round_trip(&mut session, PASS_WAIT),
        "existing session keeps working"
    );
    assert!(
        !tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT),
        "but a new session from it is dropped"
    );
    assert!(
        round_trip(&mut session, PASS_WAIT),
        "and the old one still works"
    );
}

#[test]
fn whitelist_that_locks_out_the_ssh_client_is_refused() {
    let Some(lab) = Lab::new("ebpf") else { return };
    let p = lab.iso.policy(POLICY);
    let ssh = "198.51.100.2 50022 198.51.100.1 22";
    let o = lab
        .iso
        .cmd(&["load", "--iface", "s2", "--policy", &p])
        .env("SSH_CONNECTION", ssh)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("would not admit 198.51.100.2") && err.contains("--force"),
        "{err}"
    );
    assert!(
        lab.iso.ok(&["status"]).contains("not loaded"),
        "nothing was loaded"
    );

    // Admitted client: fine. Then deleting or flushing the client's entry is refused too.
    let ssh_ok = "192.0.2.2 50022 192.0.2.1 22";
    let o = lab
        .iso
        .cmd(&["load", "--iface", "s1", "--policy", &p])
        .env("SSH_CONNECTION", ssh_ok)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for args in [
        &["whitelist", "del", "192.0.2.2"][..],
        &["whitelist", "flush"][..],
    ] {
        let o = lab
            .iso
            .cmd(args)
            .env("SSH_CONNECTION", ssh_ok)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} must be refused");
        assert!(String::from_utf8_lossy(&o.stderr).contains("would not admit 192.0.2.2"));
    }
    let list = lab.iso.ok(&["whitelist", "list"]);
    assert!(
        list.contains("192.0.2.2"),
        "refused edits changed nothing: {list}"
    );
    // --force overrides.
    let o = lab
        .iso
        .cmd(&["whitelist", "del", "--force", "192.0.2.2"])
        .env("SSH_CONNECTION", ssh_ok)
        .output()
        .unwrap();
    assert!(o.status.success());
}

#[test]
fn bad_input_changes_nothing_live() {
    let Some(lab) = Lab::new("ebpf") else { return };
    let _srv = Echo::start(&lab.srv, &[sa("0.0.0.0:8080")]);
    lab.load(POLICY);
    let before = lab.iso.ok(&["whitelist", "list"]);

    let err = lab.iso.fails(&["load", "--iface", "nosuch0"]);
    assert!(err.contains("no interface named 'nosuch0'"), "{err}");
    let bad = lab
        .iso
        .policy("[whitelist]\nallow = [\n  \"192.0.2.2\",\n  \"192.0.2.300\",\n]\n");
    let err = lab.iso.fails(&["load", "--iface", "s1", "--policy", &bad]);
    assert!(
        err.contains(&format!("{bad}:4:")) && err.contains("192.0.2.300"),
        "{err}"
    );
    let err = lab.iso.fails(&[
        "load",
        "--iface",
        "s1",
        "--policy",
        "/nonexistent/policy.toml",
    ]);
    assert!(
        err.contains("cannot read policy /nonexistent/policy.toml"),
        "{err}"
    );
    // The kernel refuses: loopback has no native (driver) XDP.
    let err = lab
        .iso
        .fails(&["load", "--iface", "lo", "--mode", "native"]);
    assert!(
        err.contains("cannot attach XDP (native mode) to lo"),
        "{err}"
    );
    let st: serde_json::Value = serde_json::from_str(&lab.iso.ok(&["status", "--json"])).unwrap();
    assert_eq!(
        st["interfaces"].as_array().unwrap().len(),
        2,
        "lo not recorded: {st}"
    );
    assert!(!lab.iso.pin.join("links/xdp_lo").exists());
    assert!(!lab.iso.pin.join("links/tc_lo").exists());
    let err = lab
        .iso
        .fails(&["whitelist", "add", "198.51.100.2", "not-an-ip"]);
    assert!(
        err.contains("'not-an-ip' is not an IP address or CIDR"),
        "{err}"
    );
    let err = lab.iso.fails(&["whitelist", "add", "198.51.100.0/16"]);
    assert!(err.contains("did you mean 198.51.0.0/16"), "{err}");
    let f = lab.iso.policy("198.51.100.2\nbogus\n");
    let err = lab.iso.fails(&["whitelist", "add", "--file", &f]);
    assert!(err.contains(&format!("{f}:2:")), "{err}");
    assert_eq!(
        lab.iso.ok(&["whitelist", "list"]),
        before,
        "whitelist unchanged after bad input"
    );
    assert!(!tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT), "still enforced");
    assert!(
        tcp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT),
        "still admits the whitelisted"
    );

    // Another XDP program (here: a second, independent instance) owns s2's XDP hook.
    let other = Iso::new(&lab.srv);
    let p = other.policy("");
    lab.iso.ok(&["unload", "--iface", "s2"]);
    other.ok(&["load", "--iface", "s2", "--policy", &p]);
    let err = lab.iso.fails(&["load", "--iface", "s1", "--iface", "s2"]);
    assert!(
        err.contains("s2 already has an XDP program that isolation did not attach"),
        "{err}"
    );
    let st: serde_json::Value = serde_json::from_str(&other.ok(&["status", "--json"])).unwrap();
    assert_eq!(
        st["interfaces"][0]["attached"], true,
        "the other program was left in place"
    );
    assert!(
        tcp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT),
        "our datapath on s1 untouched"
    );
}

#[test]
fn load_is_idempotent() {
    let Some(lab) = Lab::new("ebpf") else { return };
    let _srv = Echo::start(&lab.srv, &[sa("0.0.0.0:8080")]);
    lab.load(POLICY);
    let ids = |iso: &Iso| {
        let s: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
        s["programs"].clone()
    };
    let first = ids(&lab.iso);
    lab.load(POLICY);
    lab.load(POLICY);
    assert_eq!(ids(&lab.iso), first, "same programs, nothing reloaded");
    assert!(!tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT));
    assert!(tcp_ok(&lab.cw, sa(SRV4_W), PASS_WAIT));
    // A new policy through load replaces the whitelist.
    lab.load("[whitelist]\nallow = [\"198.51.100.2\"]\n");
    assert!(tcp_ok(&lab.cx, sa(SRV4_X), PASS_WAIT));
    assert!(!tcp_ok(&lab.cw, sa(SRV4_W), DROP_WAIT));
}

/// `[connections] max` sizes the two connection tables at load, and an `apply` that
/// changes it swaps in tables of the new size with the remembered connections carried
/// over: the stranger's session, opened before load (and so remembered), keeps working
/// through each resize with the stranger speaking first (only its remembered entry can let
/// it in), while the stranger's new connections are dropped beside it.
#[test]
fn connection_tables_are_sized_by_the_policy_and_resized_keeping_connections() {
    let Some(lab) = Lab::new("ebpf") else { return };
    let _srv = Echo::start(&lab.srv, &[sa("0.0.0.0:8080")]);
    let sized = |max: u32| format!("{POLICY}\n[connections]\nmax = {max}\n");
    let tables = |lab: &Lab| -> Vec<(u64, u64)> {
        let st: serde_json::Value =
            serde_json::from_str(&lab.iso.ok(&["status", "--json"])).unwrap();
        ["CONNTRACK", "ESTABLISHED"]
            .iter()
            .map(|t| {
                let m = st["maps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["name"] == *t)
                    .unwrap_or_else(|| panic!("{t} in status: {st}"));
                (
                    m["entries"].as_u64().unwrap(),
                    m["max_entries"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // Out of range: refused with its line, nothing loaded.
    let bad = lab.iso.policy(&sized(10));
    let err = lab
        .iso
        .fails(&["load", "--iface", "s1", "--iface", "s2", "--policy", &bad]);
    assert!(
        err.contains(&format!("{bad}:8:")) && err.contains("max = 10 is out of range"),
        "{err}"
    );
    let mut conn = tcp_open(&lab.cx, sa(SRV4_X));
    assert!(round_trip(&mut conn, PASS_WAIT), "connected before load");
    lab.load(&sized(4096));
    assert!(
        tables(&lab).iter().all(|&(_, max)| max == 4096),
        "{:?}",
        tables(&lab)
    );
    assert!(
        round_trip(&mut conn, PASS_WAIT),
        "the session works after load"
    );
    assert!(
        !tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT),
        "the stranger's own connection is dropped"
    );
    assert!(
        tables(&lab)[1].0 >= 1,
        "the session is in the established table"
    );
    for max in [16384, 2048] {
        let p = lab.iso.policy(&sized(max));
        let plan = lab.iso.ok(&["apply", "--dry-run", &p]);
        assert!(plan.contains("connections max"), "{plan}");
        lab.iso.ok(&["apply", &p]);
        let t = tables(&lab);
        assert!(t.iter().all(|&(_, m)| m == max as u64), "{t:?}");
        // The stranger speaks first: only the entry carried over can let it in.
        assert!(
            round_trip(&mut conn, PASS_WAIT),
            "the session still works with tables of {max}"
        );
        assert!(tables(&lab)[1].0 >= 1, "the established table kept it");
        assert!(
            !tcp_ok(&lab.cx, sa(SRV4_X), DROP_WAIT),
            "and the stranger's own connections are still dropped"
        );
    }
    // Back to the default (no section): 65,536 each, written nowhere in `save`.
    let p = lab.iso.policy(POLICY);
    lab.iso.ok(&["apply", &p]);
    assert!(tables(&lab).iter().all(|&(_, m)| m == 65536));
    assert!(round_trip(&mut conn, PASS_WAIT), "and after the default");
    assert!(!lab.iso.ok(&["save"]).contains("[connections]"));
}
