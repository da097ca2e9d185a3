//! agentgateway `AgentgatewayPolicy` (`agentgateway.dev/v1alpha1`).
//!
//! What the agent takes:
//! - `metadata.name` / `metadata.namespace`; `spec.targetRefs[]` as Envoy Gateway's
//!   ([`super::envoy_gateway::Targets`]: `Gateway` or `HTTPRoute`, in the policy's namespace).
//! - `spec.traffic.rateLimit.local[] {requests, unit, burst}`: entry `i` becomes rule
//!   `local-i`, one bucket shared by every request to the targets (no selectors), counting
//!   `Requests`, `requests` per `unit` with depth `requests + burst`. Units are agentgateway's
//!   `Seconds | Minutes | Hours`, any case, singular accepted (and `Days`). `requests` and
//!   `tokens` exclude each other, as in agentgateway.
//! - Targets other than `Gateway` / `HTTPRoute` (`XListenerSet`, `Service`, ...) and
//!   `targetSelectors` are reported and skipped; with no target left, the rules are dropped.
//!
//! - `spec.traffic.rateLimit.global {backendRef, domain, descriptors[].entries[] {name,
//!   expression}}`: read and explained (see [`global`]): agentgateway computes those
//!   descriptors and sends them to this agent's rate limit service, where an
//!   envoyproxy/ratelimit config of that `domain` holds the limits.
//!
//! Not enforced, with a warning naming the field: `local[]` entries limiting LLM `tokens`
//! (the entry is dropped), every other `traffic` and `spec` field (`frontend`, `backend`,
//! ...), and unknown fields.

use super::super::error::{ErrorKind, FieldError};
use super::super::model::{At, Count, Policy, PolicyKind, Rule, Scope};
use super::super::source::deserialize;
use super::super::spec::{S, pos_of};
use super::super::validate::parse_unit;
use super::document::{Targets, drop_rules_without_targets, finish, header};
use crate::plan::Limit;
use crate::policy::reader::{Node, Reader};

pub const API_VERSION: &str = "agentgateway.dev/v1alpha1";

pub fn load(src: &str) -> Result<Policy, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let policy = policy(&mut r, &root);
    finish(r, policy)
}

fn policy(r: &mut Reader, root: &S<Node>) -> Option<Policy> {
    let header = header(r, root, API_VERSION, PolicyKind::AgentgatewayPolicy);
    let spec = header.spec?;
    let entries = r.map(spec, "spec")?;
    let mut policy = header.policy?;
    let mut targets = Targets::default();
    let mut rules = Vec::new();
    for (k, v) in entries {
        let f = format!("spec.{k}");
        match k.as_str() {
            "targetRefs" => targets.list(r, v, &f, policy.namespace.as_deref()),
            "targetSelectors" => {
                r.warn(v, &f, "not enforced: label selectors are not resolved by this agent; use targetRefs");
                targets.dropped = true;
            }
            "traffic" => traffic(r, v, &f, &mut rules),
            "frontend" | "backend" => r.warn(v, &f, "not enforced by this agent (the gateway does it)"),
            _ => r.unknown_field(v, &f),
        }
    }
    if targets.out.is_empty() && targets.dropped {
        drop_rules_without_targets(r, spec, &mut rules);
    }
    policy.targets = targets.out;
    policy.rules = rules;
    Some(policy)
}

fn traffic(r: &mut Reader, n: &S<Node>, field: &str, rules: &mut Vec<Rule>) {
    let Some(entries) = r.map(n, field) else { return };
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        if k != "rateLimit" {
            r.warn(v, &f, "not enforced by this agent (the gateway does it)");
            continue;
        }
        let Some(entries) = r.map(v, &f) else { continue };
        for (k, v) in entries {
            let f = format!("{f}.{k}");
            match k.as_str() {
                "local" => {
                    let Some(items) = r.seq(v, &f) else { continue };
                    for (i, item) in items.iter().enumerate() {
                        if let Some(rule) = local(r, item, &format!("{f}[{i}]"), i) {
                            rules.push(rule);
                        }
                    }
                }
                "global" => global(r, v, &f),
                _ => r.unknown_field(v, &f),
            }
        }
    }
}

/// `global {backendRef, domain, descriptors[] {entries[] {name, expression}, type}}`: agentgateway
/// computes each descriptor's entries itself (CEL `expression`s) and sends them to the rate
/// limit service in `domain`; the limits live in the envoyproxy/ratelimit config of that domain.
/// Read and explained (notices naming the descriptor keys sent); nothing here is a rule.
fn global(r: &mut Reader, n: &S<Node>, field: &str) {
    let Some(entries) = r.map(n, field) else { return };
    let mut domain = None;
    let mut keys: Vec<String> = Vec::new();
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "domain" => domain = r.string(v, &f).map(|d| (d, v, f)),
            "backendRef" => {
                r.warn(v, &f, "read: point it at the agent's --rls-listen (gRPC envoy.service.ratelimit.v3)")
            }
            "descriptors" => {
                let Some(items) = r.seq(v, &f) else { continue };
                for (i, d) in items.iter().enumerate() {
                    let df = format!("{f}[{i}]");
                    let Some(d_entries) = r.map(d, &df) else { continue };
                    let mut names = Vec::new();
                    for (dk, dv) in d_entries {
                        let ef = format!("{df}.{dk}");
                        match dk.as_str() {
                            "entries" => {
                                let Some(list) = r.seq(dv, &ef) else { continue };
                                for (j, e) in list.iter().enumerate() {
                                    let entry_field = format!("{ef}[{j}]");
                                    let Some(e_entries) = r.map(e, &entry_field) else { continue };
                                    let name = e_entries.iter().find(|(k, _)| k == "name");
                                    match name.and_then(|(_, v)| r.string(v, &format!("{entry_field}.name"))) {
                                        Some(n) => names.push(n),
                                        None if name.is_none() => r.missing(e, &entry_field, "name"),
                                        None => {}
                                    }
                                    if !e_entries.iter().any(|(k, _)| k == "expression") {
                                        r.missing(e, &entry_field, "expression");
                                    }
                                }
                            }
                            // Requests or Tokens: what agentgateway counts as hits.
                            "type" | "unit" => {}
                            _ => r.unknown_field(dv, &ef),
                        }
                    }
                    keys.push(format!("[{}]", names.join(", ")));
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    match domain {
        Some((d, v, f)) if !d.is_empty() => {
            let message = format!(
                "read: agentgateway computes the descriptors {} and sends them to domain `{d}`; the limits are the \
                 envoyproxy/ratelimit config with `domain: {d}` (not enforced from this policy)",
                keys.join(" ")
            );
            r.warn(v, &f, &message);
        }
        Some((_, v, f)) => r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::EmptyValue)),
        None => r.missing(n, field, "domain"),
    }
}

/// `{requests, unit, burst?}` → rule `local-{index}`.
fn local(r: &mut Reader, n: &S<Node>, field: &str, index: usize) -> Option<Rule> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let (mut requests, mut unit, mut burst, mut tokens) = (None, None, Some(0), None);
    let (mut has_requests, mut has_unit) = (false, false);
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "requests" => {
                has_requests = true;
                requests = r.int_in(v, &f, 1, i64::MAX).and_then(|x| u64::try_from(x).ok());
            }
            "unit" => {
                has_unit = true;
                unit = r.string(v, &f).and_then(|s| match parse_unit(&s) {
                    Some(u) => Some(u),
                    None => {
                        r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::UnknownUnit { value: s }));
                        None
                    }
                });
            }
            "burst" => burst = r.int_in(v, &f, 0, i64::MAX).and_then(|x| u64::try_from(x).ok()),
            "tokens" => tokens = Some((v, f)),
            _ => r.unknown_field(v, &f),
        }
    }
    match (&tokens, has_requests) {
        // agentgateway takes exactly one of the two.
        (Some((v, f)), true) => {
            let err = ErrorKind::Conflict { other: "requests" };
            r.errors.push(FieldError::new(pos_of(v), f, err));
        }
        (Some((v, f)), false) => {
            r.warn(v, f, "not enforced: LLM token limits are counted by agentgateway (the entry is dropped)")
        }
        (None, false) => r.missing(n, field, "requests"),
        (None, true) => {}
    }
    if !has_unit {
        r.missing(n, field, "unit");
    }
    if r.errors.len() > before || tokens.is_some() {
        return None;
    }
    Some(Rule {
        name: format!("local-{index}"),
        scope: Scope::Local,
        selectors: Vec::new(),
        count: Count::Requests,
        limit: Limit { requests: requests?, unit: unit?, burst: burst? },
        kernel_guard: true,
        cost: Default::default(),
        at: At::new(pos_of(n), field),
    })
}
