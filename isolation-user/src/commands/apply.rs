//! `apply FILE [--dry-run]` and `save`: the whole live policy replaced in one transaction,
//! or printed as a policy file. `apply` of what `save` printed changes nothing.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::{
    engine::{self, Change, Confirm, Done, Options, Plan},
    policy, rollback,
    state::Paths,
};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The policy file (the whole policy, whitelist included).
    pub file: PathBuf,
    /// Print what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output: the plan (`--dry-run`) or the outcome.
    #[arg(long)]
    pub json: bool,
    /// Apply a whitelist even if it would not admit this SSH session's client.
    #[arg(long)]
    pub force: bool,
    /// Roll back to the previous policy unless `isolation-user confirm` runs within SECS
    /// seconds, even if this process is killed or the SSH session drops.
    #[arg(long, value_name = "SECS")]
    pub confirm_within: Option<f64>,
}

#[derive(Args, Debug)]
pub struct ConfirmArgs {
    #[arg(long)]
    pub json: bool,
}

/// A plan in words, one line per kind of change.
pub fn print_plan(p: &Plan) {
    if p.is_empty() {
        println!("no change: the file is the live policy");
        return;
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    println!(
        "networks:  added {}; removed {}; changed {}",
        list(&p.networks_added),
        list(&p.networks_removed),
        list(&p.networks_changed)
    );
    println!(
        "rules:     allow +{} -{}; except +{} -{}",
        p.allow_added, p.allow_removed, p.except_added, p.except_removed
    );
    for s in &p.settings {
        println!("setting:   {s}");
    }
    println!(
        "whitelist: +{} -{} entries",
        p.whitelist_added, p.whitelist_removed
    );
    println!(
        "blocklist: +{} -{} permanent entries (entries with a timeout stay as they are)",
        p.blocklist_added, p.blocklist_removed
    );
}

pub fn apply(paths: &Paths, a: ApplyArgs) -> Result<()> {
    let text = engine::read_policy_text(&a.file)?;
    if a.dry_run {
        let (policy, lines) = engine::parse_policy_file(&a.file, &text)?;
        let plan = engine::plan(paths, &policy, Some(&lines), a.force)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print_plan(&plan);
        }
        return Ok(());
    }
    let confirm = match a.confirm_within {
        Some(secs) if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) => {
            anyhow::bail!(
                "--confirm-within {secs}: give a number of seconds, more than 0 and at most 86400"
            )
        }
        Some(within) => Some(Confirm {
            file: a.file.display().to_string(),
            within,
        }),
        None => None,
    };
    // The text the live policy was applied from, nothing changed since: said unparsed.
    let digest = engine::text_digest(&text);
    if let Some(out) = engine::unchanged_text(paths, &digest)? {
        return render(&a, out);
    }
    let (policy, lines) = engine::parse_policy_file(&a.file, &text)?;
    drop(text);
    let bar = super::whitelist::progress(policy.whitelist.allow.len());
    let out = engine::commit(
        paths,
        Change::Replace {
            policy,
            lines: Some(lines),
            confirm,
            text_digest: Some(digest),
        },
        Options {
            force: a.force,
            progress: &mut |n| bar.set_position(n),
        },
    );
    bar.finish_and_clear();
    render(&a, out?)
}

/// What `apply` did, in words or JSON.
fn render(a: &ApplyArgs, out: engine::Outcome) -> Result<()> {
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    match out.what {
        Done::Unchanged => println!(
            "isolation: {} is the live policy already (generation {}); nothing changed",
            a.file.display(),
            out.generation
        ),
        _ => println!(
            "isolation: applied {} ({} backend), generation {}",
            a.file.display(),
            out.backend,
            out.generation
        ),
    }
    if let Some(p) = out.armed {
        println!(
            "isolation: run `isolation-user confirm` within {:.0} s to keep it; otherwise \
             generation {}'s policy comes back by itself",
            p.confirm_deadline - crate::state::unix_now(),
            p.rollback_generation
        );
    }
    Ok(())
}

/// `confirm`: keeps the policy of the pending `apply --confirm-within`.
pub fn confirm(paths: &Paths, a: ConfirmArgs) -> Result<()> {
    let p = rollback::confirm(paths)?;
    let generation = engine::generation(paths)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"file": p.file, "generation": generation})
        );
    } else {
        println!(
            "isolation: confirmed {} (generation {generation}); the rollback is cancelled",
            p.file
        );
    }
    Ok(())
}

/// The hidden `rollback-timer` verb: the helper of an `apply --confirm-within`. Sleeps until
/// the deadline (leaving early if the apply is confirmed), then restores the policy the
/// apply replaced, unless it was confirmed meanwhile.
pub fn rollback_timer(paths: &Paths) -> Result<()> {
    if !rollback::wait_for_deadline(paths)? {
        return Ok(());
    }
    let out = engine::commit(paths, Change::RollBack, Options::quiet(true))
        .context("the apply was not confirmed in time, and restoring the previous policy failed")?;
    if matches!(out.what, Done::Replaced) {
        eprintln!(
            "isolation: the apply was not confirmed in time; the previous policy is back \
             (generation {})",
            out.generation
        );
    }
    Ok(())
}

/// `save`: the live policy, whitelist included, as a policy file on stdout.
pub fn save(paths: &Paths) -> Result<()> {
    print!("{}", policy::to_toml(&engine::saved(paths)?));
    Ok(())
}
