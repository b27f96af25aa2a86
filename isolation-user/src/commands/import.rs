//! `import --ipset-save FILE [--iptables-save FILE]`: an existing ipset/iptables setup (the
//! classic recipe, or what `export` printed) as a policy file on stdout. What cannot be
//! carried over is said in `# note:` lines at the top, and on stderr.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use clap::Args;

use crate::{import, policy};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The output of `ipset save` (`-` = stdin).
    #[arg(long, value_name = "FILE")]
    pub ipset_save: PathBuf,
    /// The output of `iptables-save` (IPv4 and IPv6 may be concatenated); without it, set
    /// names and types decide what each set is.
    #[arg(long, value_name = "FILE")]
    pub iptables_save: Option<PathBuf>,
}

fn read(p: &PathBuf) -> Result<String> {
    if p.as_os_str() == "-" {
        return std::io::read_to_string(std::io::stdin()).context("cannot read stdin");
    }
    fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

pub fn run(a: ImportArgs) -> Result<()> {
    let ipset = read(&a.ipset_save)?;
    let iptables = a.iptables_save.as_ref().map(read).transpose()?;
    let got = import::import(&ipset, iptables.as_deref())
        .map_err(|e| anyhow!("{}: {e}", a.ipset_save.display()))?;
    policy::validate(&got.policy)
        .map_err(|e| anyhow!("the imported setup is not a valid policy: {e}"))?;
    for n in &got.notes {
        eprintln!("isolation-user: import: {n}");
        println!("# note: {n}");
    }
    print!("{}", policy::to_toml(&got.policy));
    Ok(())
}
