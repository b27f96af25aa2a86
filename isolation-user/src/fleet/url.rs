//! Where etcd is and how to reach it: the `etcd://` URL and the keys under its prefix, the
//! TLS and login options as etcdctl takes them, and the connection.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

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
                "etcd: the login of {u} to {url} goes over plaintext: anyone on the path reads \
                 the password; give --etcd-cacert (TLS)"
            );
        }
    }
    let mut endpoints: Vec<String> = url
        .endpoints
        .iter()
        .map(|e| format!("{scheme}://{e}"))
        .collect();
    if endpoints.len() > 1 {
        endpoints = live_members(url, &endpoints, &opts, timeout).await?;
    }
    let c = tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
        .await
        .map_err(|_| anyhow!("etcd at {url} did not answer within {timeout:?}"))?
        .with_context(|| format!("cannot reach etcd at {url}"))?;
    Ok(c)
}

/// How long a request is asked again through a moment etcd cannot answer (a leader
/// election takes a second or two): the probe of `live_members`, a push, an admin's read.
pub(super) const SETTLE_FOR: Duration = Duration::from_secs(15);

/// What a member answered the probe of `live_members`.
enum Member {
    /// A read of the cluster's current state (linearizable).
    Live,
    /// Not that, but a read of its own copy (serializable): up, without a leader (an
    /// election, or cut off from the majority). Why it failed.
    Electing(String),
    /// Nothing: down, unreachable, or refusing (why).
    Down(String),
}

/// The members that answer a read of `P/policy` now. etcd-client spreads requests over
/// every endpoint it is given, and a request that lands on a member that is down fails
/// (etcdv3/etcd-client#39): given several, it gets only those that answered. While no
/// member answers but some are up without a leader (an election), it asks again for up to
/// `SETTLE_FOR`. A member that dies later fails the requests sent to it: a push and an
/// admin's reads ask again (`fleet::etcd`), a node's session ends and the next one connects
/// anew (`service::etcd`).
async fn live_members(
    url: &EtcdUrl,
    endpoints: &[String],
    opts: &ConnectOptions,
    timeout: Duration,
) -> Result<Vec<String>> {
    let t0 = std::time::Instant::now();
    loop {
        // All at once: a member cut off silently costs its timeout once, not once each.
        let mut asked = tokio::task::JoinSet::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let (url, ep, opts) = (url.clone(), ep.clone(), opts.clone());
            asked.spawn(async move { (i, probe(&url, &ep, &opts, timeout).await) });
        }
        let mut answers = asked.join_all().await;
        answers.sort_by_key(|(i, _)| *i);
        let mut live = Vec::new();
        let mut failed = Vec::new();
        let mut electing = 0;
        for (ep, (_, answer)) in endpoints.iter().zip(answers) {
            match answer {
                Member::Live => live.push(ep.clone()),
                Member::Electing(why) => {
                    electing += 1;
                    failed.push(format!("{ep}: {why}"));
                }
                Member::Down(why) => failed.push(format!("{ep}: {why}")),
            }
        }
        if !live.is_empty() {
            if !failed.is_empty() {
                tracing::warn!("etcd: going on without {}", failed.join("; "));
            }
            return Ok(live);
        }
        if electing == 0 || t0.elapsed() >= SETTLE_FOR {
            bail!("no member of etcd at {url} answered: {}", failed.join("; "));
        }
        tracing::debug!("etcd: no leader yet ({}); asking again", failed.join("; "));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One member's answer to a count-only read of `P/policy`.
async fn probe(url: &EtcdUrl, ep: &str, opts: &ConnectOptions, timeout: Duration) -> Member {
    let wait = timeout.min(Duration::from_secs(2));
    let probe = opts.clone().with_connect_timeout(wait).with_timeout(wait);
    let count = || etcd_client::GetOptions::new().with_count_only();
    let answer = tokio::time::timeout(wait * 2, async {
        let mut c = match Client::connect([ep], Some(probe)).await {
            Ok(c) => c,
            Err(e) => return Member::Down(e.to_string()),
        };
        match c.get(url.policy_key(), Some(count())).await {
            Ok(_) => Member::Live,
            Err(e) => match c
                .get(url.policy_key(), Some(count().with_serializable()))
                .await
            {
                Ok(_) => Member::Electing(e.to_string()),
                Err(_) => Member::Down(e.to_string()),
            },
        }
    })
    .await;
    answer.unwrap_or_else(|_| Member::Down(format!("no answer within {:?}", wait * 2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_one_or_more_endpoints() {
        let u: EtcdUrl = "etcd://192.0.2.1:2379,192.0.2.2:2379/isolation/prod/"
            .parse()
            .unwrap();
        assert_eq!(u.endpoints, ["192.0.2.1:2379", "192.0.2.2:2379"]);
        assert_eq!(u.policy_key(), "/isolation/prod/policy");
        assert_eq!(u.node_key("n1"), "/isolation/prod/nodes/n1");
        assert_eq!(
            u.to_string(),
            "etcd://192.0.2.1:2379,192.0.2.2:2379/isolation/prod"
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
