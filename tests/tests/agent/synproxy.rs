//! The agent owns the SYN proxy's netfilter half: a policy with `synProxy` installs it, it
//! stays with the pinned shield while no agent runs and across a restart, and `detach`
//! removes it with the shield.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    synproxy as nft,
};
use limiter_common::{Counter, synproxy::event, synproxy::names};
use limiter_tests::{agent::PinDir, netns::Topology, require_root, require_tool};

use crate::{Agent, agent_binary};

const PORT: u16 = 9100;
/// The marker program's name as the kernel keeps it (`BPF_OBJ_NAME_LEN`: 15 characters).
const MARKER_PROG: &str = "synproxy_establ";

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
    // A connection opened before any agent ran (so before conntrack tracked anything here),
    // echoed by the server side of it; it must keep working through every step below.
    let mut held = c.ns.run(|| TcpStream::connect_timeout(&server, Duration::from_secs(2))).expect("connect first");
    held.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (mut accepted, _) = listener.accept().expect("accept the held connection");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = accepted.read(&mut buf) {
            if n == 0 || accepted.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut pings = 0;
    let mut ping = || {
        pings += 1;
        let msg = format!("ping {pings}");
        let mut buf = [0u8; 64];
        held.write_all(msg.as_bytes()).is_ok() && matches!(held.read(&mut buf), Ok(n) if &buf[..n] == msg.as_bytes())
    };
    assert!(ping(), "held connection, before the agent");
    let marker = pins.path().join("tc-ingress-s0");
    // The programs on s0's TCX ingress, by name (this machine's bpftool predates TCX).
    let tc_ingress = || {
        let (_, programs) =
            topo.server.run(|| SchedClassifier::query_tcx("s0", TcAttachType::Ingress)).expect("query TCX");
        programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect::<Vec<_>>()
    };
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
    assert!(marker.exists(), "the TC marker link is pinned beside the XDP link");
    let tc = tc_ingress();
    assert_eq!(tc, [MARKER_PROG], "the marker alone on s0's TC ingress");
    assert!(ping(), "held connection, once the agent switched the proxy on");
    connects().expect("connect through the proxy");
    let answered = pinned_synacks(&pins);
    assert!(answered >= 1, "the SYN was answered in XDP");
    stop(agent);

    // No agent: the shield still answers cookies and netfilter still completes them.
    assert!(installed(), "the table stays when the agent stops");
    assert!(marker.exists(), "the TC marker link stays when the agent stops");
    connects().expect("connect through the proxy with no agent running");
    assert!(ping(), "held connection, with no agent running");
    assert!(pinned_synacks(&pins) > answered, "answered in XDP with no agent");

    // A restart adopts the pinned shield (tail-call table included), re-applies the same table
    // (idempotent) and keeps answering.
    let agent = start();
    assert!(agent.seen.iter().any(|l| l.contains("adopted the shield pinned in")), "{:#?}", agent.seen);
    assert!(installed());
    let answered = pinned_synacks(&pins);
    connects().expect("connect after a restart");
    assert!(pinned_synacks(&pins) > answered);
    assert!(agent.seen.iter().any(|l| l.contains("kept its pinned TC marker link")), "{:#?}", agent.seen);
    assert!(ping(), "held connection, after a restart");
    stop(agent);

    let out = topo.server.command(&[agent_binary().to_str().unwrap(), "detach", "--pin-dir", &pins.arg()]).output();
    let out = out.expect("run detach");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("removed the SYN proxy's nftables table"), "{said}");
    assert!(!installed(), "detach removed the table");
    assert!(!marker.exists(), "detach removed the TC marker link");
    let tc = tc_ingress();
    assert!(tc.is_empty(), "nothing left on s0's TC ingress: {tc:?}");
    assert_eq!(loose(&topo), "1", "conntrack's default is back");
    connects().expect("connect with no shield at all");
    assert!(ping(), "held connection, after detach");
    drop(held);
    echo.join().unwrap();
    drop(listener);
}
