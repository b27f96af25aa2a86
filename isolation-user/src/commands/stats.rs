//! `stats`: counters per verdict reason, like `iptables -L -v -n`.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::{engine, render::verdict, state::Paths};

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until interrupted.
    #[arg(long)]
    pub watch: bool,
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

fn print_once(paths: &Paths, as_json: bool) -> Result<()> {
    let (c, profile) = engine::counters(paths)?;
    if as_json {
        let reasons: Vec<_> = c
            .reasons
            .iter()
            .map(|(r, c)| {
                json!({
                    "reason": r.name(), "code": *r as u32, "verdict": verdict(*r).to_lowercase(),
                    "direction": if r.is_egress() { "egress" } else { "ingress" },
                    "packets": c.packets, "bytes": c.bytes,
                })
            })
            .collect();
        println!(
            "{}",
            json!({ "reasons": reasons, "rules": c.rules, "log": c.log, "connections": c.connections, "uncounted": c.uncounted.names() })
        );
        return Ok(());
    }
    for &(title, egress) in profile.sections {
        println!("{title}");
        println!("{:>8} {:>8}  {:<6} reason", "pkts", "bytes", "target");
        for (r, n) in c.reasons.iter().filter(|(r, _)| r.is_egress() == egress) {
            println!(
                "{:>8} {:>8}  {:<6} {}",
                human(n.packets),
                human(n.bytes),
                verdict(*r),
                r.name()
            );
        }
        println!();
    }
    if !c.rules.is_empty() {
        println!("Isolation rules (counted since the policy was last swapped in)");
        println!("{:>8} {:>8}  rule", "pkts", "bytes");
        for r in &c.rules {
            println!("{:>8} {:>8}  {}", human(r.packets), human(r.bytes), r.rule);
        }
        println!();
    }
    let t = &c.connections;
    if c.uncounted.new_connections {
        println!(
            "Connections: {} {} (of {})",
            t.established,
            profile
                .conntrack
                .map_or("established".to_string(), |table| format!("in {table}")),
            t.established_max
        );
    } else {
        println!(
            "Connections: {} new (of {}; a flood of new flows evicts only these), {} established (of {})",
            t.new, t.new_max, t.established, t.established_max
        );
    }
    if c.uncounted.log_lost {
        println!(
            "Log: {} logged ({}), {} suppressed by the rate limit",
            c.log.written, profile.log, c.log.suppressed
        );
    } else {
        println!(
            "Log: {} written, {} suppressed by the rate limit, {} lost ({} full)",
            c.log.written, c.log.suppressed, c.log.lost, profile.log
        );
    }
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
