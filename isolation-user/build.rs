//! Builds the BPF object (isolation-ebpf, for bpfel-unknown-none) so that the binary can
//! embed it: a plain `cargo build` gives a complete `isolation-user`.
//!
//! The nested `cargo build` is the one `aya-build` runs (same target, flags, build-std and
//! target dir), run here because `aya-build` 0.2 relays every line of the nested cargo's
//! stderr (its `Compiling …`/`Finished …` progress) as a `cargo::warning`: a clean build
//! printed ~80 `warning:` lines. Here only the BPF crate's own compiler diagnostics become
//! warnings, and the nested output is shown whole only when the build fails.

use std::{
    env,
    io::BufRead as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

const PACKAGE: &str = "isolation-ebpf";
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../isolation-ebpf");

fn main() -> anyhow::Result<()> {
    // The BPF crate also depends on the shared types.
    println!("cargo::rerun-if-changed=../isolation-common/src");
    println!("cargo::rerun-if-changed={ROOT}");
    // The pinned toolchain: bpf-linker is built against its LLVM.
    let pin = concat!(env!("CARGO_MANIFEST_DIR"), "/../rust-toolchain.toml");
    println!("cargo::rerun-if-changed={pin}");
    let text = std::fs::read_to_string(pin)?;
    let toolchain = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|l| l.split('"').nth(1))
        .ok_or_else(|| anyhow!("{pin}: no channel"))?;
    // Mutants (deliberate bugs the differential test must catch) of the BPF side.
    let mut features = Vec::new();
    for m in [
        "hairpin-off",
        "reject-as-drop",
        "skip-cidr-trie",
        "record-at-ingress",
        "blocked-after-replies",
    ] {
        let var = format!(
            "CARGO_FEATURE_MUTANT_{}",
            m.replace('-', "_").to_uppercase()
        );
        if env::var_os(&var).is_some() {
            println!(
                "cargo::warning=building the datapath with the mutant '{m}': a test build only"
            );
            features.push(format!("mutant-{m}"));
        }
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        e => bail!("unsupported endianness {e}"),
    };
    let mut arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    if arch.starts_with("riscv64") {
        arch = "riscv64".into();
    }
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo", "build", "--package", PACKAGE])
        .args(["--bins", "--message-format=json", "--release"])
        .args(["--target", target, "-Z", "build-std=core"])
        .args(["--features", &features.join(",")])
        .arg("--target-dir")
        .arg(&target_dir)
        // build-std on a stable toolchain: only for this inner build.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler is not the pinned toolchain's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut all).ok();
        all
    });
    let mut executables = Vec::new();
    let stdout = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
    for line in stdout.lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) =
                    (msg["target"]["name"].as_str(), msg["executable"].as_str())
                {
                    executables.push((name.to_string(), PathBuf::from(exe)));
                }
            }
            // The BPF crate's own warnings are worth seeing; other crates' are not ours.
            Some("compiler-message")
                if msg["package_id"]
                    .as_str()
                    .is_some_and(|p| p.contains(PACKAGE)) =>
            {
                let rendered = msg["message"]["rendered"].as_str().unwrap_or_default();
                for l in rendered.lines() {
                    println!("cargo::warning={l}");
                }
            }
            _ => {}
        }
    }
    let status = child.wait()?;
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        eprintln!("{stderr}");
        bail!("building the BPF object failed ({status}): {cmd:?}");
    }
    if executables.is_empty() {
        bail!("building the BPF object produced no binary");
    }
    for (name, exe) in executables {
        let dst = out_dir.join(&name);
        std::fs::copy(&exe, &dst)
            .with_context(|| format!("cannot copy {} to {}", exe.display(), dst.display()))?;
    }
    // What `--version` and `status` name: the BPF object's hash (also what tells a pinned
    // datapath's build from this one's) and the commit the binary was built from.
    let object = std::fs::read(out_dir.join("isolation-bpf"))
        .context("the BPF build produced no isolation-bpf")?;
    println!("cargo::rustc-env=ISOLATION_BPF_HASH={}", fnv1a(&object));
    println!("cargo::rustc-env=ISOLATION_COMMIT={}", commit());
    Ok(())
}

/// FNV-1a, 64 bits, as hex: the build identity of the BPF object.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The git commit of the source tree (12 hex digits), `ISOLATION_COMMIT` where the source
/// is not a git checkout (a source tarball), else "unknown". Rebuilt when HEAD moves.
fn commit() -> String {
    println!("cargo::rerun-if-env-changed=ISOLATION_COMMIT");
    if let Ok(c) = env::var("ISOLATION_COMMIT") {
        return c;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        // Only paths that exist: cargo reruns a build script every time for a missing one.
        for p in ["HEAD", "refs/heads", "packed-refs"] {
            let p = PathBuf::from(&dir).join(p);
            if p.exists() {
                println!("cargo::rerun-if-changed={}", p.display());
            }
        }
    }
    head
}
