//! `export --format iptables FILE`: the `ipset restore` and `iptables-restore` text the
//! iptables backend loads for a policy, for review or to load by hand.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::{backend::iptables, engine, policy, state::Paths};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// `ipset restore` input, then `iptables-restore --noflush` and `ip6tables-restore
    /// --noflush` input, each after a `#` line naming its command.
    Iptables,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value = "iptables")]
    pub format: Format,
    /// Also the jumps from INPUT and FORWARD for this interface (repeat for several).
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// The policy file.
    pub file: PathBuf,
}

pub fn run(paths: &Paths, a: ExportArgs) -> Result<()> {
    let (p, _) = engine::read_policy_file(&a.file)?;
    policy::validate(&p).map_err(anyhow::Error::msg)?;
    print!("{}", iptables::export(paths, &p, &a.ifaces));
    Ok(())
}
