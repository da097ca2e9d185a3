//! The agent owns the SYN proxy's netfilter half: a policy with `synProxy` installs it, it
//! stays with the pinned shield while no agent runs and across a restart, and `detach`
//! removes it with the shield.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    synproxy as nft,
};
use limiter_common::{Counter, synproxy::event, synproxy::names};
use limiter_tests::{agent::PinDir, netns::Topology, require_root, require_tool};

use crate::{Agent, agent_binary};

const PORT: u16 = 9100;

fn policy() -> String {
    format!(
        "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: syn-shield
spec:
  targetRefs:
    - {{kind: Port, port: {PORT}, synProxy: {{mode: Always}}}}
  rateLimit:
    local:
      rules:
        - name: ceiling
          count: Connections
          limit: {{requests: 100, unit: Second, burst: 20}}
"
    )
}

/// SYN-ACKs the pinned program has sent, summed over CPUs.
fn pinned_synacks(pins: &PinDir) -> u64 {
    let data = MapData::from_pin(pins.path().join(names::SYNPROXY_STATS)).expect("open the pinned SYNPROXY_STATS");
    let stats: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(Map::from_map_data(data).unwrap()).expect("a per-CPU array");
    stats.get(&event::SYNACK_SENT, 0).unwrap().iter().map(|c| c.packets).sum()
}

fn loose(topo: &Topology) -> String {
    topo.server
        .run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_loose"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn the_netfilter_half_lives_with_the_pinned_shield_and_detach_removes_it() {
    require_root();
    require_tool("nft");
    let topo = Topology::new("synpagent", 1).unwrap();
    let pins = PinDir::new("synpagent");
    let dir = crate::TempDir::new("synpagent");
    let file = dir.write("policy.yaml", &policy());
    let c = topo.client(0);
    // The client side runs XDP too, so the veth delivers the SYN-ACKs sent with XDP_TX at once
    // (see tests/tests/synproxy/main.rs).
    let mut peer = Dataplane::load(LoadOptions::default()).unwrap();
    c.ns.run(|| peer.attach(&c.client.name, AttachMode::Native).unwrap());
    let listener = topo.server.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT))).unwrap();
    let server: SocketAddr = (c.server.ipv4().unwrap(), PORT).into();
    let connects = || {
        c.ns.run(|| TcpStream::connect_timeout(&server, Duration::from_secs(2)).map(|_| ()).map_err(|e| e.to_string()))
    };
    let installed = || topo.server.run(nft::installed);
    let start = || {
        // A control socket of its own: other agents may run on this machine.
        let socket = dir.path("agent.sock");
        let args = ["--pin-dir", &pins.arg(), "--control-socket", socket.to_str().unwrap()];
        let mut agent = Agent::start(&topo, &file, &args);
        agent.wait_for(&["attached to s0"], Duration::from_secs(30));
        agent.wait_for(&["stats:"], Duration::from_secs(10));
        agent
    };
    let stop = |mut agent: Agent| {
        agent.signal(libc::SIGTERM);
        agent.child.wait_timeout(Duration::from_secs(10)).unwrap().expect("the agent exits");
    };

    let agent = start();
    assert!(installed(), "the policy installed the nftables table");
    assert_eq!(loose(&topo), "0");
    connects().expect("connect through the proxy");
    let answered = pinned_synacks(&pins);
    assert!(answered >= 1, "the SYN was answered in XDP");
    stop(agent);

    // No agent: the shield still answers cookies and netfilter still completes them.
    assert!(installed(), "the table stays when the agent stops");
    connects().expect("connect through the proxy with no agent running");
    assert!(pinned_synacks(&pins) > answered, "answered in XDP with no agent");

    // A restart adopts the pinned shield (tail-call table included), re-applies the same table
    // (idempotent) and keeps answering.
    let agent = start();
    assert!(agent.seen.iter().any(|l| l.contains("adopted the shield pinned in")), "{:#?}", agent.seen);
    assert!(installed());
    let answered = pinned_synacks(&pins);
    connects().expect("connect after a restart");
    assert!(pinned_synacks(&pins) > answered);
    stop(agent);

    let out = topo.server.command(&[agent_binary().to_str().unwrap(), "detach", "--pin-dir", &pins.arg()]).output();
    let out = out.expect("run detach");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("removed the SYN proxy's nftables table"), "{said}");
    assert!(!installed(), "detach removed the table");
    assert_eq!(loose(&topo), "1", "conntrack's default is back");
    connects().expect("connect with no shield at all");
    drop(listener);
}
