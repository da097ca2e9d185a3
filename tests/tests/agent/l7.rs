//! The agent's rate limit service next to its XDP program: sources denied at L7 escalate to
//! the kernel's block list, and a reload replaces the rules of both layers together.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use limiter_tests::{netns::Topology, rawsock::udp_socket, require_root};

use crate::{Agent, TempDir, UDP_PORT, agent_binary, scrape, send_and_count, send_from_client_and_count};

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
/// a client at `client` under `rule`, as Envoy would with a `generic_key` and a
/// `remote_address` action. Returns each answer's overall code.
pub(super) fn should_rate_limit(topo: &Topology, rls: SocketAddr, rule: &str, client: Ipv4Addr, n: usize) -> Vec<i32> {
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
                        entries: vec![entry("generic_key", rule.into()), entry("remote_address", client.to_string())],
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
/// Escalation from L7 to XDP: after 3 denials at the rate limit service, the client's packets
/// are dropped by the kernel's block list for the block time, then admitted again; an
/// allow-listed client denied as often is never blocked.
#[test]
fn sources_denied_at_l7_are_blocked_in_xdp_for_the_penalty_then_admitted() {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    require_root();
    let topo = Topology::new("escal", 2).unwrap();
    let dir = TempDir::new("escalation");
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
    assert_eq!(should_rate_limit(&topo, rls, "esc/per-client", blocked_client, 3), [OK, OVER_LIMIT, OVER_LIMIT]);
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 20), 20, "two denials are below the penalty");
    assert_eq!(should_rate_limit(&topo, rls, "esc/per-client", blocked_client, 1), [OVER_LIMIT]);
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
        should_rate_limit(&topo, rls, "esc/per-client", allowed_client, 6),
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
    let dir = TempDir::new("two-layers");
    let file = dir.write("policy.yaml", &two_layer_policy(5, 2, "Hour"));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let rls: SocketAddr = ([127, 0, 0, 1], 18081).into();
    let mut agent = Agent::start(&topo, &file, &["--rls-listen", "127.0.0.1:18081", "--no-watch"]);
    agent.wait_for(&["attached to s0"], Duration::from_secs(30));
    let client = topo.client(0).client.ipv4().unwrap();
    assert_eq!(send_and_count(&topo, &server, 20), 5);
    assert_eq!(should_rate_limit(&topo, rls, "esc/per-client", client, 3), [OK, OK, OVER_LIMIT]);

    // Broken: rejected whole; both layers keep their rules and their state.
    dir.write("policy.yaml", &two_layer_policy(50, 50, "Minuets"));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["reload rejected"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 20), 0, "the kernel rule and its empty bucket stay");
    assert_eq!(
        should_rate_limit(&topo, rls, "esc/per-client", client, 1),
        [OVER_LIMIT],
        "the L7 rule and its counter stay"
    );

    // Both layers change at once.
    dir.write("policy.yaml", &two_layer_policy(50, 4, "Hour"));
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert!(line.contains("kernel rules") && line.contains("L7 rules"), "{line}");
    assert_eq!(send_and_count(&topo, &server, 20), 20, "the new kernel limit");
    // A changed rule starts with a fresh counter: 4 more.
    assert_eq!(should_rate_limit(&topo, rls, "esc/per-client", client, 5), [OK, OK, OK, OK, OVER_LIMIT]);

    // Only the L7 rule changes: the kernel plan is untouched (its buckets keep their state).
    dir.write("policy.yaml", &two_layer_policy(50, 6, "Hour"));
    agent.signal(libc::SIGHUP);
    let line = agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert!(!line.contains("kernel rules") && line.contains("1 L7 rules"), "{line}");
    assert_eq!(send_and_count(&topo, &server, 40), 30, "the kernel bucket kept its 20 spent tokens");
    assert_eq!(should_rate_limit(&topo, rls, "esc/per-client", client, 7), [OK, OK, OK, OK, OK, OK, OVER_LIMIT]);

    agent.signal(libc::SIGTERM);
    assert!(agent.child.wait_timeout(Duration::from_secs(10)).unwrap().is_some_and(|s| s.success()));
}
