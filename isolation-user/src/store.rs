//! The desired policy, whole: the one truth that every verb changes through the engine,
//! that `whitelist list` and `network list` read, and that a backend is made to match.
//!
//! In the state dir:
//! - `policy.toml`: the policy without its whitelist entries (small; rule edits rewrite it);
//! - `whitelist`: a snapshot of the whitelist entries, one a line;
//! - `whitelist.journal`: the entries added (`+`) and removed (`-`) since the snapshot, and
//!   flushes (`*`), appended in order, so one live edit at 1M entries writes one line and
//!   not 1M. Replaying it is idempotent (the last record of an entry decides), so a crash
//!   between a compaction's snapshot and its truncation of the journal loses nothing;
//! - `store.json`: generation and entry counts, so an edit checks the limits without
//!   reading the whitelist; and the digest of the policy file text the live generation was
//!   applied from, so that applying the same text again is known to change nothing
//!   without parsing it (a million entries: most of a no-op apply's time).
//!
//! - `blocklist.timed.json`: the blocklist entries with a deadline (`block add --timeout`,
//!   the feeds): live state beside the policy, which holds the permanent ones.
//!
//! The journal is compacted into the snapshot when it outgrows it.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufWriter, Write as _},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    policy::{self, Policy, WhitelistSizes},
    state::{Paths, write_atomic},
};

/// The journal is compacted once it holds more than twice the records of the snapshot and
/// the whitelist together, plus this: replaying it then never costs much more than reading
/// a snapshot of the whitelist, and a bulk edit is written once, not twice.
const COMPACT_SLACK: u64 = 64 * 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub generation: u32,
    pub whitelist: WhitelistSizes,
    pub snapshot_entries: u64,
    pub journal_records: u64,
    /// The text a generation was applied from (`text_digest`), valid while that
    /// generation is the live one: every other change moves the generation on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextDigest>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextDigest {
    pub generation: u32,
    pub sha256: String,
}

/// The digest a policy file's text is known by (SHA-256, hex).
pub fn text_digest(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(paths: &Paths) -> Store {
        Store {
            dir: paths.state_dir.clone(),
        }
    }

    fn rules_file(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }
    fn snapshot_file(&self) -> PathBuf {
        self.dir.join("whitelist")
    }
    fn journal_file(&self) -> PathBuf {
        self.dir.join("whitelist.journal")
    }
    fn meta_file(&self) -> PathBuf {
        self.dir.join("store.json")
    }
    fn timed_file(&self) -> PathBuf {
        self.dir.join("blocklist.timed.json")
    }

    /// The blocklist entries with a deadline, passed ones included until they are swept.
    pub fn timed(&self) -> Result<Vec<crate::blocklist::Timed>> {
        let f = self.timed_file();
        match fs::read(&f) {
            Ok(b) => {
                serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", f.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", f.display())),
        }
    }

    pub fn put_timed(&self, t: &[crate::blocklist::Timed]) -> Result<()> {
        write_atomic(&self.timed_file(), &serde_json::to_vec(t)?)
    }

    /// Every file of the store (what `unload` removes).
    pub fn files(&self) -> Vec<PathBuf> {
        vec![
            self.rules_file(),
            self.snapshot_file(),
            self.journal_file(),
            self.meta_file(),
            self.timed_file(),
        ]
    }

    pub fn meta(&self) -> Result<Meta> {
        let f = self.meta_file();
        match fs::read_to_string(&f) {
            Ok(s) => {
                serde_json::from_str(&s).with_context(|| format!("{} is corrupt", f.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", f.display())),
        }
    }

    fn put_meta(&self, m: &Meta) -> Result<()> {
        write_atomic(
            &self.meta_file(),
            serde_json::to_string_pretty(m)?.as_bytes(),
        )
    }

    /// The policy without its whitelist entries (cheap at any whitelist size).
    pub fn rules(&self) -> Result<Policy> {
        let f = self.rules_file();
        match fs::read_to_string(&f) {
            Ok(s) => Ok(policy::parse(&f.display().to_string(), &s)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", f.display())),
        }
    }

    /// The whole policy, whitelist entries included, in the order they were added.
    pub fn whole(&self) -> Result<Policy> {
        let mut p = self.rules()?;
        p.whitelist.allow = self.whitelist()?;
        Ok(p)
    }

    /// The whitelist entries: the snapshot, then the journal replayed over it.
    pub fn whitelist(&self) -> Result<Vec<IpNet>> {
        // The snapshot holds each entry once: read as it is. Only a journal to replay needs
        // the index (after a whole apply there is none, and a million entries go unhashed).
        let mut snapshot = Vec::new();
        for_lines(&self.snapshot_file(), |line| {
            snapshot.push(policy::parse_net(line)?);
            Ok(())
        })?;
        if fs::metadata(self.journal_file()).map_or(true, |m| m.len() == 0) {
            return Ok(snapshot);
        }
        let mut set = Ordered::default();
        set.at.reserve(snapshot.len());
        for n in snapshot {
            set.insert(n);
        }
        for_lines(&self.journal_file(), |line| {
            if let Some(e) = line.strip_prefix('+') {
                set.insert(policy::parse_net(e)?);
            } else if let Some(e) = line.strip_prefix('-') {
                set.remove(&policy::parse_net(e)?);
            } else if line == "*" {
                set = Ordered::default();
            } else {
                return Err(format!("not a journal record: '{line}'"));
            }
            Ok(())
        })?;
        Ok(set.into_vec())
    }

    /// Replaces the whole desired policy (load, apply): a new snapshot, an empty journal.
    pub fn put_whole(&self, p: &Policy, generation: u32) -> Result<()> {
        self.put_rules_file(p)?;
        self.put_snapshot(&p.whitelist.allow)?;
        self.put_meta(&Meta {
            generation,
            whitelist: WhitelistSizes::of(&p.whitelist.allow),
            snapshot_entries: p.whitelist.allow.len() as u64,
            journal_records: 0,
            text: None,
        })
    }

    /// Records that the live generation was applied from a text of this digest.
    pub fn put_text(&self, generation: u32, sha256: String) -> Result<()> {
        let mut m = self.meta()?;
        m.text = Some(TextDigest { generation, sha256 });
        self.put_meta(&m)
    }

    /// Is the live policy the one applied from a text of this digest?
    pub fn is_live_text(&self, sha256: &str) -> Result<bool> {
        let m = self.meta()?;
        Ok(m.generation != 0
            && m.text
                .is_some_and(|t| t.generation == m.generation && t.sha256 == sha256))
    }

    /// Replaces the rules (a live isolation edit); the whitelist entries stay.
    pub fn put_rules(&self, p: &Policy, generation: u32) -> Result<()> {
        self.put_rules_file(p)?;
        let mut m = self.meta()?;
        m.generation = generation;
        self.put_meta(&m)
    }

    /// Records a whitelist edit: what the backend really added and removed (so the counts
    /// stay exact), or a flush before them.
    pub fn put_whitelist_edit(
        &self,
        flush: bool,
        added: &[IpNet],
        removed: &[IpNet],
        generation: u32,
    ) -> Result<()> {
        let mut m = self.meta()?;
        let f = self.journal_file();
        let file = fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&f)
            .with_context(|| format!("cannot write {}", f.display()))?;
        drop_torn_tail(&file).with_context(|| format!("cannot repair {}", f.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut records = 0u64;
        if flush {
            writeln!(w, "*")?;
            records += 1;
            m.whitelist = WhitelistSizes::default();
        }
        let mut line = Vec::with_capacity(64);
        for (mark, list) in [(b'-', removed), (b'+', added)] {
            for n in list {
                line.clear();
                line.push(mark);
                write_entry(&mut line, n);
                w.write_all(&line)?;
            }
        }
        records += (added.len() + removed.len()) as u64;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()
            .with_context(|| format!("cannot write {}", f.display()))?;
        m.whitelist = m
            .whitelist
            .changed(WhitelistSizes::of(added), WhitelistSizes::of(removed));
        m.generation = generation;
        m.journal_records += records;
        let live: usize = m.whitelist.as_array().iter().sum();
        if m.journal_records > 2 * (m.snapshot_entries + live as u64) + COMPACT_SLACK {
            let all = self.whitelist()?;
            self.put_snapshot(&all)?;
            m.snapshot_entries = all.len() as u64;
            m.journal_records = 0;
            m.whitelist = WhitelistSizes::of(&all);
        }
        self.put_meta(&m)
    }

    fn put_rules_file(&self, p: &Policy) -> Result<()> {
        let mut rules = p.clone();
        rules.whitelist.allow.clear();
        let text = format!(
            "# The live policy of isolation-user, without its whitelist entries (they are in\n\
             # `whitelist` and `whitelist.journal` beside this file).\n{}",
            policy::to_toml(&rules)
        );
        write_atomic(&self.rules_file(), text.as_bytes())
    }

    /// A new snapshot, then the journal emptied (replaying it over the new snapshot would
    /// change nothing, should the truncation not happen).
    fn put_snapshot(&self, entries: &[IpNet]) -> Result<()> {
        let mut text = Vec::with_capacity(entries.len() * 24);
        for n in entries {
            write_entry(&mut text, n);
        }
        write_atomic(&self.snapshot_file(), &text)?;
        let j = self.journal_file();
        match fs::remove_file(&j) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", j.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Host routes as plain addresses, as operators write them.
pub fn show(n: &IpNet) -> String {
    policy::show_net(n)
}

/// One entry and a newline, as `parse_net` reads it back. Host routes are written by hand
/// (IPv6 as eight hex groups, no `::` compression): several times faster than `Display`,
/// which counts at 1M entries.
fn write_entry(out: &mut Vec<u8>, n: &IpNet) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match n {
        IpNet::V6(a) if a.prefix_len() == 128 => {
            for (i, g) in a.addr().segments().iter().enumerate() {
                if i > 0 {
                    out.push(b':');
                }
                let mut started = false;
                for shift in [12, 8, 4, 0] {
                    let d = (g >> shift) & 0xf;
                    if d != 0 || started || shift == 0 {
                        out.push(HEX[d as usize]);
                        started = true;
                    }
                }
            }
        }
        IpNet::V4(a) if a.prefix_len() == 32 => {
            for (i, b) in a.addr().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if *b >= 100 {
                    out.push(b'0' + b / 100);
                }
                if *b >= 10 {
                    out.push(b'0' + (b / 10) % 10);
                }
                out.push(b'0' + b % 10);
            }
        }
        _ => {
            let _ = write!(out, "{}", show(n));
        }
    }
    out.push(b'\n');
}

/// A crash mid-append can leave a last record without its newline: cut it off, or the next
/// record would be glued to it.
fn drop_torn_tail(f: &fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let from = len.saturating_sub(256);
    let mut tail = vec![0u8; (len - from) as usize];
    f.read_exact_at(&mut tail, from)?;
    if tail.last() == Some(&b'\n') {
        return Ok(());
    }
    let keep = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => from + i as u64 + 1,
        None if from == 0 => 0,
        None => return Ok(()),
    };
    f.set_len(keep)
}

/// Calls `f` on each complete line (a torn last line, from a crash mid-append, is skipped);
/// an error it returns is named after the file and line.
fn for_lines(path: &PathBuf, mut f: impl FnMut(&str) -> Result<(), String>) -> Result<()> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        if r.read_line(&mut line)
            .with_context(|| format!("cannot read {}", path.display()))?
            == 0
        {
            return Ok(());
        }
        n += 1;
        let Some(l) = line.strip_suffix('\n') else {
            return Ok(());
        };
        if !l.is_empty() {
            f(l).map_err(|r| anyhow::anyhow!("{}:{n}: {r}", path.display()))?;
        }
    }
}

/// A set that remembers insertion order.
#[derive(Default)]
struct Ordered {
    items: Vec<Option<IpNet>>,
    // foldhash: a million entries hashed per `whitelist`/`save`/`apply` read (the keys are the
    // operator's own: no flooding adversary to resist).
    at: HashMap<IpNet, usize, foldhash::fast::RandomState>,
}

impl Ordered {
    fn insert(&mut self, n: IpNet) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(n) {
            e.insert(self.items.len());
            self.items.push(Some(n));
        }
    }
    fn remove(&mut self, n: &IpNet) {
        if let Some(i) = self.at.remove(n) {
            self.items[i] = None;
        }
    }
    fn into_vec(self) -> Vec<IpNet> {
        self.items.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "iso-store-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        (
            Store::new(&Paths {
                pin_dir: dir.join("pins"),
                state_dir: dir.clone(),
            }),
            dir,
        )
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|a| policy::parse_net(a).unwrap()).collect()
    }

    #[test]
    fn snapshot_and_journal_replay_in_order() {
        let (st, dir) = store();
        let mut p = Policy::default();
        p.whitelist.enabled = true;
        p.whitelist.allow = nets(&["192.0.2.1", "192.0.2.0/24", "2001:db8::1"]);
        st.put_whole(&p, 1).unwrap();
        st.put_whitelist_edit(false, &nets(&["203.0.113.7"]), &nets(&["192.0.2.1"]), 2)
            .unwrap();
        st.put_whitelist_edit(false, &nets(&["192.0.2.1"]), &[], 3)
            .unwrap();
        assert_eq!(
            st.whitelist().unwrap(),
            nets(&["192.0.2.0/24", "2001:db8::1", "203.0.113.7", "192.0.2.1"])
        );
        let m = st.meta().unwrap();
        assert_eq!(m.generation, 3);
        assert_eq!(
            m.whitelist,
            WhitelistSizes {
                exact_v4: 2,
                lpm_v4: 1,
                exact_v6: 1,
                lpm_v6: 0
            }
        );
        st.put_whitelist_edit(true, &nets(&["198.51.100.1"]), &[], 4)
            .unwrap();
        assert_eq!(st.whitelist().unwrap(), nets(&["198.51.100.1"]));
        assert!(st.whole().unwrap().whitelist.enabled);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_replay_is_idempotent() {
        let (st, dir) = store();
        st.put_whitelist_edit(false, &nets(&["192.0.2.1", "192.0.2.2"]), &[], 1)
            .unwrap();
        let j = st.journal_file();
        let mut text = fs::read_to_string(&j).unwrap();
        text.push_str("+192.0.2.");
        fs::write(&j, &text).unwrap();
        assert_eq!(st.whitelist().unwrap(), nets(&["192.0.2.1", "192.0.2.2"]));
        st.put_whitelist_edit(false, &nets(&["192.0.2.3"]), &[], 2)
            .unwrap();
        assert_eq!(
            st.whitelist().unwrap(),
            nets(&["192.0.2.1", "192.0.2.2", "192.0.2.3"])
        );
        // A compaction's snapshot written but the journal not yet removed: same result.
        st.put_snapshot(&nets(&["192.0.2.1", "192.0.2.2"])).unwrap();
        fs::write(&j, "-192.0.2.2\n+192.0.2.2\n-192.0.2.1\n").unwrap();
        assert_eq!(st.whitelist().unwrap(), nets(&["192.0.2.2"]));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn entries_are_written_as_parse_net_reads_them() {
        for a in [
            "2001:db8::1",
            "2001:db8:0:0:ff:0:0:0",
            "::",
            "::ffff:192.0.2.1",
            "192.0.2.1",
            "0.10.100.255",
            "192.0.2.0/24",
            "2001:db8::/32",
        ] {
            let n = policy::parse_net(a).unwrap();
            let mut out = Vec::new();
            write_entry(&mut out, &n);
            let text = String::from_utf8(out).unwrap();
            assert!(text.ends_with('\n'));
            assert_eq!(
                policy::parse_net(text.trim_end()).unwrap(),
                n,
                "{a}: {text}"
            );
        }
    }

    #[test]
    fn a_long_journal_is_compacted() {
        let (st, dir) = store();
        let many: Vec<IpNet> = (0..(COMPACT_SLACK as u32 / 2))
            .map(|i| IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::from(i))))
            .collect();
        // Add and remove the same entries: the journal grows, the whitelist does not.
        let mut steps = Vec::new();
        for step in 0..4u32 {
            let (add, del): (&[IpNet], &[IpNet]) = if step % 2 == 0 {
                (&many, &[])
            } else {
                (&[], &many)
            };
            st.put_whitelist_edit(false, add, del, step + 1).unwrap();
            steps.push(st.meta().unwrap().journal_records);
        }
        // The 4th edit brings 131072 records against an empty whitelist: over 2 × 0 + 65536.
        let n = many.len() as u64;
        assert_eq!(steps, vec![n, 2 * n, 3 * n, 0]);
        st.put_whitelist_edit(false, &many, &[], 5).unwrap();
        let m = st.meta().unwrap();
        assert_eq!((m.snapshot_entries, m.journal_records), (0, n));
        assert_eq!(st.whitelist().unwrap(), many);
        st.put_whole(&Policy::default(), 6).unwrap();
        assert!(!st.journal_file().exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
