//! The rate limit service's part of a control snapshot: what `limiter-agent top` shows of the
//! RLS, read from the same counters as the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{
    metrics::{CODE_OK, CODE_OVER_LIMIT, Metrics},
    rls::{Backend, RateLimiter},
};

/// What the rate limit service has done since the agent started. Counters are cumulative,
/// the same numbers as the `limiter_rls_*` and `limiter_escalations_total` metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RlsStatus {
    /// False with `--no-rls`.
    pub serving: bool,
    /// The gRPC address it is bound to (`--rls-listen`), while serving.
    pub listen: Option<SocketAddr>,
    /// `local` or `redis` (`--rls-backend`).
    pub backend: String,
    /// With the `redis` backend.
    pub redis: Option<RedisStatus>,
    /// L7 rules of the policy in force.
    pub l7_rules: usize,
    /// Keyed L7 counters held (per header value, per client...), at most `l7_max_keys`.
    pub l7_tracked_keys: u64,
    /// `--l7-max-keys`.
    pub l7_max_keys: u64,
    /// Descriptors answered, by domain, rule and code; sorted.
    pub decisions: Vec<DecisionCount>,
    /// Descriptors shadow rules would have denied (answered OK); sorted.
    pub shadow_over_limit: Vec<ShadowCount>,
    /// Calls refused with a gRPC error, by reason; sorted.
    pub request_errors: Vec<RequestErrorCount>,
    /// Whether denied sources can be escalated into the XDP block list (needs `--iface`).
    pub escalation: bool,
    /// Sources put in the XDP block list, by policy; sorted.
    pub escalations: Vec<EscalationCount>,
    /// Sources in the XDP block list right now (unexpired), escalated or not.
    #[serde(default)]
    pub blocked_now: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisStatus {
    pub connected: bool,
    /// `failOpen` or `failClosed` (`--redis-failure-mode`).
    pub failure_mode: String,
    /// Failed round trips and connection attempts.
    pub errors: u64,
    /// Descriptors answered by the failure mode because Redis was unreachable.
    pub failure_mode_answers: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DecisionCount {
    /// The request's domain, or `_unknown_` for a domain without rules.
    pub domain: String,
    /// The rule's name; empty when no rule matched.
    pub rule: String,
    /// `OK` or `OVER_LIMIT`.
    pub code: String,
    pub descriptors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShadowCount {
    pub domain: String,
    pub rule: String,
    pub descriptors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestErrorCount {
    /// `invalid_argument` or `overloaded`.
    pub reason: String,
    pub requests: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EscalationCount {
    pub policy: String,
    pub sources: u64,
}

impl RlsStatus {
    /// Descriptors answered with `code` (`OK`, `OVER_LIMIT`) over every rule.
    pub fn decided(&self, code: &str) -> u64 {
        self.decisions.iter().filter(|d| d.code == code).map(|d| d.descriptors).sum()
    }

    pub fn ok(&self) -> u64 {
        self.decided(CODE_OK)
    }

    pub fn over_limit(&self) -> u64 {
        self.decided(CODE_OVER_LIMIT)
    }

    pub fn shadow_over_limit_total(&self) -> u64 {
        self.shadow_over_limit.iter().map(|s| s.descriptors).sum()
    }

    pub fn request_errors_total(&self) -> u64 {
        self.request_errors.iter().map(|e| e.requests).sum()
    }

    pub fn escalations_total(&self) -> u64 {
        self.escalations.iter().map(|e| e.sources).sum()
    }
}

/// Where the `rls` section of a snapshot is read from.
pub struct RlsSource {
    pub limiter: Arc<RateLimiter>,
    pub backend: Backend,
    pub metrics: Arc<Metrics>,
    /// The bound address; `None` when the service is not served (`--no-rls`).
    pub serving: Option<SocketAddr>,
    pub l7_max_keys: usize,
}

impl RlsSource {
    /// Reads the counters: a few locks and a copy of each bounded label set, no I/O.
    pub fn read(&self) -> RlsStatus {
        let m = &self.metrics;
        let mut decisions: Vec<DecisionCount> = m
            .rls_decisions
            .values()
            .into_iter()
            .map(|(l, n)| DecisionCount { domain: l.domain, rule: l.rule, code: l.code.to_owned(), descriptors: n })
            .collect();
        decisions.sort();
        let mut shadow_over_limit: Vec<ShadowCount> = m
            .rls_shadow_over_limit
            .values()
            .into_iter()
            .map(|(l, n)| ShadowCount { domain: l.domain, rule: l.rule, descriptors: n })
            .collect();
        shadow_over_limit.sort();
        let mut request_errors: Vec<RequestErrorCount> = m
            .rls_request_errors
            .values()
            .into_iter()
            .map(|(l, n)| RequestErrorCount { reason: l.reason.to_owned(), requests: n })
            .collect();
        request_errors.sort();
        let mut escalations: Vec<EscalationCount> =
            m.escalations.values().into_iter().map(|(l, n)| EscalationCount { policy: l.policy, sources: n }).collect();
        escalations.sort();
        let (backend, redis) = match &self.backend {
            Backend::Local => ("local", None),
            Backend::Redis(redis) => {
                let stats = redis.stats();
                let status = RedisStatus {
                    connected: redis.is_connected(),
                    failure_mode: redis.config().failure_mode.to_string(),
                    errors: stats.errors,
                    failure_mode_answers: stats.failure_mode_answers,
                };
                ("redis", Some(status))
            }
        };
        let engine = self.limiter.engine();
        RlsStatus {
            serving: self.serving.is_some(),
            listen: self.serving,
            backend: backend.to_owned(),
            redis,
            l7_rules: engine.plan().rules.len(),
            l7_tracked_keys: engine.tracked_keys() as u64,
            l7_max_keys: self.l7_max_keys as u64,
            decisions,
            shadow_over_limit,
            request_errors,
            escalation: self.limiter.escalation().is_some(),
            escalations,
            // Filled in from the data path by `Control::refresh`.
            blocked_now: 0,
        }
    }
}
