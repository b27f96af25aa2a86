//! Drop rate on a live path: a generator namespace joined by a veth pair to one receiver
//! namespace per filter. The generator is an XDP program returning XDP_TX, run through
//! BPF_PROG_TEST_RUN in live-frames mode, so real 60-byte frames (64 on the wire) enter each
//! receiver's veth. The receiver's NAPI runs in softirq on the generator's CPU after each
//! batch, so every frame's whole cost (generate, deliver, filter) is paid on one pinned CPU:
//! nothing is lost in rings, and the rate difference is the filter's cost. (With NAPI in a
//! thread on the other CPU, wake-ups and page-pool lock contention decided the figures, not
//! the filters: measured and rejected.) Drops are read from the filters' own counters (ours,
//! iptables rules, nft rules) or from the driver's XDP_DROP count for programs that keep
//! none (bare XDP_DROP, xdp-filter).

use std::{
    fmt::Write as _,
    os::fd::RawFd,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tests::{
    iso::Iso,
    netns::Netns,
    pkt::{self, V4, V6},
    traffic,
};

use crate::{raw, report};

const UDP: u8 = 17;
/// The one source of the one-source generator (a documentation address).
const SOURCE: &str = "203.0.113.7";
const RECEIVER_ADDR: &str = "192.0.2.1";
/// Many sources: 2001:db8:eeee::/108, one of 2^20 per frame (random).
const MANY_BITS: u32 = 20;

/// How a receiver counts what it dropped (or, with no filter, what it took in).
#[derive(Clone)]
enum Counter {
    /// The veth driver's count of XDP_DROP verdicts (for programs with no counter of their own).
    XdpDrops,
    /// Our own per-reason counters, read from the pinned maps.
    Ours(isolation_user::state::Paths),
    /// The packet count of the first rule of an iptables chain.
    Iptables(&'static str, &'static str),
    /// The packet count of the `counter` in the nft chain netdev/bench/ingress.
    Nft,
    /// Packets the interface received (no filter: everything reaches the stack).
    RxPackets,
}

struct Receiver {
    label: String,
    ns: String,
    dev: String,
    /// The generator's end of the pair, in the generator's namespace.
    gen_ifindex: u32,
    counter: Counter,
    _link: Option<RawFd>,
}

pub struct LiveOpts<'a> {
    pub bin: &'a Path,
    pub big: u32,
    pub seconds: f64,
    pub rounds: usize,
}

/// Runs a command that must succeed; its stdout.
fn output_ok(c: &mut Command) -> Result<String> {
    let o = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {c:?}"))?;
    if !o.status.success() {
        bail!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn sh_ok(args: &[&str]) -> Result<String> {
    output_ok(Command::new(args[0]).args(&args[1..]))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    output_ok(&mut crate::nsenter(ns, args))
}

fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let j = sh_ok(&["ip", "-n", ns, "-o", "link", "show", "dev", dev])?;
    j.split(':')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ifindex for {dev} in {ns}"))
}

fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn read_counter(r: &Receiver) -> Result<u64> {
    Ok(match &r.counter {
        Counter::XdpDrops => {
            let out = sh_ok(&["ip", "netns", "exec", &r.ns, "ethtool", "-S", &r.dev])?;
            out.lines()
                .filter(|l| l.trim().starts_with("rx_queue_") && l.contains("_xdp_drops:"))
                .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
                .sum()
        }
        Counter::Ours(paths) => isolation_user::backend::ebpf::counters::counters(paths)?
            .iter()
            .filter(|(reason, _)| reason.is_drop())
            .map(|(_, c)| c.packets)
            .sum(),
        Counter::Iptables(table, chain) => {
            let out = in_ns(
                &r.ns,
                &["iptables", "-t", table, "-L", chain, "-v", "-x", "-n"],
            )?;
            out.lines()
                .nth(2)
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no rule counter in {table} {chain}: {out}"))?
        }
        Counter::Nft => {
            let out = in_ns(
                &r.ns,
                &["nft", "list", "chain", "netdev", "bench", "ingress"],
            )?;
            out.split("counter packets ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no nft counter: {out}"))?
        }
        Counter::RxPackets => {
            let out = in_ns(&r.ns, &["cat", "/proc/net/dev"])?;
            out.lines()
                .find(|l| l.trim_start().starts_with(&format!("{}:", r.dev)))
                .and_then(|l| l.split(':').nth(1)?.split_whitespace().nth(1)?.parse().ok())
                .with_context(|| format!("no rx count for {}", r.dev))?
        }
    })
}

/// A one-source IPv4 UDP frame to the receiver, 60 bytes, with a valid header checksum
/// (the kernel stack drops bad ones before iptables would see them).
fn frame_v4() -> Vec<u8> {
    let mut f = V4::new(SOURCE, RECEIVER_ADDR, UDP).frame(&pkt::udp(9, 9, &[0u8; 18]));
    let sum = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    // UDP checksum 0: none, valid for IPv4.
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

fn frame_v6() -> Vec<u8> {
    V6::new("2001:db8:eeee::", "2001:db8::1", UDP).frame(&pkt::udp(9, 9, &[]))
}

fn checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

struct Generator {
    label: &'static str,
    fd: RawFd,
    frame: Vec<u8>,
}

/// Blasts `g` into `r` for `secs`: (frames offered, seconds, receiver count delta).
fn blast(gen_ns: &str, g: &Generator, r: &Receiver, secs: f64) -> Result<(u64, f64, u64)> {
    let ifidx = r.gen_ifindex;
    let c0 = read_counter(r)?;
    let (fd, frame) = (g.fd, g.frame.clone());
    let ns = gen_ns.to_string();
    let (sent, el) = std::thread::spawn(move || -> Result<(u64, f64)> {
        traffic::enter(&ns);
        pin_to_cpu(0);
        let chunk = 1 << 16;
        let (t, mut sent) = (Instant::now(), 0u64);
        // Bounded by time and by count.
        while t.elapsed().as_secs_f64() < secs && sent < 1 << 34 {
            raw::test_run_live(fd, &frame, ifidx, chunk)?;
            sent += u64::from(chunk);
        }
        Ok((sent, t.elapsed().as_secs_f64()))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    std::thread::sleep(Duration::from_millis(50));
    let c1 = read_counter(r)?;
    Ok((sent, el, c1.saturating_sub(c0)))
}

pub fn run(md: &mut String, targets: &mut Vec<report::Target>, o: &LiveOpts) -> Result<()> {
    let gen_ns = tests::unique("isolg");
    let mut names = vec![gen_ns.clone()];
    let mut receivers: Vec<Receiver> = Vec::new();
    let big = o.big;
    let specs: Vec<(String, &str)> = vec![
        ("no filter (kernel stack, closed UDP port)".into(), "none"),
        ("bare XDP_DROP program".into(), "xdpdrop"),
        ("isolation-user, 1 whitelist entry".into(), "ours1"),
        (
            format!("isolation-user, {big} whitelist entries"),
            "oursbig",
        ),
        (
            "xdp-filter (xdp-tools 1.3.1), source denied".into(),
            "xdpfilter",
        ),
        (
            "iptables raw PREROUTING + ipset hash:ip, 1 entry".into(),
            "ipt:raw:ip:1",
        ),
        (
            format!("iptables raw PREROUTING + ipset hash:ip, {big} entries"),
            "ipt:raw:ip:big",
        ),
        (
            "iptables raw PREROUTING + ipset hash:net, 1 entry".into(),
            "ipt:raw:net:1",
        ),
        (
            format!("iptables raw PREROUTING + ipset hash:net, {big} entries"),
            "ipt:raw:net:big",
        ),
        (
            "iptables filter INPUT + ipset hash:ip, 1 entry".into(),
            "ipt:filter:ip:1",
        ),
        (
            format!("iptables filter INPUT + ipset hash:ip, {big} entries"),
            "ipt:filter:ip:big",
        ),
        (
            "iptables filter INPUT + ipset hash:net, 1 entry".into(),
            "ipt:filter:net:1",
        ),
        (
            format!("iptables filter INPUT + ipset hash:net, {big} entries"),
            "ipt:filter:net:big",
        ),
        ("nftables netdev ingress, set of 1".into(), "nft:1"),
        (format!("nftables netdev ingress, set of {big}"), "nft:big"),
    ];
    for i in 0..specs.len() {
        names.push(format!("{gen_ns}r{i}"));
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let nets = Netns::new(&name_refs);
    let tmp = std::env::temp_dir().join(&gen_ns);
    std::fs::create_dir_all(&tmp)?;
    let bare_drop = raw::load_xdp_ret(raw::XDP_DROP)?;
    let mut xdp_filter_dev = None;
    let mut instances: Vec<Iso> = Vec::new();
    let result = (|| -> Result<()> {
        for (i, (label, kind)) in specs.iter().enumerate() {
            let ns = names[i + 1].clone();
            let (dev, gen_dev) = (format!("ibr{i}"), format!("ibg{i}"));
            nets.link(
                &gen_ns,
                &gen_dev,
                &[],
                &ns,
                &dev,
                &[&format!("{RECEIVER_ADDR}/24")],
            );
            sh_ok(&[
                "ip",
                "-n",
                &ns,
                "link",
                "set",
                &dev,
                "address",
                "02:00:00:00:00:0b",
            ])?;
            let mut link = None;
            let counter = match *kind {
                "none" => Counter::RxPackets,
                "xdpdrop" => {
                    let idx = ifindex(&ns, &dev)?;
                    let ns2 = ns.clone();
                    link = Some(
                        std::thread::spawn(move || {
                            traffic::enter(&ns2);
                            raw::attach_xdp(bare_drop, idx)
                        })
                        .join()
                        .map_err(|_| anyhow::anyhow!("attach thread panicked"))??,
                    );
                    Counter::XdpDrops
                }
                "xdpfilter" => {
                    // xdp-filter keeps one set of maps for the whole machine: never touch a
                    // user's.
                    if Path::new("/sys/fs/bpf/xdp-filter").exists() {
                        bail!(
                            "/sys/fs/bpf/xdp-filter exists: xdp-filter is in use on this machine, and the benchmark would change its maps"
                        );
                    }
                    in_ns(&ns, &["xdp-filter", "load", &dev, "-m", "native"])?;
                    in_ns(&ns, &["xdp-filter", "ip", SOURCE, "-m", "src"])?;
                    xdp_filter_dev = Some((ns.clone(), dev.clone()));
                    Counter::XdpDrops
                }
                "ours1" | "oursbig" => {
                    let iso = Iso::with_bin(&ns, o.bin.into());
                    let policy = iso.policy(
                        "[whitelist]\nenabled = true\nlog = true\nallow = [\"192.0.2.0/24\"]\n",
                    );
                    iso.ok(&[
                        "load", "--iface", &dev, "--mode", "native", "--policy", &policy,
                    ]);
                    if *kind == "oursbig" {
                        let list = tmp.join(format!("r{i}.txt"));
                        let mut text = String::new();
                        for k in 0..big {
                            writeln!(text, "{}", crate::v4_key(k))?;
                            writeln!(text, "{}", crate::v6_key(k))?;
                        }
                        std::fs::write(&list, text)?;
                        iso.ok(&["whitelist", "add", "--file", list.to_str().unwrap()]);
                    }
                    let paths = iso.paths();
                    instances.push(iso);
                    Counter::Ours(paths)
                }
                k if k.starts_with("ipt:") => {
                    let f: Vec<&str> = k.split(':').collect();
                    let (table, set_type, size) = (f[1], f[2], f[3]);
                    let n = if size == "big" { big } else { 1 };
                    let mut restore = format!(
                        "create bench hash:{set_type} family inet hashsize {} maxelem {}\n",
                        n.next_power_of_two().max(64),
                        (n * 2).max(64)
                    );
                    if set_type == "ip" {
                        writeln!(restore, "add bench {SOURCE}")?;
                        for k in 1..n {
                            writeln!(restore, "add bench {}", crate::v4_key(k))?;
                        }
                    } else {
                        writeln!(restore, "add bench 203.0.113.0/24")?;
                        for k in 1..n {
                            writeln!(restore, "add bench {}/24", crate::v4_key(k << 8))?;
                        }
                    }
                    let file = tmp.join(format!("r{i}.ipset"));
                    std::fs::write(&file, restore)?;
                    in_ns(&ns, &["ipset", "restore", "-file", file.to_str().unwrap()])?;
                    let chain = if table == "raw" {
                        "PREROUTING"
                    } else {
                        "INPUT"
                    };
                    in_ns(
                        &ns,
                        &[
                            "iptables",
                            "-t",
                            table,
                            "-A",
                            chain,
                            "-m",
                            "set",
                            "--match-set",
                            "bench",
                            "src",
                            "-j",
                            "DROP",
                        ],
                    )?;
                    Counter::Iptables(if table == "raw" { "raw" } else { "filter" }, chain)
                }
                k if k.starts_with("nft:") => {
                    let n = if k.ends_with("big") { big } else { 1 };
                    let mut nft = format!(
                        "table netdev bench {{\n set s {{\n  type ipv4_addr\n  size {}\n  elements = {{ {SOURCE}",
                        (n * 2).max(64)
                    );
                    for k in 1..n {
                        write!(nft, ", {}", crate::v4_key(k))?;
                    }
                    write!(
                        nft,
                        " }}\n }}\n chain ingress {{\n  type filter hook ingress device {dev} priority 0;\n  ip saddr @s counter drop\n }}\n}}\n"
                    )?;
                    let file = tmp.join(format!("r{i}.nft"));
                    std::fs::write(&file, nft)?;
                    in_ns(&ns, &["nft", "-f", file.to_str().unwrap()])?;
                    Counter::Nft
                }
                _ => unreachable!(),
            };
            // GRO on: the veth then takes XDP frames without a program of its own.
            sh_ok(&[
                "ip", "netns", "exec", &ns, "ethtool", "-K", &dev, "gro", "on",
            ])?;
            receivers.push(Receiver {
                label: label.clone(),
                ns,
                dev,
                gen_ifindex: ifindex(&gen_ns, &gen_dev)?,
                counter,
                _link: link,
            });
        }

        let one = Generator {
            label: "one source (IPv4)",
            fd: raw::load_xdp_ret(raw::XDP_TX)?,
            frame: frame_v4(),
        };
        // The last 4 bytes of the IPv6 source (offset 14 + 8 + 12).
        let many = Generator {
            label: "2^20 random sources (IPv6)",
            fd: raw::load_xdp_tx_random(34, 0, 1 << MANY_BITS)?,
            frame: frame_v6(),
        };
        // Every case, then the same again in the next round: interleaved.
        let mut cases: Vec<(&Generator, usize)> = (0..receivers.len()).map(|r| (&one, r)).collect();
        for (r, rx) in receivers.iter().enumerate() {
            if matches!(rx.counter, Counter::XdpDrops) && rx.label.starts_with("bare")
                || rx.label.contains(&format!("{big} whitelist"))
            {
                cases.push((&many, r));
            }
        }
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut offered: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for _ in 0..o.rounds {
            for (k, (g, r)) in cases.iter().enumerate() {
                let (sent, secs, got) = blast(&gen_ns, g, &receivers[*r], o.seconds)?;
                rates[k].push(got as f64 / secs / 1e6);
                offered[k].push(sent as f64 / secs / 1e6);
            }
        }
        let rows: Vec<report::LiveRow> = cases
            .iter()
            .enumerate()
            .map(|(k, (g, r))| report::LiveRow {
                generator: g.label,
                receiver: receivers[*r].label.clone(),
                mpps: report::median(&rates[k]),
                spread: report::spread(&rates[k]),
                offered: report::median(&offered[k]),
            })
            .collect();
        report::live_table(md, &rows, o)?;
        let rate = |g: &str, rx: &str| {
            rows.iter()
                .find(|r| r.generator == g && r.receiver.starts_with(rx))
                .map(|r| r.mpps)
                .unwrap_or(f64::NAN)
        };
        let ours = rate(one.label, &format!("isolation-user, {big} "));
        let (bare, filter) = (
            rate(one.label, "bare XDP_DROP"),
            rate(one.label, "xdp-filter"),
        );
        targets.push(report::Target {
            what: format!("drop rate with {big} entries ≥ 0.9× bare XDP_DROP"),
            measured: format!("{:.2}× ({ours:.2} against {bare:.2} Mpps)", ours / bare),
            met: ours / bare >= 0.9,
        });
        targets.push(report::Target {
            what: "… and above xdp-filter".into(),
            measured: format!("{:.2}× xdp-filter ({filter:.2} Mpps)", ours / filter),
            met: ours > filter,
        });
        Ok(())
    })();
    if let Some((ns, dev)) = xdp_filter_dev {
        let _ = in_ns(&ns, &["xdp-filter", "unload", &dev]);
    }
    // Our instances unload before their namespaces go.
    drop(instances);
    drop(receivers);
    drop(nets);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
