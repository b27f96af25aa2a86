//! Network namespaces joined by veth pairs, deleted on drop (even when a test panics).

use std::process::{Command, Output};

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command and panics with its output if it fails.
pub fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A set of namespaces owned by one test.
pub struct Netns {
    pub names: Vec<String>,
}

impl Netns {
    pub fn new(names: &[&str]) -> Netns {
        let ns = Netns {
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        for n in names {
            let _ = sh(&["ip", "netns", "del", n]);
            ok(&["ip", "netns", "add", n]);
            ok(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// veth pair `a_if`@`a` <-> `b_if`@`b`, with addresses (CIDR strings) on each end.
    pub fn link(
        &self,
        a: &str,
        a_if: &str,
        a_addrs: &[&str],
        b: &str,
        b_if: &str,
        b_addrs: &[&str],
    ) {
        ok(&[
            "ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        for (ns, ifn, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
            for addr in addrs {
                // nodad: IPv6 addresses usable at once, no 2 s wait.
                if addr.contains(':') {
                    ok(&["ip", "-n", ns, "addr", "add", addr, "dev", ifn, "nodad"]);
                } else {
                    ok(&["ip", "-n", ns, "addr", "add", addr, "dev", ifn]);
                }
            }
            ok(&["ip", "-n", ns, "link", "set", ifn, "up"]);
        }
    }

    /// A host hung off a router: a veth pair `router_if`@`router` <-> `e0`@`host`, the
    /// router's IPv4 and IPv6 addresses (CIDR) on its end, the host's on the other, and the
    /// host's default routes through the router.
    pub fn spoke(
        &self,
        router: &str,
        router_if: &str,
        router_addrs: [&str; 2],
        host: &str,
        host_addrs: [&str; 2],
    ) {
        self.link(router, router_if, &router_addrs, host, "e0", &host_addrs);
        for (gw, family) in router_addrs.iter().zip(["-4", "-6"]) {
            let gw = gw.split('/').next().unwrap();
            ok(&[
                "ip", "-n", host, family, "route", "add", "default", "via", gw,
            ]);
        }
    }

    /// Sets sysctls (`key=value`) in a namespace.
    pub fn sysctl(&self, ns: &str, settings: &[&str]) {
        for kv in settings {
            ok(&["ip", "netns", "exec", ns, "sysctl", "-qw", kv]);
        }
    }

    /// Turns a namespace into an IPv4 and IPv6 router.
    pub fn forwarding(&self, router: &str) {
        self.sysctl(
            router,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
    }

    /// Runs a command inside a namespace (nsenter, so /sys stays the host's: pins survive).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let path = format!("--net=/run/netns/{ns}");
        let mut full = vec!["nsenter", path.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = sh(&["ip", "netns", "del", n]);
        }
    }
}

/// A server with two clients, each on a link of its own: the whitelisted client `cw` and
/// the stranger `cx`:
///
///   cw (192.0.2.2, 2001:db8:1::2) --s1-- srv --s2-- cx (198.51.100.2, 2001:db8:2::2)
pub struct TwoClients {
    pub ns: Netns,
    pub srv: String,
    pub cw: String,
    pub cx: String,
}

impl TwoClients {
    /// Namespaces named after `prefix` (unique per call).
    pub fn new(prefix: &str) -> TwoClients {
        let (srv, cw, cx) = (
            crate::unique(&format!("{prefix}s")),
            crate::unique(&format!("{prefix}w")),
            crate::unique(&format!("{prefix}x")),
        );
        let ns = Netns::new(&[&srv, &cw, &cx]);
        ns.link(
            &srv,
            "s1",
            &["192.0.2.1/24", "2001:db8:1::1/64"],
            &cw,
            "e0",
            &["192.0.2.2/24", "2001:db8:1::2/64"],
        );
        ns.link(
            &srv,
            "s2",
            &["198.51.100.1/24", "2001:db8:2::1/64"],
            &cx,
            "e0",
            &["198.51.100.2/24", "2001:db8:2::2/64"],
        );
        TwoClients { ns, srv, cw, cx }
    }
}
