//! Network namespaces, veth pairs and child processes as RAII guards.
//!
//! Everything a test creates lives in namespaces named `lt-<tag>-<pid>-<counter>`; the test
//! runner deletes leftovers with the `lt-` prefix, and dropping a [`Netns`] deletes it (and with
//! it every interface inside). The only commands that touch the host namespace are
//! `ip netns add/del/list`; links are created with `ip -n NS link add`, i.e. from inside a
//! namespace this module created, so host interfaces are never touched.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run_checked;

/// Prefix of every namespace this harness creates; the test runner deletes leftovers by it.
pub const NETNS_PREFIX: &str = "lt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
///
/// Holds an open fd to the namespace so [`Netns::run`] can `setns` into it without a path
/// lookup. Sockets and BPF links created inside keep the namespace alive after the name is
/// deleted, until they are closed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    fd: File,
}

impl Netns {
    /// Creates `lt-<tag>-<pid>-<counter>` with `lo` up. `tag` is reduced to `[A-Za-z0-9_-]` and
    /// shortened, so any string is accepted.
    pub fn new(tag: &str) -> Result<Netns> {
        let tag: String =
            tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(24).collect();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{tag}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name} (are you root?)"))?;
        let path = PathBuf::from(format!("/run/netns/{name}"));
        let fd = match File::open(&path) {
            Ok(fd) => fd,
            Err(e) => {
                delete_netns(&name);
                bail!("opening {}: {e}", path.display());
            }
        };
        let ns = Netns { name, path, fd };
        // From here on, Drop deletes the namespace if anything fails.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: open it to `setns` or hand it to tools that take a netns path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and returns its result.
    ///
    /// `setns(CLONE_NEWNET)` switches only the calling thread, so the caller's namespace never
    /// changes. Sockets (and BPF links) created inside `f` stay bound to this namespace and can
    /// be used from any thread afterwards. A panic in `f` is propagated to the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd.as_raw_fd();
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: `fd` is an open namespace fd owned by `self`, which outlives the
                // scope; setns only changes this thread's network namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into {name}: {}", std::io::Error::last_os_error());
                }
                f()
            });
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A `Command` for `ip netns exec <name> args...`, for callers that want to set up
    /// stdio themselves.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs `args` inside the namespace and fails (with its stderr) unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        run_checked(&mut self.command(args))
    }

    /// Runs `args` inside the namespace and returns its output whatever the exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args).output().with_context(|| format!("running {args:?} in {}", self.name))
    }

    /// Runs `ip -n <name> args...` (the namespace-local iproute2), failing on non-zero exit.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Starts `args` inside the namespace in the background (stdin, stdout and stderr null);
    /// the guard kills and reaps it on drop.
    pub fn spawn(&self, args: &[&str]) -> Result<ChildGuard> {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        ChildGuard::spawn(&mut cmd)
    }

    /// Writes a sysctl inside this namespace, e.g. `("net.ipv4.conf.all.rp_filter", "0")`.
    ///
    /// Written through `/proc/sys` from a thread inside the namespace: `/proc/sys/net` shows
    /// the namespace of the task that opens it, so no `sysctl` binary is needed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value)).with_context(|| format!("setting {key}={value} in {}", self.name))
    }

    /// Index and MAC address of interface `ifname` inside this namespace.
    pub fn link_info(&self, ifname: &str) -> Result<(u32, [u8; 6])> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ifindex = text
            .split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no ifindex in `ip link` output: {text}"))?;
        let mac = text
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .and_then(parse_mac)
            .with_context(|| format!("no MAC in `ip link` output: {text}"))?;
        Ok((ifindex, mac))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) {
    if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", name])) {
        eprintln!("limiter-tests: could not delete network namespace {name}: {e:#}");
    }
}

/// Names of the network namespaces `ip netns list` shows (all of them, not only ours).
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_checked(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A child process that is killed (SIGKILL) and reaped when the guard drops, so a failing
/// test never leaves it running. Derefs to [`Child`].
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` under a guard.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(ChildGuard { child })
    }

    /// Waits at most `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // kill fails only if the child was already reaped; wait reaps it either way.
        let _ = self.child.kill();
        if let Err(e) = self.child.wait() {
            eprintln!("limiter-tests: could not reap child {}: {e}", self.child.id());
        }
    }
}

/// One end of a veth pair: where it lives and how to address it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Name of the namespace the interface lives in.
    pub netns: String,
    /// Interface name.
    pub name: String,
    /// Interface index inside its namespace (what XDP attach and `sockaddr_ll` take).
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Assigned addresses with prefix lengths, in the order given.
    pub addrs: Vec<(IpAddr, u8)>,
}

impl Endpoint {
    /// The first IPv4 address assigned to the interface.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addrs.iter().find_map(|(a, _)| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// The first IPv6 address assigned to the interface (not the kernel's link-local one).
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.addrs.iter().find_map(|(a, _)| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }
}

/// A veth pair between two namespaces (or within one). It has no drop of its own: the
/// interfaces disappear with their namespaces.
#[derive(Clone, Debug)]
pub struct VethPair {
    pub a: Endpoint,
    pub b: Endpoint,
}

impl VethPair {
    /// Creates `a_name` in `a` and its peer `b_name` in `b`, assigns the addresses
    /// (`"10.1.0.1/24"`, `"fd00:1::1/64"`; IPv6 ones with `nodad` so they are usable at once),
    /// brings both up, turns off DAD and `rp_filter` in both namespaces (so spoofed sources
    /// reach sockets), and turns off checksum offloads and GRO with `ethtool` if it is installed.
    ///
    /// Without `ethtool` the offloads stay on: frames sent through [`crate::rawsock`] carry
    /// complete checksums, so only locally generated socket traffic is affected (the peer may see
    /// partial checksums), which the stack accepts.
    pub fn new(
        a: &Netns,
        a_name: &str,
        a_addrs: &[&str],
        b: &Netns,
        b_name: &str,
        b_addrs: &[&str],
    ) -> Result<VethPair> {
        for ns in [a, b] {
            for (key, value) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ] {
                ns.sysctl(key, value)?;
            }
        }
        a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name()])
            .with_context(|| format!("creating veth {a_name} ({}) <-> {b_name} ({})", a.name(), b.name()))?;
        Ok(VethPair { a: setup_end(a, a_name, a_addrs)?, b: setup_end(b, b_name, b_addrs)? })
    }
}

fn setup_end(ns: &Netns, ifname: &str, addrs: &[&str]) -> Result<Endpoint> {
    ns.sysctl(&format!("net.ipv4.conf.{ifname}.rp_filter"), "0")?;
    ns.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0")?;
    let mut parsed = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let (ip, prefix) = parse_cidr(addr)?;
        let mut args = vec!["addr", "add", addr, "dev", ifname];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        ns.ip(&args)?;
        parsed.push((ip, prefix));
    }
    if crate::has_tool("ethtool") {
        ns.exec(&["ethtool", "-K", ifname, "tx", "off", "rx", "off", "gro", "off"])?;
    }
    ns.ip(&["link", "set", ifname, "up"])?;
    let (ifindex, mac) = ns.link_info(ifname)?;
    Ok(Endpoint { netns: ns.name().to_owned(), name: ifname.to_owned(), ifindex, mac, addrs: parsed })
}

/// Parses `"10.1.0.1/24"` or `"fd00::1/64"`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = s.split_once('/').with_context(|| format!("{s}: expected ADDR/PREFIX"))?;
    let ip: IpAddr = ip.parse().with_context(|| format!("{s}: bad address"))?;
    let prefix: u8 = prefix.parse().with_context(|| format!("{s}: bad prefix"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        bail!("{s}: prefix longer than {max}");
    }
    Ok((ip, prefix))
}

/// A client namespace joined to the server namespace by its own veth pair.
#[derive(Debug)]
pub struct ClientLink {
    /// The client's namespace.
    pub ns: Netns,
    /// Server side of the pair: `s<i>`, `10.9.<i>.1/24`, `fd00:9:<i>::1/64`, in the server ns.
    pub server: Endpoint,
    /// Client side of the pair: `c<i>`, `10.9.<i>.2/24`, `fd00:9:<i>::2/64`, in `ns`.
    pub client: Endpoint,
}

/// One server namespace and N client namespaces, client `i` linked to the server by
/// `c<i>` <-> `s<i>` on `10.9.<i>.0/24` and `fd00:9:<i>::/64`. Dropping it deletes every
/// namespace, and with them the veths.
#[derive(Debug)]
pub struct Topology {
    /// The server namespace, where the XDP program under test attaches (to `s<i>`).
    pub server: Netns,
    pub clients: Vec<ClientLink>,
}

impl Topology {
    /// Builds the topology with `clients` client namespaces (at most 256).
    pub fn new(tag: &str, clients: usize) -> Result<Topology> {
        if clients > 256 {
            bail!("at most 256 clients, asked for {clients}");
        }
        let server = Netns::new(&format!("{tag}-srv"))?;
        let mut links = Vec::with_capacity(clients);
        for i in 0..clients {
            let ns = Netns::new(&format!("{tag}-c{i}"))?;
            let pair = VethPair::new(
                &server,
                &format!("s{i}"),
                &[&format!("10.9.{i}.1/24"), &format!("fd00:9:{i}::1/64")],
                &ns,
                &format!("c{i}"),
                &[&format!("10.9.{i}.2/24"), &format!("fd00:9:{i}::2/64")],
            )?;
            links.push(ClientLink { ns, server: pair.a, client: pair.b });
        }
        Ok(Topology { server, clients: links })
    }

    /// Client link `i`; panics if there is no such client.
    pub fn client(&self, i: usize) -> &ClientLink {
        &self.clients[i]
    }
}
