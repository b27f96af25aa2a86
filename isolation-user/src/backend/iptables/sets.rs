//! A policy's ipset sets: one `hash:net` per network and family, the whitelist's, and the
//! `ipset restore` text that creates them.

use std::fmt::Write as _;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::names::{Fam, Names};
use crate::policy::Policy;

/// An ipset set to create and fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDef {
    pub name: String,
    /// `hash:ip` or `hash:net`.
    pub kind: &'static str,
    pub fam: Fam,
    pub members: Vec<IpNet>,
    pub maxelem: usize,
}

/// `hash:net` takes prefixes of length 1 and up: a /0 is held as its two halves.
pub fn members_of(n: &IpNet) -> Vec<IpNet> {
    let n = n.trunc();
    if n.prefix_len() != 0 {
        return vec![n];
    }
    match n {
        IpNet::V4(_) => vec![
            IpNet::V4(Ipv4Net::new([0, 0, 0, 0].into(), 1).expect("/1")),
            IpNet::V4(Ipv4Net::new([128, 0, 0, 0].into(), 1).expect("/1")),
        ],
        IpNet::V6(_) => vec![
            IpNet::V6(Ipv6Net::new(0u128.into(), 1).expect("/1")),
            IpNet::V6(Ipv6Net::new((1u128 << 127).into(), 1).expect("/1")),
        ],
    }
}

/// The sets the isolation rules of `p` use, named for `generation`: every network's
/// prefixes (`n{i}`, networks in name order) and their union (`all`), per family.
pub fn network_sets(p: &Policy, names: &Names, generation: u32) -> Vec<SetDef> {
    let mut out = Vec::new();
    if p.networks.is_empty() {
        return out;
    }
    for f in Fam::BOTH {
        let of_fam = |v: &[IpNet]| -> Vec<IpNet> {
            v.iter()
                .filter(|n| Fam::of(n) == f)
                .flat_map(members_of)
                .collect()
        };
        let all: Vec<IpNet> = p.networks.values().flat_map(|v| of_fam(v)).collect();
        out.push(SetDef {
            name: names.set(generation, "all", f),
            kind: "hash:net",
            fam: f,
            maxelem: all.len().max(1024),
            members: all,
        });
        for (i, subnets) in p.networks.values().enumerate() {
            let m = of_fam(subnets);
            out.push(SetDef {
                name: names.set(generation, &format!("n{i}"), f),
                kind: "hash:net",
                fam: f,
                maxelem: m.len().max(1024),
                members: m,
            });
        }
    }
    out
}

/// The whitelist's set for `generation`, per family: one `hash:net` for addresses and
/// CIDRs alike (one rule, one lookup per prefix length present; an address is a /32 or a
/// /128). Sized to the backend's limits (ipset allocates as entries come).
pub fn whitelist_sets(entries: &[IpNet], names: &Names, generation: u32) -> Vec<SetDef> {
    Fam::BOTH
        .iter()
        .map(|&f| SetDef {
            name: WhitelistSets::named(names, generation, f).set,
            kind: "hash:net",
            fam: f,
            members: entries
                .iter()
                .filter(|n| Fam::of(n) == f)
                .flat_map(members_of)
                .collect(),
            maxelem: super::WHITELIST_ADDRESSES + super::WHITELIST_CIDRS,
        })
        .collect()
}

/// The whitelist set the rules of one family use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhitelistSets {
    pub set: String,
}

impl WhitelistSets {
    pub fn named(names: &Names, generation: u32, f: Fam) -> WhitelistSets {
        WhitelistSets {
            set: names.set(generation, "wl", f),
        }
    }
}

/// `ipset restore` input creating and filling `sets`.
pub fn ipset_text(sets: &[SetDef]) -> String {
    ipset_text_with(sets, true)
}

/// `ipset restore` input creating `sets`, with their members or (`members` false) empty
/// but sized for them (the backend then fills big sets over netlink).
pub fn ipset_text_with(sets: &[SetDef], members: bool) -> String {
    let mut s = String::new();
    for d in sets {
        // A hash table sized for its contents up front: no rehash while a big set fills.
        let hashsize = (d.members.len() / 2).next_power_of_two().max(1024);
        let _ = writeln!(
            s,
            "create {} {} family {} hashsize {hashsize} maxelem {}",
            d.name,
            d.kind,
            d.fam.inet(),
            d.maxelem.max(d.members.len())
        );
        // In order, each once (two networks, or a network and a rule, may name the same
        // prefix): the text of a policy is the same however its sets were read back.
        if !members {
            continue;
        }
        for m in &sorted(&d.members) {
            if d.kind == "hash:ip" {
                let _ = writeln!(s, "add {} {}", d.name, m.addr());
            } else {
                let _ = writeln!(s, "add {} {m}", d.name);
            }
        }
    }
    s
}

/// Members in order, each once.
pub fn sorted(members: &[IpNet]) -> Vec<IpNet> {
    let mut v = members.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}
