//! Where things live: the pin dir (BPF objects) and the state dir (the desired policy, see
//! `store`, and what is installed where).

use std::{
    fs,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::backend::kind::Kind;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/isolation";
pub const DEFAULT_STATE_DIR: &str = "/run/isolation";
pub const DEFAULT_POLICY: &str = "/etc/isolation/policy.toml";

#[derive(Clone, Debug)]
pub struct Paths {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Paths {
    pub fn map(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }
    pub fn prog(&self, name: &str) -> PathBuf {
        self.pin_dir.join(format!("prog_{name}"))
    }
    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }
    pub fn link(&self, kind: &str, iface: &str) -> PathBuf {
        self.links_dir().join(format!("{kind}_{iface}"))
    }
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }
    /// The service's record of its decisions feed (what `status` shows of it).
    pub fn feed_file(&self) -> PathBuf {
        self.state_dir.join("decisions.json")
    }

    /// Serialises the engine's transactions (two `whitelist add` at once would otherwise
    /// race on the store). Released when the returned file is dropped.
    pub fn lock(&self) -> Result<fs::File> {
        private_dir(&self.state_dir)?;
        lock_file(&self.state_dir.join("lock"))
    }

    /// Shared side of the same lock, for reads that span several kernel objects (`status`,
    /// `stats`, `check`, `save`, a metrics scrape): they wait for a transaction in flight
    /// instead of reading sets it is replacing. None when nothing was ever loaded here.
    pub fn read_lock(&self) -> Option<fs::File> {
        let f = fs::File::open(self.state_dir.join("lock")).ok()?;
        // SAFETY: flock on a file descriptor we own for the duration of the call.
        (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } == 0).then_some(f)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IfaceState {
    pub name: String,
    pub ifindex: u32,
    /// What the operator asked for: auto, native or skb.
    pub mode: String,
}

/// What is installed: which backend, from which build, on which interfaces.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub backend: Kind,
    /// Hash of the BPF object that is pinned, to refuse mixing builds.
    pub object_hash: String,
    pub interfaces: Vec<IfaceState>,
    /// Why this backend runs, when `--backend auto` chose it over eBPF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl State {
    pub fn new(backend: Kind) -> State {
        State {
            backend,
            object_hash: String::new(),
            interfaces: Vec::new(),
            why: None,
        }
    }

    pub fn load(paths: &Paths) -> Result<Option<State>> {
        read_json(&paths.state_file())
    }

    pub fn save(&self, paths: &Paths) -> Result<()> {
        write_atomic(
            &paths.state_file(),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }
}

/// Opens a file whose contents root acts on (a policy, a list of addresses), refusing one
/// that anyone but root and this user could have written: the file and every directory
/// above it (along the path as given and along the links it resolves to) must be owned by
/// root or this user and writable by no one else. A sticky directory (as /tmp) may be
/// writable by all: its other users cannot replace what root or this user put in it.
/// As sshd's StrictModes judges `authorized_keys`.
pub fn open_trusted(what: &str, path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::MetadataExt as _;
    let f =
        fs::File::open(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    // SAFETY: geteuid(2) cannot fail.
    let me = unsafe { libc::geteuid() };
    let judge = |what: &Path, m: &fs::Metadata, dir: bool| -> Result<()> {
        let sticky = dir && m.mode() & 0o1000 != 0;
        if m.uid() != 0 && m.uid() != me {
            bail!(
                "{} is not safe to act on: {} {} is owned by uid {}, and whoever owns it \
                 controls this firewall (make it root's: chown root)",
                path.display(),
                if dir { "its directory" } else { "the file" },
                what.display(),
                m.uid()
            );
        }
        if m.mode() & 0o022 != 0 && !sticky {
            bail!(
                "{} is not safe to act on: {} {} (mode {:o}) is writable by others than its \
                 owner, who could change this firewall (chmod go-w)",
                path.display(),
                if dir { "its directory" } else { "the file" },
                what.display(),
                m.mode() & 0o7777
            );
        }
        Ok(())
    };
    judge(path, &f.metadata()?, false)?;
    let absolute = std::path::absolute(path)?;
    let resolved = fs::canonicalize(path)?;
    for chain in [&absolute, &resolved] {
        for dir in chain.ancestors().skip(1) {
            let m = fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            judge(dir, &m, true)?;
        }
    }
    Ok(f)
}

/// The most a policy file (or a list of addresses) may hold: beyond the largest whitelist
/// the backends take, with room for comments.
pub const MAX_POLICY_FILE: u64 = 512 << 20;

/// The text of a file root acts on (`open_trusted`), at most `MAX_POLICY_FILE` bytes.
pub fn read_trusted(what: &str, path: &Path) -> Result<String> {
    use std::io::Read as _;
    let f = open_trusted(what, path)?;
    let mut text = String::new();
    f.take(MAX_POLICY_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {} (not UTF-8 text?)", path.display()))?;
    if text.len() as u64 > MAX_POLICY_FILE {
        bail!(
            "{} is over {} MiB: refused",
            path.display(),
            MAX_POLICY_FILE >> 20
        );
    }
    Ok(text)
}

/// A system tool (`iptables-nft`, `ipset`, `ip`, `mount`) to run as root: looked up in the
/// system's own directories only, never through `PATH`, which whoever starts the command
/// may have set (a directory of theirs first would run their `iptables` as root).
pub fn system_tool(name: &str) -> std::process::Command {
    const DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
    let found = DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    // Not installed: the first place it would be, so the error names a path.
    std::process::Command::new(found.unwrap_or_else(|| Path::new(DIRS[0]).join(name)))
}

/// A JSON file of ours: None when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read_to_string(path) {
        Ok(s) => {
            Ok(Some(serde_json::from_str(&s).with_context(|| {
                format!("{} is corrupt", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// An exclusive lock on `path` (created, with its directory, if missing), released when
/// the returned file is dropped. Opened without following a symbolic link and without
/// truncating, and refused unless it is a regular file owned by this user: a link or a file
/// planted by someone else can neither redirect nor empty a file of ours.
pub fn lock_file(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    let meta = f.metadata()?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me {
        anyhow::bail!(
            "the lock file {} is not a regular file owned by uid {me}: remove it",
            path.display()
        );
    }
    // SAFETY: flock on a file descriptor we own for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        anyhow::bail!(
            "cannot lock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
}

/// Field `n` (1-based, as proc(5) numbers them; 3 or more) of /proc/PID/stat, if the
/// process exists. The command name (field 2) may hold spaces and parentheses: fields are
/// counted after its closing parenthesis.
pub fn proc_stat_field(pid: u32, n: usize) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// Now, as Unix time in seconds (deadlines, record times, metrics).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Creates `dir` (and its parents) if missing, the last one with mode 0700; refuses a
/// `dir` that is a symbolic link or not owned by this user (someone else's directory, or a
/// link planted where the state dir goes, would get root's files).
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta =
        fs::symlink_metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        anyhow::bail!(
            "{} is not a directory of uid {me} (a symbolic link, or another user's): refusing to keep state there",
            dir.display()
        );
    }
    Ok(())
}

/// Write-then-rename, so a crash never leaves half a file behind. The temporary file is
/// new (never a file or link someone placed: O_EXCL, O_NOFOLLOW), of a name of its own,
/// and readable by this user only, whatever the umask.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// `write_atomic` with the file's mode.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        // rename(2) replaces whatever is at `path`, a link included, without following it.
        fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::{lock_file, open_trusted, private_dir, write_atomic};

    /// Files are written new and private; a link planted at a file's name is replaced, not
    /// followed; a state dir that is a link, or another user's, is refused.
    #[test]
    fn state_files_are_private_and_never_follow_links() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("isolation-state-{}", std::process::id()));
        let state = dir.join("state");
        private_dir(&state).unwrap();
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let file = state.join("state.json");
        std::os::unix::fs::symlink(&victim, &file).unwrap();
        write_atomic(&file, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "{}");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(&state).unwrap().count(),
            1,
            "no temporary left"
        );
        let link = dir.join("linked-state");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let e = private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory of uid"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A symbolic link planted where a lock goes is refused, and what it points to is
    /// neither emptied nor locked; a real lock file is reused, its content kept.
    #[test]
    fn a_lock_never_follows_a_link_nor_truncates() {
        let dir = std::env::temp_dir().join(format!("isolation-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let link = dir.join("planted.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = lock_file(&link).unwrap_err();
        assert!(format!("{err:#}").contains("planted.lock"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

        let real = dir.join("real.lock");
        std::fs::write(&real, "kept").unwrap();
        drop(lock_file(&real).unwrap());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A policy root acts on is refused when someone else could have written it: a file or
    /// a directory above it owned by another user, or writable by others (a sticky
    /// directory excepted), also behind a link. Root's own file in root's directory, and in
    /// a sticky world-writable one, is read (the positive controls).
    #[test]
    fn a_file_others_could_write_is_not_acted_on() {
        use std::os::unix::fs::{PermissionsExt as _, chown};
        // SAFETY: geteuid(2) cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give files to another user");
            return;
        }
        let dir = std::env::temp_dir().join(format!("isolation-trust-{}", std::process::id()));
        let mode = |p: &std::path::Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let file = |p: &std::path::Path| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "[whitelist]\n").unwrap();
            mode(p, 0o644);
            p.to_path_buf()
        };
        std::fs::create_dir_all(&dir).unwrap();
        mode(&dir, 0o755);
        let refused = |p: &std::path::Path, why: &str| {
            let e = format!("{:#}", open_trusted("policy", p).unwrap_err());
            assert!(e.contains(why), "{}: {e}", p.display());
        };
        let good = file(&dir.join("root/policy.toml"));
        mode(good.parent().unwrap(), 0o755);
        open_trusted("policy", &good).unwrap();

        let theirs = file(&dir.join("root/theirs.toml"));
        chown(&theirs, Some(65534), None).unwrap();
        refused(&theirs, "owned by uid 65534");

        let loose = file(&dir.join("root/loose.toml"));
        mode(&loose, 0o664);
        refused(&loose, "writable by others");

        let open_dir = file(&dir.join("open/policy.toml"));
        mode(open_dir.parent().unwrap(), 0o777);
        refused(&open_dir, "its directory");

        let sticky = file(&dir.join("sticky/policy.toml"));
        mode(sticky.parent().unwrap(), 0o1777);
        open_trusted("policy", &sticky).unwrap();

        let their_dir = file(&dir.join("user/policy.toml"));
        chown(their_dir.parent().unwrap(), Some(65534), None).unwrap();
        let link = dir.join("root/linked.toml");
        std::os::unix::fs::symlink(&their_dir, &link).unwrap();
        refused(&link, "owned by uid 65534");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
