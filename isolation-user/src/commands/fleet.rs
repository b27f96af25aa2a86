//! `fleet push` and `fleet status`: the policy of every node, kept in etcd.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use crate::{
    backend::Limits,
    engine,
    fleet::{self, EtcdOpts, EtcdUrl},
    policy,
};

#[derive(Args, Debug)]
pub struct Target {
    /// etcd://HOST:PORT[,HOST:PORT…]/PREFIX
    #[arg(long, value_name = "URL", env = "ISOLATION_ETCD")]
    pub etcd: EtcdUrl,
    #[command(flatten)]
    pub opts: EtcdOpts,
}

#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// Check a policy file and store it for every node, unless someone pushed since it
    /// was read (compare-and-swap on its revision).
    Push {
        file: PathBuf,
        /// Push only if the fleet's policy is still at this revision (the one you reviewed,
        /// from `fleet status`); by default, the revision read just before the write.
        #[arg(long, value_name = "REV")]
        expect_revision: Option<i64>,
        #[command(flatten)]
        to: Target,
    },
    /// What pushing a file would change, against the fleet's policy.
    Diff {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        to: Target,
    },
    /// Restore the fleet's previous policy (the version before the current revision), with
    /// the same compare-and-swap as push.
    Rollback {
        #[command(flatten)]
        to: Target,
    },
    /// Every node's applied revision, result and backend; who lags, who failed.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        to: Target,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Per request: etcd can be slow to answer while a whole fleet reads a big policy from it.
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(c: FleetCmd) -> Result<()> {
    let opts = match &c {
        FleetCmd::Push { to, .. }
        | FleetCmd::Diff { to, .. }
        | FleetCmd::Rollback { to }
        | FleetCmd::Status { to, .. } => to.opts.clone(),
    };
    match c {
        FleetCmd::Push {
            file,
            expect_revision,
            to,
        } => push(&file, expect_revision, &to),
        FleetCmd::Status { json, to } => status(json, &to),
        FleetCmd::Diff { file, json, to } => diff(&file, json, &to),
        FleetCmd::Rollback { to } => rollback(&to),
    }
    .map_err(|e| with_hint(e, &opts))
}

/// etcd's answer when it asks for TLS or a login the command did not give is gRPC's
/// "transport error" or "user name is empty": say which option is missing.
fn with_hint(e: anyhow::Error, o: &EtcdOpts) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("user name is empty") {
        return e.context("etcd asks for a login: give --etcd-user USER:PASSWORD");
    }
    if !(text.contains("transport error") || text.contains("connection closed")) {
        return e;
    }
    if o.etcd_cacert.is_none() {
        e.context("etcd closed the connection: if it is served over TLS, give --etcd-cacert")
    } else if o.etcd_cert.is_none() {
        e.context(
            "etcd closed the connection: if it asks for a client certificate, give \
             --etcd-cert and --etcd-key",
        )
    } else {
        e
    }
}

fn push(file: &std::path::Path, expect: Option<i64>, to: &Target) -> Result<()> {
    // The same checks a node makes, before anything is written.
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy {}", file.display()))?;
    let (p, lines) = policy::parse_with_lines(&file.display().to_string(), &text)?;
    policy::validate(&p).map_err(anyhow::Error::msg)?;
    engine::check_limits(
        &p,
        policy::WhitelistSizes::of(&p.whitelist.allow),
        Some(&lines),
        &Limits::datapath(),
        "every",
    )?;
    runtime()?.block_on(async {
        let mut c = fleet::connect(&to.etcd, &to.opts, TIMEOUT).await?;
        let before = fleet::read_value(&mut c, &to.etcd).await?;
        let expected = expect.unwrap_or(before.as_ref().map(|(_, r)| *r).unwrap_or(0));
        // Encoded once: compared with what etcd holds, then pushed.
        let enc = fleet::encode(&text, &p);
        if expect.is_none() && before.is_some_and(|(v, _)| v == enc.value) {
            println!(
                "isolation: {} is the fleet's policy already (revision {expected}); nothing pushed",
                file.display()
            );
            return Ok(());
        }
        let (rev, written) = fleet::push(&mut c, &to.etcd, &enc, expected).await?;
        let parts = match &enc.manifest {
            Some(m) => format!(" in {} parts ({written} written)", m.parts.len()),
            None => String::new(),
        };
        println!(
            "isolation: pushed {}{parts} to {} as revision {rev} (was {expected})",
            file.display(),
            to.etcd.policy_key()
        );
        Ok(())
    })
}

fn diff(file: &std::path::Path, json: bool, to: &Target) -> Result<()> {
    let (new, _) = engine::read_policy_file(file)?;
    runtime()?.block_on(async {
        let mut c = fleet::connect(&to.etcd, &to.opts, TIMEOUT).await?;
        let (old, rev) = fleet::read_policy(&mut c, &to.etcd)
            .await?
            .unwrap_or((policy::Policy::default(), 0));
        let plan = engine::diff(&old, &new);
        if json {
            let mut v = serde_json::to_value(&plan)?;
            v["revision"] = serde_json::json!(rev);
            println!("{v}");
        } else {
            println!("against {} at revision {rev}:", to.etcd.policy_key());
            super::apply::print_plan(&plan);
        }
        Ok(())
    })
}

fn rollback(to: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = fleet::connect(&to.etcd, &to.opts, TIMEOUT).await?;
        let Some((_, rev)) = fleet::read_policy(&mut c, &to.etcd).await? else {
            anyhow::bail!("no policy at {} to roll back", to.etcd.policy_key());
        };
        let (prev, new) = fleet::rollback(&mut c, &to.etcd, rev).await?;
        println!(
            "isolation: {} rolled back to the version of revision {prev}, as revision {new}",
            to.etcd.policy_key()
        );
        Ok(())
    })
}

fn status(json: bool, to: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = fleet::connect(&to.etcd, &to.opts, TIMEOUT).await?;
        let policy = fleet::read_policy(&mut c, &to.etcd).await?;
        let revision = policy.map(|(_, r)| r).unwrap_or(0);
        let nodes = fleet::read_nodes(&mut c, &to.etcd).await?;
        let now = crate::state::unix_now();
        if json {
            let nodes: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let mut v = serde_json::to_value(n).unwrap_or_default();
                    v["current"] = serde_json::json!(n.revision == revision);
                    v["failed"] = serde_json::json!(n.result != "ok");
                    v
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({ "revision": revision, "nodes": nodes })
            );
            return Ok(());
        }
        println!("policy: {} at revision {revision}", to.etcd.policy_key());
        println!(
            "{:<24} {:>9} {:<9} {:>6}  result",
            "node", "revision", "backend", "age"
        );
        for n in &nodes {
            let lag = if n.revision == revision {
                ""
            } else {
                " (lags)"
            };
            println!(
                "{:<24} {:>9} {:<9} {:>5.0}s  {}{lag}",
                n.node,
                n.revision,
                n.backend,
                (now - n.time).max(0.0),
                n.result
            );
        }
        let current = nodes.iter().filter(|n| n.revision == revision).count();
        let failed = nodes.iter().filter(|n| n.result != "ok").count();
        println!(
            "{} node(s): {current} on revision {revision}, {} lagging, {failed} failed",
            nodes.len(),
            nodes.len() - current
        );
        Ok(())
    })
}
