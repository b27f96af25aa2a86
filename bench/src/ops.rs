//! Operations: how long `apply` takes (the isolation policy at the design's caps, a 1M-entry
//! whitelist, the no-op of applying the live policy again, and back to an empty policy),
//! and how long after a write of the policy file the running service gives the new verdict
//! to real traffic. Both backends, interleaved rounds, median and spread.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tests::{iso::Iso, netns::Netns, service::Service, traffic::Echo};

use crate::report::{self, median, spread};

pub struct OpsOpts<'a> {
    pub bin: &'a Path,
    /// Whitelist entries of the big policy.
    pub big: u32,
    /// IPv4 prefixes of the caps policy (65,536 in a full run).
    pub prefixes: u32,
    pub rounds: usize,
    /// Rounds of the file-write → verdict measurement.
    pub latency_rounds: usize,
}

const NETS: u32 = 64;

/// The isolation policy at the caps: 64 networks, 64 allow rules, 64 except entries (whose
/// 64 /32s count among the prefixes), `prefixes` distinct IPv4 prefixes in all (10.0.0.0/8
/// and up: policy data only, no traffic goes there).
fn caps_policy(prefixes: u32) -> String {
    let per = (prefixes - NETS) / NETS;
    let mut p = String::from("[isolation]\ndefault = \"deny\"\nreject = true\n");
    for k in 0..NETS {
        let subnets: Vec<String> = (0..per)
            .map(|j| {
                let a = Ipv4Addr::from(0x0a00_0000u32 + ((j * NETS + k) << 8));
                format!("\"{a}/24\"")
            })
            .collect();
        let _ = writeln!(p, "[networks.n{k}]\nsubnets = [{}]", subnets.join(", "));
    }
    for k in 0..NETS {
        let _ = writeln!(
            p,
            "[[isolation.allow]]\nfrom = \"n{k}\"\nto = \"n{}\"\nports = [\"tcp:80\"]",
            (k + 1) % NETS
        );
    }
    for k in 0..NETS {
        let a = Ipv4Addr::from(0x0a00_0000u32 + (k << 8) + 1);
        let b = Ipv4Addr::from(0x0a00_0000u32 + (((k + 1) % NETS) << 8) + 1);
        let _ = writeln!(
            p,
            "[[isolation.except]]\nfrom = \"{a}/32\"\nto = \"{b}/32\""
        );
    }
    p
}

pub fn whitelist_policy(n: u32) -> String {
    whitelist_policy_of(n, false)
}

/// `whitelist_policy`, of IPv6 addresses (2001:db8:ffff::/96) with `v6`.
fn whitelist_policy_of(n: u32, v6: bool) -> String {
    let mut p = String::with_capacity(n as usize * 30 + 64);
    p.push_str("[whitelist]\nenabled = true\nlog = false\nallow = [\n");
    for i in 0..n {
        let _ = if v6 {
            writeln!(p, "\"{}\",", crate::v6_key(i))
        } else {
            writeln!(p, "\"{}\",", Ipv4Addr::from(0x0a00_0000u32 + i))
        };
    }
    p.push_str("]\n");
    p
}

fn timed(iso: &Iso, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let o = iso.run(args);
    let s = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "isolation-user {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(s)
}

pub fn run(md: &mut String, targets: &mut Vec<report::Target>, o: &OpsOpts) -> Result<()> {
    let ns_name = tests::unique("isobo");
    let ns = Netns::new(&[&ns_name]);
    ns.link(&ns_name, "b0", &[], &ns_name, "b1", &[]);
    writeln!(md, "## `apply`: replacing the whole policy\n")?;
    writeln!(
        md,
        "`isolation-user apply FILE` against a loaded datapath, command start to exit (the \
         policy is enforced before the exit). *caps*: {NETS} networks, {NETS} allow rules and \
         {NETS} except entries naming {} distinct IPv4 prefixes in all, applied over an empty \
         policy; *{} whitelist*: \
         that many IPv4 (or IPv6) addresses, over an empty policy; *no-op*: the same file applied \
         again (what the service does on a SIGHUP with an unchanged file: known by its text's \
         digest, not parsed); *no-op, other text*: the same policy from a file whose text \
         differs (a comment added: parsed and compared); *back to empty*: from the big \
         whitelist. {} rounds, interleaved; median (spread).\n",
        o.prefixes, o.big, o.rounds
    )?;
    writeln!(
        md,
        "| backend | caps | {} whitelist | no-op | no-op, other text | back to empty |\n| --- | ---: | ---: | ---: | ---: | ---: |",
        o.big
    )?;
    let dir = std::env::temp_dir().join(tests::unique("isobo"));
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, text: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let empty = write("empty.toml", "")?;
    let caps = write("caps.toml", &caps_policy(o.prefixes))?;
    let mut big_medians = Vec::new();
    for (fam, v6) in [("IPv4", false), ("IPv6", true)] {
        let text = whitelist_policy_of(o.big, v6);
        let big = write(&format!("big-{fam}.toml"), &text)?;
        let other = write(&format!("other-{fam}.toml"), &format!("{text}# the same\n"))?;
        for (backend, iface) in [("ebpf", "b0"), ("iptables", "b1")] {
            let mut iso = Iso::with_bin(&ns_name, o.bin.into());
            iso.backend = Some(backend.into());
            iso.ok(&["load", "--iface", iface, "--policy", &empty]);
            let (mut c, mut b, mut n, mut t, mut e) = (vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..o.rounds {
                c.push(timed(&iso, &["apply", &caps])?);
                timed(&iso, &["apply", &empty])?;
                b.push(timed(&iso, &["apply", &big])?);
                n.push(timed(&iso, &["apply", &big])?);
                t.push(timed(&iso, &["apply", &other])?);
                e.push(timed(&iso, &["apply", &empty])?);
            }
            let cell = |v: &[f64]| format!("{:.3} s ({:.0}%)", median(v), spread(v));
            writeln!(
                md,
                "| {backend}, {fam} | {} | {} | {} | {} | {} |",
                cell(&c),
                cell(&b),
                cell(&n),
                cell(&t),
                cell(&e)
            )?;
            big_medians.push((backend, fam, median(&b), median(&n)));
            iso.run(&["unload"]);
        }
    }
    writeln!(md)?;
    for (backend, fam, s, noop) in big_medians {
        targets.push(report::Target {
            what: format!(
                "`apply` of a {}-entry {fam} whitelist ({backend}) ≤ 2 s",
                o.big
            ),
            measured: format!("{s:.2} s"),
            met: s <= 2.0,
        });
        targets.push(report::Target {
            what: format!(
                "no-op `apply` of the {}-entry {fam} policy, the same file again ({backend}) ≤ 0.3 s",
                o.big
            ),
            measured: format!("{noop:.3} s"),
            met: noop <= 0.3,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(ns);
    latency(md, targets, o)
}

/// File write → new verdict: the service runs with a whitelist that leaves the client out;
/// the client sends a UDP datagram every 0.5 ms from a fresh port; the file is replaced (an
/// editor's write-and-rename) by one that admits it; the time to the first echo is measured.
fn latency(md: &mut String, targets: &mut Vec<report::Target>, o: &OpsOpts) -> Result<()> {
    let (srv, cl) = (tests::unique("isobs"), tests::unique("isobk"));
    let ns = Netns::new(&[&srv, &cl]);
    ns.link(&srv, "s0", &["192.0.2.1/24"], &cl, "c0", &["192.0.2.2/24"]);
    let _echo = Echo::start(&srv, &["0.0.0.0:9000".parse()?]);
    let out =
        |allow: &str| format!("[whitelist]\nenabled = true\nlog = false\nallow = [\"{allow}\"]\n");
    writeln!(md, "## Policy file write → new verdict (the service)\n")?;
    writeln!(
        md,
        "`isolation-user run` watches the policy file. The file, which leaves a client out of \
         the whitelist, is replaced by one that admits it (written beside, then renamed over: an \
         editor's save); the client sends a UDP datagram every 0.5 ms from a fresh port and the \
         time from the rename to the first echo is measured. {} rounds; median, spread, max.\n",
        o.latency_rounds
    )?;
    writeln!(
        md,
        "| backend | median | spread | max |\n| --- | ---: | ---: | ---: |"
    )?;
    for backend in ["ebpf", "iptables"] {
        let mut iso = Iso::with_bin(&srv, o.bin.into());
        iso.backend = Some(backend.into());
        let dir = iso.files_dir().join("etc");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("policy.toml");
        let replace = |text: &str| -> Result<()> {
            let tmp = dir.join(".policy.toml.new");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &file)?;
            Ok(())
        };
        replace(&out("192.0.2.99"))?;
        let f = file.display().to_string();
        let svc = Service::start(
            &iso,
            &["--iface", "s0", "--policy", &f, "--no-drop-log"],
            9109,
        );
        let generation = |svc: &Service| -> u64 {
            svc.scrape()
                .lines()
                .find_map(|l| l.strip_prefix("isolation_policy_generation "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut ms = Vec::new();
        for round in 0..o.latency_rounds {
            // Out of the whitelist again (after the first round), and applied.
            let g = generation(&svc);
            if round > 0 {
                replace(&out("192.0.2.99"))?;
            }
            let t = Instant::now();
            while round > 0 && generation(&svc) == g {
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("the service did not apply the file: {}", svc.log_text());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let client = std::thread::spawn({
                let cl = cl.clone();
                move || -> Option<Instant> {
                    tests::traffic::enter(&cl);
                    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
                    s.connect(SocketAddr::from(([192, 0, 2, 1], 9000))).ok()?;
                    s.set_nonblocking(true).ok()?;
                    let end = Instant::now() + Duration::from_secs(5);
                    let mut buf = [0u8; 64];
                    while Instant::now() < end {
                        let _ = s.send(b"probe");
                        std::thread::sleep(Duration::from_micros(500));
                        if s.recv(&mut buf).is_ok() {
                            return Some(Instant::now());
                        }
                    }
                    None
                }
            });
            // The client is sending (and being dropped) before the write.
            std::thread::sleep(Duration::from_millis(50));
            let before = generation(&svc);
            let t0 = Instant::now();
            replace(&out("192.0.2.2"))?;
            match client.join().unwrap() {
                Some(t) => ms.push((t - t0).as_secs_f64() * 1000.0),
                None => bail!("no echo 5 s after the write: {}", svc.log_text()),
            }
            // The apply is whole before the next round writes again: its map edits (which
            // let the echo through) come before its new generation, and a write landing
            // before that would be taken with this one as a single change.
            let t = Instant::now();
            while generation(&svc) == before {
                if t.elapsed() > Duration::from_secs(5) {
                    bail!(
                        "the service did not finish applying the file: {}",
                        svc.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        drop(svc);
        let max = ms.iter().cloned().fold(0.0, f64::max);
        writeln!(
            md,
            "| {backend} | {:.1} ms | {:.0}% | {max:.1} ms |",
            median(&ms),
            spread(&ms)
        )?;
        targets.push(report::Target {
            what: format!("policy file write → new verdict ≤ 1 s ({backend}, worst round)"),
            measured: format!("{max:.1} ms (median {:.1} ms)", median(&ms)),
            met: max <= 1000.0,
        });
    }
    writeln!(md)?;
    drop(ns);
    Ok(())
}
