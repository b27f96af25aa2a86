//! `bench`: release builds, then the benchmark binary writes BENCHMARKS.md (and its plot).
//! `--quick` is a smoke run that writes under target/ instead, so it never replaces the
//! recorded figures.

use anyhow::{Result, bail};

use crate::{
    setup,
    util::{self, cmd, exec},
};

#[derive(clap::Args)]
pub struct Options {
    /// Small sizes and repeats, written to target/bench-quick/.
    #[arg(long)]
    quick: bool,
    /// Passed to the benchmark binary, e.g. `-- --only live --live-seconds 5`.
    #[arg(last = true)]
    extra: Vec<String>,
}

impl Options {
    pub fn quick() -> Options {
        Options {
            quick: true,
            extra: Vec::new(),
        }
    }
}

pub fn run(o: Options) -> Result<()> {
    if !util::is_root() {
        bail!("the benchmarks load BPF programs and create namespaces: run them as root");
    }
    setup::run(setup::Options::quiet())?;
    exec(cmd("cargo").args(["build", "--release", "-p", "isolation-user", "-p", "bench"]))?;
    let root = util::root();
    let out = if o.quick {
        std::fs::create_dir_all(root.join("target/bench-quick"))?;
        root.join("target/bench-quick/BENCHMARKS.md")
    } else {
        root.join("BENCHMARKS.md")
    };
    let mut c = cmd(root
        .join("target/release/isolation-bench")
        .to_str()
        .unwrap());
    c.arg("--bin")
        .arg(root.join("target/release/isolation-user"))
        .arg("--out")
        .arg(&out);
    if o.quick {
        c.arg("--quick");
    }
    c.args(&o.extra);
    exec(&mut c)
}
