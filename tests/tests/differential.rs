//! Differential test: the real BPF programs (XDP ingress and TC egress, through
//! BPF_PROG_TEST_RUN) against the oracle of PRODUCT.md (`semantics::Oracle`), on generated
//! scenarios: a policy written as a policy file and parsed (the parser is inside the loop:
//! the oracle reads the policy as intended, the datapath what the parser made of its text),
//! then packets in and out. Every packet must get exactly the oracle's action (PASS, DROP or
//! REJECT) under exactly its reason, and every rule counter must move as the oracle says.
//!
//! Scenarios come from proptest (shrunk to a small one on failure) with a fixed seed,
//! `ISOLATION_SEED` (or `cargo xtask test --seed N`) to change it, `ISOLATION_DIFF_CASES`
//! for the number of scenarios, `ISOLATION_DIFF_SHRINK` to bound the shrinking of a failure. The test prints how many packets got each decision and fails
//! if any decision of `scenario::DECISIONS` got under 1% of them: a generator that stopped
//! reaching a decision would otherwise leave it untested.

use std::{collections::BTreeMap, sync::Mutex};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use isolation_common::{Counter, LogBucket, Reason, limits, maps};
use isolation_user::{
    backend::{
        Backend as _,
        ebpf::{Ebpf, counters, pins},
    },
    policy,
    semantics::{Action, Oracle, Packet},
    state::Paths,
};
use proptest::{
    prelude::*,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use tests::scenario::{self, DECISIONS, Histogram, Scenario, Step};

const DEFAULT_SEED: u64 = 20261124;
const DEFAULT_CASES: u32 = 400;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TCX_NEXT: u32 = u32::MAX; // -1 as the kernel returns it

struct Dp {
    paths: Paths,
    backend: Ebpf,
    xdp: Xdp,
    tc: SchedClassifier,
    counters: PerCpuArray<MapData, Counter>,
    reject_bucket: PerCpuArray<MapData, LogBucket>,
    cpus: usize,
    generation: u32,
    /// What the blocklist maps hold (the engine writes them beside `apply`).
    blocklist: isolation_user::blocklist::View,
}

impl Drop for Dp {
    fn drop(&mut self) {
        pins::remove_pins(&self.paths);
    }
}

impl Dp {
    fn new() -> Dp {
        let (paths, xdp, tc) = tests::private_datapath("isod");
        let open = |name: &str| {
            aya::maps::Map::from_map_data(MapData::from_pin(paths.map(name)).unwrap()).unwrap()
        };
        Dp {
            backend: Ebpf::new(paths.clone()),
            counters: open(maps::COUNTERS).try_into().unwrap(),
            reject_bucket: open(maps::REJECT_BUCKET).try_into().unwrap(),
            cpus: aya::util::nr_cpus().unwrap().get() as usize,
            xdp,
            tc,
            paths,
            generation: 0,
            blocklist: Default::default(),
        }
    }

    fn count(&self, r: Reason) -> u64 {
        self.counters
            .get(&(r as u32), 0)
            .unwrap()
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    fn rules(&self) -> Vec<u64> {
        counters::rule_counters(&self.paths)
            .unwrap()
            .iter()
            .map(|c| c.packets)
            .collect()
    }

    fn all(&self) -> Vec<u64> {
        Reason::ALL.iter().map(|r| self.count(*r)).collect()
    }

    /// A full bucket of REJECT answers, so the rate limit never decides a verdict here.
    fn refill(&mut self) {
        let full = PerCpuValues::try_from(vec![LogBucket::default(); self.cpus]).unwrap();
        self.reject_bucket.set(0, full, 0).unwrap();
    }

    /// Runs XDP ingress (or TC egress) on a frame; its return value.
    fn run(&self, frame: &[u8], egress: bool) -> u32 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let r = if egress {
            self.tc.test_run(opts)
        } else {
            self.xdp.test_run(opts)
        };
        r.expect("BPF_PROG_TEST_RUN").return_value
    }
}

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        _ => "?",
    }
}

fn describe(sc: &Scenario, at: usize) -> String {
    let mut s = format!("policy file:\n{}\nsteps:\n", sc.toml);
    for (i, st) in sc.steps.iter().enumerate().take(at + 1) {
        s.push_str(&format!("  {i}: {st:?}\n"));
    }
    s
}

fn check(dp: &mut Dp, sc: &Scenario, hist: &mut Histogram) -> Result<(), TestCaseError> {
    // The datapath gets what the parser makes of the text, through the backend as the
    // engine drives it; the oracle reads the policy as it was meant.
    let parsed = policy::parse("generated.toml", &sc.toml)
        .map_err(|e| TestCaseError::fail(format!("the parser refused: {e}\n{}", sc.toml)))?;
    dp.generation += 1;
    dp.backend
        .apply(
            &parsed,
            Some(&parsed.whitelist.allow),
            dp.generation,
            &mut |_| {},
        )
        .map_err(|e| TestCaseError::fail(format!("apply: {e:#}\n{}", sc.toml)))?;
    let blocklist = isolation_user::blocklist::view(&parsed.blocklist.entries, &[], 0);
    let changed = isolation_user::blocklist::changed(&dp.blocklist, &blocklist);
    dp.backend
        .edit_blocklist(&dp.blocklist, &blocklist, &changed)
        .map_err(|e| TestCaseError::fail(format!("blocklist: {e:#}\n{}", sc.toml)))?;
    dp.blocklist = blocklist;
    for m in [maps::CONNTRACK, maps::ESTABLISHED, maps::FRAGS] {
        counters::clear_map(&dp.paths, m).unwrap();
    }
    let mut oracle = Oracle::new(&sc.policy);
    let (before, rules_before) = (dp.all(), dp.rules());
    let mut want = vec![0u64; before.len()];
    let mut want_rules = vec![0u64; rules_before.len()];
    for (i, step) in sc.steps.iter().enumerate() {
        let (p, egress): (&Packet, bool) = match step {
            Step::In(p) => (p, false),
            Step::Out(p) => (p, true),
        };
        let frame = scenario::frame(p);
        let mut label = "TC next";
        let (reason, want_action, name) = if egress {
            let r = oracle.egress(p);
            (r, TCX_NEXT, r.name().to_string())
        } else {
            let v = oracle.ingress(p);
            if let Some((kind, k)) = v.rule {
                let at = if kind == "except" {
                    limits::ALLOW_RULES + k as usize
                } else {
                    k as usize
                };
                want_rules[at] += 1;
            }
            label = match v.action {
                Action::Drop => "DROP",
                Action::Pass => "PASS",
                Action::Reject => "REJECT (XDP PASS, tagged)",
            };
            let a = match v.action {
                Action::Drop => XDP_DROP,
                // REJECT: XDP tags the packet for TC ingress to answer, and passes it.
                Action::Pass | Action::Reject => XDP_PASS,
            };
            if v.tunnelled {
                *hist.entry("vxlan".into()).or_default() += 1;
            }
            (v.reason, a, v.reason.name().to_string())
        };
        *hist.entry(name).or_default() += 1;
        want[reason as usize] += 1;
        dp.refill();
        let n = dp.count(reason);
        let got = dp.run(&frame, egress);
        let moved = dp.count(reason) - n;
        if got != want_action || moved != 1 {
            return Err(TestCaseError::fail(format!(
                "step {i}: the oracle says {} under '{}', the datapath returned {} {}\n{}",
                label,
                reason.name(),
                if egress {
                    format!("{}", got as i32)
                } else {
                    action_name(got).to_string()
                },
                if moved == 1 {
                    "under that reason".to_string()
                } else {
                    "under another reason".to_string()
                },
                describe(sc, i)
            )));
        }
    }
    // Nothing else moved: every reason and every rule counter exactly as the oracle says.
    let moved: Vec<u64> = dp.all().iter().zip(&before).map(|(a, b)| a - b).collect();
    if moved != want {
        return Err(TestCaseError::fail(format!(
            "reason counters moved {moved:?}, the oracle says {want:?}\n{}",
            describe(sc, sc.steps.len())
        )));
    }
    let rules: Vec<u64> = dp
        .rules()
        .iter()
        .zip(&rules_before)
        .map(|(a, b)| a - b)
        .collect();
    if rules != want_rules {
        let diff: Vec<(usize, u64, u64)> = rules
            .iter()
            .zip(&want_rules)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, *a, *b))
            .collect();
        return Err(TestCaseError::fail(format!(
            "rule counters (index, got, oracle): {diff:?}\n{}",
            describe(sc, sc.steps.len())
        )));
    }
    Ok(())
}

#[test]
fn bpf_agrees_with_the_oracle() {
    if !tests::can_run("differential BPF test") {
        return;
    }
    let seed: u64 = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let cases: u32 = std::env::var("ISOLATION_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: std::env::var("ISOLATION_DIFF_SHRINK")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4000),
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let dp = Mutex::new(Dp::new());
    let hist = Mutex::new(Histogram::new());
    let packets = Mutex::new(0u64);
    let result = runner.run(&prop::collection::vec(any::<u32>(), 0..6000), |choices| {
        let sc = scenario::build(&choices);
        let mut h = Histogram::new();
        let r = check(&mut dp.lock().unwrap(), &sc, &mut h);
        if r.is_ok() {
            for (k, v) in h {
                *hist.lock().unwrap().entry(k).or_default() += v;
            }
            *packets.lock().unwrap() += sc.steps.len() as u64;
        }
        r
    });
    if let Err(e) = result {
        panic!("seed {seed}: the datapath and the oracle disagree (shrunk case):\n{e}");
    }
    let hist = hist.into_inner().unwrap();
    let total = packets.into_inner().unwrap();
    let mut report = format!("differential, seed {seed}: {total} packets in {cases} scenarios\n");
    let mut all: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, v) in &hist {
        all.insert(k, *v);
    }
    for (k, v) in &all {
        report.push_str(&format!(
            "  {k:<24} {v:>7}  {:5.1}%\n",
            *v as f64 * 100.0 / total as f64
        ));
    }
    eprintln!("{report}");
    for d in DECISIONS {
        let n = hist.get(*d).copied().unwrap_or(0);
        assert!(
            n * 100 >= total,
            "decision '{d}' got {n} of {total} packets, under 1%: the generator no longer reaches it\n{report}"
        );
    }
}
