//! Refuse policies that would lock out the operator running the command over SSH: a new
//! connection from the session's client to its server port must still get in, whitelist
//! and isolation alike (judged by the oracle, `semantics`).

use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::{
    policy::{Policy, Whitelist},
    semantics::{self, Decision, Pkt},
};

/// The SSH session this command runs in: its client and the server end it reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
}

/// `SSH_CONNECTION`'s "client_ip client_port server_ip server_port".
fn parse(v: &str) -> Option<Session> {
    // OpenSSH writes IPv4-mapped clients as plain IPv4; strip a zone id if any.
    let ip = |s: &str| s.split('%').next()?.parse::<IpAddr>().ok();
    let mut w = v.split_whitespace();
    Some(Session {
        client: ip(w.next()?)?,
        client_port: w.next()?.parse().ok()?,
        server: ip(w.next()?)?,
        server_port: w.next()?.parse().ok()?,
    })
}

/// The SSH session of this command: `SSH_CONNECTION`, or, where it was dropped (`sudo`
/// does), that of the nearest ancestor that has it, if that process shares this network
/// namespace (a session in another namespace does not go through these interfaces).
pub fn session() -> Option<Session> {
    if let Ok(v) = std::env::var("SSH_CONNECTION") {
        return parse(&v);
    }
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let mine = netns("self")?;
    let mut pid = std::process::id();
    for _ in 0..32 {
        // The parent pid: field 4 of /proc/PID/stat.
        pid = crate::state::proc_stat_field(pid, 4)? as u32;
        if pid <= 1 {
            return None;
        }
        if netns(&pid.to_string()).as_ref() != Some(&mine) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if let Some(v) = env
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"SSH_CONNECTION="))
        {
            return parse(&String::from_utf8_lossy(v));
        }
    }
    None
}

/// The client address of the SSH session this command runs in.
pub fn ssh_client() -> Option<IpAddr> {
    session().map(|s| s.client)
}

/// Errors unless a new connection of the SSH session (a TCP SYN from its client to its
/// server port) passes `p` whole: whitelist, then isolation (or there is no session, or
/// `force`).
pub fn check_policy(p: &Policy, force: bool) -> Result<()> {
    let s = session();
    check_client(&p.whitelist, s.map(|s| s.client), force)?;
    if p.blocklist.enabled {
        check_block_client(&p.blocklist.entries, s.map(|s| s.client), force)?;
    }
    check_isolation_for(p, s, force)
}

/// As `check_policy`, for the isolation part alone (a live edit of the rules).
pub fn check_isolation(p: &Policy, force: bool) -> Result<()> {
    check_isolation_for(p, session(), force)
}

fn check_isolation_for(p: &Policy, s: Option<Session>, force: bool) -> Result<()> {
    let Some(s) = s.filter(|_| !force) else {
        return Ok(());
    };
    let syn = Pkt {
        src: s.client,
        dst: s.server,
        proto: 6,
        ports: Some((s.client_port, s.server_port)),
    };
    if semantics::isolation(p, &syn, false) == Decision::Deny {
        bail!(
            "refusing: the isolation rules would refuse a new connection from {} to {} port {},              this SSH session's; new sessions would be cut off. Allow it (an allow or except              rule) first, or pass --force if you are sure",
            s.client,
            s.server,
            s.server_port
        );
    }
    Ok(())
}

/// Errors if blocking `nets` would drop the SSH session's client (or there is no session,
/// or `force`).
pub fn check_block(nets: &[ipnet::IpNet], force: bool) -> Result<()> {
    check_block_client(nets, ssh_client(), force)
}

pub fn check_block_client(
    nets: &[ipnet::IpNet],
    client: Option<IpAddr>,
    force: bool,
) -> Result<()> {
    match client {
        Some(c) if !force => match nets.iter().find(|n| n.contains(&c)) {
            Some(n) => bail!(
                "refusing: blocking {n} would drop {c}, the client of this SSH session \
                 (SSH_CONNECTION), and every new session from it. Pass --force if you are sure"
            ),
            None => Ok(()),
        },
        _ => Ok(()),
    }
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
    fn isolation_that_refuses_the_session_is_refused() {
        let s = parse("198.51.100.130 50022 198.51.100.20 22").unwrap();
        assert_eq!(s.server_port, 22);
        let policy = |allow: &str| {
            crate::policy::parse(
                "p.toml",
                &format!(
                    "[isolation]\ndefault = \"deny\"\n[networks.hr]\nsubnets = [\"198.51.100.128/25\"]\n[networks.it]\nsubnets = [\"198.51.100.0/25\"]\n{allow}"
                ),
            )
            .unwrap()
        };
        let cut = policy("");
        let e = check_isolation_for(&cut, Some(s), false).unwrap_err();
        assert!(e.to_string().contains("198.51.100.20 port 22"), "{e}");
        assert!(check_isolation_for(&cut, Some(s), true).is_ok(), "--force");
        assert!(check_isolation_for(&cut, None, false).is_ok(), "no session");
        let ssh = policy("[[isolation.allow]]\nfrom = \"hr\"\nto = \"it\"\nports = [\"tcp:22\"]\n");
        assert!(check_isolation_for(&ssh, Some(s), false).is_ok());
        let web = policy("[[isolation.allow]]\nfrom = \"hr\"\nto = \"it\"\nports = [\"tcp:80\"]\n");
        assert!(
            check_isolation_for(&web, Some(s), false).is_err(),
            "tcp:80 only"
        );
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
