//! `cargo xtask demo`'s script, run as a user runs it: it shows both jobs (the whitelist and
//! the classic recipe's virtual-network isolation: HR reaches IT on tcp:80, IT is refused
//! at once going to HR, hairpin inside IT), a live edit and `check`, prints no warning, and
//! leaves nothing behind (namespaces, listeners, pins).

use std::process::Command;

/// The outcome the demo printed for a probe, in the section starting at `section`.
fn outcome<'a>(out: &'a str, section: &str, probe: &str) -> &'a str {
    let rest = out
        .split(section)
        .nth(1)
        .unwrap_or_else(|| panic!("no section {section}:\n{out}"));
    let line = rest
        .lines()
        .find(|l| l.contains(probe))
        .unwrap_or_else(|| panic!("no probe {probe} after {section}:\n{out}"));
    if line.contains("passes") {
        "passes"
    } else if line.contains("REJECTED") {
        "rejected"
    } else if line.contains("dropped") {
        "dropped"
    } else {
        panic!("unreadable line {line}")
    }
}

#[test]
fn the_demo_shows_both_jobs_and_leaves_nothing() {
    if !tests::can_run("the demo") {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../xtask/demo.sh");
    let o = Command::new("bash")
        .arg(script)
        .env("BIN", tests::bin())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        !out.contains("warning") && !err.contains("warning"),
        "{out}\n{err}"
    );
    let cases = [
        (
            "friend 192.0.2.10 -> host tcp:8080",
            ["passes", "passes", "passes", "passes"],
        ),
        (
            "stranger 203.0.113.66 -> host tcp:8080",
            ["passes", "dropped", "passes", "passes"],
        ),
        (
            "host -> stranger ping",
            ["passes", "passes", "passes", "passes"],
        ),
        (
            "hr1 -> it1 tcp:80",
            ["passes", "passes", "passes", "passes"],
        ),
        (
            "hr1 -> it1 tcp:22",
            ["passes", "rejected", "rejected", "passes"],
        ),
        (
            "it1 -> hr1 tcp:80",
            ["passes", "rejected", "passes", "passes"],
        ),
        (
            "it1 -> it2 tcp:80",
            ["passes", "passes", "passes", "passes"],
        ),
    ];
    let sections = ["== before", "== after load", "== live edits", "== unload"];
    for (probe, want) in cases {
        for (section, w) in sections.iter().zip(want) {
            assert_eq!(
                outcome(&out, section, probe),
                w,
                "{probe} in {section}:\n{out}"
            );
        }
    }
    assert!(
        out.contains("isolation REJECT isolated-reject: IN=i1 SRC=198.51.100.2"),
        "{out}"
    );
    assert!(
        out.contains("isolation DROP not-whitelisted: IN=s0 SRC=203.0.113.66"),
        "{out}"
    );
    assert!(
        out.contains("REJECT: no rule matches; default deny"),
        "{out}"
    );
    // Nothing left behind.
    let netns = tests::netns::ok(&["ip", "netns", "list"]);
    assert!(!netns.contains("iso-demo"), "{netns}");
    assert!(!std::path::Path::new("/sys/fs/bpf/isolation-demo").exists());
    let procs = tests::netns::sh(&["pgrep", "-f", "nc -lk"]);
    assert!(
        procs.stdout.is_empty(),
        "a listener is left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}
