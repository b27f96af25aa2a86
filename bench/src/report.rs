//! BENCHMARKS.md and its SVG plot.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Result;

pub fn median(s: &[f64]) -> f64 {
    let mut v = s.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (max - min) / median, in percent: how far rounds of the same figure fell apart.
pub fn spread(s: &[f64]) -> f64 {
    let (lo, hi) = s
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    let m = median(s);
    if m > 0.0 { (hi - lo) / m * 100.0 } else { 0.0 }
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn header(md: &mut String, quick: bool, repeat: u32, rounds: usize) -> Result<()> {
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `cargo xtask bench{}`; every figure of a table comes from one run, next to",
        if quick { " --quick" } else { "" }
    )?;
    writeln!(
        md,
        "its baseline measured the same way in the same run. The machine is shared and noisy:"
    )?;
    writeln!(
        md,
        "the ratios are the verdict, the absolute figures only context.\n"
    )?;
    writeln!(
        md,
        "- machine: {} cores, {}, kernel {}",
        sh("nproc"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh("uname -r")
    )?;
    writeln!(md, "- date: {}", sh("date -u +%Y-%m-%dT%H:%MZ"))?;
    writeln!(
        md,
        "- verdict cost: BPF_PROG_TEST_RUN with repeat {repeat}, {rounds} interleaved rounds, median; spread = (max - min) / median"
    )?;
    if quick {
        writeln!(
            md,
            "- **a --quick smoke run**: small sizes and repeats; not figures to quote"
        )?;
    }
    writeln!(
        md,
        "- random keys: a 13-instruction wrapper writes a random source (within the set for hits, \
         outside it for misses) into the frame, then tail-calls the program; its floor is the same \
         wrapper tail-calling the bare program\n\nWhy the figures are what they are, and what was \
         changed because of them: [Where the time goes](#where-the-time-goes), at the end.\n"
    )?;
    Ok(())
}

pub fn verdict_tables(
    md: &mut String,
    per_size: &BTreeMap<u32, Vec<(String, f64, f64, f64)>>,
) -> Result<()> {
    writeln!(
        md,
        "## Verdict cost (ns per packet; one hot key, then random keys)\n"
    )?;
    for (n, rows) in per_size {
        writeln!(md, "### {n} whitelist entries per family\n")?;
        writeln!(md, "| case | ns/packet | spread | × bare XDP_PASS |")?;
        writeln!(md, "| --- | ---: | ---: | ---: |")?;
        for (name, m, s, r) in rows {
            writeln!(md, "| {name} | {m:.1} | {s:.0}% | {r:.2} |")?;
        }
        writeln!(md)?;
    }
    Ok(())
}

/// Wall times (s) and peak resident memory (KiB) of repeated runs of one command.
#[derive(Default, Clone)]
pub struct Runs {
    pub secs: Vec<f64>,
    pub kib: Vec<u64>,
}

impl Runs {
    pub fn push(&mut self, (t, m): (f64, u64)) {
        self.secs.push(t);
        self.kib.push(m);
    }
    pub fn median(&self) -> f64 {
        median(&self.secs)
    }
    fn kib_median(&self) -> f64 {
        median(&self.kib.iter().map(|k| *k as f64).collect::<Vec<_>>())
    }
    /// Two tools run one after the other: run i of each, summed (memory: the larger).
    pub fn then(&self, o: &Runs) -> Runs {
        Runs {
            secs: self.secs.iter().zip(&o.secs).map(|(a, b)| a + b).collect(),
            kib: self
                .kib
                .iter()
                .zip(&o.kib)
                .map(|(a, b)| *a.max(b))
                .collect(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn load_table(
    md: &mut String,
    n: u32,
    fam: &str,
    ours: &Runs,
    ours_ipt: &Runs,
    ipset: &Runs,
    nft: &Runs,
    kernel: &[(String, u64)],
) -> Result<()> {
    writeln!(md, "## Loading {n} {fam} whitelist addresses\n")?;
    writeln!(
        md,
        "Each tool loads the same {n} {fam} addresses into an empty set ({} runs, interleaved; \
         median and spread). Ours: `load` (no whitelist), then the timed `whitelist add --file`, \
         on the eBPF backend and on the iptables backend (which fills its `hash:net` set over \
         ipset's netlink protocol).\n",
        ours.secs.len()
    )?;
    tool_table(
        md,
        &[
            ("`isolation-user whitelist add --file`", ours),
            (
                "`isolation-user whitelist add --file`, iptables backend",
                ours_ipt,
            ),
            ("`ipset restore` (hash:ip)", ipset),
            (
                if fam == "IPv6" {
                    "`nft -f` (set of ipv6_addr)"
                } else {
                    "`nft -f` (set of ipv4_addr)"
                },
                nft,
            ),
        ],
    )?;
    writeln!(
        md,
        "Kernel memory the datapath's maps hold (`memlock` in the maps' fdinfo, as `bpftool map \
         show` reports it):\n"
    )?;
    writeln!(md, "| when | maps | kernel memory (MiB) |")?;
    writeln!(md, "| --- | --- | ---: |")?;
    for (what, bytes) in kernel {
        let (when, maps) = what.split_once('|').unwrap_or((what, ""));
        writeln!(md, "| {when} | {maps} | {:.2} |", *bytes as f64 / 1048576.0)?;
    }
    writeln!(md)?;
    Ok(())
}

/// Median wall time and peak memory per tool, with the spread of the times; the first row
/// is ours, the reference for the ratio.
fn tool_table(md: &mut String, rows: &[(&str, &Runs)]) -> Result<()> {
    writeln!(
        md,
        "| tool | wall time (s) | spread | peak memory (MiB) | × ours (time) |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: |")?;
    let ours = rows[0].1.median();
    for (name, r) in rows {
        writeln!(
            md,
            "| {name} | {:.2} | {:.0}% | {:.0} | {:.2} |",
            r.median(),
            spread(&r.secs),
            r.kib_median() / 1024.0,
            r.median() / ours
        )?;
    }
    writeln!(md)?;
    Ok(())
}

pub fn isolation_load_table(
    md: &mut String,
    nets: u32,
    prefixes: u32,
    ours: &Runs,
    ipset: &Runs,
    ipt: &Runs,
    nft: &Runs,
) -> Result<()> {
    writeln!(md, "## Loading an isolation policy at the design's caps\n")?;
    writeln!(
        md,
        "{nets} networks holding {prefixes} IPv4 subnets in all, and {nets} allow rules (network k \
         to network k+1, tcp:80). 100k isolation *rules* cannot be expressed: the datapath keeps \
         networks and rules as bits of a u64 (64 of each) and {} prefixes per family, and refuses \
         a larger policy whole. The iptables equivalent is one `hash:net` set per network and a \
         FORWARD rule matching two sets (this kernel lacks `hash:net,net`). {} runs of each, \
         interleaved; median and spread.\n",
        isolation_common::limits::NET_PREFIXES,
        ours.secs.len()
    )?;
    let sum = ipset.then(ipt);
    tool_table(
        md,
        &[
            (
                "`isolation-user load --policy` (load, attach, compile, fill)",
                ours,
            ),
            ("`ipset restore` (hash:net sets)", ipset),
            ("`iptables-restore` (the rules)", ipt),
            ("ipset + iptables together", &sum),
            ("`nft -f` (interval sets and rules)", nft),
        ],
    )
}

pub fn edit_table(md: &mut String, n: u32, ms: &[f64]) -> Result<()> {
    writeln!(md, "## Live edit latency\n")?;
    writeln!(
        md,
        "`isolation-user whitelist add ADDR` with {n} entries loaded, command start to exit (the map"
    )?;
    writeln!(
        md,
        "update that changes the verdict happens before exit): median {:.1} ms, spread {:.0}% over {} runs.\n",
        median(ms),
        spread(ms),
        ms.len()
    )?;
    Ok(())
}

/// Cost against whitelist size, one line per case (log-scale x).
pub fn svg(per_size: &BTreeMap<u32, Vec<(String, f64, f64, f64)>>, path: &Path) -> Result<()> {
    let (w, h, pad) = (720.0, 400.0, 60.0);
    let sizes: Vec<f64> = per_size.keys().map(|n| (*n as f64).log10()).collect();
    let (xmin, xmax) = (
        sizes.first().copied().unwrap_or(0.0),
        sizes.last().copied().unwrap_or(1.0).max(sizes[0] + 1.0),
    );
    let ymax = per_size.values().flatten().map(|r| r.1).fold(1.0, f64::max) * 1.1;
    let x = |v: f64| pad + (v - xmin) / (xmax - xmin) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v / ymax * (h - 2.0 * pad);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n"
    );
    s += &format!(
        "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"14\">Verdict cost (ns/packet) against whitelist entries per family</text>\n"
    );
    s += &format!(
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad,
        w - pad,
        h - pad
    );
    s += &format!(
        "<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - pad
    );
    for (n, lx) in per_size.keys().zip(&sizes) {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            x(*lx),
            h - pad + 16.0
        );
    }
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>\n",
            pad - 6.0,
            y(v) + 4.0
        );
    }
    let colors = [
        "#000000", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
    ];
    // The cases measured at every size (xdp-filter's stop at the 10,000 entries it holds).
    let names: Vec<String> = per_size
        .values()
        .next()
        .map(|rows| rows.iter().map(|r| r.0.clone()).collect())
        .unwrap_or_default();
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| per_size.values().all(|rows| rows.iter().any(|r| &r.0 == n)))
        .collect();
    for (c, name) in names.iter().enumerate() {
        let pts: Vec<String> = per_size
            .values()
            .zip(&sizes)
            .filter_map(|(rows, lx)| {
                let r = rows.iter().find(|r| &r.0 == name)?;
                Some(format!("{:.1},{:.1}", x(*lx), y(r.1)))
            })
            .collect();
        let color = colors[c % colors.len()];
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
            w - 250.0,
            pad + 14.0 * c as f64
        );
    }
    s += "</svg>\n";
    std::fs::write(path, s)?;
    Ok(())
}

/// One target of issue 5, as measured in this run.
pub struct Target {
    pub what: String,
    pub measured: String,
    pub met: bool,
}

pub fn targets_section(md: &mut String, targets: &[Target]) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Targets
"
    )?;
    writeln!(md, "| target | measured in this run | |")?;
    writeln!(md, "| --- | --- | --- |")?;
    for t in targets {
        writeln!(
            md,
            "| {} | {} | {} |",
            t.what,
            t.measured,
            if t.met { "met" } else { "**missed**" }
        )?;
    }
    writeln!(md)?;
    Ok(())
}
