//! Interfaces of this network namespace: a name for an index and an index for a name.

/// Interface name for an ifindex of this network namespace.
pub fn name(ifindex: u32) -> String {
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

pub fn index(name: &str) -> anyhow::Result<u32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| anyhow::anyhow!("bad interface name '{name}'"))?;
    // SAFETY: a NUL-terminated string we own.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => anyhow::bail!("no interface named '{name}' in this network namespace"),
        i => Ok(i),
    }
}
