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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "isolation-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../isolation-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )
}
