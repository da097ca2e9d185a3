//! kgateway `TrafficPolicy` (`gateway.kgateway.dev/v1alpha1`), read as kgateway reads it.
//!
//! What the agent takes:
//! - `metadata.name` / `metadata.namespace`.
//! - `spec.targetRefs[] {group?, kind: HTTPRoute | Gateway, name, sectionName?}`: local
//!   references (no `namespace` field in kgateway), so a target lives in the policy's
//!   namespace. `GRPCRoute` / `ListenerSet` targets and `targetSelectors` are reported and
//!   skipped; a policy left with no target has its local rule dropped with a warning.
//! - `spec.rateLimit.local.tokenBucket {maxTokens, tokensPerFill (default 1), fillInterval}`:
//!   Envoy's local rate limit token bucket. It becomes one rule named `local` (scope local,
//!   every request, counted as `Requests`): `tokensPerFill` tokens per `fillInterval`, depth
//!   `maxTokens`, i.e. burst `maxTokens - tokensPerFill`. A `fillInterval` of exactly one
//!   second, minute, hour or day uses that unit; any other is kept as an interval (at least
//!   50ms, as kgateway requires). `percentEnabled` / `percentEnforced` are not enforced
//!   (warning); a `local` block without `tokenBucket` limits nothing (warning).
//! - `spec.rateLimit.global {descriptors[].entries[], extensionRef {name}}`: the descriptors
//!   the gateway sends to the rate limit service (kept as [`DescriptorActions`]); their limits
//!   live in an envoyproxy/ratelimit config. The RLS domain is set on the referenced
//!   `GatewayExtension`, which this agent does not read, so `domain` stays `None`.
//!   Entry types: `RemoteAddress`, `Path`, `Header` (`header: NAME`, sent under the header's
//!   name as written; descriptor keys are case-sensitive) and `Generic` (`generic: {key,
//!   value}`, both required).
//!
//! Every other `spec` field (`timeouts`, `retry`, `cors`, `extAuth`, ...) and every unknown
//! field is accepted and reported as not enforced, naming the field.

use std::time::Duration;

use super::super::error::{ErrorKind, FieldError};
use super::super::model::{
    ActionEntry, At, Count, DescriptorActions, Policy, PolicyKind, RouteKind, Rule, Scope, Target, TargetKind,
};
use super::super::source::deserialize;
use super::super::spec::{S, pos_of};
use super::super::validate::parse_duration;
use super::document::{UNRESOLVED_TARGET_KINDS, drop_rules_without_targets, header};
use crate::plan::{Limit, Unit};
use crate::policy::reader::{Node, Reader};

pub const API_VERSION: &str = "gateway.kgateway.dev/v1alpha1";

const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

pub fn load(src: &str) -> Result<Policy, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let policy = policy(&mut r, &root);
    match policy {
        Some(p) if r.errors.is_empty() => Ok(Policy { not_enforced: r.warnings, ..p }),
        _ => Err(r.errors),
    }
}

fn policy(r: &mut Reader, root: &S<Node>) -> Option<Policy> {
    let header = header(r, root, API_VERSION, PolicyKind::TrafficPolicy);
    let mut policy = header.policy?;
    read_spec(r, header.spec?, &mut policy);
    Some(policy)
}

fn read_spec(r: &mut Reader, n: &S<Node>, policy: &mut Policy) {
    let Some(entries) = r.map(n, "spec") else { return };
    // A target was named that this agent does not resolve (see `drop_rules_without_targets`).
    let mut dropped = false;
    for (k, v) in entries {
        let f = format!("spec.{k}");
        match k.as_str() {
            "targetRefs" => {
                let Some(items) = r.seq(v, &f) else { continue };
                for (i, t) in items.iter().enumerate() {
                    match target(r, t, &format!("{f}[{i}]"), policy.namespace.as_deref()) {
                        TargetRead::Resolved(t) => policy.targets.push(t),
                        TargetRead::Unresolved => dropped = true,
                        TargetRead::Invalid => {}
                    }
                }
            }
            "targetSelectors" => {
                r.warn(v, &f, "not enforced: label selectors are not resolved by this agent; use targetRefs");
                dropped = true;
            }
            "rateLimit" => rate_limit(r, v, &f, policy),
            // Known kgateway features that no layer of this agent enforces.
            _ => r.warn(v, &f, "not enforced by limiter"),
        }
    }
    if policy.targets.is_empty() && dropped {
        drop_rules_without_targets(r, n, &mut policy.rules);
    }
}

/// One `targetRefs[]` entry, read.
enum TargetRead {
    Resolved(Target),
    /// A kind kgateway accepts that this agent does not resolve (warned about).
    Unresolved,
    /// Errors were reported.
    Invalid,
}

fn target(r: &mut Reader, n: &S<Node>, field: &str, namespace: Option<&str>) -> TargetRead {
    let Some(entries) = r.map(n, field) else { return TargetRead::Invalid };
    let mut kind = None;
    let mut name = None;
    let mut section_name = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "kind" => kind = r.string(v, &f).map(|s| (s, v)),
            "name" => name = r.opt_string(v, &f),
            "sectionName" => section_name = r.opt_string(v, &f),
            // Gateway API group; not checked (`gateway.networking.k8s.io`).
            "group" => {}
            _ => r.unknown_field(v, &f),
        }
    }
    let Some((kind, kind_node)) = kind else {
        r.missing(n, field, "kind");
        return TargetRead::Invalid;
    };
    let route = match kind.to_ascii_lowercase().as_str() {
        "httproute" => RouteKind::HttpRoute,
        "gateway" => RouteKind::Gateway,
        _ if UNRESOLVED_TARGET_KINDS.iter().any(|u| u.eq_ignore_ascii_case(&kind)) => {
            let what = format!("not enforced: {kind} targets are not resolved by this agent");
            r.warn(kind_node, &format!("{field}.kind"), &what);
            return TargetRead::Unresolved;
        }
        _ => {
            let err = ErrorKind::UnknownValue { what: "target kind", value: kind, expected: "HTTPRoute or Gateway" };
            r.errors.push(FieldError::new(pos_of(kind_node), format!("{field}.kind"), err));
            return TargetRead::Invalid;
        }
    };
    match name {
        Some(name) if !name.is_empty() => TargetRead::Resolved(Target {
            kind: TargetKind::Route { kind: route, name, namespace: namespace.map(str::to_owned), section_name },
            syn_proxy: None,
            at: At::new(pos_of(n), field),
        }),
        _ => {
            let err = ErrorKind::TargetRefIncomplete { kind: route.to_string(), needs: "a name" };
            r.errors.push(FieldError::new(pos_of(n), field, err));
            TargetRead::Invalid
        }
    }
}

fn rate_limit(r: &mut Reader, n: &S<Node>, field: &str, policy: &mut Policy) {
    let Some(entries) = r.map(n, field) else { return };
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "local" => {
                if let Some(rule) = local(r, v, &f) {
                    policy.rules.push(rule);
                }
            }
            "global" => global(r, v, &f, &mut policy.descriptor_actions),
            _ => r.unknown_field(v, &f),
        }
    }
}

fn local(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Rule> {
    if n.value.is_null() {
        return None;
    }
    let entries = r.map(n, field)?;
    let mut bucket = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "tokenBucket" => bucket = Some(v),
            // Envoy's runtime fractions: this agent limits every request or none.
            "percentEnabled" | "percentEnforced" => {
                r.warn(v, &f, "not enforced: the bucket applies to every request (100%)")
            }
            _ => r.unknown_field(v, &f),
        }
    }
    let Some(bucket) = bucket.filter(|b| !b.value.is_null()) else {
        // kgateway accepts a local block without a bucket; it limits nothing.
        r.warn(n, field, "no tokenBucket: nothing to enforce");
        return None;
    };
    let limit = token_bucket(r, bucket, &format!("{field}.tokenBucket"))?;
    Some(Rule {
        name: "local".into(),
        scope: Scope::Local,
        selectors: Vec::new(),
        count: Count::Requests,
        limit,
        kernel_guard: true,
        cost: Default::default(),
        at: At::new(pos_of(bucket), format!("{field}.tokenBucket")),
    })
}

fn token_bucket(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Limit> {
    let entries = r.map(n, field)?;
    let mut max_tokens = None;
    let mut tokens_per_fill = None;
    let mut fill_interval = None;
    let mut ok = true;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "maxTokens" => {
                max_tokens = r.int_in(v, &f, 1, u32::MAX.into());
                ok &= max_tokens.is_some();
            }
            "tokensPerFill" => {
                if !v.value.is_null() {
                    tokens_per_fill = r.int_in(v, &f, 1, u32::MAX.into()).map(|t| (t, v));
                    ok &= tokens_per_fill.is_some();
                }
            }
            "fillInterval" => {
                fill_interval = match r.string(v, &f) {
                    Some(s) => match parse_duration(&s) {
                        Some(d) => Some(d),
                        None => {
                            r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::InvalidDuration { value: s }));
                            ok = false;
                            None
                        }
                    },
                    None => {
                        ok = false;
                        None
                    }
                };
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !entries.iter().any(|(k, _)| k == "maxTokens") {
        r.missing(n, field, "maxTokens");
    }
    if !entries.iter().any(|(k, _)| k == "fillInterval") {
        r.missing(n, field, "fillInterval");
    }
    let max_tokens = max_tokens?;
    let per_fill = match tokens_per_fill {
        None => 1,
        Some((t, at)) if t > max_tokens => {
            let kind = ErrorKind::TooLarge { value: t, max: max_tokens };
            r.errors.push(FieldError::new(pos_of(at), format!("{field}.tokensPerFill"), kind));
            return None;
        }
        Some((t, _)) => t,
    };
    let fill_interval = fill_interval?;
    if !ok {
        return None;
    }
    if fill_interval < MIN_FILL_INTERVAL {
        // kgateway's schema and Envoy's local rate limit filter both refuse shorter ones.
        let at = entries.iter().find(|(k, _)| k == "fillInterval").map_or(n, |(_, v)| v);
        let message = format!("must be at least 50ms, got {}ms", fill_interval.as_millis());
        r.schema(pos_of(at), &format!("{field}.fillInterval"), message);
        return None;
    }
    // Both are in 1..=u32::MAX here.
    Some(Limit { requests: per_fill as u64, unit: unit_of(fill_interval), burst: (max_tokens - per_fill) as u64 })
}

/// A whole second, minute, hour or day is that unit; anything else an interval.
fn unit_of(d: Duration) -> Unit {
    match d.as_secs() {
        1 if d.subsec_nanos() == 0 => Unit::Second,
        60 if d.subsec_nanos() == 0 => Unit::Minute,
        3600 if d.subsec_nanos() == 0 => Unit::Hour,
        86_400 if d.subsec_nanos() == 0 => Unit::Day,
        _ => Unit::Interval { ns: u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) },
    }
}

fn global(r: &mut Reader, n: &S<Node>, field: &str, out: &mut Vec<DescriptorActions>) {
    if n.value.is_null() {
        return;
    }
    let Some(entries) = r.map(n, field) else { return };
    let mut has_descriptors = false;
    let mut has_extension = false;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "descriptors" => {
                has_descriptors = true;
                let Some(items) = r.seq(v, &f) else { continue };
                if items.is_empty() {
                    r.errors.push(FieldError::new(pos_of(v), &f, ErrorKind::EmptyValue));
                }
                for (i, d) in items.iter().enumerate() {
                    if let Some(actions) = descriptor(r, d, &format!("{f}[{i}]")) {
                        out.push(actions);
                    }
                }
            }
            "extensionRef" => {
                has_extension = true;
                extension_ref(r, v, &f);
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has_descriptors {
        r.missing(n, field, "descriptors");
    }
    if !has_extension {
        r.missing(n, field, "extensionRef");
    }
}

/// `extensionRef {name, namespace?}`: the GatewayExtension of the rate limit service. Read for
/// errors only; the domain it configures is not known here.
fn extension_ref(r: &mut Reader, n: &S<Node>, field: &str) {
    let Some(entries) = r.map(n, field) else { return };
    let mut name = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => name = r.string(v, &f),
            "namespace" | "group" | "kind" => {}
            _ => r.unknown_field(v, &f),
        }
    }
    match name {
        Some(n) if !n.is_empty() => {}
        Some(_) => r.errors.push(FieldError::new(pos_of(n), format!("{field}.name"), ErrorKind::EmptyValue)),
        None => r.missing(n, field, "name"),
    }
}

fn descriptor(r: &mut Reader, n: &S<Node>, field: &str) -> Option<DescriptorActions> {
    let entries = r.map(n, field)?;
    let mut list = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "entries" => list = Some((v, f)),
            _ => r.unknown_field(v, &f),
        }
    }
    let Some((list, f)) = list else {
        r.missing(n, field, "entries");
        return None;
    };
    let items = r.seq(list, &f)?;
    if items.is_empty() {
        r.errors.push(FieldError::new(pos_of(list), &f, ErrorKind::EmptyValue));
        return None;
    }
    let before = r.errors.len();
    let entries: Vec<ActionEntry> =
        items.iter().enumerate().filter_map(|(i, e)| action_entry(r, e, &format!("{f}[{i}]"))).collect();
    (r.errors.len() == before).then(|| DescriptorActions { domain: None, entries, at: At::new(pos_of(n), field) })
}

fn action_entry(r: &mut Reader, n: &S<Node>, field: &str) -> Option<ActionEntry> {
    let entries = r.map(n, field)?;
    let mut type_ = None;
    let mut header = None;
    let mut generic = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "type" => type_ = r.string(v, &f).map(|s| (s, v)),
            "header" => header = Some((v, f)),
            "generic" => generic = Some((v, f)),
            _ => r.unknown_field(v, &f),
        }
    }
    let Some((type_, type_node)) = type_ else {
        r.missing(n, field, "type");
        return None;
    };
    match type_.to_ascii_lowercase().as_str() {
        "remoteaddress" => Some(ActionEntry::RemoteAddress),
        "path" => Some(ActionEntry::Path),
        "header" => {
            let Some((h, f)) = header else {
                r.missing(n, field, "header");
                return None;
            };
            let name = r.string(h, &f)?;
            if name.is_empty() {
                r.errors.push(FieldError::new(pos_of(h), f, ErrorKind::EmptyValue));
                return None;
            }
            Some(ActionEntry::Header { descriptor_key: name.clone(), name: name.to_ascii_lowercase() })
        }
        "generic" => {
            let Some((g, f)) = generic else {
                r.missing(n, field, "generic");
                return None;
            };
            let entries = r.map(g, &f)?;
            let mut key = None;
            let mut value = None;
            for (k, v) in entries {
                let kf = format!("{f}.{k}");
                match k.as_str() {
                    "key" => key = r.opt_string(v, &kf),
                    "value" => value = r.opt_string(v, &kf),
                    _ => r.unknown_field(v, &kf),
                }
            }
            for field in ["key", "value"] {
                if !entries.iter().any(|(k, v)| k == field && !v.value.is_null()) {
                    r.missing(g, &f, field);
                }
            }
            let (Some(key), Some(value)) = (key, value) else { return None };
            let mut ok = true;
            for (name, text) in [("key", &key), ("value", &value)] {
                if text.is_empty() {
                    let at = entries.iter().find(|(k, _)| k == name).map_or(g, |(_, v)| v);
                    r.errors.push(FieldError::new(pos_of(at), format!("{f}.{name}"), ErrorKind::EmptyValue));
                    ok = false;
                }
            }
            ok.then_some(ActionEntry::Generic { key, value })
        }
        _ => {
            let kind = ErrorKind::UnknownValue {
                what: "descriptor entry type",
                value: type_,
                expected: "RemoteAddress, Path, Header or Generic",
            };
            r.errors.push(FieldError::new(pos_of(type_node), format!("{field}.type"), kind));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_interval_units() {
        assert_eq!(unit_of(Duration::from_secs(1)), Unit::Second);
        assert_eq!(unit_of(Duration::from_secs(60)), Unit::Minute);
        assert_eq!(unit_of(Duration::from_secs(3600)), Unit::Hour);
        assert_eq!(unit_of(Duration::from_secs(86_400)), Unit::Day);
        assert_eq!(unit_of(Duration::from_millis(100)), Unit::Interval { ns: 100_000_000 });
        assert_eq!(unit_of(Duration::from_secs(10)), Unit::Interval { ns: 10_000_000_000 });
        assert_eq!(unit_of(Duration::from_millis(1500)), Unit::Interval { ns: 1_500_000_000 });
    }
}
