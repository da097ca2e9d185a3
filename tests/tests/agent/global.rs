//! A `global` kernel rule with `--rls-backend redis`: each node admits its share of the limit.

use std::{net::Ipv4Addr, time::Duration};

use limiter_tests::{netns::Topology, rawsock::udp_socket, require_root};

use crate::{Agent, TempDir, UDP_PORT, send_and_count};

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
