//! The one transaction every change goes through, whatever asked for it (a verb, the
//! service, the rollback of `apply --confirm-within`, the fleet follower):
//!
//! lock → the desired policy from the store → the change → validation against PRODUCT.md's
//! rules and the backend's limits (every limit, before anything live changes) → the
//! backend made to enforce it (all or nothing) → the store written → the outcome, as data.
//!
//! "Nothing is ever half applied" is kept here once: a change refused at any step leaves
//! the backend and the store as they were. Nothing here prints.
//!
//! Beside it: `plan` (what a whole-policy change would do), `limits` (a policy against a
//! backend's limits), `read` (reads for the verbs; no transaction).
//!
//! Its size: `commit` holds one arm per kind of change, each its whole transaction read top
//! to bottom; split, a reader would lose the order of its steps.

mod limits;
mod plan;
mod read;

pub use crate::store::text_digest;
pub use limits::check_limits;
pub use plan::{Plan, diff, plan, whitelist_delta};
pub use read::{
    Blocked, blocked, check, counters, generation, open, parse_policy_file, read_policy_file,
    read_policy_text, rules, saved, whitelist, whole,
};

use std::{collections::HashSet, fs};

use anyhow::{Result, anyhow, bail};
use ipnet::IpNet;
use serde::Serialize;

use self::{
    limits::{check_blocklist_sizes, check_whitelist_sizes},
    plan::{DELTA_MAX, diff_and_delta},
};
use crate::{
    backend::{self, Backend, Choice, Profile},
    blocklist::{self, Timed, View},
    lockout,
    policy::{self, Lines, Policy, WhitelistSizes},
    rollback,
    state::{IfaceState, Paths, State},
    store::Store,
};

/// A live edit of the rules: changes the policy, says what it did in words.
pub type RulesEdit = Box<dyn FnOnce(&mut Policy) -> Result<String>>;

/// A change to the desired policy.
pub enum Change {
    /// Install on interfaces (those not attached yet) and enforce a whole policy.
    Load {
        ifaces: Vec<IfaceState>,
        backend: Choice,
        policy: Policy,
        lines: Option<Lines>,
        /// Swap this build's programs in even if the pinned ones came from it (a datapath
        /// from another build gets them in any case: an upgrade).
        replace_programs: bool,
        /// The digest of the file text the policy was read from (`store::text_digest`).
        text_digest: Option<String>,
    },
    /// Replace the whole policy, whitelist included.
    Replace {
        policy: Policy,
        lines: Option<Lines>,
        /// `apply --confirm-within`: the policy this replaces comes back by itself unless
        /// `confirm` runs in time (`rollback`).
        confirm: Option<Confirm>,
        /// The digest of the file text the policy was read from (`store::text_digest`):
        /// recorded, so that the same text applied again is known unchanged unparsed
        /// (`unchanged_text`).
        text_digest: Option<String>,
    },
    /// The rollback of an unconfirmed apply, run by its helper (this process): restores
    /// the policy the apply replaced, if the apply is still pending and due.
    RollBack,
    /// Edit the rules (networks, allow, except); returns what it did, in words.
    Rules(RulesEdit),
    WhitelistAdd(Vec<IpNet>),
    WhitelistDel(Vec<IpNet>),
    WhitelistFlush,
    Block(BlockEdit),
}

/// A change to the blocklist.
pub enum BlockEdit {
    /// Blocks prefixes: for good (the policy's `[blocklist] entries`) when `deadline` is
    /// None, else until it (live state, with where it came from). An entry already there
    /// gets the new deadline.
    Add {
        nets: Vec<IpNet>,
        deadline: Option<crate::blocklist::Deadline>,
        origin: String,
    },
    /// Unblocks prefixes, permanent or not.
    Del(Vec<IpNet>),
    /// Unblocks everything.
    Flush,
    /// Removes the entries whose deadline passed (they stopped matching then already).
    Sweep,
    /// What a feed (CrowdSec) says: its entries removed (all of them first, with `whole`:
    /// its full list follows), then its new ones, each with its own deadline. Entries of
    /// other origins are removed only when the feed names them in `add` (it takes them over).
    Feed {
        origin: String,
        whole: bool,
        add: Vec<(IpNet, crate::blocklist::Deadline)>,
        del: Vec<IpNet>,
    },
}

/// An apply that undoes itself unless confirmed: the file's name (for messages) and the
/// seconds it has.
pub struct Confirm {
    pub file: String,
    pub within: f64,
}

/// What a transaction did.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub generation: u32,
    pub backend: &'static str,
    /// The backend in its own words, for the verb to render.
    #[serde(skip)]
    pub profile: Profile,
    #[serde(flatten)]
    pub what: Done,
    /// An armed rollback (`Change::Replace { confirm }`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub armed: Option<Armed>,
}

/// The rollback an apply armed.
#[derive(Clone, Debug, Serialize)]
pub struct Armed {
    /// Unix time after which the previous policy comes back.
    pub confirm_deadline: f64,
    /// The generation whose policy comes back.
    pub rollback_generation: u32,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Done {
    Loaded {
        /// Every interface the datapath is attached to now.
        interfaces: Vec<String>,
        /// Connections already open that were remembered.
        seeded: usize,
        /// The programs in place were replaced by this build's, on this many links.
        #[serde(skip_serializing_if = "Option::is_none")]
        programs_replaced: Option<usize>,
    },
    Replaced,
    /// The policy asked for is the live one already: nothing was touched, the generation
    /// is the live one.
    Unchanged,
    Rules {
        message: String,
    },
    Whitelist {
        asked: usize,
        added: usize,
        removed: usize,
        flushed: bool,
    },
    Blocklist {
        asked: usize,
        /// Prefixes whose blocking changed (added, removed, a new deadline).
        changed: usize,
        /// Entries past their deadline removed on the way.
        swept: usize,
    },
}

pub struct Options<'a> {
    /// Apply a whitelist even if it would not admit this SSH session's client.
    pub force: bool,
    /// Entries handled so far, for a progress bar.
    pub progress: &'a mut dyn FnMut(u64),
}

impl Options<'static> {
    /// No progress to show.
    pub fn quiet(force: bool) -> Options<'static> {
        // A closure that captures nothing is zero-sized: its leaked box allocates nothing.
        Options {
            force,
            progress: Box::leak(Box::new(|_: u64| {})),
        }
    }
}

/// Runs one change as one transaction.
pub fn commit(paths: &Paths, change: Change, opts: Options<'_>) -> Result<Outcome> {
    let _lock = paths.lock()?;
    let store = Store::new(paths);
    let state = State::load(paths)?;
    let meta = store.meta()?;
    let generation = meta.generation.wrapping_add(1).max(1);
    match change {
        Change::Load {
            ifaces,
            backend,
            policy,
            lines,
            replace_programs,
            text_digest,
        } => {
            let (mut b, mut why) = backend::select(paths, backend, state.as_ref())?;
            let mut st = match state {
                Some(s) if b.is_installed() => s,
                _ => State::new(b.kind()),
            };
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            let mut new = b.preflight(&st, &ifaces)?;
            // Another build's datapath in place: this one's programs take over (an upgrade).
            let replace = b.is_installed()
                && (replace_programs
                    || (!st.object_hash.is_empty() && st.object_hash != b.build()));
            let done = match b.install(&new, replace, policy.connections) {
                Ok(d) => d,
                // `auto`: programs the kernel would not load or attach → the fallback
                // backend; any other error is the operator's to see.
                Err(e) => {
                    let Some((other, reason)) =
                        backend::auto_fallback(paths, backend, b.as_ref(), &e)
                    else {
                        return Err(e);
                    };
                    why = Some(reason);
                    b = other;
                    st = State::new(b.kind());
                    check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
                    new = b.preflight(&st, &ifaces)?;
                    b.install(&new, false, policy.connections)?
                }
            };
            let old_entries = store.rules()?.blocklist.entries;
            let bl = BlockSync::new(&store, &old_entries, &policy.blocklist.entries, done.fresh)?;
            bl.check(b.as_ref())?;
            if let Err(e) = bl.write(b.as_mut()).and_then(|()| {
                b.apply(
                    &policy,
                    Some(&policy.whitelist.allow),
                    generation,
                    opts.progress,
                )
            }) {
                if !done.fresh {
                    bl.undo(b.as_mut());
                }
                b.uninstall(&done);
                return Err(e);
            }
            bl.save(&store)?;
            store.put_whole(&policy, generation)?;
            if let Some(d) = text_digest {
                store.put_text(generation, d)?;
            }
            st.backend = b.kind();
            st.why = why;
            if st.object_hash.is_empty() || done.fresh || done.replaced.is_some() {
                st.object_hash = done.build.clone();
            }
            for w in &done.attached {
                st.interfaces.retain(|i| i.name != w.name);
                st.interfaces.push(w.clone());
            }
            st.save(paths)?;
            Ok(Outcome {
                generation,
                backend: b.kind().name(),
                profile: b.profile(),
                what: Done::Loaded {
                    interfaces: st.interfaces.iter().map(|i| i.name.clone()).collect(),
                    seeded: done.seeded,
                    programs_replaced: done.replaced,
                },
                armed: None,
            })
        }
        Change::Replace {
            policy,
            lines,
            confirm,
            text_digest,
        } => {
            let mut b = backend::installed(paths, state.as_ref())?;
            check_whole(&policy, lines.as_ref(), b.as_ref(), opts.force)?;
            let old = store.whole()?;
            let delta = diff_and_delta(&old, &policy);
            if delta.0.is_empty() {
                if let Some(d) = text_digest {
                    store.put_text(meta.generation, d)?;
                }
                return Ok(outcome(meta.generation, b.as_ref(), Done::Unchanged));
            }
            // Armed under the lock: the policy saved is the one replaced here.
            let armed = match confirm {
                Some(c) => Some(rollback::arm(
                    paths,
                    &c.file,
                    c.within,
                    &old,
                    meta.generation,
                )?),
                None => None,
            };
            let bl = BlockSync::new(
                &store,
                &old.blocklist.entries,
                &policy.blocklist.entries,
                false,
            )?;
            let replaced = bl.check(b.as_ref()).and_then(|()| {
                bl.write(b.as_mut())?;
                replace(&store, b.as_mut(), delta, &policy, generation, opts).inspect_err(|_| {
                    bl.undo(b.as_mut());
                })
            });
            if let Err(e) = replaced {
                if armed.is_some() {
                    rollback::disarm(paths);
                }
                return Err(e);
            }
            bl.save(&store)?;
            if let Some(d) = text_digest {
                store.put_text(generation, d)?;
            }
            let mut out = outcome(generation, b.as_ref(), Done::Replaced);
            out.armed = armed.map(|p| Armed {
                confirm_deadline: p.deadline,
                rollback_generation: p.previous_generation,
            });
            Ok(out)
        }
        Change::RollBack => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let Some(due) = rollback::take_due(paths, std::process::id())? else {
                return Ok(outcome(meta.generation, b.as_ref(), Done::Unchanged));
            };
            // The previous policy was live a moment ago: it is restored even if it would
            // not admit an SSH client now (it did not lock anyone out before).
            let restored =
                read_policy_file(&rollback::previous_file(paths)).and_then(|(previous, lines)| {
                    check_whole(&previous, Some(&lines), b.as_ref(), true)?;
                    let live = store.whole()?;
                    let delta = diff_and_delta(&live, &previous);
                    if delta.0.is_empty() {
                        return Ok(false);
                    }
                    let bl = BlockSync::new(
                        &store,
                        &live.blocklist.entries,
                        &previous.blocklist.entries,
                        false,
                    )?;
                    bl.write(b.as_mut())?;
                    replace(&store, b.as_mut(), delta, &previous, generation, opts)
                        .inspect_err(|_| bl.undo(b.as_mut()))?;
                    bl.save(&store)?;
                    Ok(true)
                });
            let (now, error) = match &restored {
                Ok(true) => (generation, None),
                Ok(false) => (meta.generation, None),
                Err(e) => (meta.generation, Some(format!("{e:#}"))),
            };
            due.finish(paths, now, error)?;
            restored.map(|changed| {
                let what = if changed {
                    Done::Replaced
                } else {
                    Done::Unchanged
                };
                outcome(now, b.as_ref(), what)
            })
        }
        Change::Rules(edit) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let mut p = store.rules()?;
            let message = edit(&mut p)?;
            policy::validate(&p)
                .map_err(|e| anyhow!("refused, the live policy is unchanged: {e}"))?;
            check_limits(&p, meta.whitelist, None, &b.limits(), b.kind().name())?;
            lockout::check_isolation(&p, opts.force)?;
            b.apply(&p, None, generation, opts.progress)?;
            store.put_rules(&p, generation)?;
            Ok(outcome(generation, b.as_ref(), Done::Rules { message }))
        }
        Change::WhitelistAdd(add) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            // At most this many are new: checking the bound needs no read of the whitelist.
            let sizes = meta
                .whitelist
                .changed(WhitelistSizes::of(&add), WhitelistSizes::default());
            check_whitelist_sizes(sizes, &b.limits(), b.kind().name())?;
            let d = b.edit_whitelist(&add, &[], generation, opts.progress)?;
            store.put_whitelist_edit(false, &d.added, &d.removed, generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: add.len(),
                    added: d.added.len(),
                    removed: 0,
                    flushed: false,
                },
            ))
        }
        Change::WhitelistDel(del) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let rules = store.rules()?;
            if let Some(client) = lockout::ssh_client()
                && rules.whitelist.enabled
                && !opts.force
            {
                let gone: HashSet<IpNet> = del.iter().copied().collect();
                let still: Vec<IpNet> = store
                    .whitelist()?
                    .into_iter()
                    .filter(|n| n.contains(&client) && !gone.contains(n))
                    .collect();
                lockout::check_client(
                    &policy::Whitelist {
                        enabled: true,
                        log: false,
                        allow: still,
                    },
                    Some(client),
                    false,
                )?;
            }
            let d = b.edit_whitelist(&[], &del, generation, opts.progress)?;
            store.put_whitelist_edit(false, &d.added, &d.removed, generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: del.len(),
                    added: 0,
                    removed: d.removed.len(),
                    flushed: false,
                },
            ))
        }
        Change::WhitelistFlush => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let rules = store.rules()?;
            if rules.whitelist.enabled {
                lockout::check(
                    &policy::Whitelist {
                        enabled: true,
                        log: false,
                        allow: vec![],
                    },
                    opts.force,
                )?;
            }
            let all = store.whitelist()?;
            let d = b.edit_whitelist(&[], &all, generation, opts.progress)?;
            store.put_whitelist_edit(true, &[], &[], generation)?;
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Whitelist {
                    asked: all.len(),
                    added: 0,
                    removed: d.removed.len(),
                    flushed: true,
                },
            ))
        }
        Change::Block(edit) => {
            let mut b = backend::installed(paths, state.as_ref())?;
            let mut rules = store.rules()?;
            let (stored, mut timed, now) = timed_entries(&store)?;
            // What the datapath may hold (passed entries too, until they are removed).
            let old = blocklist::view(&rules.blocklist.entries, &stored, 0);
            let swept = stored.len() - timed.len();
            let permanent = rules.blocklist.entries.clone();
            let asked = match edit {
                BlockEdit::Add {
                    nets,
                    deadline,
                    origin,
                } => {
                    for n in &nets {
                        policy::check_block_entry(n)
                            .map_err(|e| anyhow!("refused, nothing was changed: {e}"))?;
                    }
                    if rules.blocklist.enabled {
                        lockout::check_block(&nets, opts.force)?;
                    }
                    match deadline {
                        None => {
                            let mut have: HashSet<IpNet> = permanent.iter().copied().collect();
                            for n in &nets {
                                if have.insert(*n) {
                                    rules.blocklist.entries.push(*n);
                                }
                            }
                        }
                        Some(d) => {
                            blocklist::upsert(&mut timed, nets.iter().map(|n| (*n, d)), &origin);
                        }
                    }
                    nets.len()
                }
                BlockEdit::Del(nets) => {
                    let gone: HashSet<IpNet> = nets.iter().copied().collect();
                    rules.blocklist.entries.retain(|n| !gone.contains(n));
                    timed.retain(|t| !gone.contains(&t.net));
                    nets.len()
                }
                BlockEdit::Flush => {
                    let n = rules.blocklist.entries.len() + timed.len();
                    rules.blocklist.entries.clear();
                    timed.clear();
                    n
                }
                BlockEdit::Sweep => 0,
                BlockEdit::Feed {
                    origin,
                    whole,
                    add,
                    del,
                } => {
                    let gone: HashSet<IpNet> = del.iter().copied().collect();
                    timed.retain(|t| !(t.origin == origin && (whole || gone.contains(&t.net))));
                    for (n, _) in &add {
                        policy::check_block_entry(n)
                            .map_err(|e| anyhow!("refused, nothing was changed: {e}"))?;
                    }
                    blocklist::upsert(&mut timed, add.iter().copied(), &origin);
                    add.len() + del.len()
                }
            };
            let new = blocklist::view(&rules.blocklist.entries, &timed, now);
            check_blocklist_sizes(WhitelistSizes::of(new.keys()), &b.limits(), b.kind().name())?;
            let changed = blocklist::changed(&old, &new);
            if !changed.is_empty() {
                b.edit_blocklist(&old, &new, &changed)?;
            }
            if timed != stored {
                store.put_timed(&timed)?;
            }
            // Permanent entries are the policy's: a new generation. Timed ones are not.
            let generation = if rules.blocklist.entries != permanent {
                store.put_rules(&rules, generation)?;
                generation
            } else {
                meta.generation
            };
            Ok(outcome(
                generation,
                b.as_ref(),
                Done::Blocklist {
                    asked,
                    changed: changed.len(),
                    swept,
                },
            ))
        }
    }
}

/// The timed blocklist entries as stored (the datapath may still hold those whose deadline
/// passed, until they are removed), those still running, and the moment that says which.
fn timed_entries(store: &Store) -> Result<(Vec<Timed>, Vec<Timed>, blocklist::Deadline)> {
    let stored = store.timed()?;
    let now = blocklist::now_ms();
    let running = stored
        .iter()
        .filter(|t| t.deadline > now)
        .cloned()
        .collect();
    Ok((stored, running, now))
}

/// The blocklist across a whole-policy change: its permanent entries go from `old` to
/// `new`, the timed ones stay (those past their deadline are removed on the way).
struct BlockSync {
    old: View,
    new: View,
    changed: Vec<IpNet>,
    /// The timed entries still running, when some passed (to be saved).
    swept: Option<Vec<Timed>>,
}

impl BlockSync {
    /// `fresh`: the datapath was just created and holds nothing.
    fn new(store: &Store, old: &[IpNet], new: &[IpNet], fresh: bool) -> Result<BlockSync> {
        let (stored, timed, now) = timed_entries(store)?;
        let old = if fresh {
            View::new()
        } else {
            blocklist::view(old, &stored, 0)
        };
        let new = blocklist::view(new, &timed, now);
        Ok(BlockSync {
            changed: blocklist::changed(&old, &new),
            swept: (timed.len() != stored.len()).then_some(timed),
            old,
            new,
        })
    }

    fn check(&self, b: &dyn Backend) -> Result<()> {
        check_blocklist_sizes(
            WhitelistSizes::of(self.new.keys()),
            &b.limits(),
            b.kind().name(),
        )
    }

    fn write(&self, b: &mut dyn Backend) -> Result<()> {
        if self.changed.is_empty() {
            return Ok(());
        }
        b.edit_blocklist(&self.old, &self.new, &self.changed)
    }

    /// Puts back what `write` changed (a later step failed).
    fn undo(&self, b: &mut dyn Backend) {
        if !self.changed.is_empty()
            && let Err(e) = b.edit_blocklist(&self.new, &self.old, &self.changed)
        {
            tracing::warn!("the blocklist edit could not be undone: {e:#}");
        }
    }

    fn save(&self, store: &Store) -> Result<()> {
        match &self.swept {
            Some(t) => store.put_timed(t),
            None => Ok(()),
        }
    }
}

fn outcome(generation: u32, b: &dyn Backend, what: Done) -> Outcome {
    Outcome {
        generation,
        backend: b.kind().name(),
        profile: b.profile(),
        what,
        armed: None,
    }
}

/// Makes the backend enforce `policy` in place of the live policy, which differs from it
/// by `delta` (`diff_and_delta`: the plan, the whitelist entries added and removed), then
/// the store.
fn replace(
    store: &Store,
    b: &mut dyn Backend,
    delta: (Plan, Vec<IpNet>, Vec<IpNet>),
    policy: &Policy,
    generation: u32,
    opts: Options<'_>,
) -> Result<()> {
    let (plan, add, del) = delta;
    // The blocklist's entries were written before this (`BlockSync`).
    let only_whitelist = Plan {
        whitelist_added: 0,
        whitelist_removed: 0,
        blocklist_added: 0,
        blocklist_removed: 0,
        ..plan.clone()
    }
    .is_empty();
    if only_whitelist && plan.whitelist_added + plan.whitelist_removed <= DELTA_MAX {
        // A few entries of a big whitelist changed (a fleet's one-line edit): only they
        // are written, as `whitelist add/remove` would, instead of the whole whitelist
        // being read back from the datapath and compared. The store is what the datapath
        // holds: every change goes through this transaction.
        b.edit_whitelist(&add, &del, generation, opts.progress)?;
    } else {
        b.apply(
            policy,
            Some(&policy.whitelist.allow),
            generation,
            opts.progress,
        )?;
    }
    store.put_whole(policy, generation)
}

/// A whole policy: PRODUCT.md's rules, the backend's limits, no lockout.
pub(crate) fn check_whole(
    p: &Policy,
    lines: Option<&Lines>,
    b: &dyn Backend,
    force: bool,
) -> Result<()> {
    policy::validate(p).map_err(anyhow::Error::msg)?;
    check_limits(
        p,
        WhitelistSizes::of(&p.whitelist.allow),
        lines,
        &b.limits(),
        b.kind().name(),
    )?;
    lockout::check_policy(p, force)
}

/// What `unload` did.
#[derive(Clone, Debug, Serialize)]
pub struct Unloaded {
    /// Something was loaded before.
    pub was_loaded: bool,
    /// Only this interface was detached; the datapath stays on the others.
    pub detached: Option<String>,
}

/// Is the policy file text of this digest (`text_digest`) the one the live policy was
/// applied from, nothing changed since? Then applying it would change nothing, and this says so as `commit` would,
/// without parsing it (a million entries: most of a no-op apply's time). None: parse it and
/// commit it.
pub fn unchanged_text(paths: &Paths, digest: &str) -> Result<Option<Outcome>> {
    let _read = paths.read_lock();
    let store = Store::new(paths);
    let Some(state) = State::load(paths)? else {
        return Ok(None);
    };
    let b = backend::installed(paths, Some(&state))?;
    if !store.is_live_text(digest)? {
        return Ok(None);
    }
    Ok(Some(outcome(
        store.meta()?.generation,
        b.as_ref(),
        Done::Unchanged,
    )))
}

/// What the upkeep did.
#[derive(Clone, Debug, Default)]
pub struct Upkeep {
    /// In words, when it did something.
    pub did: Option<String>,
    /// Blocklist entries removed after their deadline.
    pub expired: usize,
}

/// The backend's upkeep (`Backend::upkeep`), under the lock; then the blocklist entries past
/// their deadline are removed (they stopped matching at it already; removed, they hold no
/// capacity). Nothing loaded: nothing to do.
pub fn upkeep(paths: &Paths) -> Result<Upkeep> {
    let did = {
        let _lock = paths.lock()?;
        let state = State::load(paths)?;
        if state.is_none() {
            return Ok(Upkeep::default());
        }
        backend::installed(paths, state.as_ref())?.upkeep()?
    };
    let now = blocklist::now_ms();
    if !Store::new(paths).timed()?.iter().any(|t| t.deadline <= now) {
        return Ok(Upkeep { did, expired: 0 });
    }
    let out = commit(paths, Change::Block(BlockEdit::Sweep), Options::quiet(true))?;
    let expired = match out.what {
        Done::Blocklist { swept, .. } => swept,
        _ => 0,
    };
    let line = format!("removed {expired} blocklist entries past their deadline");
    Ok(Upkeep {
        did: Some(match did {
            Some(d) => format!("{d}; {line}"),
            None => line,
        }),
        expired,
    })
}

/// Detaches from one interface, or removes everything (the last interface, or all).
pub fn unload(paths: &Paths, iface: Option<&str>) -> Result<Unloaded> {
    let _lock = paths.lock()?;
    let mut st = State::load(paths)?;
    let mut b = backend::recorded(paths, st.as_ref());
    let mut errs = Vec::new();
    if let Some(iface) = iface
        && let Some(s) = st.as_mut()
    {
        errs.extend(b.detach(iface));
        s.interfaces.retain(|i| i.name != *iface);
        if !s.interfaces.is_empty() {
            s.save(paths)?;
            if !errs.is_empty() {
                bail!("{}", errs.join("; "));
            }
            return Ok(Unloaded {
                was_loaded: true,
                detached: Some(iface.to_string()),
            });
        }
    }
    let was_loaded = b.is_installed() || st.is_some();
    errs.extend(b.teardown());
    let mut files = Store::new(paths).files();
    files.push(paths.state_file());
    files.push(paths.feed_file());
    for f in files {
        if let Err(e) = fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", f.display()));
        }
    }
    if !errs.is_empty() {
        bail!("unload left things behind: {}", errs.join("; "));
    }
    Ok(Unloaded {
        was_loaded,
        detached: None,
    })
}
