//! The value of `P/policy` in etcd, as a node reads it: a manifest is refused or names a
//! size and parts within the limits, before anything is fetched or allocated.
#![no_main]

use isolation_user::fleet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(Ok(m)) = fleet::manifest_of(data) {
        assert!(m.size <= fleet::MAX_ENCODED, "size {}", m.size);
        assert!(
            m.parts.len() <= m.size.div_ceil(256 << 10).max(1),
            "{} parts for {} bytes",
            m.parts.len(),
            m.size
        );
    }
});
