//! Parser paths: every header the XDP program walks to reach the source address and the
//! destination port (shown with the probe rule), and which rules judge frames without ports.

use std::net::Ipv6Addr;

use limiter_agent::dataplane::LoadOptions;
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::Packet;

use crate::{
    CLIENT, CLIENT6, PROBE_PORT, SERVER, SERVER6, assert_parsed_to_probe, assert_unparsed, judged, load,
    plan_with_lists, probe, strict_any_port, udp4, udp6, verdict, with_rules,
};

#[test]
fn empty_policy_passes_and_counts_no_rule() {
    let mut dp = load(LoadOptions::default());
    assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
    assert_eq!(dp.stats().unwrap().reason(reason::PASS_NO_RULE).packets, 1);
}

#[test]
fn plain_ipv4_udp_and_tcp_reach_the_port() {
    assert_parsed_to_probe(&udp4().build(), "IPv4/UDP");
    let tcp = Packet::eth().ipv4(CLIENT, SERVER).tcp(40000, PROBE_PORT).syn().build();
    assert_parsed_to_probe(&tcp, "IPv4/TCP");
}

#[test]
fn vlan_and_qinq_tags_are_followed() {
    assert_parsed_to_probe(&udp4().vlan(10).build(), "802.1Q");
    assert_parsed_to_probe(&udp4().qinq(100, 10).build(), "QinQ 802.1ad+802.1Q");
    assert_parsed_to_probe(&udp6().vlan(10).build(), "802.1Q IPv6");
    // A third tag is beyond what the parser follows: unparsed, not misread.
    let three = udp4().tag(0x88a8, 1).tag(0x8100, 2).tag(0x8100, 3).build();
    assert_unparsed(&three, "three VLAN tags");
}

#[test]
fn ipv4_options_are_skipped() {
    // Record-route style options: 8 bytes (IHL 7), and the maximum 40 bytes (IHL 15).
    assert_parsed_to_probe(&udp4().ip_options(&[7, 7, 4, 0, 0, 0, 0, 1]).build(), "IPv4 8 option bytes");
    assert_parsed_to_probe(&udp4().ip_options(&[1; 40]).build(), "IPv4 40 option bytes");
}

#[test]
fn ipv4_with_a_bad_header_length_is_unparsed() {
    assert_unparsed(&udp4().ihl(4).build(), "IHL 4");
    // IHL 15 claims 60 bytes but the frame ends after 20 + 8.
    let frame = Packet::eth().ipv4(CLIENT, SERVER).ihl(15).protocol(17).build();
    assert_unparsed(&frame, "IHL beyond the frame");
}

#[test]
fn every_ipv6_extension_header_is_walked() {
    assert_parsed_to_probe(&udp6().build(), "IPv6/UDP");
    assert_parsed_to_probe(&udp6().hop_by_hop(0).build(), "hop-by-hop");
    assert_parsed_to_probe(&udp6().routing(1, 0).build(), "routing");
    assert_parsed_to_probe(&udp6().dest_opts(2).build(), "destination options");
    assert_parsed_to_probe(&udp6().fragment6(0, true, 7).build(), "fragment header, first fragment");
    let chain = udp6().hop_by_hop(0).routing(0, 0).dest_opts(0).fragment6(0, true, 9).build();
    assert_parsed_to_probe(&chain, "chain of all four");
    // AH counts its length in 4-byte units (RFC 4302): a 24-byte AH read with the 8-byte
    // rule of the others would put the UDP header past the end of this frame.
    assert_parsed_to_probe(&udp6().ah(4).build(), "authentication header");
    let chain = udp6().hop_by_hop(0).ah(4).routing(0, 0).ah(6).dest_opts(1).build();
    assert_parsed_to_probe(&chain, "chain with two authentication headers");
    let tcp_ah = Packet::eth().ipv6(CLIENT6, SERVER6).ah(4).tcp(40000, PROBE_PORT).syn().build();
    assert_parsed_to_probe(&tcp_ah, "IPv6/AH/TCP");
    let tcp6 = Packet::eth().ipv6(CLIENT6, SERVER6).dest_opts(1).tcp(40000, PROBE_PORT).syn().build();
    assert_parsed_to_probe(&tcp6, "IPv6/dest-opts/TCP");
}

#[test]
fn ipv6_with_an_ipv4_mapped_source_is_unparsed_not_mistaken_for_ipv4() {
    // Allow-listing 10.1.0.2 must not let ::ffff:10.1.0.2 through as that IPv4 host.
    let mapped = Packet::eth().ipv6(CLIENT.to_ipv6_mapped(), SERVER6).udp(1, PROBE_PORT).build();
    assert_unparsed(&mapped, "IPv4-mapped IPv6 source");
    let mut dp = load(LoadOptions::default());
    dp.apply(&plan_with_lists(&["10.1.0.2/32"], &[], vec![])).unwrap();
    assert_eq!(verdict(&mut dp, &mapped), XDP_PASS);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::PASS_ALLOW_LIST).packets, 0);
    assert_eq!(stats.reason(reason::PASS_UNPARSED).packets, 1);
}

#[test]
fn first_fragments_carry_the_ports_and_are_judged_by_port_rules() {
    // Later fragments: `fragments.rs`.
    assert_parsed_to_probe(&udp4().mf().build(), "IPv4 first fragment");
    assert_parsed_to_probe(&udp6().fragment6(0, true, 7).build(), "IPv6 first fragment");
}

#[test]
fn icmp_and_icmpv6_echoes_are_judged_by_any_port_rules() {
    let icmp = Packet::eth().ipv4(CLIENT, SERVER).icmp_echo(7, 1).build();
    let icmp6 = Packet::eth().ipv6(CLIENT6, SERVER6).icmpv6_echo(7, 1).build();
    let cases = [(&icmp, "ICMP echo"), (&icmp6, "ICMPv6 echo")];
    // They carry no ports, so a port rule never sees them...
    for (frame, what) in cases {
        let mut dp = probe();
        assert_eq!(judged(&mut dp, frame), (XDP_PASS, reason::PASS_NO_RULE), "{what} against a port rule");
        assert_eq!(judged(&mut dp, frame), (XDP_PASS, reason::PASS_NO_RULE), "{what} against a port rule");
    }
    // ...and the any-port rule judges each: its first echo passes, its second is dropped.
    let mut dp = with_rules(vec![strict_any_port()]);
    for (frame, what) in cases {
        assert_eq!(judged(&mut dp, frame), (XDP_PASS, reason::PASS_CONFORMING), "{what}: first");
        assert_eq!(judged(&mut dp, frame), (XDP_DROP, reason::DROP_SOURCE_BUCKET), "{what}: second");
    }
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/strict"].passed.packets, 2);
    assert_eq!(stats.rules["test/strict"].dropped.packets, 2);
    // An ICMPv6 header cut short has a source, so the any-port rule judges it too (another
    // source, whose bucket is still full): the first copy passes, the second is dropped.
    let other6 = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
    let cut = Packet::eth().ipv6(other6, SERVER6).icmpv6_echo(7, 1).build_with_offsets();
    let cut = &cut.bytes[..cut.l4 + 3];
    assert_eq!(judged(&mut dp, cut), (XDP_PASS, reason::PASS_CONFORMING));
    assert_eq!(judged(&mut dp, cut), (XDP_DROP, reason::DROP_SOURCE_BUCKET));
}
