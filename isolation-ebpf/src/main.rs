//! The isolation datapath. A packet's journey, top to bottom:
//!
//! XDP ingress: blocklist, from the source alone (a blocked source is dropped before the
//! rest of the frame is even parsed) → parse (what cannot be judged whole is dropped once
//! anything is enforced) → non-IP passes → the link's own neighbour discovery passes → whitelist (exact hash, then CIDR
//! trie) → reply of a flow that left us → ICMP error about one → later fragment of an
//! admitted datagram → otherwise drop and log. Then isolation: source and destination
//! networks → except → hairpin → established → allow rules → default. Every exit is
//! counted once, at the program's exit. XDP never records a flow: it sees packets before
//! the kernel decides whether they are real (reverse-path filter, routing).
//!
//! TC egress: parse → record the flow of what really leaves, so its replies pass → always
//! let the packet go.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod blocklist;
#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod isolation;
#[cfg(target_arch = "bpf")]
mod mutants;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod ratelimit;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod trace;
#[cfg(target_arch = "bpf")]
mod whitelist;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, bpf_fib_lookup, xdp_action,
        },
        btf_maps::{Array, PerCpuArray, ProgramArray},
        helpers::bpf_fib_lookup as fib_lookup,
        macros::{btf_map, classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::debug;
    use isolation_common::{Config, Reason, flags, iso_flags};

    use crate::{
        blocklist, conntrack, isolation,
        parse::{self, Parsed},
        reject, stats, trace, whitelist,
    };

    /// The policy switches, at index 0. Zeroed until a policy is applied: all pass.
    #[btf_map]
    static CONFIG: Array<Config, 1> = Array::new();

    #[inline(always)]
    fn ingress_ifindex(ctx: &XdpContext) -> u32 {
        unsafe { (*ctx.ctx).ingress_ifindex }
    }

    /// TCX: hand the packet to the next program (or the stack) untouched.
    const TCX_NEXT: i32 = -1;

    #[xdp]
    pub fn isolation_xdp(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let len = (end - start) as u64;
        let mut reason = ingress_verdict(&ctx, start, end, len);
        // REJECT: TC ingress answers; XDP only tags the packet (rate-limited).
        if reason == Reason::RejectIsolated && !reject::hand_over(&ctx) {
            reason = Reason::DropRejectLimited;
        }
        stats::count(reason, len);
        match reason {
            Reason::RejectIsolated => xdp_action::XDP_PASS,
            r if r.is_drop() => xdp_action::XDP_DROP,
            _ => xdp_action::XDP_PASS,
        }
    }

    /// What stage 0 found before the full parse: the source is not blocked (or the frame
    /// is not one `parse::source` reads)…
    const FIRST_PASS: u32 = 0;
    /// … it is blocked…
    const FIRST_DROP: u32 = 1;
    /// … it is blocked and the log's rate limit let one more event through.
    const FIRST_DROP_LOG: u32 = 2;

    /// Stage 0: is the frame's source blocked? Read and looked up before anything else is
    /// parsed. Out of line: every way through it returns to the caller in one state but
    /// its answer (inline, its paths multiplied the verifier's states of all that follows).
    #[inline(never)]
    fn blocked_first(start: usize, end: usize) -> u32 {
        // Its own read of the switches: what the caller learns from them stays its own.
        let cfg_flags = CONFIG.get(0).map(|c| c.flags).unwrap_or_default();
        if cfg_flags & flags::BLOCKLIST == 0 {
            return FIRST_PASS;
        }
        let Some((family, src)) = parse::source(start, end) else {
            return FIRST_PASS;
        };
        if !blocklist::source_blocked(family, &src, cfg_flags) {
            return FIRST_PASS;
        }
        if cfg_flags & flags::BL_LOG == 0 {
            return FIRST_DROP;
        }
        if trace::token(crate::clock::now_coarse()) {
            FIRST_DROP_LOG
        } else {
            FIRST_DROP
        }
    }

    #[inline(always)]
    fn ingress_verdict(ctx: &XdpContext, start: usize, end: usize, len: u64) -> Reason {
        let cfg = CONFIG.get(0).copied().unwrap_or_default();
        let enforce = cfg.flags & flags::WHITELIST_ENABLED != 0;
        // Stage 0, the blocklist, first of all: the source is read and looked up before the
        // rest of the frame is parsed (a flood from blocked sources pays the least work
        // there is); whatever does not parse as IP is judged below, as before.
        let first = if crate::mutants::BLOCKED_AFTER_REPLIES {
            FIRST_PASS
        } else {
            blocked_first(start, end)
        };
        if first == FIRST_DROP {
            return Reason::DropBlocked;
        }
        let pkt = match parse::parse(start, end) {
            Parsed::NonIp => return Reason::PassNonIp,
            Parsed::Ip(pkt) => pkt,
            // What cannot be judged whole is dropped as soon as anything is enforced: the
            // kernel may still find an IP packet in it (it strips priority tags).
            // A blocklist enforces once it holds anything.
            _ if cfg.flags & (flags::WHITELIST_ENABLED | flags::ISOLATION) == 0
                && (cfg.flags & flags::BLOCKLIST == 0
                    || cfg.flags & flags::BL_FOLLOW_MAPS == 0) =>
            {
                return Reason::PassWhitelistOff;
            }
            // Rare paths only: debug logs (aya-log, `trace --debug`) never touch the hot path.
            Parsed::TooManyVlans => {
                debug!(
                    ctx,
                    "dropped a frame of {} bytes with more than two VLAN tags", len
                );
                return Reason::DropTooManyVlans;
            }
            Parsed::Malformed => {
                debug!(ctx, "dropped a malformed frame of {} bytes", len);
                return Reason::DropMalformed;
            }
        };
        // Stage 0's event, rare (rate-limited): written from the parsed packet.
        if first == FIRST_DROP_LOG {
            trace::write(&pkt, Reason::DropBlocked as u32, ingress_ifindex(ctx), len);
            return Reason::DropBlocked;
        }
        if parse::is_neighbour_discovery(&pkt) && for_this_link(ctx, &pkt) {
            return Reason::PassNeighbour;
        }
        // Stage 1, the host whitelist: who may reach this host at all. The source's hash
        // serves both filters (the whitelist's and the remote hosts'), here and in stage 2.
        let src_hash = isolation_common::addr_hash(pkt.family, &pkt.src);
        let admitted = if !enforce {
            Reason::PassWhitelistOff
        } else if whitelist::whitelisted(&pkt, cfg.flags, src_hash) {
            Reason::PassWhitelist
        } else if crate::mutants::BLOCKED_AFTER_REPLIES
            && cfg.flags & flags::BLOCKLIST != 0
            && blocklist::source_blocked(pkt.family, &pkt.src, cfg.flags)
        {
            return Reason::DropBlocked;
        } else if conntrack::is_reply(&pkt, src_hash, cfg.peers) {
            conntrack::remember_fragment(&pkt);
            Reason::PassEstablished
        } else if conntrack::is_related(start, end, &pkt) {
            Reason::PassRelated
        } else if conntrack::is_admitted_fragment(&pkt) {
            Reason::PassFragment
        } else {
            if cfg.flags & flags::LOG != 0 {
                trace::log(
                    &pkt,
                    Reason::DropNotWhitelisted as u32,
                    ingress_ifindex(ctx),
                    len,
                );
            }
            return Reason::DropNotWhitelisted;
        };
        // Stage 2, isolation between virtual networks.
        let Some(meta) = isolation::meta(cfg.slot) else {
            return admitted;
        };
        if meta.flags & iso_flags::ENABLED == 0 {
            return admitted;
        }
        let live = isolation::Live {
            slot: cfg.slot,
            flags: meta.flags,
            peers: cfg.peers,
        };
        let verdict = if isolation::is_vxlan(meta, &pkt) {
            // VXLAN: the outer header passed the whitelist; the inner packet is judged by
            // its own program (verified on its own: inline, it would not fit the verifier's
            // budget), which counts and answers for the packet. Only a failed tail call
            // comes back here: drop rather than let the inner packet skip isolation.
            vxlan_hand_off(ctx, pkt.l4_off as u32, admitted);
            Some(Reason::DropIsolated)
        } else {
            let conntracked = matches!(
                admitted,
                Reason::PassEstablished | Reason::PassRelated | Reason::PassFragment
            )
            .then_some(admitted);
            let v = isolation::judge(live, start, end, &pkt, len, true, conntracked, src_hash);
            if let Some(r) = v
                && r.is_drop()
            {
                trace::log(&pkt, r as u32, ingress_ifindex(ctx), len);
            }
            v
        };
        verdict.unwrap_or(admitted)
    }

    /// Will the kernel keep this packet on the link (deliver it here, or not route it at
    /// all)? Asked of the FIB, for neighbour discovery only: a packet typed as ND that the
    /// host would route is judged like any other, so it cannot cross isolation.
    #[inline(never)]
    fn for_this_link(ctx: &XdpContext, pkt: &parse::Packet) -> bool {
        // SAFETY: bpf_fib_lookup is plain old data; all-zero is its empty request.
        let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
        p.family = 10; // the kernel's AF_INET6
        p.l4_protocol = parse::IPPROTO_ICMPV6;
        p.ifindex = ingress_ifindex(ctx);
        // Words in memory order: both stay in network order.
        p.__bindgen_anon_3.ipv6_src = pkt.src.words();
        p.__bindgen_anon_4.ipv6_dst = pkt.dst.words();
        // SAFETY: the helper reads and writes only `p`, whose size it is given.
        let r = unsafe {
            fib_lookup(
                ctx.ctx as *mut _,
                &mut p,
                core::mem::size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        };
        r == BPF_FIB_LKUP_RET_NOT_FWDED as i64 || r == BPF_FIB_LKUP_RET_FWD_DISABLED as i64
    }

    /// What the main program hands to the VXLAN program through the tail call.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct VxlanHandOff {
        /// Offset of the outer UDP header.
        udp_off: u32,
        /// The whitelist's verdict, which stands if the inner packet is not subject.
        admitted: u32,
    }

    /// Per-CPU: a tail call runs on the CPU that made it.
    #[btf_map]
    static VXLAN_HANDOFF: PerCpuArray<VxlanHandOff, 1> = PerCpuArray::new();

    /// Index 0: `isolation_xdp_vxlan`, set by the loader.
    #[btf_map]
    static JUMP: ProgramArray<1> = ProgramArray::new();

    #[inline(always)]
    fn vxlan_hand_off(ctx: &XdpContext, udp_off: u32, admitted: Reason) {
        if let Some(h) = VXLAN_HANDOFF.get_ptr_mut(0) {
            unsafe {
                *h = VxlanHandOff {
                    udp_off,
                    admitted: admitted as u32,
                }
            };
            unsafe { JUMP.tail_call(ctx, 0) };
        }
    }

    /// The packet inside a VXLAN datagram, reached by tail call from `isolation_xdp`.
    #[xdp]
    pub fn isolation_xdp_vxlan(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let len = (end - start) as u64;
        let reason = vxlan_verdict(&ctx, start, end, len);
        stats::count(reason, len);
        if reason.is_drop() {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        }
    }

    #[inline(always)]
    fn vxlan_verdict(ctx: &XdpContext, start: usize, end: usize, len: u64) -> Reason {
        let Some(h) = VXLAN_HANDOFF.get(0).copied() else {
            return Reason::DropIsolated;
        };
        let admitted = Reason::from_u32(h.admitted).unwrap_or(Reason::DropIsolated);
        let cfg = CONFIG.get(0).copied().unwrap_or_default();
        let Some(meta) = isolation::meta(cfg.slot) else {
            return admitted;
        };
        let live = isolation::Live {
            slot: cfg.slot,
            flags: meta.flags,
            peers: cfg.peers,
        };
        // UDP header (8) and VXLAN header (8), then the inner Ethernet frame.
        let off = h.udp_off as usize;
        if off > 512 {
            return Reason::DropMalformed;
        }
        let istart = start + off + 16;
        match parse::parse_inner(istart, end) {
            Parsed::NonIp => admitted,
            Parsed::Ip(ipkt) => {
                // Inside a tunnel a deny is a drop: the answer would have to be tunnelled too.
                // The outer header's connection says nothing about the inner packet's.
                let h = isolation_common::addr_hash(ipkt.family, &ipkt.src);
                match isolation::judge(live, istart, end, &ipkt, len, false, None, h) {
                    None => admitted,
                    Some(r) => {
                        if r.is_drop() {
                            trace::log(&ipkt, r as u32, ingress_ifindex(ctx), len);
                        }
                        r
                    }
                }
            }
            _ => Reason::DropMalformed,
        }
    }

    /// Egress: remember the flow inside an outgoing VXLAN datagram (not inlined, as above).
    #[inline(never)]
    fn track_vxlan(udp: usize, end: usize, peers: u32) {
        if let Parsed::Ip(inner) = parse::parse_inner(udp + 16, end) {
            let _ = conntrack::track(&inner, peers);
        }
    }

    #[classifier]
    pub fn isolation_tc_egress(ctx: TcContext) -> i32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        let reason = match parse::parse(start, end) {
            Parsed::Ip(pkt) => {
                let cfg = CONFIG.get(0).copied().unwrap_or_default();
                let reason = conntrack::track(&pkt, cfg.peers);
                // VXLAN: also remember the inner flow, so overlay replies pass isolation.
                if let Some(meta) = isolation::meta(cfg.slot)
                    && isolation::is_vxlan(meta, &pkt)
                {
                    track_vxlan(start + pkt.l4_off, end, cfg.peers);
                }
                reason
            }
            _ => Reason::EgressIgnored,
        };
        stats::count(reason, ctx.len() as u64);
        TCX_NEXT
    }
}

#[cfg(target_arch = "bpf")]
mod answer {
    use aya_ebpf::{macros::classifier, programs::TcContext};

    use crate::reject;

    /// TC ingress: turns packets XDP tagged for REJECT into their answer; all others go on.
    #[classifier]
    pub fn isolation_tc_ingress(ctx: TcContext) -> i32 {
        reject::answer(&ctx).unwrap_or(-1)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Host builds (clippy, `cargo build --workspace`) get an empty binary; the real object is
/// built for `bpfel-unknown-none` by `cargo xtask build-ebpf`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
