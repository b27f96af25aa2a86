//! The service's etcd follower: reads `P/policy`, applies it through the engine, watches it,
//! and keeps this node's record under `P/nodes/NODE` (with a lease: a dead node's record
//! expires). etcd unreachable → the live policy stays, the follower retries with backoff,
//! and `status` (`source.json` in the state dir) and `/metrics` say so. A node that comes
//! back applies the latest revision; a policy this node refuses (its limits, its kernel)
//! is reported in its record and never half applied (the engine's transaction).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, anyhow, bail};
use etcd_client::Client;
use tokio::sync::mpsc;

use super::{Config, Health, Read, Source, Trigger, apply_parsed, blocking};
use crate::state::unix_now;
use crate::{engine, fleet, state::Paths};

/// Lease of the node record: it disappears this long after the node stops renewing it.
const LEASE_TTL: i64 = 10;
const KEEPALIVE: Duration = Duration::from_secs(3);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Runs until the process ends: sessions with etcd, retried with backoff.
pub async fn follow(
    paths: Paths,
    cfg: Arc<Config>,
    health: Arc<Mutex<Health>>,
    hup: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
) {
    let Source::Etcd { url, opts, node } = &cfg.source else {
        return;
    };
    // Held while this follower runs; a follower that died lets its successor take it.
    let mut hup = hup.lock().await;
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
        parts: fleet::PartCache::new(),
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
    /// The last value of `P/policy` received (a policy or a manifest), and its revision.
    last: Option<(Vec<u8>, i64)>,
    /// A datapath is in place (else the first policy loads it).
    loaded: bool,
    /// The parts of the last policy stored in parts: an edit fetches only what changed.
    parts: fleet::PartCache,
}

impl Follower {
    /// Tells `status` (and the metrics) how the source is doing.
    fn say(&self, connected: bool, err: Option<String>) {
        let revision = {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            h.source_up = Some(connected);
            h.source_revision
        };
        fleet::SourceStatus {
            source: self.cfg.source.name(),
            node: self.node.clone(),
            connected,
            revision,
            last_error: err,
            time: unix_now(),
        }
        .save(&self.paths);
    }

    async fn session(&mut self, hup: &mut mpsc::Receiver<()>) -> Result<()> {
        let key = self.url.policy_key();
        let mut c = fleet::connect(&self.url, &self.opts, Duration::from_secs(3)).await?;
        // The lease is kept alive by a task of its own: an apply of a big policy on a busy
        // host can outlast the lease's TTL, and must not take the node's record with it.
        let mut lease = fleet::Lease::hold(&mut c, LEASE_TTL, KEEPALIVE).await?;
        tracing::info!("etcd: connected to {} as node {}", self.url, self.node);
        self.say(true, None);
        let (current, at) = fleet::read_current(&mut c, &self.url).await?;
        match current {
            Some((value, rev)) => {
                self.take(&mut c, lease.id, value, rev, Trigger::Etcd)
                    .await?
            }
            None => {
                tracing::warn!("etcd: no policy at {key} yet");
                self.record(&mut c, lease.id, None).await?;
            }
        }
        let mut watch = fleet::PolicyWatch::start(&mut c, &self.url, at + 1).await?;
        loop {
            tokio::select! {
                w = watch.next() => match w? {
                    fleet::Watched::Put(value, rev) => {
                        self.take(&mut c, lease.id, value, rev, Trigger::Etcd).await?
                    }
                    fleet::Watched::Deleted => {
                        tracing::warn!("etcd: {key} was deleted; the live policy stays")
                    }
                },
                why = lease.lost() => bail!("{why}"),
                Some(()) = hup.recv() => {
                    if let Some((value, rev)) = self.last.clone() {
                        self.take(&mut c, lease.id, value, rev, Trigger::Hangup).await?;
                    }
                }
            }
        }
    }

    /// A value of `P/policy`: unless it came from etcd and is the one already applied, its
    /// policy (read from its parts if it is a manifest; a SIGHUP finds them in the cache) is
    /// applied; then the outcome is recorded.
    async fn take(
        &mut self,
        c: &mut Client,
        lease: i64,
        value: Vec<u8>,
        rev: i64,
        why: Trigger,
    ) -> Result<()> {
        let done = self.health.lock().map(|h| h.source_revision).unwrap_or(0);
        let refused = if why == Trigger::Etcd && done == rev && self.loaded {
            None
        } else {
            let t0 = std::time::Instant::now();
            match fleet::resolve(c, &self.url, &value, rev, &mut self.parts).await {
                Err(fleet::Unresolved::Etcd(e)) => return Err(e),
                Ok(parsed) => {
                    if let Some(Ok(m)) = fleet::manifest_of(&value) {
                        tracing::info!(
                            "etcd: revision {rev}: {} parts ({:.1} MiB) read in {:.3} s",
                            m.parts.len(),
                            m.size as f64 / (1 << 20) as f64,
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    self.last = Some((value, rev));
                    self.apply(parsed, rev, why).await
                }
                Err(fleet::Unresolved::Refused(e)) => {
                    tracing::error!("etcd: revision {rev} refused: {e}");
                    self.say(true, Some(e.clone()));
                    Some(e)
                }
            }
        };
        self.record(c, lease, refused.map(|e| (rev, e))).await
    }

    /// Applies through the engine; the refusal, if any.
    async fn apply(
        &mut self,
        parsed: (crate::policy::Policy, crate::policy::Lines),
        rev: i64,
        why: Trigger,
    ) -> Option<String> {
        let name = format!("{}@{rev}", self.url.policy_key());
        let why = if self.loaded { why } else { Trigger::Start };
        let (p, c, h) = (self.paths.clone(), self.cfg.clone(), self.health.clone());
        let read = Ok(Read::Parsed(Box::new(parsed.0), parsed.1, None));
        let res = blocking(move || apply_parsed(&p, &c, read, &name, why, &h)).await;
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
        fleet::write_record(c, &self.url, &rec, lease).await
    }
}
