//! Header parsing shared by the XDP and TC programs.
//!
//! Every read goes through `ptr_at`, the one bounds check. Parsing answers what the
//! packet is (`Parsed`), never a verdict: a header that cannot be read whole is reported
//! as such, so no decision is made from bytes past the end of the frame.

use core::mem::size_of;

use isolation_common::{AF_INET, AF_INET6, Addr, limits};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Offsets past this are not followed: keeps every offset provably bounded for the verifier.
const MAX_L4_OFFSET: usize = 512;

/// The one bounds check: a pointer to a `T` at `off`, only if the whole `T` is in the frame.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Result<*const T, ()> {
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// Where the datagram sits in a fragmented IP packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// Offset 0 with more fragments to come: carries the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

/// What the L4 parse found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// Ports (or ICMP type/id) were read.
    Ok,
    /// No L4 header in this packet (later fragment, unknown protocol, too many
    /// extension headers, or truncated): only L3 facts may be used.
    Absent,
}

pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags byte, or ICMP type.
    pub tcp_flags: u8,
    pub icmp_code: u8,
    pub l4: L4,
    pub frag: Frag,
    pub vlan: u16,
    /// Network byte order. ICMP echo: request (id, 0), reply (0, id).
    pub sport: u16,
    pub dport: u16,
    pub frag_id: u32,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    pub src: Addr,
    pub dst: Addr,
}

pub enum Parsed {
    NonIp,
    TooManyVlans,
    Malformed,
    Ip(Packet),
}

/// An IPv6 address read from the frame as two 64-bit words.
///
/// # Safety
/// `p` points at 16 readable bytes of the frame (inside a header `ptr_at` checked). They
/// may sit at any offset: the verifier allows unaligned packet loads where the CPU does
/// them (x86-64, arm64), and the JIT emits plain loads there.
#[inline(always)]
unsafe fn addr_v6(p: *const u8) -> Addr {
    // SAFETY: as the caller promised; Addr is plain bytes.
    unsafe { core::ptr::read(p as *const Addr) }
}

/// An IPv4 address read from the frame as one 32-bit word, in an `Addr` (rest zero).
///
/// # Safety
/// As `addr_v6`, for 4 bytes.
#[inline(always)]
unsafe fn addr_v4(p: *const u8) -> Addr {
    let mut a = Addr([0; 16]);
    // SAFETY: 4 readable bytes at `p` (caller), written into the first word of `a`.
    unsafe {
        core::ptr::write(
            a.0.as_mut_ptr() as *mut [u32; 4],
            [core::ptr::read(p as *const u32), 0, 0, 0],
        )
    };
    a
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// The family and source of a frame `parse` reads as IP, read before anything else is
/// parsed (the blocklist's fast path): the same walk over VLAN tags, the same checks of the
/// IP header. Where this answers, `parse` gives `Parsed::Ip` with this family and source;
/// `None` for anything else (not IP, malformed, too many tags), which `parse` then judges.
#[inline(always)]
pub fn source(start: usize, end: usize) -> Option<(u8, Addr)> {
    let (ether_type, off, _) = link::<true>(start, end).ok()?;
    match ether_type {
        ETH_P_IP => {
            let ip = unsafe { &*ptr_at::<Ipv4Hdr>(start, end, off).ok()? };
            let ihl = (ip.vihl & 0x0f) as usize * 4;
            if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || start + off + ihl > end {
                return None;
            }
            // SAFETY: inside the IPv4 header `ptr_at` checked.
            Some((AF_INET, unsafe { addr_v4(ip.src_addr.as_ptr()) }))
        }
        ETH_P_IPV6 => {
            let ip = unsafe { &*ptr_at::<Ipv6Hdr>(start, end, off).ok()? };
            if ip.vcf[0] >> 4 != 6 {
                return None;
            }
            // SAFETY: inside the IPv6 header `ptr_at` checked.
            Some((AF_INET6, unsafe { addr_v6(ip.src_addr.as_ptr()) }))
        }
        _ => None,
    }
}

/// Ethernet and up to two VLAN tags (`FULL`; none otherwise): the EtherType after them,
/// the offset of what follows, the first tag's VLAN id (0 untagged). Err: a tag cut off.
#[inline(always)]
fn link<const FULL: bool>(start: usize, end: usize) -> Result<(u16, usize, u16), ()> {
    let eth = ptr_at::<EthHdr>(start, end, 0)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = EthHdr::LEN;
    let mut vlan = 0u16;
    let mut tags = 0;
    while FULL && tags < 2 && (ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD) {
        let tag = ptr_at::<VlanHdr>(start, end, off)?;
        if tags == 0 {
            vlan = be16(unsafe { (*tag).tci }) & 0x0fff;
        }
        ether_type = u16::from_be(unsafe { (*tag).ether_type });
        off += VlanHdr::LEN;
        tags += 1;
    }
    Ok((ether_type, off, vlan))
}

/// Ethernet, up to two VLAN tags (802.1Q / 802.1ad), then IPv4 or IPv6.
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Parsed {
    parse_frame::<true>(start, end)
}

/// The frame inside a tunnel: plain Ethernet, IPv4 or IPv6 without walking extension
/// headers (their L4 stays unknown). Fewer branches keep the verifier's work bounded where
/// the outer frame was already parsed.
#[inline(always)]
pub fn parse_inner(start: usize, end: usize) -> Parsed {
    parse_frame::<false>(start, end)
}

#[inline(always)]
fn parse_frame<const FULL: bool>(start: usize, end: usize) -> Parsed {
    let Ok((ether_type, off, vlan)) = link::<FULL>(start, end) else {
        return Parsed::Malformed;
    };
    match ether_type {
        ETH_P_IP => parse_ipv4(start, end, off, vlan),
        ETH_P_IPV6 => parse_ipv6::<FULL>(start, end, off, vlan),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::TooManyVlans,
        _ => Parsed::NonIp,
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, off: usize, vlan: u16) -> Parsed {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(start, end, off) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Parsed::Malformed;
    }
    // Options are skipped whole: they must be inside the frame too.
    if start + off + ihl > end {
        return Parsed::Malformed;
    }
    let frags = be16(ip.frags);
    let more = frags & 0x2000 != 0;
    let frag_off = frags & 0x1fff;
    let frag = if frag_off != 0 {
        Frag::Later
    } else if more {
        Frag::First
    } else {
        Frag::None
    };
    let mut pkt = Packet {
        family: AF_INET,
        proto: ip.proto,
        ttl: ip.ttl,
        tcp_flags: 0,
        icmp_code: 0,
        l4: L4::Absent,
        frag,
        vlan,
        sport: 0,
        dport: 0,
        frag_id: be16(ip.id) as u32,
        l4_off: off + ihl,
        // SAFETY: both addresses are inside the IPv4 header `ptr_at` checked.
        src: unsafe { addr_v4(ip.src_addr.as_ptr()) },
        dst: unsafe { addr_v4(ip.dst_addr.as_ptr()) },
    };
    if frag != Frag::Later {
        parse_l4(start, end, &mut pkt);
    }
    Parsed::Ip(pkt)
}

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

#[repr(C)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    hdr_len: u8,
    /// Fragment header: offset and flags; others: start of their data.
    frag_off: [u8; 2],
    /// Fragment header: identification.
    id: [u8; 4],
}

#[inline(always)]
fn parse_ipv6<const FULL: bool>(start: usize, end: usize, off: usize, vlan: u16) -> Parsed {
    let Ok(ip) = ptr_at::<Ipv6Hdr>(start, end, off) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let mut pkt = Packet {
        family: AF_INET6,
        proto: ip.next_hdr,
        ttl: ip.hop_limit,
        tcp_flags: 0,
        icmp_code: 0,
        l4: L4::Absent,
        frag: Frag::None,
        vlan,
        sport: 0,
        dport: 0,
        frag_id: 0,
        l4_off: off + Ipv6Hdr::LEN,
        // SAFETY: both addresses are inside the IPv6 header `ptr_at` checked.
        src: unsafe { addr_v6(ip.src_addr.as_ptr()) },
        dst: unsafe { addr_v6(ip.dst_addr.as_ptr()) },
    };
    // Walk extension headers to a fixed bound; past it the L4 header stays unknown.
    let mut next = ip.next_hdr;
    let mut hoff = off + Ipv6Hdr::LEN;
    let mut found = false;
    let walk = if FULL { limits::IPV6_EXT_HEADERS } else { 1 };
    for _ in 0..walk {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {}
            _ => {
                found = true;
                break;
            }
        }
        if hoff > MAX_L4_OFFSET {
            break;
        }
        let Ok(ext) = ptr_at::<Ipv6ExtHdr>(start, end, hoff) else {
            // An extension header cut off: the source is still known, the L4 is not.
            pkt.proto = next;
            return Parsed::Ip(pkt);
        };
        let ext = unsafe { &*ext };
        let len = match next {
            IPV6_FRAGMENT => {
                let fo = be16(ext.frag_off);
                pkt.frag_id = u32::from_be_bytes(ext.id);
                pkt.frag = if fo & 0xfff8 != 0 {
                    Frag::Later
                } else if fo & 1 != 0 {
                    Frag::First
                } else {
                    Frag::None
                };
                8
            }
            // AH counts its length in 4-byte units, minus 2.
            IPV6_AH => (ext.hdr_len as usize + 2) * 4,
            _ => (ext.hdr_len as usize + 1) * 8,
        };
        next = ext.next_hdr;
        hoff += len;
    }
    pkt.proto = next;
    pkt.l4_off = hoff;
    if found && pkt.frag != Frag::Later && hoff <= MAX_L4_OFFSET {
        parse_l4(start, end, &mut pkt);
    }
    Parsed::Ip(pkt)
}

#[repr(C)]
struct IcmpHdr {
    type_: u8,
    code: u8,
    check: [u8; 2],
    id: [u8; 2],
    seq: [u8; 2],
}

pub const ICMP_ECHOREPLY: u8 = 0;
pub const ICMP_ECHO: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Fills ports (TCP/UDP) or type/id (ICMP, ICMPv6). Leaves `l4` Absent if truncated.
#[inline(always)]
fn parse_l4(start: usize, end: usize, pkt: &mut Packet) {
    let off = pkt.l4_off;
    if off > MAX_L4_OFFSET {
        return;
    }
    match pkt.proto {
        IPPROTO_TCP => {
            if let Ok(tcp) = ptr_at::<TcpHdr>(start, end, off) {
                let tcp = unsafe { &*tcp };
                pkt.sport = u16::from_ne_bytes(tcp.source);
                pkt.dport = u16::from_ne_bytes(tcp.dest);
                // Byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN.
                pkt.tcp_flags = unsafe { *((tcp as *const TcpHdr as *const u8).add(13)) };
                pkt.l4 = L4::Ok;
            }
        }
        IPPROTO_UDP => {
            if let Ok(udp) = ptr_at::<UdpHdr>(start, end, off) {
                let udp = unsafe { &*udp };
                pkt.sport = u16::from_ne_bytes(udp.src);
                pkt.dport = u16::from_ne_bytes(udp.dst);
                pkt.l4 = L4::Ok;
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if let Ok(icmp) = ptr_at::<IcmpHdr>(start, end, off) {
                let icmp = unsafe { &*icmp };
                pkt.tcp_flags = icmp.type_;
                pkt.icmp_code = icmp.code;
                let id = u16::from_ne_bytes(icmp.id);
                match icmp.type_ {
                    ICMP_ECHO | ICMPV6_ECHO_REQUEST => pkt.sport = id,
                    ICMP_ECHOREPLY | ICMPV6_ECHO_REPLY => pkt.dport = id,
                    _ => {}
                }
                pkt.l4 = L4::Ok;
            }
        }
        _ => {}
    }
}

/// Is this ICMP/ICMPv6 type an error that quotes the packet that caused it?
#[inline(always)]
pub fn is_icmp_error(family: u8, type_: u8) -> bool {
    if family == AF_INET {
        // Destination unreachable, source quench, time exceeded, parameter problem.
        matches!(type_, 3 | 4 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(type_, 1..=4)
    }
}

/// ICMPv6 neighbour discovery (RS, RA, NS, NA, redirect) and MLD, with the hop limit the
/// standards require of them: 255 for ND (RFC 4861), 1 for MLD (RFC 2710, 3810). A router
/// decrements it, so a packet that keeps it was sent on the link it arrived on. Whether it
/// is for this host, rather than to be routed on, is the caller's question.
#[inline(always)]
pub fn is_neighbour_discovery(pkt: &Packet) -> bool {
    pkt.family == AF_INET6
        && pkt.proto == IPPROTO_ICMPV6
        && pkt.l4 == L4::Ok
        && match pkt.tcp_flags {
            133..=137 => pkt.ttl == 255,
            130..=132 | 143 => pkt.ttl == 1,
            _ => false,
        }
}

/// The packet an ICMP error quotes, read as the flow key it had when it left us: the
/// quoted header is the original direction already. Returns false if it cannot be read.
#[inline(always)]
pub fn parse_quoted(start: usize, end: usize, pkt: &Packet, out: &mut QuotedFlow) -> bool {
    // ICMP header is 8 bytes for both families.
    let off = pkt.l4_off + 8;
    if off > MAX_L4_OFFSET {
        return false;
    }
    let l4off = if pkt.family == AF_INET {
        let Ok(ip) = ptr_at::<Ipv4Hdr>(start, end, off) else {
            return false;
        };
        let ip = unsafe { &*ip };
        let ihl = (ip.vihl & 0x0f) as usize * 4;
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return false;
        }
        out.proto = ip.proto;
        out.src[..4].copy_from_slice(&ip.src_addr);
        out.dst[..4].copy_from_slice(&ip.dst_addr);
        off + ihl
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr>(start, end, off) else {
            return false;
        };
        let ip = unsafe { &*ip };
        out.proto = ip.next_hdr;
        out.src = ip.src_addr;
        out.dst = ip.dst_addr;
        off + Ipv6Hdr::LEN
    };
    if l4off > MAX_L4_OFFSET {
        return false;
    }
    // Errors quote at least 8 bytes of the L4 header: ports, or ICMP type and id.
    let Ok(l4) = ptr_at::<IcmpHdr>(start, end, l4off) else {
        return false;
    };
    let l4 = unsafe { &*l4 };
    match out.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let b = unsafe { &*(l4 as *const IcmpHdr as *const [u8; 8]) };
            out.sport = u16::from_ne_bytes([b[0], b[1]]);
            out.dport = u16::from_ne_bytes([b[2], b[3]]);
            true
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if matches!(l4.type_, ICMP_ECHO | ICMPV6_ECHO_REQUEST) => {
            out.sport = u16::from_ne_bytes(l4.id);
            out.dport = 0;
            true
        }
        _ => false,
    }
}

pub struct QuotedFlow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}
