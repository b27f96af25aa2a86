//! The eBPF backend's compiled decision procedure (containment merged into LPM entries,
//! the port table) agrees with the semantics oracle on random policies with overlaps,
//! ports and IPv6. Pure: no root. The BPF program itself is held to the same oracle in
//! `differential.rs`.

use isolation_user::{backend::ebpf::compile, policy, semantics};
use tests::random::{self, Rng};

#[test]
fn compiled_agrees_with_the_oracle() {
    let mut r = Rng::new(7);
    for round in 0..300 {
        let p = random::policy(&mut r);
        let c = compile::compile(&p).unwrap();
        for _ in 0..300 {
            let k = random::packet(&mut r);
            let est = r.chance(10);
            assert_eq!(
                compile::evaluate(&c, &k, est),
                semantics::isolation(&p, &k, est),
                "round {round}: {k:?}\n{}",
                policy::to_toml(&p)
            );
        }
    }
}
