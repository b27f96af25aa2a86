//! Test support: crafted packets, network-namespace guards, and the skip policy.
//!
//! A test that cannot run here (not root, no BPF) skips with a reason, unless
//! `ISOLATION_REQUIRE_E2E=1` (set by `cargo xtask test` and CI) turns the skip into a failure.

pub mod crowdsec;
pub mod dump;
pub mod fail2ban;
pub mod fleet;
pub mod iso;
pub mod netns;
pub mod pkt;
pub mod scenario;
pub mod service;
pub mod traffic;

use std::path::PathBuf;

/// Skips (returns false) or fails, as the environment asks, when root is missing.
pub fn can_run(what: &str) -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
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
    apply_with(paths, policy, None, generation)
}

/// `apply`, and with `whitelist` the whitelist maps made to hold exactly those entries.
pub fn apply_with(
    paths: &isolation_user::state::Paths,
    policy: &isolation_user::policy::Policy,
    whitelist: Option<&[ipnet::IpNet]>,
    generation: u32,
) {
    use isolation_user::backend::Backend as _;
    isolation_user::backend::ebpf::Ebpf::new(paths.clone())
        .apply(policy, whitelist, generation, &mut |_| {})
        .expect("apply the policy");
}

/// The XDP ingress and TC egress programs pinned under `paths`, for BPF_PROG_TEST_RUN.
pub fn pinned_programs(
    paths: &isolation_user::state::Paths,
) -> (aya::programs::Xdp, aya::programs::SchedClassifier) {
    let xdp = aya::programs::Xdp::from_pin(
        paths.prog("xdp"),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .expect("the pinned XDP program");
    let tc = aya::programs::SchedClassifier::from_pin(paths.prog("tc"))
        .expect("the pinned TC egress program");
    (xdp, tc)
}

/// A datapath of a test's own, loaded and pinned under a fresh pin dir named after `prefix`
/// (the caller removes the pins), with its programs.
pub fn private_datapath(
    prefix: &str,
) -> (
    isolation_user::state::Paths,
    aya::programs::Xdp,
    aya::programs::SchedClassifier,
) {
    use isolation_user::backend::ebpf::pins;
    let id = unique(prefix);
    let paths = isolation_user::state::Paths {
        pin_dir: format!("/sys/fs/bpf/{id}").into(),
        state_dir: std::env::temp_dir().join(&id),
    };
    pins::ensure_pin_dir(&paths).expect("a pin dir");
    isolation_user::backend::ebpf::load_and_pin(&paths).expect("load and pin the datapath");
    let (xdp, tc) = pinned_programs(&paths);
    (paths, xdp, tc)
}
