//! `build-ebpf`: the BPF object is built by isolation-user's build.rs, the one
//! path; this builds that crate and copies the object out for bpftool and llvm-objdump.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::util::{self, cmd, exec};

#[derive(clap::Args)]
pub struct Options {
    /// Build in release mode (the BPF object itself is always built in release).
    #[arg(long)]
    release: bool,
}

impl Options {
    pub fn debug() -> Options {
        Options { release: false }
    }
}

pub fn run(o: Options) -> Result<PathBuf> {
    let mut c = cmd("cargo");
    c.args(["build", "-p", "isolation-user"]);
    if o.release {
        c.arg("--release");
    }
    exec(&mut c)?;
    let profile = if o.release { "release" } else { "debug" };
    let build = util::root().join("target").join(profile).join("build");
    // The newest object among isolation-user's build outputs is the one just embedded.
    let obj = std::fs::read_dir(&build)?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("isolation-user-")
        })
        .map(|e| e.path().join("out/isolation-bpf"))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("build.rs produced no BPF object")?;
    let out = util::root().join("target/bpf");
    std::fs::create_dir_all(&out)?;
    let dst = out.join("isolation.bpf.o");
    std::fs::copy(&obj, &dst)?;
    eprintln!("build-ebpf: {}", dst.display());
    Ok(dst)
}
