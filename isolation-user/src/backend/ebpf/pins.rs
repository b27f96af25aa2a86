//! The BPF object and its pins: loading it into the kernel, pinning maps and programs
//! under the pin dir (so the datapath outlives this process), and removing them.

use std::{ffi::CString, fs, os::fd::AsFd as _, path::Path};

use super::refused;
use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{SchedClassifier, Xdp},
};
use isolation_common::{maps, progs};

use super::conntrack;
use super::pinned::open_map;

use crate::state::Paths;

/// The BPF object, built by build.rs from `isolation-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/isolation-bpf"));

/// FNV-1a of the object (computed by build.rs): tells whether the pinned datapath came
/// from this build.
pub fn object_hash() -> String {
    crate::BPF_HASH.to_string()
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The machine-wide lock of the bpffs mount, in /run.
const BPFFS_LOCK: &str = "isolation-bpffs.lock";

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data (all zeroes is valid), filled by statfs(2) from a
    // NUL-terminated path we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Creates the pin dir, mounting a bpffs on it if it is not on one already.
pub fn ensure_pin_dir(paths: &Paths) -> Result<()> {
    let dir = &paths.pin_dir;
    // Two loaders mounting at once would stack two bpffs, the second hiding the first's
    // pins: check and mount under a machine-wide lock. It lives in /run itself, where only
    // root writes (not /run/lock or /tmp, where any user could plant or hold it).
    let lock = if Path::new("/run").is_dir() {
        Path::new("/run").join(BPFFS_LOCK)
    } else {
        paths.state_dir.join(BPFFS_LOCK)
    };
    let _lock = crate::state::lock_file(&lock)?;
    // The usual place: mount the bpffs at /sys/fs/bpf itself, as systemd would.
    let sys = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys) && sys.is_dir() && !is_bpffs(sys) {
        let ok = crate::state::system_tool("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(sys)
            .status();
        if !matches!(ok, Ok(s) if s.success()) || !is_bpffs(sys) {
            bail!("/sys/fs/bpf is not a BPF filesystem and mounting one there failed");
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create pin dir {}", dir.display()))?;
    if !is_bpffs(dir) {
        let out = crate::state::system_tool("mount")
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
/// The connection tables hold `connections` entries each. `fill` runs once the maps are
/// pinned and before any program is loaded (the exact whitelist hashes go in there: no
/// program may ever run without them).
pub fn load_and_pin(
    paths: &Paths,
    connections: u32,
    fill: impl FnOnce(&Paths) -> Result<()>,
) -> Result<()> {
    let mut loader = EbpfLoader::new();
    for name in conntrack::TABLES {
        loader.map_max_entries(name, connections);
    }
    let mut ebpf: Ebpf = loader.load(OBJECT).map_err(|e| {
        refused!(
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
        fill(paths)?;
        let xdp: &mut Xdp = prog_mut(&mut ebpf, progs::XDP_INGRESS)?;
        xdp.load()
            .map_err(|e| refused!("the kernel refused the XDP program: {}", error_chain(&e)))?;
        xdp.pin(paths.prog("xdp"))
            .context("cannot pin the XDP program")?;
        let vx: &mut Xdp = prog_mut(&mut ebpf, progs::XDP_VXLAN)?;
        vx.load().map_err(|e| {
            refused!(
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
            refused!(
                "the kernel refused the TC ingress program: {}",
                error_chain(&e)
            )
        })?;
        tci.pin(paths.prog("tci"))
            .context("cannot pin the TC ingress program")?;
        let tc: &mut SchedClassifier = prog_mut(&mut ebpf, progs::TC_EGRESS)?;
        tc.load()
            .map_err(|e| refused!("the kernel refused the TC program: {}", error_chain(&e)))?;
        tc.pin(paths.prog("tc"))
            .context("cannot pin the TC program")?;
        Ok(())
    })();
    if result.is_err() {
        remove_pins(paths);
    }
    result
}

/// Swaps this build's programs in for the pinned ones, keeping every map (and so the
/// policy, the whitelist, the remembered connections and the counters), for an upgrade to
/// a new build, `load --replace-programs`, or connection tables of another size:
///
/// 1. the object is loaded with every map taken from its pin (aya checks each pinned map
///    against the new object's definition: a build whose maps changed shape is refused
///    here, before anything live changes), except the connection tables when
///    `connections` asks for another size than theirs: those are created anew at that
///    size, pinned beside the old ones and filled from them;
/// 2. the new programs pass the verifier and are pinned beside the old ones;
/// 3. each pinned link (XDP, TC ingress and egress, on every interface) is switched to its
///    new program with BPF_LINK_UPDATE, and the VXLAN tail call with one JUMP write: a
///    packet meets the old program or the new one, never no program;
/// 4. new tables get what the old programs recorded in the meantime; the new pins are
///    renamed over the old ones; the old programs and tables go with their last reference.
///
/// A failure in 3 switches the links already switched back to the old programs.
pub fn replace_programs(paths: &Paths, connections: Option<u32>) -> Result<usize> {
    let staged_map = |name: &str| paths.pin_dir.join(format!("new_map_{name}"));
    let mut loader = EbpfLoader::new();
    for name in maps::ALL {
        loader.map_pin_path(name, paths.map(name));
    }
    let size = conntrack::table_size(paths)?;
    let resize = connections.filter(|&n| n != size);
    for name in conntrack::TABLES {
        let _ = fs::remove_file(staged_map(name));
        match resize {
            // aya creates the map at the staged path, as it finds none there.
            Some(n) => loader
                .map_max_entries(name, n)
                .map_pin_path(name, staged_map(name)),
            None => loader.map_max_entries(name, size),
        };
    }
    let unstage_maps = || {
        for name in conntrack::TABLES {
            let _ = fs::remove_file(staged_map(name));
        }
    };
    let mut ebpf: Ebpf = match loader.load(OBJECT) {
        Ok(e) => e,
        Err(e) => {
            unstage_maps();
            bail!(
                "this build's BPF object cannot take over the pinned maps (run `isolation-user \
                 unload` then `load` to change to it, which forgets the remembered connections): {}",
                error_chain(&e)
            )
        }
    };
    // The tables taking over: (old pinned table, new table), filled before any packet
    // meets them.
    let mut tables = Vec::new();
    if resize.is_some() {
        let filled = (|| -> Result<()> {
            for name in conntrack::TABLES {
                let old = MapData::from_pin(paths.map(name))?;
                let new = MapData::from_pin(staged_map(name))?;
                conntrack::copy_table(old.fd().as_fd(), new.fd().as_fd(), false)?;
                tables.push((name, old, new));
            }
            Ok(())
        })();
        if let Err(e) = filled {
            unstage_maps();
            return Err(e);
        }
    }
    // (pin name, program in the object, XDP?)
    let progs = [
        ("xdp", progs::XDP_INGRESS, true),
        ("xdp_vxlan", progs::XDP_VXLAN, true),
        ("tci", progs::TC_INGRESS, false),
        ("tc", progs::TC_EGRESS, false),
    ];
    // The pinned links to switch, read before anything is staged.
    let mut links: Vec<(std::path::PathBuf, &str)> = Vec::new();
    for e in fs::read_dir(paths.links_dir())?.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let kind = ["xdp", "tci", "tc"]
            .into_iter()
            .find(|k| f.starts_with(&format!("{k}_")));
        if let Some(k) = kind {
            links.push((e.path(), k));
        }
    }
    let staged = |name: &str| paths.pin_dir.join(format!("new_prog_{name}"));
    let unstage = || {
        for (name, _, _) in progs {
            let _ = fs::remove_file(staged(name));
        }
        unstage_maps();
    };
    let mut new_fds = std::collections::HashMap::new();
    let loaded = (|| -> Result<()> {
        for (name, prog, is_xdp) in progs {
            let _ = fs::remove_file(staged(name));
            // The same steps for both program types (aya has no trait for `load()`).
            macro_rules! load_pin {
                ($t:ty) => {{
                    let p: &mut $t = prog_mut(&mut ebpf, prog)?;
                    p.load().map_err(|e| {
                        anyhow!(
                            "the kernel refused the new {prog} program: {}",
                            error_chain(&e)
                        )
                    })?;
                    p.pin(staged(name))?;
                    p.fd()?.try_clone()?
                }};
            }
            let fd = if is_xdp {
                load_pin!(Xdp)
            } else {
                load_pin!(SchedClassifier)
            };
            new_fds.insert(name, fd);
        }
        Ok(())
    })();
    if let Err(e) = loaded {
        unstage();
        return Err(e);
    }
    // The old programs, to switch back to if a link refuses the new one.
    let old = |name: &str| -> Result<aya::programs::ProgramFd> {
        Ok(if name.starts_with("xdp") {
            Xdp::from_pin(
                paths.prog(name),
                aya_obj::programs::XdpAttachType::Interface,
            )?
            .fd()?
            .try_clone()?
        } else {
            SchedClassifier::from_pin(paths.prog(name))?
                .fd()?
                .try_clone()?
        })
    };
    // Opened before any link switches: a failure past this point switches them back.
    let mut jump: aya::maps::ProgramArray<MapData> =
        match open_map(paths, maps::JUMP).and_then(|m| Ok(m.try_into()?)) {
            Ok(j) => j,
            Err(e) => {
                unstage();
                return Err(e);
            }
        };
    let mut switched: Vec<(std::path::PathBuf, &str)> = Vec::new();
    let mut result = Ok(());
    for (path, kind) in &links {
        if let Err(e) = super::syscall::update_pinned_link(path, new_fds[kind].as_fd()) {
            result = Err(anyhow!(
                "cannot switch the link {} to the new program: {e}",
                path.display()
            ));
            break;
        }
        switched.push((path.clone(), kind));
    }
    if result.is_ok()
        && let Err(e) = jump.set(0, &new_fds["xdp_vxlan"], 0)
    {
        result = Err(anyhow!("cannot install the new VXLAN program in JUMP: {e}"));
    }
    if let Err(e) = result {
        for (path, kind) in &switched {
            if let Ok(fd) = old(kind) {
                let _ = super::syscall::update_pinned_link(path, fd.as_fd());
            }
        }
        unstage();
        return Err(e);
    }
    // The old programs may have recorded flows since the first copy: those the new tables
    // lack go in now (the new programs' own entries are newer and stay). A failure here
    // costs those flows' next replies at most, never the switch.
    for (name, old, new) in &tables {
        if let Err(e) = conntrack::copy_table(old.fd().as_fd(), new.fd().as_fd(), true) {
            tracing::warn!("{name}: flows recorded during the switch were not carried over: {e:#}");
        }
        fs::rename(staged_map(name), paths.map(name))
            .with_context(|| format!("cannot pin the new {name}"))?;
    }
    for (name, _, _) in progs {
        fs::rename(staged(name), paths.prog(name))
            .with_context(|| format!("cannot pin the new {name} program"))?;
    }
    Ok(links.len())
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

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

pub fn remove_pins(paths: &Paths) -> Vec<String> {
    let mut errs = Vec::new();
    if let Ok(rd) = fs::read_dir(paths.links_dir()) {
        for e in rd.flatten() {
            let _ = super::syscall::detach_pinned_link(&e.path());
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
