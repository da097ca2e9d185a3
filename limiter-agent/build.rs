//! Builds the XDP program (`limiter-ebpf`) for `bpfel-unknown-none` with the pinned nightly
//! and bpf-linker, so `src/dataplane` can embed it. `cargo xtask setup` installs both.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let workspace = manifest_dir.parent().context("limiter-agent has no parent directory")?;
    let toolchain_file = workspace.join("ebpf-toolchain.txt");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading the pinned eBPF toolchain from {}", toolchain_file.display()))?;
    let toolchain = toolchain.trim();

    // bpf-linker lives in a cache outside the repo (built against the pinned nightly's LLVM by
    // `cargo xtask setup`); put it on PATH for the nested cargo that aya-build runs.
    let home = env::var_os("HOME").context("HOME not set")?;
    let linker_dir = PathBuf::from(home).join(".cache/limiter-bpf-linker/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !linker_dir.join("bpf-linker").exists() && which_in_path(&path, "bpf-linker").is_none() {
        bail!(
            "bpf-linker not found in {} or on PATH: run `cargo xtask setup` first (it builds \
             bpf-linker against the pinned nightly's LLVM)",
            linker_dir.display()
        );
    }
    let mut dirs = vec![linker_dir];
    dirs.extend(env::split_paths(&path));
    let joined = env::join_paths(dirs).context("joining PATH")?;
    // SAFETY: build scripts are single-threaded here; nothing else reads the environment
    // concurrently.
    unsafe { env::set_var("PATH", joined) };
    println!("cargo:rerun-if-env-changed=PATH");

    let ebpf_dir = workspace.join("limiter-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("limiter-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "limiter-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(toolchain),
    )
    .context("building the XDP program: is the pinned nightly with rust-src installed? run `cargo xtask setup`")?;
    Ok(())
}

fn which_in_path(path: &std::ffi::OsStr, name: &str) -> Option<PathBuf> {
    env::split_paths(path).map(|d| d.join(name)).find(|p| p.exists())
}
