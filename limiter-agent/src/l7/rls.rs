//! The rate limit service's side of the engine: `ShouldRateLimit` requests and answers, their
//! validation, and [`Engine::should_rate_limit`] / [`Engine::lookup`] (envoyproxy/ratelimit's
//! matching and per-descriptor charging, see the module docs of [`super`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::counters::{Charge, Now};
use super::matching::{CompiledPlan, Value, cache_key_prefix};
use super::{Code, Engine, ReportedLimit, saturate_u32, whole_seconds_up};
use crate::plan::l7::L7Rule;

/// One `(key, value)` entry of a request descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorEntry {
    pub key: String,
    pub value: String,
}

/// One descriptor of a `ShouldRateLimit` request.
#[derive(Clone, Debug)]
pub struct RequestDescriptor {
    pub entries: Vec<DescriptorEntry>,
    /// Overrides the request's `hits_addend` for this descriptor; `Some(0)` checks without
    /// charging.
    pub hits_addend: Option<u32>,
}

/// A `ShouldRateLimit` request.
#[derive(Clone, Debug)]
pub struct RlsRequest {
    pub domain: String,
    pub descriptors: Vec<RequestDescriptor>,
    /// Hits each descriptor adds; 0 is treated as 1 (as Envoy and the reference do).
    pub hits_addend: u32,
}

/// A request the RLS protocol rejects (a gRPC error, not a decision).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("rate limit domain must not be empty")]
    EmptyDomain,
    #[error("rate limit descriptor list must not be empty")]
    NoDescriptors,
    #[error("rate limit descriptor {index} has no entries")]
    EmptyDescriptor { index: usize },
}

/// The answer to an [`RlsRequest`].
#[derive(Clone, Debug)]
pub struct RlsResponse {
    pub overall: Code,
    pub statuses: Vec<DescriptorStatus>,
}

/// The decision for one request descriptor.
#[derive(Clone, Debug)]
pub struct DescriptorStatus {
    pub code: Code,
    /// None when no rule matched or the rule is `unlimited`.
    pub limit: Option<ReportedLimit>,
    pub limit_remaining: u32,
    pub duration_until_reset: Duration,
    /// The rule's name (L7Rule::name) when one matched.
    pub rule: Option<String>,
    /// The rule is in shadow mode: `code` is Ok even if it was over the limit;
    /// `shadow_over_limit` says whether it would have denied.
    pub shadow_over_limit: bool,
}

/// The rule a descriptor hits.
#[derive(Clone, Debug)]
pub struct Match {
    pub rule: Arc<L7Rule>,
    pub rule_index: usize,
    /// envoyproxy/ratelimit cache key prefix: `{domain}_{key}_{value}_..._` (the Redis helper
    /// appends the window start in unix seconds, as the reference service does).
    pub cache_key_prefix: String,
}

impl Engine {
    /// Envoy RLS semantics (envoyproxy/ratelimit): one [`DescriptorStatus`] per request
    /// descriptor, in order. Unknown domain: every status OK with no limit. `now` is
    /// monotonic time.
    ///
    /// Per descriptor: the matched rule ([`Engine::lookup`]); a rule named in the `replaces`
    /// of another rule matched by this request is dropped (OK, no limit); `unlimited` answers
    /// OK with no limit and `limit_remaining` `u32::MAX` (as the reference does); otherwise
    /// the rule's counter is charged `hits_addend` (the descriptor's, else the request's, 0
    /// meaning 1; a descriptor's `Some(0)` checks without charging). Shadow rules count and
    /// answer OK, with `shadow_over_limit` set when they would have denied. An over-limit
    /// status reports 0 remaining. `overall` is OverLimit if any status is.
    pub fn should_rate_limit(&self, req: &RlsRequest, now: Instant) -> Result<RlsResponse, RequestError> {
        req.validate()?;
        let now = self.clock.at(now);
        Ok(self.with_plan(|plan| self.decide_descriptors(plan, req, now)))
    }

    fn decide_descriptors(&self, plan: &CompiledPlan, req: &RlsRequest, now: Now) -> RlsResponse {
        if !plan.has_domain(&req.domain) {
            let statuses = req.descriptors.iter().map(|_| DescriptorStatus::no_limit(None, 0)).collect();
            return RlsResponse { overall: Code::Ok, statuses };
        }
        let mut matched: Vec<Option<usize>> =
            req.descriptors.iter().map(|d| plan.lookup(&req.domain, &d.entries)).collect();
        if matched.iter().flatten().any(|&i| !plan.rules[i].rule.replaces.is_empty()) {
            let replaced: Vec<&str> = matched
                .iter()
                .flatten()
                .flat_map(|&i| plan.rules[i].rule.replaces.iter().map(String::as_str))
                .collect();
            for m in &mut matched {
                if m.is_some_and(|i| replaced.contains(&plan.rules[i].rule.name.as_str())) {
                    *m = None;
                }
            }
        }

        let request_hits = req.hits_addend.max(1);
        let mut statuses = Vec::with_capacity(req.descriptors.len());
        for (descriptor, found) in req.descriptors.iter().zip(matched) {
            let Some(index) = found else {
                statuses.push(DescriptorStatus::no_limit(None, 0));
                continue;
            };
            let rule = &plan.rules[index];
            let (Some(meter), Some(reported)) = (&rule.meter, &rule.reported) else {
                statuses.push(DescriptorStatus::no_limit(Some(rule.rule.name.clone()), u32::MAX));
                continue;
            };
            let hits = u64::from(descriptor.hits_addend.unwrap_or(request_hits));
            let values = descriptor.entries.iter().map(|e| Value::Str(&e.value));
            let outcome = self.charge(rule, meter, values, now, hits, Charge::Always);
            let over = !outcome.conforms;
            statuses.push(DescriptorStatus {
                code: if over && !rule.rule.shadow { Code::OverLimit } else { Code::Ok },
                limit: Some(reported.clone()),
                limit_remaining: if over { 0 } else { saturate_u32(outcome.remaining) },
                duration_until_reset: whole_seconds_up(outcome.reset_ns),
                rule: Some(rule.rule.name.clone()),
                shadow_over_limit: over && rule.rule.shadow,
            });
        }
        let overall = if statuses.iter().any(|s| s.code == Code::OverLimit) { Code::OverLimit } else { Code::Ok };
        RlsResponse { overall, statuses }
    }

    /// Which rule a descriptor hits (matching only, no counting): exact key+value, then
    /// wildcard values in config order, then key-only; depth must match; `replaces` is
    /// applied by the caller over all matches of one request. Used by the Redis backend.
    pub fn lookup(&self, domain: &str, entries: &[DescriptorEntry]) -> Option<Match> {
        let (rule_index, rule) = self.with_plan(|plan| {
            let index = plan.lookup(domain, entries)?;
            Some((index, plan.rules[index].rule.clone()))
        })?;
        let cache_key_prefix = cache_key_prefix(domain, &rule, entries);
        Some(Match { rule, rule_index, cache_key_prefix })
    }
}

impl DescriptorStatus {
    /// A status without a limit: no rule (`remaining` 0) or `unlimited` (`u32::MAX`), as
    /// envoyproxy/ratelimit reports them.
    pub fn no_limit(rule: Option<String>, remaining: u32) -> DescriptorStatus {
        DescriptorStatus {
            code: Code::Ok,
            limit: None,
            limit_remaining: remaining,
            duration_until_reset: Duration::ZERO,
            rule,
            shadow_over_limit: false,
        }
    }
}

impl RlsRequest {
    /// The checks every backend makes before matching, so all reject the same requests with
    /// the same errors: a domain, at least one descriptor, and no empty descriptor.
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.domain.is_empty() {
            return Err(RequestError::EmptyDomain);
        }
        if self.descriptors.is_empty() {
            return Err(RequestError::NoDescriptors);
        }
        if let Some(index) = self.descriptors.iter().position(|d| d.entries.is_empty()) {
            return Err(RequestError::EmptyDescriptor { index });
        }
        Ok(())
    }
}
