//! Raw `bpf(2)` calls the benchmark needs: a bare XDP program as the floor, and
//! BPF_PROG_TEST_RUN on any program fd, so every figure is taken the same way.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_F_NO_PREALLOC: u32 = 1;
const MAP_LOOKUP_ELEM: i32 = 1;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] struct of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One BPF instruction, as the kernel reads it.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]])
}

const fn mov_imm(dst: u8, imm: i32) -> u64 {
    insn(0xb7, dst, 0, 0, imm)
}
const fn mov_reg(dst: u8, src: u8) -> u64 {
    insn(0xbf, dst, src, 0, 0)
}
const fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}
const EXIT: u64 = insn(0x95, 0, 0, 0, 0);
const GET_PRANDOM_U32: i32 = 7;
const TAIL_CALL: i32 = 12;

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
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 12],
}

fn load_xdp(name: &str, insns: &[u64]) -> Result<RawFd> {
    load_prog(BPF_PROG_TYPE_XDP, BPF_XDP, name, insns)
}

fn load_prog(prog_type: u32, attach: u32, name: &str, insns: &[u64]) -> Result<RawFd> {
    let license = b"GPL\0";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: attach,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd as RawFd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "cannot load the program {name}: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// `r0 = action; exit`: the cheapest possible XDP program (XDP_PASS is the verdict floor,
/// XDP_DROP the drop-rate floor, XDP_TX the traffic generator's one-source mode).
pub fn load_xdp_ret(action: i32) -> Result<RawFd> {
    let name = match action {
        XDP_DROP => "bare_drop",
        XDP_PASS => "bare_pass",
        _ => "bare_tx",
    };
    load_xdp(name, &[mov_imm(0, action), EXIT])
}

/// The instructions that overwrite the 32-bit big-endian word at packet offset `off` with
/// `base + random % modulus`: a fresh key per run, so lookups spread over a whole set.
fn random_word(off: i16, base: u32, modulus: u32) -> Vec<u64> {
    random_word_at(off, base, modulus, 0, 4)
}

/// `random_word` for a context whose packet pointers are at `data` and `data_end` (xdp_md:
/// 0 and 4; __sk_buff: 76 and 80).
fn random_word_at(off: i16, base: u32, modulus: u32, data: i16, data_end: i16) -> Vec<u64> {
    vec![
        mov_reg(6, 1),
        call(GET_PRANDOM_U32),
        insn(0x94, 0, 0, 0, modulus as i32), // w0 %= modulus
        insn(0x04, 0, 0, 0, base as i32),    // w0 += base
        insn(0xdc, 0, 0, 0, 32),             // r0 = htobe32(r0)
        insn(0x61, 2, 6, data, 0),           // r2 = ctx->data
        insn(0x61, 3, 6, data_end, 0),       // r3 = ctx->data_end
        mov_reg(4, 2),
        insn(0x07, 4, 0, 0, off as i32 + 4), // r4 += off + 4
        insn(0x2d, 4, 3, 1, 0),              // if r4 > r3 skip the store
        insn(0x63, 2, 0, off, 0),            // *(u32 *)(r2 + off) = r0
    ]
}

/// The generator for many sources: a random word at `off`, then XDP_TX.
pub fn load_xdp_tx_random(off: i16, base: u32, modulus: u32) -> Result<RawFd> {
    let mut p = random_word(off, base, modulus);
    p.extend([mov_imm(0, XDP_TX), EXIT]);
    load_xdp("gen_random", &p)
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `map[key] = value` for a map of u32 keys and u32 values.
fn update_u32(map: RawFd, key: u32, value: u32) -> std::io::Result<i64> {
    let mut up = MapElemAttr {
        map_fd: map as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut up)
}

/// The realistic floor of a whitelist: parse Ethernet and IPv4, one hash lookup of the
/// source, drop on a miss (what any source whitelist must do, and nothing more). Its hash
/// is the same kind as ours (allocated on demand), sized to `sources` and holding them.
/// Anything that is not a whole IPv4 header passes.
pub fn load_one_lookup(sources: &[std::net::Ipv4Addr]) -> Result<RawFd> {
    let map = isolation_user::backend::ebpf::syscall::create_map(
        BPF_MAP_TYPE_HASH,
        4,
        4,
        (sources.len() as u32).max(1),
        BPF_F_NO_PREALLOC,
    )
    .context("cannot create the floor's hash")? as RawFd;
    for a in sources {
        update_u32(map, u32::from_ne_bytes(a.octets()), 1)
            .context("cannot fill the floor's hash")?;
    }
    let p = [
        mov_reg(6, 1),
        insn(0x61, 2, 6, 0, 0),      // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),      // r3 = ctx->data_end
        mov_reg(4, 2),               //
        insn(0x07, 4, 0, 0, 34),     // r4 += 14 + 20
        insn(0x2d, 4, 3, 10, 0),     // if r4 > r3 goto pass
        insn(0x69, 5, 2, 12, 0),     // r5 = ether type (as loaded, little endian)
        insn(0x55, 5, 0, 8, 0x0008), // if r5 != htons(0x0800) goto pass
        insn(0x61, 5, 2, 26, 0),     // r5 = source address
        insn(0x63, 10, 5, -4, 0),    // *(u32 *)(r10 - 4) = r5
        mov_reg(2, 10),              //
        insn(0x07, 2, 0, 0, -4),     // r2 = &key
        insn(0x18, 1, 1, 0, map),    // r1 = map (BPF_PSEUDO_MAP_FD)
        0,                           //
        call(MAP_LOOKUP_ELEM),       //
        insn(0x15, 0, 0, 2, 0),      // if r0 == NULL goto drop
        mov_imm(0, XDP_PASS),        // pass:
        EXIT,                        //
        mov_imm(0, XDP_DROP),        // drop:
        EXIT,
    ];
    // The map fd stays open with the process, like the wrapper's.
    load_xdp("one_lookup", &p)
}

/// A wrapper for random keys in BPF_PROG_TEST_RUN (which repeats one frame): it writes
/// `base + random % modulus` at `off`, then tail-calls `target`. The floor is measured
/// through the same wrapper, so the ratio charges ours only for its own work.
pub fn load_random_wrapper(off: i16, base: u32, modulus: u32, target: RawFd) -> Result<RawFd> {
    random_wrapper(false, off, base, modulus, target)
}

/// The same for a TC (sched_cls) program.
pub fn load_random_wrapper_tc(off: i16, base: u32, modulus: u32, target: RawFd) -> Result<RawFd> {
    random_wrapper(true, off, base, modulus, target)
}

fn random_wrapper(tc: bool, off: i16, base: u32, modulus: u32, target: RawFd) -> Result<RawFd> {
    let map =
        isolation_user::backend::ebpf::syscall::create_map(BPF_MAP_TYPE_PROG_ARRAY, 4, 4, 1, 0)
            .context("cannot create a prog array")? as RawFd;
    let mut p = if tc {
        random_word_at(off, base, modulus, 76, 80)
    } else {
        random_word(off, base, modulus)
    };
    p.extend([
        mov_reg(1, 6),
        insn(0x18, 2, 1, 0, map), // r2 = map (BPF_PSEUDO_MAP_FD)
        0,
        mov_imm(3, 0),
        call(TAIL_CALL),
        // XDP_PASS, or TC_ACT_OK: what a failed tail call returns.
        mov_imm(0, if tc { 0 } else { XDP_PASS }),
        EXIT,
    ]);
    let fd = if tc {
        load_prog(BPF_PROG_TYPE_SCHED_CLS, 0, "rand_wrap_tc", &p)?
    } else {
        load_xdp("rand_wrap", &p)?
    };
    update_u32(map, 0, target as u32).context("cannot put the program in the prog array")?;
    // The map fd stays open for the life of the process: the kernel empties a prog array
    // when its last user reference goes, and the tail call would then fail silently.
    Ok(fd)
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 6],
}

/// Attaches an XDP program (native mode) to `ifindex` in this thread's namespace; it stays
/// attached while the returned link fd is open.
pub fn attach_xdp(prog: RawFd, ifindex: u32) -> Result<RawFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    Ok(bpf(BPF_LINK_CREATE, &mut attr).context("cannot attach XDP")? as RawFd)
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
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok((attr.retval, attr.duration))
}

/// Runs a generator `repeat` times in live-frames mode: every XDP_TX really leaves through
/// `ifindex` (of this thread's namespace), in batches of 64 frames.
pub fn test_run_live(fd: RawFd, frame: &[u8], ifindex: u32, repeat: u32) -> Result<()> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN (live frames)")?;
    Ok(())
}

/// Why this kernel will not run XDP programs on live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`,
/// which the live harness's generator sends with), or None when it does: one frame through
/// a bare XDP_DROP program on the loopback device. Some kernels refuse it (EPERM).
pub fn live_frames_refused() -> Result<Option<String>> {
    let fd = load_xdp_ret(XDP_DROP)?;
    let mut frame = [0u8; 64];
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let r = test_run_live(fd, &frame, 1, 1);
    // SAFETY: closes the program's fd, opened above and not used after.
    unsafe { libc::close(fd) };
    Ok(r.err().map(|e| format!("{e:#}")))
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

/// Kernel memory (bytes) the maps pinned under `paths` hold, as the kernel accounts it
/// (`memlock` in the fdinfo, what `bpftool map show` prints): the named maps, or all of them
/// when `names` is empty. An array of maps counts with the map it holds.
pub fn memlock_of(paths: &isolation_user::state::Paths, names: &[&str]) -> Result<u64> {
    use aya::maps::MapData;
    use isolation_user::backend::ebpf::pinned::held_map;
    let names: Vec<String> = if names.is_empty() {
        std::fs::read_dir(&paths.pin_dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("prog") && !n.starts_with("link"))
            .collect()
    } else {
        names.iter().map(|n| n.to_string()).collect()
    };
    let memlock = |m: &MapData| -> Result<u64> {
        let fd = m.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok())
            .context("no memlock in the map's fdinfo")
    };
    let mut total = 0;
    for name in names {
        let Ok(m) = MapData::from_pin(paths.map(&name)) else {
            continue; // a program or link pin
        };
        total += memlock(&m)?;
        // An array of maps counts with the map it holds.
        let id = m.info()?.id();
        let held = held_map(m)?;
        if held.info()?.id() != id {
            total += memlock(&held)?;
        }
    }
    Ok(total)
}
