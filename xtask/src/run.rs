//! `cargo xtask run`: set up, build the agent (release), then either run it in the foreground
//! with the given arguments, or run the built-in sandbox demo: two network namespaces joined
//! by a veth pair, the agent attached inside one, bounded bursts from the other.
//!
//! The demo touches only the namespaces and interfaces it creates. Its children run in their
//! own process groups, so Ctrl-C reaches only xtask, which stops them and tears down.

use std::io::{BufRead as _, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{setup, test, util};

const SRV_NS: &str = "ld-srv";
const CLI_NS: &str = "ld-cli";
const SRV_IF: &str = "ld-srv0";
const CLI_IF: &str = "ld-cli0";
const SRV_V4: &str = "10.200.0.1";
const CLI_V4: &str = "10.200.0.2";
const SRV_V6: &str = "fd00:200::1";
const CLI_V6: &str = "fd00:200::2";

const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy the built-in demo loads (relative to the workspace root).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "examples/policies/demo.yaml"
    )]
    pub demo_policy: PathBuf,

    /// Arguments for `limiter-agent run` (after `--`), e.g. `-- --iface eth0 --policy p.yaml`.
    /// Without them the built-in sandbox demo runs.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

pub fn cmd(args: &RunArgs) -> Result<()> {
    let demo_policy = if args.agent_args.is_empty() {
        Some(demo_preflight(&args.demo_policy)?)
    } else {
        None
    };

    setup::ensure()?;
    util::run(util::cargo()?.args(["build", "--release", "-p", "limiter-agent"]))
        .context("release build of limiter-agent failed: see the compiler errors above")?;
    let agent = util::target_dir()?.join("release/limiter-agent");
    if !agent.exists() {
        bail!(
            "{} was not built: does limiter-agent still have a binary named `limiter-agent`?",
            agent.display()
        );
    }

    match demo_policy {
        None => foreground(&agent, &args.agent_args),
        Some(policy) => demo(&agent, &policy),
    }
}

/// Runs `limiter-agent run ARGS` attached to the terminal; Ctrl-C goes to the agent itself.
fn foreground(agent: &Path, agent_args: &[String]) -> Result<()> {
    // The agent is in our process group and gets Ctrl-C directly; xtask just outlives it to
    // report how it ended.
    util::install_ctrlc_flag()?;
    let mut cmd = Command::new(agent);
    cmd.arg("run").args(agent_args);
    util::run(&mut cmd).context("limiter-agent failed: see its output above")
}

/// Checks what the demo needs before the (long) build.
fn demo_preflight(policy: &Path) -> Result<PathBuf> {
    if !util::is_root()? {
        bail!(
            "the demo creates network namespaces and attaches XDP: rerun as root (sudo -E cargo xtask run)"
        );
    }
    let policy = util::workspace_root()?.join(policy);
    if !policy.exists() {
        bail!(
            "demo policy {} does not exist: it is part of examples/policies/ (pass another with \
             `cargo xtask run --demo-policy FILE`)",
            policy.display()
        );
    }
    Ok(policy)
}

fn demo(agent: &Path, policy: &Path) -> Result<()> {
    util::install_ctrlc_flag()?;
    // Declared first so it drops last: the agent must be gone before its namespace is.
    let _sandbox = Sandbox::create()?;

    println!("demo: starting limiter-agent on {SRV_IF} in netns {SRV_NS}");
    let mut agent_cmd = Command::new("ip");
    agent_cmd
        .args(["netns", "exec", SRV_NS, "sh", "-c"])
        // `ip netns exec` remounts /sys in a private mount namespace, hiding /sys/fs/bpf; give
        // the demo agent its own bpffs there, so its pins vanish with it and never mix with a
        // real agent's on the host.
        .arg(r#"grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || exit 1; exec "$0" "$@""#)
        .arg(agent)
        .args(["run", "--iface", SRV_IF, "--policy"])
        .arg(policy)
        .args(["--stats-interval", "1s"]);
    if std::env::var_os("RUST_LOG").is_none() {
        agent_cmd.env("RUST_LOG", "info");
    }
    let mut agent = Spawned::start(agent_cmd, "agent")?;
    // The agent logs `attached to IFACE in MODE mode`; an error line may also say "attached".
    let attached = |line: &str| {
        line.contains("attached") && line.contains(SRV_IF) && !line.to_lowercase().contains("error")
    };
    agent
        .wait_for_line("attached", attached, ATTACH_TIMEOUT)
        .context(
            "the agent did not attach: if it says `unrecognized subcommand 'run'` or similar, the \
         agent's `run` command is not there yet",
        )?;

    // examples/policies/demo.yaml allows the client's own address (10.200.0.2), so the bursts
    // come from other ones: one spoofed source (held by the per-source bucket) and random
    // sources (which no per-source bucket sees; the port's aggregate bucket holds them).
    let bursts: [(&str, &[&str]); 2] = [
        (
            "UDP burst: 3000 packets to port 9000 from 10.200.0.3, one per 200 us",
            &[
                "--udp",
                "-p",
                "9000",
                "-a",
                "10.200.0.3",
                "-c",
                "3000",
                "-i",
                "u200",
            ],
        ),
        (
            "SYN burst: 2000 SYNs to port 8080 from random sources, one per 250 us",
            &[
                "-S",
                "-p",
                "8080",
                "--rand-source",
                "-c",
                "2000",
                "-i",
                "u250",
            ],
        ),
    ];
    for (what, flags) in bursts {
        println!("demo: {what}, from {CLI_NS}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", CLI_NS, "hping3", "-q"])
            .args(flags)
            .arg(SRV_V4);
        let mut hping = Spawned::start(cmd, "hping3")?;
        let status = hping.wait(TRAFFIC_TIMEOUT)?;
        // hping3 exits non-zero when nothing answered, which is what a limiter may cause.
        println!("demo: hping3 finished ({status})");
    }

    println!("demo: letting the agent report for a few seconds");
    sleep_interruptible(Duration::from_millis(2500))?;
    println!("demo: stopping the agent (SIGINT)");
    let status = agent.stop(STOP_GRACE)?;
    println!("demo: agent exited ({status}); removing the sandbox");
    Ok(())
}

fn sleep_interruptible(total: Duration) -> Result<()> {
    let deadline = Instant::now() + total;
    while Instant::now() < deadline {
        if util::interrupted() {
            return Err(util::Interrupted.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `ip ARGS` in its own process group (so Ctrl-C does not kill teardown halfway).
fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args).stdin(Stdio::null()).process_group(0);
    util::output(&mut cmd).map(|_| ())
}

fn netns_exists(name: &str) -> Result<bool> {
    let list = util::output(Command::new("ip").args(["netns", "list"]).process_group(0))
        .context("cannot list network namespaces: is iproute2 installed (cargo xtask setup)?")?;
    Ok(test::netns_with_prefix(&list, name).contains(&name))
}

/// The two demo namespaces; dropping it deletes them (and with them the veth pair).
struct Sandbox {
    created: Vec<&'static str>,
}

impl Sandbox {
    fn create() -> Result<Self> {
        for ns in [SRV_NS, CLI_NS] {
            if netns_exists(ns)? {
                println!("demo: removing leftover netns {ns} from an earlier run");
                ip(&["netns", "del", ns]).with_context(|| {
                    format!("cannot delete leftover netns {ns}: stop what still runs in it (ip netns pids {ns})")
                })?;
            }
        }
        let mut sandbox = Self {
            created: Vec::new(),
        };
        for ns in [SRV_NS, CLI_NS] {
            ip(&["netns", "add", ns])
                .with_context(|| format!("cannot create netns {ns}: are you root?"))?;
            sandbox.created.push(ns);
        }
        // Created inside the namespaces: no interface of the host is ever touched.
        ip(&[
            "-n", SRV_NS, "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF, "netns",
            CLI_NS,
        ])
        .context("cannot create the veth pair: does the kernel have CONFIG_VETH?")?;
        for (ns, dev, v4, v6) in [
            (SRV_NS, SRV_IF, SRV_V4, SRV_V6),
            (CLI_NS, CLI_IF, CLI_V4, CLI_V6),
        ] {
            let v4 = format!("{v4}/24");
            let v6 = format!("{v6}/64");
            ip(&["-n", ns, "addr", "add", &v4, "dev", dev])?;
            ip(&["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        println!(
            "demo: sandbox ready: {SRV_NS}/{SRV_IF} ({SRV_V4}, {SRV_V6}) <-> {CLI_NS}/{CLI_IF} ({CLI_V4}, {CLI_V6})"
        );
        Ok(sandbox)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            match ip(&["netns", "del", ns]) {
                Ok(()) => println!("demo: deleted netns {ns}"),
                Err(e) => {
                    eprintln!("demo: could not delete netns {ns}: {e:#}; run `ip netns del {ns}`")
                }
            }
        }
    }
}

/// A child in its own process group whose stdout and stderr are streamed to the terminal,
/// prefixed with its name, and also sent over a channel so callers can wait for a line.
/// Dropping it stops the child (SIGINT, then SIGKILL).
struct Spawned {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Spawned {
    fn start(mut cmd: Command, name: &'static str) -> Result<Self> {
        let shown = util::display(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| {
            format!("cannot start `{shown}`: is it installed (cargo xtask setup)?")
        })?;
        let (tx, lines) = mpsc::channel();
        let mut readers = Vec::new();
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    println!("  {name:>6} | {line}");
                    // The receiver may be gone during teardown; the line was printed anyway.
                    let _ = tx.send(line);
                }
            }));
        }
        Ok(Self {
            name,
            child,
            lines,
            readers,
            status: None,
        })
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits until a line of output satisfies `ready` (`needle` names it in errors).
    fn wait_for_line(
        &mut self,
        needle: &str,
        ready: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if util::interrupted() {
                return Err(util::Interrupted.into());
            }
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if ready(&line) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    if let Some(status) = self.try_wait()? {
                        self.join_readers();
                        bail!(
                            "{} exited ({status}) before it printed `{needle}`; its output is above",
                            self.name
                        );
                    }
                    if self.readers.iter().all(JoinHandle::is_finished) {
                        // Output closed but still running: keep polling its status only.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        bail!(
            "{} printed no `{needle}` within {}s; its output is above",
            self.name,
            timeout.as_secs()
        )
    }

    /// Waits for the child to exit on its own.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.join_readers();
                return Ok(status);
            }
            if util::interrupted() {
                return Err(util::Interrupted.into());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {}s; stopping it",
                    self.name,
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT, wait up to `grace`, then SIGKILL. Returns how it exited.
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            self.join_readers();
            return Ok(status);
        }
        util::send_signal(self.child.id(), libc::SIGINT)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                self.join_readers();
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{}: no exit {}s after SIGINT; killing it",
            self.name,
            grace.as_secs()
        );
        self.child
            .kill()
            .with_context(|| format!("cannot kill {}", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("cannot wait for {}", self.name))?;
        self.status = Some(status);
        self.join_readers();
        Ok(status)
    }

    /// Lets the reader threads print the last lines (a final summary), without hanging if a
    /// grandchild still holds the pipes.
    fn join_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !self.readers.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!(
                "demo: could not stop {} (pid {}): {e:#}",
                self.name,
                self.child.id()
            );
        }
    }
}
