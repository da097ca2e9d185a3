//! Harness for the privileged integration tests: network namespaces and veth pairs with RAII
//! cleanup ([`netns`]), hand-built frames ([`packet`]), AF_PACKET sockets that send and count
//! them ([`rawsock`]), the agent binary with scratch directories ([`agent`]), and test certificates ([`tls`]).
//!
//! Tests need root. They never skip silently: [`require_root`] and [`require_kernel_feature`]
//! panic with a message that says what is missing, so a run without privileges fails loudly
//! instead of reporting green.

pub mod agent;
pub mod envoy;
pub mod fuzz;
pub mod netns;
pub mod packet;
pub mod rawsock;
pub mod redis;
pub mod redis_topology;
pub mod synproxy;
pub mod tls;

use std::path::Path;
use std::process::Command;

/// Panics unless the process runs as root (effective uid 0).
///
/// Call it first in every privileged test: without root, namespace creation fails later with a
/// less obvious error, and a test must never pass by doing nothing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "limiter-tests need root (euid is {euid}): run them with `cargo xtask test` or \
         `sudo -E cargo test -p limiter-tests -- --test-threads=1`"
    );
    require_tool("ip");
}

/// Panics with "needs kernel feature {name}" unless `present` is true.
pub fn require_kernel_feature(name: &str, present: bool) {
    assert!(present, "needs kernel feature {name}: this kernel lacks it, so the test cannot run");
}

/// Panics unless the kernel exposes its BTF (`/sys/kernel/btf/vmlinux`), which CO-RE
/// relocations in the XDP program need.
pub fn require_btf() {
    require_kernel_feature("BTF (/sys/kernel/btf/vmlinux)", Path::new("/sys/kernel/btf/vmlinux").exists());
}

/// Whether an executable called `name` is on `PATH`.
pub fn has_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Panics unless the executable `name` is on `PATH` (e.g. `ip` from iproute2).
pub fn require_tool(name: &str) {
    assert!(has_tool(name), "needs the `{name}` tool on PATH (install it, e.g. iproute2 for `ip`)");
}

/// Runs `cmd`, failing with its stderr if it exits non-zero.
pub(crate) fn run_checked(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().map_err(|e| anyhow::anyhow!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}
