//! `isolation-user run` as a child process of a test, inside a namespace: started, scraped
//! over HTTP, signalled, and killed on drop (a test leaves no service behind).

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{iso::Iso, traffic::in_ns, unique};

pub struct Service {
    pub child: Child,
    /// The service's stderr (its log), written to a file the test can read at any time.
    pub log: PathBuf,
    pub ns: String,
    pub metrics_port: u16,
}

impl Service {
    /// Starts `run` with `args` (after `run`) and `--metrics 127.0.0.1:PORT`, and waits (at
    /// most 20 s) until `/metrics` answers.
    pub fn start(iso: &Iso, args: &[&str], metrics_port: u16) -> Service {
        Service::start_wrapped(iso, &[], args, metrics_port)
    }

    /// `start`, with the binary run through `wrapper` (e.g. `setpriv --bounding-set …`).
    pub fn start_wrapped(iso: &Iso, wrapper: &[&str], args: &[&str], metrics_port: u16) -> Service {
        fs::create_dir_all(iso.files_dir()).unwrap();
        let log = iso.files_dir().join(format!("{}.log", unique("service")));
        let addr = format!("127.0.0.1:{metrics_port}");
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--metrics", &addr]);
        let mut cmd = iso.cmd(&all);
        if let Some(b) = &iso.backend {
            cmd.args(["--backend", b]);
        }
        if !wrapper.is_empty() {
            // nsenter --net=NS [wrapper…] BIN args: the wrapper goes before the binary.
            let mut w = std::process::Command::new("nsenter");
            w.arg(format!("--net=/run/netns/{}", iso.ns)).args(wrapper);
            let argv: Vec<_> = cmd.get_args().skip(1).map(|a| a.to_owned()).collect();
            w.args(argv);
            for (k, v) in cmd.get_envs() {
                match v {
                    Some(v) => w.env(k, v),
                    None => w.env_remove(k),
                };
            }
            cmd = w;
        }
        let child = cmd
            .env("ISOLATION_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start isolation-user run");
        let mut s = Service {
            child,
            log,
            ns: iso.ns.clone(),
            metrics_port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                panic!("the service exited at start ({st}): {}", s.log_text());
            }
            if s.try_scrape().is_some() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no /metrics after 20 s: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics from inside the namespace; None if it does not answer 200.
    pub fn try_scrape(&self) -> Option<String> {
        let port = self.metrics_port;
        in_ns(&self.ns, move || {
            let mut s = TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse().unwrap(),
                Duration::from_secs(2),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let (head, body) = out.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.1 200").then(|| body.to_string())
        })
    }

    pub fn scrape(&self) -> String {
        self.try_scrape()
            .unwrap_or_else(|| panic!("/metrics did not answer: {}", self.log_text()))
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGTERM, then waits (at most 10 s) for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the service ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `limit`) until the log holds `needle`; true if it did.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
