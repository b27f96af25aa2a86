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
    /// Every node's applied revision, result and backend; who lags, who refused.
    Status {
        #[arg(long)]
        json: bool,
        /// Exit with an error unless every node runs the current revision (none lags,
        /// none refused it, at least one reports): for scripts and CI after a push.
        #[arg(long)]
        check: bool,
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
        FleetCmd::Status { json, check, to } => status(json, check, &to),
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
        return e.context(
            "etcd asks for a login: give --etcd-user-file FILE (a line USER:PASSWORD) or --etcd-user USER:PASSWORD",
        );
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
    let text = engine::read_policy_text(file)?;
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
        match fleet::push_file(&mut c, &to.etcd, &text, &p, expect).await? {
            fleet::Pushed::Already { revision } => println!(
                "isolation: {} is the fleet's policy already (revision {revision}); nothing pushed",
                file.display()
            ),
            fleet::Pushed::Landed {
                revision,
                was,
                parts,
            } => println!(
                "isolation: pushed {}{} to {} as revision {revision} (was {was})",
                file.display(),
                parts
                    .map(|(n, written)| format!(" in {n} parts ({written} written)"))
                    .unwrap_or_default(),
                to.etcd.policy_key()
            ),
        }
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

fn status(json: bool, check: bool, to: &Target) -> Result<()> {
    runtime()?.block_on(async {
        let mut c = fleet::connect(&to.etcd, &to.opts, TIMEOUT).await?;
        // The revision only: a value no node takes still has one, and the nodes say why.
        let revision = fleet::read_value(&mut c, &to.etcd)
            .await?
            .map(|(_, r)| r)
            .unwrap_or(0);
        let nodes = fleet::read_nodes(&mut c, &to.etcd).await?;
        let now = crate::state::unix_now();
        if json {
            println!("{}", status_json(&nodes, revision));
        } else {
            print!(
                "{}",
                status_text(&nodes, revision, now, &to.etcd.policy_key())
            );
        }
        let t = Tally::of(&nodes, revision);
        if check && !t.converged() {
            anyhow::bail!(
                "the fleet has not converged on revision {revision}: {} of {} node(s) run it, \
                 {} lag, {} refused it",
                t.current,
                t.nodes,
                t.lagging(),
                t.refused
            );
        }
        Ok(())
    })
}

/// Where a node stands against the fleet's revision. A node that refused a revision (its
/// record's `result` is the reason) runs an older one: refused, not lagging (waiting will
/// not bring it there).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Standing {
    Current,
    Lagging,
    Refused,
}

fn standing(n: &fleet::NodeRecord, revision: i64) -> Standing {
    if n.result != "ok" {
        Standing::Refused
    } else if n.revision == revision {
        Standing::Current
    } else {
        Standing::Lagging
    }
}

/// The nodes by `standing`, and the records that are none.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    nodes: usize,
    current: usize,
    refused: usize,
    malformed: usize,
}

impl Tally {
    fn of(nodes: &[fleet::NodeEntry], revision: i64) -> Tally {
        let mut t = Tally::default();
        for e in nodes {
            match &e.record {
                Ok(n) => {
                    t.nodes += 1;
                    match standing(n, revision) {
                        Standing::Current => t.current += 1,
                        Standing::Refused => t.refused += 1,
                        Standing::Lagging => {}
                    }
                }
                Err(_) => t.malformed += 1,
            }
        }
        t
    }

    fn lagging(&self) -> usize {
        self.nodes - self.current - self.refused
    }

    /// Every node runs the revision, and there is at least one.
    fn converged(&self) -> bool {
        self.nodes > 0 && self.current == self.nodes
    }
}

/// `fleet status --json`: the well-formed records (each with `current` and `failed`), and
/// the keys under `P/nodes/` that hold no record of their own node.
fn status_json(nodes: &[fleet::NodeEntry], revision: i64) -> serde_json::Value {
    let good: Vec<_> = nodes
        .iter()
        .filter_map(|e| e.record.as_ref().ok())
        .map(|n| {
            let mut v = serde_json::to_value(n).unwrap_or_default();
            v["current"] = serde_json::json!(n.revision == revision);
            v["failed"] = serde_json::json!(n.result != "ok");
            v
        })
        .collect();
    let malformed: Vec<_> = nodes
        .iter()
        .filter_map(|e| {
            e.record
                .as_ref()
                .err()
                .map(|why| serde_json::json!({ "node": e.name, "error": why }))
        })
        .collect();
    serde_json::json!({ "revision": revision, "nodes": good, "malformed": malformed })
}

/// `fleet status` for a terminal. Everything read from etcd is printed escaped: a record
/// cannot send control sequences to the admin's terminal.
pub fn status_text(nodes: &[fleet::NodeEntry], revision: i64, now: f64, key: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "policy: {} at revision {revision}", printable(key));
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:<9} {:>6}  result",
        "node", "revision", "backend", "age"
    );
    for e in nodes {
        match &e.record {
            Ok(n) => {
                let result = match (standing(n, revision), n.refused_revision) {
                    (Standing::Refused, Some(r)) => {
                        format!("REFUSED revision {r}: {}", printable(&n.result))
                    }
                    (Standing::Refused, None) => format!("REFUSED: {}", printable(&n.result)),
                    (Standing::Current, _) => "ok".to_string(),
                    (Standing::Lagging, _) => "ok (lags)".to_string(),
                };
                let _ = writeln!(
                    out,
                    "{:<24} {:>9} {:<9} {:>5.0}s  {result}",
                    printable(&n.node),
                    n.revision,
                    printable(&n.backend),
                    (now - n.time).max(0.0),
                );
            }
            Err(why) => {
                let _ = writeln!(
                    out,
                    "{:<24} MALFORMED: {}",
                    printable(&e.name),
                    printable(why)
                );
            }
        }
    }
    let t = Tally::of(nodes, revision);
    let _ = writeln!(
        out,
        "{} node(s): {} on revision {revision}, {} lagging, {} refused{}",
        t.nodes,
        t.current,
        t.lagging(),
        t.refused,
        if t.malformed > 0 {
            format!("; {} malformed record(s)", t.malformed)
        } else {
            String::new()
        }
    );
    out
}

/// `s` with every control character (ESC, CR, ...) written as an escape.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{NodeEntry, NodeRecord};

    fn record(node: &str, revision: i64, result: &str) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            node: node.into(),
            revision,
            backend: "ebpf".into(),
            result: result.into(),
            refused_revision: None,
            time: 0.0,
            generation: 1,
        })
        .unwrap()
    }

    /// Records written by whoever can write `P/nodes/`: escape sequences are printed
    /// escaped, a record claiming another node's name and a value that is no record are
    /// shown as malformed, not as nodes (no node is printed twice).
    #[test]
    fn forged_records_are_shown_as_such_and_escaped() {
        let nodes = vec![
            NodeEntry::read("a", &record("a", 7, "ok")),
            NodeEntry::read("b", &record("a", 7, "ok")),
            NodeEntry::read("c\x1b[2J", &record("c\x1b[2J", 7, "\x1b]0;owned\x07ok")),
            NodeEntry::read("d", b"\x1b[31mnot json"),
        ];
        let text = status_text(&nodes, 7, 0.0, "P/policy");
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
        assert!(text.contains("c\\u{1b}[2J"), "{text}");
        assert_eq!(text.matches("\na ").count(), 1, "a once: {text}");
        assert!(
            text.contains("b                        MALFORMED: its record names another node, 'a'"),
            "{text}"
        );
        assert!(
            text.contains("d                        MALFORMED: not a node record"),
            "{text}"
        );
        assert!(
            text.contains(
                "2 node(s): 1 on revision 7, 0 lagging, 1 refused; 2 malformed record(s)"
            ),
            "{text}"
        );
        let json = status_json(&nodes, 7);
        assert_eq!(json["nodes"].as_array().unwrap().len(), 2, "{json}");
        assert_eq!(json["malformed"].as_array().unwrap().len(), 2, "{json}");
        assert!(!json.to_string().contains('\x1b'), "{json}");
    }

    /// `--check` passes only when every node runs the revision: a node that refused it is
    /// counted as refused (not lagging), a node behind as lagging, no node at all fails.
    #[test]
    fn check_wants_every_node_on_the_revision() {
        let entry = |n: &str, rev: i64, result: &str, refused: Option<i64>| {
            let mut r: NodeRecord = serde_json::from_slice(&record(n, rev, result)).unwrap();
            r.refused_revision = refused;
            NodeEntry::read(n, &serde_json::to_vec(&r).unwrap())
        };
        let all = vec![entry("a", 9, "ok", None), entry("b", 9, "ok", None)];
        assert!(Tally::of(&all, 9).converged());
        assert!(!Tally::of(&[], 9).converged(), "no node reports");
        let lag = vec![entry("a", 9, "ok", None), entry("b", 8, "ok", None)];
        assert_eq!(
            Tally::of(&lag, 9),
            Tally {
                nodes: 2,
                current: 1,
                refused: 0,
                malformed: 0
            }
        );
        assert!(!Tally::of(&lag, 9).converged());
        let refused = vec![
            entry("a", 9, "ok", None),
            entry("b", 8, "the policy is over the limits", Some(9)),
        ];
        let t = Tally::of(&refused, 9);
        assert_eq!((t.current, t.refused), (1, 1), "{t:?}");
        assert!(!t.converged());
        let text = status_text(&refused, 9, 0.0, "P/policy");
        assert!(
            text.contains("REFUSED revision 9: the policy is over the limits"),
            "{text}"
        );
        assert!(
            text.contains("2 node(s): 1 on revision 9, 0 lagging, 1 refused"),
            "{text}"
        );
    }
}
