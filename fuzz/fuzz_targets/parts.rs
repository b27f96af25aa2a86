//! The parts of a big policy, joined, as a node decodes them (`fleet::uncompact`): never
//! panics; a policy it decodes encodes back to a policy that decodes the same.
#![no_main]

use isolation_user::fleet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = fleet::uncompact("fuzz", data) {
        let again = fleet::uncompact("again", &fleet::compact(&p))
            .unwrap_or_else(|e| panic!("compact's own encoding does not decode: {e}"));
        assert_eq!(p, again, "compact round trip");
    }
});
