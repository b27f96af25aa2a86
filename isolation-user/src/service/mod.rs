//! `run`: the foreground service. It loads (or takes over) the datapath, re-applies the
//! policy file when it changes or on SIGHUP, turns logged drops into log lines, and serves
//! Prometheus text on `/metrics`.
//!
//! The datapath is pinned and outlives this process: a restart (or an upgrade to a new
//! binary) re-runs `load`, which finds the pins and attachments in place and changes
//! nothing a packet could notice. SIGTERM and SIGINT leave it enforcing unless
//! `--detach-on-exit`.
//!
//! Every change goes through `engine::commit`, on a blocking thread: the engine takes its
//! file lock, so the service and the CLI's live edits never interleave.

mod http;
pub mod metrics;

pub use http::MetricsServer;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::{
    backend::{Choice, Event},
    engine::{self, Change, Done, Options},
    fleet,
    state::{IfaceState, Paths, unix_now},
};

mod etcd;

/// Where the policy comes from.
pub enum Source {
    /// A file, watched.
    File(PathBuf),
    /// `P/policy` in etcd, watched; this node's record goes under `P/nodes/NODE`.
    Etcd {
        url: fleet::EtcdUrl,
        opts: fleet::EtcdOpts,
        node: String,
    },
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Etcd { url, .. } => format!("{url}/policy"),
        }
    }
}

/// What `run` was asked to do.
pub struct Config {
    pub ifaces: Vec<IfaceState>,
    pub source: Source,
    pub backend: Choice,
    pub metrics: Option<SocketAddr>,
    pub detach_on_exit: bool,
    pub force: bool,
    /// Log every logged drop as a line (the trace ring); off leaves the ring to `trace`.
    pub log_drops: bool,
    /// A CrowdSec Local API whose ban decisions feed the blocklist.
    pub decisions: Option<Decisions>,
}

/// `run --decisions`: the Local API, the bouncer's key, how often it is asked.
#[derive(Clone, Debug)]
pub struct Decisions {
    pub lapi: crate::feeds::crowdsec::Lapi,
    pub key: String,
    pub every: Duration,
}

/// The service's own record of its reloads, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_ok: bool,
    /// Unix time of the last apply or refusal.
    pub last_time: f64,
    /// etcd: reachable now (None for a file).
    pub source_up: Option<bool>,
    /// etcd: the mod revision of the policy applied (0: none yet).
    pub source_revision: i64,
    /// etcd: how often the follower died and was started again.
    pub follower_restarts: u64,
    /// The decisions feed (None: none configured).
    pub decisions: Option<FeedHealth>,
    /// Blocklist entries removed by the upkeep after their deadline.
    pub blocklist_expired: u64,
}

/// The decisions feed's record, for `/metrics` and the state file `status` reads.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FeedHealth {
    pub source: String,
    /// The last poll was answered and its changes enforced.
    pub up: bool,
    pub polls_ok: u64,
    pub polls_failed: u64,
    /// Unix time of the last poll answered and enforced (0: none yet).
    pub last_ok_time: f64,
    /// What went wrong last, while `up` is false.
    pub last_error: Option<String>,
    /// Decisions received that are not enforced (not a ban of an Ip or a Range).
    pub ignored: u64,
}

/// Why a reload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Start,
    File,
    Hangup,
    Etcd,
}

/// Reads and applies the policy file once; on refusal the live policy stays.
fn reload(paths: &Paths, cfg: &Config, why: Trigger, health: &Mutex<Health>) -> Result<Done> {
    let Source::File(file) = &cfg.source else {
        unreachable!("only a file is reloaded from disk")
    };
    let read = engine::read_policy_text(file).and_then(|text| {
        // An empty file is what an in-place write (`cat new > policy.toml`) shows before
        // its first bytes land; applied, it would be the built-in allow-all and lift the
        // policy. While a policy runs it is refused; a policy meant to filter nothing says
        // so (`[whitelist]` with `enabled = false`, or a comment).
        if why != Trigger::Start && text.trim().is_empty() {
            anyhow::bail!(
                "{} is empty (still being written?); an empty file would lift the whole policy: to filter nothing, write `[whitelist]` with `enabled = false`",
                file.display()
            );
        }
        // The text the live policy was applied from, nothing changed since: unparsed.
        let digest = engine::text_digest(&text);
        if why != Trigger::Start
            && let Some(out) = engine::unchanged_text(paths, &digest)?
        {
            return Ok(Read::Live(out));
        }
        let (policy, lines) = engine::parse_policy_file(file, &text)?;
        Ok(Read::Parsed(Box::new(policy), lines, Some(digest)))
    });
    apply_parsed(paths, cfg, read, &file.display().to_string(), why, health)
}

/// A policy to apply: parsed (with the digest of its file's text, if it came from one), or
/// known to be the live one without parsing (`engine::unchanged_text`).
pub(crate) enum Read {
    Parsed(
        Box<crate::policy::Policy>,
        crate::policy::Lines,
        Option<String>,
    ),
    Live(engine::Outcome),
}

/// Applies a parsed policy (named `name` in the log), or logs why it could not be read;
/// `Start` loads and attaches first. On refusal the live policy stays; either way the
/// outcome is logged and counted.
fn apply_parsed(
    paths: &Paths,
    cfg: &Config,
    read: Result<Read>,
    name: &str,
    why: Trigger,
    health: &Mutex<Health>,
) -> Result<Done> {
    let t0 = std::time::Instant::now();
    let res = (|| -> Result<engine::Outcome> {
        let (policy, lines, text_digest) = match read? {
            Read::Live(out) => return Ok(out),
            Read::Parsed(p, l, d) => (*p, l, d),
        };
        let change = match why {
            Trigger::Start => Change::Load {
                ifaces: cfg.ifaces.clone(),
                backend: cfg.backend,
                policy,
                lines: Some(lines),
                replace_programs: false,
                text_digest,
            },
            Trigger::File | Trigger::Hangup | Trigger::Etcd => Change::Replace {
                confirm: None,
                policy,
                lines: Some(lines),
                text_digest,
            },
        };
        engine::commit(paths, change, Options::quiet(cfg.force))
    })();
    give_back_memory();
    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
    h.last_time = unix_now();
    match res {
        Ok(out) => {
            h.reloads_ok += 1;
            h.last_ok = true;
            match &out.what {
                Done::Unchanged => tracing::info!(
                    generation = out.generation,
                    "policy {name} unchanged ({why:?}); nothing to do"
                ),
                _ => tracing::info!(
                    generation = out.generation,
                    backend = out.backend,
                    "applied {name} ({why:?}) in {:.3} s",
                    t0.elapsed().as_secs_f64()
                ),
            }
            Ok(out.what)
        }
        Err(e) => {
            h.reloads_failed += 1;
            h.last_ok = false;
            tracing::error!("refused {name} ({why:?}), the live policy is unchanged: {e:#}");
            Err(e)
        }
    }
}

/// How long a policy file's content must stay the same before it is applied.
const SETTLE: Duration = Duration::from_millis(50);

/// The file's bytes, to tell a real change from an event that changed nothing (editors
/// write, rename and chmod; Kubernetes swaps a `..data` symlink).
fn content(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

pub fn run(paths: Paths, cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(paths, cfg))
}

/// Returns the memory an apply freed to the kernel. Applies run on tokio's blocking threads,
/// each with a malloc arena of its own, and a 1M-entry policy frees a few hundred MiB in
/// whichever arena it used: kept, they add up across applies on a long-running service.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn serve(paths: Paths, cfg: Config) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let cfg = Arc::new(cfg);
    let health = Arc::new(Mutex::new(Health::default()));
    // Signals first: a SIGTERM during the first load must not kill us half way.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    // A file is applied before anything else: one that cannot be applied with nothing
    // loaded is an error. From etcd the policy may take a while (etcd down, no policy
    // yet): the service runs, serves its metrics and says so.
    let mut file_events = None;
    if let Source::File(file) = &cfg.source {
        first_file_load(&paths, &cfg, &health).await?;
        file_events = Some(watch_dir(file)?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let drops = cfg
        .log_drops
        .then(|| std::thread::spawn(log_drops(paths.clone(), stop.clone())));
    if let Some(addr) = cfg.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        tokio::spawn(http::serve_metrics(listener, paths.clone(), health.clone()));
    }
    tokio::spawn(upkeep(paths.clone(), health.clone()));
    if let Some(d) = &cfg.decisions {
        tokio::spawn(follow_decisions(paths.clone(), d.clone(), health.clone()));
    }
    let (hup_tx, hup_rx) = mpsc::channel::<()>(4);
    if let Source::Etcd { .. } = &cfg.source {
        tokio::spawn(supervise_follower(
            paths.clone(),
            cfg.clone(),
            health.clone(),
            hup_rx,
        ));
    }
    tracing::info!(
        "running on {}; policy from {}",
        cfg.ifaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.source.name()
    );

    let (mut rx, _watcher, mut last) = match (file_events, &cfg.source) {
        (Some((rx, w)), Source::File(f)) => (Some(rx), Some(w), content(f)),
        _ => (None, None, None),
    };
    let signal_name = loop {
        let file_event = async {
            match rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => Trigger::Hangup,
            Some(()) = file_event => Trigger::File,
        };
        let Source::File(file) = &cfg.source else {
            // etcd: the follower re-applies the last policy it received.
            let _ = hup_tx.try_send(());
            continue;
        };
        if let Trigger::File = why {
            // Let an editor's write + rename, or a write in several chunks, settle: the
            // content must read the same twice 50 ms apart (waiting at most 2 s); every
            // event meanwhile is taken as one.
            let mut now = content(file);
            for _ in 0..40 {
                tokio::time::sleep(SETTLE).await;
                if let Some(rx) = rx.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
                let again = content(file);
                if again == now {
                    break;
                }
                now = again;
            }
            if now.is_none() || now == last {
                continue;
            }
            last = now;
        } else {
            last = content(file);
        }
        let (p, c, h) = (paths.clone(), cfg.clone(), health.clone());
        let _ = blocking(move || reload(&p, &c, why, &h)).await;
    };
    tracing::info!("{signal_name}: stopping");
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = drops {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(crate::fleet::source_file(&paths));
    if cfg.detach_on_exit {
        let (p, c) = (paths.clone(), cfg.clone());
        blocking(move || -> Result<()> {
            for i in &c.ifaces {
                engine::unload(&p, Some(&i.name))?;
            }
            Ok(())
        })
        .await?;
        tracing::info!("detached (--detach-on-exit)");
    } else {
        tracing::info!("the datapath stays loaded and enforcing");
    }
    Ok(())
}

/// The first apply of a file. With a datapath already loaded (a restart with a broken
/// file) the live policy keeps enforcing and the service runs, to take the fixed file.
async fn first_file_load(
    paths: &Paths,
    cfg: &Arc<Config>,
    health: &Arc<Mutex<Health>>,
) -> Result<()> {
    let first = {
        let (p, c, h) = (paths.clone(), cfg.clone(), health.clone());
        blocking(move || reload(&p, &c, Trigger::Start, &h)).await
    };
    let Err(e) = first else { return Ok(()) };
    let p = paths.clone();
    let loaded = blocking(move || engine::open(&p).is_ok()).await;
    if !loaded {
        return Err(e.context("nothing was loaded"));
    }
    // Attach to the interfaces anyway, with the live policy.
    let (p, c) = (paths.clone(), cfg.clone());
    blocking(move || {
        let live = engine::whole(&p)?;
        engine::commit(
            &p,
            Change::Load {
                ifaces: c.ifaces.clone(),
                backend: c.backend,
                policy: live,
                lines: None,
                replace_programs: false,
                text_digest: None,
            },
            Options::quiet(true),
        )
    })
    .await?;
    tracing::warn!("running with the live policy until the file can be applied");
    Ok(())
}

/// Events in the file's directory (not on the file: an editor's rename replaces the inode
/// a watch on the file would follow).
fn watch_dir(file: &Path) -> Result<(mpsc::Receiver<()>, notify::RecommendedWatcher)> {
    let (tx, rx) = mpsc::channel::<()>(64);
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .context("cannot start watching files (inotify)")?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok((rx, watcher))
}

/// The trace ring, as one log line per logged drop (iptables LOG's format), until `stop`.
fn log_drops(paths: Paths, stop: Arc<AtomicBool>) -> impl FnOnce() + Send + 'static {
    move || {
        // From etcd the datapath may come later: wait for it.
        let mut warned = false;
        let mut events = loop {
            match engine::open(&paths).and_then(|(b, _)| b.events(false)) {
                Ok(e) => break e,
                Err(e) => {
                    if !warned {
                        tracing::warn!("logged drops are not shown yet: {e:#}");
                        warned = true;
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        };
        let mut last = events.counts().unwrap_or_default();
        let mut checked = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match events.next(Duration::from_millis(200)) {
                Ok(Some(Event::Log(e))) => {
                    let line = crate::render::format_line(&e, &crate::iface::name(e.ifindex));
                    tracing::info!(target: "isolation::drop", "{line}");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("reading logged drops failed, stopping: {e:#}");
                    return;
                }
            }
            if checked.elapsed() >= Duration::from_secs(1) {
                checked = std::time::Instant::now();
                if let Ok(now) = events.counts() {
                    if now.suppressed > last.suppressed || now.lost > last.lost {
                        tracing::warn!(
                            target: "isolation::drop",
                            "{} drop(s) not logged (rate limit), {} lost (ring buffer full)",
                            now.suppressed - last.suppressed,
                            now.lost - last.lost
                        );
                    }
                    last = now;
                }
            }
        }
    }
}

/// Follows a CrowdSec Local API: every active decision at start (`startup=true`), then the
/// changes, each answer committed as one blocklist change. LAPI unreachable: what is enforced
/// stays (entries end at their own deadlines), the feed says so and asks again at the next
/// tick. An answer that could not be committed is not lost: the next poll asks for the full
/// list again.
async fn follow_decisions(paths: Paths, d: Decisions, health: Arc<Mutex<Health>>) {
    use crate::feeds::crowdsec;
    let mut feed = FeedHealth {
        source: d.lapi.to_string(),
        ..FeedHealth::default()
    };
    let mut startup = true;
    let mut tick = tokio::time::interval(d.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = d.every.max(Duration::from_secs(30));
        let asked = std::time::Instant::now();
        let result = match crowdsec::poll(&d.lapi, &d.key, startup, timeout).await {
            Ok(stream) => {
                let answered = asked.elapsed();
                let c = crowdsec::changes(&stream, crowdsec::now());
                feed.ignored += c.ignored as u64;
                if startup || !c.add.is_empty() || !c.del.is_empty() {
                    let p = paths.clone();
                    let what = crowdsec::summary(&c);
                    let edit = engine::BlockEdit::Feed {
                        origin: crowdsec::ORIGIN.into(),
                        whole: startup,
                        add: c.add,
                        del: c.del,
                    };
                    blocking(move || engine::commit(&p, Change::Block(edit), Options::quiet(true)))
                        .await
                        .map(|_| {
                            tracing::info!(
                                "decisions from {}: {what} (answered in {:.3} s, enforced {:.3} s after the poll began)",
                                d.lapi,
                                answered.as_secs_f64(),
                                asked.elapsed().as_secs_f64()
                            )
                        })
                        .map_err(|e| anyhow::anyhow!("the decisions could not be enforced: {e:#}"))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if !feed.up && feed.polls_failed > 0 {
                    tracing::info!("decisions: {} answers again", d.lapi);
                }
                startup = false;
                feed.up = true;
                feed.polls_ok += 1;
                feed.last_ok_time = unix_now();
                feed.last_error = None;
            }
            Err(e) => {
                if feed.up || feed.polls_failed == 0 {
                    tracing::warn!(
                        "decisions: {e:#} (the blocklist stays as it is; asked again every {} s)",
                        d.every.as_secs()
                    );
                }
                // Changes may have been handed out and not enforced: the whole list next.
                startup = true;
                feed.up = false;
                feed.polls_failed += 1;
                feed.last_error = Some(format!("{e:#}"));
            }
        }
        if let Ok(mut h) = health.lock() {
            h.decisions = Some(feed.clone());
        }
        if let Ok(text) = serde_json::to_vec(&feed)
            && let Err(e) = crate::state::write_atomic(&paths.feed_file(), &text)
        {
            tracing::warn!("cannot record the decisions feed's state: {e:#}");
        }
    }
}

/// How often the service runs the backend's upkeep (`engine::upkeep`).
const UPKEEP_EVERY: Duration = Duration::from_secs(60);

/// The backend's upkeep, every `UPKEEP_EVERY`: logged when it does something or fails
/// (and then tried again at the next tick); the policy is never touched.
async fn upkeep(paths: Paths, health: Arc<Mutex<Health>>) {
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let p = paths.clone();
        match blocking(move || crate::engine::upkeep(&p)).await {
            Ok(u) => {
                if let Some(what) = u.did {
                    tracing::info!("upkeep: {what}");
                }
                if let Ok(mut h) = health.lock() {
                    h.blocklist_expired += u.expired as u64;
                }
            }
            Err(e) => tracing::warn!("upkeep failed (tried again in a minute): {e:#}"),
        }
    }
}

/// Runs the etcd follower, and starts it again when it dies (a panic: input or a state
/// nothing foresaw): logged and counted (`isolation_source_restarts_total`), never silently
/// gone, so a node keeps following its fleet.
async fn supervise_follower(
    paths: Paths,
    cfg: Arc<Config>,
    health: Arc<Mutex<Health>>,
    hup: mpsc::Receiver<()>,
) {
    let hup = Arc::new(tokio::sync::Mutex::new(hup));
    loop {
        let task = tokio::spawn(etcd::follow(
            paths.clone(),
            cfg.clone(),
            health.clone(),
            hup.clone(),
        ));
        match task.await {
            Ok(()) => return,
            Err(e) => {
                health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .follower_restarts += 1;
                tracing::error!(
                    "etcd: the follower stopped ({e}); the live policy stays, starting it again in 1 s"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
