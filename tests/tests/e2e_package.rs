//! The Debian package (`cargo xtask deb`, whose path `cargo xtask test` passes in
//! `ISOLATION_DEB`): its contents, conffiles and maintainer scripts; lintian finds no error;
//! installed into a clean Debian root made by debootstrap (no build tool in it), the
//! installed binary loads the datapath in a namespace and enforces with real traffic; it is
//! upgraded over itself while a ping flood runs and no reply is lost; removed, the datapath
//! keeps enforcing; purged, nothing of it is left on disk.
//!
//!   cw (192.0.2.2) --s1-- srv (the chroot's isolation-user) --s2-- cx (198.51.100.2)

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use tests::{
    netns::TwoClients,
    traffic::{Echo, ping_summary, tcp_ok},
    unique,
};

/// What the package must install (its directories aside), beside one man page per verb.
const CONTENTS: &[&str] = &[
    "/usr/sbin/isolation-user",
    "/lib/systemd/system/isolation.service",
    "/etc/default/isolation",
    "/etc/isolation/policy.toml",
    "/usr/share/isolation/prometheus/alerts.yml",
    "/usr/share/isolation/grafana/isolation.json",
    "/usr/share/isolation/fail2ban/action.d/isolation.conf",
    "/usr/share/bash-completion/completions/isolation-user",
    "/usr/share/zsh/vendor-completions/_isolation-user",
    "/usr/share/fish/vendor_completions.d/isolation-user.fish",
    "/usr/share/doc/isolation/copyright",
    "/usr/share/doc/isolation/changelog.gz",
    "/usr/share/man/man8/isolation-user.8.gz",
    "/usr/share/man/man8/isolation-user-load.8.gz",
    "/usr/share/man/man8/isolation-user-run.8.gz",
    "/usr/share/man/man8/isolation-user-fleet-push.8.gz",
];

/// Where anything of the package may be: nothing else.
const PLACES: &[&str] = &[
    "/usr/sbin/isolation-user",
    "/lib/systemd/system/isolation.service",
    "/etc/default/isolation",
    "/etc/isolation/",
    "/usr/share/isolation/",
    "/usr/share/bash-completion/completions/isolation-user",
    "/usr/share/zsh/vendor-completions/_isolation-user",
    "/usr/share/fish/vendor_completions.d/isolation-user.fish",
    "/usr/share/doc/isolation/",
    "/usr/share/man/man8/isolation-user",
];

/// Build tools a node must not need (the build machine has them all).
const BUILD_TOOLS: &[&str] = &[
    "/usr/bin/cc",
    "/usr/bin/gcc",
    "/usr/bin/ld",
    "/usr/bin/protoc",
    "/usr/bin/clang",
    "/usr/bin/cargo",
    "/usr/bin/rustc",
    "/usr/bin/bpftool",
];

/// The package `cargo xtask test` built, or None (skip, or fail under
/// ISOLATION_REQUIRE_E2E) when the test runs without it.
fn deb() -> Option<PathBuf> {
    match std::env::var_os("ISOLATION_DEB") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let reason = "the package test needs ISOLATION_DEB (cargo xtask test builds it)";
            if std::env::var("ISOLATION_REQUIRE_E2E").is_ok_and(|v| v == "1") {
                panic!("{reason}, and ISOLATION_REQUIRE_E2E=1 forbids skipping");
            }
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"))
}

fn ok(c: &mut Command) -> String {
    let o = run(c);
    assert!(
        o.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_package_holds_what_an_operator_needs_and_lintian_finds_no_error() {
    let Some(deb) = deb() else { return };
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files: Vec<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| !p.ends_with('/'))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in CONTENTS {
        assert!(
            files.iter().any(|f| f == want),
            "{want} missing: {files:#?}"
        );
    }
    for f in &files {
        assert!(
            PLACES.iter().any(|p| f.starts_with(p)),
            "{f} is outside the package's places"
        );
    }
    // One man page per verb, compressed.
    let verbs = ok(Command::new("dpkg-deb").arg("-c").arg(&deb))
        .matches("/usr/share/man/man8/isolation-user-")
        .count();
    assert!(verbs >= 20, "{verbs} man pages");

    // Depends: what it runs, none of the build tools.
    let depends = ok(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    for d in ["libc6", "iptables", "ipset", "iproute2"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    for d in [
        "cargo", "rustc", "protobuf", "clang", "llvm", "etcd", "gcc ", "bpftool",
    ] {
        assert!(
            !depends.contains(d),
            "Depends names a build tool {d}: {depends}"
        );
    }

    // Control files: the conffiles, and maintainer scripts that never unload on upgrade.
    let ctl = std::env::temp_dir().join(unique("debctl"));
    ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    // A control file's text, comment lines left out (they may say what the code does not).
    let read = |n: &str| {
        fs::read_to_string(ctl.join(n))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        read("conffiles").lines().collect::<BTreeSet<_>>(),
        BTreeSet::from(["/etc/default/isolation", "/etc/isolation/policy.toml"])
    );
    for s in ["postinst", "prerm", "postrm"] {
        ok(Command::new("sh").arg("-n").arg(ctl.join(s)));
    }
    assert!(!read("postinst").contains("unload"), "postinst unloads");
    assert!(!read("postrm").contains("unload"), "postrm unloads");
    // prerm: `unload` only when removing, and only on the operator's word.
    let prerm = read("prerm");
    let remove = prerm
        .split("remove)")
        .nth(1)
        .and_then(|r| r.split(";;").next())
        .expect("prerm handles remove");
    assert!(
        remove.contains("ISOLATION_UNLOAD_ON_REMOVE\" = yes"),
        "{prerm}"
    );
    assert_eq!(prerm.matches("isolation-user unload").count(), 1, "{prerm}");
    assert!(
        read("postinst").contains("try-restart"),
        "an upgrade restarts a running service"
    );
    fs::remove_dir_all(&ctl).unwrap();

    // lintian: no error (warnings are printed for the record).
    let o = run(Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("lintian:\n{out}");
    assert!(
        o.status.success(),
        "lintian: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.lines().any(|l| l.starts_with("E:")), "{out}");
}

/// The machine's own Debian mirror for bookworm, as its apt sources name it.
fn mirror() -> String {
    let mut text = String::new();
    for dir in ["/etc/apt/sources.list.d"] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            text += &fs::read_to_string(e.path()).unwrap_or_default();
            text += "\n\n";
        }
    }
    text += &fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    // deb822 stanzas: URIs + Suites naming bookworm; one-line: `deb URI bookworm main`.
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
            && suites.split_whitespace().any(|s| s == "bookworm")
        {
            return uris.split_whitespace().next().unwrap().to_string();
        }
        for l in stanza.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() >= 3 && w[0] == "deb" && w[2] == "bookworm" {
                return w[1].to_string();
            }
        }
    }
    panic!("no bookworm mirror in this machine's apt sources");
}

/// A clean Debian 12 root (minbase, plus what the package depends on), made once by
/// debootstrap and kept as a tarball under target/ for the next run; unpacked anew here.
fn clean_root(dir: &Path) {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debootstrap");
    let tar = cache.join("bookworm-minbase.tar");
    if !tar.exists() {
        fs::create_dir_all(&cache).unwrap();
        let tmp = cache.join(unique("root"));
        let o = run(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=iptables,ipset,iproute2",
                "bookworm",
            ])
            .arg(&tmp)
            .arg(mirror()));
        assert!(
            o.status.success(),
            "debootstrap failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let part = tar.with_extension("part");
        ok(Command::new("tar")
            .arg("-C")
            .arg(&tmp)
            .arg("-cf")
            .arg(&part)
            .arg("."));
        fs::rename(&part, &tar).unwrap();
        fs::remove_dir_all(&tmp).unwrap();
    }
    fs::create_dir_all(dir).unwrap();
    ok(Command::new("tar").arg("-C").arg(dir).arg("-xf").arg(&tar));
}

/// Every path under `root` but the kernel's, dpkg's own records and logs.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, p: &Path, out: &mut BTreeSet<String>) {
        for e in fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            let rel = format!("/{}", path.strip_prefix(root).unwrap().display());
            if [
                "/proc",
                "/sys",
                "/dev",
                "/var/lib/dpkg",
                "/var/log",
                "/tmp",
                "/var/cache",
            ]
            .iter()
            .any(|x| rel == *x || rel.starts_with(&format!("{x}/")))
            {
                continue;
            }
            out.insert(rel);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The clean root and the pin dir the installed binary used; both removed on drop (which
/// also detaches a datapath left loaded: its links are pinned there).
struct Root {
    dir: PathBuf,
    pin: PathBuf,
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Root {
    /// A command run inside the root (chroot), in namespace `ns` when given, with the
    /// host's /sys (and so its bpffs) and a /proc mounted in a mount namespace of its own.
    fn cmd(&self, ns: Option<&str>, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        if let Some(ns) = ns {
            c.arg(format!("--net=/run/netns/{ns}"));
        }
        c.args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "set -e; mount --rbind /sys \"$R/sys\"; mount -t proc proc \"$R/proc\"; \
                 exec chroot \"$R\" \"$@\"",
            )
            .arg("sh")
            .args(argv)
            .env("R", &self.dir)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("ISOLATION_PIN_DIR", &self.pin)
            .env_remove("ISOLATION_STATE_DIR")
            .env_remove("SSH_CONNECTION");
        c
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }
}

const POLICY: &str = r#"# edited by the operator
[whitelist]
enabled = true
log = false
allow = ["192.0.2.2", "2001:db8:1::2"]
"#;

#[test]
fn the_package_installs_on_a_clean_root_enforces_upgrades_under_traffic_and_purges() {
    if !tests::can_run("package install test") {
        return;
    }
    let Some(deb) = deb() else { return };
    let root = Root {
        dir: std::env::temp_dir().join(unique("debroot")),
        pin: format!("/sys/fs/bpf/{}", unique("debpin")).into(),
    };
    clean_root(&root.dir);
    for tool in BUILD_TOOLS {
        assert!(!root.path(tool).exists(), "the clean root has {tool}");
    }
    let before = tree(&root.dir);
    fs::copy(&deb, root.path("/tmp/isolation.deb")).unwrap();
    let dpkg = |args: &[&str]| {
        let mut argv = vec!["dpkg"];
        argv.extend_from_slice(args);
        ok(&mut root.cmd(None, &argv))
    };
    dpkg(&["-i", "/tmp/isolation.deb"]);
    for f in CONTENTS {
        assert!(root.path(f).exists(), "{f} not installed");
    }
    let version = ok(&mut root.cmd(None, &["isolation-user", "--version"]));
    assert!(
        version.starts_with("isolation-user ")
            && version.contains("(commit ")
            && version.contains(", bpf "),
        "{version}"
    );

    // The operator edits the policy (a conffile), then loads from the installed path.
    fs::write(root.path("/etc/isolation/policy.toml"), POLICY).unwrap();
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("pkg");
    let _echo = Echo::start(&srv, &["0.0.0.0:8080".parse().unwrap()]);
    let load = || {
        ok(&mut root.cmd(
            Some(&srv),
            &[
                "isolation-user",
                "load",
                "--iface",
                "s1",
                "--iface",
                "s2",
                "--backend",
                "ebpf",
            ],
        ))
    };
    load();
    let to_listed: SocketAddr = "192.0.2.1:8080".parse().unwrap();
    let to_stranger: SocketAddr = "198.51.100.1:8080".parse().unwrap();
    let enforced = |what: &str| {
        assert!(
            tcp_ok(&cw, to_listed, Duration::from_secs(3)),
            "{what}: the listed client passes"
        );
        assert!(
            !tcp_ok(&cx, to_stranger, Duration::from_millis(700)),
            "{what}: the stranger is dropped"
        );
    };
    enforced("installed");
    let status: serde_json::Value = serde_json::from_str(&ok(
        &mut root.cmd(Some(&srv), &["isolation-user", "status", "--json"])
    ))
    .unwrap();
    assert_eq!(status["backend"], "ebpf", "{status}");
    assert!(
        version.contains(status["version"]["bpf_object"].as_str().unwrap())
            && status["datapath_build"] == status["version"]["bpf_object"],
        "status names the build: {status}"
    );

    // Upgrade over itself while a ping flood runs: dpkg replaces the files, then the new
    // binary takes the datapath over (what the postinst's restart of the service does).
    let flood = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{cw}"))
        .args(["ping", "-f", "-c", "4000", "-w", "60", "192.0.2.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    dpkg(&["-i", "/tmp/isolation.deb"]);
    load();
    let out = flood.wait_with_output().unwrap();
    let (sent, got) = ping_summary(&String::from_utf8_lossy(&out.stdout));
    assert!(sent >= 1000, "{sent} pings sent");
    assert_eq!(got, sent, "replies lost during the upgrade");
    assert_eq!(
        fs::read_to_string(root.path("/etc/isolation/policy.toml")).unwrap(),
        POLICY,
        "the edited policy survives the upgrade"
    );
    enforced("upgraded");

    // Removed: the binary goes, the configuration stays, the datapath keeps enforcing.
    dpkg(&["-r", "isolation"]);
    assert!(!root.path("/usr/sbin/isolation-user").exists());
    assert!(root.path("/etc/isolation/policy.toml").exists());
    enforced("removed");

    // Purged: nothing of the package is left on disk.
    dpkg(&["-P", "isolation"]);
    let after = tree(&root.dir);
    let left: Vec<_> = after.difference(&before).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    let gone: Vec<_> = before.difference(&after).collect();
    assert!(
        gone.is_empty(),
        "removed what was not the package's: {gone:?}"
    );

    // Lifting the filter (the pins removed) lets the stranger in: the positive control of
    // every drop above.
    fs::remove_dir_all(&root.pin).unwrap();
    assert!(tcp_ok(&cx, to_stranger, Duration::from_secs(3)), "detached");
}
