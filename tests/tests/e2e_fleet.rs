//! One policy on every node, from a real etcd: 20 services (`run --policy-source etcd://…`),
//! each in a namespace of its own and filtering its own interface, follow `fleet push`.
//!
//!   probe (203.0.113.2) --+
//!   other (203.0.113.3) --+-- br0 (hub: etcd on 203.0.113.1:2379)
//!   node0..node19 (203.0.113.10..29, m0 filtered) --+

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tests::{fleet::Hub, iso::Iso, service::Service, traffic::Echo, traffic::tcp_ok, unique};

const N: usize = 20;
/// Nodes that also get traffic checks.
const PROBED: [usize; 3] = [0, 7, 19];

fn policy(allow: &str) -> String {
    format!("[whitelist]\nenabled = true\nlog = false\nallow = [\"{allow}\"]\n")
}

/// `fleet` run from the hub (the etcd CLI side), with the prefix's URL.
fn fleet(hub: &Hub, args: &[&str]) -> std::process::Output {
    std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", hub.hub))
        .arg(tests::bin())
        .arg("fleet")
        .args(args)
        .output()
        .unwrap()
}

fn status(hub: &Hub, url: &str) -> serde_json::Value {
    let o = fleet(hub, &["status", "--json", "--etcd", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Waits (at most 30 s) until every one of `n` nodes reports `rev` applied; the time taken.
fn converge(hub: &Hub, url: &str, rev: i64, n: usize) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = status(hub, url);
        let nodes = s["nodes"].as_array().unwrap();
        let done = nodes
            .iter()
            .filter(|x| x["revision"] == rev && x["result"] == "ok")
            .count();
        if done == n && nodes.len() == n {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{done} of {n} nodes on revision {rev} after 30 s: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn push(hub: &Hub, url: &str, file: &str, extra: &[&str]) -> Result<i64, String> {
    let mut args = vec!["push", file, "--etcd", url];
    args.extend_from_slice(extra);
    let o = fleet(hub, &args);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let out = String::from_utf8_lossy(&o.stdout);
    let rev = out
        .split("as revision ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"));
    Ok(rev)
}

/// The hub with etcd, a probe host (203.0.113.2), another host (203.0.113.3) and `n` node
/// namespaces (203.0.113.10 and up), all on the management bridge.
struct Fleet {
    hub: Hub,
    ns: tests::netns::Netns,
    probe: String,
    other: String,
    nodes: Vec<String>,
}

impl Fleet {
    fn new(prefix: &str, n: usize) -> Fleet {
        let mut hub = Hub::new();
        let (probe, other) = (
            unique(&format!("{prefix}prb")),
            unique(&format!("{prefix}oth")),
        );
        let nodes: Vec<String> = (0..n).map(|_| unique(&format!("{prefix}nod"))).collect();
        let mut all: Vec<&str> = vec![&probe, &other];
        all.extend(nodes.iter().map(String::as_str));
        let ns = tests::netns::Netns::new(&all);
        hub.attach(&probe, "203.0.113.2");
        hub.attach(&other, "203.0.113.3");
        for (i, node) in nodes.iter().enumerate() {
            hub.attach(node, &format!("203.0.113.{}", 10 + i));
        }
        Fleet {
            hub,
            ns,
            probe,
            other,
            nodes,
        }
    }
}

#[test]
fn a_fleet_of_20_follows_every_push() {
    if !tests::can_run("end-to-end fleet test") {
        return;
    }
    let Fleet {
        hub,
        ns,
        probe,
        other,
        nodes,
    } = Fleet::new("f", N);
    let url = hub.url("fleet-e2e");
    let isos: Vec<Iso> = nodes.iter().map(|n| Iso::new(n)).collect();
    let dir = isos[0].files_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(&a, policy("203.0.113.2")).unwrap();
    std::fs::write(&b, policy("203.0.113.3")).unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());

    // The first push, before any node runs: they start on it.
    let rev_a = push(&hub, &url, &a, &[]).unwrap();
    let _echo: Vec<Echo> = PROBED
        .iter()
        .map(|&i| Echo::start(&nodes[i], &["0.0.0.0:8080".parse().unwrap()]))
        .collect();
    let services: Vec<Service> = isos
        .iter()
        .enumerate()
        .map(|(i, iso)| {
            Service::start(
                iso,
                &[
                    "--iface",
                    "m0",
                    "--policy-source",
                    &url,
                    "--node-name",
                    &format!("node{i:02}"),
                    "--no-drop-log",
                ],
                9108,
            )
        })
        .collect();
    let took = converge(&hub, &url, rev_a, N);
    eprintln!("{N} nodes started on revision {rev_a} in {took:?}");
    let addr = |i: usize| -> SocketAddr { format!("203.0.113.{}:8080", 10 + i).parse().unwrap() };
    for &i in &PROBED {
        assert!(
            tcp_ok(&probe, addr(i), Duration::from_secs(3)),
            "A: probe -> node{i}"
        );
        assert!(
            !tcp_ok(&other, addr(i), Duration::from_millis(700)),
            "A: other -> node{i}"
        );
    }

    // Push B: every node converges, and the verdicts turn.
    let t0 = Instant::now();
    let rev_b = push(&hub, &url, &b, &[]).unwrap();
    converge(&hub, &url, rev_b, N);
    let took = t0.elapsed();
    eprintln!("push -> {N} nodes applied revision {rev_b}: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    for &i in &PROBED {
        assert!(
            tcp_ok(&other, addr(i), Duration::from_secs(3)),
            "B: other -> node{i}"
        );
        assert!(
            !tcp_ok(&probe, addr(i), Duration::from_millis(700)),
            "B: probe -> node{i}"
        );
    }
    let text =
        String::from_utf8_lossy(&fleet(&hub, &["status", "--etcd", &url]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "{N} node(s): {N} on revision {rev_b}, 0 lagging, 0 failed"
        )),
        "{text}"
    );
    let s = status(&hub, &url);
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["backend"] == "ebpf"),
        "{s}"
    );

    // Two admins who both read revision B: one push wins, the other is told; nothing lost.
    let rb = rev_b.to_string();
    let first = push(&hub, &url, &a, &["--expect-revision", &rb]);
    let second = push(&hub, &url, &b, &["--expect-revision", &rb]);
    let rev_c = first.expect("the first push wins");
    let err = second.expect_err("the second push is refused");
    assert!(err.contains("changed since it was read"), "{err}");
    converge(&hub, &url, rev_c, N);
    for &i in &PROBED {
        assert!(
            tcp_ok(&probe, addr(i), Duration::from_secs(3)),
            "C (= A): probe -> node{i}"
        );
    }

    // A policy no node can take is refused by `push` itself (same parser and limits).
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[whitelist]\nallow = [\"203.0.113.300\"]\n").unwrap();
    let err = push(&hub, &url, &bad.display().to_string(), &[]).unwrap_err();
    assert!(err.contains("bad.toml:2:"), "{err}");
    assert_eq!(status(&hub, &url)["revision"], rev_c, "nothing was written");

    drop(services);
    drop(isos);
    drop(ns);
}

fn metric(svc: &Service, name: &str) -> Option<f64> {
    svc.try_scrape()?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// etcd killed while nodes run: the verdicts stay, the nodes say so (status, metrics);
/// etcd back and a push: all converge. A node stopped: its record expires with its lease;
/// two pushes later it comes back and ends on the latest revision.
#[test]
fn the_fleet_survives_etcd_and_node_faults() {
    if !tests::can_run("end-to-end fleet fault test") {
        return;
    }
    const M: usize = 3;
    let Fleet {
        mut hub,
        ns,
        probe,
        other,
        nodes,
    } = Fleet::new("g", M);
    let url = hub.url("fleet-faults");
    let isos: Vec<Iso> = nodes.iter().map(|n| Iso::new(n)).collect();
    let dir = isos[0].files_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, allow: &str| {
        let p = dir.join(name);
        std::fs::write(&p, policy(allow)).unwrap();
        p.display().to_string()
    };
    let (a, b, c) = (
        file("a.toml", "203.0.113.2"),
        file("b.toml", "203.0.113.3"),
        file("c.toml", "192.0.2.1"),
    );
    let _echo = Echo::start(&nodes[0], &["0.0.0.0:8080".parse().unwrap()]);
    let to0: SocketAddr = "203.0.113.10:8080".parse().unwrap();
    let args = |i: usize| -> Vec<String> {
        ["--iface", "m0", "--policy-source", &url, "--node-name"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("node{i}"), "--no-drop-log".into()])
            .collect()
    };
    let start = |i: usize| {
        let a = args(i);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Service::start(&isos[i], &a, 9108)
    };
    let rev_a = push(&hub, &url, &a, &[]).unwrap();
    let mut services: Vec<Service> = (0..M).map(start).collect();
    converge(&hub, &url, rev_a, M);
    assert!(tcp_ok(&probe, to0, Duration::from_secs(3)));
    assert!(!tcp_ok(&other, to0, Duration::from_millis(700)));

    // etcd dies: the nodes keep enforcing A and say etcd is unreachable.
    hub.kill_etcd();
    let t0 = Instant::now();
    while metric(&services[0], "isolation_source_up") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{}",
            services[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = isos[0].ok(&["status"]);
    assert!(st.contains("UNREACHABLE"), "{st}");
    assert!(
        tcp_ok(&probe, to0, Duration::from_secs(3)),
        "A still enforced"
    );
    assert!(
        !tcp_ok(&other, to0, Duration::from_millis(700)),
        "A still enforced"
    );
    assert_eq!(
        metric(&services[0], "isolation_source_revision"),
        Some(rev_a as f64)
    );

    // etcd back: a push reaches every node (after their backoff).
    hub.start_etcd();
    let rev_b = push(&hub, &url, &b, &[]).unwrap();
    let took = converge(&hub, &url, rev_b, M);
    eprintln!("after etcd came back, {M} nodes on revision {rev_b} in {took:?}");
    assert!(tcp_ok(&other, to0, Duration::from_secs(3)), "B on node0");
    assert_eq!(metric(&services[0], "isolation_source_up"), Some(1.0));

    // node2 stops: its record goes with its lease; two pushes while it is down.
    let mut gone = services.pop().unwrap();
    assert!(gone.stop().success());
    drop(gone);
    let t0 = Instant::now();
    while status(&hub, &url)["nodes"].as_array().unwrap().len() != M - 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "node2's record did not expire"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    push(&hub, &url, &c, &[]).unwrap();
    let rev_last = push(&hub, &url, &a, &[]).unwrap();
    converge(&hub, &url, rev_last, M - 1);
    // It comes back and catches up on the latest revision.
    services.push(start(M - 1));
    let took = converge(&hub, &url, rev_last, M);
    eprintln!("node2 back on revision {rev_last} in {took:?}");

    // diff says what a push would change; rollback restores the version before (C).
    let o = fleet(&hub, &["diff", &b, "--json", "--etcd", &url]);
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["whitelist_added"], 1, "{plan}");
    assert_eq!(plan["whitelist_removed"], 1, "{plan}");
    assert_eq!(plan["revision"], rev_last, "{plan}");
    assert!(
        tcp_ok(&probe, to0, Duration::from_secs(3)),
        "A before the rollback"
    );
    let o = fleet(&hub, &["rollback", "--etcd", &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rev_c2 = status(&hub, &url)["revision"].as_i64().unwrap();
    assert!(rev_c2 > rev_last);
    converge(&hub, &url, rev_c2, M);
    assert!(
        !tcp_ok(&probe, to0, Duration::from_millis(700)),
        "C after the rollback"
    );
    assert!(
        isos[0].ok(&["save"]).contains("192.0.2.1"),
        "node0 runs C's whitelist"
    );
    drop(services);
    drop(isos);
    drop(ns);
}
