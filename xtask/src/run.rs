//! `cargo xtask run`: set up, build the agent (release), then either run it in the foreground
//! with the given arguments, or run the built-in sandbox demo: a server namespace and two
//! client namespaces (a polite and a greedy HTTP client) joined by veth pairs, the agent
//! attached to both server-side veths, a small HTTP service, a bounded scenario (polite alone,
//! greedy joins, spoofed-source flood) watched live with `limiter-agent top`, and teardown.
//!
//! The demo touches only the namespaces and interfaces it creates. Its children run in their
//! own process groups, so Ctrl-C reaches only xtask, which stops them and tears down.

mod console;
mod live;
mod traffic;

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{setup, test, util};
use console::say;
use live::LiveView;
use traffic::{Client, Counts, HttpServer, Tally, Workers};

const SRV_NS: &str = "ld-srv";
const POLITE_NS: &str = "ld-polite";
const GREEDY_NS: &str = "ld-greedy";
/// Namespaces of earlier versions of the demo, removed if a run left them behind.
const OLD_NAMESPACES: [&str; 1] = ["ld-cli"];

/// One veth pair per client: (client netns, server-side ifname, client-side ifname, /24
/// prefix). The server is `.1`, the client `.2`.
const LINKS: [(&str, &str, &str, &str); 2] =
    [(POLITE_NS, "ld-srv-p", "ld-polite0", "10.200.1"), (GREEDY_NS, "ld-srv-g", "ld-greedy0", "10.200.2")];
/// Envoy listens here on every address of ld-srv: the port the demo policy shields in XDP.
const HTTP_PORT: u16 = 8080;
/// The demo HTTP service behind Envoy, on ld-srv's loopback (examples/envoy/demo-envoy.yaml).
const SERVICE_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 8081);
/// The agent's rate limit service, on ld-srv's loopback, which Envoy asks about every request.
const RLS_LISTEN: &str = "127.0.0.1:8089";
const ENVOY_CONFIG: &str = "examples/envoy/demo-envoy.yaml";
/// Envoy's admin endpoint in ld-srv (demo-envoy.yaml): its `/ready` says when Envoy serves.
const ENVOY_ADMIN: ([u8; 4], u16) = ([127, 0, 0, 1], 9901);
const DEMO_RATELIMIT: &str = "examples/envoy/demo-ratelimit.yaml";
const CONTROL_SOCKET: &str = "/run/limiter/demo.sock";

const POLITE_PER_S: u32 = 5;
const GREEDY_PER_S: u32 = 150;
/// hping3 flood: bounded count, one SYN per interval, from random (spoofed) sources.
const FLOOD_COUNT: &str = "6000";
const FLOOD_INTERVAL: &str = "u500";

const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Policy the built-in demo loads (relative to the workspace root).
    #[arg(long, value_name = "FILE", default_value = "examples/policies/demo.yaml")]
    pub demo_policy: PathBuf,

    /// Arguments for `limiter-agent run` (after `--`), e.g. `-- --iface eth0 --policy p.yaml`.
    /// Without them the built-in sandbox demo runs.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

pub fn cmd(args: &RunArgs) -> Result<()> {
    let demo_policy = if args.agent_args.is_empty() { Some(demo_preflight(&args.demo_policy)?) } else { None };

    setup::ensure()?;
    util::run(util::cargo()?.args(["build", "--release", "-p", "limiter-agent"]))
        .context("release build of limiter-agent failed: see the compiler errors above")?;
    let agent = util::target_dir()?.join("release/limiter-agent");
    if !agent.exists() {
        bail!("{} was not built: does limiter-agent still have a binary named `limiter-agent`?", agent.display());
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
        bail!("the demo creates network namespaces and attaches XDP: rerun as root (sudo -E cargo xtask run)");
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

fn demo(agent_bin: &Path, policy: &Path) -> Result<()> {
    util::install_ctrlc_flag()?;
    let started = Instant::now();
    // Declared first so it drops last: the agent and every thread in a namespace must be gone
    // before the namespaces are.
    let _sandbox = Sandbox::create()?;

    let ifaces: Vec<&str> = LINKS.iter().map(|l| l.1).collect();
    say!("demo: starting limiter-agent on {} in netns {SRV_NS}, policy {}", ifaces.join(" and "), policy.display());
    let mut agent_cmd = Command::new("ip");
    agent_cmd
        .args(["netns", "exec", SRV_NS, "sh", "-c"])
        // `ip netns exec` remounts /sys in a private mount namespace, hiding /sys/fs/bpf; give
        // the demo agent its own bpffs there, so its pins vanish with it and never mix with a
        // real agent's on the host.
        .arg(r#"grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf || exit 1; exec "$0" "$@""#)
        .arg(agent_bin)
        .arg("run");
    for iface in &ifaces {
        agent_cmd.args(["--iface", iface]);
    }
    let ratelimit = util::workspace_root()?.join(DEMO_RATELIMIT);
    agent_cmd
        .arg("--policy")
        .arg(policy)
        // The HTTP limit Envoy asks the agent's rate limit service about.
        .arg("--policy")
        .arg(&ratelimit)
        .args(["--rls-listen", RLS_LISTEN])
        // `top` shows the live numbers; the agent's own stats line would repeat them.
        .args(["--stats-interval", "30s", "--control-socket", CONTROL_SOCKET])
        // The demo's interfaces go with it: leave no shield pinned behind.
        .arg("--detach-on-exit");
    if std::env::var_os("RUST_LOG").is_none() {
        agent_cmd.env("RUST_LOG", "info");
    }
    let mut agent = Spawned::start(agent_cmd, "agent", Echo::Prefixed)?;
    let last_iface = LINKS[LINKS.len() - 1].1;
    // The agent logs `attached to IFACE in MODE mode`; an error line may also say "attached".
    let attached = |line: &str| {
        line.contains("attached to") && line.contains(last_iface) && !line.to_lowercase().contains("error")
    };
    agent.wait_for_line("attached", attached, ATTACH_TIMEOUT).context(
        "the agent did not attach: if it says `unrecognized subcommand 'run'` or similar, the \
         agent's `run` command is not there yet",
    )?;

    let mut workers = Workers::default();
    let served = Arc::new(AtomicU64::new(0));
    let listen: SocketAddr = SERVICE_ADDR.into();
    workers.spawn("http", SRV_NS, move || HttpServer::bind(listen), HttpServer { served: Arc::clone(&served) })?;
    say!("demo: HTTP service listening on {listen} in {SRV_NS}");
    let envoy_config = util::workspace_root()?.join(ENVOY_CONFIG);
    let mut envoy_cmd = Command::new("ip");
    envoy_cmd
        .args(["netns", "exec", SRV_NS])
        .arg(setup::envoy_bin()?)
        // Warnings and errors only: at info, Envoy's start alone prints over a hundred lines.
        .args(["--disable-hot-restart", "--log-level", "warn", "-c"])
        .arg(&envoy_config);
    let mut envoy = Spawned::start(envoy_cmd, "envoy", Echo::Prefixed)?;
    wait_for_envoy(&mut envoy)?;
    say!(
        "demo: Envoy listening on port {HTTP_PORT} in {SRV_NS}, in front of the service; its rate limit filter asks \
         the agent ({RLS_LISTEN}, {DEMO_RATELIMIT}: 10 requests a second per client) about every request"
    );

    wait_for_snapshot()?;
    let (polite, greedy) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    say!(
        "demo: live view below: each client's answers, and `limiter-agent top --socket {CONTROL_SOCKET}` (the \
         full view in another terminal), every second"
    );
    let view = Arc::new(LiveView::new(vec![("polite", Arc::clone(&polite)), ("greedy", Arc::clone(&greedy))]));
    let mut top_cmd = Command::new(agent_bin);
    top_cmd.args(["top", "--socket", CONTROL_SOCKET, "--interval", "1s"]);
    let top = Spawned::start(top_cmd, "top", Echo::Live(view))?;

    let server_of = |prefix: &str| -> Result<SocketAddr> {
        format!("{prefix}.1:{HTTP_PORT}").parse().context("demo server address")
    };
    let polite_client =
        Client { to: server_of(LINKS[0].3)?, per_second: POLITE_PER_S, max_in_flight: 10, tally: Arc::clone(&polite) };
    let greedy_client =
        Client { to: server_of(LINKS[1].3)?, per_second: GREEDY_PER_S, max_in_flight: 400, tally: Arc::clone(&greedy) };
    let mut phase = Phase::begin(&polite, &greedy)?;

    say!("demo: ━━ phase 1/3: the polite client ({}.2) alone, {POLITE_PER_S} requests/s for 5s", LINKS[0].3);
    workers.spawn("polite", POLITE_NS, || Ok(()), polite_client)?;
    sleep_interruptible(Duration::from_secs(5))?;
    phase = phase.report("phase 1/3: polite client alone", &polite, &greedy)?;
    say!(
        "demo:   (the connection rule counts SYNs only: the other packets of an admitted \
         connection pass as no_rule)"
    );

    say!("demo: ━━ phase 2/3: the greedy client ({}.2) joins, {GREEDY_PER_S} requests/s for 8s", LINKS[1].3);
    workers.spawn("greedy", GREEDY_NS, || Ok(()), greedy_client)?;
    sleep_interruptible(Duration::from_secs(8))?;
    workers.stop_one("greedy");
    phase = phase.report("phase 2/3: greedy client joins", &polite, &greedy)?;

    say!(
        "demo: ━━ phase 3/3: SYN flood from random spoofed sources ({FLOOD_COUNT} SYNs, hping3 \
         --rand-source in {GREEDY_NS}) while the polite client goes on"
    );
    say!(
        "demo:   (above the policy's synProxy threshold, XDP answers the port's SYNs with SYN cookies: the \
         polite client's handshakes complete through netfilter SYNPROXY, the spoofed ones never reach Envoy)"
    );
    let mut flood_cmd = Command::new("ip");
    flood_cmd
        .args(["netns", "exec", GREEDY_NS, "hping3", "-q", "-S", "-p"])
        .arg(HTTP_PORT.to_string())
        .args(["--rand-source", "-c", FLOOD_COUNT, "-i", FLOOD_INTERVAL])
        .arg(format!("{}.1", LINKS[1].3));
    let mut flood = Spawned::start(flood_cmd, "hping3", Echo::Prefixed)?;
    // hping3 exits non-zero when nothing answered, which is what a limiter may cause.
    let status = flood.wait(TRAFFIC_TIMEOUT)?;
    say!("demo: hping3 finished ({status})");
    sleep_interruptible(Duration::from_secs(1))?;
    workers.stop_one("polite");
    phase.report("phase 3/3: spoofed-source flood", &polite, &greedy)?;
    drop(top);
    console::end_live();

    let (p_ok, p_limited, p_failed) = polite.get();
    let (g_ok, g_limited, g_failed) = greedy.get();
    say!("demo: ━━ outcome");
    say!(
        "demo:   polite client: {} requests: {p_ok} answered 200, {p_limited} answered 429, {p_failed} cut",
        p_ok + p_limited + p_failed
    );
    say!(
        "demo:   greedy client: {} requests: {g_ok} answered 200, {g_limited} answered 429 by Envoy (over 10/s at \
         the rate limit service), {g_failed} cut in XDP (over its connection limit)",
        g_ok + g_limited + g_failed
    );
    let (_, limited_headers) = greedy.headers();
    if !limited_headers.is_empty() {
        say!("demo:   a 429 the greedy client got: {limited_headers}");
    }
    say!("demo:   the service answered {} requests in all", served.load(std::sync::atomic::Ordering::Relaxed));
    drop(workers);
    drop(envoy);
    say!("demo: stopping the agent (SIGINT)");
    let status = agent.stop(STOP_GRACE)?;
    say!(
        "demo: agent exited ({status}); removing the sandbox ({:.0}s since the sandbox was created)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits (bounded) until Envoy's admin endpoint says it is ready, or Envoy exits.
fn wait_for_envoy(envoy: &mut Spawned) -> Result<()> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        if let Some(status) = envoy.try_wait()? {
            envoy.join_readers();
            bail!("Envoy exited ({status}) before it was ready; its output is above");
        }
        if traffic::envoy_ready(SRV_NS, ENVOY_ADMIN.into())? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "Envoy was not ready within {}s (its admin /ready on {SRV_NS} {}:{}); its output is above",
                ATTACH_TIMEOUT.as_secs(),
                std::net::Ipv4Addr::from(ENVOY_ADMIN.0),
                ENVOY_ADMIN.1
            );
        }
        sleep_interruptible(Duration::from_millis(200))?;
    }
}

/// Waits (bounded) until the demo agent's control socket answers.
fn wait_for_snapshot() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match snapshot() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("the agent's control socket {CONTROL_SOCKET} does not answer")));
            }
            Err(_) => sleep_interruptible(Duration::from_millis(200))?,
        }
    }
}

/// One snapshot from the demo agent's control socket (see limiter-agent's `control` module).
fn snapshot() -> Result<serde_json::Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(CONTROL_SOCKET)
        .with_context(|| format!("cannot connect to {CONTROL_SOCKET}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"snapshot\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    serde_json::from_str(&text).with_context(|| format!("{CONTROL_SOCKET} answered `{}`", text.trim()))
}

/// Counters at the start of a phase, to report what the phase added.
struct Phase {
    at: Instant,
    /// (verdict, reason) -> packets.
    reasons: Vec<(String, String, u64)>,
    /// rule -> (passed, dropped) packets.
    rules: Vec<(String, u64, u64)>,
    polite: Counts,
    greedy: Counts,
}

impl Phase {
    fn begin(polite: &Tally, greedy: &Tally) -> Result<Self> {
        let snap = snapshot()?;
        let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_default();
        let list = |k: &str| snap[k].as_array().cloned().unwrap_or_default();
        Ok(Self {
            at: Instant::now(),
            reasons: list("reasons").iter().map(|r| (s(r, "verdict"), s(r, "reason"), n(r, "packets"))).collect(),
            rules: list("rules")
                .iter()
                .map(|r| (s(r, "name"), n(r, "passed_packets"), n(r, "dropped_packets")))
                .collect(),
            polite: polite.get(),
            greedy: greedy.get(),
        })
    }

    /// Prints what passed and dropped, and why, since `self`; returns the next phase's start.
    fn report(self, title: &str, polite: &Tally, greedy: &Tally) -> Result<Self> {
        let now = Self::begin(polite, greedy)?;
        let secs = now.at.duration_since(self.at).as_secs_f64();
        let delta = |verdict: &str| -> (u64, Vec<String>) {
            let mut total = 0;
            let mut parts = Vec::new();
            for ((v, reason, after), (_, _, before)) in now.reasons.iter().zip(&self.reasons) {
                let d = after.saturating_sub(*before);
                if v == verdict && d > 0 {
                    total += d;
                    parts.push(format!("{reason} {d}"));
                }
            }
            (total, parts)
        };
        let (passed, passed_why) = delta("pass");
        let (dropped, dropped_why) = delta("drop");
        say!("demo: ── {title}: {secs:.0}s");
        say!(
            "demo:   passed {passed} packets ({}), dropped {dropped} packets ({})",
            join(&passed_why),
            join(&dropped_why)
        );
        for (name, p, d) in &now.rules {
            let (bp, bd) = self.rules.iter().find(|r| &r.0 == name).map_or((0, 0), |r| (r.1, r.2));
            say!("demo:   rule {name}: passed {} dropped {}", p.saturating_sub(bp), d.saturating_sub(bd));
        }
        let client = |label: &str, tally: &Tally, after: Counts, before: Counts| {
            let ok = after.0 - before.0;
            let limited = after.1 - before.1;
            let failed = after.2 - before.2;
            if ok + limited + failed > 0 {
                say!(
                    "demo:   {label} client: {} requests: {ok} × 200, {limited} × 429 (Envoy, from the rate limit \
                     service), {failed} cut (connection dropped in XDP)",
                    ok + limited + failed
                );
                let (ok_headers, limited_headers) = tally.headers();
                if ok > 0 && !ok_headers.is_empty() {
                    say!("demo:     latest 200: {ok_headers}");
                }
                if limited > 0 && !limited_headers.is_empty() {
                    say!("demo:     latest 429: {limited_headers}");
                }
            }
        };
        client("polite", polite, now.polite, self.polite);
        client("greedy", greedy, now.greedy, self.greedy);
        Ok(now)
    }
}

fn join(parts: &[String]) -> String {
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
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

/// The demo namespaces; dropping it deletes them (and with them the veth pairs).
struct Sandbox {
    created: Vec<&'static str>,
}

impl Sandbox {
    fn create() -> Result<Self> {
        for ns in OLD_NAMESPACES.into_iter().chain([SRV_NS, POLITE_NS, GREEDY_NS]) {
            if netns_exists(ns)? {
                say!("demo: removing leftover netns {ns} from an earlier run");
                ip(&["netns", "del", ns]).with_context(|| {
                    format!("cannot delete leftover netns {ns}: stop what still runs in it (ip netns pids {ns})")
                })?;
            }
        }
        let mut sandbox = Self { created: Vec::new() };
        for ns in [SRV_NS, POLITE_NS, GREEDY_NS] {
            ip(&["netns", "add", ns]).with_context(|| format!("cannot create netns {ns}: are you root?"))?;
            sandbox.created.push(ns);
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (cli_ns, srv_if, cli_if, prefix) in LINKS {
            // Created inside the namespaces: no interface of the host is ever touched.
            ip(&["-n", SRV_NS, "link", "add", srv_if, "type", "veth", "peer", "name", cli_if, "netns", cli_ns])
                .context("cannot create a veth pair: does the kernel have CONFIG_VETH?")?;
            for (ns, dev, host) in [(SRV_NS, srv_if, 1), (cli_ns, cli_if, 2)] {
                ip(&["-n", ns, "addr", "add", &format!("{prefix}.{host}/24"), "dev", dev])?;
                // Full checksums on the wire, as the integration tests do; without ethtool
                // the stack copes with partial ones.
                let mut ethtool = Command::new("ip");
                ethtool
                    .args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "gro", "off"])
                    .stdin(Stdio::null())
                    .process_group(0);
                let _ = util::output(&mut ethtool);
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
            // The policy's SYN proxy answers SYNs with XDP_TX: a veth delivers those frames at
            // once only to a peer that runs XDP itself (a NIC has no such need), so the client
            // side gets xdp-filter with no rules, which passes everything. Its pins go to a
            // bpffs private to this one command; the attached program stays with the veth.
            let mut pass = Command::new("ip");
            pass.args(["netns", "exec", cli_ns, "sh", "-c"])
                .arg(format!("mount -t bpf bpf /sys/fs/bpf && xdp-filter load --mode native {cli_if}"))
                .stdin(Stdio::null())
                .process_group(0);
            util::output(&mut pass).with_context(|| format!("xdp-filter load on {cli_if} (the xdp-tools package)"))?;
            say!("demo: {SRV_NS}/{srv_if} ({prefix}.1) <-> {cli_ns}/{cli_if} ({prefix}.2)");
        }
        Ok(sandbox)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            match ip(&["netns", "del", ns]) {
                Ok(()) => say!("demo: deleted netns {ns}"),
                Err(e) => {
                    say!("demo: could not delete netns {ns}: {e:#}; run `ip netns del {ns}`")
                }
            }
        }
    }
}

/// Where a child's output lines go, besides the channel callers wait on.
#[derive(Clone)]
enum Echo {
    /// Printed as narration, prefixed with the child's name.
    Prefixed,
    /// Each line (`limiter-agent top`'s summary) redraws the live block.
    Live(Arc<LiveView>),
}

/// A child in its own process group whose stdout and stderr are streamed to the terminal
/// (see [`Echo`]), and also sent over a channel so callers can wait for a line.
/// Dropping it stops the child (SIGINT, then SIGKILL).
struct Spawned {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Spawned {
    fn start(mut cmd: Command, name: &'static str, echo: Echo) -> Result<Self> {
        let shown = util::display(&cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child =
            cmd.spawn().with_context(|| format!("cannot start `{shown}`: is it installed (cargo xtask setup)?"))?;
        let (tx, lines) = mpsc::channel();
        let mut readers = Vec::new();
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let tx = tx.clone();
            let echo = echo.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    match &echo {
                        Echo::Prefixed => say!("  {name:>6} | {line}"),
                        Echo::Live(view) => view.update(&line),
                    }
                    // The receiver may be gone during teardown; the line was printed anyway.
                    let _ = tx.send(line);
                }
            }));
        }
        Ok(Self { name, child, lines, readers, status: None })
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits until a line of output satisfies `ready` (`needle` names it in errors).
    fn wait_for_line(&mut self, needle: &str, ready: impl Fn(&str) -> bool, timeout: Duration) -> Result<()> {
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
                        bail!("{} exited ({status}) before it printed `{needle}`; its output is above", self.name);
                    }
                    if self.readers.iter().all(JoinHandle::is_finished) {
                        // Output closed but still running: keep polling its status only.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        bail!("{} printed no `{needle}` within {}s; its output is above", self.name, timeout.as_secs())
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
                bail!("{} still running after {}s; stopping it", self.name, timeout.as_secs());
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
        say!("{}: no exit {}s after SIGINT; killing it", self.name, grace.as_secs());
        self.child.kill().with_context(|| format!("cannot kill {}", self.name))?;
        let status = self.child.wait().with_context(|| format!("cannot wait for {}", self.name))?;
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
            say!("demo: could not stop {} (pid {}): {e:#}", self.name, self.child.id());
        }
    }
}
