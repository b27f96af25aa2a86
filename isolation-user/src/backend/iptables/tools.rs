//! The iptables and ipset commands: which iptables (nf_tables-backed where it works,
//! legacy otherwise), running them with input, and reading our chains back from
//! `iptables-save`.

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    process::Stdio,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::render::{Fam, Names};

/// Which iptables: both speak the same rules; they must not be mixed on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Nft,
    Legacy,
}

impl Variant {
    pub fn describe(self) -> &'static str {
        match self {
            Variant::Nft => "iptables-nft (nf_tables)",
            Variant::Legacy => "iptables-legacy (x_tables)",
        }
    }

    /// The nf_tables-backed iptables where it answers, legacy otherwise.
    pub fn detect() -> Result<Variant> {
        for v in [Variant::Nft, Variant::Legacy] {
            let ok = crate::state::system_tool(&v.bin(Fam::V4, ""))
                .args(["-w", "-t", "filter", "-n", "-L", "INPUT"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(v);
            }
        }
        bail!(
            "neither iptables-nft nor iptables-legacy works here (install the iptables package; run as root)"
        )
    }

    /// `iptables-nft`, `ip6tables-legacy-restore`, ...
    pub fn bin(self, f: Fam, what: &str) -> String {
        let v = match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        };
        format!("{}-{v}{what}", f.iptables())
    }
}

fn run(cmd: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut c = crate::state::system_tool(cmd);
    c.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run {cmd} (is it installed?)"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A write error shows up as the command's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        // One sentence: the tool's lines joined (iptables-restore puts the reason on the
        // second line, after its version).
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        bail!("{cmd} {} failed: {err}", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ipset(args: &[&str]) -> Result<String> {
    run("ipset", args, None)
}

/// `ipset restore` of a whole text in one process; stops at the first bad line.
pub fn ipset_restore(text: &str) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    run("ipset", &["restore"], Some(text)).map(|_| ())
}

/// `ipset restore -exist`: adding what is there sets its timeout anew, deleting what is
/// not there is no error.
pub fn ipset_restore_exist(text: &str) -> Result<()> {
    if text.is_empty() {
        return Ok(());
    }
    run("ipset", &["restore", "-exist"], Some(text)).map(|_| ())
}

/// Which of `types` this kernel's ipset has: a set of each is created (named after this
/// instance, so nobody else's) and destroyed at once.
pub fn set_types_present(names: &Names, types: &[&str]) -> Vec<String> {
    types
        .iter()
        .filter(|t| {
            let probe = names.set(0, "probe", super::render::Fam::V4);
            let ok = ipset(&["create", &probe, t]).is_ok();
            if ok {
                let _ = ipset(&["destroy", &probe]);
            }
            ok
        })
        .map(|t| t.to_string())
        .collect()
}

/// The names of every set in this network namespace.
pub fn set_names() -> Result<Vec<String>> {
    Ok(ipset(&["list", "-n"])?
        .lines()
        .map(str::to_string)
        .collect())
}

/// Destroys sets, going on past errors (a set still referenced stays).
pub fn destroy_sets(names: &[String]) -> Vec<String> {
    if names.is_empty() {
        return vec![];
    }
    let text: String = names.iter().map(|n| format!("destroy {n}\n")).collect();
    if ipset_restore(&text).is_ok() {
        return vec![];
    }
    // One failed: destroy one by one to say which.
    names
        .iter()
        .filter_map(|n| ipset(&["destroy", n]).err().map(|e| e.to_string()))
        .collect()
}

impl Variant {
    pub fn iptables(self, f: Fam, args: &[&str]) -> Result<String> {
        let mut a = vec!["-w"];
        a.extend_from_slice(args);
        run(&self.bin(f, ""), &a, None)
    }

    /// `iptables-restore --noflush --counters`: one transaction of the filter table.
    pub fn restore(self, f: Fam, text: &str) -> Result<()> {
        run(
            &self.bin(f, "-restore"),
            &["-w", "--noflush", "--counters"],
            Some(text),
        )
        .map(|_| ())
    }

    pub fn save(self, f: Fam) -> Result<Live> {
        let text = run(&self.bin(f, "-save"), &["-c", "-t", "filter"], None)?;
        Ok(Live::parse(&text))
    }
}

/// The filter table as `iptables-save -c` printed it.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// Chain names declared.
    pub chains: HashSet<String>,
    /// Every `-A` line, with its counters: (chain, line without the counters, packets, bytes).
    pub rules: Vec<(String, String, u64, u64)>,
}

impl Live {
    pub fn parse(text: &str) -> Live {
        let mut live = Live::default();
        for l in text.lines() {
            if let Some(c) = l.strip_prefix(':') {
                if let Some(name) = c.split_whitespace().next() {
                    live.chains.insert(name.to_string());
                }
                continue;
            }
            let (p, b, rest) = match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                Some((c, rest)) => {
                    let (p, b) = c.split_once(':').unwrap_or(("0", "0"));
                    (p.parse().unwrap_or(0), b.parse().unwrap_or(0), rest)
                }
                None => (0, 0, l),
            };
            if let Some(r) = rest.strip_prefix("-A ") {
                let chain = r.split_whitespace().next().unwrap_or("").to_string();
                live.rules.push((chain, rest.to_string(), p, b));
            }
        }
        live
    }

    /// The rules of one chain.
    pub fn chain<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a (String, String, u64, u64)> {
        self.rules.iter().filter(move |(c, ..)| c == name)
    }

    /// Our chains as restore input, to put them back as they were.
    pub fn our_chains_text(&self, names: &Names) -> String {
        let mut s = String::from("*filter\n");
        for c in names.chains() {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in names.chains() {
            for (_, l, p, b) in self.chain(&c) {
                s.push_str(&format!("[{p}:{b}] {l}\n"));
            }
        }
        s.push_str("COMMIT\n");
        s
    }

    pub fn installed(&self, names: &Names) -> bool {
        self.chains.contains(&names.input())
    }

    /// Is the whitelist enforced (the whitelist chain ends in its DROP)?
    pub fn whitelist_enforced(&self, names: &Names) -> bool {
        let drop = super::render::key(isolation_common::Reason::DropNotWhitelisted);
        self.chain(&names.input())
            .any(|(_, l, ..)| comment(l).as_deref() == Some(drop.as_str()))
    }

    /// Packets and bytes per counter key, over our two chains.
    pub fn counters(&self, names: &Names) -> HashMap<String, (u64, u64)> {
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for c in names.chains() {
            for (_, l, p, b) in self.chain(&c) {
                if let Some(k) = comment(l) {
                    let e = out.entry(k).or_default();
                    e.0 += p;
                    e.1 += b;
                }
            }
        }
        out
    }

    /// Every set our chains name.
    pub fn sets(&self, names: &Names) -> HashSet<String> {
        let mut out = HashSet::new();
        for c in names.chains() {
            for (_, l, ..) in self.chain(&c) {
                let mut it = l.split_whitespace();
                while let Some(w) = it.next() {
                    if w == "--match-set"
                        && let Some(s) = it.next()
                    {
                        out.insert(s.to_string());
                    }
                }
            }
        }
        out
    }

    /// Our jumps from INPUT and FORWARD to the whitelist chain: (chain, interface, line).
    pub fn jumps(&self, names: &Names) -> Vec<(String, String, String)> {
        self.jumps_to(&names.input())
    }

    /// Jumps from INPUT and FORWARD to `chain`: (chain, interface, line).
    pub fn jumps_to(&self, chain: &str) -> Vec<(String, String, String)> {
        let target = format!("-j {chain}");
        self.rules
            .iter()
            .filter(|(c, l, ..)| (c == "INPUT" || c == "FORWARD") && l.ends_with(&target))
            .map(|(c, l, ..)| {
                let mut it = l.split_whitespace();
                let mut iface = String::new();
                while let Some(w) = it.next() {
                    if w == "-i" {
                        iface = it.next().unwrap_or("").to_string();
                    }
                }
                (c.clone(), iface, l.clone())
            })
            .collect()
    }
}

/// The `iptables-restore` line deleting a saved `-A` rule.
pub fn deletion(saved: &str) -> String {
    format!("-D{}", saved.strip_prefix("-A").unwrap_or(saved))
}

/// The comment of a saved rule (unquoted as iptables-save prints it).
pub fn comment(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("--comment ")?;
    let rest = rest.trim_start();
    if let Some(q) = rest.strip_prefix('"') {
        return q.split_once('"').map(|(c, _)| c.to_string());
    }
    rest.split_whitespace().next().map(str::to_string)
}

/// Members of a set, as `ipset save NAME` lists them.
pub fn members(set: &str) -> Result<Vec<String>> {
    let text = ipset(&["save", set])?;
    let prefix = format!("add {set} ");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|m| m.split_whitespace().next().unwrap_or("").to_string())
        .collect())
}

/// (entries, maxelem) of a set, from its header.
pub fn fill(set: &str) -> Result<(u64, u64)> {
    let text = ipset(&["list", "-t", set])?;
    let mut entries = None;
    let mut maxelem = 0;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("Number of entries: ") {
            entries = n.trim().parse().ok();
        }
        if let Some(h) = l.strip_prefix("Header: ") {
            let mut it = h.split_whitespace();
            while let Some(w) = it.next() {
                if w == "maxelem" {
                    maxelem = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                }
            }
        }
    }
    Ok((
        entries.ok_or_else(|| anyhow!("cannot read the size of set {set}"))?,
        maxelem,
    ))
}

/// The VXLAN devices of this network namespace whose UDP port is one of `ports`.
pub fn vxlan_devices(ports: &[u16]) -> Result<Vec<String>> {
    if ports.is_empty() {
        return Ok(vec![]);
    }
    let text = run("ip", &["-d", "-j", "link", "show", "type", "vxlan"], None)?;
    let links: serde_json::Value =
        serde_json::from_str(&text).context("cannot read `ip -d -j link` output")?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["linkinfo"]["info_data"]["port"]
                .as_u64()
                .is_some_and(|p| ports.iter().any(|q| *q as u64 == p))
        })
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_chains_back_from_iptables_save() {
        let text = "# Generated by iptables-nft-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:ISOLATION-IN - [0:0]\n:ISOLATION-ISO - [0:0]\n[5:300] -A INPUT -i r1 -m comment --comment isolation:jump -j ISOLATION-IN\n[1:60] -A INPUT -p tcp -j ACCEPT\n[7:420] -A ISOLATION-IN -m set --match-set isolation-3-wlv4 src -m comment --comment isolation:whitelisted -g ISOLATION-ISO\n[2:100] -A ISOLATION-ISO -m comment --comment \"isolation:hairpin\" -j RETURN\n[3:150] -A ISOLATION-ISO -m comment --comment isolation:hairpin -j RETURN\nCOMMIT\n";
        let live = Live::parse(text);
        let n = Names::new(std::path::Path::new("/run/isolation"));
        assert!(live.installed(&n));
        let c = live.counters(&n);
        assert_eq!(c["isolation:hairpin"], (5, 250));
        assert_eq!(c["isolation:whitelisted"], (7, 420));
        assert_eq!(
            live.sets(&n),
            HashSet::from(["isolation-3-wlv4".to_string()])
        );
        let j = live.jumps(&n);
        assert_eq!(j.len(), 1);
        assert_eq!((j[0].0.as_str(), j[0].1.as_str()), ("INPUT", "r1"));
        assert!(
            live.our_chains_text(&n)
                .contains("[7:420] -A ISOLATION-IN -m set")
        );
    }
}
