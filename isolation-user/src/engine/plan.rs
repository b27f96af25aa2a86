//! What a whole-policy change would do: the plan `apply --dry-run` prints, and the exact
//! whitelist entries it adds and removes.

use anyhow::Result;
use ipnet::IpNet;
use serde::Serialize;

use super::check_whole;
use crate::{
    backend,
    policy::{Lines, Policy},
    state::{Paths, State},
    store::Store,
};

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
    /// Permanent blocklist entries (`[blocklist] entries`) added and removed; the timed
    /// ones are live state an apply leaves alone.
    pub blocklist_added: usize,
    pub blocklist_removed: usize,
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
pub(super) const DELTA_MAX: usize = 65_536;

fn plan_against(store: &Store, new: &Policy) -> Result<Plan> {
    Ok(diff(&store.whole()?, new))
}

/// What replacing `old` with `new` changes (networks, rules, settings, whitelist counts).
pub fn diff(old: &Policy, new: &Policy) -> Plan {
    diff_and_delta(old, new).0
}

/// `diff`, and the whitelist entries `new` adds and removes.
pub(super) fn diff_and_delta(old: &Policy, new: &Policy) -> (Plan, Vec<IpNet>, Vec<IpNet>) {
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
    setting(
        "connections max",
        old.connections.max.to_string(),
        new.connections.max.to_string(),
    );
    setting(
        "blocklist enabled",
        old.blocklist.enabled.to_string(),
        new.blocklist.enabled.to_string(),
    );
    setting(
        "blocklist log",
        old.blocklist.log.to_string(),
        new.blocklist.log.to_string(),
    );
    let (b_added, b_removed) = whitelist_delta(&old.blocklist.entries, &new.blocklist.entries);
    (p.blocklist_added, p.blocklist_removed) = (b_added.len(), b_removed.len());
    // The file order of entries is kept too (`save` writes it): a reorder is a change.
    if p.blocklist_added + p.blocklist_removed == 0
        && old.blocklist.entries != new.blocklist.entries
    {
        p.settings.push("blocklist entries: reordered".into());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
