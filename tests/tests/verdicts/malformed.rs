//! Frames cut short at every layer, header-only frames and seeded garbage: each gets the
//! verdict the README's table documents, checked against an independent reading of that table.

use std::collections::HashSet;

use limiter_common::{Addr, XDP_DROP, XDP_PASS, ipv4_mapped, reason};
use limiter_tests::packet::{Packet, garbage_frames};

use crate::{CLIENT, assert_unparsed, judged, strict_any_port, udp4, udp6, with_rules};

#[test]
fn headers_cut_before_the_source_address_are_unparsed() {
    // Cut after the source address instead, a frame is judged by the lists and dropped when
    // its port cannot be known: see `shapes.rs`.
    let v4 = udp4().build_with_offsets();
    let v6 = udp6().hop_by_hop(1).build_with_offsets();
    let vlan = udp4().vlan(10).build();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vlan[..16].to_vec(), "inside the VLAN tag"),
        (v4.bytes[..v4.l3 + 10].to_vec(), "inside the IPv4 header"),
        (v6.bytes[..v6.l3 + 30].to_vec(), "inside the IPv6 header"),
    ];
    for (frame, what) in cases {
        assert_unparsed(&frame, what);
    }
    // IPv4 options cut short: the header the source is in is incomplete.
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
    let mut seen = [0usize; 4];
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
            Expected::Dropped(reason) => {
                seen[3] += 1;
                assert_eq!(reason::name(why), reason::name(reason), "{what}: its port cannot be known");
            }
        }
    }
    // The seed exercises all four outcomes, so none of the arms above is vacuous.
    assert!(seen.iter().all(|&n| n > 0), "not IP / unparsed / judged / dropped after the lists: {seen:?}");
}

/// What the README's data path says the program makes of a frame.
#[derive(Debug)]
enum Expected {
    NotIp,
    Unparsed,
    /// Parsed; the rules judge it by this source key (IPv4-mapped, or the IPv6 /64).
    Judged(Addr),
    /// The source is known but the port cannot be: dropped for this reason (no list here).
    Dropped(u32),
}

/// An independent reading of the README's parse step and verdict table: up to two VLAN tags
/// (0x8100, 0x88a8, 0x9100), IPv4 with options, IPv6 with up to `MAX_IPV6_EXT_HEADERS`
/// extension headers (hop-by-hop, routing, destination options, fragment, AH, mobility, HIP,
/// Shim6), then the fixed TCP/UDP/ICMP/ICMPv6 header inside the IP length. Cut short before
/// the source, of the wrong IP version or with an IPv4-mapped IPv6 source: unparsed. After
/// the source: TCP/UDP cut short, a header chain cut short or too long, and a later fragment
/// whose first fragment was not seen are dropped.
fn expected(frame: &[u8]) -> Expected {
    classify(frame).unwrap_or(Expected::Unparsed)
}

fn classify(frame: &[u8]) -> Option<Expected> {
    let bytes = |at: usize, n: usize| frame.get(at..at + n);
    let be16 = |at: usize| bytes(at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let is_tag = |t: u16| t == 0x8100 || t == 0x88a8 || t == 0x9100;
    let mut l3 = 14;
    let mut ether_type = be16(12)?;
    for _ in 0..2 {
        if is_tag(ether_type) {
            ether_type = be16(l3 + 2)?;
            l3 += 4;
        }
    }
    // The transport header, which must fit in the frame and in the IP length.
    let transport = |protocol: u8, l4: usize, ip_end: usize, key: Addr| {
        let need = match protocol {
            6 => 20,
            17 => 8,
            1 | 58 => 4,
            _ => 0,
        };
        if l4 + need <= frame.len().min(ip_end) || !matches!(protocol, 6 | 17) {
            Expected::Judged(key)
        } else {
            Expected::Dropped(reason::DROP_L4_TRUNCATED)
        }
    };
    match ether_type {
        0x0800 => {
            let h = bytes(l3, 20)?;
            let header_len = usize::from(h[0] & 0x0f) * 4;
            if h[0] >> 4 != 4 || header_len < 20 || frame.len() < l3 + header_len {
                return None;
            }
            let key = ipv4_mapped([h[12], h[13], h[14], h[15]]);
            if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return Some(Expected::Dropped(reason::DROP_FRAGMENT_UNKNOWN));
            }
            let ip_end = l3 + usize::from(u16::from_be_bytes([h[2], h[3]]));
            Some(transport(h[9], l3 + header_len, ip_end, key))
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
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            let ip_end = if plen == 0 { usize::MAX } else { l3 + 40 + plen };
            let chain = Some(Expected::Dropped(reason::DROP_HEADER_CHAIN));
            let ext = |at: usize, n: usize| if at + n <= ip_end { bytes(at, n) } else { None };
            let (mut next, mut at) = (h[6], l3 + 40);
            for i in 0..=limiter_common::MAX_IPV6_EXT_HEADERS {
                // The extra step follows no extension header: past the bound.
                if i == limiter_common::MAX_IPV6_EXT_HEADERS && matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140)
                {
                    return chain;
                }
                match next {
                    0 | 43 | 60 | 135 | 139 | 140 | 51 => {
                        let Some(e) = ext(at, 2) else { return chain };
                        let size = if next == 51 { 4 * (usize::from(e[1]) + 2) } else { 8 * (usize::from(e[1]) + 1) };
                        // The whole header must be there, not just its first two bytes.
                        if ext(at + size - 1, 1).is_none() {
                            return chain;
                        }
                        (next, at) = (e[0], at + size);
                    }
                    44 => {
                        let Some(e) = ext(at, 8) else { return chain };
                        if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                            return Some(Expected::Dropped(reason::DROP_FRAGMENT_UNKNOWN));
                        }
                        (next, at) = (e[0], at + 8);
                    }
                    _ => return Some(transport(next, at, ip_end, key)),
                }
            }
            // More extension headers than the walk allows.
            chain
        }
        // A third VLAN tag is unparsed, anything else is not IP.
        t if is_tag(t) => None,
        _ => Some(Expected::NotIp),
    }
}
