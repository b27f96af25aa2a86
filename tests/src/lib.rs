//! Test support: crafted packets, network-namespace guards, and the skip policy.
//!
//! A test that cannot run here (not root, no BPF) skips with a reason, unless
//! `ISOLATION_REQUIRE_E2E=1` (set by `cargo xtask test` and CI) turns the skip into a failure.

pub mod dump;
pub mod iso;
pub mod netns;
pub mod pkt;
pub mod scenario;
pub mod traffic;

use std::path::PathBuf;

/// Skips (returns false) or fails, as the environment asks, when root is missing.
pub fn can_run(what: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let reason = format!("{what} needs root (BPF, network namespaces)");
    if std::env::var("ISOLATION_REQUIRE_E2E").is_ok_and(|v| v == "1") {
        panic!("{reason}, and ISOLATION_REQUIRE_E2E=1 forbids skipping");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

/// The `isolation-user` binary under test: `ISOLATION_BIN`, else the workspace's debug build.
pub fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("ISOLATION_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/isolation-user");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p isolation-user` (cargo xtask test does)",
        p.display()
    );
    p
}

/// A name unique to this process and call, for namespaces, pin dirs and state dirs.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes a pinned eBPF datapath enforce `policy`'s rules and switches (its whitelist entries
/// are left as they are), through the backend as the engine drives it.
pub fn apply(
    paths: &isolation_user::state::Paths,
    policy: &isolation_user::policy::Policy,
    generation: u32,
) {
    use isolation_user::backend::Backend as _;
    isolation_user::backend::ebpf::Ebpf::new(paths.clone())
        .apply(policy, None, generation, &mut |_| {})
        .expect("apply the policy");
}
