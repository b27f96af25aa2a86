//! `trace`: logged drops as they happen, formatted like iptables LOG lines.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use clap::Args;
use isolation_common::{AF_INET, LogEvent, LogStat, Reason, maps};
use serde_json::json;

use crate::{datapath, state::Paths};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Also print the programs' debug log (aya-log) on stderr: why frames were malformed.
    #[arg(long)]
    pub debug: bool,
}

/// Prints the programs' aya-log lines on stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!(
            "isolation bpf {}: {}",
            r.level().as_str().to_lowercase(),
            r.args()
        );
    }
    fn flush(&self) {}
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

/// `IN=eth0 SRC=... DST=... LEN=60 TTL=64 PROTO=TCP SPT=1 DPT=2 SYN`, as iptables LOG.
pub fn format_line(e: &LogEvent, ifname: &str) -> String {
    let reason = Reason::from_u32(e.reason)
        .map(|r| r.name())
        .unwrap_or("unknown");
    let mut s = format!(
        "isolation DROP {reason}: IN={ifname} SRC={} DST={} LEN={} TTL={} PROTO={}",
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
        "time_ns": wall_ns as u64, "action": "drop",
        "reason": Reason::from_u32(e.reason).map(|r| r.name()).unwrap_or("unknown"),
        "in": ifname, "src": addr(e.family, &e.src).to_string(), "dst": addr(e.family, &e.dst).to_string(),
        "len": e.len, "ttl": e.ttl, "proto": proto_name(e.proto), "sport": e.sport, "dport": e.dport,
        "tcp_flags": if e.proto == 6 { tcp_flags(e.tcp_flags) } else { String::new() },
        "icmp_type": if matches!(e.proto, 1 | 58) { Some(e.tcp_flags) } else { None },
        "vlan": e.vlan,
    })
}

pub fn run(paths: &Paths, a: TraceArgs) -> Result<()> {
    let mut rb: RingBuf<MapData> = datapath::open_map(paths, maps::EVENTS)?.try_into()?;
    let fd = rb.as_raw_fd();
    // Monotonic event clock to wall clock.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let offset = wall - datapath::monotonic_ns() as u128;
    let deadline = a
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut seen = 0u64;
    let mut last_stats = datapath::log_stats(paths)?;
    let mut bpf_log = if a.debug {
        let id = datapath::pinned_xdp_id(paths)?;
        Some(
            aya_log::EbpfLogger::init_from_id_with_logger(id, StderrLog)
                .map_err(|e| anyhow::anyhow!("cannot read the programs' debug log: {e}"))?,
        )
    } else {
        None
    };
    loop {
        if let Some(l) = bpf_log.as_mut() {
            l.flush();
        }
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<LogEvent>() {
                continue;
            }
            let e: LogEvent = *bytemuck::from_bytes(&item[..std::mem::size_of::<LogEvent>()]);
            let ifname = super::ifname(e.ifindex);
            if a.json {
                println!("{}", format_json(&e, &ifname, offset + e.ts_ns as u128));
            } else {
                println!("{}", format_line(&e, &ifname));
            }
            seen += 1;
            if a.count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
        let stats = datapath::log_stats(paths)?;
        let (sup, lost) = (LogStat::Suppressed as usize, LogStat::Lost as usize);
        if !a.json && (stats[sup] > last_stats[sup] || stats[lost] > last_stats[lost]) {
            eprintln!(
                "isolation: {} drop(s) not logged (rate limit), {} lost (ring buffer full)",
                stats[sup] - last_stats[sup],
                stats[lost] - last_stats[lost]
            );
        }
        last_stats = stats;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        unsafe { libc::poll(&mut pfd, 1, 200) };
    }
}
