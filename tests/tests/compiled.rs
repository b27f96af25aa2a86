//! The eBPF backend's compiled decision procedure (containment merged into LPM entries,
//! the port table) agrees with the semantics oracle's isolation decision on generated
//! scenarios. Pure: no root. The BPF program itself is held to the whole oracle in
//! `differential.rs`.

use isolation_user::{
    backend::ebpf::compile,
    semantics::{self, Body, Packet},
};
use proptest::prelude::*;
use tests::scenario::{self, Step};

fn judged(p: &Packet) -> Vec<&Packet> {
    let mut v = vec![p];
    match &p.body {
        Body::Vxlan { inner, .. } => v.push(inner),
        Body::IcmpError { quoted, .. } => v.push(quoted),
        _ => {}
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn compiled_agrees_with_the_oracle(choices in prop::collection::vec(any::<u32>(), 0..3000)) {
        let sc = scenario::build(&choices);
        let c = compile::compile(&sc.policy).unwrap();
        for step in &sc.steps {
            let (Step::In(p) | Step::Out(p)) = step;
            for q in judged(p) {
                for est in [false, true] {
                    let k = q.pkt();
                    prop_assert_eq!(
                        compile::evaluate(&c, &k, est),
                        semantics::isolation(&sc.policy, &k, est),
                        "{:?}\n{}", k, sc.toml
                    );
                }
            }
        }
    }
}
