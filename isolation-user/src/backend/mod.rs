//! Where a policy is enforced. A backend takes whole policies and whitelist edits from the
//! engine and answers reads (counters, events, check, status); it never decides whether a
//! change is allowed (the engine does, against `limits()`), and it never prints.
//!
//! One module per backend, chosen at run time by `select` (netavark's `FirewallDriver` and
//! `get_supported_firewall_driver()` are the model).

pub mod ebpf;

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, bail};
use ipnet::IpNet;
use isolation_common::{Counter, LogEvent, Reason};
use serde::{Deserialize, Serialize};

use crate::{
    policy::Policy,
    state::{IfaceState, Paths, State},
};

/// What `--backend` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// eBPF where the kernel takes the programs (the only backend of this build).
    Auto,
    Ebpf,
    Iptables,
}

/// The backend that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ebpf,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ebpf => "ebpf",
        }
    }
}

/// What a backend can hold. The engine refuses a policy over any of these before anything
/// live changes. Per-family figures apply to IPv4 and IPv6 separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub networks: usize,
    pub allow_rules: usize,
    pub except_rules: usize,
    pub vxlan_ports: usize,
    /// Distinct prefixes named by networks and rules, per family.
    pub prefixes: usize,
    /// Whitelisted single addresses, per family.
    pub whitelist_addresses: usize,
    /// Whitelisted CIDRs (shorter than a host route), per family.
    pub whitelist_cidrs: usize,
}

/// What `install` did, so that a failure later in the same transaction can undo it.
#[derive(Clone, Debug, Default)]
pub struct Installed {
    /// The datapath was not loaded before this install.
    pub fresh: bool,
    /// Interfaces attached by this install (not those already attached).
    pub attached: Vec<IfaceState>,
    /// Connections already open, remembered so they keep working.
    pub seeded: usize,
    /// Which build of the datapath is installed (kept in the state file, to refuse mixing).
    pub build: String,
}

/// The whitelist entries an edit really changed (an entry added twice is added once).
#[derive(Clone, Debug, Default)]
pub struct WhitelistDelta {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
}

/// Packets and bytes per rule of the live policy.
#[derive(Clone, Debug, Serialize)]
pub struct RuleCounter {
    pub kind: &'static str,
    pub index: usize,
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Log events written, suppressed by the rate limit, lost because the ring was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogCounts {
    pub written: u64,
    pub suppressed: u64,
    pub lost: u64,
}

#[derive(Clone, Debug)]
pub struct Counters {
    pub reasons: Vec<(Reason, Counter)>,
    pub rules: Vec<RuleCounter>,
    pub log: LogCounts,
    pub connections: Connections,
}

/// How full the connection tables are: new (unconfirmed) and established connections, each
/// against its capacity. A flood of new flows fills `new` only.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Connections {
    pub new: u64,
    pub new_max: u64,
    pub established: u64,
    pub established_max: u64,
}

/// A new connection to judge (`check`).
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// None: a packet of any protocol.
    pub proto: Option<u8>,
    pub dport: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Drop,
    Reject,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Reject => "reject",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    pub verdict: Verdict,
    /// "whitelist" or "isolation": the stage that decided.
    pub stage: &'static str,
    pub reason: String,
    pub generation: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct IfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub requested_mode: String,
    pub xdp_mode: String,
    pub attached: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub backend: Kind,
    pub generation: u32,
    pub whitelist_enabled: bool,
    /// Program name → kernel id.
    pub programs: Vec<(&'static str, u32)>,
    pub interfaces: Vec<IfaceStatus>,
    pub maps: Vec<MapFill>,
}

/// What a trace source yields.
pub enum Event {
    /// A logged drop or reject.
    Log(LogEvent),
    /// A line of the datapath's debug log (why a frame was malformed).
    Debug(String),
}

/// Logged drops as they happen.
pub trait Events {
    /// The next event, waiting at most `wait`; None when none came.
    fn next(&mut self, wait: Duration) -> Result<Option<Event>>;
    /// Written / suppressed / lost so far.
    fn counts(&self) -> Result<LogCounts>;
}

/// One way of enforcing a policy.
pub trait Backend {
    fn kind(&self) -> Kind;
    fn limits(&self) -> Limits;
    /// Is a datapath of this backend in place (for these directories)?
    fn is_installed(&self) -> bool;
    /// Refuses interfaces it could not attach to without harm (someone else's program),
    /// before anything changes.
    fn preflight(&self, state: &State, ifaces: &[IfaceState]) -> Result<Vec<IfaceState>>;
    /// Loads the datapath if needed and attaches it to `ifaces` (those not attached yet).
    /// All or nothing: on failure what this call did is undone.
    fn install(&mut self, ifaces: &[IfaceState]) -> Result<Installed>;
    /// Undoes an `install` (a later step of its transaction failed).
    fn uninstall(&mut self, done: &Installed) -> Vec<String>;
    /// Makes the datapath enforce `policy`, whose whitelist entries are `whitelist`, or are
    /// left as they are when None. All or nothing: on failure the previous policy stays.
    fn apply(
        &mut self,
        policy: &Policy,
        whitelist: Option<&[IpNet]>,
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()>;
    /// Adds and removes whitelist entries. All or nothing.
    fn edit_whitelist(
        &mut self,
        add: &[IpNet],
        del: &[IpNet],
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<WhitelistDelta>;
    /// Counters, with the rules named after `live` (the policy in force).
    fn counters(&self, live: &Policy) -> Result<Counters>;
    fn events(&self, debug: bool) -> Result<Box<dyn Events>>;
    /// The verdict the live datapath gives a new connection. `live` names the rules.
    fn check(&self, live: &Policy, q: &Query) -> Result<Answer>;
    fn status(&self, state: &State) -> Result<Status>;
    /// Detaches from one interface.
    fn detach(&mut self, iface: &str) -> Vec<String>;
    /// Removes everything it created, going on past errors; returns them all.
    fn teardown(&mut self) -> Vec<String>;
}

/// The backend for `--backend`: chosen before anything is loaded.
pub fn select(paths: &Paths, choice: Choice) -> Result<Box<dyn Backend>> {
    match choice {
        Choice::Auto | Choice::Ebpf => Ok(Box::new(ebpf::Ebpf::new(paths.clone()))),
        Choice::Iptables => bail!(
            "the iptables backend is not part of this build yet; use --backend ebpf (or auto)"
        ),
    }
}

/// The backend the state file names (eBPF when there is none), installed or not.
pub fn recorded(paths: &Paths, state: Option<&State>) -> Box<dyn Backend> {
    match state.map(|s| s.backend).unwrap_or(Kind::Ebpf) {
        Kind::Ebpf => Box::new(ebpf::Ebpf::new(paths.clone())),
    }
}

/// The backend that is installed for these directories (the state file says which).
pub fn installed(paths: &Paths, state: Option<&State>) -> Result<Box<dyn Backend>> {
    let b = recorded(paths, state);
    if !b.is_installed() {
        bail!(
            "no isolation datapath pinned at {} (run `isolation-user load` first)",
            paths.pin_dir.display()
        );
    }
    Ok(b)
}
