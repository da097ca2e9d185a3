//! `ShouldRateLimit` semantics as envoyproxy/ratelimit defines them.

use super::*;

fn rule_names(resp: &RlsResponse) -> Vec<Option<&str>> {
    resp.statuses.iter().map(|s| s.rule.as_deref()).collect()
}

fn one(engine: &Engine, domain: &str, entries: &[(&str, &str)], now: Instant) -> DescriptorStatus {
    let resp = engine.should_rate_limit(&rls(domain, vec![descriptor(entries)]), now).unwrap();
    assert_eq!(resp.statuses.len(), 1);
    resp.statuses.into_iter().next().unwrap()
}

#[test]
fn exact_then_wildcard_in_config_order_then_key_only() {
    let rules = vec![
        rls_rule("rl/ex*", "rl", &[("k", "ex*")], limit(2, Unit::Minute, 0)),
        rls_rule("rl/e*", "rl", &[("k", "e*")], limit(4, Unit::Minute, 0)),
        rls_rule("rl/exact", "rl", &[("k", "exact")], limit(1, Unit::Minute, 0)),
        rls_rule("rl/k", "rl", &[("k", "")], limit(3, Unit::Minute, 0)),
        rls_rule("rl/path", "rl", &[("path", "/api/*/x")], limit(5, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    let hit = |value: &str| engine.lookup("rl", &[DescriptorEntry { key: "k".into(), value: value.into() }]);
    assert_eq!(hit("exact").unwrap().rule.name, "rl/exact", "exact beats an earlier wildcard");
    assert_eq!(hit("exz").unwrap().rule.name, "rl/ex*", "first wildcard in config order");
    assert_eq!(hit("eq").unwrap().rule.name, "rl/e*");
    assert_eq!(hit("other").unwrap().rule.name, "rl/k", "key only last");
    let path = |value: &str| {
        engine.lookup("rl", &[DescriptorEntry { key: "path".into(), value: value.into() }]).map(|m| m.rule.name.clone())
    };
    assert_eq!(path("/api/v2/x").as_deref(), Some("rl/path"));
    assert_eq!(path("/api/v2/y"), None);
    assert!(engine.lookup("rl", &[DescriptorEntry { key: "nope".into(), value: "exact".into() }]).is_none());

    // The same through ShouldRateLimit, with the limits each rule reports.
    let resp = engine
        .should_rate_limit(
            &rls("rl", vec![descriptor(&[("k", "exact")]), descriptor(&[("k", "exz")]), descriptor(&[("k", "other")])]),
            clock.at(0),
        )
        .unwrap();
    assert_eq!(rule_names(&resp), [Some("rl/exact"), Some("rl/ex*"), Some("rl/k")]);
    let limits: Vec<u32> = resp.statuses.iter().map(|s| s.limit.as_ref().unwrap().requests_per_unit).collect();
    assert_eq!(limits, [1, 2, 3]);
}

#[test]
fn the_descriptor_depth_must_match() {
    let rules = vec![
        rls_rule("rl/top", "rl", &[("a", "1")], limit(1, Unit::Minute, 0)),
        rls_rule("rl/nested", "rl", &[("a", "1"), ("b", "2")], limit(2, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    let name = |entries: &[(&str, &str)]| one(&engine, "rl", entries, clock.at(0)).rule;
    assert_eq!(name(&[("a", "1")]).as_deref(), Some("rl/top"));
    assert_eq!(name(&[("a", "1"), ("b", "2")]).as_deref(), Some("rl/nested"));
    assert_eq!(name(&[("a", "1"), ("b", "2"), ("c", "3")]), None, "deeper than any rule");
    assert_eq!(name(&[("b", "2")]), None, "not a prefix of a rule");
}

#[test]
fn matching_does_not_backtrack() {
    // envoyproxy/ratelimit picks `a=1` at the first level and never returns to try `a`
    // (key only) when `c` is missing below it.
    let rules = vec![
        rls_rule("rl/a1-b", "rl", &[("a", "1"), ("b", "2")], limit(1, Unit::Minute, 0)),
        rls_rule("rl/a-c", "rl", &[("a", ""), ("c", "3")], limit(1, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    assert_eq!(one(&engine, "rl", &[("a", "1"), ("c", "3")], clock.at(0)).rule, None);
    assert_eq!(one(&engine, "rl", &[("a", "9"), ("c", "3")], clock.at(0)).rule.as_deref(), Some("rl/a-c"));
}

#[test]
fn key_only_rules_count_each_value_in_fixed_windows() {
    let (engine, clock) = engine(vec![rls_rule("rl/user", "rl", &[("user", "")], limit(3, Unit::Minute, 0))]);
    let remaining = |user: &str, secs| {
        let s = one(&engine, "rl", &[("user", user)], clock.at(secs));
        (s.code, s.limit_remaining, s.duration_until_reset.as_secs())
    };
    assert_eq!(remaining("alice", 0), (Code::Ok, 2, 60));
    assert_eq!(remaining("alice", 10), (Code::Ok, 1, 50));
    assert_eq!(remaining("alice", 20), (Code::Ok, 0, 40));
    assert_eq!(remaining("alice", 30), (Code::OverLimit, 0, 30));
    assert_eq!(remaining("bob", 30), (Code::Ok, 2, 30));
    // The next window starts at the next whole unix minute.
    assert_eq!(remaining("alice", 59), (Code::OverLimit, 0, 1));
    assert_eq!(remaining("alice", 60), (Code::Ok, 2, 60));
}

#[test]
fn windows_are_aligned_to_unix_time_not_to_engine_start() {
    // The engine starts 45 s into a minute: its first window ends 15 s later.
    let rule = rls_rule("rl/k", "rl", &[("k", "v")], limit(1, Unit::Minute, 0));
    let (engine, clock) = engine_with(vec![rule], 100, Duration::from_secs(UNIX_AT_BASE + 45));
    let at = |ns| one(&engine, "rl", &[("k", "v")], clock.at_ns(ns));
    let first = at(0);
    assert_eq!((first.code, first.duration_until_reset), (Code::Ok, Duration::from_secs(15)));
    assert_eq!(at(14_999_999_999).code, Code::OverLimit);
    let next = at(15_000_000_000);
    assert_eq!((next.code, next.duration_until_reset), (Code::Ok, Duration::from_secs(60)));
    // Sub-second remainders round up: 0.5 s left reads as 1 s.
    assert_eq!(at(74_500_000_000).duration_until_reset, Duration::from_secs(1));
}

#[test]
fn unlimited_matches_and_reports_no_limit() {
    let rules = vec![
        rls_rule("rl/vip", "rl", &[("user", "vip")], None),
        rls_rule("rl/user", "rl", &[("user", "")], limit(1, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    for _ in 0..3 {
        let s = one(&engine, "rl", &[("user", "vip")], clock.at(0));
        assert_eq!((s.code, s.limit.is_none(), s.limit_remaining), (Code::Ok, true, u32::MAX));
        assert_eq!(s.rule.as_deref(), Some("rl/vip"));
    }
    assert!(ratelimit_headers(&[one(&engine, "rl", &[("user", "vip")], clock.at(0))]).is_none());
    assert_eq!(engine.tracked_keys(), 0);
    // Other users hit the key-only rule.
    assert_eq!(one(&engine, "rl", &[("user", "joe")], clock.at(0)).code, Code::Ok);
    assert_eq!(one(&engine, "rl", &[("user", "joe")], clock.at(0)).code, Code::OverLimit);
}

#[test]
fn replaced_rules_are_dropped_for_the_request() {
    let per_user = rls_rule("rl/per-user", "rl", &[("user", "")], limit(1, Unit::Minute, 0));
    let mut premium = rls_rule("rl/premium", "rl", &[("plan", "premium")], limit(100, Unit::Minute, 0));
    premium.replaces = vec!["rl/per-user".into()];
    let (engine, clock) = engine(vec![per_user, premium]);
    let both = || rls("rl", vec![descriptor(&[("user", "alice")]), descriptor(&[("plan", "premium")])]);
    for _ in 0..3 {
        let resp = engine.should_rate_limit(&both(), clock.at(0)).unwrap();
        assert_eq!(resp.overall, Code::Ok);
        assert_eq!(rule_names(&resp), [None, Some("rl/premium")]);
        assert!(resp.statuses[0].limit.is_none());
    }
    // Alone, the per-user rule applies, and it was never charged above.
    assert_eq!(one(&engine, "rl", &[("user", "alice")], clock.at(0)).code, Code::Ok);
    assert_eq!(one(&engine, "rl", &[("user", "alice")], clock.at(0)).code, Code::OverLimit);
    assert_eq!(one(&engine, "rl", &[("plan", "premium")], clock.at(0)).limit_remaining, 96);
}

#[test]
fn shadow_rules_count_and_answer_ok() {
    let mut rule = rls_rule("rl/shadow", "rl", &[("k", "v")], limit(2, Unit::Minute, 0));
    rule.shadow = true;
    let (engine, clock) = engine(vec![rule]);
    let got: Vec<(Code, bool, u32)> = (0..4)
        .map(|_| {
            let resp = engine.should_rate_limit(&rls("rl", vec![descriptor(&[("k", "v")])]), clock.at(0)).unwrap();
            assert_eq!(resp.overall, Code::Ok);
            let s = &resp.statuses[0];
            assert!(s.limit.is_some());
            (s.code, s.shadow_over_limit, s.limit_remaining)
        })
        .collect();
    assert_eq!(got, [(Code::Ok, false, 1), (Code::Ok, false, 0), (Code::Ok, true, 0), (Code::Ok, true, 0)]);
}

#[test]
fn hits_addend_per_request_and_per_descriptor() {
    let (engine, clock) = engine(vec![rls_rule("rl/k", "rl", &[("k", "")], limit(5, Unit::Minute, 0))]);
    let ask = |value: &str, request_hits, descriptor_hits| {
        let mut d = descriptor(&[("k", value)]);
        d.hits_addend = descriptor_hits;
        let mut req = rls("rl", vec![d]);
        req.hits_addend = request_hits;
        let s = engine.should_rate_limit(&req, clock.at(0)).unwrap().statuses.remove(0);
        (s.code, s.limit_remaining)
    };
    // 0 means 1.
    assert_eq!(ask("a", 0, None), (Code::Ok, 4));
    assert_eq!(ask("a", 3, None), (Code::Ok, 1));
    // Per-descriptor overrides the request's; Some(0) checks without charging.
    assert_eq!(ask("a", 3, Some(0)), (Code::Ok, 1));
    assert_eq!(ask("a", 3, Some(0)), (Code::Ok, 1));
    assert_eq!(ask("a", 1, Some(2)), (Code::OverLimit, 0));
    // The window counted those 2 over-limit hits, as the reference's INCRBY does: even a
    // check-only request now sees it over the limit.
    assert_eq!(ask("a", 1, Some(0)), (Code::OverLimit, 0));
    // A check on a new value stores nothing.
    assert_eq!(ask("fresh", 9, Some(0)), (Code::Ok, 5));
    assert_eq!(engine.tracked_keys(), 1);
}

#[test]
fn token_bucket_rules_over_rls_charge_the_hits() {
    let rule = gateway_rule("p/r", vec![generic("p/r")], limit(10, Unit::Second, 0));
    let (engine, clock) = engine(vec![rule]);
    let ask = |hits| {
        let mut req = rls(DEFAULT_DOMAIN, vec![descriptor(&[(keys::GENERIC_KEY, "p/r")])]);
        req.hits_addend = hits;
        let s = engine.should_rate_limit(&req, clock.at(0)).unwrap().statuses.remove(0);
        (s.code, s.limit_remaining)
    };
    assert_eq!(ask(4), (Code::Ok, 6));
    assert_eq!(ask(7), (Code::OverLimit, 0));
    // A refused charge takes nothing from a token bucket.
    assert_eq!(ask(6), (Code::Ok, 0));
}

#[test]
fn overall_is_over_limit_if_any_descriptor_is() {
    let rules = vec![
        rls_rule("rl/a", "rl", &[("a", "")], limit(1, Unit::Minute, 0)),
        rls_rule("rl/b", "rl", &[("b", "")], limit(10, Unit::Minute, 0)),
    ];
    let (engine, clock) = engine(rules);
    let req = rls("rl", vec![descriptor(&[("a", "x")]), descriptor(&[("b", "y")]), descriptor(&[("c", "z")])]);
    let first = engine.should_rate_limit(&req, clock.at(0)).unwrap();
    assert_eq!(first.overall, Code::Ok);
    let second = engine.should_rate_limit(&req, clock.at(0)).unwrap();
    assert_eq!(second.overall, Code::OverLimit);
    let codes: Vec<Code> = second.statuses.iter().map(|s| s.code).collect();
    assert_eq!(codes, [Code::OverLimit, Code::Ok, Code::Ok]);
    // Envoy semantics: the other descriptors were charged anyway.
    assert_eq!(second.statuses[1].limit_remaining, 8);
    assert_eq!((second.statuses[2].rule.as_ref(), second.statuses[2].limit_remaining), (None, 0));
    let headers = ratelimit_headers(&second.statuses).unwrap();
    assert_eq!(headers[0].1, r#"1, 1;w=60;name="rl/a", 10;w=60;name="rl/b""#);
    assert_eq!((headers[1].1.as_str(), headers[2].1.as_str()), ("0", "60"));
}

#[test]
fn unknown_domain_is_ok_without_limits() {
    let (engine, clock) = engine(vec![rls_rule("rl/k", "rl", &[("k", "")], limit(1, Unit::Minute, 0))]);
    for _ in 0..3 {
        let resp = engine
            .should_rate_limit(
                &rls("elsewhere", vec![descriptor(&[("k", "v")]), descriptor(&[("x", "y")])]),
                clock.at(0),
            )
            .unwrap();
        assert_eq!(resp.overall, Code::Ok);
        assert_eq!(resp.statuses.len(), 2);
        assert!(resp.statuses.iter().all(|s| s.code == Code::Ok && s.limit.is_none() && s.rule.is_none()));
    }
    assert!(engine.lookup("elsewhere", &[DescriptorEntry { key: "k".into(), value: "v".into() }]).is_none());
}

#[test]
fn malformed_requests_are_errors() {
    let (engine, clock) = engine(vec![rls_rule("rl/k", "rl", &[("k", "")], limit(1, Unit::Minute, 0))]);
    let now = clock.at(0);
    let err = |req: RlsRequest| engine.should_rate_limit(&req, now).unwrap_err();
    assert_eq!(err(rls("", vec![descriptor(&[("k", "v")])])), RequestError::EmptyDomain);
    assert_eq!(err(rls("rl", vec![])), RequestError::NoDescriptors);
    // Nothing was counted by the rejected requests.
    assert_eq!(engine.tracked_keys(), 0);
    // An entry-less descriptor, or an empty key, matches nothing (the reference answers OK).
    let resp = engine.should_rate_limit(&rls("rl", vec![descriptor(&[("k", "v")]), descriptor(&[])]), now).unwrap();
    assert_eq!(resp.statuses[1].code, Code::Ok);
    assert!(resp.statuses[1].limit.is_none());
    let resp = engine.should_rate_limit(&rls("rl", vec![descriptor(&[("", "v")])]), now).unwrap();
    assert!(resp.statuses[0].limit.is_none());
}

#[test]
fn gateway_rules_match_their_own_descriptors_over_rls() {
    let nets = vec!["10.0.0.0/8".parse().unwrap()];
    let per_address = |name: &str, invert| {
        gateway_rule(
            name,
            vec![
                generic(name),
                EntryMatch {
                    key: keys::REMOTE_ADDRESS.into(),
                    attribute: Attribute::RemoteAddress,
                    value: EntryValue::Cidr { nets: nets.clone(), distinct: true, invert },
                },
            ],
            limit(2, Unit::Minute, 0),
        )
    };
    let (engine, clock) = engine(vec![per_address("p/inside", false), per_address("p/outside", true)]);
    let ask = |rule: &str, addr: &str| {
        one(&engine, DEFAULT_DOMAIN, &[(keys::GENERIC_KEY, rule), (keys::REMOTE_ADDRESS, addr)], clock.at(0))
    };
    assert_eq!(ask("p/inside", "10.1.1.1").rule.as_deref(), Some("p/inside"));
    assert_eq!(ask("p/inside", "192.0.2.1").rule, None);
    assert_eq!(ask("p/outside", "10.1.1.1").rule, None);
    assert_eq!(ask("p/outside", "192.0.2.1").rule.as_deref(), Some("p/outside"));
    // A bucket per address (2 per minute), shared with HTTP requests from that address.
    assert_eq!(ask("p/inside", "10.1.1.1").limit_remaining, 0);
    assert_eq!(ask("p/inside", "10.1.1.2").limit_remaining, 1);
    let mut req = http(&[]);
    req.remote = "10.1.1.2".parse().unwrap();
    assert!(engine.check_request(&req, clock.at(0)).allowed);
    assert!(!engine.check_request(&req, clock.at(0)).allowed);
    // The cache key the Redis backend uses: the reference layout with the request values.
    let m = engine
        .lookup(
            DEFAULT_DOMAIN,
            &[
                DescriptorEntry { key: keys::GENERIC_KEY.into(), value: "p/inside".into() },
                DescriptorEntry { key: keys::REMOTE_ADDRESS.into(), value: "10.1.1.1".into() },
            ],
        )
        .unwrap();
    assert_eq!(m.cache_key_prefix, "limiter_generic_key_p/inside_remote_address_10.1.1.1_");
    assert_eq!(m.rule_index, 0);
}
