//! How the datapath's words are said, by the verbs and the service alike: a reason's target
//! column, a logged drop as an iptables LOG line or as JSON.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use isolation_common::{AF_INET, LogEvent, Reason};
use serde_json::json;

/// The target column of a reason, as `iptables -L` names it.
pub fn verdict(r: Reason) -> &'static str {
    if r.is_egress() {
        "TRACK"
    } else if r == Reason::RejectIsolated {
        "REJECT"
    } else if r.is_drop() {
        "DROP"
    } else {
        "PASS"
    }
}

fn addr(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*b))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        n => n.to_string(),
    }
}

fn tcp_flags(f: u8) -> String {
    let names = [
        (0x01, "FIN"),
        (0x02, "SYN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x10, "ACK"),
        (0x20, "URG"),
    ];
    names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What was done with a logged packet: answered (REJECT) or dropped.
fn action(r: Option<Reason>) -> &'static str {
    if r == Some(Reason::RejectIsolated) {
        "REJECT"
    } else {
        "DROP"
    }
}

/// `IN=eth0 SRC=... DST=... LEN=60 TTL=64 PROTO=TCP SPT=1 DPT=2 SYN`, as iptables LOG.
pub fn format_line(e: &LogEvent, ifname: &str) -> String {
    let r = Reason::from_u32(e.reason);
    let reason = r.map(|r| r.name()).unwrap_or("unknown");
    let action = action(r);
    let mut s = format!(
        "isolation {action} {reason}: IN={ifname} SRC={} DST={} LEN={} TTL={} PROTO={}",
        addr(e.family, &e.src),
        addr(e.family, &e.dst),
        e.len,
        e.ttl,
        proto_name(e.proto)
    );
    if e.vlan != 0 {
        s = s.replacen(" SRC=", &format!(" VLAN={} SRC=", e.vlan), 1);
    }
    match e.proto {
        6 => s.push_str(&format!(
            " SPT={} DPT={} {}",
            e.sport,
            e.dport,
            tcp_flags(e.tcp_flags)
        )),
        17 => s.push_str(&format!(" SPT={} DPT={}", e.sport, e.dport)),
        1 | 58 => s.push_str(&format!(" TYPE={} CODE={}", e.tcp_flags, e.icmp_code)),
        _ => {}
    }
    s.trim_end().to_string()
}

pub fn format_json(e: &LogEvent, ifname: &str, wall_ns: u128) -> serde_json::Value {
    json!({
        "time_ns": wall_ns as u64,
        "action": action(Reason::from_u32(e.reason)).to_lowercase(),
        "reason": Reason::from_u32(e.reason).map(|r| r.name()).unwrap_or("unknown"),
        "in": ifname, "src": addr(e.family, &e.src).to_string(), "dst": addr(e.family, &e.dst).to_string(),
        "len": e.len, "ttl": e.ttl, "proto": proto_name(e.proto), "sport": e.sport, "dport": e.dport,
        "tcp_flags": if e.proto == 6 { tcp_flags(e.tcp_flags) } else { String::new() },
        "icmp_type": if matches!(e.proto, 1 | 58) { Some(e.tcp_flags) } else { None },
        "vlan": e.vlan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A REJECT is logged as one, in the line and in JSON; anything else as a DROP.
    #[test]
    fn a_reject_is_logged_as_reject() {
        let mut e: LogEvent = bytemuck::Zeroable::zeroed();
        e.family = AF_INET;
        e.src[..4].copy_from_slice(&[203, 0, 113, 2]);
        e.dst[..4].copy_from_slice(&[203, 0, 113, 130]);
        e.proto = 6;
        e.sport = 40000;
        e.dport = 80;
        e.tcp_flags = 0x02;
        e.len = 60;
        e.ttl = 64;
        e.reason = Reason::RejectIsolated as u32;
        assert_eq!(
            format_line(&e, "i1"),
            "isolation REJECT isolated-reject: IN=i1 SRC=203.0.113.2 DST=203.0.113.130 LEN=60 TTL=64 PROTO=TCP SPT=40000 DPT=80 SYN"
        );
        assert_eq!(format_json(&e, "i1", 0)["action"], "reject");
        e.reason = Reason::DropIsolated as u32;
        assert!(format_line(&e, "i1").starts_with("isolation DROP isolated-drop: "));
        assert_eq!(format_json(&e, "i1", 0)["action"], "drop");
    }
}
