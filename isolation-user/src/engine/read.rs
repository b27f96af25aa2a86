//! Reads for the verbs and the service: the backend in place, the desired policy, what the
//! datapath counts and decides, a policy file. None takes the engine's lock; those that read
//! the backend and the store together take the read lock (`Paths::read_lock`), so that
//! they see one transaction's result, not half of two.

use anyhow::Result;
use ipnet::IpNet;

use crate::{
    backend::{self, Answer, Backend, Counters, Profile, Query},
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

/// The verdict the live datapath gives a new connection.
pub fn check(paths: &Paths, q: &Query) -> Result<Answer> {
    let _read = paths.read_lock();
    let (b, _) = open(paths)?;
    b.check(&rules(paths)?, q)
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
