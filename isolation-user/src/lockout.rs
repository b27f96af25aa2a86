//! Refuse whitelists that would lock out the operator running the command over SSH.

use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::policy::Whitelist;

/// The client address of the SSH session this command runs in, from `SSH_CONNECTION`
/// ("client_ip client_port server_ip server_port").
pub fn ssh_client() -> Option<IpAddr> {
    let v = std::env::var("SSH_CONNECTION").ok()?;
    let ip = v.split_whitespace().next()?;
    // OpenSSH writes IPv4-mapped clients as plain IPv4; strip a zone id if any.
    ip.split('%').next()?.parse().ok()
}

pub fn admits(wl: &Whitelist, addr: IpAddr) -> bool {
    !wl.enabled || wl.allow.iter().any(|n| n.contains(&addr))
}

/// Errors unless `wl` admits the SSH client (or there is none, or `force`).
pub fn check(wl: &Whitelist, force: bool) -> Result<()> {
    check_client(wl, ssh_client(), force)
}

pub fn check_client(wl: &Whitelist, client: Option<IpAddr>, force: bool) -> Result<()> {
    match client {
        Some(c) if !force && !admits(wl, c) => bail!(
            "refusing: the whitelist would not admit {c}, the client of this SSH session \
             (SSH_CONNECTION); new sessions from it would be dropped. Whitelist {c} first, \
             or pass --force if you are sure"
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(enabled: bool, allow: &[&str]) -> Whitelist {
        Whitelist {
            enabled,
            log: true,
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn refuses_whitelist_without_the_ssh_client() {
        let client = Some("203.0.113.9".parse().unwrap());
        let e = check_client(&wl(true, &["192.0.2.0/24"]), client, false).unwrap_err();
        assert!(e.to_string().contains("203.0.113.9"));
        assert!(check_client(&wl(true, &["192.0.2.0/24"]), client, true).is_ok());
        assert!(check_client(&wl(true, &["203.0.113.0/24"]), client, false).is_ok());
        assert!(check_client(&wl(false, &[]), client, false).is_ok());
        assert!(check_client(&wl(true, &[]), None, false).is_ok());
    }
}
