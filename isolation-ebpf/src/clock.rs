//! The clock of deadlines and rate limits: CLOCK_MONOTONIC at tick resolution (the coarse
//! clock), read through a per-CPU copy that is renewed when jiffies moves.
//!
//! The coarse clock is a helper call, and a call's return is what costs on machines with a
//! return-stack mitigation (the bench VM: "spec_rstack_overflow: Safe RET"): measured there,
//! ~17 ns of a blocked frame's ~75 (`BPF_PROG_TEST_RUN`, a timed entry against a permanent
//! one). `bpf_jiffies64` is inlined by the verifier into one load, and the coarse clock
//! only moves at the tick, as jiffies does: each CPU calls the helper once a tick and reads
//! its copy between ticks. The copy may be a tick late (jiffies moves just before the
//! coarse clock in the tick's update), so the answer is within two ticks of the coarse
//! clock's: deadlines are seconds, rate limits tens of events a second.

use aya_ebpf::{
    btf_maps::PerCpuArray,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::btf_map,
};

/// Per CPU: [jiffies, the coarse clock read at that jiffy].
#[btf_map]
static CLOCK: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// Now, at tick resolution (see above).
#[inline(always)]
pub fn now_coarse() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(copy) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array, which nothing else writes meanwhile (XDP
    // and TC run with preemption off).
    let copy = unsafe { &mut *copy };
    if copy[0] == jiffies && copy[1] != 0 {
        return copy[1];
    }
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The time first: a reader on this CPU never pairs this jiffy with the old time.
    copy[1] = now;
    copy[0] = jiffies;
    now
}
