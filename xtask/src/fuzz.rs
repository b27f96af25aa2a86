//! `fuzz`: every parser of untrusted input under libFuzzer, coverage-guided, on the stable
//! toolchain: the targets in `fuzz/` are built with LLVM's SanitizerCoverage (the flags
//! cargo-fuzz passes, without the nightly-only sanitizers) and `libfuzzer-sys`'s libFuzzer,
//! then each runs for a bounded time. A target's corpus lives in `target/fuzz/corpus/NAME`
//! and grows from run to run (libFuzzer writes there every input that reached new code);
//! the hand-written seeds in `fuzz/seeds/NAME` start it. A crash stops the run and leaves
//! its input in `target/fuzz/artifacts/NAME/`.

use std::{path::PathBuf, process::Stdio, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd};

/// Every target, in `fuzz/fuzz_targets/NAME.rs`.
pub const TARGETS: [&str; 7] = [
    "policy",
    "import",
    "manifest",
    "parts",
    "node_record",
    "http",
    "packet",
];

/// The target triple the fuzz targets are built for: named, so the coverage flags apply to
/// them and not to build scripts and proc macros (which libFuzzer does not link).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

#[derive(clap::Args)]
pub struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only these targets (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

impl Options {
    /// What `cargo xtask test` runs: every target, 30 s each.
    pub fn for_test() -> Options {
        Options {
            seconds: 30,
            targets: Vec::new(),
        }
    }
}

pub fn run(o: Options) -> Result<()> {
    let root = util::root();
    let target_dir = root.join("target/fuzz");
    let rustflags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg=fuzzing",
    ]
    .join(" ");
    util::exec(
        cmd("cargo")
            .args(["build", "--release", "--bins", "--manifest-path"])
            .arg(root.join("fuzz/Cargo.toml"))
            .args(["--target", TRIPLE, "--target-dir"])
            .arg(&target_dir)
            .env("RUSTFLAGS", rustflags),
    )?;
    let targets: Vec<&str> = if o.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        o.targets.iter().map(String::as_str).collect()
    };
    let mut report = Vec::new();
    for t in targets {
        let corpus = target_dir.join("corpus").join(t);
        let artifacts = target_dir.join("artifacts").join(t);
        let seeds = root.join("fuzz/seeds").join(t);
        for d in [&corpus, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let pins = PathBuf::from(format!("/sys/fs/bpf/isolation-fuzz-{}", std::process::id()));
        let bin = target_dir.join(TRIPLE).join("release").join(t);
        let started = Instant::now();
        let mut c = cmd(&bin.display().to_string());
        c.arg(&corpus);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.arg(format!("-max_total_time={}", o.seconds))
            .arg("-timeout=30")
            .arg("-rss_limit_mb=4096")
            .arg("-max_len=65536")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .env("ISOLATION_FUZZ_PINS", &pins)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        println!("fuzz: {t} for {} s", o.seconds);
        let out = c
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let _ = std::fs::remove_dir_all(&pins);
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} failed ({}): its input is in {}\n{}",
                out.status,
                artifacts.display(),
                tail.join("\n")
            );
        }
        let stat = |name: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let files = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
        report.push(format!(
            "{t:<12} {:>10} runs in {:>4.0} s, {:>6} edges covered, corpus {files} inputs",
            stat("number_of_executed_units"),
            started.elapsed().as_secs_f64(),
            log.lines()
                .rev()
                .find_map(|l| l.split("cov: ").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?"),
        ));
    }
    println!("fuzz: every target ran without a crash");
    for l in report {
        println!("  {l}");
    }
    Ok(())
}
