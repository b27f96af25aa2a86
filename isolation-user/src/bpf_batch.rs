//! The kernel's batch map operations (BPF_MAP_UPDATE_BATCH / DELETE_BATCH), which aya does
//! not wrap: one syscall for thousands of hash entries instead of one each.

use std::os::fd::{AsRawFd as _, BorrowedFd};

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
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    // On error the kernel reports in `count` how many elements it processed.
    let done = attr.count as usize;
    if r == 0 {
        (done, Ok(()))
    } else {
        (done, Err(std::io::Error::last_os_error()))
    }
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

/// Every key of a hash map, read in batches (one syscall per `chunk` keys).
pub fn keys<K: bytemuck::Pod>(fd: BorrowedFd<'_>, value_size: usize) -> std::io::Result<Vec<K>> {
    const CHUNK: usize = 16 * 1024;
    let mut out: Vec<K> = Vec::new();
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
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let n = attr.count as usize;
        out.extend_from_slice(&keys[..n.min(CHUNK)]);
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // ENOENT: the walk is over (the last keys came with it).
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(out)
            } else {
                Err(e)
            };
        }
        tok_in = tok_out;
        first = false;
    }
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
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        (1, Ok(()))
    } else {
        (0, Err(std::io::Error::last_os_error()))
    }
}
