//! `cargo xtask lint`: rustfmt check, clippy on the host crates, clippy on the eBPF crate for
//! its own target with the pinned nightly.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

pub fn cmd() -> Result<()> {
    let setup = setup::ensure()?;
    let tc = &setup.toolchain;
    ensure_component("the default toolchain", None, "rustfmt")?;
    ensure_component("the default toolchain", None, "clippy")?;
    ensure_component(tc, Some(tc), "clippy")?;

    // Run every check, so one run shows all that needs fixing.
    let checks: [(&str, Command, &str); 3] = [
        ("rustfmt", fmt_cmd()?, "run `cargo fmt --all`"),
        ("clippy (host crates)", host_clippy_cmd()?, "fix them or add #[expect(..., reason = \"...\")]"),
        ("clippy (limiter-ebpf, bpfel-unknown-none)", ebpf_clippy_cmd(tc)?, "fix them in limiter-ebpf"),
    ];
    let mut failed = Vec::new();
    for (name, mut cmd, fix) in checks {
        if let Err(e) = util::run(&mut cmd) {
            eprintln!("lint: {name} failed: {e:#}");
            failed.push(format!("{name} ({fix})"));
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    println!("lint: clean");
    Ok(())
}

/// Adds a rustup component if `cargo <component> --version` does not work.
fn ensure_component(label: &str, toolchain: Option<&str>, component: &str) -> Result<()> {
    let mut probe = match toolchain {
        Some(tc) => {
            let mut c = Command::new("rustup");
            c.args(["run", tc, "cargo"]);
            c
        }
        None => Command::new("cargo"),
    };
    let sub = if component == "rustfmt" { "fmt" } else { component };
    let present = probe.args([sub, "--version"]).output().is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    println!("lint: adding rustup component {component} to {label}");
    let mut add = Command::new("rustup");
    add.args(["component", "add", component]);
    if let Some(tc) = toolchain {
        add.args(["--toolchain", tc]);
    }
    util::run(&mut add).with_context(|| format!("cannot add {component}: check that static.rust-lang.org is reachable"))
}

fn fmt_cmd() -> Result<Command> {
    let mut cmd = util::cargo()?;
    cmd.args(["fmt", "--all", "--check"]);
    Ok(cmd)
}

/// Default members plus limiter-tests: everything but the eBPF crate, which is not for the host.
fn host_clippy_cmd() -> Result<Command> {
    let mut cmd = util::cargo()?;
    cmd.args(["clippy", "--workspace", "--exclude", "limiter-ebpf", "--all-targets", "--", "-D", "warnings"]);
    Ok(cmd)
}

fn ebpf_clippy_cmd(tc: &str) -> Result<Command> {
    let mut cmd = util::nightly_cargo(tc)?;
    cmd.args([
        "clippy",
        "-p",
        "limiter-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    Ok(cmd)
}
