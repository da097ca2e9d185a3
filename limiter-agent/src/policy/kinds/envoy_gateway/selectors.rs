//! A rule's `clientSelectors`: header matches (`Exact`, `Distinct`, `RegularExpression`,
//! `invert`) and `sourceCIDR`, and which of them this agent cannot match (the rule is then
//! dropped with a warning).

use crate::policy::error::{ErrorKind, FieldError};
use crate::policy::model::{ClientSelector, HeaderMatch, SourceCidr};
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
