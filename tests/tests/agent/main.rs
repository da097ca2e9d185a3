//! The `limiter-agent` binary, end to end: started in a test namespace on a policy file,
//! shielding a veth, reloading on SIGHUP (a broken policy leaves the running one in force),
//! leaving the shield in force on SIGTERM until `detach`; `pinning`: the shield across kills,
//! restarts and upgrades.

// One file per topic; the harness below (agent binary, policy files, traffic) is shared by
// all of them.
mod global;
mod global_sources;
mod l7;
mod pinning;
mod shares;
mod synproxy;

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{PinDir, TempDir, agent_binary},
    netns::{ChildGuard, Topology},
    rawsock::udp_socket,
    require_root,
};

const UDP_PORT: u16 = 9000;
const MARKER: &[u8] = b"limiter-agent-test";

fn policy(requests: u32, unit: &str) -> String {
    policy_with(requests, unit, "Distinct")
}

/// `source_type` Distinct: a bucket per source; Exact: one bucket shared by all sources.
fn policy_with(requests: u32, unit: &str, source_type: &str) -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: agent-test
spec:
  targetRefs:
    - {{kind: Port, port: {UDP_PORT}, protocol: UDP}}
  rateLimit:
    local:
      rules:
        - name: udp-limit
          clientSelectors: [{{sourceCIDR: {{type: {source_type}, value: 0.0.0.0/0}}}}]
          count: Packets
          limit: {{requests: {requests}, unit: {unit}}}
"
    )
}

/// The agent process with its stderr lines on a channel.
struct Agent {
    child: ChildGuard,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// The agent's own bpffs, unless the test gave a `--pin-dir` (dropped after `child`).
    _pins: Option<PinDir>,
}

impl Agent {
    /// Runs the agent in the server namespace shielding `s0`.
    fn start(topo: &Topology, policy: &Path, extra: &[&str]) -> Agent {
        Agent::start_on(topo, "s0", policy, extra)
    }

    /// Runs the agent in the server namespace shielding `iface`, pinning into a bpffs of its
    /// own (removed with it) unless `extra` names a `--pin-dir`.
    fn start_on(topo: &Topology, iface: &str, policy: &Path, extra: &[&str]) -> Agent {
        let pins = (!extra.contains(&"--pin-dir")).then(|| PinDir::new("agent"));
        let pin_arg = pins.as_ref().map(PinDir::arg);
        let mut args = vec![
            agent_binary().to_str().unwrap(),
            "run",
            "--iface",
            iface,
            "--policy",
            policy.to_str().unwrap(),
            "--xdp-mode",
            "native",
            "--stats-interval",
            "200ms",
        ];
        if let Some(arg) = pin_arg.as_deref() {
            args.extend_from_slice(&["--pin-dir", arg]);
        }
        args.extend_from_slice(extra);
        let mut cmd = topo.server.command(&args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).env("RUST_LOG", "info");
        let mut child = ChildGuard::spawn(&mut cmd).unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent { child, lines, seen: Vec::new(), _pins: pins }
    }

    /// Waits (at most `timeout`) for a log line containing every one of `parts`.
    fn wait_for(&mut self, parts: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    panic!("no agent log line with {parts:?} within {timeout:?}; saw:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }
}

fn send_and_count(topo: &Topology, server: &UdpSocket, n: usize) -> usize {
    send_from_client_and_count(topo, 0, server, n)
}

fn xdp_attached(topo: &Topology) -> bool {
    let out = topo.server.ip(&["link", "show", "s0"]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

#[test]
fn agent_enforces_reloads_on_sighup_keeps_the_last_good_policy_and_leaves_the_shield_on_sigterm_until_detach() {
    require_root();
    let topo = Topology::new("agent", 1).unwrap();
    let dir = TempDir::new("reload");
    let file = dir.write("policy.yaml", &policy(5, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();

    let pins = PinDir::new("reload");
    // Watching is off: this test drives reloads by SIGHUP alone.
    let mut agent = Agent::start(&topo, dir.root(), &["--no-watch", "--pin-dir", &pins.arg()]);
    agent.wait_for(&["attached to s0 in native mode"], Duration::from_secs(30));
    assert!(xdp_attached(&topo));
    assert_eq!(send_and_count(&topo, &server, 20), 5);
    agent.wait_for(&["stats:", "dropped", "source_port_bucket="], Duration::from_secs(5));

    // A broken policy is rejected whole; the running one stays in force.
    dir.write("policy.yaml", &policy(5, "Minuets"));
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for(&["reload rejected"], Duration::from_secs(5));
    assert!(line.contains("previous policy stays in force"), "{line}");
    agent.wait_for(&[file.to_str().unwrap(), "Minuets"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 20), 0, "the old rule (and its empty bucket) still apply");
    let metrics: SocketAddr = ([127, 0, 0, 1], 9091).into();
    let text = scrape(&topo, metrics);
    assert!(text.contains("limiter_policy_reloads_total{outcome=\"rejected\"} 1"), "{text}");
    assert!(!text.contains("outcome=\"applied\""), "{text}");

    // A good policy with a new limit takes effect.
    dir.write("policy.yaml", &policy(50, "Hour"));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 20), 20);
    let text = scrape(&topo, metrics);
    assert!(text.contains("limiter_policy_reloads_total{outcome=\"applied\"} 1"), "{text}");

    // SIGTERM stops the agent and leaves the shield in force; `detach` removes it.
    agent.signal(libc::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    while let Ok(l) = agent.lines.recv_timeout(Duration::from_millis(200)) {
        agent.seen.push(l);
    }
    assert!(agent.seen.iter().any(|l| l.contains("leaving the shield in force")), "{:#?}", agent.seen);
    assert!(xdp_attached(&topo), "XDP stays attached after SIGTERM");
    assert_eq!(send_and_count(&topo, &server, 20), 20, "the 50/hour rule still applies, with no agent");
    assert_eq!(send_and_count(&topo, &server, 20), 10, "...and its bucket empties: 50 in all");
    let out = Command::new(agent_binary()).args(["detach", "--pin-dir", &pins.arg()]).output().unwrap();
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("detached s0"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!xdp_attached(&topo), "XDP is detached by `detach`");
    assert!(pins.entries().is_empty(), "nothing left pinned: {:?}", pins.entries());
    assert_eq!(send_and_count(&topo, &server, 20), 20, "traffic flows unlimited after detach");
}

#[test]
fn agent_refuses_to_start_on_a_broken_policy_and_attaches_nothing() {
    require_root();
    let topo = Topology::new("agentbad", 1).unwrap();
    let dir = TempDir::new("bad");
    let file = dir.write("policy.yaml", &policy(0, "Second"));
    let mut agent = Agent::start(&topo, &file, &[]);
    let status = agent.child.wait_timeout(Duration::from_secs(30)).unwrap().expect("agent exits");
    assert!(!status.success());
    let mut all = Vec::new();
    while let Ok(l) = agent.lines.recv_timeout(Duration::from_millis(200)) {
        all.push(l);
    }
    let text = all.join("\n");
    assert!(text.contains(&format!("{}:", file.display())), "error names the file:\n{text}");
    assert!(text.contains("limit.requests"), "error names the field:\n{text}");
    assert!(!xdp_attached(&topo));
}

#[test]
fn check_exits_zero_on_the_examples_and_non_zero_on_broken_policies() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let ok = Command::new(agent_binary()).arg("check").arg(&examples).output().unwrap();
    assert!(ok.status.success(), "examples: {}", String::from_utf8_lossy(&ok.stderr));
    let dir = TempDir::new("check");
    let file = dir.write("bad.yaml", &policy(5, "Minuets"));
    let bad = Command::new(agent_binary()).arg("check").arg(&file).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("spec.rateLimit.local.rules[0].limit.unit"), "{stderr}");
    assert!(stderr.contains("Minuets"), "{stderr}");
}

/// Receives marker frames on the server interface in a thread, timestamping each arrival.
fn record_arrivals(topo: &Topology, stop: &std::sync::atomic::AtomicBool) -> Vec<Instant> {
    let rx = limiter_tests::rawsock::RawReceiver::open(&topo.server, "s0").unwrap();
    let mut arrivals = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some(frame) = rx.recv_timeout(Duration::from_millis(50)).unwrap()
            && limiter_tests::packet::is_udp_to(&frame.data, UDP_PORT, MARKER)
        {
            arrivals.push(Instant::now());
        }
    }
    arrivals
}

#[test]
fn watched_policy_rewritten_under_live_traffic_takes_effect_without_an_unlimited_window() {
    use std::sync::atomic::{AtomicBool, Ordering};
    require_root();
    let topo = Topology::new("live", 1).unwrap();
    let dir = TempDir::new("live");
    // One shared bucket (Exact selector): 200/s, later 400/s.
    dir.write("policy.yaml", &policy_with(200, "Second", "Exact"));
    let mut agent = Agent::start(&topo, dir.root(), &["--watch-interval", "100ms"]);
    agent.wait_for(&["attached to s0"], Duration::from_secs(30));

    let c = topo.client(0);
    let to: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
    let sock = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
    let stop = AtomicBool::new(false);
    const OFFERED_PER_MS: usize = 4; // 4000/s: 10x to 20x the limits
    let (arrivals, start, reloaded_at, rejected_at) = std::thread::scope(|s| {
        let receiver = s.spawn(|| record_arrivals(&topo, &stop));
        let start = Instant::now();
        let sock = &sock;
        let sender = s.spawn(move || {
            let mut step = Instant::now();
            while start.elapsed() < Duration::from_secs(6) {
                for _ in 0..OFFERED_PER_MS {
                    sock.send_to(MARKER, to).unwrap();
                }
                step += Duration::from_millis(1);
                if let Some(wait) = step.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        std::thread::sleep(Duration::from_secs(2));
        dir.write("policy.yaml", &policy_with(400, "Second", "Exact"));
        agent.wait_for(&["policy files changed: policy reloaded"], Duration::from_secs(5));
        let reloaded_at = start.elapsed();
        std::thread::sleep(Duration::from_millis(1500));
        dir.write("policy.yaml", &policy_with(400, "Minuets", "Exact"));
        agent.wait_for(&["reload rejected"], Duration::from_secs(5));
        let rejected_at = start.elapsed();
        sender.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        (receiver.join().unwrap(), start, reloaded_at, rejected_at)
    });

    // Arrivals per 250 ms bin.
    let bin = Duration::from_millis(250);
    let mut bins = vec![0usize; 26];
    for t in &arrivals {
        let i = (t.duration_since(start).as_millis() / bin.as_millis()) as usize;
        if i < bins.len() {
            bins[i] += 1;
        }
    }
    eprintln!("live reload: bins {bins:?}, reloaded at {reloaded_at:?}, rejected at {rejected_at:?}");
    let offered_per_bin = OFFERED_PER_MS * 250;
    let reload_bin = (reloaded_at.as_millis() / 250) as usize;
    for (i, &n) in bins.iter().enumerate().take(24).skip(1) {
        // The new rule starts with a full bucket (400) once: that is the most a bin can see.
        let ceiling = if i + 1 >= reload_bin { 100 + 400 + 50 } else { 50 + 20 };
        assert!(n <= ceiling, "bin {i}: {n} admitted, at most {ceiling} allowed: a window without the limit");
        assert!(n < offered_per_bin / 2, "bin {i}: {n} of {offered_per_bin} offered: unlimited");
        // Never wrongly dropped: every bin admits about its limit's share.
        let floor = if i > reload_bin { 100 - 25 } else { 50 - 15 };
        assert!(
            n >= floor,
            "bin {i}: only {n} admitted, the limit allows about {}",
            if i > reload_bin { 100 } else { 50 }
        );
    }
    // After the rejected rewrite, the 400/s limit is still the one enforced.
    let after_reject = (rejected_at.as_millis() / 250) as usize + 1;
    for &n in bins.iter().take(23).skip(after_reject) {
        assert!((75..=125).contains(&n), "after the rejected policy: {n} per 250 ms, expected about 100");
    }
    agent.signal(libc::SIGTERM);
    assert!(agent.child.wait_timeout(Duration::from_secs(10)).unwrap().is_some_and(|s| s.success()));
}
/// `GET /metrics` from the agent's endpoint in the server namespace.
fn scrape(topo: &Topology, addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    topo.server.run(|| {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect to metrics");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: agent\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    })
}

fn send_from_client_and_count(topo: &Topology, client: usize, server: &UdpSocket, n: usize) -> usize {
    let c = topo.client(client);
    let to: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
    let sock = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
    for _ in 0..n {
        sock.send_to(MARKER, to).unwrap();
    }
    let mut buf = [0u8; 256];
    let mut got = 0;
    server.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    while let Ok(len) = server.recv(&mut buf) {
        got += usize::from(&buf[..len] == MARKER);
    }
    got
}
