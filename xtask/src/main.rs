//! `cargo xtask <command>`: the project's own automation, so a fresh machine needs nothing
//! by hand. Each command is a module with its options and a `run`.

mod bench;
mod build;
mod deb;
mod demo;
mod fuzz;
mod mutants;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: rust-src, bpf-linker, Debian packages. Idempotent.
    Setup(setup::Options),
    /// Build the BPF object (embedded in isolation-user) and copy it to target/bpf/.
    BuildEbpf(build::Options),
    /// The Debian package: target/debian/isolation_VERSION_ARCH.deb.
    Deb(deb::Options),
    /// Lints, unit tests, BPF verdict tests and end-to-end tests in network namespaces.
    Test(test::Options),
    /// Build a small network of namespaces, load a policy, show traffic allowed and denied.
    Demo(demo::Options),
    /// Every parser of untrusted input under libFuzzer for a bounded time (default 60 s each).
    Fuzz(fuzz::Options),
    /// Deliberate bugs the differential test must catch: proves it can fail.
    Mutants(mutants::Options),
    /// Verdict cost, load time and edit latency against their baselines: BENCHMARKS.md.
    Bench(bench::Options),
}

fn main() -> std::process::ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Setup(o) => setup::run(o),
        Cmd::BuildEbpf(o) => build::run(o).map(|_| ()),
        Cmd::Deb(o) => deb::run(o).map(|_| ()),
        Cmd::Test(o) => test::run(o),
        Cmd::Demo(o) => demo::run(o),
        Cmd::Bench(o) => bench::run(o),
        Cmd::Mutants(o) => mutants::run(o),
        Cmd::Fuzz(o) => fuzz::run(o),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
