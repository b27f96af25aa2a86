//! The fleet's operations on etcd: read the policy (and its parts), push it with a
//! compare-and-swap, roll it back, read the nodes' records, clean up parts no version needs.

use anyhow::{Context as _, Result, anyhow, bail};
use std::time::Duration;

use etcd_client::{Client, EventType, PutOptions, WatchOptions, WatchStream};

use super::{
    EtcdUrl, NodeEntry, NodeRecord,
    chunks::{Encoded, PART_MAX, manifest_of, sha256_hex},
    codec::uncompact,
    url::SETTLE_FOR,
};
use crate::policy::{self, Policy};

/// Parts already read, by SHA-256: a node keeps the last policy's, so an edit of a big
/// policy fetches only the parts that changed.
pub type PartCache = std::collections::HashMap<String, Vec<u8>>;

/// Why a value of `P/policy` gave no policy.
#[derive(Debug)]
pub enum Unresolved {
    /// etcd failed: try again.
    Etcd(anyhow::Error),
    /// The value is not a policy this build takes: trying again will not help.
    Refused(String),
}

impl From<anyhow::Error> for Unresolved {
    fn from(e: anyhow::Error) -> Self {
        Unresolved::Etcd(e)
    }
}

impl From<Unresolved> for anyhow::Error {
    fn from(u: Unresolved) -> Self {
        match u {
            Unresolved::Etcd(e) => e,
            Unresolved::Refused(why) => anyhow!(why),
        }
    }
}

/// The policy a value of `P/policy` (at mod revision `rev`) stands for, with the lines of
/// its file when it is one: the file itself, or the parts its manifest names, read at
/// `rev` (so parts removed since do not matter) and checked against their hashes.
pub async fn resolve(
    c: &mut Client,
    url: &EtcdUrl,
    value: &[u8],
    rev: i64,
    cache: &mut PartCache,
) -> Result<(Policy, policy::Lines), Unresolved> {
    let name = format!("{}@{rev}", url.policy_key());
    let m = match manifest_of(value) {
        None => {
            return std::str::from_utf8(value)
                .map_err(|_| format!("{name} is not UTF-8 text"))
                .and_then(|t| policy::parse_with_lines(&name, t).map_err(|e| e.to_string()))
                .map_err(Unresolved::Refused);
        }
        Some(Err(e)) => return Err(Unresolved::Refused(format!("{name}: {e}"))),
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
                let r = read_part(c, &key, rev).await?;
                let Some(kv) = r.kvs().first() else {
                    return Err(Unresolved::Refused(format!(
                        "{key}, named by the manifest of revision {rev}, is missing"
                    )));
                };
                let b = kv.value().to_vec();
                if sha256_hex(&b) != *h {
                    return Err(Unresolved::Refused(format!(
                        "{key} does not match its hash"
                    )));
                }
                b
            }
        };
        if bytes.len() > PART_MAX || blob.len() + bytes.len() > m.size {
            return Err(Unresolved::Refused(format!(
                "the parts of {name} add up to more than the {} bytes its manifest names",
                m.size
            )));
        }
        blob.extend_from_slice(&bytes);
        got.insert(h.clone(), bytes);
    }
    *cache = got;
    if blob.len() != m.size || sha256_hex(&blob) != m.sha256 {
        return Err(Unresolved::Refused(format!(
            "the parts of {name} do not add up to the policy its manifest names"
        )));
    }
    let p = uncompact(&name, &blob).map_err(Unresolved::Refused)?;
    let lines = policy::Lines {
        file: name,
        ..Default::default()
    };
    Ok((p, lines))
}

/// A part, read at the revision of the manifest that names it, so that a push or a clean-up
/// meanwhile cannot hand a node a mix. Once etcd has compacted that revision away (routine
/// with `--auto-compaction-retention`: a node that starts an hour after the push), the
/// part's current value: a part is named by its hash, which the caller checks, so it is the
/// same bytes; a part removed since belongs to a version a newer one replaced, which the
/// node reads next (the caller says the part is missing; the follower reads again).
async fn read_part(c: &mut Client, key: &str, rev: i64) -> Result<etcd_client::GetResponse> {
    let at = Some(etcd_client::GetOptions::new().with_revision(rev));
    match c.get(key, at).await {
        Err(e) if is_compacted(&e) => c
            .get(key, None)
            .await
            .with_context(|| format!("cannot read {key}")),
        r => r.with_context(|| format!("cannot read {key} at revision {rev}")),
    }
}

/// etcd's answer to a read at a revision its compaction has removed.
fn is_compacted(e: &etcd_client::Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
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

/// The value of `P/policy` as stored (a policy file or a manifest) and its mod revision;
/// asked again through a leader election (`asking_again`), as every read an operator's
/// command makes.
pub async fn read_value(c: &mut Client, url: &EtcdUrl) -> Result<Option<(Vec<u8>, i64)>> {
    asking_again(async || read_raw(c, url, None).await).await
}

/// The fleet's policy and its mod revision (None when absent).
pub async fn read_policy(c: &mut Client, url: &EtcdUrl) -> Result<Option<(Policy, i64)>> {
    asking_again(async || {
        let Some((v, rev)) = read_raw(c, url, None).await? else {
            return Ok(None);
        };
        let (p, _) = resolve(c, url, &v, rev, &mut PartCache::new()).await?;
        Ok(Some((p, rev)))
    })
    .await
}

/// Puts back the version of `P/policy` before the current one (`rev`), with a
/// compare-and-swap on `rev`: its value as it was (a big policy's parts are kept for this,
/// see `clean_parts`). Ok((the restored version's revision, the new revision)).
pub async fn rollback(c: &mut Client, url: &EtcdUrl, rev: i64) -> Result<(i64, i64)> {
    let key = url.policy_key();
    let at = || Some(etcd_client::GetOptions::new().with_revision(rev - 1));
    let before = asking_again(async || match c.get(key.clone(), at()).await {
        Err(e) if is_compacted(&e) => bail!(
            "the version of {key} before revision {rev} is gone: etcd compacted its history \
             past it; nothing was written (push the file you want instead)"
        ),
        r => r.with_context(|| format!("cannot read {key} at revision {}", rev - 1)),
    })
    .await?;
    let (value, prev) = before
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
        .ok_or_else(|| anyhow!("{key} has no version before revision {rev}"))?;
    // Its parts must still be there (they are, unless removed by hand or a failed push's
    // clean-up raced it): checked before anything is written.
    let refused =
        asking_again(
            async || match resolve(c, url, &value, prev, &mut PartCache::new()).await {
                Ok(_) => Ok(None),
                Err(Unresolved::Etcd(e)) => Err(e),
                Err(Unresolved::Refused(why)) => Ok(Some(why)),
            },
        )
        .await?;
    if let Some(why) = refused {
        bail!("the version of revision {prev} cannot be restored: {why}")
    }
    let (new, _) = push(c, url, &Encoded::whole(value), rev).await?;
    Ok((prev, new))
}

/// Every key under `P/nodes/`, by name.
pub async fn read_nodes(c: &mut Client, url: &EtcdUrl) -> Result<Vec<NodeEntry>> {
    let prefix = url.nodes_prefix();
    let all = || Some(etcd_client::GetOptions::new().with_prefix());
    let r = asking_again(async || Ok(c.get(prefix.as_str(), all()).await?)).await?;
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
        let kept = asking_again(async || parts_in_use(c, url).await)
            .await
            .with_context(|| format!("the push did not land ({key} is unchanged)"))?
            .0;
        for (h, bytes) in enc.parts() {
            if kept.contains(h) || !written.insert(h.to_string()) {
                continue;
            }
            // A part is named by its hash: writing it twice writes the same bytes.
            asking_again(async || Ok(c.put(url.part_key(h), bytes, None).await?))
                .await
                .with_context(|| {
                    format!(
                        "cannot write {}; the push did not land ({key} is unchanged)",
                        url.part_key(h)
                    )
                })?;
        }
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )])
        .and_then([TxnOp::put(key.clone(), enc.value.clone(), None)]);
    let r = match c.txn(txn).await {
        Ok(r) => r,
        Err(e) if outcome_unknown(&e) => {
            let revision = settle(c, url, &enc.value, expected, &e).await?;
            return Ok((revision, written.len()));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("the push did not land ({key} is unchanged)")));
        }
    };
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

/// Whether a failed request may still have been applied: the connection or the member went
/// away, or the cluster gave up waiting (a leader election, a lost quorum), as opposed to a
/// refusal (permission, size, a bad request), which changed nothing. gRPC codes: Cancelled,
/// Unknown, DeadlineExceeded, Aborted, Internal, Unavailable.
fn outcome_unknown(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 1 | 2 | 4 | 10 | 13 | 14),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// An error of a request that asking again may cure (`outcome_unknown`), wrapped or not.
fn passing(e: &anyhow::Error) -> bool {
    e.downcast_ref::<etcd_client::Error>()
        .is_some_and(outcome_unknown)
}

/// `req`, asked again every 300 ms for up to `SETTLE_FOR` while etcd cannot answer
/// (`passing`: a leader election, a member gone): only for requests that change nothing or
/// write the same bytes again. Any other error, or the last one, is returned as it is.
async fn asking_again<T>(mut req: impl AsyncFnMut() -> Result<T>) -> Result<T> {
    let t0 = std::time::Instant::now();
    loop {
        match req().await {
            Err(e) if passing(&e) && t0.elapsed() < SETTLE_FOR => {
                tracing::debug!("etcd did not answer ({e:#}); asking again");
            }
            r => return r,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The answer to the compare-and-swap of a push was lost (`lost`: the member that had it
/// died, or a leader election outlasted the request): it may or may not have been applied.
/// Asked again until a member answers, `P/policy` says which: our value at a revision past
/// `expected`, it landed (Ok: that revision); still at `expected` or someone else's, it did
/// not. A read answered by the cluster (linearizable) comes after the new leader committed
/// what the old one had replicated, so the answer does not change afterwards.
async fn settle(
    c: &mut Client,
    url: &EtcdUrl,
    value: &[u8],
    expected: i64,
    lost: &etcd_client::Error,
) -> Result<i64> {
    let key = url.policy_key();
    let now = read_value(c, url).await.map_err(|e| {
        anyhow!(
            "etcd's answer to the push was lost ({lost}) and reading {key} back failed \
             ({e:#}): whether it landed is not known until a member answers (`fleet status` \
             shows {key}'s revision)"
        )
    })?;
    match now {
        Some((v, rev)) if rev > expected && v == value => {
            tracing::warn!("etcd's answer to the push was lost ({lost}); it landed");
            Ok(rev)
        }
        now => {
            let now = now.map(|(_, r)| r).unwrap_or(0);
            if now == expected {
                bail!(
                    "the push did not land: etcd's answer was lost ({lost}), and {key} is \
                     still at revision {now}; nothing was written: push again"
                );
            }
            bail!(
                "the push did not land: etcd's answer was lost ({lost}), and {key} changed \
                 to revision {now}, not this file; nothing was written: look at it \
                 (`isolation-user fleet diff`), then push again"
            )
        }
    }
}

/// What `push_file` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// `P/policy` holds this file already, at `revision`: nothing was written.
    Already { revision: i64 },
    /// Stored as `revision`, over `was` (0: none); a big policy in (parts, written now).
    Landed {
        revision: i64,
        was: i64,
        parts: Option<(usize, usize)>,
    },
}

/// `fleet push`: a policy file's `text`, parsed as `policy` (and checked by the caller),
/// stored as `P/policy` if that is still at `expect`; without `expect`, at the revision
/// read here, and a file the same as the stored one is not pushed again.
pub async fn push_file(
    c: &mut Client,
    url: &EtcdUrl,
    text: &str,
    policy: &Policy,
    expect: Option<i64>,
) -> Result<Pushed> {
    let before = read_value(c, url)
        .await
        .with_context(|| format!("the push did not land ({} is unchanged)", url.policy_key()))?;
    let expected = expect.unwrap_or(before.as_ref().map(|(_, r)| *r).unwrap_or(0));
    // Encoded once: compared with what etcd holds, then pushed.
    let enc = super::encode(text, policy);
    if expect.is_none() && before.is_some_and(|(v, _)| v == enc.value) {
        return Ok(Pushed::Already { revision: expected });
    }
    let (revision, written) = push(c, url, &enc, expected).await?;
    Ok(Pushed::Landed {
        revision,
        was: expected,
        parts: enc.manifest.as_ref().map(|m| (m.parts.len(), written)),
    })
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

/// The current value of `P/policy` and its mod revision (None when absent), and the store's
/// revision the read saw: a watch from the revision after it misses nothing.
pub async fn read_current(c: &mut Client, url: &EtcdUrl) -> Result<(Option<(Vec<u8>, i64)>, i64)> {
    let key = url.policy_key();
    let r = c
        .get(key.clone(), None)
        .await
        .with_context(|| format!("cannot read {key}"))?;
    let at = r.header().map(|h| h.revision()).unwrap_or(0);
    Ok((
        r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        at,
    ))
}

/// A change of `P/policy` seen by a watch.
pub enum Watched {
    /// The value put last in a batch of changes, and its mod revision.
    Put(Vec<u8>, i64),
    Deleted,
}

/// A watch of `P/policy`.
pub struct PolicyWatch {
    stream: WatchStream,
}

impl PolicyWatch {
    /// Watches `P/policy` from revision `from` on.
    pub async fn start(c: &mut Client, url: &EtcdUrl, from: i64) -> Result<PolicyWatch> {
        let stream = c
            .watch(
                url.policy_key(),
                Some(WatchOptions::new().with_start_revision(from)),
            )
            .await?;
        Ok(PolicyWatch { stream })
    }

    /// The next change; Err when the watch ended (etcd closed or canceled it).
    pub async fn next(&mut self) -> Result<Watched> {
        loop {
            let Some(resp) = self.stream.message().await? else {
                bail!("etcd closed the watch");
            };
            if resp.canceled() {
                bail!("etcd canceled the watch: {}", resp.cancel_reason());
            }
            // The last put of a batch is the one that counts.
            let put = resp
                .events()
                .iter()
                .rev()
                .find(|e| e.event_type() == EventType::Put)
                .and_then(|e| e.kv())
                .map(|kv| (kv.value().to_vec(), kv.mod_revision()));
            if let Some((value, rev)) = put {
                return Ok(Watched::Put(value, rev));
            }
            if !resp.events().is_empty() {
                return Ok(Watched::Deleted);
            }
        }
    }
}

/// A lease kept alive by a task of its own until dropped; `lost` says when it could not be.
pub struct Lease {
    pub id: i64,
    lost: tokio::sync::oneshot::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Grants a lease of `ttl` seconds and renews it every `every`.
    pub async fn hold(c: &mut Client, ttl: i64, every: Duration) -> Result<Lease> {
        let id = c.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut acks) = c.lease_keep_alive(id).await?;
        let (lost_tx, lost) = tokio::sync::oneshot::channel::<String>();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let why = loop {
                tick.tick().await;
                if let Err(e) = keeper.keep_alive().await {
                    break format!("keeping the node record's lease: {e}");
                }
                match acks.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    Ok(_) => break "the node record's lease expired".to_string(),
                    Err(e) => break format!("keeping the node record's lease: {e}"),
                }
            };
            let _ = lost_tx.send(why);
        });
        Ok(Lease { id, lost, task })
    }

    /// Resolves when the lease could not be renewed, with why.
    pub async fn lost(&mut self) -> String {
        (&mut self.lost)
            .await
            .unwrap_or_else(|_| "the lease task ended".into())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes a node's record under `P/nodes/NODE`, bound to `lease`.
pub async fn write_record(
    c: &mut Client,
    url: &EtcdUrl,
    rec: &NodeRecord,
    lease: i64,
) -> Result<()> {
    c.put(
        url.node_key(&rec.node),
        serde_json::to_vec(rec)?,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await?;
    Ok(())
}
