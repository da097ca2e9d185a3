//! What a normal client sees through the proxy: negotiated options, a real HTTP exchange,
//! the threshold mode, and a connection that outlives the proxy switching on and off.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use limiter_agent::plan::{KernelPlan, Limit, SynproxyMode, SynproxyTarget, Unit};
use limiter_common::synproxy::event;
use limiter_tests::{netns::Topology, packet::Packet, rawsock::RawSender, require_root, require_tool};
use rand::{SeedableRng, rngs::SmallRng};

use super::{Echo, PORT, ceiling_plan, exchange, shield, spoofed_syn, tcp_info};

const HTTP_PORT: u16 = PORT + 1;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

fn stat(sh: &super::Shield<'_>, e: u32) -> u64 {
    sh.dp.synproxy_stats().unwrap()[e as usize].packets
}

#[test]
fn options_are_negotiated_as_without_the_proxy_and_curl_gets_its_page() {
    require_root();
    require_tool("curl");
    let topo = Topology::new("synpc", 1).expect("namespaces");
    let mut plan = ceiling_plan(Some(SynproxyMode::Always));
    plan.synproxy.push(SynproxyTarget { port: HTTP_PORT, mode: SynproxyMode::Always, policy: "test".into() });
    let sh = shield(&topo, &plan);
    let c = topo.client(0);
    let server_ip = c.server.ipv4().unwrap();

    // Options: the client's view (from the XDP SYN-ACK) and the listener's (from netfilter's
    // SYN on the client's behalf) must agree, as they do without a proxy.
    let echo = Echo::start(&topo.server, false);
    let server: SocketAddr = (server_ip, PORT).into();
    let client_info = c.ns.run(|| {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).expect("connect through the proxy");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(b"options").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 7);
        tcp_info(&s)
    });
    thread::sleep(Duration::from_millis(100));
    let server_info = echo.infos.lock().unwrap()[0];
    drop(echo);
    let all = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE;
    assert_eq!(client_info.options & all, all, "client negotiated {client_info:?}");
    assert_eq!(server_info.options & all, all, "listener negotiated {server_info:?}");
    // The scale the XDP SYN-ACK announced is the one the listener really applies, and the
    // client's reached the listener through the timestamp cookie.
    assert_eq!(client_info.snd_wscale, server_info.rcv_wscale, "client {client_info:?}, listener {server_info:?}");
    assert_eq!(client_info.rcv_wscale, server_info.snd_wscale, "client {client_info:?}, listener {server_info:?}");
    // MSS 1460 less the 12 bytes of timestamp option.
    assert_eq!(client_info.snd_mss, 1448, "client {client_info:?}");

    // A real HTTP exchange with a real server and client.
    let _http = topo
        .server
        .spawn(&[
            "/usr/bin/python3",
            "-m",
            "http.server",
            &HTTP_PORT.to_string(),
            "--bind",
            &server_ip.to_string(),
            "--directory",
            env!("CARGO_MANIFEST_DIR"),
        ])
        .expect("start a small HTTP server");
    let valid_before = stat(&sh, event::COOKIE_VALID);
    let url = format!("http://{server_ip}:{HTTP_PORT}/Cargo.toml");
    let mut body = String::new();
    for _ in 0..50 {
        // The server takes a moment to listen: retried until it answers (bounded).
        let out = c.ns.output(&["curl", "-s", "-m", "5", &url]).expect("run curl");
        if out.status.success() {
            body = String::from_utf8_lossy(&out.stdout).into_owned();
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(body.contains("name = \"limiter-tests\""), "curl got: {body:?}");
    assert!(stat(&sh, event::COOKIE_VALID) > valid_before, "the exchange went through the cookie path");
}

/// A long-lived connection: made, then used again after each change of the proxy.
struct Held {
    stream: TcpStream,
    n: usize,
}

impl Held {
    fn ping(&mut self) -> bool {
        self.n += 1;
        let msg = format!("ping {}", self.n);
        if self.stream.write_all(msg.as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(self.stream.read(&mut buf), Ok(n) if &buf[..n] == msg.as_bytes())
    }
}

/// An echo server that echoes every read until the peer closes (the held connection), on
/// IPv4 and IPv6 (a dual-stack socket).
fn echo_forever(topo: &Topology) -> std::net::TcpListener {
    let listener = topo.server.run(|| std::net::TcpListener::bind(("::", PORT))).expect("listen on the proxied port");
    let l = listener.try_clone().unwrap();
    thread::spawn(move || {
        while let Ok((mut conn, _)) = l.accept() {
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    listener
}

#[test]
fn threshold_mode_answers_only_above_the_rate_and_a_held_connection_survives_every_switch() {
    require_root();
    let topo = Topology::new("synpt", 2).expect("namespaces");
    // Cookies only beyond 20 new connections per second (burst 5).
    let threshold = SynproxyMode::Threshold(Limit { requests: 20, unit: Unit::Second, burst: 5 });
    let sh = shield(&topo, &ceiling_plan(Some(threshold)));
    let listener = echo_forever(&topo);
    let (attacker, legit) = (topo.client(0), topo.client(1));
    let server: SocketAddr = (legit.server.ipv4().unwrap(), PORT).into();

    // Below the threshold: SYNs go to the listener itself.
    let mut held = legit.ns.run(|| {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(2)).expect("connect below the threshold");
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Held { stream, n: 0 }
    });
    assert!(held.ping(), "held connection, before the flood");
    assert!(stat(&sh, event::BELOW_THRESHOLD) >= 1);
    assert_eq!(stat(&sh, event::SYNACK_SENT), 0, "no cookie below the threshold");

    // A flood takes the port above the threshold: cookies, while the held connection and new
    // ones keep working.
    let tx = RawSender::open(&attacker.ns, &attacker.client.name).unwrap();
    let (mac, attacked) = (attacker.server.mac, attacker.server.ipv4().unwrap().into());
    let results = thread::scope(|s| {
        s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(16);
            for i in 0..2_000 {
                tx.send(&spoofed_syn(&mut rng, mac, attacked)).unwrap();
                if i % 10 == 9 {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        });
        thread::sleep(Duration::from_millis(300));
        legit.ns.run(|| {
            (0..10)
                .map(|i| {
                    let start = Instant::now();
                    let r = exchange(server, i);
                    if let Some(rest) = Duration::from_millis(100).checked_sub(start.elapsed()) {
                        thread::sleep(rest);
                    }
                    r
                })
                .collect::<Vec<_>>()
        })
    });
    assert!(held.ping(), "held connection, during the flood (cookies on)");
    let ok = results.iter().filter(|r| r.0 && r.1).count();
    assert!(ok >= 9, "{ok} of 10 exchanges during the flood");
    assert!(stat(&sh, event::SYNACK_SENT) >= 1_500, "cookies above the threshold: {}", stat(&sh, event::SYNACK_SENT));
    assert!(stat(&sh, event::ESTABLISHED) >= 2, "the held connection's segments passed as established");

    // The proxy switched to Always, then off (the netfilter half removed): still working.
    let mut dp = sh.dp;
    topo.server.run(|| dp.apply(&ceiling_plan(Some(SynproxyMode::Always))).expect("apply Always"));
    assert!(held.ping(), "held connection, after switching to Always");
    topo.server.run(|| dp.apply(&KernelPlan { synproxy: Vec::new(), ..ceiling_plan(None) }).expect("apply off"));
    assert!(!topo.server.run(limiter_agent::synproxy::installed), "the netfilter half is gone with the last port");
    assert!(held.ping(), "held connection, after switching the proxy off");
    drop(listener);
}

/// The case netfilter alone cannot handle: conntrack starts tracking only when the proxy's
/// table is first installed, so with `nf_conntrack_tcp_loose = 0` the next segments of a
/// connection opened before are invalid, exactly like a bad cookie ACK. The TC-ingress marker
/// finds their socket and the table lets them through.
#[test]
fn connections_opened_before_the_proxy_first_switches_on_keep_working() {
    require_root();
    require_tool("nft");
    let topo = Topology::new("synpfirst", 1).expect("namespaces");
    let c = topo.client(0);
    // The shield without the proxy: no netfilter table, so nothing in this namespace tracks.
    let mut dp = limiter_agent::dataplane::Dataplane::load(limiter_agent::dataplane::LoadOptions::default())
        .expect("load the XDP programs");
    let nft_guard = super::NftGuard(&topo.server);
    topo.server.run(|| {
        dp.apply(&ceiling_plan(None)).expect("apply the plan without the proxy");
        dp.attach(&c.server.name, limiter_agent::dataplane::AttachMode::Native).expect("attach");
    });
    assert!(!topo.server.run(limiter_agent::synproxy::installed), "no netfilter half yet");
    let peers = limiter_tests::synproxy::client_side_xdp(&topo).expect("client-side XDP programs");
    let sh = super::Shield { dp, _peers: peers, _nft: nft_guard };
    let listener = echo_forever(&topo);

    let v4: SocketAddr = (c.server.ipv4().unwrap(), PORT).into();
    let v6: SocketAddr = (c.server.ipv6().unwrap(), PORT).into();
    let open = |server: SocketAddr| {
        c.ns.run(|| {
            let stream =
                TcpStream::connect_timeout(&server, Duration::from_secs(2)).expect("connect without the proxy");
            stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            Held { stream, n: 0 }
        })
    };
    let (mut held4, mut held6) = (open(v4), open(v6));
    assert!(held4.ping() && held6.ping(), "held connections, before the proxy");
    assert_eq!(stat(&sh, event::ESTABLISHED), 0, "nothing went through the proxy yet");

    // First switch-on: the table (and with it conntrack, loose pick-up off) comes now.
    let mut dp = sh.dp;
    topo.server.run(|| dp.apply(&ceiling_plan(Some(SynproxyMode::Always))).expect("apply Always"));
    assert!(topo.server.run(limiter_agent::synproxy::installed), "the netfilter half is installed");
    let sh = super::Shield { dp, _peers: sh._peers, _nft: sh._nft };
    for round in 0..3 {
        assert!(held4.ping(), "IPv4 connection opened before the proxy, round {round}");
        assert!(held6.ping(), "IPv6 connection opened before the proxy, round {round}");
    }
    assert!(stat(&sh, event::ESTABLISHED) >= 6, "their segments passed the XDP proxy as established");
    // The proxy is really on: new connections go through cookies, on both families.
    let synacks = stat(&sh, event::SYNACK_SENT);
    for server in [v4, v6] {
        let mut fresh = open(server);
        assert!(fresh.ping(), "a new connection through the proxy to {server}");
    }
    assert!(stat(&sh, event::SYNACK_SENT) >= synacks + 2, "the new connections got cookie SYN-ACKs");
    // A segment of no connection (a bare ACK with a bogus cookie) is still dropped in XDP.
    let bad = stat(&sh, event::COOKIE_INVALID);
    let tx = RawSender::open(&c.ns, &c.client.name).unwrap();
    let (src, dst) = (c.client.ipv4().unwrap().into(), c.server.ipv4().unwrap().into());
    tx.send(&Packet::eth().dst_mac(c.server.mac).ip(src, dst).tcp(40_000, PORT).seq(1000).ack().ack_num(12345).build())
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(stat(&sh, event::COOKIE_INVALID), bad + 1, "a bogus ACK is still a bad cookie");

    // Off again: nothing changes for them.
    let mut dp = sh.dp;
    topo.server.run(|| dp.apply(&ceiling_plan(None)).expect("apply off"));
    assert!(held4.ping() && held6.ping(), "held connections, after the proxy switched off");
    drop(listener);
}
