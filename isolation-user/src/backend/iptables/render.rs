//! A policy as iptables rules and ipset sets: pure text, no I/O. The backend loads it with
//! `ipset restore` and `iptables-restore --noflush`; `export --format iptables` prints it.
//!
//! The shape is the classic recipe's, with chains and sets of our own names:
//!
//! ```text
//! INPUT/FORWARD -i IF ─► ISOLATION-IN   whitelist: neighbour discovery, whitelisted sources
//!                                       (go on to isolation), replies (RELATED too), LOG, DROP
//!                        ISOLATION-ISO  isolation: not subject → RETURN, except, hairpin,
//!                                       replies, allow rules, default (RETURN, REJECT, DROP)
//! ```
//!
//! A "pass" is a RETURN, never an ACCEPT: the host's own rules still see what we pass, as
//! they see what the XDP program passes. Pairs (except, allow) are rules over two `hash:net`
//! sets (or a CIDR given with -s/-d), so no `hash:net,net` nor `hash:net,port,net` is
//! needed: kernels without those set types (this one) get the same verdicts.
//!
//! Every rule carries a comment `isolation:REASON[:allow:K|:except:J]`: `stats` sums the
//! rule counters by it, under the reason names of the eBPF backend.

use std::{collections::HashMap, fmt::Write as _};

use isolation_common::{Reason, timing};

pub use super::{
    names::{Fam, Names},
    sets::{
        SetDef, WhitelistSets, ipset_text, ipset_text_with, members_of, network_sets, sorted,
        whitelist_sets,
    },
};
use crate::policy::{DefaultAction, Endpoint, Policy, PortSpec};

/// Which chain a rule is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Input,
    /// Reached from `Input` by ESTABLISHED or RELATED: counts which, passes.
    Conntrack,
    /// Reached from `Input` by ICMPv6 not whitelisted: neighbour discovery passes.
    Neighbour,
    Isolation,
    /// The isolation rules again, for packets out of a VXLAN tunnel: denied ones are
    /// dropped (the eBPF datapath never answers inside a tunnel).
    Tunnel,
}

/// One rule: its matches, the counter key it carries as a comment, its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: Chain,
    pub matches: String,
    pub key: String,
    pub target: String,
}

/// The counter key of a reason, and of an allow or except rule.
pub fn key(r: Reason) -> String {
    format!("isolation:{}", r.name())
}
fn rule_key(r: Reason, kind: &str, i: usize) -> String {
    format!("isolation:{}:{kind}:{i}", r.name())
}

/// What a counter key stands for: the reason, and the rule (kind, index) if any.
pub fn parse_key(k: &str) -> Option<(Reason, Option<(String, usize)>)> {
    let mut it = k.strip_prefix("isolation:")?.split(':');
    let name = it.next()?;
    let r = *Reason::ALL.iter().find(|r| r.name() == name)?;
    match (it.next(), it.next()) {
        (Some(kind), Some(i)) => Some((r, Some((kind.to_string(), i.parse().ok()?)))),
        _ => Some((r, None)),
    }
}

/// The rate NFLOG lines and REJECT answers are limited to (the eBPF datapath's rates).
fn log_limit() -> String {
    format!(
        "-m limit --limit {}/sec --limit-burst {}",
        timing::LOG_RATE_PER_SEC,
        timing::LOG_BURST
    )
}
const REJECT_LIMIT: &str = "-m limit --limit 200/sec --limit-burst 200";

/// What the rules of `p` in family `f` are: the whitelist chain and the isolation chain.
pub fn rules(p: &Policy, names: &Names, generation: u32, wl: &WhitelistSets, f: Fam) -> Vec<Rule> {
    let mut out = Vec::new();
    let iso = names.isolation();
    let mut push = |chain: Chain, matches: String, key: String, target: String| {
        out.push(Rule {
            chain,
            matches,
            key,
            target,
        })
    };
    let group = names.nflog_group();
    let nflog = |prefix: &str| format!("NFLOG --nflog-group {group} --nflog-prefix {prefix}");
    // Stage 0: the blocklist, before anything else (its set's entries time out by
    // themselves).
    if p.blocklist.enabled {
        let m = format!("-m set --match-set {} src", names.blocklist(f));
        if p.blocklist.log {
            push(
                Chain::Input,
                format!("{m} {}", log_limit()),
                "isolation:log".into(),
                nflog(Reason::DropBlocked.name()),
            );
        }
        push(Chain::Input, m, key(Reason::DropBlocked), "DROP".into());
    }
    // Stage 1: the whitelist. The order puts what a flood pays first and least: one set
    // lookup, one conntrack match, (IPv6) one protocol compare, DROP.
    if p.whitelist.enabled {
        push(
            Chain::Input,
            format!("-m set --match-set {} src", wl.set),
            key(Reason::PassWhitelist),
            format!("-g {iso}"),
        );
        push(
            Chain::Input,
            "-m conntrack --ctstate ESTABLISHED,RELATED".into(),
            "isolation:conntrack".into(),
            format!("-g {}", names.conntrack()),
        );
        push(
            Chain::Conntrack,
            "-m conntrack --ctstate RELATED".into(),
            key(Reason::PassRelated),
            "RETURN".into(),
        );
        push(
            Chain::Conntrack,
            String::new(),
            key(Reason::PassEstablished),
            "RETURN".into(),
        );
        // The drop, after neighbour discovery for IPv6 (always passes: hop limit 255 from
        // the link itself; MLD: 1).
        let tail = |chain: Chain, push: &mut dyn FnMut(Chain, String, String, String)| {
            if p.whitelist.log {
                push(
                    chain,
                    log_limit(),
                    "isolation:log".into(),
                    nflog(Reason::DropNotWhitelisted.name()),
                );
            }
            push(
                chain,
                String::new(),
                key(Reason::DropNotWhitelisted),
                "DROP".into(),
            );
        };
        if f == Fam::V6 {
            push(
                Chain::Input,
                "-p ipv6-icmp".into(),
                "isolation:icmpv6".into(),
                format!("-g {}", names.neighbour()),
            );
            for (t, hl) in [
                (133, 255),
                (134, 255),
                (135, 255),
                (136, 255),
                (137, 255),
                (130, 1),
                (131, 1),
                (132, 1),
                (143, 1),
            ] {
                push(
                    Chain::Neighbour,
                    format!("-p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq {hl}"),
                    key(Reason::PassNeighbour),
                    "RETURN".into(),
                );
            }
            tail(Chain::Neighbour, &mut push);
        }
        tail(Chain::Input, &mut push);
    } else {
        push(
            Chain::Input,
            String::new(),
            key(Reason::PassWhitelistOff),
            format!("-g {iso}"),
        );
    }
    // Stage 2: isolation, only between two addresses that are both in some network.
    if p.networks.is_empty() {
        return out;
    }
    let all = names.set(generation, "all", f);
    for dir in ["src", "dst"] {
        push(
            Chain::Isolation,
            format!("-m set ! --match-set {all} {dir}"),
            key(Reason::PassNotSubject),
            "RETURN".into(),
        );
    }
    let index: HashMap<&String, usize> =
        p.networks.keys().enumerate().map(|(i, n)| (n, i)).collect();
    // The match of an endpoint in one direction; None when it has nothing in this family.
    let side = |e: &Endpoint, dir: &str| -> Option<String> {
        match e {
            Endpoint::Network(n) => {
                let has = p.networks.get(n)?.iter().any(|s| Fam::of(s) == f);
                has.then(|| {
                    format!(
                        "-m set --match-set {} {dir}",
                        names.set(generation, &format!("n{}", index[n]), f)
                    )
                })
            }
            Endpoint::Cidr(c) if Fam::of(c) == f => {
                let flag = if dir == "src" { "-s" } else { "-d" };
                Some(format!("{flag} {}", c.trunc()))
            }
            Endpoint::Cidr(_) => None,
        }
    };
    for (j, r) in p.isolation.except.iter().enumerate() {
        for (a, b) in [(&r.from, &r.to), (&r.to, &r.from)] {
            if let (Some(s), Some(d)) = (side(a, "src"), side(b, "dst")) {
                push(
                    Chain::Isolation,
                    format!("{s} {d}"),
                    rule_key(Reason::PassExcept, "except", j),
                    "RETURN".into(),
                );
            }
        }
    }
    for (i, (_, subnets)) in p.networks.iter().enumerate() {
        if crate::mutants::IPTABLES_HAIRPIN_OFF {
            break;
        }
        if subnets.iter().any(|s| Fam::of(s) == f) {
            let n = names.set(generation, &format!("n{i}"), f);
            push(
                Chain::Isolation,
                format!("-m set --match-set {n} src -m set --match-set {n} dst"),
                key(Reason::PassHairpin),
                "RETURN".into(),
            );
        }
    }
    for (state, r) in [
        ("ESTABLISHED", Reason::PassEstablished),
        ("RELATED", Reason::PassRelated),
    ] {
        push(
            Chain::Isolation,
            format!("-m conntrack --ctstate {state}"),
            key(r),
            "RETURN".into(),
        );
    }
    for (k, r) in p.isolation.allow.iter().enumerate() {
        let (Some(s), Some(d)) = (side(&r.from, "src"), side(&r.to, "dst")) else {
            continue;
        };
        let protos: Vec<String> = if r.ports.is_empty() {
            vec![String::new()]
        } else {
            r.ports
                .iter()
                .map(|ps| match *ps {
                    PortSpec::Tcp(lo, hi) => format!(" -p tcp --dport {}", port_range(lo, hi)),
                    PortSpec::Udp(lo, hi) => format!(" -p udp --dport {}", port_range(lo, hi)),
                    PortSpec::Icmp => format!(" -p {}", f.icmp()),
                })
                .collect()
        };
        for pr in protos {
            push(
                Chain::Isolation,
                format!("{s} {d}{pr}"),
                rule_key(Reason::PassAllow, "allow", k),
                "RETURN".into(),
            );
        }
    }
    // The chain ends with the default. The tunnel chain is the same decision, but a packet
    // out of a tunnel that is denied is dropped, never answered.
    let body: Vec<Rule> = out
        .iter()
        .filter(|r| r.chain == Chain::Isolation)
        .cloned()
        .collect();
    let end = |chain: Chain, reject: bool| {
        default_rules(p.isolation.default, reject, f, &nflog)
            .into_iter()
            .map(move |(matches, key, target)| Rule {
                chain,
                matches,
                key,
                target,
            })
    };
    out.extend(end(Chain::Isolation, p.isolation.reject));
    if !p.isolation.vxlan_ports.is_empty() {
        out.extend(body.into_iter().map(|r| Rule {
            chain: Chain::Tunnel,
            ..r
        }));
        out.extend(end(Chain::Tunnel, false));
    }
    out
}

/// The end of an isolation chain, what a packet no rule passed gets: (matches, key,
/// target) of each rule.
fn default_rules(
    default: DefaultAction,
    reject: bool,
    f: Fam,
    nflog: &dyn Fn(&str) -> String,
) -> Vec<(String, String, String)> {
    if default == DefaultAction::Accept {
        return vec![(String::new(), key(Reason::PassDefault), "RETURN".into())];
    }
    let r = if reject {
        Reason::RejectIsolated
    } else {
        Reason::DropIsolated
    };
    let mut v = vec![(log_limit(), "isolation:log".into(), nflog(r.name()))];
    if !reject {
        v.push((String::new(), key(r), "DROP".into()));
        return v;
    }
    // Never an answer to an answer: a RST or an ICMP error of no connection is INVALID to
    // conntrack, and dropped silently.
    v.push((
        "-m conntrack --ctstate INVALID".into(),
        key(Reason::DropIsolated),
        "DROP".into(),
    ));
    v.push((
        format!("-p tcp {REJECT_LIMIT}"),
        key(r),
        "REJECT --reject-with tcp-reset".into(),
    ));
    v.push((
        format!("! -p tcp {REJECT_LIMIT}"),
        key(r),
        format!("REJECT --reject-with {}", f.admin_prohibited()),
    ));
    v.push((String::new(), key(Reason::DropRejectLimited), "DROP".into()));
    v
}

fn port_range(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}:{hi}")
    }
}

/// One rule as an `iptables-restore` line.
pub fn rule_line(names: &Names, r: &Rule) -> String {
    let chain = match r.chain {
        Chain::Input => names.input(),
        Chain::Isolation => names.isolation(),
        Chain::Tunnel => names.tunnel(),
        Chain::Conntrack => names.conntrack(),
        Chain::Neighbour => names.neighbour(),
    };
    let mut s = format!("-A {chain}");
    if !r.matches.is_empty() {
        s.push(' ');
        s.push_str(&r.matches);
    }
    let _ = write!(s, " -m comment --comment {} -j {}", r.key, r.target);
    s.replace("-j -g ", "-g ")
}

/// `iptables-restore --noflush --counters` input: our two chains, declared (which empties
/// them) and filled. `counters` carries each key's packets and bytes over to the first rule
/// with that key, so `stats` keeps counting across applies.
pub fn chains_text(
    names: &Names,
    rules: &[Rule],
    counters: &HashMap<String, (u64, u64)>,
    extra: &[String],
) -> String {
    let mut s = String::from("*filter\n");
    for c in names.chains() {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let mut carried = std::collections::HashSet::new();
    for r in rules {
        let (p, b) = match counters.get(&r.key) {
            Some(c) if carried.insert(r.key.clone()) => *c,
            _ => (0, 0),
        };
        let _ = writeln!(s, "[{p}:{b}] {}", rule_line(names, r));
    }
    for l in extra {
        let _ = writeln!(s, "{l}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The jump from INPUT and FORWARD for an interface (`-I` or `-D`).
pub fn jump_lines(names: &Names, op: &str, iface: &str) -> Vec<String> {
    jump_lines_to(names, &names.input(), op, iface)
}

/// The jump from INPUT and FORWARD for packets a VXLAN device decapsulated.
pub fn tunnel_jump_lines(names: &Names, op: &str, iface: &str) -> Vec<String> {
    jump_lines_to(names, &names.tunnel(), op, iface)
}

fn jump_lines_to(names: &Names, chain: &str, op: &str, iface: &str) -> Vec<String> {
    ["INPUT", "FORWARD"]
        .iter()
        .map(|c| {
            let pos = if op == "-I" { " 1" } else { "" };
            format!(
                "{op} {c}{pos} -i {iface} -m comment --comment {} -j {chain}",
                names.jump_comment(),
            )
        })
        .collect()
}

/// What `export --format iptables` prints: the sets, then each family's chains, as the
/// backend loads them, with the jumps for `ifaces`.
pub fn export(p: &Policy, names: &Names, ifaces: &[String]) -> String {
    let generation = 1;
    let mut sets = network_sets(p, names, generation);
    sets.extend(whitelist_sets(&p.whitelist.allow, names, generation));
    let mut s = String::from("# ipset restore\n");
    s.push_str(&ipset_text(&sets));
    for f in Fam::BOTH {
        s.push_str(&blocklist_create(names, f));
        for n in p.blocklist.entries.iter().filter(|n| Fam::of(n) == f) {
            let _ = writeln!(s, "add {} {n} timeout 0", names.blocklist(f));
        }
    }
    for f in Fam::BOTH {
        let _ = writeln!(s, "# {}-restore --noflush", f.iptables());
        let rules = rules(
            p,
            names,
            generation,
            &WhitelistSets::named(names, generation, f),
            f,
        );
        let text = chains_text(names, &rules, &HashMap::new(), &[]);
        let body = text.strip_suffix("COMMIT\n").unwrap_or(&text);
        // Without counters: the text loads with or without `--counters`.
        s.push_str(&body.replace("[0:0] ", ""));
        for i in ifaces {
            for l in jump_lines(names, "-I", i) {
                let _ = writeln!(s, "{l}");
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// The blocklist set of a family (`ipset restore -exist` input): entries with timeouts, as
/// many as the eBPF datapath holds (addresses and CIDRs).
pub fn blocklist_create(names: &Names, f: Fam) -> String {
    format!(
        "create {} hash:net family {} timeout 0 maxelem {}\n",
        names.blocklist(f),
        f.inet(),
        2 * isolation_common::limits::BL_EXACT
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy;
    use std::path::Path;

    use crate::policy::tests::EVERY_KIND as POLICY;

    fn names() -> Names {
        Names::new(Path::new("/run/isolation"))
    }

    #[test]
    fn the_classic_recipe_shape() {
        let p = policy::parse("p.toml", POLICY).unwrap();
        let n = names();
        let wl = WhitelistSets::named(&n, 3, Fam::V4);
        let lines: Vec<String> = rules(&p, &n, 3, &wl, Fam::V4)
            .iter()
            .map(|r| rule_line(&n, r))
            .collect();
        let want = [
            // The blocklist first (on unless a policy turns it off).
            "-A ISOLATION-IN -m set --match-set isolation-0-blv4 src -m limit --limit 20/sec --limit-burst 100 -m comment --comment isolation:log -j NFLOG --nflog-group 4200 --nflog-prefix blocked",
            "-A ISOLATION-IN -m set --match-set isolation-0-blv4 src -m comment --comment isolation:blocked -j DROP",
            "-A ISOLATION-IN -m set --match-set isolation-3-wlv4 src -m comment --comment isolation:whitelisted -g ISOLATION-ISO",
            "-A ISOLATION-IN -m conntrack --ctstate ESTABLISHED,RELATED -m comment --comment isolation:conntrack -g ISOLATION-CT",
            "-A ISOLATION-CT -m conntrack --ctstate RELATED -m comment --comment isolation:related -j RETURN",
            "-A ISOLATION-CT -m comment --comment isolation:established -j RETURN",
            "-A ISOLATION-IN -m limit --limit 20/sec --limit-burst 100 -m comment --comment isolation:log -j NFLOG --nflog-group 4200 --nflog-prefix not-whitelisted",
            "-A ISOLATION-IN -m comment --comment isolation:not-whitelisted -j DROP",
            "-A ISOLATION-ISO -m set ! --match-set isolation-3-allv4 src -m comment --comment isolation:not-isolated -j RETURN",
            "-A ISOLATION-ISO -m set ! --match-set isolation-3-allv4 dst -m comment --comment isolation:not-isolated -j RETURN",
            "-A ISOLATION-ISO -s 192.0.2.10/32 -m set --match-set isolation-3-n1v4 dst -m comment --comment isolation:except:except:0 -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n1v4 src -d 192.0.2.10/32 -m comment --comment isolation:except:except:0 -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n0v4 src -m set --match-set isolation-3-n0v4 dst -m comment --comment isolation:hairpin -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n1v4 src -m set --match-set isolation-3-n1v4 dst -m comment --comment isolation:hairpin -j RETURN",
            "-A ISOLATION-ISO -m conntrack --ctstate ESTABLISHED -m comment --comment isolation:established -j RETURN",
            "-A ISOLATION-ISO -m conntrack --ctstate RELATED -m comment --comment isolation:related -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n0v4 src -m set --match-set isolation-3-n1v4 dst -p tcp --dport 80 -m comment --comment isolation:allow-rule:allow:0 -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n0v4 src -m set --match-set isolation-3-n1v4 dst -p udp --dport 53:54 -m comment --comment isolation:allow-rule:allow:0 -j RETURN",
            "-A ISOLATION-ISO -m set --match-set isolation-3-n0v4 src -m set --match-set isolation-3-n1v4 dst -p icmp -m comment --comment isolation:allow-rule:allow:0 -j RETURN",
            "-A ISOLATION-ISO -m limit --limit 20/sec --limit-burst 100 -m comment --comment isolation:log -j NFLOG --nflog-group 4200 --nflog-prefix isolated-reject",
            "-A ISOLATION-ISO -m conntrack --ctstate INVALID -m comment --comment isolation:isolated-drop -j DROP",
            "-A ISOLATION-ISO -p tcp -m limit --limit 200/sec --limit-burst 200 -m comment --comment isolation:isolated-reject -j REJECT --reject-with tcp-reset",
            "-A ISOLATION-ISO ! -p tcp -m limit --limit 200/sec --limit-burst 200 -m comment --comment isolation:isolated-reject -j REJECT --reject-with icmp-admin-prohibited",
            "-A ISOLATION-ISO -m comment --comment isolation:isolated-reject-limited -j DROP",
        ];
        assert_eq!(lines, want);
        // IPv6: neighbour discovery first; "it" has no IPv6 prefix, so no rule names it.
        let wl6 = WhitelistSets::named(&n, 3, Fam::V6);
        let v6: Vec<String> = rules(&p, &n, 3, &wl6, Fam::V6)
            .iter()
            .map(|r| rule_line(&n, r))
            .collect();
        // IPv6: ICMPv6 not whitelisted goes to the neighbour-discovery chain, which passes
        // ND from the link and drops the rest.
        assert!(
            v6[6].contains("-p ipv6-icmp") && v6[6].ends_with("-g ISOLATION-ND"),
            "{v6:#?}"
        );
        assert!(
            v6[7].starts_with(
                "-A ISOLATION-ND -p ipv6-icmp -m icmp6 --icmpv6-type 133 -m hl --hl-eq 255"
            ),
            "{v6:#?}"
        );
        assert!(v6.iter().any(|l| l.starts_with(
            "-A ISOLATION-ND -m comment --comment isolation:not-whitelisted -j DROP"
        )));
        assert!(!v6.iter().any(|l| l.contains("n1v6")), "{v6:#?}");
        assert!(v6.iter().any(|l| l.contains("icmp6-adm-prohibited")));
        assert!(v6.iter().any(|l| l.contains(
            "-m set --match-set isolation-3-n0v6 src -m set --match-set isolation-3-n0v6 dst"
        )));
    }

    #[test]
    fn packets_out_of_a_tunnel_get_the_same_rules_and_a_drop() {
        let p = policy::parse(
            "p.toml",
            &POLICY.replace("reject = true", "reject = true\nvxlan_ports = [4789]"),
        )
        .unwrap();
        let n = names();
        let rules = rules(&p, &n, 3, &WhitelistSets::named(&n, 3, Fam::V4), Fam::V4);
        let of = |c: Chain| -> Vec<(String, String)> {
            rules
                .iter()
                .filter(|r| r.chain == c)
                .map(|r| (r.matches.clone(), r.target.clone()))
                .collect()
        };
        let (iso, vx) = (of(Chain::Isolation), of(Chain::Tunnel));
        // The decision up to the default is the isolation chain's, rule for rule.
        let allow_end = iso.iter().rposition(|(_, t)| t == "RETURN").unwrap() + 1;
        assert_eq!(vx[..allow_end], iso[..allow_end]);
        // Denied inside a tunnel: logged, dropped, never answered.
        assert_eq!(vx.len(), allow_end + 2, "{vx:#?}");
        assert_eq!(vx.last().unwrap().1, "DROP");
        assert!(!vx.iter().any(|(_, t)| t.starts_with("REJECT")));
        assert!(iso.iter().any(|(_, t)| t.starts_with("REJECT")));
        // Without vxlan_ports there is no tunnel chain content.
        let plain = policy::parse("p.toml", POLICY).unwrap();
        let r = super::rules(
            &plain,
            &n,
            3,
            &WhitelistSets::named(&n, 3, Fam::V4),
            Fam::V4,
        );
        assert!(!r.iter().any(|r| r.chain == Chain::Tunnel));
    }

    #[test]
    fn sets_hold_what_ipset_takes() {
        let p = policy::parse("p.toml", POLICY).unwrap();
        let n = names();
        let wl = whitelist_sets(&p.whitelist.allow, &n, 3);
        let text = ipset_text(&wl);
        assert!(
            text.contains("create isolation-3-wlv4 hash:net family inet hashsize 1024 maxelem")
        );
        assert!(text.contains("add isolation-3-wlv4 203.0.113.7/32\n"));
        // A /0 is its two halves.
        assert!(
            text.contains("add isolation-3-wlv4 0.0.0.0/1\nadd isolation-3-wlv4 128.0.0.0/1\n")
        );
        assert!(text.contains("add isolation-3-wlv6 2001:db8::1/128\n"));
        let nets = ipset_text(&network_sets(&p, &n, 3));
        assert!(nets.contains(
            "add isolation-3-allv4 198.51.100.0/25\nadd isolation-3-allv4 198.51.100.128/25\n"
        ));
        assert!(nets.contains("create isolation-3-n1v6 hash:net family inet6"));
    }

    #[test]
    fn names_of_two_instances_never_meet() {
        let a = Names::new(Path::new("/tmp/a"));
        let b = Names::new(Path::new("/tmp/b"));
        assert_ne!(a, b);
        let d = names();
        assert!(a.owns_set(&a.set(12, "n3", Fam::V6)));
        assert!(!a.owns_set(&b.set(12, "n3", Fam::V6)));
        assert!(!d.owns_set(&a.set(12, "n3", Fam::V6)));
        assert!(!a.owns_set("isolation"));
        assert!(d.owns_set("isolation-7-wlv4") && d.owns_set("isolation-7-n12v6"));
        for theirs in [
            "isolation-2024-servers",
            "isolation-7-n0v4-backup",
            "isolation-7-wlv5",
            "isolation-7-nv4",
            "isolation--allv4",
        ] {
            assert!(!d.owns_set(theirs), "{theirs}");
        }
        assert_eq!(a.set(1, "wl", Fam::V4).len(), "iso-12345678-1-wlv4".len());
        assert_ne!(Names::legacy(Path::new("/tmp/a")), a);
        // Kernel limits: chain names 28 characters, set names 31.
        assert!(a.isolation().len() <= 28);
        assert!(format!("{}-t", a.set(u32::MAX, "wl", Fam::V6)).len() <= 31);
        assert!(a.set(u32::MAX, "n1023", Fam::V6).len() <= 31);
    }

    #[test]
    fn counter_keys_read_back() {
        assert_eq!(
            parse_key(&key(Reason::PassHairpin)),
            Some((Reason::PassHairpin, None))
        );
        assert_eq!(
            parse_key(&rule_key(Reason::PassAllow, "allow", 7)),
            Some((Reason::PassAllow, Some(("allow".into(), 7))))
        );
        assert_eq!(parse_key("isolation:log"), None);
        assert_eq!(parse_key("something-else"), None);
    }
}
