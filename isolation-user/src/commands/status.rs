//! `status`: what is loaded where.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::{
    datapath,
    state::{Paths, State},
};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Machine-readable output (stable keys, see README).
    #[arg(long)]
    pub json: bool,
}

pub fn run(paths: &Paths, a: StatusArgs) -> Result<()> {
    let st = State::load(paths)?;
    let (Some(st), true) = (st, datapath::is_loaded(paths)) else {
        if a.json {
            println!("{}", json!({ "loaded": false }));
        } else {
            println!(
                "isolation: not loaded (pin dir {})",
                paths.pin_dir.display()
            );
        }
        return Ok(());
    };
    let xdp_id = datapath::pinned_xdp_id(paths)?;
    let tc_id = datapath::pinned_tc_id(paths, "tc")?;
    let tci_id = datapath::pinned_tc_id(paths, "tci")?;
    let cfg = datapath::read_config(paths)?;
    let mut ifaces = Vec::new();
    for i in &st.interfaces {
        let attached = datapath::attached_xdp(&i.name).ok().flatten();
        let (mode, ok) = match &attached {
            Some((id, _, mode)) => (
                mode.clone(),
                *id == xdp_id && datapath::is_attached(paths, &i.name),
            ),
            None => ("none".to_string(), false),
        };
        ifaces.push(json!({
            "name": i.name, "ifindex": i.ifindex, "requested_mode": i.mode,
            "xdp_mode": mode, "attached": ok,
        }));
    }
    let fills = datapath::fill_levels(paths)?;
    let wl_enabled = cfg.flags & isolation_common::flags::WHITELIST_ENABLED != 0;
    if a.json {
        let maps: Vec<_> = fills
            .iter()
            .map(|(n, c, m)| json!({ "name": n, "entries": c, "max_entries": m }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "loaded": true, "backend": st.backend, "pin_dir": paths.pin_dir,
                "state_dir": paths.state_dir, "generation": cfg.generation,
                "whitelist_enabled": wl_enabled,
                "programs": { "xdp": xdp_id, "tc_egress": tc_id, "tc_ingress": tci_id },
                "interfaces": ifaces, "maps": maps,
            }))?
        );
        return Ok(());
    }
    println!("backend:     {}", st.backend);
    println!("pin dir:     {}", paths.pin_dir.display());
    println!("programs:    xdp id {xdp_id}, tc egress id {tc_id}, tc ingress (reject) id {tci_id}");
    println!(
        "policy:      generation {}, whitelist {}",
        cfg.generation,
        if wl_enabled { "enforced" } else { "off" }
    );
    println!("interfaces:");
    for i in &ifaces {
        println!(
            "  {:<16} xdp {} (asked {}){}",
            i["name"].as_str().unwrap_or(""),
            i["xdp_mode"].as_str().unwrap_or(""),
            i["requested_mode"].as_str().unwrap_or(""),
            if i["attached"].as_bool() == Some(true) {
                ""
            } else {
                "  NOT ATTACHED"
            }
        );
    }
    println!("maps:");
    for (n, c, m) in fills {
        println!("  {n:<12} {c:>9} / {m}");
    }
    Ok(())
}
