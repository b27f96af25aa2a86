//! The one transaction every change goes through, whatever asked for it (a verb today; the
//! service, `apply --confirm-within` and the fleet watcher later):
//!
//! lock → the desired policy from the store → the change → validation against PRODUCT.md's
//! rules and the backend's limits (every limit, before anything live changes) → the
//! backend made to enforce it (all or nothing) → the store written → the outcome, as data.
//!
//! "Nothing is ever half applied" is kept here once: a change refused at any step leaves
//! the backend and the store as they were. Nothing here prints.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use serde::Serialize;

use crate::{
    backend::{self, Backend, Choice, Limits},
    lockout,
    policy::{self, Endpoint, Lines, Policy, WhitelistSizes},
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
    },
    /// Replace the whole policy, whitelist included.
    Replace {
        policy: Policy,
        lines: Option<Lines>,
    },
    /// Edit the rules (networks, allow, except); returns what it did, in words.
    Rules(RulesEdit),
    WhitelistAdd(Vec<IpNet>),
    WhitelistDel(Vec<IpNet>),
    WhitelistFlush,
}

/// What a transaction did.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub generation: u32,
    pub backend: &'static str,
    #[serde(flatten)]
    pub what: Done,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Done {
    Loaded {
        /// Every interface the datapath is attached to now.
        interfaces: Vec<String>,
        /// Connections already open that were remembered.
        seeded: usize,
    },
    Replaced,
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
    let generation = store.meta()?.generation.wrapping_add(1).max(1);
    match change {
        Change::Load {
            ifaces,
            backend,
            policy,
            lines,
        } => {
            let mut b = backend::select(paths, backend)?;
            let mut st = match state {
                Some(s) if b.is_installed() => s,
                _ => State::new(b.kind()),
            };
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            let new = b.preflight(&st, &ifaces)?;
            let done = b.install(&new)?;
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
            if st.object_hash.is_empty() || done.fresh {
                st.object_hash = backend::ebpf::pins::object_hash();
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
                },
            })
        }
        Change::Replace { policy, lines } => {
            let mut b = backend::installed(paths, state.as_ref())?;
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            b.apply(
                &policy,
                Some(&policy.whitelist.allow),
                generation,
                opts.progress,
            )?;
            store.put_whole(&policy, generation)?;
            Ok(outcome(generation, b.as_ref(), Done::Replaced))
        }
        Change::Rules(edit) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let mut p = store.rules()?;
            let message = edit(&mut p)?;
            policy::validate(&p)
                .map_err(|e| anyhow!("refused, the live policy is unchanged: {e}"))?;
            let sizes = store.meta()?.whitelist.into();
            check_limits(&p, sizes, None, &b.limits(), b.kind().name())?;
            b.apply(&p, None, generation, opts.progress)?;
            store.put_rules(&p, generation)?;
            Ok(outcome(generation, b.as_ref(), Done::Rules { message }))
        }
        Change::WhitelistAdd(add) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            // At most this many are new: checking the bound needs no read of the whitelist.
            let mut sizes: WhitelistSizes = store.meta()?.whitelist.into();
            let more = WhitelistSizes::of(&add);
            sizes.exact_v4 += more.exact_v4;
            sizes.lpm_v4 += more.lpm_v4;
            sizes.exact_v6 += more.exact_v6;
            sizes.lpm_v6 += more.lpm_v6;
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

fn outcome(generation: u32, b: &dyn Backend, what: Done) -> Outcome {
    Outcome {
        generation,
        backend: b.kind().name(),
        what,
    }
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
    lockout::check(&p.whitelist, force)
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
    let kind = st.as_ref().map(|s| s.backend);
    let mut b: Box<dyn Backend> = match kind {
        Some(backend::Kind::Ebpf) | None => Box::new(backend::ebpf::Ebpf::new(paths.clone())),
    };
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
pub fn rules(paths: &Paths) -> Result<Policy> {
    Store::new(paths).rules()
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
    for (name, subnets) in &p.networks {
        let ls = lines.and_then(|x| x.subnets.get(name));
        for (i, s) in subnets.iter().enumerate() {
            items.push((ls.and_then(|v| v.get(i).copied()).unwrap_or(0), s.trunc()));
        }
    }
    let rule_ends = p
        .isolation
        .allow
        .iter()
        .map(|r| (&r.from, &r.to))
        .zip(
            lines
                .map(|x| x.allow.clone())
                .unwrap_or_default()
                .into_iter()
                .chain(std::iter::repeat(0)),
        )
        .chain(
            p.isolation.except.iter().map(|r| (&r.from, &r.to)).zip(
                lines
                    .map(|x| x.except.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .chain(std::iter::repeat(0)),
            ),
        );
    for ((from, to), line) in rule_ends {
        for e in [from, to] {
            if let Endpoint::Cidr(c) = e {
                items.push((line, c.trunc()));
            }
        }
    }
    items.sort_by_key(|(line, _)| *line);
    let mut seen: BTreeMap<bool, HashSet<IpNet>> = BTreeMap::new();
    let (mut n4, mut n6) = (0, 0);
    let mut first_over: [Option<usize>; 2] = [None, None];
    for (line, net) in &items {
        let v6 = matches!(net, IpNet::V6(_));
        if seen.entry(v6).or_default().insert(*net) {
            let n = if v6 { &mut n6 } else { &mut n4 };
            *n += 1;
            if *n == l.prefixes + 1 {
                first_over[v6 as usize] = Some(*line);
            }
        }
    }
    for (v6, n) in [(false, n4), (true, n6)] {
        if n > l.prefixes {
            return Err(over(
                first_over[v6 as usize],
                n,
                if v6 {
                    "distinct IPv6 prefixes in networks and rules"
                } else {
                    "distinct IPv4 prefixes in networks and rules"
                },
                l.prefixes,
            ));
        }
    }
    // The whitelist: with lines, name the entry that goes over.
    if let Some(x) = lines
        && x.whitelist_entries.len() == p.whitelist.allow.len()
    {
        let mut count = WhitelistSizes::default();
        for (n, line) in p.whitelist.allow.iter().zip(&x.whitelist_entries) {
            let (c, max, what) = match n {
                IpNet::V4(a) if a.prefix_len() == 32 => (
                    &mut count.exact_v4,
                    l.whitelist_addresses,
                    "whitelisted IPv4 addresses",
                ),
                IpNet::V4(_) => (
                    &mut count.lpm_v4,
                    l.whitelist_cidrs,
                    "whitelisted IPv4 CIDRs",
                ),
                IpNet::V6(a) if a.prefix_len() == 128 => (
                    &mut count.exact_v6,
                    l.whitelist_addresses,
                    "whitelisted IPv6 addresses",
                ),
                IpNet::V6(_) => (
                    &mut count.lpm_v6,
                    l.whitelist_cidrs,
                    "whitelisted IPv6 CIDRs",
                ),
            };
            *c += 1;
            if *c == max + 1 {
                let total = match n {
                    IpNet::V4(a) if a.prefix_len() == 32 => sizes.exact_v4,
                    IpNet::V4(_) => sizes.lpm_v4,
                    IpNet::V6(a) if a.prefix_len() == 128 => sizes.exact_v6,
                    IpNet::V6(_) => sizes.lpm_v6,
                };
                return Err(over(Some(*line), total, what, max));
            }
        }
    }
    check_whitelist_sizes(sizes, l, backend)
}

fn check_whitelist_sizes(s: WhitelistSizes, l: &Limits, backend: &str) -> Result<()> {
    for (n, max, what) in [
        (
            s.exact_v4,
            l.whitelist_addresses,
            "whitelisted IPv4 addresses",
        ),
        (s.lpm_v4, l.whitelist_cidrs, "whitelisted IPv4 CIDRs"),
        (
            s.exact_v6,
            l.whitelist_addresses,
            "whitelisted IPv6 addresses",
        ),
        (s.lpm_v6, l.whitelist_cidrs, "whitelisted IPv6 CIDRs"),
    ] {
        if n > max {
            bail!(
                "the whitelist would have {n} {what}; the {backend} backend holds at most {max}, so nothing was changed"
            );
        }
    }
    Ok(())
}

/// Reads a policy file whole (and where each item is), refusing a bad one.
pub fn read_policy_file(path: &std::path::Path) -> Result<(Policy, Lines)> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read policy {}", path.display()))?;
    Ok(policy::parse_with_lines(
        &path.display().to_string(),
        &text,
    )?)
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
