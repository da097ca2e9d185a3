//! Validated policies: what the compiler and (later) the rate limit service read.
//!
//! Every piece keeps where it was written ([`At`]) so that notices about it can point at the
//! file, line and field, like errors do.

use std::time::Duration;

use ipnet::IpNet;

use super::error::{Location, Pos, SourceRef};
use crate::plan::{CountKind, Limit, PortTarget};

/// A field path and the position of its value inside the document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct At {
    pub pos: Pos,
    /// `spec.rateLimit.local.rules[2]`
    pub field: String,
}

impl At {
    pub fn new(pos: Pos, field: impl Into<String>) -> Self {
        Self { pos, field: field.into() }
    }
}

/// Every policy loaded from a set of paths, names unique, in load order (paths in the order
/// given, files of a directory sorted by name, documents in file order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: Option<String>,
    /// File and document; set by the loader.
    pub source: SourceRef,
    /// Where `metadata.name` was written.
    pub at: At,
    pub mode: Mode,
    /// Empty: every port on the interface.
    pub targets: Vec<Target>,
    pub allow: Vec<Located<IpNet>>,
    pub deny: Vec<Located<IpNet>>,
    pub penalty: Option<Penalty>,
    /// `local` rules first, then `global` ones, each in document order.
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn location(&self, at: &At) -> Location {
        self.source.at(at.pos)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub at: At,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    /// Count and report, never drop or deny.
    Shadow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: TargetKind,
    pub at: At,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Port(PortTarget),
    /// A Gateway API `HTTPRoute` or `Gateway`, resolved to ports by the listener map.
    Route {
        kind: RouteKind,
        name: String,
        namespace: Option<String>,
        section_name: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    HttpRoute,
    Gateway,
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::Gateway => "Gateway",
        })
    }
}

/// Escalate a source denied `over_limit_events` times `within` the window to the kernel block
/// list for `block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Penalty {
    pub over_limit_events: u32,
    pub within: Duration,
    pub block: Duration,
    pub at: At,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `rateLimit.local`: this node alone.
    Local,
    /// `rateLimit.global`: every node through Redis.
    Global,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub scope: Scope,
    /// All must match.
    pub selectors: Vec<ClientSelector>,
    pub count: Count,
    pub limit: Limit,
    /// `kernelGuard` (default on): derive a kernel connection guard for an L7 rule.
    pub kernel_guard: bool,
    /// The rule's entry (`spec.rateLimit.local.rules[2]`), positioned at its first key.
    pub at: At,
}

impl Rule {
    pub fn has_headers(&self) -> bool {
        self.selectors.iter().any(|s| !s.headers.is_empty())
    }

    pub fn source_selectors(&self) -> impl Iterator<Item = &SourceCidr> {
        self.selectors.iter().filter_map(|s| s.source.as_ref())
    }
}

/// What a rule counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Counted in the kernel.
    Kernel(CountKind),
    /// HTTP requests, counted by the rate limit service.
    Requests,
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Kernel(k) => k.fmt(f),
            Count::Requests => f.write_str("Requests"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientSelector {
    pub source: Option<SourceCidr>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceCidr {
    pub net: IpNet,
    /// `type: Distinct`: one bucket per source address.
    pub distinct: bool,
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    /// `type: Distinct`: one bucket per header value.
    pub distinct: bool,
    /// The exact value for `type: Exact`.
    pub value: Option<String>,
    pub invert: bool,
}
