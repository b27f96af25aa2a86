//! REJECT: a denied packet is answered at once (TCP RST; otherwise ICMP / ICMPv6
//! administratively prohibited quoting the offending header), so a denied client fails fast
//! instead of timing out.
//!
//! XDP cannot answer itself: behind a plain veth whose peer has no XDP program, frames sent
//! with XDP_TX are dropped by the kernel. So XDP tags the packet and passes it; the TC
//! ingress program of the same interface (attached first in the chain) rewrites it in place
//! into the answer and redirects it out of the interface it came in by. A tagged packet
//! that cannot be answered is dropped, never passed.
//!
//! The tag is the frame's ether type, replaced by one of IEEE 802's two "local
//! experimental" types (`TAG_V4`, `TAG_V6`), not XDP metadata: some kernels refuse
//! `bpf_xdp_adjust_meta` to XDP programs at load (this project's CI machine's among them),
//! and drivers without metadata support fail it at run time. No protocol handler takes
//! those types, so a tagged frame that TC does not answer (its program detached, an answer
//! that cannot be built) is dropped by the stack: it never reaches IP.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_SHOT},
    btf_maps::PerCpuArray,
    helpers::bpf_redirect,
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use isolation_common::{AF_INET, LogBucket};

use crate::{
    parse::{Frag, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, L4, Packet},
    ratelimit,
};

/// The ether types XDP writes over a denied IPv4 (0x0800) or IPv6 (0x86DD) frame's own
/// to ask TC ingress for an answer: IEEE 802's "local experimental" 1 and 2.
const TAG_V4: u16 = 0x88B5;
const TAG_V6: u16 = 0x88B6;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;

/// Answers per second per CPU, and the burst: a flood of denied packets must not become
/// a flood of answers.
const RATE_PER_SEC: u64 = 200;
const BURST: u64 = 200;

/// Scratch space for the quoted bytes (the BPF stack is only 512 bytes).
#[btf_map]
static REJECT_SCRATCH: PerCpuArray<[u8; BUF_V6], 1> = PerCpuArray::new();

#[inline(always)]
fn scratch() -> Result<&'static mut [u8; BUF_V6], i64> {
    match REJECT_SCRATCH.get_ptr_mut(0) {
        Some(p) => Ok(unsafe { &mut *p }),
        None => Err(-1),
    }
}

/// Token bucket of the answers, per CPU.
#[btf_map]
static REJECT_BUCKET: PerCpuArray<LogBucket, 1> = PerCpuArray::new();

/// May a denied packet be answered? Never an answer to an answer, as iptables' REJECT and
/// the kernel's icmp_send refuse: not a TCP RST, not an ICMP error, not a later fragment
/// (its first bytes are payload, not a header), nothing from or to a multicast or broadcast
/// address (an answer could loop between two filtered hosts or be aimed at a victim). A
/// packet whose L4 header could not be read is not answered either: it might be one of those.
#[inline(always)]
pub fn answerable(pkt: &Packet) -> bool {
    if pkt.frag == Frag::Later
        || !unicast(pkt.family, &pkt.src.0)
        || !unicast(pkt.family, &pkt.dst.0)
    {
        return false;
    }
    match pkt.proto {
        IPPROTO_TCP => pkt.l4 == L4::Ok && pkt.tcp_flags & 0x04 == 0,
        // ICMP errors: unreachable, source quench, redirect, time exceeded, parameter problem.
        IPPROTO_ICMP => pkt.l4 == L4::Ok && !matches!(pkt.tcp_flags, 3 | 4 | 5 | 11 | 12),
        // ICMPv6 errors are the types below 128.
        IPPROTO_ICMPV6 => pkt.l4 == L4::Ok && pkt.tcp_flags >= 128,
        _ => true,
    }
}

/// Neither unspecified, multicast nor (IPv4) limited broadcast.
#[inline(always)]
fn unicast(family: u8, a: &[u8; 16]) -> bool {
    if family == AF_INET {
        let v = u32::from_be_bytes([a[0], a[1], a[2], a[3]]);
        v != 0 && v != u32::MAX && a[0] & 0xf0 != 0xe0
    } else {
        a[0] != 0xff && a.iter().any(|b| *b != 0)
    }
}

/// XDP side: tag the packet for TC ingress. False when rate-limited or the frame is not
/// plain Ethernet carrying IP (a VLAN tag, say: TC answers only those): then the packet is
/// dropped without an answer.
#[inline(always)]
pub fn hand_over(ctx: &XdpContext) -> bool {
    if !ratelimit::take(
        REJECT_BUCKET.get_ptr_mut(0),
        crate::clock::now_coarse(),
        RATE_PER_SEC,
        BURST,
    ) {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return false;
    }
    let at = (data + 12) as *mut [u8; 2];
    // SAFETY: bytes 12..14 of the frame, within data_end as checked above.
    let tag = match u16::from_be_bytes(unsafe { *at }) {
        ETHERTYPE_IPV4 => TAG_V4,
        ETHERTYPE_IPV6 => TAG_V6,
        _ => return false,
    };
    // SAFETY: as above; XDP may write the frame it holds.
    unsafe { *at = tag.to_be_bytes() };
    true
}

#[inline(always)]
fn skb_ptr(ctx: &TcContext) -> *mut __sk_buff {
    ctx.as_ptr() as *mut __sk_buff
}

/// TC side: is this packet tagged for an answer? Its own ether type if so.
#[inline(always)]
fn tagged(ctx: &TcContext) -> Option<u16> {
    let t: [u8; 2] = ctx.load(12).ok()?;
    match u16::from_be_bytes(t) {
        TAG_V4 => Some(ETHERTYPE_IPV4),
        TAG_V6 => Some(ETHERTYPE_IPV6),
        _ => None,
    }
}

/// One's-complement sum of 16-bit big-endian words (an odd last byte is padded).
#[inline(always)]
fn sum(mut acc: u32, b: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    if i < b.len() {
        acc += (b[i] as u32) << 8;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

const ETH_LEN: usize = 14;
/// Quote at most this much (v4: header with options + 8 bytes; v6: what fits our buffer).
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 128;
/// The scratch buffer holds the longest quote.
const BUF_V6: usize = 40 + 128;

/// TC ingress: answer a tagged packet. None: not ours, carry on.
#[inline(always)]
pub fn answer(ctx: &TcContext) -> Option<i32> {
    let ether_type = tagged(ctx)?;
    Some(build(ctx, ether_type).unwrap_or(TC_ACT_SHOT))
}

/// Rewrites the tagged frame (whose own ether type was `ether_type`) into the answer, with
/// that type back and the addresses swapped, and sends it out where it came in.
#[inline(always)]
fn build(ctx: &TcContext, ether_type: u16) -> Result<i32, i64> {
    let mut eth: [u8; ETH_LEN] = ctx.load(0)?;
    // The answer goes back to the previous hop.
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&eth[6..12]);
    swapped[6..].copy_from_slice(&eth[..6]);
    eth[..12].copy_from_slice(&swapped);
    eth[12..].copy_from_slice(&ether_type.to_be_bytes());
    let len = match ether_type {
        ETHERTYPE_IPV4 => build_v4(ctx)?,
        _ => build_v6(ctx)?,
    };
    let _ = len;
    ctx.store(0, &eth, 0)?;
    let ifindex = unsafe { (*skb_ptr(ctx)).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

const RECOMPUTE_CSUM: u64 = 1;

#[inline(always)]
fn build_v4(ctx: &TcContext) -> Result<usize, i64> {
    let ip: [u8; 20] = ctx.load(ETH_LEN)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if !(20..=60).contains(&ihl) {
        return Err(-1);
    }
    let (src, dst) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[9] == 6
        && let Ok(tcp) = ctx.load::<[u8; 20]>(ETH_LEN + ihl)
    {
        let payload = tot_len.saturating_sub(ihl + ((tcp[12] >> 4) as usize) * 4);
        let rst = tcp_rst(&tcp, payload as u32);
        let mut hdr = ipv4_header(dst, src, 6, 40);
        let mut acc = sum(0, &dst);
        acc = sum(acc, &src);
        acc += 6 + 20;
        let mut out = [0u8; 40];
        let c = fold(sum(acc, &rst)).to_be_bytes();
        out[20..].copy_from_slice(&rst);
        out[36] = c[0];
        out[37] = c[1];
        let ic = fold(sum(0, &hdr)).to_be_bytes();
        hdr[10] = ic[0];
        hdr[11] = ic[1];
        out[..20].copy_from_slice(&hdr);
        ctx.store(ETH_LEN, &out, RECOMPUTE_CSUM)?;
        change_tail(ctx, ETH_LEN + 40)?;
        return Ok(ETH_LEN + 40);
    }
    // ICMP type 3 code 13, quoting the IP header and 8 bytes of what follows (RFC 792).
    let avail = (ctx.len() as usize).saturating_sub(ETH_LEN);
    // Whole 32-bit words: ihl + 8 always is one.
    let mut qlen = core::cmp::min(ihl + 8, avail) & !3;
    if qlen > QUOTE_V4 {
        qlen = QUOTE_V4;
    }
    if qlen < 20 {
        return Err(-1);
    }
    let quote = scratch()?;
    copy_in(ctx, ETH_LEN, quote, qlen)?;
    let total = 20 + 8 + qlen;
    change_tail(ctx, ETH_LEN + total)?;
    let mut hdr = ipv4_header(dst, src, 1, total as u16);
    let ic = fold(sum(0, &hdr)).to_be_bytes();
    hdr[10] = ic[0];
    hdr[11] = ic[1];
    let mut icmp = [3u8, 13, 0, 0, 0, 0, 0, 0];
    let c = fold(sum(sum(0, &icmp), &quote[..qlen])).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    ctx.store(ETH_LEN, &hdr, RECOMPUTE_CSUM)?;
    ctx.store(ETH_LEN + 20, &icmp, RECOMPUTE_CSUM)?;
    copy_out(ctx, ETH_LEN + 28, quote, qlen)?;
    Ok(ETH_LEN + total)
}

#[inline(always)]
fn build_v6(ctx: &TcContext) -> Result<usize, i64> {
    let ip: [u8; 40] = ctx.load(ETH_LEN)?;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if ip[6] == 6
        && let Ok(tcp) = ctx.load::<[u8; 20]>(ETH_LEN + 40)
    {
        let payload = payload_len.saturating_sub(((tcp[12] >> 4) as usize) * 4);
        let rst = tcp_rst(&tcp, payload as u32);
        let hdr = ipv6_header(dst, src, 6, 20);
        let mut acc = sum(sum(0, &dst), &src);
        acc += 20 + 6;
        let c = fold(sum(acc, &rst)).to_be_bytes();
        let mut out = [0u8; 60];
        out[..40].copy_from_slice(&hdr);
        out[40..].copy_from_slice(&rst);
        out[56] = c[0];
        out[57] = c[1];
        ctx.store(ETH_LEN, &out, RECOMPUTE_CSUM)?;
        change_tail(ctx, ETH_LEN + 60)?;
        return Ok(ETH_LEN + 60);
    }
    // ICMPv6 type 1 code 1, quoting as much of the packet as fits our buffer (RFC 4443).
    let avail = (ctx.len() as usize).saturating_sub(ETH_LEN);
    let mut qlen = core::cmp::min(avail, QUOTE_V6) & !3;
    if qlen < 40 {
        return Err(-1);
    }
    if qlen > QUOTE_V6 {
        qlen = QUOTE_V6;
    }
    let quote = scratch()?;
    copy_in(ctx, ETH_LEN, quote, qlen)?;
    let plen = 8 + qlen;
    change_tail(ctx, ETH_LEN + 40 + plen)?;
    let hdr = ipv6_header(dst, src, 58, plen as u16);
    let mut icmp = [1u8, 1, 0, 0, 0, 0, 0, 0];
    let mut acc = sum(sum(0, &dst), &src);
    acc += plen as u32 + 58;
    let c = fold(sum(sum(acc, &icmp), &quote[..qlen])).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    ctx.store(ETH_LEN, &hdr, RECOMPUTE_CSUM)?;
    ctx.store(ETH_LEN + 40, &icmp, RECOMPUTE_CSUM)?;
    copy_out(ctx, ETH_LEN + 48, quote, qlen)?;
    Ok(ETH_LEN + 40 + plen)
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize) -> Result<(), i64> {
    ctx.change_tail(len as u32, 0)
}

/// Copies `len` bytes (a multiple of 4) of the packet into `buf`, a word at a time: fixed
/// sizes and a constant loop bound are what the verifier can follow.
#[inline(always)]
fn copy_in(ctx: &TcContext, off: usize, buf: &mut [u8; BUF_V6], len: usize) -> Result<(), i64> {
    let mut i = 0;
    while i < BUF_V6 / 4 {
        if i * 4 >= len {
            break;
        }
        let w: [u8; 4] = ctx.load(off + i * 4)?;
        buf[i * 4..i * 4 + 4].copy_from_slice(&w);
        i += 1;
    }
    Ok(())
}

/// Writes `len` bytes (a multiple of 4) of `buf` into the packet at `off`.
#[inline(always)]
fn copy_out(ctx: &TcContext, off: usize, buf: &[u8; BUF_V6], len: usize) -> Result<(), i64> {
    let mut i = 0;
    while i < BUF_V6 / 4 {
        if i * 4 >= len {
            break;
        }
        let w = [buf[i * 4], buf[i * 4 + 1], buf[i * 4 + 2], buf[i * 4 + 3]];
        ctx.store(off + i * 4, &w, RECOMPUTE_CSUM)?;
        i += 1;
    }
    Ok(())
}

/// RST for an incoming TCP segment (RFC 793 reset generation): if it carried an ACK, the
/// RST takes its sequence number from it; otherwise it acknowledges what it covered.
#[inline(always)]
fn tcp_rst(tcp: &[u8; 20], payload: u32) -> [u8; 20] {
    let flags_in = tcp[13];
    let seq_in = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack_in = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&tcp[2..4]);
    t[2..4].copy_from_slice(&tcp[0..2]);
    if flags_in & 0x10 != 0 {
        t[4..8].copy_from_slice(&ack_in.to_be_bytes());
        t[13] = 0x04;
    } else {
        let len = payload + (flags_in & 0x02 != 0) as u32 + (flags_in & 0x01 != 0) as u32;
        t[8..12].copy_from_slice(&seq_in.wrapping_add(len).to_be_bytes());
        t[13] = 0x14;
    }
    t[12] = 5 << 4;
    t
}

#[inline(always)]
fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, total: u16) -> [u8; 20] {
    let t = total.to_be_bytes();
    [
        0x45, 0, t[0], t[1], 0, 0, 0x40, 0, 64, proto, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ]
}

#[inline(always)]
fn ipv6_header(src: [u8; 16], dst: [u8; 16], next: u8, payload: u16) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h
}
