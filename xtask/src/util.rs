//! Paths, pinned versions and process helpers shared by every subcommand.
//!
//! Other code that needs `bpf-linker` (for example a script or a test harness that runs
//! `cargo build` itself) can call [`bpf_linker_bin_dir`] / [`path_with_bpf_linker`], or run
//! `eval "$(cargo xtask env)"` from a shell.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result, bail};

/// The nightly that builds the eBPF crate and whose LLVM `bpf-linker` links against.
///
/// The source of truth is `ebpf-toolchain.txt` at the workspace root (limiter-agent's build.rs
/// reads it too); this constant must match it, which a unit test checks.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

/// Name of the file at the workspace root that holds [`EBPF_TOOLCHAIN`].
pub const EBPF_TOOLCHAIN_FILE: &str = "ebpf-toolchain.txt";

/// The bpf-linker release known to work with aya 0.14 and LLVM 22 (see TOOLCHAIN.md).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the privileged tests, the demo, the bench and the container image use (podman
/// with runc, see TOOLCHAIN.md; musl-tools' `musl-gcc` compiles ring's C for the static binary).
pub const DEBIAN_PACKAGES: [&str; 13] = [
    "iproute2",
    "nftables",
    "hping3",
    "bpftool",
    "redis-server",
    "tcpdump",
    "ethtool",
    "fonts-dejavu-core",
    "podman",
    "runc",
    "musl-tools",
    // The bench's peers: `xdp-filter` (a real XDP filter, timed on the same frames) and
    // `iptables` with `hashlimit` (a per-source meter beside nftables').
    "xdp-tools",
    "iptables",
];

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest dir has no parent: run xtask from the limiter workspace")
}

/// Reads the pinned eBPF toolchain from `ebpf-toolchain.txt`.
pub fn ebpf_toolchain() -> Result<String> {
    let path = workspace_root()?.join(EBPF_TOOLCHAIN_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read {}: restore it from git (it holds just `{EBPF_TOOLCHAIN}`)", path.display())
    })?;
    parse_toolchain_file(&text).with_context(|| format!("bad contents in {}", path.display()))
}

fn parse_toolchain_file(text: &str) -> Result<String> {
    let name = text.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        bail!("expected a single toolchain name such as `{EBPF_TOOLCHAIN}`, got {text:?}");
    }
    Ok(name.to_owned())
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set: set it (the bpf-linker cache lives in $HOME/.cache)")
}

/// `$HOME/.cache/limiter-llvm`: symlinks to the pinned nightly's libLLVM (`LLVM_PREFIX`).
pub fn llvm_prefix() -> Result<PathBuf> {
    Ok(home()?.join(".cache/limiter-llvm"))
}

/// `$HOME/.cache/limiter-bpf-linker`: the `cargo install --root` of bpf-linker.
pub fn bpf_linker_root() -> Result<PathBuf> {
    Ok(home()?.join(".cache/limiter-bpf-linker"))
}

/// The directory holding the `bpf-linker` binary; put it on PATH for anything that runs cargo.
pub fn bpf_linker_bin_dir() -> Result<PathBuf> {
    Ok(bpf_linker_root()?.join("bin"))
}

/// `PATH` with [`bpf_linker_bin_dir`] in front.
pub fn path_with_bpf_linker() -> Result<OsString> {
    let mut dirs = vec![bpf_linker_bin_dir()?];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("cannot build PATH: does $HOME contain a ':'?")
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Ok(workspace_root()?.join("target")),
    }
}

/// A `cargo` command run at the workspace root with bpf-linker on PATH.
pub fn cargo() -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()?).env("PATH", path_with_bpf_linker()?);
    Ok(cmd)
}

/// `cargo` of the pinned nightly (`rustup run`, so it works even if `cargo` on PATH is not the
/// rustup proxy), at the workspace root with bpf-linker on PATH.
pub fn nightly_cargo(toolchain: &str) -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, "cargo"]).current_dir(workspace_root()?).env("PATH", path_with_bpf_linker()?);
    Ok(cmd)
}

/// A printable form of a command, for logs and error messages.
pub fn display(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Prints and runs a command with inherited stdio; fails unless it exits with success.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd.status().with_context(|| format!("cannot start `{shown}`: is it installed and on PATH?"))?;
    check_status(status, &shown)
}

/// Fails with a message naming the command unless `status` is success.
pub fn check_status(status: ExitStatus, shown: &str) -> Result<()> {
    if status.success() { Ok(()) } else { bail!("`{shown}` failed ({status}); its output is above") }
}

/// Runs a command quietly and returns its stdout; fails (with its stderr) unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd.output().with_context(|| format!("cannot start `{shown}`: is it installed and on PATH?"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective uid).
pub fn is_root() -> Result<bool> {
    let meta = std::fs::metadata("/proc/self").context("cannot stat /proc/self: is /proc mounted?")?;
    Ok(meta.uid() == 0)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Replaces the default SIGINT/Ctrl-C action with setting a flag that [`interrupted`] reads,
/// so RAII guards get to clean up. Call at most once per process.
pub fn install_ctrlc_flag() -> Result<()> {
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler (was it installed twice?)")
}

/// Whether Ctrl-C (SIGINT) arrived since [`install_ctrlc_flag`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Error returned when the user pressed Ctrl-C; `main` exits with 130 for it.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by Ctrl-C")
    }
}

impl std::error::Error for Interrupted {}

/// Sends `signal` to process `pid`. Errors only if the process exists and cannot be signalled.
pub fn send_signal(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid does not fit pid_t")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        // Already gone: nothing to do.
        return Ok(());
    }
    Err(err).with_context(|| format!("cannot send signal {signal} to pid {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_file_matches_constant() {
        assert_eq!(ebpf_toolchain().unwrap(), EBPF_TOOLCHAIN);
    }

    #[test]
    fn toolchain_file_parsing() {
        assert_eq!(parse_toolchain_file("nightly-2026-05-19\n").unwrap(), "nightly-2026-05-19");
        assert!(parse_toolchain_file("  \n").is_err());
        assert!(parse_toolchain_file("nightly a").is_err());
    }

    #[test]
    fn path_puts_bpf_linker_first() {
        let path = path_with_bpf_linker().unwrap();
        let first = std::env::split_paths(&path).next().unwrap();
        assert_eq!(first, bpf_linker_bin_dir().unwrap());
    }
}
