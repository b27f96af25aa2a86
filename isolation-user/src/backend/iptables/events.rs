//! `trace` on the iptables backend: the NFLOG rules' packets, read from the instance's
//! NFLOG group over netlink (the LOG target would write to the kernel log, which a network
//! namespace other than the host's does not get by default).

use std::{os::fd::AsRawFd as _, time::Duration};

use anyhow::{Context as _, Result, bail};
use isolation_common::{AF_INET, AF_INET6, LogEvent, Reason};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    nflog::{ConfigCmd, ConfigMode, CopyMode, PacketNla, ULogMessage, config_request},
};
use netlink_sys::{Socket, constants::NETLINK_NETFILTER};

use crate::backend::{Event, Events, LogCounts};

pub struct Nflog {
    socket: Socket,
    buf: Vec<u8>,
    /// Messages of the last datagram not yet handed out.
    pending: std::collections::VecDeque<LogEvent>,
    received: u64,
}

impl Nflog {
    pub fn open(group: u16) -> Result<Nflog> {
        let mut socket =
            Socket::new(NETLINK_NETFILTER).context("cannot open a netfilter netlink socket")?;
        socket
            .bind_auto()
            .context("cannot bind a netfilter netlink socket")?;
        let mut n = Nflog {
            socket,
            buf: vec![0; 1 << 16],
            pending: Default::default(),
            received: 0,
        };
        n.config(
            group,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new(128, CopyMode::Packet).into(),
            ],
        )
        .with_context(|| {
            format!("cannot listen on NFLOG group {group} (is another `trace` running?)")
        })?;
        Ok(n)
    }

    fn config(
        &mut self,
        group: u16,
        nlas: Vec<netlink_packet_netfilter::nflog::ConfigNla>,
    ) -> Result<()> {
        let packet = config_request(NetfilterProtoFamily::Unspec, group, nlas);
        let mut out = vec![0; packet.header.length as usize];
        packet.serialize(&mut out[..]);
        self.socket.send(&out, 0)?;
        let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let m = <NetlinkMessage<NetfilterMessage>>::deserialize(&self.buf[..size])
            .map_err(|e| anyhow::anyhow!("bad netlink answer: {e}"))?;
        if let NetlinkPayload::Error(e) = m.payload
            && let Some(code) = e.code
        {
            bail!("{}", std::io::Error::from_raw_os_error(-code.get()));
        }
        Ok(())
    }

    /// Reads one datagram of messages, waiting at most `wait`.
    fn fill(&mut self, wait: Duration) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return Ok(());
        }
        let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
        let mut off = 0;
        while off < size {
            let Ok(m) = <NetlinkMessage<NetfilterMessage>>::deserialize(&self.buf[off..size])
            else {
                break;
            };
            let len = m.header.length as usize;
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = &m.payload
                && let Some(e) = event(nlas)
            {
                self.pending.push_back(e);
                self.received += 1;
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
        Ok(())
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A logged packet as the eBPF datapath's trace records it: its IP and L4 headers.
fn event(nlas: &[PacketNla]) -> Option<LogEvent> {
    let mut e = LogEvent {
        ts_ns: monotonic_ns(),
        ..LogEvent::default()
    };
    let mut payload: &[u8] = &[];
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => {
                let p = p.to_string_lossy();
                e.reason = *Reason::ALL.iter().find(|r| r.name() == p)? as u32;
            }
            PacketNla::IfIndexInDev(i) => e.ifindex = *i,
            PacketNla::Payload(p) => payload = p,
            _ => {}
        }
    }
    let l4 = match payload.first()? >> 4 {
        4 if payload.len() >= 20 => {
            e.family = AF_INET;
            e.src[..4].copy_from_slice(&payload[12..16]);
            e.dst[..4].copy_from_slice(&payload[16..20]);
            e.proto = payload[9];
            e.ttl = payload[8];
            e.len = u16::from_be_bytes([payload[2], payload[3]]);
            // No L4 header in a later fragment.
            let frag = u16::from_be_bytes([payload[6], payload[7]]) & 0x1fff;
            (frag == 0).then(|| &payload[(payload[0] as usize & 0xf) * 4..])
        }
        6 if payload.len() >= 40 => {
            e.family = AF_INET6;
            e.src.copy_from_slice(&payload[8..24]);
            e.dst.copy_from_slice(&payload[24..40]);
            e.proto = payload[6];
            e.ttl = payload[7];
            e.len = u16::from_be_bytes([payload[4], payload[5]]).saturating_add(40);
            Some(&payload[40..])
        }
        _ => return None,
    };
    if let Some(l4) = l4 {
        match e.proto {
            6 | 17 if l4.len() >= 4 => {
                e.sport = u16::from_be_bytes([l4[0], l4[1]]);
                e.dport = u16::from_be_bytes([l4[2], l4[3]]);
                if e.proto == 6 && l4.len() >= 14 {
                    e.tcp_flags = l4[13];
                }
            }
            1 | 58 if l4.len() >= 2 => {
                e.tcp_flags = l4[0];
                e.icmp_code = l4[1];
            }
            _ => {}
        }
    }
    Some(e)
}

impl Events for Nflog {
    fn next(&mut self, wait: Duration) -> Result<Option<Event>> {
        if self.pending.is_empty() {
            self.fill(wait)?;
        }
        Ok(self.pending.pop_front().map(Event::Log))
    }

    fn counts(&self) -> Result<LogCounts> {
        Ok(LogCounts {
            written: self.received,
            suppressed: 0,
            lost: 0,
        })
    }
}
