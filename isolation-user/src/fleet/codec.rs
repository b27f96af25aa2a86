//! The compact encoding of a big policy (what its parts hold).

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{self, Policy};

const COMPACT_MAGIC: &[u8] = b"isolation-policy/1\n";

/// A big policy as its parts hold it: a magic line, the policy file without its whitelist
/// entries (`policy::to_toml`, length-prefixed), then the entries in the policy's order,
/// each a tag byte (an IPv4 prefix length, or 64 + an IPv6 one) and the address's 4 or 16
/// bytes. A node reads a million entries from it in milliseconds and a few MiB, where the
/// TOML of the same whitelist costs its parser ~240 MiB and a second of CPU.
pub fn compact(p: &Policy) -> Vec<u8> {
    let head = policy::to_toml(&Policy {
        isolation: p.isolation.clone(),
        networks: p.networks.clone(),
        whitelist: policy::Whitelist {
            enabled: p.whitelist.enabled,
            log: p.whitelist.log,
            allow: Vec::new(),
        },
        connections: p.connections,
        // Permanent entries travel in the head, as the policy file writes them.
        blocklist: p.blocklist.clone(),
    });
    let mut out =
        Vec::with_capacity(COMPACT_MAGIC.len() + 4 + head.len() + p.whitelist.allow.len() * 5);
    out.extend_from_slice(COMPACT_MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head.as_bytes());
    for n in &p.whitelist.allow {
        match n {
            IpNet::V4(a) => {
                out.push(a.prefix_len());
                out.extend_from_slice(&a.addr().octets());
            }
            IpNet::V6(a) => {
                out.push(64 + a.prefix_len());
                out.extend_from_slice(&a.addr().octets());
            }
        }
    }
    out
}

/// The policy `compact` encoded (named `name` in errors).
pub fn uncompact(name: &str, b: &[u8]) -> Result<Policy, String> {
    let rest = b
        .strip_prefix(COMPACT_MAGIC)
        .ok_or_else(|| format!("{name}: not an encoding this build reads"))?;
    let short = || format!("{name}: the encoding is cut short");
    let len = u32::from_le_bytes(
        rest.get(..4)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    ) as usize;
    let head = rest.get(4..4 + len).ok_or_else(short)?;
    let head = std::str::from_utf8(head).map_err(|_| format!("{name}: the policy is not UTF-8"))?;
    let mut p = policy::parse(name, head).map_err(|e| e.to_string())?;
    let mut at = &rest[4 + len..];
    let mut allow = Vec::with_capacity(at.len() / 5);
    while let Some((&tag, tail)) = at.split_first() {
        let (n, tail) = match tag {
            0..=32 => {
                let (a, t) = tail.split_at_checked(4).ok_or_else(short)?;
                let a = <[u8; 4]>::try_from(a).map_err(|_| short())?;
                (Ipv4Net::new(a.into(), tag).map(IpNet::V4), t)
            }
            64..=192 => {
                let (a, t) = tail.split_at_checked(16).ok_or_else(short)?;
                let a = <[u8; 16]>::try_from(a).map_err(|_| short())?;
                (Ipv6Net::new(a.into(), tag - 64).map(IpNet::V6), t)
            }
            _ => return Err(format!("{name}: entry {} has tag {tag}", allow.len() + 1)),
        };
        let n = n.map_err(|e| format!("{name}: entry {}: {e}", allow.len() + 1))?;
        if n.trunc() != n {
            return Err(format!(
                "{name}: entry {} ({n}) has host bits set",
                allow.len() + 1
            ));
        }
        allow.push(n);
        at = tail;
    }
    p.whitelist.allow = allow;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A big policy's encoding carries every section, the blocklist included: a node reads
    /// back the policy that was pushed.
    #[test]
    fn the_encoding_round_trips_every_section() {
        let text = format!(
            "{}\n[connections]\nmax = 4096\n\n[blocklist]\nlog = false\nentries = [\"203.0.113.0/24\", \"2001:db8:bad::1\"]\n",
            crate::policy::tests::EVERY_KIND
        );
        let p = policy::parse("p.toml", &text).unwrap();
        assert_eq!(p.blocklist.entries.len(), 2);
        assert_eq!(uncompact("policy", &compact(&p)).unwrap(), p);
    }
}
