//! `stats`: counters per verdict reason, like `iptables -L -v -n`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use isolation_common::{LogStat, Reason};
use serde_json::json;

use crate::{
    compile, datapath,
    state::{self, Paths},
};

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until interrupted.
    #[arg(long)]
    pub watch: bool,
}

fn verdict(r: Reason) -> &'static str {
    if r.is_egress() {
        "TRACK"
    } else if r == Reason::RejectIsolated {
        "REJECT"
    } else if r.is_drop() {
        "DROP"
    } else {
        "PASS"
    }
}

fn human(n: u64) -> String {
    // As iptables -v: plain below 100k, then K/M/G.
    match n {
        0..=99_999 => n.to_string(),
        100_000..=99_999_999 => format!("{}K", n / 1000),
        100_000_000..=99_999_999_999 => format!("{}M", n / 1_000_000),
        _ => format!("{}G", n / 1_000_000_000),
    }
}

/// (kind, index, description, counter) of every rule of the live policy.
fn rules(paths: &Paths) -> Result<Vec<(&'static str, usize, String, isolation_common::Counter)>> {
    let live = state::live_policy(paths)?;
    let names = compile::compile(&live).map_err(anyhow::Error::msg)?;
    let counts = datapath::rule_counters(paths)?;
    let mut out = Vec::new();
    for (k, n) in names.allow_names.iter().enumerate() {
        out.push(("allow", k, n.clone(), counts[k]));
    }
    for (j, n) in names.except_names.iter().enumerate() {
        out.push(("except", j, n.clone(), counts[64 + j]));
    }
    Ok(out)
}

fn print_once(paths: &Paths, as_json: bool) -> Result<()> {
    let counters = datapath::counters(paths)?;
    let log = datapath::log_stats(paths)?;
    let rules = rules(paths)?;
    if as_json {
        let reasons: Vec<_> = counters
            .iter()
            .map(|(r, c)| {
                json!({
                    "reason": r.name(), "code": *r as u32, "verdict": verdict(*r).to_lowercase(),
                    "direction": if r.is_egress() { "egress" } else { "ingress" },
                    "packets": c.packets, "bytes": c.bytes,
                })
            })
            .collect();
        let rules: Vec<_> = rules
            .iter()
            .map(|(kind, i, name, c)| json!({ "kind": kind, "index": i, "rule": name, "packets": c.packets, "bytes": c.bytes }))
            .collect();
        println!(
            "{}",
            json!({
                "reasons": reasons,
                "rules": rules,
                "log": {
                    "written": log[LogStat::Written as usize],
                    "suppressed": log[LogStat::Suppressed as usize],
                    "lost": log[LogStat::Lost as usize],
                }
            })
        );
        return Ok(());
    }
    for (title, egress) in [
        ("Ingress (XDP: whitelist, then isolation)", false),
        ("Egress (TC)", true),
    ] {
        println!("{title}");
        println!("{:>8} {:>8}  {:<6} reason", "pkts", "bytes", "target");
        for (r, c) in counters.iter().filter(|(r, _)| r.is_egress() == egress) {
            println!(
                "{:>8} {:>8}  {:<6} {}",
                human(c.packets),
                human(c.bytes),
                verdict(*r),
                r.name()
            );
        }
        println!();
    }
    if !rules.is_empty() {
        println!("Isolation rules (counted since the policy was last swapped in)");
        println!("{:>8} {:>8}  rule", "pkts", "bytes");
        for (_, _, name, c) in &rules {
            println!("{:>8} {:>8}  {name}", human(c.packets), human(c.bytes));
        }
        println!();
    }
    println!(
        "Log: {} written, {} suppressed by the rate limit, {} lost (ring buffer full)",
        log[LogStat::Written as usize],
        log[LogStat::Suppressed as usize],
        log[LogStat::Lost as usize]
    );
    Ok(())
}

pub fn run(paths: &Paths, a: StatsArgs) -> Result<()> {
    if !a.watch {
        return print_once(paths, a.json);
    }
    loop {
        if !a.json {
            print!("\x1b[H\x1b[2J");
        }
        print_once(paths, a.json)?;
        std::thread::sleep(Duration::from_secs(1));
    }
}
