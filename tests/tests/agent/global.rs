//! `global` rules with `--rls-backend redis`: each node admits its share of a kernel rule's
//! limit, and agents sharing one Redis share one count for an L7 rule.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use limiter_tests::{netns::Topology, rawsock::udp_socket, require_root};

use crate::{Agent, TempDir, UDP_PORT, l7::should_rate_limit, send_and_count, send_from_client_and_count};

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

    let dir = TempDir::new("share");
    dir.write("policy.yaml", &global_policy(20));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let url = redis.url();
    let args = ["--no-watch", "--rls-backend", "redis", "--redis-url", &url, "--node-id", "this-node"];
    let mut agent = Agent::start(&topo, dir.root(), &[&args[..], &["--global-heartbeat", "200ms"]].concat());
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

/// Both layers under `rateLimit.global`: a shared kernel bucket of `udp_per_hour` packets and
/// an L7 rule of `requests_per_day` requests per client (fixed daily windows in Redis).
fn two_layer_global_policy(udp_per_hour: u32, requests_per_day: u32) -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: fleet
spec:
  targetRefs:
    - {{kind: Port, port: {UDP_PORT}, protocol: UDP}}
  rateLimit:
    global:
      rules:
        - name: udp-global
          clientSelectors: [{{sourceCIDR: {{type: Exact, value: 0.0.0.0/0}}}}]
          count: Packets
          limit: {{requests: {udp_per_hour}, unit: Hour}}
        - name: per-client
          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]
          count: Requests
          kernelGuard: Off
          limit: {{requests: {requests_per_day}, unit: Day}}
"
    )
}

/// Two real agents, each shielding its own veth (two nodes' NICs) and serving its own rate
/// limit service, share one `redis-server`: they find each other in the node set and each
/// admits half of the global kernel rule, so both together admit the limit; the L7 rule's
/// count is one across both services, whichever a gateway asks; when one agent stops, the
/// other takes the whole kernel limit.
#[test]
fn two_agents_sharing_one_redis_split_the_kernel_limit_and_share_the_l7_count() {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    require_root();
    let topo = Topology::new("fleet", 2).unwrap();
    let redis = limiter_tests::redis::RedisServer::start_in(&topo.server).unwrap();
    let dir = TempDir::new("fleet");
    dir.write("policy.yaml", &two_layer_global_policy(20, 6));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let url = redis.url();
    let rls: [SocketAddr; 2] = [([127, 0, 0, 1], 18091).into(), ([127, 0, 0, 1], 18092).into()];
    let start = |i: usize| {
        let (rls, metrics) = (rls[i].to_string(), format!("127.0.0.1:{}", 19191 + i));
        let (socket, node) = (dir.path(&format!("agent{i}.sock")), format!("node-{i}"));
        #[rustfmt::skip]
        let args = [
            "--no-watch", "--rls-backend", "redis", "--redis-url", &url, "--node-id", &node,
            // One second: a loaded test machine never misses three in a row.
            "--global-heartbeat", "1s",
            "--rls-listen", &rls, "--metrics-listen", &metrics,
            "--control-socket", socket.to_str().unwrap(),
        ];
        Agent::start_on(&topo, &format!("s{i}"), dir.root(), &args)
    };

    let mut first = start(0);
    first.wait_for(&["attached to s0"], Duration::from_secs(30));
    let mut second = start(1);
    second.wait_for(&["sync: joined limiter:nodes as node-1", "2 nodes live"], Duration::from_secs(30));
    second.wait_for(&["attached to s1"], Duration::from_secs(30));
    first.wait_for(&["sync: 2 nodes live (was 1)", "re-applied"], Duration::from_secs(10));
    assert_eq!(members(&redis), ["node-0", "node-1"]);

    // Kernel: each node admits its half of 20; together, the limit.
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 30), 10, "node 0's share: 20/2");
    assert_eq!(send_from_client_and_count(&topo, 1, &server, 30), 10, "node 1's share: 20/2");

    // L7: one count in Redis for both services. Alternate between them: 6 OK in all, then
    // over the limit on either.
    let client = topo.client(0).client.ipv4().unwrap();
    let mut codes = Vec::new();
    for i in 0..8 {
        codes.extend(should_rate_limit(&topo, rls[i % 2], "fleet/per-client", client, 1));
    }
    assert_eq!(codes, [OK, OK, OK, OK, OK, OK, OVER_LIMIT, OVER_LIMIT]);
    let keys = redis.command(&["KEYS", "limiter_*"]).unwrap().as_strings();
    assert_eq!(keys.len(), 1, "one counter for both services: {keys:?}");
    let count = redis.command(&["GET", &keys[0]]).unwrap().as_int();
    assert_eq!(count, Some(8), "every call counted once, over-limit ones too (as the reference service does)");

    // The second agent stops: it leaves the set, and the first takes the whole limit (the
    // re-applied rule starts with a full bucket).
    second.signal(libc::SIGTERM);
    let status = second.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "second agent exit status {status}");
    first.wait_for(&["sync: 1 node live (was 2)", "shared across 1 node"], Duration::from_secs(10));
    assert_eq!(members(&redis), ["node-0"]);
    assert_eq!(send_and_count(&topo, &server, 30), 20, "the whole limit on the only node");

    first.signal(libc::SIGTERM);
    let status = first.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "first agent exit status {status}");
    assert!(members(&redis).is_empty(), "both agents left the node set");
}
