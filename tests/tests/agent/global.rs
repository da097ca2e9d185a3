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

/// A global kernel rule with `--rls-backend redis`: the agent joins the node set, publishes
/// its demand in the demand hash (with a TTL), and enforces the share the published demand
/// gives it. Another node that claims all the demand leaves this one its floor (5% of the
/// limit split over 2 nodes); a reload applies the floor of the new limit; once the other
/// node's demand is gone, this one gets all but the other's floor. At SIGTERM the agent
/// leaves the set and the hash.
#[test]
fn global_kernel_rule_follows_the_demand_published_in_redis() {
    require_root();
    let topo = Topology::new("share", 1).unwrap();
    // Inside the server namespace, where the agent runs, on its loopback.
    let redis = limiter_tests::redis::RedisServer::start_in(&topo.server).unwrap();
    // The other node, scored an hour ahead on Redis's clock: live for the whole test without
    // a heartbeat of its own, and claiming a huge demand.
    let time = redis.command(&["TIME"]).unwrap().as_strings();
    let ahead = (time[0].parse::<u64>().unwrap() * 1000 + 3_600_000).to_string();
    redis.command(&["ZADD", "limiter:nodes", &ahead, "other-node"]).unwrap();
    let claim = |demand: f64| {
        let value = format!("{ahead} {{\"global-test/udp-global\":{demand}}}");
        redis.command(&["HSET", "limiter:demand", "other-node", &value]).unwrap();
    };
    claim(1e9);

    let dir = TempDir::new("share");
    dir.write("policy.yaml", &global_policy(400));
    let server = udp_socket(&topo.server, (Ipv4Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    let url = redis.url();
    let args = ["--no-watch", "--rls-backend", "redis", "--redis-url", &url, "--node-id", "this-node"];
    let mut agent = Agent::start(&topo, dir.root(), &[&args[..], &["--global-heartbeat", "200ms"]].concat());
    agent.wait_for(&["sync: joined limiter:nodes as this-node", "2 nodes live"], Duration::from_secs(30));
    agent.wait_for(&["attached to s0"], Duration::from_secs(30));
    assert_eq!(members(&redis), ["other-node", "this-node"]);
    assert_eq!(send_and_count(&topo, &server, 30), 10, "this node's floor: 5% of 400 over 2 nodes");
    let text = crate::scrape(&topo, ([127, 0, 0, 1], 9091).into());
    assert!(text.contains("limiter_global_nodes 2"), "{text}");
    assert!(text.contains("limiter_global_share_requests{rule=\"global-test/udp-global\"} 10"), "{text}");

    // This node's demand is published, under a TTL.
    let published = redis.command(&["HGET", "limiter:demand", "this-node"]).unwrap().as_text().unwrap();
    let (at, json) = published.split_once(' ').unwrap();
    assert!(at.parse::<u64>().is_ok(), "{published}");
    assert!(json.contains("\"global-test/udp-global\":"), "{published}");
    let ttl = redis.command(&["PTTL", "limiter:demand"]).unwrap().as_int().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "the hash expires a minute after the last node: {ttl} ms");

    // A reload applies the share of the new limit (a new rule, with a fresh bucket).
    dir.write("policy.yaml", &global_policy(800));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["policy reloaded", "1 global rule(s) shared by demand across 2 nodes"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 30), 20, "this node's floor: 5% of 800 over 2 nodes");

    // The other node's demand falls to nothing; a reload (fresh bucket) then shows the share
    // this node's own demand wins: all but the other's floor.
    claim(0.0);
    agent.wait_for(&["sync: shares of 2 nodes live", "global-test/udp-global=780/Hour"], Duration::from_secs(10));
    dir.write("policy.yaml", &global_policy(1200));
    agent.signal(libc::SIGHUP);
    agent.wait_for(&["policy reloaded"], Duration::from_secs(5));
    assert_eq!(send_and_count(&topo, &server, 60), 60, "1170 of 1200 for this node");

    agent.signal(libc::SIGTERM);
    let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(members(&redis), ["other-node"], "the agent left the node set at shutdown");
    let fields = redis.command(&["HKEYS", "limiter:demand"]).unwrap().as_strings();
    assert_eq!(fields, ["other-node"], "and the demand hash");
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
/// limit service, share one `redis-server`: they find each other in the node set; before
/// any demand each admits half of the global kernel rule, and together they never admit more
/// than the limit; the L7 rule's count is one across both services, whichever a gateway asks;
/// when one agent stops, the other is alone in the node set. (`shares.rs` follows demand
/// with real traffic.)
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
    first.wait_for(&["sync: 2 nodes live (was 1)"], Duration::from_secs(10));
    // The sync task logs the new view before the main loop puts its shares in force.
    first.wait_for(&["sync: shares of 2 nodes live"], Duration::from_secs(10));
    assert_eq!(members(&redis), ["node-0", "node-1"]);

    // Kernel: before any demand, equal parts: node 0 admits its half of 20. Its demand then
    // takes most of the limit to node 0, whose bucket is empty: node 1 admits what is left of
    // its share, at least its floor (1), and both together no more than the limit.
    assert_eq!(send_from_client_and_count(&topo, 0, &server, 30), 10, "node 0's share: 20/2");
    let node1 = send_from_client_and_count(&topo, 1, &server, 30);
    assert!((1..=10).contains(&node1), "node 1 admitted {node1}: its floor at least, 20 in all at most");

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

    // The second agent stops: it leaves the set, and the first is alone (its share grows to
    // the whole limit; the tokens its bucket holds are kept, so nothing is handed out at once).
    second.signal(libc::SIGTERM);
    let status = second.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "second agent exit status {status}");
    first.wait_for(&["sync: 1 node live (was 2)"], Duration::from_secs(10));
    assert_eq!(members(&redis), ["node-0"]);
    assert_eq!(send_and_count(&topo, &server, 30), 0, "node 0's bucket stays empty: 20 per hour in all");

    first.signal(libc::SIGTERM);
    let status = first.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
    assert!(status.success(), "first agent exit status {status}");
    assert!(members(&redis).is_empty(), "both agents left the node set");
}
