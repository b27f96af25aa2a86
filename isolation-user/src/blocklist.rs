//! The blocklist as the engine and the backends see it, pure and without I/O: entries with
//! their deadlines, the view a backend is made to enforce, durations as operators write
//! them, and the deadline a datapath entry holds (its own or a containing CIDR's, the
//! latest).
//!
//! Deadlines are absolute (Unix milliseconds): a restart, a reload or an upgrade neither
//! resets nor loses them. `PERMANENT` sorts after every deadline.

use std::{
    collections::{BTreeSet, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Unix milliseconds, or `PERMANENT`.
pub type Deadline = u64;
pub const PERMANENT: Deadline = u64::MAX;

/// The longest timeout taken: ipset's (`timeout` is at most 2,147,483 s, 24.8 days), so
/// that both backends hold what they are given.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(2_147_483);

/// Where the entries of a source came from: `block list` says it.
pub const ORIGIN_POLICY: &str = "policy";
pub const ORIGIN_CLI: &str = "cli";

/// An entry with a deadline: live state, not policy (`apply` and `save` leave it alone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timed {
    #[serde(with = "net_text")]
    pub net: IpNet,
    pub deadline: Deadline,
    pub origin: String,
}

/// A prefix as its text in the store's JSON.
mod net_text {
    use ipnet::IpNet;
    use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&n.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        crate::policy::parse_net(&s).map_err(D::Error::custom)
    }
}

/// What the datapath enforces: each blocked prefix and its deadline (the permanent entry
/// if a prefix is both permanent and timed, else the latest deadline).
pub type View = HashMap<IpNet, Deadline>;

pub fn now_ms() -> Deadline {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The view of permanent entries and timed ones, leaving out those whose deadline is at or
/// before `now` (0: all of them, what a datapath may still hold).
pub fn view(permanent: &[IpNet], timed: &[Timed], now: Deadline) -> View {
    let mut v: View = permanent.iter().map(|n| (*n, PERMANENT)).collect();
    for t in timed.iter().filter(|t| t.deadline > now) {
        let d = v.entry(t.net).or_insert(0);
        *d = (*d).max(t.deadline);
    }
    v
}

/// Adds timed entries from `origin`, each with its deadline; an entry already there (from
/// any origin) takes the new deadline and origin.
pub fn upsert(
    timed: &mut Vec<Timed>,
    entries: impl IntoIterator<Item = (IpNet, Deadline)>,
    origin: &str,
) {
    let mut at: HashMap<IpNet, usize> = timed.iter().enumerate().map(|(i, t)| (t.net, i)).collect();
    for (net, deadline) in entries {
        match at.get(&net) {
            Some(&i) => {
                timed[i].deadline = deadline;
                timed[i].origin = origin.to_string();
            }
            None => {
                at.insert(net, timed.len());
                timed.push(Timed {
                    net,
                    deadline,
                    origin: origin.to_string(),
                });
            }
        }
    }
}

/// The prefixes whose deadline differs between two views (added, removed, changed).
pub fn changed(old: &View, new: &View) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = new
        .iter()
        .filter(|(n, d)| old.get(n) != Some(d))
        .map(|(n, _)| *n)
        .chain(old.keys().filter(|n| !new.contains_key(n)).copied())
        .collect();
    out.sort_unstable();
    out
}

/// `n` shortened to `len` bits.
fn shorten(n: &IpNet, len: u8) -> IpNet {
    IpNet::new(n.addr(), len).map(|s| s.trunc()).unwrap_or(*n)
}

/// The deadline the datapath's entry for `n` holds: the latest of `n`'s own and of every
/// entry of `view` containing it. None: `n` is in the view neither itself nor by a
/// containing prefix.
pub fn held(view: &View, lens: &BTreeSet<(bool, u8)>, n: &IpNet) -> Option<Deadline> {
    let v6 = matches!(n, IpNet::V6(_));
    lens.iter()
        .filter(|(f, l)| *f == v6 && *l <= n.prefix_len())
        .filter_map(|(_, l)| view.get(&shorten(n, *l)))
        .max()
        .copied()
}

/// The prefix lengths a view holds, per family (`true`: IPv6).
pub fn lengths(view: &View) -> BTreeSet<(bool, u8)> {
    view.keys()
        .map(|n| (matches!(n, IpNet::V6(_)), n.prefix_len()))
        .collect()
}

/// The datapath entries a change touches: each changed prefix, and every entry of `view`
/// inside a changed CIDR (its held deadline may come from the CIDR), each with what it
/// holds now (None: delete it). Exact addresses, the feeds' usual entries, cost one lookup
/// each; a changed CIDR costs a pass over the view.
pub fn writes(view: &View, changed: &[IpNet]) -> Vec<(IpNet, Option<Deadline>)> {
    let lens = lengths(view);
    let mut touched: BTreeSet<IpNet> = changed.iter().copied().collect();
    let cidrs: std::collections::HashSet<IpNet> = changed
        .iter()
        .filter(|n| n.prefix_len() < n.max_prefix_len())
        .copied()
        .collect();
    if !cidrs.is_empty() {
        let clens: BTreeSet<(bool, u8)> = cidrs
            .iter()
            .map(|n| (matches!(n, IpNet::V6(_)), n.prefix_len()))
            .collect();
        for n in view.keys() {
            let v6 = matches!(n, IpNet::V6(_));
            if clens
                .iter()
                .any(|(f, l)| *f == v6 && *l < n.prefix_len() && cidrs.contains(&shorten(n, *l)))
            {
                touched.insert(*n);
            }
        }
    }
    touched
        .into_iter()
        .map(|n| {
            // A prefix no longer in the view has no entry of its own, whatever contains it.
            let h = if view.contains_key(&n) {
                held(view, &lens, &n)
            } else {
                None
            };
            (n, h)
        })
        .collect()
}

/// The entry of `view` that blocks `addr` longest (permanent first), if any.
pub fn blocking(view: &View, addr: std::net::IpAddr) -> Option<(IpNet, Deadline)> {
    let host = IpNet::from(addr);
    lengths(view)
        .into_iter()
        .filter(|(f, l)| *f == addr.is_ipv6() && *l <= host.prefix_len())
        .filter_map(|(_, l)| {
            let p = shorten(&host, l);
            view.get(&p).map(|d| (p, *d))
        })
        .max_by_key(|(p, d)| (*d, p.prefix_len()))
}

/// A duration as operators write it: `90`, `90s`, `15m`, `4h`, `7d` (whole units), at most
/// `MAX_TIMEOUT`, more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "bad duration '{s}': expected a number of seconds, or 90s, 15m, 4h, 7d"
            ));
        }
    };
    let n: u64 = num.parse().map_err(|_| {
        format!("bad duration '{s}': expected a number of seconds, or 90s, 15m, 4h, 7d")
    })?;
    let d = Duration::from_secs(n.saturating_mul(mult));
    if d.is_zero() {
        return Err(format!("bad duration '{s}': a timeout is more than zero"));
    }
    if d > MAX_TIMEOUT {
        return Err(format!(
            "duration '{s}' is too long: at most {} s (24 days, ipset's limit); leave out the timeout for a permanent entry",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
}

/// Time left before a deadline, in words: "permanent", "41 s left", "3 h 2 min left".
pub fn left(deadline: Deadline, now: Deadline) -> String {
    if deadline == PERMANENT {
        return "permanent".into();
    }
    let s = deadline.saturating_sub(now).div_ceil(1000);
    match s {
        0..=119 => format!("{s} s left"),
        120..=7199 => format!("{} min left", s / 60),
        7200..=172_799 => format!("{} h {} min left", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h left", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        crate::policy::parse_net(s).unwrap()
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("4h").unwrap(), Duration::from_secs(14400));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604800));
        for bad in ["", "0", "1w", "-5", "4 h", "25d", "99999999999999999999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// A CIDR's deadline reaches the entries inside it: the longest prefix the datapath
    /// finds never hides a shorter one that still holds. Removing the CIDR gives them back
    /// their own.
    #[test]
    fn an_entry_holds_the_latest_deadline_of_what_contains_it() {
        let timed = |net: &str, d| Timed {
            net: n(net),
            deadline: d,
            origin: "cli".into(),
        };
        let t = vec![
            timed("203.0.113.7", 1_000),
            timed("203.0.113.0/24", 5_000),
            timed("198.51.100.9", 9_000),
        ];
        let v = view(&[n("2001:db8::/32")], &t, 0);
        let w: HashMap<IpNet, Option<Deadline>> =
            writes(&v, &[n("203.0.113.0/24")]).into_iter().collect();
        assert_eq!(w.len(), 2);
        assert_eq!(w[&n("203.0.113.0/24")], Some(5_000));
        assert_eq!(w[&n("203.0.113.7")], Some(5_000));
        // At 2,000 the address's own entry has passed, the /24 holds it still.
        let later = view(&[n("2001:db8::/32")], &t, 2_000);
        assert_eq!(
            held(&later, &lengths(&later), &n("203.0.113.7")),
            Some(5_000)
        );
        let w: HashMap<_, _> = writes(&later, &changed(&v, &later)).into_iter().collect();
        assert_eq!(w[&n("203.0.113.7")], None);
        // The /24 removed: the address gets its own deadline back.
        let without = view(&[n("2001:db8::/32")], &[t[0].clone(), t[2].clone()], 0);
        let w: HashMap<_, _> = writes(&without, &changed(&v, &without))
            .into_iter()
            .collect();
        assert_eq!(w[&n("203.0.113.0/24")], None);
        assert_eq!(w[&n("203.0.113.7")], Some(1_000));
        assert!(!w.contains_key(&n("198.51.100.9")));
        // Permanent wins over any deadline; `blocking` names the longest-lasting entry.
        let both = view(&[n("203.0.113.0/24")], &t, 0);
        assert_eq!(both[&n("203.0.113.0/24")], PERMANENT);
        assert_eq!(
            blocking(&both, "203.0.113.7".parse().unwrap()),
            Some((n("203.0.113.0/24"), PERMANENT))
        );
        assert_eq!(blocking(&both, "192.0.2.1".parse().unwrap()), None);
    }
}
