//! Raw `bpf(2)` calls the benchmark needs: a bare XDP program as the floor, and
//! BPF_PROG_TEST_RUN on any program fd, so every figure is taken the same way.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    _rest: [u64; 12],
}

/// `r0 = XDP_PASS; exit`: the cheapest possible XDP program.
pub fn load_xdp_pass() -> Result<RawFd> {
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"bare_pass");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const _,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        bail!(
            "cannot load the bare XDP program: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(fd as RawFd)
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs a program `repeat` times on `data`: (return value, ns per run as the kernel measured).
pub fn test_run(fd: RawFd, data: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut _,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if r != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}

pub fn fd<P>(p: &P) -> Result<RawFd>
where
    P: HasFd,
{
    p.raw_fd()
}

pub trait HasFd {
    fn raw_fd(&self) -> Result<RawFd>;
}

impl HasFd for aya::programs::Xdp {
    fn raw_fd(&self) -> Result<RawFd> {
        Ok(self.fd()?.as_fd().as_raw_fd())
    }
}

impl HasFd for aya::programs::SchedClassifier {
    fn raw_fd(&self) -> Result<RawFd> {
        Ok(self.fd()?.as_fd().as_raw_fd())
    }
}

/// Wall time (s) and peak resident memory (KiB) of a command, which must succeed. Measured
/// by /usr/bin/time: a child forked from this (large) process would report our own pages.
pub fn run_measured(c: &mut Command) -> Result<(f64, u64)> {
    let mut t = Command::new("/usr/bin/time");
    t.args(["-f", "ISOLATION_BENCH %e %M"])
        .arg(c.get_program())
        .args(c.get_args());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    let out = t.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{c:?} failed: {}", err.trim());
    }
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with("ISOLATION_BENCH "))
        .unwrap_or_default();
    let mut f = line.split_whitespace().skip(1);
    let secs: f64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((secs, kib))
}
