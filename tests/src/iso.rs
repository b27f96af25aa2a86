//! The CLI as an operator runs it, inside a test's namespace: one isolation instance with
//! its own pin and state dirs, so tests never share a datapath.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Output},
};

use crate::unique;

/// One isolation instance (its own pin and state dirs), unloaded and removed on drop.
pub struct Iso {
    pub pin: PathBuf,
    pub state: PathBuf,
    pub ns: String,
    pub bin: PathBuf,
    /// `--backend` given to every `load` (None: the CLI's default, auto).
    pub backend: Option<String>,
}

impl Iso {
    /// The binary under test (`tests::bin()`).
    pub fn new(ns: &str) -> Iso {
        Iso::with_bin(ns, crate::bin())
    }

    /// An instance whose `load`s ask for `backend` (ebpf, iptables).
    pub fn with_backend(ns: &str, backend: &str) -> Iso {
        let mut iso = Iso::new(ns);
        iso.backend = Some(backend.into());
        iso
    }

    /// A given binary (the benchmarks run the release build).
    pub fn with_bin(ns: &str, bin: PathBuf) -> Iso {
        let id = unique("isoe");
        Iso {
            pin: format!("/sys/fs/bpf/{id}").into(),
            state: std::env::temp_dir().join(id),
            ns: ns.into(),
            bin,
            backend: None,
        }
    }

    /// The instance's pin and state dirs, for reading its maps directly.
    pub fn paths(&self) -> isolation_user::state::Paths {
        isolation_user::state::Paths {
            pin_dir: self.pin.clone(),
            state_dir: self.state.clone(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(&self.bin)
            .args(args);
        if let (Some(b), Some(&"load")) = (&self.backend, args.first()) {
            c.args(["--backend", b]);
        }
        c.env("ISOLATION_PIN_DIR", &self.pin)
            .env("ISOLATION_STATE_DIR", &self.state);
        c.env_remove("SSH_CONNECTION");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run isolation-user")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "isolation-user {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "isolation-user {args:?} should have failed"
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one sentence on stderr, got: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        err
    }

    /// Where the test's own files (policies, address lists) go: beside the state dir, not
    /// in it, so the state dir holds only what isolation-user writes.
    pub fn files_dir(&self) -> PathBuf {
        self.state.with_extension("files")
    }

    pub fn policy(&self, text: &str) -> String {
        fs::create_dir_all(self.files_dir()).unwrap();
        let p = self.files_dir().join(format!("{}.toml", unique("policy")));
        fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["stats", "--json"])).unwrap()
    }

    pub fn packets(&self, reason: &str) -> u64 {
        self.packets_of(&[reason])[0]
    }

    /// The packet counts of several reasons, from one `stats` read.
    pub fn packets_of(&self, reasons: &[&str]) -> Vec<u64> {
        let s = self.stats();
        let all = s["reasons"].as_array().unwrap();
        reasons
            .iter()
            .map(|reason| {
                all.iter().find(|r| r["reason"] == *reason).unwrap()["packets"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    /// What `f` returns, and how many packets each reason counted while it ran.
    pub fn deltas<T>(&self, reasons: &[&str], f: impl FnOnce() -> T) -> (T, Vec<u64>) {
        let before = self.packets_of(reasons);
        let t = f();
        let after = self.packets_of(reasons);
        (t, after.iter().zip(&before).map(|(a, b)| a - b).collect())
    }
}

impl Drop for Iso {
    fn drop(&mut self) {
        let _ = self.run(&["unload"]);
        // A pin dir outside a bpffs got one mounted by `load`: unmounted here, or the
        // mount (and the files dir under it) would outlive the test. Elsewhere umount
        // refuses ("not mounted") and nothing happens.
        let _ = std::process::Command::new("umount").arg(&self.pin).output();
        let _ = fs::remove_dir_all(&self.pin);
        let _ = fs::remove_dir_all(&self.state);
        let _ = fs::remove_dir_all(self.files_dir());
    }
}
