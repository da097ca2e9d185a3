//! `limiter-agent top` against a running agent: the agent binary shields a veth in a test
//! namespace and serves its control socket; a client floods past a per-source limit; `top
//! --once --json` must show the drops by reason and by rule, the flooding source among the
//! top sources, and the source table within its capacity. An agent serving only the rate
//! limit service (no `--iface`) opens the socket too, and `top` shows its answers by rule and
//! code, its refused calls, and the stats line counts them. Without an agent, `top` must say
//! so and exit non-zero.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{PinDir, TempDir, agent_binary},
    netns::{ChildGuard, Netns, Topology},
    rawsock::udp_socket,
    require_root,
};
use serde_json::Value;

const UDP_PORT: u16 = 9000;

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
    // A pin directory that does not exist: these tests read agents through their socket only.
    Command::new(agent_binary())
        .args(["top", "--once", "--json", "--interval", "500ms", "--socket"])
        .arg(socket)
        .arg("--pin-dir")
        .arg(socket.with_file_name("no-pins"))
        .output()
        .expect("run limiter-agent top")
}

/// Runs `top --once --json` until a snapshot satisfies `done` (the agent publishes a fresh one
/// each second), at most 10 s; returns the last snapshot, which the caller's asserts then judge.
fn top_json_until(socket: &Path, done: impl Fn(&Value) -> bool) -> Value {
    let mut json = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = top(socket);
        assert!(out.status.success(), "top failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "--once --json prints one line: {text}");
        json = serde_json::from_str(&text).unwrap();
        if done(&json) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("top --once --json: {json}");
    json
}

/// Starts the agent command with its stderr lines echoed and sent on a channel.
fn spawn_agent(mut cmd: std::process::Command) -> (ChildGuard, std::sync::mpsc::Receiver<String>) {
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
    (agent, lines)
}

#[test]
fn top_shows_drops_by_reason_rule_and_source_from_a_running_agent() {
    require_root();
    let topo = Topology::new("top", 1).unwrap();
    let dir = TempDir::new("run");
    let policy = dir.path("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let socket = dir.path("agent.sock");
    let pins = PinDir::new("top");
    let pin_arg = pins.arg();

    let cmd = topo.server.command(&[
        agent_binary().to_str().unwrap(),
        "run",
        "--pin-dir",
        &pin_arg,
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
    let (mut agent, lines) = spawn_agent(cmd);
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
    let json = top_json_until(&socket, |json| json["rules"][0]["dropped_packets"].as_u64() == Some(45));

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

const L7_POLICY: &str = "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: top-rls
spec:
  rateLimit:
    local:
      rules:
        - name: per-client
          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]
          count: Requests
          kernelGuard: Off
          limit: {requests: 1, unit: Hour}
";

/// `ShouldRateLimit` calls to the agent's rate limit service on loopback in `ns`, as Envoy
/// would send them (`generic_key` + `remote_address`); each answer's overall code, or the gRPC
/// error code of a refused call.
fn should_rate_limit(ns: &Netns, calls: &[(&str, &str)]) -> Vec<Result<i32, tonic::Code>> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    use envoy_types::pb::envoy::service::ratelimit::v3::{
        RateLimitRequest, rate_limit_service_client::RateLimitServiceClient,
    };
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut rpc = RateLimitServiceClient::connect("http://127.0.0.1:8081").await.expect("connect to the RLS");
            let mut answers = Vec::new();
            for (domain, client) in calls {
                let entry = |key: &str, value: &str| Entry { key: key.into(), value: value.into() };
                let req = RateLimitRequest {
                    domain: (*domain).into(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![entry("generic_key", "top-rls/per-client"), entry("remote_address", client)],
                        ..Default::default()
                    }],
                    hits_addend: 0,
                };
                let answer = rpc.should_rate_limit(req).await;
                answers.push(answer.map(|r| r.into_inner().overall_code).map_err(|s| s.code()));
            }
            answers
        })
    })
}

/// The sum of `<key> N` over the agent's `stats: ... rls: ...` lines seen so far.
fn stats_sum(lines: &[String], key: &str) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.split_once("rls: ").map(|(_, rls)| rls))
        .filter_map(|rls| {
            let rest = rls.split(key).nth(1)?;
            rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn top_shows_the_rate_limit_service_of_an_agent_without_xdp() {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    require_root();
    let ns = Netns::new("toprls").unwrap();
    let dir = TempDir::new("rls");
    let policy = dir.path("policy.yaml");
    std::fs::write(&policy, L7_POLICY).unwrap();
    let socket = dir.path("agent.sock");
    let cmd = ns.command(&[
        agent_binary().to_str().unwrap(),
        "run",
        "--policy",
        policy.to_str().unwrap(),
        "--stats-interval",
        "200ms",
        "--control-socket",
        socket.to_str().unwrap(),
    ]);
    let (mut agent, lines) = spawn_agent(cmd);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.contains("serving the rate limit service only")) {
        let left = deadline.saturating_duration_since(Instant::now());
        seen.push(lines.recv_timeout(left).expect("the agent starts its rate limit service within 30s"));
    }
    assert!(socket.exists(), "control socket {} opened without --iface", socket.display());

    // 1 request an hour per client: OK, then 2 denials; a domain without rules is OK; an empty
    // domain is refused.
    let answers = should_rate_limit(&ns, &[("limiter", "10.1.2.3"); 3]);
    assert_eq!(answers, [Ok(OK), Ok(OVER_LIMIT), Ok(OVER_LIMIT)]);
    assert_eq!(should_rate_limit(&ns, &[("elsewhere", "10.1.2.3")]), [Ok(OK)]);
    assert_eq!(should_rate_limit(&ns, &[("", "10.1.2.3")]), [Err(tonic::Code::InvalidArgument)]);

    let json = top_json_until(&socket, |json| {
        let decided: u64 =
            json["rls"]["decisions"].as_array().map_or(0, |d| d.iter().filter_map(|d| d["descriptors"].as_u64()).sum());
        decided == 4 && json["rls"]["request_errors"].as_array().is_some_and(|e| !e.is_empty())
    });

    let rls = &json["rls"];
    assert_eq!(rls["serving"], true, "{json}");
    assert_eq!(rls["listen"], "127.0.0.1:8081", "{json}");
    assert_eq!(rls["backend"], "local", "{json}");
    assert!(rls["redis"].is_null(), "{json}");
    assert_eq!(rls["l7_rules"], 1, "{json}");
    assert_eq!(rls["l7_max_keys"], 100_000, "{json}");
    assert_eq!(rls["escalation"], false, "{json}");
    let decisions: Vec<(String, String, String, u64)> = rls["decisions"]
        .as_array()
        .expect("rls.decisions")
        .iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
            (s("domain"), s("rule"), s("code"), d["descriptors"].as_u64().unwrap_or_default())
        })
        .collect();
    let row = |domain: &str, rule: &str, code: &str, n| (domain.to_owned(), rule.to_owned(), code.to_owned(), n);
    assert_eq!(
        decisions,
        [
            row("_unknown_", "", "OK", 1),
            row("limiter", "top-rls/per-client", "OK", 1),
            row("limiter", "top-rls/per-client", "OVER_LIMIT", 2),
        ],
        "{json}"
    );
    assert_eq!(rls["request_errors"][0]["reason"], "invalid_argument", "{json}");
    assert_eq!(rls["request_errors"][0]["requests"], 1, "{json}");
    assert!(json["interfaces"].as_array().is_some_and(Vec::is_empty), "no XDP program: {json}");
    assert!(json["reasons"].as_array().is_some_and(Vec::is_empty), "no kernel counters: {json}");
    assert!(json["rates"]["rls"]["rules"].is_array(), "rates present: {json}");

    // The text view says the same.
    let out = Command::new(agent_binary())
        .args(["top", "--once", "--interval", "200ms", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no XDP program (rate limit service only)"), "{text}");
    assert!(text.contains("rate limit service on 127.0.0.1:8081 | backend local | 1 L7 rules"), "{text}");
    let row = text.lines().find(|l| l.contains("top-rls/per-client")).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(row.split_whitespace().nth(3), Some("2"), "total over limit: {row}");

    // The stats lines count the same calls between them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats_sum(&seen, "over_limit") < 2 || stats_sum(&seen, "errors") < 1 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    assert_eq!(stats_sum(&seen, "ok"), 2, "stats lines: {seen:#?}");
    assert_eq!(stats_sum(&seen, "over_limit"), 2, "stats lines: {seen:#?}");
    assert_eq!(stats_sum(&seen, "errors"), 1, "stats lines: {seen:#?}");

    // SAFETY: signalling our own child (`ip netns exec` execs the agent).
    assert_eq!(unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = agent.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert!(!socket.exists(), "socket removed on clean shutdown");
}

#[test]
fn top_without_an_agent_says_so_and_exits_non_zero() {
    let dir = TempDir::new("missing");
    let socket = dir.path("nobody.sock");
    let out = top(&socket);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is limiter-agent running?"), "{stderr}");
    assert!(stderr.contains(&format!("it listens on {}", socket.display())), "{stderr}");
    assert!(out.stdout.is_empty());
}
