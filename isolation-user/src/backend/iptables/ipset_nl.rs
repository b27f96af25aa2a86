//! Adding and deleting set members over ipset's netlink protocol (what `ipset restore`
//! speaks), without the text: a million whitelist entries are encoded in a few tens of ms
//! where `ipset restore` spends about a second parsing them. Raw netlink because no
//! maintained crate speaks ipset's protocol (the bindings to libipset need the C library).
//! Creating, swapping and destroying sets stays with the `ipset` command.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
/// The protocol version of ipset 7 (`IPSET_PROTOCOL`).
const IPSET_PROTOCOL: u8 = 7;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ADT: u16 = 8;
/// Required beside ADT (the kernel writes the failing element's line there).
const IPSET_ATTR_LINENO: u16 = 9;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_CIDR: u16 = 3;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
/// "Element already added" / "element not in the set" (`IPSET_ERR_EXIST`).
const IPSET_ERR_EXIST: i32 = 4103;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// Without it the kernel ignores "already there" and "not there" (`ipset -exist`).
const NLM_F_EXCL: u16 = 0x200;
/// Elements per message: IPv6 elements take 44 bytes, so a message stays under 48 KiB.
const BATCH: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
}

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Opens a nested attribute; `close` writes its length.
fn open(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn close(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn element(buf: &mut Vec<u8>, n: &IpNet) {
    let data = open(buf, IPSET_ATTR_DATA);
    let ip = open(buf, IPSET_ATTR_IP);
    match n.addr() {
        IpAddr::V4(a) => attr(
            buf,
            IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
            &a.octets(),
        ),
        IpAddr::V6(a) => attr(
            buf,
            IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
            &a.octets(),
        ),
    }
    close(buf, ip);
    attr(buf, IPSET_ATTR_CIDR, &[n.prefix_len()]);
    close(buf, data);
}

/// One request: `members` (one family) added to or deleted from `set`.
fn request(op: Op, set: &str, members: &[IpNet], exclusive: bool, seq: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    let family = match members.first().map(|n| n.addr()) {
        Some(IpAddr::V6(_)) => libc::AF_INET6 as u8,
        _ => libc::AF_INET as u8,
    };
    // nfgenmsg: family, version 0, resource id 0.
    b.extend_from_slice(&[family, 0, 0, 0]);
    attr(&mut b, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    let mut name = set.as_bytes().to_vec();
    name.push(0);
    attr(&mut b, IPSET_ATTR_SETNAME, &name);
    if let [one] = members {
        // A single element travels as DATA, so that its error is the answer's.
        let at = b.len();
        element(&mut b, one);
        b[at + 2..at + 4].copy_from_slice(&(IPSET_ATTR_DATA | NLA_F_NESTED).to_ne_bytes());
    } else {
        attr(&mut b, IPSET_ATTR_LINENO, &0u32.to_ne_bytes());
        let adt = open(&mut b, IPSET_ATTR_ADT);
        for m in members {
            element(&mut b, m);
        }
        close(&mut b, adt);
    }
    let cmd = match op {
        Op::Add => IPSET_CMD_ADD,
        Op::Del => IPSET_CMD_DEL,
    };
    let len = b.len() as u32;
    b[0..4].copy_from_slice(&len.to_ne_bytes());
    b[4..6].copy_from_slice(&((NFNL_SUBSYS_IPSET << 8) | cmd).to_ne_bytes());
    let flags = NLM_F_REQUEST | NLM_F_ACK | if exclusive { NLM_F_EXCL } else { 0 };
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b
}

pub struct Ipset {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Ipset {
    pub fn open() -> Result<Ipset> {
        let mut socket =
            Socket::new(NETLINK_NETFILTER).context("cannot open a netfilter netlink socket")?;
        socket
            .bind_auto()
            .context("cannot bind a netfilter netlink socket")?;
        Ok(Ipset {
            socket,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends one request and reads its answer: 0, or the kernel's error code.
    fn call(&mut self, msg: &[u8]) -> Result<i32> {
        self.socket
            .send(msg, 0)
            .context("cannot talk to ipset over netlink")?;
        let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let b = &self.buf[..size];
        if size < 20 || u16::from_ne_bytes([b[4], b[5]]) != NLMSG_ERROR {
            bail!("an answer from ipset that is not an acknowledgement");
        }
        Ok(-i32::from_ne_bytes([b[16], b[17], b[18], b[19]]))
    }

    /// Adds or deletes `members` (one family), ignoring those already there (add) or not
    /// there (delete), as `ipset -exist` does.
    pub fn batch(&mut self, op: Op, set: &str, members: &[IpNet]) -> Result<()> {
        for chunk in members.chunks(BATCH) {
            self.seq += 1;
            let msg = request(op, set, chunk, false, self.seq);
            match self.call(&msg)? {
                0 => {}
                e => bail!("ipset refused a batch for {set}: {}", describe(e)),
            }
        }
        Ok(())
    }

    /// Adds or deletes one member: Ok(false) when it was already there (add) or was not
    /// there (delete), exactly (no covering prefix counts).
    pub fn one(&mut self, op: Op, set: &str, member: &IpNet) -> Result<bool> {
        self.seq += 1;
        let msg = request(op, set, std::slice::from_ref(member), true, self.seq);
        match self.call(&msg)? {
            0 => Ok(true),
            IPSET_ERR_EXIST => Ok(false),
            e => bail!("ipset refused {member} for {set}: {}", describe(e)),
        }
    }
}

fn describe(e: i32) -> String {
    match e {
        4097 => "protocol mismatch".into(),
        4098..=4102 => format!("ipset error {e}"),
        4103 => "element exists / missing".into(),
        4104..=4200 => format!("ipset error {e} (is the set full?)"),
        _ => std::io::Error::from_raw_os_error(e).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_what_ipset_sends() {
        let m: IpNet = "192.0.2.0/24".parse().unwrap();
        let r = request(Op::Add, "wl", &[m], true, 7);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (6 << 8) | 9);
        assert_eq!(
            u16::from_ne_bytes([r[6], r[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL
        );
        // nfgenmsg, then protocol 7, then the set name "wl\0" padded to 4.
        assert_eq!(&r[16..20], &[libc::AF_INET as u8, 0, 0, 0]);
        assert_eq!(&r[20..25], &[5, 0, 1, 0, 7]);
        assert_eq!(&r[28..35], &[7, 0, 2, 0, b'w', b'l', 0]);
        // DATA { IP { IPV4 } , CIDR }.
        let data = &r[36..];
        assert_eq!(u16::from_ne_bytes([data[2], data[3]]), 7 | NLA_F_NESTED);
        assert_eq!(&data[12..16], &[192, 0, 2, 0]);
        assert_eq!(&data[16..21], &[5, 0, 3, 0, 24]);
    }
}
