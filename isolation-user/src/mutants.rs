//! The control plane's mutants, in one place: deliberate bugs the differential tests must
//! catch (`cargo xtask mutants`), each behind a `mutant-*` feature that no real build
//! enables (the datapath's own are in `isolation-ebpf/src/mutants.rs`, passed on by
//! build.rs). Every switch is a constant: off, the compiler removes the branch.

/// A prefix carries only its own networks and rules, not those of the shorter prefixes
/// that contain it.
pub const NO_CONTAINMENT: bool = cfg!(feature = "mutant-no-containment");
/// A port range stops one short of its end.
pub const PORT_RANGE_END: bool = cfg!(feature = "mutant-port-range-end");
/// The iptables backend passes no hairpin traffic.
pub const IPTABLES_HAIRPIN_OFF: bool = cfg!(feature = "mutant-iptables-hairpin-off");
