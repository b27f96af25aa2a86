//! `check SRC DST [--proto P --dport N]`: the verdict the live datapath would give a new
//! connection, read from the live maps (not the policy file), and what decides it.

use std::net::IpAddr;

use anyhow::{Result, bail};
use clap::Args;
use isolation_common::{flags, iso_flags};
use serde_json::json;

use crate::{
    compile::{self, Decision},
    datapath::{self, WhitelistMaps},
    state::{self, Paths},
};

#[derive(Args, Debug)]
pub struct CheckArgs {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// tcp, udp, icmp, icmpv6, or a protocol number; none = a packet of any protocol.
    #[arg(long)]
    pub proto: Option<String>,
    /// Destination port (tcp, udp).
    #[arg(long)]
    pub dport: Option<u16>,
    #[arg(long)]
    pub json: bool,
}

fn proto_number(p: &str) -> Result<u8> {
    Ok(match p {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse().map_err(|_| {
            anyhow::anyhow!("bad protocol '{n}': tcp, udp, icmp, icmpv6 or a number")
        })?,
    })
}

pub fn run(paths: &Paths, a: CheckArgs) -> Result<()> {
    if a.src.is_ipv4() != a.dst.is_ipv4() {
        bail!("{} and {} are not of the same IP version", a.src, a.dst);
    }
    let proto = match &a.proto {
        Some(p) => proto_number(p)?,
        None => 255,
    };
    let ports = match (proto, a.dport) {
        (6 | 17, Some(d)) => Some((0, d)),
        (6 | 17, None) => bail!("give --dport for {}", a.proto.as_deref().unwrap_or("")),
        (1 | 58, _) => Some((1, 0)),
        _ => None,
    };
    let cfg = datapath::read_config(paths)?;
    let live = state::live_policy(paths)?;
    let names = compile::compile(&live).map_err(anyhow::Error::msg)?;

    // Stage 1: the host whitelist.
    let mut stage = "whitelist";
    let (mut verdict, mut why) = ("pass", "whitelist off".to_string());
    if cfg.flags & flags::WHITELIST_ENABLED != 0 {
        let admitting = WhitelistMaps::open(paths)?.admitting(a.src)?;
        match admitting.first() {
            Some(n) => why = format!("whitelisted by {n}"),
            None => {
                verdict = "drop";
                why = format!(
                    "{} is not whitelisted (only replies of connections opened from here get in)",
                    a.src
                );
            }
        }
    }
    // Stage 2: isolation.
    if verdict == "pass" {
        let meta = datapath::live_meta(paths, cfg.slot)?;
        let s = datapath::live_net_entry(paths, cfg.slot, a.src)?;
        let d = datapath::live_net_entry(paths, cfg.slot, a.dst)?;
        let index = compile::port_index(if proto == 255 { 47 } else { proto }, ports);
        let mask = datapath::live_port_mask(paths, cfg.slot, index)?;
        let decision = compile::decide(meta.flags, s, d, mask, false);
        if decision != Decision::NotSubject {
            stage = "isolation";
        }
        let name = |v: &Vec<String>, i: u32| {
            v.get(i as usize)
                .cloned()
                .unwrap_or_else(|| format!("rule #{i}"))
        };
        match decision {
            Decision::NotSubject if meta.flags & iso_flags::ENABLED == 0 => {}
            Decision::NotSubject => {
                why =
                    format!("{why}; not subject to isolation (source or destination in no network)")
            }
            Decision::Except(j) => why = format!("{} (except #{j})", name(&names.except_names, j)),
            Decision::Hairpin => why = "source and destination share a network (hairpin)".into(),
            Decision::Established => why = "established".into(),
            Decision::Allow(k) => why = format!("{} (allow #{k})", name(&names.allow_names, k)),
            Decision::DefaultAccept => why = "no rule matches; default accept".into(),
            Decision::Deny => {
                verdict = if meta.flags & iso_flags::REJECT != 0 {
                    "reject"
                } else {
                    "drop"
                };
                why = "no rule matches; default deny".into();
            }
        }
    }
    if a.json {
        println!(
            "{}",
            json!({ "verdict": verdict, "stage": stage, "reason": why, "generation": cfg.generation })
        );
    } else {
        println!("{}: {why}", verdict.to_uppercase());
    }
    Ok(())
}
