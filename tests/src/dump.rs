//! What a refused change must leave as it was: the contents of the maps a policy writes, and
//! the files of the state dir, byte for byte.

use std::{collections::BTreeMap, path::Path};

use aya::maps::MapData;
use isolation_common::maps;
use isolation_user::backend::ebpf::syscall;

/// The maps a policy change writes (the others move with traffic: counters, connections).
pub fn policy_map_names() -> Vec<&'static str> {
    let mut v = vec![
        maps::CONFIG,
        maps::WL_V4,
        maps::WL_V4_LPM,
        maps::WL_V6,
        maps::WL_V6_LPM,
        maps::META,
    ];
    v.extend(maps::NET_V4);
    v.extend(maps::NET_V6);
    v.extend(maps::PORTS);
    v
}

pub type Dump = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// The contents of the policy maps pinned under `pin`.
pub fn policy_maps(pin: &Path) -> Dump {
    policy_map_names()
        .into_iter()
        .map(|name| {
            // An array of maps (the exact whitelist hashes): the contents of the map it holds.
            let m = MapData::from_pin(pin.join(name))
                .map_err(anyhow::Error::from)
                .and_then(isolation_user::backend::ebpf::pinned::held_map)
                .unwrap_or_else(|e| panic!("open pinned map {name}: {e:#}"));
            let info = m.info().unwrap();
            let fd = std::os::fd::AsFd::as_fd(m.fd());
            let entries =
                syscall::entries_raw(fd, info.key_size() as usize, info.value_size() as usize)
                    .unwrap_or_else(|e| panic!("dump {name}: {e}"));
            (name.to_string(), entries)
        })
        .collect()
}

/// What the datapath reads of a dump: the idle isolation slot's maps (and its META
/// element) left out. An apply refused half-way may leave its policy there, unread; the next
/// apply overwrites it.
pub fn live_only(d: &Dump) -> Dump {
    let config = &d[maps::CONFIG][0].1;
    let live = u32::from_ne_bytes(config[8..12].try_into().unwrap()) as usize & 1;
    let idle = 1 - live;
    let mut out = d.clone();
    for name in [maps::NET_V4[idle], maps::NET_V6[idle], maps::PORTS[idle]] {
        out.remove(name);
    }
    out.get_mut(maps::META)
        .unwrap()
        .retain(|(k, _)| u32::from_ne_bytes(k[..4].try_into().unwrap()) as usize == live);
    out
}

/// Every file of a state dir (but the lock), by name.
pub fn state_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "lock" && e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Asserts that two dumps are equal, naming the first map or file that differs.
pub fn assert_same(
    what: &str,
    before: &(Dump, BTreeMap<String, Vec<u8>>),
    after: &(Dump, BTreeMap<String, Vec<u8>>),
) {
    for (name, entries) in &before.0 {
        assert!(
            after.0.get(name) == Some(entries),
            "{what}: map {name} changed ({} entries before, {} after)",
            entries.len(),
            after.0.get(name).map(|e| e.len()).unwrap_or(0)
        );
    }
    assert_eq!(
        before.1.keys().collect::<Vec<_>>(),
        after.1.keys().collect::<Vec<_>>(),
        "{what}: the state dir's files changed"
    );
    for (name, bytes) in &before.1 {
        assert!(
            after.1.get(name) == Some(bytes),
            "{what}: state file {name} changed"
        );
    }
}

/// Replaces a pinned map by a small map of the same type, key and value sizes, holding the
/// same entries (as many as fit), pinned at the same path: the programs keep the real map, while the loader, which opens the pin,
/// meets a map the kernel refuses to grow past `max_entries` (a stand-in for the kernel
/// refusing an update: out of memory, a map full of someone else's entries).
pub fn plant_small_map(pin: &Path, name: &str, max_entries: u32) {
    let path = pin.join(name);
    let m = MapData::from_pin(&path).unwrap();
    let info = m.info().unwrap();
    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        _rest: [u64; 12],
    }
    let lpm = info.map_type().unwrap() == aya::maps::MapType::LpmTrie;
    let mut attr = Create {
        // BPF_MAP_TYPE_LPM_TRIE (allocated on demand, as the kernel demands) or HASH.
        map_type: if lpm { 11 } else { 1 },
        map_flags: u32::from(lpm),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries,
        ..Default::default()
    };
    // SAFETY: bpf(BPF_MAP_CREATE) with an attribute struct that lives for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut attr as *mut Create,
            std::mem::size_of::<Create>(),
        )
    };
    assert!(fd >= 0, "create map: {}", std::io::Error::last_os_error());
    let old = syscall::entries_raw(
        std::os::fd::AsFd::as_fd(m.fd()),
        info.key_size() as usize,
        info.value_size() as usize,
    )
    .unwrap();
    for (k, v) in old.iter().take(max_entries as usize) {
        #[repr(C)]
        struct Elem {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut e = Elem {
            map_fd: fd as u32,
            _pad: 0,
            key: k.as_ptr() as u64,
            value: v.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: bpf(BPF_MAP_UPDATE_ELEM) with key and value buffers of the map's sizes.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                2,
                &mut e as *mut Elem,
                std::mem::size_of::<Elem>(),
            )
        };
        assert_eq!(r, 0, "copy an entry: {}", std::io::Error::last_os_error());
    }
    std::fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut pin_attr = Pin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: bpf(BPF_OBJ_PIN) with a path and fd valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            &mut pin_attr as *mut Pin,
            std::mem::size_of::<Pin>(),
        )
    };
    assert_eq!(r, 0, "pin map: {}", std::io::Error::last_os_error());
    // SAFETY: our fd, closed once; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}
