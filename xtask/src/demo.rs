//! `demo`: set up, build, then run demo.sh (namespaces, a policy, traffic, counters).

use anyhow::{Result, bail};

use crate::{
    build, setup,
    util::{self, cmd, exec},
};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_: Options) -> Result<()> {
    if !util::is_root() {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    setup::run(setup::Options::quiet())?;
    build::run(build::Options::debug())?;
    let bin = util::root().join("target/debug/isolation-user");
    exec(
        cmd("bash")
            .arg(util::root().join("xtask/demo.sh"))
            .env("BIN", bin),
    )
}
