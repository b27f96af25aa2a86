//! `trace`: logged drops as they happen, formatted like iptables LOG lines.

use std::time::{Duration, Instant};

use crate::{
    backend::Event,
    engine, iface,
    render::{format_json, format_line},
    state::Paths,
};
use anyhow::Result;
use clap::Args;

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

pub fn run(paths: &Paths, a: TraceArgs) -> Result<()> {
    let (backend, _) = engine::open(paths)?;
    let mut events = backend.events(a.debug)?;
    // Monotonic event clock to wall clock.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let offset = wall - monotonic_ns() as u128;
    let deadline = a
        .timeout
        .map(|t| Instant::now() + Duration::from_secs_f64(t));
    let mut seen = 0u64;
    let mut last = events.counts()?;
    loop {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(200),
        }
        .min(Duration::from_millis(200));
        match events.next(wait)? {
            Some(Event::Debug(line)) => eprintln!("isolation bpf {line}"),
            Some(Event::Log(e)) => {
                let ifname = iface::name(e.ifindex);
                if a.json {
                    println!("{}", format_json(&e, &ifname, offset + e.ts_ns as u128));
                } else {
                    println!("{}", format_line(&e, &ifname));
                }
                seen += 1;
                if a.count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
                continue;
            }
            None => {}
        }
        let now = events.counts()?;
        if !a.json && (now.suppressed > last.suppressed || now.lost > last.lost) {
            eprintln!(
                "isolation: {} drop(s) not logged (rate limit), {} lost (ring buffer full)",
                now.suppressed - last.suppressed,
                now.lost - last.lost
            );
        }
        last = now;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
    }
}

/// Clock of `bpf_ktime_get_ns`, which stamps the events.
fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
