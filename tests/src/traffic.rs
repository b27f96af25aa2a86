//! Real traffic between namespaces: echo servers and clients on threads that `setns` into a
//! namespace (only the calling thread moves). Every wait is bounded.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Moves this thread into namespace `ns`.
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    assert_eq!(
        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns {ns}"
    );
}

/// Runs `f` on a thread inside `ns` and returns its result.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// Echo servers (TCP and UDP on the same port) inside a namespace; stopped on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Servers stop by themselves after this long even if a test forgets them.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

impl Echo {
    pub fn start(ns: &str, addrs: &[SocketAddr]) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let (s1, s2) = (stop.clone(), stop.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let ns1 = ns.to_string();
            let tx1 = tx.clone();
            threads.push(std::thread::spawn(move || {
                enter(&ns1);
                let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
                l.set_nonblocking(true).unwrap();
                tx1.send(()).unwrap();
                let end = Instant::now() + SERVER_LIFETIME;
                while !s1.load(Ordering::Relaxed) && Instant::now() < end {
                    match l.accept() {
                        Ok((c, _)) => {
                            std::thread::spawn(move || serve_tcp(c));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            let ns2 = ns.to_string();
            threads.push(std::thread::spawn(move || {
                enter(&ns2);
                let u = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                tx.send(()).unwrap();
                let mut buf = [0u8; 1500];
                let end = Instant::now() + SERVER_LIFETIME;
                while !s2.load(Ordering::Relaxed) && Instant::now() < end {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&buf[..n], from);
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .expect("tcp server up");
            rx.recv_timeout(Duration::from_secs(5))
                .expect("udp server up");
        }
        Echo { stop, threads }
    }
}

fn serve_tcp(c: TcpStream) {
    c.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    let mut line = String::new();
    // Echo line by line until EOF: a kept-open connection can be tested again later.
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        if w.write_all(line.as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Does a TCP echo round trip from `ns` to `addr` succeed within `timeout`?
pub fn tcp_ok(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        round_trip(&mut s, timeout)
    })
}

pub fn round_trip(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    if s.write_all(b"hello\n").is_err() {
        return false;
    }
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).is_ok() && line == "hello\n"
}

/// A TCP connection opened from `ns` and kept open (the "SSH session" of a test).
pub fn tcp_open(ns: &str, addr: SocketAddr) -> TcpStream {
    in_ns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect")
    })
}

/// Does a UDP echo come back within `timeout` (a few tries: UDP may lose the first to ARP)?
pub fn udp_ok(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .unwrap();
        let u = UdpSocket::bind(bind).unwrap();
        u.set_read_timeout(Some(timeout / 3)).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let _ = u.send_to(b"ping", addr);
            if let Ok((n, from)) = u.recv_from(&mut buf)
                && from == addr
                && &buf[..n] == b"ping"
            {
                return true;
            }
        }
        false
    })
}

/// One ping from `ns`, waiting at most a second.
pub fn ping_ok(ns: &str, addr: &str) -> bool {
    let path = format!("--net=/run/netns/{ns}");
    std::process::Command::new("nsenter")
        .args([path.as_str(), "ping", "-c", "1", "-W", "1", addr])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
