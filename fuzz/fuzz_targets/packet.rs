//! Frames from the network, through the real XDP ingress and TC egress programs
//! (BPF_PROG_TEST_RUN) of a datapath enforcing a whitelist and isolation with a VXLAN port:
//! the verifier-checked parser never aborts, every XDP verdict is PASS or DROP, TC egress
//! (which only remembers flows) always hands the packet on, and each program counts every
//! frame under exactly one reason. Needs root.
#![no_main]

use std::sync::OnceLock;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use isolation_common::{Counter, Reason, maps};
use isolation_user::{backend::ebpf::pins, policy, state::Paths};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = r#"
[isolation]
default = "deny"
reject = true
vxlan_ports = [4789]
[networks.a]
subnets = ["192.0.2.0/25", "2001:db8:a::/48"]
[networks.b]
subnets = ["192.0.2.128/25", "2001:db8:b::/48"]
[[isolation.allow]]
from = "a"
to = "b"
ports = ["tcp:80", "udp:53", "icmp"]
[whitelist]
enabled = true
allow = ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32", "203.0.113.0/25"]
"#;

struct Dp {
    xdp: Xdp,
    tc: SchedClassifier,
    counters: PerCpuArray<MapData, Counter>,
}

fn dp() -> &'static Dp {
    static DP: OnceLock<Dp> = OnceLock::new();
    DP.get_or_init(|| {
        // `cargo xtask fuzz` names the pin dir and removes it afterwards.
        let pin_dir = std::env::var("ISOLATION_FUZZ_PINS")
            .unwrap_or_else(|_| format!("/sys/fs/bpf/isolation-fuzz-{}", std::process::id()));
        let paths = Paths {
            pin_dir: pin_dir.into(),
            state_dir: std::env::temp_dir().join(format!("isolation-fuzz-{}", std::process::id())),
        };
        pins::ensure_pin_dir(&paths).expect("a pin dir (run as root)");
        isolation_user::backend::ebpf::load_and_pin(&paths).expect("load and pin the datapath");
        let p = policy::parse("fuzz.toml", POLICY).unwrap();
        tests::apply_with(&paths, &p, Some(&p.whitelist.allow), 1);
        let (xdp, tc) = tests::pinned_programs(&paths);
        let counters =
            aya::maps::Map::from_map_data(MapData::from_pin(paths.map(maps::COUNTERS)).unwrap())
                .unwrap()
                .try_into()
                .unwrap();
        Dp { xdp, tc, counters }
    })
}

fn counted(dp: &Dp) -> u64 {
    Reason::ALL
        .iter()
        .map(|r| {
            dp.counters
                .get(&(*r as u32), 0)
                .map(|v| v.iter().map(|c| c.packets).sum::<u64>())
                .unwrap_or(0)
        })
        .sum()
}

fuzz_target!(|frame: &[u8]| {
    // The kernel runs frames of an Ethernet header to a page's worth.
    if frame.len() < 14 || frame.len() > 1500 {
        return;
    }
    let dp = dp();
    let mut out = vec![0u8; frame.len() + 256];
    let before = counted(dp);
    let x = dp
        .xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("XDP test run");
    // XDP_DROP 1, XDP_PASS 2.
    assert!(
        matches!(x.return_value, 1 | 2),
        "XDP answered {} to {frame:02x?}",
        x.return_value
    );
    assert_eq!(
        counted(dp),
        before + 1,
        "one reason counted for {frame:02x?}"
    );
    let mut out = vec![0u8; frame.len() + 256];
    let before = counted(dp);
    // The kernel's skb test harness refuses some frames itself (EINVAL) before the program
    // runs: nothing to judge then.
    let Ok(t) = dp.tc.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    }) else {
        assert_eq!(
            counted(dp),
            before,
            "a frame the kernel refused was counted"
        );
        return;
    };
    // TCX_NEXT (-1): egress never drops.
    assert_eq!(
        t.return_value as i32, -1,
        "TC egress answered {} to {frame:02x?}",
        t.return_value
    );
    assert_eq!(
        counted(dp),
        before + 1,
        "one egress reason counted for {frame:02x?}"
    );
});
