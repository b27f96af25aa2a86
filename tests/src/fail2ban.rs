//! A real fail2ban server (Debian's `fail2ban`) in a test's namespace, with a configuration
//! of its own: one jail on a log file the test writes, banning with isolation's packaged
//! action through a wrapper that points `isolation-user` at the test's instance. Stopped and
//! removed on drop.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{iso::Iso, unique};

pub struct Fail2ban {
    pub dir: PathBuf,
    child: Child,
}

impl Fail2ban {
    /// Starts fail2ban with a jail that bans after 3 failures for `bantime` seconds, and
    /// waits (at most 20 s) until it watches the log.
    pub fn start(iso: &Iso, bantime: u32) -> Fail2ban {
        let dir = std::env::temp_dir().join(unique("fail2ban"));
        for d in ["action.d", "filter.d"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let d = dir.display().to_string();
        let action = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/fail2ban/action.d/isolation.conf"
        );
        fs::copy(action, dir.join("action.d/isolation.conf")).unwrap();
        let wrapper = dir.join("isolation-user.sh");
        let paths = iso.paths();
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec env ISOLATION_PIN_DIR={} ISOLATION_STATE_DIR={} {} \"$@\"\n",
                paths.pin_dir.display(),
                paths.state_dir.display(),
                iso.bin.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(
            dir.join("fail2ban.conf"),
            format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {d}/fail2ban.log\nsocket = {d}/f2b.sock\npidfile = {d}/f2b.pid\ndbfile = :memory:\n"
            ),
        )
        .unwrap();
        fs::write(
            dir.join("filter.d/isotest.conf"),
            "[Definition]\nfailregex = ^Failed login from <HOST>$\ndatepattern = {NONE}\n",
        )
        .unwrap();
        fs::write(
            dir.join("jail.conf"),
            format!(
                "[DEFAULT]\nbackend = polling\n\n[isotest]\nenabled = true\nfilter = isotest\nlogpath = {d}/auth.log\nmaxretry = 3\nfindtime = 60\nbantime = {bantime}\naction = isolation[isolation=\"{}\"]\n",
                wrapper.display()
            ),
        )
        .unwrap();
        fs::write(dir.join("auth.log"), "").unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", iso.ns))
            .args(["fail2ban-server", "-f", "-x", "-c", &d])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("server.out")).unwrap())
            .spawn()
            .expect("start fail2ban-server");
        let f = Fail2ban { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f.log().contains("Jail 'isotest' started") {
            assert!(
                Instant::now() < deadline,
                "fail2ban did not start its jail in 20 s: {}",
                f.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        f
    }

    /// Appends `n` failures of `ip` to the watched log.
    pub fn fail(&self, ip: &str, n: usize) {
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("auth.log"))
            .unwrap();
        for _ in 0..n {
            writeln!(log, "Failed login from {ip}").unwrap();
        }
    }

    /// fail2ban's own log and its stderr.
    pub fn log(&self) -> String {
        format!(
            "{}{}",
            fs::read_to_string(self.dir.join("fail2ban.log")).unwrap_or_default(),
            fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
        )
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
