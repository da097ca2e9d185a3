//! Allow, deny and block lists: how they rank against each other and against the buckets.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use limiter_agent::{
    dataplane::LoadOptions,
    plan::{CountKind, Unit},
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::Packet;

use crate::{CLIENT, CLIENT6, OTHER, SERVER, SERVER6, load, plan_with_lists, rule, udp4, udp6, verdict};

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

/// Single hosts live in hashes beside the prefix tries (`LIST_HOST_PREFIX`): together they
/// must answer as one longest-prefix list, and leave with their policy set.
#[test]
fn single_hosts_and_prefixes_answer_as_one_list_and_go_with_their_set() {
    let mut dp = load(LoadOptions::default());
    let v4 = |a: [u8; 4]| Packet::eth().ipv4(std::net::Ipv4Addr::from(a), SERVER).udp(1, 2).build();
    let v6 = |a: Ipv6Addr| Packet::eth().ipv6(a, SERVER6).udp(1, 2).build();
    let host6 = Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 5);
    dp.apply(&plan_with_lists(
        &["10.9.0.7/32", "fd00:9::/64"],
        &["10.9.0.0/24", "10.8.0.5/32", &format!("{host6}/128"), "fd00:9::/32"],
        vec![],
    ))
    .unwrap();
    // An allowed host inside a denied prefix, and an allowed prefix inside a denied one.
    assert_eq!(verdict(&mut dp, &v4([10, 9, 0, 7])), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v6(Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1))), XDP_PASS);
    assert_eq!(dp.stats().unwrap().reason(reason::PASS_ALLOW_LIST).packets, 2);
    // Denied by prefix, by host (IPv4 and IPv6); their neighbours pass.
    assert_eq!(verdict(&mut dp, &v4([10, 9, 0, 8])), XDP_DROP);
    assert_eq!(verdict(&mut dp, &v6(Ipv6Addr::new(0xfd00, 9, 1, 0, 0, 0, 0, 1))), XDP_DROP);
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 5])), XDP_DROP);
    assert_eq!(verdict(&mut dp, &v6(host6)), XDP_DROP);
    assert_eq!(dp.stats().unwrap().reason(reason::DROP_DENY_LIST).packets, 4);
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 6])), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v6(Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 6))), XDP_PASS);

    // The next policy lists other hosts only: the old ones leave with their set.
    dp.apply(&plan_with_lists(&[], &["10.8.0.6/32"], vec![])).unwrap();
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 5])), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v6(host6)), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v4([10, 9, 0, 8])), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 6])), XDP_DROP);
    // And the one after that lists prefixes only.
    dp.apply(&plan_with_lists(&["10.8.0.0/30"], &["10.8.0.0/16"], vec![])).unwrap();
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 2])), XDP_PASS);
    assert_eq!(verdict(&mut dp, &v4([10, 8, 0, 6])), XDP_DROP);
}
