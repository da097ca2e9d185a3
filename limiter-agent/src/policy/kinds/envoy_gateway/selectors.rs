//! A rule's `clientSelectors`: header matches (`Exact`, `Distinct`, `RegularExpression`,
//! `invert`), `sourceCIDR`, `path` (`Exact`, `PathPrefix`, `RegularExpression`, `invert`),
//! `methods` and `queryParams` (`Exact`, `RegularExpression`, `Distinct`, `invert`).
//! Regular expressions are RE2's (Envoy's `safe_regex`): the whole value must match. An
//! unknown selector field drops the rule with a warning.

use crate::plan::l7::{Condition, FullRegex, MatchTarget, StringMatch};
use crate::policy::error::{ErrorKind, FieldError};
use crate::policy::model::{ClientSelector, HeaderMatch, HttpSelector, SourceCidr};
use crate::policy::reader::{Node, Reader};
use crate::policy::spec::{S, pos_of};
use crate::policy::validate::parse_cidr;

pub(super) enum Selector {
    Ok(ClientSelector),
    /// Valid, but holds a condition this agent cannot match (warned about).
    Unenforceable,
    /// Errors were reported.
    Invalid,
}

pub(super) fn selector(r: &mut Reader, n: &S<Node>, field: &str) -> Selector {
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
                        Some(Header::Plain(h)) => out.headers.push(h),
                        Some(Header::Regex(c)) => out.http.push(HttpSelector::Condition(c)),
                        None => {}
                    }
                }
            }
            "sourceCIDR" => out.source = source_cidr(r, v, &f),
            "path" => out.http.extend(path(r, v, &f)),
            "methods" => out.http.extend(methods(r, v, &f)),
            "queryParams" => {
                let Some(items) = r.seq(v, &f) else { continue };
                for (i, item) in items.iter().enumerate() {
                    out.http.extend(query_param(r, item, &format!("{f}[{i}]")));
                }
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

/// A header selector: exact or distinct, or a regular expression condition.
enum Header {
    Plain(HeaderMatch),
    Regex(Condition),
}

/// A `RegularExpression` value, compiled; errors name the field.
fn regex(r: &mut Reader, value: Option<(&str, &S<Node>)>, n: &S<Node>, field: &str) -> Option<FullRegex> {
    let Some((v, at)) = value else {
        r.missing(n, field, "value");
        return None;
    };
    match FullRegex::new(v) {
        Ok(re) => Some(re),
        Err(reason) => {
            let err = ErrorKind::InvalidRegex { value: v.to_owned(), reason };
            r.errors.push(FieldError::new(pos_of(at), format!("{field}.value"), err));
            None
        }
    }
}

/// `path: {type: Exact | PathPrefix | RegularExpression (default PathPrefix), value, invert}`,
/// matched against `:path` as Envoy sees it.
fn path(r: &mut Reader, n: &S<Node>, field: &str) -> Option<HttpSelector> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let (mut kind, mut value, mut invert) = (None, None, false);
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "type" => kind = r.opt_string(v, &f).map(|s| (s, v)),
            "value" => value = r.string(v, &f).map(|s| (s, v)),
            "invert" => invert = r.opt_bool(v, &f).unwrap_or(false),
            _ => r.unknown_field(v, &f),
        }
    }
    let text = value.as_ref().map(|(s, v)| (s.as_str(), *v));
    let matcher = match kind.as_ref().map(|(t, v)| (t.to_ascii_lowercase(), *v)) {
        Some((t, _)) if t == "regularexpression" => StringMatch::Regex(regex(r, text, n, field)?),
        None | Some(_) if text.is_none() => {
            r.missing(n, field, "value");
            return None;
        }
        Some((t, _)) if t == "exact" => StringMatch::Exact(value?.0),
        None => StringMatch::Prefix(value?.0),
        Some((t, _)) if t == "pathprefix" => StringMatch::Prefix(value?.0),
        Some((_, at)) => {
            let (t, _) = kind.clone()?;
            let err =
                ErrorKind::UnknownValue { what: "type", value: t, expected: "Exact, PathPrefix or RegularExpression" };
            r.errors.push(FieldError::new(pos_of(at), format!("{field}.type"), err));
            return None;
        }
    };
    (r.errors.len() == before).then_some(HttpSelector::Condition(Condition {
        target: MatchTarget::Path,
        matcher,
        invert,
    }))
}

/// `methods: [{value: POST, type: Exact, invert}]`: any of the listed methods (one condition on
/// `:method`). Every entry must have the same `invert` (all "one of", or all "none of").
fn methods(r: &mut Reader, n: &S<Node>, field: &str) -> Option<HttpSelector> {
    let items = r.seq(n, field)?;
    let before = r.errors.len();
    let mut names = Vec::new();
    let mut inverts = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let Some(entries) = r.map(item, &f) else { continue };
        let mut value = None;
        for (k, v) in entries {
            let kf = format!("{f}.{k}");
            match k.as_str() {
                "value" => value = r.string(v, &kf),
                "invert" => inverts.push((r.opt_bool(v, &kf).unwrap_or(false), v, kf)),
                "type" => match r.opt_string(v, &kf) {
                    Some(t) if !t.eq_ignore_ascii_case("exact") => {
                        let err = ErrorKind::UnknownValue { what: "type", value: t, expected: "Exact" };
                        r.errors.push(FieldError::new(pos_of(v), kf, err));
                    }
                    _ => {}
                },
                _ => r.unknown_field(v, &kf),
            }
        }
        match value {
            Some(m) if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                let message = format!("not an HTTP method: {m:?}");
                r.schema(pos_of(item), &format!("{f}.value"), message);
            }
            Some(m) => names.push(m.to_ascii_uppercase()),
            None => r.missing(item, &f, "value"),
        }
    }
    if names.is_empty() && r.errors.len() == before {
        r.errors.push(FieldError::new(pos_of(n), field, ErrorKind::EmptyValue));
    }
    let invert = inverts.first().is_some_and(|(b, _, _)| *b);
    let every = inverts.iter().all(|(b, _, _)| *b == invert) && (!invert || inverts.len() == names.len());
    if !every {
        let at = inverts.first().map_or(n, |(_, v, _)| v);
        let message = "mixes inverted and plain methods: give all of them `invert: true`, or none".to_owned();
        r.schema(pos_of(at), field, message);
    }
    if r.errors.len() > before {
        return None;
    }
    let matcher = match names.as_slice() {
        [one] => StringMatch::Exact(one.clone()),
        _ => StringMatch::Regex(FullRegex::new(&names.join("|")).ok()?),
    };
    Some(HttpSelector::Condition(Condition { target: MatchTarget::Method, matcher, invert }))
}

/// `queryParams[]: {name, type: Exact | RegularExpression | Distinct (default Exact), value,
/// invert}`.
fn query_param(r: &mut Reader, n: &S<Node>, field: &str) -> Option<HttpSelector> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let (mut name, mut kind, mut value, mut invert) = (None, None, None, false);
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => name = r.string(v, &f),
            "type" => kind = r.opt_string(v, &f).map(|s| (s, v)),
            "value" => value = r.opt_string(v, &f).map(|s| (s, v)),
            "invert" => invert = r.opt_bool(v, &f).unwrap_or(false),
            _ => r.unknown_field(v, &f),
        }
    }
    let Some(name) = name.filter(|s| !s.is_empty()) else {
        r.missing(n, field, "name");
        return None;
    };
    let text = value.as_ref().map(|(s, v)| (s.as_str(), *v));
    let target = MatchTarget::Query(name.clone());
    let lower = kind.as_ref().map(|(t, _)| t.to_ascii_lowercase());
    let selector = match lower.as_deref() {
        Some("distinct") if invert => {
            HttpSelector::Condition(Condition { target, matcher: StringMatch::Present, invert: true })
        }
        Some("distinct") => HttpSelector::QueryDistinct(name),
        Some("regularexpression") => HttpSelector::Condition(Condition {
            target,
            matcher: StringMatch::Regex(regex(r, text, n, field)?),
            invert,
        }),
        None | Some("exact") => match value {
            Some((v, _)) => HttpSelector::Condition(Condition { target, matcher: StringMatch::Exact(v), invert }),
            None => {
                r.missing(n, field, "value");
                return None;
            }
        },
        Some(_) => {
            let (t, at) = kind?;
            let err =
                ErrorKind::UnknownValue { what: "type", value: t, expected: "Exact, RegularExpression or Distinct" };
            r.errors.push(FieldError::new(pos_of(at), format!("{field}.type"), err));
            return None;
        }
    };
    (r.errors.len() == before).then_some(selector)
}

/// `None`: errors.
fn header_match(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Header> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let (mut name, mut kind, mut value, mut invert) = (None, None, None, false);
    let mut value_at: Option<&S<Node>> = None;
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
        Some((t, _)) if t.eq_ignore_ascii_case("regularexpression") => {
            let text = value.as_deref().zip(value_at);
            let re = regex(r, text, n, field);
            let (name, _) = name?;
            let target = MatchTarget::Header(name.to_ascii_lowercase());
            return (r.errors.len() == before).then_some(Header::Regex(Condition {
                target,
                matcher: StringMatch::Regex(re?),
                invert,
            }));
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
    Some(Header::Plain(HeaderMatch { name, distinct, value, invert }))
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
