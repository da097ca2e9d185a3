//! Buckets: the shared port ceiling, per-source and per-(source, port) buckets, connection
//! and byte counting, selectors, shadow rules, several rules at once, refunds and plan reloads.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use limiter_agent::{
    dataplane::LoadOptions,
    plan::{CountKind, KernelPlan, Protocol, Unit},
};
use limiter_common::{XDP_DROP, XDP_PASS, reason};
use limiter_tests::packet::Packet;

use crate::{
    CLIENT, OTHER, PROBE_PORT, SERVER, SERVER6, judged, load, on_port, per_source, rule, udp4, verdict, with_rules,
};

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

/// A `global` rule's share changes in place: the rule keeps its counters and its bucket; a
/// shared bucket keeps its tokens (a bigger share is earned at its rate, not handed out as a
/// fresh burst); a reload with the same policy limit keeps the share in force; per-source
/// buckets keep their state.
#[test]
fn a_global_rules_share_changes_in_place_and_keeps_its_bucket() {
    use std::collections::BTreeMap;

    use limiter_agent::{dataplane::Dataplane, plan::Limit};
    let mut global = rule("global", CountKind::Packets, 400, Unit::Hour, 0);
    global.global = true;
    let plan = KernelPlan { rules: vec![global.clone()], ..Default::default() };
    let share = |requests| BTreeMap::from([(global.name.clone(), Limit { requests, unit: Unit::Hour, burst: 0 })]);
    let mut dp = load(LoadOptions::default());
    dp.apply_shared(&plan, share(10)).expect("apply with a share");
    let frame = udp4().build();
    let admit = |dp: &mut Dataplane, n| (0..n).filter(|_| verdict(dp, &frame) == XDP_PASS).count();
    assert_eq!(admit(&mut dp, 4), 4, "4 of the share of 10");
    // The share grows to 390: the 6 tokens left stay 6, not 390 at once.
    assert_eq!(dp.set_shares(share(390)).unwrap(), 1, "one rule re-shared");
    assert_eq!(admit(&mut dp, 20), 6, "the tokens left under the old share");
    let stats = dp.stats().unwrap();
    assert_eq!(stats.rules["test/global"].passed.packets, 10, "the counters go on: same rule id");
    assert_eq!(stats.rules["test/global"].dropped.packets, 14);
    // The same shares again change nothing.
    assert_eq!(dp.set_shares(share(390)).unwrap(), 0);
    // A reload with the same policy keeps the rule (id, counters, empty bucket) and its share.
    let applied = dp.apply(&plan).unwrap();
    assert_eq!(applied.kept, 1);
    assert_eq!(admit(&mut dp, 5), 0);
    assert_eq!(dp.stats().unwrap().rules["test/global"].dropped.packets, 19);
    // A new policy limit is a new rule: fresh bucket, the full limit without a share for it.
    let mut changed = global.clone();
    changed.limit.requests = 3;
    dp.apply_shared(&KernelPlan { rules: vec![changed], ..Default::default() }, BTreeMap::new()).unwrap();
    assert_eq!(admit(&mut dp, 5), 3);

    // Per source: the bucket is kept as it is (its depth and rate scale together).
    let mut dp = load(LoadOptions::default());
    let mut src = per_source(rule("src", CountKind::Packets, 100, Unit::Hour, 0));
    src.global = true;
    let plan = KernelPlan { rules: vec![src.clone()], ..Default::default() };
    let share = |requests| BTreeMap::from([(src.name.clone(), Limit { requests, unit: Unit::Hour, burst: 0 })]);
    dp.apply_shared(&plan, share(4)).unwrap();
    assert_eq!(admit(&mut dp, 10), 4, "the source's share of 4");
    dp.set_shares(share(8)).unwrap();
    assert_eq!(admit(&mut dp, 10), 0, "an empty bucket stays empty");
    let other = Packet::eth().ipv4(OTHER, SERVER).udp(40000, PROBE_PORT).payload(b"limiter").build();
    assert_eq!((0..10).filter(|_| verdict(&mut dp, &other) == XDP_PASS).count(), 8, "a new source gets the new share");
}

/// A global per-source rule (`global: true`, Distinct): what it admits counts per source in
/// `GLOBAL_SOURCE_COUNTS`, a charge a later rule refuses is not counted (it is refunded), and
/// a local per-source rule counts nothing there. A hold blocks the source and leaves its
/// bucket empty.
#[test]
fn global_per_source_rules_count_admitted_tokens_and_not_refused_ones() {
    let mut global = per_source(rule("global", CountKind::Packets, 100, Unit::Hour, 0));
    global.global = true;
    // Judged after the global rule (per-(source, port) after per-source), on the probe port only.
    let strict = on_port(per_source(rule("strict", CountKind::Packets, 2, Unit::Hour, 0)), PROBE_PORT, Protocol::Udp);
    let local = on_port(per_source(rule("local", CountKind::Packets, 100, Unit::Hour, 0)), 81, Protocol::Udp);
    let mut dp = with_rules(vec![global, strict, local]);
    let to = |src: Ipv4Addr, port: u16| Packet::eth().ipv4(src, SERVER).udp(1, port).build();
    let counts = |dp: &limiter_agent::dataplane::Dataplane| {
        let mut c: Vec<(String, IpAddr, u64)> =
            dp.global_source_counts().unwrap().into_iter().map(|c| (c.rule, c.source, c.count)).collect();
        c.sort();
        c
    };
    assert!(counts(&dp).is_empty());

    let verdicts: Vec<u32> = (0..5).map(|_| verdict(&mut dp, &to(CLIENT, PROBE_PORT))).collect();
    assert_eq!(verdicts, [XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP, XDP_DROP]);
    let client = IpAddr::V4(CLIENT);
    assert_eq!(counts(&dp), [("test/global".to_owned(), client, 2)], "the 3 refused by strict are not counted");

    // Another port: the global rule alone (and the local one on 81, which counts nothing here).
    for port in [80, 81, 81] {
        assert_eq!(verdict(&mut dp, &to(CLIENT, port)), XDP_PASS);
    }
    assert_eq!(verdict(&mut dp, &to(OTHER, 80)), XDP_PASS);
    assert_eq!(counts(&dp), [("test/global".to_owned(), client, 5), ("test/global".to_owned(), IpAddr::V4(OTHER), 1)]);

    // Held: blocked, and its bucket empty when the hold ends (here in an hour), so even once
    // the block is gone early the rule refuses it; the other source is untouched.
    assert_eq!(dp.hold("test/global", client, std::time::Duration::from_secs(3600)).unwrap(), 1);
    assert_eq!(judged(&mut dp, &to(CLIENT, 80)), (XDP_DROP, reason::DROP_BLOCK_LIST));
    dp.unblock(client).unwrap();
    assert_eq!(judged(&mut dp, &to(CLIENT, 80)), (XDP_DROP, reason::DROP_SOURCE_BUCKET));
    assert_eq!(verdict(&mut dp, &to(OTHER, 80)), XDP_PASS);
    assert_eq!(counts(&dp)[0].2, 5, "refused, not counted");
}
