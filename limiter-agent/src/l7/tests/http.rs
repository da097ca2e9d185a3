//! HTTP requests: the gateways' documented scenarios, attributes, precedence, charging,
//! memory bound, plan replacement, concurrency.

use std::sync::Arc;

use super::*;

#[test]
fn hundred_per_minute_admits_100_of_120() {
    let rule = gateway_rule("default/global", vec![generic("default/global")], limit(100, Unit::Minute, 0));
    let (engine, clock) = engine(vec![rule]);
    let req = http(&[]);
    let verdicts: Vec<Verdict> = (0..120).map(|_| engine.check_request(&req, clock.at(0))).collect();
    assert_eq!(verdicts.iter().filter(|v| v.allowed).count(), 100);
    assert!(verdicts[..100].iter().all(|v| v.allowed), "the first 100 are the allowed ones");
    // Headers as Envoy would show them on the 1st and the 101st response.
    let first = verdicts[0].ratelimit_headers().unwrap();
    assert_eq!(first[0].1, r#"100, 100;w=60;name="default/global""#);
    assert_eq!(first[1].1, "99");
    assert_eq!(first[2].1, "1"); // 0.6 s until the one token is back, rounded up
    let denied = verdicts[100].ratelimit_headers().unwrap();
    assert_eq!(denied[1].1, "0");
    assert_eq!(denied[2].1, "60");
    assert_eq!(verdicts[100].statuses[0].code, Code::OverLimit);
    // A minute later the bucket is full again.
    assert_eq!(allowed(&engine, &req, clock.at(60), 120), 100);
}

#[test]
fn alice_and_bob_get_three_per_minute_each() {
    let rule = gateway_rule(
        "default/per-user",
        vec![generic("default/per-user"), per_header("x-user-id")],
        limit(3, Unit::Minute, 0),
    );
    let (engine, clock) = engine(vec![rule]);
    for user in ["alice", "bob"] {
        let headers = [("x-user-id", user)];
        let got: Vec<bool> = (0..5).map(|_| engine.check_request(&http(&headers), clock.at(1)).allowed).collect();
        assert_eq!(got, [true, true, true, false, false], "{user}");
    }
    // No header: Envoy sends no descriptor, the rule does not apply.
    let v = engine.check_request(&http(&[]), clock.at(1));
    assert!(v.allowed && v.statuses.is_empty());
    // One token every 20 s: alice's next one is due at second 21.
    assert_eq!(allowed(&engine, &http(&[("x-user-id", "alice")]), clock.at(20), 5), 0);
    assert_eq!(allowed(&engine, &http(&[("x-user-id", "alice")]), clock.at(21), 5), 1);
    assert_eq!(engine.tracked_keys(), 2);
}

#[test]
fn anonymous_get_ten_and_identified_users_a_hundred() {
    let anonymous = gateway_rule(
        "default/anonymous",
        vec![
            generic("default/anonymous"),
            EntryMatch {
                key: keys::HEADER_MATCH.into(),
                attribute: Attribute::HeaderAbsent("x-user-id".into()),
                value: EntryValue::Exact("anonymous".into()),
            },
        ],
        limit(10, Unit::Minute, 0),
    );
    let identified = gateway_rule(
        "default/identified",
        vec![generic("default/identified"), per_header("x-user-id")],
        limit(100, Unit::Minute, 0),
    );
    let (engine, clock) = engine(vec![anonymous, identified]);
    assert_eq!(allowed(&engine, &http(&[]), clock.at(0), 15), 10);
    let v = engine.check_request(&http(&[]), clock.at(0));
    assert_eq!(v.statuses.len(), 1);
    assert_eq!(v.statuses[0].rule, "default/anonymous");
    let headers = [("x-user-id", "carol")];
    assert_eq!(allowed(&engine, &http(&headers), clock.at(0), 105), 100);
    let v = engine.check_request(&http(&headers), clock.at(0));
    assert_eq!(v.statuses.len(), 1);
    assert_eq!(v.statuses[0].rule, "default/identified");
}

#[test]
fn three_per_second_with_burst_three_admits_six_then_refills() {
    let rule = gateway_rule("default/burst", vec![generic("default/burst")], limit(3, Unit::Second, 3));
    let (engine, clock) = engine(vec![rule]);
    let req = http(&[]);
    let first = engine.check_request(&req, clock.at(0));
    assert_eq!(first.statuses[0].remaining, 5, "depth is requests + burst");
    assert_eq!(allowed(&engine, &req, clock.at(0), 9), 5);
    // A token costs round(1 s / 3) = 333_333_333 ns; the full bucket is 6 of them.
    assert_eq!(allowed(&engine, &req, clock.at_ns(333_333_332), 1), 0);
    assert_eq!(allowed(&engine, &req, clock.at_ns(333_333_333), 3), 1);
    // One second after that: 3 more, and no more than that.
    assert_eq!(allowed(&engine, &req, clock.at_ns(1_333_333_333), 5), 3);
    // Idle for an hour: back to 6, not more.
    assert_eq!(allowed(&engine, &req, clock.at(3600), 10), 6);
}

#[test]
fn one_per_second_and_twenty_per_minute_together() {
    let per_second = gateway_rule("teg/per-second", vec![generic("teg/per-second")], limit(1, Unit::Second, 0));
    let per_minute = gateway_rule("teg/per-minute", vec![generic("teg/per-minute")], limit(20, Unit::Minute, 0));
    let (engine, clock) = engine(vec![per_second, per_minute]);
    let req = http(&[]);
    // Five at once: the per-second rule admits one; the four denied cost the per-minute
    // rule nothing (all-or-nothing charging).
    let verdicts: Vec<Verdict> = (0..5).map(|_| engine.check_request(&req, clock.at(0))).collect();
    assert_eq!(verdicts.iter().filter(|v| v.allowed).count(), 1);
    let last = &verdicts[4];
    assert_eq!(last.statuses[0].code, Code::OverLimit);
    assert_eq!((last.statuses[1].rule.as_str(), last.statuses[1].remaining), ("teg/per-minute", 19));
    // Then one request a second. The per-minute bucket (a token every 3 s, 20 deep) allows
    // request k at second t while 3(k + 1) - t <= 60: every second up to t = 28, then one
    // in three. The per-second rule never refuses them, and its charge for a request the
    // per-minute rule refuses is given back (else t = 30 would be refused too).
    let got: Vec<u64> = (1..=40).filter(|&t| engine.check_request(&req, clock.at(t)).allowed).collect();
    let mut want: Vec<u64> = (1..=28).collect();
    want.extend([30, 33, 36, 39]);
    assert_eq!(got, want);
    let v = engine.check_request(&req, clock.at(40));
    let headers = v.ratelimit_headers().unwrap();
    assert_eq!(headers[0].1, r#"20, 1;w=1;name="teg/per-second", 20;w=60;name="teg/per-minute""#);
}

#[test]
fn shadow_rules_count_but_never_deny() {
    let mut rule = gateway_rule("default/shadow", vec![generic("default/shadow")], limit(2, Unit::Minute, 0));
    rule.shadow = true;
    let (engine, clock) = engine(vec![rule]);
    let verdicts: Vec<Verdict> = (0..4).map(|_| engine.check_request(&http(&[]), clock.at(0))).collect();
    assert!(verdicts.iter().all(|v| v.allowed));
    let codes: Vec<Code> = verdicts.iter().map(|v| v.statuses[0].code).collect();
    assert_eq!(codes, [Code::Ok, Code::Ok, Code::OverLimit, Code::OverLimit]);
    assert!(verdicts[3].statuses[0].shadow);
}

#[test]
fn attributes_build_the_descriptor() {
    let entry = |key: &str, attribute, value| EntryMatch { key: key.into(), attribute, value };
    let rules = vec![
        gateway_rule(
            "p/admin-post",
            vec![
                generic("p/admin-post"),
                entry(keys::PATH, Attribute::Path, EntryValue::Wildcard("/admin/*".into())),
                entry(keys::METHOD, Attribute::Method, EntryValue::Exact("POST".into())),
            ],
            limit(1, Unit::Minute, 0),
        ),
        gateway_rule(
            "p/beta",
            vec![entry(
                keys::HEADER_MATCH,
                Attribute::HeaderEquals { name: "x-channel".into(), value: "beta".into() },
                EntryValue::Exact("beta".into()),
            )],
            limit(1, Unit::Minute, 0),
        ),
        gateway_rule(
            "p/internal",
            vec![entry(
                keys::REMOTE_ADDRESS,
                Attribute::RemoteAddress,
                EntryValue::Cidr { nets: vec!["192.0.2.0/24".parse().unwrap()], distinct: true, invert: false },
            )],
            limit(1, Unit::Minute, 0),
        ),
        // Matched over RLS only: never applies to HTTP requests.
        rls_rule("rl/any", DEFAULT_DOMAIN, &[(keys::GENERIC_KEY, "")], limit(1, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    let applied = |req: &HttpRequest<'_>| -> Vec<String> {
        engine.check_request(req, clock.at(0)).statuses.into_iter().map(|s| s.rule).collect()
    };
    let mut req = http(&[]);
    req.remote = "203.0.113.9".parse().unwrap();
    assert!(applied(&req).is_empty());
    req.path = "/admin/users";
    assert!(applied(&req).is_empty(), "GET is not POST");
    req.method = "POST";
    assert_eq!(applied(&req), ["p/admin-post"]);
    let beta = [("x-channel", "beta")];
    let stable = [("x-channel", "stable")];
    req = http(&beta);
    req.remote = "203.0.113.9".parse().unwrap();
    assert_eq!(applied(&req), ["p/beta"]);
    req.headers = &stable;
    assert!(applied(&req).is_empty());
    // 192.0.2.1 is inside the range; a bucket per address.
    let inside = http(&[]);
    assert_eq!(applied(&inside), ["p/internal"]);
    assert!(!engine.check_request(&inside, clock.at(0)).allowed);
    let mut neighbour = http(&[]);
    neighbour.remote = "192.0.2.2".parse().unwrap();
    assert!(engine.check_request(&neighbour, clock.at(0)).allowed);
}

#[test]
fn route_rules_win_over_gateway_rules() {
    let mut on_gateway = gateway_rule("gw/all", vec![generic("gw/all")], limit(1, Unit::Minute, 0));
    on_gateway.targets = vec![L7Target::Gateway("gw".into())];
    let mut on_route = gateway_rule("route/checkout", vec![generic("route/checkout")], limit(5, Unit::Minute, 0));
    on_route.targets = vec![L7Target::Route("checkout".into())];
    let everywhere = gateway_rule("any/all", vec![generic("any/all")], limit(1000, Unit::Minute, 0));
    let (engine, clock) = engine(vec![on_gateway, on_route, everywhere]);
    let rules = |route, gateway| -> Vec<String> {
        let mut req = http(&[]);
        req.route = route;
        req.gateway = gateway;
        engine.check_request(&req, clock.at(0)).statuses.into_iter().map(|s| s.rule).collect()
    };
    assert_eq!(rules(Some("checkout"), Some("gw")), ["route/checkout", "any/all"]);
    assert_eq!(rules(Some("home"), Some("gw")), ["gw/all", "any/all"]);
    assert_eq!(rules(None, Some("gw")), ["gw/all", "any/all"]);
    assert_eq!(rules(Some("home"), Some("other-gw")), ["any/all"]);
    assert_eq!(rules(None, None), ["any/all"]);
}

#[test]
fn a_rule_of_zero_requests_denies_everything() {
    let rule = gateway_rule("p/closed", vec![generic("p/closed")], limit(0, Unit::Second, 0));
    let (engine, clock) = engine(vec![rule]);
    assert_eq!(allowed(&engine, &http(&[]), clock.at(0), 3), 0);
    assert_eq!(allowed(&engine, &http(&[]), clock.at(100), 3), 0);
}

#[test]
fn a_flood_of_random_header_values_stays_within_the_bound() {
    let rule =
        gateway_rule("p/per-user", vec![generic("p/per-user"), per_header("x-user-id")], limit(1, Unit::Minute, 0));
    let (engine, clock) = engine_with(vec![rule], 1000, Duration::from_secs(UNIX_AT_BASE));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut peak = 0;
    for i in 0..20_000u64 {
        // xorshift: distinct, unpredictable-looking values.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let value = format!("{x:016x}");
        let headers = [("x-user-id", value.as_str())];
        assert!(engine.check_request(&http(&headers), clock.at_ns(i * 1000)).allowed, "a new key starts full");
        peak = peak.max(engine.tracked_keys());
    }
    assert_eq!(peak, 1000);
    let stats = engine.counter_stats();
    assert_eq!((stats.tracked, stats.capacity, stats.evictions), (1000, 1000, 19_000));
}

#[test]
fn a_key_in_use_survives_a_flood_of_one_off_keys() {
    let rule =
        gateway_rule("p/per-user", vec![generic("p/per-user"), per_header("x-user-id")], limit(1, Unit::Minute, 0));
    // One shard (fewer than 512 keys), so the LRU order is global and the outcome exact.
    let (engine, clock) = engine_with(vec![rule], 100, Duration::from_secs(UNIX_AT_BASE));
    let alice = [("x-user-id", "alice")];
    assert!(engine.check_request(&http(&alice), clock.at(0)).allowed);
    for i in 0..1000 {
        let value = format!("flood-{i}");
        let headers = [("x-user-id", value.as_str())];
        engine.check_request(&http(&headers), clock.at(0));
        if i % 50 == 0 {
            // Alice keeps asking (and keeps being refused): her counter stays recent.
            assert!(!engine.check_request(&http(&alice), clock.at(0)).allowed);
        }
    }
    assert!(!engine.check_request(&http(&alice), clock.at(0)).allowed);
    // Idle through a whole flood, a counter is evicted and starts full again.
    for i in 0..100 {
        let value = format!("second-flood-{i}");
        let headers = [("x-user-id", value.as_str())];
        engine.check_request(&http(&headers), clock.at(0));
    }
    assert!(engine.check_request(&http(&alice), clock.at(0)).allowed);
}

#[test]
fn replacing_the_plan_keeps_unchanged_rules_counters() {
    let per_user = |requests| {
        gateway_rule(
            "p/per-user",
            vec![generic("p/per-user"), per_header("x-user-id")],
            limit(requests, Unit::Minute, 0),
        )
    };
    let other = gateway_rule("p/other", vec![generic("p/other")], limit(50, Unit::Minute, 0));
    let (engine, clock) = engine(vec![per_user(3), other.clone()]);
    let alice = [("x-user-id", "alice")];
    assert_eq!(allowed(&engine, &http(&alice), clock.at(0), 5), 3);
    // Alice's counter; p/other is a single bucket, kept outside the keyed store.
    assert_eq!(engine.tracked_keys(), 1);

    // Same rule, a new neighbour, shadow flag flipped elsewhere: alice's bucket is kept.
    let mut other_shadow = other.clone();
    other_shadow.shadow = true;
    let extra = gateway_rule("p/extra", vec![generic("p/extra")], limit(10, Unit::Minute, 0));
    engine.replace_plan(L7Plan { rules: vec![extra.clone(), per_user(3), other_shadow] });
    assert_eq!(engine.plan().rules.len(), 3);
    let v = engine.check_request(&http(&alice), clock.at(0));
    assert!(!v.allowed);
    let other_status = v.statuses.iter().find(|s| s.rule == "p/other").unwrap();
    assert_eq!(other_status.remaining, 47, "kept p/other's 3 charges; this denied one's is refunded");

    // A changed limit starts fresh, for keyed and single buckets alike; the dropped rule's
    // counters are freed.
    let mut other_60 = other.clone();
    other_60.limit = limit(60, Unit::Minute, 0);
    engine.replace_plan(L7Plan { rules: vec![per_user(4), other_60] });
    assert_eq!(engine.tracked_keys(), 0);
    let v = engine.check_request(&http(&alice), clock.at(0));
    assert_eq!(v.statuses[1].remaining, 59);
    assert_eq!(allowed(&engine, &http(&alice), clock.at(0), 6), 3);
}

#[test]
fn decisions_from_many_threads_lose_no_update() {
    let rule = gateway_rule("p/shared", vec![generic("p/shared")], limit(2000, Unit::Minute, 0));
    let (engine, clock) = engine(vec![rule]);
    let engine = Arc::new(engine);
    let now = clock.at(0);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || allowed(&engine, &http(&[]), now, 1000))
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 2000);
}

#[test]
fn keyed_counters_from_many_threads_lose_no_update() {
    let rule =
        gateway_rule("p/per-user", vec![generic("p/per-user"), per_header("x-user-id")], limit(1500, Unit::Minute, 0));
    let (engine, clock) = engine(vec![rule]);
    let engine = Arc::new(engine);
    let now = clock.at(0);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                // Alice from every thread, bob from every thread: two contended counters.
                let alice = allowed(&engine, &http(&[("x-user-id", "alice")]), now, 500);
                let bob = allowed(&engine, &http(&[("x-user-id", "bob")]), now, 500);
                (alice, bob)
            })
        })
        .collect();
    let (alice, bob) = threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    assert_eq!((alice, bob), (1500, 1500));
}

#[test]
fn plan_swaps_under_load_are_whole() {
    // Two plans whose single rule differs only in name: every verdict names exactly one.
    let plan =
        |name: &str| L7Plan { rules: vec![gateway_rule(name, vec![generic("g")], limit(1_000_000, Unit::Second, 0))] };
    let (engine, clock) = engine(plan("a").rules);
    let engine = Arc::new(engine);
    let swapper = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            for i in 0..200 {
                engine.replace_plan(plan(if i % 2 == 0 { "b" } else { "a" }));
            }
        })
    };
    for _ in 0..2000 {
        let v = engine.check_request(&http(&[]), clock.at(0));
        assert_eq!(v.statuses.len(), 1);
        assert!(v.statuses[0].rule == "a" || v.statuses[0].rule == "b");
    }
    swapper.join().unwrap();
}
