//! `limiter-agent top` against a running agent: the agent binary shields a veth in a test
//! namespace and serves its control socket; a client floods past a per-source limit; `top
//! --once --json` must show the drops by reason and by rule, the flooding source among the
//! top sources, and the source table within its capacity. Without an agent, `top` must say
//! so and exit non-zero.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use limiter_tests::{
    netns::{ChildGuard, Topology},
    rawsock::udp_socket,
    require_root,
};
use serde_json::Value;

const UDP_PORT: u16 = 9000;

/// Builds the agent binary once per test run and returns its path.
fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "limiter-agent", "--bin", "limiter-agent"])
            .status()
            .expect("run cargo build for limiter-agent");
        assert!(status.success(), "building limiter-agent failed");
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe.parent().and_then(Path::parent).expect("target dir").join("limiter-agent");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// A temporary directory for the policy and the socket, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("limiter-top-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POLICY: &str = "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: top-test
spec:
  targetRefs:
    - {kind: Port, port: 9000, protocol: UDP}
  rateLimit:
    local:
      rules:
        - name: per-source
          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]
          count: Packets
          limit: {requests: 5, unit: Hour}
";

fn top(socket: &Path) -> std::process::Output {
    Command::new(agent_binary())
        .args(["top", "--once", "--json", "--interval", "500ms", "--socket"])
        .arg(socket)
        .output()
        .expect("run limiter-agent top")
}

#[test]
fn top_shows_drops_by_reason_rule_and_source_from_a_running_agent() {
    require_root();
    let topo = Topology::new("top", 1).unwrap();
    let dir = TempDir::new("run");
    let policy = dir.0.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let socket = dir.0.join("agent.sock");

    let mut cmd = topo.server.command(&[
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
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).env("RUST_LOG", "info");
    let mut agent = ChildGuard::spawn(&mut cmd).unwrap();
    let stderr = agent.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("agent attaches to s0 within 30s");
        if line.contains("attached to s0") {
            break;
        }
    }
    let mode = std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "control socket {} exists with mode 0600", socket.display());

    // 5 packets an hour per source: of 50, 45 are dropped by the per-source bucket.
    let c = topo.client(0);
    let source = c.client.ipv4().unwrap();
    let to: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
    let sock: UdpSocket = udp_socket(&c.ns, (source, 0).into()).unwrap();
    for _ in 0..50 {
        sock.send_to(b"limiter-top-test", to).unwrap();
    }
    // The agent publishes a fresh snapshot each second; wait for one that has the drops.
    let mut json = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = top(&socket);
        assert!(out.status.success(), "top failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "--once --json prints one line: {text}");
        json = serde_json::from_str(&text).unwrap();
        if json["rules"][0]["dropped_packets"].as_u64() == Some(45) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("top --once --json: {json}");

    let reasons = json["reasons"].as_array().expect("reasons");
    let by_reason = |verdict: &str, name: &str| {
        reasons
            .iter()
            .find(|r| r["verdict"] == verdict && r["reason"] == name)
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("no {verdict} reason {name} in {json}"))
    };
    // The per-source rule with a port target keys buckets by (source, port).
    assert_eq!(by_reason("drop", "source_port_bucket"), 45, "{json}");
    assert!(by_reason("pass", "conforming") >= 5, "{json}");

    let rule = &json["rules"][0];
    assert_eq!(rule["name"], "top-test/per-source");
    assert_eq!(rule["dropped_packets"], 45);
    assert_eq!(rule["passed_packets"], 5);

    let tops = json["top_sources"].as_array().expect("top_sources");
    let ours = tops.iter().find(|s| s["source"] == source.to_string());
    let ours = ours.unwrap_or_else(|| panic!("{source} is not among the top sources: {tops:?}"));
    assert_eq!(ours["dropped_packets"], 45);

    let tracked = json["sources"]["tracked"].as_u64().expect("sources.tracked");
    let capacity = json["sources"]["capacity"].as_u64().expect("sources.capacity");
    assert!(capacity > 0 && tracked <= capacity, "tracked {tracked} of {capacity}");
    assert_eq!(json["interfaces"][0]["name"], "s0");
    assert_eq!(json["interfaces"][0]["mode"], "native");
    assert_eq!(json["policy"]["rules"], 1);
    assert_eq!(json["policy"]["last_reload_ok"], true);
    assert!(json["rates"]["interval_s"].is_number(), "rates present: {json}");

    // The text view says the same.
    let text = Command::new(agent_binary())
        .args(["top", "--once", "--interval", "200ms", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("source_port_bucket") || text.contains("top-test/per-source"), "{text}");
    assert!(text.contains(&source.to_string()), "{text}");

    // SIGTERM: the agent exits cleanly and removes its socket.
    // SAFETY: signalling our own child (`ip netns exec` execs the agent).
    assert_eq!(unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = agent.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert!(!socket.exists(), "socket removed on clean shutdown");
}

#[test]
fn top_without_an_agent_says_so_and_exits_non_zero() {
    let dir = TempDir::new("missing");
    let socket = dir.0.join("nobody.sock");
    let out = top(&socket);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is limiter-agent running?"), "{stderr}");
    assert!(stderr.contains(&format!("it listens on {}", socket.display())), "{stderr}");
    assert!(out.stdout.is_empty());
}
