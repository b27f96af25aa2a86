//! `check SRC DST [--proto P --dport N]`: the verdict the live datapath would give a new
//! connection, read from the live maps (not the policy file), and what decides it.

use std::net::IpAddr;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;

use crate::{backend::Query, engine, state::Paths};

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
    let proto = a.proto.as_deref().map(proto_number).transpose()?;
    if matches!(proto, Some(6 | 17)) && a.dport.is_none() {
        bail!("give --dport for {}", a.proto.as_deref().unwrap_or(""));
    }
    let answer = engine::check(
        paths,
        &Query {
            src: a.src,
            dst: a.dst,
            proto,
            dport: a.dport,
        },
    )?;
    if a.json {
        println!(
            "{}",
            json!({ "verdict": answer.verdict, "stage": answer.stage, "reason": answer.reason, "generation": answer.generation })
        );
    } else {
        println!(
            "{}: {}",
            answer.verdict.name().to_uppercase(),
            answer.reason
        );
    }
    Ok(())
}
