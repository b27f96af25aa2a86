//! `load` and `unload`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::{
    backend::Choice,
    engine::{self, Change, Done, Options},
    policy::Policy,
    state::{self, IfaceState, Paths},
};

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
    pub backend: Choice,
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// Apply a whitelist even if it would not admit this SSH session's client.
    #[arg(long)]
    pub force: bool,
    /// Swap this build's programs in for the loaded ones, keeping every map (what loading
    /// a new build does by itself): the interfaces never run without a program.
    #[arg(long)]
    pub replace_programs: bool,
}

#[derive(Args, Debug)]
pub struct UnloadArgs {
    /// Detach from this interface only; everything goes when the last one does.
    #[arg(long = "iface", value_name = "IF")]
    pub iface: Option<String>,
}

/// The interfaces named on the command line, each once, in this network namespace.
pub fn interfaces(names: &[String], mode: Mode) -> Result<Vec<IfaceState>> {
    let mut ifaces: Vec<IfaceState> = Vec::new();
    for name in names {
        let ifindex = crate::iface::index(name)?;
        if !ifaces.iter().any(|w| w.name == *name) {
            ifaces.push(IfaceState {
                name: name.clone(),
                ifindex,
                mode: mode.as_str().into(),
            });
        }
    }
    Ok(ifaces)
}

pub fn load(paths: &Paths, a: LoadArgs) -> Result<()> {
    // Everything is read and checked before anything live changes.
    let path = a.policy.clone().or_else(|| {
        let d = PathBuf::from(state::DEFAULT_POLICY);
        d.exists().then_some(d)
    });
    let (policy, lines, source, text_digest) = match &path {
        Some(p) => {
            let text = engine::read_policy_text(p)?;
            let (policy, lines) = engine::parse_policy_file(p, &text)?;
            let d = engine::text_digest(&text);
            (policy, Some(lines), p.display().to_string(), Some(d))
        }
        None => (
            Policy::default(),
            None,
            "built-in allow-all".to_string(),
            None,
        ),
    };
    let ifaces = interfaces(&a.ifaces, a.mode)?;
    let change = Change::Load {
        ifaces,
        backend: a.backend,
        policy,
        lines,
        replace_programs: a.replace_programs,
        text_digest,
    };
    let out = engine::commit(paths, change, Options::quiet(a.force))?;
    if let Done::Loaded {
        interfaces,
        seeded,
        programs_replaced,
    } = &out.what
    {
        if let Some(n) = programs_replaced {
            println!(
                "isolation: this build's programs replaced the loaded ones on {n} link(s); \
                 maps, policy and connections kept"
            );
        }
        println!(
            "isolation: loaded on {} ({}), policy from {source}, generation {}; \
             {seeded} established connection(s) kept{}",
            interfaces.join(", "),
            out.profile.enforces,
            out.generation,
            out.profile
                .conntrack
                .map(|t| format!(" (in {t})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub fn unload(paths: &Paths, a: UnloadArgs) -> Result<()> {
    let out = engine::unload(paths, a.iface.as_deref())?;
    match (&out.detached, out.was_loaded) {
        (Some(i), _) => println!("isolation: detached from {i}"),
        (None, true) => println!("isolation: unloaded"),
        (None, false) => println!("isolation: nothing loaded"),
    }
    Ok(())
}
