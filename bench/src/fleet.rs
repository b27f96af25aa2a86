//! The fleet: from `fleet push` to the last node's applied record in etcd, for fleets of 20
//! and 50 nodes (each a service in a namespace of its own, filtering its own interface, all
//! on one bridge with a real etcd), with a small policy and with a 1M-entry whitelist.
//!
//! Each fleet runs on a one-member etcd, then on a three-member cluster, whose leader is
//! also killed during a push (the time from the kill to the last node converged).
//!
//! The clock starts when the `fleet push` command starts (it reads, checks and writes the
//! file, as an operator runs it) and stops at the `time` the last node wrote in its record
//! (after its engine transaction), so the poll that notices the end adds nothing.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use isolation_user::{fleet, state::unix_now};
use tests::{fleet::Hub, iso::Iso, netns::Netns, service::Service};

use crate::report::{self, median, spread};

pub struct FleetOpts<'a> {
    pub bin: &'a Path,
    /// Fleet sizes, ascending (nodes are added to reach each).
    pub sizes: &'a [usize],
    /// Whitelist entries of the big policy.
    pub big: u32,
    pub rounds_small: usize,
    pub rounds_big: usize,
    /// etcd cluster sizes, each with a fleet of its own (the nodes given every member).
    pub members: &'a [usize],
    /// Rounds of the leader-loss case, on clusters of more than one member.
    pub rounds_leader: usize,
}

/// One push: (first node, last node) in seconds after the push command started, and the
/// push command's own time.
struct Took {
    first: f64,
    last: f64,
    push: f64,
}

fn small(allow: &str) -> String {
    format!("[whitelist]\nenabled = true\nlog = false\nallow = [\"{allow}\"]\n")
}

/// The policy files every cluster's fleet is pushed.
struct Files {
    small: [String; 2],
    big_a: String,
    big_b: String,
}

pub fn run(md: &mut String, targets: &mut Vec<report::Target>, o: &FleetOpts) -> Result<()> {
    let dir = std::env::temp_dir().join(tests::unique("isobf"));
    std::fs::create_dir_all(&dir)?;
    let write = |name: &str, text: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let big_text = crate::ops::whitelist_policy(o.big);
    // The same whitelist with one address in the middle changed.
    let mid = format!(
        "\"{}\",",
        std::net::Ipv4Addr::from(0x0a00_0000u32 + o.big / 2)
    );
    if !big_text.contains(&mid) {
        bail!("{mid} is not in the big policy");
    }
    let files = Files {
        small: [
            write("small-a.toml", &small("192.0.2.1"))?,
            write("small-b.toml", &small("192.0.2.2"))?,
        ],
        big_a: write("big-a.toml", &big_text)?,
        big_b: write("big-b.toml", &big_text.replacen(&mid, "\"192.0.2.77\",", 1))?,
    };
    let push_size = std::fs::metadata(&files.big_a)?.len() as f64 / (1 << 20) as f64;
    let parsed = isolation_user::policy::parse("big", &big_text)?;
    let stored = match fleet::encode(&big_text, &parsed).manifest {
        Some(m) => format!(
            "stored in {} parts, {:.1} MiB in all",
            m.parts.len(),
            m.size as f64 / (1 << 20) as f64
        ),
        None => "stored whole".into(),
    };
    drop((big_text, parsed));

    writeln!(
        md,
        "## Fleet: `fleet push` → the last node's applied record\n"
    )?;
    writeln!(
        md,
        "N services (`run --policy-source etcd://…`), each in a namespace of its own filtering \
         its own veth, all on one bridge with a real etcd (Debian's 3.4, defaults: one member, \
         then a cluster of {} members the nodes and `fleet push` are given all of), all on this \
         machine's 2 cores. The clock starts as the `fleet push` command starts and stops at the \
         time the last node wrote in its record, after its engine transaction; *first* is the \
         first node's. *small*: a whitelist of one address, changed; *small → {big}*: a \
         {big}-address whitelist ({push_size:.1} MiB of TOML, {stored}) over the small \
         one; *{big}, one address changed*: the next push, one line edited; *{big} → small*: \
         back. {} rounds for the small policy, {} for the big ones; median (spread). *push*: the \
         `fleet push` command's own time.\n",
        o.members.iter().max().copied().unwrap_or(1),
        o.rounds_small,
        o.rounds_big,
        big = o.big,
    )?;
    writeln!(
        md,
        "| etcd members | nodes | change | first node | last node | push |\n\
         | ---: | ---: | --- | ---: | ---: | ---: |"
    )?;
    let mut peak_rss = 0u64;
    let mut leader_rows = Vec::new();
    for &m in o.members {
        cluster(md, targets, o, m, &files, &mut peak_rss, &mut leader_rows)?;
    }
    writeln!(
        md,
        "\nThe most memory a node's service held (peak RSS, `VmHWM`) over these pushes: {:.0} MiB.\n",
        peak_rss as f64 / 1024.0
    )?;
    if !leader_rows.is_empty() {
        writeln!(
            md,
            "**The leader lost.** With the cluster of {} members, its leader is killed (SIGKILL, \
             as a crash) and at once the small policy is pushed (`fleet push` gets an answer \
             once the members left have elected a new leader); the clock starts at the kill and \
             stops at the time the last node wrote in its record. The killed member is started \
             again between rounds. {} rounds; median (spread).\n",
            o.members.iter().max().copied().unwrap_or(1),
            o.rounds_leader
        )?;
        writeln!(
            md,
            "| nodes | fault → first node | fault → last node | push |\n| ---: | ---: | ---: | ---: |"
        )?;
        for (n, v) in &leader_rows {
            let v: &Vec<Took> = v;
            writeln!(
                md,
                "| {n} | {} | {} | {} |",
                cell(&v.iter().map(|t| t.first).collect::<Vec<_>>()),
                cell(&v.iter().map(|t| t.last).collect::<Vec<_>>()),
                cell(&v.iter().map(|t| t.push).collect::<Vec<_>>())
            )?;
        }
        writeln!(md)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One etcd of `members` members and a fleet grown to each of `o.sizes` on it: the rows of
/// the table, and (with more than one member) the leader-loss rounds.
fn cluster(
    md: &mut String,
    targets: &mut Vec<report::Target>,
    o: &FleetOpts,
    members: usize,
    files: &Files,
    peak_rss: &mut u64,
    leader_rows: &mut Vec<(usize, Vec<Took>)>,
) -> Result<()> {
    let mut hub = Hub::cluster(members);
    let url = hub.url("bench");
    // Each small push is the small policy the fleet was not on last (the same file again
    // would be refused as pushed already).
    let mut rev = push(&hub, o.bin, &files.small[0])?.0;
    let mut on = 0;
    let mut other_small = || {
        on = 1 - on;
        &files.small[on]
    };
    let mut spaces: Vec<Netns> = Vec::new();
    let mut services: Vec<Service> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut isos: Vec<Iso> = Vec::new();
    for &n in o.sizes {
        let add: Vec<String> = (names.len()..n).map(|_| tests::unique("isobn")).collect();
        let refs: Vec<&str> = add.iter().map(String::as_str).collect();
        spaces.push(Netns::new(&refs));
        for name in &add {
            let i = names.len();
            hub.attach(name, &format!("203.0.113.{}", 10 + i));
            // Kept until the end: an Iso unloads its datapath when dropped.
            isos.push(Iso::with_bin(name, o.bin.into()));
            let iso = isos.last().unwrap();
            let node = format!("n{i:02}");
            services.push(Service::start(
                iso,
                &[
                    "--iface",
                    "m0",
                    "--policy-source",
                    &url,
                    "--node-name",
                    &node,
                    "--no-drop-log",
                ],
                9108,
            ));
            names.push(name.clone());
        }
        wait_all(&hub, &url, n, rev, Duration::from_secs(120))?;

        let mut rows: Vec<(String, Vec<Took>)> = Vec::new();
        let mut s = Vec::new();
        for _ in 0..o.rounds_small {
            s.push(measure(&hub, o.bin, &url, other_small(), n)?.0);
        }
        rows.push(("small".into(), s));
        let (mut up, mut edit, mut down) = (vec![], vec![], vec![]);
        for _ in 0..o.rounds_big {
            let (t, _) = measure(&hub, o.bin, &url, &files.big_a, n)?;
            up.push(t);
            let (t, _) = measure(&hub, o.bin, &url, &files.big_b, n)?;
            edit.push(t);
            *peak_rss = (*peak_rss).max(services.iter().map(vm_hwm).max().unwrap_or(0));
            // Back to the small policy the fleet was not on before.
            let (t, r2) = measure(&hub, o.bin, &url, other_small(), n)?;
            down.push(t);
            rev = r2;
        }
        rows.push((format!("small → {}", o.big), up));
        rows.push((format!("{}, one address changed", o.big), edit));
        rows.push((format!("{} → small", o.big), down));
        for (what, v) in &rows {
            let f: Vec<f64> = v.iter().map(|t| t.first).collect();
            let l: Vec<f64> = v.iter().map(|t| t.last).collect();
            let p: Vec<f64> = v.iter().map(|t| t.push).collect();
            writeln!(
                md,
                "| {members} | {n} | {what} | {} | {} | {} |",
                cell(&f),
                cell(&l),
                cell(&p)
            )?;
        }
        if members == 1 {
            let last: Vec<f64> = rows[0].1.iter().map(|t| t.last).collect();
            let worst = last.iter().cloned().fold(0.0, f64::max);
            targets.push(report::Target {
                what: format!(
                    "`fleet push` → last of {n} nodes applied, small policy ≤ 1 s (worst round)"
                ),
                measured: format!(
                    "{:.0} ms (median {:.0} ms)",
                    worst * 1e3,
                    median(&last) * 1e3
                ),
                met: worst <= 1.0,
            });
        }
        if members > 1 {
            let mut v = Vec::new();
            for _ in 0..o.rounds_leader {
                let (t, r2) = leader_lost(&mut hub, o.bin, &url, other_small(), n)?;
                v.push(t);
                rev = r2;
            }
            leader_rows.push((n, v));
        }
    }
    drop(services);
    drop(isos);
    drop(spaces);
    Ok(())
}

/// Kills the cluster's leader, pushes `file` at once and waits until all `n` nodes recorded
/// it: the times from the kill. The member killed is started again before this returns.
fn leader_lost(hub: &mut Hub, bin: &Path, url: &str, file: &str, n: usize) -> Result<(Took, i64)> {
    let leader = hub
        .wait_leader(Duration::from_secs(30))
        .context("the etcd cluster named no leader within 30 s")?;
    let t0 = unix_now();
    hub.kill_member(leader);
    let measured = converged(hub, bin, url, file, n, t0, Duration::from_secs(120));
    hub.start_member(leader);
    measured
}

fn cell(v: &[f64]) -> String {
    let m = median(v);
    if m < 1.0 {
        format!("{:.0} ms ({:.0}%)", m * 1e3, spread(v))
    } else {
        format!("{m:.2} s ({:.0}%)", spread(v))
    }
}

/// Peak resident memory of a service, in KiB.
fn vm_hwm(s: &Service) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", s.child.id()))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// `fleet push FILE`, run in the hub as an operator runs it: the new revision and the
/// command's time.
fn push(hub: &Hub, bin: &Path, file: &str) -> Result<(i64, f64)> {
    let t = Instant::now();
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", hub.hub))
        .arg(bin)
        .args(["fleet", "push", file, "--etcd", &hub.url("bench")])
        .output()?;
    let took = t.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!("fleet push {file}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let rev = out
        .split("as revision ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no revision in {out}"))?;
    Ok((rev, took))
}

/// Pushes `file` and waits until all `n` nodes recorded its revision: the times.
fn measure(hub: &Hub, bin: &Path, url: &str, file: &str, n: usize) -> Result<(Took, i64)> {
    converged(hub, bin, url, file, n, unix_now(), Duration::from_secs(600))
}

/// Pushes `file` and waits up to `limit` until all `n` nodes recorded its revision: the
/// times from `t0` (a unix time), and the revision.
fn converged(
    hub: &Hub,
    bin: &Path,
    url: &str,
    file: &str,
    n: usize,
    t0: f64,
    limit: Duration,
) -> Result<(Took, i64)> {
    let (rev, push_s) = push(hub, bin, file)?;
    let times = wait_all(hub, url, n, rev, limit)?;
    let first = times.iter().cloned().fold(f64::MAX, f64::min) - t0;
    let last = times.iter().cloned().fold(f64::MIN, f64::max) - t0;
    Ok((
        Took {
            first,
            last,
            push: push_s,
        },
        rev,
    ))
}

/// Polls (every 20 ms, from inside the hub) until `n` nodes report `rev` applied; their
/// records' times.
fn wait_all(hub: &Hub, url: &str, n: usize, rev: i64, limit: Duration) -> Result<Vec<f64>> {
    let url: fleet::EtcdUrl = url.parse().map_err(anyhow::Error::msg)?;
    tests::traffic::in_ns(&hub.hub, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                let opts = fleet::EtcdOpts::default();
                let mut c = fleet::connect(&url, &opts, Duration::from_secs(5)).await?;
                let t = Instant::now();
                loop {
                    // A fleet starting or applying on 2 cores can starve this connection:
                    // a failed read reconnects, within the same time limit.
                    let nodes = match fleet::read_nodes(&mut c, &url).await {
                        Ok(n) => n,
                        Err(e) if t.elapsed() < limit => {
                            eprintln!("fleet bench: reading the node records: {e:#}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if let Ok(c2) =
                                fleet::connect(&url, &opts, Duration::from_secs(5)).await
                            {
                                c = c2;
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    // Well-formed records only (the bench writes nothing else there).
                    let nodes: Vec<&fleet::NodeRecord> = nodes
                        .iter()
                        .filter_map(|e| e.record.as_ref().ok())
                        .collect();
                    if let Some(bad) = nodes.iter().find(|r| r.refused_revision == Some(rev)) {
                        bail!("node {} refused revision {rev}: {}", bad.node, bad.result);
                    }
                    let done: Vec<f64> = nodes
                        .iter()
                        .filter(|r| r.revision == rev && r.result == "ok")
                        .map(|r| r.time)
                        .collect();
                    if done.len() == n {
                        return Ok(done);
                    }
                    // Every node of the fleet shares this machine's memory: stop before the
                    // kernel's OOM killer picks a victim (etcd, a node, this harness).
                    let avail = mem_available_mib();
                    if avail < 768 {
                        bail!(
                            "the machine is out of memory ({avail} MiB available) with {n} \
                             nodes applying revision {rev}"
                        );
                    }
                    if t.elapsed() > limit {
                        bail!(
                            "{} of {n} nodes on revision {rev} after {limit:?}",
                            done.len()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
    })
}

/// MemAvailable of /proc/meminfo, in MiB (a large number when unreadable).
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}
