//! A policy against a backend's limits, before anything live changes: an error names the
//! line of the item that goes over (when the policy came from a file) and the limit.

use std::collections::HashSet;

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;

use crate::{
    backend::Limits,
    policy::{Endpoint, Lines, Policy, WHITELIST_KINDS, WhitelistSizes},
};

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
    check_whitelist_sizes(sizes, l, backend)?;
    // The blocklist's permanent entries, by the same rule.
    let bmax = blocklist_limits(l);
    let total = WhitelistSizes::of(&p.blocklist.entries).as_array();
    let mut count = [0usize; 4];
    for (i, n) in p.blocklist.entries.iter().enumerate() {
        let k = WhitelistSizes::kind(n);
        count[k] += 1;
        if count[k] == bmax[k] + 1 {
            let line = lines.and_then(|x| x.blocklist_entries.get(i).copied());
            let what = format!("blocked {}", WHITELIST_KINDS[k]);
            return Err(over(line, total[k], &what, bmax[k]));
        }
    }
    Ok(())
}

fn blocklist_limits(l: &Limits) -> [usize; 4] {
    [
        l.blocklist_addresses,
        l.blocklist_cidrs,
        l.blocklist_addresses,
        l.blocklist_cidrs,
    ]
}

/// The blocklist a change leaves (permanent and timed entries together) against the
/// backend's limits.
pub(super) fn check_blocklist_sizes(s: WhitelistSizes, l: &Limits, backend: &str) -> Result<()> {
    let max = blocklist_limits(l);
    for (k, n) in s.as_array().into_iter().enumerate() {
        if n > max[k] {
            bail!(
                "the blocklist would have {n} blocked {}; the {backend} backend holds at most {}, so nothing was changed",
                WHITELIST_KINDS[k],
                max[k]
            );
        }
    }
    Ok(())
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

pub(super) fn check_whitelist_sizes(s: WhitelistSizes, l: &Limits, backend: &str) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    fn limits() -> Limits {
        Limits {
            networks: 2,
            allow_rules: 1,
            except_rules: 1,
            vxlan_ports: 1,
            prefixes: 2,
            whitelist_addresses: 2,
            whitelist_cidrs: 1,
            blocklist_addresses: 1,
            blocklist_cidrs: 1,
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
        let e = err(
            "[blocklist]\nentries = [\n\"192.0.2.0/24\",\n\"192.0.2.1\",\n\"198.51.100.0/24\",\n]\n",
        );
        assert!(
            e.starts_with("p.toml:5: the policy has 2 blocked IPv4 CIDRs"),
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
