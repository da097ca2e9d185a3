//! The XDP SYN proxy over veth: legitimate clients connect through a spoofed SYN flood.
//!
//! One server namespace with the shield on `s0` (the attacker's link) and `s1` (the
//! legitimate client's), a real listener on the proxied port, the agent's nftables half
//! (netfilter SYNPROXY) installed in the server namespace. The attacker sends spoofed SYNs
//! from random sources through an AF_PACKET socket; the client uses real sockets. What the
//! listener saw is read from the server namespace's own TCP counters, independently of the
//! program's counters. No assertion depends on a duration: counts over bounded runs only.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use limiter_agent::{
    dataplane::{AttachMode, Dataplane, LoadOptions},
    plan::{
        CountKind, KernelPlan, KernelRule, Limit, PortTarget, Protocol, SourceSelector, SynproxyMode, SynproxyTarget,
        Unit,
    },
    synproxy as nft,
};
use limiter_common::synproxy::event;
use limiter_tests::{
    netns::{Netns, Topology},
    rawsock::RawSender,
    require_root, require_tool,
};
use rand::{SeedableRng, rngs::SmallRng};

mod clients;
mod verdicts;

const PORT: u16 = 9100;
const FLOOD_FRAMES: usize = 6_000;
const LEGIT_CONNECTIONS: usize = 50;

/// The ceiling: 100 new connections per second, burst 20, shared by everyone.
fn ceiling_plan(mode: Option<SynproxyMode>) -> KernelPlan {
    KernelPlan {
        rules: vec![KernelRule {
            name: "test/ceiling".into(),
            targets: vec![PortTarget { port: PORT, protocol: Protocol::Tcp }],
            source: SourceSelector::everyone(false),
            count: CountKind::Connections,
            limit: Limit { requests: 100, unit: Unit::Second, burst: 20 },
            shadow: false,
            global: false,
        }],
        synproxy: mode.map(|mode| vec![SynproxyTarget { port: PORT, mode, policy: "test".into() }]).unwrap_or_default(),
        ..Default::default()
    }
}

/// Removes the nftables table from the server namespace, even when a test fails.
struct NftGuard<'a>(&'a Netns);

impl Drop for NftGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(nft::remove);
    }
}

/// The shield under test, its nftables half, and the pass-everything programs on the client
/// sides (see [`shield`]).
pub(crate) struct Shield<'a> {
    pub(crate) dp: Dataplane,
    _peers: Vec<Dataplane>,
    _nft: NftGuard<'a>,
}

/// Loads the program with `plan`, attaches it to every server-side veth and installs the
/// nftables half. The client sides get an XDP program of their own (the limiter with no
/// policy, which passes everything): a veth flushes the frames its peer sent with XDP_TX
/// only to a peer that runs XDP, so without one the SYN-ACKs would wait in the client's ring
/// for unrelated traffic (a NIC has no such dependency).
fn shield<'a>(topo: &'a Topology, plan: &KernelPlan) -> Shield<'a> {
    require_tool("nft");
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load the XDP programs");
    let ifaces: Vec<String> = topo.clients.iter().map(|c| c.server.name.clone()).collect();
    let nft = NftGuard(&topo.server);
    // Applied in the server namespace: the plan's proxied ports bring the netfilter half there.
    topo.server.run(|| {
        dp.apply(plan).expect("apply the plan");
        for iface in &ifaces {
            assert_eq!(dp.attach(iface, AttachMode::Native).expect("attach XDP"), "native");
        }
    });
    assert!(topo.server.run(nft::installed), "the plan installed the nftables table");
    let peers = limiter_tests::synproxy::client_side_xdp(topo).expect("client-side XDP programs");
    Shield { dp, _peers: peers, _nft: nft }
}

/// A TCP counter of the namespace (`TcpExt` from /proc/net/netstat, `Tcp` from
/// /proc/net/snmp), as `nstat` reads them.
fn tcp_counter(ns: &Netns, group: &str, name: &str) -> u64 {
    let file = if group == "Tcp" { "/proc/net/snmp" } else { "/proc/net/netstat" };
    let out = ns.output(&["cat", file]).expect("read the namespace's TCP counters");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
    while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = head.split_whitespace().position(|h| h == name) {
            return values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    panic!("{group}:{name} not found in {file}");
}

/// An echo server on the proxied port in the server namespace: each connection gets its
/// first read written back. Records the peer address of every accepted connection.
struct Echo {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// What the listener's side of each connection negotiated.
    infos: Arc<Mutex<Vec<TcpInfo>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Echo {
    fn start(ns: &Netns, v6: bool) -> Echo {
        let bind: SocketAddr =
            if v6 { (Ipv6Addr::UNSPECIFIED, PORT).into() } else { (Ipv4Addr::UNSPECIFIED, PORT).into() };
        let listener = ns.run(|| TcpListener::bind(bind)).expect("listen on the proxied port");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let infos = Arc::new(Mutex::new(Vec::new()));
        let (s, p, inf) = (stop.clone(), peers.clone(), infos.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        p.lock().unwrap().push(peer);
                        inf.lock().unwrap().push(tcp_info(&conn));
                        thread::spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                            let mut buf = [0u8; 256];
                            if let Ok(n) = conn.read(&mut buf) {
                                let _ = conn.write_all(&buf[..n]);
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Echo { stop, peers, infos, handle: Some(handle) }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What `TCP_INFO` says a connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpInfo {
    /// `TCPI_OPT_*`: 1 timestamps, 2 SACK, 4 window scaling.
    options: u8,
    snd_wscale: u8,
    rcv_wscale: u8,
    snd_mss: u32,
}

fn tcp_info(s: &TcpStream) -> TcpInfo {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain C struct, zero is valid; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc =
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    TcpInfo {
        options: info.tcpi_options,
        snd_wscale: info.tcpi_snd_rcv_wscale & 0xf,
        rcv_wscale: info.tcpi_snd_rcv_wscale >> 4,
        snd_mss: info.tcpi_snd_mss,
    }
}

/// One legitimate exchange: connect within 1 s, send a line, read it back. Returns
/// (connected, echoed).
fn exchange(server: SocketAddr, i: usize) -> (bool, bool) {
    let Ok(mut s) = TcpStream::connect_timeout(&server, Duration::from_secs(1)) else { return (false, false) };
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let msg = format!("hello {i}");
    if s.write_all(msg.as_bytes()).is_err() {
        return (true, false);
    }
    let mut buf = [0u8; 64];
    let echoed = matches!(s.read(&mut buf), Ok(n) if &buf[..n] == msg.as_bytes());
    (true, echoed)
}

/// A SYN from a random spoofed source to the proxied port.
fn spoofed_syn(rng: &mut SmallRng, dst_mac: [u8; 6], dst: IpAddr) -> Vec<u8> {
    limiter_tests::synproxy::spoofed_syn(rng, dst_mac, dst, PORT)
}

struct Outcome {
    connected: usize,
    echoed: usize,
    passive_opens: u64,
    listen_overflows: u64,
    listen_drops: u64,
    synacks: u64,
    peers: Vec<SocketAddr>,
}

/// The scenario: a bounded flood of spoofed SYNs from client 0 while client 1 makes
/// 50 connections over 5 s, each given 1 s.
fn flood_scenario(topo: &Topology, dp: &Dataplane, v6: bool) -> Outcome {
    let echo = Echo::start(&topo.server, v6);
    let (attacker, legit) = (topo.client(0), topo.client(1));
    let attacked: IpAddr =
        if v6 { attacker.server.ipv6().unwrap().into() } else { attacker.server.ipv4().unwrap().into() };
    let server: SocketAddr =
        if v6 { (legit.server.ipv6().unwrap(), PORT).into() } else { (legit.server.ipv4().unwrap(), PORT).into() };
    let tx = RawSender::open(&attacker.ns, &attacker.client.name).unwrap();
    let opens_before = tcp_counter(&topo.server, "Tcp", "PassiveOpens");
    let overflows_before = tcp_counter(&topo.server, "TcpExt", "ListenOverflows");
    let drops_before = tcp_counter(&topo.server, "TcpExt", "ListenDrops");
    let synacks_before = dp.synproxy_stats().unwrap()[event::SYNACK_SENT as usize].packets;
    let mac = attacker.server.mac;
    let results = thread::scope(|s| {
        let flood = s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(15);
            // About 1,000 per second: 10 frames every 10 ms.
            for i in 0..FLOOD_FRAMES {
                tx.send(&spoofed_syn(&mut rng, mac, attacked)).unwrap();
                if i % 10 == 9 {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        });
        thread::sleep(Duration::from_millis(300));
        let results = legit.ns.run(|| {
            (0..LEGIT_CONNECTIONS)
                .map(|i| {
                    let start = Instant::now();
                    let r = exchange(server, i);
                    if let Some(rest) = Duration::from_millis(100).checked_sub(start.elapsed()) {
                        thread::sleep(rest);
                    }
                    r
                })
                .collect::<Vec<_>>()
        });
        flood.join().unwrap();
        results
    });
    thread::sleep(Duration::from_millis(200));
    let peers = echo.peers.lock().unwrap().clone();
    drop(echo);
    Outcome {
        connected: results.iter().filter(|r| r.0).count(),
        echoed: results.iter().filter(|r| r.1).count(),
        passive_opens: tcp_counter(&topo.server, "Tcp", "PassiveOpens") - opens_before,
        listen_overflows: tcp_counter(&topo.server, "TcpExt", "ListenOverflows") - overflows_before,
        listen_drops: tcp_counter(&topo.server, "TcpExt", "ListenDrops") - drops_before,
        synacks: dp.synproxy_stats().unwrap()[event::SYNACK_SENT as usize].packets - synacks_before,
        peers,
    }
}

fn assert_through_the_flood(topo: &Topology, dp: &Dataplane, o: &Outcome, v6: bool) {
    let legit_ip: IpAddr =
        if v6 { topo.client(1).client.ipv6().unwrap().into() } else { topo.client(1).client.ipv4().unwrap().into() };
    let names: Vec<String> = dp
        .synproxy_stats()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{}={}", event::name(i as u32), c.packets))
        .collect();
    eprintln!(
        "connected {} echoed {} passive opens {} overflows {} drops {} synacks {}; proxy: {}; rules: {:?}",
        o.connected,
        o.echoed,
        o.passive_opens,
        o.listen_overflows,
        o.listen_drops,
        o.synacks,
        names.join(" "),
        dp.stats().unwrap().rules
    );
    assert!(o.connected >= 49, "{} of {LEGIT_CONNECTIONS} legitimate connections made it", o.connected);
    assert!(o.echoed >= 49, "{} of {LEGIT_CONNECTIONS} exchanges echoed", o.echoed);
    // The application sees the real client address (netfilter SYNPROXY opens the connection
    // to the listener on the client's behalf, with its address and port).
    assert!(o.peers.len() >= 49 && o.peers.iter().all(|p| p.ip() == legit_ip), "peers seen: {:?}", o.peers);
    // The flood was answered in XDP, and never reached the listener: the listener opened
    // (passively) the legitimate connections only, and its queues never overflowed.
    assert!(o.synacks >= FLOOD_FRAMES as u64, "{} SYN-ACKs from XDP for {FLOOD_FRAMES} spoofed SYNs", o.synacks);
    assert!(o.passive_opens <= LEGIT_CONNECTIONS as u64 + 5, "listener opened {} connections", o.passive_opens);
    assert_eq!((o.listen_overflows, o.listen_drops), (0, 0), "listen queue overflows and drops");
    let stats = dp.synproxy_stats().unwrap();
    assert!(stats[event::COOKIE_VALID as usize].packets >= 49);
    // The ceiling counts validated connections only: no spoofed SYN was charged to it.
    let rules = dp.stats().unwrap().rules;
    assert_eq!(rules["test/ceiling"].dropped.packets, 0, "ceiling drops: {:?}", rules["test/ceiling"]);
}

#[test]
fn legitimate_clients_connect_through_a_spoofed_syn_flood() {
    require_root();
    let topo = Topology::new("synp4", 2).expect("namespaces");
    let sh = shield(&topo, &ceiling_plan(Some(SynproxyMode::Always)));
    let o = flood_scenario(&topo, &sh.dp, false);
    assert_through_the_flood(&topo, &sh.dp, &o, false);
}

#[test]
fn legitimate_ipv6_clients_connect_through_a_spoofed_syn_flood() {
    require_root();
    let topo = Topology::new("synp6", 2).expect("namespaces");
    let sh = shield(&topo, &ceiling_plan(Some(SynproxyMode::Always)));
    let o = flood_scenario(&topo, &sh.dp, true);
    assert_through_the_flood(&topo, &sh.dp, &o, true);
}
