//! Connections open before `load` (the operator's SSH session) must keep working: their
//! flows are read from the kernel's socket table of this network namespace and written to
//! the connection map before the programs are attached.

use std::{fs, net::IpAddr};

use isolation_common::{AF_INET, AF_INET6, FlowKey};

const TCP_ESTABLISHED: &str = "01";

/// Parses one `/proc/net/{tcp,udp}[6]` address field: hex address in the kernel's
/// in-memory order (32-bit words in host order), then ':' and a hex port.
fn parse_addr(field: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = field.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let mut bytes = Vec::new();
    for i in (0..a.len()).step_by(8) {
        let w = u32::from_str_radix(a.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

pub fn flow_key(proto: u8, local: (IpAddr, u16), remote: (IpAddr, u16)) -> Option<FlowKey> {
    let mut k = FlowKey {
        proto,
        sport: local.1.to_be(),
        dport: remote.1.to_be(),
        ..Default::default()
    };
    match (local.0.to_canonical(), remote.0.to_canonical()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            k.family = AF_INET;
            k.src[..4].copy_from_slice(&l.octets());
            k.dst[..4].copy_from_slice(&r.octets());
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            k.family = AF_INET6;
            k.src = l.octets();
            k.dst = r.octets();
        }
        _ => return None,
    }
    Some(k)
}

/// Established TCP connections and connected UDP sockets, from one `/proc/net` table.
pub fn parse_table(text: &str, proto: u8) -> Vec<FlowKey> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (Some(local), Some(remote)) = (parse_addr(f[1]), parse_addr(f[2])) else {
            continue;
        };
        let connected = if proto == 6 {
            f[3] == TCP_ESTABLISHED
        } else {
            remote.1 != 0
        };
        if connected && let Some(k) = flow_key(proto, local, remote) {
            out.push(k);
        }
    }
    out
}

/// Every established flow of this network namespace.
pub fn established_flows() -> Vec<FlowKey> {
    let mut out = Vec::new();
    for (file, proto) in [("tcp", 6), ("tcp6", 6), ("udp", 17), ("udp6", 17)] {
        if let Ok(text) = fs::read_to_string(format!("/proc/self/net/{file}")) {
            out.extend(parse_table(&text, proto));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_tcp_rows() {
        // 192.0.2.1:22 <- 203.0.113.9:50000 established; a listener is skipped.
        let local = u32::from_ne_bytes([192, 0, 2, 1]);
        let remote = u32::from_ne_bytes([203, 0, 113, 9]);
        let text = format!(
            "  sl  local_address rem_address   st\n   0: {local:08X}:0016 {remote:08X}:C350 01 x\n   1: 00000000:0016 00000000:0000 0A x\n"
        );
        let flows = parse_table(&text, 6);
        assert_eq!(flows.len(), 1);
        assert_eq!(&flows[0].src[..4], &[192, 0, 2, 1]);
        assert_eq!(&flows[0].dst[..4], &[203, 0, 113, 9]);
        assert_eq!(u16::from_be(flows[0].sport), 22);
        assert_eq!(u16::from_be(flows[0].dport), 50000);
    }

    #[test]
    fn reads_this_hosts_table_without_error() {
        // Whatever is open here must parse into well-formed keys.
        for k in established_flows() {
            assert!(k.family == AF_INET || k.family == AF_INET6);
        }
    }
}
