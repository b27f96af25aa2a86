//! Which backend: the one `--backend` asks for, and the one that runs (kept in the state
//! file). A leaf: the state file names a backend without depending on any.

use serde::{Deserialize, Serialize};

/// What `--backend` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// eBPF where the kernel takes the programs, iptables + ipset where it refuses them.
    Auto,
    Ebpf,
    Iptables,
}

/// The backend that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ebpf,
    Iptables,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ebpf => "ebpf",
            Kind::Iptables => "iptables",
        }
    }
}
