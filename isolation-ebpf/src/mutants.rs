//! The datapath's mutants, in one place: deliberate bugs the differential tests must catch
//! (`cargo xtask mutants`), each behind a `mutant-*` feature that no real build enables.
//! Every switch is a constant: off, the compiler removes the branch, and the hot path a
//! reader sees names the bug (`if mutants::HAIRPIN_OFF`).

/// The whitelist's CIDR tries are never consulted.
pub const SKIP_CIDR_TRIE: bool = cfg!(feature = "mutant-skip-cidr-trie");
/// Two hosts of one network are not passed as hairpin.
pub const HAIRPIN_OFF: bool = cfg!(feature = "mutant-hairpin-off");
/// An allowed connection is recorded where it arrives, not where it leaves.
pub const RECORD_AT_INGRESS: bool = cfg!(feature = "mutant-record-at-ingress");
/// A denial that should be answered is dropped silently.
pub const REJECT_AS_DROP: bool = cfg!(feature = "mutant-reject-as-drop");
/// The blocklist is asked after replies, related errors and fragments (a blocked host's
/// replies get in).
pub const BLOCKED_AFTER_REPLIES: bool = cfg!(feature = "mutant-blocked-after-replies");
