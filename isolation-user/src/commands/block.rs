//! `block add|del|list|flush`: the blocklist, edited live. Entries with a timeout are live
//! state (the feeds' bans); those without are the policy's `[blocklist] entries`.

use anyhow::Result;
use clap::{Args, Subcommand};

use super::whitelist::{EditArgs, collect};
use crate::{
    blocklist,
    engine::{self, BlockEdit, Change, Done, Options},
    state::Paths,
};

#[derive(Subcommand, Debug)]
pub enum BlockCmd {
    /// Drop every packet from addresses or CIDRs, for good or until a timeout.
    Add(AddArgs),
    /// Stop blocking addresses or CIDRs (permanent or timed).
    Del(EditArgs),
    /// Print the blocklist: each entry, where it came from, the time it has left.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry, permanent and timed.
    Flush,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    #[command(flatten)]
    pub entries: EditArgs,
    /// How long the entries hold: 90, 90s, 15m, 4h, 7d. Without it they are permanent (the
    /// policy's); an entry already there gets the new deadline.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Where the entries come from, shown by `block list` (fail2ban's action says
    /// `fail2ban`).
    #[arg(long, default_value = blocklist::ORIGIN_CLI, value_parser = origin)]
    pub origin: String,
}

fn origin(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.len() > 32
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "bad origin '{s}': use 1 to 32 letters, digits, '-' or '_'"
        ));
    }
    Ok(s.to_string())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

fn commit(paths: &Paths, edit: BlockEdit, force: bool) -> Result<(usize, usize)> {
    let out = engine::commit(paths, Change::Block(edit), Options::quiet(force))?;
    match out.what {
        Done::Blocklist { asked, changed, .. } => Ok((asked, changed)),
        _ => Ok((0, 0)),
    }
}

pub fn run(paths: &Paths, cmd: BlockCmd) -> Result<()> {
    match cmd {
        BlockCmd::Add(a) => {
            // Every entry and the timeout are read before anything changes.
            let timeout = a
                .timeout
                .as_deref()
                .map(blocklist::parse_duration)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
            let nets = collect(&a.entries)?;
            let deadline = timeout.map(|t| blocklist::now_ms() + t.as_millis() as u64);
            let (asked, changed) = commit(
                paths,
                BlockEdit::Add {
                    nets,
                    deadline,
                    origin: a.origin,
                },
                a.entries.force,
            )?;
            let how = match timeout {
                Some(t) => format!("for {} s", t.as_secs()),
                None => "permanently".into(),
            };
            println!(
                "isolation: blocked {asked} {} {how} ({changed} changed what is enforced)",
                plural(asked)
            );
            Ok(())
        }
        BlockCmd::Del(a) => {
            let nets = collect(&a)?;
            let (asked, changed) = commit(paths, BlockEdit::Del(nets), a.force)?;
            if changed < asked {
                eprintln!(
                    "isolation: {} of the given entries were not blocked",
                    asked - changed
                );
            }
            println!("isolation: unblocked {changed} {}", plural(changed));
            Ok(())
        }
        BlockCmd::Flush => {
            let (asked, _) = commit(paths, BlockEdit::Flush, false)?;
            println!("isolation: blocklist flushed ({asked} {})", plural(asked));
            Ok(())
        }
        BlockCmd::List { json } => {
            let entries = engine::blocked(paths)?;
            if json {
                println!("{}", serde_json::to_string(&entries)?);
                return Ok(());
            }
            use std::io::Write as _;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for e in entries {
                let left = match e.seconds_left {
                    None => "permanent".to_string(),
                    Some(s) => blocklist::left((s * 1000.0) as u64, 0),
                };
                writeln!(out, "{:<43} {:<10} {left}", e.entry, e.origin)?;
            }
            Ok(())
        }
    }
}
