//! The eBPF backend: loads the embedded object, pins maps, programs and links under the
//! pin dir (so the datapath outlives this process), and reads/writes the pinned maps.

use std::{
    collections::HashSet,
    ffi::CString,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttach, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder, PinnedLink},
    },
};
use ipnet::IpNet;
use isolation_common::{
    Config, Counter, FlowKey, FlowValue, LogStat, NetEntry, PolicyMeta, Reason, WlEntry, flags,
    flow_origin, maps, progs,
};

use crate::{
    policy::{Policy, Whitelist},
    state::{IfaceState, Paths},
};

/// The BPF object, built by build.rs from `isolation-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/isolation-bpf"));

/// FNV-1a of the object: tells whether the pinned datapath came from this build.
pub fn object_hash() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in OBJECT {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Creates the pin dir, mounting a bpffs on it if it is not on one already.
pub fn ensure_pin_dir(paths: &Paths) -> Result<()> {
    let dir = &paths.pin_dir;
    // Two loaders mounting at once would stack two bpffs, the second hiding the first's
    // pins: check and mount under a machine-wide lock.
    let lock_dir = if Path::new("/run/lock").is_dir() {
        "/run/lock"
    } else {
        "/tmp"
    };
    let lock_path = Path::new(lock_dir).join("isolation-bpffs.lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    // The usual place: mount the bpffs at /sys/fs/bpf itself, as systemd would.
    let sys = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys) && sys.is_dir() && !is_bpffs(sys) {
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(sys)
            .status();
        if !matches!(ok, Ok(s) if s.success()) || !is_bpffs(sys) {
            bail!("/sys/fs/bpf is not a BPF filesystem and mounting one there failed");
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create pin dir {}", dir.display()))?;
    if !is_bpffs(dir) {
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() && is_bpffs(dir) => {}
            Ok(o) => bail!(
                "{} is not on a BPF filesystem and mounting one failed: {}",
                dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => bail!(
                "{} is not on a BPF filesystem and `mount` failed: {e}",
                dir.display()
            ),
        }
    }
    fs::create_dir_all(paths.links_dir())?;
    Ok(())
}

/// Is a datapath pinned under this pin dir?
pub fn is_loaded(paths: &Paths) -> bool {
    paths.prog("xdp").exists() && paths.map(maps::CONFIG).exists()
}

/// Loads the object into the kernel and pins its maps and programs. Nothing is attached.
pub fn load_and_pin(paths: &Paths) -> Result<()> {
    let mut ebpf: Ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| {
        anyhow!(
            "the kernel refused the isolation BPF object: {}",
            error_chain(&e)
        )
    })?;
    let result = (|| -> Result<()> {
        for name in maps::ALL {
            let map = ebpf
                .map(name)
                .ok_or_else(|| anyhow!("BPF object has no map {name}"))?;
            map.pin(paths.map(name))
                .with_context(|| format!("cannot pin map {name}"))?;
        }
        let xdp: &mut Xdp = prog_mut(&mut ebpf, progs::XDP_INGRESS)?;
        xdp.load()
            .map_err(|e| anyhow!("the kernel refused the XDP program: {}", error_chain(&e)))?;
        xdp.pin(paths.prog("xdp"))
            .context("cannot pin the XDP program")?;
        let vx: &mut Xdp = prog_mut(&mut ebpf, progs::XDP_VXLAN)?;
        vx.load().map_err(|e| {
            anyhow!(
                "the kernel refused the VXLAN XDP program: {}",
                error_chain(&e)
            )
        })?;
        vx.pin(paths.prog("xdp_vxlan"))
            .context("cannot pin the VXLAN XDP program")?;
        let vx_fd = vx.fd()?.try_clone()?;
        let mut jump: aya::maps::ProgramArray<MapData> = open_map(paths, maps::JUMP)?.try_into()?;
        jump.set(0, &vx_fd, 0)
            .context("cannot install the VXLAN program in JUMP")?;
        let tci: &mut SchedClassifier = prog_mut(&mut ebpf, progs::TC_INGRESS)?;
        tci.load().map_err(|e| {
            anyhow!(
                "the kernel refused the TC ingress program: {}",
                error_chain(&e)
            )
        })?;
        tci.pin(paths.prog("tci"))
            .context("cannot pin the TC ingress program")?;
        let tc: &mut SchedClassifier = prog_mut(&mut ebpf, progs::TC_EGRESS)?;
        tc.load()
            .map_err(|e| anyhow!("the kernel refused the TC program: {}", error_chain(&e)))?;
        tc.pin(paths.prog("tc"))
            .context("cannot pin the TC program")?;
        Ok(())
    })();
    if result.is_err() {
        remove_pins(paths);
    }
    result
}

fn prog_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("BPF object has no program {name}"))?
        .try_into()
        .map_err(|e| anyhow!("program {name}: {e}"))
}

pub fn xdp_mode(mode: &str) -> XdpMode {
    match mode {
        "native" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        _ => XdpMode::Default,
    }
}

/// What `ip -d link` says is attached at XDP on an interface: (program id, name, mode).
pub fn attached_xdp(iface: &str) -> Result<Option<(u32, String, String)>> {
    let out = Command::new("ip")
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
            anyhow!(
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
            anyhow!(
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
                anyhow!(
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Removing a link's pin drops the last reference: the program detaches.
pub fn detach(paths: &Paths, iface: &str) -> Vec<String> {
    let mut errs = Vec::new();
    for kind in ["xdp", "tc", "tci"] {
        let p = paths.link(kind, iface);
        // Best effort: the unpin below releases the link in any case, only later.
        let _ = crate::bpf_batch::detach_pinned_link(&p);
        if let Err(e) = fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", p.display()));
        }
    }
    errs
}

/// Removes every pin (links first, so programs detach), going on past errors.
pub fn remove_pins(paths: &Paths) -> Vec<String> {
    let mut errs = Vec::new();
    if let Ok(rd) = fs::read_dir(paths.links_dir()) {
        for e in rd.flatten() {
            let _ = crate::bpf_batch::detach_pinned_link(&e.path());
            if let Err(err) = fs::remove_file(e.path()) {
                errs.push(format!("cannot remove {}: {err}", e.path().display()));
            }
        }
    }
    let _ = fs::remove_dir(paths.links_dir());
    let mut files: Vec<_> = maps::ALL.iter().map(|m| paths.map(m)).collect();
    files.push(paths.prog("xdp"));
    files.push(paths.prog("tc"));
    files.push(paths.prog("tci"));
    files.push(paths.prog("xdp_vxlan"));
    files.push(paths.prog("tci"));
    files.push(paths.prog("xdp_vxlan"));
    for f in files {
        if let Err(e) = fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errs.push(format!("cannot remove {}: {e}", f.display()));
        }
    }
    // The directory goes too when nothing else lives in it (not if it is a mount point).
    let _ = fs::remove_dir(&paths.pin_dir);
    errs
}

pub fn open_map(paths: &Paths, name: &str) -> Result<Map> {
    let p = paths.map(name);
    let data = MapData::from_pin(&p).with_context(|| {
        format!(
            "no isolation datapath pinned at {} (run `isolation-user load` first)",
            paths.pin_dir.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// Read-modify-write of the config word (the slot must survive whitelist edits).
pub fn update_config(paths: &Paths, f: impl FnOnce(&mut Config)) -> Result<Config> {
    let mut a: Array<MapData, Config> = open_map(paths, maps::CONFIG)?.try_into()?;
    let mut c = a.get(&0, 0)?;
    f(&mut c);
    a.set(0, &c, 0)?;
    Ok(c)
}

pub fn read_config(paths: &Paths) -> Result<Config> {
    let a: Array<MapData, Config> = open_map(paths, maps::CONFIG)?.try_into()?;
    Ok(a.get(&0, 0)?)
}

/// The whitelist switches of a policy (`Config::flags`).
pub fn whitelist_flags(policy: &Policy) -> u32 {
    let mut f = 0;
    if policy.whitelist.enabled {
        f |= flags::WHITELIST_ENABLED;
    }
    if policy.whitelist.log {
        f |= flags::LOG;
    }
    f
}

/// Applies a policy's whitelist switches and isolation: the isolation maps of the slot not
/// in use are filled, then one config write flips to it. Packets see the old policy or the
/// new one, never a mix. The old slot is left as it was (a rollback is one flip back).
pub fn apply_policy(paths: &Paths, policy: &Policy, generation: u32) -> Result<()> {
    let compiled = crate::compile::compile(policy).map_err(anyhow::Error::msg)?;
    let cur = read_config(paths)?;
    let next = 1 - (cur.slot & 1);
    fill_slot(paths, next as usize, &compiled)?;
    update_config(paths, |c| {
        c.flags = whitelist_flags(policy);
        c.generation = generation;
        c.slot = next;
    })?;
    // Rules are numbered by position: after a swap a number may name another rule, so
    // their counters start again (as iptables-restore's do).
    let mut rc: PerCpuArray<MapData, Counter> = open_map(paths, maps::RULE_COUNTERS)?.try_into()?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?.get() as usize;
    for i in 0..128u32 {
        rc.set(
            i,
            aya::maps::PerCpuValues::try_from(vec![Counter::default(); cpus])?,
            0,
        )?;
    }
    Ok(())
}

fn fill_slot(paths: &Paths, slot: usize, c: &crate::compile::Compiled) -> Result<()> {
    let mut v4: LpmTrie<MapData, [u8; 4], NetEntry> =
        open_map(paths, maps::NET_V4[slot])?.try_into()?;
    let mut v6: LpmTrie<MapData, [u8; 16], NetEntry> =
        open_map(paths, maps::NET_V6[slot])?.try_into()?;
    // Empty the slot: it may hold the policy before last.
    let old4: Vec<_> = v4.keys().collect::<Result<_, _>>()?;
    for k in old4 {
        v4.remove(&k)?;
    }
    let old6: Vec<_> = v6.keys().collect::<Result<_, _>>()?;
    for k in old6 {
        v6.remove(&k)?;
    }
    for (net, e) in &c.prefixes {
        match net {
            IpNet::V4(n) => v4.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), e, 0)?,
            IpNet::V6(n) => v6.insert(&Key::new(n.prefix_len() as u32, n.addr().octets()), e, 0)?,
        }
    }
    let ports = MapData::from_pin(paths.map(maps::PORTS[slot]))?;
    let fd = std::os::fd::AsFd::as_fd(ports.fd());
    let idx: Vec<u32> = (0..c.ports.len() as u32).collect();
    let (done, r) = crate::bpf_batch::update(
        fd,
        bytemuck::cast_slice(&idx),
        bytemuck::cast_slice(&c.ports),
        idx.len(),
        0,
    );
    r.with_context(|| {
        format!(
            "cannot fill {} ({done} of {} written)",
            maps::PORTS[slot],
            idx.len()
        )
    })?;
    let mut meta: Array<MapData, PolicyMeta> = open_map(paths, maps::META)?.try_into()?;
    meta.set(slot as u32, &c.meta, 0)?;
    Ok(())
}

/// Clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn seed_flows(paths: &Paths, flows: &[FlowKey]) -> Result<usize> {
    let mut m: HashMap<MapData, FlowKey, FlowValue> =
        open_map(paths, maps::CONNTRACK)?.try_into()?;
    let v = FlowValue {
        last_seen_ns: monotonic_ns(),
        origin: flow_origin::SEEDED,
        _pad: 0,
    };
    let mut n = 0;
    for k in flows {
        m.insert(k, &v, 0)?;
        n += 1;
    }
    Ok(n)
}

/// The four whitelist maps, opened.
pub struct WhitelistMaps {
    v4: HashMap<MapData, u32, WlEntry>,
    v4_lpm: LpmTrie<MapData, [u8; 4], WlEntry>,
    v6: HashMap<MapData, [u8; 16], WlEntry>,
    v6_lpm: LpmTrie<MapData, [u8; 16], WlEntry>,
    /// Second handles on the exact maps, for the batch syscalls.
    v4_raw: MapData,
    v6_raw: MapData,
}

/// Entries per batch syscall: big enough to amortise the syscall, small enough to keep
/// the progress bar moving.
const BATCH: usize = 16 * 1024;

/// Up to this many entries an edit probes key by key instead of reading the whole map.
const SMALL_EDIT: usize = 4096;

fn wl_value(n: &IpNet) -> WlEntry {
    WlEntry {
        prefix_len: n.prefix_len() as u32,
    }
}

fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl WhitelistMaps {
    pub fn open(paths: &Paths) -> Result<Self> {
        Ok(WhitelistMaps {
            v4: open_map(paths, maps::WL_V4)?.try_into()?,
            v4_lpm: open_map(paths, maps::WL_V4_LPM)?.try_into()?,
            v6: open_map(paths, maps::WL_V6)?.try_into()?,
            v6_lpm: open_map(paths, maps::WL_V6_LPM)?.try_into()?,
            v4_raw: MapData::from_pin(paths.map(maps::WL_V4))?,
            v6_raw: MapData::from_pin(paths.map(maps::WL_V6))?,
        })
    }

    /// Everything in the maps, as CIDRs (host routes for exact entries).
    pub fn entries(&self) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        for k in self.v4.keys() {
            out.push(IpNet::from(IpAddr::V4(Ipv4Addr::from(k?.to_ne_bytes()))));
        }
        for k in self.v6.keys() {
            out.push(IpNet::from(IpAddr::V6(Ipv6Addr::from(k?))));
        }
        for k in self.v4_lpm.keys() {
            let k = k?;
            out.push(IpNet::new(
                IpAddr::V4(Ipv4Addr::from(k.data())),
                k.prefix_len() as u8,
            )?);
        }
        for k in self.v6_lpm.keys() {
            let k = k?;
            out.push(IpNet::new(
                IpAddr::V6(Ipv6Addr::from(k.data())),
                k.prefix_len() as u8,
            )?);
        }
        Ok(out)
    }

    /// The entries that admit `addr`: its exact entry and every CIDR containing it.
    pub fn admitting(&self, addr: IpAddr) -> Result<Vec<IpNet>> {
        let mut out = Vec::new();
        let found = |r: Result<WlEntry, aya::maps::MapError>| match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e),
        };
        let addr = addr.to_canonical();
        let exact = match addr {
            IpAddr::V4(a) => found(self.v4.get(&u32::from_ne_bytes(a.octets()), 0))?,
            IpAddr::V6(a) => found(self.v6.get(&a.octets(), 0))?,
        };
        if exact.is_some() {
            out.push(IpNet::from(addr));
        }
        // An LPM lookup at prefix length p finds the longest entry of length <= p; the
        // value says which it was, so walking p down visits every containing CIDR.
        let mut p = if addr.is_ipv4() { 32u32 } else { 128 };
        loop {
            let v = match addr {
                IpAddr::V4(a) => found(self.v4_lpm.get(&Key::new(p, a.octets()), 0))?,
                IpAddr::V6(a) => found(self.v6_lpm.get(&Key::new(p, a.octets()), 0))?,
            };
            let Some(v) = v else { break };
            out.push(IpNet::new(addr, v.prefix_len as u8)?.trunc());
            if v.prefix_len == 0 {
                break;
            }
            p = v.prefix_len - 1;
        }
        Ok(out)
    }

    /// Adds one CIDR; returns whether it was new.
    fn insert_lpm(&mut self, n: &IpNet) -> Result<bool, aya::maps::MapError> {
        let v = wl_value(n);
        let flags = crate::bpf_batch::BPF_NOEXIST;
        let r = match n {
            IpNet::V4(n) => self.v4_lpm.insert(
                &Key::new(n.prefix_len() as u32, n.addr().octets()),
                &v,
                flags,
            ),
            IpNet::V6(n) => self.v6_lpm.insert(
                &Key::new(n.prefix_len() as u32, n.addr().octets()),
                &v,
                flags,
            ),
        };
        match r {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds entries, exact addresses in batches. All or nothing: if a map fills up, the
    /// entries this call added are taken out again. Returns how many were new.
    pub fn insert_many(&mut self, nets: &[IpNet], mut progress: impl FnMut(u64)) -> Result<usize> {
        let mut v4: Vec<(u32, WlEntry)> = Vec::new();
        let mut v6: Vec<([u8; 16], WlEntry)> = Vec::new();
        let mut lpm = Vec::new();
        for n in nets {
            match n {
                IpNet::V4(a) if a.prefix_len() == 32 => {
                    v4.push((u32::from_ne_bytes(a.addr().octets()), wl_value(n)))
                }
                IpNet::V6(a) if a.prefix_len() == 128 => v6.push((a.addr().octets(), wl_value(n))),
                _ => lpm.push(*n),
            }
        }
        let mut added: Vec<IpNet> = Vec::new();
        let mut result = batch_insert(&self.v4_raw, &v4, &mut progress, &mut added, |k| {
            IpNet::from(IpAddr::V4(Ipv4Addr::from(k.to_ne_bytes())))
        })
        .map_err(|e| full(e, "IPv4 addresses"));
        if result.is_ok() {
            result = batch_insert(&self.v6_raw, &v6, &mut progress, &mut added, |k| {
                IpNet::from(IpAddr::V6(Ipv6Addr::from(*k)))
            })
            .map_err(|e| full(e, "IPv6 addresses"));
        }
        if result.is_ok() {
            for n in &lpm {
                match self.insert_lpm(n) {
                    Ok(true) => added.push(*n),
                    Ok(false) => {}
                    Err(e) => {
                        result = Err(anyhow!(
                            "cannot add {n} to the whitelist CIDR map (full?): {}",
                            error_chain(&e)
                        ));
                        break;
                    }
                }
                progress(1);
            }
        }
        match result {
            Ok(()) => Ok(added.len()),
            Err(e) => {
                let _ = self.remove_many(&added, |_| {});
                Err(e.context("nothing was added"))
            }
        }
    }

    /// Removes one entry; returns whether it was there.
    pub fn remove(&mut self, n: &IpNet) -> Result<bool> {
        let r = match n {
            IpNet::V4(n) if n.prefix_len() == 32 => {
                self.v4.remove(&u32::from_ne_bytes(n.addr().octets()))
            }
            IpNet::V4(n) => self
                .v4_lpm
                .remove(&Key::new(n.prefix_len() as u32, n.addr().octets())),
            IpNet::V6(n) if n.prefix_len() == 128 => self.v6.remove(&n.addr().octets()),
            IpNet::V6(n) => self
                .v6_lpm
                .remove(&Key::new(n.prefix_len() as u32, n.addr().octets())),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot remove {n} from the whitelist maps")),
        }
    }

    /// Removes entries, exact addresses in batches; returns how many were there.
    pub fn remove_many(&mut self, nets: &[IpNet], mut progress: impl FnMut(u64)) -> Result<usize> {
        let mut v4: Vec<u32> = Vec::new();
        let mut v6: Vec<[u8; 16]> = Vec::new();
        let mut removed = 0;
        for n in nets {
            match n {
                IpNet::V4(a) if a.prefix_len() == 32 => {
                    v4.push(u32::from_ne_bytes(a.addr().octets()))
                }
                IpNet::V6(a) if a.prefix_len() == 128 => v6.push(a.addr().octets()),
                _ => {
                    removed += self.remove(n)? as usize;
                    progress(1);
                }
            }
        }
        removed += batch_delete(&self.v4_raw, &v4, &mut progress)
            .context("cannot remove IPv4 addresses")?;
        removed += batch_delete(&self.v6_raw, &v6, &mut progress)
            .context("cannot remove IPv6 addresses")?;
        Ok(removed)
    }

    /// Adds one entry; returns whether it was new.
    pub fn insert(&mut self, n: &IpNet) -> Result<bool> {
        Ok(self.insert_many(std::slice::from_ref(n), |_| {})? == 1)
    }
}

fn full(e: std::io::Error, what: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::E2BIG) | Some(libc::ENOMEM) | Some(libc::ENOSPC) => anyhow!(
            "the whitelist map for {what} is full (it holds {})",
            isolation_common::limits::WL_EXACT
        ),
        _ => anyhow!("cannot add {what} to the whitelist: {e}"),
    }
}

/// Inserts the exact keys not already in the map, in batches, pushing them onto `added` (so
/// the caller can undo them). The existing keys are read first: that tells new from old
/// (batch updates cannot be told to skip existing keys) and lets a full map be refused
/// before anything changes.
fn batch_insert<K: bytemuck::Pod + Eq + std::hash::Hash>(
    map: &MapData,
    entries: &[(K, WlEntry)],
    progress: &mut impl FnMut(u64),
    added: &mut Vec<IpNet>,
    to_net: impl Fn(&K) -> IpNet,
) -> std::io::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let fd = std::os::fd::AsFd::as_fd(map.fd());
    if entries.len() <= SMALL_EDIT {
        // A live edit of a few entries: one NOEXIST update each, no dump of the map, so
        // its cost does not grow with the whitelist.
        for (k, v) in entries {
            let (done, r) = crate::bpf_batch::update_one(fd, k, v, crate::bpf_batch::BPF_NOEXIST);
            match r {
                Ok(()) if done == 1 => added.push(to_net(k)),
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            progress(1);
        }
        return Ok(());
    }
    let existing: HashSet<K> = crate::bpf_batch::keys::<K>(fd, std::mem::size_of::<WlEntry>())?
        .into_iter()
        .collect();
    let fresh: Vec<(K, WlEntry)> = entries
        .iter()
        .filter(|e| !existing.contains(&e.0))
        .copied()
        .collect();
    progress((entries.len() - fresh.len()) as u64);
    let max = map
        .info()
        .map(|i| i.max_entries() as usize)
        .unwrap_or(usize::MAX);
    if existing.len() + fresh.len() > max {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<WlEntry>());
    for chunk in fresh.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|e| e.0).collect();
        let vals: Vec<WlEntry> = chunk.iter().map(|e| e.1).collect();
        let (kb, vb) = (
            bytemuck::cast_slice::<K, u8>(&keys),
            bytemuck::cast_slice::<WlEntry, u8>(&vals),
        );
        let (done, r) = crate::bpf_batch::update(fd, kb, vb, keys.len(), 0);
        added.extend(keys[..done].iter().map(&to_net));
        r?;
        debug_assert_eq!(kb.len(), done * ks);
        debug_assert_eq!(vb.len(), done * vs);
        progress(chunk.len() as u64);
    }
    Ok(())
}

/// Deletes exact keys in batches, skipping absent ones; returns how many were there.
fn batch_delete<K: bytemuck::Pod>(
    map: &MapData,
    keys: &[K],
    progress: &mut impl FnMut(u64),
) -> std::io::Result<usize> {
    let fd = std::os::fd::AsFd::as_fd(map.fd());
    let ks = std::mem::size_of::<K>();
    let mut removed = 0;
    for chunk in keys.chunks(BATCH) {
        let kb = bytemuck::cast_slice::<K, u8>(chunk);
        let mut at = 0;
        while at < chunk.len() {
            let (done, r) = crate::bpf_batch::delete(fd, &kb[at * ks..], chunk.len() - at);
            removed += done;
            at += done;
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => at += 1,
                Err(e) => return Err(e),
            }
        }
        progress(chunk.len() as u64);
    }
    Ok(removed)
}

/// Makes the maps hold exactly `wl.allow`: new entries are added before old ones are
/// removed, so an address in both the old and the new whitelist is never dropped.
pub fn sync_whitelist(paths: &Paths, wl: &Whitelist, progress: impl FnMut(u64)) -> Result<()> {
    let mut m = WhitelistMaps::open(paths)?;
    let current: HashSet<IpNet> = m.entries()?.into_iter().collect();
    let wanted: HashSet<IpNet> = wl.allow.iter().copied().collect();
    let add: Vec<IpNet> = wl
        .allow
        .iter()
        .filter(|n| !current.contains(n))
        .copied()
        .collect();
    m.insert_many(&add, progress)?;
    let gone: Vec<IpNet> = current.difference(&wanted).copied().collect();
    m.remove_many(&gone, |_| {})?;
    Ok(())
}

/// Sums of the per-CPU counters, by reason.
pub fn counters(paths: &Paths) -> Result<Vec<(Reason, Counter)>> {
    let a: PerCpuArray<MapData, Counter> = open_map(paths, maps::COUNTERS)?.try_into()?;
    let mut out = Vec::new();
    for r in Reason::ALL {
        let per_cpu = a.get(&(r as u32), 0)?;
        let mut c = Counter::default();
        for v in per_cpu.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push((r, c));
    }
    Ok(out)
}

/// What the live slot's trie answers for an address (LPM, as the datapath looks it up).
pub fn live_net_entry(paths: &Paths, slot: u32, addr: IpAddr) -> Result<Option<NetEntry>> {
    let slot = (slot & 1) as usize;
    let r = match addr.to_canonical() {
        IpAddr::V4(a) => {
            let t: LpmTrie<MapData, [u8; 4], NetEntry> =
                open_map(paths, maps::NET_V4[slot])?.try_into()?;
            t.get(&Key::new(32, a.octets()), 0)
        }
        IpAddr::V6(a) => {
            let t: LpmTrie<MapData, [u8; 16], NetEntry> =
                open_map(paths, maps::NET_V6[slot])?.try_into()?;
            t.get(&Key::new(128, a.octets()), 0)
        }
    };
    match r {
        Ok(e) => Ok(Some(e)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn live_port_mask(paths: &Paths, slot: u32, index: u32) -> Result<u64> {
    let a: Array<MapData, u64> = open_map(paths, maps::PORTS[(slot & 1) as usize])?.try_into()?;
    Ok(a.get(&index, 0)?)
}

pub fn live_meta(paths: &Paths, slot: u32) -> Result<PolicyMeta> {
    let a: Array<MapData, PolicyMeta> = open_map(paths, maps::META)?.try_into()?;
    Ok(a.get(&(slot & 1), 0)?)
}

/// Per-rule counters: allow rules at 0..64, except rules at 64..128.
pub fn rule_counters(paths: &Paths) -> Result<Vec<Counter>> {
    let a: PerCpuArray<MapData, Counter> = open_map(paths, maps::RULE_COUNTERS)?.try_into()?;
    let mut out = Vec::with_capacity(128);
    for i in 0..128u32 {
        let mut c = Counter::default();
        for v in a.get(&i, 0)?.iter() {
            c.packets += v.packets;
            c.bytes += v.bytes;
        }
        out.push(c);
    }
    Ok(out)
}

/// Deletes every entry of a hash-type map (connection tables).
pub fn clear_map(paths: &Paths, name: &str) -> Result<()> {
    let data = MapData::from_pin(paths.map(name))?;
    let key_size = data.info()?.key_size() as usize;
    let fd = std::os::fd::AsFd::as_fd(data.fd());
    loop {
        let keys = crate::bpf_batch::raw_keys(fd, key_size)?;
        if keys.is_empty() {
            return Ok(());
        }
        for k in keys.chunks(key_size) {
            crate::bpf_batch::delete_raw(fd, k)?;
        }
    }
}

/// Written / suppressed / lost log events.
pub fn log_stats(paths: &Paths) -> Result<[u64; LogStat::COUNT as usize]> {
    let a: PerCpuArray<MapData, u64> = open_map(paths, maps::LOG_STATS)?.try_into()?;
    let mut out = [0u64; LogStat::COUNT as usize];
    for (i, o) in out.iter_mut().enumerate() {
        *o = a.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

/// Entries per map, and its capacity.
pub fn fill_levels(paths: &Paths) -> Result<Vec<(&'static str, u64, u32)>> {
    let mut out = Vec::new();
    for name in [
        maps::WL_V4,
        maps::WL_V4_LPM,
        maps::WL_V6,
        maps::WL_V6_LPM,
        maps::CONNTRACK,
        maps::FRAGS,
    ] {
        let p = paths.map(name);
        let data = MapData::from_pin(&p)?;
        let max = data.info()?.max_entries();
        let fd = std::os::fd::AsFd::as_fd(data.fd());
        let n = crate::bpf_batch::count_keys(fd, data.info()?.key_size() as usize)
            .with_context(|| format!("cannot count the entries of {name}"))?;
        out.push((name, n, max));
    }
    Ok(out)
}
