//! Validated policies → one compiled plan: the [`KernelPlan`] the XDP program enforces, the
//! [`L7Plan`] the L7 engine / rate limit service answers, and [`Notice`]s for everything
//! accepted but not (fully) enforced.
//!
//! No rule is dropped silently: each rule lands in the kernel, in the L7 plan, or both (an L7
//! rule with a derived connection guard), or yields a notice naming it.
//!
//! # Kernel
//!
//! - Kernel rule: selectors are source CIDRs only (at most one) or none, counting `Packets`,
//!   `Bytes` or `Connections`. `sourceCIDR.type: Distinct` → one bucket per source;
//!   `Exact` → one bucket shared by the CIDR; no selector → one bucket for everyone (a port
//!   ceiling). Named `policy/rule`.
//! - Targets: the policy's `Port` targetRefs, plus the ports its `Gateway` / `HTTPRoute`
//!   targetRefs resolve to through the set's `ListenerMap`s ([`super::listeners`]: a gateway's
//!   listeners, a route's gateways' listeners); none at all means every port. A target no map
//!   lists is a notice and adds no port; a policy whose targets resolve to no port at all puts
//!   no rule in the kernel (the only kernel scope left, "every port", is wider than asked).
//! - Routes share ports: the kernel cannot tell two routes of one gateway apart, so a
//!   route-level policy's kernel rules count all traffic to its gateway's ports, next to the
//!   gateway-level policies' (every matching rule applies, the first exhausted drops). The
//!   POLICY.md precedence (a route's own rules win over its gateway's) holds at L7 only; the
//!   resolution notice of each route target says so.
//! - Kernel guard: an L7 rule keyed by the source address (one `sourceCIDR` selector) or by
//!   nothing also yields a kernel `Connections` rule `policy/rule#guard` at the same rate and
//!   burst, unless `kernelGuard: Off`, the rule selects on headers, or the policy gives the
//!   kernel no ports: its route targets resolve to none, or it is a gateway kind without
//!   targets (a TEG `RateLimitFilter` applies where routes reference it, not to every port).
//!   The guard covers the ports whose every request the rule sees: `Port` and `Gateway`
//!   targets. An `HTTPRoute` shares its gateway's ports with other routes, so a route's rule
//!   yields no guard on them (one at its rate would cut the other routes' connections).
//!
//! # L7
//!
//! Every rule counting `Requests` (rules selecting on headers always do) becomes an
//! [`L7Rule`] in domain [`DEFAULT_DOMAIN`] (mapping in [`l7`]); envoyproxy/ratelimit configs
//! become fixed-window rules of their own domain, and kgateway descriptor actions tell the
//! engine where each entry of those rules comes from in an HTTP request.
//!
//! # Set-level checks
//!
//! L7 rule names are unique in a plan (they key counters, metrics and `x-ratelimit-limit`
//! names): a clash, e.g. two configs naming a limit alike, is an error at the second rule
//! naming the first. Two envoyproxy/ratelimit configs for one domain are an error too, and so
//! are clashes between `ListenerMap`s ([`super::listeners::check_set`]). Errors are in
//! [`Compiled::errors`]; [`load_and_compile`] returns them with the loader's.

pub(crate) mod l7;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_synproxy;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

pub use self::l7::{entry_key_text, gateway_rule, range_text};
use super::error::{ErrorKind, Location, PolicyError, PolicyErrors};
use super::kinds::ratelimit_config;
use super::listeners::{self, ListenerIndex, Resolution, ports_text};
use super::model::*;
use crate::plan::l7::DEFAULT_DOMAIN;
use crate::plan::{
    CountKind, KernelPlan, KernelRule, L7Plan, L7Target, ListEntry, PolicyPenalty, PortTarget, Protocol,
    SourceSelector, SynproxyMode, SynproxyTarget,
};

/// The compiler's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub plan: KernelPlan,
    /// Rules answered by the L7 engine / rate limit service.
    pub l7: L7Plan,
    pub notices: Vec<Notice>,
    /// One per policy, then one per envoyproxy/ratelimit config, in set order: what landed
    /// where (for `check` and logs).
    pub summaries: Vec<PolicySummary>,
    /// Set-level problems (duplicate L7 rule names, one domain in two configs). A plan with
    /// errors must not be applied.
    pub errors: Vec<PolicyError>,
    /// Policies' `penalty` settings, for escalation from the rate limit service to XDP.
    pub penalties: Vec<PolicyPenalty>,
    /// One per `ListenerMap`, in set order.
    pub listener_maps: Vec<ListenerMapSummary>,
}

/// What a `ListenerMap` lists (for `check`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerMapSummary {
    pub name: String,
    pub gateways: usize,
    pub routes: usize,
    /// Policy targets it resolved to ports.
    pub resolved: usize,
}

impl fmt::Display for ListenerMapSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ListenerMap {}: {} gateway(s), {} route(s), resolving {} policy target(s)",
            self.name, self.gateways, self.routes, self.resolved
        )
    }
}

/// A policy's `Gateway` / `HTTPRoute` target and the ports it resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// `Gateway eg`, `HTTPRoute api`.
    pub target: String,
    pub ports: Vec<PortTarget>,
    /// The map entries used: `ListenerMap m`, `gateway default/eg of ListenerMap m`.
    pub via: String,
}

impl Compiled {
    /// The compiled plan, or its set-level errors.
    pub fn into_result(self) -> Result<Compiled, PolicyErrors> {
        if self.errors.is_empty() { Ok(self) } else { Err(PolicyErrors(self.errors)) }
    }
}

/// Loads `paths` ([`super::load_paths`]) and compiles the set: every error of either step,
/// or a plan that can be applied whole.
pub fn load_and_compile(paths: &[PathBuf]) -> Result<Compiled, PolicyErrors> {
    compile(&super::load_paths(paths)?).into_result()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySummary {
    /// The policy's name, or `ratelimit config DOMAIN`.
    pub policy: String,
    /// Kernel rule names, derived guards included.
    pub kernel_rules: Vec<String>,
    /// L7 rule names.
    pub l7_rules: Vec<String>,
    /// Rules of the policy (by rule name) that no part of this agent enforces.
    pub not_enforced: Vec<String>,
    /// Its `Gateway` / `HTTPRoute` targets that a `ListenerMap` resolved to ports.
    pub resolved: Vec<ResolvedTarget>,
}

impl fmt::Display for PolicySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rule(s) in the kernel, {} L7, {} not enforced",
            self.policy,
            self.kernel_rules.len(),
            self.l7_rules.len(),
            self.not_enforced.len()
        )?;
        for (i, r) in self.resolved.iter().enumerate() {
            let sep = if i == 0 { "; " } else { ", " };
            write!(f, "{sep}{} on {}", r.target, ports_text(&r.ports))?;
        }
        Ok(())
    }
}

/// A warning: something accepted that is not (fully) enforced, or that needs the gateway's
/// cooperation. Displayed like errors: `FILE:LINE:COL[ (document N)]: FIELD.PATH: text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub location: Location,
    pub field: String,
    /// The policy's name, or `ratelimit config DOMAIN`.
    pub policy: String,
    /// The rule concerned, if any.
    pub rule: Option<String>,
    pub kind: NoticeKind,
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.kind)
    }
}

/// Why a derived kernel guard was not made for an L7 rule keyed by source or by nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoGuard {
    /// `kernelGuard: Off`.
    Off,
    /// The policy targets only HTTPRoutes/Gateways, and no `ListenerMap` gives their ports.
    RoutesOnly,
    /// A gateway kind without targets: it applies where routes reference it.
    NoPorts,
    /// Several `sourceCIDR` selectors: the kernel matches one.
    SeveralSources,
    /// The policy targets an HTTPRoute: its gateway's ports carry other routes too, whose
    /// connections a guard at this rule's rate would throttle.
    RouteScoped,
}

impl fmt::Display for NoGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoGuard::Off => "kernelGuard is Off",
            NoGuard::RoutesOnly => {
                "the policy's HTTPRoute/Gateway targets are not in a ListenerMap, so the kernel has no ports for them"
            }
            NoGuard::NoPorts => "the policy names no ports",
            NoGuard::RouteScoped => {
                "the policy targets an HTTPRoute, and the kernel cannot tell its connections from other routes' on the gateway's ports"
            }
            NoGuard::SeveralSources => "the kernel matches one sourceCIDR selector per rule",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoticeKind {
    /// A rule in the L7 plan: it is only enforced for requests whose gateway sends its
    /// descriptor to the rate limit service. `guard` names the derived kernel rule, if any.
    #[error(
        "rule {rule} is L7 ({reason}): answered by the rate limit service (`limiter-agent run --rls-listen`, domain {domain}) when the gateway sends its descriptor, see `limiter-agent explain`{}",
        guard_text(guard, no_guard)
    )]
    L7 { rule: String, reason: &'static str, domain: String, guard: Option<String>, no_guard: Option<NoGuard> },
    /// A kernel-counted rule under `rateLimit.global`: shared only where the agent takes part in
    /// Redis membership (`crate::sync`).
    #[error(
        "rule {rule}: global scope: with --rls-backend redis the kernel limit is shared across the live nodes (each enforces a share following its demand), else counted on this node only"
    )]
    GlobalPerNode { rule: String },
    /// A kernel-counted rule under `rateLimit.global` keyed by source (`crate::sync::window`).
    #[error(
        "rule {rule}: global scope, per source: with --rls-backend redis each node enforces the full per-source limit, and a source whose total across the nodes goes over it in a window of the rule's unit is blocked on every node (all ports) until the window ends; else counted on this node only"
    )]
    GlobalPerSource { rule: String },
    /// An L7 rule (or a config's rules) with global scope.
    #[error("{what}: global: shared through Redis when the agent runs with --rls-backend redis, else per node")]
    GlobalL7 { what: String },
    #[error(
        "rule {rule}: several sourceCIDR selectors in one rule are not enforceable in the kernel yet; not enforced"
    )]
    SeveralSourceSelectors { rule: String },
    #[error(
        "rule {rule}: the policy's HTTPRoute/Gateway targets are not resolved to ports (add them to a ListenerMap), so it is not enforced in the kernel"
    )]
    RouteTargetedRule { rule: String },
    /// A `Gateway` / `HTTPRoute` target no `ListenerMap` lists.
    #[error(
        "{kind} {name}: not resolved to ports (add it to a ListenerMap), so kernel rules do not cover it; L7 rules apply to its requests"
    )]
    RouteTarget { kind: RouteKind, name: String },
    /// A `Gateway` target whose `sectionName` names no listener of the mapped gateway: all of
    /// the gateway's ports would be wider than asked.
    #[error(
        "Gateway {gateway}: no listener named {section} in ListenerMap {map} (name its listeners there), so kernel rules do not cover it; L7 rules apply to its requests"
    )]
    NoSuchListener { gateway: String, section: String, map: String },
    /// A target a `ListenerMap` resolved: kernel rules and guards of the policy count all
    /// traffic to these ports.
    #[error("{kind} {name}: resolved to ports {} by {via}; {}", ports_text(ports), resolved_tail(*kind))]
    RouteResolved { kind: RouteKind, name: String, ports: Vec<PortTarget>, via: String },
    #[error(
        "escalation: a source the rate limit service denies {events} times within {within:?} (rules {rules}) is put in the XDP block list for {block:?} (`limiter-agent run --iface`)"
    )]
    Penalty { events: u32, within: std::time::Duration, block: std::time::Duration, rules: String },
    #[error("escalation: the policy has no L7 rules whose denials could count, so its penalty escalates nothing")]
    PenaltyWithoutL7Rules,
    /// A field of a gateway kind accepted but enforced by no layer ([`Policy::not_enforced`],
    /// [`RatelimitConfig::not_enforced`]); the notice's `field` names it.
    #[error("{what}")]
    NotEnforced { what: String },
    /// A kgateway descriptor no envoyproxy/ratelimit config of the set answers.
    #[error(
        "descriptor {descriptor} matches no rule of {domain}: the rate limit service answers it OK without a limit"
    )]
    UnmatchedDescriptor { descriptor: String, domain: String },
}

fn resolved_tail(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::Gateway => "the policy's kernel rules and guards count all traffic to them",
        RouteKind::HttpRoute => {
            "the kernel cannot tell routes apart on a port, so the policy's kernel rules count all traffic to these ports and its L7 rules get no connection guard there, and the rules of policies targeting the gateway apply there too (every matching rule applies, the first exhausted drops); a route's rules win over its gateway's at L7 only"
        }
    }
}

fn guard_text(guard: &Option<String>, no_guard: &Option<NoGuard>) -> String {
    match (guard, no_guard) {
        (Some(g), _) => format!("; the kernel guard {g} limits new connections at the same rate"),
        (None, Some(why)) => format!("; no kernel guard: {why}"),
        (None, None) => String::new(),
    }
}

/// Compiles a validated set. Set-level errors land in [`Compiled::errors`].
pub fn compile(set: &PolicySet) -> Compiled {
    let mut out = Compiled::default();
    // Where each L7 rule was written, parallel to `out.l7.rules` (for set-level errors).
    let mut origins: Vec<Location> = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    out.errors.extend(listeners::check_set(&set.listener_maps));
    let index = ListenerIndex { maps: &set.listener_maps };
    for p in &set.policies {
        compile_policy(p, index, &mut out, &mut origins, &mut fields);
    }
    for m in &set.listener_maps {
        // Attributed by name: an unqualified target can match entries of several maps.
        let resolved = out
            .summaries
            .iter()
            .flat_map(|s| &s.resolved)
            .filter(|r| r.via.split(", ").any(|v| v.ends_with(&format!("ListenerMap {}", m.name))))
            .count();
        out.listener_maps.push(ListenerMapSummary {
            name: m.name.clone(),
            gateways: m.gateways.len(),
            routes: m.routes.len(),
            resolved,
        });
    }
    let mut config_rules: Vec<std::ops::Range<usize>> = Vec::new();
    for c in &set.ratelimit_configs {
        let start = out.l7.rules.len();
        compile_config(c, &mut out, &mut origins, &mut fields);
        config_rules.push(start..out.l7.rules.len());
    }
    for p in &set.policies {
        l7::link_descriptor_actions(p, set, &config_rules, &mut out);
    }
    check_domains(set, &mut out.errors);
    check_l7_names(&out.l7, &origins, &fields, &mut out.errors);
    out
}

/// The TCP ports of `p`'s targets that have `synProxy` on, merged into `list`: a port
/// proxied by several targets gets the strictest mode (`Always`, else the lowest threshold).
fn synproxy_targets(p: &Policy, index: &ListenerIndex<'_>, list: &mut Vec<SynproxyTarget>) {
    for t in &p.targets {
        let Some(mode) = t.syn_proxy else { continue };
        let ports: Vec<PortTarget> = match &t.kind {
            TargetKind::Port(pt) => vec![*pt],
            TargetKind::Route { kind, name, namespace, section_name } => {
                let resolution = match kind {
                    RouteKind::Gateway => index.gateway(name, namespace.as_deref(), section_name.as_deref()),
                    RouteKind::HttpRoute => index.route(name, namespace.as_deref()),
                };
                match resolution {
                    Resolution::Ports { ports, .. } => ports,
                    _ => Vec::new(),
                }
            }
        };
        for pt in ports.into_iter().filter(|pt| pt.protocol == Protocol::Tcp) {
            match list.iter_mut().find(|s| s.port == pt.port) {
                Some(existing) => existing.mode = stricter(existing.mode, mode),
                None => list.push(SynproxyTarget { port: pt.port, mode, policy: p.name.clone() }),
            }
        }
    }
}

fn stricter(a: SynproxyMode, b: SynproxyMode) -> SynproxyMode {
    match (a, b) {
        (SynproxyMode::Threshold(x), SynproxyMode::Threshold(y)) => {
            // Compare rates: requests per nanosecond, as x.requests / x_ns vs y.requests / y_ns.
            let (xr, yr) = (
                u128::from(x.requests) * u128::from(y.unit.as_ns()),
                u128::from(y.requests) * u128::from(x.unit.as_ns()),
            );
            SynproxyMode::Threshold(if xr <= yr { x } else { y })
        }
        _ => SynproxyMode::Always,
    }
}

fn compile_policy(
    p: &Policy,
    index: ListenerIndex<'_>,
    out: &mut Compiled,
    origins: &mut Vec<Location>,
    fields: &mut Vec<String>,
) {
    let mut summary = PolicySummary { policy: p.name.clone(), ..Default::default() };
    let notice = |at: &At, rule: Option<&str>, kind: NoticeKind| Notice {
        location: p.location(at),
        field: at.field.clone(),
        policy: p.name.clone(),
        rule: rule.map(str::to_owned),
        kind,
    };
    for (list, entries) in [(&mut out.plan.allow, &p.allow), (&mut out.plan.deny, &p.deny)] {
        list.extend(entries.iter().map(|e| ListEntry { net: e.value, policy: p.name.clone() }));
    }
    for w in &p.not_enforced {
        out.notices.push(notice(&w.at, None, NoticeKind::NotEnforced { what: w.value.clone() }));
    }
    let mut ports: Vec<PortTarget> = Vec::new();
    // The ports whose every request the policy sees (Port and Gateway targets): where
    // derived guards go.
    let mut guard_ports: Vec<PortTarget> = Vec::new();
    let mut l7_targets: Vec<L7Target> = Vec::new();
    for t in &p.targets {
        match &t.kind {
            TargetKind::Port(pt) => {
                if !ports.contains(pt) {
                    ports.push(*pt);
                }
                if !guard_ports.contains(pt) {
                    guard_ports.push(*pt);
                }
            }
            TargetKind::Route { kind, name, namespace, section_name } => {
                let target = match kind {
                    RouteKind::HttpRoute => L7Target::Route(name.clone()),
                    RouteKind::Gateway => L7Target::Gateway(name.clone()),
                };
                if !l7_targets.contains(&target) {
                    l7_targets.push(target);
                }
                let resolution = match kind {
                    RouteKind::Gateway => index.gateway(name, namespace.as_deref(), section_name.as_deref()),
                    RouteKind::HttpRoute => index.route(name, namespace.as_deref()),
                };
                let kind = match resolution {
                    Resolution::Ports { ports: found, via } if !found.is_empty() => {
                        for pt in &found {
                            if !ports.contains(pt) {
                                ports.push(*pt);
                            }
                            if *kind == RouteKind::Gateway && !guard_ports.contains(pt) {
                                guard_ports.push(*pt);
                            }
                        }
                        summary.resolved.push(ResolvedTarget {
                            target: format!("{kind} {name}"),
                            ports: found.clone(),
                            via: via.clone(),
                        });
                        NoticeKind::RouteResolved { kind: *kind, name: name.clone(), ports: found, via }
                    }
                    Resolution::NoListener { gateway, section, map } => {
                        NoticeKind::NoSuchListener { gateway, section, map }
                    }
                    Resolution::Ports { .. } | Resolution::Unmapped => {
                        NoticeKind::RouteTarget { kind: *kind, name: name.clone() }
                    }
                };
                out.notices.push(notice(&t.at, None, kind));
            }
        }
    }
    if p.mode == Mode::Shadow && p.targets.iter().any(|t| t.syn_proxy.is_some()) {
        // A shadow policy never drops; the proxy drops bad cookies, so it stays off.
        out.notices.push(notice(
            &p.targets[0].at,
            None,
            NoticeKind::NotEnforced { what: "synProxy (the policy is in Shadow mode)".into() },
        ));
    } else {
        synproxy_targets(p, &index, &mut out.plan.synproxy);
    }
    let routes_only = !l7_targets.is_empty() && ports.is_empty();
    // A guard is right only where the rule sees every request on a port: Port and Gateway
    // targets. A route shares its gateway's ports with other routes (the map need not list
    // them all), so a guard at the route's rate there would cut their connections too.
    let route_scoped = guard_ports.is_empty() && !ports.is_empty();
    // A gateway kind without targets applies where routes reference it (TEG's ExtensionRef),
    // not to every port: no kernel scope for its guards.
    let no_ports = p.targets.is_empty() && p.kind != PolicyKind::RateLimitPolicy;
    let shadow = p.mode == Mode::Shadow;
    for r in &p.rules {
        let full = format!("{}/{}", p.name, r.name);
        let rule_notice = |kind| notice(&r.at, Some(&r.name), kind);
        let sources: Vec<&SourceCidr> = r.source_selectors().collect();
        let source = match sources.first() {
            Some(s) => SourceSelector { nets: vec![s.net], distinct: s.distinct, invert: s.invert },
            None => SourceSelector::everyone(false),
        };
        let kernel_rule = |name: String, count: CountKind| KernelRule {
            name,
            targets: ports.clone(),
            source: source.clone(),
            count,
            limit: r.limit,
            shadow,
            global: false,
        };
        match r.count {
            Count::Kernel(count) => {
                if routes_only {
                    out.notices.push(rule_notice(NoticeKind::RouteTargetedRule { rule: full }));
                    summary.not_enforced.push(r.name.clone());
                    continue;
                }
                if sources.len() > 1 {
                    out.notices.push(rule_notice(NoticeKind::SeveralSourceSelectors { rule: full }));
                    summary.not_enforced.push(r.name.clone());
                    continue;
                }
                let global = r.scope == Scope::Global;
                let rule = KernelRule { global, ..kernel_rule(full.clone(), count) };
                let per_source = rule.global_per_source();
                out.plan.rules.push(rule);
                summary.kernel_rules.push(full.clone());
                if per_source {
                    out.notices.push(rule_notice(NoticeKind::GlobalPerSource { rule: full }));
                } else if global {
                    out.notices.push(rule_notice(NoticeKind::GlobalPerNode { rule: full }));
                }
            }
            Count::Requests => {
                out.l7.rules.push(gateway_rule(&full, r, shadow, &l7_targets));
                origins.push(p.location(&r.at));
                fields.push(r.at.field.clone());
                summary.l7_rules.push(full.clone());
                let reason = if r.has_headers() { "selects on request attributes" } else { "counts Requests" };
                let no_guard = if r.has_headers() {
                    None
                } else if !r.kernel_guard {
                    Some(NoGuard::Off)
                } else if routes_only {
                    Some(NoGuard::RoutesOnly)
                } else if no_ports {
                    Some(NoGuard::NoPorts)
                } else if sources.len() > 1 {
                    Some(NoGuard::SeveralSources)
                } else if route_scoped {
                    Some(NoGuard::RouteScoped)
                } else {
                    None
                };
                let guard = (!r.has_headers() && no_guard.is_none()).then(|| format!("{full}#guard"));
                if let Some(g) = &guard {
                    let mut rule = kernel_rule(g.clone(), CountKind::Connections);
                    rule.targets = guard_ports.clone();
                    out.plan.rules.push(rule);
                    summary.kernel_rules.push(g.clone());
                }
                let domain = DEFAULT_DOMAIN.to_owned();
                out.notices.push(rule_notice(NoticeKind::L7 { rule: full.clone(), reason, domain, guard, no_guard }));
                if r.scope == Scope::Global {
                    out.notices.push(rule_notice(NoticeKind::GlobalL7 { what: format!("rule {full}") }));
                }
            }
        }
    }
    if let Some(pen) = &p.penalty {
        // Only L7 denials escalate: a kernel drop is already as cheap as a block-list drop.
        if summary.l7_rules.is_empty() {
            out.notices.push(notice(&pen.at, None, NoticeKind::PenaltyWithoutL7Rules));
        } else {
            let rules = summary.l7_rules.join(", ");
            let kind =
                NoticeKind::Penalty { events: pen.over_limit_events, within: pen.within, block: pen.block, rules };
            out.notices.push(notice(&pen.at, None, kind));
            out.penalties.push(PolicyPenalty {
                policy: p.name.clone(),
                over_limit_events: pen.over_limit_events,
                within: pen.within,
                block: pen.block,
                rules: summary.l7_rules.clone(),
            });
        }
    }
    out.summaries.push(summary);
}

/// An envoyproxy/ratelimit config: its rules (as [`ratelimit_config::compile`] makes them,
/// fixed windows of the config's domain), its warnings, and one notice on global counting.
fn compile_config(c: &RatelimitConfig, out: &mut Compiled, origins: &mut Vec<Location>, fields: &mut Vec<String>) {
    let policy = format!("ratelimit config {}", c.domain);
    let notice = |at: &At, kind| Notice {
        location: c.source.at(at.pos),
        field: at.field.clone(),
        policy: policy.clone(),
        rule: None,
        kind,
    };
    for w in &c.not_enforced {
        out.notices.push(notice(&w.at, NoticeKind::NotEnforced { what: w.value.clone() }));
    }
    let rules = ratelimit_config::compile(c);
    // The nodes that make a rule (a `rate_limit`, or exempt: neither limit nor children), in
    // the same (depth-first, config) order as the rules.
    let mut nodes = Vec::new();
    limited_nodes(&c.descriptors, &mut nodes);
    let mut summary = PolicySummary { policy: policy.clone(), ..Default::default() };
    for (i, rule) in rules.into_iter().enumerate() {
        let node = nodes.get(i).copied();
        let (location, field) = match node {
            Some(d) => (c.source.at(d.at.pos), d.at.field.clone()),
            None => (c.source.at(c.at.pos), c.at.field.clone()),
        };
        origins.push(location);
        fields.push(field);
        summary.l7_rules.push(rule.name.clone());
        out.l7.rules.push(rule);
    }
    if !summary.l7_rules.is_empty() {
        let what = format!("the rules of domain {}", c.domain);
        out.notices.push(notice(&c.at, NoticeKind::GlobalL7 { what }));
    }
    out.summaries.push(summary);
}

fn limited_nodes<'a>(level: &'a [ConfigDescriptor], out: &mut Vec<&'a ConfigDescriptor>) {
    for d in level {
        if d.rate_limit.is_some() || d.descriptors.is_empty() {
            out.push(d);
        }
        limited_nodes(&d.descriptors, out);
    }
}

/// One config per domain (the loader checks this too; a set built in code gets it here).
fn check_domains(set: &PolicySet, errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<&str, Location> = HashMap::new();
    for c in &set.ratelimit_configs {
        let here = c.source.at(c.at.pos);
        match first.get(c.domain.as_str()) {
            Some(prev) => errors.push(PolicyError {
                location: here,
                field: "domain".into(),
                kind: ErrorKind::DuplicateDomain { domain: c.domain.clone(), first: prev.to_string() },
            }),
            None => {
                first.insert(&c.domain, here);
            }
        }
    }
}

fn check_l7_names(plan: &L7Plan, origins: &[Location], fields: &[String], errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in plan.rules.iter().enumerate() {
        match first.get(rule.name.as_str()) {
            Some(&j) => errors.push(PolicyError {
                location: origins.get(i).cloned().unwrap_or_default(),
                field: fields.get(i).cloned().unwrap_or_default(),
                kind: ErrorKind::Schema {
                    message: format!(
                        "duplicate L7 rule name \"{}\" (first at {}): rule names key counters, metrics and x-ratelimit-limit",
                        rule.name,
                        origins.get(j).map(ToString::to_string).unwrap_or_default()
                    ),
                },
            }),
            None => {
                first.insert(&rule.name, i);
            }
        }
    }
}
