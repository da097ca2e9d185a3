//! Per-second rates between two control-socket snapshots: the kernel's packets, rules and
//! top sources, and the rate limit service's answers.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    control::{self, RlsStatus, Snapshot, Verdict},
    metrics::{CODE_OK, CODE_OVER_LIMIT},
};

/// Per-second rates between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Seconds between the two snapshots' counter reads (0: no newer snapshot; rates are 0).
    pub interval_s: f64,
    pub passed: Rate,
    pub dropped: Rate,
    /// Reasons that moved, in index order.
    pub reasons: Vec<ReasonRate>,
    pub rules: Vec<RuleRate>,
    /// Sources of the newer snapshot's top list; `None` when the older one cannot tell
    /// (the source was outside its truncated list).
    pub top_sources: Vec<SourceRate>,
    pub rls: RlsRates,
}

/// The rate limit service's answers per second.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RlsRates {
    /// Descriptors answered OK / OVER_LIMIT, over every rule.
    pub ok_per_s: f64,
    pub over_limit_per_s: f64,
    /// Descriptors shadow rules would have denied.
    pub shadow_over_limit_per_s: f64,
    /// Calls refused with a gRPC error.
    pub request_errors_per_s: f64,
    /// Sources put in the XDP block list.
    pub escalations_per_s: f64,
    /// Every (domain, rule) of the newer snapshot, sorted.
    pub rules: Vec<RlsRuleRate>,
    /// Every refusal reason of the newer snapshot.
    pub request_errors: Vec<RlsErrorRate>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RlsRuleRate {
    pub domain: String,
    /// Empty: descriptors no rule matched.
    pub rule: String,
    pub ok_per_s: f64,
    pub over_limit_per_s: f64,
    pub shadow_over_limit_per_s: f64,
    /// Cumulative OVER_LIMIT answers (from the newer snapshot).
    pub over_limit_total: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RlsErrorRate {
    pub reason: String,
    pub requests_per_s: f64,
}

impl RlsRates {
    /// `secs`: time between the two reads, `None` when the counters are not comparable
    /// (rates are 0).
    fn between(before: &RlsStatus, now: &RlsStatus, secs: Option<f64>) -> Self {
        let per_s = |a: u64, b: u64| secs.map_or(0.0, |secs| b.saturating_sub(a) as f64 / secs);
        let totals = |f: fn(&RlsStatus) -> u64| per_s(f(before), f(now));

        /// (domain, rule) -> [OK, OVER_LIMIT, shadow over limit].
        fn by_rule(r: &RlsStatus) -> BTreeMap<(&str, &str), [u64; 3]> {
            let mut m: BTreeMap<(&str, &str), [u64; 3]> = BTreeMap::new();
            for d in &r.decisions {
                let slot = match d.code.as_str() {
                    CODE_OK => 0,
                    CODE_OVER_LIMIT => 1,
                    _ => continue,
                };
                m.entry((d.domain.as_str(), d.rule.as_str())).or_default()[slot] += d.descriptors;
            }
            for s in &r.shadow_over_limit {
                m.entry((s.domain.as_str(), s.rule.as_str())).or_default()[2] += s.descriptors;
            }
            m
        }
        let (prev, cur) = (by_rule(before), by_rule(now));
        let rules = cur
            .iter()
            .map(|(&(domain, rule), c)| {
                let p = prev.get(&(domain, rule)).copied().unwrap_or_default();
                RlsRuleRate {
                    domain: domain.to_owned(),
                    rule: rule.to_owned(),
                    ok_per_s: per_s(p[0], c[0]),
                    over_limit_per_s: per_s(p[1], c[1]),
                    shadow_over_limit_per_s: per_s(p[2], c[2]),
                    over_limit_total: c[1],
                }
            })
            .collect();
        let request_errors = now
            .request_errors
            .iter()
            .map(|e| {
                let p = before.request_errors.iter().find(|p| p.reason == e.reason).map_or(0, |p| p.requests);
                RlsErrorRate { reason: e.reason.clone(), requests_per_s: per_s(p, e.requests) }
            })
            .collect();
        Self {
            ok_per_s: totals(RlsStatus::ok),
            over_limit_per_s: totals(RlsStatus::over_limit),
            shadow_over_limit_per_s: totals(RlsStatus::shadow_over_limit_total),
            request_errors_per_s: totals(RlsStatus::request_errors_total),
            escalations_per_s: totals(RlsStatus::escalations_total),
            rules,
            request_errors,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReasonRate {
    pub reason: String,
    pub verdict: Verdict,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleRate {
    pub name: String,
    pub passed: Rate,
    pub dropped: Rate,
    pub shadow_dropped_packets_per_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceRate {
    pub source: IpAddr,
    pub dropped_packets_per_s: Option<f64>,
}

impl Rates {
    pub fn between(before: &Snapshot, now: &Snapshot) -> Self {
        let secs = now.time_unix_ms.saturating_sub(before.time_unix_ms) as f64 / 1000.0;
        // Counters restart with the agent: a fresh agent's counters are not deltas.
        let comparable = secs > 0.0 && now.uptime_s >= before.uptime_s;
        let per_s = |a: u64, b: u64| {
            if comparable { b.saturating_sub(a) as f64 / secs } else { 0.0 }
        };
        let rate = |a: (u64, u64), b: (u64, u64)| Rate { packets_per_s: per_s(a.0, b.0), bytes_per_s: per_s(a.1, b.1) };

        let reasons = now
            .reasons
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let prev = before.reasons.get(i).filter(|p| p.reason == r.reason);
                let (pp, pb) = prev.map_or((0, 0), |p| (p.packets, p.bytes));
                ReasonRate {
                    reason: r.reason.clone(),
                    verdict: r.verdict,
                    packets_per_s: per_s(pp, r.packets),
                    bytes_per_s: per_s(pb, r.bytes),
                }
            })
            .filter(|r| r.packets_per_s > 0.0)
            .collect();
        let prev_rules: BTreeMap<&str, &control::RuleCount> =
            before.rules.iter().map(|r| (r.name.as_str(), r)).collect();
        let rules = now
            .rules
            .iter()
            .map(|r| {
                let p = prev_rules.get(r.name.as_str());
                let p = |f: fn(&control::RuleCount) -> u64| p.map_or(0, |p| f(p));
                RuleRate {
                    name: r.name.clone(),
                    passed: Rate {
                        packets_per_s: per_s(p(|x| x.passed_packets), r.passed_packets),
                        bytes_per_s: per_s(p(|x| x.passed_bytes), r.passed_bytes),
                    },
                    dropped: Rate {
                        packets_per_s: per_s(p(|x| x.dropped_packets), r.dropped_packets),
                        bytes_per_s: per_s(p(|x| x.dropped_bytes), r.dropped_bytes),
                    },
                    shadow_dropped_packets_per_s: per_s(p(|x| x.shadow_dropped_packets), r.shadow_dropped_packets),
                }
            })
            .collect();
        let complete = before.top_sources.len() < control::TOP_SOURCES;
        let top_sources = now
            .top_sources
            .iter()
            .map(|s| {
                let prev = before.top_sources.iter().find(|p| p.source == s.source).map(|p| p.dropped_packets);
                let prev = prev.or(complete.then_some(0));
                SourceRate { source: s.source, dropped_packets_per_s: prev.map(|p| per_s(p, s.dropped_packets)) }
            })
            .collect();
        Self {
            interval_s: if comparable { secs } else { 0.0 },
            passed: rate(before.total(Verdict::Pass), now.total(Verdict::Pass)),
            dropped: rate(before.total(Verdict::Drop), now.total(Verdict::Drop)),
            reasons,
            rules,
            top_sources,
            rls: RlsRates::between(&before.rls, &now.rls, comparable.then_some(secs)),
        }
    }
}
