//! The L7 engine: decides HTTP requests and Envoy descriptor lists against the compiled
//! [`crate::plan::L7Plan`].
//!
//! API skeleton (see /work/notes/engine-api.md): types and signatures are final; decisions
//! are not counted yet.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::plan::Unit;
use crate::plan::l7::{L7Plan, L7Rule};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Upper bound on tracked (rule, key) counters across all rules; beyond it the least
    /// recently used idle ones are evicted. Default 100_000.
    pub max_keys: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_keys: 100_000 }
    }
}

/// Thread-safe (Send + Sync), shared as `Arc<Engine>`. Decisions take `&self`.
pub struct Engine {
    plan: RwLock<Arc<L7Plan>>,
    #[expect(dead_code, reason = "skeleton")]
    config: EngineConfig,
}

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

/// Decision code, as the RLS protocol's `Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok,
    OverLimit,
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

/// The limit a status reports (`current_limit` of the RLS protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedLimit {
    pub name: String,
    pub requests_per_unit: u32,
    pub unit: Unit,
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

/// An HTTP request's attributes.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub remote: IpAddr,
    pub path: &'a str,
    pub method: &'a str,
    /// Lower-case names.
    pub headers: &'a [(&'a str, &'a str)],
    pub route: Option<&'a str>,
    pub gateway: Option<&'a str>,
}

/// The decision for an HTTP request.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub allowed: bool,
    /// One per applied rule.
    pub statuses: Vec<RuleStatus>,
}

/// One applied rule's decision for an HTTP request.
#[derive(Clone, Debug)]
pub struct RuleStatus {
    pub rule: String,
    pub code: Code,
    pub limit: ReportedLimit,
    pub remaining: u32,
    pub reset: Duration,
    pub shadow: bool,
}

impl Engine {
    pub fn new(plan: L7Plan, config: EngineConfig) -> Engine {
        Engine { plan: RwLock::new(Arc::new(plan)), config }
    }

    /// Atomically swaps the rule set.
    pub fn replace_plan(&self, plan: L7Plan) {
        let mut slot = self.plan.write().unwrap_or_else(|e| e.into_inner());
        *slot = Arc::new(plan);
    }

    pub fn plan(&self) -> Arc<L7Plan> {
        self.plan.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Envoy RLS semantics (skeleton: validates, answers OK).
    pub fn should_rate_limit(&self, req: &RlsRequest, _now: Instant) -> Result<RlsResponse, RequestError> {
        validate(req)?;
        let statuses = req
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: Code::Ok,
                limit: None,
                limit_remaining: 0,
                duration_until_reset: Duration::ZERO,
                rule: None,
                shadow_over_limit: false,
            })
            .collect();
        Ok(RlsResponse { overall: Code::Ok, statuses })
    }

    /// Which rule a descriptor hits (skeleton: none).
    pub fn lookup(&self, _domain: &str, _entries: &[DescriptorEntry]) -> Option<Match> {
        None
    }

    /// Gateway-kind semantics for an HTTP request (skeleton: allows).
    pub fn check_request(&self, _req: &HttpRequest<'_>, _now: Instant) -> Verdict {
        Verdict { allowed: true, statuses: Vec::new() }
    }

    /// Number of tracked counters.
    pub fn tracked_keys(&self) -> usize {
        0
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn validate(req: &RlsRequest) -> Result<(), RequestError> {
    if req.domain.is_empty() {
        return Err(RequestError::EmptyDomain);
    }
    if req.descriptors.is_empty() {
        return Err(RequestError::NoDescriptors);
    }
    if let Some(index) = req.descriptors.iter().position(|d| d.entries.is_empty()) {
        return Err(RequestError::EmptyDescriptor { index });
    }
    Ok(())
}

/// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` values for the most
/// restrictive status (skeleton: none).
pub fn ratelimit_headers(_statuses: &[DescriptorStatus]) -> Option<[(&'static str, String); 3]> {
    None
}
