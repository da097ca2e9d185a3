//! Domains, matching, unlimited/replaces/shadow, hits_addend, status fields, gateway kinds.

use super::*;

// ---------------------------------------------------------------------------------------------
// 1. Domains

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_selects_the_rule_set() {
    let mut rls = start(shop_and_api("domain")).await;
    // `k=exact` is a rule of `shop` only; the gateway kinds' domain and an unknown one answer
    // it OK without a limit, however often it is asked.
    for _ in 0..3 {
        for domain in ["limiter", "elsewhere"] {
            let resp = rls
                .ask(request(
                    domain,
                    vec![descriptor(&[("k", "exact")]), descriptor(&[("generic_key", "api/per-user"), ("x", "y")])],
                ))
                .await;
            assert_eq!(resp.overall_code, ProtoCode::Ok as i32, "{domain}");
            assert_eq!(resp.statuses.iter().map(seen).collect::<Vec<_>>(), [no_limit(0), no_limit(0)], "{domain}");
        }
    }
    // In `shop` the same descriptor has its limit of 1: the second call is over it, and the
    // overall code says so even beside a descriptor that is fine.
    let minute = reset_at_t(60);
    assert_eq!(seen(&rls.one("shop", &[("k", "exact")]).await), ok("", 1, ProtoUnit::Minute, 0, minute));
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "other")]), descriptor(&[("k", "exact")])])).await;
    assert_eq!(resp.overall_code, ProtoCode::OverLimit as i32);
    assert_eq!(
        resp.statuses.iter().map(seen).collect::<Vec<_>>(),
        [ok("", 3, ProtoUnit::Minute, 2, minute), over("", 1, ProtoUnit::Minute, minute)]
    );
    // And the other way round: a gateway rule's descriptor is limited in `limiter` only.
    let eve = [("generic_key", "api/per-user"), ("x-user-id", "eve")];
    assert_eq!(seen(&rls.one("shop", &eve).await), no_limit(0));
    assert_eq!(seen(&rls.one("limiter", &eve).await), ok("api/per-user", 3, ProtoUnit::Minute, 5, 20));
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Matching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_is_envoyproxy_ratelimits() {
    let mut rls = start(shop_and_api("matching")).await;
    let minute = reset_at_t(60);
    let hour = reset_at_t(3600);
    // Unnamed limits report an empty name (as the reference), so the limit tells them apart:
    // k=exact 1, k=ex* 2, k 3, k=e* 4 per minute.
    let rule = |s: &DescriptorStatus| s.current_limit.as_ref().map(|l| l.requests_per_unit);

    // Exact beats the wildcards listed before it; the first wildcard in config order wins;
    // the key alone comes last.
    assert_eq!(rule(&rls.one("shop", &[("k", "exact")]).await), Some(1));
    assert_eq!(rule(&rls.one("shop", &[("k", "exz")]).await), Some(2));
    assert_eq!(rule(&rls.one("shop", &[("k", "ex")]).await), Some(2), "`*` matches nothing");
    assert_eq!(rule(&rls.one("shop", &[("k", "eq")]).await), Some(4));
    assert_eq!(rule(&rls.one("shop", &[("k", "other")]).await), Some(3));
    // A wildcard in the middle of the value.
    assert_eq!(seen(&rls.one("shop", &[("path", "/api/v1/x")]).await), ok("", 5, ProtoUnit::Hour, 4, hour));
    assert_eq!(seen(&rls.one("shop", &[("path", "/api/v1/y")]).await), no_limit(0));
    // Wildcard and key-only rules count each value on its own: `exz` was charged above,
    // `exy` is fresh; `other` was charged once, `another` not.
    assert_eq!(seen(&rls.one("shop", &[("k", "exz")]).await), ok("", 2, ProtoUnit::Minute, 0, minute));
    assert_eq!(seen(&rls.one("shop", &[("k", "exy")]).await), ok("", 2, ProtoUnit::Minute, 1, minute));
    assert_eq!(seen(&rls.one("shop", &[("k", "another")]).await), ok("", 3, ProtoUnit::Minute, 2, minute));

    // Nested descriptors, and the depth rule: the request must end where the rule does.
    let anon = "";
    let nested = [("authenticated", "false"), ("remote_address", "192.0.2.1")];
    assert_eq!(seen(&rls.one("shop", &nested).await), ok(anon, 30, ProtoUnit::Minute, 29, minute));
    assert_eq!(seen(&rls.one("shop", &[("authenticated", "false")]).await), no_limit(0), "shorter than the rule");
    let longer = [("authenticated", "false"), ("remote_address", "192.0.2.1"), ("x", "1")];
    assert_eq!(seen(&rls.one("shop", &longer).await), no_limit(0), "longer than the rule");
    assert_eq!(seen(&rls.one("shop", &[("k", "exact"), ("k", "exact")]).await), no_limit(0), "longer than the rule");
    assert_eq!(seen(&rls.one("shop", &[("remote_address", "192.0.2.1")]).await), no_limit(0), "not a rule's prefix");
    // Neither the shorter nor the longer descriptor was charged to the nested rule.
    assert_eq!(seen(&rls.one("shop", &nested).await), ok(anon, 30, ProtoUnit::Minute, 28, minute));
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. unlimited, replaces, shadow_mode

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_replaces_and_shadow_mode() {
    let mut rls = start(shop_and_api("special")).await;
    // `unlimited`: OK, no limit, remaining u32::MAX, every time.
    for _ in 0..40 {
        let s = rls.one("shop", &[("authenticated", "false"), ("remote_address", "10.0.0.5")]).await;
        assert_eq!(seen(&s), no_limit(u32::MAX));
    }
    // A neighbour is limited as usual.
    let anon = [("authenticated", "false"), ("remote_address", "10.0.0.6")];
    assert_eq!(seen(&rls.one("shop", &anon).await), ok("", 30, ProtoUnit::Minute, 29, reset_at_t(60)));

    // `replaces`: with the trial descriptor in the same call, the daily limit does not apply
    // and is not charged.
    let daily = [("client_id", "acme")];
    let trial = [("client_id", "acme"), ("plan", "trial")];
    let (day, hour) = (reset_at_t(86_400), reset_at_t(3600));
    for remaining in [99, 98] {
        let resp = rls.ask(request("shop", vec![descriptor(&daily), descriptor(&trial)])).await;
        assert_eq!(
            resp.statuses.iter().map(seen).collect::<Vec<_>>(),
            [no_limit(0), ok("trial-hourly", 100, ProtoUnit::Hour, remaining, hour)]
        );
    }
    // Alone, the daily limit applies, untouched by the calls above.
    assert_eq!(seen(&rls.one("shop", &daily).await), ok("client-daily", 5000, ProtoUnit::Day, 4999, day));

    // `shadow_mode`: over the limit of 2 but answered OK, with remaining 0, and counted.
    let shadow = [("tuning", "shadow")];
    // Metrics label the rule by its path; the answer carries the (empty) configured name.
    let name = "shop/tuning=shadow";
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(seen(&rls.one("shop", &shadow).await));
    }
    let second = ProtoUnit::Second;
    assert_eq!(
        got,
        [ok("", 2, second, 1, 1), ok("", 2, second, 0, 1), ok("", 2, second, 0, 1), ok("", 2, second, 0, 1)]
    );
    let text = rls.metrics.render();
    assert_eq!(
        metric(&text, &format!("limiter_rls_shadow_over_limit_total{{domain=\"shop\",rule=\"{name}\"}}")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("limiter_rls_decisions_total{{domain=\"shop\",rule=\"{name}\",code=\"OK\"}}")),
        Some(4.0),
        "{text}"
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. hits_addend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_per_request_and_per_descriptor() {
    let mut rls = start(shop_and_api("hits")).await;
    let minute = reset_at_t(60);
    let name = "";
    let mut ask = async |request_hits: u32, descriptor_hits: Option<u64>| {
        let mut d = descriptor(&[("hits", "a")]);
        d.hits_addend = descriptor_hits.map(|value| UInt64Value { value });
        let mut req = request("shop", vec![d]);
        req.hits_addend = request_hits;
        let resp = rls.ask(req).await;
        seen(&resp.statuses[0])
    };
    // 0 counts as 1, as in Envoy and the reference.
    assert_eq!(ask(0, None).await, ok(name, 5, ProtoUnit::Minute, 4, minute));
    assert_eq!(ask(2, None).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    // Per descriptor 0: check only, twice, nothing charged.
    assert_eq!(ask(2, Some(0)).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    assert_eq!(ask(2, Some(0)).await, ok(name, 5, ProtoUnit::Minute, 2, minute));
    // Per descriptor overrides the request's: 1 instead of 4.
    assert_eq!(ask(4, Some(1)).await, ok(name, 5, ProtoUnit::Minute, 1, minute));
    // 2 more is over the 1 left.
    assert_eq!(ask(1, Some(2)).await, over(name, 5, ProtoUnit::Minute, minute));

    // Two descriptors of one call: one overrides the request's hits, the other takes them.
    let mut first = descriptor(&[("hits", "b")]);
    first.hits_addend = Some(UInt64Value { value: 1 });
    let mut req = request("shop", vec![first, descriptor(&[("hits", "c")])]);
    req.hits_addend = 3;
    let resp = rls.ask(req).await;
    assert_eq!(
        resp.statuses.iter().map(seen).collect::<Vec<_>>(),
        [ok(name, 5, ProtoUnit::Minute, 4, minute), ok(name, 5, ProtoUnit::Minute, 2, minute)]
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Status fields, counting down to the limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_count_down_with_exact_limits_and_resets() {
    let mut rls = start(shop_and_api("countdown")).await;
    let minute = reset_at_t(60);
    assert_eq!(minute, 30, "T is 30 s into a minute");
    let name = "";
    let mut got = Vec::new();
    for _ in 0..5 {
        let s = rls.one("shop", &[("k", "countdown")]).await;
        let limit = s.current_limit.as_ref().expect("current_limit on every limited status");
        assert_eq!((limit.requests_per_unit, limit.unit, limit.name.as_str()), (3, ProtoUnit::Minute as i32, name));
        got.push(seen(&s));
    }
    let m = ProtoUnit::Minute;
    assert_eq!(
        got,
        [
            ok(name, 3, m, 2, 30),
            ok(name, 3, m, 1, 30),
            ok(name, 3, m, 0, 30),
            over(name, 3, m, 30),
            over(name, 3, m, 30)
        ]
    );
    // Hour and day windows, aligned to unix time like the reference.
    assert_eq!(seen(&rls.one("shop", &[("path", "/api/z/x")]).await), ok("", 5, ProtoUnit::Hour, 4, 3600 - 810));
    assert_eq!(
        seen(&rls.one("shop", &[("client_id", "zed")]).await),
        ok("client-daily", 5000, ProtoUnit::Day, 4999, 86_400 - 80_010)
    );
    rls.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Gateway kinds

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rules_count_per_user_in_token_buckets() {
    let mut rls = start(shop_and_api("gateway")).await;
    let name = "api/per-user";
    let user = |who: &'static str| descriptor(&[("generic_key", "api/per-user"), ("x-user-id", who)]);
    let m = ProtoUnit::Minute;
    // requests 3 per minute, burst 3: a depth of 6; every token comes back in 20 s, the
    // bucket is full again 20 s per token taken.
    let mut got = Vec::new();
    for _ in 0..7 {
        let resp = rls.ask(request("limiter", vec![user("alice")])).await;
        got.push(seen(&resp.statuses[0]));
    }
    assert_eq!(
        got,
        [
            ok(name, 3, m, 5, 20),
            ok(name, 3, m, 4, 40),
            ok(name, 3, m, 3, 60),
            ok(name, 3, m, 2, 80),
            ok(name, 3, m, 1, 100),
            ok(name, 3, m, 0, 120),
            over(name, 3, m, 120),
        ]
    );
    // Bob has his own bucket; alice stays refused beside him in one call.
    let resp = rls.ask(request("limiter", vec![user("bob"), user("alice")])).await;
    assert_eq!(resp.overall_code, ProtoCode::OverLimit as i32);
    assert_eq!(resp.statuses.iter().map(seen).collect::<Vec<_>>(), [ok(name, 3, m, 5, 20), over(name, 3, m, 120)]);
    // Without the generic_key the rule is not selected (its descriptor starts with it).
    assert_eq!(seen(&rls.one("limiter", &[("x-user-id", "alice")]).await), no_limit(0));

    // The sourceCIDR rule: per client address.
    let ip = |addr: &'static str| [("generic_key", "api/per-ip"), ("remote_address", addr)];
    let h = ProtoUnit::Hour;
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), ok("api/per-ip", 2, h, 1, 1800));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), ok("api/per-ip", 2, h, 0, 3600));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.7")).await), over("api/per-ip", 2, h, 3600));
    assert_eq!(seen(&rls.one("limiter", &ip("192.0.2.8")).await), ok("api/per-ip", 2, h, 1, 1800));
    // A value that is not an address is outside every range.
    assert_eq!(seen(&rls.one("limiter", &ip("not-an-address")).await), no_limit(0));
    rls.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_descriptors_and_limit_overrides_as_the_reference() {
    let mut rls = start(shop_and_api("overrides")).await;
    let minute = reset_at_t(60);
    // An entry-less descriptor and an empty key match nothing: OK, no limit, beside a limited one.
    let mut empty = descriptor(&[("k", "v")]);
    empty.entries.clear();
    let blank_key = descriptor(&[("", "x")]);
    let resp = rls.ask(request("shop", vec![descriptor(&[("k", "fine")]), empty, blank_key])).await;
    let got: Vec<Seen> = resp.statuses.iter().map(seen).collect();
    assert_eq!(got, [ok("", 3, ProtoUnit::Minute, 2, minute), no_limit(0), no_limit(0)]);

    // A descriptor's own limit replaces the configured one (k = 3 per minute), counted under
    // the descriptor's entries, with an empty name; WEEK is accepted as the reference does.
    let with_limit = |rpu: u32, unit: i32| {
        let mut d = descriptor(&[("k", "overridden")]);
        d.limit = Some(RateLimitOverride { requests_per_unit: rpu, unit });
        request("shop", vec![d])
    };
    let hour = reset_at_t(3600);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(seen(&rls.ask(with_limit(2, ProtoUnit::Hour as i32)).await.statuses[0]));
    }
    assert_eq!(
        got,
        [ok("", 2, ProtoUnit::Hour, 1, hour), ok("", 2, ProtoUnit::Hour, 0, hour), over("", 2, ProtoUnit::Hour, hour)]
    );
    // Another unit is another window: fresh.
    let week = seen(&rls.ask(with_limit(10, 7)).await.statuses[0]);
    assert_eq!((week.2, week.3, week.4), (10, ProtoUnit::Week, 9));
    // The configured limit of the same descriptor was not touched.
    assert_eq!(seen(&rls.one("shop", &[("k", "overridden")]).await), ok("", 3, ProtoUnit::Minute, 2, minute));
    // An unknown domain stays unknown, override or not.
    let mut d = descriptor(&[("k", "v")]);
    d.limit = Some(RateLimitOverride { requests_per_unit: 1, unit: ProtoUnit::Second as i32 });
    assert_eq!(seen(&rls.ask(request("elsewhere", vec![d])).await.statuses[0]), no_limit(0));
    rls.stop().await;
}
