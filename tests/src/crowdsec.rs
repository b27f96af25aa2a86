//! A real CrowdSec Local API (Debian's `crowdsec`, run alone: `crowdsec -no-cs`) inside a
//! test's namespace, with its own config, database and credentials in a directory of its
//! own; driven with `cscli` as an operator would. Killed and removed on drop.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::unique;

/// Where the LAPI listens inside the namespace.
pub const PORT: u16 = 18080;

pub struct Lapi {
    pub ns: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Lapi {
    /// Starts a LAPI in `ns` and waits (at most 30 s) until it answers.
    pub fn start(ns: &str) -> Lapi {
        let dir = std::env::temp_dir().join(unique("crowdsec"));
        fs::create_dir_all(dir.join("data")).unwrap();
        let d = dir.display().to_string();
        // The packaged config, pointed at this directory; no Central API (no
        // `online_client`), no metrics port, in the foreground.
        let config = format!(
            "common:\n  daemonize: false\n  log_media: file\n  log_level: info\n  log_dir: {d}/\n  working_dir: .\n\
             config_paths:\n  config_dir: /etc/crowdsec/\n  data_dir: {d}/data/\n  simulation_path: /etc/crowdsec/simulation.yaml\n  hub_dir: /var/lib/crowdsec/hub/\n  index_path: /var/lib/crowdsec/hub/.index.json\n  notification_dir: /etc/crowdsec/notifications/\n  plugin_dir: /usr/lib/crowdsec/plugins/\n\
             crowdsec_service:\n  acquisition_path: /etc/crowdsec/acquis.yaml\n\
             cscli:\n  output: human\n\
             db_config:\n  log_level: info\n  type: sqlite\n  use_wal: true\n  max_open_conns: 1\n  db_path: {d}/data/crowdsec.db\n\
             api:\n  client:\n    insecure_skip_verify: false\n    credentials_path: {d}/local_api_credentials.yaml\n  server:\n    log_level: info\n    listen_uri: 127.0.0.1:{PORT}\n    profiles_path: /etc/crowdsec/profiles.yaml\n    trusted_ips:\n      - 127.0.0.1\n\
             prometheus:\n  enabled: false\n"
        );
        fs::write(dir.join("config.yaml"), config).unwrap();
        fs::write(dir.join("local_api_credentials.yaml"), "").unwrap();
        let mut lapi = Lapi {
            ns: ns.into(),
            dir,
            child: None,
        };
        let creds = format!("{d}/local_api_credentials.yaml");
        lapi.cscli(&[
            "machines",
            "add",
            "isolation-test",
            "--auto",
            "-f",
            &creds,
            "--force",
        ]);
        lapi.restart();
        lapi
    }

    fn config(&self) -> String {
        self.dir.join("config.yaml").display().to_string()
    }

    /// Runs `cscli` in the namespace against this LAPI; returns stdout, panics on failure.
    pub fn cscli(&self, args: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["cscli", "-c", &self.config()])
            .args(args)
            .output()
            .expect("run cscli");
        assert!(
            out.status.success(),
            "cscli {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A bouncer's key (`cscli bouncers add NAME -o raw`), written to a file only root may
    /// change; returns the file.
    pub fn bouncer_key_file(&self, name: &str) -> PathBuf {
        let key = self.cscli(&["bouncers", "add", name, "-o", "raw"]);
        let f = self.dir.join(format!("{name}.key"));
        fs::write(&f, key.trim()).unwrap();
        f
    }

    /// Stops the LAPI (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the LAPI (again) and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let log = fs::File::create(self.dir.join("lapi.out")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["crowdsec", "-c", &self.config(), "-no-cs"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start crowdsec");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let ns = self.ns.clone();
        loop {
            let ns2 = ns.clone();
            let up = crate::traffic::in_ns(&ns2, || {
                std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], PORT)),
                    Duration::from_millis(200),
                )
                .is_ok()
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the CrowdSec LAPI did not answer in 30 s: {}",
                fs::read_to_string(self.dir.join("lapi.out")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
