//! The token bucket behind the log and the REJECT answers: one per CPU (in a per-CPU
//! array), so no lock, and a flood on one CPU cannot starve the others.
//!
//! It runs for every dropped packet of a flood, so it is kept cheap: the coarse clock
//! (`clock`: a tick of resolution is plenty for tens of tokens a second), and a 64-bit
//! division only when a refill is due (BPF has no multiply-high, so a division by a
//! constant stays a real `div`).

use isolation_common::{LogBucket, timing};

/// Takes a token from `bucket` (a per-CPU map slot) if one is left, refilling at
/// `rate_per_sec` up to `burst`. False when the bucket is empty or missing.
#[inline(always)]
pub fn take(bucket: Option<*mut LogBucket>, now: u64, rate_per_sec: u64, burst: u64) -> bool {
    let Some(b) = bucket else {
        return false;
    };
    let b = unsafe { &mut *b };
    let interval = timing::NS / rate_per_sec;
    let elapsed = now.wrapping_sub(b.last_ns);
    if elapsed >= interval {
        b.tokens = core::cmp::min(b.tokens + elapsed / interval, burst);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}
