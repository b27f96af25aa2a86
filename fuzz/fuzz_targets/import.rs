//! `import`'s input: an `ipset save` text, then (after a NUL byte) an `iptables-save` text.
//! Never panics; a policy it makes prints as a policy file that parses.
#![no_main]

use isolation_user::{import, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (ipset, iptables) = match text.split_once('\0') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    };
    if let Ok(imported) = import::import(ipset, iptables) {
        let saved = policy::to_toml(&imported.policy);
        if let Err(e) = policy::parse("imported.toml", &saved) {
            panic!("the imported policy does not read back: {e}\n{saved}");
        }
    }
});
