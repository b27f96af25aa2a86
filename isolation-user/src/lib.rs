//! isolation-user: turns a policy file into what a backend enforces (the eBPF datapath's
//! map entries), loads and attaches it, and edits it live.
//!
//! Layers, top to bottom: `commands` (one module per verb: parse, call, render) →
//! `engine` (the one transaction of every change) → `store` (the desired policy, whole) and
//! `backend` (eBPF; iptables + ipset where BPF is refused) ← `semantics` (the decision of PRODUCT.md, pure: the oracle) and
//! `policy` (the file format, pure; knows no backend).

pub mod backend;
pub mod commands;
pub mod engine;
pub mod import;
pub mod lockout;
pub mod policy;
pub mod rollback;
pub mod semantics;
pub mod service;
pub mod state;
pub mod store;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::state::Paths;

#[derive(Parser, Debug)]
#[command(name = "isolation-user", version, about = "Host whitelist and virtual-network isolation in XDP/TC", long_about = None)]
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
    Load(commands::load::LoadArgs),
    /// Detach and remove everything `load` created.
    Unload(commands::load::UnloadArgs),
    /// Backend, interfaces, attach mode, program ids, policy generation, map fill levels.
    Status(commands::status::StatusArgs),
    /// Live edits of the host whitelist.
    #[command(subcommand)]
    Whitelist(commands::whitelist::WhitelistCmd),
    /// Packets and bytes per verdict reason, like `iptables -L -v -n`.
    Stats(commands::stats::StatsArgs),
    /// Stream logged drops as they happen, like iptables LOG lines.
    Trace(commands::trace::TraceArgs),
    /// Live edits of the virtual networks.
    #[command(subcommand)]
    Network(commands::edit::NetworkCmd),
    /// Let FROM open connections to TO (optionally only on some ports).
    Allow(commands::edit::RuleArgs),
    /// Remove allow rules from FROM to TO (or only some of their ports).
    Disallow(commands::edit::RuleArgs),
    /// Live edits of the pairs never filtered.
    #[command(subcommand)]
    Except(commands::edit::ExceptCmd),
    /// The verdict the live datapath gives a new connection, and what decides it.
    Check(commands::check::CheckArgs),
    /// Replace the whole live policy with a policy file, in one transaction.
    Apply(commands::apply::ApplyArgs),
    /// Keep the policy of an `apply --confirm-within`: cancel its rollback.
    Confirm(commands::apply::ConfirmArgs),
    /// Print the live policy, whitelist included, as a policy file.
    Save,
    /// Print the ipset and iptables rules the iptables backend would load for a policy.
    Export(commands::export::ExportArgs),
    /// Print a policy file for an existing ipset/iptables setup (the classic recipe).
    Import(commands::import::ImportArgs),
    /// Run as a service: load, re-apply the policy file when it changes (or on SIGHUP), log
    /// drops, serve Prometheus metrics.
    Run(commands::run::RunArgs),
    /// The detached helper of `apply --confirm-within` (started by it, not by hand).
    #[command(hide = true)]
    RollbackTimer,
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
        Cmd::RollbackTimer => rollback::timer(&paths),
        Cmd::Import(a) => commands::import::run(a),
        Cmd::Run(a) => commands::run::run(paths, a),
    }
}
