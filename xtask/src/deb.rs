//! `deb`: the Debian package an operator installs on a node: the release binary (the BPF
//! object inside it), the systemd unit and its options, the policy as a conffile, manual
//! pages, shell completions, Prometheus alert rules and a Grafana dashboard. Written to
//! `target/debian/isolation_VERSION_ARCH.deb` with dpkg-deb; checked by lintian in the test.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup,
    util::{self, cmd, exec, output},
};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Package the release binary as it is (no `cargo build --release` first).
    #[arg(long)]
    no_build: bool,
}

/// The configuration an operator edits: kept across upgrades, removed by purge.
pub const CONFFILES: &[&str] = &["/etc/default/isolation", "/etc/isolation/policy.toml"];

pub fn run(o: Options) -> Result<PathBuf> {
    setup::run(setup::Options::quiet())?;
    if !o.no_build {
        exec(cmd("cargo").args(["build", "--release", "--locked", "-p", "isolation-user"]))?;
    }
    let root = util::root();
    let bin = root.join("target/release/isolation-user");
    if !bin.exists() {
        bail!("{} is not built: run without --no-build", bin.display());
    }
    let version = version(&bin)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let stage = root.join("target/debian/stage");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let put = |dst: &str, bytes: &[u8], mode: u32| -> Result<()> {
        let p = stage.join(dst.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let read = |src: &str| -> Result<Vec<u8>> {
        fs::read(root.join(src)).with_context(|| format!("cannot read {src}"))
    };

    // The binary, stripped as dh_strip does (the BPF object is data inside it, untouched).
    let sbin = stage.join("usr/sbin/isolation-user");
    fs::create_dir_all(sbin.parent().unwrap())?;
    exec(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg("-o")
            .arg(&sbin)
            .arg(&bin),
    )?;
    fs::set_permissions(&sbin, fs::Permissions::from_mode(0o755))?;

    let unit = String::from_utf8(read("packaging/isolation.service")?)?;
    if !unit.contains("ExecStart=/usr/local/sbin/isolation-user ") {
        bail!(
            "packaging/isolation.service: no ExecStart=/usr/local/sbin/isolation-user to rewrite"
        );
    }
    let unit = unit.replace(
        "ExecStart=/usr/local/sbin/isolation-user ",
        "ExecStart=/usr/sbin/isolation-user ",
    );
    put(
        "/lib/systemd/system/isolation.service",
        unit.as_bytes(),
        0o644,
    )?;
    put(
        "/etc/default/isolation",
        &read("packaging/isolation.default")?,
        0o644,
    )?;
    put(
        "/etc/isolation/policy.toml",
        &read("packaging/policy.example.toml")?,
        0o644,
    )?;
    put(
        "/usr/share/isolation/prometheus/alerts.yml",
        &read("packaging/prometheus/alerts.yml")?,
        0o644,
    )?;
    put(
        "/usr/share/isolation/grafana/isolation.json",
        &read("packaging/grafana/isolation.json")?,
        0o644,
    )?;
    put(
        "/usr/share/isolation/fail2ban/action.d/isolation.conf",
        &read("packaging/fail2ban/action.d/isolation.conf")?,
        0o644,
    )?;
    for (shell, dst) in [
        (
            "bash",
            "/usr/share/bash-completion/completions/isolation-user",
        ),
        ("zsh", "/usr/share/zsh/vendor-completions/_isolation-user"),
        (
            "fish",
            "/usr/share/fish/vendor_completions.d/isolation-user.fish",
        ),
    ] {
        let text = output(Command::new(&sbin).args(["completions", shell]))?;
        put(dst, text.as_bytes(), 0o644)?;
    }
    // Manual pages, written by the binary itself, compressed as Debian wants them.
    let man = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man)?;
    output(Command::new(&sbin).arg("man").arg(&man))?;
    let doc = "/usr/share/doc/isolation";
    put(
        &format!("{doc}/copyright"),
        &read("packaging/debian/copyright")?,
        0o644,
    )?;
    let commit = output(Command::new(&sbin).arg("--version"))?;
    let date = output(Command::new("date").arg("-R"))?;
    let changelog = String::from_utf8(read("packaging/debian/changelog")?)?
        .replace("@VERSION@", &version)
        .replace("@COMMIT@", commit_of(&commit))
        .replace("@DATE@", date.trim());
    put(&format!("{doc}/changelog"), changelog.as_bytes(), 0o644)?;
    put(&format!("{doc}/README.md"), &read("README.md")?, 0o644)?;
    for d in ["operations", "policy", "fleet", "iptables-backend"] {
        put(
            &format!("{doc}/{d}.md"),
            &read(&format!("docs/{d}.md"))?,
            0o644,
        )?;
    }
    gzip_all(&man)?;
    gzip_all(&stage.join(doc.trim_start_matches('/')))?;

    // DEBIAN/: control, conffiles, maintainer scripts, md5sums.
    let shlibs = shlibs(&sbin)?;
    let size = du_kib(&stage)?;
    let control = String::from_utf8(read("packaging/debian/control")?)?
        .replace("@VERSION@", &version)
        .replace("@ARCH@", &arch)
        .replace("@SIZE@", &size.to_string())
        .replace("@SHLIBS@", &shlibs);
    let md5 = md5sums(&stage)?;
    put("/DEBIAN/control", control.as_bytes(), 0o644)?;
    put(
        "/DEBIAN/conffiles",
        (CONFFILES.join("\n") + "\n").as_bytes(),
        0o644,
    )?;
    put("/DEBIAN/md5sums", md5.as_bytes(), 0o644)?;
    for s in ["postinst", "prerm", "postrm"] {
        put(
            &format!("/DEBIAN/{s}"),
            &read(&format!("packaging/debian/{s}"))?,
            0o755,
        )?;
    }
    let deb = root.join(format!("target/debian/isolation_{version}_{arch}.deb"));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    eprintln!("deb: {}", deb.display());
    Ok(deb)
}

/// The package version: the binary's own (`isolation-user 0.1.0 (commit …)`).
fn version(bin: &Path) -> Result<String> {
    let v = output(Command::new(bin).arg("--version"))?;
    v.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("`{} --version` printed {v:?}", bin.display()))
}

fn commit_of(version_line: &str) -> &str {
    version_line
        .split("commit ")
        .nth(1)
        .and_then(|r| r.split([',', ')']).next())
        .unwrap_or("unknown")
}

/// The shared-library dependencies of the binary, as dpkg-shlibdeps names them
/// (`libc6 (>= 2.34), libgcc-s1 (>= 4.2)`).
fn shlibs(bin: &Path) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source tree: give it the smallest one.
    let dir = util::root().join("target/debian/shlibdeps");
    fs::create_dir_all(dir.join("debian"))?;
    fs::write(
        dir.join("debian/control"),
        "Source: isolation\n\nPackage: isolation\nArchitecture: any\n",
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(bin)
            .current_dir(&dir),
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out:?}"))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// gzip -9n every file of `dir` (man pages, docs), as dh_compress does.
fn gzip_all(dir: &Path) -> Result<()> {
    let mut all = Vec::new();
    files(dir, &mut all)?;
    for f in all {
        if f.file_name().is_some_and(|n| n == "copyright") {
            continue;
        }
        exec(Command::new("gzip").args(["-9", "-n"]).arg(&f))?;
    }
    Ok(())
}

fn du_kib(stage: &Path) -> Result<u64> {
    let mut all = Vec::new();
    files(stage, &mut all)?;
    let bytes: u64 = all
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(bytes.div_ceil(1024))
}

/// DEBIAN/md5sums: every installed file, relative to /.
fn md5sums(stage: &Path) -> Result<String> {
    let mut all = Vec::new();
    files(stage, &mut all)?;
    all.sort();
    let rel: Vec<String> = all
        .iter()
        .filter(|f| !f.starts_with(stage.join("DEBIAN")))
        .map(|f| f.strip_prefix(stage).unwrap().display().to_string())
        .collect();
    output(Command::new("md5sum").args(&rel).current_dir(stage))
}
