//! `whitelist add|del|list|flush`: live edits, no reload. An edit costs the same at 10 and at
//! 1M entries: the engine checks it against counts, the backend changes only those entries,
//! and the store appends them to its journal.

use std::{
    collections::HashSet,
    io::{BufRead as _, IsTerminal as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;

use crate::{
    engine::{self, Change, Done, Options, Outcome},
    policy,
    state::Paths,
    store,
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
pub(crate) fn collect(a: &EditArgs) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for s in &a.addrs {
        out.push(policy::parse_net(s).map_err(anyhow::Error::msg)?);
    }
    if let Some(f) = &a.file {
        let (name, reader): (String, Box<dyn std::io::BufRead>) = if f.as_os_str() == "-" {
            ("<stdin>".into(), Box::new(std::io::stdin().lock()))
        } else {
            use std::io::Read as _;
            let file =
                crate::state::open_trusted("address list", f)?.take(crate::state::MAX_POLICY_FILE);
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
    dedup(&mut out);
    Ok(out)
}

/// Drops repeated entries, keeping the first of each in the given order. Repeats are rare:
/// a sorted copy of the keys says whether there are any (measured on 1M IPv6 addresses: a
/// sort of plain integers costs a fraction of a million inserts into a hash set, which was
/// a quarter of `whitelist add --file`), and only then does a set remove them.
fn dedup(out: &mut Vec<IpNet>) {
    let key = |n: &IpNet| match n {
        IpNet::V4(v) => (u128::from(v.addr().to_bits()), u16::from(v.prefix_len())),
        IpNet::V6(v) => (v.addr().to_bits(), 0x100 | u16::from(v.prefix_len())),
    };
    let mut keys: Vec<(u128, u16)> = out.iter().map(key).collect();
    keys.sort_unstable();
    if keys.windows(2).all(|w| w[0] != w[1]) {
        return;
    }
    let mut seen: HashSet<IpNet, foldhash::fast::RandomState> =
        HashSet::with_capacity_and_hasher(out.len(), Default::default());
    out.retain(|n| seen.insert(*n));
}

/// A progress bar on a terminal for big edits; nothing otherwise.
pub fn progress(len: usize) -> indicatif::ProgressBar {
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

fn plural(n: usize) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

/// Runs one whitelist change through the engine, with a progress bar for big ones.
fn change(paths: &Paths, change: Change, len: usize, force: bool) -> Result<Outcome> {
    let pb = progress(len);
    let out = engine::commit(
        paths,
        change,
        Options {
            force,
            progress: &mut |n| pb.inc(n),
        },
    );
    pb.finish_and_clear();
    out
}

pub fn run(paths: &Paths, cmd: WhitelistCmd) -> Result<()> {
    match cmd {
        WhitelistCmd::Add(a) => {
            let add = collect(&a)?;
            let len = add.len();
            let out = change(paths, Change::WhitelistAdd(add), len, a.force)?;
            if let Done::Whitelist { asked, added, .. } = out.what {
                println!(
                    "isolation: whitelisted {added} new {} ({} already there)",
                    plural(added),
                    asked - added
                );
            }
            Ok(())
        }
        WhitelistCmd::Del(a) => {
            let del = collect(&a)?;
            let len = del.len();
            let out = change(paths, Change::WhitelistDel(del), len, a.force)?;
            if let Done::Whitelist { asked, removed, .. } = out.what {
                if removed < asked {
                    eprintln!(
                        "isolation: {} of the given entries were not in the whitelist",
                        asked - removed
                    );
                }
                println!("isolation: removed {removed} {}", plural(removed));
            }
            Ok(())
        }
        WhitelistCmd::Flush { force } => {
            let out = change(paths, Change::WhitelistFlush, 0, force)?;
            if let Done::Whitelist { asked, .. } = out.what {
                println!("isolation: whitelist flushed ({asked} {})", plural(asked));
            }
            Ok(())
        }
        WhitelistCmd::List { json } => {
            let mut entries = engine::whitelist(paths)?;
            entries.sort();
            let shown: Vec<String> = entries.iter().map(store::show).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_the_first_of_each_in_order() {
        let n = |s: &str| crate::policy::parse_net(s).unwrap();
        let mut v = vec![
            n("2001:db8::1"),
            n("192.0.2.1"),
            n("::c000:201"),
            n("192.0.2.1"),
        ];
        dedup(&mut v);
        assert_eq!(v, [n("2001:db8::1"), n("192.0.2.1"), n("::c000:201")]);
        let mut once = vec![n("192.0.2.0/24"), n("192.0.2.0/25")];
        dedup(&mut once);
        assert_eq!(
            once.len(),
            2,
            "the same address with another prefix is another entry"
        );
    }
}
