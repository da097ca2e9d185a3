//! The evasion shapes of issue 10 as real frames over veth: sent from client namespaces with
//! raw sockets, through the XDP program attached natively to the server side. A denied source
//! is dropped in every shape, an allowed source passes in every shape, and a per-source
//! connection limit holds for a source that fragments every SYN.
//!
//! "Passed" is what an AF_PACKET tap on the server interface sees (it sees a frame only if
//! XDP passed it); where the server's stack answers (SYN-ACKs, a UDP socket), that is counted
//! too, on the client side or at the socket.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::reason;
use limiter_tests::{
    netns::{ClientLink, Topology},
    packet::Packet,
    rawsock::{RawReceiver, RawSender, udp_socket},
    require_root,
};

const TCP_PORT: u16 = 9100;
const UDP_PORT: u16 = 9000;
const MARKER: &[u8] = b"limiter-evasion";

fn shield(topo: &Topology, plan: &KernelPlan) -> Dataplane {
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load the XDP program");
    dp.apply(plan).expect("apply the plan");
    let ifaces: Vec<String> = topo.clients.iter().map(|c| c.server.name.clone()).collect();
    topo.server.run(|| {
        for iface in &ifaces {
            assert_eq!(dp.attach(iface, AttachMode::Native).expect("attach XDP"), "native");
        }
    });
    dp
}

fn entry(ip: IpAddr) -> ListEntry {
    ListEntry { net: ip.into(), policy: "test".into() }
}

/// The three shapes of the issue, from client `c` to the server: an IPv4 SYN whose first
/// fragment holds 8 bytes of TCP, an IPv6 UDP datagram behind 9 destination-options headers,
/// and an IPv6 SYN whose first fragment holds 8 bytes of TCP. Each as the frames to send.
fn shapes(c: &ClientLink, id: u32) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let (src4, dst4) = (c.client.ipv4().unwrap(), c.server.ipv4().unwrap());
    let (src6, dst6) = (c.client.ipv6().unwrap(), c.server.ipv6().unwrap());
    let eth = || Packet::eth().src_mac(c.client.mac).dst_mac(c.server.mac);
    let syn4 = eth().ipv4(src4, dst4).ip_id(id as u16).tcp(41000, TCP_PORT).syn();
    let mut udp6 = eth().ipv6(src6, dst6);
    for _ in 0..9 {
        udp6 = udp6.dest_opts(0);
    }
    let udp6 = udp6.udp(41000, UDP_PORT).payload(MARKER);
    let syn6 = eth().ipv6(src6, dst6).tcp(41001, TCP_PORT).syn();
    vec![
        ("IPv4 SYN in 8-byte fragments", syn4.fragments(8, 0)),
        ("IPv6 UDP behind 9 destination-options headers", vec![udp6.build()]),
        ("IPv6 SYN in 8-byte fragments", syn6.fragments(8, id)),
    ]
}

/// How many of `frames` the tap on `iface` (server side) sees: the ones XDP passed.
fn passed(rx: &RawReceiver, frames: &[Vec<u8>]) -> usize {
    let want: HashSet<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    rx.count_matching(Instant::now() + Duration::from_millis(300), |f| want.contains(f)).unwrap()
}

#[test]
fn a_denied_source_is_dropped_and_an_allowed_source_passes_in_every_shape() {
    require_root();
    let topo = Topology::new("evade", 2).expect("namespaces and veths");
    let (denied, allowed) = (topo.client(0), topo.client(1));
    let plan = KernelPlan {
        // The user: a deny list and nothing else (its IPv4 and IPv6 address)...
        deny: vec![entry(denied.client.ipv4().unwrap().into()), entry(denied.client.ipv6().unwrap().into())],
        // ...and an allowed client.
        allow: vec![entry(allowed.client.ipv4().unwrap().into()), entry(allowed.client.ipv6().unwrap().into())],
        rules: vec![],
        synproxy: vec![],
    };
    let dp = shield(&topo, &plan);
    let server_udp = udp_socket(&topo.server, (Ipv6Addr::UNSPECIFIED, UDP_PORT).into()).unwrap();
    server_udp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for (i, c) in [(0usize, denied), (1, allowed)] {
        let rx = RawReceiver::open(&topo.server, &c.server.name).unwrap();
        let tx = RawSender::open(&c.ns, &c.client.name).unwrap();
        for (what, frames) in shapes(c, 700 + i as u32) {
            tx.send_all(frames.iter().map(Vec::as_slice)).unwrap();
            let seen = passed(&rx, &frames);
            if i == 0 {
                assert_eq!(seen, 0, "{what}: frames of a denied source passed XDP");
            } else {
                assert_eq!(seen, frames.len(), "{what}: frames of an allowed source were dropped");
            }
        }
    }
    // The allowed source's UDP datagram behind 9 headers reached the socket; the denied one's
    // never did.
    let mut buf = [0u8; 256];
    let mut from = Vec::new();
    while let Ok((n, addr)) = server_udp.recv_from(&mut buf) {
        if &buf[..n] == MARKER {
            from.push(addr.ip());
        }
    }
    assert_eq!(from, vec![IpAddr::V6(allowed.client.ipv6().unwrap())], "datagrams delivered, by source");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_DENY_LIST).packets, 3 + 1 + 3, "every frame of the denied source");
    // The allowed client's own stack adds to these (its RST to the SYN-ACK it never asked for).
    let allowed_passed = stats.reason(reason::PASS_ALLOW_LIST).packets;
    assert!(allowed_passed >= 3 + 1 + 3, "every frame of the allowed source: {allowed_passed}");
}

/// SYN-ACKs from the server's `port` to distinct client ports, seen on the client's interface.
fn syn_acks(rx: &RawReceiver, port: u16) -> usize {
    let deadline = Instant::now() + Duration::from_millis(500);
    let frames = rx
        .collect_matching(deadline, |f| {
            f.len() >= 14 + 20 + 20 && f[12..14] == [0x08, 0x00] && f[14 + 9] == 6 && {
                let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
                f.len() >= l4 + 14 && f[l4..l4 + 2] == port.to_be_bytes() && f[l4 + 13] & 0x12 == 0x12
            }
        })
        .unwrap();
    let ports: HashSet<[u8; 2]> = frames
        .iter()
        .map(|f| {
            let l4 = 14 + usize::from(f.data[14] & 0x0f) * 4;
            [f.data[l4 + 2], f.data[l4 + 3]]
        })
        .collect();
    ports.len()
}

#[test]
fn a_per_source_connection_limit_holds_for_a_source_that_fragments_every_syn() {
    require_root();
    let topo = Topology::new("fragsyn", 1).expect("namespaces and veths");
    let c = topo.client(0);
    let server_addr: SocketAddr = (c.server.ipv4().unwrap(), TCP_PORT).into();
    let _listener = topo.server.run(|| TcpListener::bind(server_addr).expect("listen on the server"));
    let rule = KernelRule {
        name: "test/conn".into(),
        targets: vec![PortTarget { port: TCP_PORT, protocol: Protocol::Tcp }],
        source: SourceSelector::everyone(true),
        count: CountKind::Connections,
        limit: Limit { requests: 2, unit: Unit::Hour, burst: 0 },
        shadow: false,
        global: false,
    };
    let plan = KernelPlan { rules: vec![rule], ..Default::default() };
    let rx = RawReceiver::open(&c.ns, &c.client.name).unwrap();
    let tx = RawSender::open(&c.ns, &c.client.name).unwrap();
    let syn = |i: u16| {
        Packet::eth()
            .src_mac(c.client.mac)
            .dst_mac(c.server.mac)
            .ipv4(c.client.ipv4().unwrap(), c.server.ipv4().unwrap())
            .ip_id(500 + i)
            .tcp(42000 + i, TCP_PORT)
            .seq(1000 + u32::from(i))
            .syn()
    };

    // Unshielded first: the server answers every fragmented SYN (Linux reassembles them), so
    // the counts below measure the shield, not the stack.
    for i in 0..3 {
        tx.send_all(syn(i).fragments(8, 0).iter().map(Vec::as_slice)).unwrap();
    }
    assert_eq!(syn_acks(&rx, TCP_PORT), 3, "without the shield, fragmented SYNs are answered");

    // Shielded: 10 SYNs in 8-byte fragments (the attack), then 10 in fragments that
    // carry the whole TCP header.
    let dp = shield(&topo, &plan);
    for i in 10..20 {
        tx.send_all(syn(i).fragments(8, 0).iter().map(Vec::as_slice)).unwrap();
    }
    let tiny = syn_acks(&rx, TCP_PORT);
    for i in 20..30 {
        tx.send_all(syn(i).payload(&[0; 40]).fragments(24, 0).iter().map(Vec::as_slice)).unwrap();
    }
    let whole = syn_acks(&rx, TCP_PORT);
    assert!(tiny + whole <= 2, "2 connections per hour: {tiny} + {whole} SYN-ACKs");
    assert_eq!(tiny, 0, "tiny first fragments are dropped");
    assert_eq!(whole, 2, "first fragments with the whole TCP header count as connections");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_L4_TRUNCATED).packets, 10);
    assert_eq!(stats.rules["test/conn"].passed.packets, 2);
    assert_eq!(stats.rules["test/conn"].dropped.packets, 8);
}
