//! `cargo xtask image`: the agent's OCI image, built here with Debian's podman and nothing
//! pulled from a registry. The agent is built for [`MUSL_TARGET`] (a static binary that embeds
//! the XDP object; ring's C code is compiled by Debian's `musl-gcc`), copied into a build
//! context of its own under `target/`, and `podman build` turns it into a `FROM scratch` image
//! (deploy/Containerfile) tagged with the agent crate's version, the tag deploy/daemonset.yaml
//! names. The musl build's target dir stays in `target/`, so a second run only re-links what
//! changed, and podman reuses its layer when the binary did not change.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// The Rust target of the image's binary: statically linked against musl, so `FROM scratch`
/// holds everything it needs.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The image's name; its tag is always the agent crate's version.
pub const IMAGE_NAME: &str = "limiter-agent";
const CONTAINERFILE: &str = "deploy/Containerfile";

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Also write the image as an OCI archive to FILE (`podman save --format oci-archive`),
    /// for loading on a node or pushing from another machine.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

/// Podman with the settings this machine kind needs (see TOOLCHAIN.md): runc, because crun
/// refuses hybrid cgroups, and cgroupfs, because there is no systemd to manage them.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

pub fn cmd(args: &ImageArgs) -> Result<()> {
    let started = Instant::now();
    setup::ensure()?;
    let version = agent_version()?;
    let tag = format!("{IMAGE_NAME}:{version}");

    let build_started = Instant::now();
    util::run(util::cargo()?.args(["build", "--release", "--locked", "-p", "limiter-agent", "--target", MUSL_TARGET]))
        .with_context(|| {
            format!(
                "building limiter-agent for {MUSL_TARGET} failed: see the compiler errors above (the target and \
                 musl-gcc come from `cargo xtask setup`)"
            )
        })?;
    let binary = util::target_dir()?.join(MUSL_TARGET).join("release/limiter-agent");
    check_static(&binary)?;
    let build_secs = build_started.elapsed().as_secs_f64();

    // A context of its own: podman copies the whole context directory, and target/ is gigabytes.
    let context = util::target_dir()?.join("image-context");
    std::fs::create_dir_all(&context).with_context(|| format!("cannot create {}", context.display()))?;
    let staged = context.join("limiter-agent");
    std::fs::copy(&binary, &staged)
        .with_context(|| format!("cannot copy {} to {}", binary.display(), staged.display()))?;

    let podman_started = Instant::now();
    let containerfile = util::workspace_root()?.join(CONTAINERFILE);
    util::run(
        podman()
            .args(["build", "--quiet", "--tag", &tag, "--build-arg"])
            .arg(format!("VERSION={version}"))
            .arg("--file")
            .arg(&containerfile)
            .arg(&context),
    )
    .context("podman build failed: see its output above (podman comes from `cargo xtask setup`)")?;
    let podman_secs = podman_started.elapsed().as_secs_f64();

    if let Some(file) = &args.save {
        // podman refuses to overwrite an archive.
        if file.exists() {
            std::fs::remove_file(file).with_context(|| format!("cannot replace {}", file.display()))?;
        }
        util::run(podman().args(["save", "--quiet", "--format", "oci-archive", "--output"]).arg(file).arg(&tag))
            .context("podman save failed: see its output above")?;
        println!("image: saved {tag} to {}", file.display());
    }

    let size = std::fs::metadata(&binary).map(|m| m.len()).unwrap_or_default();
    println!(
        "image: built {tag} (FROM scratch, one static binary of {:.1} MiB) in {:.1}s: agent build {build_secs:.1}s, \
         podman build {podman_secs:.1}s",
        size as f64 / 1024.0 / 1024.0,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The agent crate's version, as cargo resolves it (the workspace's).
fn agent_version() -> Result<String> {
    let out = util::output(util::cargo()?.args(["metadata", "--no-deps", "--format-version", "1", "--locked"]))
        .context("cargo metadata failed")?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("cargo metadata printed no JSON")?;
    let packages = meta["packages"].as_array().context("cargo metadata has no packages")?;
    let agent = packages
        .iter()
        .find(|p| p["name"] == "limiter-agent")
        .context("no limiter-agent package in the workspace: was it renamed?")?;
    agent["version"].as_str().map(str::to_owned).context("limiter-agent has no version in cargo metadata")
}

/// Fails unless `binary` is a static ELF executable (no program interpreter): a dynamic one
/// would build into the image and then fail to start with a bare "no such file or directory".
fn check_static(binary: &Path) -> Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    match has_interpreter(&bytes) {
        Some(false) => Ok(()),
        Some(true) => bail!(
            "{} is dynamically linked (it has a PT_INTERP): a FROM scratch image has no loader; build with the \
             {MUSL_TARGET} target's default crt-static",
            binary.display()
        ),
        None => bail!("{} is not a 64-bit little-endian ELF file", binary.display()),
    }
}

/// Whether a 64-bit little-endian ELF file has a program interpreter (`PT_INTERP`, the mark of
/// a dynamically linked executable); `None` if `elf` is not such a file.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| elf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| elf.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| elf.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interpreter_is_found_in_a_dynamic_binary_only() {
        // This test binary is linked dynamically against glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(has_interpreter(&me), Some(true));
        // The same header with no program headers is static.
        let mut header = me[..0x40].to_vec();
        header[0x38..0x3a].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(has_interpreter(&header), Some(false));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(has_interpreter(&me[..0x20]), None);
    }
}
