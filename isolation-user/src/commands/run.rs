//! `run`: the foreground service (see `service`).

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use clap::Args;

use super::load::{Mode, interfaces};
use crate::{backend::Choice, service, state::Paths};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Interface to attach to (repeat for several).
    #[arg(long = "iface", required = true, value_name = "IF")]
    pub ifaces: Vec<String>,
    /// The policy file, applied at start and again whenever it changes.
    #[arg(long, value_name = "FILE", default_value = crate::state::DEFAULT_POLICY)]
    pub policy: PathBuf,
    /// Take the policy from etcd instead of a file: etcd://HOST:PORT[,HOST:PORT…]/PREFIX
    /// (PREFIX/policy is applied and watched; this node's record goes to PREFIX/nodes/NODE).
    #[arg(long, value_name = "URL", conflicts_with = "policy")]
    pub policy_source: Option<crate::fleet::EtcdUrl>,
    /// This node's name in PREFIX/nodes/ (default: the host name).
    #[arg(long, value_name = "NAME", requires = "policy_source")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub etcd: crate::fleet::EtcdOpts,
    /// Serve Prometheus text on http://ADDR/metrics (e.g. 127.0.0.1:9108).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Choice,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Detach from the interfaces on SIGTERM/SIGINT (by default the datapath stays and
    /// keeps enforcing the last policy, so a restart or an upgrade leaves no gap).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Do not log each logged drop (leave the trace ring to `isolation-user trace`).
    #[arg(long)]
    pub no_drop_log: bool,
    /// Apply a whitelist even if it would not admit this SSH session's client.
    #[arg(long)]
    pub force: bool,
    /// Enforce the ban decisions of a CrowdSec Local API: crowdsec+http://HOST:PORT.
    #[arg(long, value_name = "URL", requires = "crowdsec_key_file")]
    pub decisions: Option<crate::feeds::crowdsec::Lapi>,
    /// The bouncer key `cscli bouncers add NAME -o raw` printed, in a file only root can
    /// change.
    #[arg(long, value_name = "FILE", requires = "decisions")]
    pub crowdsec_key_file: Option<PathBuf>,
    /// How often the Local API is asked for changes: 10s, 1m...
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = every)]
    pub decisions_every: std::time::Duration,
}

fn every(s: &str) -> Result<std::time::Duration, String> {
    let d = crate::blocklist::parse_duration(s)?;
    if d > std::time::Duration::from_secs(3600) {
        return Err(format!("'{s}': ask at least once an hour"));
    }
    Ok(d)
}

pub fn run(paths: Paths, a: RunArgs) -> Result<()> {
    let source = match a.policy_source {
        Some(url) => service::Source::Etcd {
            url,
            opts: a.etcd,
            node: crate::fleet::node_name(a.node_name.as_deref()),
        },
        None => service::Source::File(std::path::absolute(&a.policy)?),
    };
    // The key is read now: a missing or unsafe key file stops the start, not a poll later.
    let decisions = match (a.decisions, a.crowdsec_key_file) {
        (Some(lapi), Some(f)) => Some(service::Decisions {
            lapi,
            key: crate::feeds::crowdsec::read_key(&f)?,
            every: a.decisions_every,
        }),
        _ => None,
    };
    service::run(
        paths,
        service::Config {
            ifaces: interfaces(&a.ifaces, a.mode)?,
            source,
            backend: a.backend,
            metrics: a.metrics,
            detach_on_exit: a.detach_on_exit,
            force: a.force,
            log_drops: !a.no_drop_log,
            decisions,
        },
    )
}
