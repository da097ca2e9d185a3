//! BPF_PROG_TEST_RUN on hand-built frames through the proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use limiter_agent::{
    dataplane::{Dataplane, LoadOptions},
    plan::{ListEntry, SynproxyMode},
};
use limiter_common::synproxy::event;
use limiter_tests::{netns::Netns, packet::Packet, require_root, require_tool};

use super::{NftGuard, PORT, ceiling_plan};

/// BPF_PROG_TEST_RUN on hand-built frames: what the proxy answers and what it drops, with no
/// socket behind any of them (a namespace of its own, nothing listening).
#[test]
fn malformed_segments_and_bad_cookies_are_dropped_and_syns_answered() {
    require_root();
    require_tool("nft");
    let ns = Netns::new("synpv").expect("namespace");
    let _nft = NftGuard(&ns);
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load the XDP programs");
    let (src, dst): (IpAddr, IpAddr) = (Ipv4Addr::new(198, 51, 100, 7).into(), Ipv4Addr::new(192, 0, 2, 1).into());
    let (src6, dst6): (IpAddr, IpAddr) = ("2001:db8::7".parse().unwrap(), "2001:db8::1".parse().unwrap());
    let seg = |s: IpAddr, d: IpAddr, port: u16| Packet::eth().ip(s, d).tcp(40_000, port).seq(1000);
    let verdicts = ns.run(|| {
        let mut plan = ceiling_plan(Some(SynproxyMode::Always));
        let entry = |net: &str| ListEntry { net: net.parse().unwrap(), policy: "test".into() };
        plan.deny = vec![entry("203.0.113.0/24")];
        plan.allow = vec![entry("198.18.0.0/15")];
        dp.apply(&plan).expect("apply");
        let mut run = |frame: Vec<u8>| dp.test_run(&frame).expect("test run");
        vec![
            ("SYN", run(seg(src, dst, PORT).syn().build())),
            ("SYN v6", run(seg(src6, dst6, PORT).syn().build())),
            (
                "SYN with options",
                run(seg(src, dst, PORT)
                    .syn()
                    .tcp_options(&[2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0, 1, 3, 3, 7])
                    .build()),
            ),
            ("ACK, bad cookie", run(seg(src, dst, PORT).ack().ack_num(12345).build())),
            ("ACK v6, bad cookie", run(seg(src6, dst6, PORT).ack().ack_num(12345).build())),
            ("ACK with data, bad cookie", run(seg(src, dst, PORT).ack().ack_num(777).payload(b"GET /").build())),
            ("SYN-ACK", run(seg(src, dst, PORT).syn().ack().build())),
            ("SYN+FIN", run(seg(src, dst, PORT).syn().fin().build())),
            ("no flags", run(seg(src, dst, PORT).build())),
            ("SYN, bad TCP checksum", run(seg(src, dst, PORT).syn().bad_l4_checksum().build())),
            ("SYN, bad IP checksum", run(seg(src, dst, PORT).syn().bad_ip_checksum().build())),
            ("RST", run(seg(src, dst, PORT).rst().build())),
            ("ACK to another port", run(seg(src, dst, PORT + 1).ack().ack_num(12345).build())),
            // The lists apply before anything is answered: no SYN-ACK to a denied source; an
            // allow-listed one is never limited, so never proxied either.
            ("SYN from a denied source", run(seg(Ipv4Addr::new(203, 0, 113, 9).into(), dst, PORT).syn().build())),
            ("SYN from an allowed source", run(seg(Ipv4Addr::new(198, 18, 0, 9).into(), dst, PORT).syn().build())),
        ]
    });
    const TX: u32 = 3;
    const DROP: u32 = 1;
    const PASS: u32 = 2;
    let expected = [TX, TX, TX, DROP, DROP, DROP, DROP, DROP, DROP, DROP, DROP, PASS, PASS, DROP, PASS];
    for ((what, got), want) in verdicts.iter().zip(expected) {
        assert_eq!(*got, want, "{what}: verdict {got}, expected {want}");
    }
    let stats = dp.synproxy_stats().unwrap();
    assert_eq!(stats[event::SYNACK_SENT as usize].packets, 3);
    assert_eq!(stats[event::COOKIE_INVALID as usize].packets, 3);
    assert_eq!(stats[event::MALFORMED as usize].packets, 5);
    assert_eq!(stats[event::RST as usize].packets, 1);
}

/// BPF_PROG_TEST_RUN of the TC-ingress marker: it marks a segment of a proxied port only when
/// the kernel has a socket other than a listener for its 4-tuple, never a SYN, never another
/// port, and nothing while no port is proxied. The socket is a real connection over the
/// namespace's loopback, where the test run's packets arrive.
#[test]
fn the_marker_marks_segments_of_connections_with_a_socket_and_nothing_else() {
    require_root();
    require_tool("nft");
    let ns = Netns::new("synpmark").expect("namespace");
    let _nft = NftGuard(&ns);
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load the programs");
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let lo6: IpAddr = std::net::Ipv6Addr::LOCALHOST.into();
    let marks = ns.run(|| {
        let _ = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        let listener = std::net::TcpListener::bind(("::", PORT)).expect("listen");
        let other = std::net::TcpListener::bind(("::", PORT + 1)).expect("listen on another port");
        let open = |to: SocketAddr| std::net::TcpStream::connect(to).expect("connect over loopback");
        let (c4, c6) = (open((lo, PORT).into()), open((lo6, PORT).into()));
        let c_other = open((lo, PORT + 1).into());
        let (_a4, _a6, _a_other) = (listener.accept(), listener.accept(), other.accept());
        let from = |c: &std::net::TcpStream| c.local_addr().unwrap().port();
        let seg = |s: IpAddr, sport: u16, dport: u16| Packet::eth().ip(s, s).tcp(sport, dport).seq(1);
        let frames = [
            ("ACK of an established connection", seg(lo, from(&c4), PORT).ack().build()),
            ("ACK of an established connection, IPv6", seg(lo6, from(&c6), PORT).ack().build()),
            ("data of an established connection", seg(lo, from(&c4), PORT).ack().payload(b"GET /").build()),
            ("FIN of an established connection", seg(lo, from(&c4), PORT).ack().fin().build()),
            ("SYN on an established 4-tuple", seg(lo, from(&c4), PORT).syn().build()),
            ("ACK for the listener only (a cookie ACK)", seg(lo, 40_000, PORT).ack().build()),
            ("ACK, IPv6, listener only", seg(lo6, 40_000, PORT).ack().build()),
            ("ACK of a connection to a port not proxied", seg(lo, from(&c_other), PORT + 1).ack().build()),
        ];
        let run = |dp: &mut Dataplane, frame: &[u8]| dp.marker_test_run(frame, 1).expect("test run").0;
        let off: Vec<u32> = frames.iter().map(|(_, f)| run(&mut dp, f)).collect();
        dp.apply(&ceiling_plan(Some(SynproxyMode::Always))).expect("apply");
        let on: Vec<(&str, u32)> = frames.iter().map(|(what, f)| (*what, run(&mut dp, f))).collect();
        (off, on)
    });
    let (off, on) = marks;
    assert!(off.iter().all(|m| *m == 0), "no port proxied: nothing marked, {off:?}");
    let mark = limiter_common::synproxy::SYNPROXY_ESTABLISHED_MARK;
    let expected = [mark, mark, mark, mark, 0, 0, 0, 0];
    for ((what, got), want) in on.iter().zip(expected) {
        assert_eq!(*got, want, "{what}: mark {got:#x}, expected {want:#x}");
    }
}
