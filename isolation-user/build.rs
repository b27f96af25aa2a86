//! Builds the BPF object (isolation-ebpf, for bpfel-unknown-none) so that the binary can
//! embed it: a plain `cargo build` gives a complete `isolation-user`.
fn main() -> anyhow::Result<()> {
    // The BPF crate also depends on the shared types.
    println!("cargo::rerun-if-changed=../isolation-common/src");
    // build-std on a stable toolchain: only for this inner build.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // The pinned toolchain: bpf-linker is built against its LLVM.
    let pin = concat!(env!("CARGO_MANIFEST_DIR"), "/../rust-toolchain.toml");
    println!("cargo::rerun-if-changed={pin}");
    let text = std::fs::read_to_string(pin)?;
    let toolchain = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|l| l.split('"').nth(1))
        .ok_or_else(|| anyhow::anyhow!("{pin}: no channel"))?;
    // Mutants (deliberate bugs the differential test must catch) of the BPF side.
    let mut features = Vec::new();
    for m in [
        "hairpin-off",
        "reject-as-drop",
        "skip-cidr-trie",
        "record-at-ingress",
    ] {
        let var = format!(
            "CARGO_FEATURE_MUTANT_{}",
            m.replace('-', "_").to_uppercase()
        );
        if std::env::var_os(&var).is_some() {
            println!(
                "cargo::warning=building the datapath with the mutant '{m}': a test build only"
            );
            features.push(format!("mutant-{m}"));
        }
    }
    let features: Vec<&str> = features.iter().map(String::as_str).collect();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "isolation-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../isolation-ebpf"),
            features: &features,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}
