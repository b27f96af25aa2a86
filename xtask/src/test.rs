//! `test`: the whole suite, as CI runs it. End-to-end and BPF tests need root; they fail
//! rather than skip (ISOLATION_REQUIRE_E2E=1) unless --allow-skip is given.

use anyhow::Result;

use crate::{
    bench, build, deb, fuzz, mutants, setup,
    util::{self, cmd, exec},
};

#[derive(clap::Args)]
pub struct Options {
    /// Let root-only tests skip instead of fail (for a quick non-root run).
    #[arg(long)]
    allow_skip: bool,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Skip the benchmark smoke run (`cargo xtask bench --quick`).
    #[arg(long)]
    no_bench: bool,
    /// Skip the fuzz targets (`cargo xtask fuzz --seconds 30`).
    #[arg(long)]
    no_fuzz: bool,
    /// Seed of the randomized differential test (default: a fixed one).
    #[arg(long)]
    seed: Option<u64>,
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    rest: Vec<String>,
}

pub fn run(o: Options) -> Result<()> {
    setup::run(setup::Options::quiet())?;
    if !o.no_lint {
        exec(cmd("cargo").args(["fmt", "--all", "--check"]))?;
        // The fuzz targets are a workspace of their own.
        exec(cmd("cargo").args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))?;
        exec(cmd("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    build::run(build::Options::debug())?;
    // The package, for its test (contents, lintian, install on a clean root).
    let package = deb::run(deb::Options::default())?;
    let mut c = cmd("cargo");
    c.args(["test", "--workspace"]);
    c.env("ISOLATION_DEB", &package);
    if !o.rest.is_empty() {
        c.arg("--").args(&o.rest);
    }
    if let Some(seed) = o.seed {
        c.env("ISOLATION_SEED", seed.to_string());
    }
    if !o.allow_skip {
        c.env("ISOLATION_REQUIRE_E2E", "1");
    }
    exec(&mut c)?;
    // The differential test must be able to fail: each deliberate bug is caught.
    if !o.allow_skip || util::is_root() {
        mutants::run(mutants::Options::default())?;
    }
    // Every parser of untrusted input, fuzzed 30 s (the packet target needs root).
    if !o.no_fuzz && (!o.allow_skip || util::is_root()) {
        fuzz::run(fuzz::Options::for_test())?;
    }
    // The benchmark code runs once so it cannot rot; its figures go under target/.
    if !o.no_bench && util::is_root() {
        bench::run(bench::Options::quick())?;
    }
    Ok(())
}
