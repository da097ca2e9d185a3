//! Rule matching: the compiled form of an [`L7Plan`] (a descriptor tree per RLS domain, the
//! list of rules HTTP requests can trigger) and the counter keys of matched rules.
//!
//! # Descriptor matching (envoyproxy/ratelimit)
//!
//! The rules of one domain are folded back into the tree the reference service builds from
//! its nested `descriptors`. A request descriptor walks it entry by entry; at each level the
//! child is chosen by, in this order:
//! 1. the exact `key` + `value`;
//! 2. the first value pattern with that key, in config order: wildcards (`foo*`, `/api/*/x`,
//!    `*` matching any run of characters) and, for rules compiled from `sourceCIDR`,
//!    address ranges;
//! 3. the key alone (any value).
//!
//! There is no backtracking: once a level picked a child, a miss below it is a miss, as in the
//! reference. The rule applies only if it sits exactly at the descriptor's last entry (the
//! depth rule): a shorter or longer descriptor does not match it.
//!
//! # Counter keys
//!
//! A counter key is the rule's id (8 bytes, little endian) followed, for every entry whose
//! value splits buckets (wildcard, key-only, distinct address range), by that value as a
//! 4-byte length and its bytes. Length prefixes keep keys unambiguous whatever the values
//! contain. Addresses are written in their canonical text form, so the same client gets the
//! same counter whether it arrives as an HTTP request or as an RLS `remote_address` entry.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use super::counters::Meter;
use super::{DescriptorEntry, HttpRequest, ReportedLimit};
use crate::plan::l7::{Attribute, EntryMatch, EntryValue, L7Plan, L7Rule, L7Target, MatchTarget};

/// The counter namespace of per-descriptor limit overrides (rule ids count up from 1).
pub(super) const OVERRIDE_RULE_ID: u64 = u64::MAX;

/// One rule, ready for decisions.
pub(super) struct CompiledRule {
    /// Counter namespace: kept across plan replacements while the rule is unchanged.
    pub id: u64,
    pub rule: Arc<L7Rule>,
    /// `None`: `unlimited`.
    pub meter: Option<Meter>,
    /// `None`: `unlimited`.
    pub reported: Option<ReportedLimit>,
    /// A token bucket rule with a single bucket (no entry value splits it): its TAT, kept
    /// here instead of in the keyed store (see [`super::counters::decide_shared`]). Carried
    /// over to the next plan with the rule's id.
    pub shared: Option<Arc<AtomicU64>>,
}

/// A plan compiled for decisions.
pub(super) struct CompiledPlan {
    pub plan: Arc<L7Plan>,
    pub rules: Vec<CompiledRule>,
    domains: HashMap<String, DomainTree>,
    /// Indices of the rules HTTP requests can trigger (at least one entry, every entry with
    /// an HTTP source, i.e. no [`Attribute::Descriptor`]), in plan order.
    pub http_rules: Vec<usize>,
    /// Routes some rule targets: on them, gateway-level rules do not apply.
    routes_with_rules: HashSet<String>,
    /// Some HTTP rule has `replaces` (the per-request replacement pass is skipped otherwise).
    pub http_replaces: bool,
}

/// The descriptor tree of one domain. `nodes[0]` is the root (no entry).
#[derive(Default)]
struct DomainTree {
    nodes: Vec<Node>,
}

#[derive(Default)]
struct Node {
    /// The rule whose descriptor ends here.
    rule: Option<usize>,
    children: HashMap<String, KeyChildren>,
}

/// The children of a node under one descriptor key.
#[derive(Default)]
struct KeyChildren {
    exact: HashMap<String, usize>,
    /// Wildcards and address ranges, in config order.
    patterns: Vec<(EntryValue, usize)>,
    /// Key only (any value).
    any: Option<usize>,
}

impl DomainTree {
    fn insert(&mut self, entries: &[EntryMatch], rule: usize) {
        if self.nodes.is_empty() {
            self.nodes.push(Node::default());
        }
        let mut node = 0;
        for entry in entries {
            let fresh = self.nodes.len();
            let group = self.nodes[node].children.entry(entry.key.clone()).or_default();
            let (child, created) = match &entry.value {
                EntryValue::Exact(v) => match group.exact.get(v) {
                    Some(&c) => (c, false),
                    None => {
                        group.exact.insert(v.clone(), fresh);
                        (fresh, true)
                    }
                },
                EntryValue::Distinct => match group.any {
                    Some(c) => (c, false),
                    None => {
                        group.any = Some(fresh);
                        (fresh, true)
                    }
                },
                pattern @ (EntryValue::Wildcard(_) | EntryValue::SharedWildcard(_) | EntryValue::Cidr { .. }) => {
                    match group.patterns.iter().find(|(p, _)| p == pattern) {
                        Some(&(_, c)) => (c, false),
                        None => {
                            group.patterns.push((pattern.clone(), fresh));
                            (fresh, true)
                        }
                    }
                }
            };
            if created {
                self.nodes.push(Node::default());
            }
            node = child;
        }
        // Two rules with the same descriptor: the first in config order wins (the compiler
        // rejects duplicates; this only keeps the answer deterministic).
        self.nodes[node].rule.get_or_insert(rule);
    }

    fn lookup<'e>(&self, entries: impl Iterator<Item = (&'e str, &'e str)>) -> Option<usize> {
        let mut node = 0;
        for (key, value) in entries {
            let group = self.nodes.get(node)?.children.get(key)?;
            node = match group.exact.get(value) {
                Some(&c) => c,
                None => match group.patterns.iter().find(|(p, _)| Value::Str(value).matches(p)) {
                    Some(&(_, c)) => c,
                    None => group.any?,
                },
            };
        }
        self.nodes.get(node)?.rule
    }
}

impl CompiledPlan {
    /// Compiles `plan`. Rules equal to one in `previous` (same name, entries, limit,
    /// algorithm and scope) keep its id, hence its counters; others get a fresh id.
    pub fn new(plan: L7Plan, previous: Option<&CompiledPlan>, next_id: &AtomicU64) -> Self {
        let old: HashMap<&str, &CompiledRule> =
            previous.map(|p| p.rules.iter().map(|r| (r.rule.name.as_str(), r)).collect()).unwrap_or_default();
        let mut rules = Vec::with_capacity(plan.rules.len());
        let mut domains: HashMap<String, DomainTree> = HashMap::new();
        let mut http_rules = Vec::new();
        let mut routes_with_rules = HashSet::new();
        let mut http_replaces = false;
        for (index, rule) in plan.rules.iter().enumerate() {
            let kept = old.get(rule.name.as_str()).filter(|o| same_counting(&o.rule, rule));
            let id = kept.map_or_else(|| next_id.fetch_add(1, Ordering::Relaxed), |o| o.id);
            let meter = Meter::for_rule(rule);
            let shared = match (&meter, kept) {
                (Some(Meter::Bucket(_)), _) if rule.entries.iter().any(|e| splits(&e.value)) => None,
                (Some(Meter::Bucket(_)), Some(CompiledRule { shared: Some(tat), .. })) => Some(tat.clone()),
                (Some(Meter::Bucket(_)), _) => Some(Arc::new(AtomicU64::new(0))),
                _ => None,
            };
            let http = !rule.entries.is_empty() && rule.entries.iter().all(|e| e.attribute != Attribute::Descriptor);
            if !rule.entries.is_empty() {
                domains.entry(rule.domain.clone()).or_default().insert(&rule.entries, index);
            }
            if http {
                http_rules.push(index);
                http_replaces |= !rule.replaces.is_empty();
                for target in &rule.targets {
                    if let L7Target::Route(r) = target {
                        routes_with_rules.insert(r.clone());
                    }
                }
            }
            let reported = rule.limit.map(|l| ReportedLimit {
                name: rule.limit_name.clone().unwrap_or_else(|| rule.name.clone()),
                requests_per_unit: u32::try_from(l.requests).unwrap_or(u32::MAX),
                unit: l.unit,
            });
            rules.push(CompiledRule { id, meter, reported, shared, rule: Arc::new(rule.clone()) });
        }
        Self { plan: Arc::new(plan), rules, domains, http_rules, routes_with_rules, http_replaces }
    }

    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// The rule a request descriptor hits in `domain`.
    pub fn lookup(&self, domain: &str, entries: &[DescriptorEntry]) -> Option<usize> {
        self.domains.get(domain)?.lookup(entries.iter().map(|e| (e.key.as_str(), e.value.as_str())))
    }

    /// Whether `rule`'s targets select the request (route-level rules win over
    /// gateway-level ones on their routes; untargeted rules always apply).
    pub fn targets_select(&self, rule: &L7Rule, req: &HttpRequest<'_>) -> bool {
        if rule.targets.is_empty() {
            return true;
        }
        let route_has_rules = req.route.is_some_and(|r| self.routes_with_rules.contains(r));
        rule.targets.iter().any(|t| match t {
            L7Target::Route(r) => req.route == Some(r.as_str()),
            L7Target::Gateway(g) => !route_has_rules && req.gateway == Some(g.as_str()),
        })
    }
}

/// Whether two rules count the same way (their counters can be carried over).
fn same_counting(a: &L7Rule, b: &L7Rule) -> bool {
    a.name == b.name && a.entries == b.entries && a.limit == b.limit && a.algorithm == b.algorithm && a.scope == b.scope
}

/// A descriptor entry's value: a string, or an address not yet formatted.
#[derive(Clone, Copy, Debug)]
pub(super) enum Value<'a> {
    Str(&'a str),
    Ip(IpAddr),
}

/// Longest text form of an address (IPv4-mapped IPv6 with every group spelled out).
const IP_TEXT_MAX: usize = 45;

/// An address formatted on the stack (no allocation on the hot path).
struct IpText {
    buf: [u8; IP_TEXT_MAX],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut buf = [0u8; IP_TEXT_MAX];
        let mut cursor = &mut buf[..];
        // Cannot fail: IP_TEXT_MAX bounds every address's text form.
        let _ = write!(cursor, "{ip}");
        let len = IP_TEXT_MAX - cursor.len();
        Self { buf, len }
    }

    fn as_str(&self) -> &str {
        // Display of an address writes ASCII only.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Value<'_> {
    fn ip(&self) -> Option<IpAddr> {
        match *self {
            Value::Ip(ip) => Some(ip),
            Value::Str(s) => s.trim().parse().ok(),
        }
    }

    fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match *self {
            Value::Str(s) => f(s),
            Value::Ip(ip) => f(IpText::new(ip).as_str()),
        }
    }

    /// Whether this value satisfies a rule entry's value.
    pub fn matches(&self, value: &EntryValue) -> bool {
        match value {
            EntryValue::Exact(v) => self.with_str(|s| s == v),
            EntryValue::Wildcard(p) | EntryValue::SharedWildcard(p) => self.with_str(|s| wildcard_match(p, s)),
            EntryValue::Distinct => true,
            EntryValue::Cidr { nets, invert, .. } => self.ip().is_some_and(|ip| in_nets(nets, ip) != *invert),
        }
    }
}

/// `ip` inside one of `nets`; no nets means every address. IPv4-mapped IPv6 addresses count as
/// their IPv4 address, since that is how dual-stack listeners report IPv4 clients.
fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    nets.is_empty() || nets.iter().any(|n| n.contains(&ip))
}

/// envoyproxy/ratelimit wildcard: `*` matches any run of characters (also empty), anywhere
/// in the pattern; everything else matches itself. Two-pointer match that backtracks to the
/// last `*` only: at worst pattern length × text length steps, no allocation, no exponential
/// blow-up on hostile values.
pub(super) fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Whether an entry's value picks a counter of its own (a bucket per distinct value).
fn splits(value: &EntryValue) -> bool {
    match value {
        EntryValue::Exact(_) | EntryValue::SharedWildcard(_) => false,
        EntryValue::Wildcard(_) | EntryValue::Distinct => true,
        EntryValue::Cidr { distinct, .. } => *distinct,
    }
}

thread_local! {
    /// Reused buffer for counter keys: building a key never allocates once it has grown.
    static KEY_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Largest buffer kept between decisions (a huge header value once should not pin memory).
const KEY_BUF_KEEP: usize = 4096;

/// Builds the counter key of `rule` for a descriptor whose values are `values` (one per rule
/// entry, in order) and runs `f` on it.
pub(super) fn with_counter_key<'v, R>(
    rule: &CompiledRule,
    values: impl Iterator<Item = Value<'v>>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    KEY_BUF.with_borrow_mut(|buf| {
        buf.clear();
        buf.extend_from_slice(&rule.id.to_le_bytes());
        for (entry, value) in rule.rule.entries.iter().zip(values) {
            if !splits(&entry.value) {
                continue;
            }
            let at = buf.len();
            buf.extend_from_slice(&[0; 4]);
            match (&entry.value, value) {
                (_, Value::Ip(ip)) => {
                    let _ = write!(buf, "{ip}");
                }
                (EntryValue::Cidr { .. }, Value::Str(s)) => match value.ip() {
                    Some(ip) => {
                        let _ = write!(buf, "{ip}");
                    }
                    None => buf.extend_from_slice(s.as_bytes()),
                },
                (_, Value::Str(s)) => buf.extend_from_slice(s.as_bytes()),
            }
            let len = u32::try_from(buf.len() - at - 4).unwrap_or(u32::MAX);
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        let result = f(buf);
        if buf.capacity() > KEY_BUF_KEEP {
            *buf = Vec::new();
        }
        result
    })
}

/// The rule id a counter key belongs to.
pub(super) fn key_rule_id(key: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    if let Some(head) = key.get(..8) {
        id.copy_from_slice(head);
    }
    u64::from_le_bytes(id)
}

/// envoyproxy/ratelimit's cache key prefix for a matched descriptor: `{domain}_` then
/// `{key}_{value}_` per entry. An address range without `distinct` is one shared counter, so
/// its value is written as the range (`10.0.0.0/8,!` style: nets joined by `,`, `!` first
/// when inverted) rather than the client's address.
pub(super) fn cache_key_prefix(domain: &str, rule: &L7Rule, entries: &[DescriptorEntry]) -> String {
    let mut key = String::with_capacity(64);
    key.push_str(domain);
    key.push('_');
    for (entry, matched) in entries.iter().zip(&rule.entries) {
        key.push_str(&entry.key);
        key.push('_');
        match &matched.value {
            EntryValue::Cidr { nets, distinct: false, invert } => {
                if *invert {
                    key.push('!');
                }
                for (i, net) in nets.iter().enumerate() {
                    if i > 0 {
                        key.push(',');
                    }
                    let _ = write!(key, "{net}");
                }
            }
            // share_threshold: the pattern stands for every value it matches.
            EntryValue::SharedWildcard(pattern) => key.push_str(pattern),
            _ => key.push_str(&entry.value),
        }
        key.push('_');
    }
    key
}

/// The value an HTTP request gives a rule entry, or `None` when the request does not produce
/// the entry (Envoy then sends no descriptor for the rule, so the rule does not apply).
pub(super) fn http_value<'a>(entry: &'a EntryMatch, req: &HttpRequest<'a>) -> Option<Value<'a>> {
    // Entries whose presence is the signal carry their descriptor value as `Exact`.
    let constant = || match &entry.value {
        EntryValue::Exact(v) => Value::Str(v.as_str()),
        _ => Value::Str(""),
    };
    let value = match &entry.attribute {
        Attribute::Fixed => constant(),
        Attribute::RemoteAddress => Value::Ip(req.remote),
        Attribute::Header(name) => Value::Str(header(req, name)?),
        Attribute::HeaderAbsent(name) => match header(req, name) {
            None => constant(),
            Some(_) => return None,
        },
        Attribute::HeaderEquals { name, value } => match header(req, name) {
            Some(v) if v == value => constant(),
            _ => return None,
        },
        Attribute::HeaderNotEquals { name, value } => match header(req, name) {
            Some(v) if v == value => return None,
            _ => constant(),
        },
        Attribute::Path => Value::Str(req.path),
        Attribute::Method => Value::Str(req.method),
        Attribute::Matches(c) => {
            let holds = match &c.target {
                MatchTarget::Header(name) => header(req, name),
                MatchTarget::Path => Some(req.path),
                MatchTarget::Method => Some(req.method),
                MatchTarget::Query(name) => query_param(req.path, name),
            }
            .is_some_and(|v| c.matcher.matches(v));
            if holds == c.invert {
                return None;
            }
            constant()
        }
        Attribute::Query(name) => Value::Str(query_param(req.path, name)?),
        Attribute::Descriptor => return None,
    };
    value.matches(&entry.value).then_some(value)
}

/// The first value of query parameter `name` in a `:path` (`/p?a=1&b=2`), as written (not
/// percent-decoded, as Envoy's `query_parameter_value_match` compares); a parameter without
/// `=` has the empty value.
fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// The first value of header `name` (names compared ASCII case-insensitively).
fn header<'a>(req: &HttpRequest<'a>, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|&(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        let cases = [
            ("foo*", "foo", true),
            ("foo*", "foobar", true),
            ("foo*", "fo", false),
            ("/api/*/x", "/api/v1/x", true),
            ("/api/*/x", "/api//x", true),
            ("/api/*/x", "/api/v1/y", false),
            ("/api/*/x", "/api/a/b/x", true),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(wildcard_match(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn addresses_in_ranges() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        let cidr = |invert| EntryValue::Cidr { nets: nets.clone(), distinct: true, invert };
        assert!(Value::Str("10.1.2.3").matches(&cidr(false)));
        assert!(Value::Str("::ffff:10.1.2.3").matches(&cidr(false)));
        assert!(Value::Str("2001:db8::1").matches(&cidr(false)));
        assert!(!Value::Str("192.0.2.1").matches(&cidr(false)));
        assert!(Value::Str("192.0.2.1").matches(&cidr(true)));
        assert!(!Value::Str("not an address").matches(&cidr(false)));
        assert!(!Value::Str("not an address").matches(&cidr(true)));
        assert!(Value::Ip("10.9.9.9".parse().unwrap()).matches(&cidr(false)));
    }

    #[test]
    fn addresses_format_canonically_on_the_stack() {
        for s in ["1.2.3.4", "::ffff:255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(IpText::new(ip).as_str(), ip.to_string());
        }
    }
}
