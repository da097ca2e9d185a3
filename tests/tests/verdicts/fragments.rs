//! Fragments: the first fragment judges the datagram by its port and leaves the port and its
//! verdict in the fragment table; later fragments are judged by the same port's rules, cost a
//! packet and their bytes but never a connection, and are dropped when their datagram was
//! dropped or their first fragment never seen (README: "Fragments").

use limiter_agent::plan::{CountKind, Protocol, Unit};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::Packet;

use crate::{
    CLIENT, CLIENT6, PROBE_PORT, SERVER, SERVER6, assert_lists_judge, judged, on_port, per_source, rule, udp4,
    with_rules,
};

fn udp_datagram(id: u16) -> Packet {
    // 8 + 24 bytes of UDP: four 8-byte fragments.
    udp4().ip_id(id).payload(&[0x5a; 24])
}

#[test]
fn later_fragments_are_judged_by_the_rules_of_their_first_fragments_port() {
    let r = on_port(per_source(rule("port", CountKind::Packets, 3, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![r]);
    let one = udp_datagram(1).fragments(8, 0);
    assert_eq!(one.len(), 4);
    assert_eq!(judged(&mut dp, &one[0]), (XDP_PASS, reason::PASS_CONFORMING), "first fragment");
    assert_eq!(judged(&mut dp, &one[1]), (XDP_PASS, reason::PASS_CONFORMING), "second: charged to the port");
    assert_eq!(judged(&mut dp, &one[2]), (XDP_PASS, reason::PASS_CONFORMING), "third");
    assert_eq!(judged(&mut dp, &one[3]), (XDP_DROP, reason::DROP_SOURCE_PORT_BUCKET), "fourth: over 3 packets");
    // The datagram cannot be reassembled any more: its fragments cost nothing from now on.
    assert_eq!(judged(&mut dp, &one[3]), (XDP_DROP, reason::DROP_FRAGMENT_OF_DROPPED), "fourth again");
    assert_eq!(judged(&mut dp, &one[1]), (XDP_DROP, reason::DROP_FRAGMENT_OF_DROPPED), "second again");
    // The next datagram's first fragment is refused, and so are its later fragments.
    let two = udp_datagram(2).fragments(8, 0);
    assert_eq!(judged(&mut dp, &two[0]), (XDP_DROP, reason::DROP_SOURCE_PORT_BUCKET));
    for f in &two[1..] {
        assert_eq!(judged(&mut dp, f), (XDP_DROP, reason::DROP_FRAGMENT_OF_DROPPED));
    }
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::EVENT_NON_FIRST_FRAGMENT).packets, 3, "later fragments judged by the port");
    assert_eq!(stats.rules["test/port"].passed.packets, 3);
    assert_eq!(stats.rules["test/port"].dropped.packets, 2);
}

#[test]
fn fragments_of_a_datagram_to_another_port_are_not_charged_by_this_ports_rule() {
    let r = on_port(per_source(rule("port", CountKind::Packets, 1, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![r]);
    let elsewhere = Packet::eth().ipv4(CLIENT, SERVER).ip_id(9).udp(40000, 53).payload(&[1; 24]);
    for f in elsewhere.fragments(8, 0) {
        assert_eq!(judged(&mut dp, &f), (XDP_PASS, reason::PASS_NO_RULE));
    }
    // The source's quota on the protected port is untouched.
    assert_eq!(judged(&mut dp, &udp4().build()), (XDP_PASS, reason::PASS_CONFORMING));
}

#[test]
fn a_later_fragment_whose_first_was_never_seen_is_dropped_after_the_lists() {
    let later4 = udp_datagram(3).fragments(8, 0).remove(2);
    assert_lists_judge(&later4, reason::DROP_FRAGMENT_UNKNOWN, "IPv4 later fragment alone");
    let udp6 = Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(&[1; 24]);
    let later6 = udp6.fragments(8, 0xbeef).remove(1);
    assert_lists_judge(&later6, reason::DROP_FRAGMENT_UNKNOWN, "IPv6 later fragment alone");
    // The same fragment after its first fragment is judged by the port's rules instead.
    let mut dp = with_rules(vec![]);
    let frags = udp6.fragments(8, 0xbeef);
    assert_eq!(judged(&mut dp, &frags[0]), (XDP_PASS, reason::PASS_NO_RULE));
    assert_eq!(judged(&mut dp, &frags[1]), (XDP_PASS, reason::PASS_NO_RULE));
    // Another datagram (identification) of the same source and port is not that one.
    let other = udp6.fragments(8, 0xbef0).remove(1);
    assert_eq!(judged(&mut dp, &other), (XDP_DROP, reason::DROP_FRAGMENT_UNKNOWN));
}

#[test]
fn a_connection_limit_holds_for_a_source_that_fragments_every_syn() {
    // The scenario: 2 connections per hour per source on TCP 9000, then 10 SYNs.
    let conn =
        || on_port(per_source(rule("conn", CountKind::Connections, 2, Unit::Hour, 0)), PROBE_PORT, Protocol::Tcp);
    let syn = |i: u16| Packet::eth().ipv4(CLIENT, SERVER).ip_id(100 + i).tcp(40000 + i, PROBE_PORT).syn();

    // 8-byte fragments: every first fragment is tiny and dropped, so no SYN gets through.
    let mut dp = with_rules(vec![conn()]);
    for i in 0..10 {
        let frags = syn(i).fragments(8, 0);
        assert_eq!(judged(&mut dp, &frags[0]), (XDP_DROP, reason::DROP_L4_TRUNCATED), "SYN {i}: first fragment");
        for f in &frags[1..] {
            assert_eq!(judged(&mut dp, f), (XDP_DROP, reason::DROP_FRAGMENT_UNKNOWN), "SYN {i}: later fragment");
        }
    }

    // Fragments that carry the whole TCP header: the first fragment is the connection
    // attempt, judged like an unfragmented SYN; later ones never count as connections.
    let mut dp = with_rules(vec![conn()]);
    let mut admitted = 0;
    for i in 0..10 {
        let frags = syn(i).payload(&[0; 40]).fragments(24, 0);
        assert_eq!(frags.len(), 3);
        let (v, why) = judged(&mut dp, &frags[0]);
        if v == XDP_PASS {
            admitted += 1;
            assert_eq!(why, reason::PASS_CONFORMING);
            for f in &frags[1..] {
                assert_eq!(judged(&mut dp, f), (XDP_PASS, reason::PASS_NO_RULE), "SYN {i}: later fragment");
            }
        } else {
            assert_eq!(why, reason::DROP_SOURCE_PORT_BUCKET, "SYN {i}");
            for f in &frags[1..] {
                assert_eq!(judged(&mut dp, f), (XDP_DROP, reason::DROP_FRAGMENT_OF_DROPPED), "SYN {i}");
            }
        }
    }
    assert_eq!(admitted, 2, "2 connections per hour, fragmented or not");
    assert_eq!(dp.stats().unwrap().rules["test/conn"].passed.packets, 2);
}

#[test]
fn byte_rules_charge_every_fragments_length() {
    let bytes = on_port(per_source(rule("bytes", CountKind::Bytes, 100_000, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![bytes]);
    let frags = udp4().ip_id(5).payload(&[3; 1000]).fragments(256, 0);
    assert_eq!(frags.len(), 4);
    for f in &frags {
        assert_eq!(judged(&mut dp, f).0, XDP_PASS);
    }
    let total: usize = frags.iter().map(Vec::len).sum();
    assert_eq!(dp.stats().unwrap().rules["test/bytes"].passed.bytes, total as u64, "every fragment's bytes");
}

#[test]
fn a_packet_rule_counts_each_fragment_of_an_ipv6_datagram() {
    let r = on_port(per_source(rule("port", CountKind::Packets, 2, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![r]);
    let frags = Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(&[1; 24]).fragments(16, 42);
    assert_eq!(frags.len(), 2);
    assert_eq!(judged(&mut dp, &frags[0]), (XDP_PASS, reason::PASS_CONFORMING));
    assert_eq!(judged(&mut dp, &frags[1]), (XDP_PASS, reason::PASS_CONFORMING));
    let next = Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(&[1; 24]).fragments(16, 43);
    assert_eq!(judged(&mut dp, &next[0]), (XDP_DROP, reason::DROP_SOURCE_PORT_BUCKET));
    assert_eq!(judged(&mut dp, &next[1]), (XDP_DROP, reason::DROP_FRAGMENT_OF_DROPPED));
}

#[test]
fn ipv6_fragments_are_keyed_by_the_fragment_headers_next_header() {
    // Fuzz finding F1 (issue 10): a datagram with a destination-options header after the
    // fragment header (RFC 8200 allows it in the fragmentable part). Every fragment's fragment
    // header names 60; the first fragment's transport, past the options, is UDP. The table
    // was keyed by the latter for first fragments and the former for later ones.
    let r = on_port(per_source(rule("port", CountKind::Packets, 3, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![r]);
    let udp6 = Packet::eth().ipv6(CLIENT6, SERVER6).dest_opts(0).udp(40000, PROBE_PORT).payload(&[1; 24]);
    // 16 bytes a fragment: the first carries the options and the UDP header.
    let frags = udp6.fragments(16, 7);
    assert_eq!(frags.len(), 3);
    assert_eq!(frags[1][14 + 40], 60, "the fragment header names the destination options");
    assert_eq!(judged(&mut dp, &frags[0]), (XDP_PASS, reason::PASS_CONFORMING), "first fragment");
    assert_eq!(judged(&mut dp, &frags[1]), (XDP_PASS, reason::PASS_CONFORMING), "second: charged to the port");
    assert_eq!(judged(&mut dp, &frags[2]), (XDP_PASS, reason::PASS_CONFORMING), "third");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::EVENT_NON_FIRST_FRAGMENT).packets, 2, "later fragments judged by the port");
    assert_eq!(stats.rules["test/port"].passed.packets, 3);
    // A later fragment with the same source, destination and id whose fragment header names
    // UDP belongs to another datagram: it must not pick up this one's port.
    let plain = Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(&[1; 24]);
    let other = plain.fragments(8, 7).remove(1);
    assert_eq!(other[14 + 40], 17);
    assert_eq!(judged(&mut dp, &other), (XDP_DROP, reason::DROP_FRAGMENT_UNKNOWN), "fragment header naming UDP");
}
