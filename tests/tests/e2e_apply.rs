//! `apply` and `save` on both backends, with real traffic: `save` prints the live policy,
//! `apply` of it changes nothing (same generation); `apply --dry-run` says what would change
//! and changes nothing; `apply` replaces the whole policy at once; a broken file changes
//! nothing; a 1M-entry whitelist survives the round trip.
//!
//!   cw (192.0.2.2) --s1-- srv --s2-- cx (198.51.100.2)

use std::{net::SocketAddr, time::Duration};

use rstest::rstest;
use tests::{iso::Iso, netns::Netns, traffic::Echo, traffic::tcp_ok, unique};

const PASS_WAIT: Duration = Duration::from_secs(3);
const DROP_WAIT: Duration = Duration::from_millis(700);

const A: &str = r#"
[isolation]
default = "deny"
reject = true
[networks.lab]
subnets = ["192.0.2.0/24", "198.51.100.0/24"]
[whitelist]
enabled = true
log = true
allow = ["192.0.2.2"]
"#;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn generation(iso: &Iso) -> u64 {
    let s: serde_json::Value = serde_json::from_str(&iso.ok(&["status", "--json"])).unwrap();
    s["generation"].as_u64().unwrap()
}

#[rstest]
#[case::ebpf("ebpf")]
#[case::iptables("iptables")]
fn apply_replaces_the_policy_and_save_round_trips(#[case] backend: &str) {
    if !tests::can_run("end-to-end apply test") {
        return;
    }
    let (srv, cw, cx) = (unique("apsrv"), unique("apcw"), unique("apcx"));
    let ns = Netns::new(&[&srv, &cw, &cx]);
    ns.link(&srv, "s1", &["192.0.2.1/24"], &cw, "e0", &["192.0.2.2/24"]);
    ns.link(
        &srv,
        "s2",
        &["198.51.100.1/24"],
        &cx,
        "e0",
        &["198.51.100.2/24"],
    );
    let iso = Iso::with_backend(&srv, backend);
    let _echo = Echo::start(&srv, &[sa("0.0.0.0:8080")]);
    let listed = || tcp_ok(&cw, sa("192.0.2.1:8080"), PASS_WAIT);
    let stranger = |wait| tcp_ok(&cx, sa("198.51.100.1:8080"), wait);
    let a = iso.policy(A);
    iso.ok(&["load", "--iface", "s1", "--iface", "s2", "--policy", &a]);
    assert!(listed() && !stranger(DROP_WAIT), "policy A");
    let g = generation(&iso);

    // save, then apply what it printed: nothing changes.
    let saved = iso.policy(&iso.ok(&["save"]));
    let out = iso.ok(&["apply", &saved]);
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(generation(&iso), g);

    // B lets the stranger in. A dry run says so and changes nothing.
    let b_text = A
        .replace(
            r#"allow = ["192.0.2.2"]"#,
            r#"allow = ["192.0.2.2", "198.51.100.2"]"#,
        )
        .replace("reject = true", "reject = false");
    let b = iso.policy(&b_text);
    let plan: serde_json::Value =
        serde_json::from_str(&iso.ok(&["apply", "--dry-run", "--json", &b])).unwrap();
    assert_eq!(plan["whitelist_added"], 1, "{plan}");
    assert_eq!(plan["whitelist_removed"], 0, "{plan}");
    assert_eq!(plan["settings"][0], "reject: true -> false", "{plan}");
    assert_eq!(generation(&iso), g, "a dry run changes nothing");
    assert!(!stranger(DROP_WAIT), "still A after the dry run");

    // apply B: the stranger passes, in one new generation; save prints B.
    iso.ok(&["apply", &b]);
    assert!(listed() && stranger(PASS_WAIT), "policy B");
    assert_eq!(generation(&iso), g + 1);
    let printed = iso.ok(&["save"]);
    assert_eq!(
        isolation_user::policy::parse("saved", &printed).unwrap(),
        isolation_user::policy::parse("b", &b_text).unwrap()
    );

    // A broken file: refused with its line, nothing live changes.
    let broken = iso.policy(&b_text.replace(r#""198.51.100.2""#, r#""198.51.100.2/33""#));
    let err = iso.fails(&["apply", &broken]);
    assert!(err.contains(&format!("{broken}:")), "{err}");
    assert!(stranger(PASS_WAIT), "B is still live");
    assert_eq!(generation(&iso), g + 1);

    // A 1M-entry whitelist: applied, saved whole, and its save applies as a no-op.
    let mut big = b_text.replace(
        r#"allow = ["192.0.2.2", "198.51.100.2"]"#,
        "allow = [\"192.0.2.2\", \"198.51.100.2\",\n",
    );
    let big_allow: String = (0..1_000_000u32)
        .map(|i| format!("\"10.{}.{}.{}\",\n", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    big = big.replace(
        "\"198.51.100.2\",\n",
        &format!("\"198.51.100.2\",\n{big_allow}]"),
    );
    let bigf = iso.policy(&big);
    iso.ok(&["apply", &bigf]);
    assert!(listed() && stranger(PASS_WAIT), "the big policy");
    let saved = iso.ok(&["save"]);
    assert_eq!(
        saved.lines().filter(|l| l.starts_with("  \"10.")).count(),
        1_000_000
    );
    let g = generation(&iso);
    let out = iso.ok(&["apply", &iso.policy(&saved)]);
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(generation(&iso), g);
}
