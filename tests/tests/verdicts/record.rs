//! `PARSE_RECORD`: what the program parsed, for the differential fuzzer. Written only when
//! the load option asks for it, and it says what the program saw for each kind of frame.

use limiter_agent::dataplane::LoadOptions;
use limiter_common::{
    MAX_IPV6_EXT_HEADERS, PARSE_FRAG_FIRST, PARSE_FRAG_LATER, PARSE_FRAG_NONE, PARSE_KIND_IP, PARSE_KIND_NOT_IP,
    PARSE_KIND_UNPARSED, PARSE_L4_CHAIN, PARSE_L4_COMPLETE, PARSE_L4_NONE, PARSE_L4_TRUNCATED, ParseRecord,
    ipv4_mapped,
};
use limiter_tests::packet::Packet;

use crate::{CLIENT, CLIENT6, PROBE_PORT, SERVER, SERVER6, load, udp4, udp6};

fn ip(src: [u8; 16], version: u8, protocol: u8, fragment: u8, port: Option<u16>, l4: u8) -> ParseRecord {
    ParseRecord {
        seq: 0,
        src,
        dst_port: port.unwrap_or(0),
        kind: PARSE_KIND_IP,
        ip_version: version,
        protocol,
        fragment,
        has_port: u8::from(port.is_some()),
        l4,
    }
}

#[test]
fn the_parse_record_says_what_the_program_read() {
    let mut dp = load(LoadOptions { record_parse: true, ..Default::default() });
    let v4 = ipv4_mapped(CLIENT.octets());
    let v6 = CLIENT6.octets();
    let mut chain = udp6();
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        chain = chain.dest_opts(0);
    }
    let syn = Packet::eth().ipv4(CLIENT, SERVER).tcp(1, PROBE_PORT).syn();
    let syn6 = Packet::eth().ipv6(CLIENT6, SERVER6).tcp(1, PROBE_PORT).syn();
    let cases: Vec<(Vec<u8>, ParseRecord, &str)> = vec![
        (
            Packet::eth().ethertype(0x0806).payload(&[0; 28]).build(),
            ParseRecord { kind: PARSE_KIND_NOT_IP, ..Default::default() },
            "ARP",
        ),
        (
            Packet::eth().ethertype(0x0800).build(),
            ParseRecord { kind: PARSE_KIND_UNPARSED, ..Default::default() },
            "bare IPv4 ethertype",
        ),
        (udp4().build(), ip(v4, 4, 17, PARSE_FRAG_NONE, Some(PROBE_PORT), PARSE_L4_COMPLETE), "IPv4/UDP"),
        (syn.build(), ip(v4, 4, 6, PARSE_FRAG_NONE, Some(PROBE_PORT), PARSE_L4_COMPLETE), "IPv4/TCP"),
        (syn.fragments(8, 0).remove(0), ip(v4, 4, 6, PARSE_FRAG_FIRST, None, PARSE_L4_TRUNCATED), "tiny fragment"),
        (syn.fragments(8, 0).remove(1), ip(v4, 4, 6, PARSE_FRAG_LATER, None, PARSE_L4_NONE), "later fragment"),
        (udp6().build(), ip(v6, 6, 17, PARSE_FRAG_NONE, Some(PROBE_PORT), PARSE_L4_COMPLETE), "IPv6/UDP"),
        (chain.build(), ip(v6, 6, 60, PARSE_FRAG_NONE, None, PARSE_L4_CHAIN), "chain past the bound"),
        (
            syn6.clone().payload(&[0; 16]).fragments(24, 3).remove(0),
            ip(v6, 6, 6, PARSE_FRAG_FIRST, Some(PROBE_PORT), PARSE_L4_COMPLETE),
            "IPv6 first fragment",
        ),
        (syn6.fragments(8, 3).remove(2), ip(v6, 6, 6, PARSE_FRAG_LATER, None, PARSE_L4_NONE), "IPv6 later fragment"),
        (
            udp6().fragment6(0, false, 1).build(),
            ip(v6, 6, 17, PARSE_FRAG_NONE, Some(PROBE_PORT), PARSE_L4_COMPLETE),
            "IPv6 atomic fragment",
        ),
    ];
    let mut last_seq = 0;
    for (frame, want, what) in cases {
        let (_, got) = dp.test_run_recorded(&frame).expect("BPF_PROG_TEST_RUN");
        let got = got.unwrap_or_else(|| panic!("{what}: no record written"));
        assert!(got.seq > last_seq || last_seq == 0, "{what}: sequence moves");
        last_seq = got.seq;
        assert_eq!(ParseRecord { seq: 0, ..got }, want, "{what}");
    }

    // Without the option the program writes nothing.
    let mut dp = load(LoadOptions::default());
    let (_, got) = dp.test_run_recorded(&udp4().build()).unwrap();
    assert_eq!(got, None);
}
