//! `import`: an existing ipset + iptables setup read back as a policy. Pure: text in, a
//! policy and notes out.
//!
//! Two shapes are understood:
//! - the classic hand-written recipe: a `list:set` of per-network `hash:net` sets, allowed
//!   pairs in `hash:net,net`, allowed (pair, port) triples in `hash:net,port,net`, an
//!   exceptions `hash:net,net`, a `hash:ip`/`hash:net` whitelist, and the chains using them;
//! - what this tool's own iptables backend loads (`export --format iptables`), so that
//!   export → import → export gives the same rules.
//!
//! Anything else is reported in a note (one sentence each) rather than guessed.
//!
//! Its size: two readers (ipset save, iptables-save) and two shapes of recipe, each rule
//! of a shape read where it is recognised; a fifth of the file is its tests.

use std::collections::{BTreeMap, HashMap, HashSet};

use ipnet::IpNet;

use crate::policy::{
    AllowRule, DefaultAction, Endpoint, ExceptRule, Isolation, Policy, PortSpec, Whitelist,
    check_name, parse_member as net,
};

/// The policy read back, and what could not be carried over.
#[derive(Debug)]
pub struct Imported {
    pub policy: Policy,
    pub notes: Vec<String>,
}

#[derive(Debug, Default)]
struct Set {
    kind: String,
    members: Vec<String>,
    /// Each member's `timeout` (0: none, or `timeout 0`: for good).
    timeouts: Vec<u64>,
}

fn parse_ipset(text: &str) -> Result<Vec<(String, Set)>, String> {
    let mut sets: Vec<(String, Set)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut w = l.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), Some(kind)) => sets.push((
                name.to_string(),
                Set {
                    kind: kind.to_string(),
                    members: vec![],
                    timeouts: vec![],
                },
            )),
            (Some("add"), Some(name), Some(member)) => {
                let Some((_, s)) = sets.iter_mut().find(|(n, _)| n == name) else {
                    return Err(format!(
                        "line {}: `add {name}` before `create {name}`",
                        i + 1
                    ));
                };
                s.members.push(member.to_string());
                let rest: Vec<&str> = w.collect();
                let timeout = rest
                    .iter()
                    .position(|x| *x == "timeout")
                    .and_then(|i| rest.get(i + 1))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                s.timeouts.push(timeout);
            }
            _ => {
                return Err(format!("line {}: not an `ipset save` line: '{l}'", i + 1));
            }
        }
    }
    Ok(sets)
}

/// One `-A` rule: its chain and its words (a quoted comment is one word, quotes removed).
#[derive(Debug, Clone)]
struct Rule {
    chain: String,
    words: Vec<String>,
}

impl Rule {
    fn value(&self, flag: &str) -> Option<&str> {
        self.words
            .iter()
            .position(|w| w == flag)
            .and_then(|i| self.words.get(i + 1))
            .map(String::as_str)
    }
    /// `-m set [!] --match-set NAME DIRS`: (name, dirs, negated), in order.
    fn sets(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w == "--match-set"
                && let (Some(n), Some(d)) = (self.words.get(i + 1), self.words.get(i + 2))
            {
                let neg = i > 0 && self.words[i - 1] == "!";
                out.push((n.clone(), d.clone(), neg));
            }
        }
        out
    }
    fn target(&self) -> Option<&str> {
        self.value("-j").or_else(|| self.value("-g"))
    }
}

fn words(l: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in l.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_iptables(text: &str) -> Vec<Rule> {
    let mut out = Vec::new();
    for l in text.lines() {
        // Counters first when saved with -c.
        let l = match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
            Some((_, rest)) => rest,
            None => l,
        };
        let Some(r) = l.strip_prefix("-A ") else {
            continue;
        };
        let w = words(r);
        if let Some((chain, rest)) = w.split_first() {
            out.push(Rule {
                chain: chain.clone(),
                words: rest.to_vec(),
            });
        }
    }
    out
}

/// Whitelist entries with /0 put back together from the two halves ipset holds.
fn rejoin_halves(v: Vec<IpNet>) -> Vec<IpNet> {
    let half = |n: &IpNet, hi: bool| {
        n.prefix_len() == 1
            && match n {
                IpNet::V4(a) => (u32::from(a.network()) >> 31 == 1) == hi,
                IpNet::V6(a) => (u128::from(a.network()) >> 127 == 1) == hi,
            }
    };
    let mut out = Vec::new();
    let mut skip = HashSet::new();
    for (i, n) in v.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        if half(n, false)
            && let Some(j) = v
                .iter()
                .position(|m| half(m, true) && (m.addr().is_ipv4() == n.addr().is_ipv4()))
        {
            skip.insert(j);
            out.push(IpNet::new(n.addr(), 0).expect("/0").trunc());
            continue;
        }
        out.push(*n);
    }
    out
}

fn port_spec(proto: &str, port: Option<&str>) -> Option<PortSpec> {
    let range = |p: Option<&str>| -> Option<(u16, u16)> {
        let p = p?;
        let (lo, hi) = p.split_once([':', '-']).unwrap_or((p, p));
        Some((lo.parse().ok()?, hi.parse().ok()?))
    };
    match proto {
        "tcp" | "6" => range(port).map(|(a, b)| PortSpec::Tcp(a, b)),
        "udp" | "17" => range(port).map(|(a, b)| PortSpec::Udp(a, b)),
        "icmp" | "ipv6-icmp" | "icmpv6" | "1" | "58" => Some(PortSpec::Icmp),
        _ => None,
    }
}

/// Reads an `ipset save` text and, optionally, an `iptables-save` text (IPv4 and IPv6 saves
/// may be concatenated). Fails only on text that is not what it claims to be.
pub fn import(ipset_save: &str, iptables_save: Option<&str>) -> Result<Imported, String> {
    let sets = parse_ipset(ipset_save).map_err(|e| format!("the ipset save: {e}"))?;
    let rules = iptables_save.map(parse_iptables).unwrap_or_default();
    let ours = rules.iter().find_map(|r| {
        let c = r.chain.strip_suffix("-IN")?;
        (c == "ISOLATION" || c.starts_with("ISO-")).then(|| c.to_string())
    });
    let mut imported = match ours {
        Some(prefix) => import_ours(&sets, &rules, &prefix),
        None => import_recipe(&sets, iptables_save.map(|_| rules.as_slice())),
    };
    drop_empty_networks(&mut imported);
    // What is printed must be a policy file `apply` takes: anything else the saves made is
    // refused here, not by the operator's next command.
    let text = crate::policy::to_toml(&imported.policy);
    if let Err(e) = crate::policy::parse("the imported policy", &text) {
        return Err(format!("the saves make no valid policy: {e}"));
    }
    Ok(imported)
}

/// A set with no member (or none that is an address) makes no network: a policy cannot
/// hold one. It is left out with a note, and so are the rules that name it.
fn drop_empty_networks(imported: &mut Imported) {
    let p = &mut imported.policy;
    let empty: Vec<String> = p
        .networks
        .iter()
        .filter(|(_, subnets)| subnets.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    if empty.is_empty() {
        return;
    }
    let names = |e: &Endpoint| matches!(e, Endpoint::Network(n) if empty.contains(n));
    let (rules, excepts) = (p.isolation.allow.len(), p.isolation.except.len());
    p.isolation
        .allow
        .retain(|r| !names(&r.from) && !names(&r.to));
    p.isolation
        .except
        .retain(|r| !names(&r.from) && !names(&r.to));
    let dropped = rules - p.isolation.allow.len() + excepts - p.isolation.except.len();
    for n in &empty {
        p.networks.remove(n);
        imported.notes.push(format!(
            "network '{n}' has no address in its set: left out, with the rules naming it"
        ));
    }
    if dropped > 0 {
        imported
            .notes
            .push(format!("{dropped} rule(s) named a network left out"));
    }
}

/// A blocklist set's members into `p.blocklist.entries`: those for good (no timeout, or
/// `timeout 0`); those with a timeout are live bans, not policy, and are counted in a note.
fn take_blocklist(p: &mut Policy, name: &str, s: &Set, notes: &mut Vec<String>) {
    let mut timed = 0;
    for (i, m) in s.members.iter().enumerate() {
        if s.timeouts.get(i).copied().unwrap_or(0) > 0 {
            timed += 1;
            continue;
        }
        let Some(n) = net(m) else { continue };
        if crate::policy::check_block_entry(&n).is_ok() && !p.blocklist.entries.contains(&n) {
            p.blocklist.entries.push(n);
        }
    }
    if timed > 0 {
        notes.push(format!(
            "{timed} member(s) of '{name}' have a timeout: live bans, not policy, so left out \
             (their feed adds them again; by hand: isolation-user block add ADDR --timeout D)"
        ));
    }
}

/// What this tool's iptables backend loads.
fn import_ours(sets: &[(String, Set)], rules: &[Rule], prefix: &str) -> Imported {
    let mut notes = Vec::new();
    let (input, iso, vx) = (
        format!("{prefix}-IN"),
        format!("{prefix}-ISO"),
        format!("{prefix}-VX"),
    );
    let key = |r: &Rule| r.value("--comment").unwrap_or("").to_string();
    let members = |name: &str| -> Vec<IpNet> {
        sets.iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.members.iter().filter_map(|m| net(m)).collect())
            .unwrap_or_default()
    };
    // The part of a set name after `{set prefix}-{generation}-`, and its family.
    let what = |name: &str| -> Option<(String, String)> {
        let mut parts = name.rsplitn(3, '-');
        let tail = parts.next()?;
        // By characters: a set name is the file's text, and may end in any character.
        let cut = tail.char_indices().rev().nth(1)?.0;
        let (w, fam) = tail.split_at(cut);
        Some((w.to_string(), fam.to_string()))
    };
    let mut p = Policy::default();
    // Networks: n{i}v4 / n{i}v6, named n00, n01, ... (so that their order, and so their
    // sets' numbers, stay the same).
    let mut net_of: HashMap<String, String> = HashMap::new();
    for (name, s) in sets {
        if let Some((w, _)) = what(name)
            && let Some(i) = w.strip_prefix('n').and_then(|i| i.parse::<usize>().ok())
        {
            let n = format!("n{i:02}");
            net_of.insert(name.clone(), n.clone());
            p.networks
                .entry(n)
                .or_default()
                .extend(s.members.iter().filter_map(|m| net(m)));
        }
    }
    let endpoint = |r: &Rule, dir: &str| -> Option<Endpoint> {
        let flag = if dir == "src" { "-s" } else { "-d" };
        if let Some(c) = r.value(flag) {
            return net(c).map(Endpoint::Cidr);
        }
        r.sets()
            .into_iter()
            .find(|(_, d, neg)| d == dir && !neg)
            .and_then(|(s, _, _)| net_of.get(&s).cloned())
            .map(Endpoint::Network)
    };
    let mut allow: BTreeMap<usize, AllowRule> = BTreeMap::new();
    let mut except: BTreeMap<usize, ExceptRule> = BTreeMap::new();
    let mut wl_sets = Vec::new();
    // The blocklist: the sets of the rule counted as `blocked`.
    let bl_sets: Vec<String> = rules
        .iter()
        .filter(|r| r.chain == input && key(r).ends_with(":blocked"))
        .flat_map(|r| r.sets().into_iter().map(|s| s.0))
        .collect();
    let (mut blocked, mut blocked_log) = (false, false);
    let mut default = DefaultAction::Accept;
    let mut reject = false;
    for r in rules {
        let k = key(r);
        let mut parts = k.split(':');
        let (_, reason, kind, idx) = (parts.next(), parts.next(), parts.next(), parts.next());
        if r.chain == input {
            let on_blocklist = r.sets().iter().any(|s| bl_sets.contains(&s.0));
            match reason {
                Some("whitelisted") => wl_sets.extend(r.sets().into_iter().map(|s| s.0)),
                Some("not-whitelisted") => p.whitelist.enabled = true,
                Some("blocked") => blocked = true,
                _ if r.target() == Some("NFLOG") && on_blocklist => blocked_log = true,
                _ if r.target() == Some("NFLOG") => p.whitelist.log = true,
                _ => {}
            }
            continue;
        }
        if r.chain == vx {
            continue;
        }
        if r.chain != iso {
            continue;
        }
        match (reason, kind, idx.and_then(|i| i.parse::<usize>().ok())) {
            (Some("allow-rule"), Some("allow"), Some(i)) => {
                let (Some(from), Some(to)) = (endpoint(r, "src"), endpoint(r, "dst")) else {
                    notes.push(format!("allow rule #{i}: an endpoint could not be read"));
                    continue;
                };
                let e = allow.entry(i).or_insert(AllowRule {
                    from,
                    to,
                    ports: vec![],
                });
                if let Some(proto) = r.value("-p")
                    && let Some(ps) = port_spec(proto, r.value("--dport"))
                    && !e.ports.contains(&ps)
                {
                    e.ports.push(ps);
                }
            }
            (Some("except"), Some("except"), Some(j)) => {
                if let (Some(from), Some(to)) = (endpoint(r, "src"), endpoint(r, "dst")) {
                    except.entry(j).or_insert(ExceptRule { from, to });
                }
            }
            (Some("default-accept"), ..) => default = DefaultAction::Accept,
            (Some("isolated-reject"), ..) => {
                default = DefaultAction::Deny;
                reject = true;
            }
            (Some("isolated-drop"), ..) => default = DefaultAction::Deny,
            _ => {}
        }
    }
    if rules.iter().any(|r| r.chain == vx) {
        notes.push(
            "the rules judge VXLAN traffic but do not say on which ports: add them to [isolation] vxlan_ports".into(),
        );
    }
    let mut wl = Vec::new();
    for f in ["v4", "v6"] {
        if let Some(s) = wl_sets
            .iter()
            .find(|s| what(s).is_some_and(|(w, fam)| w == "wl" && fam == f))
        {
            wl.extend(members(s));
        }
    }
    p.whitelist.allow = rejoin_halves(wl);
    p.isolation = Isolation {
        default,
        reject,
        vxlan_ports: vec![],
        allow: allow.into_values().collect(),
        except: except.into_values().collect(),
    };
    p.blocklist.enabled = blocked;
    p.blocklist.log = blocked_log;
    for name in &bl_sets {
        if let Some((_, s)) = sets.iter().find(|(n, _)| n == name) {
            take_blocklist(&mut p, name, s, &mut notes);
        }
    }
    Imported { policy: p, notes }
}

/// A name the policy takes for a set: reserved prefixes dropped, other characters mapped.
fn network_name(set: &str, notes: &mut Vec<String>) -> String {
    let mut n: String = set
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    for p in ["dcos-", "mesos-"] {
        if let Some(rest) = n.strip_prefix(p) {
            n = rest.to_string();
        }
    }
    n.truncate(24);
    if n.is_empty() || check_name(&n).is_err() {
        n = "net".into();
    }
    if n != set {
        notes.push(format!(
            "set '{set}' became network '{n}' (network names are 1 to 24 letters, digits, '-' or '_', and dcos-/mesos- are reserved)"
        ));
    }
    n
}

/// The classic recipe.
fn import_recipe(sets: &[(String, Set)], rules: Option<&[Rule]>) -> Imported {
    let mut notes = Vec::new();
    let kind_of: HashMap<&str, &str> = sets
        .iter()
        .map(|(n, s)| (n.as_str(), s.kind.as_str()))
        .collect();
    let members = |name: &str| -> &[String] {
        sets.iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.members.as_slice())
            .unwrap_or(&[])
    };
    // Networks: the hash:net members of list:sets.
    let mut p = Policy::default();
    let mut net_of: HashMap<String, String> = HashMap::new();
    let mut used: HashSet<&str> = HashSet::new();
    for (name, s) in sets.iter().filter(|(_, s)| s.kind == "list:set") {
        used.insert(name);
        for m in &s.members {
            if kind_of.get(m.as_str()) != Some(&"hash:net") {
                notes.push(format!(
                    "'{m}' in list:set '{name}' is not a hash:net set; not a network"
                ));
                continue;
            }
            used.insert(m);
            let mut n = network_name(m, &mut notes);
            while p.networks.contains_key(&n) && net_of.get(m) != Some(&n) {
                n.push('_');
            }
            net_of.insert(m.clone(), n.clone());
            p.networks
                .entry(n)
                .or_default()
                .extend(members(m).iter().filter_map(|x| net(x)));
        }
    }
    // A CIDR that is exactly one network's only subnet is written as that network.
    let endpoint = |s: &str| -> Option<Endpoint> {
        let c = net(s)?;
        Some(
            p.networks
                .iter()
                .find(|(_, v)| v.as_slice() == [c])
                .map(|(n, _)| Endpoint::Network(n.clone()))
                .unwrap_or(Endpoint::Cidr(c)),
        )
    };
    // The isolation chain: the one whose rules use the pair sets (or jumped to with a
    // list:set on both sides). Its order says which pair set holds exceptions (before the
    // ESTABLISHED rule) and which allowed pairs (after).
    let pair_sets: Vec<&str> = sets
        .iter()
        .filter(|(_, s)| s.kind == "hash:net,net" || s.kind == "hash:net,port,net")
        .map(|(n, _)| n.as_str())
        .collect();
    let mut except_sets: HashSet<String> = HashSet::new();
    let mut default = (DefaultAction::Deny, true);
    match rules {
        Some(rules) => {
            let iso_chain = rules
                .iter()
                .find(|r| {
                    r.sets()
                        .iter()
                        .any(|(s, _, _)| pair_sets.contains(&s.as_str()))
                })
                .map(|r| r.chain.clone());
            if let Some(c) = iso_chain {
                let mut before_established = true;
                let mut last = None;
                for r in rules.iter().filter(|r| r.chain == c) {
                    if r.value("--ctstate")
                        .is_some_and(|s| s.contains("ESTABLISHED"))
                    {
                        before_established = false;
                    }
                    for (s, _, _) in r.sets() {
                        if before_established && kind_of.get(s.as_str()) == Some(&"hash:net,net") {
                            except_sets.insert(s);
                        }
                    }
                    last = r.target().map(str::to_string);
                }
                default = match last.as_deref() {
                    Some("REJECT") => (DefaultAction::Deny, true),
                    Some("DROP") => (DefaultAction::Deny, false),
                    _ => (DefaultAction::Accept, false),
                };
            } else {
                notes.push(
                    "no chain uses the pair sets: isolation default taken as deny with REJECT"
                        .into(),
                );
            }
        }
        None => {
            for s in &pair_sets {
                if s.contains("except") {
                    except_sets.insert(s.to_string());
                }
            }
            notes.push(
                "without --iptables-save, the default is taken as deny with REJECT and a hash:net,net set is an exceptions set only when its name says \"except\"".into(),
            );
        }
    }
    // Pairs and triples.
    let mut allow: Vec<AllowRule> = Vec::new();
    let mut except: Vec<ExceptRule> = Vec::new();
    for (name, s) in sets {
        match s.kind.as_str() {
            "hash:net,net" => {
                used.insert(name);
                for m in &s.members {
                    let Some((a, b)) = m.split_once(',') else {
                        continue;
                    };
                    let (Some(from), Some(to)) = (endpoint(a), endpoint(b)) else {
                        notes.push(format!("'{m}' in '{name}' is not a pair of CIDRs"));
                        continue;
                    };
                    if except_sets.contains(name) {
                        except.push(ExceptRule { from, to });
                    } else {
                        allow.push(AllowRule {
                            from,
                            to,
                            ports: vec![],
                        });
                    }
                }
            }
            "hash:net,port,net" => {
                used.insert(name);
                for m in &s.members {
                    let f: Vec<&str> = m.split(',').collect();
                    let parsed = match f.as_slice() {
                        [a, port, b] => {
                            let (proto, num) = port.split_once(':').unwrap_or(("tcp", port));
                            let spec = port_spec(proto, Some(num)).or_else(|| {
                                matches!(proto, "icmp" | "icmpv6").then_some(PortSpec::Icmp)
                            });
                            match (endpoint(a), endpoint(b), spec) {
                                (Some(x), Some(y), Some(sp)) => Some((x, y, sp)),
                                _ => None,
                            }
                        }
                        _ => None,
                    };
                    let Some((from, to, spec)) = parsed else {
                        notes.push(format!(
                            "'{m}' in '{name}' could not be read as net,proto:port,net"
                        ));
                        continue;
                    };
                    match allow
                        .iter_mut()
                        .find(|r| r.from == from && r.to == to && !r.ports.is_empty())
                    {
                        Some(r) if !r.ports.contains(&spec) => r.ports.push(spec),
                        Some(_) => {}
                        None => allow.push(AllowRule {
                            from,
                            to,
                            ports: vec![spec],
                        }),
                    }
                }
            }
            _ => {}
        }
    }
    if !except.is_empty() {
        notes.push(
            "except entries apply in both directions here (the recipe's set matched src,dst only)"
                .into(),
        );
    }
    // The blocklist: hash:ip / hash:net sets matched on the source by a rule that drops
    // (`-m set --match-set S src -j DROP`, what fail2ban's and CrowdSec's ipset actions
    // write). Without rules nothing says a set is one.
    if let Some(rules) = rules {
        let mut found: Vec<&str> = Vec::new();
        for (name, s) in sets {
            if used.contains(name.as_str()) || !(s.kind == "hash:ip" || s.kind == "hash:net") {
                continue;
            }
            let dropping = rules.iter().any(|r| {
                r.target() == Some("DROP")
                    && matches!(r.sets().as_slice(), [(n, d, false)] if n == name && d == "src")
            });
            if dropping {
                used.insert(name);
                found.push(name);
                take_blocklist(&mut p, name, s, &mut notes);
            }
        }
        p.blocklist.log = rules.iter().any(|r| {
            matches!(r.target(), Some("LOG" | "NFLOG"))
                && r.sets().iter().any(|(n, ..)| found.contains(&n.as_str()))
        });
    }
    // The whitelist: hash:ip / hash:net sets not used as networks, matched on the source in a
    // chain that ends in DROP (or, without rules, every such set).
    let mut wl: Vec<IpNet> = Vec::new();
    let mut wl_found = false;
    let mut log = false;
    for (name, s) in sets {
        if used.contains(name.as_str()) || !(s.kind == "hash:ip" || s.kind == "hash:net") {
            if !used.contains(name.as_str()) {
                notes.push(format!("set '{name}' ({}) is not translated", s.kind));
            }
            continue;
        }
        let is_whitelist = match rules {
            Some(rules) => rules.iter().any(|r| {
                r.sets()
                    .iter()
                    .any(|(n, d, neg)| n == name && d == "src" && !neg)
                    && rules
                        .iter()
                        .rfind(|x| x.chain == r.chain)
                        .is_some_and(|x| x.target() == Some("DROP"))
            }),
            None => true,
        };
        if !is_whitelist {
            notes.push(format!(
                "set '{name}' ({}) is not translated: no chain uses it as a whitelist",
                s.kind
            ));
            continue;
        }
        wl_found = true;
        if let Some(rules) = rules
            && let Some(r) = rules
                .iter()
                .find(|r| r.sets().iter().any(|(n, ..)| n == name))
        {
            log |= rules
                .iter()
                .any(|x| x.chain == r.chain && matches!(x.target(), Some("LOG" | "NFLOG")));
        }
        wl.extend(s.members.iter().filter_map(|m| net(m)));
    }
    p.whitelist = Whitelist {
        enabled: wl_found,
        log,
        allow: wl,
    };
    p.isolation = Isolation {
        default: default.0,
        reject: default.1,
        vxlan_ports: vec![],
        allow,
        except,
    };
    Imported { policy: p, notes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    const RECIPE_IPSET: &str = "\
create whitelist hash:ip family inet hashsize 1024 maxelem 65536
add whitelist 203.0.113.7
add whitelist 192.0.2.10
create dcos-it hash:net family inet hashsize 1024 maxelem 65536
add dcos-it 198.51.100.0/25
create hr hash:net family inet hashsize 1024 maxelem 65536
add hr 198.51.100.128/25
create overlays list:set size 8
add overlays dcos-it
add overlays hr
create allow-ports hash:net,port,net family inet hashsize 1024 maxelem 65536
add allow-ports 198.51.100.128/25,tcp:80,198.51.100.0/25
add allow-ports 198.51.100.128/25,tcp:443,198.51.100.0/25
create allow-pairs hash:net,net family inet hashsize 1024 maxelem 65536
add allow-pairs 198.51.100.0/25,192.0.2.0/24
create exceptions hash:net,net family inet hashsize 1024 maxelem 65536
add exceptions 198.51.100.10/32,198.51.100.200/32
";

    const RECIPE_IPTABLES: &str = "\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:isolation - [0:0]
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -m set --match-set whitelist src -j ACCEPT
-A INPUT -j LOG --log-prefix \"not whitelisted \"
-A INPUT -j DROP
-A FORWARD -m set --match-set overlays src -m set --match-set overlays dst -j isolation
-A isolation -m set --match-set exceptions src,dst -j RETURN
-A isolation -m set --match-set dcos-it src -m set --match-set dcos-it dst -j RETURN
-A isolation -m set --match-set hr src -m set --match-set hr dst -j RETURN
-A isolation -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
-A isolation -m set --match-set allow-pairs src,dst -j RETURN
-A isolation -m set --match-set allow-ports src,dst,dst -j RETURN
-A isolation -j REJECT --reject-with icmp-port-unreachable
COMMIT
";

    #[test]
    fn the_classic_recipe_becomes_a_policy() {
        let got = import(RECIPE_IPSET, Some(RECIPE_IPTABLES)).unwrap();
        let p = &got.policy;
        assert_eq!(
            p.networks["it"],
            vec!["198.51.100.0/25".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            p.networks["hr"],
            vec!["198.51.100.128/25".parse::<IpNet>().unwrap()]
        );
        assert_eq!(p.isolation.default, DefaultAction::Deny);
        assert!(p.isolation.reject);
        assert_eq!(p.isolation.allow.len(), 2, "{:?}", p.isolation.allow);
        assert_eq!(p.isolation.allow[0].from, Endpoint::Network("hr".into()));
        assert_eq!(p.isolation.allow[0].to, Endpoint::Network("it".into()));
        assert_eq!(
            p.isolation.allow[0].ports,
            vec![PortSpec::Tcp(80, 80), PortSpec::Tcp(443, 443)]
        );
        assert_eq!(
            p.isolation.allow[1].to,
            Endpoint::Cidr("192.0.2.0/24".parse().unwrap())
        );
        assert_eq!(p.isolation.except.len(), 1);
        assert!(p.whitelist.enabled && p.whitelist.log);
        assert_eq!(p.whitelist.allow.len(), 2);
        assert!(
            got.notes
                .iter()
                .any(|n| n.contains("'dcos-it' became network 'it'")),
            "{:?}",
            got.notes
        );
        // What it prints parses back to itself.
        let text = policy::to_toml(p);
        assert_eq!(&policy::parse("imported.toml", &text).unwrap(), p);
    }

    #[test]
    fn without_rules_the_names_decide_and_a_note_says_so() {
        let got = import(RECIPE_IPSET, None).unwrap();
        assert_eq!(got.policy.isolation.except.len(), 1);
        assert!(
            got.notes
                .iter()
                .any(|n| n.contains("without --iptables-save"))
        );
    }

    #[test]
    fn what_is_not_ipset_save_is_refused_with_its_line() {
        let e = import("create a hash:ip\nflush a\n", None).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = import("add a 192.0.2.1\n", None).unwrap_err();
        assert!(e.contains("before `create a`"), "{e}");
    }

    /// Found by the `import` fuzz target: a set of ours with no member made a network with
    /// no subnets, printed as a policy that does not parse. The network is left out with a
    /// note, with the rules naming it; a network with members stays (positive control).
    #[test]
    fn an_empty_set_makes_no_network() {
        let ipset = "create isolatio-n3v4 hash:net family inet\n\
                     create isolation-1-n4v4 hash:net family inet\n\
                     add isolation-1-n4v4 192.0.2.0/24\n";
        let rules = "*filter\n:ISOLATION-IN - [0:0]\n-A ISOLATION-IN -j DROP\nCOMMIT\n";
        let got = import(ipset, Some(rules)).unwrap();
        assert!(
            !got.policy.networks.values().any(|s| s.is_empty()),
            "{:?}",
            got.policy.networks
        );
        assert!(crate::policy::parse("x", &crate::policy::to_toml(&got.policy)).is_ok());
        let empty = "create isolation-1-n3v4 hash:net family inet\n";
        let got = import(empty, Some(rules)).unwrap();
        assert!(got.policy.networks.is_empty(), "{:?}", got.policy.networks);
        assert!(
            got.notes.iter().any(|n| n.contains("'n03' has no address")),
            "{:?}",
            got.notes
        );
        let got = import(ipset, Some(rules)).unwrap();
        assert_eq!(got.policy.networks.len(), 1, "{:?}", got.policy.networks);
    }

    /// Set names are the file's text: one ending in a multi-byte character (beside our
    /// own chains, so that names are cut into their parts) is read, not a panic.
    #[test]
    fn a_set_name_ending_in_any_character_is_read() {
        for name in ["ISO-1-né", "ISO-1-n0v€", "ISO-1-€", "€"] {
            let ipset = format!("create {name} hash:net family inet\nadd {name} 192.0.2.0/24\n");
            let rules = "*filter\n:ISOLATION-IN - [0:0]\n-A ISOLATION-IN -j DROP\nCOMMIT\n";
            let got = import(&ipset, Some(rules));
            assert!(got.is_ok(), "{name}: {got:?}");
        }
    }

    #[test]
    fn our_own_export_reads_back_the_same() {
        use crate::backend::{Format, export};
        let p = policy::parse("p.toml", policy::tests::EVERY_KIND).unwrap();
        let paths = crate::state::Paths {
            pin_dir: crate::state::DEFAULT_PIN_DIR.into(),
            state_dir: crate::state::DEFAULT_STATE_DIR.into(),
        };
        let first = export(&paths, Format::Iptables, &p, &[]);
        let (ipset, iptables) = first.split_once("# iptables-restore").unwrap();
        let back = import(ipset, Some(iptables)).unwrap();
        assert!(back.notes.is_empty(), "{:?}", back.notes);
        let again = export(&paths, Format::Iptables, &back.policy, &[]);
        assert_eq!(first, again);
        // With a blocklist: its permanent entries and switches come back too.
        let text = format!(
            "{}\n[blocklist]\nlog = false\nentries = [\"203.0.113.0/24\", \"2001:db8:bad::1\"]\n",
            policy::tests::EVERY_KIND
        );
        let p = policy::parse("p.toml", &text).unwrap();
        let first = export(&paths, Format::Iptables, &p, &[]);
        let (ipset, iptables) = first.split_once("# iptables-restore").unwrap();
        let back = import(ipset, Some(iptables)).unwrap();
        assert_eq!(back.policy.blocklist, p.blocklist);
        assert_eq!(export(&paths, Format::Iptables, &back.policy, &[]), first);
    }

    /// A fail2ban- or CrowdSec-style set (`timeout`, and a DROP rule matching it) becomes
    /// `[blocklist]`: its entries for good go in, those with a timeout are live bans and
    /// are left out with a note. It is not taken for a whitelist.
    #[test]
    fn a_set_with_timeouts_and_a_drop_rule_becomes_the_blocklist() {
        let ipset = "create f2b-sshd hash:ip family inet hashsize 1024 maxelem 65536 timeout 600\n\
                     add f2b-sshd 198.51.100.7 timeout 0\n\
                     add f2b-sshd 198.51.100.9 timeout 412\n\
                     create admins hash:net family inet hashsize 1024 maxelem 65536\n\
                     add admins 192.0.2.0/24\n";
        let iptables = "*filter\n:INPUT DROP [0:0]\n\
                        -A INPUT -m set --match-set f2b-sshd src -j DROP\n\
                        -A INPUT -m set --match-set admins src -j ACCEPT\n\
                        -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n\
                        -A INPUT -j DROP\nCOMMIT\n";
        let got = import(ipset, Some(iptables)).unwrap();
        let p = &got.policy;
        assert_eq!(
            p.blocklist.entries,
            vec!["198.51.100.7/32".parse::<IpNet>().unwrap()]
        );
        assert!(p.blocklist.enabled && !p.blocklist.log);
        assert_eq!(
            p.whitelist.allow,
            vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert!(
            got.notes
                .iter()
                .any(|n| n.contains("1 member(s) of 'f2b-sshd' have a timeout")),
            "{:?}",
            got.notes
        );
    }
}
