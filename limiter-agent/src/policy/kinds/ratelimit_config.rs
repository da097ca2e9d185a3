//! envoyproxy/ratelimit service configs: `domain` plus nested `descriptors`, the file format
//! of Envoy's reference rate limit service (the one kgateway's docs deploy next to the
//! gateway).
//!
//! ```yaml
//! domain: api
//! descriptors:
//!   - key: remote_address          # a counter per client address
//!     rate_limit: {unit: minute, requests_per_unit: 60}
//!   - key: path
//!     value: /login
//!     descriptors:
//!       - key: remote_address
//!         rate_limit: {name: login-per-client, unit: second, requests_per_unit: 1}
//! ```
//!
//! Read as that service reads it:
//! - `unit` is `second | minute | hour | day | week | month | year`, any case. The service
//!   counts in fixed calendar-free windows; `week`, `month` and `year` become windows of 7,
//!   30 and 365 days ([`Unit::Interval`]).
//! - `unlimited: true` matches and answers OK without counting; a `unit` beside it is an
//!   error and a `requests_per_unit` a warning (the service refuses the one, ignores the other).
//! - `replaces[].name` must be non-empty and not the limit's own `name`; one config per
//!   `domain` in a policy set (checked by the loader).
//! - `value` may hold `*` wildcards; no `value` means "any value, a counter per value".
//! - Two sibling descriptors with the same `key` and `value` are an error (the service
//!   refuses such a config too).
//! - Keys the service does not know are errors, as the service refuses them (a misspelt
//!   `ratelimit:` would otherwise drop a limit). `value_to_metric`, `detailed_metric` and
//!   `metadata` are read and change nothing here (stats of the reference).
//! - `requests_per_unit: 0`, or none, is a limit of 0: every hit is over (the reference's
//!   README blocks an address that way).
//! - `share_threshold: true` (on a wildcard value only): every matching value shares one
//!   counter; `quota_mode: true`: see [`crate::plan::l7::L7Rule::quota_mode`].
//! - A node with neither `rate_limit` nor `descriptors` exempts its value.
//!
//! The document is read as a generic tree ([`Node`]) rather than through typed serde structs,
//! so that every problem is reported (serde stops at the first), unknown fields can become
//! warnings, and each report points at the line and column of the value ([`crate::policy::reader`]).
//!
//! [`compile`] turns a config into L7 rules: the reference service counts in Redis, so every
//! rule is [`Scope::Global`].

use std::collections::HashMap;

use super::super::error::{ErrorKind, FieldError};
use super::super::model::{At, ConfigDescriptor, ConfigRateLimit, RatelimitConfig};
use super::super::reader::{Node, Reader};
use super::super::source::deserialize;
use super::super::spec::{S, pos_of};
use crate::plan::{Algorithm, Attribute, EntryMatch, EntryValue, L7Rule, Limit, Scope, Unit};

const NS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// Loads one envoyproxy/ratelimit config document (`src`: the document padded so that line
/// numbers are the file's).
pub fn load(src: &str) -> Result<RatelimitConfig, Vec<FieldError>> {
    let root: S<Node> = deserialize(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let config = r.config(&root);
    match config {
        Some(c) if r.errors.is_empty() => Ok(RatelimitConfig { not_enforced: r.warnings, ..c }),
        _ => Err(r.errors),
    }
}

/// One L7 rule per descriptor node that has a `rate_limit`, in config order (the engine's
/// matching precedence depends on it). The rule's descriptor is the path from the top-level
/// descriptor down to the node.
pub fn compile(config: &RatelimitConfig) -> Vec<L7Rule> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    compile_level(config, &config.descriptors, &mut path, &mut out);
    out
}

fn compile_level<'a>(
    config: &RatelimitConfig,
    level: &'a [ConfigDescriptor],
    path: &mut Vec<&'a ConfigDescriptor>,
    out: &mut Vec<L7Rule>,
) {
    for d in level {
        path.push(d);
        let base = || L7Rule {
            domain: config.domain.clone(),
            entries: path.iter().map(|d| entry(d)).collect(),
            algorithm: Algorithm::FixedWindow,
            scope: Scope::Global,
            shadow: d.shadow_mode,
            quota_mode: d.quota_mode,
            ..L7Rule::default()
        };
        if let Some(rl) = &d.rate_limit {
            out.push(L7Rule {
                name: rl.name.clone().unwrap_or_else(|| path_name(&config.domain, path)),
                limit_name: Some(rl.name.clone().unwrap_or_default()),
                limit: rl.limit,
                replaces: rl.replaces.clone(),
                ..base()
            });
        } else if d.descriptors.is_empty() {
            // Neither a limit nor children: the reference matches the node and applies no
            // limit, so the value is exempt even where the bare key has a limit.
            out.push(L7Rule { name: path_name(&config.domain, path), exempt: true, ..base() });
        }
        compile_level(config, &d.descriptors, path, out);
        path.pop();
    }
}

fn entry(d: &ConfigDescriptor) -> EntryMatch {
    let value = match &d.value {
        None => EntryValue::Distinct,
        Some(v) if v.contains('*') && d.share_threshold => EntryValue::SharedWildcard(v.clone()),
        Some(v) if v.contains('*') => EntryValue::Wildcard(v.clone()),
        Some(v) => EntryValue::Exact(v.clone()),
    };
    EntryMatch { key: d.key.clone(), attribute: Attribute::Descriptor, value }
}

/// `domain/key=value/key2`: the rule name when the config gives none.
fn path_name(domain: &str, path: &[&ConfigDescriptor]) -> String {
    let mut name = domain.to_owned();
    for d in path {
        name.push('/');
        name.push_str(&d.key);
        if let Some(v) = &d.value {
            name.push('=');
            name.push_str(v);
        }
    }
    name
}

/// A descriptor's `(key, value)` if both read as text (errors are reported elsewhere).
fn identity(n: &S<Node>) -> Option<(String, Option<String>)> {
    let Node::Map(entries) = &n.value else { return None };
    let text = |name: &str| {
        entries.iter().find(|(k, _)| k == name).and_then(|(_, v)| match &v.value {
            Node::Str(s) => Some(s.clone()),
            Node::Int(i) => Some(i.to_string()),
            Node::Bool(b) => Some(b.to_string()),
            Node::Float(f) => Some(f.to_string()),
            _ => None,
        })
    };
    Some((text("key")?, text("value").filter(|v| !v.is_empty())))
}

impl Reader {
    /// A key the reference service does not know: it refuses the whole config ("unknown
    /// key"), so a misspelt `ratelimit:` cannot silently drop a limit.
    fn unknown_key(&mut self, n: &S<Node>, field: &str) {
        let message = "unknown key (envoyproxy/ratelimit refuses keys it does not know)".to_owned();
        self.schema(pos_of(n), field, message);
    }
}

/// `second | minute | hour | day | week | month | year`, any case (the service's own list).
pub fn parse_config_unit(s: &str) -> Option<Unit> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "second" => Unit::Second,
        "minute" => Unit::Minute,
        "hour" => Unit::Hour,
        "day" => Unit::Day,
        "week" => Unit::Interval { ns: 7 * NS_PER_DAY },
        "month" => Unit::Interval { ns: 30 * NS_PER_DAY },
        "year" => Unit::Interval { ns: 365 * NS_PER_DAY },
        _ => return None,
    })
}

impl Reader {
    fn config(&mut self, root: &S<Node>) -> Option<RatelimitConfig> {
        let entries = self.map(root, "")?;
        let mut domain = None;
        let mut descriptors = Vec::new();
        for (k, v) in entries {
            match k.as_str() {
                "domain" => {
                    domain = self.string(v, "domain").map(|d| (d, pos_of(v)));
                }
                "descriptors" => descriptors = self.descriptors(v, "descriptors"),
                _ => self.unknown_key(v, k),
            }
        }
        let (domain, pos) = domain?;
        if domain.trim().is_empty() {
            self.errors.push(FieldError::new(pos, "domain", ErrorKind::EmptyValue));
        }
        Some(RatelimitConfig {
            domain,
            source: Default::default(),
            at: At::new(pos, "domain"),
            descriptors,
            not_enforced: Vec::new(),
        })
    }

    fn descriptors(&mut self, n: &S<Node>, field: &str) -> Vec<ConfigDescriptor> {
        let Some(items) = self.seq(n, field) else { return Vec::new() };
        let mut out: Vec<ConfigDescriptor> = Vec::new();
        // (key, value) → line of the first sibling with it.
        let mut seen: HashMap<(String, Option<String>), u64> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let f = format!("{field}[{i}]");
            // Checked on the raw key and value, so a sibling with other mistakes still counts.
            if let Some(id) = identity(item) {
                if let Some(first_line) = seen.get(&id) {
                    let (key, value) = id;
                    let kind = ErrorKind::DuplicateDescriptor { key, value, first_line: *first_line };
                    self.errors.push(FieldError::new(pos_of(item), &f, kind));
                } else {
                    seen.insert(id, pos_of(item).line);
                }
            }
            if let Some(d) = self.descriptor(item, &f) {
                out.push(d);
            }
        }
        out
    }

    fn descriptor(&mut self, n: &S<Node>, field: &str) -> Option<ConfigDescriptor> {
        let entries = self.map(n, field)?;
        let mut key = None;
        let mut value = None;
        let mut rate_limit = None;
        let mut shadow_mode = false;
        let mut detailed_metric = false;
        let mut share_threshold = None;
        let mut quota_mode = false;
        let mut descriptors = Vec::new();
        let mut ok = true;
        for (k, v) in entries {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "key" => key = Some(v),
                // `value: ""` is the service's key-only descriptor.
                "value" => value = self.opt_string(v, &f).filter(|s| !s.is_empty()),
                "rate_limit" => {
                    if !v.value.is_null() {
                        rate_limit = self.rate_limit(v, &f);
                        ok &= rate_limit.is_some();
                    }
                }
                "shadow_mode" => shadow_mode = self.opt_bool(v, &f).unwrap_or(false),
                "detailed_metric" => detailed_metric = self.opt_bool(v, &f).unwrap_or(false),
                "share_threshold" => share_threshold = self.opt_bool(v, &f).filter(|&b| b).map(|_| (v, f)),
                "quota_mode" => quota_mode = self.opt_bool(v, &f).unwrap_or(false),
                // Stats only (value in metric names) and free-form data for other tools: read
                // by the reference, nothing to enforce.
                "value_to_metric" => {
                    self.opt_bool(v, &f);
                }
                "metadata" => {}
                "descriptors" => descriptors = self.descriptors(v, &f),
                _ => self.unknown_key(v, &f),
            }
        }
        let key = match key {
            Some(k) if !k.value.is_null() => {
                let s = self.string(k, &format!("{field}.key"))?;
                if s.is_empty() {
                    self.errors.push(FieldError::new(pos_of(k), format!("{field}.key"), ErrorKind::EmptyValue));
                }
                s
            }
            _ => {
                self.missing(n, field, "key");
                return None;
            }
        };
        if let Some((at, f)) = &share_threshold
            && !value.as_deref().is_some_and(|v| v.contains('*'))
        {
            let message = "share_threshold can only be used with a wildcard value (containing '*')".to_owned();
            self.schema(pos_of(at), f, message);
            ok = false;
        }
        ok.then_some(ConfigDescriptor {
            key,
            value,
            rate_limit,
            shadow_mode,
            detailed_metric,
            share_threshold: share_threshold.is_some(),
            quota_mode,
            descriptors,
            at: At::new(pos_of(n), field),
        })
    }

    fn rate_limit(&mut self, n: &S<Node>, field: &str) -> Option<ConfigRateLimit> {
        let entries = self.map(n, field)?;
        let before = self.errors.len();
        let mut unit = None;
        let mut requests = None;
        let mut unlimited = false;
        let mut name = None;
        let mut replaces = Vec::new();
        for (k, v) in entries {
            let f = format!("{field}.{k}");
            match k.as_str() {
                "unit" => {
                    if let Some(s) = self.opt_string(v, &f) {
                        match parse_config_unit(&s) {
                            Some(u) => unit = Some(u),
                            None => {
                                let kind = ErrorKind::UnknownValue {
                                    what: "unit",
                                    value: s,
                                    expected: "second, minute, hour, day, week, month or year",
                                };
                                self.errors.push(FieldError::new(pos_of(v), f, kind));
                            }
                        }
                    }
                }
                "requests_per_unit" => {
                    if !v.value.is_null() {
                        requests = Some((self.int_in(v, &f, 0, u32::MAX.into()), v));
                    }
                }
                "unlimited" => unlimited = self.opt_bool(v, &f).unwrap_or(false),
                "name" => name = self.opt_string(v, &f),
                "replaces" => replaces = self.replaces(v, &f),
                _ => self.unknown_key(v, &f),
            }
        }
        let limit = if unlimited {
            // As the service: a unit beside `unlimited` is refused, a count is ignored.
            if let Some((_, at)) = entries.iter().find(|(k, v)| k == "unit" && !v.value.is_null()) {
                let kind = ErrorKind::Conflict { other: "unlimited: true" };
                self.errors.push(FieldError::new(pos_of(at), format!("{field}.unit"), kind));
            }
            if let Some((_, at)) = requests {
                self.warn(at, &format!("{field}.requests_per_unit"), "ignored: the limit is `unlimited: true`");
            }
            None
        } else {
            let has_unit_field = entries.iter().any(|(k, v)| k == "unit" && !v.value.is_null());
            if !has_unit_field {
                self.missing(n, field, "unit");
            }
            // No `requests_per_unit` is 0 for the reference (a plain uint32): every hit over.
            match (unit, requests) {
                (Some(unit), Some((Some(r), _))) => Some(Limit { requests: r as u64, unit, burst: 0 }),
                (Some(unit), None) => Some(Limit { requests: 0, unit, burst: 0 }),
                _ => None,
            }
        };
        for (i, replaced, at) in &replaces {
            let f = format!("{field}.replaces[{i}].name");
            if replaced.is_empty() {
                self.errors.push(FieldError::new(pos_of(at), f, ErrorKind::EmptyValue));
            } else if name.as_deref() == Some(replaced.as_str()) {
                self.schema(
                    pos_of(at),
                    &f,
                    format!("a limit cannot replace itself (`{replaced}` is this limit's name)"),
                );
            }
        }
        let replaces = replaces.into_iter().map(|(_, r, _)| r).collect();
        (self.errors.len() == before).then_some(ConfigRateLimit { limit, unlimited, name, replaces })
    }

    /// `[{name}]`: each name with its index in the list and where it is written.
    fn replaces<'a>(&mut self, n: &'a S<Node>, field: &str) -> Vec<(usize, String, &'a S<Node>)> {
        if n.value.is_null() {
            return Vec::new();
        }
        let Some(items) = self.seq(n, field) else { return Vec::new() };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Some(entries) = self.map(item, &f) else { continue };
            let mut name = None;
            for (k, v) in entries {
                let kf = format!("{f}.{k}");
                match k.as_str() {
                    "name" => name = self.opt_string(v, &kf).map(|s| (i, s, v)),
                    _ => self.unknown_key(v, &kf),
                }
            }
            match name {
                Some(n) => out.push(n),
                None => self.missing(item, &f, "name"),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_units() {
        assert_eq!(parse_config_unit("SECOND"), Some(Unit::Second));
        assert_eq!(parse_config_unit("minute"), Some(Unit::Minute));
        assert_eq!(parse_config_unit("Hour"), Some(Unit::Hour));
        assert_eq!(parse_config_unit("day"), Some(Unit::Day));
        assert_eq!(parse_config_unit("week"), Some(Unit::Interval { ns: 604_800_000_000_000 }));
        assert_eq!(parse_config_unit("MONTH"), Some(Unit::Interval { ns: 30 * 86_400_000_000_000 }));
        assert_eq!(parse_config_unit("year"), Some(Unit::Interval { ns: 365 * 86_400_000_000_000 }));
        for bad in ["seconds", "", "ms", "fortnight"] {
            assert_eq!(parse_config_unit(bad), None, "{bad}");
        }
    }
}
