//! The shapes an attacker picks to slip past a parser (issue 10): once the source address is
//! read, the lists always judge the frame, and a frame whose port cannot be known is dropped
//! (README: "Verdicts for what the parser cannot follow").

use limiter_agent::plan::{CountKind, Protocol, Unit};
use limiter_common::{MAX_IPV6_EXT_HEADERS, XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::{ETH_P_QINQ1, Ipv6Ext, NEXTHDR_HIP, NEXTHDR_MOBILITY, NEXTHDR_SHIM6, Packet};

use crate::{
    CLIENT, CLIENT6, PROBE_PORT, SERVER, SERVER6, assert_lists_judge, assert_parsed_to_probe, judged, on_port,
    per_source, rule, strict_any_port, udp4, udp6, with_rules,
};

fn syn4() -> Packet {
    Packet::eth().ipv4(CLIENT, SERVER).tcp(40000, PROBE_PORT).syn()
}

fn syn6() -> Packet {
    Packet::eth().ipv6(CLIENT6, SERVER6).tcp(40000, PROBE_PORT).syn()
}

#[test]
fn an_ipv4_tiny_first_fragment_is_judged_by_the_lists_then_dropped() {
    // RFC 1858: the first fragment holds 8 bytes of TCP (ports and sequence number, no flags).
    let frags = syn4().ip_id(77).fragments(8, 0);
    assert_eq!(frags.len(), 3);
    assert_lists_judge(&frags[0], reason::DROP_L4_TRUNCATED, "IPv4 tiny first fragment");
    // 16 bytes still miss the flags.
    let frags = syn4().ip_id(78).fragments(16, 0);
    assert_lists_judge(&frags[0], reason::DROP_L4_TRUNCATED, "IPv4 first fragment with 16 bytes of TCP");
    // A UDP first fragment carries the whole 8-byte header: judged by the port's rules.
    let frags = udp4().payload(&[7; 40]).fragments(8, 0);
    assert_parsed_to_probe(&frags[0], "IPv4 UDP first fragment of 8 bytes");
}

#[test]
fn the_ip_length_not_the_frame_length_bounds_the_transport_header() {
    // A tiny fragment padded to Ethernet's 60-byte minimum (as a NIC pads it): the padding
    // is not TCP header, so the frame is still a tiny fragment, not a complete non-SYN.
    let mut frame = syn4().ip_id(79).fragments(8, 0).remove(0);
    assert_eq!(frame.len(), 14 + 20 + 8);
    frame.resize(60, 0);
    assert_lists_judge(&frame, reason::DROP_L4_TRUNCATED, "padded tiny fragment");
    // An IPv6 payload length that ends inside the UDP header.
    let short6 = udp6().ip_len(4).build();
    assert_lists_judge(&short6, reason::DROP_L4_TRUNCATED, "IPv6 payload length inside the UDP header");
}

#[test]
fn ipv6_udp_behind_nine_destination_options_reaches_the_port() {
    let mut p = udp6();
    for _ in 0..9 {
        p = p.dest_opts(0);
    }
    assert_parsed_to_probe(&p.build(), "nine destination-options headers");
    assert_lists_judge(&p.build(), reason::PASS_CONFORMING, "nine destination-options headers");
}

#[test]
fn the_extension_header_walk_reaches_its_bound_and_drops_past_it() {
    let chain = |n: u32| {
        let mut p = udp6();
        for _ in 0..n {
            p = p.dest_opts(0);
        }
        p.build()
    };
    assert_parsed_to_probe(&chain(MAX_IPV6_EXT_HEADERS), "as many extension headers as the walk allows");
    let long = chain(MAX_IPV6_EXT_HEADERS + 1);
    assert_lists_judge(&long, reason::DROP_HEADER_CHAIN, "one extension header past the bound");
    // A chain cut short (the frame ends inside an extension header's first two bytes, so the
    // next header is unknown) is the same.
    let cut = udp6().dest_opts(0).hop_by_hop(2).build_with_offsets();
    assert_lists_judge(&cut.bytes[..cut.l3 + 40 + 8 + 1], reason::DROP_HEADER_CHAIN, "chain cut short");
    // Cut inside the last extension header, past its next-header byte: the header is not
    // all there, so the chain is cut short too (the UDP named in it is not followed).
    assert_lists_judge(&cut.bytes[..cut.l3 + 40 + 8 + 12], reason::DROP_HEADER_CHAIN, "cut inside a header");
    // Cut after the whole chain: the transport is known to be UDP, and its header is missing.
    assert_lists_judge(&cut.bytes[..cut.l3 + 40 + 8 + 24 + 4], reason::DROP_L4_TRUNCATED, "cut after the chain");
}

#[test]
fn an_extension_header_cut_short_by_the_frame_or_the_ip_length_is_a_cut_chain() {
    // Fuzz finding F2 (issue 10): a 24-byte hop-by-hop header of which 8 bytes are present.
    // Only its first two bytes used to be checked, so the walk went on to the next header it
    // names: GRE (no ports) passed as no_rule, UDP was called a truncated transport.
    for (next, what) in [(47, "GRE"), (17, "UDP")] {
        let p = Packet::eth().ipv6(CLIENT6, SERVER6).hop_by_hop(2).protocol(next);
        let frame = p.clone().truncate_to(14 + 40 + 8).build();
        assert_lists_judge(&frame, reason::DROP_HEADER_CHAIN, &format!("hop-by-hop naming {what}, cut by the frame"));
        // The same cut made by the payload length, the frame carrying bytes past it.
        let frame = p.ip_len(8).payload(&[0; 24]).build();
        assert_lists_judge(&frame, reason::DROP_HEADER_CHAIN, &format!("hop-by-hop naming {what}, cut by the length"));
    }
    // An authentication header counts 4-byte units: one of 16 bytes cut after 8.
    let frame = udp6().ah(2).build_with_offsets();
    assert_lists_judge(&frame.bytes[..frame.l3 + 40 + 8], reason::DROP_HEADER_CHAIN, "AH cut short");
}

#[test]
fn a_fragment_header_past_the_walks_bound_is_not_followed() {
    // Fuzz finding F3 (issue 10): the walk's extra step, there to see the transport, used to
    // process a fragment header as header number MAX_IPV6_EXT_HEADERS + 1: a later fragment
    // was looked up in the fragment table (and judged by a first fragment's port).
    let past = |offset: u16, more: bool| {
        let mut p = udp6();
        for _ in 0..MAX_IPV6_EXT_HEADERS {
            p = p.dest_opts(0);
        }
        p.fragment6(offset, more, 7).build()
    };
    assert_lists_judge(&past(3, false), reason::DROP_HEADER_CHAIN, "later fragment header past the bound");
    assert_lists_judge(&past(0, true), reason::DROP_HEADER_CHAIN, "first fragment header past the bound");
    // With a first fragment of the same datagram (source, destination, id 7, next header UDP)
    // in the table, the frame past the bound is still dropped, not judged by its port.
    let mut dp = with_rules(vec![]);
    let first = udp6().fragment6(0, true, 7).build();
    assert_eq!(judged(&mut dp, &first), (XDP_PASS, reason::PASS_NO_RULE), "the first fragment");
    assert_eq!(judged(&mut dp, &past(3, false)), (XDP_DROP, reason::DROP_HEADER_CHAIN), "past the bound");
}

#[test]
fn an_ipv6_first_fragment_without_the_whole_tcp_header_is_dropped_after_the_lists() {
    let frags = syn6().fragments(8, 0x1234);
    assert_eq!(frags.len(), 3);
    assert_lists_judge(&frags[0], reason::DROP_L4_TRUNCATED, "IPv6 tiny first fragment");
    // Extension headers in the fragmentable part (RFC 8200 4.5): a first fragment that ends
    // right after them says TCP but holds none of its header.
    let frags = syn6().dest_opts(0).fragments(8, 0x1235);
    assert_lists_judge(&frags[0], reason::DROP_L4_TRUNCATED, "IPv6 first fragment ending after a dest-opts header");
    let frags = syn6().dest_opts(0).fragments(16, 0x1236);
    assert_lists_judge(&frags[0], reason::DROP_L4_TRUNCATED, "IPv6 first fragment with 8 bytes of TCP");
}

#[test]
fn truncated_tcp_and_udp_are_dropped_after_the_lists() {
    let tcp = syn4().build_with_offsets();
    assert_lists_judge(&tcp.bytes[..tcp.l4 + 12], reason::DROP_L4_TRUNCATED, "cut inside the TCP header");
    assert_lists_judge(&tcp.bytes[..tcp.l4], reason::DROP_L4_TRUNCATED, "TCP header missing");
    let udp = udp4().build_with_offsets();
    assert_lists_judge(&udp.bytes[..udp.l4 + 4], reason::DROP_L4_TRUNCATED, "cut inside the UDP header");
    let tcp6 = syn6().ah(4).build_with_offsets();
    assert_lists_judge(&tcp6.bytes[..tcp6.l4 + 19], reason::DROP_L4_TRUNCATED, "TCP after an AH, cut");
}

#[test]
fn truncated_icmp_and_unknown_transports_are_judged_by_lists_and_any_port_rules() {
    let icmp = Packet::eth().ipv4(CLIENT, SERVER).icmp_echo(1, 1).build_with_offsets();
    let icmp6 = Packet::eth().ipv6(CLIENT6, SERVER6).icmpv6_echo(1, 1).build_with_offsets();
    let gre = Packet::eth().ipv4(CLIENT, SERVER).protocol(47).payload(&[0; 16]).build();
    let none6 = Packet::eth().ipv6(CLIENT6, SERVER6).payload(&[0; 16]).build();
    let cases: [(&[u8], &str); 4] = [
        (&icmp.bytes[..icmp.l4 + 2], "ICMP cut inside its header"),
        (&icmp6.bytes[..icmp6.l4 + 3], "ICMPv6 cut inside its header"),
        (&gre, "GRE (no ports)"),
        (&none6, "IPv6 no next header"),
    ];
    for (frame, what) in cases {
        // The strict any-port rule of `assert_lists_judge` admits the first of its source.
        assert_lists_judge(frame, reason::PASS_CONFORMING, what);
        let mut dp = with_rules(vec![strict_any_port()]);
        assert_eq!(judged(&mut dp, frame), (XDP_PASS, reason::PASS_CONFORMING), "{what}: first");
        assert_eq!(judged(&mut dp, frame), (XDP_DROP, reason::DROP_SOURCE_BUCKET), "{what}: second");
    }
}

#[test]
fn the_9100_qinq_tag_is_followed() {
    assert_parsed_to_probe(&udp4().tag(ETH_P_QINQ1, 100).vlan(10).build(), "QinQ 0x9100 + 802.1Q");
    assert_parsed_to_probe(&udp6().tag(ETH_P_QINQ1, 100).build(), "one 0x9100 tag, IPv6");
    let three = udp4().tag(ETH_P_QINQ1, 1).tag(0x88a8, 2).vlan(3).build();
    crate::assert_unparsed(&three, "three tags, the outer one 0x9100");
}

#[test]
fn mobility_hip_and_shim6_headers_are_walked_as_extension_headers() {
    for (code, what) in [(NEXTHDR_MOBILITY, "mobility"), (NEXTHDR_HIP, "HIP"), (NEXTHDR_SHIM6, "Shim6")] {
        let p = udp6().ext(Ipv6Ext::Generic { code, len: 1 });
        assert_parsed_to_probe(&p.build(), what);
        let tcp = syn6().hop_by_hop(0).ext(Ipv6Ext::Generic { code, len: 0 }).dest_opts(0);
        assert_parsed_to_probe(&tcp.build(), what);
    }
}

#[test]
fn a_port_rule_cannot_be_evaded_by_any_shape() {
    // The user: a rule on TCP and UDP 9000 only, no any-port rule. Each shape either
    // reaches the port (and is limited) or is dropped; none passes unjudged.
    let r = per_source(rule("port", CountKind::Packets, 1, Unit::Hour, 0));
    let r = on_port(on_port(r, PROBE_PORT, Protocol::Tcp), PROBE_PORT, Protocol::Udp);
    let mut nine = udp6();
    for _ in 0..9 {
        nine = nine.dest_opts(0);
    }
    let mut seventeen = udp6();
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        seventeen = seventeen.dest_opts(0);
    }
    let shapes: Vec<(Vec<u8>, &str)> = vec![
        (syn4().fragments(8, 0).remove(0), "IPv4 tiny first fragment"),
        (syn6().fragments(8, 5).remove(0), "IPv6 tiny first fragment"),
        (nine.build(), "IPv6 UDP behind 9 destination options"),
        (seventeen.build(), "IPv6 UDP behind 17 destination options"),
        (syn4().fragments(8, 0).remove(1), "IPv4 later fragment alone"),
    ];
    for (frame, what) in shapes {
        let mut dp = with_rules(vec![r.clone()]);
        let first = judged(&mut dp, &frame);
        let second = judged(&mut dp, &frame);
        assert_eq!(second.0, XDP_DROP, "{what}: a second copy must not pass ({first:?} then {second:?})");
    }
}
