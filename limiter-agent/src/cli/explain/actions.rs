//! The Envoy `rate_limits` actions a gateway needs so that the descriptors it sends match the
//! L7 rules: one list per RLS domain and targets, printed as YAML or JSON.

use std::io::Write;

use serde_json::{Map, Value, json};

use super::table::targets_text;
use crate::plan::l7::keys;
use crate::plan::l7::{Condition, HitsAddend, MatchTarget, StringMatch};
use crate::plan::{Attribute, EntryValue, L7Rule, L7Target};

/// One Envoy action producing one descriptor entry, with a note when its source is assumed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Action {
    pub(super) action: Value,
    pub(super) note: Option<String>,
}

/// The `rate_limits` entry for one descriptor: its actions, what a request adds (Envoy's
/// `hits_addend`, absent: 1), whether it is sent when the response is done
/// (`apply_on_stream_done`, Envoy Gateway's `cost.response`), and the rules it serves.
#[derive(Debug)]
struct Descriptor {
    actions: Vec<Action>,
    hits_addend: Option<Value>,
    on_stream_done: bool,
    rules: Vec<String>,
}

/// Envoy's `RateLimit.hits_addend` for a cost.
fn hits_addend(h: &HitsAddend) -> Value {
    match h {
        HitsAddend::Number(n) => json!({ "number": n }),
        HitsAddend::Metadata { namespace, key } => {
            json!({ "format": format!("%DYNAMIC_METADATA({namespace}:{key})%") })
        }
    }
}

/// The `rate_limits` of one domain and set of targets.
#[derive(Debug)]
pub(super) struct Group {
    domain: String,
    targets: Vec<L7Target>,
    descriptors: Vec<Descriptor>,
}

pub(super) fn action_groups(rules: &[L7Rule]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for r in rules {
        let actions: Vec<Action> = r.entries.iter().map(entry_action).collect();
        if actions.is_empty() {
            continue;
        }
        let pos = groups.iter().position(|g| g.domain == r.domain && g.targets == r.targets);
        let group = match pos {
            Some(i) => &mut groups[i],
            None => {
                groups.push(Group { domain: r.domain.clone(), targets: r.targets.clone(), descriptors: Vec::new() });
                let last = groups.len() - 1;
                &mut groups[last]
            }
        };
        // Rules reached by the same descriptor (e.g. a key-only limit and an exact override)
        // share one `rate_limits` entry.
        let request = r.cost_request.as_ref().map(hits_addend);
        let mut entries = vec![(request, false)];
        if let Some(response) = &r.cost_response {
            entries.push((Some(hits_addend(response)), true));
        }
        for (hits, on_stream_done) in entries {
            let same = |d: &&mut Descriptor| {
                d.actions == actions && d.hits_addend == hits && d.on_stream_done == on_stream_done
            };
            match group.descriptors.iter_mut().find(same) {
                Some(d) => d.rules.push(r.name.clone()),
                None => group.descriptors.push(Descriptor {
                    actions: actions.clone(),
                    hits_addend: hits,
                    on_stream_done,
                    rules: vec![r.name.clone()],
                }),
            }
        }
    }
    groups
}

pub(super) fn entry_action(e: &crate::plan::EntryMatch) -> Action {
    let exact = match &e.value {
        EntryValue::Exact(v) => Some(v.as_str()),
        _ => None,
    };
    let known = |action: Value| Action { action, note: None };
    let key_if = |m: &mut Map<String, Value>, default: &str| {
        if e.key != default {
            m.insert("descriptor_key".into(), json!(e.key));
        }
    };
    match &e.attribute {
        Attribute::Fixed => {
            let mut m = Map::new();
            key_if(&mut m, keys::GENERIC_KEY);
            match exact {
                Some(v) => {
                    m.insert("descriptor_value".into(), json!(v));
                    known(json!({ "generic_key": m }))
                }
                None => {
                    m.insert("descriptor_value".into(), json!("..."));
                    Action {
                        action: json!({ "generic_key": m }),
                        note: Some(format!("any constant value of {}", e.key)),
                    }
                }
            }
        }
        Attribute::RemoteAddress => known(json!({ "remote_address": {} })),
        Attribute::Header(name) => {
            known(json!({ "request_headers": { "header_name": name, "descriptor_key": e.key } }))
        }
        Attribute::Path => known(json!({ "request_headers": { "header_name": ":path", "descriptor_key": e.key } })),
        Attribute::Method => known(json!({ "request_headers": { "header_name": ":method", "descriptor_key": e.key } })),
        Attribute::HeaderEquals { name, value } | Attribute::HeaderNotEquals { name, value } => {
            let mut m = Map::new();
            key_if(&mut m, keys::HEADER_MATCH);
            m.insert("descriptor_value".into(), json!(exact.unwrap_or_default()));
            if matches!(e.attribute, Attribute::HeaderNotEquals { .. }) {
                m.insert("expect_match".into(), json!(false));
            }
            m.insert("headers".into(), json!([{ "name": name, "string_match": { "exact": value } }]));
            known(json!({ "header_value_match": m }))
        }
        Attribute::HeaderAbsent(name) => {
            let mut m = Map::new();
            key_if(&mut m, keys::HEADER_MATCH);
            m.insert("descriptor_value".into(), json!(exact.unwrap_or_default()));
            m.insert("expect_match".into(), json!(false));
            m.insert("headers".into(), json!([{ "name": name, "present_match": true }]));
            known(json!({ "header_value_match": m }))
        }
        Attribute::Matches(c) => known(condition_action(e, c, exact.unwrap_or_default())),
        Attribute::Query(name) => {
            known(json!({ "query_parameters": { "query_parameter_name": name, "descriptor_key": e.key } }))
        }
        // An envoyproxy/ratelimit config entry whose origin no policy gave: the usual action
        // for its key.
        Attribute::Descriptor => match (e.key.as_str(), exact) {
            (keys::REMOTE_ADDRESS, _) => known(json!({ "remote_address": {} })),
            (_, Some(v)) => {
                let mut m = Map::new();
                key_if(&mut m, keys::GENERIC_KEY);
                m.insert("descriptor_value".into(), json!(v));
                known(json!({ "generic_key": m }))
            }
            (keys::PATH, None) => Action {
                action: json!({ "request_headers": { "header_name": ":path", "descriptor_key": e.key } }),
                note: Some("assumed: the request path".into()),
            },
            (key, None) => Action {
                action: json!({ "request_headers": { "header_name": key, "descriptor_key": key } }),
                note: Some(format!("assumed: the value of header {key}; any action sending key {key} will do")),
            },
        },
    }
}

/// Envoy's `StringMatcher` for a condition.
fn string_match(m: &StringMatch) -> Value {
    match m {
        StringMatch::Exact(v) => json!({ "exact": v }),
        StringMatch::Prefix(p) => json!({ "prefix": p }),
        StringMatch::Regex(r) => json!({ "safe_regex": { "regex": r.as_str() } }),
        StringMatch::Present => Value::Null,
    }
}

/// `header_value_match` (headers, `:path`, `:method`) or `query_parameter_value_match` sending
/// `descriptor_value` when the condition holds (`expect_match: false` when inverted).
fn condition_action(e: &crate::plan::EntryMatch, c: &Condition, descriptor_value: &str) -> Value {
    let mut m = Map::new();
    let (default_key, action, list, name) = match &c.target {
        MatchTarget::Header(n) => (keys::HEADER_MATCH, "header_value_match", "headers", n.as_str()),
        MatchTarget::Path => (keys::HEADER_MATCH, "header_value_match", "headers", ":path"),
        MatchTarget::Method => (keys::HEADER_MATCH, "header_value_match", "headers", ":method"),
        MatchTarget::Query(n) => (keys::QUERY_MATCH, "query_parameter_value_match", "query_parameters", n.as_str()),
    };
    if e.key != default_key {
        m.insert("descriptor_key".into(), json!(e.key));
    }
    m.insert("descriptor_value".into(), json!(descriptor_value));
    if c.invert {
        m.insert("expect_match".into(), json!(false));
    }
    let matcher = match &c.matcher {
        StringMatch::Present => json!({ "name": name, "present_match": true }),
        other => json!({ "name": name, "string_match": string_match(other) }),
    };
    m.insert(list.into(), json!([matcher]));
    json!({ action: m })
}

impl Group {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "domain": self.domain,
            "targets": targets_text(&self.targets),
            "rate_limits": self.descriptors.iter().map(|d| {
                let mut entry = json!({
                    "rules": d.rules,
                    "actions": d.actions.iter().map(|a| a.action.clone()).collect::<Vec<_>>(),
                });
                if let Some(h) = &d.hits_addend {
                    entry["hits_addend"] = h.clone();
                }
                if d.on_stream_done {
                    entry["apply_on_stream_done"] = json!(true);
                }
                entry
            }).collect::<Vec<_>>(),
        })
    }

    pub(super) fn write_yaml(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "---")?;
        writeln!(out, "# domain: {}; {}", self.domain, targets_text(&self.targets))?;
        writeln!(out, "rate_limits:")?;
        for d in &self.descriptors {
            writeln!(out, "  # {}", d.rules.join(", "))?;
            writeln!(out, "  - actions:")?;
            for a in &d.actions {
                let note = a.note.as_ref().map(|n| format!("  # {n}")).unwrap_or_default();
                writeln!(out, "      - {}{note}", flow(&a.action))?;
            }
            if let Some(h) = &d.hits_addend {
                writeln!(out, "    hits_addend: {}", flow(h))?;
            }
            if d.on_stream_done {
                writeln!(out, "    apply_on_stream_done: true")?;
            }
        }
        Ok(())
    }
}

/// A JSON value as a YAML flow node: keys bare (they are Envoy field names), strings
/// double-quoted (JSON's escapes are YAML's), so the output is valid YAML whatever a value
/// holds.
pub(super) fn flow(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", flow(v))).collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(flow).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}
