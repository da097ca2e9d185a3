//! The stats line `run` logs at each `--stats-interval`: the kernel's counters and the rate
//! limit service's answers since the previous line.

use std::time::Duration;

use limiter_common::{Counter, reason};

use crate::{control::RlsStatus, dataplane::Stats};

fn delta(a: Counter, b: Counter) -> Counter {
    Counter { packets: b.packets.saturating_sub(a.packets), bytes: b.bytes.saturating_sub(a.bytes) }
}

/// One line per interval: rates passed and dropped, then drops by reason and by rule.
pub fn stats_line(before: &Stats, now: &Stats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let passed = delta(before.passed(), now.passed());
    let dropped = delta(before.dropped(), now.dropped());
    let mut line = format!(
        "stats: passed {} pkts ({:.0}/s), dropped {} pkts ({:.0}/s)",
        passed.packets,
        passed.packets as f64 / secs,
        dropped.packets,
        dropped.packets as f64 / secs
    );
    let reasons: Vec<String> = (reason::DROP_UNPARSED..reason::VERDICT_REASONS)
        .filter_map(|r| {
            let d = delta(before.reason(r), now.reason(r)).packets;
            (d > 0).then(|| format!("{}={d}", reason::name(r)))
        })
        .collect();
    if !reasons.is_empty() {
        line.push_str(&format!(" [by reason: {}]", reasons.join(" ")));
    }
    let rules: Vec<String> = now
        .rules
        .iter()
        .filter_map(|(name, c)| {
            let prev = before.rules.get(name).copied().unwrap_or_default();
            let d = delta(prev.dropped, c.dropped).packets;
            let s = delta(prev.shadow_dropped, c.shadow_dropped).packets;
            match (d, s) {
                (0, 0) => None,
                (d, 0) => Some(format!("{name}={d}")),
                (d, s) => Some(format!("{name}={d}(+{s} shadow)")),
            }
        })
        .collect();
    if !rules.is_empty() {
        line.push_str(&format!(" [by rule: {}]", rules.join(" ")));
    }
    line
}

/// The rate limit service's part of the stats line: descriptors answered OK and over the
/// limit, calls refused and sources escalated since `before`.
pub fn rls_stats(before: &RlsStatus, now: &RlsStatus) -> String {
    let d = |f: fn(&RlsStatus) -> u64| f(now).saturating_sub(f(before));
    let mut part = format!(
        "rls: ok {}, over_limit {}, errors {}, escalations {}",
        d(RlsStatus::ok),
        d(RlsStatus::over_limit),
        d(RlsStatus::request_errors_total),
        d(RlsStatus::escalations_total)
    );
    let shadow = d(RlsStatus::shadow_over_limit_total);
    if shadow > 0 {
        part.push_str(&format!(", shadow {shadow}"));
    }
    if let Some(redis) = now.redis.as_ref().filter(|r| !r.connected) {
        part.push_str(&format!(" [redis unreachable: answering {}]", redis.failure_mode));
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_reports_deltas_by_reason_and_rule() {
        let mut a = Stats { reasons: vec![Counter::default(); reason::COUNT as usize], ..Default::default() };
        let mut b = a.clone();
        b.reasons[reason::PASS_CONFORMING as usize] = Counter { packets: 10, bytes: 1000 };
        b.reasons[reason::DROP_SHARED_BUCKET as usize] = Counter { packets: 4, bytes: 400 };
        a.rules.insert("p/r".into(), Default::default());
        let mut rc = limiter_common::RuleCounter::default();
        rc.dropped.packets = 4;
        b.rules.insert("p/r".into(), rc);
        let line = stats_line(&a, &b, Duration::from_secs(2));
        assert_eq!(
            line,
            "stats: passed 10 pkts (5/s), dropped 4 pkts (2/s) [by reason: shared_bucket=4] [by rule: p/r=4]"
        );
    }

    #[test]
    fn rls_stats_part_reports_deltas_and_an_unreachable_redis() {
        use crate::control::{DecisionCount, EscalationCount, RedisStatus, RequestErrorCount, ShadowCount};
        let decision =
            |code: &str, n| DecisionCount { domain: "d".into(), rule: "d/r".into(), code: code.into(), descriptors: n };
        let before = RlsStatus { decisions: vec![decision("OK", 10), decision("OVER_LIMIT", 1)], ..Default::default() };
        let now = RlsStatus {
            decisions: vec![decision("OK", 15), decision("OVER_LIMIT", 4)],
            request_errors: vec![RequestErrorCount { reason: "overloaded".into(), requests: 2 }],
            escalations: vec![EscalationCount { policy: "p".into(), sources: 1 }],
            ..Default::default()
        };
        assert_eq!(rls_stats(&before, &now), "rls: ok 5, over_limit 3, errors 2, escalations 1");
        let shadowed = RlsStatus {
            shadow_over_limit: vec![ShadowCount { domain: "d".into(), rule: "d/s".into(), descriptors: 7 }],
            redis: Some(RedisStatus { connected: false, failure_mode: "failOpen".into(), ..Default::default() }),
            ..now.clone()
        };
        assert_eq!(
            rls_stats(&now, &shadowed),
            "rls: ok 0, over_limit 0, errors 0, escalations 0, shadow 7 [redis unreachable: answering failOpen]"
        );
    }
}
