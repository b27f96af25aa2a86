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
        // SAFETY: setns on a namespace file we hold open; moves only this thread.
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
                let mut buf = vec![0u8; 65536];
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

/// Any port on the unspecified address of `peer`'s family: where a client socket binds.
pub fn any_port(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap()
}

/// Does a UDP echo come back within `timeout` (a few tries: UDP may lose the first to ARP)?
pub fn udp_ok(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let u = UdpSocket::bind(any_port(addr)).unwrap();
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

/// A raw IP socket inside a namespace receiving one protocol (TCP, ICMP, ICMPv6), without
/// blocking; closed on drop.
pub struct RawListener {
    fd: i32,
    v6: bool,
}

impl RawListener {
    pub fn open(ns: &str, v6: bool, proto: u8) -> RawListener {
        let fd = in_ns(ns, move || {
            raw_socket(v6, proto as i32, libc::SOCK_NONBLOCK)
        });
        RawListener { fd, v6 }
    }

    /// One packet from `from` if one is waiting: its bytes from the L4 header on.
    pub fn try_recv(&self, from: std::net::IpAddr) -> Option<Vec<u8>> {
        let mut buf = [0u8; 2048];
        // SAFETY: an all-zero sockaddr_storage is valid; the kernel fills it.
        let mut src: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut flen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buffers valid for the call; non-blocking.
        let n = unsafe {
            libc::recvfrom(
                self.fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut src as *mut libc::sockaddr_storage).cast(),
                &mut flen,
            )
        };
        if n <= 0 || source(&src) != Some(from) {
            return None;
        }
        // IPv4 raw sockets hand over the IP header too; IPv6 ones do not.
        let b = &buf[..n as usize];
        Some(
            if self.v6 {
                b
            } else {
                &b[((b[0] & 0x0f) as usize) * 4..]
            }
            .to_vec(),
        )
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        // SAFETY: opened by `open`, closed once.
        unsafe { libc::close(self.fd) };
    }
}

fn raw_socket(v6: bool, proto: i32, flags: i32) -> i32 {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | flags, proto) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    fd
}

/// Sends raw IP payloads (`proto`'s header and what follows; the kernel writes the IP
/// header) from namespace `ns` to `dst`, with the given hop limit / TTL if any.
pub fn raw_send(
    ns: &str,
    dst: std::net::IpAddr,
    proto: u8,
    payloads: Vec<Vec<u8>>,
    hop_limit: Option<i32>,
) {
    in_ns(ns, move || {
        let v6 = dst.is_ipv6();
        let fd = raw_socket(v6, proto as i32, 0);
        if let Some(h) = hop_limit {
            let (level, opt) = if v6 {
                (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS)
            } else {
                (libc::IPPROTO_IP, libc::IP_TTL)
            };
            // SAFETY: a valid socket and an int option of its size.
            let r = unsafe { libc::setsockopt(fd, level, opt, (&h as *const i32).cast(), 4) };
            assert_eq!(r, 0, "hop limit: {}", std::io::Error::last_os_error());
        }
        let (sa, len) = sockaddr(dst);
        for payload in payloads {
            // SAFETY: the buffer and the socket address are valid for the call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    payload.as_ptr().cast(),
                    payload.len(),
                    0,
                    (&sa as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            assert_eq!(
                n as usize,
                payload.len(),
                "raw send: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: opened above, closed once.
        unsafe { libc::close(fd) };
    })
}

/// Sends one raw IP payload from namespace `ns` to `dst` (as `raw_send`), then returns every
/// TCP, ICMP or ICMPv6 packet that `answerer` sends back to `ns` within `wait`, as
/// (protocol, bytes from its L4 header on).
pub fn raw_probe(
    ns: &str,
    dst: std::net::IpAddr,
    proto: u8,
    payload: &[u8],
    answerer: std::net::IpAddr,
    wait: Duration,
) -> Vec<(u8, Vec<u8>)> {
    let v6 = dst.is_ipv6();
    let icmp = if v6 { 58 } else { 1 };
    let listeners = [
        (6u8, RawListener::open(ns, v6, 6)),
        (icmp, RawListener::open(ns, v6, icmp)),
    ];
    raw_send(ns, dst, proto, vec![payload.to_vec()], None);
    let mut got = Vec::new();
    let end = Instant::now() + wait;
    while Instant::now() < end {
        for (p, l) in &listeners {
            if let Some(b) = l.try_recv(answerer) {
                got.push((*p, b));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    got
}

fn sockaddr(a: std::net::IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the family-specific view is filled below.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        std::net::IpAddr::V4(v4) => {
            let sin = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            unsafe {
                (*sin).sin_family = libc::AF_INET as u16;
                (*sin).sin_addr.s_addr = u32::from_ne_bytes(v4.octets());
            }
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        std::net::IpAddr::V6(v6) => {
            let sin6 = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            // SAFETY: as above, for sockaddr_in6.
            unsafe {
                (*sin6).sin6_family = libc::AF_INET6 as u16;
                (*sin6).sin6_addr.s6_addr = v6.octets();
            }
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn source(ss: &libc::sockaddr_storage) -> Option<std::net::IpAddr> {
    let p = (ss as *const libc::sockaddr_storage).cast::<u8>();
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin = unsafe { &*p.cast::<libc::sockaddr_in>() };
            Some(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let sin6 = unsafe { &*p.cast::<libc::sockaddr_in6>() };
            Some(std::net::IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// The MAC address of interface `ifname` in namespace `ns`.
pub fn mac(ns: &str, ifname: &str) -> [u8; 6] {
    let out = crate::netns::ok(&["ip", "-n", ns, "-o", "link", "show", "dev", ifname]);
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"));
    let mut m = [0u8; 6];
    for (i, b) in hex.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(b, 16).unwrap();
    }
    m
}

/// Sends whole Ethernet frames (forged or odd ones a socket would not build) on `ifname`
/// from inside `ns`, through an AF_PACKET socket.
pub fn send_frames(ns: &str, ifname: &str, frames: Vec<Vec<u8>>) {
    let ifname = ifname.to_string();
    in_ns(ns, move || {
        let c = std::ffi::CString::new(ifname.clone()).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: all-zero is a valid sockaddr_ll, filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        for f in &frames {
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: the frame and the address are valid for the call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n as usize,
                f.len(),
                "frame send: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: opened above, closed once.
        unsafe { libc::close(fd) };
    })
}

/// A UDP socket bound inside a namespace that counts what arrives (never answers).
pub struct Sink {
    sock: UdpSocket,
}

impl Sink {
    pub fn bind(ns: &str, addr: SocketAddr) -> Sink {
        let sock = in_ns(ns, move || UdpSocket::bind(addr).expect("bind sink"));
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Sink { sock }
    }

    /// Datagrams received within `wait` (bounded), with their sizes.
    pub fn received(&self, wait: Duration) -> Vec<usize> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + wait;
        while Instant::now() < end {
            if let Ok(n) = self.sock.recv(&mut buf) {
                got.push(n);
            }
        }
        got
    }

    /// Sends from this socket (its bound port is the source).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) {
        self.sock.send_to(data, to).expect("send");
    }
}

/// One UDP datagram of `size` bytes from `ns` to an echo server: does it come back whole
/// within `timeout`? One try only: counters are compared exactly.
pub fn udp_echo_once(ns: &str, addr: SocketAddr, size: usize, timeout: Duration) -> bool {
    in_ns(ns, move || {
        let u = UdpSocket::bind(any_port(addr)).unwrap();
        u.set_read_timeout(Some(timeout)).unwrap();
        let data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        u.send_to(&data, addr).unwrap();
        let mut buf = vec![0u8; 65536];
        matches!(u.recv_from(&mut buf), Ok((n, from)) if from == addr && buf[..n] == data[..])
    })
}

/// `ping`'s summary: (transmitted, received).
pub fn ping_summary(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {out}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .take(2)
        .map(|w| w.parse().unwrap())
        .collect();
    (n[0], n[1])
}
