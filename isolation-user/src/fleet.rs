//! One policy for a fleet, kept in etcd (as Calico and Cilium keep theirs).
//!
//! Keys under a prefix P: `P/policy` (the policy file's text; its mod revision names the
//! version every node reports) and `P/nodes/NODE` (what that node runs: `NodeRecord` as
//! JSON, written with a lease, so a dead node's record goes away by itself).
//!
//! `fleet push` writes `P/policy` with a compare-and-swap on the revision it read, so two
//! admins cannot overwrite each other silently; the service (`run --policy-source
//! etcd://…`) reads and watches it and applies it through the engine.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

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
    /// USER:PASSWORD for etcd's authentication.
    #[arg(long, value_name = "USER:PASSWORD", env = "ISOLATION_ETCD_USER")]
    pub etcd_user: Option<String>,
}

/// Connects, failing within `timeout`.
pub async fn connect(url: &EtcdUrl, o: &EtcdOpts, timeout: Duration) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
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
    if let Some(up) = &o.etcd_user {
        let (u, p) = up
            .split_once(':')
            .ok_or_else(|| anyhow!("--etcd-user takes USER:PASSWORD"))?;
        opts = opts.with_user(u, p);
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

/// The policy stored under `P/policy`: its text and mod revision (None when absent).
pub async fn read_policy(c: &mut Client, url: &EtcdUrl) -> Result<Option<(String, i64)>> {
    let r = c.get(url.policy_key(), None).await?;
    Ok(match r.kvs().first() {
        Some(kv) => Some((
            String::from_utf8(kv.value().to_vec())
                .map_err(|_| anyhow!("{} is not UTF-8 text", url.policy_key()))?,
            kv.mod_revision(),
        )),
        None => None,
    })
}

/// The version of `P/policy` before the one at mod revision `rev`: its text and mod
/// revision (from etcd's history: gone once etcd has compacted past it).
pub async fn previous_policy(c: &mut Client, url: &EtcdUrl, rev: i64) -> Result<(String, i64)> {
    let r = c
        .get(
            url.policy_key(),
            Some(etcd_client::GetOptions::new().with_revision(rev - 1)),
        )
        .await
        .with_context(|| {
            format!(
                "cannot read {} before revision {rev} (compacted?)",
                url.policy_key()
            )
        })?;
    let kv = r
        .kvs()
        .first()
        .ok_or_else(|| anyhow!("{} has no version before revision {rev}", url.policy_key()))?;
    let text = String::from_utf8(kv.value().to_vec())
        .map_err(|_| anyhow!("{} is not UTF-8 text", url.policy_key()))?;
    Ok((text, kv.mod_revision()))
}

/// Every node's record.
pub async fn read_nodes(c: &mut Client, url: &EtcdUrl) -> Result<Vec<NodeRecord>> {
    let r = c
        .get(
            url.nodes_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut out = Vec::new();
    for kv in r.kvs() {
        match serde_json::from_slice::<NodeRecord>(kv.value()) {
            Ok(n) => out.push(n),
            Err(e) => tracing::warn!(
                "skipping {}: not a node record ({e})",
                String::from_utf8_lossy(kv.key())
            ),
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// Stores `text` as the policy if `P/policy` is still at `expected` (0: absent). Ok(new
/// revision), or Err naming the revision that got there first.
pub async fn push(c: &mut Client, url: &EtcdUrl, text: &str, expected: i64) -> Result<i64> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let key = url.policy_key();
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )])
        .and_then([TxnOp::put(key.clone(), text, None)]);
    let r = c.txn(txn).await?;
    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
    if !r.succeeded() {
        let now = read_policy(c, url).await?.map(|(_, r)| r).unwrap_or(0);
        bail!(
            "refused: {key} changed since it was read (revision {expected}, now {now}); \
             nothing was written. Look at it (`isolation-user fleet diff`), then push again"
        );
    }
    Ok(revision)
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
