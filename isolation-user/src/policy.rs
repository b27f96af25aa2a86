//! The policy file (PRODUCT.md): parsing and validation, pure and without I/O.
//!
//! A policy is refused whole on its first error, which names the file, the line and the
//! reason; nothing is applied from a policy that did not validate.
//!
//! Its size: the types, the parser that remembers every item's line (for errors and
//! limits), validation and the TOML writer are one format's definition, each a reader of the
//! others; a third of the file is its tests (one case per error message).

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// What a denied packet gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DefaultAction {
    #[default]
    Accept,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Network(String),
    Cidr(IpNet),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Network(n) => f.write_str(n),
            Endpoint::Cidr(c) => write!(f, "{c}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Tcp(u16, u16),
    Udp(u16, u16),
    Icmp,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, lo, hi) = match *self {
            PortSpec::Icmp => return f.write_str("icmp"),
            PortSpec::Tcp(lo, hi) => ("tcp", lo, hi),
            PortSpec::Udp(lo, hi) => ("udp", lo, hi),
        };
        if lo == hi {
            write!(f, "{proto}:{lo}")
        } else {
            write!(f, "{proto}:{lo}-{hi}")
        }
    }
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad port '{s}': expected tcp:80, udp:53, tcp:8000-8100 or icmp");
        if s == "icmp" {
            return Ok(PortSpec::Icmp);
        }
        let (proto, range) = s.split_once(':').ok_or_else(bad)?;
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (a, b),
            None => (range, range),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
        let (lo, hi) = (port(lo).ok_or_else(bad)?, port(hi).ok_or_else(bad)?);
        if lo > hi {
            return Err(format!("bad port range '{s}': {lo} is above {hi}"));
        }
        match proto {
            "tcp" => Ok(PortSpec::Tcp(lo, hi)),
            "udp" => Ok(PortSpec::Udp(lo, hi)),
            _ => Err(bad()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub from: Endpoint,
    pub to: Endpoint,
    /// Empty: any protocol and port.
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceptRule {
    pub from: Endpoint,
    pub to: Endpoint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolation {
    pub default: DefaultAction,
    pub reject: bool,
    pub vxlan_ports: Vec<u16>,
    pub allow: Vec<AllowRule>,
    pub except: Vec<ExceptRule>,
}

impl Default for Isolation {
    fn default() -> Self {
        Isolation {
            default: DefaultAction::Accept,
            reject: true,
            vxlan_ports: vec![],
            allow: vec![],
            except: vec![],
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Whitelist {
    pub enabled: bool,
    pub log: bool,
    pub allow: Vec<IpNet>,
}

/// Sources dropped before anything else is asked (`[blocklist]`). The permanent entries
/// are the policy's; entries with a deadline (`block add --timeout`, the feeds) are live
/// state the store keeps beside it (`crate::blocklist`). On unless a policy says
/// `enabled = false`: a feed's bans hold without a `[blocklist]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocklist {
    pub enabled: bool,
    pub log: bool,
    pub entries: Vec<IpNet>,
}

impl Default for Blocklist {
    fn default() -> Self {
        Blocklist {
            enabled: true,
            log: true,
            entries: vec![],
        }
    }
}

/// Why a blocklist entry is refused: a /0 blocks every source of its family (and neither
/// ipset's `hash:net` nor an operator means that).
pub fn check_block_entry(n: &IpNet) -> Result<(), String> {
    if n.prefix_len() == 0 {
        return Err(format!(
            "'{n}' would block every {} source: block narrower prefixes",
            if matches!(n, IpNet::V4(_)) {
                "IPv4"
            } else {
                "IPv6"
            }
        ));
    }
    Ok(())
}

/// How many connections the datapath remembers (`[connections]`): each of its two tables,
/// new flows and established ones, holds up to `max`. The iptables backend leaves this to
/// the kernel's conntrack (`net.netfilter.nf_conntrack_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connections {
    pub max: u32,
}

impl Connections {
    /// 65,536 per table: ~8 MiB of kernel memory each, a host's worth of connections.
    pub const DEFAULT_MAX: u32 = isolation_common::limits::CONNTRACK;
    pub const MIN: u32 = 1 << 10;
    /// 4M per table (~0.5 GiB each).
    pub const MAX: u32 = 1 << 22;
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            max: Self::DEFAULT_MAX,
        }
    }
}

/// A validated policy. `Policy::default()` is the built-in allow-all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub isolation: Isolation,
    pub networks: BTreeMap<String, Vec<IpNet>>,
    pub whitelist: Whitelist,
    pub connections: Connections,
    pub blocklist: Blocklist,
}

// --- the file as written, with spans for error lines ---

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy<'a> {
    isolation: Option<Spanned<RawIsolation>>,
    #[serde(default)]
    networks: BTreeMap<Spanned<String>, Spanned<RawNetwork>>,
    #[serde(borrow)]
    whitelist: Option<Spanned<RawWhitelist<'a>>>,
    connections: Option<Spanned<RawConnections>>,
    blocklist: Option<Spanned<RawBlocklist>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlocklist {
    enabled: Option<bool>,
    log: Option<bool>,
    #[serde(default)]
    entries: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    max: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIsolation {
    default: Option<Spanned<String>>,
    reject: Option<bool>,
    #[serde(default)]
    vxlan_ports: Vec<Spanned<i64>>,
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
    #[serde(default)]
    except: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Spanned<String>,
    to: Spanned<String>,
    ports: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    subnets: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhitelist<'a> {
    enabled: Option<bool>,
    log: Option<bool>,
    /// Borrowed from the text where it has no escapes (nearly always): a million entries
    /// are then no million allocations.
    #[serde(default, borrow)]
    allow: Vec<Spanned<std::borrow::Cow<'a, str>>>,
}

/// The example policy: what the package installs as `/etc/isolation/policy.toml`, shown in
/// the README and docs/policy.md (a test holds them to it) and run by the demo. Tests that
/// need a policy of this shape start from it.
pub const EXAMPLE: &str = include_str!("../../packaging/policy.example.toml");

/// Parses an address ("203.0.113.7", a host route) or a CIDR ("192.0.2.0/24"). A CIDR with
/// host bits set is refused: "192.0.2.5/24" is more likely a typo than a wish for the /24.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    // One family's parser, chosen by the colon every IPv6 form has and no IPv4 one does
    // (`IpAddr::from_str` tries IPv4 first: for a million IPv6 entries, a million failures).
    let addr = if s.contains(':') {
        s.parse::<std::net::Ipv6Addr>().map(IpAddr::V6)
    } else {
        s.parse::<std::net::Ipv4Addr>().map(IpAddr::V4)
    };
    if let Ok(a) = addr {
        return Ok(IpNet::from(a));
    }
    let net = IpNet::from_str(s).map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
    if net.trunc() != net {
        return Err(format!(
            "'{s}' has host bits set beyond its /{}: did you mean {}?",
            net.prefix_len(),
            net.trunc()
        ));
    }
    Ok(net)
}

/// A set member as `ipset save` writes it: a CIDR (host bits dropped), or an address (its
/// host route). Lenient where `parse_net` is strict: it reads what a kernel wrote.
pub fn parse_member(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// A rule endpoint: a CIDR or address, or the name of a defined network.
pub fn parse_endpoint(
    s: &str,
    networks: &BTreeMap<String, Vec<IpNet>>,
) -> Result<Endpoint, String> {
    let v = s.trim();
    if v.contains('/') || v.parse::<IpAddr>().is_ok() {
        return parse_net(v).map(Endpoint::Cidr);
    }
    if networks.contains_key(v) {
        Ok(Endpoint::Network(v.to_string()))
    } else if RESERVED_PREFIXES.iter().any(|p| v.starts_with(p)) {
        Err(format!("network name '{v}' is reserved"))
    } else {
        Err(format!(
            "unknown network '{v}' (not a [networks.{v}] section, nor a CIDR)"
        ))
    }
}

/// Checks a policy built in code (live edits) as `parse` checks a file.
pub fn validate(p: &Policy) -> Result<(), String> {
    let (lo, hi) = (Connections::MIN, Connections::MAX);
    if !(lo..=hi).contains(&p.connections.max) {
        return Err(format!(
            "connections: max = {} is out of range: expected {lo} to {hi}",
            p.connections.max
        ));
    }
    for (name, subnets) in &p.networks {
        check_network_name(name)?;
        if subnets.is_empty() {
            return Err(format!("network '{name}' has no subnets"));
        }
    }
    let known = |e: &Endpoint| match e {
        Endpoint::Network(n) if !p.networks.contains_key(n) => {
            Err(format!("unknown network '{n}'"))
        }
        _ => Ok(()),
    };
    for r in &p.isolation.allow {
        known(&r.from)?;
        known(&r.to)?;
    }
    for r in &p.isolation.except {
        known(&r.from)?;
        known(&r.to)?;
    }
    for n in &p.blocklist.entries {
        check_block_entry(n).map_err(|e| format!("blocklist: {e}"))?;
    }
    Ok(())
}

pub fn check_name(name: &str) -> Result<(), String> {
    check_network_name(name)
}

const RESERVED_PREFIXES: [&str; 2] = ["dcos-", "mesos-"];
/// Network names become ipset names in the iptables backend, which allows 31 bytes.
const MAX_NAME_LEN: usize = 24;

fn check_network_name(name: &str) -> Result<(), String> {
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(format!(
            "network name '{name}' is reserved (names beginning with '{p}' belong to DC/OS)"
        ));
    }
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "bad network name '{name}': use 1 to {MAX_NAME_LEN} letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

struct Ctx<'a> {
    file: &'a str,
    /// Offsets of the text's newlines: a line number is one binary search away (a policy
    /// with 1M whitelist entries asks 1M times).
    newlines: Vec<usize>,
}

impl Ctx<'_> {
    fn new<'a>(file: &'a str, text: &str) -> Ctx<'a> {
        Ctx {
            file,
            newlines: text.match_indices('\n').map(|(i, _)| i).collect(),
        }
    }
    fn line(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        reason: impl Into<String>,
    ) -> Result<T, PolicyError> {
        Err(PolicyError {
            file: self.file.to_string(),
            line: self.line(span.start),
            reason: reason.into(),
        })
    }
}

/// Parses and validates a policy file's text. `file` is only used in error messages.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
    parse_with_lines(file, text).map(|(p, _)| p)
}

/// Where each item of a policy file was written, so that an error found later (a backend's
/// limit) names the line of what exceeds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lines {
    pub file: String,
    /// Each subnet of each network.
    pub subnets: BTreeMap<String, Vec<usize>>,
    /// The first line of each network's section.
    pub networks: BTreeMap<String, usize>,
    pub allow: Vec<usize>,
    pub except: Vec<usize>,
    pub vxlan_ports: Vec<usize>,
    /// The `[whitelist]` section, and each (distinct) entry.
    pub whitelist: usize,
    pub whitelist_entries: Vec<usize>,
    /// The `[blocklist]` section, and each (distinct) entry.
    pub blocklist: usize,
    pub blocklist_entries: Vec<usize>,
}

/// `parse`, and where each item was written.
pub fn parse_with_lines(file: &str, text: &str) -> Result<(Policy, Lines), PolicyError> {
    let cx = Ctx::new(file, text);
    let mut lines = Lines {
        file: file.to_string(),
        ..Lines::default()
    };
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| cx.line(s.start)).unwrap_or(1);
        PolicyError {
            file: file.to_string(),
            line,
            reason: e.message().trim().to_string(),
        }
    })?;

    let mut policy = Policy::default();

    for (name, net) in &raw.networks {
        if let Err(reason) = check_network_name(name.get_ref()) {
            return cx.err(name.span(), reason);
        }
        let mut subnets = Vec::new();
        lines
            .networks
            .insert(name.get_ref().clone(), cx.line(name.span().start));
        let at = lines.subnets.entry(name.get_ref().clone()).or_default();
        for s in &net.get_ref().subnets {
            at.push(cx.line(s.span().start));
            match parse_net(s.get_ref()) {
                Ok(n) => subnets.push(n),
                Err(reason) => {
                    return cx.err(s.span(), format!("network '{}': {reason}", name.get_ref()));
                }
            }
        }
        if subnets.is_empty() {
            return cx.err(
                net.span(),
                format!("network '{}' has no subnets", name.get_ref()),
            );
        }
        policy.networks.insert(name.get_ref().clone(), subnets);
    }

    let endpoint = |s: &Spanned<String>| -> Result<Endpoint, PolicyError> {
        parse_endpoint(s.get_ref(), &policy.networks).or_else(|r| cx.err(s.span(), r))
    };

    if let Some(iso) = &raw.isolation {
        let iso = iso.get_ref();
        let mut out = Isolation {
            default: DefaultAction::Deny,
            ..Isolation::default()
        };
        if let Some(d) = &iso.default {
            out.default = match d.get_ref().as_str() {
                "deny" => DefaultAction::Deny,
                "accept" => DefaultAction::Accept,
                other => {
                    return cx.err(
                        d.span(),
                        format!("default = \"{other}\": expected \"deny\" or \"accept\""),
                    );
                }
            };
        }
        out.reject = iso.reject.unwrap_or(true);
        for p in &iso.vxlan_ports {
            lines.vxlan_ports.push(cx.line(p.span().start));
            match u16::try_from(*p.get_ref()) {
                Ok(v) if v != 0 => out.vxlan_ports.push(v),
                _ => {
                    return cx.err(
                        p.span(),
                        format!("bad vxlan port {}: expected 1 to 65535", p.get_ref()),
                    );
                }
            }
        }
        for r in &iso.allow {
            lines.allow.push(cx.line(r.span().start));
            let rule_span = r.span();
            let r = r.get_ref();
            let mut ports = Vec::new();
            // `ports = []` would read as "no port" and mean "every port": a script that
            // empties the list must not open the pair. Absent means anything; empty is refused.
            if let Some(list) = &r.ports
                && list.is_empty()
            {
                return cx.err(
                    rule_span,
                    "an allow rule with `ports = []` allows no port: remove the key to allow anything, or name the ports",
                );
            }
            for p in r.ports.iter().flatten() {
                ports.push(
                    p.get_ref()
                        .parse::<PortSpec>()
                        .or_else(|e| cx.err(p.span(), e))?,
                );
            }
            out.allow.push(AllowRule {
                from: endpoint(&r.from)?,
                to: endpoint(&r.to)?,
                ports,
            });
        }
        for r in &iso.except {
            lines.except.push(cx.line(r.span().start));
            let rr = r.get_ref();
            if let Some(p) = rr.ports.as_ref().and_then(|p| p.first()) {
                return cx.err(
                    p.span(),
                    "an except entry takes no ports: it exempts the whole pair",
                );
            }
            out.except.push(ExceptRule {
                from: endpoint(&rr.from)?,
                to: endpoint(&rr.to)?,
            });
        }
        policy.isolation = out;
    }

    if let Some(wl) = &raw.whitelist {
        lines.whitelist = cx.line(wl.span().start);
        let wl = wl.get_ref();
        // A [whitelist] section is meant to be enforced unless it says otherwise.
        policy.whitelist.enabled = wl.enabled.unwrap_or(true);
        policy.whitelist.log = wl.log.unwrap_or(true);
        for a in &wl.allow {
            let net =
                parse_net(a.get_ref()).or_else(|r| cx.err(a.span(), format!("whitelist: {r}")))?;
            policy.whitelist.allow.push(net);
            lines.whitelist_entries.push(cx.line(a.span().start));
        }
        // An entry given twice counts once, at its first line. Found by sorting positions
        // (a million entries: a sort walks memory in order, a hash set misses at each insert).
        let allow = &policy.whitelist.allow;
        let mut order: Vec<u32> = (0..allow.len() as u32).collect();
        order.sort_unstable_by_key(|&i| (allow[i as usize], i));
        let mut dup = vec![false; allow.len()];
        for w in order.windows(2) {
            if allow[w[0] as usize] == allow[w[1] as usize] {
                dup[w[1] as usize] = true;
            }
        }
        if dup.contains(&true) {
            let kept = |i: &usize| !dup[*i];
            policy.whitelist.allow = (0..dup.len())
                .filter(kept)
                .map(|i| policy.whitelist.allow[i])
                .collect();
            lines.whitelist_entries = (0..dup.len())
                .filter(kept)
                .map(|i| lines.whitelist_entries[i])
                .collect();
        }
    }
    if let Some(bl) = &raw.blocklist {
        lines.blocklist = cx.line(bl.span().start);
        let bl = bl.get_ref();
        policy.blocklist.enabled = bl.enabled.unwrap_or(true);
        policy.blocklist.log = bl.log.unwrap_or(true);
        let mut seen = std::collections::HashSet::new();
        for e in &bl.entries {
            let net = parse_net(e.get_ref())
                .and_then(|n| check_block_entry(&n).map(|()| n))
                .or_else(|r| cx.err(e.span(), format!("blocklist: {r}")))?;
            if seen.insert(net) {
                policy.blocklist.entries.push(net);
                lines.blocklist_entries.push(cx.line(e.span().start));
            }
        }
    }
    if let Some(c) = &raw.connections
        && let Some(m) = &c.get_ref().max
    {
        let (lo, hi) = (Connections::MIN, Connections::MAX);
        policy.connections.max = match u32::try_from(*m.get_ref()) {
            Ok(v) if (lo..=hi).contains(&v) => v,
            _ => {
                return cx.err(
                    m.span(),
                    format!(
                        "connections: max = {} is out of range: expected {lo} to {hi}",
                        m.get_ref()
                    ),
                );
            }
        };
    }
    Ok((policy, lines))
}

/// How many entries a whitelist puts in each map (saved by the store, so edits check the
/// limits without reading the whitelist).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct WhitelistSizes {
    pub exact_v4: usize,
    pub lpm_v4: usize,
    pub exact_v6: usize,
    pub lpm_v6: usize,
}

/// The whitelist's kinds of entries, in the order of `WhitelistSizes::kind`.
pub const WHITELIST_KINDS: [&str; 4] = [
    "IPv4 addresses",
    "IPv4 CIDRs",
    "IPv6 addresses",
    "IPv6 CIDRs",
];

impl WhitelistSizes {
    /// Which map an entry goes to: 0 exact IPv4, 1 IPv4 CIDR, 2 exact IPv6, 3 IPv6 CIDR.
    pub fn kind(n: &IpNet) -> usize {
        let v6 = matches!(n, IpNet::V6(_));
        2 * v6 as usize + (n.prefix_len() != n.max_prefix_len()) as usize
    }

    pub fn as_array(&self) -> [usize; 4] {
        [self.exact_v4, self.lpm_v4, self.exact_v6, self.lpm_v6]
    }

    fn from_array(a: [usize; 4]) -> Self {
        WhitelistSizes {
            exact_v4: a[0],
            lpm_v4: a[1],
            exact_v6: a[2],
            lpm_v6: a[3],
        }
    }

    pub fn of<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut a = [0; 4];
        for n in nets {
            a[Self::kind(n)] += 1;
        }
        Self::from_array(a)
    }

    /// These sizes with `more` added and `less` taken away.
    pub fn changed(self, more: Self, less: Self) -> Self {
        let (s, m, l) = (self.as_array(), more.as_array(), less.as_array());
        Self::from_array(std::array::from_fn(|i| (s[i] + m[i]).saturating_sub(l[i])))
    }
}

/// An entry as operators write it: a host route as a plain address, else the CIDR.
pub fn show_net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn quote(s: impl fmt::Display) -> String {
    format!("\"{s}\"")
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(", "))
}

/// The policy as a policy file (the same text `save` prints); `parse` reads it back equal.
pub fn to_toml(p: &Policy) -> String {
    let mut out = String::new();
    let iso = &p.isolation;
    out.push_str("[isolation]\n");
    let d = if iso.default == DefaultAction::Deny {
        "deny"
    } else {
        "accept"
    };
    out.push_str(&format!("default = \"{d}\"\nreject = {}\n", iso.reject));
    if !iso.vxlan_ports.is_empty() {
        out.push_str(&format!(
            "vxlan_ports = {}\n",
            list(iso.vxlan_ports.iter().map(|p| p.to_string()))
        ));
    }
    for (name, subnets) in &p.networks {
        out.push_str(&format!(
            "\n[networks.{name}]\nsubnets = {}\n",
            list(subnets.iter().map(quote))
        ));
    }
    for r in &iso.allow {
        out.push_str(&format!(
            "\n[[isolation.allow]]\nfrom = {}\nto = {}\n",
            quote(&r.from),
            quote(&r.to)
        ));
        if !r.ports.is_empty() {
            out.push_str(&format!("ports = {}\n", list(r.ports.iter().map(quote))));
        }
    }
    for r in &iso.except {
        out.push_str(&format!(
            "\n[[isolation.except]]\nfrom = {}\nto = {}\n",
            quote(&r.from),
            quote(&r.to)
        ));
    }
    let wl = &p.whitelist;
    out.push_str(&format!(
        "\n[whitelist]\nenabled = {}\nlog = {}\n",
        wl.enabled, wl.log
    ));
    out.push_str("allow = [\n");
    for a in &wl.allow {
        out.push_str(&format!("  \"{}\",\n", show_net(a)));
    }
    out.push_str("]\n");
    // Written only when it is not the default, so policies that never set it read as before.
    if p.connections != Connections::default() {
        out.push_str(&format!("\n[connections]\nmax = {}\n", p.connections.max));
    }
    if p.blocklist != Blocklist::default() {
        let bl = &p.blocklist;
        out.push_str(&format!(
            "\n[blocklist]\nenabled = {}\nlog = {}\nentries = [\n",
            bl.enabled, bl.log
        ));
        for e in &bl.entries {
            out.push_str(&format!("  \"{}\",\n", show_net(e)));
        }
        out.push_str("]\n");
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rstest::rstest;

    /// A policy with every kind of rule, a /0 and both families: what the iptables backend
    /// renders and import reads back.
    pub(crate) const EVERY_KIND: &str = r#"
[isolation]
default = "deny"
reject = true
[networks.hr]
subnets = ["198.51.100.128/25", "2001:db8:2::/48"]
[networks.it]
subnets = ["198.51.100.0/25"]
[[isolation.allow]]
from = "hr"
to = "it"
ports = ["tcp:80", "udp:53-54", "icmp"]
[[isolation.except]]
from = "192.0.2.10/32"
to = "it"
[whitelist]
enabled = true
log = true
allow = ["203.0.113.7", "192.0.2.0/24", "0.0.0.0/0", "2001:db8::1"]
"#;

    /// Every TOML example in the repository's docs parses: the docs cannot drift from the
    /// parser.
    #[test]
    fn the_docs_examples_parse() {
        let docs = [
            ("README.md", include_str!("../../README.md")),
            ("docs/policy.md", include_str!("../../docs/policy.md")),
        ];
        let mut seen = 0;
        for (file, text) in docs {
            for block in text.split("```toml\n").skip(1) {
                let example = block.split("```").next().unwrap_or("");
                parse(file, example).unwrap_or_else(|e| panic!("{file}: {e}\n{example}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "no TOML example found");
        // The example in the README and docs/policy.md is the packaged one, word for word
        // after its opening comment.
        let body = EXAMPLE
            .split_once("\n\n")
            .map(|(_, b)| b)
            .unwrap_or(EXAMPLE);
        for (file, text) in docs {
            assert!(
                text.contains(&format!("```toml\n{body}```")),
                "{file} does not show packaging/policy.example.toml as it is"
            );
        }
    }

    #[test]
    fn parses_the_product_example() {
        let p = parse("policy.toml", EXAMPLE).unwrap();
        assert_eq!(p.isolation.default, DefaultAction::Deny);
        assert!(p.isolation.reject);
        assert!(p.isolation.vxlan_ports.is_empty());
        assert_eq!(p.networks["hr"].len(), 2);
        assert_eq!(p.isolation.allow[0].from, Endpoint::Network("hr".into()));
        assert_eq!(
            p.isolation.allow[0].ports,
            vec![PortSpec::Tcp(80, 80), PortSpec::Tcp(443, 443)]
        );
        assert_eq!(
            p.isolation.except[0].to,
            Endpoint::Cidr("198.51.100.200/32".parse().unwrap())
        );
        assert!(p.whitelist.enabled && p.whitelist.log);
        assert_eq!(p.whitelist.allow.len(), 4);
        assert_eq!(
            WhitelistSizes::of(&p.whitelist.allow),
            WhitelistSizes {
                exact_v4: 1,
                lpm_v4: 2,
                exact_v6: 0,
                lpm_v6: 1
            }
        );
    }

    #[test]
    fn save_round_trips() {
        let p = parse("policy.toml", EXAMPLE).unwrap();
        let again = parse("saved", &to_toml(&p)).unwrap();
        assert_eq!(p, again);
    }

    /// `[connections] max`: the default when absent, bounds refused with their line, written
    /// by `save` only when set, and read back equal.
    #[test]
    fn connections_max_is_bounded_and_round_trips() {
        assert_eq!(parse("p", "").unwrap().connections.max, 65536);
        assert!(!to_toml(&Policy::default()).contains("[connections]"));
        let p = parse("p", "[connections]\nmax = 262144\n").unwrap();
        assert_eq!(p.connections.max, 262144);
        assert!(to_toml(&p).contains("[connections]\nmax = 262144\n"));
        assert_eq!(parse("saved", &to_toml(&p)).unwrap(), p);
        for bad in ["1023", "4194305", "-1", "99999999999"] {
            let e = parse("p", &format!("[isolation]\n[connections]\nmax = {bad}\n")).unwrap_err();
            assert_eq!(e.line, 3, "{e}");
            assert!(
                e.reason.contains("out of range: expected 1024 to 4194304"),
                "{e}"
            );
        }
        let e = parse("p", "[connections]\nmaxx = 5\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let mut v = Policy::default();
        v.connections.max = 10;
        assert!(validate(&v).unwrap_err().contains("out of range"));
    }

    #[test]
    fn empty_file_is_allow_all() {
        let p = parse("p", "").unwrap();
        assert_eq!(p, Policy::default());
        assert!(!p.whitelist.enabled);
    }

    #[rstest]
    #[case::bad_cidr(
        "[whitelist]\nallow = [\"192.0.2.0/33\"]\n",
        2,
        "not an IP address or CIDR"
    )]
    #[case::host_bits(
        "[whitelist]\nallow = [\n \"203.0.113.7\",\n \"192.0.2.5/24\"]\n",
        4,
        "did you mean 192.0.2.0/24"
    )]
    #[case::garbage_addr(
        "[whitelist]\nallow = [\"bogus\"]\n",
        2,
        "'bogus' is not an IP address"
    )]
    #[case::unknown_network(
        "[networks.a]\nsubnets=[\"192.0.2.0/24\"]\n[[isolation.allow]]\nfrom = \"a\"\nto = \"b\"\n",
        5,
        "unknown network 'b'"
    )]
    #[case::reserved_name("[networks.dcos-x]\nsubnets=[\"192.0.2.0/24\"]\n", 1, "reserved")]
    #[case::reserved_mesos("\n[networks.mesos-1]\nsubnets=[\"192.0.2.0/24\"]\n", 2, "reserved")]
    #[case::bad_port(
        "[networks.a]\nsubnets=[\"192.0.2.0/24\"]\n[[isolation.allow]]\nfrom=\"a\"\nto=\"a\"\nports=[\"tcp:99999\"]\n",
        6,
        "bad port 'tcp:99999'"
    )]
    #[case::bad_proto(
        "[networks.a]\nsubnets=[\"192.0.2.0/24\"]\n[[isolation.allow]]\nfrom=\"a\"\nto=\"a\"\nports=[\"sctp:1\"]\n",
        6,
        "bad port 'sctp:1'"
    )]
    #[case::reversed_range(
        "[networks.a]\nsubnets=[\"192.0.2.0/24\"]\n[[isolation.allow]]\nfrom=\"a\"\nto=\"a\"\nports=[\"tcp:90-80\"]\n",
        6,
        "90 is above 80"
    )]
    #[case::bad_default(
        "[isolation]\ndefault = \"maybe\"\n",
        2,
        "expected \"deny\" or \"accept\""
    )]
    #[case::unknown_key("[whitelist]\nenabeld = true\n", 2, "unknown field `enabeld`")]
    #[case::not_toml("[whitelist\n", 1, "")]
    #[case::bad_vxlan("[isolation]\nvxlan_ports = [0]\n", 2, "bad vxlan port 0")]
    #[case::empty_network("[networks.a]\nsubnets = []\n", 1, "has no subnets")]
    #[case::empty_ports(
        "[networks.a]\nsubnets=[\"192.0.2.0/24\"]\n[[isolation.allow]]\nfrom=\"a\"\nto=\"a\"\nports=[]\n",
        3,
        "`ports = []` allows no port"
    )]
    #[case::bad_subnet(
        "[networks.a]\nsubnets = [\"198.51.100.0/25\",\n\"x\"]\n",
        3,
        "network 'a': 'x'"
    )]
    fn errors_name_file_line_and_reason(
        #[case] text: &str,
        #[case] line: usize,
        #[case] reason: &str,
    ) {
        let e = parse("/etc/isolation/policy.toml", text).unwrap_err();
        assert_eq!(e.line, line, "{e}");
        assert!(e.reason.contains(reason), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("/etc/isolation/policy.toml:{line}: ")),
            "{e}"
        );
    }

    #[rstest]
    #[case("tcp:80", PortSpec::Tcp(80, 80))]
    #[case("udp:53", PortSpec::Udp(53, 53))]
    #[case("tcp:8000-8100", PortSpec::Tcp(8000, 8100))]
    #[case("icmp", PortSpec::Icmp)]
    fn ports_parse_and_print(#[case] s: &str, #[case] want: PortSpec) {
        assert_eq!(s.parse::<PortSpec>().unwrap(), want);
        assert_eq!(want.to_string(), s);
    }

    #[test]
    fn duplicate_whitelist_entries_collapse() {
        let p = parse(
            "p",
            "[whitelist]\nallow = [\"192.0.2.1\", \"192.0.2.1/32\"]\n",
        )
        .unwrap();
        assert_eq!(p.whitelist.allow.len(), 1);
        // Each entry at its first place and line, in the file's order.
        let (p, lines) = parse_with_lines(
            "p",
            "[whitelist]\nallow = [\n\"192.0.2.3\",\n\"192.0.2.1\",\n\"192.0.2.3\",\n\"192.0.2.2\",\n\"192.0.2.1/32\",\n]\n",
        )
        .unwrap();
        let got: Vec<String> = p.whitelist.allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(got, ["192.0.2.3/32", "192.0.2.1/32", "192.0.2.2/32"]);
        assert_eq!(lines.whitelist_entries, [3, 4, 6]);
    }
}
