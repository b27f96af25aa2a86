//! Raw map syscalls that aya does not wrap: the kernel's batch operations (one syscall for
//! thousands of hash entries instead of one each), NOEXIST updates, and key counting.

use std::os::fd::{AsRawFd as _, BorrowedFd};

/// The `bpf(2)` syscall with one attribute struct: its result (a new fd for the commands
/// that open one); Err carries errno.
fn sys_bpf_value<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, exclusively borrowed #[repr(C)] attribute struct of the
    // size passed; the kernel reads and writes only within it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    sys_bpf_value(cmd, attr).map(|_| ())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Element flag of single updates: fail on a key that exists. (Batch updates refuse it.)
pub const BPF_NOEXIST: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn batch(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
    elem_flags: u64,
) -> (usize, std::io::Result<()>) {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map(|v| v.as_ptr() as u64).unwrap_or(0),
        count: count as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags,
        ..Default::default()
    };
    let r = sys_bpf(cmd, &mut attr);
    // On error the kernel reports in `count` how many elements it processed.
    (attr.count as usize, r)
}

/// Updates `count` entries (`keys` and `values` packed back to back). Returns how many were
/// written before an error, and the error.
pub fn update(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
    elem_flags: u64,
) -> (usize, std::io::Result<()>) {
    batch(
        BPF_MAP_UPDATE_BATCH,
        fd,
        keys,
        Some(values),
        count,
        elem_flags,
    )
}

pub fn delete(fd: BorrowedFd<'_>, keys: &[u8], count: usize) -> (usize, std::io::Result<()>) {
    batch(BPF_MAP_DELETE_BATCH, fd, keys, None, count, 0)
}

/// Walks a hash map in batch lookups of up to 16Ki entries, calling `each` with every
/// batch's keys and its values (`value_size` bytes each, back to back).
fn lookup_batches<K: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    value_size: usize,
    mut each: impl FnMut(&[K], &[u8]),
) -> std::io::Result<()> {
    const CHUNK: usize = 16 * 1024;
    let mut keys: Vec<K> = vec![K::zeroed(); CHUNK];
    let mut vals = vec![0u8; value_size * CHUNK];
    // The hash map's batch token is a bucket index; 8 bytes covers it.
    let (mut tok_in, mut tok_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &tok_in as *const u64 as u64
            },
            out_batch: &mut tok_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(CHUNK);
        each(&keys[..n], &vals[..n * value_size]);
        if let Err(e) = r {
            // ENOENT: the walk is over (the last entries came with it).
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(())
            } else {
                Err(e)
            };
        }
        tok_in = tok_out;
        first = false;
    }
}

/// Every key of a hash map whose values are `value_size` bytes, read in batches.
pub fn keys<K: bytemuck::Pod>(fd: BorrowedFd<'_>, value_size: usize) -> std::io::Result<Vec<K>> {
    let mut out = Vec::new();
    lookup_batches::<K>(fd, value_size, |k, _| out.extend_from_slice(k))?;
    Ok(out)
}

/// Every entry of a hash map, read in batches: its keys and, in the same order, its values.
pub fn entries<K: bytemuck::Pod, V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
) -> std::io::Result<(Vec<K>, Vec<V>)> {
    let (mut keys, mut vals) = (Vec::new(), Vec::new());
    lookup_batches::<K>(fd, std::mem::size_of::<V>(), |k, v| {
        keys.extend_from_slice(k);
        // Copied out value by value: the byte buffer need not be aligned for V.
        vals.extend(
            v.chunks_exact(std::mem::size_of::<V>().max(1))
                .map(bytemuck::pod_read_unaligned::<V>),
        );
    })?;
    Ok((keys, vals))
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// One update with flags (BPF_NOEXIST allowed here). Returns (1, Ok) when written.
pub fn update_one<K: bytemuck::Pod, V: bytemuck::Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> (usize, std::io::Result<()>) {
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
    };
    match sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
        Ok(()) => (1, Ok(())),
        Err(e) => (0, Err(e)),
    }
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// Walks the keys of any map type with BPF_MAP_GET_NEXT_KEY, from the start, calling `f`
/// on each (raw bytes) until it returns false or the keys run out.
fn walk_keys(
    fd: BorrowedFd<'_>,
    key_size: usize,
    mut f: impl FnMut(&[u8]) -> bool,
) -> std::io::Result<()> {
    #[repr(C)]
    struct NextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut cur = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    loop {
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: if first { 0 } else { cur.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        if !f(&next) {
            return Ok(());
        }
        first = false;
        std::mem::swap(&mut cur, &mut next);
    }
}

/// How many keys a map holds (works for every map type).
pub fn count_keys(fd: BorrowedFd<'_>, key_size: usize) -> std::io::Result<u64> {
    let mut n = 0;
    walk_keys(fd, key_size, |_| {
        n += 1;
        true
    })?;
    Ok(n)
}

/// Up to 4096 keys of any map, as raw bytes.
pub fn raw_keys(fd: BorrowedFd<'_>, key_size: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut n = 0;
    walk_keys(fd, key_size, |k| {
        out.extend_from_slice(k);
        n += 1;
        n < 4096
    })?;
    Ok(out)
}

/// Deletes one key given as raw bytes; a missing key is not an error.
pub fn delete_raw(fd: BorrowedFd<'_>, key: &[u8]) -> std::io::Result<()> {
    #[repr(C)]
    struct DelAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
    }
    let mut attr = DelAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
    };
    match sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches a pinned link now. Unpinning alone drops the last reference, and the kernel
/// releases a link from a workqueue, so the hook could still hold our program for a moment
/// after `unload` returns (and a program loaded next would see it there).
pub fn detach_pinned_link(path: &std::path::Path) -> std::io::Result<()> {
    let fd = obj_get(path)?;
    #[repr(C)]
    struct Detach {
        link_fd: u32,
    }
    let mut d = Detach {
        link_fd: fd.as_raw_fd() as u32,
    };
    sys_bpf(BPF_LINK_DETACH, &mut d)
}

const BPF_LINK_UPDATE: libc::c_long = 29;

/// Swaps the program of a pinned link for `new_prog` in one step (BPF_LINK_UPDATE): the
/// hook runs the old program or the new one, never neither. aya's `attach_to_link` does the
/// same but wants an owned link, which only unpinning would give (and a crash between the
/// unpin and the pin would detach it): the raw call works on the pinned link as it is.
pub fn update_pinned_link(path: &std::path::Path, new_prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let link = obj_get(path)?;
    #[repr(C)]
    struct Update {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut u = Update {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &mut u)
}

/// Opens a pinned object (BPF_OBJ_GET).
fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = sys_bpf_value(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// Every (key, value) of a map as raw bytes, sorted by key: a map's contents, comparable
/// whatever order its buckets keep (a dump before and after a refused change must match).
/// `value_size` is the whole value as a lookup returns it (per-CPU maps: all CPUs).
pub fn entries_raw(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut keys = Vec::new();
    walk_keys(fd, key_size, |k| {
        keys.push(k.to_vec());
        true
    })?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let mut v = vec![0u8; value_size];
        let mut attr = LookupAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: k.as_ptr() as u64,
            value: v.as_mut_ptr() as u64,
            flags: 0,
        };
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => out.push((k, v)),
            // Deleted between the walk and the lookup.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A new map (its fd), straight from `bpf(BPF_MAP_CREATE)`: for a probe, and for the
/// benchmark's hand-assembled programs (aya creates the datapath's maps).
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> std::io::Result<i32> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
    };
    sys_bpf_value(BPF_MAP_CREATE, &mut attr).map(|fd| fd as i32)
}

/// Does the kernel let this process create a BPF map? (A one-entry array, closed at once.)
/// Raw, because aya's feature probes log warnings where BPF is refused, which is exactly
/// where `--backend auto` asks.
pub fn can_create_maps() -> std::io::Result<()> {
    let fd = create_map(2, 4, 4, 1, 0)?; // BPF_MAP_TYPE_ARRAY
    // SAFETY: the kernel just gave us this fd; nothing else holds it.
    unsafe { libc::close(fd) };
    Ok(())
}
