//! `whitelist add|del|list|flush`: live edits, no reload.

use std::{
    collections::HashSet,
    io::{BufRead as _, IsTerminal as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;

use crate::{
    datapath::{self, WhitelistMaps},
    lockout,
    policy::{self, WhitelistSizes},
    state::{self, Paths, State},
};

#[derive(Subcommand, Debug)]
pub enum WhitelistCmd {
    /// Admit addresses or CIDRs.
    Add(EditArgs),
    /// Stop admitting addresses or CIDRs.
    Del(EditArgs),
    /// Print the live whitelist, one entry a line.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry (the whitelist stays enforced: only replies get in).
    Flush {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args, Debug)]
pub struct EditArgs {
    /// Addresses or CIDRs (IPv4 or IPv6).
    #[arg(value_name = "ADDR")]
    pub addrs: Vec<String>,
    /// Read one address or CIDR a line ('-' = stdin; '#' starts a comment).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Apply even if the result would not admit this SSH session's client.
    #[arg(long)]
    pub force: bool,
}

/// Reads and validates every entry before anything is changed.
fn collect(a: &EditArgs) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for s in &a.addrs {
        out.push(policy::parse_net(s).map_err(anyhow::Error::msg)?);
    }
    if let Some(f) = &a.file {
        let (name, reader): (String, Box<dyn std::io::BufRead>) = if f.as_os_str() == "-" {
            ("<stdin>".into(), Box::new(std::io::stdin().lock()))
        } else {
            let file =
                std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
            (
                f.display().to_string(),
                Box::new(std::io::BufReader::new(file)),
            )
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {name}"))?;
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            out.push(
                policy::parse_net(entry).map_err(|r| anyhow::anyhow!("{name}:{}: {r}", i + 1))?,
            );
        }
    }
    if out.is_empty() {
        bail!("no addresses given (name some, or use --file FILE)");
    }
    Ok(out)
}

/// A progress bar on a terminal for big edits; nothing otherwise.
fn progress(len: usize) -> indicatif::ProgressBar {
    if len < 10_000 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} entries {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Bumps the policy generation after a live edit.
fn bump(paths: &Paths, p: &policy::Policy) -> Result<()> {
    let mut st = State::load(paths)?.unwrap_or_default();
    st.generation += 1;
    datapath::write_config(paths, &datapath::config_for(p, st.generation))?;
    state::save_policy(paths, p)?;
    st.save(paths)
}

pub fn run(paths: &Paths, cmd: WhitelistCmd) -> Result<()> {
    match cmd {
        WhitelistCmd::Add(a) => {
            let add = collect(&a)?;
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            let mut p = state::live_policy(paths)?;
            let have: HashSet<IpNet> = p.whitelist.allow.iter().copied().collect();
            let mut fresh = Vec::new();
            let mut seen = HashSet::new();
            for n in add {
                if !have.contains(&n) && seen.insert(n) {
                    fresh.push(n);
                }
            }
            let mut next = p.whitelist.allow.clone();
            next.extend(&fresh);
            WhitelistSizes::of(&next)
                .check()
                .map_err(anyhow::Error::msg)?;
            let pb = progress(fresh.len());
            for n in &fresh {
                maps.insert(n)?;
                pb.inc(1);
            }
            pb.finish_and_clear();
            p.whitelist.allow = next;
            bump(paths, &p)?;
            println!(
                "isolation: whitelisted {} new entr{}",
                fresh.len(),
                if fresh.len() == 1 { "y" } else { "ies" }
            );
            Ok(())
        }
        WhitelistCmd::Del(a) => {
            let del: HashSet<IpNet> = collect(&a)?.into_iter().collect();
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            let mut p = state::live_policy(paths)?;
            let before = p.whitelist.allow.len();
            let mut next = p.whitelist.clone();
            next.allow.retain(|n| !del.contains(n));
            lockout::check(&next, a.force)?;
            let pb = progress(del.len());
            for n in &del {
                maps.remove(n)?;
                pb.inc(1);
            }
            pb.finish_and_clear();
            let removed = before - next.allow.len();
            for n in del.iter().filter(|n| !p.whitelist.allow.contains(n)) {
                eprintln!("isolation: {n} was not in the whitelist");
            }
            p.whitelist = next;
            bump(paths, &p)?;
            println!(
                "isolation: removed {removed} entr{}",
                if removed == 1 { "y" } else { "ies" }
            );
            Ok(())
        }
        WhitelistCmd::Flush { force } => {
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            let mut p = state::live_policy(paths)?;
            let mut next = p.whitelist.clone();
            next.allow.clear();
            lockout::check(&next, force)?;
            for n in maps.entries()? {
                maps.remove(&n)?;
            }
            p.whitelist = next;
            bump(paths, &p)?;
            println!("isolation: whitelist flushed");
            Ok(())
        }
        WhitelistCmd::List { json } => {
            let maps = WhitelistMaps::open(paths)?;
            let mut entries = maps.entries()?;
            entries.sort();
            let shown: Vec<String> = entries
                .iter()
                .map(|n| {
                    if n.prefix_len() == n.max_prefix_len() {
                        n.addr().to_string()
                    } else {
                        n.to_string()
                    }
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string(&shown)?);
            } else {
                for s in shown {
                    println!("{s}");
                }
            }
            Ok(())
        }
    }
}
