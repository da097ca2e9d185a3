//! What the bench asks: the policy the service loads and the mix of calls the load client
//! sends.

use std::path::Path;

use anyhow::{Result, bail};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use limiter_agent::plan::L7Plan;
use limiter_agent::policy::{self, Document, PolicySet};

/// Users that send far more than the rest (their calls are the over-limit ones).
pub(super) const HEAVY_USERS: usize = 4;
/// Clients of the envoyproxy/ratelimit domain.
pub(super) const API_CLIENTS: usize = 256;
/// The client of the ratelimit domain that is over its limit all day.
const ABUSER: &str = "abuser";
/// Domain `limiter` (gateway kinds): a per-user token bucket (one per `x-user-id`) and a
/// route-wide ceiling every call also charges; domain `bench-api` (an envoyproxy/ratelimit
/// config): a fixed window per client, and one client allowed a single call per day.
pub const POLICY_YAML: &str = "\
apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: bench-rls}
spec:
  targetRefs:
    - {kind: HTTPRoute, name: bench-route}
  rateLimit:
    local:
      rules:
        - name: per-user
          clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]
          limit: {requests: 50, unit: Second}
        - name: route-ceiling
          count: Requests
          limit: {requests: 1000000, unit: Second}
---
domain: bench-api
descriptors:
  - key: client_id
    rate_limit: {unit: second, requests_per_unit: 1000}
  - key: client_id
    value: abuser
    rate_limit: {unit: day, requests_per_unit: 1}
";

/// The rule names every descriptor of the mix must hit (checked on a probe call).
const PER_USER_RULE: &str = "bench-rls/per-user";
const CEILING_RULE: &str = "bench-rls/route-ceiling";

/// The L7 plan of [`POLICY_YAML`], through the agent's loader and compiler.
pub fn plan() -> Result<L7Plan> {
    let docs = match policy::load_file_str(Path::new("bench-rls.yaml"), POLICY_YAML) {
        Ok(d) => d,
        Err(e) => bail!("the bench's RLS policy does not load: {e}"),
    };
    let mut set = PolicySet::default();
    for doc in docs {
        match doc {
            Document::Policy(p) => set.policies.push(p),
            Document::RatelimitConfig(c) => set.ratelimit_configs.push(c),
        }
    }
    let compiled = match policy::compile(&set).into_result() {
        Ok(c) => c,
        Err(e) => bail!("the bench's RLS policy does not compile: {e}"),
    };
    for name in [PER_USER_RULE, CEILING_RULE] {
        if !compiled.l7.rules.iter().any(|r| r.name == name) {
            bail!("the bench's RLS policy has no L7 rule {name:?}; its rules: {:?}", rule_names(&compiled.l7));
        }
    }
    Ok(compiled.l7)
}

fn rule_names(plan: &L7Plan) -> Vec<&str> {
    plan.rules.iter().map(|r| r.name.as_str()).collect()
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: (*k).to_owned(), value: (*v).to_owned() }).collect(),
        ..Default::default()
    }
}

/// What Envoy sends for a request of `user` on the bench route (domain `limiter`).
pub(super) fn user_call(user: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "limiter".into(),
        descriptors: vec![
            descriptor(&[("generic_key", PER_USER_RULE), ("x-user-id", user)]),
            descriptor(&[("generic_key", CEILING_RULE)]),
        ],
        hits_addend: 0,
    }
}

/// What Envoy sends for an API client under the envoyproxy/ratelimit config.
pub(super) fn api_call(client: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench-api".into(),
        descriptors: vec![descriptor(&[("client_id", client)])],
        hits_addend: 0,
    }
}

/// The call sequence the client tasks walk through (each from its own offset, wrapping):
/// of every 16 calls, 12 in domain `limiter` (11 from regular users, visited round-robin
/// with a stride so each gets an even share, 1 from one of [`HEAVY_USERS`]), 4 in domain
/// `bench-api` (3 from its regular clients, 1 from [`ABUSER`] every fourth time, so 1 in 64
/// calls is the abuser's).
pub fn call_mix(users: usize) -> Vec<RateLimitRequest> {
    let users = users.max(1);
    let len = (users * 2).max(4096).next_multiple_of(64);
    let (mut regular, mut heavy, mut api) = (0usize, 0usize, 0usize);
    (0..len)
        .map(|i| match i % 16 {
            0..=10 => {
                regular += 1;
                user_call(&format!("user-{:05}", (regular * 97) % users))
            }
            11 => {
                heavy += 1;
                user_call(&format!("heavy-{}", heavy % HEAVY_USERS))
            }
            15 if (i / 16) % 4 == 0 => api_call(ABUSER),
            _ => {
                api += 1;
                api_call(&format!("client-{:03}", (api * 31) % API_CLIENTS))
            }
        })
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_compiles_to_the_rules_the_mix_names() {
        let plan = plan().unwrap();
        assert!(rule_names(&plan).contains(&PER_USER_RULE));
        assert!(plan.rules.iter().any(|r| r.domain == "bench-api"));
    }

    #[test]
    fn the_mix_has_its_shares() {
        let calls = call_mix(4096);
        let n = calls.len() as f64;
        let share = |f: &dyn Fn(&RateLimitRequest) -> bool| calls.iter().filter(|c| f(c)).count() as f64 / n;
        let value = |c: &RateLimitRequest| c.descriptors[0].entries.last().map(|e| e.value.clone()).unwrap_or_default();
        assert_eq!(share(&|c| c.domain == "limiter"), 12.0 / 16.0);
        assert_eq!(share(&|c| value(c).starts_with("heavy-")), 1.0 / 16.0);
        assert_eq!(share(&|c| value(c) == ABUSER), 1.0 / 64.0);
    }
}
