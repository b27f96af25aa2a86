//! `apply FILE [--dry-run]` and `save`: the whole live policy replaced in one transaction,
//! or printed as a policy file. `apply` of what `save` printed changes nothing.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{
    engine::{self, Change, Done, Options, Plan},
    policy,
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
}

fn print_plan(p: &Plan) {
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
}

pub fn apply(paths: &Paths, a: ApplyArgs) -> Result<()> {
    let (policy, lines) = engine::read_policy_file(&a.file)?;
    if a.dry_run {
        let plan = engine::plan(paths, &policy, Some(&lines), a.force)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print_plan(&plan);
        }
        return Ok(());
    }
    let bar = super::whitelist::progress(policy.whitelist.allow.len());
    let out = engine::commit(
        paths,
        Change::Replace {
            policy,
            lines: Some(lines),
        },
        Options {
            force: a.force,
            progress: &mut |n| bar.set_position(n),
        },
    )?;
    bar.finish_and_clear();
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
    Ok(())
}

/// `save`: the live policy, whitelist included, as a policy file on stdout.
pub fn save(paths: &Paths) -> Result<()> {
    engine::open(paths)?;
    print!("{}", policy::to_toml(&engine::whole(paths)?));
    Ok(())
}
