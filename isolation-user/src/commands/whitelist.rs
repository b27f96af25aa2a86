//! `whitelist add|del|list|flush`: live edits, no reload. The maps are the source of truth
//! for the entries, so an edit costs the same at 10 and at 1M entries.

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
    lockout, policy,
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
        /// Flush even if this SSH session's client would no longer be admitted.
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
    let mut seen = HashSet::new();
    out.retain(|n| seen.insert(*n));
    Ok(out)
}

/// A progress bar on a terminal for big edits; nothing otherwise.
fn progress(len: usize) -> indicatif::ProgressBar {
    if len < 50_000 || !std::io::stderr().is_terminal() {
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
fn bump(paths: &Paths) -> Result<()> {
    let p = state::live_policy(paths)?;
    let mut st = State::load(paths)?.unwrap_or_default();
    st.generation += 1;
    let flags = datapath::whitelist_flags(&p);
    datapath::update_config(paths, |c| {
        c.flags = flags;
        c.generation = st.generation;
    })?;
    st.save(paths)
}

/// Refuses an edit after which the whitelist would not admit this SSH session's client.
fn check_lockout(
    paths: &Paths,
    maps: &WhitelistMaps,
    removing: Option<&HashSet<IpNet>>,
    force: bool,
) -> Result<()> {
    let Some(client) = lockout::ssh_client() else {
        return Ok(());
    };
    let p = state::live_policy(paths)?;
    if force || !p.whitelist.enabled {
        return Ok(());
    }
    let still = maps
        .admitting(client)?
        .into_iter()
        .filter(|n| removing.is_some_and(|r| !r.contains(n)));
    let wl = policy::Whitelist {
        enabled: true,
        log: false,
        allow: still.collect(),
    };
    lockout::check_client(&wl, Some(client), false)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

pub fn run(paths: &Paths, cmd: WhitelistCmd) -> Result<()> {
    match cmd {
        WhitelistCmd::Add(a) => {
            let add = collect(&a)?;
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            let pb = progress(add.len());
            let new = maps.insert_many(&add, |n| pb.inc(n))?;
            pb.finish_and_clear();
            bump(paths)?;
            println!(
                "isolation: whitelisted {new} new {} ({} already there)",
                plural(new),
                add.len() - new
            );
            Ok(())
        }
        WhitelistCmd::Del(a) => {
            let del = collect(&a)?;
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            check_lockout(paths, &maps, Some(&del.iter().copied().collect()), a.force)?;
            let pb = progress(del.len());
            let removed = maps.remove_many(&del, |n| pb.inc(n))?;
            pb.finish_and_clear();
            bump(paths)?;
            if removed < del.len() {
                eprintln!(
                    "isolation: {} of the given entries were not in the whitelist",
                    del.len() - removed
                );
            }
            println!("isolation: removed {removed} {}", plural(removed));
            Ok(())
        }
        WhitelistCmd::Flush { force } => {
            let _lock = paths.lock()?;
            let mut maps = WhitelistMaps::open(paths)?;
            check_lockout(paths, &maps, None, force)?;
            let all = maps.entries()?;
            let pb = progress(all.len());
            maps.remove_many(&all, |n| pb.inc(n))?;
            pb.finish_and_clear();
            bump(paths)?;
            println!(
                "isolation: whitelist flushed ({} {})",
                all.len(),
                plural(all.len())
            );
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
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for s in shown {
                    use std::io::Write as _;
                    writeln!(out, "{s}")?;
                }
            }
            Ok(())
        }
    }
}
