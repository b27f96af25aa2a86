//! The iptables + ipset backend: the same policy where the kernel refuses BPF programs, as
//! iptables rules and ipset sets in the classic recipe's shape (see `render`).
//!
//! Changes are atomic the way iptables allows: a whole policy's sets are built beside the
//! live ones under new names (the generation is in their names), then each family's chains
//! are replaced in one `iptables-restore --noflush` call, which switches every rule to the
//! new sets at once; the old sets go afterwards. A failure part-way puts back what was
//! replaced and removes what was built. Whitelist edits add and delete members of the live
//! sets over ipset's netlink protocol (`ipset_nl`), undone if the kernel refuses one.
//!
//! What the kernel's conntrack gives here, the eBPF datapath does itself: replies and ICMP
//! errors of connections (ESTABLISHED, RELATED), and fragments (reassembled before the
//! rules see them).
//!
//! Its size: the write path (install, apply, the whitelist edit, teardown) stays in one file
//! because each step's undo sits beside it; the reads are in `read.rs`, the text in
//! `render.rs`, `sets.rs` and `names.rs`.

pub mod conntrack;
pub mod events;
pub mod ipset_nl;
pub mod names;
mod read;
pub mod render;
pub mod sets;
pub mod tools;

use std::{collections::HashSet, fs, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use ipnet::IpNet;
use isolation_common::limits;
use serde::{Deserialize, Serialize};

use self::{
    render::{Fam, Names, WhitelistSets},
    tools::{Live, Variant},
};
use super::{
    Answer, Backend, Counters, Events, Installed, Kind, Limits, Profile, Query, Status,
    WhitelistDelta,
};
use crate::{
    blocklist::View,
    policy::{self, Policy},
    state::{IfaceState, Paths, State, write_atomic},
};

/// Edits up to this many entries go entry by entry (the kernel's answers are the delta);
/// bigger ones read the set once and go in batches.
const BULK: usize = 65536;

/// Whitelisted addresses and CIDRs per family: as many as the eBPF datapath holds.
pub const WHITELIST_ADDRESSES: usize = limits::WL_EXACT as usize;
pub const WHITELIST_CIDRS: usize = limits::WL_LPM as usize;

/// What this backend keeps beside the engine's state: which iptables it loaded with, the
/// generation in force, and the generation whose whitelist sets are live (they outlive
/// rule changes, and exist even while the whitelist is off).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    variant: Variant,
    generation: u32,
    whitelist_generation: u32,
    /// The pair and triple set types this kernel has, of those the classic recipe uses
    /// (`hash:net,net`, `hash:net,port,net`). Said in `status`; the rules never need them.
    #[serde(default)]
    pair_types: Vec<String>,
    /// The names of the chains and sets this instance made (none in a record written by a
    /// build that gave 20-bit tags: `Names::legacy`).
    #[serde(default)]
    names: Option<Names>,
}

pub struct Iptables {
    paths: Paths,
    names: Names,
}

impl Iptables {
    pub fn new(paths: Paths) -> Iptables {
        let mut me = Iptables {
            names: Names::new(&paths.state_dir),
            paths,
        };
        // Loaded already: the names it was loaded with, whatever this build would pick.
        if let Some(r) = me.record() {
            me.names = r
                .names
                .unwrap_or_else(|| Names::legacy(&me.paths.state_dir));
        }
        me
    }

    fn record_path(&self) -> PathBuf {
        self.paths.state_dir.join("iptables.json")
    }

    fn record(&self) -> Option<Record> {
        let text = fs::read_to_string(self.record_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_record(&self, r: &Record) -> Result<()> {
        write_atomic(&self.record_path(), serde_json::to_string(r)?.as_bytes())
    }

    fn variant(&self) -> Result<Variant> {
        match self.record() {
            Some(r) => Ok(r.variant),
            None => Variant::detect(),
        }
    }

    fn live(&self, v: Variant) -> Result<[Live; 2]> {
        Ok([v.save(Fam::V4)?, v.save(Fam::V6)?])
    }

    fn whitelist_sets(&self, r: &Record, f: Fam) -> WhitelistSets {
        WhitelistSets::named(&self.names, r.whitelist_generation, f)
    }

    /// Replaces our chains in both families with `texts`; on a failure puts back those
    /// already replaced.
    fn restore_both(&self, v: Variant, texts: &[String; 2], live: &[Live; 2]) -> Result<()> {
        for (i, f) in Fam::BOTH.into_iter().enumerate() {
            if let Err(e) = v.restore(f, &texts[i]) {
                for (g, l) in Fam::BOTH.iter().zip(live).take(i) {
                    let _ = v.restore(*g, &l.our_chains_text(&self.names));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs, in each family, the deletions `lines` finds in its live filter table (one
    /// `iptables-restore` each); going on past errors, which are returned.
    fn remove_in_each_family(
        &self,
        what: &str,
        lines: impl Fn(&Live) -> Vec<String>,
    ) -> Vec<String> {
        let Ok(v) = self.variant() else {
            return vec![];
        };
        let mut errs = Vec::new();
        for f in Fam::BOTH {
            let text = v.save(f).map(|live| {
                let mut t = String::from("*filter\n");
                for l in lines(&live) {
                    t.push_str(&l);
                    t.push('\n');
                }
                t + "COMMIT\n"
            });
            if let Err(e) = text.and_then(|t| v.restore(f, &t)) {
                errs.push(format!("cannot remove {what}: {e:#}"));
            }
        }
        errs
    }
}

/// Is every member `n` is held as (a /0 is two) in the set?
fn members_present(members: &HashSet<IpNet>, n: &IpNet) -> bool {
    render::members_of(n).iter().all(|m| members.contains(m))
}

impl Backend for Iptables {
    fn kind(&self) -> Kind {
        Kind::Iptables
    }

    fn profile(&self) -> Profile {
        Profile {
            enforces: "iptables + ipset",
            conntrack: Some("the kernel's conntrack"),
            // The kernel's conntrack tracks connections here: no egress counters.
            sections: &[(
                "Ingress (iptables: whitelist chain, then isolation chain; a packet counts at each)",
                false,
            )],
            log: "NFLOG",
            tables: "sets",
            pinned: false,
        }
    }

    fn limits(&self) -> Limits {
        Limits::datapath()
    }

    fn is_installed(&self) -> bool {
        let Some(r) = self.record() else {
            return false;
        };
        r.variant
            .save(Fam::V4)
            .is_ok_and(|l| l.installed(&self.names))
    }

    fn preflight(&self, _state: &State, ifaces: &[IfaceState]) -> Result<Vec<IfaceState>> {
        let v = self.variant()?;
        let live = v.save(Fam::V4)?;
        let jumps = live.jumps(&self.names);
        Ok(ifaces
            .iter()
            .filter(|w| !jumps.iter().any(|(c, i, _)| c == "INPUT" && *i == w.name))
            .cloned()
            .collect())
    }

    fn build(&self) -> String {
        format!("iptables:{}", env!("CARGO_PKG_VERSION"))
    }

    /// `replace` needs nothing here: every apply renders the whole chains anew. The
    /// connections are the kernel's conntrack's (sized by `nf_conntrack_max`, not by us).
    fn install(
        &mut self,
        ifaces: &[IfaceState],
        _replace: bool,
        _connections: policy::Connections,
    ) -> Result<Installed> {
        let v = self.variant()?;
        let live = self.live(v)?;
        let fresh = !live[0].installed(&self.names) || self.record().is_none();
        let texts: [String; 2] = std::array::from_fn(|fam| {
            let mut s = String::from("*filter\n");
            for c in self.names.chains() {
                if !live[fam].chains.contains(&c) {
                    s.push_str(&format!(":{c} - [0:0]\n"));
                }
            }
            let jumps = live[fam].jumps(&self.names);
            for w in ifaces {
                if !jumps.iter().any(|(_, i, _)| *i == w.name) {
                    for l in render::jump_lines(&self.names, "-I", &w.name) {
                        s.push_str(&format!("{l}\n"));
                    }
                }
            }
            s.push_str("COMMIT\n");
            s
        });
        if fresh {
            self.save_record(&Record {
                variant: v,
                generation: 0,
                whitelist_generation: 0,
                pair_types: tools::set_types_present(
                    &self.names,
                    &["hash:net,net", "hash:net,port,net"],
                ),
                names: Some(self.names.clone()),
            })?;
        }
        if let Err(e) = self.restore_both(v, &texts, &live) {
            if fresh {
                self.teardown();
            }
            return Err(e.context("iptables refused the isolation chains"));
        }
        // Before the rules can judge a packet: open connections are known to conntrack.
        let flows = crate::backend::seed::established_flows();
        let seeded = match conntrack::seed(&flows) {
            Ok(n) => n,
            Err(e) => {
                self.uninstall(&Installed {
                    fresh,
                    attached: ifaces.to_vec(),
                    ..Installed::default()
                });
                return Err(e.context("cannot remember the connections already open"));
            }
        };
        Ok(Installed {
            fresh,
            attached: ifaces.to_vec(),
            seeded,
            build: self.build(),
            replaced: None,
        })
    }

    fn uninstall(&mut self, done: &Installed) -> Vec<String> {
        if done.fresh {
            return self.teardown();
        }
        let mut errs = Vec::new();
        for w in &done.attached {
            errs.extend(self.detach(&w.name));
        }
        errs
    }

    fn apply(
        &mut self,
        policy: &Policy,
        whitelist: Option<&[IpNet]>,
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let v = self.variant()?;
        let rec = self.record().ok_or_else(|| {
            anyhow!(
                "the iptables backend's record {} is missing (run `isolation-user load`)",
                self.record_path().display()
            )
        })?;
        let live = self.live(v)?;
        let mut sets = render::network_sets(policy, &self.names, generation);
        // The blocklist's sets are there before any rule names them (kept across applies).
        tools::ipset_restore_exist(
            &Fam::BOTH
                .map(|f| render::blocklist_create(&self.names, f))
                .concat(),
        )
        .context("ipset refused the blocklist's sets; nothing was changed")?;
        let existing: HashSet<String> = tools::set_names()?.into_iter().collect();
        let wl_gen = match whitelist {
            Some(entries) => {
                sets.extend(render::whitelist_sets(entries, &self.names, generation));
                generation
            }
            // No whitelist yet (a fresh load whose policy came without one): empty sets.
            None if !existing.contains(&self.whitelist_sets(&rec, Fam::V4).set) => {
                sets.extend(render::whitelist_sets(&[], &self.names, generation));
                generation
            }
            None => rec.whitelist_generation,
        };
        // Sets of this generation left by an attempt that failed are built again.
        let stale: Vec<String> = sets
            .iter()
            .filter(|s| existing.contains(&s.name))
            .map(|s| s.name.clone())
            .collect();
        tools::destroy_sets(&stale);
        let created: Vec<String> = sets.iter().map(|s| s.name.clone()).collect();
        // Small sets whole in one `ipset restore`; big ones created sized, then filled over
        // netlink (no text to parse).
        let (big, small): (Vec<_>, Vec<_>) =
            sets.iter().cloned().partition(|s| s.members.len() > 4096);
        let filled = tools::ipset_restore(&render::ipset_text(&small))
            .and_then(|()| tools::ipset_restore(&render::ipset_text_with(&big, false)))
            .and_then(|()| {
                let mut nl = ipset_nl::Ipset::open()?;
                big.iter().try_for_each(|d| {
                    nl.batch(ipset_nl::Op::Add, &d.name, &render::sorted(&d.members))
                })
            });
        if let Err(e) = filled {
            tools::destroy_sets(&created);
            return Err(e.context("ipset refused the policy's sets; nothing was changed"));
        }
        if let Some(w) = whitelist {
            progress(w.len() as u64);
        }
        let new_rec = Record {
            generation,
            whitelist_generation: wl_gen,
            ..rec
        };
        // Packets a VXLAN device of this host decapsulates (on a policy's port) are judged
        // by isolation as they come out of the tunnel.
        let tunnels = if policy.networks.is_empty() {
            vec![]
        } else {
            tools::vxlan_devices(&policy.isolation.vxlan_ports)?
        };
        let mut texts: [String; 2] = Default::default();
        for (i, f) in Fam::BOTH.into_iter().enumerate() {
            let wl = self.whitelist_sets(&new_rec, f);
            let rules = render::rules(policy, &self.names, generation, &wl, f);
            let mut jumps: Vec<String> = live[i]
                .jumps_to(&self.names.tunnel())
                .into_iter()
                .map(|(_, _, l)| tools::deletion(&l))
                .collect();
            for t in &tunnels {
                jumps.extend(render::tunnel_jump_lines(&self.names, "-I", t));
            }
            texts[i] =
                render::chains_text(&self.names, &rules, &live[i].counters(&self.names), &jumps);
        }
        if let Err(e) = self.restore_both(v, &texts, &live) {
            tools::destroy_sets(&created);
            return Err(e.context("iptables refused the policy's rules; the previous rules stay"));
        }
        self.save_record(&new_rec)?;
        // The old sets: ours that were there before, that the new rules do not name (they
        // name the sets just built, and the live whitelist's).
        let wl: Vec<String> = Fam::BOTH
            .iter()
            .map(|f| self.whitelist_sets(&new_rec, *f).set)
            .collect();
        let bl = Fam::BOTH.map(|f| self.names.blocklist(f));
        let old: Vec<String> = existing
            .into_iter()
            .filter(|n| {
                self.names.owns_set(n) && !created.contains(n) && !wl.contains(n) && !bl.contains(n)
            })
            .collect();
        for e in tools::destroy_sets(&old) {
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// ipset's timeouts do the datapath's job here: each entry goes in with the seconds it
    /// has left (0: permanent), and `hash:net` tries the longest prefix first, then the
    /// shorter ones, skipping entries whose timeout passed.
    fn edit_blocklist(&mut self, old: &View, view: &View, changed: &[IpNet]) -> Result<()> {
        let text = |v: &View| {
            let now = crate::blocklist::now_ms();
            let mut t = Fam::BOTH
                .map(|f| render::blocklist_create(&self.names, f))
                .concat();
            for n in changed {
                let set = self.names.blocklist(Fam::of(n));
                match v.get(n) {
                    Some(&d) if d == crate::blocklist::PERMANENT => {
                        t.push_str(&format!("add {set} {n} timeout 0\n"))
                    }
                    Some(&d) if d > now => t.push_str(&format!(
                        "add {set} {n} timeout {}\n",
                        (d - now).div_ceil(1000)
                    )),
                    _ => t.push_str(&format!("del {set} {n}\n")),
                }
            }
            t
        };
        if let Err(e) = tools::ipset_restore_exist(&text(view)) {
            // `ipset restore` stops at the refused line: what went before is put back.
            let _ = tools::ipset_restore_exist(&text(old));
            return Err(e.context("ipset refused the blocklist edit; nothing was changed"));
        }
        Ok(())
    }

    fn edit_whitelist(
        &mut self,
        add: &[IpNet],
        del: &[IpNet],
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<WhitelistDelta> {
        let mut rec = self
            .record()
            .ok_or_else(|| anyhow!("the iptables backend is not loaded here"))?;
        let mut delta = WhitelistDelta::default();
        let mut nl = ipset_nl::Ipset::open()?;
        // What was done, to undo it if a later step is refused: (set, op, member).
        let mut done: Vec<(String, ipset_nl::Op, IpNet)> = Vec::new();
        let mut rebuilt = Vec::new();
        let result = (|| -> Result<()> {
            for f in Fam::BOTH {
                let set = self.whitelist_sets(&rec, f).set;
                let of_family = |v: &[IpNet]| {
                    let mine: Vec<IpNet> = v
                        .iter()
                        .filter(|n| Fam::of(n) == f)
                        .map(|n| n.trunc())
                        .collect();
                    render::sorted(&mine)
                };
                let (dels, adds) = (of_family(del), of_family(add));
                if adds.len() + dels.len() <= BULK {
                    // Entry by entry: the kernel says exactly which changed.
                    for n in &dels {
                        let mut all = true;
                        for m in render::members_of(n) {
                            if nl.one(ipset_nl::Op::Del, &set, &m)? {
                                done.push((set.clone(), ipset_nl::Op::Del, m));
                            } else {
                                all = false;
                            }
                        }
                        if all {
                            delta.removed.push(*n);
                        }
                    }
                    for n in &adds {
                        let mut any = false;
                        for m in render::members_of(n) {
                            if nl.one(ipset_nl::Op::Add, &set, &m)? {
                                done.push((set.clone(), ipset_nl::Op::Add, m));
                                any = true;
                            }
                        }
                        if any {
                            delta.added.push(*n);
                        }
                    }
                    continue;
                }
                // In bulk: the set's members read once, the changes sent in batches; a big
                // addition fills a set sized for it beside the live one and swaps it in (an
                // in-place fill would rehash the live set again and again).
                let mut present: HashSet<IpNet> = tools::members(&set)?
                    .iter()
                    .filter_map(|m| crate::policy::parse_member(m))
                    .collect();
                let before = present.len();
                let (mut gone, mut new) = (Vec::new(), Vec::new());
                for n in &dels {
                    if members_present(&present, n) {
                        delta.removed.push(*n);
                        for m in render::members_of(n) {
                            present.remove(&m);
                            gone.push(m);
                        }
                    }
                }
                for n in &adds {
                    if !members_present(&present, n) {
                        delta.added.push(*n);
                        for m in render::members_of(n) {
                            if present.insert(m) {
                                new.push(m);
                            }
                        }
                    }
                }
                if new.len() > BULK && new.len() > before {
                    let tmp = format!("{set}-t");
                    tools::destroy_sets(std::slice::from_ref(&tmp));
                    let def = render::SetDef {
                        name: tmp.clone(),
                        kind: "hash:net",
                        fam: f,
                        members: present.iter().copied().collect(),
                        maxelem: WHITELIST_ADDRESSES + WHITELIST_CIDRS,
                    };
                    rebuilt.push(tmp.clone());
                    tools::ipset_restore(&render::ipset_text_with(
                        std::slice::from_ref(&def),
                        false,
                    ))?;
                    nl.batch(ipset_nl::Op::Add, &tmp, &render::sorted(&def.members))?;
                    tools::ipset(&["swap", &tmp, &set])?;
                    continue;
                }
                // Recorded first: a batch refused half way is undone whole (deleting what was
                // never added, or adding back what is still there, changes nothing).
                done.extend(gone.iter().map(|m| (set.clone(), ipset_nl::Op::Del, *m)));
                nl.batch(ipset_nl::Op::Del, &set, &gone)?;
                done.extend(new.iter().map(|m| (set.clone(), ipset_nl::Op::Add, *m)));
                nl.batch(ipset_nl::Op::Add, &set, &new)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Put back what changed; a rebuild that failed never reached its swap.
            for (set, op, m) in done.iter().rev() {
                let back = match op {
                    ipset_nl::Op::Add => ipset_nl::Op::Del,
                    ipset_nl::Op::Del => ipset_nl::Op::Add,
                };
                let _ = nl.batch(back, set, std::slice::from_ref(m));
            }
            tools::destroy_sets(&rebuilt);
            return Err(e.context("the whitelist edit was refused; nothing was changed"));
        }
        // After a swap the set beside holds the old contents.
        for e in tools::destroy_sets(&rebuilt) {
            tracing::warn!("{e}");
        }
        progress((add.len() + del.len()) as u64);
        rec.generation = generation;
        self.save_record(&rec)?;
        Ok(delta)
    }

    fn counters(&self, live_policy: &Policy) -> Result<Counters> {
        self.read_counters(live_policy)
    }

    fn events(&self, _debug: bool) -> Result<Box<dyn Events>> {
        Ok(Box::new(events::Nflog::open(self.names.nflog_group())?))
    }

    fn check(&self, live_policy: &Policy, q: &Query) -> Result<Answer> {
        self.read_check(live_policy, q)
    }

    fn status(&self, state: &State) -> Result<Status> {
        self.read_status(state)
    }

    fn detach(&mut self, iface: &str) -> Vec<String> {
        self.remove_in_each_family(&format!("the jumps for {iface}"), |live| {
            live.jumps(&self.names)
                .into_iter()
                .filter(|(_, i, _)| i == iface)
                .map(|(_, _, l)| tools::deletion(&l))
                .collect()
        })
    }

    fn teardown(&mut self) -> Vec<String> {
        let names = &self.names;
        let mut errs = self.remove_in_each_family("the isolation chains", |live| {
            let mut jumps = live.jumps(names);
            jumps.extend(live.jumps_to(&names.tunnel()));
            let ours: Vec<String> = names
                .chains()
                .into_iter()
                .filter(|c| live.chains.contains(c))
                .collect();
            jumps
                .into_iter()
                .map(|(_, _, l)| tools::deletion(&l))
                .chain(ours.iter().map(|c| format!("-F {c}")))
                .chain(ours.iter().map(|c| format!("-X {c}")))
                .collect()
        });
        match tools::set_names() {
            Ok(all) => {
                let ours: Vec<String> =
                    all.into_iter().filter(|n| self.names.owns_set(n)).collect();
                errs.extend(tools::destroy_sets(&ours));
            }
            Err(e) => errs.push(e.to_string()),
        }
        if let Err(e) = fs::remove_file(self.record_path())
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!(
                "cannot remove {}: {e}",
                self.record_path().display()
            ));
        }
        errs
    }
}

/// The text `export --format iptables` prints for a policy.
pub fn export(paths: &Paths, policy: &Policy, ifaces: &[String]) -> String {
    render::export(policy, &Names::new(&paths.state_dir), ifaces)
}

#[cfg(test)]
mod tests {
    use super::{Iptables, Names};
    use crate::state::Paths;

    /// An instance keeps the names it was loaded with: a record from a build that gave
    /// 20-bit tags (no names in it) means those; no record means this build's.
    #[test]
    fn an_instance_keeps_the_names_it_was_loaded_with() {
        let dir = std::env::temp_dir().join(format!("isolation-names-{}", std::process::id()));
        let paths = || Paths {
            pin_dir: dir.join("pins"),
            state_dir: dir.clone(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Iptables::new(paths()).names, Names::new(&dir));
        std::fs::write(
            dir.join("iptables.json"),
            r#"{"variant":"nft","generation":3,"whitelist_generation":3}"#,
        )
        .unwrap();
        assert_eq!(Iptables::new(paths()).names, Names::legacy(&dir));
        let ours = Iptables::new(paths());
        let mut r = ours.record().unwrap();
        r.names = Some(Names::new(&dir));
        ours.save_record(&r).unwrap();
        assert_eq!(Iptables::new(paths()).names, Names::new(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
