//! The policy file, as `load`, `apply`, `run` and a node following etcd read it: parsing
//! never panics; a policy that parses validates or is refused, compiles for the eBPF
//! backend or is refused, and what `save` prints of it reads back as the same policy.
#![no_main]

use isolation_user::{backend::ebpf::compile, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((p, _lines)) = policy::parse_with_lines("fuzz.toml", text) else {
        return;
    };
    if policy::validate(&p).is_err() {
        return;
    }
    let _ = compile::compile(&p);
    let saved = policy::to_toml(&p);
    let again = policy::parse("saved.toml", &saved)
        .unwrap_or_else(|e| panic!("what save prints does not parse: {e}\n{saved}"));
    assert_eq!(
        p, again,
        "save's text reads back as another policy:\n{saved}"
    );
});
