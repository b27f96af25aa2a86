//! `export --format F FILE`: what a backend would load for a policy, as text, for review
//! or to load by hand.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{
    backend::{self, Format},
    engine, policy,
    state::Paths,
};

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
    print!("{}", backend::export(paths, a.format, &p, &a.ifaces));
    Ok(())
}
