//! Global kernel rules whose shares follow demand, with real traffic: two and three agents,
//! each shielding its own veth (one node's NIC each), share one `redis-server`; clients offer
//! UDP well above the global limit through some of the nodes; what the nodes admit together
//! is counted at the server, per node, over a bounded window.
//!
//! The limit is per second and every client offers several times it, so each node admits its
//! share: the counts over the window are the shares at work. The window opens a few sync
//! periods after the traffic starts or moves (the warm-up); the counts, not the times, are
//! asserted, against the limit times the window's length.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{netns::Topology, rawsock::udp_socket, require_root};

use crate::{Agent, MARKER, TempDir, UDP_PORT};

/// The global limit, packets per second, over all nodes.
const LIMIT: u64 = 300;
/// The sync period every agent runs with (`--global-heartbeat`).
const PERIOD: Duration = Duration::from_millis(300);
/// Sync periods between the start or move of the traffic and the window that is counted.
const WARMUP_PERIODS: u32 = 6;
const WINDOW: Duration = Duration::from_secs(4);

/// One shared bucket (Exact selector) of [`LIMIT`] packets per second, no burst.
fn policy() -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: shares
spec:
  targetRefs:
    - {{kind: Port, port: {UDP_PORT}, protocol: UDP}}
  rateLimit:
    global:
      rules:
        - name: udp-global
          clientSelectors: [{{sourceCIDR: {{type: Exact, value: 0.0.0.0/0}}}}]
          count: Packets
          limit: {{requests: {LIMIT}, unit: Second}}
"
    )
}

/// `n` agents, agent `i` shielding `s<i>` as node `node-<i>`, all on one Redis.
fn start_agents(topo: &Topology, dir: &TempDir, url: &str, n: usize) -> Vec<Agent> {
    let period = format!("{}ms", PERIOD.as_millis());
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| {
            let (socket, node) = (dir.path(&format!("agent{i}.sock")), format!("node-{i}"));
            #[rustfmt::skip]
            let args = [
                "--no-watch", "--no-rls", "--no-metrics", "--rls-backend", "redis", "--redis-url", url,
                "--node-id", &node, "--global-heartbeat", &period,
                "--control-socket", socket.to_str().unwrap(),
            ];
            Agent::start_on(topo, &format!("s{i}"), dir.root(), &args)
        })
        .collect();
    for (i, agent) in agents.iter_mut().enumerate() {
        agent.wait_for(&[&format!("attached to s{i}")], Duration::from_secs(60));
    }
    let all = format!("{n} nodes live");
    for agent in &mut agents {
        if !agent.seen.iter().any(|l| l.contains(&all)) {
            agent.wait_for(&[&all], Duration::from_secs(10));
        }
    }
    agents
}

/// What the nodes admitted, per node, while `active` clients offered traffic (each several
/// times the limit), counted over [`WINDOW`] after a warm-up of [`WARMUP_PERIODS`]; and the
/// window's length in seconds.
fn offer(topo: &Topology, server: &UdpSocket, active: &[usize]) -> (Vec<u64>, f64) {
    let stop = AtomicBool::new(false);
    let warmup = PERIOD * WARMUP_PERIODS;
    let counted = std::thread::scope(|s| {
        for &i in active {
            let c = topo.client(i);
            let to: SocketAddr = (c.server.ipv4().unwrap(), UDP_PORT).into();
            let sock = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
            let stop = &stop;
            // About 1,500 packets a second: five times the whole limit from each client.
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..3 {
                        let _ = sock.send_to(MARKER, to);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        let counted = count_window(server, topo.clients.len(), Instant::now() + warmup);
        stop.store(true, Ordering::Relaxed);
        counted
    });
    drain(server);
    counted
}

/// Per client, the marker datagrams received from `from` on for [`WINDOW`].
fn count_window(server: &UdpSocket, clients: usize, from: Instant) -> (Vec<u64>, f64) {
    server.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut counts = vec![0u64; clients];
    let mut buf = [0u8; 256];
    let until = from + WINDOW;
    loop {
        let got = server.recv_from(&mut buf);
        let now = Instant::now();
        if now >= until {
            break;
        }
        if let Ok((len, SocketAddr::V4(peer))) = got
            && now >= from
            && &buf[..len] == MARKER
            && let Some(i) = client_index(*peer.ip())
            && i < clients
        {
            counts[i] += 1;
        }
    }
    (counts, WINDOW.as_secs_f64())
}

/// Client `i` sends from 10.9.i.2.
fn client_index(ip: Ipv4Addr) -> Option<usize> {
    let o = ip.octets();
    (o[0] == 10 && o[1] == 9 && o[3] == 2).then_some(usize::from(o[2]))
}

fn drain(server: &UdpSocket) {
    server.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 256];
    while server.recv(&mut buf).is_ok() {}
}

/// Admitted over the window as a multiple of the global limit over the same time.
fn ratio(admitted: u64, secs: f64) -> f64 {
    admitted as f64 / (LIMIT as f64 * secs)
}

pub(crate) fn stop_all(agents: Vec<Agent>) {
    for agent in &agents {
        agent.signal(libc::SIGTERM);
    }
    for mut agent in agents {
        let status = agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("agent exits on SIGTERM");
        assert!(status.success(), "agent exit status {status}");
    }
}

/// Two nodes. All traffic on node 0 (the shape of an attack): together they admit 0.9x to
/// 1.05x of the global limit, node 0 nearly all of it (the other keeps its floor). All of it
/// moves to node 1: within the warm-up (a few sync periods) node 1 admits 0.9x to 1.05x.
/// Spread evenly: the sum stays within 1.05x, and each node admits about half. Redis down:
/// the last shares stay in force; back: they follow the traffic again.
#[test]
fn two_agents_shares_follow_the_traffic_to_one_node_across_and_spread() {
    require_root();
    let topo = Topology::new("shares2", 2).unwrap();
    let mut redis = limiter_tests::redis::RedisServer::start_in(&topo.server).unwrap();
    let dir = TempDir::new("shares2");
    dir.write("policy.yaml", &policy());
    let server = udp_socket(&topo.server, (IpAddr::from(Ipv4Addr::UNSPECIFIED), UDP_PORT).into()).unwrap();
    let mut agents = start_agents(&topo, &dir, &redis.url(), 2);

    let (on_one, secs) = offer(&topo, &server, &[0]);
    let r = ratio(on_one.iter().sum(), secs);
    eprintln!("all on node 0: admitted {on_one:?} in {secs:.1} s: {r:.3}x the limit");
    assert!((0.9..=1.05).contains(&r), "all on node 0: {on_one:?} is {r:.3}x the limit");
    assert_eq!(on_one[1], 0, "no traffic on node 1");

    let (moved, secs) = offer(&topo, &server, &[1]);
    let r = ratio(moved.iter().sum(), secs);
    eprintln!("moved to node 1: admitted {moved:?} in {secs:.1} s: {r:.3}x the limit");
    assert!((0.9..=1.05).contains(&r), "moved to node 1: {moved:?} is {r:.3}x the limit");
    assert_eq!(moved[0], 0, "no traffic left on node 0");

    let (spread, secs) = offer(&topo, &server, &[0, 1]);
    let r = ratio(spread.iter().sum(), secs);
    eprintln!("spread evenly: admitted {spread:?} in {secs:.1} s: {r:.3}x the limit");
    assert!(r <= 1.05, "spread evenly: {spread:?} is {r:.3}x the limit");
    assert!(r >= 0.9, "spread evenly, the nodes still admit the limit: {spread:?} is {r:.3}x");
    for (i, n) in spread.iter().enumerate() {
        let part = *n as f64 / spread.iter().sum::<u64>() as f64;
        assert!((0.35..=0.65).contains(&part), "node {i} admitted {part:.2} of the sum: {spread:?}");
    }

    // Redis goes away: each node keeps its last shares, which still sum to the limit. They
    // come from the last views, read while both nodes' demand decayed after the spread
    // traffic stopped (each seeing the other's one period late): node 0's is about half, a
    // third to two thirds. With all traffic back on node 0, it admits that, not the limit.
    redis.stop().unwrap();
    agents[0].wait_for(&["heartbeat to redis", "failed", "keeping the last known shares"], Duration::from_secs(10));
    let (frozen, secs) = offer(&topo, &server, &[0]);
    let r = ratio(frozen.iter().sum(), secs);
    eprintln!("redis down, all on node 0: admitted {frozen:?} in {secs:.1} s: {r:.3}x the limit");
    assert!((0.25..=0.75).contains(&r), "redis down: node 0 keeps its last share: {frozen:?} is {r:.3}x");

    // Redis back (empty): the nodes rejoin and publish again, and node 0's share grows back.
    redis.restart().unwrap();
    agents[0].wait_for(&["reachable again"], Duration::from_secs(10));
    let (back, secs) = offer(&topo, &server, &[0]);
    let r = ratio(back.iter().sum(), secs);
    eprintln!("redis back, all on node 0: admitted {back:?} in {secs:.1} s: {r:.3}x the limit");
    assert!((0.9..=1.05).contains(&r), "redis back: {back:?} is {r:.3}x the limit");
    stop_all(agents);
}

/// Three nodes. All traffic on node 2: together they admit 0.9x to 1.05x of the limit (the
/// two idle nodes keep their floors). Spread evenly over the three: the sum stays within 1.05x.
#[test]
fn three_agents_admit_the_limit_with_traffic_on_one_node_or_spread() {
    require_root();
    let topo = Topology::new("shares3", 3).unwrap();
    let redis = limiter_tests::redis::RedisServer::start_in(&topo.server).unwrap();
    let dir = TempDir::new("shares3");
    dir.write("policy.yaml", &policy());
    let server = udp_socket(&topo.server, (IpAddr::from(Ipv4Addr::UNSPECIFIED), UDP_PORT).into()).unwrap();
    let agents = start_agents(&topo, &dir, &redis.url(), 3);

    let (on_one, secs) = offer(&topo, &server, &[2]);
    let r = ratio(on_one.iter().sum(), secs);
    eprintln!("all on node 2: admitted {on_one:?} in {secs:.1} s: {r:.3}x the limit");
    assert!((0.9..=1.05).contains(&r), "all on node 2: {on_one:?} is {r:.3}x the limit");

    let (spread, secs) = offer(&topo, &server, &[0, 1, 2]);
    let r = ratio(spread.iter().sum(), secs);
    eprintln!("spread over 3: admitted {spread:?} in {secs:.1} s: {r:.3}x the limit");
    assert!(r <= 1.05, "spread evenly: {spread:?} is {r:.3}x the limit");
    assert!(r >= 0.9, "spread evenly, the nodes still admit the limit: {spread:?} is {r:.3}x");
    stop_all(agents);
}
