//! Verdicts of the real XDP program, in the real kernel, on hand-built frames through
//! `BPF_PROG_TEST_RUN`: every parser path, every list and every bucket.
//!
//! `BPF_PROG_TEST_RUN` runs the program against the same maps live traffic would use, so each
//! test applies a plan through the agent's `Dataplane` exactly as `limiter-agent run` does and
//! then judges frames. Bucket tests use rates slow enough (per hour) that the real clock
//! cannot refill a token during the test; refill over time is covered by the bucket unit
//! tests (controlled time) and the traffic tests.
//!
//! Parser tests use a "probe" rule: 1 per hour on UDP/TCP port 9000 per source. The first
//! frame to port 9000 passes and the second is dropped, which proves the parser found both
//! the source address and the destination port through whatever headers the frame carries.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use limiter_agent::{
    dataplane::{Dataplane, LoadOptions},
    plan::{CountKind, KernelPlan, KernelRule, Limit, ListEntry, PortTarget, Protocol, SourceSelector, Unit},
};
use limiter_common::{Addr, XDP_DROP, XDP_PASS, ipv4_mapped, reason};
use limiter_tests::{
    packet::{Packet, garbage_frames},
    require_root,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const PROBE_PORT: u16 = 9000;

fn load(options: LoadOptions) -> Dataplane {
    require_root();
    Dataplane::load(options).expect("load the XDP program (verifier)")
}

fn rule(name: &str, count: CountKind, requests: u64, unit: Unit, burst: u64) -> KernelRule {
    KernelRule {
        name: format!("test/{name}"),
        targets: Vec::new(),
        source: SourceSelector::everyone(false),
        count,
        limit: Limit { requests, unit, burst },
        shadow: false,
        global: false,
    }
}

fn on_port(mut r: KernelRule, port: u16, protocol: Protocol) -> KernelRule {
    r.targets.push(PortTarget { port, protocol });
    r
}

fn per_source(mut r: KernelRule) -> KernelRule {
    r.source.distinct = true;
    r
}

fn with_rules(rules: Vec<KernelRule>) -> Dataplane {
    let mut dp = load(LoadOptions::default());
    dp.apply(&KernelPlan { rules, ..Default::default() }).expect("apply plan");
    dp
}

/// The probe: one packet per hour per source to port 9000, TCP and UDP.
fn probe() -> Dataplane {
    let probe = per_source(rule("probe", CountKind::Packets, 1, Unit::Hour, 0));
    let probe = on_port(on_port(probe, PROBE_PORT, Protocol::Udp), PROBE_PORT, Protocol::Tcp);
    with_rules(vec![probe])
}

/// The strict any-port rule: one packet per hour per source, whatever the protocol or port.
fn strict_any_port() -> KernelRule {
    per_source(rule("strict", CountKind::Packets, 1, Unit::Hour, 0))
}

fn verdict(dp: &mut Dataplane, frame: &[u8]) -> u32 {
    dp.test_run(frame).expect("BPF_PROG_TEST_RUN")
}

/// Runs `frame` once; returns its verdict and the one verdict reason it was counted under,
/// found by comparing the counters before and after.
fn judged(dp: &mut Dataplane, frame: &[u8]) -> (u32, u32) {
    let before = dp.stats().expect("read counters");
    let v = verdict(dp, frame);
    let after = dp.stats().expect("read counters");
    let counted: Vec<u32> =
        (0..reason::VERDICT_REASONS).filter(|&r| after.reason(r).packets != before.reason(r).packets).collect();
    let names: Vec<&str> = counted.iter().map(|&r| reason::name(r)).collect();
    assert_eq!(counted.len(), 1, "a frame is counted under exactly one verdict reason, not {names:?}");
    let why = counted[0];
    assert_eq!(after.reason(why).packets, before.reason(why).packets + 1, "{}", reason::name(why));
    assert_eq!(reason::is_drop(why), v == XDP_DROP, "verdict {v} but counted as {}", reason::name(why));
    (v, why)
}

/// Runs `frame` twice against a fresh probe and returns both verdicts.
fn probe_twice(frame: &[u8]) -> (u32, u32, Dataplane) {
    let mut dp = probe();
    let first = verdict(&mut dp, frame);
    let second = verdict(&mut dp, frame);
    (first, second, dp)
}

fn assert_parsed_to_probe(frame: &[u8], what: &str) {
    let (first, second, dp) = probe_twice(frame);
    assert_eq!((first, second), (XDP_PASS, XDP_DROP), "{what}: the parser must reach the port");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_SOURCE_PORT_BUCKET).packets, 1, "{what}");
    assert_eq!(stats.rules["test/probe"].dropped.packets, 1, "{what}");
}

fn assert_unparsed(frame: &[u8], what: &str) {
    let (first, second, dp) = probe_twice(frame);
    assert_eq!((first, second), (XDP_PASS, XDP_PASS), "{what}: unparsed frames pass by default");
    assert_eq!(dp.stats().unwrap().reason(reason::PASS_UNPARSED).packets, 2, "{what}: counted as unparsed");
    // With the drop verdict configured, the same frame is dropped.
    let mut dp = load(LoadOptions { drop_unparsed: true, ..Default::default() });
    assert_eq!(verdict(&mut dp, frame), XDP_DROP, "{what}: with drop_unparsed");
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_UNPARSED).packets, 1, "{what}");
}

fn udp4() -> Packet {
    Packet::eth().ipv4(CLIENT, SERVER).udp(40000, PROBE_PORT).payload(b"limiter")
}

fn udp6() -> Packet {
    Packet::eth().ipv6(CLIENT6, SERVER6).udp(40000, PROBE_PORT).payload(b"limiter")
}

// ---------------------------------------------------------------- parser paths

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
fn too_many_ipv6_extension_headers_are_unparsed() {
    let mut p = udp6();
    for _ in 0..limiter_common::MAX_IPV6_EXT_HEADERS {
        p = p.dest_opts(0);
    }
    assert_unparsed(&p.build(), "more extension headers than the walk allows");
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
fn later_fragments_have_no_ports_and_are_judged_by_any_port_rules_only() {
    // Port rules cannot see a later fragment: it passes the probe untouched...
    let later4 = Packet::eth().ipv4(CLIENT, SERVER).frag_offset(185).protocol(17).payload(&[0; 64]).build();
    let later6 = Packet::eth().ipv6(CLIENT6, SERVER6).fragment6(185, false, 7).protocol(17).payload(&[0; 64]).build();
    for (frame, what) in [(&later4, "IPv4 later fragment"), (&later6, "IPv6 later fragment")] {
        let (first, second, dp) = probe_twice(frame);
        assert_eq!((first, second), (XDP_PASS, XDP_PASS), "{what}");
        let stats = dp.stats().unwrap();
        assert_eq!(stats.reason(reason::EVENT_NON_FIRST_FRAGMENT).packets, 2, "{what}");
        assert_eq!(stats.reason(reason::PASS_NO_RULE).packets, 2, "{what}");
    }
    // ...but an any-port per-source rule counts it.
    let mut dp = with_rules(vec![per_source(rule("any", CountKind::Packets, 1, Unit::Hour, 0))]);
    assert_eq!(verdict(&mut dp, &later4), XDP_PASS);
    assert_eq!(verdict(&mut dp, &later4), XDP_DROP);
    // The first fragment carries the ports and is judged by port rules like any packet.
    assert_parsed_to_probe(&udp4().mf().build(), "IPv4 first fragment");
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
    // An ICMPv6 header cut short is unparsed even where that rule would judge it: another
    // source, so its bucket is still full, and both copies pass uncharged.
    let other6 = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
    let cut = Packet::eth().ipv6(other6, SERVER6).icmpv6_echo(7, 1).build_with_offsets();
    let cut = &cut.bytes[..cut.l4 + 3];
    assert_eq!(judged(&mut dp, cut), (XDP_PASS, reason::PASS_UNPARSED));
    assert_eq!(judged(&mut dp, cut), (XDP_PASS, reason::PASS_UNPARSED));
    let whole = Packet::eth().ipv6(other6, SERVER6).icmpv6_echo(7, 1).build();
    assert_eq!(judged(&mut dp, &whole), (XDP_PASS, reason::PASS_CONFORMING), "the cut copies took no token");
}

#[test]
fn truncated_headers_at_each_layer_are_unparsed() {
    let v4 = udp4().build_with_offsets();
    let v6 = udp6().hop_by_hop(1).build_with_offsets();
    let tcp = Packet::eth().ipv4(CLIENT, SERVER).tcp(40000, PROBE_PORT).syn().build_with_offsets();
    let icmp = Packet::eth().ipv4(CLIENT, SERVER).icmp_echo(1, 1).build_with_offsets();
    let icmp6 = Packet::eth().ipv6(CLIENT6, SERVER6).icmpv6_echo(1, 1).build_with_offsets();
    let ah = udp6().ah(4).build_with_offsets();
    let vlan = udp4().vlan(10).build();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vlan[..16].to_vec(), "inside the VLAN tag"),
        (v4.bytes[..v4.l3 + 10].to_vec(), "inside the IPv4 header"),
        (v4.bytes[..v4.l4 + 4].to_vec(), "inside the UDP header"),
        (tcp.bytes[..tcp.l4 + 12].to_vec(), "inside the TCP header"),
        (icmp.bytes[..icmp.l4 + 2].to_vec(), "inside the ICMP header"),
        (icmp6.bytes[..icmp6.l4 + 3].to_vec(), "inside the ICMPv6 header"),
        (ah.bytes[..ah.l3 + 41].to_vec(), "inside the AH's next-header and length bytes"),
        (ah.bytes[..ah.l3 + 40 + 20].to_vec(), "inside the AH's ICV"),
        (ah.bytes[..ah.l4 + 6].to_vec(), "inside the UDP header after an AH"),
        (v6.bytes[..v6.l3 + 30].to_vec(), "inside the IPv6 header"),
        (v6.bytes[..v6.l3 + 44].to_vec(), "inside an IPv6 extension header"),
        (v6.bytes[..v6.l4 + 6].to_vec(), "inside the UDP header after IPv6 extensions"),
    ];
    for (frame, what) in cases {
        assert_unparsed(&frame, what);
    }
    // IPv4 options cut short.
    let opts = udp4().ip_options(&[1; 40]).build_with_offsets();
    assert_unparsed(&opts.bytes[..opts.l3 + 30], "inside the IPv4 options");
}

#[test]
fn header_only_and_garbage_frames_get_the_documented_verdict() {
    // A strict any-port rule judges every frame the parser follows, so the reason each frame
    // is counted under shows what the parser made of it.
    let mut dp = with_rules(vec![strict_any_port()]);
    // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (the kernel never
    // delivers those to XDP either); the shortest frame is a bare Ethernet header.
    assert!(dp.test_run(&[]).is_err(), "the kernel rejects a zero-length test frame");
    let bare_ip = Packet::eth().ethertype(0x0800).build();
    assert_eq!(bare_ip.len(), 14);
    assert_eq!(judged(&mut dp, &bare_ip), (XDP_PASS, reason::PASS_UNPARSED));
    // Non-IP (ARP) is never limited and is not "unparsed", however often it comes.
    let arp = Packet::eth().ethertype(0x0806).payload(&[0; 28]).build();
    for _ in 0..3 {
        assert_eq!(judged(&mut dp, &arp), (XDP_PASS, reason::PASS_NOT_IP));
    }
    // The rule is live: a well-formed packet passes once, then its source is over the limit.
    let mut charged: HashSet<Addr> = HashSet::new();
    assert_eq!(judged(&mut dp, &udp4().build()), (XDP_PASS, reason::PASS_CONFORMING));
    assert_eq!(judged(&mut dp, &udp4().build()), (XDP_DROP, reason::DROP_SOURCE_BUCKET));
    charged.insert(ipv4_mapped(CLIENT.octets()));

    // Random garbage never crashes and never reads out of bounds (the verifier proved that);
    // each frame gets the verdict the README's table gives for what it is.
    let mut seen = [0usize; 3];
    for (i, frame) in garbage_frames(7, 500).iter().enumerate() {
        assert!(frame.len() >= 14, "garbage frame {i} is shorter than an Ethernet header");
        let (_, why) = judged(&mut dp, frame);
        let what = format!("garbage frame {i} ({} bytes) counted as {}", frame.len(), reason::name(why));
        match expected(frame) {
            Expected::NotIp => {
                seen[0] += 1;
                assert_eq!(why, reason::PASS_NOT_IP, "{what}: not IP");
            }
            Expected::Unparsed => {
                seen[1] += 1;
                assert_eq!(why, reason::PASS_UNPARSED, "{what}: the parser cannot follow it");
            }
            Expected::Judged(source) => {
                seen[2] += 1;
                // First packet of its source passes, any later one is dropped (1 per hour).
                let first = charged.insert(source);
                let rule_verdict = if first { reason::PASS_CONFORMING } else { reason::DROP_SOURCE_BUCKET };
                assert_eq!(why, rule_verdict, "{what}: judged by the rule (first of its source: {first})");
            }
        }
    }
    // The seed exercises all three outcomes, so none of the arms above is vacuous.
    assert!(seen.iter().all(|&n| n > 0), "not IP / unparsed / judged: {seen:?}");
}

/// What the README's data path says the program makes of a frame.
#[derive(Debug)]
enum Expected {
    NotIp,
    Unparsed,
    /// Parsed; the rules judge it by this source key (IPv4-mapped, or the IPv6 /64).
    Judged(Addr),
}

/// An independent reading of the README's parse step and verdict table: up to two VLAN tags,
/// IPv4 with options, IPv6 with up to 8 extension headers (hop-by-hop, routing, destination
/// options, fragment, AH), then the fixed TCP/UDP/ICMP/ICMPv6 header. Anything cut short,
/// of the wrong IP version or with an IPv4-mapped IPv6 source is unparsed; a fragment other
/// than the first stops at the IP layer.
fn expected(frame: &[u8]) -> Expected {
    classify(frame).unwrap_or(Expected::Unparsed)
}

fn classify(frame: &[u8]) -> Option<Expected> {
    let bytes = |at: usize, n: usize| frame.get(at..at + n);
    let be16 = |at: usize| bytes(at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let is_tag = |t: u16| t == 0x8100 || t == 0x88a8;
    let mut l3 = 14;
    let mut ether_type = be16(12)?;
    for _ in 0..2 {
        if is_tag(ether_type) {
            ether_type = be16(l3 + 2)?;
            l3 += 4;
        }
    }
    let transport_ok = |protocol: u8, l4: usize| {
        let need = match protocol {
            6 => 20,
            17 => 8,
            1 | 58 => 4,
            _ => 0,
        };
        frame.len() >= l4 + need
    };
    match ether_type {
        0x0800 => {
            let h = bytes(l3, 20)?;
            let header_len = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || header_len < 20 || frame.len() < l3 + header_len {
                return None;
            }
            let later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
            if !later_fragment && !transport_ok(h[9], l3 + header_len) {
                return None;
            }
            Some(Expected::Judged(ipv4_mapped([h[12], h[13], h[14], h[15]])))
        }
        0x86dd => {
            let h = bytes(l3, 40)?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            if h[0] >> 4 != 6 || src[..12] == ipv4_mapped([0; 4])[..12] {
                return None;
            }
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&src[..8]);
            let (mut next, mut at) = (h[6], l3 + 40);
            for _ in 0..limiter_common::MAX_IPV6_EXT_HEADERS {
                match next {
                    0 | 43 | 60 => {
                        let e = bytes(at, 2)?;
                        (next, at) = (e[0], at + 8 * (usize::from(e[1]) + 1));
                    }
                    51 => {
                        let e = bytes(at, 2)?;
                        (next, at) = (e[0], at + 4 * (usize::from(e[1]) + 2));
                    }
                    44 => {
                        let e = bytes(at, 8)?;
                        if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                            return Some(Expected::Judged(key));
                        }
                        (next, at) = (e[0], at + 8);
                    }
                    _ => return transport_ok(next, at).then_some(Expected::Judged(key)),
                }
            }
            // More extension headers than the walk allows.
            None
        }
        // A third VLAN tag is unparsed, anything else is not IP.
        t if is_tag(t) => None,
        _ => Some(Expected::NotIp),
    }
}

// ---------------------------------------------------------------- lists

fn plan_with_lists(allow: &[&str], deny: &[&str], rules: Vec<KernelRule>) -> KernelPlan {
    let entries =
        |nets: &[&str]| nets.iter().map(|n| ListEntry { net: n.parse().unwrap(), policy: "test".into() }).collect();
    KernelPlan { allow: entries(allow), deny: entries(deny), rules }
}

#[test]
fn allow_list_wins_over_deny_and_buckets_for_ipv4_and_ipv6() {
    let mut dp = load(LoadOptions::default());
    let strict = rule("strict", CountKind::Packets, 1, Unit::Hour, 0);
    dp.apply(&plan_with_lists(&["10.1.0.2/32", "fd00:1::/64"], &["10.1.0.0/24", "fd00::/16"], vec![strict])).unwrap();
    for _ in 0..5 {
        assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
        assert_eq!(verdict(&mut dp, &udp6().build()), XDP_PASS);
    }
    assert_eq!(dp.stats().unwrap().reason(reason::PASS_ALLOW_LIST).packets, 10);
    // A neighbour outside the allow list but inside the deny list is dropped.
    let other = Packet::eth().ipv4(OTHER, SERVER).udp(1, 2).build();
    assert_eq!(verdict(&mut dp, &other), XDP_DROP);
    let other6 = Packet::eth().ipv6(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1), SERVER6).udp(1, 2).build();
    assert_eq!(verdict(&mut dp, &other6), XDP_DROP);
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_DENY_LIST).packets, 2);
}

#[test]
fn block_list_drops_until_the_entry_expires_or_is_removed() {
    let mut dp = load(LoadOptions::default());
    dp.block(IpAddr::V4(CLIENT), Duration::from_secs(3600)).unwrap();
    assert_eq!(verdict(&mut dp, &udp4().build()), XDP_DROP);
    let other = Packet::eth().ipv4(OTHER, SERVER).udp(1, 2).build();
    assert_eq!(verdict(&mut dp, &other), XDP_PASS);
    dp.unblock(IpAddr::V4(CLIENT)).unwrap();
    assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
    // An expired entry no longer applies, even before the agent deletes it.
    dp.block(IpAddr::V4(CLIENT), Duration::ZERO).unwrap();
    assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
    assert_eq!(dp.expire_blocks().unwrap(), 1);
    // IPv6 blocks cover the whole source prefix (/64 by default).
    dp.block(IpAddr::V6(CLIENT6), Duration::from_secs(3600)).unwrap();
    let neighbour = Packet::eth().ipv6(Ipv6Addr::new(0xfd00, 1, 0, 0, 9, 9, 9, 9), SERVER6).udp(1, 2).build();
    assert_eq!(verdict(&mut dp, &neighbour), XDP_DROP);
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_BLOCK_LIST).packets, 2);
}

#[test]
fn allow_listed_sources_are_not_blocked() {
    let mut dp = load(LoadOptions::default());
    dp.apply(&plan_with_lists(&["10.1.0.0/24"], &[], vec![])).unwrap();
    dp.block(IpAddr::V4(CLIENT), Duration::from_secs(3600)).unwrap();
    assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
}

// ---------------------------------------------------------------- buckets

#[test]
fn shared_port_bucket_admits_rate_plus_burst_for_all_sources_together() {
    let ceiling = on_port(rule("ceiling", CountKind::Packets, 3, Unit::Hour, 2), PROBE_PORT, Protocol::Udp);
    let mut dp = with_rules(vec![ceiling]);
    let mut passed = 0;
    for i in 0..20u8 {
        let frame = Packet::eth().ipv4(Ipv4Addr::new(10, 9, i, 1), SERVER).udp(1, PROBE_PORT).build();
        passed += u32::from(verdict(&mut dp, &frame) == XDP_PASS);
    }
    assert_eq!(passed, 5, "3 + burst 2, shared by 20 different sources");
    // Another port is not limited.
    let frame = Packet::eth().ipv4(CLIENT, SERVER).udp(1, PROBE_PORT + 1).build();
    assert_eq!(verdict(&mut dp, &frame), XDP_PASS);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_SHARED_BUCKET).packets, 15);
    assert_eq!(stats.rules["test/ceiling"].passed.packets, 5);
}

#[test]
fn per_source_buckets_are_independent_and_ipv6_is_keyed_by_prefix() {
    let mut dp = with_rules(vec![per_source(rule("src", CountKind::Packets, 2, Unit::Hour, 0))]);
    let from = |a: Ipv4Addr| Packet::eth().ipv4(a, SERVER).udp(1, 80).build();
    assert_eq!(
        [verdict(&mut dp, &from(CLIENT)), verdict(&mut dp, &from(CLIENT)), verdict(&mut dp, &from(CLIENT))],
        [XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(
        [verdict(&mut dp, &from(OTHER)), verdict(&mut dp, &from(OTHER)), verdict(&mut dp, &from(OTHER))],
        [XDP_PASS, XDP_PASS, XDP_DROP]
    );
    // Two addresses in one /64 share a bucket; another /64 has its own.
    let from6 = |a: Ipv6Addr| Packet::eth().ipv6(a, SERVER6).udp(1, 80).build();
    let a = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
    let b = Ipv6Addr::new(0xfd00, 1, 0, 0, 0xdead, 0, 0, 2);
    let c = Ipv6Addr::new(0xfd00, 1, 0, 1, 0, 0, 0, 1);
    assert_eq!(verdict(&mut dp, &from6(a)), XDP_PASS);
    assert_eq!(verdict(&mut dp, &from6(b)), XDP_PASS);
    assert_eq!(verdict(&mut dp, &from6(a)), XDP_DROP);
    assert_eq!(verdict(&mut dp, &from6(c)), XDP_PASS);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::DROP_SOURCE_BUCKET).packets, 3);
    // The first drop of a source is sampled into the top-sources table (one in 16 per CPU:
    // here the very first), later drops of a tracked source are all counted.
    for _ in 0..5 {
        verdict(&mut dp, &from(CLIENT));
    }
    let top = dp.top_dropped_sources(10).unwrap();
    assert_eq!(top[0].0, IpAddr::V4(CLIENT), "{top:?}");
    assert_eq!(top[0].1.packets, 6, "{top:?}");
}

#[test]
fn ipv6_source_prefix_is_configurable() {
    let mut dp = load(LoadOptions { ipv6_source_prefix: 128, ..Default::default() });
    dp.apply(&KernelPlan {
        rules: vec![per_source(rule("src", CountKind::Packets, 1, Unit::Hour, 0))],
        ..Default::default()
    })
    .unwrap();
    let from6 = |a: Ipv6Addr| Packet::eth().ipv6(a, SERVER6).udp(1, 80).build();
    assert_eq!(verdict(&mut dp, &from6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1))), XDP_PASS);
    assert_eq!(verdict(&mut dp, &from6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2))), XDP_PASS);
}

#[test]
fn per_source_port_buckets_are_separate_per_port() {
    let r = per_source(rule("sp", CountKind::Packets, 1, Unit::Hour, 0));
    let r = on_port(on_port(r, 80, Protocol::Tcp), 443, Protocol::Tcp);
    let mut dp = with_rules(vec![r]);
    let syn = |port| Packet::eth().ipv4(CLIENT, SERVER).tcp(40000, port).syn().build();
    assert_eq!(verdict(&mut dp, &syn(80)), XDP_PASS);
    assert_eq!(verdict(&mut dp, &syn(443)), XDP_PASS);
    assert_eq!(verdict(&mut dp, &syn(80)), XDP_DROP);
    assert_eq!(verdict(&mut dp, &syn(443)), XDP_DROP);
    // UDP to port 80 is a different target: not limited.
    assert_eq!(verdict(&mut dp, &Packet::eth().ipv4(CLIENT, SERVER).udp(1, 80).build()), XDP_PASS);
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_SOURCE_PORT_BUCKET).packets, 2);
}

#[test]
fn connection_buckets_count_only_syn_without_ack() {
    let mut dp = with_rules(vec![on_port(
        per_source(rule("conn", CountKind::Connections, 2, Unit::Hour, 0)),
        80,
        Protocol::Tcp,
    )]);
    let seg = |p: Packet| p.build();
    let base = || Packet::eth().ipv4(CLIENT, SERVER).tcp(40000, 80);
    // Established traffic is never counted.
    for _ in 0..10 {
        assert_eq!(verdict(&mut dp, &seg(base().ack())), XDP_PASS);
        assert_eq!(verdict(&mut dp, &seg(base().syn().ack())), XDP_PASS);
    }
    assert_eq!(verdict(&mut dp, &seg(base().syn())), XDP_PASS);
    assert_eq!(verdict(&mut dp, &seg(base().syn())), XDP_PASS);
    assert_eq!(verdict(&mut dp, &seg(base().syn())), XDP_DROP);
    // Established segments still flow while new connections are refused.
    assert_eq!(verdict(&mut dp, &seg(base().ack().psh())), XDP_PASS);
}

#[test]
fn byte_buckets_count_frame_bytes() {
    // 1000 bytes per hour, no burst: frames of 300 bytes (payload sized to reach it).
    let mut dp = with_rules(vec![rule("bytes", CountKind::Bytes, 1000, Unit::Hour, 0)]);
    let frame = Packet::eth().ipv4(CLIENT, SERVER).udp(1, 80).payload(&[0; 300 - 42]).build();
    assert_eq!(frame.len(), 300);
    let verdicts: Vec<u32> = (0..4).map(|_| verdict(&mut dp, &frame)).collect();
    assert_eq!(verdicts, [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]);
    // 100 bytes still fit.
    let small = Packet::eth().ipv4(CLIENT, SERVER).udp(1, 80).payload(&[0; 100 - 42]).build();
    assert_eq!(verdict(&mut dp, &small), XDP_PASS);
    assert_eq!(dp.stats().unwrap().rules["test/bytes"].passed.bytes, 1000);
}

#[test]
fn selectors_match_only_their_cidr_and_invert_selects_the_rest() {
    let mut inside = per_source(rule("inside", CountKind::Packets, 1, Unit::Hour, 0));
    inside.source.nets = vec!["10.1.0.0/24".parse().unwrap()];
    let mut dp = with_rules(vec![inside.clone()]);
    let outsider = Packet::eth().ipv4(Ipv4Addr::new(192, 0, 2, 1), SERVER).udp(1, 80).build();
    let insider = udp4().build();
    assert_eq!([verdict(&mut dp, &outsider), verdict(&mut dp, &outsider)], [XDP_PASS, XDP_PASS]);
    assert_eq!([verdict(&mut dp, &insider), verdict(&mut dp, &insider)], [XDP_PASS, XDP_DROP]);
    inside.source.invert = true;
    let mut dp = with_rules(vec![inside]);
    assert_eq!([verdict(&mut dp, &insider), verdict(&mut dp, &insider)], [XDP_PASS, XDP_PASS]);
    assert_eq!([verdict(&mut dp, &outsider), verdict(&mut dp, &outsider)], [XDP_PASS, XDP_DROP]);
}

#[test]
fn shadow_rules_count_but_never_drop() {
    let mut r = rule("shadow", CountKind::Packets, 1, Unit::Hour, 0);
    r.shadow = true;
    let mut dp = with_rules(vec![r]);
    for _ in 0..5 {
        assert_eq!(verdict(&mut dp, &udp4().build()), XDP_PASS);
    }
    let stats = dp.stats().unwrap();
    assert_eq!(stats.reason(reason::PASS_SHADOW).packets, 4);
    assert_eq!(stats.rules["test/shadow"].shadow_dropped.packets, 4);
    assert_eq!(stats.dropped().packets, 0);
}

#[test]
fn two_rules_at_once_deny_when_either_runs_out() {
    // TEG's example at L4: 1 per second and 20 per minute on one port.
    let per_minute =
        |burst| on_port(per_source(rule("per-minute", CountKind::Packets, 20, Unit::Minute, burst)), 80, Protocol::Udp);
    let per_second =
        |burst| on_port(per_source(rule("per-second", CountKind::Packets, 1, Unit::Second, burst)), 80, Protocol::Udp);
    let frame = Packet::eth().ipv4(CLIENT, SERVER).udp(1, 80).build();

    // A burst runs the per-second rule out first.
    let mut dp = with_rules(vec![per_minute(0), per_second(0)]);
    assert_eq!([verdict(&mut dp, &frame), verdict(&mut dp, &frame)], [XDP_PASS, XDP_DROP]);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/per-second"].dropped.packets, 1);
    assert_eq!(stats.rules["test/per-minute"].dropped.packets, 0);

    // With room per second (burst 30), the per-minute rule runs out after 20.
    let mut dp = with_rules(vec![per_second(30), per_minute(0)]);
    let passed = (0..25).filter(|_| verdict(&mut dp, &frame) == XDP_PASS).count();
    assert_eq!(passed, 20);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/per-minute"].dropped.packets, 5);
    assert_eq!(stats.rules["test/per-second"].dropped.packets, 0);
}

#[test]
fn a_source_over_its_own_limit_does_not_drain_the_shared_port_bucket() {
    // Port ceiling of 10 and a per-source limit of 2: one greedy source sends 50 packets.
    // Its 48 refused packets are refunded to the ceiling, so 8 more sources still get in.
    let ceiling = on_port(rule("ceiling", CountKind::Packets, 10, Unit::Hour, 0), 80, Protocol::Udp);
    let per_src = on_port(per_source(rule("per-source", CountKind::Packets, 2, Unit::Hour, 0)), 80, Protocol::Udp);
    let mut dp = with_rules(vec![per_src, ceiling]);
    let from = |a: Ipv4Addr| Packet::eth().ipv4(a, SERVER).udp(1, 80).build();
    let greedy: u32 = (0..50).map(|_| u32::from(verdict(&mut dp, &from(CLIENT)) == XDP_PASS)).sum();
    assert_eq!(greedy, 2);
    let others: u32 =
        (0..8u8).map(|i| u32::from(verdict(&mut dp, &from(Ipv4Addr::new(10, 7, 0, i))) == XDP_PASS)).sum();
    assert_eq!(others, 8, "the ceiling still had room for everyone else");
    assert_eq!(verdict(&mut dp, &from(Ipv4Addr::new(10, 7, 1, 1))), XDP_DROP, "now the ceiling is full");
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_SHARED_BUCKET).packets, 1);
}

#[test]
fn a_refund_to_a_bucket_evicted_since_its_charge_does_not_poison_it() {
    // A per-source table of one entry makes an eviction between charge and refund
    // deterministic: creating the packet's per-(source, port) bucket evicts the per-source
    // bucket it was charged to a moment earlier, and that rule (10 bytes per hour, less than
    // one frame) refuses, so the refund finds the per-source entry gone. Refunding a bucket
    // created anew for the purpose would leave its TAT near u64::MAX: the source refused by
    // the per-source rule forever.
    let mut dp = load(LoadOptions { source_entries: 1, ..Default::default() });
    let per_src = per_source(rule("per-source", CountKind::Packets, 100, Unit::Hour, 0));
    let tiny = on_port(per_source(rule("tiny", CountKind::Bytes, 10, Unit::Hour, 0)), 80, Protocol::Udp);
    dp.apply(&KernelPlan { rules: vec![per_src, tiny], ..Default::default() }).unwrap();
    let to = |port| Packet::eth().ipv4(CLIENT, SERVER).udp(1, port).build();
    assert_eq!(judged(&mut dp, &to(80)), (XDP_DROP, reason::DROP_SOURCE_PORT_BUCKET));
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/per-source"].passed.packets, 1, "the per-source bucket was charged");
    assert_eq!(stats.reason(reason::EVENT_SOURCE_INSERT_FAILED).packets, 0, "both buckets were created");
    assert_eq!(dp.tracked_sources(), 1, "a one-entry table");
    // Only the per-source rule applies on port 81: the source still has 100 an hour there.
    for i in 0..3 {
        assert_eq!(judged(&mut dp, &to(81)), (XDP_PASS, reason::PASS_CONFORMING), "packet {i} to port 81");
    }
}

#[test]
fn a_refund_gives_a_per_source_bucket_its_token_back() {
    // 2 per hour per source on every port, 1 per hour per (source, port 80): the packets
    // refused on port 80 are refunded to the per-source bucket, so one is left for port 81.
    let per_src = per_source(rule("per-source", CountKind::Packets, 2, Unit::Hour, 0));
    let per_port = on_port(per_source(rule("per-port", CountKind::Packets, 1, Unit::Hour, 0)), 80, Protocol::Udp);
    let mut dp = with_rules(vec![per_port, per_src]);
    let to = |port| Packet::eth().ipv4(CLIENT, SERVER).udp(1, port).build();
    assert_eq!(judged(&mut dp, &to(80)), (XDP_PASS, reason::PASS_CONFORMING));
    for _ in 0..5 {
        assert_eq!(judged(&mut dp, &to(80)), (XDP_DROP, reason::DROP_SOURCE_PORT_BUCKET));
    }
    assert_eq!(judged(&mut dp, &to(81)), (XDP_PASS, reason::PASS_CONFORMING));
    assert_eq!(judged(&mut dp, &to(81)), (XDP_DROP, reason::DROP_SOURCE_BUCKET), "and no more than one");
}

#[test]
fn reapplying_a_plan_keeps_bucket_state_of_unchanged_rules() {
    let keep = per_source(rule("keep", CountKind::Packets, 1, Unit::Hour, 0));
    let mut dp = with_rules(vec![keep.clone()]);
    let frame = udp4().build();
    assert_eq!(verdict(&mut dp, &frame), XDP_PASS);
    let other = rule("other", CountKind::Packets, 100, Unit::Second, 0);
    let applied = dp.apply(&KernelPlan { rules: vec![other, keep.clone()], ..Default::default() }).unwrap();
    assert_eq!(applied.kept, 1);
    assert_eq!(verdict(&mut dp, &frame), XDP_DROP, "the bucket is still empty after the reload");
    // A changed rule starts with a fresh bucket.
    let mut changed = keep;
    changed.limit.requests = 2;
    dp.apply(&KernelPlan { rules: vec![changed], ..Default::default() }).unwrap();
    assert_eq!(verdict(&mut dp, &frame), XDP_PASS);
    // A rule removed from the plan stops applying at once.
    dp.apply(&KernelPlan::default()).unwrap();
    for _ in 0..5 {
        assert_eq!(verdict(&mut dp, &frame), XDP_PASS);
    }
}

#[test]
fn a_plan_that_does_not_fit_is_rejected_and_the_old_one_stays() {
    let mut dp = with_rules(vec![per_source(rule("keep", CountKind::Packets, 1, Unit::Hour, 0))]);
    let too_many = (0..=limiter_common::MAX_RULES_PER_PORT)
        .map(|i| on_port(rule(&format!("r{i}"), CountKind::Packets, 1, Unit::Hour, 0), 80, Protocol::Udp))
        .collect();
    assert!(dp.apply(&KernelPlan { rules: too_many, ..Default::default() }).is_err());
    let frame = udp4().build();
    assert_eq!(verdict(&mut dp, &frame), XDP_PASS);
    assert_eq!(verdict(&mut dp, &frame), XDP_DROP, "the old rule is still enforced");
}

// ---------------------------------------------------------------- debug log

/// Captures log records (the agent forwards the program's aya-log records to `log`).
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn debug_log_is_off_by_default_and_sampled_when_on() {
    log::set_logger(&CAPTURE).expect("only this test installs a logger");
    log::set_max_level(log::LevelFilter::Trace);
    let strict =
        || KernelPlan { rules: vec![rule("strict", CountKind::Packets, 1, Unit::Hour, 0)], ..Default::default() };
    let frame = udp4().build();

    let mut quiet = load(LoadOptions::default());
    quiet.apply(&strict()).unwrap();
    for _ in 0..100 {
        verdict(&mut quiet, &frame);
    }
    quiet.flush_log();
    assert!(CAPTURE.0.lock().unwrap().iter().all(|l| !l.contains("drop reason")), "no records when off");

    let mut dp = load(LoadOptions { debug_log: true, ..Default::default() });
    dp.apply(&strict()).unwrap();
    let drops = 3000;
    for _ in 0..=drops {
        verdict(&mut dp, &frame);
    }
    dp.flush_log();
    let records = CAPTURE.0.lock().unwrap().iter().filter(|l| l.contains("drop reason")).count();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // First drop, then one in 1024, per CPU the test thread ran on.
    assert!(records >= 1, "at least the first drop is logged");
    assert!(records <= cpus * (drops / 1024 + 1), "{records} records for {drops} drops: not sampled");
}
