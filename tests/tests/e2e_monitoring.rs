//! The monitoring the package ships, against the real thing: the alert rules pass
//! `promtool check rules` and their unit tests (each alert firing and not firing); a real
//! Prometheus (Debian's) scrapes a real `run` service following a real etcd, and after
//! traffic every query of every panel of the Grafana dashboard returns data through
//! Prometheus's HTTP API, as do the dashboard's variables; the alert rules load and
//! evaluate without error on the live series.
//!
//!   hub: etcd 203.0.113.1 --br0-- probe 203.0.113.2 (whitelisted, network "clients")
//!                             \-- other 203.0.113.3 (a stranger)
//!                             \-- node  203.0.113.10 (the service, Prometheus on its 127.0.0.1)

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    fleet::Hub,
    iso::Iso,
    netns::Netns,
    service::Service,
    traffic::{Echo, in_ns, ping_ok, tcp_ok},
    unique,
};

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn promtool(args: &[&str]) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(packaging().join("prometheus"))
        .output()
        .expect("promtool (cargo xtask setup installs Debian's prometheus)")
}

#[test]
fn the_alert_rules_are_valid_and_their_tests_pass() {
    let o = promtool(&["check", "rules", "alerts.yml"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let o = promtool(&["test", "rules", "alerts.test.yml"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert of the rules has a test that fires it and one that does not.
    let rules = std::fs::read_to_string(packaging().join("prometheus/alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(packaging().join("prometheus/alerts.test.yml")).unwrap();
    for name in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {name}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{name}: no case where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{name}: no case where it fires"
        );
    }
}

/// A Prometheus server inside a namespace, on 127.0.0.1:9090; killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    ns: String,
}

impl Prometheus {
    fn start(ns: &str, target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(unique("prom"));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = packaging().join("prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: isolation\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (cargo xtask setup installs Debian's prometheus)");
        let p = Prometheus {
            child,
            dir,
            ns: ns.to_string(),
        };
        let t0 = Instant::now();
        while p.get("/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "Prometheus not ready after 30 s: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// GET `path` from the server: (status code, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        in_ns(&self.ns, move || {
            let addr: SocketAddr = "127.0.0.1:9090".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let (head, body) = out.split_once("\r\n\r\n")?;
            let code = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((code, body.to_string()))
        })
    }

    /// An API call's `data`, asserting the call succeeded.
    fn api(&self, path: &str) -> serde_json::Value {
        let (code, body) = self
            .get(path)
            .unwrap_or_else(|| panic!("no answer to {path}: {}", self.log()));
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(
            code == 200 && v["status"] == "success",
            "{path}: {code} {body}"
        );
        v["data"].clone()
    }

    /// The series an instant query returns.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding of a query parameter (everything but RFC 3986's unreserved bytes).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every query of the dashboard: (panel title, expression), with its variables set as
/// Grafana would for "All" ($job, $instance) and a rate window Prometheus can fill.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(packaging().join("grafana/isolation.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$job", ".+")
                .replace("$instance", ".+")
                .replace("$__rate_interval", "30s");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

const POLICY: &str = r#"
[whitelist]
enabled = true
log = true
allow = ["203.0.113.1", "203.0.113.2"]

[isolation]
default = "deny"
reject = true

[networks.clients]
subnets = ["203.0.113.2/32"]
[networks.nodes]
subnets = ["203.0.113.10/32"]

[[isolation.allow]]
from = "clients"
to = "nodes"
ports = ["tcp:8080", "icmp"]
"#;

#[test]
fn prometheus_scrapes_the_service_and_every_dashboard_panel_has_data() {
    if !tests::can_run("end-to-end monitoring test") {
        return;
    }
    let mut hub = Hub::new();
    let (probe, other, node) = (unique("mprb"), unique("moth"), unique("mnod"));
    let ns = Netns::new(&[&probe, &other, &node]);
    hub.attach(&probe, "203.0.113.2");
    hub.attach(&other, "203.0.113.3");
    hub.attach(&node, "203.0.113.10");
    let iso = Iso::new(&node);
    std::fs::create_dir_all(iso.files_dir()).unwrap();
    let file = iso.files_dir().join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let url = hub.url("monitoring");
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", hub.hub))
        .arg(tests::bin())
        .args(["fleet", "push"])
        .arg(&file)
        .args(["--etcd", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let svc = Service::start(
        &iso,
        &[
            "--iface",
            "m0",
            "--policy-source",
            &url,
            "--node-name",
            "node1",
        ],
        9108,
    );
    // The node has applied the fleet's policy (its follower runs apart from /metrics).
    let t0 = Instant::now();
    while !svc.try_scrape().is_some_and(|m| {
        m.lines().any(|l| {
            l.strip_prefix("isolation_source_revision ")
                .is_some_and(|v| v.trim() != "0")
        })
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the node applied no revision: {}",
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let prom = Prometheus::start(&node, "127.0.0.1:9108");

    // Traffic: the whitelisted client through its allow rule (TCP and ping), the stranger
    // dropped, with its positive control.
    let _echo = Echo::start(&node, &["0.0.0.0:8080".parse().unwrap()]);
    let to: SocketAddr = "203.0.113.10:8080".parse().unwrap();
    for _ in 0..3 {
        assert!(tcp_ok(&probe, to, Duration::from_secs(3)), "probe -> node");
        assert!(ping_ok(&probe, "203.0.113.10"), "probe pings node");
        assert!(
            !tcp_ok(&other, to, Duration::from_millis(500)),
            "the stranger is dropped"
        );
    }

    // Prometheus has scraped the service for a while: 5 samples at least.
    let t0 = Instant::now();
    loop {
        let r = prom.query("count_over_time(isolation_build_info[1m]) >= 5");
        if !r.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "Prometheus did not scrape 5 times in 30 s: targets {}; {}",
            prom.api("/api/v1/targets"),
            svc.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = prom.query("up{job=\"isolation\"}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1", "the target is up");

    // The checker can fail: a series the service does not export returns nothing.
    assert!(prom.query("isolation_no_such_metric").is_empty());

    // Every panel's every query has data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        if prom.query(expr).is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels whose query returns nothing:\n{}",
        empty.join("\n")
    );

    // What the panels show is the traffic: drops by not-whitelisted, passes by the allow
    // rule, the rule's own counter, and the node's fleet revision.
    let has = |expr: &str| !prom.query(expr).is_empty();
    assert!(has(
        "isolation_packets_total{reason=\"not-whitelisted\"} > 0"
    ));
    assert!(has("isolation_packets_total{reason=\"allow-rule\"} > 0"));
    assert!(has("isolation_rule_packets_total{kind=\"allow\"} > 0"));
    assert!(has(
        "isolation_source_revision > 0 and isolation_source_up == 1"
    ));
    assert!(has(
        "isolation_build_info{commit!=\"\", bpf_object!=\"\"} == 1"
    ));

    // The dashboard's variables: label_values(isolation_build_info, job|instance).
    for label in ["job", "instance"] {
        let v = prom.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode("isolation_build_info")
        ));
        assert_eq!(v.as_array().map(Vec::len), Some(1), "{label}: {v}");
    }

    // The alert rules loaded and evaluate without error on the live series; none fires
    // on this healthy node.
    let t0 = Instant::now();
    loop {
        let groups = prom.api("/api/v1/rules");
        let rules: Vec<serde_json::Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        assert_eq!(rules.len(), 9, "{groups}");
        if rules.iter().all(|r| r["health"] == "ok") {
            let firing: Vec<_> = rules.iter().filter(|r| r["state"] != "inactive").collect();
            assert!(firing.is_empty(), "{firing:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "rules not evaluated ok: {groups}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(prom);
    drop(svc);
    drop(iso);
    drop(ns);
}
