//! Everything a fresh Debian 12 machine lacks to build and test (see shared TOOLCHAIN notes):
//! rust-src for the pinned toolchain, bpf-linker built against that toolchain's own libLLVM,
//! and the Debian packages the tests and the demo use. Quiet when all is there.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, cmd, exec, output};

#[derive(clap::Args)]
pub struct Options {
    /// Say what is checked even when nothing is missing.
    #[arg(long)]
    verbose: bool,
}

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: (package, a file it installs that proves it is there), one a line.
#[rustfmt::skip]
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("iptables", "/usr/sbin/iptables"),
    ("ipset", "/usr/sbin/ipset"),
    ("nftables", "/usr/sbin/nft"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iputils-ping", "/usr/bin/ping"),
    ("netcat-openbsd", "/usr/bin/nc.openbsd"),
    ("xdp-tools", "/usr/sbin/xdp-filter"),
    ("util-linux", "/usr/bin/nsenter"),
    ("procps", "/usr/bin/pgrep"),
    ("time", "/usr/bin/time"),
    ("ethtool", "/usr/sbin/ethtool"),
    // The fleet: the tests run a real etcd; the etcd client crate compiles its protocol
    // with protoc, and its protos import protobuf's well-known types, which protoc only
    // recommends (setup installs without recommends).
    ("etcd-server", "/usr/bin/etcd"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    // (the .proto files come with its headers)
    ("libprotobuf-dev", "/usr/include/google/protobuf/any.h"),
    // The certificates of the fleet's TLS test.
    ("openssl", "/usr/bin/openssl"),
    // The service tests open idle connections as an unprivileged user with a script.
    ("python3", "/usr/bin/python3"),
    // The release: `cargo xtask deb` (dpkg-shlibdeps for the libc dependency, strip), its
    // test (lintian; a clean Debian root made by debootstrap to install it into), and the
    // alert rules and dashboard, checked by promtool and a real Prometheus.
    ("dpkg-dev", "/usr/bin/dpkg-shlibdeps"),
    ("binutils", "/usr/bin/strip"),
    ("lintian", "/usr/bin/lintian"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    ("prometheus", "/usr/bin/promtool"),
    // libFuzzer (C++, built by libfuzzer-sys) for `cargo xtask fuzz`.
    ("g++", "/usr/bin/g++"),
    // The blocklist's feeds: a real CrowdSec Local API and a real fail2ban.
    ("crowdsec", "/usr/bin/crowdsec"),
    ("fail2ban", "/usr/bin/fail2ban-server"),
    // The bench compares the CrowdSec feed with Debian's own bouncer (nftables mode).
    ("crowdsec-firewall-bouncer", "/usr/bin/crowdsec-firewall-bouncer"),
    // The bench's independent live-drop method (bench/reference/): a C generator on
    // libbpf and a BPF program, built with clang in every run.
    ("clang", "/usr/bin/clang"),
    ("libbpf-dev", "/usr/include/bpf/libbpf.h"),
];

/// Offline, crowdsec's postinst would try to register with CrowdSec's online Central API
/// and fail the install; credentials already there (any content) make it skip that. The
/// tests run a Local API of their own and never talk to the Central API.
const CROWDSEC_CAPI: &str = "/etc/crowdsec/online_api_credentials.yaml";

impl Options {
    pub fn quiet() -> Options {
        Options { verbose: false }
    }
}

pub fn run(o: Options) -> Result<()> {
    packages(o.verbose)?;
    rust_src(o.verbose)?;
    bpf_linker(o.verbose)?;
    Ok(())
}

fn packages(verbose: bool) -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, f)| !std::path::Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        if verbose {
            eprintln!("setup: Debian packages present");
        }
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    if missing.contains(&"crowdsec") && !std::path::Path::new(CROWDSEC_CAPI).exists() {
        std::fs::create_dir_all("/etc/crowdsec")?;
        std::fs::write(
            CROWDSEC_CAPI,
            "# isolation's setup: no Central API on this machine (offline install)\nurl: http://127.0.0.1:1/\n",
        )?;
    }
    eprintln!("setup: installing {}", missing.join(" "));
    exec(Command::new("apt-get").args(["update", "-q"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn toolchain() -> Result<String> {
    let text = std::fs::read_to_string(util::root().join("rust-toolchain.toml"))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_string)
        .context("rust-toolchain.toml names no channel")
}

fn rust_src(verbose: bool) -> Result<()> {
    let tc = toolchain()?;
    let installed =
        output(cmd("rustup").args(["component", "list", "--installed", "--toolchain", &tc]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        if verbose {
            eprintln!("setup: rust-src present for {tc}");
        }
        return Ok(());
    }
    eprintln!("setup: adding rust-src to {tc}");
    exec(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]))
}

/// bpf-linker must use the same LLVM as rustc: it is built against the libLLVM the pinned
/// toolchain ships, found at run time through a directory of symlinks that stays put.
fn bpf_linker(verbose: bool) -> Result<()> {
    let sysroot = PathBuf::from(output(cmd("rustc").args(["--print", "sysroot"]))?.trim());
    // The library itself is the largest libLLVM* file: the small ones beside it are
    // linker scripts naming it, which would not resolve through our symlink directory.
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("libLLVM"))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .context("the pinned toolchain ships no libLLVM")?;
    let vv = output(cmd("rustc").arg("-vV"))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV names no LLVM version")?
        .to_string();
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let llvm = home.join(".local/share/isolation/llvm");
    let target = sysroot.join("lib").join(&lib);
    let linker = util::cargo_home_bin().join("bpf-linker");
    let link_ok = std::fs::read_link(llvm.join("lib/libLLVM.so")).is_ok_and(|t| t == target);
    let version = output(cmd(linker.to_str().unwrap()).arg("--version")).unwrap_or_default();
    if link_ok && version.contains(BPF_LINKER_VERSION) {
        if verbose {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present (LLVM {major})");
        }
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the toolchain's LLVM {major} (about a minute)"
    );
    std::fs::create_dir_all(llvm.join("lib"))?;
    for name in ["libLLVM.so".to_string(), lib.clone()] {
        let l = llvm.join("lib").join(name);
        let _ = std::fs::remove_file(&l);
        std::os::unix::fs::symlink(&target, &l)
            .with_context(|| format!("cannot link {}", l.display()))?;
    }
    exec(
        cmd("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &llvm),
    )
}
