//! Where a policy is enforced. A backend takes whole policies and whitelist edits from the
//! engine and answers reads (counters, events, check, status); it never decides whether a
//! change is allowed (the engine does, against `limits()`), and it never prints.
//!
//! One module per backend, chosen at run time by `select` (netavark's `FirewallDriver` and
//! `get_supported_firewall_driver()` are the model).

pub mod ebpf;
pub mod iptables;
pub mod kind;
pub mod seed;

pub use kind::{Choice, Kind};

use std::{net::IpAddr, time::Duration};

use anyhow::{Result, bail};
use ipnet::IpNet;
use isolation_common::{Counter, LogEvent, Reason};
use serde::Serialize;

use crate::{
    policy::Policy,
    semantics::Decision,
    state::{IfaceState, Paths, State},
};

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
    /// Blocked addresses and blocked CIDRs (permanent and timed together), per family.
    pub blocklist_addresses: usize,
    pub blocklist_cidrs: usize,
}

impl Limits {
    /// The eBPF datapath's map sizes. The iptables backend holds the same, so that a policy
    /// one backend takes, the other takes too.
    pub fn datapath() -> Limits {
        use isolation_common::limits;
        Limits {
            networks: limits::NETWORKS,
            allow_rules: limits::ALLOW_RULES,
            except_rules: limits::EXCEPT_RULES,
            vxlan_ports: limits::VXLAN_PORTS,
            prefixes: limits::NET_PREFIXES as usize,
            whitelist_addresses: limits::WL_EXACT as usize,
            whitelist_cidrs: limits::WL_LPM as usize,
            blocklist_addresses: limits::BL_EXACT as usize,
            blocklist_cidrs: limits::BL_LPM as usize,
        }
    }
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
    /// Which build of the datapath is installed (kept in the state file).
    pub build: String,
    /// The programs in place were replaced by this build's (an upgrade); how many links
    /// were switched.
    pub replaced: Option<usize>,
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
    /// What this backend cannot count (those fields read 0 and mean nothing).
    pub uncounted: Uncounted,
}

/// What a backend cannot count: left out of `/metrics` and named in `stats --json`
/// (`"uncounted"`), never shown as a 0 an operator would alert on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Uncounted {
    /// Logged drops lost before a reader got them (`log.lost`).
    pub log_lost: bool,
    /// New (unconfirmed) connections apart from established ones (`connections.new`).
    pub new_connections: bool,
    /// A filter of remote hosts in front of the connection tables
    /// (`connections.filter_set`, `connections.filter_slots`).
    pub connection_filter: bool,
}

impl Uncounted {
    /// The names `stats --json` gives them.
    pub fn names(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.log_lost {
            out.push("log.lost");
        }
        if self.new_connections {
            out.push("connections.new");
        }
        if self.connection_filter {
            out.push("connections.filter_set");
            out.push("connections.filter_slots");
        }
        out
    }
}

/// How full the connection tables are: new (unconfirmed) and established connections, each
/// against its capacity. A flood of new flows fills `new` only.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Connections {
    pub new: u64,
    pub new_max: u64,
    pub established: u64,
    pub established_max: u64,
    /// Slots set in the filter of remote hosts in front of the tables, of how many: a
    /// packet from a source whose slot is clear skips the tables (rebuilt by the service's
    /// upkeep once an eighth are set).
    pub filter_set: u64,
    pub filter_slots: u64,
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
    /// How it is attached there, in words (`status`).
    #[serde(skip)]
    pub how: String,
    pub ifindex: u32,
    pub requested_mode: String,
    pub xdp_mode: String,
    pub attached: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub backend: Kind,
    /// How it enforces, in a few words (which programs; which iptables).
    pub detail: String,
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

/// What a backend is, in the words the verbs print: data they render, so that no verb asks
/// which backend runs (netavark's firewall drivers describe themselves the same way).
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// How it enforces, for `load`'s line: "XDP ingress, TC ingress and egress".
    pub enforces: &'static str,
    /// Where the connections it keeps live, when not in tables of its own: "the kernel's
    /// conntrack".
    pub conntrack: Option<&'static str>,
    /// `stats`' counter sections: a title, and whether it holds the egress reasons.
    pub sections: &'static [(&'static str, bool)],
    /// How its drops are logged: "ring buffer", "NFLOG".
    pub log: &'static str,
    /// What `status` calls the tables the policy is held in: "maps", "sets".
    pub tables: &'static str,
    /// Its programs are pinned under the pin directory (`status` names them and their ids).
    pub pinned: bool,
}

/// One way of enforcing a policy.
pub trait Backend {
    fn kind(&self) -> Kind;
    fn profile(&self) -> Profile;
    fn limits(&self) -> Limits;
    /// Is a datapath of this backend in place (for these directories)?
    fn is_installed(&self) -> bool;
    /// Refuses interfaces it could not attach to without harm (someone else's program),
    /// before anything changes.
    fn preflight(&self, state: &State, ifaces: &[IfaceState]) -> Result<Vec<IfaceState>>;
    /// Which build of the datapath this binary installs (`State::object_hash` records the
    /// one in place).
    fn build(&self) -> String;
    /// Loads the datapath if needed and attaches it to `ifaces` (those not attached yet).
    /// With `replace`, a datapath already in place gets this build's programs, its maps
    /// (policy, connections, counters) kept. All or nothing: on failure what this call did
    /// is undone. A datapath with connection tables of its own sizes them from
    /// `connections` when it creates or replaces them.
    fn install(
        &mut self,
        ifaces: &[IfaceState],
        replace: bool,
        connections: crate::policy::Connections,
    ) -> Result<Installed>;
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
    /// Makes the blocklist hold `view` (prefix → deadline) in place of `old`, from which it
    /// differs by `changed` (prefixes added, removed, or given another deadline). The
    /// blocklist's switches (`[blocklist] enabled`, `log`) come with `apply`. All or nothing.
    fn edit_blocklist(
        &mut self,
        old: &crate::blocklist::View,
        view: &crate::blocklist::View,
        changed: &[IpNet],
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
    /// Upkeep of what the datapath derives from traffic (run by the service now and then):
    /// what it did, in words, when it did something.
    fn upkeep(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
    /// Detaches from one interface.
    fn detach(&mut self, iface: &str) -> Vec<String>;
    /// Removes everything it created, going on past errors; returns them all.
    fn teardown(&mut self) -> Vec<String>;
}

/// The backend for `--backend`, chosen before anything is loaded, and why when `auto`
/// chose. An instance keeps the backend it was loaded with: asking for the other one is
/// refused until `unload`.
pub fn select(
    paths: &Paths,
    choice: Choice,
    state: Option<&State>,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    let loaded = state
        .map(|s| recorded(paths, Some(s)))
        .filter(|b| b.is_installed());
    if let Some(b) = loaded {
        let wanted = match choice {
            Choice::Auto => None,
            Choice::Ebpf => Some(Kind::Ebpf),
            Choice::Iptables => Some(Kind::Iptables),
        };
        if let Some(k) = wanted
            && k != b.kind()
        {
            bail!(
                "the {} backend is loaded here; run `isolation-user unload` before loading the {} backend",
                b.kind().name(),
                k.name()
            );
        }
        let why = state.and_then(|s| s.why.clone());
        return Ok((b, why));
    }
    match choice {
        Choice::Ebpf => Ok((Box::new(ebpf::Ebpf::new(paths.clone())), None)),
        Choice::Iptables => Ok((Box::new(iptables::Iptables::new(paths.clone())), None)),
        Choice::Auto => match ebpf::probe() {
            Ok(()) => Ok((Box::new(ebpf::Ebpf::new(paths.clone())), None)),
            Err(e) => Ok((
                Box::new(iptables::Iptables::new(paths.clone())),
                Some(format!("auto: the kernel refuses BPF here ({e})")),
            )),
        },
    }
}

/// Where `--backend auto` turns when the eBPF datapath could not be installed (`err`):
/// iptables, with why, but only when the kernel refused the programs themselves (load,
/// verifier, attach). Any other error (a file or directory in the way, a lock) is no reason
/// to enforce with another backend than the one the host supports, and is returned as is.
/// Only a fresh install asked for with `auto` falls back: a datapath in place stays the
/// backend it is.
pub fn auto_fallback(
    paths: &Paths,
    choice: Choice,
    tried: &dyn Backend,
    err: &anyhow::Error,
) -> Option<(Box<dyn Backend>, String)> {
    let fresh_auto = choice == Choice::Auto && tried.kind() == Kind::Ebpf && !tried.is_installed();
    (fresh_auto && ebpf::kernel_refused(err)).then(|| {
        (
            Box::new(iptables::Iptables::new(paths.clone())) as Box<dyn Backend>,
            format!("auto: the kernel would not load or attach the eBPF programs ({err:#})"),
        )
    })
}

/// The text forms a policy can be exported in (`export --format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `ipset restore` input, then `iptables-restore --noflush` and `ip6tables-restore
    /// --noflush` input, each after a `#` line naming its command.
    Iptables,
}

/// A policy as text in `format`, with the jumps from the interfaces `ifaces` when the
/// format has any.
pub fn export(paths: &Paths, format: Format, policy: &Policy, ifaces: &[String]) -> String {
    match format {
        Format::Iptables => iptables::export(paths, policy, ifaces),
    }
}

/// The backend the state file names (eBPF when there is none), installed or not.
pub fn recorded(paths: &Paths, state: Option<&State>) -> Box<dyn Backend> {
    match state.map(|s| s.backend).unwrap_or(Kind::Ebpf) {
        Kind::Ebpf => Box::new(ebpf::Ebpf::new(paths.clone())),
        Kind::Iptables => Box::new(iptables::Iptables::new(paths.clone())),
    }
}

/// The backend that is installed for these directories (the state file says which).
pub fn installed(paths: &Paths, state: Option<&State>) -> Result<Box<dyn Backend>> {
    let b = recorded(paths, state);
    if !b.is_installed() {
        match b.kind() {
            Kind::Ebpf => bail!(
                "no isolation datapath pinned at {} (run `isolation-user load` first)",
                paths.pin_dir.display()
            ),
            Kind::Iptables => bail!(
                "the iptables backend's chains are not in this network namespace (run `isolation-user load` first)"
            ),
        }
    }
    Ok(b)
}

/// What each allow rule and except rule is called in `stats` and `check`.
pub fn rule_names(p: &Policy) -> (Vec<String>, Vec<String>) {
    let allow = p
        .isolation
        .allow
        .iter()
        .map(|r| {
            let ports = r
                .ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",");
            format!(
                "allow {} -> {}{}",
                r.from,
                r.to,
                if ports.is_empty() {
                    String::new()
                } else {
                    format!(" {ports}")
                }
            )
        })
        .collect();
    let except = p
        .isolation
        .except
        .iter()
        .map(|r| format!("except {} <-> {}", r.from, r.to))
        .collect();
    (allow, except)
}

/// `check`'s words for an isolation decision, the same on every backend.
pub fn describe_isolation(
    answer: &mut Answer,
    decision: Decision,
    live: &Policy,
    enabled: bool,
    reject: bool,
) {
    let (allow_names, except_names) = rule_names(live);
    if decision != Decision::NotSubject {
        answer.stage = "isolation";
    }
    let name = |v: &Vec<String>, i: u32| {
        v.get(i as usize)
            .cloned()
            .unwrap_or_else(|| format!("rule #{i}"))
    };
    match decision {
        Decision::NotSubject if !enabled => {}
        Decision::NotSubject => {
            answer.reason = format!(
                "{}; not subject to isolation (source or destination in no network)",
                answer.reason
            )
        }
        Decision::Except(j) => answer.reason = format!("{} (except #{j})", name(&except_names, j)),
        Decision::Hairpin => {
            answer.reason = "source and destination share a network (hairpin)".into()
        }
        Decision::Established => answer.reason = "established".into(),
        Decision::Allow(k) => answer.reason = format!("{} (allow #{k})", name(&allow_names, k)),
        Decision::DefaultAccept => answer.reason = "no rule matches; default accept".into(),
        Decision::Deny => {
            answer.verdict = if reject {
                Verdict::Reject
            } else {
                Verdict::Drop
            };
            answer.reason = "no rule matches; default deny".into();
        }
    }
}
