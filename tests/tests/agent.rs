//! The `limiter-agent` binary, end to end: started in a test namespace on a policy file,
//! shielding a veth, reloading on SIGHUP (a broken policy leaves the running one in force),
//! and detaching cleanly on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        mpsc::{Receiver, RecvTimeoutError, channel},
    },
    time::{Duration, Instant},
};

use limiter_tests::{
    netns::{ChildGuard, Topology},
    rawsock::udp_socket,
    require_root,
};

const UDP_PORT: u16 = 9000;
const MARKER: &[u8] = b"limiter-agent-test";

/// Builds the agent binary once per test run (cargo does nothing if it is current) and
/// returns its path.
fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "limiter-agent", "--bin", "limiter-agent"])
            .status()
            .expect("run cargo build for limiter-agent");
        assert!(status.success(), "building limiter-agent failed");
        // target/<profile>/deps/agent-<hash> -> target/<profile>/limiter-agent
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe.parent().and_then(Path::parent).expect("target dir").join("limiter-agent");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A temporary policy directory, removed on drop.
struct PolicyDir(PathBuf);

impl PolicyDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("limiter-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        // Write then rename, as a config management tool (or the ConfigMap swap) would.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for PolicyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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
}

impl Agent {
    fn start(topo: &Topology, policy: &Path, extra: &[&str]) -> Agent {
        let mut args = vec![
            agent_binary().to_str().unwrap(),
            "run",
            "--iface",
            "s0",
            "--policy",
            policy.to_str().unwrap(),
            "--xdp-mode",
            "native",
            "--stats-interval",
            "200ms",
        ];
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
        Agent { child, lines, seen: Vec::new() }
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
fn agent_enforces_reloads_on_sighup_keeps_the_last_good_policy_and_detaches_on_sigterm() {
    require_root();
    let topo = Topology::new("agent", 1).unwrap();
    let dir = PolicyDir::new("reload");
    let file = dir.write("policy.yaml", &policy(5, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();

    // Watching is off: this test drives reloads by SIGHUP alone.
    let mut agent = Agent::start(&topo, &dir.0, &["--no-watch"]);
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

    agent.signal(libc::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert!(
        agent.seen.iter().any(|l| l.contains("SIGTERM: detaching")) || {
            // drain what is left
            while let Ok(l) = agent.lines.recv_timeout(Duration::from_millis(200)) {
                agent.seen.push(l);
            }
            agent.seen.iter().any(|l| l.contains("detached from s0"))
        }
    );
    assert!(!xdp_attached(&topo), "XDP is detached after SIGTERM");
    assert_eq!(send_and_count(&topo, &server, 20), 20, "traffic flows unlimited after detach");
}

#[test]
fn agent_refuses_to_start_on_a_broken_policy_and_attaches_nothing() {
    require_root();
    let topo = Topology::new("agentbad", 1).unwrap();
    let dir = PolicyDir::new("bad");
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
    let dir = PolicyDir::new("check");
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
    let dir = PolicyDir::new("live");
    // One shared bucket (Exact selector): 200/s, later 400/s.
    dir.write("policy.yaml", &policy_with(200, "Second", "Exact"));
    let mut agent = Agent::start(&topo, &dir.0, &["--watch-interval", "100ms"]);
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

/// The escalation policy: one L7 rule per client address (1 request an hour, no kernel guard,
/// so only the block list can drop in the kernel), a penalty of 3 denials within 10 s for
/// `block`, and client 1's network allow-listed.
fn escalation_policy(block: &str) -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: esc
spec:
  allow: [10.9.1.0/24]
  penalty: {{overLimitEvents: 3, within: 10s, block: {block}}}
  rateLimit:
    local:
      rules:
        - name: per-client
          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]
          count: Requests
          kernelGuard: Off
          limit: {{requests: 1, unit: Hour}}
"
    )
}

/// Asks the agent's rate limit service (in the server namespace, on loopback) `n` times about
/// a client at `client`, as Envoy would with a `generic_key` and a `remote_address` action.
/// Returns each answer's overall code.
fn should_rate_limit(topo: &Topology, rls: SocketAddr, client: Ipv4Addr, n: usize) -> Vec<i32> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    use envoy_types::pb::envoy::service::ratelimit::v3::{
        RateLimitRequest, rate_limit_service_client::RateLimitServiceClient,
    };
    // Sockets made on this namespace thread stay in the server namespace.
    topo.server.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut client_rpc =
                RateLimitServiceClient::connect(format!("http://{rls}")).await.expect("connect to RLS");
            let mut codes = Vec::with_capacity(n);
            for _ in 0..n {
                let entry = |key: &str, value: String| Entry { key: key.into(), value };
                let req = RateLimitRequest {
                    domain: "limiter".into(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![
                            entry("generic_key", "esc/per-client".into()),
                            entry("remote_address", client.to_string()),
                        ],
                        ..Default::default()
                    }],
                    hits_addend: 0,
                };
                codes.push(client_rpc.should_rate_limit(req).await.expect("ShouldRateLimit").into_inner().overall_code);
            }
            codes
        })
    })
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

/// Escalation from L7 to XDP: after 3 denials at the rate limit service, the client's packets
/// are dropped by the kernel's block list for the block time, then admitted again; an
/// allow-listed client denied as often is never blocked.
#[test]
fn sources_denied_at_l7_are_blocked_in_xdp_for_the_penalty_then_admitted() {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    require_root();
    let topo = Topology::new("escal", 2).unwrap();
    let dir = PolicyDir::new("escalation");
    let file = dir.write("policy.yaml", &escalation_policy("6s"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let rls: SocketAddr = ([127, 0, 0, 1], 18081).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], 19091).into();
    let mut agent = Agent::start(
        &topo,
        &file,
        &["--iface", "s1", "--rls-listen", "127.0.0.1:18081", "--metrics-listen", "127.0.0.1:19091", "--no-watch"],
    );
    agent.wait_for(&["attached to s1"], Duration::from_secs(30));
    let (blocked_client, allowed_client) =
        (topo.client(0).client.ipv4().unwrap(), topo.client(1).client.ipv4().unwrap());
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 20), 20, "nothing blocks client 0 yet");

    // 1 allowed, then denials: the third denial within 10 s blocks the source.
    assert_eq!(should_rate_limit(&topo, rls, blocked_client, 3), [OK, OVER_LIMIT, OVER_LIMIT]);
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 20), 20, "two denials are below the penalty");
    assert_eq!(should_rate_limit(&topo, rls, blocked_client, 1), [OVER_LIMIT]);
    let line = agent.wait_for(&["escalation:", &blocked_client.to_string(), "blocked in XDP"], Duration::from_secs(5));
    let blocked_at = Instant::now();
    assert!(line.contains("3 denials within 10s (policy esc)"), "{line}");
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 20), 0, "blocked in the kernel");
    // `top` shows the source in the block list (its snapshot refreshes about once a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let blocked_now = loop {
        let out = Command::new(agent_binary())
            .args(["top", "--once", "--json", "--socket", "/run/limiter/agent.sock"])
            .output()
            .expect("run limiter-agent top");
        let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n = snap["rls"]["blocked_now"].as_u64();
        if n == Some(1) || Instant::now() >= deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(blocked_now, Some(1), "top --once --json rls.blocked_now");
    let text = scrape(&topo, metrics);
    assert!(text.contains("limiter_escalations_total{policy=\"esc\"} 1"), "{text}");
    assert!(
        text.contains("limiter_rls_decisions_total{domain=\"limiter\",rule=\"esc/per-client\",code=\"OVER_LIMIT\"} 3"),
        "{text}"
    );

    // The allow-listed client is denied at L7 as often, and never blocked.
    assert_eq!(
        should_rate_limit(&topo, rls, allowed_client, 6),
        [OK, OVER_LIMIT, OVER_LIMIT, OVER_LIMIT, OVER_LIMIT, OVER_LIMIT]
    );
    assert_eq!(send_from_client_and_count(&topo, 1, &server, 20), 20, "allow-listed sources are never blocked");

    // The block expires in the kernel 6 s after the order (waiting here is not a timing
    // assertion: the check is that packets flow again once the entry's expiry has passed).
    let expiry = blocked_at + Duration::from_secs(6) + Duration::from_millis(500);
    if let Some(left) = expiry.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 20), 20, "admitted again after the block");
    let blocked = agent.seen.iter().filter(|l| l.contains("blocked in XDP")).count();
    assert_eq!(blocked, 1, "one block order: {:#?}", agent.seen);

    agent.signal(libc::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
}

/// One policy with a kernel rule (UDP packets) and an L7 rule (requests per client).
fn two_layer_policy(udp_per_hour: u32, requests_per_hour: u32, unit: &str) -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: esc
spec:
  targetRefs:
    - {{kind: Port, port: {UDP_PORT}, protocol: UDP}}
  rateLimit:
    local:
      rules:
        - name: udp-limit
          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]
          count: Packets
          limit: {{requests: {udp_per_hour}, unit: Hour}}
        - name: per-client
          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]
          count: Requests
          kernelGuard: Off
          limit: {{requests: {requests_per_hour}, unit: {unit}}}
"
    )
}

/// A reload replaces the kernel rules and the rate limit service's rules together; a broken
/// policy changes neither; a rewrite that only touches the L7 rule keeps the kernel buckets.
#[test]
fn reload_replaces_kernel_and_l7_rules_together_and_a_broken_set_changes_neither() {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    require_root();
    let topo = Topology::new("reload2", 1).unwrap();
    let dir = PolicyDir::new("two-layers");
    let file = dir.write("policy.yaml", &two_layer_policy(5, 2, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let rls: SocketAddr = ([127, 0, 0, 1], 18081).into();
    let mut agent = Agent::start(&topo, &file, &["--rls-listen", "127.0.0.1:18081", "--no-watch"]);
    agent.wait_for(&["attached to s0"], Duration::from_secs(30));
    let client = topo.client(0).client.ipv4().unwrap();
    assert_eq!(send_and_count(&topo, &server, 20), 5);
    assert_eq!(should_rate_limit(&topo, rls, client, 3), [OK, OK, OVER_LIMIT]);

    // Broken: rejected whole; both layers keep their rules and their state.
    dir.write("policy.yaml", &two_layer_policy(50, 50, "Minuets"));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["reload rejected"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 20), 0, "the kernel rule and its empty bucket stay");
    assert_eq!(should_rate_limit(&topo, rls, client, 1), [OVER_LIMIT], "the L7 rule and its counter stay");

    // Both layers change at once.
    dir.write("policy.yaml", &two_layer_policy(50, 4, "Hour"));
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert!(line.contains("kernel rules") && line.contains("L7 rules"), "{line}");
    assert_eq!(send_and_count(&topo, &server, 20), 20, "the new kernel limit");
    // A changed rule starts with a fresh counter: 4 more.
    assert_eq!(should_rate_limit(&topo, rls, client, 5), [OK, OK, OK, OK, OVER_LIMIT]);

    // Only the L7 rule changes: the kernel plan is untouched (its buckets keep their state).
    dir.write("policy.yaml", &two_layer_policy(50, 6, "Hour"));
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert!(!line.contains("kernel rules") && line.contains("1 L7 rules"), "{line}");
    assert_eq!(send_and_count(&topo, &server, 40), 30, "the kernel bucket kept its 20 spent tokens");
    assert_eq!(should_rate_limit(&topo, rls, client, 7), [OK, OK, OK, OK, OK, OK, OVER_LIMIT]);

    agent.signal(libc::SIGTERM);
    assert!(agent.child.wait_timeout(Duration::from_secs(10)).unwrap().is_some_and(|s| s.success()));
}

/// One shared bucket (Exact selector) of `requests` packets per hour under `rateLimit.global`.
fn global_policy(requests: u32) -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: global-test
spec:
  targetRefs:
    - {{kind: Port, port: {UDP_PORT}, protocol: UDP}}
  rateLimit:
    global:
      rules:
        - name: udp-global
          clientSelectors: [{{sourceCIDR: {{type: Exact, value: 0.0.0.0/0}}}}]
          count: Packets
          limit: {{requests: {requests}, unit: Hour}}
"
    )
}

/// Members of the node set, sorted.
fn members(redis: &limiter_tests::redis::RedisServer) -> Vec<String> {
    let mut m = redis.command(&["ZRANGE", "limiter:nodes", "0", "-1"]).unwrap().as_strings();
    m.sort();
    m
}

/// A global kernel rule with `--rls-backend redis`: while a second node is a member of the
/// Redis node set, the agent admits its half; a reload applies the half of the new limit; once
/// the other node leaves, the full limit. At SIGTERM the agent leaves the set.
#[test]
fn global_kernel_rule_is_shared_across_the_nodes_in_redis() {
    require_root();
    let topo = Topology::new("share", 1).unwrap();
    // Inside the server namespace, where the agent runs, on its loopback.
    let redis = limiter_tests::redis::RedisServer::start_in(&topo.server).unwrap();
    // The other node, scored an hour ahead on Redis's clock: live for the whole test without
    // a heartbeat of its own.
    let time = redis.command(&["TIME"]).unwrap().as_strings();
    let ahead = time[0].parse::<u64>().unwrap() * 1000 + 3_600_000;
    redis.command(&["ZADD", "limiter:nodes", &ahead.to_string(), "other-node"]).unwrap();

    let dir = PolicyDir::new("share");
    dir.write("policy.yaml", &global_policy(20));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let url = redis.url();
    let args = ["--no-watch", "--rls-backend", "redis", "--redis-url", &url, "--node-id", "this-node"];
    let mut agent = Agent::start(&topo, &dir.0, &[&args[..], &["--global-heartbeat", "200ms"]].concat());
    agent.wait_for(&["sync: joined limiter:nodes as this-node", "2 nodes live"], Duration::from_secs(30));
    agent.wait_for(&["attached to s0"], Duration::from_secs(30));
    assert_eq!(members(&redis), ["other-node", "this-node"]);
    assert_eq!(send_and_count(&topo, &server, 30), 10, "this node's share: 20/2");

    // A reload applies the share of the new limit.
    dir.write("policy.yaml", &global_policy(40));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["policy reloaded", "1 global rule(s) shared across 2 nodes"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 30), 20, "this node's share: 40/2");

    // The other node leaves: the agent notices at a heartbeat and takes the whole limit.
    redis.command(&["ZREM", "limiter:nodes", "other-node"]).unwrap();
    agent.wait_for(&["sync: 1 node live (was 2)", "shared across 1 node"], Duration::from_secs(10));
    assert_eq!(send_and_count(&topo, &server, 60), 40, "the whole limit on the only node");

    agent.signal(libc::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert!(members(&redis).is_empty(), "the agent left the node set at shutdown");
}
