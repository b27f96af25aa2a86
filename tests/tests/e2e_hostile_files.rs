//! Files a local unprivileged user can reach, against root's CLI: a policy that user could
//! write is not applied, and `man DIR` never writes through a link planted in DIR.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt as _, process::Command};

use tests::{
    iso::Iso,
    netns::TwoClients,
    traffic::{Echo, tcp_ok},
};

const A: &str = r#"
[whitelist]
enabled = true
allow = ["192.0.2.2"]
"#;

fn generation(iso: &Iso) -> u64 {
    let s: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
    s["generation"].as_u64().unwrap()
}

/// `nobody` (through setpriv) owns a directory and writes a policy there that whitelists
/// its own host; root's `apply` of it is refused, naming the owner, and nothing changes
/// (the stranger stays dropped). The same text in root's file applies (positive control).
#[test]
fn a_policy_a_local_user_could_write_is_not_applied() {
    if !tests::can_run("end-to-end hostile policy file test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw: _cw,
        cx,
    } = TwoClients::new("hfpo");
    let iso = Iso::with_backend(&srv, "ebpf");
    let _echo = Echo::start(&srv, &["0.0.0.0:8080".parse().unwrap()]);
    let to: SocketAddr = "198.51.100.1:8080".parse().unwrap();
    iso.ok(&[
        "load",
        "--iface",
        "s1",
        "--iface",
        "s2",
        "--policy",
        &iso.policy(A),
    ]);
    assert!(!tcp_ok(&cx, to, std::time::Duration::from_millis(700)));
    let g = generation(&iso);

    let theirs = iso.files_dir().join("nobody");
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    // The temp dir above it must be reachable by nobody to write there.
    std::fs::set_permissions(iso.files_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let planted = theirs.join("policy.toml");
    let text = A.replace(r#"["192.0.2.2"]"#, r#"["192.0.2.2", "198.51.100.2"]"#);
    let st = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", "cat > \"$1\"", "sh"])
        .arg(&planted)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(st.success(), "nobody wrote its policy");
    let err = iso.fails(&["apply", &planted.display().to_string()]);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(generation(&iso), g, "nothing changed");
    assert!(
        !tcp_ok(&cx, to, std::time::Duration::from_millis(700)),
        "the stranger is still dropped"
    );
    let ours = iso.policy(&text);
    iso.ok(&["apply", &ours]);
    assert!(
        tcp_ok(&cx, to, std::time::Duration::from_secs(3)),
        "root's copy of the same policy applies"
    );
}

/// A link planted in DIR at a page's name is replaced by the page; the file it pointed to
/// is untouched.
#[test]
fn man_never_writes_through_a_link() {
    let dir = std::env::temp_dir().join(tests::unique("isolation-man-"));
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let page = dir.join("isolation-user-load.8");
    std::os::unix::fs::symlink(&victim, &page).unwrap();
    let out = Command::new(tests::bin())
        .arg("man")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let m = std::fs::symlink_metadata(&page).unwrap();
    assert!(m.is_file(), "the link was replaced by the page");
    assert!(std::fs::read_to_string(&page).unwrap().contains(".TH"));
    assert!(
        std::fs::read_dir(&dir).unwrap().count() > 20,
        "every page written"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Root's commands find the system's tools in the system's directories, never through a
/// `PATH` whoever starts them set: with a directory of fake `iptables`, `ipset`, `ip` and
/// `mount` first in `PATH`, a load on each backend runs none of them and works.
#[test]
fn tools_are_never_found_through_path() {
    if !tests::can_run("end-to-end PATH test") {
        return;
    }
    let TwoClients {
        ns: _ns,
        srv,
        cw,
        cx,
    } = TwoClients::new("hfpa");
    let _echo = Echo::start(&srv, &["0.0.0.0:8080".parse().unwrap()]);
    let evil = std::env::temp_dir().join(tests::unique("isolation-path-"));
    std::fs::create_dir_all(&evil).unwrap();
    let marker = evil.join("ran");
    for tool in [
        "iptables-nft",
        "iptables-nft-restore",
        "iptables-nft-save",
        "ip6tables-nft",
        "ip6tables-nft-restore",
        "ip6tables-nft-save",
        "iptables-legacy",
        "ipset",
        "ip",
        "mount",
    ] {
        let p = evil.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho {tool} >> {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        evil.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for backend in ["iptables", "ebpf"] {
        let iso = Iso::with_backend(&srv, backend);
        let policy = iso.policy(A);
        let mut load = iso.cmd(&[
            "load", "--iface", "s1", "--iface", "s2", "--policy", &policy,
        ]);
        load.env("PATH", &path);
        let out = load.output().unwrap();
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut status = iso.cmd(&["status"]);
        status.env("PATH", &path);
        assert!(status.output().unwrap().status.success());
        assert!(
            tcp_ok(
                &cw,
                "192.0.2.1:8080".parse().unwrap(),
                std::time::Duration::from_secs(3)
            ),
            "{backend}: the whitelisted client passes"
        );
        assert!(
            !tcp_ok(
                &cx,
                "198.51.100.1:8080".parse().unwrap(),
                std::time::Duration::from_millis(700)
            ),
            "{backend}: the stranger is dropped"
        );
        let mut unload = iso.cmd(&["unload"]);
        unload.env("PATH", &path);
        assert!(unload.output().unwrap().status.success());
        let ran = std::fs::read_to_string(&marker).unwrap_or_default();
        assert!(ran.is_empty(), "{backend}: ran the PATH's fakes: {ran}");
    }
    std::fs::remove_dir_all(&evil).unwrap();
}
