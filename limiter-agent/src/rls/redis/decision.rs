//! How the backend decides one `ShouldRateLimit` request: which descriptors need Redis (the
//! rest are answered here, or by the in-process engine for node-local rules), the windows and
//! keys, judging each counter after its increment, the over-limit negative cache, and the
//! failure-mode answers.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{FailureMode, Inner, RedisBackend};
use crate::l7::{
    Code, DescriptorStatus, Engine, Match, ReportedLimit, RequestDescriptor, RequestError, RlsRequest, RlsResponse,
    descriptor_key_prefix, overall_code,
};
use crate::plan::Unit;
use crate::plan::l7::Scope;

/// One descriptor's plan for this request.
pub(super) enum Step {
    /// Nothing to count: answer this status as is.
    Done(DescriptorStatus),
    /// Count in Redis (one INCRBY + EXPIRE in the request's pipeline).
    Count {
        key: String,
        hits: u32,
        limit: ReportedLimit,
        shadow: bool,
        quota_mode: bool,
        window_end: u64,
        reset: Duration,
    },
}

impl RedisBackend {
    /// Decides one `ShouldRateLimit` request: matching through [`Engine::lookup`] (the same
    /// rules, `replaces`, `unlimited`, shadow mode and `hits_addend` as the local engine),
    /// counting in Redis. `now` is wall-clock time: windows are aligned to the unix epoch so
    /// that every node and the reference service agree on them.
    pub async fn should_rate_limit(
        &self,
        engine: &Engine,
        req: &RlsRequest,
        now: SystemTime,
    ) -> Result<RlsResponse, RequestError> {
        req.validate()?;
        let unix_now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let steps = self.plan(engine, req, unix_now);

        let counted = steps.iter().filter(|s| matches!(s, Step::Count { .. })).count();
        let replies = if counted == 0 { Ok(Vec::new()) } else { self.inner.round_trip(&steps).await };

        let mut statuses = Vec::with_capacity(steps.len());
        let mut quota = Vec::new();
        let mut replies = match replies {
            Ok(values) => Some(values.into_iter()),
            Err(()) => None,
        };
        for step in steps {
            statuses.push(match step {
                Step::Done(status) => status,
                Step::Count { key, hits: _, limit, shadow, quota_mode, window_end, reset } => {
                    if quota_mode {
                        quota.push(statuses.len());
                    }
                    match replies.as_mut().and_then(Iterator::next) {
                        Some(after) => self.inner.judge(key, after, limit, shadow, (unix_now, window_end), reset),
                        None => self.inner.failure_status(limit, shadow, reset),
                    }
                }
            });
        }
        Ok(RlsResponse { overall: overall_code(&statuses, &quota), statuses })
    }

    /// Matches every descriptor and decides which ones need Redis.
    fn plan(&self, engine: &Engine, req: &RlsRequest, unix_now: u64) -> Vec<Step> {
        if !engine.has_domain(&req.domain) {
            return req.descriptors.iter().map(|_| Step::Done(DescriptorStatus::no_limit(None, 0))).collect();
        }
        // A descriptor with its own limit skips the config (no rule, no `replaces`).
        let matches: Vec<Option<Match>> = req
            .descriptors
            .iter()
            .map(|d| if d.limit.is_some() { None } else { engine.lookup(&req.domain, &d.entries) })
            .collect();
        // `replaces` as envoyproxy/ratelimit applies it: a rule named in the `replaces` of any
        // rule matched by this request is dropped from this request.
        let replaced: Vec<&str> =
            matches.iter().flatten().flat_map(|m| m.rule.replaces.iter().map(String::as_str)).collect();
        let request_hits = req.hits_addend.max(1);

        let mut steps = Vec::with_capacity(matches.len());
        for (descriptor, found) in req.descriptors.iter().zip(&matches) {
            let hits = descriptor.hits_addend.unwrap_or(request_hits);
            if let Some(o) = descriptor.limit {
                // As the reference: a fixed window keyed by the descriptor as sent, no name.
                let limit = ReportedLimit { name: String::new(), requests_per_unit: o.requests_per_unit, unit: o.unit };
                let prefix = descriptor_key_prefix(&req.domain, &descriptor.entries);
                steps.push(self.count_step(&prefix, limit, false, false, hits, unix_now));
                continue;
            }
            let Some(found) = found else {
                steps.push(Step::Done(DescriptorStatus::no_limit(None, 0)));
                continue;
            };
            let rule = &found.rule;
            if replaced.contains(&rule.name.as_str()) {
                steps.push(Step::Done(DescriptorStatus::no_limit(None, 0)));
                continue;
            }
            if rule.scope == Scope::Local {
                steps.push(Step::Done(decide_locally(engine, req, descriptor)));
                continue;
            }
            let Some(limit) = rule.limit else {
                // `unlimited`: OK, no limit, remaining reported as the reference does; an exempt
                // value: OK, nothing else.
                let status = if rule.exempt {
                    DescriptorStatus::no_limit(None, 0)
                } else {
                    DescriptorStatus::no_limit(Some(rule.name.clone()), u32::MAX)
                };
                steps.push(Step::Done(status));
                continue;
            };
            let reported = ReportedLimit {
                name: rule.limit_name.clone().unwrap_or_else(|| rule.name.clone()),
                requests_per_unit: u32::try_from(limit.requests).unwrap_or(u32::MAX),
                unit: limit.unit,
            };
            let mut step =
                self.count_step(&found.cache_key_prefix, reported, rule.shadow, rule.quota_mode, hits, unix_now);
            if let Step::Count { key, limit, reset, .. } = &step
                && self.inner.negative_hit(key, unix_now)
            {
                self.inner.stats.negative_cache_hits.fetch_add(1, Ordering::Relaxed);
                step = Step::Done(over_limit_status(limit.clone(), rule.shadow, *reset));
            }
            steps.push(step);
        }
        steps
    }

    /// The counter of one descriptor in the current window of its limit's unit.
    fn count_step(
        &self,
        cache_key_prefix: &str,
        limit: ReportedLimit,
        shadow: bool,
        quota_mode: bool,
        hits: u32,
        unix_now: u64,
    ) -> Step {
        let window = window_seconds(limit.unit);
        let window_start = unix_now / window * window;
        let window_end = window_start + window;
        let reset = Duration::from_secs(window_end - unix_now);
        let key = format!("{}{cache_key_prefix}{window_start}", self.inner.config.key_prefix);
        Step::Count { key, hits, limit, shadow, quota_mode, window_end, reset }
    }
}

/// A node-local rule's answer from the in-process engine: the descriptor alone, as a request of
/// its own (`replaces` across the request was applied by the caller already).
fn decide_locally(engine: &Engine, req: &RlsRequest, descriptor: &RequestDescriptor) -> DescriptorStatus {
    let single =
        RlsRequest { domain: req.domain.clone(), descriptors: vec![descriptor.clone()], hits_addend: req.hits_addend };
    match engine.should_rate_limit(&single, std::time::Instant::now()) {
        Ok(mut resp) if !resp.statuses.is_empty() => resp.statuses.swap_remove(0),
        // The whole request was validated before planning; a descriptor of it cannot fail.
        _ => DescriptorStatus::no_limit(None, 0),
    }
}

impl Inner {
    /// Status of a counted descriptor from its counter after the increment.
    fn judge(
        &self,
        key: String,
        after: i64,
        limit: ReportedLimit,
        shadow: bool,
        (unix_now, window_end): (u64, u64),
        reset: Duration,
    ) -> DescriptorStatus {
        let allowed = i64::from(limit.requests_per_unit);
        if after > allowed {
            self.remember_over_limit(key, unix_now, window_end);
            return over_limit_status(limit, shadow, reset);
        }
        let remaining = u32::try_from(allowed - after.max(0)).unwrap_or(0);
        DescriptorStatus {
            code: Code::Ok,
            rule: Some(limit.name.clone()),
            limit: Some(limit),
            limit_remaining: remaining,
            duration_until_reset: reset,
            shadow_over_limit: false,
        }
    }

    fn failure_status(&self, limit: ReportedLimit, shadow: bool, reset: Duration) -> DescriptorStatus {
        self.stats.failure_mode_answers.fetch_add(1, Ordering::Relaxed);
        match self.config.failure_mode {
            FailureMode::FailOpen => DescriptorStatus::no_limit(Some(limit.name), 0),
            FailureMode::FailClosed => over_limit_status(limit, shadow, reset),
        }
    }

    fn negative_hit(&self, key: &str, unix_now: u64) -> bool {
        let Ok(mut cache) = self.negative.lock() else { return false };
        match cache.get(key) {
            Some(&window_end) if window_end > unix_now => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember_over_limit(&self, key: String, unix_now: u64, window_end: u64) {
        let Ok(mut cache) = self.negative.lock() else { return };
        if cache.len() >= self.config.negative_cache_capacity && !cache.contains_key(&key) {
            // Purge only when full: the purge walks the whole map, once per fill-up.
            cache.retain(|_, end| *end > unix_now);
            if cache.len() >= self.config.negative_cache_capacity {
                return;
            }
        }
        cache.insert(key, window_end);
    }
}

/// Whole seconds of one window: the reference's unit divider, and at least one second for
/// custom intervals (the resolution of its keys).
pub(super) fn window_seconds(unit: Unit) -> u64 {
    match unit {
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 3_600,
        Unit::Day => 86_400,
        Unit::Interval { ns } => ns.div_ceil(1_000_000_000).max(1),
    }
}

fn over_limit_status(limit: ReportedLimit, shadow: bool, reset: Duration) -> DescriptorStatus {
    DescriptorStatus {
        code: if shadow { Code::Ok } else { Code::OverLimit },
        rule: Some(limit.name.clone()),
        limit: Some(limit),
        limit_remaining: 0,
        duration_until_reset: reset,
        shadow_over_limit: shadow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_lengths_match_the_reference_dividers() {
        assert_eq!(window_seconds(Unit::Second), 1);
        assert_eq!(window_seconds(Unit::Minute), 60);
        assert_eq!(window_seconds(Unit::Hour), 3600);
        assert_eq!(window_seconds(Unit::Day), 86400);
        assert_eq!(window_seconds(Unit::Interval { ns: 250_000_000 }), 1);
        assert_eq!(window_seconds(Unit::Interval { ns: 10_000_000_000 }), 10);
        assert_eq!(window_seconds(Unit::Interval { ns: 10_500_000_000 }), 11);
    }
}
