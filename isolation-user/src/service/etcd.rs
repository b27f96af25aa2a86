//! The service's etcd follower: reads `P/policy`, applies it through the engine, watches it,
//! and keeps this node's record under `P/nodes/NODE` (with a lease: a dead node's record
//! expires). etcd unreachable → the live policy stays, the follower retries with backoff,
//! and `status` (`source.json` in the state dir) and `/metrics` say so. A node that comes
//! back applies the latest revision; a policy this node refuses (its limits, its kernel)
//! is reported in its record and never half applied (the engine's transaction).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Config, Health, Source, Trigger, apply_parsed, blocking};
use crate::state::unix_now;
use crate::{engine, fleet, state::Paths};

/// Lease of the node record: it disappears this long after the node stops renewing it.
const LEASE_TTL: i64 = 10;
const KEEPALIVE: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Where the service says how its source is doing, for `status`.
pub fn source_file(paths: &Paths) -> PathBuf {
    paths.state_dir.join("source.json")
}

#[derive(Serialize)]
struct SourceState<'a> {
    source: String,
    node: &'a str,
    connected: bool,
    /// The mod revision of the policy this node runs (0: none yet).
    revision: i64,
    last_error: Option<String>,
    time: f64,
}

/// Runs until the process ends: sessions with etcd, retried with backoff.
pub async fn follow(
    paths: Paths,
    cfg: Arc<Config>,
    health: Arc<Mutex<Health>>,
    mut hup: mpsc::Receiver<()>,
) {
    let Source::Etcd { url, opts, node } = &cfg.source else {
        return;
    };
    let loaded = {
        let p = paths.clone();
        blocking(move || engine::open(&p).is_ok()).await
    };
    let mut f = Follower {
        url: url.clone(),
        opts: opts.clone(),
        node: node.clone(),
        paths,
        cfg: cfg.clone(),
        health,
        last: None,
        loaded,
    };
    f.say(false, None);
    let mut backoff = Duration::from_millis(200);
    loop {
        let began = std::time::Instant::now();
        let e = match f.session(&mut hup).await {
            Ok(()) => anyhow!("the watch ended"),
            Err(e) => e,
        };
        // A session that ran a while starts the backoff over.
        if began.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tracing::warn!(
            "etcd: {e:#}; the live policy stays, retrying in {:.1} s",
            backoff.as_secs_f64()
        );
        f.say(false, Some(format!("{e:#}")));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Follower {
    url: fleet::EtcdUrl,
    opts: fleet::EtcdOpts,
    node: String,
    paths: Paths,
    cfg: Arc<Config>,
    health: Arc<Mutex<Health>>,
    /// The last policy received: (text, mod revision).
    last: Option<(String, i64)>,
    /// A datapath is in place (else the first policy loads it).
    loaded: bool,
}

impl Follower {
    /// Tells `status` (and the metrics) how the source is doing.
    fn say(&self, connected: bool, err: Option<String>) {
        let revision = {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            h.source_up = Some(connected);
            h.source_revision
        };
        let s = SourceState {
            source: self.cfg.source.name(),
            node: &self.node,
            connected,
            revision,
            last_error: err,
            time: unix_now(),
        };
        if let Ok(text) = serde_json::to_vec_pretty(&s) {
            let _ = crate::state::write_atomic(&source_file(&self.paths), &text);
        }
    }

    async fn session(&mut self, hup: &mut mpsc::Receiver<()>) -> Result<()> {
        let key = self.url.policy_key();
        let mut c = fleet::connect(&self.url, &self.opts, Duration::from_secs(3)).await?;
        let lease = c.lease_grant(LEASE_TTL, None).await?.id();
        let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
        tracing::info!("etcd: connected to {} as node {}", self.url, self.node);
        self.say(true, None);
        let r = c.get(key.clone(), None).await?;
        let at = r.header().map(|h| h.revision()).unwrap_or(0);
        match r.kvs().first() {
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value()).into_owned();
                self.take(&mut c, lease, text, kv.mod_revision()).await?;
            }
            None => {
                tracing::warn!("etcd: no policy at {key} yet");
                self.record(&mut c, lease, None).await?;
            }
        }
        let mut watch = c
            .watch(
                key.clone(),
                Some(WatchOptions::new().with_start_revision(at + 1)),
            )
            .await?;
        let mut tick = tokio::time::interval(KEEPALIVE);
        loop {
            tokio::select! {
                m = watch.message() => {
                    let Some(resp) = m? else { bail!("etcd closed the watch") };
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
                        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.mod_revision()));
                    if let Some((text, rev)) = put {
                        self.take(&mut c, lease, text, rev).await?;
                    } else if !resp.events().is_empty() {
                        tracing::warn!("etcd: {key} was deleted; the live policy stays");
                    }
                }
                _ = tick.tick() => keeper.keep_alive().await?,
                a = acks.message() => {
                    match a? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => bail!("the node record's lease expired"),
                    }
                }
                Some(()) = hup.recv() => {
                    if let Some((text, rev)) = self.last.clone() {
                        let refused = self.apply(text, rev, Trigger::Hangup).await;
                        self.record(&mut c, lease, refused.map(|e| (rev, e))).await?;
                    }
                }
            }
        }
    }

    /// A policy from etcd: applied unless it is the one already applied, then recorded.
    async fn take(&mut self, c: &mut Client, lease: i64, text: String, rev: i64) -> Result<()> {
        let done = self.health.lock().map(|h| h.source_revision).unwrap_or(0);
        let refused = if done == rev && self.loaded {
            None
        } else {
            self.last = Some((text.clone(), rev));
            self.apply(text, rev, Trigger::Etcd).await
        };
        self.record(c, lease, refused.map(|e| (rev, e))).await
    }

    /// Applies through the engine; the refusal, if any.
    async fn apply(&mut self, text: String, rev: i64, why: Trigger) -> Option<String> {
        let name = format!("{}@{rev}", self.url.policy_key());
        let why = if self.loaded { why } else { Trigger::Start };
        let (p, c, h) = (self.paths.clone(), self.cfg.clone(), self.health.clone());
        let res = blocking(move || {
            let parsed = crate::policy::parse_with_lines(&name, &text).map_err(Into::into);
            apply_parsed(&p, &c, parsed, &name, why, &h)
        })
        .await;
        match res {
            Ok(_) => {
                self.loaded = true;
                self.health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .source_revision = rev;
                self.say(true, None);
                None
            }
            Err(e) => {
                let e = format!("{e:#}");
                self.say(true, Some(e.clone()));
                Some(e)
            }
        }
    }

    /// Writes this node's record (with the lease).
    async fn record(
        &mut self,
        c: &mut Client,
        lease: i64,
        refused: Option<(i64, String)>,
    ) -> Result<()> {
        let p = self.paths.clone();
        let (backend, generation) = blocking(move || {
            let b = crate::state::State::load(&p)
                .ok()
                .flatten()
                .map(|s| s.backend.name().to_string())
                .unwrap_or_else(|| "none".into());
            (b, engine::generation(&p).unwrap_or(0))
        })
        .await;
        let rec = fleet::NodeRecord {
            node: self.node.clone(),
            revision: self.health.lock().map(|h| h.source_revision).unwrap_or(0),
            backend,
            result: refused
                .as_ref()
                .map(|(_, e)| e.clone())
                .unwrap_or_else(|| "ok".into()),
            refused_revision: refused.map(|(r, _)| r),
            time: unix_now(),
            generation,
        };
        c.put(
            self.url.node_key(&self.node),
            serde_json::to_vec(&rec)?,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok(())
    }
}
