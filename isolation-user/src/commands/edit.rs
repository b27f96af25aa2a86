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
    let out = engine::commit(paths, Change::Rules(Box::new(f)), Options::quiet(false))?;
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
        disallow_in(p, &from, &to, &ports)
    })
}

/// Removes the allow rules from `from` to `to`, or, with `ports`, those ports from them: a
/// range loses the ports inside it (`tcp:1-100` without `tcp:22` is `tcp:1-21` and
/// `tcp:23-100`), and a rule left with no port goes. Refused when nothing would change, and
/// for a rule that allows any port (what would be left cannot be written as ports).
fn disallow_in(
    p: &mut Policy,
    from: &Endpoint,
    to: &Endpoint,
    ports: &[PortSpec],
) -> Result<String> {
    let pair = |r: &AllowRule| r.from == *from && r.to == *to;
    if !p.isolation.allow.iter().any(pair) {
        bail!("no allow rule from {from} to {to}");
    }
    let before = p.isolation.allow.len();
    if ports.is_empty() {
        p.isolation.allow.retain(|r| !pair(r));
        return Ok(format!(
            "disallowed {from} -> {to} ({} rule(s) removed)",
            before - p.isolation.allow.len()
        ));
    }
    if p.isolation
        .allow
        .iter()
        .any(|r| pair(r) && r.ports.is_empty())
    {
        bail!(
            "the rule from {from} to {to} allows any protocol and port, so no port can be taken out of it: disallow the pair, then allow the ports it should keep"
        );
    }
    let mut changed = false;
    for r in p.isolation.allow.iter_mut().filter(|r| pair(r)) {
        let kept: Vec<PortSpec> = r
            .ports
            .iter()
            .flat_map(|&have| {
                ports.iter().fold(vec![have], |left, &d| {
                    left.into_iter().flat_map(|x| without(x, d)).collect()
                })
            })
            .collect();
        changed |= kept != r.ports;
        r.ports = kept;
    }
    if !changed {
        bail!(
            "no allow rule from {from} to {to} allows {}: nothing to disallow",
            list(ports)
        );
    }
    // A rule left with no port goes (no ports would mean "any port", the opposite).
    p.isolation
        .allow
        .retain(|r| !(pair(r) && r.ports.is_empty()));
    let left: Vec<PortSpec> = p
        .isolation
        .allow
        .iter()
        .filter(|r| pair(r))
        .flat_map(|r| r.ports.clone())
        .collect();
    Ok(format!(
        "disallowed {} from {from} -> {to}; {}",
        list(ports),
        if left.is_empty() {
            "no rule left for the pair".to_string()
        } else {
            format!("it keeps {}", list(&left))
        }
    ))
}

fn list(ports: &[PortSpec]) -> String {
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `have` without the ports of `d`: none, itself, or the one or two pieces of its range
/// left on either side.
fn without(have: PortSpec, d: PortSpec) -> Vec<PortSpec> {
    type Make = fn(u16, u16) -> PortSpec;
    let ((lo, hi), (dlo, dhi), make): ((u16, u16), (u16, u16), Make) = match (have, d) {
        (PortSpec::Icmp, PortSpec::Icmp) => return vec![],
        (PortSpec::Tcp(lo, hi), PortSpec::Tcp(dlo, dhi)) => ((lo, hi), (dlo, dhi), PortSpec::Tcp),
        (PortSpec::Udp(lo, hi), PortSpec::Udp(dlo, dhi)) => ((lo, hi), (dlo, dhi), PortSpec::Udp),
        _ => return vec![have],
    };
    if dhi < lo || dlo > hi {
        return vec![have];
    }
    let mut out = Vec::new();
    if dlo > lo {
        out.push(make(lo, dlo - 1));
    }
    if dhi < hi {
        out.push(make(dhi + 1, hi));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_policy(ports: &[&str]) -> Policy {
        let text = format!(
            "[networks.a]\nsubnets = [\"192.0.2.0/25\"]\n[networks.b]\nsubnets = [\"192.0.2.128/25\"]\n[[isolation.allow]]\nfrom = \"a\"\nto = \"b\"\n{}",
            if ports.is_empty() {
                String::new()
            } else {
                format!(
                    "ports = [{}]\n",
                    ports
                        .iter()
                        .map(|p| format!("\"{p}\""))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        );
        policy::parse("p.toml", &text).unwrap()
    }

    fn ports_of(p: &Policy) -> Vec<String> {
        p.isolation
            .allow
            .iter()
            .flat_map(|r| r.ports.iter().map(|x| x.to_string()))
            .collect()
    }

    fn net(n: &str) -> Endpoint {
        Endpoint::Network(n.into())
    }

    /// `disallow --port` takes the ports out of ranges, refuses what would change nothing
    /// (it once printed "disallowed" and changed nothing), and refuses to carve a port out
    /// of a rule that allows anything (it once removed the whole rule).
    #[test]
    fn disallow_takes_ports_out_of_ranges_or_says_why_not() {
        let mut p = rule_policy(&["tcp:1-100", "udp:53", "icmp"]);
        let msg = disallow_in(&mut p, &net("a"), &net("b"), &["tcp:22".parse().unwrap()]).unwrap();
        assert_eq!(
            ports_of(&p),
            ["tcp:1-21", "tcp:23-100", "udp:53", "icmp"],
            "{msg}"
        );
        disallow_in(
            &mut p,
            &net("a"),
            &net("b"),
            &["tcp:1-21".parse().unwrap(), "icmp".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(ports_of(&p), ["tcp:23-100", "udp:53"]);

        let e =
            disallow_in(&mut p, &net("a"), &net("b"), &["tcp:22".parse().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("nothing to disallow"), "{e}");
        assert_eq!(ports_of(&p), ["tcp:23-100", "udp:53"], "unchanged");

        disallow_in(
            &mut p,
            &net("a"),
            &net("b"),
            &["tcp:1-65535".parse().unwrap(), "udp:53".parse().unwrap()],
        )
        .unwrap();
        assert!(
            p.isolation.allow.is_empty(),
            "a rule left with no port goes"
        );

        let mut any = rule_policy(&[]);
        let e =
            disallow_in(&mut any, &net("a"), &net("b"), &["tcp:22".parse().unwrap()]).unwrap_err();
        assert!(
            e.to_string().contains("allows any protocol and port"),
            "{e}"
        );
        assert_eq!(any.isolation.allow.len(), 1, "the rule stays");
        disallow_in(&mut any, &net("a"), &net("b"), &[]).unwrap();
        assert!(any.isolation.allow.is_empty());
    }
}
