//! Tests of rates and rendering together, over the same snapshot fixtures.

use super::*;
use crate::control::{
    DecisionCount, EscalationCount, ReasonCount, RedisStatus, RequestErrorCount, RlsStatus, RuleCount, ShadowCount,
    SourceCount, SourceTable, Verdict,
};

fn snap(ms: u64, dropped: u64, src: u64) -> Snapshot {
    Snapshot {
        version: "0".into(),
        time_unix_ms: ms,
        uptime_s: ms / 1000,
        reasons: vec![
            ReasonCount { reason: "conforming".into(), verdict: Verdict::Pass, packets: 100, bytes: 10_000 },
            ReasonCount {
                reason: "source_bucket".into(),
                verdict: Verdict::Drop,
                packets: dropped,
                bytes: dropped * 60,
            },
        ],
        rules: vec![RuleCount { name: "demo/per-source".into(), dropped_packets: dropped, ..Default::default() }],
        top_sources: vec![SourceCount { source: "10.0.0.9".parse().unwrap(), dropped_packets: src, dropped_bytes: 0 }],
        sources: SourceTable { tracked: 5, capacity: 100, sampled_at_unix_ms: ms },
        ..Default::default()
    }
}

#[test]
fn rates_are_deltas_over_the_agents_read_times() {
    let r = Rates::between(&snap(10_000, 100, 50), &snap(12_000, 500, 250));
    assert_eq!(r.interval_s, 2.0);
    assert_eq!(r.dropped.packets_per_s, 200.0);
    assert_eq!(r.dropped.bytes_per_s, 12_000.0);
    assert_eq!(r.passed.packets_per_s, 0.0);
    assert_eq!(r.reasons.len(), 1, "only reasons that moved");
    assert_eq!(r.reasons[0].reason, "source_bucket");
    assert_eq!(r.rules[0].dropped.packets_per_s, 200.0);
    assert_eq!(r.top_sources[0].dropped_packets_per_s, Some(100.0));
    let text = render(&snap(12_000, 500, 250), &r, Path::new("/s"));
    assert!(text.contains("source_bucket"), "{text}");
    assert!(text.contains("10.0.0.9"), "{text}");
    assert!(text.contains("5 of 100 tracked (5.0%)"), "{text}");
}

#[test]
fn same_snapshot_or_restarted_agent_gives_zero_rates_not_garbage() {
    let a = snap(10_000, 100, 50);
    assert_eq!(Rates::between(&a, &a).dropped.packets_per_s, 0.0);
    let restarted = Snapshot { uptime_s: 0, ..snap(11_000, 5, 5) };
    let r = Rates::between(&a, &restarted);
    assert_eq!(r.interval_s, 0.0);
    assert_eq!(r.dropped.packets_per_s, 0.0);
}

#[test]
fn json_view_has_the_snapshot_fields_and_rates() {
    let (a, b) = (snap(10_000, 100, 50), snap(11_000, 200, 60));
    let rates = Rates::between(&a, &b);
    let v: serde_json::Value = serde_json::to_value(JsonView { snapshot: &b, rates: &rates }).unwrap();
    assert_eq!(v["rules"][0]["dropped_packets"], 200);
    assert_eq!(v["sources"]["capacity"], 100);
    assert_eq!(v["rates"]["dropped"]["packets_per_s"], 100.0);
    assert_eq!(v["rls"]["serving"], false);
    assert_eq!(v["rates"]["rls"]["over_limit_per_s"], 0.0);
}

fn rls(ok: u64, over: u64, shadow: u64, errors: u64) -> RlsStatus {
    let d = |rule: &str, code: &str, n| DecisionCount {
        domain: "limiter".into(),
        rule: rule.into(),
        code: code.into(),
        descriptors: n,
    };
    RlsStatus {
        blocked_now: 1,
        serving: true,
        listen: Some("127.0.0.1:8081".parse().unwrap()),
        backend: "redis".into(),
        redis: Some(RedisStatus {
            connected: false,
            failure_mode: "failOpen".into(),
            errors: 7,
            failure_mode_answers: 3,
        }),
        l7_rules: 2,
        l7_tracked_keys: 25,
        l7_max_keys: 100,
        decisions: vec![
            d("", "OK", 4),
            d("web/a-rule-with-a-name-far-too-long-for-its-column", "OK", ok),
            d("web/a-rule-with-a-name-far-too-long-for-its-column", "OVER_LIMIT", over),
        ],
        shadow_over_limit: vec![ShadowCount {
            domain: "limiter".into(),
            rule: "web/shadow".into(),
            descriptors: shadow,
        }],
        request_errors: vec![RequestErrorCount { reason: "overloaded".into(), requests: errors }],
        escalation: true,
        escalations: vec![EscalationCount { policy: "web".into(), sources: 1 }],
    }
}

#[test]
fn rls_rates_split_ok_and_over_limit_by_rule_with_shadow_and_errors() {
    let before = Snapshot { rls: rls(10, 2, 0, 1), ..snap(10_000, 100, 50) };
    let now = Snapshot { rls: rls(30, 12, 4, 5), ..snap(12_000, 100, 50) };
    let r = Rates::between(&before, &now).rls;
    assert_eq!((r.ok_per_s, r.over_limit_per_s, r.shadow_over_limit_per_s), (10.0, 5.0, 2.0));
    assert_eq!((r.request_errors_per_s, r.escalations_per_s), (2.0, 0.0));
    let rules: Vec<(&str, f64, f64, f64, u64)> = r
        .rules
        .iter()
        .map(|x| (x.rule.as_str(), x.ok_per_s, x.over_limit_per_s, x.shadow_over_limit_per_s, x.over_limit_total))
        .collect();
    assert_eq!(
        rules,
        [
            ("", 0.0, 0.0, 0.0, 0),
            ("web/a-rule-with-a-name-far-too-long-for-its-column", 10.0, 5.0, 0.0, 12),
            ("web/shadow", 0.0, 0.0, 2.0, 0),
        ]
    );
    assert_eq!(r.request_errors, [RlsErrorRate { reason: "overloaded".into(), requests_per_s: 2.0 }]);

    // A rule or reason new since the older snapshot counts from zero; a restart gives 0.
    let fresh = Snapshot { rls: RlsStatus::default(), ..snap(10_000, 100, 50) };
    assert_eq!(Rates::between(&fresh, &now).rls.over_limit_per_s, 6.0);
    let restarted = Snapshot { uptime_s: 0, ..now.clone() };
    assert_eq!(Rates::between(&before, &restarted).rls.ok_per_s, 0.0);
}

#[test]
fn rls_view_names_rules_redis_state_and_escalations_in_80_columns() {
    let before = Snapshot { rls: rls(10, 2, 0, 1), ..snap(10_000, 100, 50) };
    let now = Snapshot {
        interfaces: vec![control::Interface { name: "eth0".into(), mode: "native".into() }],
        rls: rls(30, 12, 4, 5),
        ..snap(12_000, 100, 50)
    };
    let text = render(&now, &Rates::between(&before, &now), Path::new("/run/limiter/agent.sock"));
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line:?}\n{text}");
    }
    for want in [
        "rate limit service on 127.0.0.1:8081 | backend redis | 2 L7 rules",
        "descriptors/s: 10 ok, 5 over limit, 2 shadow over limit",
        "refused calls: 2/s (total: overloaded 5)",
        "redis: UNREACHABLE, answering failOpen | 7 errors, 3 answered by failOpen",
        "L7 keys: 25 of 100 tracked (25.0%)",
        "sources escalated to XDP: 1 (web 1)",
        "(no rule) limiter",
        "web/a-rule-with-a-name-far-too-…",
        "demo/per-source",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let row = text.lines().find(|l| l.contains("web/a-rule")).unwrap();
    assert_eq!(row.split_whitespace().skip(1).collect::<Vec<_>>(), ["10", "5", "12", "0"], "{row}");
}

#[test]
fn without_xdp_the_view_says_so_and_shows_only_the_rate_limit_service() {
    let rls_only = |ms| Snapshot {
        version: "0".into(),
        time_unix_ms: ms,
        uptime_s: ms / 1000,
        rls: RlsStatus { escalation: false, ..rls(ms / 1000, 0, 0, 0) },
        ..Default::default()
    };
    let (a, b) = (rls_only(10_000), rls_only(11_000));
    let text = render(&b, &Rates::between(&a, &b), Path::new("/s"));
    assert!(text.contains("no XDP program (rate limit service only)"), "{text}");
    assert!(text.contains("policy: 2 L7 rules"), "{text}");
    assert!(text.contains("sources escalated to XDP: off (needs --iface)"), "{text}");
    assert!(text.contains("descriptors/s: 1 ok"), "{text}");
    assert!(!text.contains("by reason") && !text.contains("source table"), "{text}");

    let not_serving = Snapshot { rls: RlsStatus::default(), ..snap(11_000, 1, 1) };
    let text = render(&not_serving, &Rates::default(), Path::new("/s"));
    assert!(text.contains("rate limit service: not serving (--no-rls)"), "{text}");
}

#[test]
fn the_piped_line_names_drops_by_rule_and_list_and_the_services_answers() {
    let with = |ms: u64, dropped: u64, denied: u64, ok: u64, over: u64| {
        let mut s = Snapshot {
            interfaces: vec![control::Interface { name: "eth0".into(), mode: "native".into() }],
            rls: rls(ok, over, 0, 1),
            ..snap(ms, dropped, 0)
        };
        s.reasons.push(ReasonCount { reason: "deny_list".into(), verdict: Verdict::Drop, packets: denied, bytes: 0 });
        s
    };
    let (a, b) = (with(10_000, 100, 10, 10, 2), with(12_000, 4_100, 50, 30, 300));
    let line = render_line(&b, &Rates::between(&a, &b));
    assert_eq!(
        line,
        "up 12s | passed 0/s | dropped 2.0k/s: demo/per-source 2.0k/s, deny_list 20/s | rls: 10 ok/s, 149 over limit/s"
    );
    assert_eq!(line.lines().count(), 1);

    // Nothing dropped: no list after the total. No XDP program: the service alone.
    let quiet = render_line(&a, &Rates::between(&a, &a));
    assert!(quiet.contains("| dropped 0/s |"), "{quiet}");
    let rls_only = Snapshot { version: "0".into(), uptime_s: 5, rls: rls(1, 0, 0, 0), ..Default::default() };
    assert_eq!(render_line(&rls_only, &Rates::default()), "up 5s | no XDP program | rls: 0 ok/s, 0 over limit/s");
}
