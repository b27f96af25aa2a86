//! `mutants`: proves the differential tests can fail. Each mutant is a deliberate bug behind a
//! `mutant-*` feature of isolation-user (the BPF ones are passed on to the datapath build);
//! the differential test that covers it, built with it, must fail with a disagreement with
//! the oracle (not a build error, not a coverage shortfall). The datapath's mutants go to
//! `differential` (BPF_PROG_TEST_RUN); the iptables backend's to `differential_backends`
//! (real connections through the CLI, so the binary is built with the bug, in a target
//! directory of its own that the other tests never use).

use anyhow::{Result, bail};

use crate::util::cmd;

/// Which differential test must catch a mutant.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Harness {
    /// `differential`: the BPF programs through BPF_PROG_TEST_RUN against the oracle.
    Datapath,
    /// `differential_backends`: real connections through both backends, via the CLI.
    Backends,
}

/// (feature, what the bug is, the test that must catch it).
pub const MUTANTS: &[(&str, &str, Harness)] = &[
    (
        "mutant-no-containment",
        "compiler: a prefix's entry no longer carries the shorter prefixes containing it",
        Harness::Datapath,
    ),
    (
        "mutant-port-range-end",
        "compiler: a port range stops one port short of its end",
        Harness::Datapath,
    ),
    (
        "mutant-hairpin-off",
        "datapath: hairpin never passes",
        Harness::Datapath,
    ),
    (
        "mutant-reject-as-drop",
        "datapath: REJECT turned into a silent drop",
        Harness::Datapath,
    ),
    (
        "mutant-skip-cidr-trie",
        "datapath: the whitelist's CIDR tries are skipped",
        Harness::Datapath,
    ),
    (
        "mutant-record-at-ingress",
        "datapath: XDP records the flow of an allowed packet (a forged one opens the reverse)",
        Harness::Datapath,
    ),
    (
        "mutant-blocked-after-replies",
        "datapath: the blocklist is asked after replies (a blocked host's replies get in)",
        Harness::Datapath,
    ),
    (
        "mutant-iptables-hairpin-off",
        "iptables backend: the hairpin rules are left out",
        Harness::Backends,
    ),
];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Only these mutants (feature names); default all.
    #[arg(long = "only", value_delimiter = ',')]
    only: Vec<String>,
}

pub fn run(o: Options) -> Result<()> {
    let mut missed = Vec::new();
    for (feature, what, harness) in MUTANTS {
        if !o.only.is_empty() && !o.only.iter().any(|x| x == feature) {
            continue;
        }
        eprintln!("mutants: {feature} ({what})");
        let (test, needle) = match harness {
            Harness::Datapath => ("differential", "the datapath and the oracle disagree"),
            Harness::Backends => ("differential_backends", ", the oracle says "),
        };
        let mut c = cmd("cargo");
        if *harness == Harness::Backends {
            // The CLI under test, built with the bug where no other test looks for it.
            let dir = "target/mutants";
            let built = cmd("cargo")
                .args(["build", "-p", "isolation-user", "--features", feature])
                .args(["--target-dir", dir])
                .status()?;
            if !built.success() {
                bail!("mutant {feature} did not build");
            }
            c.env(
                "ISOLATION_BIN",
                std::fs::canonicalize(format!("{dir}/debug/isolation-user"))?,
            );
            c.args(["test", "-p", "tests", "--test", test]);
        } else {
            c.args([
                "test",
                "-p",
                "tests",
                "--test",
                test,
                "--features",
                &format!("isolation-user/{feature}"),
            ]);
        }
        let out = c
            .env("ISOLATION_REQUIRE_E2E", "1")
            // A caught mutant needs its first disagreement, not the smallest one.
            .env("ISOLATION_DIFF_SHRINK", "30")
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let caught = !out.status.success() && text.contains(needle);
        if caught {
            let first = text
                .lines()
                .find(|l| l.starts_with("Test failed:") || l.contains(needle))
                .unwrap_or("")
                .to_string();
            eprintln!("mutants: {feature} caught: {first}");
        } else if !out.status.success() && !text.contains("test result") {
            bail!("mutant {feature} did not build:\n{text}");
        } else {
            eprintln!("mutants: {feature} MISSED");
            missed.push(*feature);
        }
    }
    if !missed.is_empty() {
        bail!(
            "the differential tests missed {} mutant(s): {}",
            missed.len(),
            missed.join(", ")
        );
    }
    Ok(())
}
