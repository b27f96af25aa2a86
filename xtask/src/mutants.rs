//! `mutants`: proves the differential test can fail. Each mutant is a deliberate bug behind a
//! `mutant-*` feature of isolation-user (the BPF ones are passed on to the datapath build);
//! the differential test, built with it, must fail with a disagreement between the datapath
//! and the oracle (not a build error, not a coverage shortfall).

use anyhow::{Result, bail};

use crate::util::cmd;

/// (feature, what the bug is).
pub const MUTANTS: &[(&str, &str)] = &[
    (
        "mutant-no-containment",
        "compiler: a prefix's entry no longer carries the shorter prefixes containing it",
    ),
    (
        "mutant-port-range-end",
        "compiler: a port range stops one port short of its end",
    ),
    ("mutant-hairpin-off", "datapath: hairpin never passes"),
    (
        "mutant-reject-as-drop",
        "datapath: REJECT turned into a silent drop",
    ),
    (
        "mutant-skip-cidr-trie",
        "datapath: the whitelist's CIDR tries are skipped",
    ),
    (
        "mutant-record-at-ingress",
        "datapath: XDP records the flow of an allowed packet (a forged one opens the reverse)",
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
    for (feature, what) in MUTANTS {
        if !o.only.is_empty() && !o.only.iter().any(|x| x == feature) {
            continue;
        }
        eprintln!("mutants: {feature} ({what})");
        let out = cmd("cargo")
            .args([
                "test",
                "-p",
                "tests",
                "--test",
                "differential",
                "--features",
                &format!("isolation-user/{feature}"),
            ])
            .env("ISOLATION_REQUIRE_E2E", "1")
            // A caught mutant needs its first disagreement, not the smallest one.
            .env("ISOLATION_DIFF_SHRINK", "30")
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let caught = !out.status.success() && text.contains("the datapath and the oracle disagree");
        if caught {
            let first = text
                .lines()
                .find(|l| l.starts_with("Test failed:"))
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
            "the differential test missed {} mutant(s): {}",
            missed.len(),
            missed.join(", ")
        );
    }
    Ok(())
}
