//! Validated policies: what the compiler and (later) the rate limit service read.
//!
//! Every piece keeps where it was written ([`At`]) so that notices about it can point at the
//! file, line and field, like errors do.

use std::time::Duration;

use ipnet::IpNet;

use super::error::{Location, Pos, SourceRef};
pub use super::listeners::ListenerMap;
use crate::plan::{CountKind, Limit, PortTarget, SynproxyMode};

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
    /// envoyproxy/ratelimit service configs (`domain` + `descriptors`), in load order.
    pub ratelimit_configs: Vec<RatelimitConfig>,
    /// Where the node's gateways listen, for `Gateway` / `HTTPRoute` targets, in load order.
    pub listener_maps: Vec<ListenerMap>,
}

impl PolicySet {
    /// No document of any kind.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.ratelimit_configs.is_empty() && self.listener_maps.is_empty()
    }

    /// Appends `other`'s documents after this set's (each kind keeps its load order).
    pub fn extend(&mut self, other: PolicySet) {
        self.policies.extend(other.policies);
        self.ratelimit_configs.extend(other.ratelimit_configs);
        self.listener_maps.extend(other.listener_maps);
    }
}

/// Which gateway's resource a policy was written as. Every kind is normalised into the same
/// [`Policy`]; the kind is kept for messages, `explain` and kind-specific semantics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// `limiter.dev/v1alpha1` (this project).
    #[default]
    RateLimitPolicy,
    /// Envoy Gateway `gateway.envoyproxy.io/v1alpha1`.
    BackendTrafficPolicy,
    /// Tetrate Enterprise Gateway (Envoy Gateway 0.x) `gateway.envoyproxy.io/v1alpha1`.
    RateLimitFilter,
    /// kgateway `gateway.kgateway.dev/v1alpha1`.
    TrafficPolicy,
    /// agentgateway `agentgateway.dev/v1alpha1`.
    AgentgatewayPolicy,
    /// kgateway `GatewayExtension` (`gateway.kgateway.dev/v1alpha1`): how the gateway calls the
    /// rate limit service; no rules.
    GatewayExtension,
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyKind::RateLimitPolicy => "RateLimitPolicy",
            PolicyKind::BackendTrafficPolicy => "BackendTrafficPolicy",
            PolicyKind::RateLimitFilter => "RateLimitFilter",
            PolicyKind::TrafficPolicy => "TrafficPolicy",
            PolicyKind::AgentgatewayPolicy => "AgentgatewayPolicy",
            PolicyKind::GatewayExtension => "GatewayExtension",
        })
    }
}

/// Descriptors a gateway sends to the rate limit service for a policy's routes, whose limits
/// live in an envoyproxy/ratelimit config of the same domain (kgateway
/// `rateLimit.global.descriptors[]`). One per descriptor, entries in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorActions {
    /// RLS domain (kgateway: the referenced GatewayExtension's; `None`: not known here).
    pub domain: Option<String>,
    pub entries: Vec<ActionEntry>,
    pub at: At,
}

/// Where one descriptor entry comes from, as Envoy's `rate_limits` actions produce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionEntry {
    /// `remote_address`: key `remote_address`, the client address.
    RemoteAddress,
    /// `request_headers` on `:path`: key `path`.
    Path,
    /// `request_headers` on a header, sent under `descriptor_key`.
    Header { name: String, descriptor_key: String },
    /// `generic_key`: a constant `key` (default `generic_key`) and `value`.
    Generic { key: String, value: String },
}

/// An envoyproxy/ratelimit service config file (`domain`, nested `descriptors`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RatelimitConfig {
    pub domain: String,
    /// File and document; set by the loader.
    pub source: SourceRef,
    /// Where `domain` was written.
    pub at: At,
    pub descriptors: Vec<ConfigDescriptor>,
    /// Unknown fields and the like: warnings naming the field.
    pub not_enforced: Vec<Located<String>>,
}

/// One `descriptors[]` node of an envoyproxy/ratelimit config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigDescriptor {
    pub key: String,
    /// `None`: key-only (matches any value, a counter per value). May hold `*` wildcards.
    pub value: Option<String>,
    pub rate_limit: Option<ConfigRateLimit>,
    /// `shadow_mode: true`: count, always answer OK.
    pub shadow_mode: bool,
    /// `detailed_metric: true` (accepted; metrics carry the full descriptor).
    pub detailed_metric: bool,
    /// `share_threshold: true` on a wildcard value: one counter for every matching value.
    pub share_threshold: bool,
    /// `quota_mode: true`: see [`crate::plan::l7::L7Rule::quota_mode`].
    pub quota_mode: bool,
    pub descriptors: Vec<ConfigDescriptor>,
    /// The node's entry (`descriptors[0].descriptors[1]`).
    pub at: At,
}

/// `rate_limit:` of a config descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigRateLimit {
    /// `unit` + `requests_per_unit` (burst 0; an omitted `requests_per_unit` is 0, every hit
    /// over, as the reference reads it); `None` with `unlimited: true`.
    pub limit: Option<Limit>,
    pub unlimited: bool,
    /// `name`: reported in `x-ratelimit-limit` and used by `replaces`.
    pub name: Option<String>,
    /// `replaces: [{name}]`.
    pub replaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub kind: PolicyKind,
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
    /// kgateway `rateLimit.global.descriptors`: what the gateway sends to the RLS.
    pub descriptor_actions: Vec<DescriptorActions>,
    /// Fields accepted but enforced by no layer (circuit breakers, retries, timeouts, unknown
    /// fields of foreign kinds): each becomes a warning naming the field.
    pub not_enforced: Vec<Located<String>>,
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
    /// `synProxy` of the target, when on.
    pub syn_proxy: Option<SynproxyMode>,
    pub at: At,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Port(PortTarget),
    /// A Gateway API `HTTPRoute` or `Gateway`, resolved to ports by the set's `ListenerMap`s.
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
    /// Envoy Gateway's `cost`: what a request adds to the counter, sent by the gateway as
    /// `hits_addend` (the service counts what it is sent).
    pub cost: RuleCost,
    /// The rule's entry (`spec.rateLimit.local.rules[2]`), positioned at its first key.
    pub at: At,
}

impl Rule {
    /// Selects on request attributes (headers, path, method, query), not only on the client
    /// address: such a rule is L7-only and derives no kernel guard.
    pub fn has_headers(&self) -> bool {
        self.selectors.iter().any(|s| !s.headers.is_empty() || !s.http.is_empty())
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

/// Envoy Gateway's `cost.request` / `cost.response` of a global rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleCost {
    /// Charged when the request arrives (`None`: 1).
    pub request: Option<crate::plan::l7::HitsAddend>,
    /// Charged when the response is done (Envoy's `apply_on_stream_done`), e.g. tokens used.
    pub response: Option<crate::plan::l7::HitsAddend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientSelector {
    pub source: Option<SourceCidr>,
    pub headers: Vec<HeaderMatch>,
    /// Envoy Gateway's `path`, `methods`, `queryParams` and `RegularExpression` headers, in
    /// the order written.
    pub http: Vec<HttpSelector>,
}

/// A selector on the HTTP request beyond exact and distinct headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpSelector {
    /// The request must satisfy the condition (or, inverted, must not).
    Condition(crate::plan::l7::Condition),
    /// `queryParams` `type: Distinct`: a bucket per value of the parameter; requests without
    /// it are not selected.
    QueryDistinct(String),
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
