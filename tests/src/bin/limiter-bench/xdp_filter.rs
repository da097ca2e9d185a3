//! Debian xdp-tools' `xdp-filter`, the bench's real peer: loaded by its own CLI on an
//! interface the bench created, in deny-by-source mode, then reached through its pins.
//!
//! `xdp-filter` carries its BPF objects inside the binary (the package ships no `.o`), so the
//! bench lets it load itself: `LIBXDP_SKIP_DISPATCHER=1` makes libxdp attach the filter
//! program directly (no multi-program dispatcher in front of it, which would add its own cost),
//! and its pins go to a bpffs instance of this run, never the global `/sys/fs/bpf`. The pinned program is then opened by path and run through
//! `BPF_PROG_TEST_RUN` like the limiter; its address map is filled by direct map writes,
//! since one `xdp-filter ip` process per address would take minutes for thousands.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData, PerCpuHashMap, PerCpuValues};
use aya::util::nr_cpus;
use limiter_tests::netns::Netns;

use crate::bpf::Prog;

/// The program xdp-filter picks with its default features (tcp, udp, ipv6, ipv4, ethernet)
/// and policy `allow` (pass what no list matches, drop what matches).
pub const PROGRAM: &str = "xdpfilt_alw_all";
/// The capacity xdp-filter gives its IPv4 map (fixed at build time in xdp-tools).
pub const IPV4_CAPACITY: usize = 10_000;
/// `MAP_FLAG_SRC` of xdp-filter's map values: match the address as a source (what
/// `xdp-filter ip ADDR --mode src` writes; read back with `bpftool map dump`).
const MODE_SRC: u64 = 1;

/// A bpffs instance of this process, unmounted (with every pin in it) on drop.
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    pub fn new(tag: &str) -> Result<Self> {
        let path = PathBuf::from(format!("/run/limiter-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path).output().context("running mount")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&path);
            bail!("mount -t bpf on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// xdp-filter attached (native mode) to `iface` in `ns`, detached on drop.
pub struct XdpFilter<'a> {
    ns: &'a Netns,
    iface: String,
    bpffs: BpffsDir,
    ipv4: PerCpuHashMap<MapData, u32, u64>,
}

impl<'a> XdpFilter<'a> {
    pub fn load(ns: &'a Netns, iface: &str) -> Result<Self> {
        let bpffs = BpffsDir::new(&format!("xdpfilter-{iface}"))?;
        let filter = Self::cli(ns, bpffs.path(), &["load", iface, "--mode", "native"])
            .with_context(|| format!("loading xdp-filter on {iface} (is xdp-tools installed? cargo xtask setup)"));
        let map_path = bpffs.path().join("xdp-filter/filter_ipv4");
        let ipv4 = filter.and_then(|()| {
            let data = MapData::from_pin(&map_path).with_context(|| format!("opening {}", map_path.display()))?;
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).context("xdp-filter's IPv4 map is not a per-CPU hash")
        });
        let ipv4 = match ipv4 {
            Ok(m) => m,
            Err(e) => {
                // Nothing to detach if loading failed; the bpffs goes with `bpffs`.
                let _ = Self::cli(ns, bpffs.path(), &["unload", iface]);
                return Err(e);
            }
        };
        Ok(Self { ns, iface: iface.to_owned(), bpffs, ipv4 })
    }

    /// Runs `xdp-filter args...` in `ns`, with this run's bpffs as its pin root.
    ///
    /// xdp-filter finds its pin root itself: `/sys/fs/bpf` when that is a bpffs, else the
    /// first bpffs in the mount table (which may belong to anyone). So it runs in a private
    /// mount namespace where this run's bpffs is bind-mounted on `/sys/fs/bpf`, and joins `ns`
    /// with `nsenter --net` (`ip netns exec` would remount `/sys` and lose the bind mount).
    fn cli(ns: &Netns, bpffs: &Path, args: &[&str]) -> Result<()> {
        let dir = bpffs.display().to_string();
        let netns = ns.path().display().to_string();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /sys/fs/bpf && n="$1" && shift && exec nsenter --net="$n" xdp-filter "$@""#)
            .args([&dir, &netns])
            .args(args)
            .env("LIBXDP_BPFFS", &dir)
            .env("LIBXDP_SKIP_DISPATCHER", "1");
        let out = cmd.output().context("running unshare (util-linux)")?;
        if !out.status.success() {
            bail!("xdp-filter {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Adds `addrs` as sources to drop: the first through the CLI (`xdp-filter ip ADDR --mode
    /// src`, so the tool itself defines the entry), the rest by writing the same value.
    pub fn deny_sources(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        let Some((first, rest)) = addrs.split_first() else { return Ok(()) };
        if addrs.len() > IPV4_CAPACITY {
            bail!("xdp-filter's IPv4 map holds {IPV4_CAPACITY} addresses, asked for {}", addrs.len());
        }
        Self::cli(self.ns, self.bpffs.path(), &["ip", &first.to_string(), "--mode", "src"])?;
        let key = u32::from_ne_bytes(first.octets());
        let written = self.ipv4.get(&key, 0).context("reading back xdp-filter's entry")?;
        if written.iter().any(|v| v & 0xff != MODE_SRC) {
            bail!(
                "xdp-filter wrote an IPv4 entry this bench does not understand: {:?}",
                written.iter().collect::<Vec<_>>()
            );
        }
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting possible CPUs")?;
        for addr in rest {
            let values = PerCpuValues::try_from(vec![MODE_SRC; cpus]).context("building per-CPU values")?;
            self.ipv4
                .insert(u32::from_ne_bytes(addr.octets()), values, 0)
                .with_context(|| format!("adding {addr} to xdp-filter's IPv4 map"))?;
        }
        Ok(())
    }

    /// Where xdp-filter pinned its maps.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.path().join("xdp-filter")
    }

    /// The attached program, opened from its pin.
    pub fn program(&self) -> Result<Prog> {
        Prog::from_pin(&self.bpffs.path().join("xdp-filter/programs").join(&self.iface).join(PROGRAM))
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        if let Err(e) = Self::cli(self.ns, self.bpffs.path(), &["unload", &self.iface]) {
            eprintln!("limiter-bench: could not unload xdp-filter from {}: {e:#}", self.iface);
        }
    }
}
