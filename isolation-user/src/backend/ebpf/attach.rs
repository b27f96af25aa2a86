//! Attaching the pinned programs to interfaces (XDP ingress, TC ingress and egress) and
//! detaching them; what is attached where.

use std::fs;

use super::refused;
use anyhow::{Context as _, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkOrder, PinnedLink},
};

use super::pins::{error_chain, is_loaded};
use crate::state::{IfaceState, Paths};

pub fn xdp_mode(mode: &str) -> XdpMode {
    match mode {
        "native" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        _ => XdpMode::Default,
    }
}

/// What `ip -d link` says is attached at XDP on an interface: (program id, name, mode).
pub fn attached_xdp(iface: &str) -> Result<Option<(u32, String, String)>> {
    let out = crate::state::system_tool("ip")
        .args(["-j", "-d", "link", "show", "dev", iface])
        .output()
        .context("cannot run `ip` (iproute2) to inspect the interface")?;
    if !out.status.success() {
        bail!("no interface named '{iface}' in this network namespace");
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cannot parse `ip -j link` output")?;
    let Some(xdp) = v.get(0).and_then(|l| l.get("xdp")) else {
        return Ok(None);
    };
    let mode = match xdp.get("mode").and_then(|m| m.as_u64()) {
        Some(1) => "native",
        Some(2) => "skb",
        Some(3) => "offload",
        _ => "unknown",
    };
    let prog = xdp.get("prog").or_else(|| {
        xdp.get("attached")
            .and_then(|a| a.get(0))
            .and_then(|a| a.get("prog"))
    });
    Ok(prog.map(|p| {
        let id = p.get("id").and_then(|i| i.as_u64()).unwrap_or(0) as u32;
        let name = p
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        (id, name, mode.to_string())
    }))
}

pub fn pinned_xdp_id(paths: &Paths) -> Result<u32> {
    let p = Xdp::from_pin(
        paths.prog("xdp"),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .context("cannot open the pinned XDP program")?;
    Ok(p.info()?.id())
}

pub fn pinned_tc_id(paths: &Paths, which: &str) -> Result<u32> {
    let p = SchedClassifier::from_pin(paths.prog(which))
        .context("cannot open the pinned TC program")?;
    Ok(p.info()?.id())
}

/// Is our XDP link for this interface pinned and still attached?
pub fn is_attached(paths: &Paths, iface: &str) -> bool {
    PinnedLink::from_pin(paths.link("xdp", iface)).is_ok()
}

/// Refuses an interface that carries an XDP program isolation did not attach: replacing
/// someone's XDP program silently would remove their filter (or ours, later, theirs).
pub fn check_foreign_xdp(paths: &Paths, iface: &str) -> Result<()> {
    if let Some((id, name, _)) = attached_xdp(iface)? {
        let ours = if is_loaded(paths) {
            pinned_xdp_id(paths).ok()
        } else {
            None
        };
        if Some(id) != ours {
            bail!(
                "interface {iface} already has an XDP program that isolation did not attach \
                 ({name}, id {id}); it was left in place. Remove it first \
                 (e.g. `ip link set dev {iface} xdp off`) if isolation should replace it"
            );
        }
    }
    Ok(())
}

/// Attaches the pinned programs to an interface and pins the links.
pub fn attach(paths: &Paths, iface: &IfaceState) -> Result<()> {
    let mut xdp = Xdp::from_pin(
        paths.prog("xdp"),
        aya_obj::programs::XdpAttachType::Interface,
    )?;
    let id = xdp
        .attach(iface.ifindex, xdp_mode(&iface.mode))
        .map_err(|e| {
            refused!(
                "cannot attach XDP ({} mode) to {}: {}",
                iface.mode,
                iface.name,
                error_chain(&e)
            )
        })?;
    let link = FdLink::try_from(xdp.take_link(id)?).context("XDP attached without a BPF link")?;
    link.pin(paths.link("xdp", &iface.name))
        .context("cannot pin the XDP link")?;

    let mut tc = SchedClassifier::from_pin(paths.prog("tc"))?;
    let mut tci = SchedClassifier::from_pin(paths.prog("tci"))?;
    let res = (|| -> Result<()> {
        // First in the ingress chain: a packet tagged for REJECT must be answered before
        // any other program could let it into the stack.
        let order = TcAttach::Tcx {
            attach_type: TcAttachType::Ingress,
            order: LinkOrder::first(),
        };
        let id = tci.attach(iface.ifindex, order).map_err(|e| {
            refused!(
                "cannot attach TC ingress to {}: {}",
                iface.name,
                error_chain(&e)
            )
        })?;
        let link = FdLink::try_from(tci.take_link(id)?)
            .context("TC ingress attached without a BPF link")?;
        link.pin(paths.link("tci", &iface.name))
            .context("cannot pin the TC ingress link")?;
        let id = tc
            .attach(iface.ifindex, TcAttachType::Egress)
            .map_err(|e| {
                refused!(
                    "cannot attach TC egress to {}: {}",
                    iface.name,
                    error_chain(&e)
                )
            })?;
        let link = FdLink::try_from(tc.take_link(id)?).context("TC attached without a BPF link")?;
        link.pin(paths.link("tc", &iface.name))
            .context("cannot pin the TC link")?;
        Ok(())
    })();
    if res.is_err() {
        detach(paths, &iface.name);
    }
    res
}

pub fn detach(paths: &Paths, iface: &str) -> Vec<String> {
    let mut errs = Vec::new();
    for kind in ["xdp", "tc", "tci"] {
        let p = paths.link(kind, iface);
        // Best effort: the unpin below releases the link in any case, only later.
        let _ = super::syscall::detach_pinned_link(&p);
        if let Err(e) = fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", p.display()));
        }
    }
    errs
}
