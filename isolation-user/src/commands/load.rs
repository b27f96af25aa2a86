//! `load` and `unload`.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use crate::{
    datapath, lockout,
    policy::{self, Policy},
    seed,
    state::{self, IfaceState, Paths, State},
};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Ebpf,
    Iptables,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// Native if the driver supports XDP, else generic (skb).
    Auto,
    /// Driver (native) XDP; fails on drivers without XDP support.
    Native,
    /// Generic XDP in the kernel's receive path: works everywhere, slower.
    Skb,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Native => "native",
            Mode::Skb => "skb",
        }
    }
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Interface to attach to (repeat for several).
    #[arg(long = "iface", required = true, value_name = "IF")]
    pub ifaces: Vec<String>,
    /// Policy file; default /etc/isolation/policy.toml if it exists, else allow-all.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Apply a whitelist even if it would not admit this SSH session's client.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct UnloadArgs {
    /// Detach from this interface only; everything goes when the last one does.
    #[arg(long = "iface", value_name = "IF")]
    pub iface: Option<String>,
}

/// Reads the policy `load` should apply, refusing a bad one whole.
pub fn read_policy(file: Option<&PathBuf>) -> Result<(Policy, String)> {
    let path = match file {
        Some(p) => p.clone(),
        None => {
            let d = PathBuf::from(state::DEFAULT_POLICY);
            if !d.exists() {
                return Ok((Policy::default(), "built-in allow-all".into()));
            }
            d
        }
    };
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read policy {}", path.display()))?;
    Ok((
        policy::parse(&path.display().to_string(), &text)?,
        path.display().to_string(),
    ))
}

pub fn load(paths: &Paths, a: LoadArgs) -> Result<()> {
    if a.backend == Backend::Iptables {
        bail!("the iptables backend is not part of this build yet; use --backend ebpf (or auto)");
    }
    // Everything is checked before anything live changes.
    let (policy, source) = read_policy(a.policy.as_ref())?;
    lockout::check(&policy.whitelist, a.force)?;
    let mut wanted = Vec::new();
    for name in &a.ifaces {
        let ifindex = super::ifindex(name)?;
        if !wanted.iter().any(|w: &IfaceState| w.name == *name) {
            wanted.push(IfaceState {
                name: name.clone(),
                ifindex,
                mode: a.mode.as_str().into(),
            });
        }
    }
    let _lock = paths.lock()?;
    let mut st = State::load(paths)?.unwrap_or_default();
    let loaded = datapath::is_loaded(paths);
    if loaded && !st.object_hash.is_empty() && st.object_hash != datapath::object_hash() {
        bail!(
            "the datapath pinned at {} was loaded by another build of isolation-user; \
             run `isolation-user unload` first, then load again",
            paths.pin_dir.display()
        );
    }
    if !loaded {
        st = State::default();
    }
    let mut new = Vec::new();
    for w in &wanted {
        if loaded && datapath::is_attached(paths, &w.name) {
            if let Some(cur) = st.interfaces.iter().find(|i| i.name == w.name)
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
        datapath::check_foreign_xdp(paths, &w.name)?;
        new.push(w.clone());
    }

    if !loaded {
        datapath::ensure_pin_dir(paths)?;
        datapath::load_and_pin(paths)?;
    }
    // Connections already open (the operator's SSH session) are remembered before the
    // programs can see a packet, so they keep working whatever the whitelist says.
    let flows = seed::established_flows();
    tracing::debug!(
        count = flows.len(),
        "seeding established flows from /proc/self/net"
    );
    let seeded = datapath::seed_flows(paths, &flows)?;
    let mut attached: Vec<IfaceState> = Vec::new();
    for w in &new {
        tracing::debug!(iface = %w.name, mode = %w.mode, "attaching XDP ingress and TC egress");
        if let Err(e) = datapath::attach(paths, w) {
            // Leave things as they were: undo this run's attachments (and the load).
            for done in &attached {
                datapath::detach(paths, &done.name);
            }
            if !loaded {
                datapath::remove_pins(paths);
            }
            return Err(e);
        }
        attached.push(w.clone());
    }
    datapath::sync_whitelist(paths, &policy.whitelist, |_| {})?;
    st.generation += 1;
    datapath::apply_policy(paths, &policy, st.generation)?;
    st.backend = "ebpf".into();
    st.object_hash = datapath::object_hash();
    for w in attached.iter() {
        st.interfaces.retain(|i| i.name != w.name);
        st.interfaces.push(w.clone());
    }
    state::save_policy(paths, &policy)?;
    st.save(paths)?;
    let names: Vec<&str> = st.interfaces.iter().map(|i| i.name.as_str()).collect();
    println!(
        "isolation: loaded on {} (XDP ingress, TC ingress and egress), policy from {source}, generation {}; \
         {seeded} established connection(s) kept",
        names.join(", "),
        st.generation
    );
    Ok(())
}

pub fn unload(paths: &Paths, a: UnloadArgs) -> Result<()> {
    let _lock = paths.lock()?;
    let mut st = State::load(paths)?;
    let mut errs = Vec::new();
    if let Some(iface) = &a.iface
        && let Some(s) = st.as_mut()
    {
        errs.extend(datapath::detach(paths, iface));
        s.interfaces.retain(|i| i.name != *iface);
        if !s.interfaces.is_empty() {
            s.save(paths)?;
            if !errs.is_empty() {
                bail!("{}", errs.join("; "));
            }
            println!("isolation: detached from {iface}");
            return Ok(());
        }
    }
    let was_loaded = datapath::is_loaded(paths) || st.is_some();
    errs.extend(datapath::remove_pins(paths));
    for f in [paths.state_file(), paths.policy_file()] {
        if let Err(e) = fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", f.display()));
        }
    }
    if !errs.is_empty() {
        bail!("unload left things behind: {}", errs.join("; "));
    }
    if was_loaded {
        println!("isolation: unloaded");
    } else {
        println!("isolation: nothing loaded");
    }
    Ok(())
}
