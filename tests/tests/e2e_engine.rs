//! The engine's transaction, end to end through the CLI: a change refused at any stage
//! (parse error, over a backend limit, the kernel refusing a map update or an attach)
//! leaves the pinned policy maps and the state dir byte for byte as they were, and a valid
//! change right after does change them (so the dump can see a change).
//!
//!   host (192.0.2.1, 2001:db8:1::1) --h0/p0-- peer (192.0.2.2, 2001:db8:1::2)

use std::fmt::Write as _;

use tests::{
    dump::{self, assert_same},
    iso::Iso,
    netns::Netns,
    unique,
};

const POLICY: &str = r#"
[isolation]
default = "deny"
reject = true

[networks.it]
subnets = ["198.51.100.0/25", "2001:db8:10::/48"]
[networks.hr]
subnets = ["198.51.100.128/25"]

[[isolation.allow]]
from = "hr"
to = "it"
ports = ["tcp:80", "udp:53"]

[[isolation.except]]
from = "198.51.100.10/32"
to = "198.51.100.200/32"

[whitelist]
allow = ["192.0.2.2", "192.0.2.0/25", "2001:db8:1::2", "2001:db8:1::/64", "203.0.113.0/24"]
"#;

struct Lab {
    iso: Iso,
    _ns: Netns,
}

impl Lab {
    fn new() -> Option<Lab> {
        if !tests::can_run("end-to-end engine test") {
            return None;
        }
        let (host, peer) = (unique("eh"), unique("ep"));
        let ns = Netns::new(&[&host, &peer]);
        ns.link(
            &host,
            "h0",
            &["192.0.2.1/24", "2001:db8:1::1/64"],
            &peer,
            "p0",
            &["192.0.2.2/24", "2001:db8:1::2/64"],
        );
        Some(Lab {
            iso: Iso::new(&host),
            _ns: ns,
        })
    }

    fn snapshot(&self) -> (dump::Dump, std::collections::BTreeMap<String, Vec<u8>>) {
        (
            dump::policy_maps(&self.iso.pin),
            dump::state_files(&self.iso.state),
        )
    }

    fn load(&self, policy: &str) -> String {
        let p = self.iso.policy(policy);
        self.iso.ok(&["load", "--iface", "h0", "--policy", &p])
    }
}

/// A policy with `n` allow rules between two networks, the extra ones on distinct ports.
fn rules(n: usize) -> String {
    let mut s = String::from(
        "[isolation]\ndefault = \"deny\"\n[networks.a]\nsubnets = [\"198.51.100.0/25\"]\n\
         [networks.b]\nsubnets = [\"198.51.100.128/25\"]\n",
    );
    for i in 0..n {
        write!(
            s,
            "[[isolation.allow]]\nfrom = \"a\"\nto = \"b\"\nports = [\"tcp:{}\"]\n",
            1000 + i
        )
        .unwrap();
    }
    s
}

#[test]
fn refused_changes_leave_maps_and_state_as_they_were() {
    let Some(lab) = Lab::new() else { return };
    lab.load(POLICY);
    let before = lab.snapshot();
    assert!(
        !before.0["WL_V4"].is_empty() && !before.0["NET_V4_0"].is_empty()
            || !before.0["NET_V4_1"].is_empty(),
        "the dump sees the loaded policy"
    );

    // 1. A parse error.
    let bad = lab.iso.policy(
        "[whitelist]\nallow = [\"192.0.2.2\"]\n[networks.x]\nsubnets = [\"198.51.100.0/33\"]\n",
    );
    let err = lab.iso.fails(&["load", "--iface", "h0", "--policy", &bad]);
    assert!(err.contains(&format!("{bad}:4:")), "{err}");
    assert_same("parse error", &before, &lab.snapshot());

    // 2. Over a backend limit: the line of the 65th allow rule is named.
    let over = lab.iso.policy(&rules(65));
    let err = lab.iso.fails(&["load", "--iface", "h0", "--policy", &over]);
    let line_65th = 7 + 64 * 4;
    assert!(
        err.contains(&format!(
            "{over}:{line_65th}: the policy has 65 allow rules; the ebpf backend holds at most 64"
        )),
        "{err}"
    );
    assert_same("over a limit", &before, &lab.snapshot());

    // 3. The kernel refuses an attach: loopback has no native XDP.
    let err = lab
        .iso
        .fails(&["load", "--iface", "lo", "--mode", "native"]);
    assert!(
        err.contains("cannot attach XDP (native mode) to lo"),
        "{err}"
    );
    assert_same("attach refused", &before, &lab.snapshot());

    // 4. The kernel refuses a map update half-way through a whole policy: the entries
    // already removed from the whitelist maps come back, the config is flipped back to the
    // isolation slot it read, which is not touched (the idle slot, which no packet reads,
    // may keep the refused policy). (The exact hashes grow instead of filling up, so the
    // refusal comes from a CIDR trie of 2 entries, full with the policy's two IPv4 CIDRs:
    // each change below adds two and removes at most one.)
    dump::plant_small_map(&lab.iso.pin, "WL_V4_LPM", 2);
    let before = lab.snapshot();
    let other = POLICY
        .replace(
            "\"192.0.2.0/25\", ",
            "\"192.0.2.128/26\", \"192.0.2.192/26\", ",
        )
        .replace("\"2001:db8:1::/64\", ", "")
        .replace(
            "\"192.0.2.2\"",
            "\"192.0.2.2\", \"192.0.2.3\", \"192.0.2.4\", \"192.0.2.5\"",
        )
        .replace("tcp:80", "tcp:8080");
    let p = lab.iso.policy(&other);
    let err = lab.iso.fails(&["load", "--iface", "h0", "--policy", &p]);
    assert!(err.contains("whitelist"), "{err}");
    let after = lab.snapshot();
    assert_same(
        "map update refused (whole policy)",
        &(dump::live_only(&before.0), before.1.clone()),
        &(dump::live_only(&after.0), after.1),
    );
    let before = lab.snapshot();
    let err = lab.iso.fails(&[
        "whitelist",
        "add",
        "192.0.2.3",
        "192.0.2.128/26",
        "192.0.2.192/26",
        "2001:db8:1::7",
    ]);
    assert!(err.contains("whitelist"), "{err}");
    assert_same("map update refused (live edit)", &before, &lab.snapshot());

    // A rule edit over the limit, from a policy at the limit.
    lab.load(&rules(64));
    let before = lab.snapshot();
    let err = lab.iso.fails(&["allow", "a", "b", "--port", "tcp:9"]);
    assert!(
        err.contains("the policy has 65 allow rules; the ebpf backend holds at most 64"),
        "{err}"
    );
    let err = lab.iso.fails(&["allow", "a", "nosuch"]);
    assert!(err.contains("unknown network 'nosuch'"), "{err}");
    assert_same("rule edits refused", &before, &lab.snapshot());

    // Positive control: a valid edit changes what the dump sees.
    lab.iso.ok(&["disallow", "a", "b", "--port", "tcp:1000"]);
    let after = lab.snapshot();
    assert_ne!(after.0, before.0, "a valid edit changes the maps");
    assert_ne!(after.1, before.1, "and the state");
}

/// A whitelist of `n` IPv6 addresses under `prefix` (a /96 of 2001:db8::/32).
fn big_whitelist(prefix: &str, n: u32) -> String {
    let mut s = String::with_capacity(n as usize * 30);
    s.push_str("[whitelist]\nallow = [\n");
    for i in 0..n {
        writeln!(s, "\"{prefix}{:x}:{:x}\",", i >> 16, i & 0xffff).unwrap();
    }
    s.push_str("]\n");
    s
}

fn syn_from(src: &str) -> Vec<u8> {
    tests::pkt::V6::new(src, "2001:db8:1::1", tests::pkt::TCP).frame(&tests::pkt::tcp(
        40000,
        22,
        tests::pkt::SYN,
    ))
}

/// XDP's verdict on a frame: true = passed.
fn passes(xdp: &aya::programs::Xdp, frame: &[u8]) -> bool {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let r = xdp
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("XDP test run");
    r.return_value == 2
}

/// One apply replaces a 1M-address whitelist by another 1M-address whitelist with no address
/// in common: it succeeds, and while it runs no verdict admits an address that neither
/// whitelist admits (checked by running the live XDP program on such addresses throughout).
#[test]
fn a_1m_whitelist_replaced_by_another_in_one_apply() {
    let Some(lab) = Lab::new() else { return };
    const N: u32 = 1 << 20;
    let (old, new, neither) = ("2001:db8:a::", "2001:db8:b::", "2001:db8:c::");
    let addr = |p: &str, i: u32| format!("{p}{:x}:{:x}", i >> 16, i & 0xffff);
    lab.load(&big_whitelist(old, N));
    let (xdp, _) = tests::pinned_programs(&lab.iso.paths());
    // Positive and negative controls before the change.
    for i in [0, 1, N / 2, N - 1] {
        assert!(passes(&xdp, &syn_from(&addr(old, i))), "old {i} admitted");
        assert!(!passes(&xdp, &syn_from(&addr(new, i))), "new {i} not yet");
        assert!(!passes(&xdp, &syn_from(&addr(neither, i))), "neither {i}");
    }

    let p = lab.iso.policy(&big_whitelist(new, N));
    let cmd = lab.iso.cmd(&["load", "--iface", "h0", "--policy", &p]);
    let apply = std::thread::spawn(move || {
        let mut cmd = cmd;
        cmd.output().expect("run isolation-user")
    });
    // Probe while the apply runs (bounded: it cannot take a minute).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut probes, mut admitted) = (0u64, Vec::new());
    let mut i = 0u32;
    while !apply.is_finished() && std::time::Instant::now() < deadline {
        i = i.wrapping_mul(2_654_435_761).wrapping_add(12345) % N;
        let a = addr(neither, i);
        if passes(&xdp, &syn_from(&a)) {
            admitted.push(a);
        }
        probes += 1;
    }
    let out = apply.join().unwrap();
    assert!(
        out.status.success(),
        "the apply succeeds: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        admitted.is_empty(),
        "{} of {probes} probes of addresses neither whitelist admits passed during the apply: {:?}",
        admitted.len(),
        &admitted[..admitted.len().min(5)]
    );
    assert!(
        probes >= 1000,
        "the probe ran during the apply ({probes} probes)"
    );
    eprintln!("{probes} probes of addresses in neither whitelist during the apply, none passed");
    for i in [0, 1, N / 2, N - 1] {
        assert!(!passes(&xdp, &syn_from(&addr(old, i))), "old {i} gone");
        assert!(passes(&xdp, &syn_from(&addr(new, i))), "new {i} admitted");
    }
    let st: serde_json::Value = serde_json::from_str(&lab.iso.ok(&["status", "--json"])).unwrap();
    let wl6 = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "WL_V6")
        .unwrap()["entries"]
        .as_u64()
        .unwrap();
    assert_eq!(wl6, N as u64, "exactly the new whitelist is in the map");
    assert_eq!(
        lab.iso.ok(&["whitelist", "list"]).lines().count(),
        N as usize
    );
}

/// The exact hash's (entries, capacity) from `status --json`.
fn wl6_fill(lab: &Lab) -> (u64, u64) {
    let st: serde_json::Value = serde_json::from_str(&lab.iso.ok(&["status", "--json"])).unwrap();
    let m = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "WL_V6")
        .unwrap()
        .clone();
    (
        m["entries"].as_u64().unwrap(),
        m["max_entries"].as_u64().unwrap(),
    )
}

/// The exact whitelist hash is sized to what it holds: small for a small whitelist, swapped
/// for a bigger one when a live edit overflows it (one by one, and in a batch), and for a
/// smaller one when a whole policy shrinks it. Across every swap an address both sides admit
/// is never refused and one neither admits is never passed (the live XDP program is run on
/// both, throughout).
#[test]
fn the_exact_whitelist_hash_grows_and_shrinks_with_its_contents() {
    let Some(lab) = Lab::new() else { return };
    let addr = |p: &str, i: u32| format!("{p}{:x}:{:x}", i >> 16, i & 0xffff);
    let (base, more, neither) = ("2001:db8:a::", "2001:db8:b::", "2001:db8:c::");
    lab.load(&big_whitelist(base, 1000));
    assert_eq!(
        wl6_fill(&lab),
        (1000, 1024),
        "1000 entries fit the smallest hash"
    );
    let (xdp, _) = tests::pinned_programs(&lab.iso.paths());
    let (kept, never) = (syn_from(&addr(base, 7)), syn_from(&addr(neither, 7)));
    assert!(passes(&xdp, &kept) && !passes(&xdp, &never), "controls");

    // Runs `args` while probing both controls; returns the probe count.
    let probing = |args: &[&str]| -> u64 {
        let mut cmd = lab.iso.cmd(args);
        let run = std::thread::spawn(move || cmd.output().expect("run isolation-user"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut probes = 0u64;
        while !run.is_finished() && std::time::Instant::now() < deadline {
            assert!(
                passes(&xdp, &kept),
                "an address both sides admit was refused"
            );
            assert!(!passes(&xdp, &never), "an address neither admits passed");
            probes += 1;
        }
        let out = run.join().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        probes
    };
    // A live edit of 3000 (the few-entries path, one insert each) overflows 1024 entries:
    // the rest goes into a bigger hash holding all 4000.
    let list = lab.iso.state.join("more.txt");
    let text: String = (0..3000).map(|i| addr(more, i) + "\n").collect();
    std::fs::write(&list, text).unwrap();
    let probes = probing(&["whitelist", "add", "--file", list.to_str().unwrap()]);
    assert_eq!(wl6_fill(&lab), (4000, 5120), "grown to 4000 and head-room");
    for i in [0, 999] {
        assert!(passes(&xdp, &syn_from(&addr(base, i))), "base {i} kept");
    }
    for i in [0, 2047, 2999] {
        assert!(passes(&xdp, &syn_from(&addr(more, i))), "more {i} added");
    }
    // A batch edit (over 4096 entries) that overflows: read, then one swap.
    let text: String = (3000..10000).map(|i| addr(more, i) + "\n").collect();
    std::fs::write(&list, text).unwrap();
    let probes = probes + probing(&["whitelist", "add", "--file", list.to_str().unwrap()]);
    assert_eq!(
        wl6_fill(&lab),
        (11000, 14336),
        "11000 and a quarter, in whole KiB"
    );
    assert!(
        passes(&xdp, &syn_from(&addr(more, 9999))),
        "more 9999 added"
    );
    // A whole policy of 10 addresses: a hash of the smallest size, holding exactly them.
    let p = lab.iso.policy(&big_whitelist(base, 10));
    let probes = probes + probing(&["load", "--iface", "h0", "--policy", &p]);
    assert_eq!(wl6_fill(&lab), (10, 1024), "shrunk to the smallest hash");
    assert!(passes(&xdp, &kept), "base 7 still admitted");
    for a in [addr(base, 10), addr(more, 0)] {
        assert!(!passes(&xdp, &syn_from(&a)), "{a} gone with the old hash");
    }
    assert!(probes >= 10, "the probes ran during the edits ({probes})");
    // Positive control of the status figures: `whitelist list` agrees.
    assert_eq!(lab.iso.ok(&["whitelist", "list"]).lines().count(), 10);
}
