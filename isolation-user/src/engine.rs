//! The one transaction every change goes through, whatever asked for it (a verb today; the
//! service, `apply --confirm-within` and the fleet watcher later):
//!
//! lock → the desired policy from the store → the change → validation against PRODUCT.md's
//! rules and the backend's limits (every limit, before anything live changes) → the
//! backend made to enforce it (all or nothing) → the store written → the outcome, as data.
//!
//! "Nothing is ever half applied" is kept here once: a change refused at any step leaves
//! the backend and the store as they were. Nothing here prints.

use std::{collections::HashSet, fs};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    backend::{self, Backend, Choice, Limits},
    lockout,
    policy::{self, Endpoint, Lines, Policy, WHITELIST_KINDS, WhitelistSizes},
    rollback,
    state::{IfaceState, Paths, State},
    store::Store,
};

/// A live edit of the rules: changes the policy, says what it did in words.
pub type RulesEdit = Box<dyn FnOnce(&mut Policy) -> Result<String>>;

/// A change to the desired policy.
pub enum Change {
    /// Install on interfaces (those not attached yet) and enforce a whole policy.
    Load {
        ifaces: Vec<IfaceState>,
        backend: Choice,
        policy: Policy,
        lines: Option<Lines>,
        /// Swap this build's programs in even if the pinned ones came from it (a datapath
        /// from another build gets them in any case: an upgrade).
        replace_programs: bool,
    },
    /// Replace the whole policy, whitelist included.
    Replace {
        policy: Policy,
        lines: Option<Lines>,
        /// `apply --confirm-within`: the policy this replaces comes back by itself unless
        /// `confirm` runs in time (`rollback`).
        confirm: Option<Confirm>,
    },
    /// The rollback of an unconfirmed apply, run by its helper (this process): restores
    /// the policy the apply replaced, if the apply is still pending and due.
    RollBack,
    /// Edit the rules (networks, allow, except); returns what it did, in words.
    Rules(RulesEdit),
    WhitelistAdd(Vec<IpNet>),
    WhitelistDel(Vec<IpNet>),
    WhitelistFlush,
}

/// An apply that undoes itself unless confirmed: the file's name (for messages) and the
/// seconds it has.
pub struct Confirm {
    pub file: String,
    pub within: f64,
}

/// What a transaction did.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub generation: u32,
    pub backend: &'static str,
    #[serde(flatten)]
    pub what: Done,
    /// An armed rollback (`Change::Replace { confirm }`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub armed: Option<Armed>,
}

/// The rollback an apply armed.
#[derive(Clone, Debug, Serialize)]
pub struct Armed {
    /// Unix time after which the previous policy comes back.
    pub confirm_deadline: f64,
    /// The generation whose policy comes back.
    pub rollback_generation: u32,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Done {
    Loaded {
        /// Every interface the datapath is attached to now.
        interfaces: Vec<String>,
        /// Connections already open that were remembered.
        seeded: usize,
        /// The programs in place were replaced by this build's, on this many links.
        #[serde(skip_serializing_if = "Option::is_none")]
        programs_replaced: Option<usize>,
    },
    Replaced,
    /// The policy asked for is the live one already: nothing was touched, the generation
    /// is the live one.
    Unchanged,
    Rules {
        message: String,
    },
    Whitelist {
        asked: usize,
        added: usize,
        removed: usize,
        flushed: bool,
    },
}

pub struct Options<'a> {
    /// Apply a whitelist even if it would not admit this SSH session's client.
    pub force: bool,
    /// Entries handled so far, for a progress bar.
    pub progress: &'a mut dyn FnMut(u64),
}

/// Runs one change as one transaction.
pub fn commit(paths: &Paths, change: Change, opts: Options<'_>) -> Result<Outcome> {
    let _lock = paths.lock()?;
    let store = Store::new(paths);
    let state = State::load(paths)?;
    let meta = store.meta()?;
    let generation = meta.generation.wrapping_add(1).max(1);
    match change {
        Change::Load {
            ifaces,
            backend,
            policy,
            lines,
            replace_programs,
        } => {
            let (mut b, mut why) = backend::select(paths, backend, state.as_ref())?;
            let mut st = match state {
                Some(s) if b.is_installed() => s,
                _ => State::new(b.kind()),
            };
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            let mut new = b.preflight(&st, &ifaces)?;
            // Another build's datapath in place: this one's programs take over (an upgrade).
            let replace = b.is_installed()
                && (replace_programs
                    || (!st.object_hash.is_empty() && st.object_hash != b.build()));
            let done = match b.install(&new, replace) {
                Ok(d) => d,
                // `auto`: programs the kernel would not load or attach → the fallback
                // backend; any other error is the operator's to see.
                Err(e) => {
                    let fallback = (backend == Choice::Auto
                        && b.kind() == backend::Kind::Ebpf
                        && !b.is_installed())
                    .then(|| backend::auto_fallback(paths, &e))
                    .flatten();
                    let Some((other, reason)) = fallback else {
                        return Err(e);
                    };
                    why = Some(reason);
                    b = other;
                    st = State::new(b.kind());
                    check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
                    new = b.preflight(&st, &ifaces)?;
                    b.install(&new, false)?
                }
            };
            if let Err(e) = b.apply(
                &policy,
                Some(&policy.whitelist.allow),
                generation,
                opts.progress,
            ) {
                b.uninstall(&done);
                return Err(e);
            }
            store.put_whole(&policy, generation)?;
            st.backend = b.kind();
            st.why = why;
            if st.object_hash.is_empty() || done.fresh || done.replaced.is_some() {
                st.object_hash = done.build.clone();
            }
            for w in &done.attached {
                st.interfaces.retain(|i| i.name != w.name);
                st.interfaces.push(w.clone());
            }
            st.save(paths)?;
            Ok(Outcome {
                generation,
                backend: b.kind().name(),
                what: Done::Loaded {
                    interfaces: st.interfaces.iter().map(|i| i.name.clone()).collect(),
                    seeded: done.seeded,
                    programs_replaced: done.replaced,
                },
                armed: None,
            })
        }
        Change::Replace {
            policy,
            lines,
            confirm,
        } => {
            let mut b = backend::installed(paths, state.as_ref())?;
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            let old = store.whole()?;
            let delta = diff_and_delta(&old, &policy);
            if delta.0.is_empty() {
                return Ok(Outcome {
                    generation: meta.generation,
                    backend: b.kind().name(),
                    what: Done::Unchanged,
                    armed: None,
                });
            }
            // Armed under the lock: the policy saved is the one replaced here.
            let armed = match confirm {
                Some(c) => Some(rollback::arm(
                    paths,
                    &c.file,
                    c.within,
                    &old,
                    meta.generation,
                )?),
                None => None,
            };
            if let Err(e) = replace(&store, b.as_mut(), delta, &policy, generation, opts) {
                if armed.is_some() {
                    rollback::disarm(paths);
                }
                return Err(e);
            }
            let mut out = outcome(generation, b.as_ref(), Done::Replaced);
            out.armed = armed.map(|p| Armed {
                confirm_deadline: p.deadline,
                rollback_generation: p.previous_generation,
            });
            Ok(out)
        }
        Change::RollBack => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let Some(due) = rollback::take_due(paths, std::process::id())? else {
                return Ok(outcome(meta.generation, b.as_ref(), Done::Unchanged));
            };
            // The previous policy was live a moment ago: it is restored even if it would
            // not admit an SSH client now (it did not lock anyone out before).
            let restored =
                read_policy_file(&rollback::previous_file(paths)).and_then(|(previous, lines)| {
                    check_whole(&previous, Some(&lines), b.as_ref(), true)?;
                    let delta = diff_and_delta(&store.whole()?, &previous);
                    if delta.0.is_empty() {
                        return Ok(false);
                    }
                    replace(&store, b.as_mut(), delta, &previous, generation, opts)?;
                    Ok(true)
                });
            let (now, error) = match &restored {
                Ok(true) => (generation, None),
                Ok(false) => (meta.generation, None),
                Err(e) => (meta.generation, Some(format!("{e:#}"))),
            };
            due.finish(paths, now, error)?;
            restored.map(|changed| {
                let what = if changed {
                    Done::Replaced
                } else {
                    Done::Unchanged
                };
                outcome(now, b.as_ref(), what)
            })
        }
        Change::Rules(edit) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let mut p = store.rules()?;
            let message = edit(&mut p)?;
            policy::validate(&p)
                .map_err(|e| anyhow!("refused, the live policy is unchanged: {e}"))?;
            check_limits(&p, meta.whitelist, None, &b.limits(), b.kind().name())?;
            lockout::check_isolation(&p, opts.force)?;
            b.apply(&p, None, generation, opts.progress)?;
            store.put_rules(&p, generation)?;
            Ok(outcome(generation, b.as_ref(), Done::Rules { message }))
        }
        Change::WhitelistAdd(add) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            // At most this many are new: checking the bound needs no read of the whitelist.
            let sizes = meta
                .whitelist
                .changed(WhitelistSizes::of(&add), WhitelistSizes::default());
            check_whitelist_sizes(sizes, &b.limits(), b.kind().name())?;
            let d = b.edit_whitelist(&add, &[], generation, opts.progress)?;
            store.put_whitelist_edit(false, &d.added, &d.removed, generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: add.len(),
                    added: d.added.len(),
                    removed: 0,
                    flushed: false,
                },
            ))
        }
        Change::WhitelistDel(del) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let rules = store.rules()?;
            if let Some(client) = lockout::ssh_client()
                && rules.whitelist.enabled
                && !opts.force
            {
                let gone: HashSet<IpNet> = del.iter().copied().collect();
                let still: Vec<IpNet> = store
                    .whitelist()?
                    .into_iter()
                    .filter(|n| n.contains(&client) && !gone.contains(n))
                    .collect();
                lockout::check_client(
                    &policy::Whitelist {
                        enabled: true,
                        log: false,
                        allow: still,
                    },
                    Some(client),
                    false,
                )?;
            }
            let d = b.edit_whitelist(&[], &del, generation, opts.progress)?;
            store.put_whitelist_edit(false, &d.added, &d.removed, generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: del.len(),
                    added: 0,
                    removed: d.removed.len(),
                    flushed: false,
                },
            ))
        }
        Change::WhitelistFlush => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let rules = store.rules()?;
            if rules.whitelist.enabled {
                lockout::check(
                    &policy::Whitelist {
                        enabled: true,
                        log: false,
                        allow: vec![],
                    },
                    opts.force,
                )?;
            }
            let all = store.whitelist()?;
            let d = b.edit_whitelist(&[], &all, generation, opts.progress)?;
            store.put_whitelist_edit(true, &[], &[], generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: all.len(),
                    added: 0,
                    removed: d.removed.len(),
                    flushed: true,
                },
            ))
        }
    }
}

/// What replacing the live policy with another would change: the dry run of `apply`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub networks_added: Vec<String>,
    pub networks_removed: Vec<String>,
    /// Networks whose subnets change.
    pub networks_changed: Vec<String>,
    pub allow_added: usize,
    pub allow_removed: usize,
    pub except_added: usize,
    pub except_removed: usize,
    /// default, reject, vxlan ports, whitelist on/off, log: "what: old -> new".
    pub settings: Vec<String>,
    pub whitelist_added: usize,
    pub whitelist_removed: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// What `apply` of `policy` would change, checked as `apply` checks it (file lines, the
/// backend's limits, no lockout) and changing nothing.
pub fn plan(paths: &Paths, policy: &Policy, lines: Option<&Lines>, force: bool) -> Result<Plan> {
    let _lock = paths.lock()?;
    let b = backend::installed(paths, State::load(paths)?.as_ref())?;
    check_whole(policy, lines, b.as_ref(), force)?;
    plan_against(&Store::new(paths), policy)
}

/// Whitelist changes up to this many entries, with nothing else changed, are applied as
/// an edit of those entries rather than a sync of the whole whitelist.
const DELTA_MAX: usize = 65_536;

fn plan_against(store: &Store, new: &Policy) -> Result<Plan> {
    Ok(diff(&store.whole()?, new))
}

/// What replacing `old` with `new` changes (networks, rules, settings, whitelist counts).
pub fn diff(old: &Policy, new: &Policy) -> Plan {
    diff_and_delta(old, new).0
}

/// `diff`, and the whitelist entries `new` adds and removes.
fn diff_and_delta(old: &Policy, new: &Policy) -> (Plan, Vec<IpNet>, Vec<IpNet>) {
    let mut p = Plan::default();
    for (name, subnets) in &new.networks {
        match old.networks.get(name) {
            None => p.networks_added.push(name.clone()),
            Some(o) if o != subnets => p.networks_changed.push(name.clone()),
            _ => {}
        }
    }
    p.networks_removed = old
        .networks
        .keys()
        .filter(|n| !new.networks.contains_key(*n))
        .cloned()
        .collect();
    // Rules by what they say (position does not change a verdict but is kept: a rule
    // that moved counts as removed and added, as its counters restart).
    let count = |a: &[String], b: &[String]| a.iter().filter(|x| !b.contains(x)).count();
    let (oa, oe) = backend::rule_names(old);
    let (na, ne) = backend::rule_names(new);
    p.allow_added = count(&na, &oa);
    p.allow_removed = count(&oa, &na);
    p.except_added = count(&ne, &oe);
    p.except_removed = count(&oe, &ne);
    if na != oa && p.allow_added == 0 && p.allow_removed == 0 {
        p.settings.push("allow rules: reordered".into());
    }
    if ne != oe && p.except_added == 0 && p.except_removed == 0 {
        p.settings.push("except rules: reordered".into());
    }
    let (oi, ni) = (&old.isolation, &new.isolation);
    let mut setting = |what: &str, o: String, n: String| {
        if o != n {
            p.settings.push(format!("{what}: {o} -> {n}"));
        }
    };
    setting(
        "default",
        format!("{:?}", oi.default).to_lowercase(),
        format!("{:?}", ni.default).to_lowercase(),
    );
    setting("reject", oi.reject.to_string(), ni.reject.to_string());
    setting(
        "vxlan_ports",
        format!("{:?}", oi.vxlan_ports),
        format!("{:?}", ni.vxlan_ports),
    );
    setting(
        "whitelist enabled",
        old.whitelist.enabled.to_string(),
        new.whitelist.enabled.to_string(),
    );
    setting(
        "whitelist log",
        old.whitelist.log.to_string(),
        new.whitelist.log.to_string(),
    );
    let (added, removed) = whitelist_delta(&old.whitelist.allow, &new.whitelist.allow);
    (p.whitelist_added, p.whitelist_removed) = (added.len(), removed.len());
    (p, added, removed)
}

/// The whitelist entries `new` adds to `old`, and those it removes. Sorted and merged
/// rather than hashed: at a million entries a sort walks memory in order, where a hash set
/// misses the cache at every insert.
pub fn whitelist_delta(old: &[IpNet], new: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let sorted = |v: &[IpNet]| {
        let mut s: Vec<IpNet> = v.iter().map(|n| n.trunc()).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let (o, n) = (sorted(old), sorted(new));
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < o.len() || j < n.len() {
        match (o.get(i), n.get(j)) {
            (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
            (Some(a), Some(b)) if a > b => {
                added.push(*b);
                j += 1;
            }
            (Some(a), _) => {
                removed.push(*a);
                i += 1;
            }
            (None, Some(b)) => {
                added.push(*b);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (added, removed)
}

fn outcome(generation: u32, b: &dyn Backend, what: Done) -> Outcome {
    Outcome {
        generation,
        backend: b.kind().name(),
        what,
        armed: None,
    }
}

/// Makes the backend enforce `policy` in place of the live policy, which differs from it
/// by `delta` (`diff_and_delta`: the plan, the whitelist entries added and removed), then
/// the store.
fn replace(
    store: &Store,
    b: &mut dyn Backend,
    delta: (Plan, Vec<IpNet>, Vec<IpNet>),
    policy: &Policy,
    generation: u32,
    opts: Options<'_>,
) -> Result<()> {
    let (plan, add, del) = delta;
    let only_whitelist = Plan {
        whitelist_added: 0,
        whitelist_removed: 0,
        ..plan.clone()
    }
    .is_empty();
    if only_whitelist && plan.whitelist_added + plan.whitelist_removed <= DELTA_MAX {
        // A few entries of a big whitelist changed (a fleet's one-line edit): only they
        // are written, as `whitelist add/remove` would, instead of the whole whitelist
        // being read back from the datapath and compared. The store is what the datapath
        // holds: every change goes through this transaction.
        b.edit_whitelist(&add, &del, generation, opts.progress)?;
    } else {
        b.apply(
            policy,
            Some(&policy.whitelist.allow),
            generation,
            opts.progress,
        )?;
    }
    store.put_whole(policy, generation)
}

/// A whole policy: PRODUCT.md's rules, the backend's limits, no lockout.
fn check_whole(p: &Policy, lines: Option<&Lines>, b: &dyn Backend, force: bool) -> Result<()> {
    policy::validate(p).map_err(anyhow::Error::msg)?;
    check_limits(
        p,
        WhitelistSizes::of(&p.whitelist.allow),
        lines,
        &b.limits(),
        b.kind().name(),
    )?;
    lockout::check_policy(p, force)
}

/// What `unload` did.
#[derive(Clone, Debug, Serialize)]
pub struct Unloaded {
    /// Something was loaded before.
    pub was_loaded: bool,
    /// Only this interface was detached; the datapath stays on the others.
    pub detached: Option<String>,
}

/// Detaches from one interface, or removes everything (the last interface, or all).
pub fn unload(paths: &Paths, iface: Option<&str>) -> Result<Unloaded> {
    let _lock = paths.lock()?;
    let mut st = State::load(paths)?;
    let mut b = backend::recorded(paths, st.as_ref());
    let mut errs = Vec::new();
    if let Some(iface) = iface
        && let Some(s) = st.as_mut()
    {
        errs.extend(b.detach(iface));
        s.interfaces.retain(|i| i.name != *iface);
        if !s.interfaces.is_empty() {
            s.save(paths)?;
            if !errs.is_empty() {
                bail!("{}", errs.join("; "));
            }
            return Ok(Unloaded {
                was_loaded: true,
                detached: Some(iface.to_string()),
            });
        }
    }
    let was_loaded = b.is_installed() || st.is_some();
    errs.extend(b.teardown());
    let mut files = Store::new(paths).files();
    files.push(paths.state_file());
    for f in files {
        if let Err(e) = fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", f.display()));
        }
    }
    if !errs.is_empty() {
        bail!("unload left things behind: {}", errs.join("; "));
    }
    Ok(Unloaded {
        was_loaded,
        detached: None,
    })
}

/// The installed backend and what it is installed on, for the reading verbs.
pub fn open(paths: &Paths) -> Result<(Box<dyn Backend>, State)> {
    let st = State::load(paths)?;
    let b = backend::installed(paths, st.as_ref())?;
    let st = st.unwrap_or_else(|| State::new(b.kind()));
    Ok((b, st))
}

/// The desired policy, rules only (whitelist entries left out: cheap at any size).
/// The live policy's generation (0 before the first load).
pub fn generation(paths: &Paths) -> Result<u32> {
    Ok(Store::new(paths).meta()?.generation)
}

pub fn rules(paths: &Paths) -> Result<Policy> {
    Store::new(paths).rules()
}

/// The desired policy, whitelist entries included.
pub fn whole(paths: &Paths) -> Result<Policy> {
    Store::new(paths).whole()
}

/// The desired whitelist entries.
pub fn whitelist(paths: &Paths) -> Result<Vec<IpNet>> {
    Store::new(paths).whitelist()
}

fn at(lines: Option<&Lines>, line: Option<usize>) -> String {
    match (lines, line) {
        (Some(l), Some(n)) if n > 0 => format!("{}:{n}: ", l.file),
        _ => String::new(),
    }
}

/// Every limit of the backend, before anything live changes. An error names the line of the
/// item that goes over (when the policy came from a file) and the limit.
pub fn check_limits(
    p: &Policy,
    sizes: WhitelistSizes,
    lines: Option<&Lines>,
    l: &Limits,
    backend: &str,
) -> Result<()> {
    let over = |line: Option<usize>, n: usize, what: &str, max: usize| -> anyhow::Error {
        anyhow!(
            "{}the policy has {n} {what}; the {backend} backend holds at most {max}, so nothing was changed",
            at(lines, line)
        )
    };
    // The items of a kind in file order; the line of the one past the limit.
    let nth_line = |v: Option<&Vec<usize>>, max: usize| v.and_then(|v| v.get(max).copied());
    if p.networks.len() > l.networks {
        let mut by_line: Vec<usize> = lines
            .map(|x| x.networks.values().copied().collect())
            .unwrap_or_default();
        by_line.sort_unstable();
        return Err(over(
            by_line.get(l.networks).copied(),
            p.networks.len(),
            "networks",
            l.networks,
        ));
    }
    let checks = [
        (
            p.isolation.allow.len(),
            l.allow_rules,
            "allow rules",
            lines.map(|x| &x.allow),
        ),
        (
            p.isolation.except.len(),
            l.except_rules,
            "except rules",
            lines.map(|x| &x.except),
        ),
        (
            p.isolation.vxlan_ports.len(),
            l.vxlan_ports,
            "vxlan ports",
            lines.map(|x| &x.vxlan_ports),
        ),
    ];
    for (n, max, what, at_lines) in checks {
        if n > max {
            return Err(over(nth_line(at_lines, max), n, what, max));
        }
    }
    // Distinct prefixes per family, walked in file order.
    let mut items: Vec<(usize, IpNet)> = Vec::new();
    let line_of = |v: Option<&Vec<usize>>, i: usize| v.and_then(|v| v.get(i).copied()).unwrap_or(0);
    for (name, subnets) in &p.networks {
        let ls = lines.and_then(|x| x.subnets.get(name));
        for (i, s) in subnets.iter().enumerate() {
            items.push((line_of(ls, i), s.trunc()));
        }
    }
    let allow = p.isolation.allow.iter().map(|r| (&r.from, &r.to));
    let except = p.isolation.except.iter().map(|r| (&r.from, &r.to));
    for (rules, ls) in [
        (allow.collect::<Vec<_>>(), lines.map(|x| &x.allow)),
        (except.collect(), lines.map(|x| &x.except)),
    ] {
        for (i, (from, to)) in rules.into_iter().enumerate() {
            for e in [from, to] {
                if let Endpoint::Cidr(c) = e {
                    items.push((line_of(ls, i), c.trunc()));
                }
            }
        }
    }
    items.sort_by_key(|(line, _)| *line);
    let mut seen: [HashSet<IpNet>; 2] = Default::default();
    let mut first_over: [Option<usize>; 2] = [None, None];
    for (line, net) in &items {
        let fam = matches!(net, IpNet::V6(_)) as usize;
        if seen[fam].insert(*net) && seen[fam].len() == l.prefixes + 1 {
            first_over[fam] = Some(*line);
        }
    }
    for (fam, what) in [
        "distinct IPv4 prefixes in networks and rules",
        "distinct IPv6 prefixes in networks and rules",
    ]
    .into_iter()
    .enumerate()
    {
        if seen[fam].len() > l.prefixes {
            return Err(over(first_over[fam], seen[fam].len(), what, l.prefixes));
        }
    }
    // The whitelist: with lines, name the entry that goes over.
    let max = whitelist_limits(l);
    if let Some(x) = lines
        && x.whitelist_entries.len() == p.whitelist.allow.len()
    {
        let total = sizes.as_array();
        let mut count = [0usize; 4];
        for (n, line) in p.whitelist.allow.iter().zip(&x.whitelist_entries) {
            let k = WhitelistSizes::kind(n);
            count[k] += 1;
            if count[k] == max[k] + 1 {
                let what = format!("whitelisted {}", WHITELIST_KINDS[k]);
                return Err(over(Some(*line), total[k], &what, max[k]));
            }
        }
    }
    check_whitelist_sizes(sizes, l, backend)
}

/// What each kind of whitelist entry (`WhitelistSizes::kind`) may number.
fn whitelist_limits(l: &Limits) -> [usize; 4] {
    [
        l.whitelist_addresses,
        l.whitelist_cidrs,
        l.whitelist_addresses,
        l.whitelist_cidrs,
    ]
}

fn check_whitelist_sizes(s: WhitelistSizes, l: &Limits, backend: &str) -> Result<()> {
    let max = whitelist_limits(l);
    for (k, n) in s.as_array().into_iter().enumerate() {
        if n > max[k] {
            bail!(
                "the whitelist would have {n} whitelisted {}; the {backend} backend holds at most {}, so nothing was changed",
                WHITELIST_KINDS[k],
                max[k]
            );
        }
    }
    Ok(())
}

/// Reads a policy file whole (and where each item is), refusing a bad one.
pub fn read_policy_file(path: &std::path::Path) -> Result<(Policy, Lines)> {
    parse_policy_file(path, &read_policy_text(path)?)
}

/// The text of a policy file.
pub fn read_policy_text(path: &std::path::Path) -> Result<String> {
    crate::state::read_trusted("policy", path)
}

/// A policy file's `text`, parsed (errors name `path` and the line).
pub fn parse_policy_file(path: &std::path::Path, text: &str) -> Result<(Policy, Lines)> {
    Ok(policy::parse_with_lines(&path.display().to_string(), text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            networks: 2,
            allow_rules: 1,
            except_rules: 1,
            vxlan_ports: 1,
            prefixes: 2,
            whitelist_addresses: 2,
            whitelist_cidrs: 1,
        }
    }

    #[test]
    fn the_whitelist_delta_is_exact_whatever_the_order_and_duplicates() {
        let n = |s: &[&str]| -> Vec<IpNet> { s.iter().map(|x| x.parse().unwrap()).collect() };
        let old = n(&[
            "192.0.2.9/32",
            "2001:db8::/64",
            "192.0.2.1/32",
            "192.0.2.1/32",
        ]);
        let new = n(&[
            "198.51.100.0/24",
            "192.0.2.1/32",
            "2001:db8::/64",
            "203.0.113.5/32",
        ]);
        let (add, del) = whitelist_delta(&old, &new);
        assert_eq!(add, n(&["198.51.100.0/24", "203.0.113.5/32"]));
        assert_eq!(del, n(&["192.0.2.9/32"]));
        assert_eq!(whitelist_delta(&new, &new), (vec![], vec![]));
        let (add, del) = whitelist_delta(&[], &old);
        assert_eq!((add.len(), del.len()), (3, 0));
    }

    fn err(text: &str) -> String {
        let (p, lines) = policy::parse_with_lines("p.toml", text).unwrap();
        check_limits(
            &p,
            WhitelistSizes::of(&p.whitelist.allow),
            Some(&lines),
            &limits(),
            "test",
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn a_limit_error_names_the_line_of_what_exceeds_it() {
        let e = err(
            "[networks.a]\nsubnets = [\"192.0.2.0/26\"]\n[networks.b]\nsubnets = [\"192.0.2.64/26\"]\n[networks.c]\nsubnets = [\"192.0.2.128/26\"]\n",
        );
        assert!(
            e.starts_with("p.toml:5: the policy has 3 networks; the test backend holds at most 2"),
            "{e}"
        );
        let e = err(
            "[networks.a]\nsubnets = [\"192.0.2.0/26\"]\n[[isolation.allow]]\nfrom = \"a\"\nto = \"a\"\n[[isolation.allow]]\nfrom = \"a\"\nto = \"192.0.2.0/24\"\n",
        );
        assert!(
            e.starts_with("p.toml:6: the policy has 2 allow rules"),
            "{e}"
        );
        let e = err(
            "[networks.a]\nsubnets = [\"192.0.2.0/26\",\n \"192.0.2.64/26\"]\n[[isolation.allow]]\nfrom = \"a\"\nto = \"198.51.100.0/24\"\n",
        );
        assert!(
            e.starts_with("p.toml:4: the policy has 3 distinct IPv4 prefixes"),
            "{e}"
        );
        let e = err(
            "[whitelist]\nallow = [\n\"192.0.2.1\",\n\"192.0.2.2\",\n\"2001:db8::1\",\n\"192.0.2.3\",\n]\n",
        );
        assert!(
            e.starts_with("p.toml:6: the policy has 3 whitelisted IPv4 addresses"),
            "{e}"
        );
        let e = err("[isolation]\nvxlan_ports = [4789,\n 8472]\n");
        assert!(
            e.starts_with("p.toml:3: the policy has 2 vxlan ports"),
            "{e}"
        );
    }

    #[test]
    fn within_the_limits_passes() {
        let (p, lines) = policy::parse_with_lines(
            "p.toml",
            "[networks.a]\nsubnets = [\"192.0.2.0/26\", \"2001:db8::/64\"]\n[whitelist]\nallow = [\"192.0.2.1\", \"192.0.2.0/24\"]\n",
        )
        .unwrap();
        check_limits(
            &p,
            WhitelistSizes::of(&p.whitelist.allow),
            Some(&lines),
            &limits(),
            "test",
        )
        .unwrap();
    }
}
