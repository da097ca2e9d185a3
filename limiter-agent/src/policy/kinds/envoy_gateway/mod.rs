//! Envoy Gateway `BackendTrafficPolicy` (`gateway.envoyproxy.io/v1alpha1`), read as Envoy
//! Gateway reads it. The rule reader here is shared with TEG's `RateLimitFilter` ([`super::teg`])
//! the document header reader ([`super::document`]) is shared by every Kubernetes-style kind.
//!
//! What the agent takes:
//! - `metadata.name` / `metadata.namespace` (other metadata, and `status`, are ignored).
//! - `spec.targetRefs[]` (or the older single `spec.targetRef`) `{group?, kind: Gateway |
//!   HTTPRoute, name, sectionName?}`: local references, so a target lives in the policy's
//!   namespace. Other target kinds Envoy Gateway accepts (`GRPCRoute`, `TCPRoute`, ...) and
//!   `targetSelectors` are not resolved here: reported and skipped; a policy left with no
//!   target has its rules dropped with a warning (applying them everywhere would be wider).
//! - `spec.rateLimit` in both shapes: `type: Local | Global` with `local.rules` /
//!   `global.rules` (the block `type` names is read, the other one is ignored with a
//!   warning), or `local` and/or `global` without `type` (both read).
//! - Each rule: `clientSelectors[]` (all must match) of `headers[] {name, type: Exact |
//!   Distinct | RegularExpression (default Exact), value, invert}` and `sourceCIDR {type:
//!   Exact | Distinct, value}`; `limit {requests, unit}`. An `Exact` header with `value: "*"`
//!   means any value, one bucket per value, as `Distinct`.
//! - Units `Second | Minute | Hour | Day` (any case, plural accepted) and Envoy Gateway's
//!   `Month` / `Year`, kept as 30- and 365-day intervals
//!   ([`Unit::Interval`](crate::plan::Unit::Interval)).
//! - Rules have no names in Envoy Gateway: rule `i` of the policy (local rules first, then
//!   global ones, counted across both) is named `rule-i` unless it has a `name`. Every rule
//!   counts `Requests`, burst 0, with a kernel guard.
//!
//! Not enforced, always with a warning naming the field, never silently:
//! - a rule with a selector this agent cannot match (`RegularExpression` headers, `path`,
//!   `methods`, `queryParams`, unknown selector fields): the whole rule is dropped, since
//!   enforcing it without that condition would limit more traffic than written;
//! - `cost` and `shared` of a rule (the rule is enforced, one request costs one);
//! - `shadowMode: true` on some rules but not all (those rules are dropped; when every rule
//!   has it, the policy runs in `Shadow` mode instead, which is what it means);
//! - `invert: true` on a `Distinct` header is read, as this agent's contract says, as
//!   "requests without the header", with a warning: Envoy Gateway itself refuses it;
//! - `circuitBreaker`, `retry`, `timeout`, `loadBalancer`, `healthCheck`, `faultInjection`
//!   and every other `spec` field, and unknown fields anywhere (this API grows).

mod rules;
mod selectors;

pub(super) use self::rules::{Rules, rate_limit};
use super::document::{Targets, drop_rules_without_targets, finish, header};
use crate::policy::error::FieldError;
use crate::policy::model::{Policy, PolicyKind};
use crate::policy::reader::{Node, Reader};
use crate::policy::source::deserialize;
use crate::policy::spec::S;

pub const API_VERSION: &str = "gateway.envoyproxy.io/v1alpha1";

/// `spec` fields that configure the gateway's traffic handling, not rate limits.
const GATEWAY_FEATURES: &[&str] = &[
    "circuitBreaker",
    "retry",
    "timeout",
    "loadBalancer",
    "healthCheck",
    "faultInjection",
    "connection",
    "compression",
    "dns",
    "http2",
    "httpUpgrade",
    "mergeType",
    "proxyProtocol",
    "requestBuffer",
    "responseOverride",
    "tcpKeepalive",
    "telemetry",
    "useClientProtocol",
];

pub fn load(src: &str) -> Result<Policy, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let policy = policy(&mut r, &root);
    finish(r, policy)
}

fn policy(r: &mut Reader, root: &S<Node>) -> Option<Policy> {
    let header = header(r, root, API_VERSION, PolicyKind::BackendTrafficPolicy);
    let spec = header.spec?;
    let entries = r.map(spec, "spec")?;
    let mut policy = header.policy?;
    let mut targets = Targets::default();
    let mut rules = Rules::default();
    let mut selectors_only = None;
    for (k, v) in entries {
        let f = format!("spec.{k}");
        match k.as_str() {
            "targetRefs" => targets.list(r, v, &f, policy.namespace.as_deref()),
            "targetRef" => targets.one(r, v, &f, policy.namespace.as_deref()),
            "targetSelectors" => {
                r.warn(v, &f, "not enforced: label selectors are not resolved by this agent; use targetRefs");
                selectors_only = Some(());
            }
            "rateLimit" => rate_limit(r, v, &f, &mut rules),
            _ if GATEWAY_FEATURES.contains(&k.as_str()) => {
                r.warn(v, &f, "not enforced by this agent (the gateway does it)")
            }
            _ => r.unknown_field(v, &f),
        }
    }
    rules.apply_shadow_mode(r, &mut policy.mode);
    let mut rules = rules.out;
    if targets.out.is_empty() && (targets.dropped || selectors_only.is_some()) {
        drop_rules_without_targets(r, spec, &mut rules);
    }
    policy.targets = targets.out;
    policy.rules = rules;
    Some(policy)
}
