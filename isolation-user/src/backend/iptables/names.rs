//! What our chains and sets are called: per instance (a tag of the state directory) and per
//! policy generation, so two instances never touch each other's and a new generation's sets
//! are built beside the live ones; and the two families.

use std::{net::IpAddr, path::Path};

use ipnet::IpNet;

/// One of the two families: iptables/`family inet` or ip6tables/`family inet6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    pub const BOTH: [Fam; 2] = [Fam::V4, Fam::V6];

    pub fn of(n: &IpNet) -> Fam {
        match n {
            IpNet::V4(_) => Fam::V4,
            IpNet::V6(_) => Fam::V6,
        }
    }
    pub fn of_addr(a: &IpAddr) -> Fam {
        if a.is_ipv4() { Fam::V4 } else { Fam::V6 }
    }
    /// Suffix of set names.
    pub fn tag(self) -> &'static str {
        match self {
            Fam::V4 => "v4",
            Fam::V6 => "v6",
        }
    }
    pub fn inet(self) -> &'static str {
        match self {
            Fam::V4 => "inet",
            Fam::V6 => "inet6",
        }
    }
    /// The iptables command of this family (before any `-nft`/`-legacy` suffix).
    pub fn iptables(self) -> &'static str {
        match self {
            Fam::V4 => "iptables",
            Fam::V6 => "ip6tables",
        }
    }
    pub(super) fn icmp(self) -> &'static str {
        match self {
            Fam::V4 => "icmp",
            Fam::V6 => "ipv6-icmp",
        }
    }
    pub(super) fn admin_prohibited(self) -> &'static str {
        match self {
            Fam::V4 => "icmp-admin-prohibited",
            Fam::V6 => "icmp6-adm-prohibited",
        }
    }
}

/// The names of one instance's chains and sets. The default state dir gets the plain
/// names (`ISOLATION-IN`, `isolation-7-n0v4`); any other gets a 32-bit tag from its path, so
/// two instances in one network namespace never touch each other's rules. An instance
/// keeps the names it was loaded with in its record (`Iptables::new`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Names {
    chain: String,
    set: String,
}

/// Chain names hold 28 characters; set names 31. `{set}-{generation}-n1023v6` fits.
impl Names {
    pub fn new(state_dir: &Path) -> Names {
        Names::tagged(state_dir, 8)
    }
    /// The names of an instance loaded by a build that gave 20-bit tags (its record names
    /// none).
    pub fn legacy(state_dir: &Path) -> Names {
        Names::tagged(state_dir, 5)
    }
    fn tagged(state_dir: &Path, hex_digits: usize) -> Names {
        if state_dir == Path::new(crate::state::DEFAULT_STATE_DIR) {
            return Names {
                chain: "ISOLATION".into(),
                set: "isolation".into(),
            };
        }
        // FNV-1a: stable across builds (std's hasher is not).
        let h = state_dir
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
            });
        let tag = format!("{:016x}", h);
        let tag = &tag[16 - hex_digits..];
        Names {
            chain: format!("ISO-{}", tag.to_uppercase()),
            set: format!("iso-{tag}"),
        }
    }
    /// The chain jumped to from INPUT and FORWARD: the whitelist.
    pub fn input(&self) -> String {
        format!("{}-IN", self.chain)
    }
    /// The isolation chain.
    pub fn isolation(&self) -> String {
        format!("{}-ISO", self.chain)
    }
    /// Isolation of the packets a VXLAN device of this host decapsulates.
    pub fn tunnel(&self) -> String {
        format!("{}-VX", self.chain)
    }
    /// Replies and related ICMP errors (reached by one conntrack match for both).
    pub fn conntrack(&self) -> String {
        format!("{}-CT", self.chain)
    }
    /// ICMPv6 not whitelisted: neighbour discovery passes, the rest is dropped.
    pub fn neighbour(&self) -> String {
        format!("{}-ND", self.chain)
    }
    pub fn chains(&self) -> [String; 5] {
        [
            self.input(),
            self.isolation(),
            self.tunnel(),
            self.conntrack(),
            self.neighbour(),
        ]
    }
    pub fn set(&self, generation: u32, what: &str, f: Fam) -> String {
        format!("{}-{generation}-{what}{}", self.set, f.tag())
    }
    /// The blocklist's set of a family: one for the life of the instance (its entries
    /// carry their own timeouts, which a set built beside it would have to copy), named
    /// as generation 0, which no policy has.
    pub fn blocklist(&self, f: Fam) -> String {
        self.set(0, "bl", f)
    }
    /// Is this set one of ours (any generation)? Only names of the exact form `set` gives
    /// (`{set}-{generation}-{all|wl|nN|probe}{v4|v6}`, and a whitelist's `-t` being
    /// rebuilt): an operator's own set that merely starts like ours (`isolation-2024-servers`)
    /// is never taken for one and destroyed.
    pub fn owns_set(&self, name: &str) -> bool {
        let name = name.strip_suffix("-t").unwrap_or(name);
        let Some((generation, what)) = name
            .strip_prefix(&self.set)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split_once('-'))
        else {
            return false;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let Some(what) = what
            .strip_suffix(Fam::V4.tag())
            .or_else(|| what.strip_suffix(Fam::V6.tag()))
        else {
            return false;
        };
        digits(generation)
            && (["all", "wl", "bl", "probe"].contains(&what)
                || what.strip_prefix('n').is_some_and(digits))
    }
    /// The NFLOG group `trace` listens on: one per instance.
    pub fn nflog_group(&self) -> u16 {
        let h = self
            .set
            .bytes()
            .fold(0u16, |h, b| h.wrapping_mul(31) ^ b as u16);
        if self.set == "isolation" {
            4200
        } else {
            4201 + h % 800
        }
    }
    /// The comment on our jumps from INPUT and FORWARD.
    pub fn jump_comment(&self) -> String {
        format!("{}:jump", self.set)
    }
}
