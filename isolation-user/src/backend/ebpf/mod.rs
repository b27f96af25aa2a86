//! The eBPF backend: XDP ingress and TC programs, pinned under the pin dir, fed from
//! hash and LPM-trie maps. One module per concern: the object and its pins, attaching,
//! the isolation compiler and its slots, the whitelist maps, counters, connection seeding,
//! the raw bpf(2) calls aya lacks.

pub mod attach;
pub mod blocklist;
mod bloom;
pub mod compile;
pub mod conntrack;
pub mod counters;
pub mod events;
pub mod pinned;
pub mod pins;
pub mod slots;
pub mod syscall;
pub mod whitelist;

use anyhow::{Result, bail};
use ipnet::IpNet;
use isolation_common::{flags, iso_flags, limits, ports};

use super::{
    Answer, Backend, Counters, Events, IfaceStatus, Installed, Kind, Limits, MapFill, Profile,
    Query, RuleCounter, Status, Verdict, WhitelistDelta,
};
use crate::{
    policy::Policy,
    state::{IfaceState, Paths, State},
};

/// Can the eBPF datapath load here? `--backend auto` asks before choosing it.
pub fn probe() -> Result<(), String> {
    syscall::can_create_maps().map_err(|e| format!("bpf() refused: {e}"))
}

/// The kernel refused the BPF object or one of its programs (map creation, load, the
/// verifier, attach): what makes `--backend auto` fall back, unlike an error of files, pins
/// or locks.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KernelRefused(pub String);

/// `anyhow!` for a refusal by the kernel (a `KernelRefused`).
macro_rules! refused {
    ($($t:tt)*) => {
        anyhow::Error::new($crate::backend::ebpf::KernelRefused(format!($($t)*)))
    };
}
pub(crate) use refused;

/// Is `e` (or its cause) the kernel refusing the object or its programs?
pub fn kernel_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<KernelRefused>())
}

/// Loads the object and pins its maps and programs, nothing attached: the exact whitelist
/// hashes, empty and small, go in before any program can run. The connection tables get
/// the default size (`[connections]` unset).
pub fn load_and_pin(paths: &Paths) -> Result<()> {
    load_and_pin_sized(paths, crate::policy::Connections::default())
}

/// `load_and_pin` with connection tables of `connections.max` entries each.
pub fn load_and_pin_sized(paths: &Paths, connections: crate::policy::Connections) -> Result<()> {
    pins::load_and_pin(paths, connections.max, whitelist::install_empty)
}

/// Gives the connection tables `connections.max` entries each if they have another size:
/// new tables filled from the old ones, taken over by this build's programs
/// (`pins::replace_programs`). Returns the size they had when it changed it.
fn resize_connections(
    paths: &Paths,
    connections: crate::policy::Connections,
) -> Result<Option<u32>> {
    let size = conntrack::table_size(paths)?;
    if size == connections.max {
        return Ok(None);
    }
    replace_keeping_filters(paths, Some(connections.max))?;
    Ok(Some(size))
}

/// `pins::replace_programs`, with the whitelist filters the new programs read rebuilt.
fn replace_keeping_filters(paths: &Paths, connections: Option<u32>) -> Result<usize> {
    // Before anything else: a build whose maps do not fit is refused untouched.
    whitelist::forget_filters(paths)?;
    blocklist::forget_filters(paths)?;
    let n = pins::replace_programs(paths, connections)?;
    // Until this is done the datapath reads the whitelist's hashes without their
    // filters: slower under a flood, never wrong, so a failure here is only a warning.
    if let Err(e) = whitelist::refresh(paths) {
        tracing::warn!(
            "the whitelist filters were not rebuilt after the programs were replaced: {e:#}"
        );
    }
    if let Err(e) = blocklist::refresh(paths) {
        tracing::warn!(
            "the blocklist filters were not rebuilt after the programs were replaced: {e:#}"
        );
    }
    Ok(n)
}

pub struct Ebpf {
    paths: Paths,
}

impl Ebpf {
    pub fn new(paths: Paths) -> Ebpf {
        Ebpf { paths }
    }
}

impl Backend for Ebpf {
    fn kind(&self) -> Kind {
        Kind::Ebpf
    }

    fn profile(&self) -> Profile {
        Profile {
            enforces: "XDP ingress, TC ingress and egress",
            conntrack: None,
            sections: &[
                ("Ingress (XDP: whitelist, then isolation)", false),
                ("Egress (TC)", true),
            ],
            log: "ring buffer",
            tables: "maps",
            pinned: true,
        }
    }

    fn limits(&self) -> Limits {
        Limits::datapath()
    }

    fn is_installed(&self) -> bool {
        pins::is_loaded(&self.paths)
    }

    fn preflight(&self, state: &State, ifaces: &[IfaceState]) -> Result<Vec<IfaceState>> {
        let paths = &self.paths;
        let loaded = pins::is_loaded(paths);
        let mut new = Vec::new();
        for w in ifaces {
            if loaded && attach::is_attached(paths, &w.name) {
                if let Some(cur) = state.interfaces.iter().find(|i| i.name == w.name)
                    && cur.mode != w.mode
                {
                    bail!(
                        "{} is already attached in {} mode; run `isolation-user unload --iface {}` to change it",
                        w.name,
                        cur.mode,
                        w.name
                    );
                }
                continue;
            }
            attach::check_foreign_xdp(paths, &w.name)?;
            new.push(w.clone());
        }
        Ok(new)
    }

    fn build(&self) -> String {
        pins::object_hash()
    }

    fn install(
        &mut self,
        ifaces: &[IfaceState],
        replace: bool,
        connections: crate::policy::Connections,
    ) -> Result<Installed> {
        let paths = &self.paths;
        let fresh = !pins::is_loaded(paths);
        let mut replaced = None;
        if fresh {
            pins::ensure_pin_dir(paths)?;
            if let Err(e) = load_and_pin_sized(paths, connections) {
                pins::remove_pins(paths);
                return Err(e);
            }
        } else if replace {
            replaced = Some(replace_keeping_filters(paths, Some(connections.max))?);
        }
        let mut done = Installed {
            fresh,
            build: pins::object_hash(),
            replaced,
            ..Installed::default()
        };
        // Connections already open (the operator's SSH session) are remembered before the
        // programs can see a packet, so they keep working whatever the whitelist says.
        let flows = crate::backend::seed::established_flows();
        tracing::debug!(
            count = flows.len(),
            "seeding established flows from /proc/self/net"
        );
        done.seeded = match conntrack::seed_flows(paths, &flows) {
            Ok(n) => n,
            Err(e) => {
                self.uninstall(&done);
                return Err(e);
            }
        };
        for w in ifaces {
            tracing::debug!(iface = %w.name, mode = %w.mode, "attaching XDP ingress and TC egress");
            if let Err(e) = attach::attach(paths, w) {
                self.uninstall(&done);
                return Err(e);
            }
            done.attached.push(w.clone());
        }
        Ok(done)
    }

    fn uninstall(&mut self, done: &Installed) -> Vec<String> {
        let mut errs = Vec::new();
        for i in &done.attached {
            errs.extend(attach::detach(&self.paths, &i.name));
        }
        if done.fresh {
            errs.extend(pins::remove_pins(&self.paths));
        }
        errs
    }

    fn apply(
        &mut self,
        policy: &Policy,
        whitelist: Option<&[IpNet]>,
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        // Compiled and written into the idle slot first: a policy the compiler or the
        // kernel refuses changes nothing the datapath reads.
        let compiled = compile::compile(policy).map_err(anyhow::Error::msg)?;
        let paths = &self.paths;
        // Connection tables of another size first (their flows carried over): a failure
        // there changes nothing, and a later one puts the old size back.
        let resized = resize_connections(paths, policy.connections)?;
        let result = apply_compiled(paths, policy, whitelist, generation, progress, &compiled);
        if result.is_err()
            && let Some(old) = resized
            && let Err(e) = replace_keeping_filters(paths, Some(old))
        {
            tracing::warn!("the connection tables keep their new size: {e:#}");
        }
        result
    }

    fn edit_blocklist(
        &mut self,
        old: &crate::blocklist::View,
        view: &crate::blocklist::View,
        changed: &[IpNet],
    ) -> Result<()> {
        blocklist::edit(&self.paths, old, view, changed)
    }

    fn edit_whitelist(
        &mut self,
        add: &[IpNet],
        del: &[IpNet],
        generation: u32,
        progress: &mut dyn FnMut(u64),
    ) -> Result<WhitelistDelta> {
        let delta = whitelist::with_map_flags(&self.paths, add, || {
            whitelist::WhitelistMaps::open(&self.paths)?.change(del, add, &mut *progress)
        })?;
        slots::update_config(&self.paths, |c| c.generation = generation)?;
        Ok(delta)
    }

    fn counters(&self, live: &Policy) -> Result<Counters> {
        let paths = &self.paths;
        let names = compile::compile(live).map_err(anyhow::Error::msg)?;
        let counts = counters::rule_counters(paths)?;
        let mut rules = Vec::new();
        for (k, n) in names.allow_names.iter().enumerate() {
            rules.push(RuleCounter {
                kind: "allow",
                index: k,
                rule: n.clone(),
                packets: counts[k].packets,
                bytes: counts[k].bytes,
            });
        }
        for (j, n) in names.except_names.iter().enumerate() {
            let c = counts[limits::ALLOW_RULES + j];
            rules.push(RuleCounter {
                kind: "except",
                index: j,
                rule: n.clone(),
                packets: c.packets,
                bytes: c.bytes,
            });
        }
        Ok(Counters {
            reasons: counters::counters(paths)?,
            rules,
            log: counters::log_counts(paths)?,
            connections: counters::connections(paths)?,
            uncounted: super::Uncounted::default(),
        })
    }

    fn events(&self, debug: bool) -> Result<Box<dyn Events>> {
        Ok(Box::new(events::Ring::open(&self.paths, debug)?))
    }

    fn check(&self, live: &Policy, q: &Query) -> Result<Answer> {
        check(&self.paths, live, q)
    }

    fn status(&self, state: &State) -> Result<Status> {
        let paths = &self.paths;
        let xdp_id = attach::pinned_xdp_id(paths)?;
        let tc_id = attach::pinned_tc_id(paths, "tc")?;
        let tci_id = attach::pinned_tc_id(paths, "tci")?;
        let cfg = slots::read_config(paths)?;
        let mut interfaces = Vec::new();
        for i in &state.interfaces {
            let (xdp_mode, attached) = match attach::attached_xdp(&i.name).ok().flatten() {
                Some((id, _, mode)) => (mode, id == xdp_id && attach::is_attached(paths, &i.name)),
                None => ("none".to_string(), false),
            };
            interfaces.push(IfaceStatus {
                name: i.name.clone(),
                how: format!("xdp {xdp_mode} (asked {})", i.mode),
                ifindex: i.ifindex,
                requested_mode: i.mode.clone(),
                xdp_mode,
                attached,
            });
        }
        let maps = counters::fill_levels(paths)?
            .into_iter()
            .map(|(name, entries, max_entries)| MapFill {
                name: name.to_string(),
                entries,
                max_entries,
            })
            .collect();
        Ok(Status {
            backend: Kind::Ebpf,
            detail: "XDP ingress, TC egress and ingress (eBPF)".into(),
            generation: cfg.generation,
            whitelist_enabled: cfg.flags & flags::WHITELIST_ENABLED != 0,
            programs: vec![
                ("xdp", xdp_id),
                ("tc_egress", tc_id),
                ("tc_ingress", tci_id),
            ],
            interfaces,
            maps,
        })
    }

    /// The remote-host filter in front of the connection tables fills up as the host
    /// talks to ever more hosts (the datapath never clears a slot): once an eighth of its
    /// slots count, a packet from a random source has that chance of paying the two table
    /// lookups it exists to save, so it is rebuilt from the flows the tables remember.
    fn upkeep(&mut self) -> Result<Option<String>> {
        let counted = conntrack::peers_counted(&self.paths)?;
        if counted < (limits::PEER_SLOTS / 8) as usize {
            return Ok(None);
        }
        let r = conntrack::rebuild_peers(&self.paths)?;
        Ok(Some(format!(
            "rebuilt the remote-host filter from the remembered connections: {} of {} slots set, {} before",
            r.after,
            limits::PEER_SLOTS,
            r.before
        )))
    }

    fn detach(&mut self, iface: &str) -> Vec<String> {
        attach::detach(&self.paths, iface)
    }

    fn teardown(&mut self) -> Vec<String> {
        pins::remove_pins(&self.paths)
    }
}

/// `apply` once the policy is compiled and the connection tables have their size.
fn apply_compiled(
    paths: &Paths,
    policy: &Policy,
    whitelist: Option<&[IpNet]>,
    generation: u32,
    progress: &mut dyn FnMut(u64),
    compiled: &compile::Compiled,
) -> Result<()> {
    let slot = slots::prepare(paths, compiled)?;
    // The whitelist maps have no slots (two copies of millions of entries would double
    // their memory), so the whitelist changes around the isolation flip, in the order
    // that gives every packet the old policy's verdict or the new one's: a packet must
    // pass both stages, and while the old whitelist is enforced its maps only lose
    // entries the new one lacks before the flip and gain the new ones after it. So no
    // moment admits what neither policy admits, nor drops what both admit.
    let was_on = slots::read_config(paths)?.flags & flags::WHITELIST_ENABLED != 0;
    let (before, after) = match whitelist {
        None => (Step::None, Step::None),
        // The old policy reads no map: all of the new whitelist goes in before the flip.
        Some(_) if !was_on => (Step::Whole, Step::None),
        Some(_) if policy.whitelist.enabled => (Step::Narrow, Step::Widen),
        // The new policy reads no map: the old whitelist stays until the flip.
        Some(_) => (Step::None, Step::Whole),
    };
    let wl = whitelist.unwrap_or_default();
    let mut done = WhitelistDelta::default();
    let mut to_add = Vec::new();
    run_step(paths, before, wl, &mut done, &mut to_add, &mut *progress)?;
    let undo_before = |done: &WhitelistDelta| {
        let _ = whitelist::with_map_flags(paths, &done.removed, || whitelist::revert(paths, done));
    };
    let old = match slots::flip(paths, policy, slot, generation) {
        Ok(old) => old,
        Err(e) => {
            undo_before(&done);
            return Err(e);
        }
    };
    if let Err(e) = run_step(paths, after, wl, &mut done, &mut to_add, progress) {
        // Each step is all or nothing (a failed one left `done` as it was): back to the
        // old slot, then the old entries.
        let _ = slots::flip_back(paths, &old);
        undo_before(&done);
        return Err(e);
    }
    Ok(())
}

/// A part of an apply's whitelist sync, before or after the isolation flip.
#[derive(Clone, Copy)]
enum Step {
    None,
    /// Remove what the new whitelist lacks (`whitelist::narrow`).
    Narrow,
    /// Add what `Narrow` left to add (`whitelist::widen`).
    Widen,
    /// Both.
    Whole,
}

/// Runs one step, all or nothing, with the map switches kept safe; what it changed is added
/// to `done`, and what a `Narrow` leaves to add goes to `to_add`.
fn run_step(
    paths: &Paths,
    step: Step,
    wanted: &[IpNet],
    done: &mut WhitelistDelta,
    to_add: &mut Vec<IpNet>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let narrow = |to_add: &mut Vec<IpNet>, progress: &mut dyn FnMut(u64)| {
        whitelist::with_map_flags(paths, &[], || whitelist::narrow(paths, wanted, progress)).map(
            |(removed, add)| {
                *to_add = add;
                removed.removed
            },
        )
    };
    match step {
        Step::None => {}
        Step::Narrow => done.removed = narrow(to_add, progress)?,
        Step::Widen => {
            done.added = whitelist::with_map_flags(paths, to_add, || {
                whitelist::widen(paths, to_add, progress)
            })?;
        }
        Step::Whole => {
            let removed = narrow(to_add, &mut *progress)?;
            match whitelist::with_map_flags(paths, to_add, || {
                whitelist::widen(paths, to_add, &mut *progress)
            }) {
                Ok(added) => *done = WhitelistDelta { added, removed },
                Err(e) => {
                    let back = WhitelistDelta {
                        added: Vec::new(),
                        removed,
                    };
                    let _ = whitelist::with_map_flags(paths, &back.removed, || {
                        whitelist::revert(paths, &back)
                    });
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `check` from the live maps: the whitelist maps for stage 1, the live slot's tries and
/// port table for stage 2, decided by the same procedure the compiler is tested with.
fn check(paths: &Paths, live: &Policy, q: &Query) -> Result<Answer> {
    let proto = q.proto.unwrap_or(255);
    let dport = match (proto, q.dport) {
        (6 | 17, Some(d)) => Some(d),
        (6 | 17, None) => bail!("give --dport for tcp and udp"),
        (1 | 58, _) => Some(0),
        _ => None,
    };
    let cfg = slots::read_config(paths)?;
    let mut answer = Answer {
        verdict: Verdict::Pass,
        stage: "whitelist",
        reason: "whitelist off".into(),
        generation: cfg.generation,
    };
    // Stage 1: the host whitelist.
    if cfg.flags & flags::WHITELIST_ENABLED != 0 {
        let admitting = whitelist::WhitelistMaps::open(paths)?.admitting(q.src)?;
        match admitting.first() {
            Some(n) => answer.reason = format!("whitelisted by {n}"),
            None => {
                answer.verdict = Verdict::Drop;
                answer.reason = format!(
                    "{} is not whitelisted (only replies of connections opened from here get in)",
                    q.src
                );
                return Ok(answer);
            }
        }
    }
    // Stage 2: isolation. "Any protocol" is judged as a protocol no rule names by port.
    let meta = slots::live_meta(paths, cfg.slot)?;
    let s = slots::live_net_entry(paths, cfg.slot, q.src)?;
    let d = slots::live_net_entry(paths, cfg.slot, q.dst)?;
    let index = ports::index(if proto == 255 { 47 } else { proto }, dport);
    let mask = slots::live_port_mask(paths, cfg.slot, index)?;
    let decision = compile::decide(meta.flags, s, d, mask, false);
    super::describe_isolation(
        &mut answer,
        decision,
        live,
        meta.flags & iso_flags::ENABLED != 0,
        meta.flags & iso_flags::REJECT != 0,
    );
    Ok(answer)
}
