//! Policy errors: every one names the file, the document, the line and column, and the field.
//!
//! Rendered as `FILE:LINE:COL: FIELD.PATH: message`, e.g.
//! `policies/a.yaml:12:15: spec.rateLimit.local.rules[2].limit.unit: unknown unit "Minuets"`.
//! When the file holds several YAML documents, ` (document N)` (1-based, counting every
//! `---`-separated document) follows the column, so the `FILE:LINE:COL` prefix stays
//! clickable in editors and terminals:
//! `policies/a.yaml:12:15 (document 2): spec.mode: unknown mode "Enforced" ...`.
//! Errors that belong to no field (YAML syntax, unreadable files) leave out `FIELD.PATH: `.
//! Lines and columns are 1-based; a column counts characters, not bytes.

use std::fmt;
use std::path::PathBuf;

/// Where something was written: a position inside one YAML document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// 1-based line in the file (not in the document); 0 when unknown.
    pub line: u64,
    /// 1-based column in characters; 0 when unknown.
    pub column: u64,
}

impl Pos {
    pub const fn new(line: u64, column: u64) -> Self {
        Self { line, column }
    }
}

/// Which file and which document of it a policy came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRef {
    pub file: PathBuf,
    /// 1-based document index, set only when the file holds several documents.
    pub document: Option<usize>,
}

impl SourceRef {
    pub fn at(&self, pos: Pos) -> Location {
        Location { file: self.file.clone(), document: self.document, pos }
    }
}

/// A file, document and position: the `FILE:LINE:COL[ (document N)]` part of a message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: PathBuf,
    pub document: Option<usize>,
    pub pos: Pos,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.pos.line, self.pos.column)?;
        if let Some(n) = self.document {
            write!(f, " (document {n})")?;
        }
        Ok(())
    }
}

/// One problem in a policy set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {}{kind}", FieldPrefix(field))]
pub struct PolicyError {
    pub location: Location,
    /// Dotted field path inside the document (`spec.rateLimit.local.rules[2].limit.unit`);
    /// empty when the error belongs to no field.
    pub field: String,
    pub kind: ErrorKind,
}

struct FieldPrefix<'a>(&'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { Ok(()) } else { write!(f, "{}: ", self.0) }
    }
}

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("cannot read: {message}")]
    Io { message: String },
    #[error("YAML syntax error: {message}")]
    Syntax { message: String },
    /// Wrong type, unknown field, missing field: what serde found.
    #[error("{message}")]
    Schema { message: String },
    #[error(
        "kind {kind} is not supported (supported: RateLimitPolicy, ListenerMap, BackendTrafficPolicy, RateLimitFilter, TrafficPolicy, AgentgatewayPolicy, GatewayExtension, and envoyproxy/ratelimit configs)"
    )]
    UnsupportedKind { kind: String },
    /// A native kind (`RateLimitPolicy`, `ListenerMap`) with another apiVersion.
    #[error("unsupported apiVersion \"{api_version}\" for kind {kind} (expected limiter.dev/v1alpha1)")]
    UnsupportedApiVersion { api_version: String, kind: &'static str },
    #[error("unknown unit \"{value}\" (expected Second, Minute, Hour or Day)")]
    UnknownUnit { value: String },
    /// A closed set of words (`mode`, `count`, `type`, `protocol`, ...) got another one.
    #[error("unknown {what} \"{value}\" (expected {expected})")]
    UnknownValue { what: &'static str, value: String, expected: &'static str },
    #[error("must be at least {min}, got {value}")]
    TooSmall { value: i64, min: i64 },
    #[error("must be at most {max}, got {value}")]
    TooLarge { value: i64, max: i64 },
    #[error("invalid CIDR \"{value}\": {reason}")]
    InvalidCidr { value: String, reason: String },
    /// A `RegularExpression` value RE2 (Envoy's `safe_regex`) would refuse.
    #[error("invalid regular expression \"{value}\": {reason}")]
    InvalidRegex { value: String, reason: String },
    #[error("invalid duration \"{value}\" (expected e.g. 500ms, 10s, 1m, 1h30m)")]
    InvalidDuration { value: String },
    #[error("invalid name \"{name}\": {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("duplicate rule name \"{name}\" (first used on line {first_line})")]
    DuplicateRule { name: String, first_line: u64 },
    #[error("duplicate policy name \"{name}\" (first defined at {first})")]
    DuplicatePolicy { name: String, first: String },
    /// Two envoyproxy/ratelimit configs for one domain (the service refuses that too).
    #[error("duplicate ratelimit config domain \"{domain}\" (first defined at {first})")]
    DuplicateDomain { domain: String, first: String },
    #[error("empty client selector: give sourceCIDR and/or headers")]
    EmptySelector,
    #[error("empty headers list: give at least one header match")]
    EmptyHeaders,
    #[error("header match with type Exact needs a value")]
    HeaderValueMissing,
    #[error("rules that select on headers count Requests, not {count}")]
    HeaderCount { count: String },
    #[error("a {kind} target needs {needs}")]
    TargetRefIncomplete { kind: String, needs: &'static str },
    #[error("field {field} does not apply to a {kind} target")]
    TargetRefExtra { kind: String, field: &'static str },
    #[error("must not be empty")]
    EmptyValue,
    /// envoyproxy/ratelimit: two sibling descriptors with the same key and value.
    #[error("duplicate descriptor key \"{key}\"{} (first on line {first_line})", .value.as_ref().map(|v| format!(" value \"{v}\"")).unwrap_or_default())]
    DuplicateDescriptor { key: String, value: Option<String>, first_line: u64 },
    /// Two `ListenerMap`s of a set with one `metadata.name`.
    #[error("duplicate ListenerMap name \"{name}\" (first defined at {first})")]
    DuplicateListenerMap { name: String, first: String },
    /// A gateway or route listed twice across the set's `ListenerMap`s (`what` says which).
    #[error("{what} {name} is listed twice in the policy set's ListenerMaps (first at {first})")]
    DuplicateMapped { what: &'static str, name: String, first: String },
    /// A `ListenerMap` route attached to a gateway that no `ListenerMap` of the set lists.
    #[error("route {route} attaches to gateway {gateway}, which no ListenerMap of the policy set lists")]
    UnknownGateway { route: String, gateway: String },
    /// Two fields that exclude each other were both given.
    #[error("cannot be combined with {other}")]
    Conflict { other: &'static str },
}

/// Every problem found in a policy set; its `Display` prints one error per line.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// An error inside one document, before the loader knows the file: validation produces these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub pos: Pos,
    pub field: String,
    pub kind: ErrorKind,
}

impl FieldError {
    pub fn new(pos: Pos, field: impl Into<String>, kind: ErrorKind) -> Self {
        Self { pos, field: field.into(), kind }
    }

    pub fn located(self, source: &SourceRef) -> PolicyError {
        PolicyError { location: source.at(self.pos), field: self.field, kind: self.kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_formats() {
        let e = PolicyError {
            location: Location { file: "policies/a.yaml".into(), document: None, pos: Pos::new(12, 15) },
            field: "spec.rateLimit.local.rules[2].limit.unit".into(),
            kind: ErrorKind::UnknownUnit { value: "Minuets".into() },
        };
        assert_eq!(
            e.to_string(),
            "policies/a.yaml:12:15: spec.rateLimit.local.rules[2].limit.unit: unknown unit \"Minuets\" (expected Second, Minute, Hour or Day)"
        );
        let e2 = PolicyError {
            location: Location { file: "b.yaml".into(), document: Some(2), pos: Pos::new(3, 1) },
            field: String::new(),
            kind: ErrorKind::Syntax { message: "bad".into() },
        };
        assert_eq!(e2.to_string(), "b.yaml:3:1 (document 2): YAML syntax error: bad");
        let all = PolicyErrors(vec![e, e2]);
        assert_eq!(all.to_string().lines().count(), 2);
    }
}
