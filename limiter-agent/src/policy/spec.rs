//! Input types of the native `RateLimitPolicy` kind (`limiter.dev/v1alpha1`), as written.
//!
//! These mirror the YAML one to one (`camelCase`, unknown fields rejected). Closed sets of
//! words (units, `mode`, `count`, selector `type`, `protocol`, `kernelGuard`) and CIDRs are
//! kept as positioned strings here and parsed in [`super::validate`], so that every bad value
//! in a document is reported (serde stops at the first error) and each report points at the
//! line and column of the value. See `/work/shared/POLICY.md`, "The native kind".

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::error::Pos;

/// A value and where it was written.
pub type S<T> = Spanned<T>;

pub fn pos_of<T>(s: &S<T>) -> Pos {
    Pos::new(s.referenced.line(), s.referenced.column())
}

pub const API_VERSION: &str = "limiter.dev/v1alpha1";
pub const KIND: &str = "RateLimitPolicy";

/// The first pass over a document: only `apiVersion` and `kind`, everything else ignored, so a
/// foreign kind gets "not supported" rather than a wall of unknown-field errors.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    pub api_version: Option<S<String>>,
    pub kind: Option<S<String>>,
    /// Only envoyproxy/ratelimit configs have a top-level `domain` (and no `kind`).
    pub domain: Option<serde::de::IgnoredAny>,
}

/// A whole `RateLimitPolicy` document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicyDoc {
    pub api_version: S<String>,
    pub kind: S<String>,
    pub metadata: MetadataSpec,
    pub spec: RateLimitPolicySpec,
}

/// The Kubernetes-style metadata the agent reads. `labels` and `annotations` are accepted so
/// the same file can be applied to a cluster; the agent does not use them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataSpec {
    /// Unique in a policy set; the prefix of every kernel rule name (`name/rule`).
    pub name: S<String>,
    #[serde(default)]
    pub namespace: Option<S<String>>,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    /// What is protected; empty means every port on the interface.
    #[serde(default)]
    pub target_refs: Vec<S<TargetRefSpec>>,
    /// `Enforce` (default) or `Shadow`, any case.
    #[serde(default)]
    pub mode: Option<S<String>>,
    /// CIDRs (or bare addresses) never limited.
    #[serde(default)]
    pub allow: Vec<S<String>>,
    /// CIDRs (or bare addresses) always dropped.
    #[serde(default)]
    pub deny: Vec<S<String>>,
    #[serde(default)]
    pub penalty: Option<S<PenaltySpec>>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
}

/// `{kind: Port, port, protocol}` or `{kind: HTTPRoute|Gateway, name, namespace?, sectionName?}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRefSpec {
    pub kind: S<String>,
    #[serde(default)]
    pub port: Option<S<i64>>,
    /// `TCP` (default) or `UDP`, any case; `Port` targets only.
    #[serde(default)]
    pub protocol: Option<S<String>>,
    #[serde(default)]
    pub name: Option<S<String>>,
    #[serde(default)]
    pub namespace: Option<S<String>>,
    /// Accepted for Gateway API compatibility (`gateway.networking.k8s.io`); not checked.
    #[serde(default)]
    pub group: Option<S<String>>,
    #[serde(default)]
    pub section_name: Option<S<String>>,
    /// Answer this target's SYNs with SYN cookies in XDP (README, "SYN proxy"): TCP `Port`,
    /// `Gateway` and `HTTPRoute` targets (the ports a `ListenerMap` resolves them to).
    #[serde(default)]
    pub syn_proxy: Option<S<SynProxySpec>>,
}

/// `{mode: Always}` or `{mode: Threshold, threshold: {requests, unit, burst}}` (or
/// `{mode: Off}`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SynProxySpec {
    pub mode: S<String>,
    /// The connection rate above which SYNs get cookies (mode `Threshold`).
    #[serde(default)]
    pub threshold: Option<S<LimitSpec>>,
}

/// `{overLimitEvents, within, block}`: escalate a source to the kernel block list.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PenaltySpec {
    pub over_limit_events: S<i64>,
    /// A duration such as `10s`, `1m`, `1h30m`, `500ms`.
    pub within: S<String>,
    pub block: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Enforced on this node alone.
    #[serde(default)]
    pub local: Option<RulesSpec>,
    /// Shared by every node through Redis (per node only until that lands).
    #[serde(default)]
    pub global: Option<RulesSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RulesSpec {
    #[serde(default)]
    pub rules: Vec<S<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique within the policy (across `local` and `global`); appears in metrics and logs.
    pub name: S<String>,
    /// All entries must match (AND), as in Envoy Gateway. Empty: every client.
    #[serde(default)]
    pub client_selectors: Vec<S<ClientSelectorSpec>>,
    /// `Packets | Bytes | Connections` (kernel) or `Requests` (L7), any case. Default:
    /// `Requests` when a selector matches headers (only L7 can see them), else `Packets`.
    #[serde(default)]
    pub count: Option<S<String>>,
    pub limit: S<LimitSpec>,
    /// `On` (default) or `Off`; booleans `true`/`false` are accepted too.
    #[serde(default)]
    pub kernel_guard: Option<S<String>>,
}

/// One entry of `clientSelectors`: `sourceCIDR` and/or `headers`, all of which must match.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientSelectorSpec {
    #[serde(default, rename = "sourceCIDR")]
    pub source_cidr: Option<SourceCidrSpec>,
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatchSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceCidrSpec {
    /// `Exact` (default): one bucket shared by the CIDR; `Distinct`: one per source address.
    #[serde(default, rename = "type")]
    pub type_: Option<S<String>>,
    /// A CIDR, or a bare address (taken as /32 or /128).
    pub value: S<String>,
    /// Select sources outside `value`.
    #[serde(default)]
    pub invert: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatchSpec {
    pub name: S<String>,
    /// `Exact` (default; needs `value`) or `Distinct` (one bucket per value).
    #[serde(default, rename = "type")]
    pub type_: Option<S<String>>,
    #[serde(default)]
    pub value: Option<S<String>>,
    #[serde(default)]
    pub invert: Option<S<bool>>,
}

/// A token bucket of `requests` per `unit`, depth `requests + burst`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitSpec {
    pub requests: S<i64>,
    /// `Second | Minute | Hour | Day`, any case, plural accepted.
    pub unit: S<String>,
    #[serde(default)]
    pub burst: Option<S<i64>>,
}
