//! isolation-user: turns a policy file into what a backend enforces (the eBPF datapath's
//! map entries), loads and attaches it, and edits it live.
//!
//! Layers, top to bottom: `commands` (one module per verb: parse, call, render) →
//! `engine` (the one transaction of every change) → `store` (the desired policy, whole) and
//! `backend` (eBPF; iptables + ipset where BPF is refused) ← `semantics` (the decision of PRODUCT.md, pure: the oracle) and
//! `policy` (the file format, pure; knows no backend).

pub mod backend;
pub mod blocklist;
pub mod commands;
pub mod engine;
pub mod feeds;
pub mod fleet;
pub mod iface;
pub mod import;
pub mod lockout;
mod mutants;
pub mod policy;
pub mod render;
pub mod rollback;
pub mod semantics;
pub mod service;
pub mod state;
pub mod store;

use std::path::PathBuf;

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::state::Paths;

/// This build: the package version, the git commit it was built from, and the hash of the
/// BPF object inside it (what `status` also names for the datapath in place).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("ISOLATION_COMMIT");
pub const BPF_HASH: &str = env!("ISOLATION_BPF_HASH");
/// `isolation-user --version`: `isolation-user 0.1.0 (commit 0123456789ab, bpf 0123456789abcdef)`.
const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ISOLATION_COMMIT"),
    ", bpf ",
    env!("ISOLATION_BPF_HASH"),
    ")"
);

/// A verb's `after_help`: "Examples:" and one indented command line each.
macro_rules! examples {
    ($($line:literal),+ $(,)?) => {
        concat!("Examples:", $("\n  ", $line),+)
    };
}

#[derive(Parser, Debug)]
#[command(name = "isolation-user", version = VERSION_LINE, about = "Host whitelist and virtual-network isolation in XDP/TC", long_about = None)]
pub struct Cli {
    /// Where BPF objects are pinned (a bpffs is mounted there if needed).
    #[arg(long, global = true, env = "ISOLATION_PIN_DIR", default_value = state::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Where the live policy and bookkeeping are kept.
    #[arg(long, global = true, env = "ISOLATION_STATE_DIR", default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Load and attach the datapath (XDP ingress + TC egress) and apply a policy. Idempotent.
    #[command(
        after_help = examples!(
            "isolation-user load --iface eth0 --policy /etc/isolation/policy.toml",
            "isolation-user load --iface eth0 --iface eth1 --backend iptables",
            "isolation-user load --iface eth0 --replace-programs   # swap in this build's programs, keep the maps"
        )
    )]
    Load(commands::load::LoadArgs),
    /// Detach and remove everything `load` created.
    #[command(
        after_help = examples!(
            "isolation-user unload --iface eth1   # detach from one interface",
            "isolation-user unload                # remove everything"
        )
    )]
    Unload(commands::load::UnloadArgs),
    /// Backend, interfaces, attach mode, program ids, policy generation, map fill levels.
    #[command(
        after_help = examples!(
            "isolation-user status",
            "isolation-user status --json | jq .generation"
        )
    )]
    Status(commands::status::StatusArgs),
    /// Live edits of the host whitelist.
    #[command(subcommand)]
    #[command(
        after_help = examples!(
            "isolation-user whitelist add 203.0.113.7 2001:db8:42::/48",
            "isolation-user whitelist add --file allowed.txt   # one entry a line, - = stdin",
            "isolation-user whitelist del 203.0.113.7",
            "isolation-user whitelist list --json",
            "isolation-user whitelist flush"
        )
    )]
    Whitelist(commands::whitelist::WhitelistCmd),
    /// Live edits of the blocklist: sources dropped before anything else, for good or
    /// until a timeout (what fail2ban and CrowdSec feed).
    #[command(subcommand)]
    #[command(
        after_help = examples!(
            "isolation-user block add 198.51.100.7 --timeout 4h",
            "isolation-user block add 203.0.113.0/24   # permanent: the policy's [blocklist] entries",
            "isolation-user block add --file bad.txt --timeout 7d   # one entry a line, - = stdin",
            "isolation-user block del 198.51.100.7",
            "isolation-user block list --json",
            "isolation-user block flush"
        )
    )]
    Block(commands::block::BlockCmd),
    /// Packets and bytes per verdict reason, like `iptables -L -v -n`.
    #[command(
        after_help = examples!(
            "isolation-user stats",
            "isolation-user stats --watch",
            "isolation-user stats --json"
        )
    )]
    Stats(commands::stats::StatsArgs),
    /// Stream logged drops as they happen, like iptables LOG lines.
    #[command(
        after_help = examples!(
            "isolation-user trace",
            "isolation-user trace --json --count 10 --timeout 30"
        )
    )]
    Trace(commands::trace::TraceArgs),
    /// Live edits of the virtual networks.
    #[command(subcommand)]
    #[command(
        after_help = examples!(
            "isolation-user network add ops 198.51.100.0/28",
            "isolation-user network del ops 198.51.100.0/28   # one subnet; without it the whole network",
            "isolation-user network list --json"
        )
    )]
    Network(commands::edit::NetworkCmd),
    /// Let FROM open connections to TO (optionally only on some ports).
    #[command(
        after_help = examples!(
            "isolation-user allow hr it --port tcp:80 --port tcp:443",
            "isolation-user allow ops 198.51.100.0/25          # anything"
        )
    )]
    Allow(commands::edit::RuleArgs),
    /// Remove allow rules from FROM to TO (or only some of their ports).
    #[command(
        after_help = examples!(
            "isolation-user disallow hr it --port tcp:443",
            "isolation-user disallow ops 198.51.100.0/25"
        )
    )]
    Disallow(commands::edit::RuleArgs),
    /// Live edits of the pairs never filtered.
    #[command(subcommand)]
    #[command(
        after_help = examples!(
            "isolation-user except add 198.51.100.10 198.51.100.200",
            "isolation-user except del 198.51.100.10 198.51.100.200"
        )
    )]
    Except(commands::edit::ExceptCmd),
    /// The verdict the live datapath gives a new connection, and what decides it.
    #[command(
        after_help = examples!(
            "isolation-user check 198.51.100.130 198.51.100.20 --proto tcp --dport 80",
            "isolation-user check 203.0.113.9 192.0.2.1 --json"
        )
    )]
    Check(commands::check::CheckArgs),
    /// Replace the whole live policy with a policy file, in one transaction.
    #[command(
        after_help = examples!(
            "isolation-user apply --dry-run /etc/isolation/policy.toml",
            "isolation-user apply /etc/isolation/policy.toml",
            "isolation-user apply new.toml --confirm-within 60 && isolation-user confirm"
        )
    )]
    Apply(commands::apply::ApplyArgs),
    /// Keep the policy of an `apply --confirm-within`: cancel its rollback.
    #[command(
        after_help = examples!(
            "isolation-user apply new.toml --confirm-within 60",
            "isolation-user confirm   # from a new SSH session: it still gets in"
        )
    )]
    Confirm(commands::apply::ConfirmArgs),
    /// Print the live policy, whitelist included, as a policy file.
    #[command(after_help = examples!(
            "isolation-user save > /etc/isolation/policy.toml"
        ))]
    Save,
    /// Print the ipset and iptables rules the iptables backend would load for a policy.
    #[command(
        after_help = examples!(
            "isolation-user export --format iptables /etc/isolation/policy.toml --iface eth0"
        )
    )]
    Export(commands::export::ExportArgs),
    /// Print a policy file for an existing ipset/iptables setup (the classic recipe).
    #[command(
        after_help = examples!(
            "ipset save > sets.txt; iptables-save > rules.txt",
            "isolation-user import --ipset-save sets.txt --iptables-save rules.txt > policy.toml"
        )
    )]
    Import(commands::import::ImportArgs),
    /// Run as a service: load, re-apply the policy file when it changes (or on SIGHUP), log
    /// drops, serve Prometheus metrics.
    #[command(
        after_help = examples!(
            "isolation-user run --iface eth0 --policy /etc/isolation/policy.toml --metrics 127.0.0.1:9108",
            "kill -HUP $(pidof isolation-user)   # re-apply the file",
            "curl -s 127.0.0.1:9108/metrics"
        )
    )]
    Run(commands::run::RunArgs),
    /// The policy of every node, kept in etcd (`run --policy-source etcd://…` follows it).
    #[command(subcommand)]
    #[command(
        after_help = examples!(
            "isolation-user fleet push policy.toml --etcd etcd://192.0.2.1:2379/isolation",
            "isolation-user fleet status --etcd etcd://192.0.2.1:2379/isolation"
        )
    )]
    Fleet(commands::fleet::FleetCmd),
    /// The detached helper of `apply --confirm-within` (started by it, not by hand).
    #[command(hide = true)]
    RollbackTimer,
    /// Write the manual pages (section 8), generated from this command line, into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Print the shell completion script for bash, zsh or fish.
    #[command(
        after_help = examples!(
            "isolation-user completions bash > /etc/bash_completion.d/isolation-user",
            "isolation-user completions zsh > /usr/local/share/zsh/site-functions/_isolation-user",
            "isolation-user completions fish > ~/.config/fish/completions/isolation-user.fish"
        )
    )]
    Completions {
        #[arg(value_enum)]
        shell: commands::docs::Shell,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths {
        pin_dir: cli.pin_dir,
        state_dir: cli.state_dir,
    };
    match cli.command {
        Cmd::Load(a) => commands::load::load(&paths, a),
        Cmd::Unload(a) => commands::load::unload(&paths, a),
        Cmd::Status(a) => commands::status::run(&paths, a),
        Cmd::Whitelist(c) => commands::whitelist::run(&paths, c),
        Cmd::Block(c) => commands::block::run(&paths, c),
        Cmd::Stats(a) => commands::stats::run(&paths, a),
        Cmd::Trace(a) => commands::trace::run(&paths, a),
        Cmd::Network(c) => commands::edit::network(&paths, c),
        Cmd::Allow(a) => commands::edit::allow(&paths, a),
        Cmd::Disallow(a) => commands::edit::disallow(&paths, a),
        Cmd::Except(c) => commands::edit::except(&paths, c),
        Cmd::Check(a) => commands::check::run(&paths, a),
        Cmd::Export(a) => commands::export::run(&paths, a),
        Cmd::Apply(a) => commands::apply::apply(&paths, a),
        Cmd::Save => commands::apply::save(&paths),
        Cmd::Confirm(a) => commands::apply::confirm(&paths, a),
        Cmd::RollbackTimer => commands::apply::rollback_timer(&paths),
        Cmd::Man { dir } => commands::docs::man(Cli::command(), &dir),
        Cmd::Completions { shell } => {
            commands::docs::completions(Cli::command(), shell, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Import(a) => commands::import::run(a),
        Cmd::Run(a) => commands::run::run(paths, a),
        Cmd::Fleet(c) => commands::fleet::run(c),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::{Cli, commands};

    /// Every verb a user sees has examples (they go into `--help` and the man pages), and
    /// the man pages are written, one per verb.
    #[test]
    fn every_verb_has_examples_and_a_man_page() {
        let cli = super::Cli::command();
        let mut visible = 0;
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains(&format!("isolation-user {}", sub.get_name())),
                "`{}` has no example",
                sub.get_name()
            );
            visible += 1;
        }
        let dir = std::env::temp_dir().join(format!("isolation-man-{}", std::process::id()));
        commands::docs::man(Cli::command(), &dir).unwrap();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let page = dir.join(format!("isolation-user-{}.8", sub.get_name()));
            assert!(page.exists(), "{}", page.display());
        }
        assert!(dir.join("isolation-user.8").exists());
        assert!(dir.join("isolation-user-completions.8").exists());
        assert!(visible >= 17, "{visible} verbs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--version` names the version, the commit and the BPF object's hash.
    #[test]
    fn the_version_names_the_build() {
        let v = super::Cli::command().render_version();
        assert!(
            v.starts_with(&format!("isolation-user {}", super::VERSION)),
            "{v}"
        );
        assert!(v.contains(&format!("commit {}", super::COMMIT)), "{v}");
        assert!(v.contains(&format!("bpf {}", super::BPF_HASH)), "{v}");
        assert_eq!(super::BPF_HASH.len(), 16, "{v}");
    }

    /// Each shell's completion script completes the verbs and their options.
    #[test]
    fn completions_for_every_shell() {
        for shell in [
            commands::docs::Shell::Bash,
            commands::docs::Shell::Zsh,
            commands::docs::Shell::Fish,
        ] {
            let mut out = Vec::new();
            commands::docs::completions(Cli::command(), shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in [
                "whitelist",
                "confirm",
                "--policy-source",
                "--confirm-within",
            ] {
                assert!(text.contains(word), "{shell:?} lacks {word}");
            }
        }
    }
}
