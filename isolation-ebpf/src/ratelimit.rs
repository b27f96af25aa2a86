//! The token bucket behind the log and the REJECT answers: one per CPU (in a per-CPU
//! array), so no lock, and a flood on one CPU cannot starve the others.

use isolation_common::{LogBucket, timing};

/// Takes a token from `bucket` (a per-CPU map slot) if one is left, refilling at
/// `rate_per_sec` up to `burst`. False when the bucket is empty or missing.
#[inline(always)]
pub fn take(bucket: Option<*mut LogBucket>, now: u64, rate_per_sec: u64, burst: u64) -> bool {
    let Some(b) = bucket else {
        return false;
    };
    let b = unsafe { &mut *b };
    let refill = now.wrapping_sub(b.last_ns) / (timing::NS / rate_per_sec);
    if refill > 0 {
        b.tokens = core::cmp::min(b.tokens + refill, burst);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}
