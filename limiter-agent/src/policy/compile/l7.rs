//! Gateway-kind rules → L7 rules: the Envoy descriptor a gateway sends for each rule.
//!
//! A rule `policy/rule` counting `Requests` (every rule selecting on headers does) becomes an
//! [`L7Rule`] of domain [`DEFAULT_DOMAIN`] whose descriptor is, entry by entry:
//!
//! | entry | from | descriptor entry | Envoy `rate_limits` action |
//! |---|---|---|---|
//! | first, always | the rule | `generic_key` = `policy/rule` | `generic_key: {descriptor_value: policy/rule}` |
//! | `sourceCIDR` (`Exact` or `Distinct`, `invert`) | client address | `remote_address` = address, matched against the CIDR | `remote_address: {}` |
//! | header `type: Distinct` (or EG `value: "*"`) | header value | `<name>` = value | `request_headers: {header_name: <name>, descriptor_key: <name>}` |
//! | header `Exact` value `v` | presence | `header_match` = `<name>=v` | `header_value_match: {descriptor_value: "<name>=v", headers: [{name, string_match: {exact: v}}]}` |
//! | header `Exact` + `invert` | absence of the value | `header_match` = `<name>!=v` | same with `expect_match: false` |
//! | header `Distinct` + `invert` | absence of the header | `header_match` = `no <name>` | `header_value_match: {descriptor_value: "no <name>", expect_match: false, headers: [{name, present_match: true}]}` |
//!
//! Entries follow the rule's `clientSelectors` in order (each selector's `sourceCIDR`, then
//! its headers). Header names are lower-cased (HTTP names are case-insensitive; Envoy
//! matches them so). Why this shape:
//! - The leading `generic_key` makes every rule its own descriptor, so one rule's counters
//!   never mix with another's, and one `rate_limits` entry per rule is all a gateway needs.
//! - Envoy sends no descriptor when a `request_headers` header is missing, and a
//!   `header_value_match` entry only when its condition holds: exactly the requests the
//!   rule selects reach the rule (the depth rule of envoyproxy/ratelimit does the rest).
//! - `remote_address` carries the address, so a `Distinct` CIDR counts per client and an
//!   `Exact` one shares one counter across the range (the engine matches the range).
//!
//! Bucket: a token bucket of `limit`, depth `requests + burst`; scope from `local`/`global`;
//! `shadow` from the policy's `mode`; targets from the policy's `HTTPRoute`/`Gateway`
//! targetRefs by name (a route's own rules win over its gateway's; `Port` targets have no
//! L7 meaning, the rule then applies to every request that reaches the engine).
//!
//! envoyproxy/ratelimit configs compile in [`ratelimit_config::compile`]: entries keyed by
//! the config's descriptor keys with [`Attribute::Descriptor`] (they only arrive over RLS).
//! A kgateway `TrafficPolicy` that sends descriptors to that config ([`DescriptorActions`])
//! links them: each matching config rule learns where its entries come from in an HTTP
//! request (`RemoteAddress` → [`Attribute::RemoteAddress`], `Path` → [`Attribute::Path`],
//! `Header` → [`Attribute::Header`], `Generic` → [`Attribute::Fixed`]) and the policy's
//! targets. A sent descriptor that no config rule answers is a notice.
//!
//! [`ratelimit_config::compile`]: super::ratelimit_config::compile

use std::collections::HashMap;
use std::ops::Range;

use super::super::model::{ActionEntry, DescriptorActions, HeaderMatch, HttpSelector, Policy, PolicySet, Rule, Scope};
use super::{Compiled, Notice, NoticeKind};
use crate::plan::l7::{DEFAULT_DOMAIN, MatchTarget, StringMatch, keys};
use crate::plan::{Algorithm, Attribute, EntryMatch, EntryValue, L7Rule, L7Target};

/// The L7 rule of a gateway-kind rule named `name` (`policy/rule`).
pub fn gateway_rule(name: &str, r: &Rule, shadow: bool, targets: &[L7Target]) -> L7Rule {
    let mut entries = vec![EntryMatch {
        key: keys::GENERIC_KEY.to_owned(),
        attribute: Attribute::Fixed,
        value: EntryValue::Exact(name.to_owned()),
    }];
    for selector in &r.selectors {
        if let Some(s) = &selector.source {
            entries.push(EntryMatch {
                key: keys::REMOTE_ADDRESS.to_owned(),
                attribute: Attribute::RemoteAddress,
                value: EntryValue::Cidr { nets: vec![s.net], distinct: s.distinct, invert: s.invert },
            });
        }
        entries.extend(selector.headers.iter().map(header_entry));
        entries.extend(selector.http.iter().map(http_entry));
    }
    L7Rule {
        name: name.to_owned(),
        domain: DEFAULT_DOMAIN.to_owned(),
        entries,
        limit: Some(r.limit),
        algorithm: Algorithm::TokenBucket,
        scope: match r.scope {
            Scope::Local => crate::plan::Scope::Local,
            Scope::Global => crate::plan::Scope::Global,
        },
        shadow,
        targets: targets.to_vec(),
        cost_request: r.cost.request.clone(),
        cost_response: r.cost.response.clone(),
        ..L7Rule::default()
    }
}

/// The entry of an HTTP selector: a condition's fixed descriptor value says what it tests
/// (`path^=/llm`, `method=POST`, `x-tier~=gold|plat`, `?debug=1`, `not ...` when inverted).
pub(crate) fn http_entry(h: &HttpSelector) -> EntryMatch {
    match h {
        HttpSelector::QueryDistinct(name) => EntryMatch {
            key: format!("query.{name}"),
            attribute: Attribute::Query(name.clone()),
            value: EntryValue::Distinct,
        },
        HttpSelector::Condition(c) => {
            let subject = match &c.target {
                MatchTarget::Header(n) => n.clone(),
                MatchTarget::Path => "path".to_owned(),
                MatchTarget::Method => "method".to_owned(),
                MatchTarget::Query(n) => format!("?{n}"),
            };
            let test = match &c.matcher {
                StringMatch::Exact(v) => format!("={v}"),
                StringMatch::Prefix(p) => format!("^={p}"),
                StringMatch::Regex(r) => format!("~={}", r.as_str()),
                StringMatch::Present => " present".to_owned(),
            };
            let key = match c.target {
                MatchTarget::Query(_) => keys::QUERY_MATCH,
                _ => keys::HEADER_MATCH,
            };
            let not = if c.invert { "not " } else { "" };
            EntryMatch {
                key: key.to_owned(),
                attribute: Attribute::Matches(c.clone()),
                value: EntryValue::Exact(format!("{not}{subject}{test}")),
            }
        }
    }
}

fn header_entry(h: &HeaderMatch) -> EntryMatch {
    let name = h.name.to_ascii_lowercase();
    let matched = |descriptor_value: String, attribute| EntryMatch {
        key: keys::HEADER_MATCH.to_owned(),
        attribute,
        value: EntryValue::Exact(descriptor_value),
    };
    match (h.distinct, &h.value, h.invert) {
        (false, Some(v), false) => {
            matched(format!("{name}={v}"), Attribute::HeaderEquals { name: name.clone(), value: v.clone() })
        }
        (false, Some(v), true) => {
            matched(format!("{name}!={v}"), Attribute::HeaderNotEquals { name: name.clone(), value: v.clone() })
        }
        // Distinct (validation guarantees an Exact match has a value).
        (_, _, true) => matched(format!("no {name}"), Attribute::HeaderAbsent(name.clone())),
        (_, _, false) => {
            EntryMatch { key: name.clone(), attribute: Attribute::Header(name.clone()), value: EntryValue::Distinct }
        }
    }
}

/// How a rule's counters are keyed, for people: `per source`, `per header x-user-id`,
/// `shared`, `per descriptor remote_address`...
pub fn entry_key_text(rule: &L7Rule) -> String {
    let gateway_kind = rule.entries.first().is_some_and(|e| {
        e.key == keys::GENERIC_KEY && e.attribute == Attribute::Fixed && e.value == EntryValue::Exact(rule.name.clone())
    });
    let skip = usize::from(gateway_kind);
    let mut parts = Vec::new();
    for e in rule.entries.iter().skip(skip) {
        let part = match (&e.attribute, &e.value) {
            (Attribute::RemoteAddress, EntryValue::Cidr { nets, distinct, invert }) => {
                let range = range_text(nets, *invert);
                if *distinct { format!("per source{range}") } else { format!("shared by sources{range}") }
            }
            (Attribute::Header(name), EntryValue::Distinct) => format!("per header {name}"),
            (Attribute::HeaderAbsent(name), _) => format!("without header {name}"),
            (Attribute::HeaderEquals { name, value }, _) => format!("header {name}={value}"),
            (Attribute::HeaderNotEquals { name, value }, _) => format!("header {name}!={value}"),
            (Attribute::Matches(_), EntryValue::Exact(v)) => v.clone(),
            (Attribute::Query(name), _) => format!("per query parameter {name}"),
            (_, EntryValue::Distinct) => format!("per descriptor {}", e.key),
            (_, EntryValue::Wildcard(p)) => format!("per descriptor {} matching {p}", e.key),
            (_, EntryValue::SharedWildcard(p)) => format!("shared by descriptors {} matching {p}", e.key),
            (_, EntryValue::Exact(v)) => format!("{}={v}", e.key),
            (_, EntryValue::Cidr { nets, distinct, .. }) => {
                let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
                format!("{} {} in {}", if *distinct { "per" } else { "shared by" }, e.key, nets.join(","))
            }
        };
        parts.push(part);
    }
    let splits = rule.entries.iter().any(|e| match &e.value {
        EntryValue::Exact(_) | EntryValue::SharedWildcard(_) => false,
        EntryValue::Wildcard(_) | EntryValue::Distinct => true,
        EntryValue::Cidr { distinct, .. } => *distinct,
    });
    match (parts.is_empty(), splits) {
        (true, _) => "shared".to_owned(),
        (false, true) => parts.join(", "),
        (false, false) if parts[0].starts_with("shared") => parts.join(", "),
        (false, false) => format!("shared, {}", parts.join(", ")),
    }
}

/// ` in 10.0.0.0/8`, ` outside 192.0.2.0/24`, ` (IPv4)` for `0.0.0.0/0`, `` for no range.
pub fn range_text(nets: &[ipnet::IpNet], invert: bool) -> String {
    let all = |n: &ipnet::IpNet| n.prefix_len() == 0;
    match nets {
        [] => String::new(),
        [n] if all(n) && !invert => format!(" ({})", if n.addr().is_ipv4() { "IPv4" } else { "IPv6" }),
        _ => {
            let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
            format!(" {} {}", if invert { "outside" } else { "in" }, list.join(","))
        }
    }
}

/// The descriptor key an action entry sends.
fn action_key(a: &ActionEntry) -> &str {
    match a {
        ActionEntry::RemoteAddress => keys::REMOTE_ADDRESS,
        ActionEntry::Path => keys::PATH,
        ActionEntry::Header { descriptor_key, .. } => descriptor_key,
        ActionEntry::Generic { key, .. } => key,
    }
}

fn action_attribute(a: &ActionEntry) -> Attribute {
    match a {
        ActionEntry::RemoteAddress => Attribute::RemoteAddress,
        ActionEntry::Path => Attribute::Path,
        ActionEntry::Header { name, .. } => Attribute::Header(name.to_ascii_lowercase()),
        ActionEntry::Generic { .. } => Attribute::Fixed,
    }
}

/// Whether a config entry can match what the action sends (any value for request-derived
/// entries; the constant for `Generic`).
fn entry_accepts(e: &EntryMatch, a: &ActionEntry) -> bool {
    if e.key != action_key(a) {
        return false;
    }
    match (a, &e.value) {
        (ActionEntry::Generic { value, .. }, EntryValue::Exact(v)) => v == value,
        (ActionEntry::Generic { value, .. }, EntryValue::Wildcard(p) | EntryValue::SharedWildcard(p)) => glob(p, value),
        (ActionEntry::Generic { .. }, EntryValue::Distinct) => true,
        (ActionEntry::Generic { .. }, EntryValue::Cidr { .. }) => false,
        _ => true,
    }
}

/// `*` matches any run of characters (as the engine's envoyproxy/ratelimit wildcards).
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(mut tail) = text.strip_prefix(head) else { return false };
            loop {
                if glob(rest, tail) {
                    return true;
                }
                let mut chars = tail.chars();
                if chars.next().is_none() {
                    return false;
                }
                tail = chars.as_str();
            }
        }
    }
}

fn descriptor_text(d: &DescriptorActions) -> String {
    let entries: Vec<String> = d
        .entries
        .iter()
        .map(|a| match a {
            ActionEntry::Generic { key, value } => format!("({key}, {value})"),
            other => format!("({}, *)", action_key(other)),
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

/// Links a policy's kgateway descriptors to the config rules that answer them (see the module
/// docs). `config_rules[i]`: the indices in `out.l7.rules` of `set.ratelimit_configs[i]`.
pub(super) fn link_descriptor_actions(p: &Policy, set: &PolicySet, config_rules: &[Range<usize>], out: &mut Compiled) {
    if p.descriptor_actions.is_empty() {
        return;
    }
    let targets: Vec<L7Target> = p
        .targets
        .iter()
        .filter_map(|t| match &t.kind {
            super::super::model::TargetKind::Route { kind, name, .. } => Some(match kind {
                super::super::model::RouteKind::HttpRoute => L7Target::Route(name.clone()),
                super::super::model::RouteKind::Gateway => L7Target::Gateway(name.clone()),
            }),
            super::super::model::TargetKind::Port(_) => None,
        })
        .collect();
    // Rule index → whether some linking policy applies everywhere (no route targets).
    let mut linked: HashMap<usize, bool> = HashMap::new();
    for d in &p.descriptor_actions {
        let mut matched = false;
        for (config, range) in set.ratelimit_configs.iter().zip(config_rules) {
            if d.domain.as_ref().is_some_and(|dom| *dom != config.domain) {
                continue;
            }
            for i in range.clone() {
                let Some(rule) = out.l7.rules.get_mut(i) else { continue };
                let fits = rule.entries.len() == d.entries.len()
                    && rule.entries.iter().zip(&d.entries).all(|(e, a)| entry_accepts(e, a));
                if !fits {
                    continue;
                }
                matched = true;
                for (e, a) in rule.entries.iter_mut().zip(&d.entries) {
                    if e.attribute == Attribute::Descriptor {
                        e.attribute = action_attribute(a);
                    }
                }
                let everywhere = linked.entry(i).or_insert(false);
                *everywhere |= targets.is_empty();
                if !*everywhere {
                    for t in &targets {
                        if !rule.targets.contains(t) {
                            rule.targets.push(t.clone());
                        }
                    }
                } else {
                    rule.targets.clear();
                }
            }
        }
        if !matched {
            let domain = match &d.domain {
                Some(dom) => format!("the envoyproxy/ratelimit config of domain {dom}"),
                None => "any envoyproxy/ratelimit config of this policy set".to_owned(),
            };
            out.notices.push(Notice {
                location: p.location(&d.at),
                field: d.at.field.clone(),
                policy: p.name.clone(),
                rule: None,
                kind: NoticeKind::UnmatchedDescriptor { descriptor: descriptor_text(d), domain },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("api", "api", true),
            ("api", "apis", false),
            ("a*", "a", true),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("/api/*/x", "/api/v1/x", true),
            ("/api/*/x", "/api/v1/y", false),
            ("*", "", true),
        ] {
            assert_eq!(glob(p, t), want, "{p} {t}");
        }
    }
}
