//! The iptables + ipset backend where it differs from the eBPF one: chosen by `auto` where
//! the kernel refuses BPF, living beside the host's own rules and sets without touching
//! them, and `export`'s text loading as it is.
//!
//! (The whitelist and isolation suites run against both backends: e2e_whitelist.rs,
//! e2e_isolation.rs.)

use std::{process::Command, time::Duration};

use tests::{
    iso::Iso,
    netns::{Netns, ok, sh},
    traffic::{Echo, tcp_ok},
    unique,
};

const PASS_WAIT: Duration = Duration::from_secs(3);
const DROP_WAIT: Duration = Duration::from_millis(700);

/// In an unprivileged user namespace (`unshare -Urn`) `bpf()` is refused while iptables and
/// ipset work on its own network namespace: `load --backend auto` falls back to iptables,
/// says why, and enforces (a ping over lo dropped; the same ping passing once its source is
/// whitelisted, and before load).
#[test]
fn auto_falls_back_to_iptables_where_bpf_is_refused() {
    if !tests::can_run("end-to-end iptables fallback test") {
        return;
    }
    let id = unique("isouns");
    let state = std::env::temp_dir().join(&id);
    let policy = std::env::temp_dir().join(format!("{id}.toml"));
    std::fs::write(
        &policy,
        "[whitelist]\nenabled = true\nallow = [\"198.51.100.1\"]\n",
    )
    .unwrap();
    let bin = tests::bin();
    // Each step prints a marker and its outcome; the namespace dies with the shell.
    let script = format!(
        r#"
        set -u
        ip link set lo up
        export ISOLATION_STATE_DIR={state} ISOLATION_PIN_DIR=/sys/fs/bpf/{id}
        ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 && echo "before:pass" || echo "before:drop"
        {bin} load --iface lo --policy {policy} >/dev/null || echo "load:failed"
        {bin} status --json | tr -d '\n'; echo
        ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 && echo "loaded:pass" || echo "loaded:drop"
        {bin} whitelist add 127.0.0.1 >/dev/null
        ping -c1 -W1 127.0.0.1 >/dev/null 2>&1 && echo "whitelisted:pass" || echo "whitelisted:drop"
        {bin} unload >/dev/null
        iptables-save | grep -c ISO- || true
        ipset list -n | grep -c . || true
        "#,
        state = state.display(),
        bin = bin.display(),
        policy = policy.display(),
    );
    let out = Command::new("unshare")
        .args(["-Urn", "bash", "-c", &script])
        .env_remove("SSH_CONNECTION")
        .output()
        .expect("unshare");
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&policy);
    let _ = std::fs::remove_dir(format!("/sys/fs/bpf/{id}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "stdout: {text}\nstderr: {err}");
    assert_eq!(lines[0], "before:pass", "{text}");
    let status: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(status["backend"], "iptables", "{status}");
    assert!(
        status["backend_why"]
            .as_str()
            .is_some_and(|w| w.contains("bpf() refused")),
        "{status}"
    );
    assert_eq!(lines[2], "loaded:drop", "{text}");
    assert_eq!(lines[3], "whitelisted:pass", "{text}");
    assert_eq!(lines[4], "0", "unload removes the chains: {text}");
    assert_eq!(lines[5], "0", "unload removes the sets: {text}");
    // No warning about BPF on stderr: auto asked the kernel quietly.
    assert!(!err.contains("WARN"), "{err}");
}

/// `auto` falls back to iptables only when the kernel refuses BPF: an install that fails
/// for another reason (here a file where the pin dir should be; before, a directory a user
/// planted at the lock's path) is an error the operator sees, and nothing is loaded. With
/// the path cleared, the same load installs the eBPF datapath (the positive control).
#[test]
fn auto_never_falls_back_on_an_error_that_is_not_the_kernels() {
    if !tests::can_run("end-to-end auto backend test") {
        return;
    }
    let (srv, cl) = (unique("afsrv"), unique("afcl"));
    let ns = Netns::new(&[&srv, &cl]);
    ns.link(&srv, "s1", &["192.0.2.1/24"], &cl, "e0", &["192.0.2.2/24"]);
    let mut iso = Iso::new(&srv);
    let blocker = iso.files_dir().join("not-a-dir");
    std::fs::create_dir_all(iso.files_dir()).unwrap();
    std::fs::write(&blocker, "").unwrap();
    iso.pin = blocker.join("pins");
    let err = iso.fails(&["load", "--iface", "s1", "--backend", "auto"]);
    assert!(err.contains("cannot create pin dir"), "{err}");
    let status: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["loaded"], false, "nothing was loaded: {status}");
    let chains = ok(&["ip", "netns", "exec", &srv, "iptables-save"]);
    assert!(!chains.contains("ISO"), "iptables was installed: {chains}");

    std::fs::remove_file(&blocker).unwrap();
    iso.ok(&["load", "--iface", "s1", "--backend", "auto"]);
    let status: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["backend"], "ebpf", "{status}");
    drop(iso);
    drop(ns);
}

/// The host's own rules, chains and sets are left exactly as they were through load, live
/// edits, a whole-table `iptables-save | iptables-restore` round trip and unload; ours keep
/// enforcing across the round trip.
#[test]
fn the_hosts_own_rules_and_sets_are_untouched() {
    if !tests::can_run("end-to-end iptables coexistence test") {
        return;
    }
    let (srv, cl) = (unique("ipsrv"), unique("ipcl"));
    let ns = Netns::new(&[&srv, &cl]);
    ns.link(
        &srv,
        "s1",
        &["192.0.2.1/24", "2001:db8:1::1/64"],
        &cl,
        "e0",
        &["192.0.2.2/24", "2001:db8:1::2/64"],
    );
    let iso = Iso::with_backend(&srv, "iptables");
    let in_srv = |args: &[&str]| -> String {
        let mut full = vec!["nsenter".to_string(), format!("--net=/run/netns/{srv}")];
        full.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        ok(&refs)
    };
    // The host's own: a set, a chain, rules in INPUT and FORWARD, IPv4 and IPv6.
    in_srv(&["ipset", "create", "mine", "hash:ip"]);
    in_srv(&["ipset", "add", "mine", "203.0.113.9"]);
    in_srv(&["iptables", "-N", "MYCHAIN"]);
    in_srv(&[
        "iptables", "-A", "MYCHAIN", "-p", "udp", "--dport", "9", "-j", "DROP",
    ]);
    in_srv(&[
        "iptables",
        "-A",
        "INPUT",
        "-m",
        "set",
        "--match-set",
        "mine",
        "src",
        "-j",
        "DROP",
    ]);
    in_srv(&["iptables", "-A", "FORWARD", "-j", "MYCHAIN"]);
    in_srv(&[
        "ip6tables",
        "-A",
        "INPUT",
        "-s",
        "2001:db8:ffff::/48",
        "-j",
        "DROP",
    ]);
    // Theirs, as text (rules without counters; sets whole).
    let host = || -> (String, String, String) {
        let strip = |t: String| -> String {
            t.lines()
                .filter(|l| !l.starts_with('#') && !l.contains("ISOLATION") && !l.contains("ISO-"))
                // A chain's policy counters move with traffic: its name and policy only.
                .map(|l| match l.strip_prefix(':') {
                    Some(c) => c.split(" [").next().unwrap_or(c).to_string(),
                    None => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        (
            strip(in_srv(&["iptables-save"])),
            strip(in_srv(&["ip6tables-save"])),
            in_srv(&["ipset", "save", "mine"]),
        )
    };
    let before = host();
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    assert!(tcp_ok(&cl, sa("192.0.2.1:8080"), PASS_WAIT), "before load");

    let p = iso.policy(
        "[networks.a]\nsubnets = [\"198.51.100.0/24\"]\n[whitelist]\nenabled = true\nallow = [\"203.0.113.7\"]\n",
    );
    iso.ok(&["load", "--iface", "s1", "--policy", &p]);
    assert!(
        !tcp_ok(&cl, sa("192.0.2.1:8080"), DROP_WAIT),
        "not whitelisted"
    );
    // Status says which pair set types this kernel has (none are needed): as the kernel
    // itself answers.
    let has_pairs = sh(&[
        "nsenter",
        &format!("--net=/run/netns/{srv}"),
        "ipset",
        "create",
        "probe-pairs",
        "hash:net,net",
    ])
    .status
    .success();
    if has_pairs {
        in_srv(&["ipset", "destroy", "probe-pairs"]);
    }
    let status: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
    let detail = status["backend_detail"].as_str().unwrap();
    assert_eq!(
        detail.contains("neither hash:net,net"),
        !has_pairs,
        "{detail}"
    );
    // A set of the host's named like ours (our prefix, then a number): the edits below
    // destroy our old sets, and unload all of ours, never this one.
    let prefix = in_srv(&["ipset", "list", "-n"])
        .lines()
        .find(|l| l.starts_with("iso-"))
        .map(|l| l.splitn(3, '-').take(2).collect::<Vec<_>>().join("-"))
        .expect("our sets are tagged iso-TAG-");
    let lookalike = format!("{prefix}-2024-servers");
    in_srv(&["ipset", "create", &lookalike, "hash:ip"]);
    iso.ok(&["network", "add", "b", "198.51.100.128/25"]);
    iso.ok(&["whitelist", "add", "198.51.100.7"]);
    assert_eq!(host(), before, "load and edits left the host's rules alone");

    // A whole-table round trip, as a host's own tooling does it: ours keep enforcing.
    let saved = in_srv(&["iptables-save"]);
    let o = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{srv}"), "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(saved.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(o.success());
    assert!(
        !tcp_ok(&cl, sa("192.0.2.1:8080"), DROP_WAIT),
        "still enforced after iptables-restore"
    );
    iso.ok(&["whitelist", "add", "192.0.2.2"]);
    assert!(
        tcp_ok(&cl, sa("192.0.2.1:8080"), PASS_WAIT),
        "and still edited live"
    );

    iso.ok(&["unload"]);
    assert_eq!(host(), before, "unload left the host's rules alone");
    let mut sets: Vec<String> = in_srv(&["ipset", "list", "-n"])
        .lines()
        .map(String::from)
        .collect();
    sets.sort();
    assert_eq!(
        sets,
        [lookalike.clone(), "mine".to_string()],
        "only the host's sets are left"
    );
    let rules = in_srv(&["iptables-save"]);
    assert!(!rules.contains("ISO"), "{rules}");
}

/// `export --format iptables` prints text that `ipset restore` and `iptables-restore
/// --noflush` take as it is, and that enforces the policy (a stranger blocked; a
/// whitelisted client passing).
#[test]
fn exported_rules_load_by_hand_and_enforce() {
    if !tests::can_run("end-to-end iptables export test") {
        return;
    }
    let (srv, cl) = (unique("exsrv"), unique("excl"));
    let ns = Netns::new(&[&srv, &cl]);
    ns.link(&srv, "s1", &["192.0.2.1/24"], &cl, "e0", &["192.0.2.2/24"]);
    let iso = Iso::new(&srv);
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let export = |allow: &str| -> String {
        let p = iso.policy(&format!(
            "[whitelist]\nenabled = true\nallow = [\"{allow}\"]\n"
        ));
        iso.ok(&["export", "--format", "iptables", "--iface", "s1", &p])
    };
    let load_by_hand = |text: &str| {
        let mut parts = text.split("# ");
        parts.next();
        for part in parts {
            let (cmd, body) = part.split_once('\n').unwrap();
            let argv: Vec<&str> = match cmd {
                "ipset restore" => vec!["ipset", "restore"],
                "iptables-restore --noflush" => vec!["iptables-restore", "--noflush"],
                "ip6tables-restore --noflush" => vec!["ip6tables-restore", "--noflush"],
                other => panic!("unknown section {other}"),
            };
            let mut c = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{srv}"))
                .args(&argv)
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
            let o = c.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    let text = export("203.0.113.7");
    assert!(text.contains("-I INPUT 1 -i s1"), "{text}");
    load_by_hand(&text);
    assert!(
        !tcp_ok(&cl, sa("192.0.2.1:8080"), DROP_WAIT),
        "the exported rules drop a stranger"
    );
    // Positive control: the same rules with the client whitelisted, in a fresh namespace
    // state (flush what the first text made).
    ns.exec(&srv, &["iptables", "-F"]);
    ns.exec(&srv, &["iptables", "-X"]);
    ns.exec(&srv, &["ip6tables", "-F"]);
    ns.exec(&srv, &["ip6tables", "-X"]);
    ns.exec(&srv, &["ipset", "destroy"]);
    load_by_hand(&export("192.0.2.2"));
    assert!(
        tcp_ok(&cl, sa("192.0.2.1:8080"), PASS_WAIT),
        "the exported rules pass a whitelisted client"
    );
}

fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().unwrap()
}

/// `import` reads what the kernel itself saves (`ipset save`, `iptables-save`,
/// `ip6tables-save`: its own order of matches, its quoting) back into the policy that was
/// loaded: exporting the imported policy gives exactly the rules of the original.
#[test]
fn import_reads_the_kernels_own_save_back_to_the_policy() {
    if !tests::can_run("end-to-end iptables import test") {
        return;
    }
    let srv = unique("imsrv");
    let ns = Netns::new(&[&srv]);
    ns.exec(
        &srv,
        &[
            "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
        ],
    );
    let iso = Iso::with_backend(&srv, "iptables");
    let policy = r#"
[isolation]
default = "deny"
reject = true
[networks.hr]
subnets = ["198.51.100.128/25", "2001:db8:2::/48"]
[networks.it]
subnets = ["198.51.100.0/25", "2001:db8:1::/48"]
[[isolation.allow]]
from = "hr"
to = "it"
ports = ["tcp:80", "udp:53-54", "icmp"]
[[isolation.except]]
from = "192.0.2.10/32"
to = "it"
[whitelist]
enabled = true
log = true
allow = ["203.0.113.7", "192.0.2.0/24", "2001:db8::1"]
"#;
    let p = iso.policy(policy);
    iso.ok(&["load", "--iface", "d0", "--policy", &p]);
    let save = |cmd: &[&str]| -> String {
        let o = ns.exec(&srv, cmd);
        assert!(o.status.success(), "{cmd:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let ipset = iso.policy(&save(&["ipset", "save"]));
    let rules = iso.policy(&(save(&["iptables-save"]) + &save(&["ip6tables-save"])));
    let imported = iso.ok(&["import", "--ipset-save", &ipset, "--iptables-save", &rules]);
    assert!(!imported.contains("# note"), "{imported}");
    let back = iso.policy(&imported);
    assert_eq!(
        iso.ok(&["export", &back]),
        iso.ok(&["export", &p]),
        "imported:\n{imported}"
    );
}

/// Whitelist edits on the iptables backend at scale, both ways: entry by entry (the kernel
/// says which changed) and in bulk past 65,536 entries (a set sized for the result filled
/// beside the live one and swapped in; bulk deletes), with the counts exact and a real
/// client's connection passing throughout (a stranger's dropped: the positive and negative
/// controls of every step).
#[test]
fn big_whitelist_edits_swap_a_sized_set_in_and_count_exactly() {
    if !tests::can_run("end-to-end iptables bulk edit test") {
        return;
    }
    let (srv, cl, st) = (unique("bksrv"), unique("bkcl"), unique("bkst"));
    let ns = Netns::new(&[&srv, &cl, &st]);
    ns.link(&srv, "s1", &["192.0.2.1/24"], &cl, "e0", &["192.0.2.2/24"]);
    ns.link(
        &srv,
        "s2",
        &["198.51.100.1/24"],
        &st,
        "e0",
        &["198.51.100.2/24"],
    );
    let iso = Iso::with_backend(&srv, "iptables");
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let p = iso.policy("[whitelist]\nenabled = true\nallow = [\"192.0.2.2\"]\n");
    iso.ok(&["load", "--iface", "s1", "--iface", "s2", "--policy", &p]);
    let controls = |when: &str| {
        assert!(
            tcp_ok(&cl, sa("192.0.2.1:8080"), PASS_WAIT),
            "{when}: the listed client"
        );
        assert!(
            !tcp_ok(&st, sa("198.51.100.1:8080"), DROP_WAIT),
            "{when}: the stranger"
        );
    };
    controls("before");
    let n = 70_000u32;
    let list: String = (0..n)
        .map(|i| format!("10.{}.{}.{}\n", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    let f = iso.policy(&list);
    let out = iso.ok(&["whitelist", "add", "--file", &f]);
    assert!(
        out.contains(&format!("whitelisted {n} new entries")),
        "{out}"
    );
    controls("after the bulk add");
    let fill = |iso: &Iso| -> u64 {
        let s: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
        s["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str().unwrap().ends_with("-wlv4"))
            .unwrap()["entries"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(fill(&iso), u64::from(n) + 1);
    // Entry by entry: one new, one already there.
    let out = iso.ok(&["whitelist", "add", "10.0.0.1", "203.0.113.9"]);
    assert!(out.contains("1 new entry (1 already there)"), "{out}");
    // The same file again, in bulk: nothing new.
    let out = iso.ok(&["whitelist", "add", "--file", &f]);
    assert!(
        out.contains(&format!("0 new entries ({n} already there)")),
        "{out}"
    );
    // Bulk delete: exactly those.
    let out = iso.ok(&["whitelist", "del", "--file", &f]);
    assert!(out.contains(&format!("removed {n} entries")), "{out}");
    assert_eq!(fill(&iso), 2);
    controls("after the bulk delete");
    // No set left beside the live ones.
    let sets =
        String::from_utf8_lossy(&ns.exec(&srv, &["ipset", "list", "-n"]).stdout).into_owned();
    assert!(!sets.contains("-t\n"), "{sets}");
}
