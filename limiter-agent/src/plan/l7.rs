//! The L7 half of the compiled plan: rules the agent answers through the Envoy rate limit
//! service protocol (`ShouldRateLimit`), or for a request's attributes directly.
//!
//! Everything is expressed as Envoy *descriptors*: an ordered list of `(key, value)` entries
//! per request, the unit Envoy's `rate_limits` actions produce and the rate limit service
//! matches. Rules compiled from gateway kinds also say where each entry comes from in an HTTP
//! request ([`Attribute`]), so the engine can build the descriptor from a request's
//! attributes and `limiter-agent explain` can print the `rate_limits` actions a gateway must
//! configure to send it.

use std::fmt;

use ipnet::IpNet;

use super::Limit;

/// The RLS domain of rules compiled from the gateway policy kinds (envoyproxy/ratelimit
/// configs bring their own `domain`).
pub const DEFAULT_DOMAIN: &str = "limiter";

/// Descriptor keys the agent uses for gateway-kind rules. They match what Envoy's actions
/// emit by default, so one `rate_limits` block serves every rule.
pub mod keys {
    /// `generic_key` action: selects the rule; value `policy/rule`.
    pub const GENERIC_KEY: &str = "generic_key";
    /// `remote_address` action: the client address.
    pub const REMOTE_ADDRESS: &str = "remote_address";
    /// `header_value_match` action: present when a request matched (or, with
    /// `expect_match: false`, did not match) a header condition.
    pub const HEADER_MATCH: &str = "header_match";
    /// `request_headers` on `:path`.
    pub const PATH: &str = "path";
    /// `request_headers` on `:method`.
    pub const METHOD: &str = "method";
    /// `query_parameter_value_match`: present when a query parameter condition holds.
    pub const QUERY_MATCH: &str = "query_match";
}

/// Every L7 rule of a policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L7Plan {
    /// In policy order; within an envoyproxy/ratelimit config, in config order (matching
    /// precedence depends on it).
    pub rules: Vec<L7Rule>,
}

/// One L7 rate-limit rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L7Rule {
    /// `policy/rule` for gateway kinds; for envoyproxy/ratelimit configs `domain/key=value/...`
    /// along the descriptor path (or the descriptor's `name` if the config gives one).
    /// Unique in a plan; appears in metrics and logs.
    pub name: String,
    /// The `current_limit.name` answered over RLS (Envoy's `x-ratelimit-limit` `name=`);
    /// `None`: [`L7Rule::name`]. envoyproxy/ratelimit configs report the `rate_limit`'s own
    /// `name`, or `""` when it has none, as the reference service does.
    pub limit_name: Option<String>,
    /// RLS domain the rule answers in.
    pub domain: String,
    /// The descriptor this rule matches, entry by entry; a request descriptor matches only
    /// with the same number of entries (envoyproxy/ratelimit's depth rule).
    pub entries: Vec<EntryMatch>,
    /// `None`: `unlimited` (matches, and stops less specific rules from applying), or, with
    /// [`L7Rule::exempt`], no limit at all.
    pub limit: Option<Limit>,
    /// envoyproxy/ratelimit: a descriptor node with neither `rate_limit` nor children. It
    /// matches (so the bare key's limit does not apply) and answers OK with no limit, as the
    /// reference does for `key2: value3`-style whitelist entries.
    pub exempt: bool,
    /// envoyproxy/ratelimit `quota_mode`: over the limit, the status says OVER_LIMIT but the
    /// overall code only does when every quota-mode descriptor of the call is over.
    pub quota_mode: bool,
    pub algorithm: Algorithm,
    pub scope: Scope,
    /// Count and report, always answer OK (`mode: Shadow`, `shadow_mode: true`).
    pub shadow: bool,
    /// envoyproxy/ratelimit `replaces`: names of rules this one overrides when both match.
    pub replaces: Vec<String>,
    /// Envoy Gateway's `cost`: the `hits_addend` the gateway's `rate_limits` entries send for
    /// this rule (explained; the service counts whatever `hits_addend` arrives).
    pub cost_request: Option<HitsAddend>,
    /// `cost.response`: a second `rate_limits` entry with `apply_on_stream_done: true`.
    pub cost_response: Option<HitsAddend>,
    /// Which routes the rule applies to. Empty: every request that reaches the engine.
    /// Route-level targets win over gateway-level ones (see [`L7Target`]).
    pub targets: Vec<L7Target>,
}

/// What a policy was attached to, for gateway precedence: a request on route R is judged by
/// the rules targeting R if there are any, otherwise by the rules targeting its gateway (and
/// always by rules with no targets).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L7Target {
    Gateway(String),
    Route(String),
}

/// One entry of a rule's descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMatch {
    /// Descriptor key (see [`keys`] for gateway kinds; anything for envoyproxy/ratelimit).
    pub key: String,
    /// Where a request's value for this entry comes from.
    pub attribute: Attribute,
    pub value: EntryValue,
}

/// The source of a descriptor entry in an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// A constant the gateway sends (`generic_key` / `header_value_match` descriptor_value):
    /// the entry's value is the [`EntryValue::Exact`] string itself.
    Fixed,
    /// The client address (`remote_address` action).
    RemoteAddress,
    /// A request header (`request_headers` action), lower-case name.
    Header(String),
    /// `header_value_match` with `expect_match: false`: the entry is present when the request
    /// does NOT carry the header (`invert: true`); its value is the `Exact` string.
    HeaderAbsent(String),
    /// `header_value_match`: present when the header has exactly this value.
    HeaderEquals {
        name: String,
        value: String,
    },
    /// `header_value_match` with `expect_match: false` on an exact value: present when the
    /// header is absent or has another value (`type: Exact`, `invert: true`); its value is
    /// the `Exact` string.
    HeaderNotEquals {
        name: String,
        value: String,
    },
    Path,
    Method,
    /// `header_value_match` (on a header, `:path` or `:method`) or
    /// `query_parameter_value_match`: present, with the `Exact` string as its value, when the
    /// condition holds (with `invert`, when it does not). Envoy Gateway's `path`, `methods`,
    /// `queryParams` and `RegularExpression` header selectors.
    Matches(Condition),
    /// `query_parameters` action: the value of a query parameter (absent: no descriptor).
    Query(String),
    /// Only in descriptor lists sent over RLS (envoyproxy/ratelimit configs): no HTTP source.
    Descriptor,
}

/// What one request adds to a counter (Envoy's `RateLimit.hits_addend`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HitsAddend {
    /// `number`: a constant.
    Number(u64),
    /// `format` `%DYNAMIC_METADATA(namespace:key)%`: a number another filter wrote (e.g. the
    /// tokens an LLM response used).
    Metadata { namespace: String, key: String },
}

/// A condition on one part of an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub target: MatchTarget,
    pub matcher: StringMatch,
    /// Present when the condition does NOT hold (`expect_match: false`).
    pub invert: bool,
}

/// What a [`Condition`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchTarget {
    /// A request header, lower-case name (its first value).
    Header(String),
    /// `:path`, as Envoy sees it (the query string included).
    Path,
    /// `:method`.
    Method,
    /// A query parameter (its first value).
    Query(String),
}

/// Envoy's `StringMatcher`, as far as the gateways use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// `safe_regex`: RE2 syntax, the whole value must match.
    Regex(FullRegex),
    /// Any value (`present_match`).
    Present,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(v) => value == v,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::Present => true,
        }
    }
}

/// A regular expression that must match a whole value, as Envoy's `safe_regex` (RE2) does. The
/// `regex` crate shares RE2's syntax and its linear-time guarantee (no backreferences or
/// lookaround, which RE2 refuses too). Compared by its source text.
#[derive(Clone, Debug)]
pub struct FullRegex {
    source: String,
    compiled: regex::Regex,
}

impl FullRegex {
    /// Compiles `source`, anchored at both ends. The error is the parser's message.
    pub fn new(source: &str) -> Result<FullRegex, String> {
        // Bounded so that a hostile policy cannot make a huge automaton (RE2 bounds it too).
        let compiled =
            regex::RegexBuilder::new(&format!("^(?:{source})$")).size_limit(1 << 20).build().map_err(|e| {
                // The parser's message spans lines (the pattern, a caret); keep its verdict.
                let text = e.to_string();
                text.lines().rev().find_map(|l| l.trim().strip_prefix("error: ")).unwrap_or(text.trim()).to_owned()
            })?;
        Ok(FullRegex { source: source.to_owned(), compiled })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.compiled.is_match(value)
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for FullRegex {}

/// How an entry's value is matched and whether it splits buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryValue {
    /// Exactly this value; one bucket.
    Exact(String),
    /// envoyproxy/ratelimit wildcard (`foo*`, `/api/*/x`: `*` matches any run of characters);
    /// a bucket per distinct matching value.
    Wildcard(String),
    /// A wildcard with `share_threshold: true`: every matching value shares one bucket (the
    /// pattern stands for the value in the counter key, as in the reference's Redis keys).
    SharedWildcard(String),
    /// Any value (key only); a bucket per distinct value (`type: Distinct`, `value: "*"`).
    Distinct,
    /// A client address inside one of `nets` (`sourceCIDR`); with `distinct`, a bucket per
    /// address, else one shared bucket. `invert` selects addresses outside `nets`.
    Cidr { nets: Vec<IpNet>, distinct: bool, invert: bool },
}

/// Bucket arithmetic of a rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    #[default]
    /// Token bucket of `requests` per unit, depth `requests + burst` (gateway kinds).
    TokenBucket,
    /// Fixed windows aligned to the unit, as envoyproxy/ratelimit counts
    /// (`requests_per_unit` per window; `burst` ignored).
    FixedWindow,
}

/// Where the counts live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    #[default]
    /// This node alone.
    Local,
    /// Shared by every node: counted in Redis with `run --rls-backend redis`, else per node.
    Global,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::TokenBucket => "token bucket",
            Algorithm::FixedWindow => "fixed window",
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Local => "local",
            Scope::Global => "global",
        })
    }
}
