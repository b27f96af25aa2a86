//! One module per verb, each with its clap arguments and a `run`.
pub mod apply;
pub mod check;
pub mod edit;
pub mod export;
pub mod fleet;
pub mod import;
pub mod load;
pub mod run;
pub mod stats;
pub mod status;
pub mod trace;
pub mod whitelist;

/// Interface name for an ifindex of this network namespace.
pub fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname(3) requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: on success `p` points into `buf`, NUL-terminated by if_indextoname.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

pub fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| anyhow::anyhow!("bad interface name '{name}'"))?;
    // SAFETY: a NUL-terminated string we own.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => anyhow::bail!("no interface named '{name}' in this network namespace"),
        i => Ok(i),
    }
}
