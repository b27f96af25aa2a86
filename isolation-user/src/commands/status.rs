//! `status`: what is loaded where.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::{engine, state::Paths};

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Machine-readable output (stable keys, see README).
    #[arg(long)]
    pub json: bool,
}

/// This binary's build, as `--version` names it.
fn version() -> serde_json::Value {
    json!({ "version": crate::VERSION, "commit": crate::COMMIT, "bpf_object": crate::BPF_HASH })
}

pub fn run(paths: &Paths, a: StatusArgs) -> Result<()> {
    let _read = paths.read_lock();
    let opened = engine::open(paths).ok();
    let Some((b, st)) = opened.filter(|_| paths.state_file().exists()) else {
        if a.json {
            println!("{}", json!({ "loaded": false, "version": version() }));
        } else {
            println!(
                "isolation: not loaded (pin dir {})",
                paths.pin_dir.display()
            );
        }
        return Ok(());
    };
    let s = b.status(&st)?;
    let source = crate::fleet::SourceStatus::load(paths);
    let blocked = engine::blocked(paths)?;
    let blocklist_enabled = engine::rules(paths)?.blocklist.enabled;
    let permanent = blocked
        .iter()
        .filter(|e| e.origin == crate::blocklist::ORIGIN_POLICY)
        .count();
    let feed: Option<crate::service::FeedHealth> = std::fs::read(paths.feed_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let pending = crate::rollback::pending(paths)?.map(|p| {
        json!({
            "file": p.file, "deadline": p.deadline,
            "seconds_left": (p.deadline - crate::state::unix_now()).max(0.0),
            "rollback_generation": p.previous_generation,
        })
    });
    let id = |name: &str| {
        s.programs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, i)| *i)
            .unwrap_or(0)
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "loaded": true, "backend": s.backend, "backend_detail": s.detail,
                "backend_why": st.why, "pin_dir": paths.pin_dir,
                "state_dir": paths.state_dir, "generation": s.generation,
                "whitelist_enabled": s.whitelist_enabled,
                "blocklist": { "enabled": blocklist_enabled, "entries": blocked.len(), "permanent": permanent, "decisions": feed },
                "programs": { "xdp": id("xdp"), "tc_egress": id("tc_egress"), "tc_ingress": id("tc_ingress") },
                "interfaces": s.interfaces, "maps": s.maps,
                "pending_confirmation": pending,
                "source": source,
                "version": version(),
                "datapath_build": st.object_hash,
            }))?
        );
        return Ok(());
    }
    let profile = b.profile();
    println!("backend:     {} ({})", s.backend.name(), s.detail);
    if let Some(why) = &st.why {
        println!("chosen:      {why}");
    }
    if profile.pinned {
        println!("pin dir:     {}", paths.pin_dir.display());
        println!(
            "programs:    xdp id {}, tc egress id {}, tc ingress (reject) id {}",
            id("xdp"),
            id("tc_egress"),
            id("tc_ingress")
        );
    }
    println!(
        "version:     {} (commit {}, bpf {}){}",
        crate::VERSION,
        crate::COMMIT,
        crate::BPF_HASH,
        if st.object_hash.is_empty() || st.object_hash == b.build() {
            String::new()
        } else {
            format!("; the datapath in place is build {}", st.object_hash)
        }
    );
    println!(
        "policy:      generation {}, whitelist {}",
        s.generation,
        if s.whitelist_enabled {
            "enforced"
        } else {
            "off"
        }
    );
    println!(
        "blocklist:   {}, {} entries ({permanent} permanent, {} with a deadline)",
        if blocklist_enabled { "enforced" } else { "off" },
        blocked.len(),
        blocked.len() - permanent
    );
    if let Some(f) = &feed {
        let ago = (crate::state::unix_now() - f.last_ok_time).max(0.0);
        println!(
            "decisions:   {}: {}",
            f.source,
            match (&f.last_error, f.up) {
                (_, true) => format!("answered {ago:.0} s ago"),
                (Some(e), false) =>
                    format!("UNREACHABLE (the blocklist stays as it is; retrying): {e}"),
                (None, false) => "not asked yet".into(),
            }
        );
    }
    if let Some(s) = &source {
        println!(
            "source:      {} as node {}: {}, running revision {}{}",
            s.source,
            s.node,
            if s.connected {
                "connected"
            } else {
                "UNREACHABLE (the live policy stays; retrying)"
            },
            s.revision,
            s.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = &pending {
        println!(
            "confirm:     {} awaits `isolation-user confirm` for {:.0} s more, else generation {} comes back",
            p["file"].as_str().unwrap_or(""),
            p["seconds_left"].as_f64().unwrap_or(0.0),
            p["rollback_generation"]
        );
    }
    println!("interfaces:");
    for i in &s.interfaces {
        println!(
            "  {:<16} {}{}",
            i.name,
            i.how,
            if i.attached { "" } else { "  NOT ATTACHED" }
        );
    }
    println!("{}:", profile.tables);
    for m in &s.maps {
        println!("  {:<24} {:>9} / {}", m.name, m.entries, m.max_entries);
    }
    Ok(())
}
