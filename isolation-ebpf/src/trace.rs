//! The LOG replacement: dropped packets go to a ring buffer of our own, behind a per-CPU
//! token bucket, with counters of what was suppressed and what the full ring lost (aya-log
//! would lose lines silently).

use aya_ebpf::{
    btf_maps::{PerCpuArray, RingBuf},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use isolation_common::{LogBucket, LogEvent, LogStat, limits, timing};

use crate::{parse::Packet, ratelimit};

/// Events for `trace`.
#[btf_map]
static EVENTS: RingBuf<LogEvent, { limits::EVENTS_BYTES as usize }> = RingBuf::new();

/// Written / suppressed / lost, per CPU.
#[btf_map]
static LOG_STATS: PerCpuArray<u64, { LogStat::COUNT as usize }> = PerCpuArray::new();

/// Token bucket of the log, per CPU (see `ratelimit`).
#[btf_map]
static LOG_BUCKET: PerCpuArray<LogBucket, 1> = PerCpuArray::new();

#[inline(always)]
fn bump(stat: LogStat) {
    if let Some(c) = LOG_STATS.get_ptr_mut(stat as u32) {
        unsafe { *c += 1 };
    }
}

/// Logs a dropped packet, rate-limited. The bucket check is inline (under a flood it runs
/// for every packet, and mostly says no); writing the event is out of line, so the hot
/// path's code stays small.
#[inline(always)]
pub fn log(pkt: &Packet, reason: u32, ifindex: u32, len: u64) {
    if token(crate::clock::now_coarse()) {
        write(pkt, reason, ifindex, len);
    }
}

/// The rate limit alone: may one more event be written at `now` (coarse clock)? A no is
/// counted as suppressed. `log` is both; the blocklist's first stage asks alone, and has the
/// packet parsed for `write` only when the answer is yes.
#[inline(always)]
pub fn token(now: u64) -> bool {
    let bucket = LOG_BUCKET.get_ptr_mut(0);
    if !ratelimit::take(bucket, now, timing::LOG_RATE_PER_SEC, timing::LOG_BURST) {
        bump(LogStat::Suppressed);
        return false;
    }
    true
}

/// Writes one event (the rate limit already said yes).
#[inline(never)]
pub fn write(pkt: &Packet, reason: u32, ifindex: u32, len: u64) {
    let Some(mut entry) = EVENTS.reserve(0) else {
        bump(LogStat::Lost);
        return;
    };
    // The event's own timestamp is precise: `trace` orders and prints it.
    let now = unsafe { bpf_ktime_get_ns() };
    // Field by field into the reserved record: a LogEvent built on the stack first would
    // cost 136 bytes of the 512 the whole call chain may use.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at the reserved, writable record of LogEvent's size.
    unsafe {
        (*e).ts_ns = now;
        (*e).ifindex = ifindex;
        (*e).reason = reason;
        (*e).src = pkt.src.0;
        (*e).dst = pkt.dst.0;
        (*e).sport = u16::from_be(pkt.sport);
        (*e).dport = u16::from_be(pkt.dport);
        (*e).len = len as u16;
        (*e).vlan = pkt.vlan;
        (*e).proto = pkt.proto;
        (*e).family = pkt.family;
        (*e).ttl = pkt.ttl;
        (*e).tcp_flags = pkt.tcp_flags;
        (*e).icmp_code = pkt.icmp_code;
        (*e)._pad = [0; 3];
    }
    entry.submit(0);
    bump(LogStat::Written);
}
