//! Live edits of isolation: `network add|del|list`, `allow`, `disallow`, `except add|del`.
//! Each edit changes the live policy, validates it whole, and swaps it in atomically (the
//! new policy is compiled into the idle slot, then one config write flips to it).

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;

use crate::{
    engine::{self, Change, Done, Options},
    policy::{self, AllowRule, Endpoint, ExceptRule, Policy, PortSpec},
    state::Paths,
};

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network, or add subnets to it.
    Add {
        name: String,
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// Remove subnets from a network, or the whole network (it must be unused by rules).
    Del {
        name: String,
        #[arg(value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// Print the live networks.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct RuleArgs {
    /// A network name or a CIDR.
    pub from: String,
    /// A network name or a CIDR.
    pub to: String,
    /// tcp:80, udp:53, tcp:8000-8100 or icmp (repeat); none = any protocol and port.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum ExceptCmd {
    /// Never filter traffic between SRC and DST (either direction).
    Add { src: String, dst: String },
    /// Remove an except entry.
    Del { src: String, dst: String },
}

fn ports(list: &[String]) -> Result<Vec<PortSpec>> {
    list.iter()
        .map(|p| p.parse::<PortSpec>().map_err(anyhow::Error::msg))
        .collect()
}

fn cidr_list(list: &[String]) -> Result<Vec<IpNet>> {
    list.iter()
        .map(|c| policy::parse_net(c).map_err(anyhow::Error::msg))
        .collect()
}

fn endpoint(s: &str, p: &Policy) -> Result<Endpoint> {
    policy::parse_endpoint(s, &p.networks).map_err(anyhow::Error::msg)
}

/// One rules edit through the engine: it validates the whole result and swaps it in.
fn edit(paths: &Paths, f: impl FnOnce(&mut Policy) -> Result<String> + 'static) -> Result<()> {
    let out = engine::commit(
        paths,
        Change::Rules(Box::new(f)),
        Options {
            force: false,
            progress: &mut |_| {},
        },
    )?;
    if let Done::Rules { message } = out.what {
        println!("isolation: {message} (generation {})", out.generation);
    }
    Ok(())
}

fn used_by(p: &Policy, name: &str) -> Option<String> {
    let is = |e: &Endpoint| matches!(e, Endpoint::Network(n) if n == name);
    p.isolation
        .allow
        .iter()
        .find(|r| is(&r.from) || is(&r.to))
        .map(|r| format!("allow {} -> {}", r.from, r.to))
        .or_else(|| {
            p.isolation
                .except
                .iter()
                .find(|r| is(&r.from) || is(&r.to))
                .map(|r| format!("except {} <-> {}", r.from, r.to))
        })
}

pub fn network(paths: &Paths, cmd: NetworkCmd) -> Result<()> {
    match cmd {
        NetworkCmd::Add { name, cidrs } => {
            policy::check_name(&name).map_err(anyhow::Error::msg)?;
            let nets = cidr_list(&cidrs)?;
            edit(paths, move |p| {
                let subnets = p.networks.entry(name.clone()).or_default();
                let before = subnets.len();
                for n in nets {
                    if !subnets.contains(&n) {
                        subnets.push(n);
                    }
                }
                Ok(format!(
                    "network {name}: {} subnet(s) added",
                    subnets.len() - before
                ))
            })
        }
        NetworkCmd::Del { name, cidrs } => {
            let nets = cidr_list(&cidrs)?;
            edit(paths, move |p| {
                let Some(subnets) = p.networks.get_mut(&name) else {
                    bail!("no network named '{name}'");
                };
                if !nets.is_empty() {
                    for n in &nets {
                        if !subnets.contains(n) {
                            bail!("network {name} has no subnet {n}");
                        }
                    }
                    subnets.retain(|s| !nets.contains(s));
                    if !subnets.is_empty() {
                        return Ok(format!("network {name}: {} subnet(s) removed", nets.len()));
                    }
                }
                if let Some(rule) = used_by(p, &name) {
                    bail!("network {name} is used by `{rule}`: remove that rule first");
                }
                p.networks.remove(&name);
                Ok(format!("network {name} removed"))
            })
        }
        NetworkCmd::List { json } => {
            let p = engine::rules(paths)?;
            if json {
                let m: serde_json::Map<String, serde_json::Value> = p
                    .networks
                    .iter()
                    .map(|(n, s)| {
                        (
                            n.clone(),
                            s.iter().map(|c| c.to_string()).collect::<Vec<_>>().into(),
                        )
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(m));
            } else {
                for (n, s) in &p.networks {
                    let list: Vec<String> = s.iter().map(|c| c.to_string()).collect();
                    println!("{n:<24} {}", list.join(" "));
                }
            }
            Ok(())
        }
    }
}

pub fn allow(paths: &Paths, a: RuleArgs) -> Result<()> {
    let ports = ports(&a.ports)?;
    edit(paths, move |p| {
        let rule = AllowRule {
            from: endpoint(&a.from, p)?,
            to: endpoint(&a.to, p)?,
            ports,
        };
        if p.isolation.allow.contains(&rule) {
            return Ok(format!(
                "allow {} -> {} was already there",
                rule.from, rule.to
            ));
        }
        let msg = format!("allowed {} -> {}", rule.from, rule.to);
        p.isolation.allow.push(rule);
        Ok(msg)
    })
}

pub fn disallow(paths: &Paths, a: RuleArgs) -> Result<()> {
    let ports = ports(&a.ports)?;
    edit(paths, move |p| {
        let (from, to) = (endpoint(&a.from, p)?, endpoint(&a.to, p)?);
        let before = p.isolation.allow.len();
        let mut touched = 0;
        for r in p
            .isolation
            .allow
            .iter_mut()
            .filter(|r| r.from == from && r.to == to)
        {
            touched += 1;
            if !ports.is_empty() {
                r.ports.retain(|x| !ports.contains(x));
            }
        }
        // Without --port the whole pair goes; a rule left with no ports goes too (no ports
        // would mean "any port", the opposite of what was asked).
        p.isolation.allow.retain(|r| {
            !(r.from == from && r.to == to && (ports.is_empty() || r.ports.is_empty()))
        });
        if touched == 0 {
            bail!("no allow rule from {from} to {to}");
        }
        Ok(format!(
            "disallowed {from} -> {to} ({} rule(s) removed)",
            before - p.isolation.allow.len()
        ))
    })
}

pub fn except(paths: &Paths, cmd: ExceptCmd) -> Result<()> {
    match cmd {
        ExceptCmd::Add { src, dst } => edit(paths, move |p| {
            let rule = ExceptRule {
                from: endpoint(&src, p)?,
                to: endpoint(&dst, p)?,
            };
            if p.isolation.except.contains(&rule) {
                return Ok(format!(
                    "except {} <-> {} was already there",
                    rule.from, rule.to
                ));
            }
            let msg = format!("except {} <-> {} added", rule.from, rule.to);
            p.isolation.except.push(rule);
            Ok(msg)
        }),
        ExceptCmd::Del { src, dst } => edit(paths, move |p| {
            let (from, to) = (endpoint(&src, p)?, endpoint(&dst, p)?);
            let before = p.isolation.except.len();
            p.isolation
                .except
                .retain(|r| !(r.from == from && r.to == to) && !(r.from == to && r.to == from));
            if p.isolation.except.len() == before {
                bail!("no except entry between {from} and {to}");
            }
            Ok(format!("except {from} <-> {to} removed"))
        }),
    }
}
