//! Pinned maps opened from their pins: as aya maps, as the map an array of maps holds, or
//! mapped into this process (mmapable arrays). Every module of the backend opens maps here;
//! none of this loads or pins anything (`pins` does).

use std::os::fd::AsFd as _;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Map, MapData};

use crate::state::Paths;

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

/// Did a map lookup or delete find no such key?
pub fn not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The map a map stands for: itself, or for an array of maps (the exact whitelist hashes)
/// the map it holds. What fill levels, dumps and memory figures read.
pub fn held_map(data: MapData) -> Result<MapData> {
    if data.info()?.map_type()? != aya::maps::MapType::ArrayOfMaps {
        return Ok(data);
    }
    let outer: aya::maps::ArrayOfMaps<MapData, MapData> = Map::from_map_data(data)?.try_into()?;
    outer
        .get(&0, 0)
        .context("an array of maps that holds no map")
}

/// A pinned mmapable array (BPF_F_MMAPABLE) mapped shared into this process: the loader's
/// writes are the datapath's reads, with no syscall per element. Unmapped on drop. (aya has
/// no call for a map's memory mapping: mmap(2) on the map's fd.)
pub struct SharedArray {
    ptr: *mut u8,
    len: usize,
}

impl SharedArray {
    /// Maps the whole pinned array `name`: its elements back to back (the kernel rounds an
    /// mmapable array's value size up to 8 bytes).
    pub fn open(paths: &Paths, name: &str) -> Result<SharedArray> {
        let map = MapData::from_pin(paths.map(name))
            .with_context(|| format!("cannot open the pinned map {name}"))?;
        let info = map.info()?;
        let len = info.max_entries() as usize * (info.value_size() as usize).next_multiple_of(8);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&map.fd().as_fd());
        // SAFETY: a shared read-write mapping of `len` bytes of an mmapable array, unmapped
        // on drop; the mapping outlives the fd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(anyhow!(
                "cannot map the array {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(SharedArray {
            ptr: p as *mut u8,
            len,
        })
    }

    /// The mapping's start (page-aligned).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The array's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, no longer used.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}
