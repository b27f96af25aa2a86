//! Types, map names, limits and flag bits shared by the BPF programs and the loader.
//!
//! Everything here is `#[repr(C)]` without implicit padding so that both sides read the
//! same bytes (explicit `_pad` fields, `u32` flags instead of `bool`).
//!
//! Its size: every type and constant both sides share, one module each (maps, limits, flags,
//! ports, the bit filter's hashing), kept in one file so that a layout change is seen whole.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names as they appear in the object file, in `bpftool map` and under the pin dir.
pub mod maps {
    /// `Config` at index 0: what the policy switched on.
    pub const CONFIG: &str = "CONFIG";
    /// Exact IPv4 whitelist addresses: an array of one map, the hash (flat cost at 1M
    /// entries) sized to its contents.
    pub const WL_V4: &str = "WL_V4";
    /// IPv4 whitelist CIDRs (LPM trie); /32s live in `WL_V4`.
    pub const WL_V4_LPM: &str = "WL_V4_LPM";
    /// Exact IPv6 whitelist addresses (an array of one map, as `WL_V4`).
    pub const WL_V6: &str = "WL_V6";
    /// The filter in front of each big exact hash: four bits of one 64-bit word per
    /// whitelisted address, in two halves (the live one, and one the loader rebuilds beside
    /// it), then the loader's bookkeeping (`bloom_meta`).
    pub const WL_V4_BLOOM: &str = "WL_V4_BLOOM";
    pub const WL_V6_BLOOM: &str = "WL_V6_BLOOM";
    /// The filters of the builds before the bloom filter (one bit per address): never
    /// created now; an upgrade removes their pins.
    pub const RETIRED: &[&str] = &["WL_V4_FILTER", "WL_V6_FILTER"];
    /// IPv6 whitelist CIDRs; /128s live in `WL_V6`.
    pub const WL_V6_LPM: &str = "WL_V6_LPM";
    /// Blocked IPv4 / IPv6 addresses (hashes, allocated as they fill) and CIDRs (LPM
    /// tries): source → `BlockDeadline`.
    pub const BL_V4: &str = "BL_V4";
    pub const BL_V4_LPM: &str = "BL_V4_LPM";
    pub const BL_V6: &str = "BL_V6";
    pub const BL_V6_LPM: &str = "BL_V6_LPM";
    /// The filters in front of the blocklist's address hashes once they are big: as
    /// `WL_V4_BLOOM`, one per family.
    pub const BL_V4_BLOOM: &str = "BL_V4_BLOOM";
    pub const BL_V6_BLOOM: &str = "BL_V6_BLOOM";
    /// New connections: seen leaving an attached interface (original direction), not yet
    /// confirmed by an answer. LRU: a flood of new flows evicts only other new flows.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Established connections: answered, then confirmed by the side that opened them
    /// (TCP: the handshake's last ACK). Only other established connections compete here.
    pub const ESTABLISHED: &str = "ESTABLISHED";
    /// Remote hosts with flows, a flag (an array element) per hash slot: a packet from a
    /// source whose slot is empty skips the connection tables.
    pub const PEERS: &str = "PEERS";
    /// Fragments of an admitted datagram whose first fragment passed conntrack.
    pub const FRAGS: &str = "FRAGS";
    /// Per-CPU packet/byte counters indexed by `Reason`.
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU counters of the log path, indexed by `LogStat`.
    pub const LOG_STATS: &str = "LOG_STATS";
    /// Per-CPU token bucket of the log rate limit.
    pub const LOG_BUCKET: &str = "LOG_BUCKET";
    /// Per-CPU copy of the coarse clock, renewed when jiffies moves (the datapath's clock
    /// of deadlines and rate limits).
    pub const CLOCK: &str = "CLOCK";
    /// Ring buffer of `LogEvent`s read by `trace`.
    pub const EVENTS: &str = "EVENTS";
    /// Isolation, in two slots (0 and 1) so that a whole policy swaps in one step: the
    /// loader fills the slot not in use, then flips `Config::slot`.
    /// Prefix → `NetEntry` (LPM tries, one per family and slot).
    pub const NET_V4: [&str; 2] = ["NET_V4_0", "NET_V4_1"];
    pub const NET_V6: [&str; 2] = ["NET_V6_0", "NET_V6_1"];
    /// (protocol, destination port) → mask of allow rules that admit it (`port_index`).
    pub const PORTS: [&str; 2] = ["PORTS_0", "PORTS_1"];
    /// `PolicyMeta` of each slot (index = slot).
    pub const META: &str = "META";
    /// Per-CPU counters per allow rule (index = rule bit) and per except rule (64 + bit).
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    /// Per-CPU token bucket of the REJECT answers.
    pub const REJECT_BUCKET: &str = "REJECT_BUCKET";
    /// Per-CPU scratch buffer for the bytes a REJECT answer quotes.
    pub const REJECT_SCRATCH: &str = "REJECT_SCRATCH";
    /// Tail calls of the XDP program (index 0: the VXLAN inner-packet program).
    pub const JUMP: &str = "JUMP";
    /// What the XDP program hands to the VXLAN program, per CPU.
    pub const VXLAN_HANDOFF: &str = "VXLAN_HANDOFF";

    /// Every map the loader pins, in the order `status` reports them.
    pub const ALL: &[&str] = &[
        CONFIG,
        WL_V4,
        WL_V4_LPM,
        WL_V6,
        WL_V6_LPM,
        WL_V4_BLOOM,
        WL_V6_BLOOM,
        BL_V4,
        BL_V4_LPM,
        BL_V6,
        BL_V6_LPM,
        BL_V4_BLOOM,
        BL_V6_BLOOM,
        CONNTRACK,
        ESTABLISHED,
        PEERS,
        FRAGS,
        COUNTERS,
        LOG_STATS,
        LOG_BUCKET,
        CLOCK,
        EVENTS,
        NET_V4[0],
        NET_V4[1],
        NET_V6[0],
        NET_V6[1],
        PORTS[0],
        PORTS[1],
        META,
        RULE_COUNTERS,
        REJECT_BUCKET,
        REJECT_SCRATCH,
        JUMP,
        VXLAN_HANDOFF,
    ];
}

/// Program names in the object file.
pub mod progs {
    pub const XDP_INGRESS: &str = "isolation_xdp";
    pub const TC_EGRESS: &str = "isolation_tc_egress";
    /// Judges the packet inside a VXLAN datagram (tail-called by the XDP program).
    pub const XDP_VXLAN: &str = "isolation_xdp_vxlan";
    /// Answers packets XDP tagged for REJECT.
    pub const TC_INGRESS: &str = "isolation_tc_ingress";
}

/// Map sizes. The policy validator refuses a policy that would not fit.
pub mod limits {
    /// Exact addresses per family, at most (hash maps sized by userspace to what they hold,
    /// preallocated, swapped for bigger ones as they grow).
    pub const WL_EXACT: u32 = 1 << 21;
    /// The smallest exact hash: what an empty or small whitelist reserves.
    pub const WL_EXACT_MIN: u32 = 1 << 10;
    /// 64-bit words of one half of a family's whitelist filter, a power of two (2 MiB): a
    /// miss from a random source reads one word, instead of a bucket and an element of a
    /// big hash in DRAM (measured: ~750 ns each on this project's bench machine). Each
    /// address sets 4 bits of one word, so with 1M entries about 0.5% of random sources
    /// find all four set and go on to the hash (one bit per address, before: 6%).
    pub const WL_BLOOM_WORD_BITS: u32 = 18;
    pub const WL_BLOOM_WORDS: u32 = 1 << WL_BLOOM_WORD_BITS;
    /// The filter map's length: two halves, then `bloom_meta::LEN` words of bookkeeping.
    pub const WL_BLOOM_LEN: u32 = 2 * WL_BLOOM_WORDS + super::bloom_meta::LEN;
    /// Hash sizes (entries) from which the datapath consults the filter: below it the hash's
    /// buckets stay in cache and the filter would only add a lookup.
    pub const WL_BLOOM_FROM: u32 = 1 << 16;
    /// CIDRs per family (LPM tries are always allocated on demand).
    pub const WL_LPM: u32 = 1 << 20;
    /// Blocked addresses and blocked CIDRs, each per family (allocated as they fill: an
    /// empty blocklist costs no memory).
    pub const BL_EXACT: u32 = 1 << 20;
    pub const BL_LPM: u32 = 1 << 20;
    /// New (unconfirmed) connections, and established ones: two tables of this size by
    /// default. The loader sizes both from the policy (`[connections] max`).
    pub const CONNTRACK: u32 = 1 << 16;
    pub const ESTABLISHED: u32 = CONNTRACK;
    /// Slots of the remote-host filter in front of the connection tables: 2^PEER_BITS
    /// bytes, kept as 64-bit array elements of 8 slots (128 KiB: small enough to stay in a
    /// CPU's L2 cache under a flood from random sources).
    pub const PEER_BITS: u32 = 17;
    pub const PEER_SLOTS: u32 = 1 << PEER_BITS;
    pub const PEER_WORDS: u32 = PEER_SLOTS / 8;
    pub const FRAGS: u32 = 1 << 14;
    /// Bytes of the trace ring buffer (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Bound on the IPv6 extension headers walked before giving up on the L4 header.
    pub const IPV6_EXT_HEADERS: u32 = 6;
    /// Networks, allow rules and except rules are bits of a u64 each.
    pub const NETWORKS: usize = 64;
    pub const ALLOW_RULES: usize = 64;
    pub const EXCEPT_RULES: usize = 64;
    /// Distinct prefixes per family in the isolation tries (networks and rule CIDRs).
    pub const NET_PREFIXES: u32 = 1 << 16;
    /// VXLAN ports a policy may name.
    pub const VXLAN_PORTS: usize = 4;
}

/// Index of `PORTS` for a protocol and destination port (host order).
pub mod ports {
    pub const TCP_BASE: u32 = 0;
    pub const UDP_BASE: u32 = 65536;
    /// ICMP and ICMPv6, whatever the type.
    pub const ICMP: u32 = 2 * 65536;
    /// Any other protocol (port-less rules only).
    pub const OTHER: u32 = 2 * 65536 + 1;
    /// A packet whose ports cannot be read (a later fragment): port-less rules only.
    pub const NO_PORT: u32 = 2 * 65536 + 2;
    pub const LEN: u32 = 2 * 65536 + 3;

    /// The index of a packet: its protocol and, when its L4 header was read, its
    /// destination port (host order). One function for the datapath and the loader's `check`.
    #[inline(always)]
    pub fn index(proto: u8, dport: Option<u16>) -> u32 {
        match (proto, dport) {
            (_, None) => NO_PORT,
            (6, Some(d)) => TCP_BASE + d as u32,
            (17, Some(d)) => UDP_BASE + d as u32,
            (1 | 58, Some(_)) => ICMP,
            _ => OTHER,
        }
    }
}

/// An address as the datapath keeps it: 16 bytes (IPv4 in the first 4, the rest zero),
/// aligned to 8 so that it is read and copied as whole words. (As `[u8; 16]` every copy was
/// 16 byte loads and stores, and each word read of the copy after it a failed store
/// forward: measured as the largest cost of an IPv6 frame's parse and whitelist miss.)
#[repr(C, align(8))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// The four 32-bit words, in memory order.
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: an Addr is 16 bytes aligned to 8: four aligned u32 reads inside it.
        unsafe { core::ptr::read(self.0.as_ptr() as *const [u32; 4]) }
    }
}

/// Where an exact whitelisted address lies in a half of its family's filter
/// (`maps::WL_V4_BLOOM`): its word, and the mask of its four bits in that word. An address
/// may be in the hash only if all four are set. One function for the datapath and the
/// loader.
#[inline(always)]
pub fn wl_bloom(family: u8, a: &[u8; 16]) -> (u32, u64) {
    wl_bloom_of(fold(family, &Addr(*a)))
}

/// `wl_bloom` of an address already hashed with `addr_hash`: the word from the top bits of
/// one multiply, the four bit positions from the 24 bits below them.
#[inline(always)]
pub fn wl_bloom_of(hash: u64) -> (u32, u64) {
    let h = hash.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    let word = (h >> (64 - limits::WL_BLOOM_WORD_BITS)) as u32;
    let bit = |shift: u32| 1u64 << ((h >> shift) & 63);
    let top = 64 - limits::WL_BLOOM_WORD_BITS;
    (
        word,
        bit(top - 6) | bit(top - 12) | bit(top - 18) | bit(top - 24),
    )
}

/// The loader's bookkeeping words after the two halves of a whitelist filter (index
/// `2 * limits::WL_BLOOM_WORDS + i`). The datapath never reads them.
pub mod bloom_meta {
    /// 1 once the live half was built from every key of the hash by this design's loader
    /// (which then keeps it: every key gets its bits before it enters the hash).
    pub const COMPLETE: u32 = 0;
    /// Keys whose bits went into the live half (at its build and since).
    pub const KEYS: u32 = 1;
    /// Keys deleted from the hash since the live half was built: their bits stay set.
    pub const DELETED: u32 = 2;
    pub const LEN: u32 = 3;
}

/// The address hash behind the whitelist filter and the remote-host filter: computed once
/// per packet by the datapath, which asks both.
#[inline(always)]
pub fn addr_hash(family: u8, a: &Addr) -> u64 {
    fold(family, a)
}

/// An address hashed to 64 bits (IPv4: its only word). Each 64-bit half is mixed in with a
/// multiply and a shift, so addresses differing anywhere land far apart. (A plain XOR of the
/// words, tried first, mapped 2001:db8:eeee::/108 onto exactly the bits of
/// 2001:db8:ffff::/108: every source of the benchmark's flood looked whitelisted.)
#[inline(always)]
fn fold(family: u8, a: &Addr) -> u64 {
    let w = a.words();
    let w = |i: usize| u64::from(w[i]);
    let mix = |h: u64, x: u64| {
        let h = (h ^ x).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^ (h >> 32)
    };
    let h = mix(
        0x9E37_79B9_7F4A_7C15,
        w(0) | if family != AF_INET { w(1) << 32 } else { 0 },
    );
    if family != AF_INET {
        mix(h, w(2) | w(3) << 32)
    } else {
        h
    }
}

/// The slot of an address in the remote-host filter (`maps::PEERS`): byte `s % 8` of
/// element `s / 8`. One function for the datapath and the loader (which marks the peers of
/// the connections it seeds).
#[inline(always)]
pub fn peer_slot(family: u8, a: &[u8; 16]) -> u32 {
    peer_slot_of(fold(family, &Addr(*a)))
}

/// `peer_slot` of an address already hashed with `addr_hash`.
#[inline(always)]
pub fn peer_slot_of(hash: u64) -> u32 {
    (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - limits::PEER_BITS)) as u32
}

/// Index of the lowest set bit of a rule mask: the deciding rule is the first one written.
/// Bit arithmetic rather than `trailing_zeros`: BPF has no count-trailing-zeros instruction.
#[inline(always)]
pub fn lowest_bit(m: u64) -> u32 {
    let b = m.isolate_lowest_one();
    let mut i = 0;
    if b & 0xFFFF_FFFF_0000_0000 != 0 {
        i += 32;
    }
    if b & 0xFFFF_0000_FFFF_0000 != 0 {
        i += 16;
    }
    if b & 0xFF00_FF00_FF00_FF00 != 0 {
        i += 8;
    }
    if b & 0xF0F0_F0F0_F0F0_F0F0 != 0 {
        i += 4;
    }
    if b & 0xCCCC_CCCC_CCCC_CCCC != 0 {
        i += 2;
    }
    if b & 0xAAAA_AAAA_AAAA_AAAA != 0 {
        i += 1;
    }
    i
}

/// Timeouts and the log rate limit, in nanoseconds of `bpf_ktime_get_ns`.
pub mod timing {
    pub const NS: u64 = 1_000_000_000;
    /// As the kernel's conntrack for an established TCP connection.
    pub const TCP_TIMEOUT_NS: u64 = 432_000 * NS;
    /// A TCP connection not yet confirmed (the kernel's SYN_SENT).
    pub const TCP_NEW_TIMEOUT_NS: u64 = 120 * NS;
    /// A TCP connection after one FIN (the kernel's FIN_WAIT / CLOSE_WAIT, shortened).
    pub const TCP_FIN_TIMEOUT_NS: u64 = 60 * NS;
    /// A TCP connection after a FIN each way, or a RST (the kernel's CLOSE).
    pub const TCP_CLOSED_TIMEOUT_NS: u64 = 10 * NS;
    /// UDP confirmed both ways (the kernel's "stream"), and unanswered.
    pub const UDP_TIMEOUT_NS: u64 = 180 * NS;
    pub const UDP_NEW_TIMEOUT_NS: u64 = 30 * NS;
    pub const OTHER_TIMEOUT_NS: u64 = 60 * NS;
    pub const ICMP_TIMEOUT_NS: u64 = 30 * NS;
    pub const FRAG_TIMEOUT_NS: u64 = 30 * NS;
    /// The egress path rewrites `last_seen` at most this often per flow (saves writes).
    pub const REFRESH_NS: u64 = NS;
    /// Log events per second per CPU, and the burst.
    pub const LOG_RATE_PER_SEC: u64 = 20;
    pub const LOG_BURST: u64 = 100;
}

/// Bits of `Config::flags`.
pub mod flags {
    /// The whitelist is enforced; off, every IP packet goes on to isolation.
    pub const WHITELIST_ENABLED: u32 = 1 << 0;
    /// Log whitelist drops to the event ring buffer.
    pub const LOG: u32 = 1 << 1;
    /// The live slot isolates networks. With either enforcement on, a frame the datapath
    /// cannot judge whole (too many VLAN tags, malformed IP) is dropped.
    pub const ISOLATION: u32 = 1 << 2;
    /// The whitelist's IPv4 / IPv6 CIDR trie holds entries. Clear, the datapath skips the
    /// trie lookup (most whitelists are exact addresses only). Set before a CIDR is added,
    /// cleared only once its trie is empty: never a moment where an entry is not consulted.
    pub const WL_CIDR_V4: u32 = 1 << 3;
    pub const WL_CIDR_V6: u32 = 1 << 4;
    pub const WL_CIDRS: u32 = WL_CIDR_V4 | WL_CIDR_V6;
    /// The one-bit filters of earlier builds: never set now, cleared by the loader (an
    /// earlier datapath that still runs then skips its filter, which nothing keeps).
    pub const RETIRED_FILTER_V4: u32 = 1 << 5;
    pub const RETIRED_FILTER_V6: u32 = 1 << 6;
    /// The IPv4 / IPv6 exact hash is big: consult its filter (`maps::WL_V4_BLOOM`) first.
    /// Set by the loader once the hash's size passes `limits::WL_BLOOM_FROM` and the live
    /// half of the filter holds the bits of every key.
    pub const WL_BLOOM_V4: u32 = 1 << 7;
    pub const WL_BLOOM_V6: u32 = 1 << 8;
    /// The live half of the family's filter is the second one (words `WL_BLOOM_WORDS..`).
    pub const WL_BLOOM_HI_V4: u32 = 1 << 9;
    pub const WL_BLOOM_HI_V6: u32 = 1 << 10;
    /// The blocklist is enforced (before anything else), and its drops are logged.
    pub const BLOCKLIST: u32 = 1 << 11;
    pub const BL_LOG: u32 = 1 << 12;
    /// The blocklist's IPv4 / IPv6 address hash, or CIDR trie, holds entries: clear, the
    /// datapath skips it. Set before an entry is added, cleared once the map is empty.
    pub const BL_V4: u32 = 1 << 13;
    pub const BL_V6: u32 = 1 << 14;
    pub const BL_CIDR_V4: u32 = 1 << 15;
    pub const BL_CIDR_V6: u32 = 1 << 16;
    /// The blocklist's IPv4 / IPv6 address hash is big: consult its filter
    /// (`maps::BL_V4_BLOOM`) first, as `WL_BLOOM_V4`; and which half of it is live.
    pub const BL_BLOOM_V4: u32 = 1 << 17;
    pub const BL_BLOOM_V6: u32 = 1 << 18;
    pub const BL_BLOOM_HI_V4: u32 = 1 << 19;
    pub const BL_BLOOM_HI_V6: u32 = 1 << 20;
    /// The switches that follow the blocklist maps.
    pub const BL_FOLLOW_MAPS: u32 = BL_V4
        | BL_V6
        | BL_CIDR_V4
        | BL_CIDR_V6
        | BL_BLOOM_V4
        | BL_BLOOM_V6
        | BL_BLOOM_HI_V4
        | BL_BLOOM_HI_V6;
    /// The switches that follow the whitelist maps, not the policy text.
    pub const WL_FOLLOW_MAPS: u32 = WL_CIDRS
        | RETIRED_FILTER_V4
        | RETIRED_FILTER_V6
        | WL_BLOOM_V4
        | WL_BLOOM_V6
        | WL_BLOOM_HI_V4
        | WL_BLOOM_HI_V6;
    /// Every switch that follows maps: what a policy's apply keeps as it is.
    pub const FOLLOW_MAPS: u32 = WL_FOLLOW_MAPS | BL_FOLLOW_MAPS;
}

/// When a blocklist entry stops matching: `CLOCK_MONOTONIC` nanoseconds, read by the
/// datapath as its coarse clock (`bpf_ktime_get_coarse_ns`, at most a tick behind), or
/// `PERMANENT`. An entry holds the latest deadline of
/// itself and every blocked CIDR that contains it, so the longest prefix a lookup finds
/// never hides a shorter one that still holds.
pub mod block_deadline {
    pub const PERMANENT: u64 = u64::MAX;

    /// Does an entry of this deadline block at `now` (boot ns)?
    #[inline(always)]
    pub fn holds(deadline: u64, now: u64) -> bool {
        now < deadline
    }
}

/// Written by the loader at index 0 of `CONFIG`. A zeroed config (before any policy
/// is applied) lets everything through, so attaching can never lock anyone out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct Config {
    /// Whitelist switches (`flags::*`): live, not part of a slot.
    pub flags: u32,
    /// Bumped by every policy change; shown by `status`.
    pub generation: u32,
    /// The isolation slot in use (0 or 1).
    pub slot: u32,
    /// The generations of the remote-host filter (`maps::PEERS`, see `peer_gen`): byte 0
    /// the one the datapath marks slots with, byte 1 an older one still accepted while
    /// the loader rebuilds the filter. 0 (a datapath from before generations): any
    /// marked slot counts.
    pub peers: u32,
}

/// Generations of the remote-host filter. A slot holds the generation it was marked in,
/// and counts only while that generation is accepted; a rebuild moves to the next
/// generation, marks the slots of the remembered flows with it, then stops accepting the
/// old one. Slots of hosts no flow needs any more so empty out without a write, and
/// nothing the datapath marks meanwhile is lost.
pub mod peer_gen {
    /// The byte a slot is marked with under the `Config::peers` word `peers`.
    #[inline(always)]
    pub fn mark(peers: u32) -> u8 {
        match peers as u8 {
            0 => 1,
            g => g,
        }
    }

    /// Does a slot holding `b` count under `peers`?
    #[inline(always)]
    pub fn accepts(peers: u32, b: u8) -> bool {
        let g = peers as u8;
        b != 0 && (g == 0 || b == g || b == (peers >> 8) as u8)
    }

    /// The generation after the one marked under `peers` (1 to 255, never 0).
    pub fn next(peers: u32) -> u8 {
        mark(peers) % 255 + 1
    }

    /// The `Config::peers` word that marks `mark` and also accepts `also`.
    pub fn word(mark: u8, also: u8) -> u32 {
        mark as u32 | (also as u32) << 8
    }
}

/// Bits of `PolicyMeta::flags`.
pub mod iso_flags {
    /// Some network exists: isolation judges packets.
    pub const ENABLED: u32 = 1 << 0;
    /// Default deny (else accept).
    pub const DENY: u32 = 1 << 1;
    /// Deny answers with RST / ICMP admin-prohibited (else silent drop).
    pub const REJECT: u32 = 1 << 2;
}

/// The isolation switches of one slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct PolicyMeta {
    pub flags: u32,
    pub _pad: u32,
    /// UDP destination ports carrying VXLAN (0 = unused), host order: the outer packet is
    /// judged by the whitelist, the inner one by isolation.
    pub vxlan_ports: [u16; limits::VXLAN_PORTS],
}

/// Value of the isolation tries: everything the policy says about the addresses under one
/// prefix, already merged with every shorter prefix that contains it (an LPM lookup returns
/// only the longest match, so containment is resolved at compile time).
/// 4-byte aligned: an LPM trie stores the value right after a 4-byte IPv4 key.
#[repr(C, packed(4))]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct NetEntry {
    /// Networks containing the prefix: subject to isolation when non-zero; hairpin when
    /// source and destination share a bit.
    pub nets: u64,
    /// Allow rules whose `from` contains the prefix.
    pub allow_from: u64,
    /// Allow rules whose `to` contains the prefix.
    pub allow_to: u64,
    /// Except rules whose `from` contains the prefix.
    pub except_from: u64,
    /// Except rules whose `to` contains the prefix.
    pub except_to: u64,
}

/// Value of the whitelist maps. The datapath only tests presence; the prefix length lets
/// userspace tell which trie entry an LPM lookup matched (for the SSH lockout check).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct WlEntry {
    pub prefix_len: u32,
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// A connection in its original direction: `src`/`sport` are the side that sent the first
/// packet out of an attached interface. IPv4 addresses use the first 4 bytes, the rest zero.
/// For ICMP echo, `sport` is the identifier of a request and `dport` 0 (a reply carries
/// them swapped), so reversing a reply's key finds the request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order, as on the wire.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Where a flow entry came from.
pub mod flow_origin {
    /// Seen by the TC egress program.
    pub const EGRESS: u32 = 1;
    /// Seeded by `load` from the kernel's socket table (connections open before load).
    pub const SEEDED: u32 = 2;
}

/// Bits of `FlowValue::state`: what has been seen of a connection.
pub mod flow_state {
    /// An answer came in (a packet in the reply direction passed).
    pub const REPLIED: u32 = 1 << 0;
    /// A FIN left in the original direction / came in the reply direction.
    pub const FIN_OUT: u32 = 1 << 1;
    pub const FIN_IN: u32 = 1 << 2;
    /// A RST, either way: the connection is over.
    pub const RST: u32 = 1 << 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct FlowValue {
    pub last_seen_ns: u64,
    pub origin: u32,
    /// `flow_state` bits.
    pub state: u32,
}

/// Fragments: (src, dst, IP id, proto) of a datagram whose first fragment was admitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet got its verdict. Append-only: the counters, `trace`, `stats --json` and the
/// metrics index by these numbers, so a retired reason keeps its number forever.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): never filtered.
    PassNonIp = 0,
    /// ICMPv6 neighbour discovery / MLD from the link itself (hop limit 255, or 1 for MLD)
    /// and not to be routed: never filtered.
    PassNeighbour = 1,
    /// The whitelist is disabled.
    PassWhitelistOff = 2,
    /// Source address in the whitelist.
    PassWhitelist = 3,
    /// Reply of a connection seen leaving (or seeded at load).
    PassEstablished = 4,
    /// ICMP error about a connection seen leaving.
    PassRelated = 5,
    /// Later fragment of an admitted datagram.
    PassFragment = 6,
    /// Source not whitelisted and no connection: dropped.
    DropNotWhitelisted = 7,
    /// An IP header too short or inconsistent to read a source from: dropped.
    DropMalformed = 8,
    /// More VLAN tags than the parser reads: dropped rather than guessed.
    DropTooManyVlans = 9,
    /// Egress: packet of a connection already in a table (its entry refreshed).
    EgressTracked = 10,
    /// Egress: packet not tracked (non-IP, TCP RST, unparsable).
    EgressIgnored = 11,
    /// Isolation: source or destination in no network.
    PassNotSubject = 12,
    /// Isolation: an except entry covers the pair.
    PassExcept = 13,
    /// Isolation: source and destination share a network.
    PassHairpin = 14,
    /// Isolation: an allow rule admits it (its replies are remembered).
    PassAllow = 15,
    /// Isolation: no rule, default accept.
    PassDefault = 16,
    /// Isolation: no rule, default deny, silent drop.
    DropIsolated = 17,
    /// Isolation: no rule, default deny, answered with RST / ICMP admin-prohibited.
    RejectIsolated = 18,
    /// Isolation: to be rejected, but the answer rate limit was reached: dropped silently.
    DropRejectLimited = 19,
    /// Egress: the first packet of a connection, recorded as new.
    EgressNew = 20,
    /// Egress: the packet confirming an answered connection, moved to the established table.
    EgressConfirmed = 21,
    /// Source in the blocklist (an entry whose deadline has not passed): dropped before
    /// anything else is asked.
    DropBlocked = 22,
}

impl Reason {
    pub const COUNT: u32 = 23;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassNonIp,
        Reason::PassNeighbour,
        Reason::PassWhitelistOff,
        Reason::PassWhitelist,
        Reason::PassEstablished,
        Reason::PassRelated,
        Reason::PassFragment,
        Reason::DropNotWhitelisted,
        Reason::DropMalformed,
        Reason::DropTooManyVlans,
        Reason::EgressTracked,
        Reason::EgressIgnored,
        Reason::PassNotSubject,
        Reason::PassExcept,
        Reason::PassHairpin,
        Reason::PassAllow,
        Reason::PassDefault,
        Reason::DropIsolated,
        Reason::RejectIsolated,
        Reason::DropRejectLimited,
        Reason::EgressNew,
        Reason::EgressConfirmed,
        Reason::DropBlocked,
    ];

    pub fn from_u32(v: u32) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }

    /// Short stable name used by `stats`, `trace` and the metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNonIp => "non-ip",
            Reason::PassNeighbour => "neighbour-discovery",
            Reason::PassWhitelistOff => "whitelist-off",
            Reason::PassWhitelist => "whitelisted",
            Reason::PassEstablished => "established",
            Reason::PassRelated => "related",
            Reason::PassFragment => "fragment",
            Reason::DropNotWhitelisted => "not-whitelisted",
            Reason::DropMalformed => "malformed",
            Reason::DropTooManyVlans => "too-many-vlans",
            Reason::EgressTracked => "egress-tracked",
            Reason::EgressIgnored => "egress-ignored",
            Reason::PassNotSubject => "not-isolated",
            Reason::PassExcept => "except",
            Reason::PassHairpin => "hairpin",
            Reason::PassAllow => "allow-rule",
            Reason::PassDefault => "default-accept",
            Reason::DropIsolated => "isolated-drop",
            Reason::RejectIsolated => "isolated-reject",
            Reason::DropRejectLimited => "isolated-reject-limited",
            Reason::EgressNew => "egress-new",
            Reason::EgressConfirmed => "egress-confirmed",
            Reason::DropBlocked => "blocked",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropNotWhitelisted
                | Reason::DropBlocked
                | Reason::DropMalformed
                | Reason::DropTooManyVlans
                | Reason::DropIsolated
                | Reason::RejectIsolated
                | Reason::DropRejectLimited
        )
    }

    pub const fn is_egress(self) -> bool {
        matches!(
            self,
            Reason::EgressTracked
                | Reason::EgressIgnored
                | Reason::EgressNew
                | Reason::EgressConfirmed
        )
    }
}

/// Indexes of `LOG_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStat {
    /// Events written to the ring buffer.
    Written = 0,
    /// Events not written because of the rate limit.
    Suppressed = 1,
    /// Events lost because the ring buffer was full (the reader is slow or absent).
    Lost = 2,
}

impl LogStat {
    pub const COUNT: u32 = 3;
}

/// Token bucket state of the log rate limit, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LogBucket {
    pub tokens: u64,
    pub last_ns: u64,
}

/// One logged packet, as `trace` prints it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable, PartialEq, Eq)]
pub struct LogEvent {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub reason: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// Length of the frame on the wire.
    pub len: u16,
    /// 802.1Q VLAN id, or 0.
    pub vlan: u16,
    pub proto: u8,
    pub family: u8,
    pub ttl: u8,
    /// TCP flags byte, or ICMP type.
    pub tcp_flags: u8,
    pub icmp_code: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for PolicyMeta {}
    unsafe impl aya::Pod for NetEntry {}
    unsafe impl aya::Pod for WlEntry {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for LogBucket {}
    unsafe impl aya::Pod for LogEvent {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    /// Two ranges that differ only outside their varying bits (2001:db8:ffff::/112 listed,
    /// 2001:db8:eeee::/112 flooding) must not share filter bits or peer slots: the XOR fold
    /// these hashes once used mapped one onto the other exactly.
    #[test]
    fn structured_ranges_do_not_collide_in_the_filters() {
        let addr = |third: u8, i: u32| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
            a[4..6].copy_from_slice(&[third, third]);
            a[12..].copy_from_slice(&i.to_be_bytes());
            a
        };
        let n = 1u32 << 16;
        let mut half = std::vec![0u64; super::limits::WL_BLOOM_WORDS as usize];
        for i in 0..n {
            let (w, m) = super::wl_bloom(super::AF_INET6, &addr(0xff, i));
            half[w as usize] |= m;
        }
        let fp = (0..n)
            .filter(|i| {
                let (w, m) = super::wl_bloom(super::AF_INET6, &addr(0xee, *i));
                half[w as usize] & m == m
            })
            .count();
        // 2^16 addresses in 2^18 words: about one in 10^5 by chance.
        assert!(fp < 10, "{fp} of {n} flood sources look listed");
        let slots: BTreeSet<u32> = (0..1000)
            .map(|i| super::peer_slot(super::AF_INET6, &addr(0xff, i)))
            .collect();
        let fp = (0..n)
            .filter(|i| slots.contains(&super::peer_slot(super::AF_INET6, &addr(0xee, *i))))
            .count();
        // 1000 of 2^17 slots set: under 1% by chance.
        assert!(
            fp < n as usize / 50,
            "{fp} of {n} flood sources look like peers"
        );
        // IPv4 hashes its one word only.
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[192, 0, 2, 1]);
        let b4 = super::wl_bloom(super::AF_INET, &a);
        a[4] = 0xff;
        assert_eq!(super::wl_bloom(super::AF_INET, &a), b4);
    }

    #[test]
    fn lowest_bit_is_trailing_zeros() {
        for i in 0..64 {
            assert_eq!(super::lowest_bit(1u64 << i), i);
            assert_eq!(super::lowest_bit(u64::MAX << i), i);
        }
    }

    #[test]
    fn port_index() {
        use super::ports::*;
        assert_eq!(index(6, Some(80)), TCP_BASE + 80);
        assert_eq!(index(17, Some(53)), UDP_BASE + 53);
        assert_eq!(index(1, Some(0)), ICMP);
        assert_eq!(index(58, Some(7)), ICMP);
        assert_eq!(index(47, Some(0)), OTHER);
        assert_eq!(index(6, None), NO_PORT);
        assert!(index(17, Some(u16::MAX)) < LEN);
    }

    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        // Pod derive already refuses padding; these pin the sizes the BPF side assumes.
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<LogEvent>(), 64);
    }

    #[test]
    fn reasons_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(Reason::COUNT), None);
    }
}
