//! Per-CPU counters, bumped once per packet at the program's exit.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use isolation_common::{Counter, Reason};

/// Packets and bytes per `Reason` (the index).
#[btf_map]
static COUNTERS: PerCpuArray<Counter, { Reason::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason as u32) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
