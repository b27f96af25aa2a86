//! `apply --confirm-within SECS` and `confirm`: an apply that undoes itself unless confirmed
//! in time, as `iptables-apply` does for a remote admin.
//!
//! How the deadline outlives the CLI: before the new policy is applied, the CLI writes the
//! live policy to the state dir and starts a detached helper (this binary's hidden
//! `rollback-timer` verb, in a session of its own via setsid, stdio away from the terminal),
//! which sleeps until the deadline and then applies the saved policy through the engine.
//! A helper process, not a timer in the `run` service, because a host managed with the CLI
//! alone has no service; and not a BPF timer, because the rollback is a whole engine
//! transaction (the iptables backend has no BPF at all). Killing the CLI, or the SSH session
//! dropping, leaves the helper running. `confirm` removes the pending record and stops the
//! helper. Both sides decide under one lock (`confirm/lock`), so a confirmation and the
//! rollback can never both happen.
//!
//! The helper is started before the apply: a CLI killed between the two leaves a rollback to
//! the policy that is still live, which changes nothing. It is moved out of the login
//! session's cgroup (into `isolation-rollback`, beside the session tree) before the apply:
//! a session manager that ends a session's processes at logout (logind's
//! `KillUserProcesses=yes`) does not end it.
//!
//! Both ends run inside the engine's transaction (`Change::Replace { confirm }` arms,
//! `Change::RollBack` restores), under the engine lock and then the confirmation lock, in
//! that order everywhere: the policy saved is the one the apply replaces, never an older
//! one that a change landing between the two would leave out. This module keeps the
//! records; the engine changes the policy.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    policy::{self, Policy},
    state::{Paths, lock_file, read_json, unix_now as now, write_atomic},
};

/// An apply awaiting confirmation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pending {
    /// The file that was applied.
    pub file: String,
    /// Unix time after which the previous policy comes back.
    pub deadline: f64,
    /// Generation of the policy that comes back.
    pub previous_generation: u32,
    /// The helper that will roll back (0 until it is started).
    pub helper_pid: u32,
    /// When the helper started (clock ticks after boot, /proc/PID/stat): with the pid, it
    /// names that process and no other that later gets the same pid.
    #[serde(default)]
    pub helper_start: u64,
}

/// The last rollback, to tell a late `confirm` what happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolledBack {
    pub file: String,
    pub at: f64,
    pub generation: u32,
    /// Why the previous policy could not be restored (the new one stays).
    #[serde(default)]
    pub error: Option<String>,
}

fn dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("confirm")
}
fn pending_file(paths: &Paths) -> PathBuf {
    dir(paths).join("pending.json")
}
/// The policy a rollback restores.
pub fn previous_file(paths: &Paths) -> PathBuf {
    dir(paths).join("previous.toml")
}
fn rolled_back_file(paths: &Paths) -> PathBuf {
    dir(paths).join("rolled-back.json")
}

/// The confirmation lock, held while the pending record is read and acted on.
fn lock(paths: &Paths) -> Result<fs::File> {
    lock_file(&dir(paths).join("lock"))
}

/// The apply awaiting confirmation, if any.
pub fn pending(paths: &Paths) -> Result<Option<Pending>> {
    read_json(&pending_file(paths))
}

/// When process `pid` started (field 22 of /proc/PID/stat), if it exists.
fn start_time(pid: u32) -> Option<u64> {
    crate::state::proc_stat_field(pid, 22)
}

/// The helper of `p`, as a pidfd, if it still runs: the process with its pid *and* its
/// start time (a pid reused by another process since is not it). The pidfd is opened
/// before the check, so it names the process checked, whatever happens to the pid after.
fn helper(p: &Pending) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    if p.helper_pid == 0 {
        return None;
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.helper_pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    (start_time(p.helper_pid)? == p.helper_start).then_some(fd)
}

fn clear(paths: &Paths) {
    let _ = fs::remove_file(pending_file(paths));
    let _ = fs::remove_file(previous_file(paths));
}

/// Saves the live policy (`previous`, of generation `generation`) and starts the helper that
/// restores it at `now + secs`, unless `confirm` runs first. The engine calls it under its
/// lock, before applying the new policy, and `disarm`s if that fails.
pub fn arm(
    paths: &Paths,
    file: &str,
    secs: f64,
    previous: &Policy,
    generation: u32,
) -> Result<Pending> {
    let _l = lock(paths)?;
    if let Some(p) = pending(paths)? {
        if helper(&p).is_some() {
            bail!(
                "an apply of {} awaits confirmation for {:.0} s more: run `isolation-user confirm` \
                 to keep it, or wait for its rollback, before another --confirm-within",
                p.file,
                (p.deadline - now()).max(0.0)
            );
        }
        bail!(
            "an apply of {} awaits confirmation but its rollback timer (pid {}) is gone: run \
             `isolation-user confirm` to keep the live policy",
            p.file,
            p.helper_pid
        );
    }
    write_atomic(&previous_file(paths), policy::to_toml(previous).as_bytes())?;
    let mut p = Pending {
        file: file.to_string(),
        deadline: now() + secs,
        previous_generation: generation,
        helper_pid: 0,
        helper_start: 0,
    };
    write_atomic(&pending_file(paths), serde_json::to_string(&p)?.as_bytes())?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir(paths).join("rollback.log"))?;
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--pin-dir")
        .arg(&paths.pin_dir)
        .arg("--state-dir")
        .arg(&paths.state_dir)
        .arg("rollback-timer")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves the terminal's session, so a
    // hangup of the SSH session (SIGHUP to its process group) does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            clear(paths);
            bail!("cannot start the rollback timer: {e}");
        }
    };
    p.helper_pid = child.id();
    // Out of the login session's cgroup before the apply: logind (`KillUserProcesses=yes`)
    // ends every process of a session at logout, and the helper must outlive it.
    for e in leave_session(p.helper_pid) {
        tracing::warn!("the rollback timer may end with this login session: {e}");
    }
    // Not reaped before we exit (we never wait for it), so /proc still has it.
    p.helper_start = start_time(p.helper_pid).unwrap_or(0);
    // The child is reaped by init once we exit.
    std::mem::forget(child);
    write_atomic(&pending_file(paths), serde_json::to_string(&p)?.as_bytes())?;
    Ok(p)
}

/// The cgroup the rollback helpers run in, under each hierarchy that tracks sessions.
const HELPER_CGROUP: &str = "isolation-rollback";

/// Moves process `pid` out of the login session's cgroup into `HELPER_CGROUP`, in every
/// hierarchy where a session manager keeps sessions: the unified one (cgroup v2) and a
/// named v1 one (`name=systemd`, `name=elogind`). The errors, one per hierarchy it could
/// not move to.
fn leave_session(pid: u32) -> Vec<String> {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return vec!["cannot read /proc/self/mountinfo".into()];
    };
    let mut errs = Vec::new();
    for line in mounts.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS ... - FSTYPE SOURCE SUPER-OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        let (fstype, super_opts) = (r.next(), r.nth(1).unwrap_or(""));
        let named = super_opts.split(',').any(|o| o.starts_with("name="));
        let sessions = match fstype {
            Some("cgroup2") => true,
            Some("cgroup") => named,
            _ => false,
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        if !sessions {
            continue;
        }
        let dir = PathBuf::from(point).join(HELPER_CGROUP);
        let moved = fs::create_dir(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .and_then(|()| fs::write(dir.join("cgroup.procs"), pid.to_string()));
        if let Err(e) = moved {
            errs.push(format!("cannot move it to {}: {e}", dir.display()));
        }
    }
    errs
}

/// The apply did not happen (refused) or changed nothing: nothing to confirm.
pub fn disarm(paths: &Paths) {
    if let Ok(_l) = lock(paths)
        && let Ok(Some(p)) = pending(paths)
    {
        stop_helper(&p);
        clear(paths);
    }
}

/// SIGTERM to the helper of `p`, if it still runs; never to a process that merely has its
/// pid now.
fn stop_helper(p: &Pending) {
    if let Some(fd) = helper(p) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGTERM,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Keeps the live policy: the pending rollback is cancelled. Returns what was pending.
pub fn confirm(paths: &Paths) -> Result<Pending> {
    let _l = lock(paths)?;
    let Some(p) = pending(paths)? else {
        if let Some(r) = read_json::<RolledBack>(&rolled_back_file(paths))? {
            if let Some(e) = r.error {
                bail!(
                    "nothing awaits confirmation: the apply of {} was not confirmed in time, \
                     but restoring the previous policy failed ({e}); the applied policy is live \
                     (generation {})",
                    r.file,
                    r.generation
                );
            }
            bail!(
                "nothing awaits confirmation: the apply of {} was not confirmed in time and was \
                 rolled back {:.0} s ago (generation {})",
                r.file,
                (now() - r.at).max(0.0),
                r.generation
            );
        }
        bail!("nothing awaits confirmation (no `apply --confirm-within` is pending)");
    };
    stop_helper(&p);
    clear(paths);
    Ok(p)
}

/// The helper's wait: until the deadline of the apply it was started for, or until that
/// apply is confirmed. True if the deadline came and the apply is still pending.
pub fn wait_for_deadline(paths: &Paths) -> Result<bool> {
    let me = std::process::id();
    loop {
        let Some(p) = pending(paths)? else {
            return Ok(false);
        };
        if p.helper_pid != 0 && p.helper_pid != me {
            return Ok(false);
        }
        let left = p.deadline - now();
        if left <= 0.0 {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_secs_f64(left.min(0.2)));
    }
}

/// A rollback that is due, held under the confirmation lock until it is `finish`ed: a
/// `confirm` meanwhile waits, then finds it done.
pub struct Due {
    _lock: fs::File,
    pub pending: Pending,
}

/// The rollback this helper (`me`) owes, if its apply is still pending: called by the
/// engine under its lock.
pub fn take_due(paths: &Paths, me: u32) -> Result<Option<Due>> {
    let l = lock(paths)?;
    Ok(pending(paths)?
        .filter(|p| p.helper_pid == me && p.deadline <= now())
        .map(|pending| Due { _lock: l, pending }))
}

impl Due {
    /// Records how the rollback ended (for a late `confirm`) and clears the pending apply.
    pub fn finish(self, paths: &Paths, generation: u32, error: Option<String>) -> Result<()> {
        write_atomic(
            &rolled_back_file(paths),
            serde_json::to_string(&RolledBack {
                file: self.pending.file.clone(),
                at: now(),
                generation,
                error,
            })?
            .as_bytes(),
        )?;
        clear(paths);
        Ok(())
    }
}
