//! One policy for a fleet, kept in etcd (as Calico and Cilium keep theirs).
//!
//! Keys under a prefix P: `P/policy` (the policy file's text, or the manifest of a big
//! policy's parts; its mod revision names the version every node reports) and
//! `P/nodes/NODE` (what that node runs: `NodeRecord` as JSON, written with a lease, so a
//! dead node's record goes away by itself).
//!
//! `fleet push` writes `P/policy` with a compare-and-swap on the revision it read, so two
//! admins cannot overwrite each other silently; the service (`run --policy-source
//! etcd://…`) reads and watches it and applies it through the engine.
//!
//! A policy file bigger than `INLINE_MAX` (a whitelist of a million addresses is ~16 MiB
//! of text; etcd refuses requests over 1.5 MiB by default) is encoded compactly (`compact`)
//! and cut into parts stored under `P/parts/SHA256` before `P/policy` is swapped for a
//! manifest naming them (`Manifest`). The cuts are content-defined (FastCDC), so an edit of
//! a few entries writes a part or two, not the whole policy again, and etcd's history grows
//! by what changed. Nodes read the parts at the manifest's revision, so a later push or
//! clean-up never hands them a mix.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::policy::{self, Policy};

/// `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoints: Vec<String>,
    /// Starts with `/`, no trailing `/`.
    pub prefix: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("'{s}' is not an etcd://HOST:PORT[,HOST:PORT…]/PREFIX URL"))?;
        let (hosts, prefix) = rest
            .split_once('/')
            .ok_or_else(|| format!("'{s}' names no prefix (etcd://HOST:PORT/PREFIX)"))?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(format!("'{s}' names no prefix (etcd://HOST:PORT/PREFIX)"));
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(String::from)
            .collect();
        if endpoints.is_empty() || endpoints.iter().any(|h| !h.contains(':')) {
            return Err(format!("'{s}': give each etcd endpoint as HOST:PORT"));
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: format!("/{prefix}"),
        })
    }
}

impl std::fmt::Display for EtcdUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd://{}{}", self.endpoints.join(","), self.prefix)
    }
}

impl EtcdUrl {
    pub fn policy_key(&self) -> String {
        format!("{}/policy", self.prefix)
    }
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    pub fn node_key(&self, node: &str) -> String {
        format!("{}{node}", self.nodes_prefix())
    }
    pub fn parts_prefix(&self) -> String {
        format!("{}/parts/", self.prefix)
    }
    pub fn part_key(&self, sha256: &str) -> String {
        format!("{}{sha256}", self.parts_prefix())
    }
}

/// How to reach etcd, as etcdctl takes it.
#[derive(Args, Clone, Debug, Default)]
pub struct EtcdOpts {
    /// CA certificate (PEM) that signed the etcd servers' certificates: connect over TLS.
    #[arg(long, value_name = "FILE")]
    pub etcd_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), with --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Client key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// USER:PASSWORD for etcd's authentication. On the command line, every local user reads
    /// it in /proc: prefer --etcd-user-file, or this variable in a root-only file.
    #[arg(long, value_name = "USER:PASSWORD", env = "ISOLATION_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file whose first line is USER:PASSWORD, readable by its owner only (chmod 600).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "etcd_user",
        env = "ISOLATION_ETCD_USER_FILE"
    )]
    pub etcd_user_file: Option<std::path::PathBuf>,
}

/// The longest --etcd-user-file read.
const MAX_LOGIN_FILE: u64 = 4096;

impl EtcdOpts {
    /// USER:PASSWORD, from --etcd-user or --etcd-user-file.
    fn login(&self) -> Result<Option<String>> {
        use std::io::Read as _;
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let Some(path) = &self.etcd_user_file else {
            return Ok(self.etcd_user.clone());
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("--etcd-user-file {}: cannot open it", path.display()))?;
        let m = f.metadata()?;
        // SAFETY: geteuid(2) cannot fail.
        let me = unsafe { libc::geteuid() };
        if !m.is_file() || (m.uid() != me && m.uid() != 0) || m.mode() & 0o077 != 0 {
            bail!(
                "--etcd-user-file {}: a password file must be a regular file of this user's or \
                 root's, readable by its owner only (chmod 600); it is mode {:o}, uid {}",
                path.display(),
                m.mode() & 0o7777,
                m.uid()
            );
        }
        let mut text = String::new();
        f.take(MAX_LOGIN_FILE + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("--etcd-user-file {}: not text", path.display()))?;
        if text.len() as u64 > MAX_LOGIN_FILE {
            bail!(
                "--etcd-user-file {}: longer than {MAX_LOGIN_FILE} bytes; it holds one line, USER:PASSWORD",
                path.display()
            );
        }
        let line = text.lines().next().unwrap_or("").trim();
        if !line.contains(':') {
            bail!(
                "--etcd-user-file {}: its first line must be USER:PASSWORD",
                path.display()
            );
        }
        Ok(Some(line.to_string()))
    }
}

/// Connects, failing within `timeout`.
pub async fn connect(url: &EtcdUrl, o: &EtcdOpts, timeout: Duration) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        // HTTP/2 pings find a silent partition (a killed etcd resets the connection at
        // once); 5 s leaves room for a host busy applying a big policy on every core.
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
    let scheme = if o.etcd_cacert.is_some() {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &o.etcd_cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&o.etcd_cert, &o.etcd_key) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        opts = opts.with_tls(tls);
        "https"
    } else {
        "http"
    };
    if let Some(up) = &o.login()? {
        let (u, p) = up
            .split_once(':')
            .ok_or_else(|| anyhow!("--etcd-user takes USER:PASSWORD"))?;
        // etcd's tokens expire (5 min by default): a long-running node renews its own.
        opts = opts.with_user(u, p).with_auto_token_refresh(true);
        if scheme == "http" {
            tracing::warn!(
                "etcd: the login of {u} to {url} goes over plaintext: anyone on the path reads                  the password; give --etcd-cacert (TLS)"
            );
        }
    }
    let endpoints: Vec<String> = url
        .endpoints
        .iter()
        .map(|e| format!("{scheme}://{e}"))
        .collect();
    let c = tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
        .await
        .map_err(|_| anyhow!("etcd at {url} did not answer within {timeout:?}"))?
        .with_context(|| format!("cannot reach etcd at {url}"))?;
    Ok(c)
}

/// What a node runs, under `P/nodes/NODE`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub node: String,
    /// The mod revision of `P/policy` this node last applied (0: none yet).
    pub revision: i64,
    pub backend: String,
    /// `ok`, or why the node refused the policy it was given (it runs `revision` then).
    pub result: String,
    /// The revision that was refused, when `result` is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_revision: Option<i64>,
    /// Unix time of the record.
    pub time: f64,
    /// The engine's generation on the node.
    pub generation: u32,
}

/// Policy files up to this size are stored as they are in `P/policy` (readable with
/// `etcdctl get`); bigger ones in parts. Below etcd's default 1.5 MiB request limit.
pub const INLINE_MAX: usize = 1 << 20;
/// Part sizes (FastCDC's minimum, average and maximum): the maximum stays under etcd's
/// request limit; the average keeps the rewrite an edit costs around half a MiB.
const PART_MIN: usize = 256 << 10;
const PART_AVG: usize = 512 << 10;
const PART_MAX: usize = 1 << 20;

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

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let d = sha2::Sha256::digest(b);
    let mut s = String::with_capacity(64);
    for x in d.iter() {
        let _ = write!(s, "{x:02x}");
    }
    s
}

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
    fn parts(&self) -> impl Iterator<Item = (&str, &[u8])> {
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
        return Encoded {
            value: text.as_bytes().to_vec(),
            manifest: None,
            blob: Vec::new(),
            parts: Vec::new(),
        };
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

/// Parts already read, by SHA-256: a node keeps the last policy's, so an edit of a big
/// policy fetches only the parts that changed.
pub type PartCache = std::collections::HashMap<String, Vec<u8>>;

/// The policy a value of `P/policy` (at mod revision `rev`) stands for, with the lines of
/// its file when it is one: the file itself, or the parts its manifest names, read at
/// `rev` (so parts removed since do not matter) and checked against their hashes. Err:
/// etcd failed (try again); Ok(Err): the value is not a policy this build takes (trying
/// again will not help).
pub async fn resolve(
    c: &mut Client,
    url: &EtcdUrl,
    value: &[u8],
    rev: i64,
    cache: &mut PartCache,
) -> Result<Result<(Policy, policy::Lines), String>> {
    let name = format!("{}@{rev}", url.policy_key());
    let m = match manifest_of(value) {
        None => {
            return Ok(std::str::from_utf8(value)
                .map_err(|_| format!("{name} is not UTF-8 text"))
                .and_then(|t| policy::parse_with_lines(&name, t).map_err(|e| e.to_string())));
        }
        Some(Err(e)) => return Ok(Err(format!("{name}: {e}"))),
        Some(Ok(m)) => m,
    };
    // m.size is bounded by `check_manifest`; the parts are held to it as they come.
    let mut blob = Vec::with_capacity(m.size);
    let mut got = PartCache::new();
    for h in &m.parts {
        let bytes = match cache.remove(h).or_else(|| got.get(h).cloned()) {
            Some(b) => b,
            None => {
                let key = url.part_key(h);
                let r = c
                    .get(
                        key.clone(),
                        Some(etcd_client::GetOptions::new().with_revision(rev)),
                    )
                    .await
                    .with_context(|| format!("cannot read {key} at revision {rev}"))?;
                let Some(kv) = r.kvs().first() else {
                    return Ok(Err(format!(
                        "{key}, named by the manifest of revision {rev}, is missing"
                    )));
                };
                let b = kv.value().to_vec();
                if sha256_hex(&b) != *h {
                    return Ok(Err(format!("{key} does not match its hash")));
                }
                b
            }
        };
        if bytes.len() > PART_MAX || blob.len() + bytes.len() > m.size {
            return Ok(Err(format!(
                "the parts of {name} add up to more than the {} bytes its manifest names",
                m.size
            )));
        }
        blob.extend_from_slice(&bytes);
        got.insert(h.clone(), bytes);
    }
    *cache = got;
    if blob.len() != m.size || sha256_hex(&blob) != m.sha256 {
        return Ok(Err(format!(
            "the parts of {name} do not add up to the policy its manifest names"
        )));
    }
    Ok(uncompact(&name, &blob).map(|p| {
        let lines = policy::Lines {
            file: name.clone(),
            ..Default::default()
        };
        (p, lines)
    }))
}

/// The raw value of `P/policy` and its mod revision (None when absent).
async fn read_raw(
    c: &mut Client,
    url: &EtcdUrl,
    at: Option<i64>,
) -> Result<Option<(Vec<u8>, i64)>> {
    let opts = at.map(|r| etcd_client::GetOptions::new().with_revision(r));
    let r = c
        .get(url.policy_key(), opts)
        .await
        .with_context(|| match at {
            Some(r) => format!(
                "cannot read {} at revision {r} (compacted?)",
                url.policy_key()
            ),
            None => format!("cannot read {}", url.policy_key()),
        })?;
    Ok(r.kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
}

/// The value of `P/policy` as stored (a policy file or a manifest) and its mod revision.
pub async fn read_value(c: &mut Client, url: &EtcdUrl) -> Result<Option<(Vec<u8>, i64)>> {
    read_raw(c, url, None).await
}

/// The fleet's policy and its mod revision (None when absent).
pub async fn read_policy(c: &mut Client, url: &EtcdUrl) -> Result<Option<(Policy, i64)>> {
    let Some((v, rev)) = read_raw(c, url, None).await? else {
        return Ok(None);
    };
    let (p, _) = resolve(c, url, &v, rev, &mut PartCache::new())
        .await?
        .map_err(anyhow::Error::msg)?;
    Ok(Some((p, rev)))
}

/// Puts back the version of `P/policy` before the current one (`rev`), with a
/// compare-and-swap on `rev`: its value as it was (a big policy's parts are kept for this,
/// see `clean_parts`). Ok((the restored version's revision, the new revision)).
pub async fn rollback(c: &mut Client, url: &EtcdUrl, rev: i64) -> Result<(i64, i64)> {
    let (value, prev) = read_raw(c, url, Some(rev - 1))
        .await?
        .ok_or_else(|| anyhow!("{} has no version before revision {rev}", url.policy_key()))?;
    // Its parts must still be there (they are, unless removed by hand or a failed push's
    // clean-up raced it): checked before anything is written.
    resolve(c, url, &value, prev, &mut PartCache::new())
        .await?
        .map_err(|e| anyhow!("the version of revision {prev} cannot be restored: {e}"))?;
    let enc = Encoded {
        value,
        manifest: None,
        blob: Vec::new(),
        parts: Vec::new(),
    };
    let (new, _) = push(c, url, &enc, rev).await?;
    Ok((prev, new))
}

/// A key under `P/nodes/` as read: the node its key names, and its record, or why it is
/// not one (anyone who can write the prefix can write anything there).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEntry {
    pub name: String,
    pub record: Result<NodeRecord, String>,
}

impl NodeEntry {
    /// The entry of key `P/nodes/NAME` (`name`) holding `value`: a record that does not
    /// parse, or that names another node than its key, is malformed.
    pub fn read(name: &str, value: &[u8]) -> NodeEntry {
        let record = match serde_json::from_slice::<NodeRecord>(value) {
            Err(e) => Err(format!("not a node record: {e}")),
            Ok(r) if r.node != name => Err(format!("its record names another node, '{}'", r.node)),
            Ok(r) => Ok(r),
        };
        NodeEntry {
            name: name.to_string(),
            record,
        }
    }
}

/// Every key under `P/nodes/`, by name.
pub async fn read_nodes(c: &mut Client, url: &EtcdUrl) -> Result<Vec<NodeEntry>> {
    let prefix = url.nodes_prefix();
    let r = c
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut out: Vec<NodeEntry> = r
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            NodeEntry::read(key.strip_prefix(&prefix).unwrap_or(&key), kv.value())
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The parts a value of `P/policy` names (none for an inline policy or a bad manifest).
fn parts_named(value: Option<&[u8]>) -> Vec<String> {
    match value.and_then(manifest_of) {
        Some(Ok(m)) => m.parts,
        _ => Vec::new(),
    }
}

/// The parts named by the current version of `P/policy` and by the one before it (what
/// `fleet rollback` restores), and the current version's mod revision (0: none).
async fn parts_in_use(
    c: &mut Client,
    url: &EtcdUrl,
) -> Result<(std::collections::HashSet<String>, i64)> {
    let cur = read_raw(c, url, None).await?;
    let prev = match &cur {
        Some((_, rev)) if *rev > 1 => read_raw(c, url, Some(rev - 1))
            .await
            .ok()
            .flatten()
            .map(|(v, _)| v),
        _ => None,
    };
    let named = parts_named(cur.as_ref().map(|(v, _)| &v[..]))
        .into_iter()
        .chain(parts_named(prev.as_deref()))
        .collect();
    Ok((named, cur.map(|(_, r)| r).unwrap_or(0)))
}

/// Stores an encoded policy (`encode`) if `P/policy` is still at `expected` (0: absent).
/// Ok(new revision and the number of parts written), or Err naming the revision that got
/// there first. A big policy's parts are written first; only those of the current and
/// previous versions are taken as stored (the clean-up never removes them, see
/// `clean_parts`), every other one is written again. Then `P/policy`, with a
/// compare-and-swap on `expected`.
pub async fn push(
    c: &mut Client,
    url: &EtcdUrl,
    enc: &Encoded,
    expected: i64,
) -> Result<(i64, usize)> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let key = url.policy_key();
    let mut written = std::collections::HashSet::new();
    if enc.manifest.is_some() {
        let (kept, _) = parts_in_use(c, url).await?;
        for (h, bytes) in enc.parts() {
            if kept.contains(h) || !written.insert(h.to_string()) {
                continue;
            }
            c.put(url.part_key(h), bytes, None)
                .await
                .with_context(|| format!("cannot write {}", url.part_key(h)))?;
        }
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )])
        .and_then([TxnOp::put(key.clone(), enc.value.clone(), None)]);
    let r = c.txn(txn).await?;
    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
    if !r.succeeded() {
        let now = read_raw(c, url, None).await?.map(|(_, r)| r).unwrap_or(0);
        let _ = clean_parts(c, url).await;
        bail!(
            "refused: {key} changed since it was read (revision {expected}, now {now}); \
             nothing was written. Look at it (`isolation-user fleet diff`), then push again"
        );
    }
    // The push has landed: a clean-up that fails (etcd busy) is left to the next push.
    if let Err(e) = clean_parts(c, url).await {
        tracing::warn!(
            "pushed as revision {revision}; removing the parts no version needs failed \
             ({e:#}): the next push removes them"
        );
    }
    Ok((revision, written.len()))
}

/// How many parts are stored under `P/parts/`.
pub async fn count_parts(c: &mut Client, url: &EtcdUrl) -> Result<usize> {
    let r = c
        .get(
            url.parts_prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await?;
    Ok(r.count() as usize)
}

/// Removes the parts under `P/parts/` that neither the current version of the policy nor
/// the one before it (what `fleet rollback` restores) names. Safe beside a concurrent push:
/// a part written after the current version (mod revision above it) may belong to a push
/// under way and is left, and a push reuses only the parts of the current and previous
/// versions, which are never removed. How many parts were removed.
pub async fn clean_parts(c: &mut Client, url: &EtcdUrl) -> Result<usize> {
    let (named, at) = parts_in_use(c, url).await?;
    let r = c
        .get(
            url.parts_prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    let gone: Vec<etcd_client::TxnOp> = r
        .kvs()
        .iter()
        .filter(|kv| {
            let h = &kv.key()[url.parts_prefix().len()..];
            kv.mod_revision() <= at && !named.contains(&*String::from_utf8_lossy(h))
        })
        .map(|kv| etcd_client::TxnOp::delete(kv.key(), None))
        .collect();
    // A few requests rather than one per part (etcd takes up to 128 operations in one).
    for ops in gone.chunks(64) {
        c.txn(etcd_client::Txn::new().and_then(ops.to_vec()))
            .await?;
    }
    Ok(gone.len())
}

/// The node name: `--node-name`, else the host name.
pub fn node_name(given: Option<&str>) -> String {
    if let Some(n) = given {
        return n.to_string();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn urls_parse_with_one_or_more_endpoints() {
        let u: EtcdUrl = "etcd://10.0.0.1:2379,10.0.0.2:2379/isolation/prod/"
            .parse()
            .unwrap();
        assert_eq!(u.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(u.policy_key(), "/isolation/prod/policy");
        assert_eq!(u.node_key("n1"), "/isolation/prod/nodes/n1");
        assert_eq!(
            u.to_string(),
            "etcd://10.0.0.1:2379,10.0.0.2:2379/isolation/prod"
        );
        for bad in [
            "http://x:1/p",
            "etcd://x:1",
            "etcd://x:1/",
            "etcd://x/p",
            "etcd:///p",
        ] {
            assert!(bad.parse::<EtcdUrl>().is_err(), "{bad}");
        }
    }
}
