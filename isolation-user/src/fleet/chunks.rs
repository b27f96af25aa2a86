//! A policy file as `P/policy` holds it: the file itself when small, else a manifest naming
//! content-defined parts of its compact encoding (`codec`), each checked against its hash.

use serde::{Deserialize, Serialize};

use super::codec::compact;
use crate::policy::Policy;

/// Policy files up to this size are stored as they are in `P/policy` (readable with
/// `etcdctl get`); bigger ones in parts. Below etcd's default 1.5 MiB request limit.
pub const INLINE_MAX: usize = 1 << 20;
/// Part sizes (FastCDC's minimum, average and maximum): the maximum stays under etcd's
/// request limit; the average keeps the rewrite an edit costs around half a MiB.
const PART_MIN: usize = 256 << 10;
const PART_AVG: usize = 512 << 10;
pub(super) const PART_MAX: usize = 1 << 20;

/// What `P/policy` holds for a policy stored in parts. JSON, so it starts with `{`, which
/// no TOML document does: the two kinds of value cannot be mistaken for each other.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The format's version (1: the parts hold `compact`'s encoding).
    pub isolation_policy_parts: u32,
    /// Bytes of the whole encoding.
    pub size: usize,
    /// SHA-256 of the whole encoding (hex).
    pub sha256: String,
    /// The parts' SHA-256 (hex), in order; each stored under `P/parts/SHA256`.
    pub parts: Vec<String>,
}

pub(super) fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let d = sha2::Sha256::digest(b);
    let mut s = String::with_capacity(64);
    for x in d.iter() {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// What `P/policy` is set to for a policy file, and the parts to store first (none when
/// the file is stored whole).
pub struct Encoded {
    pub value: Vec<u8>,
    pub manifest: Option<Manifest>,
    /// The encoding the parts are cut from, and where each part lies in it.
    blob: Vec<u8>,
    parts: Vec<std::ops::Range<usize>>,
}

impl Encoded {
    /// A value stored as it is (a policy file, or a manifest already stored).
    pub fn whole(value: Vec<u8>) -> Encoded {
        Encoded {
            value,
            manifest: None,
            blob: Vec::new(),
            parts: Vec::new(),
        }
    }

    pub(super) fn parts(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let names = self.manifest.iter().flat_map(|m| m.parts.iter());
        names
            .zip(&self.parts)
            .map(|(h, r)| (h.as_str(), &self.blob[r.clone()]))
    }
}

/// `text`, the policy file, parsed as `policy`: stored whole up to `INLINE_MAX`, else
/// compacted and cut into content-defined parts.
pub fn encode(text: &str, policy: &Policy) -> Encoded {
    if text.len() <= INLINE_MAX {
        return Encoded::whole(text.as_bytes().to_vec());
    }
    let blob = compact(policy);
    let parts: Vec<std::ops::Range<usize>> =
        fastcdc::v2020::FastCDC::new(&blob, PART_MIN, PART_AVG, PART_MAX)
            .map(|c| c.offset..c.offset + c.length)
            .collect();
    let m = Manifest {
        isolation_policy_parts: 1,
        size: blob.len(),
        sha256: sha256_hex(&blob),
        parts: parts.iter().map(|r| sha256_hex(&blob[r.clone()])).collect(),
    };
    Encoded {
        value: serde_json::to_vec(&m).unwrap_or_default(),
        manifest: Some(m),
        blob,
        parts,
    }
}

/// The largest encoding a manifest may name: the biggest policy any backend holds (2M
/// addresses and 1M CIDRs per family, 17 bytes an IPv6 entry and 5 an IPv4 one: 66 MiB)
/// with room for its policy file. Whoever can write `P/policy` must not make a node
/// allocate more.
pub const MAX_ENCODED: usize = 96 << 20;

/// Refuses a manifest that names more than a pushed one ever can: an encoding over
/// `MAX_ENCODED`, or more parts than its size cut into parts of `PART_MIN` makes (`push`
/// cuts at least that much into each part but the last).
fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.size > MAX_ENCODED {
        return Err(format!(
            "the manifest names {} bytes, more than any policy ({MAX_ENCODED})",
            m.size
        ));
    }
    let most = m.size.div_ceil(PART_MIN).max(1);
    if m.parts.len() > most {
        return Err(format!(
            "the manifest names {} parts for {} bytes (at most {most})",
            m.parts.len(),
            m.size
        ));
    }
    Ok(())
}

/// The manifest in a value of `P/policy`, if it holds one (Err: it looks like one but is
/// not).
pub fn manifest_of(value: &[u8]) -> Option<Result<Manifest, String>> {
    if value.first() != Some(&b'{') {
        return None;
    }
    Some(
        serde_json::from_slice::<Manifest>(value)
            .map_err(|e| format!("not a policy manifest ({e})"))
            .and_then(|m| {
                if m.isolation_policy_parts == 1 {
                    check_manifest(&m).map(|()| m)
                } else {
                    Err(format!(
                        "a manifest of format {}, newer than this build reads (1)",
                        m.isolation_policy_parts
                    ))
                }
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fleet::codec::uncompact, policy};

    fn big_policy(n: u32, skip: u32) -> (String, Policy) {
        use std::fmt::Write as _;
        let mut p = String::from(
            "[isolation]\ndefault = \"accept\"\n[networks.a]\nsubnets = [\"192.0.2.0/24\"]\n\
             [whitelist]\nenabled = true\nallow = [\"2001:db8::/64\", \"198.51.100.0/24\",\n",
        );
        for i in (0..n).filter(|i| *i != skip) {
            let _ = writeln!(p, "\"{}\",", std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
        }
        p.push_str("\"2001:db8::1\"]\n");
        let policy = policy::parse("big.toml", &p).unwrap();
        (p, policy)
    }

    #[test]
    fn small_files_stay_inline_and_big_ones_go_compact_in_parts_under_the_limit() {
        let small = "[isolation]\ndefault = \"deny\"\n";
        let e = encode(small, &policy::parse("s", small).unwrap());
        assert_eq!(e.value, small.as_bytes());
        assert!(e.manifest.is_none() && e.parts().count() == 0);
        assert!(manifest_of(&e.value).is_none());

        let (text, big) = big_policy(600_000, u32::MAX);
        assert!(text.len() > 4 * INLINE_MAX);
        let e = encode(&text, &big);
        let m = e.manifest.clone().unwrap();
        assert_eq!(manifest_of(&e.value), Some(Ok(m.clone())));
        assert!(e.value.len() < 64 * 1024, "the manifest is small");
        assert!(e.parts().all(|(_, p)| p.len() <= PART_MAX));
        let joined: Vec<u8> = e.parts().flat_map(|(_, p)| p.iter().copied()).collect();
        assert_eq!(joined, compact(&big));
        assert!(joined.len() < text.len() / 2, "{} bytes", joined.len());
        assert_eq!((m.size, m.sha256), (joined.len(), sha256_hex(&joined)));
        assert_eq!(
            m.parts,
            e.parts().map(|(h, _)| h.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(
            uncompact("x", &joined).unwrap(),
            big,
            "the same policy back"
        );
    }

    #[test]
    fn an_edit_of_one_entry_changes_few_parts() {
        let parts = |skip| {
            let (t, p) = big_policy(600_000, skip);
            encode(&t, &p).manifest.unwrap().parts
        };
        let (a, b) = (parts(u32::MAX), parts(300_000));
        let new: Vec<_> = b.iter().filter(|h| !a.contains(h)).collect();
        assert!(a.len() >= 4, "{} parts", a.len());
        assert!(new.len() <= 2, "{} of {} parts changed", new.len(), b.len());
    }

    #[test]
    fn a_broken_encoding_is_refused_with_its_reason() {
        let (_, p) = big_policy(10, u32::MAX);
        let b = compact(&p);
        assert!(
            uncompact("x", &b[..b.len() - 3])
                .unwrap_err()
                .contains("cut short")
        );
        assert!(
            uncompact("x", b"nonsense")
                .unwrap_err()
                .contains("not an encoding")
        );
        let mut host_bits = b.clone();
        // The last entry is 2001:db8::1/128; make it a /64 with host bits set.
        let tag = host_bits.len() - 17;
        host_bits[tag] = 64 + 64;
        assert!(
            uncompact("x", &host_bits)
                .unwrap_err()
                .contains("host bits")
        );
        let mut bad_tag = b;
        bad_tag[tag] = 40;
        assert!(uncompact("x", &bad_tag).unwrap_err().contains("tag 40"));
    }

    /// A hostile manifest (a size no policy has, or more parts than a size holds) is
    /// refused before anything is allocated or read.
    #[test]
    fn a_manifest_naming_too_much_is_refused_before_reading() {
        let m = |size: u64, parts: usize| {
            let parts: Vec<String> = (0..parts).map(|_| "00".repeat(32)).collect();
            format!(
                r#"{{"isolation_policy_parts":1,"size":{size},"sha256":"","parts":{}}}"#,
                serde_json::to_string(&parts).unwrap()
            )
        };
        for (size, parts, why) in [
            (u64::MAX, 1, "more than any policy"),
            (1 << 62, 1, "more than any policy"),
            (1, 600, "600 parts for 1 bytes"),
            (5 << 20, 600, "600 parts"),
        ] {
            let e = manifest_of(m(size, parts).as_bytes()).unwrap().unwrap_err();
            assert!(e.contains(why), "{size} {parts}: {e}");
        }
        // What push writes passes.
        let (text, p) = big_policy(300_000, 0);
        let enc = encode(&text, &p);
        let m = enc.manifest.clone().unwrap();
        assert_eq!(manifest_of(&enc.value).unwrap().unwrap(), m);
    }

    #[test]
    fn manifests_of_another_format_are_refused_not_misread() {
        assert!(matches!(manifest_of(b"{\"x\": 1}"), Some(Err(_))));
        let m = br#"{"isolation_policy_parts":2,"size":1,"sha256":"","parts":[]}"#;
        assert!(manifest_of(m).unwrap().unwrap_err().contains("newer"));
    }
}
