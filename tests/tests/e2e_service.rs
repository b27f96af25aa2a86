//! `isolation-user run`, the service, on both backends, with real traffic: it loads, and a
//! write of the policy file gives the new verdict within 1 s; a broken file keeps the old
//! policy, is logged with its line and shows in /metrics; SIGHUP re-applies; logged drops
//! become log lines; /metrics parses as Prometheus text and its counters are `stats`'s,
//! moving under traffic; SIGTERM leaves the datapath enforcing, `--detach-on-exit` does not.
//!
//!   cw (192.0.2.2) --s1-- srv --s2-- cx (198.51.100.2)

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    time::{Duration, Instant},
};

use rstest::rstest;
use tests::{
    iso::Iso,
    netns::{Netns, TwoClients},
    service::Service,
    traffic::{Echo, ping_ok, ping_summary, tcp_ok},
    unique,
};

const PASS_WAIT: Duration = Duration::from_secs(3);
const DROP_WAIT: Duration = Duration::from_millis(700);

/// Only cw is whitelisted; drops are logged.
const A: &str = r#"
[whitelist]
enabled = true
log = true
allow = ["192.0.2.2", "2001:db8:1::2"]
"#;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Every sample of a scrape by name and labels (`name{k="v",…}`), parsed with a Prometheus
/// text parser; every sample line must parse.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    assert_eq!(scrape.samples.len(), sample_lines, "every sample parses");
    let mut out = BTreeMap::new();
    for s in scrape.samples {
        let mut labels: Vec<String> = s
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        labels.sort();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            other => panic!("unexpected sample {other:?}"),
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), v);
    }
    out
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// `isolation_packets_total` of one reason, ingress.
fn packets(m: &BTreeMap<String, f64>, reason: &str, verdict: &str) -> u64 {
    metric(
        m,
        &format!(
            "isolation_packets_total{{direction=\"ingress\",reason=\"{reason}\",verdict=\"{verdict}\"}}"
        ),
    ) as u64
}

/// Waits until `probe` gives `want`, at most `limit`; the time it took, or None.
fn until(limit: Duration, mut probe: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if probe() {
            return Some(t0.elapsed());
        }
    }
    None
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn service_reloads_logs_and_serves_metrics(#[case] backend: &str) {
    if !tests::can_run("end-to-end service test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("svsr");
    let iso = Iso::with_backend(&srv, backend);
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let listed = || tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    // The file lives in a directory of its own, as /etc/isolation would.
    let dir = iso.files_dir().join("etc");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    fs::write(&file, A).unwrap();
    let f = file.display().to_string();

    let mut svc = Service::start(
        &iso,
        &["--iface", "s1", "--iface", "s2", "--policy", &f],
        9108,
    );
    assert!(listed(), "the whitelisted client passes");
    assert!(!stranger(DROP_WAIT), "the stranger is dropped");
    let m = samples(&svc.scrape());
    let info: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("isolation_backend_info{"))
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(info[0].0.contains(&format!("backend=\"{backend}\"")) && *info[0].1 == 1.0);
    assert_eq!(metric(&m, "isolation_last_reload_success{}"), 1.0);
    assert_eq!(metric(&m, "isolation_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "isolation_datapath_up{}"), 1.0);
    let g0 = metric(&m, "isolation_policy_generation{}");
    assert!(g0 >= 1.0);

    // The stranger's attempts became log lines.
    assert!(
        svc.wait_log(
            "isolation DROP not-whitelisted: IN=s2 SRC=198.51.100.2 DST=198.51.100.1",
            Duration::from_secs(3)
        ),
        "a logged drop in the service's log: {}",
        svc.log_text()
    );

    // Counters under traffic: 5 pings that pass, and the stranger's dropped attempts; with
    // the traffic over, /metrics reads what `stats` reads. Packets the kernel sends by
    // itself (neighbour discovery, retransmissions) may still be counted between two reads,
    // so the scrape is read between two `stats` and each counter must lie between them
    // (equal when nothing moved), never differ by more than what moved.
    let before = samples(&svc.scrape());
    for _ in 0..5 {
        assert!(ping_ok(&cw, "192.0.2.1"));
    }
    assert!(!stranger(DROP_WAIT));
    std::thread::sleep(Duration::from_millis(200));
    let stats_before = iso.stats();
    let after = samples(&svc.scrape());
    let stats = iso.stats();
    assert!(
        packets(&after, "whitelisted", "pass") >= packets(&before, "whitelisted", "pass") + 5,
        "5 pings counted as whitelisted"
    );
    assert!(
        packets(&after, "not-whitelisted", "drop") > packets(&before, "not-whitelisted", "drop"),
        "the stranger's SYNs counted"
    );
    let reasons_before = stats_before["reasons"].as_array().unwrap();
    for (r, r0) in stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reasons_before)
    {
        let (name, verdict) = (
            r["reason"].as_str().unwrap(),
            r["verdict"].as_str().unwrap(),
        );
        assert_eq!(
            r0["reason"], r["reason"],
            "stats lists reasons in one order"
        );
        let dir = if verdict == "track" {
            "egress"
        } else {
            "ingress"
        };
        let key = format!(
            "isolation_packets_total{{direction=\"{dir}\",reason=\"{name}\",verdict=\"{verdict}\"}}"
        );
        let (lo, hi) = (
            r0["packets"].as_u64().unwrap(),
            r["packets"].as_u64().unwrap(),
        );
        let m = metric(&after, &key) as u64;
        assert!(
            lo <= m && m <= hi,
            "{key} is {m}, what stats says: {lo} before the scrape, {hi} after"
        );
    }
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("isolation_map_entries{")),
        "map fill levels"
    );
    // Ring losses and the table of new connections where the backend counts them; left
    // out (not a 0 to alert on) where it cannot, as `stats --json` says.
    let uncounted: Vec<&str> = stats["uncounted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let counts_lost = backend == "ebpf";
    assert_eq!(
        uncounted.contains(&"log.lost"),
        !counts_lost,
        "{uncounted:?}"
    );
    assert_eq!(
        after.contains_key("isolation_log_events_total{outcome=\"lost\"}"),
        counts_lost,
        "ring losses"
    );
    assert_eq!(
        after.contains_key("isolation_connections{table=\"new\"}"),
        counts_lost,
        "the table of new connections"
    );
    assert!(after.contains_key("isolation_connections{table=\"established\"}"));
    // The remote-host filter where the backend has one: its slots, some set by the
    // connections made above, and the same count in `stats --json`.
    assert_eq!(
        after.get("isolation_connection_filter_slots{}").copied(),
        counts_lost.then_some(131072.0),
        "the remote-host filter's size"
    );
    assert_eq!(
        uncounted.contains(&"connections.filter_set"),
        !counts_lost,
        "{uncounted:?}"
    );
    if counts_lost {
        let set = after["isolation_connection_filter_slots_set{}"];
        assert!(set >= 1.0, "slots set: {set}");
        assert!(stats["connections"]["filter_set"].as_u64().unwrap() >= 1);
    }

    // A write of the file: the stranger passes within 1 s of it.
    let b = A.replace(
        r#"allow = ["192.0.2.2","#,
        r#"allow = ["192.0.2.2", "198.51.100.2","#,
    );
    assert_ne!(b, A);
    let t0 = Instant::now();
    fs::write(&file, &b).unwrap();
    let took = until(Duration::from_secs(3), || {
        stranger(Duration::from_millis(100))
    });
    let took =
        took.unwrap_or_else(|| panic!("no new verdict 3 s after the write: {}", svc.log_text()));
    assert!(
        t0.elapsed() < Duration::from_millis(1500) && took < Duration::from_secs(1),
        "new verdict {took:?} after the write"
    );
    assert!(listed());
    let m = samples(&svc.scrape());
    assert_eq!(metric(&m, "isolation_reloads_total{result=\"ok\"}"), 2.0);
    assert_eq!(metric(&m, "isolation_policy_generation{}"), g0 + 1.0);

    // A broken file (an editor's rename into place): the old policy stays, the error is
    // logged with the file's line, and /metrics says so.
    let tmp = dir.join(".policy.toml.swp");
    fs::write(&tmp, b.replace("\"198.51.100.2\"", "\"198.51.100.2/33\"")).unwrap();
    fs::rename(&tmp, &file).unwrap();
    assert!(
        svc.wait_log(&format!("refused {f}"), Duration::from_secs(3)),
        "the refusal is logged: {}",
        svc.log_text()
    );
    assert!(
        svc.log_text().contains(&format!("{f}:5:")),
        "with the line: {}",
        svc.log_text()
    );
    assert!(stranger(PASS_WAIT), "the old policy (B) still enforces");
    let m = samples(&svc.scrape());
    assert_eq!(metric(&m, "isolation_last_reload_success{}"), 0.0);
    assert_eq!(metric(&m, "isolation_reloads_total{result=\"error\"}"), 1.0);
    assert_eq!(metric(&m, "isolation_policy_generation{}"), g0 + 1.0);

    // Fixed back to A: applied on the write; then SIGHUP re-applies the same file, which
    // counts as a reload and changes nothing.
    fs::write(&file, A).unwrap();
    assert!(
        until(Duration::from_secs(3), || !stranger(Duration::from_millis(
            300
        )))
        .is_some(),
        "A again"
    );
    svc.signal(libc::SIGHUP);
    assert!(
        until(Duration::from_secs(3), || {
            let m = samples(&svc.scrape());
            metric(&m, "isolation_reloads_total{result=\"ok\"}") == 4.0
        })
        .is_some(),
        "SIGHUP re-applied: {}",
        svc.log_text()
    );
    let m = samples(&svc.scrape());
    assert_eq!(metric(&m, "isolation_last_reload_success{}"), 1.0);
    assert_eq!(
        metric(&m, "isolation_policy_generation{}"),
        g0 + 2.0,
        "SIGHUP on an unchanged file changes nothing"
    );

    // SIGTERM: the service exits 0 and the datapath keeps enforcing A.
    assert!(svc.stop().success(), "{}", svc.log_text());
    assert!(
        listed() && !stranger(DROP_WAIT),
        "A enforced after the service stopped"
    );

    // A new service with --detach-on-exit takes over without a change, and its SIGTERM
    // detaches: the stranger passes (positive control of the drops above).
    let mut svc = Service::start(
        &iso,
        &[
            "--iface",
            "s1",
            "--iface",
            "s2",
            "--policy",
            &f,
            "--detach-on-exit",
        ],
        9108,
    );
    assert!(!stranger(DROP_WAIT));
    assert!(svc.stop().success(), "{}", svc.log_text());
    assert!(stranger(PASS_WAIT), "detached on exit");
}

/// The policy file written in place, as `cat new > policy.toml` or a tool writing in
/// chunks does: truncated, then filled a while later. The empty file is refused (the
/// policy it would lift stays), a write in chunks is applied once, whole.
#[test]
fn an_in_place_write_never_lifts_the_policy() {
    if !tests::can_run("end-to-end service test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("svip");
    let iso = Iso::with_backend(&srv, "ebpf");
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let listed = || tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    let dir = iso.files_dir().join("etc");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    fs::write(&file, A).unwrap();
    let f = file.display().to_string();
    let svc = Service::start(
        &iso,
        &["--iface", "s1", "--iface", "s2", "--policy", &f],
        9108,
    );
    assert!(listed() && !stranger(DROP_WAIT), "A enforced");

    // Truncated, and left empty for a while: still A (the stranger is dropped), and the
    // empty file is refused in the log.
    let mut w = fs::File::create(&file).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stranger(DROP_WAIT), "the empty file lifted the whitelist");
    assert!(listed());
    assert!(
        svc.wait_log("is empty", Duration::from_secs(3)),
        "the empty file is refused: {}",
        svc.log_text()
    );

    // Then filled in three chunks, 20 ms apart: applied once, whole (B lists the stranger).
    use std::io::Write as _;
    let b = A.replace(
        r#"allow = ["192.0.2.2","#,
        r#"allow = ["192.0.2.2", "198.51.100.2","#,
    );
    let bytes = b.as_bytes();
    for part in bytes.chunks(bytes.len() / 3 + 1) {
        w.write_all(part).unwrap();
        w.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(w);
    assert!(
        until(Duration::from_secs(3), || stranger(Duration::from_millis(
            200
        )))
        .is_some(),
        "B applied: {}",
        svc.log_text()
    );
    let m = samples(&svc.scrape());
    assert_eq!(
        metric(&m, "isolation_reloads_total{result=\"error\"}"),
        1.0,
        "only the empty file was refused, no half-written one: {}",
        svc.log_text()
    );
    assert_eq!(metric(&m, "isolation_reloads_total{result=\"ok\"}"), 2.0);
}

/// A file that cannot be applied at start with nothing loaded: the service refuses to run,
/// naming the line, and nothing is loaded.
#[test]
fn service_refuses_a_broken_file_at_first_start() {
    if !tests::can_run("end-to-end service test") {
        return;
    }
    let srv = unique("svbad");
    let peer = unique("svbadp");
    let ns = Netns::new(&[&srv, &peer]);
    ns.link(
        &srv,
        "s1",
        &["192.0.2.1/24"],
        &peer,
        "e0",
        &["192.0.2.2/24"],
    );
    let iso = Iso::new(&srv);
    let p = iso.policy("[whitelist]\nenabled = true\nallow = [\"192.0.2.300\"]\n");
    let out = iso.run(&["run", "--iface", "s1", "--policy", &p]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{p}:3:")), "{err}");
    assert!(err.contains("nothing was loaded"), "{err}");
    assert!(iso.ok(&["status"]).contains("not loaded"));
    assert!(!iso.pin.exists(), "no pins left");
    assert!(ping_ok(&peer, "192.0.2.1"), "nothing filters");
}

/// Restart and upgrade without a gap: bounded ping floods (2,500 echoes, 2 ms apart, from
/// a listed client and from a stranger) cross the filtered interfaces while the service is stopped and started again, while a
/// new service finds another build's programs in place and swaps its own in (the path an
/// upgraded binary takes), and while `load --replace-programs` swaps them once more. Not
/// one of the listed client's replies is lost, not one of the stranger's echoes answered, a TCP connection opened before keeps working, and the filter never
/// lapses (the stranger stays dropped, the listed client passes).
#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn restarts_and_program_replacement_lose_no_packet(#[case] backend: &str) {
    if !tests::can_run("end-to-end restart test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("rssr");
    let iso = Iso::with_backend(&srv, backend);
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    let f = iso.policy(A);
    let args = ["--iface", "s1", "--iface", "s2", "--policy", &f];
    let mut svc = Service::start(&iso, &args, 9108);
    assert!(!stranger(DROP_WAIT), "the stranger is dropped");
    let mut conn = tests::traffic::tcp_open(&cw, sa("192.0.2.1:8080"));
    assert!(tests::traffic::round_trip(&mut conn, PASS_WAIT));
    let ids = |iso: &Iso| -> Vec<u64> {
        let s: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
        ["xdp", "tc_egress", "tc_ingress"]
            .iter()
            .map(|p| s["programs"][p].as_u64().unwrap_or(0))
            .collect()
    };
    let ids0 = ids(&iso);

    let flood = |from: &str, to: &'static str| {
        let from = from.to_string();
        std::thread::spawn(move || {
            let o = std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{from}"))
                .args(["ping", "-q", "-i", "0.002", "-c", "2500", "-W", "2", to])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
    };
    // The listed client's flood must lose nothing; the stranger's must never get through
    // (a moment without a program, or with a wrong one, would let it).
    let (listed_flood, stranger_flood) = (flood(&cw, "192.0.2.1"), flood(&cx, "198.51.100.1"));
    std::thread::sleep(Duration::from_millis(300));
    // Restart: stop, start again.
    assert!(svc.stop().success());
    drop(svc);
    let svc = Service::start(&iso, &args, 9108);
    assert!(!stranger(DROP_WAIT), "still filtering after the restart");
    let mut upgraded = false;
    if backend == "ebpf" {
        // Another build's datapath in place (the state file says so): a new service swaps
        // its programs in, as an upgraded binary would.
        let sf = iso.state.join("state.json");
        let st = fs::read_to_string(&sf).unwrap();
        let v: serde_json::Value = serde_json::from_str(&st).unwrap();
        let hash = v["object_hash"].as_str().unwrap().to_string();
        fs::write(&sf, st.replace(&hash, "0123456789abcdef")).unwrap();
        let mut svc = svc;
        assert!(svc.stop().success());
        drop(svc);
        let svc2 = Service::start(&iso, &args, 9108);
        let ids1 = ids(&iso);
        assert!(
            ids1.iter().zip(&ids0).all(|(a, b)| a != b),
            "new programs {ids1:?} vs {ids0:?}"
        );
        let st: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&sf).unwrap()).unwrap();
        assert_eq!(
            st["object_hash"],
            hash.as_str(),
            "the state records the new build"
        );
        // And by hand, once more.
        let out = iso.ok(&[
            "load",
            "--iface",
            "s1",
            "--iface",
            "s2",
            "--policy",
            &f,
            "--replace-programs",
        ]);
        assert!(
            out.contains("replaced the loaded ones on 6 link(s)"),
            "{out}"
        );
        let ids2 = ids(&iso);
        assert!(
            ids2.iter().zip(&ids1).all(|(a, b)| a != b),
            "{ids2:?} vs {ids1:?}"
        );
        upgraded = true;
        drop(svc2);
    } else {
        drop(svc);
    }
    assert!(
        !listed_flood.is_finished() && !stranger_flood.is_finished(),
        "the floods outlasted the restarts and replacements"
    );
    let out = stranger_flood.join().unwrap();
    assert_eq!(
        ping_summary(&out),
        (2500, 0),
        "not one stranger's echo answered: {out}"
    );
    let out = listed_flood.join().unwrap();
    let (sent, got) = ping_summary(&out);
    eprintln!("{backend}: {sent} echoes, {got} replies (programs replaced: {upgraded})");
    assert_eq!(sent, 2500, "{out}");
    assert_eq!(got, sent, "no reply lost: {out}");
    assert!(
        tests::traffic::round_trip(&mut conn, PASS_WAIT),
        "the connection opened before still works"
    );
    assert!(!stranger(DROP_WAIT), "still filtering");
    assert!(
        tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT),
        "new connections of the listed client"
    );
}

/// The capabilities `packaging/isolation.service` bounds the service to.
fn unit_capabilities() -> Vec<String> {
    let unit = include_str!("../../packaging/isolation.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds the capabilities");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// The service runs with nothing but the capabilities the systemd unit leaves it (the
/// bounding set, as `setpriv` applies it to root): it loads, enforces, re-applies an edited
/// file and serves /metrics, on both backends. (The unit's filesystem sandboxing needs
/// systemd as PID 1, which the test machine does not run.)
#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn the_units_capabilities_suffice(#[case] backend: &str) {
    if !tests::can_run("end-to-end service capability test") {
        return;
    }
    let caps = unit_capabilities();
    assert!(caps.contains(&"bpf".to_string()), "{caps:?}");
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("cpsr");
    let iso = Iso::with_backend(&srv, backend);
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    let dir = iso.files_dir().join("etc");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    fs::write(&file, A).unwrap();
    let f = file.display().to_string();
    let wrapper = [
        "setpriv",
        "--bounding-set",
        bounding.as_str(),
        "--inh-caps",
        "-all",
    ];
    let mut svc = Service::start_wrapped(
        &iso,
        &wrapper,
        &["--iface", "s1", "--iface", "s2", "--policy", &f],
        9108,
    );
    // The service's effective capabilities are exactly the unit's.
    let number = |c: &str| match c {
        "net_admin" => 12,
        "net_raw" => 13,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("add {other}'s number here"),
    };
    let want: u64 = caps.iter().map(|c| 1u64 << number(c)).sum();
    let status = fs::read_to_string(format!("/proc/{}/status", svc.child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(eff, want, "CapEff {eff:x}, the unit's {want:x}");
    assert!(
        tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT),
        "the listed client passes"
    );
    assert!(!stranger(DROP_WAIT), "the stranger is dropped");
    fs::write(
        &file,
        A.replace(
            r#"allow = ["192.0.2.2","#,
            r#"allow = ["192.0.2.2", "198.51.100.2","#,
        ),
    )
    .unwrap();
    assert!(
        until(Duration::from_secs(3), || stranger(Duration::from_millis(
            200
        )))
        .is_some(),
        "the edit applied: {}",
        svc.log_text()
    );
    let m = samples(&svc.scrape());
    assert_eq!(
        metric(&m, "isolation_datapath_up{}"),
        1.0,
        "{}",
        svc.log_text()
    );
    assert_eq!(metric(&m, "isolation_reloads_total{result=\"ok\"}"), 2.0);
    assert!(svc.stop().success(), "{}", svc.log_text());
    assert!(!svc.log_text().contains("WARN"), "{}", svc.log_text());
}

/// A service as the unit runs it (1,024 descriptors at most), on `srv`, enforcing A from a
/// file in its own directory; the file's path.
fn service_with_1024_fds(iso: &Iso) -> (Service, std::path::PathBuf) {
    let dir = iso.files_dir().join("etc");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policy.toml");
    fs::write(&file, A).unwrap();
    let f = file.display().to_string();
    let svc = Service::start_wrapped(
        iso,
        &["prlimit", "--nofile=1024:1024"],
        &["--iface", "s1", "--iface", "s2", "--policy", &f],
        9108,
    );
    (svc, file)
}

/// A local unprivileged user (nobody, through setpriv) opens 1,100 idle connections to
/// /metrics: the service neither runs out of descriptors nor spins; a change of the policy
/// file is applied as ever, and /metrics answers again once the idle ones are timed out.
/// A request naming another host than the loopback (DNS rebinding) is refused.
#[test]
fn idle_metrics_connections_do_not_freeze_the_service() {
    if !tests::can_run("end-to-end service test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("svid");
    let iso = Iso::with_backend(&srv, "ebpf");
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    let (svc, file) = service_with_1024_fds(&iso);
    assert!(tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT) && !stranger(DROP_WAIT));

    const OPENER: &str = "import socket, sys, time
held = []
for _ in range(1100):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(('127.0.0.1', 9108))
        held.append(s)
    except OSError:
        s.close()
print(len(held), flush=True)
time.sleep(25)
";
    let mut idle = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{srv}"))
        .args(["prlimit", "--nofile=4096:4096"])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["/usr/bin/python3", "-c", OPENER])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(idle.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let opened: usize = line.trim().parse().unwrap_or(0);
    assert!(opened >= 1000, "the user opened {opened} connections");

    // The policy loop does not wait on them: B (the stranger listed) is applied.
    let b = A.replace(
        r#"allow = ["192.0.2.2","#,
        r#"allow = ["192.0.2.2", "198.51.100.2","#,
    );
    fs::write(&file, b).unwrap();
    assert!(
        until(Duration::from_secs(3), || stranger(Duration::from_millis(
            200
        )))
        .is_some(),
        "the file change was not applied with the idle connections open: {}",
        svc.log_text()
    );
    let fds = fs::read_dir(format!("/proc/{}/fd", svc.child.id()))
        .unwrap()
        .count();
    assert!(fds < 200, "the service holds {fds} descriptors");
    // /metrics answers again once the idle connections are timed out.
    assert!(
        until(Duration::from_secs(15), || svc.try_scrape().is_some()).is_some(),
        "/metrics never answered again: {}",
        svc.log_text()
    );
    let _ = idle.kill();
    let _ = idle.wait();

    // A page in a browser on this host that rebinds its name to 127.0.0.1 is refused: the
    // Host header must name the loopback (what Prometheus and curl send passes).
    let status_for = |host: &str| {
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tests::traffic::in_ns(&srv, move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9108").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.lines().next().unwrap_or_default().to_string()
        })
    };
    assert!(status_for("evil.example:9108").starts_with("HTTP/1.1 403"));
    assert!(status_for("127.0.0.1:9108").starts_with("HTTP/1.1 200"));
}

/// 16 scrapers in a loop do not hold off a change: `whitelist add` runs as fast as the
/// scrapes' absence would let it (they once kept it waiting 20 s).
#[test]
fn scrapes_do_not_hold_off_changes() {
    if !tests::can_run("end-to-end service test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw: _,
        cx,
    } = TwoClients::new("svsc");
    let iso = Iso::with_backend(&srv, "ebpf");
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let (_svc, _file) = service_with_1024_fds(&iso);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapers: Vec<_> = (0..16)
        .map(|_| {
            let (srv, stop) = (srv.clone(), stop.clone());
            std::thread::spawn(move || {
                tests::traffic::enter(&srv);
                let mut n = 0u32;
                let t0 = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && t0.elapsed() < Duration::from_secs(60)
                {
                    use std::io::{Read as _, Write as _};
                    let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:9108") else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.write_all(
                        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                    );
                    let mut out = Vec::new();
                    if s.read_to_end(&mut out).is_ok() && out.starts_with(b"HTTP/1.1 200") {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let t0 = Instant::now();
        iso.ok(&["whitelist", "add", &format!("203.0.113.{}", 10 + i)]);
        slowest = slowest.max(t0.elapsed());
    }
    iso.ok(&["whitelist", "add", "198.51.100.2"]);
    assert!(
        tcp_ok(&cx, sa("198.51.100.1:8080"), PASS_WAIT),
        "the edits took effect"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scraped: u32 = scrapers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(scraped >= 32, "the scrapers scraped {scraped} times");
    assert!(
        slowest < Duration::from_secs(2),
        "a whitelist add waited {slowest:?} behind the scrapes"
    );
}
