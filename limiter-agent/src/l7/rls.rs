//! The rate limit service's side of the engine: `ShouldRateLimit` requests and answers, their
//! validation, and [`Engine::should_rate_limit`] / [`Engine::lookup`] (envoyproxy/ratelimit's
//! matching and per-descriptor charging, see the module docs of [`super`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::counters::{Charge, Now};
use super::counters::{CounterState, Meter, Outcome};
use super::matching::OVERRIDE_RULE_ID;
use super::matching::{CompiledPlan, Value, cache_key_prefix};
use super::{Code, Engine, ReportedLimit, saturate_u32, whole_seconds_up};
use crate::plan::Unit;
use crate::plan::l7::L7Rule;

/// One `(key, value)` entry of a request descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorEntry {
    pub key: String,
    pub value: String,
}

/// One descriptor of a `ShouldRateLimit` request.
#[derive(Clone, Debug, Default)]
pub struct RequestDescriptor {
    pub entries: Vec<DescriptorEntry>,
    /// Overrides the request's `hits_addend` for this descriptor; `Some(0)` checks without
    /// charging.
    pub hits_addend: Option<u32>,
    /// The descriptor's own `limit` (Envoy's `rate_limits` `limit: {dynamic_metadata}`, which
    /// Envoy Gateway's `limit.fromMetadata` sets): replaces the configured limit, see
    /// [`LimitOverride`].
    pub limit: Option<LimitOverride>,
}

/// A per-descriptor limit sent by the caller. As the reference service: it applies whenever
/// the domain is known, whatever the entries (the config is not consulted), as a fixed window
/// of `requests_per_unit` per `unit` counted under the descriptor's own entries, reported with
/// an empty name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitOverride {
    pub requests_per_unit: u32,
    pub unit: Unit,
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
        // A descriptor with its own limit skips the config (no rule, no `replaces`).
        let mut matched: Vec<Option<usize>> = req
            .descriptors
            .iter()
            .map(|d| if d.limit.is_some() { None } else { plan.lookup(&req.domain, &d.entries) })
            .collect();
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
        let mut quota = Vec::new();
        for (descriptor, found) in req.descriptors.iter().zip(matched) {
            let hits = u64::from(descriptor.hits_addend.unwrap_or(request_hits));
            if let Some(limit) = descriptor.limit {
                statuses.push(self.decide_override(&req.domain, descriptor, limit, now, hits));
                continue;
            }
            let Some(index) = found else {
                statuses.push(DescriptorStatus::no_limit(None, 0));
                continue;
            };
            let rule = &plan.rules[index];
            let (Some(meter), Some(reported)) = (&rule.meter, &rule.reported) else {
                let remaining = if rule.rule.exempt { 0 } else { u32::MAX };
                let name = (!rule.rule.exempt).then(|| rule.rule.name.clone());
                statuses.push(DescriptorStatus::no_limit(name, remaining));
                continue;
            };
            let values = descriptor.entries.iter().map(|e| Value::Str(&e.value));
            let outcome = self.charge(rule, meter, values, now, hits, Charge::Always);
            let over = !outcome.conforms;
            if rule.rule.quota_mode {
                quota.push(statuses.len());
            }
            statuses.push(DescriptorStatus {
                code: if over && !rule.rule.shadow { Code::OverLimit } else { Code::Ok },
                limit: Some(reported.clone()),
                limit_remaining: if over { 0 } else { saturate_u32(outcome.remaining) },
                duration_until_reset: whole_seconds_up(outcome.reset_ns),
                rule: Some(rule.rule.name.clone()),
                shadow_over_limit: over && rule.rule.shadow,
            });
        }
        RlsResponse { overall: overall_code(&statuses, &quota), statuses }
    }

    /// A descriptor with its own limit: a fixed window over its entries (see [`LimitOverride`]).
    fn decide_override(
        &self,
        domain: &str,
        descriptor: &RequestDescriptor,
        limit: LimitOverride,
        now: Now,
        hits: u64,
    ) -> DescriptorStatus {
        let meter = Meter::Window { unit_ns: limit.unit.as_ns().max(1), limit: limit.requests_per_unit.into() };
        let key = override_counter_key(domain, &descriptor.entries, limit.unit);
        let outcome: Outcome =
            self.counters.update(&key, |state: &mut CounterState| meter.decide(state, now, hits, Charge::Always));
        let over = !outcome.conforms;
        DescriptorStatus {
            code: if over { Code::OverLimit } else { Code::Ok },
            limit: Some(ReportedLimit {
                name: String::new(),
                requests_per_unit: limit.requests_per_unit,
                unit: limit.unit,
            }),
            limit_remaining: if over { 0 } else { saturate_u32(outcome.remaining) },
            duration_until_reset: whole_seconds_up(outcome.reset_ns),
            rule: None,
            shadow_over_limit: false,
        }
    }

    /// Whether the plan in force has rules in `domain` (other domains are answered OK with no
    /// limit, even for a descriptor carrying its own limit, as the reference does).
    pub fn has_domain(&self, domain: &str) -> bool {
        self.with_plan(|plan| plan.has_domain(domain))
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
        // A descriptor without entries, or an entry with an empty key, matches nothing and is
        // answered OK, as the reference does.
        Ok(())
    }
}

/// The overall code of a call, as the reference service computes it: OVER_LIMIT when a
/// descriptor that is neither shadow nor `quota_mode` is over, or when the call has
/// `quota_mode` descriptors (indices `quota`) and every one of them is over. A quota-mode
/// descriptor over its limit alone, beside others under theirs, lets the call through.
pub(crate) fn overall_code(statuses: &[DescriptorStatus], quota: &[usize]) -> Code {
    let regular_over = statuses.iter().enumerate().any(|(i, s)| s.code == Code::OverLimit && !quota.contains(&i));
    let quota_over = !quota.is_empty() && quota.iter().all(|&i| statuses[i].code == Code::OverLimit);
    if regular_over || quota_over { Code::OverLimit } else { Code::Ok }
}

/// The local counter of a limit override: its own namespace, then the domain, every entry
/// and the unit (the reference's Redis key is the domain, the entries and the window start).
fn override_counter_key(domain: &str, entries: &[DescriptorEntry], unit: Unit) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    key.extend_from_slice(&OVERRIDE_RULE_ID.to_le_bytes());
    key.extend_from_slice(&unit.as_ns().to_le_bytes());
    for part in std::iter::once(domain).chain(entries.iter().flat_map(|e| [e.key.as_str(), e.value.as_str()])) {
        key.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key
}

/// The reference's cache key prefix of a descriptor as sent: `{domain}_` then `{key}_{value}_`
/// per entry (limit overrides, which match no rule).
pub fn descriptor_key_prefix(domain: &str, entries: &[DescriptorEntry]) -> String {
    let mut key = String::with_capacity(64);
    key.push_str(domain);
    key.push('_');
    for e in entries {
        key.push_str(&e.key);
        key.push('_');
        key.push_str(&e.value);
        key.push('_');
    }
    key
}
