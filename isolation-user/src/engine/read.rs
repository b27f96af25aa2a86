//! Reads for the verbs and the service: the backend in place, the desired policy, what the
//! datapath counts and decides, a policy file. None takes the engine's lock; those that read
//! the backend and the store together take the read lock (`Paths::read_lock`), so that
//! they see one transaction's result, not half of two.

use anyhow::Result;
use ipnet::IpNet;

use crate::{
    backend::{self, Answer, Backend, Counters, Profile, Query, Verdict},
    blocklist,
    policy::{self, Lines, Policy},
    state::{Paths, State},
    store::Store,
};

/// The installed backend and what it is installed on, for the reading verbs.
pub fn open(paths: &Paths) -> Result<(Box<dyn Backend>, State)> {
    let st = State::load(paths)?;
    let b = backend::installed(paths, st.as_ref())?;
    let st = st.unwrap_or_else(|| State::new(b.kind()));
    Ok((b, st))
}

/// The datapath's counters, with the rules named after the live policy, and how the
/// backend describes itself.
pub fn counters(paths: &Paths) -> Result<(Counters, Profile)> {
    let _read = paths.read_lock();
    let (b, _) = open(paths)?;
    Ok((b.counters(&rules(paths)?)?, b.profile()))
}

/// The verdict the live datapath gives a new connection: the blocklist first (what the
/// store says the datapath holds, deadlines included), then the backend's own answer.
pub fn check(paths: &Paths, q: &Query) -> Result<Answer> {
    let _read = paths.read_lock();
    let (b, _) = open(paths)?;
    let live = rules(paths)?;
    if live.blocklist.enabled {
        let now = blocklist::now_ms();
        let view = blocklist::view(&live.blocklist.entries, &Store::new(paths).timed()?, now);
        if let Some((n, d)) = blocklist::blocking(&view, q.src) {
            let left = match d {
                blocklist::PERMANENT => "permanent".to_string(),
                _ => blocklist::left(d, now),
            };
            return Ok(Answer {
                verdict: Verdict::Drop,
                stage: "blocklist",
                reason: format!("blocked by {}, {left}", crate::store::show(&n)),
                generation: Store::new(paths).meta()?.generation,
            });
        }
    }
    b.check(&live, q)
}

/// One blocklist entry as `block list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Blocked {
    pub entry: String,
    /// "policy" (a permanent entry), or where a timed one came from ("cli", "crowdsec",
    /// "fail2ban").
    pub origin: String,
    /// Unix seconds, None for a permanent entry.
    pub deadline: Option<f64>,
    /// Seconds left, None for a permanent entry.
    pub seconds_left: Option<f64>,
}

/// The blocklist: permanent entries in policy order, then the timed ones still running,
/// soonest deadline first.
pub fn blocked(paths: &Paths) -> Result<Vec<Blocked>> {
    let _read = paths.read_lock();
    let store = Store::new(paths);
    let now = blocklist::now_ms();
    let mut out: Vec<Blocked> = store
        .rules()?
        .blocklist
        .entries
        .iter()
        .map(|n| Blocked {
            entry: crate::store::show(n),
            origin: blocklist::ORIGIN_POLICY.into(),
            deadline: None,
            seconds_left: None,
        })
        .collect();
    let mut timed: Vec<_> = store
        .timed()?
        .into_iter()
        .filter(|t| t.deadline > now)
        .collect();
    timed.sort_by_key(|t| t.deadline);
    out.extend(timed.into_iter().map(|t| Blocked {
        entry: crate::store::show(&t.net),
        origin: t.origin,
        deadline: Some(t.deadline as f64 / 1000.0),
        seconds_left: Some((t.deadline - now) as f64 / 1000.0),
    }));
    Ok(out)
}

/// The live policy, whitelist included (`save`); an error when nothing is loaded.
pub fn saved(paths: &Paths) -> Result<Policy> {
    let _read = paths.read_lock();
    open(paths)?;
    whole(paths)
}

/// The desired policy, rules only (whitelist entries left out: cheap at any size).
/// The live policy's generation (0 before the first load).
pub fn generation(paths: &Paths) -> Result<u32> {
    Ok(Store::new(paths).meta()?.generation)
}

pub fn rules(paths: &Paths) -> Result<Policy> {
    Store::new(paths).rules()
}

/// The desired policy, whitelist entries included.
pub fn whole(paths: &Paths) -> Result<Policy> {
    Store::new(paths).whole()
}

/// The desired whitelist entries.
pub fn whitelist(paths: &Paths) -> Result<Vec<IpNet>> {
    Store::new(paths).whitelist()
}

/// Reads a policy file whole (and where each item is), refusing a bad one.
pub fn read_policy_file(path: &std::path::Path) -> Result<(Policy, Lines)> {
    parse_policy_file(path, &read_policy_text(path)?)
}

/// The text of a policy file.
pub fn read_policy_text(path: &std::path::Path) -> Result<String> {
    crate::state::read_trusted("policy", path)
}

/// A policy file's `text`, parsed (errors name `path` and the line).
pub fn parse_policy_file(path: &std::path::Path, text: &str) -> Result<(Policy, Lines)> {
    Ok(policy::parse_with_lines(&path.display().to_string(), text)?)
}
