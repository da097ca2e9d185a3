//! envoyproxy/ratelimit's own test cases (`../shared/peer-ratelimit`, beside the clone) run
//! against the agent: the conformance step of `cargo xtask test`, with both backends.
//!
//! The suite's files are not part of this repository; its runner needs Python with `grpcio` and
//! `xds-protos`, which [`ensure_venv`] installs (from PyPI, pinned) in a venv cached in
//! `$HOME/.cache/limiter-peer-ratelimit`, as the Envoy venv is.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Where the suite sits, relative to the workspace root (the clone lives beside `shared/`).
const SUITE_DIR: &str = "../shared/peer-ratelimit";
/// Overrides [`SUITE_DIR`] (a worktree that does not sit beside `shared/`).
const SUITE_ENV: &str = "LIMITER_PEER_SUITE";
/// The runner's Python packages, pinned (the versions the suite was checked with).
const PACKAGES: &[&str] = &["grpcio==1.85.4", "xds-protos==1.85.0"];
/// What the runner imports; a venv that imports it is ready.
const PROBE_IMPORT: &str = "import grpc; from envoy.service.ratelimit.v3 import rls_pb2_grpc";

/// `$HOME/.cache/limiter-peer-ratelimit/venv`.
fn venv() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: set it (the peer suite's venv lives in $HOME/.cache/limiter-peer-ratelimit)")?;
    Ok(PathBuf::from(home).join(".cache/limiter-peer-ratelimit/venv"))
}

fn python() -> Result<PathBuf> {
    Ok(venv()?.join("bin/python"))
}

/// `None` when the venv can run the suite, else why not.
pub fn probe_venv() -> Result<Option<String>> {
    let python = python()?;
    if !python.exists() {
        return Ok(Some(format!("no venv at {}", venv()?.display())));
    }
    let ok = Command::new(&python).args(["-c", PROBE_IMPORT]).output().is_ok_and(|o| o.status.success());
    Ok((!ok).then(|| format!("{} cannot import grpcio and xds-protos", python.display())))
}

/// Creates the venv and installs the runner's packages when [`probe_venv`] says so.
pub fn install_venv() -> Result<()> {
    let venv = venv()?;
    let python = python()?;
    if !python.exists() {
        util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).with_context(|| {
            format!("cannot create a Python venv at {}: install python3 with venv support", venv.display())
        })?;
    }
    util::run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PACKAGES),
    )
    .with_context(|| format!("pip install {} failed: check that PyPI is reachable", PACKAGES.join(" ")))?;
    if let Some(why) = probe_venv()? {
        bail!("the peer suite's venv was installed but is not usable: {why}; delete {} and rerun", venv.display());
    }
    Ok(())
}

/// `shared/peer-ratelimit` beside the workspace root or beside one of its ancestors (a worktree
/// or a clone one level deeper still finds it); the sibling path when none has it, so the
/// error names where it was expected.
fn find_suite(root: &std::path::Path) -> PathBuf {
    root.ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/peer-ratelimit"))
        .find(|dir| dir.join("run_peer_cases.py").is_file())
        .unwrap_or_else(|| root.join(SUITE_DIR))
}

/// Runs every case of the suite against a debug build of the agent, with the `local` backend
/// and then with `redis` (a redis-server the runner starts on a free loopback port). A missing
/// suite directory is an error, never a skip.
pub fn run_suite() -> Result<()> {
    let root = util::workspace_root()?;
    let dir = std::env::var_os(SUITE_ENV).filter(|d| !d.is_empty()).map_or_else(|| find_suite(&root), PathBuf::from);
    let runner = dir.join("run_peer_cases.py");
    if !runner.is_file() {
        bail!(
            "the envoyproxy/ratelimit conformance suite is missing: no {} (it lives beside the clone, in {SUITE_DIR} \
             relative to {}, or where ${SUITE_ENV} says); put the shared directory there",
            runner.display(),
            root.display()
        );
    }
    if let Some(why) = probe_venv()? {
        bail!("the peer suite's Python is not ready ({why}): run `cargo xtask setup`");
    }
    util::run(util::cargo()?.args(["build", "-p", "limiter-agent"]))
        .context("building limiter-agent for the conformance suite failed")?;
    let agent = util::target_dir()?.join("debug/limiter-agent");
    for (backend, extra) in [("local", &[][..]), ("redis", &["--redis-server", "redis-server"][..])] {
        println!("test: envoyproxy/ratelimit conformance suite, {backend} backend ({})", dir.display());
        let mut cmd = Command::new(python()?);
        cmd.current_dir(&dir)
            .arg("run_peer_cases.py")
            .arg("--agent")
            .arg(&agent)
            .arg("--check-bin")
            .arg(&agent)
            .args(extra);
        util::run(&mut cmd).with_context(|| {
            format!(
                "envoyproxy/ratelimit conformance ({backend} backend) failed: see the FAIL lines above; rerun one \
                 with `cd {} && {} run_peer_cases.py --agent {} --check-bin {} {} --only ID`",
                dir.display(),
                python().map(|p| p.display().to_string()).unwrap_or_default(),
                agent.display(),
                agent.display(),
                extra.join(" ")
            )
        })?;
    }
    Ok(())
}
