//! Envoy Gateway `BackendTrafficPolicy` (`gateway.envoyproxy.io/v1alpha1`), read as Envoy
//! Gateway reads it. The rule reader here is shared with TEG's `RateLimitFilter` ([`super::teg`])
//! and the document header reader with agentgateway ([`super::agentgateway`]).
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
//!   `Month` / `Year`, kept as 30- and 365-day intervals ([`Unit::Interval`]).
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

use std::collections::HashMap;

use super::super::error::{ErrorKind, FieldError};
use super::super::model::{
    At, ClientSelector, Count, HeaderMatch, Located, Mode, Policy, PolicyKind, RouteKind, Rule, Scope, SourceCidr,
    Target, TargetKind,
};
use super::super::source::deserialize;
use super::super::spec::{S, pos_of};
use super::super::validate::{name_problem, parse_cidr, parse_unit};
use super::ratelimit_config::{Node, Reader};
use crate::plan::{Limit, Unit};

pub const API_VERSION: &str = "gateway.envoyproxy.io/v1alpha1";

const NS_PER_DAY: u64 = 86_400 * 1_000_000_000;

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

/// The policy, its warnings attached, or every error found.
pub(super) fn finish(r: Reader, policy: Option<Policy>) -> Result<Policy, Vec<FieldError>> {
    match policy {
        Some(p) if r.errors.is_empty() => Ok(Policy { not_enforced: r.warnings, ..p }),
        _ => Err(r.errors),
    }
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

/// `apiVersion`, `kind`, `metadata` and `spec` of a gateway document.
pub(super) struct Header<'a> {
    /// The policy with name, namespace and kind set; `None` when `metadata` is broken.
    pub policy: Option<Policy>,
    /// `None` when absent (reported) or not a mapping.
    pub spec: Option<&'a S<Node>>,
}

/// Reads the top level of a Kubernetes-style document. `status` and metadata other than
/// `name` and `namespace` are ignored without a warning: `kubectl get -o yaml` output carries
/// them and they never change what is enforced.
pub(super) fn header<'a>(r: &mut Reader, root: &'a S<Node>, api_version: &'static str, kind: PolicyKind) -> Header<'a> {
    let mut out = Header { policy: None, spec: None };
    let Some(entries) = r.map(root, "") else { return out };
    let mut metadata = None;
    for (k, v) in entries {
        match k.as_str() {
            "apiVersion" => {
                if let Some(api) = r.string(v, "apiVersion")
                    && api != api_version
                {
                    let err = ErrorKind::UnknownValue { what: "apiVersion", value: api, expected: api_version };
                    r.errors.push(FieldError::new(pos_of(v), "apiVersion", err));
                }
            }
            "kind" | "status" => {}
            "metadata" => metadata = Some(v),
            "spec" => out.spec = Some(v),
            _ => r.unknown_field(v, k),
        }
    }
    if out.spec.is_none() {
        r.missing(root, "", "spec");
    }
    let Some(metadata) = metadata else {
        r.missing(root, "", "metadata");
        return out;
    };
    let Some(entries) = r.map(metadata, "metadata") else { return out };
    let mut name = None;
    let mut namespace = None;
    for (k, v) in entries {
        match k.as_str() {
            "name" => name = r.string(v, "metadata.name").map(|n| (n, v)),
            "namespace" => namespace = r.opt_string(v, "metadata.namespace"),
            _ => {}
        }
    }
    let Some((name, at)) = name else {
        if !entries.iter().any(|(k, _)| k == "name") {
            r.missing(metadata, "metadata", "name");
        }
        return out;
    };
    if let Some(reason) = name_problem(&name) {
        let err = ErrorKind::InvalidName { name: name.clone(), reason };
        r.errors.push(FieldError::new(pos_of(at), "metadata.name", err));
    }
    out.policy = Some(Policy {
        kind,
        name,
        namespace,
        source: Default::default(),
        at: At::new(pos_of(at), "metadata.name"),
        mode: Mode::Enforce,
        targets: Vec::new(),
        allow: Vec::new(),
        deny: Vec::new(),
        penalty: None,
        rules: Vec::new(),
        descriptor_actions: Vec::new(),
        not_enforced: Vec::new(),
    });
    out
}

/// Gateway API policy target references.
#[derive(Default)]
pub(super) struct Targets {
    pub out: Vec<Target>,
    /// A reference to a kind the gateway accepts but this agent does not resolve was skipped.
    pub dropped: bool,
}

/// Gateway API kinds the gateways accept as policy targets that this agent cannot map to
/// ports. A reference to one is reported and skipped, not an error: the policy is valid for
/// its gateway, and rejecting it would reject every other policy of the set with it.
pub(super) const UNRESOLVED_TARGET_KINDS: &[&str] =
    &["GRPCRoute", "TCPRoute", "UDPRoute", "TLSRoute", "ListenerSet", "XListenerSet", "Service", "AgentgatewayBackend"];

/// A policy whose every target was skipped (or that only has `targetSelectors`) would,
/// without targets, apply everywhere: wider than written. Its rules are reported and dropped.
pub(super) fn drop_rules_without_targets(r: &mut Reader, spec: &S<Node>, rules: &mut Vec<Rule>) {
    if rules.is_empty() {
        return;
    }
    let names: Vec<&str> = rules.iter().map(|rule| rule.name.as_str()).collect();
    let what = format!(
        "not enforced: no target this agent can resolve (Gateway or HTTPRoute), so rules {} are dropped",
        names.join(", ")
    );
    r.warn(spec, "spec", &what);
    rules.clear();
}

impl Targets {
    pub fn list(&mut self, r: &mut Reader, n: &S<Node>, field: &str, namespace: Option<&str>) {
        let Some(items) = r.seq(n, field) else { return };
        for (i, item) in items.iter().enumerate() {
            self.one(r, item, &format!("{field}[{i}]"), namespace);
        }
    }

    /// `{group?, kind: Gateway | HTTPRoute, name, sectionName?}`. Other kinds are errors, not
    /// warnings: dropping the reference could leave the policy with none, i.e. everywhere.
    pub fn one(&mut self, r: &mut Reader, n: &S<Node>, field: &str, namespace: Option<&str>) {
        let Some(entries) = r.map(n, field) else { return };
        let (mut kind, mut name, mut section) = (None, None, None);
        for (k, v) in entries {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "group" => {
                    r.opt_string(v, &f);
                }
                "kind" => kind = r.string(v, &f).map(|s| (s, v)),
                "name" => name = r.string(v, &f),
                "sectionName" => section = r.opt_string(v, &f),
                _ => r.unknown_field(v, &f),
            }
        }
        let route = match &kind {
            None => {
                r.missing(n, field, "kind");
                None
            }
            Some((k, _)) if k.eq_ignore_ascii_case("httproute") => Some(RouteKind::HttpRoute),
            Some((k, _)) if k.eq_ignore_ascii_case("gateway") => Some(RouteKind::Gateway),
            Some((k, v)) if UNRESOLVED_TARGET_KINDS.iter().any(|u| u.eq_ignore_ascii_case(k)) => {
                r.warn(
                    v,
                    &format!("{field}.kind"),
                    &format!("not enforced: {k} targets are not resolved by this agent"),
                );
                self.dropped = true;
                return;
            }
            Some((k, v)) => {
                let err = ErrorKind::UnknownValue {
                    what: "targetRef kind",
                    value: k.clone(),
                    expected: "Gateway or HTTPRoute",
                };
                r.errors.push(FieldError::new(pos_of(v), format!("{field}.kind"), err));
                None
            }
        };
        let name = match name {
            Some(n) if !n.is_empty() => Some(n),
            Some(_) => {
                r.errors.push(FieldError::new(pos_of(n), format!("{field}.name"), ErrorKind::EmptyValue));
                None
            }
            None => {
                r.missing(n, field, "name");
                None
            }
        };
        if let (Some(kind), Some(name)) = (route, name) {
            let kind = TargetKind::Route { kind, name, namespace: namespace.map(str::to_owned), section_name: section };
            self.out.push(Target { kind, at: At::new(pos_of(n), field) });
        }
    }
}

/// Rules read so far: names must be unique in the policy; unnamed rules are numbered.
#[derive(Default)]
pub(super) struct Rules {
    pub out: Vec<Rule>,
    /// Rules read with `shadowMode: true`, and where that was written.
    shadow: Vec<(String, At)>,
    /// Rule name → line it was first used on.
    seen: HashMap<String, u64>,
    /// Rules read so far, kept or not: the next unnamed rule is `rule-{next}`.
    next: usize,
}

impl Rules {
    /// Envoy Gateway's per-rule `shadowMode` (count, never deny). When every rule has it the
    /// policy runs in `Shadow` mode, which means exactly that; otherwise the shadow rules are
    /// dropped with a warning, since enforcing them would deny what the gateway only counts.
    pub fn apply_shadow_mode(&mut self, r: &mut Reader, mode: &mut Mode) {
        if self.shadow.is_empty() {
            return;
        }
        if self.shadow.len() == self.out.len() {
            *mode = Mode::Shadow;
            return;
        }
        for (name, at) in self.shadow.drain(..) {
            let value = format!(
                "not enforced: rule {name} is in shadow mode beside enforced rules; this agent shadows whole \
                 policies only (the rule is dropped)"
            );
            self.out.retain(|rule| rule.name != name);
            r.warnings.push(Located { value, at });
        }
    }

    /// Claims `name` for the rule at `n`; false (and an error) when it is already taken.
    pub fn claim(&mut self, r: &mut Reader, name: &str, n: &S<Node>, field: &str) -> bool {
        if let Some(first_line) = self.seen.get(name) {
            let err = ErrorKind::DuplicateRule { name: name.to_owned(), first_line: *first_line };
            r.errors.push(FieldError::new(pos_of(n), field, err));
            return false;
        }
        self.seen.insert(name.to_owned(), pos_of(n).line);
        true
    }
}

/// `rateLimit` of a `BackendTrafficPolicy`, or the whole `spec` of a `RateLimitFilter`:
/// `type`, `local`, `global`; any other key is unknown.
pub(super) fn rate_limit(r: &mut Reader, n: &S<Node>, field: &str, rules: &mut Rules) {
    let Some(entries) = r.map(n, field) else { return };
    let (mut declared, mut local, mut global) = (None, None, None);
    let mut type_ok = true;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "type" => match r.opt_string(v, &f) {
                None => type_ok = v.value.is_null(),
                Some(t) if t.eq_ignore_ascii_case("local") => declared = Some(Scope::Local),
                Some(t) if t.eq_ignore_ascii_case("global") => declared = Some(Scope::Global),
                Some(t) => {
                    let err = ErrorKind::UnknownValue { what: "type", value: t, expected: "Global or Local" };
                    r.errors.push(FieldError::new(pos_of(v), f, err));
                    type_ok = false;
                }
            },
            "local" => local = Some(v),
            "global" => global = Some(v),
            _ => r.unknown_field(v, &f),
        }
    }
    if !type_ok {
        return;
    }
    for (scope, block, key) in [(Scope::Local, local, "local"), (Scope::Global, global, "global")] {
        let f = format!("{field}.{key}");
        match (declared, block) {
            (Some(d), None) if d == scope => r.missing(n, field, key),
            (Some(d), Some(v)) if d != scope => {
                r.warn(v, &f, "not enforced: ignored because `type` selects the other block");
            }
            (_, Some(v)) => rule_block(r, v, &f, scope, rules),
            (_, None) => {}
        }
    }
}

/// `{rules: [...]}`.
fn rule_block(r: &mut Reader, n: &S<Node>, field: &str, scope: Scope, rules: &mut Rules) {
    let Some(entries) = r.map(n, field) else { return };
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        if k != "rules" {
            r.unknown_field(v, &f);
            continue;
        }
        let Some(items) = r.seq(v, &f) else { continue };
        for (i, item) in items.iter().enumerate() {
            rule(r, item, &format!("{f}[{i}]"), scope, rules);
        }
    }
}

fn rule(r: &mut Reader, n: &S<Node>, field: &str, scope: Scope, rules: &mut Rules) {
    let index = rules.next;
    rules.next += 1;
    let Some(entries) = r.map(n, field) else { return };
    let before = r.errors.len();
    let (mut name, mut limit, mut has_limit) = (None, None, false);
    let mut shadow = None;
    let mut selectors = Vec::new();
    let mut enforceable = true;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => {
                if let Some(s) = r.string(v, &f) {
                    if let Some(reason) = name_problem(&s) {
                        let err = ErrorKind::InvalidName { name: s.clone(), reason };
                        r.errors.push(FieldError::new(pos_of(v), &f, err));
                    }
                    name = Some((s, v, f));
                }
            }
            "clientSelectors" => {
                let Some(items) = r.seq(v, &f) else { continue };
                for (i, item) in items.iter().enumerate() {
                    match selector(r, item, &format!("{f}[{i}]")) {
                        Selector::Ok(s) => selectors.push(s),
                        Selector::Unenforceable => enforceable = false,
                        Selector::Invalid => {}
                    }
                }
            }
            "limit" => {
                has_limit = true;
                limit = read_limit(r, v, &f);
            }
            "cost" | "shared" => r.warn(v, &f, "not enforced: every request counts once, per node or shared as scoped"),
            "shadowMode" => {
                if r.opt_bool(v, &f) == Some(true) {
                    shadow = Some(At::new(pos_of(v), &f));
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has_limit {
        r.missing(n, field, "limit");
    }
    let name = match name {
        Some((s, v, f)) => rules.claim(r, &s, v, &f).then_some(s),
        None => {
            let s = format!("rule-{index}");
            rules.claim(r, &s, n, field).then_some(s)
        }
    };
    if r.errors.len() > before {
        return;
    }
    let (Some(name), Some(limit)) = (name, limit) else { return };
    if !enforceable {
        r.warn(n, field, &format!("not enforced: rule {name} selects on a condition this agent cannot match"));
        return;
    }
    if let Some(at) = shadow {
        rules.shadow.push((name.clone(), at));
    }
    rules.out.push(Rule {
        name,
        scope,
        selectors,
        count: Count::Requests,
        limit,
        kernel_guard: true,
        at: At::new(pos_of(n), field),
    });
}

enum Selector {
    Ok(ClientSelector),
    /// Valid, but holds a condition this agent cannot match (warned about).
    Unenforceable,
    /// Errors were reported.
    Invalid,
}

fn selector(r: &mut Reader, n: &S<Node>, field: &str) -> Selector {
    let Some(entries) = r.map(n, field) else { return Selector::Invalid };
    if entries.is_empty() {
        r.errors.push(FieldError::new(pos_of(n), field, ErrorKind::EmptySelector));
        return Selector::Invalid;
    }
    let before = r.errors.len();
    let mut out = ClientSelector::default();
    let mut enforceable = true;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "headers" => {
                let Some(items) = r.seq(v, &f) else { continue };
                if items.is_empty() {
                    r.errors.push(FieldError::new(pos_of(v), &f, ErrorKind::EmptyHeaders));
                }
                for (i, item) in items.iter().enumerate() {
                    match header_match(r, item, &format!("{f}[{i}]")) {
                        Some(Some(h)) => out.headers.push(h),
                        Some(None) => enforceable = false,
                        None => {}
                    }
                }
            }
            "sourceCIDR" => out.source = source_cidr(r, v, &f),
            "path" | "methods" | "queryParams" => {
                r.warn(v, &f, "not enforced: this agent does not match on it (the rule is dropped)");
                enforceable = false;
            }
            _ => {
                r.warn(v, &f, "unknown selector field: not enforced (the rule is dropped)");
                enforceable = false;
            }
        }
    }
    if r.errors.len() > before {
        Selector::Invalid
    } else if !enforceable {
        Selector::Unenforceable
    } else {
        Selector::Ok(out)
    }
}

/// `None`: errors; `Some(None)`: a `RegularExpression` match (warned about).
fn header_match(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Option<HeaderMatch>> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let (mut name, mut kind, mut value, mut invert) = (None, None, None, false);
    let mut value_at = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => name = r.string(v, &f).map(|s| (s, v)),
            "type" => kind = r.opt_string(v, &f).map(|s| (s, v)),
            "value" => {
                value = r.opt_string(v, &f);
                value_at = Some(v);
            }
            "invert" => invert = r.opt_bool(v, &f).unwrap_or(false),
            _ => r.unknown_field(v, &f),
        }
    }
    match &name {
        None if !entries.iter().any(|(k, _)| k == "name") => r.missing(n, field, "name"),
        Some((s, v)) if s.trim().is_empty() => {
            let err = ErrorKind::InvalidName { name: s.clone(), reason: "must not be empty" };
            r.errors.push(FieldError::new(pos_of(v), format!("{field}.name"), err));
        }
        _ => {}
    }
    let distinct = match &kind {
        None => value.as_deref() == Some("*"),
        Some((t, _)) if t.eq_ignore_ascii_case("exact") => value.as_deref() == Some("*"),
        Some((t, _)) if t.eq_ignore_ascii_case("distinct") => {
            // Each value gets its own bucket, so a value would narrow nothing; ignoring it would
            // limit more than written. Envoy Gateway refuses it too. `*` means "any" here.
            if let (Some(v), Some(at)) = (value.as_deref(), value_at)
                && v != "*"
            {
                let message =
                    "a Distinct match takes no value (every value gets its own bucket); use type Exact".into();
                r.schema(pos_of(at), &format!("{field}.value"), message);
            }
            true
        }
        Some((t, v)) if t.eq_ignore_ascii_case("regularexpression") => {
            r.warn(v, &format!("{field}.type"), "not enforced: RegularExpression header matches (the rule is dropped)");
            return (r.errors.len() == before).then_some(None);
        }
        Some((t, v)) => {
            let expected = "Exact, Distinct or RegularExpression";
            let err = ErrorKind::UnknownValue { what: "type", value: t.clone(), expected };
            r.errors.push(FieldError::new(pos_of(v), format!("{field}.type"), err));
            return None;
        }
    };
    if !distinct && value.is_none() {
        r.errors.push(FieldError::new(pos_of(n), field, ErrorKind::HeaderValueMissing));
    }
    if r.errors.len() > before {
        return None;
    }
    if distinct && invert {
        // This agent's contract (POLICY.md): `invert` on a Distinct match selects requests
        // without the header. Envoy Gateway's translator refuses the combination, so say so.
        let at = entries.iter().find(|(k, _)| k == "invert").map_or(n, |(_, v)| v);
        let what = "read as: requests without this header (Envoy Gateway itself refuses invert with type Distinct)";
        r.warn(at, &format!("{field}.invert"), what);
    }
    let (name, _) = name?;
    let value = if distinct { None } else { value };
    Some(Some(HeaderMatch { name, distinct, value, invert }))
}

fn source_cidr(r: &mut Reader, n: &S<Node>, field: &str) -> Option<SourceCidr> {
    let entries = r.map(n, field)?;
    let (mut distinct, mut net, mut has_value) = (Some(false), None, false);
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "type" => {
                distinct = match r.opt_string(v, &f) {
                    None => Some(false),
                    Some(t) if t.eq_ignore_ascii_case("exact") => Some(false),
                    Some(t) if t.eq_ignore_ascii_case("distinct") => Some(true),
                    Some(t) => {
                        let err = ErrorKind::UnknownValue { what: "type", value: t, expected: "Exact or Distinct" };
                        r.errors.push(FieldError::new(pos_of(v), f, err));
                        None
                    }
                }
            }
            "value" => {
                has_value = true;
                if let Some(s) = r.string(v, &f) {
                    match parse_cidr(&s) {
                        Ok(n) => net = Some(n),
                        Err(reason) => {
                            r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::InvalidCidr { value: s, reason }));
                        }
                    }
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has_value {
        r.missing(n, field, "value");
    }
    Some(SourceCidr { net: net?, distinct: distinct?, invert: false })
}

/// `{requests, unit}`.
fn read_limit(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Limit> {
    let entries = r.map(n, field)?;
    let (mut requests, mut unit, mut has) = (None, None, (false, false));
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "requests" => {
                has.0 = true;
                requests = r.int_in(v, &f, 1, i64::MAX).and_then(|x| u64::try_from(x).ok());
            }
            "unit" => {
                has.1 = true;
                unit = r.string(v, &f).and_then(|s| match eg_unit(&s) {
                    Some(u) => Some(u),
                    None => {
                        r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::UnknownUnit { value: s }));
                        None
                    }
                });
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has.0 {
        r.missing(n, field, "requests");
    }
    if !has.1 {
        r.missing(n, field, "unit");
    }
    Some(Limit { requests: requests?, unit: unit?, burst: 0 })
}

/// The native units plus Envoy Gateway's `Month` and `Year` (30 and 365 days, as Envoy's
/// rate limit service counts them).
pub(super) fn eg_unit(s: &str) -> Option<Unit> {
    if let Some(u) = parse_unit(s) {
        return Some(u);
    }
    let lower = s.trim().to_ascii_lowercase();
    match lower.strip_suffix('s').unwrap_or(&lower) {
        "month" => Some(Unit::Interval { ns: 30 * NS_PER_DAY }),
        "year" => Some(Unit::Interval { ns: 365 * NS_PER_DAY }),
        _ => None,
    }
}
