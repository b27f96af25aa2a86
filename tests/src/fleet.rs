//! A fleet's management network: a hub namespace with a bridge (203.0.113.1/24) where a
//! real etcd (Debian's `etcd-server`: one member, or a cluster of three) listens, and
//! nodes, each in a namespace of its own, joined to the bridge by a veth `m0`. etcd is
//! killed and its data dirs removed on drop.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, traffic::in_ns, unique};

pub const ETCD_ADDR: &str = "203.0.113.1:2379";

/// One etcd member: clients reach it on the bridge's address at `client`, the other
/// members on the hub's loopback at `peer`.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

pub struct Hub {
    pub ns: Netns,
    pub hub: String,
    members: Vec<Member>,
    /// etcd's `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    next: u32,
    /// With TLS: where the CA, server and client certificates are.
    tls: Option<PathBuf>,
    /// USER:PASSWORD, once the test has turned etcd's authentication on.
    user: Option<String>,
}

impl Hub {
    /// One etcd member on 203.0.113.1:2379.
    pub fn new() -> Hub {
        Hub::build(false, 1)
    }

    /// etcd over TLS, requiring a client certificate signed by the test's own CA (made
    /// with openssl); `client_args` are the options a client needs.
    pub fn with_tls() -> Hub {
        Hub::build(true, 1)
    }

    /// A cluster of `n` members (a production etcd is three or five), on 203.0.113.1
    /// ports 2379, 2389, 2399…; `url` names them all.
    pub fn cluster(n: usize) -> Hub {
        Hub::build(false, n)
    }

    fn build(tls: bool, n: usize) -> Hub {
        let hub = unique("fhub");
        let ns = Netns::new(&[&hub]);
        for args in [
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", "203.0.113.1/24", "dev", "br0"],
            vec!["link", "set", "br0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["ip", "-n", &hub];
            a.extend(args);
            crate::netns::ok(&a);
        }
        let base = std::env::temp_dir().join(unique("etcd"));
        std::fs::create_dir_all(&base).unwrap();
        let tls = tls.then(|| make_certs(&base.with_extension("tls")));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: 2379 + 10 * i as u16,
                peer: 2380 + 10 * i as u16,
                data: base.join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut h = Hub {
            ns,
            hub,
            members,
            initial_cluster,
            next: 0,
            tls,
            user: None,
        };
        // Started together: a member waits for a quorum before it serves.
        for i in 0..n {
            h.spawn_member(i);
        }
        for i in 0..n {
            h.wait_member(i);
        }
        h
    }

    /// Starts etcd again (every member that is down), on the same data dirs, and waits
    /// until they accept connections.
    pub fn start_etcd(&mut self) {
        assert!(
            self.members.iter().any(|m| m.child.is_none()),
            "etcd runs already"
        );
        let down: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_none())
            .collect();
        for &i in &down {
            self.spawn_member(i);
        }
        for &i in &down {
            self.wait_member(i);
        }
    }

    /// Starts member `i` again (after `kill_member`) and waits until it accepts connections.
    pub fn start_member(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} runs already");
        self.spawn_member(i);
        self.wait_member(i);
    }

    fn spawn_member(&mut self, i: usize) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let m = &self.members[i];
        let client = format!("203.0.113.1:{}", m.client);
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.hub))
            .arg("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data);
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
                &format!("{scheme}://{client},{scheme}://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-token",
                &self.hub,
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (cargo xtask setup installs etcd-server)");
        self.members[i].child = Some(child);
    }

    fn wait_member(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = format!("203.0.113.1:{}", self.members[i].client)
            .parse()
            .unwrap();
        while Instant::now() < deadline {
            let up = in_ns(&self.hub, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if up {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd member {i} did not start within 20 s");
    }

    /// Kills every member (SIGKILL, as a crash would).
    pub fn kill_etcd(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process of member `i`, while it runs.
    pub fn member_pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// The member that leads the cluster now, as its members answer (None: no member
    /// names one, as during an election).
    pub fn leader(&self) -> Option<usize> {
        let eps: Vec<(usize, String)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.child.is_some())
            .map(|(i, m)| (i, format!("http://203.0.113.1:{}", m.client)))
            .collect();
        in_ns(&self.hub, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Each member's own id and the leader it knows.
                let mut ids = Vec::new();
                for (i, ep) in eps {
                    let opts = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_secs(1))
                        .with_timeout(Duration::from_secs(1));
                    let Ok(mut c) = etcd_client::Client::connect([ep], Some(opts)).await else {
                        continue;
                    };
                    if let Ok(s) = c.status().await {
                        let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                        ids.push((i, me, s.leader()));
                    }
                }
                let leader = ids.iter().map(|x| x.2).find(|l| *l != 0)?;
                ids.iter().find(|x| x.1 == leader).map(|x| x.0)
            })
        })
    }

    /// The member that leads the cluster once one is elected, asked every 100 ms for up to
    /// `limit` (None: no leader by then).
    pub fn wait_leader(&self, limit: Duration) -> Option<usize> {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
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

    /// `etcd://203.0.113.1:2379/PREFIX` (every member: `etcd://A,B,C/PREFIX`).
    pub fn url(&self, prefix: &str) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("203.0.113.1:{}", m.client))
            .collect();
        format!("etcd://{}/{prefix}", eps.join(","))
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
        if let Some(base) = self.members.first().and_then(|m| m.data.parent()) {
            let _ = std::fs::remove_dir_all(base);
        }
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

/// A slow link to etcd: a TCP proxy in the hub that forwards `203.0.113.1:port` to a member
/// and delivers every chunk `delay` late in each direction (this machine's kernel has no
/// netem). Nodes given `url` reach etcd through it; stopped on drop.
pub struct SlowLink {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl SlowLink {
    /// A proxy on 203.0.113.1:`port` to member 0, `delay` each way.
    pub fn start(hub: &Hub, port: u16, delay: Duration) -> SlowLink {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let upstream: SocketAddr = format!("127.0.0.1:{}", hub.members[0].client)
            .parse()
            .unwrap();
        let (ns, s, c) = (hub.hub.clone(), stop.clone(), conns.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let accept = std::thread::spawn(move || {
            crate::traffic::enter(&ns);
            let l = std::net::TcpListener::bind(("203.0.113.1", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            // Bounded by the stop flag, which the drop sets.
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let mut held = c.lock().unwrap();
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    held.push(from.try_clone().unwrap());
                    delay_pipe(from, to, delay);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the slow link listens");
        SlowLink {
            port,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    /// `etcd://203.0.113.1:PORT/PREFIX`, through the slow link.
    pub fn url(&self, prefix: &str) -> String {
        format!("etcd://203.0.113.1:{}/{prefix}", self.port)
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read (a reader and a
/// writer thread, joined by a channel of timestamped chunks); ends when either side closes.
fn delay_pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    use std::io::{Read as _, Write as _};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}
