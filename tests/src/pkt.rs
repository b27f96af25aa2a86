//! Hand-built frames for BPF_PROG_TEST_RUN: exact bytes, including the malformed ones a
//! packet library would refuse to build. Checksums are not filled: the programs never read them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

pub fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    vlan_eth(&[], ether_type, payload)
}

/// Ethernet with 802.1Q tags (outermost first).
pub fn vlan_eth(tags: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    for vid in tags {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[derive(Clone)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub options: Vec<u8>,
    pub id: u16,
    pub more_frags: bool,
    /// In 8-byte units.
    pub frag_offset: u16,
    pub ttl: u8,
}

impl V4 {
    pub fn new(src: &str, dst: &str, proto: u8) -> V4 {
        V4 {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            options: vec![],
            id: 0x1234,
            more_frags: false,
            frag_offset: 0,
            ttl: 64,
        }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 5 + self.options.len() / 4;
        let total = ihl * 4 + payload.len();
        let mut h = vec![(4 << 4) | ihl as u8, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        let frag = (if self.more_frags { 0x2000 } else { 0 }) | self.frag_offset;
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        h.extend_from_slice(payload);
        h
    }

    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        eth(0x0800, &self.build(payload))
    }
}

#[derive(Clone)]
pub struct V6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next: u8,
    /// Extension headers in order: (type, body); bodies are padded to 8-byte units.
    pub ext: Vec<(u8, Vec<u8>)>,
    pub hop_limit: u8,
}

impl V6 {
    pub fn new(src: &str, dst: &str, next: u8) -> V6 {
        V6 {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            next,
            ext: vec![],
            hop_limit: 64,
        }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut exts = Vec::new();
        let first = self.ext.first().map(|e| e.0).unwrap_or(self.next);
        for (i, (_, body)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map(|e| e.0).unwrap_or(self.next);
            let mut b = vec![next, 0];
            b.extend_from_slice(body);
            while !b.len().is_multiple_of(8) {
                b.push(0);
            }
            b[1] = (b.len() / 8 - 1) as u8;
            exts.extend_from_slice(&b);
        }
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((exts.len() + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[first, self.hop_limit]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&exts);
        h.extend_from_slice(payload);
        h
    }

    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        eth(0x86dd, &self.build(payload))
    }
}

/// IPv6 fragment header body (after next-header and reserved): offset (8-byte units), M flag, id.
pub fn v6_frag_body(offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut b = ((offset << 3) | more as u16).to_be_bytes().to_vec();
    b.extend_from_slice(&id.to_be_bytes());
    b
}

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// ICMP or ICMPv6 header: type, code, then id and sequence (or "unused" for errors).
pub fn icmp(type_: u8, code: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut i = vec![type_, code, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(data);
    i
}

pub fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&MAC_A);
    a.extend_from_slice(&[192, 0, 2, 1]);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&[192, 0, 2, 2]);
    eth(0x0806, &a)
}

/// Ethernet between two real interfaces (for frames sent on a veth), with 802.1Q tags.
pub fn ether(dst: [u8; 6], src: [u8; 6], tags: &[u16], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vlan_eth(tags, ether_type, payload);
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn add_words(sum: &mut u32, b: &[u8]) {
    for c in b.chunks(2) {
        *sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
}

/// Fills the checksums a real kernel checks (IPv4 header; TCP, UDP, ICMP, ICMPv6) of an
/// unfragmented IP packet without IPv6 extension headers, built by `V4::build`/`V6::build`.
pub fn checksummed(mut ip: Vec<u8>) -> Vec<u8> {
    let v6 = ip[0] >> 4 == 6;
    let (l4_off, proto) = if v6 {
        (40, ip[6])
    } else {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        ip[10..12].copy_from_slice(&[0, 0]);
        let mut s = 0;
        add_words(&mut s, &ip[..ihl]);
        let c = fold(s);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        (ihl, ip[9])
    };
    let at = match proto {
        TCP => 16,
        UDP => 6,
        ICMP | ICMPV6 => 2,
        _ => return ip,
    };
    let l4_len = ip.len() - l4_off;
    ip[l4_off + at..l4_off + at + 2].copy_from_slice(&[0, 0]);
    let mut s = 0;
    // IPv4 ICMP has no pseudo-header; every other one does.
    if proto != ICMP {
        if v6 {
            add_words(&mut s, &ip[8..40]);
            add_words(&mut s, &(l4_len as u32).to_be_bytes());
            add_words(&mut s, &[0, 0, 0, proto]);
        } else {
            add_words(&mut s, &ip[12..20]);
            add_words(&mut s, &[0, proto]);
            add_words(&mut s, &(l4_len as u16).to_be_bytes());
        }
    }
    add_words(&mut s, &ip[l4_off..]);
    let mut c = fold(s);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    ip[l4_off + at..l4_off + at + 2].copy_from_slice(&c.to_be_bytes());
    ip
}
