//! One policy for a fleet, kept in etcd (as Calico and Cilium keep theirs).
//!
//! Keys under a prefix P: `P/policy` (the policy file's text, or the manifest of a big
//! policy's parts; its mod revision names the version every node reports) and
//! `P/nodes/NODE` (what that node runs: `NodeRecord` as JSON, written with a lease, so a
//! dead node's record goes away by itself).
//!
//! `fleet push` writes `P/policy` with a compare-and-swap on the revision it read, so two
//! admins cannot overwrite each other silently; the service (`run --policy-source
//! etcd://…`) reads and watches it and applies it through the engine.
//!
//! A policy file bigger than `INLINE_MAX` (a whitelist of a million addresses is ~16 MiB
//! of text; etcd refuses requests over 1.5 MiB by default) is encoded compactly (`compact`)
//! and cut into parts stored under `P/parts/SHA256` before `P/policy` is swapped for a
//! manifest naming them (`Manifest`). The cuts are content-defined (FastCDC), so an edit of
//! a few entries writes a part or two, not the whole policy again, and etcd's history grows
//! by what changed. Nodes read the parts at the manifest's revision, so a later push or
//! clean-up never hands them a mix.

pub mod chunks;
pub mod codec;
pub mod etcd;
pub mod url;

use serde::{Deserialize, Serialize};

pub use chunks::{Encoded, INLINE_MAX, MAX_ENCODED, Manifest, encode, manifest_of};
pub use codec::{compact, uncompact};
pub use etcd::{
    Lease, PartCache, PolicyWatch, Pushed, Unresolved, Watched, clean_parts, count_parts, push,
    push_file, read_current, read_nodes, read_policy, read_value, resolve, rollback, write_record,
};
pub use url::{EtcdOpts, EtcdUrl, connect};

/// What a node runs, under `P/nodes/NODE`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub node: String,
    /// The mod revision of `P/policy` this node last applied (0: none yet).
    pub revision: i64,
    pub backend: String,
    /// `ok`, or why the node refused the policy it was given (it runs `revision` then).
    pub result: String,
    /// The revision that was refused, when `result` is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_revision: Option<i64>,
    /// Unix time of the record.
    pub time: f64,
    /// The engine's generation on the node.
    pub generation: u32,
}

/// How a node's service follows the fleet's policy: written by the service to its state
/// directory (`source_file`), read by `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    /// The URL followed.
    pub source: String,
    pub node: String,
    pub connected: bool,
    /// The mod revision of the policy this node runs (0: none yet).
    pub revision: i64,
    pub last_error: Option<String>,
    pub time: f64,
}

/// Where the service says how its source is doing.
pub fn source_file(paths: &crate::state::Paths) -> std::path::PathBuf {
    paths.state_dir.join("source.json")
}

impl SourceStatus {
    /// Written for `status`; a failure to write is no reason to stop following.
    pub fn save(&self, paths: &crate::state::Paths) {
        if let Ok(text) = serde_json::to_vec_pretty(self) {
            let _ = crate::state::write_atomic(&source_file(paths), &text);
        }
    }

    /// What the service last wrote, if it follows a source.
    pub fn load(paths: &crate::state::Paths) -> Option<SourceStatus> {
        crate::state::read_json(&source_file(paths)).ok().flatten()
    }
}

/// A key under `P/nodes/` as read: the node its key names, and its record, or why it is
/// not one (anyone who can write the prefix can write anything there).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEntry {
    pub name: String,
    pub record: Result<NodeRecord, String>,
}

impl NodeEntry {
    /// The entry of key `P/nodes/NAME` (`name`) holding `value`: a record that does not
    /// parse, or that names another node than its key, is malformed.
    pub fn read(name: &str, value: &[u8]) -> NodeEntry {
        let record = match serde_json::from_slice::<NodeRecord>(value) {
            Err(e) => Err(format!("not a node record: {e}")),
            Ok(r) if r.node != name => Err(format!("its record names another node, '{}'", r.node)),
            Ok(r) => Ok(r),
        };
        NodeEntry {
            name: name.to_string(),
            record,
        }
    }
}

/// The node name: `--node-name`, else the host name.
pub fn node_name(given: Option<&str>) -> String {
    if let Some(n) = given {
        return n.to_string();
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
