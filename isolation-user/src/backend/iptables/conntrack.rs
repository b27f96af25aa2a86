//! Connections open before `load` (the operator's SSH session) keep working: they are
//! written into the kernel's conntrack table over ctnetlink (what `conntrack -I` does), so
//! the rules' `ctstate ESTABLISHED` knows them even where conntrack was not running until
//! our rules needed it. The eBPF backend writes the same flows into its own table.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use isolation_common::{AF_INET, FlowKey, timing};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Status, TCPFlags, Tuple,
    },
};
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};

/// The kernel's TCP_CONNTRACK_ESTABLISHED.
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
/// IP_CT_TCP_FLAG_SACK_PERM | IP_CT_TCP_FLAG_BE_LIBERAL.
const LIBERAL: u8 = 0x02 | 0x08;

fn addr(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

fn tuple(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<Tuple> {
    let p = match proto {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        n => Protocol::Other(n),
    };
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(src),
            IPTuple::DestinationAddress(dst),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(p),
            ProtoTuple::SourcePort(sport),
            ProtoTuple::DestinationPort(dport),
        ]),
    ]
}

/// The ctnetlink request creating an established entry for `f` (local end first).
fn request(f: &FlowKey, seq: u32) -> Vec<u8> {
    let (src, dst) = (addr(f.family, &f.src), addr(f.family, &f.dst));
    let (sport, dport) = (u16::from_be(f.sport), u16::from_be(f.dport));
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple(src, dst, f.proto, sport, dport)),
        ConntrackAttribute::CtaTupleReply(tuple(dst, src, f.proto, dport, sport)),
        // As `conntrack -I` sends it: a new entry is CONFIRMED by the time its status is
        // set, and that bit cannot change (EBUSY without it).
        ConntrackAttribute::CtaStatus(Status::SeenReply | Status::Assured | Status::Confirmed),
    ];
    let timeout = if f.proto == 6 {
        // The windows are not known: liberal window tracking (what `conntrack -I` asks), or
        // the next segments could be judged out of window and INVALID.
        let flags = || TCPFlags::parse(&[LIBERAL, LIBERAL]).expect("two bytes");
        attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(
            vec![
                ProtoInfoTCP::State(TCP_CONNTRACK_ESTABLISHED),
                ProtoInfoTCP::OriginalFlags(flags()),
                ProtoInfoTCP::ReplyFlags(flags()),
            ],
        )]));
        timing::TCP_TIMEOUT_NS
    } else {
        timing::UDP_TIMEOUT_NS
    } / timing::NS;
    attrs.push(ConntrackAttribute::CtaTimeout(timeout as u32));
    let family = if f.family == AF_INET {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    };
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
    hdr.sequence_number = seq;
    let mut m = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::New(attrs),
        )),
    );
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Writes `flows` into conntrack; returns how many it holds now (new or already there).
pub fn seed(flows: &[FlowKey]) -> Result<usize> {
    if flows.is_empty() {
        return Ok(0);
    }
    let mut socket =
        Socket::new(NETLINK_NETFILTER).context("cannot open a netfilter netlink socket")?;
    socket
        .bind_auto()
        .context("cannot bind a netfilter netlink socket")?;
    let mut buf = vec![0u8; 8192];
    let mut held = 0;
    for (i, f) in flows.iter().enumerate() {
        socket
            .send(&request(f, i as u32 + 1), 0)
            .context("cannot write to conntrack")?;
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let m = <NetlinkMessage<NetfilterMessage>>::deserialize(&buf[..size])
            .map_err(|e| anyhow::anyhow!("bad answer from conntrack: {e}"))?;
        match m.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => held += 1,
                Some(c) if -c.get() == libc::EEXIST => held += 1,
                Some(c) => tracing::warn!(
                    "conntrack refused an open connection: {}",
                    std::io::Error::from_raw_os_error(-c.get())
                ),
            },
            _ => held += 1,
        }
    }
    Ok(held)
}
