//! The iptables backend's reads: counters (summed by the reason in each rule's comment),
//! `check` (the oracle over what the sets and chains hold), and status. The write path is in
//! mod.rs.

use std::fs;

use anyhow::{Result, anyhow};
use isolation_common::{Counter, Reason};

use super::{Iptables, names::Fam, render, tools};
use crate::{
    backend::{
        Answer, Connections, Counters, IfaceStatus, Kind, LogCounts, MapFill, Query, RuleCounter,
        Status, Uncounted, Verdict,
    },
    policy::Policy,
    semantics::{self, Pkt},
    state::State,
};

impl Iptables {
    pub(super) fn read_counters(&self, live_policy: &Policy) -> Result<Counters> {
        let v = self.variant()?;
        let live = self.live(v)?;
        let mut by_key = live[0].counters(&self.names);
        for (k, (p, b)) in live[1].counters(&self.names) {
            let e = by_key.entry(k).or_default();
            e.0 += p;
            e.1 += b;
        }
        let mut reasons: Vec<(Reason, Counter)> = Reason::ALL
            .iter()
            .map(|r| (*r, Counter::default()))
            .collect();
        let (allow_names, except_names) = crate::backend::rule_names(live_policy);
        let mut rules: Vec<RuleCounter> = allow_names
            .iter()
            .enumerate()
            .map(|(k, n)| ("allow", k, n))
            .chain(
                except_names
                    .iter()
                    .enumerate()
                    .map(|(j, n)| ("except", j, n)),
            )
            .map(|(kind, index, rule)| RuleCounter {
                kind,
                index,
                rule: rule.clone(),
                packets: 0,
                bytes: 0,
            })
            .collect();
        for (k, (p, b)) in &by_key {
            let Some((r, rule)) = render::parse_key(k) else {
                continue;
            };
            if let Some((_, c)) = reasons.iter_mut().find(|(x, _)| *x == r) {
                c.packets += p;
                c.bytes += b;
            }
            if let Some((kind, i)) = rule
                && let Some(rc) = rules.iter_mut().find(|c| c.kind == kind && c.index == i)
            {
                rc.packets += p;
                rc.bytes += b;
            }
        }
        let logged = by_key.get("isolation:log").map(|c| c.0).unwrap_or(0);
        let count = |r: Reason| by_key.get(&render::key(r)).map(|c| c.0).unwrap_or(0);
        // Every packet that reached a drop after a log rule was offered to it.
        let mut offered = count(Reason::DropIsolated)
            + count(Reason::RejectIsolated)
            + count(Reason::DropRejectLimited);
        if live_policy.whitelist.log {
            offered += count(Reason::DropNotWhitelisted);
        }
        let proc = |f: &str| -> u64 {
            fs::read_to_string(format!("/proc/sys/net/netfilter/{f}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(Counters {
            reasons,
            rules,
            log: LogCounts {
                written: logged,
                suppressed: offered.saturating_sub(logged),
                lost: 0,
            },
            // The kernel's conntrack holds both kinds in one table.
            connections: Connections {
                new: 0,
                new_max: 0,
                established: proc("nf_conntrack_count"),
                established_max: proc("nf_conntrack_max"),
                filter_set: 0,
                filter_slots: 0,
            },
            // NFLOG has no ring whose losses could be counted, and conntrack keeps new and
            // established connections in one table.
            uncounted: Uncounted {
                log_lost: true,
                new_connections: true,
                connection_filter: true,
            },
        })
    }

    pub(super) fn read_check(&self, live_policy: &Policy, q: &Query) -> Result<Answer> {
        let v = self.variant()?;
        let rec = self
            .record()
            .ok_or_else(|| anyhow!("the iptables backend is not loaded here"))?;
        let f = Fam::of_addr(&q.src);
        let live = v.save(f)?;
        let enabled = live.whitelist_enforced(&self.names);
        let mut answer = Answer {
            verdict: Verdict::Pass,
            stage: "whitelist",
            reason: "whitelist off".into(),
            generation: rec.generation,
        };
        if enabled {
            let set = self.whitelist_sets(&rec, f).set;
            if tools::ipset(&["test", &set, &q.src.to_string()]).is_ok() {
                answer.reason = format!("whitelisted (in set {set})");
            } else {
                answer.verdict = Verdict::Drop;
                answer.reason = format!(
                    "{} is not whitelisted (only replies of connections opened from here get in)",
                    q.src
                );
                return Ok(answer);
            }
        }
        let ports = match (q.proto, q.dport) {
            (Some(6 | 17), Some(d)) => Some((0, d)),
            (Some(1 | 58), _) => Some((0, 0)),
            _ => None,
        };
        let pkt = Pkt {
            src: q.src,
            dst: q.dst,
            proto: q.proto.unwrap_or(47),
            ports,
        };
        let decision = semantics::isolation(live_policy, &pkt, false);
        crate::backend::describe_isolation(
            &mut answer,
            decision,
            live_policy,
            !live_policy.networks.is_empty(),
            live_policy.isolation.reject,
        );
        Ok(answer)
    }

    pub(super) fn read_status(&self, state: &State) -> Result<Status> {
        let v = self.variant()?;
        let rec = self
            .record()
            .ok_or_else(|| anyhow!("the iptables backend is not loaded here"))?;
        let live = self.live(v)?;
        let jumps = live[0].jumps(&self.names);
        let interfaces = state
            .interfaces
            .iter()
            .map(|i| IfaceStatus {
                name: i.name.clone(),
                how: "jumps from INPUT and FORWARD".into(),
                ifindex: i.ifindex,
                requested_mode: i.mode.clone(),
                xdp_mode: "none (iptables)".into(),
                attached: ["INPUT", "FORWARD"]
                    .iter()
                    .all(|c| jumps.iter().any(|(jc, ji, _)| jc == c && *ji == i.name)),
            })
            .collect();
        let whitelist_enabled = live[0].whitelist_enforced(&self.names);
        let mut names: Vec<String> = live.iter().flat_map(|l| l.sets(&self.names)).collect();
        for f in Fam::BOTH {
            let w = self.whitelist_sets(&rec, f);
            names.push(w.set);
        }
        names.sort();
        names.dedup();
        let mut maps = Vec::new();
        for n in names {
            let (entries, max) = tools::fill(&n)?;
            maps.push(MapFill {
                name: n,
                entries,
                max_entries: max as u32,
            });
        }
        Ok(Status {
            backend: Kind::Iptables,
            detail: format!(
                "{}; chains {} and {}; pairs as rules over hash:net sets ({})",
                v.describe(),
                self.names.input(),
                self.names.isolation(),
                if rec.pair_types.is_empty() {
                    "this kernel has neither hash:net,net nor hash:net,port,net".to_string()
                } else {
                    format!(
                        "this kernel also has {}, not needed",
                        rec.pair_types.join(" and ")
                    )
                }
            ),
            generation: rec.generation,
            whitelist_enabled,
            programs: vec![],
            interfaces,
            maps,
        })
    }
}
