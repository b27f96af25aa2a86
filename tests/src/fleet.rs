//! A fleet's management network: a hub namespace with a bridge (203.0.113.1/24) where a
//! real etcd (Debian's `etcd-server`) listens, and nodes, each in a namespace of its own,
//! joined to the bridge by a veth `m0`. etcd is killed and its data dir removed on drop.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, traffic::in_ns, unique};

pub const ETCD_ADDR: &str = "203.0.113.1:2379";

pub struct Hub {
    pub ns: Netns,
    pub hub: String,
    etcd: Option<Child>,
    data: PathBuf,
    next: u32,
    /// With TLS: where the CA, server and client certificates are.
    tls: Option<PathBuf>,
    /// USER:PASSWORD, once the test has turned etcd's authentication on.
    user: Option<String>,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::build(false)
    }

    /// etcd over TLS, requiring a client certificate signed by the test's own CA (made
    /// with openssl); `client_args` are the options a client needs.
    pub fn with_tls() -> Hub {
        Hub::build(true)
    }

    fn build(tls: bool) -> Hub {
        let hub = unique("fhub");
        let ns = Netns::new(&[&hub]);
        for args in [
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", "203.0.113.1/24", "dev", "br0"],
            vec!["link", "set", "br0", "up"],
        ] {
            let mut a = vec!["ip", "-n", &hub];
            a.extend(args);
            crate::netns::ok(&a);
        }
        let data = std::env::temp_dir().join(unique("etcd"));
        let tls = tls.then(|| make_certs(&data.with_extension("tls")));
        let mut h = Hub {
            ns,
            hub,
            etcd: None,
            data,
            next: 0,
            tls,
            user: None,
        };
        h.start_etcd();
        h
    }

    /// Starts etcd (again, on the same data dir) and waits until it accepts connections.
    pub fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd runs already");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.hub))
            .arg("etcd")
            .args(["--name", "fleet-test", "--data-dir"])
            .arg(&self.data);
        if let Some(dir) = &self.tls {
            cmd.arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{ETCD_ADDR},{scheme}://127.0.0.1:2379"),
                "--advertise-client-urls",
                &format!("{scheme}://{ETCD_ADDR}"),
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "fleet-test=http://127.0.0.1:2380",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (cargo xtask setup installs etcd-server)");
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = ETCD_ADDR.parse().unwrap();
        while Instant::now() < deadline {
            let up = in_ns(&self.hub, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not start within 20 s");
    }

    /// Kills etcd (SIGKILL, as a crash would).
    pub fn kill_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What a client passes to reach this etcd: the TLS options (the CA and a client
    /// certificate) and the login, where the hub has them.
    pub fn client_args(&self) -> Vec<String> {
        let mut args: Vec<String> = match &self.tls {
            None => Vec::new(),
            Some(d) => ["cacert", "cert", "key"]
                .iter()
                .zip(["ca.pem", "client.pem", "client.key"])
                .flat_map(|(o, f)| [format!("--etcd-{o}"), d.join(f).display().to_string()])
                .collect(),
        };
        if let Some(u) = &self.user {
            args.extend(["--etcd-user".to_string(), u.clone()]);
        }
        args
    }

    /// Clients log in as `user_password` (USER:PASSWORD) from now on: etcd's
    /// authentication has been turned on.
    pub fn login(&mut self, user_password: &str) {
        self.user = Some(user_password.to_string());
    }

    /// `etcd://203.0.113.1:2379/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://{ETCD_ADDR}/{prefix}")
    }

    /// Joins namespace `node` to the bridge as `m0` with address `addr` (in 203.0.113.0/24).
    pub fn attach(&mut self, node: &str, addr: &str) {
        let port = format!("v{}", self.next);
        self.next += 1;
        crate::netns::ok(&[
            "ip", "-n", node, "link", "add", "m0", "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ]);
        crate::netns::ok(&[
            "ip",
            "-n",
            node,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "m0",
        ]);
        crate::netns::ok(&["ip", "-n", node, "link", "set", "m0", "up"]);
        crate::netns::ok(&["ip", "-n", &self.hub, "link", "set", &port, "master", "br0"]);
        crate::netns::ok(&["ip", "-n", &self.hub, "link", "set", &port, "up"]);
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill_etcd();
        let _ = std::fs::remove_dir_all(&self.data);
        if let Some(d) = &self.tls {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A CA, a server certificate for 203.0.113.1 and 127.0.0.1, and a client certificate, in
/// `dir` (openssl, RSA 2048, valid a day).
fn make_certs(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ssl = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=isolation-test-ca",
    ]);
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:203.0.113.1,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN=isolation-test-{name}"),
        ]);
        ssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
    dir.to_path_buf()
}
