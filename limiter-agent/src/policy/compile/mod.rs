//! Validated policies → [`KernelPlan`] plus [`Notice`]s for what the kernel does not enforce.
//!
//! No rule is dropped silently: each rule lands in the plan, or yields a notice naming it, or
//! both (a `global` rule enforced per node; an L7 rule with a derived connection guard).
//!
//! - Kernel rule: selectors are source CIDRs only (at most one) or none, counting `Packets`,
//!   `Bytes` or `Connections`. `sourceCIDR.type: Distinct` → one bucket per source;
//!   `Exact` → one bucket shared by the CIDR; no selector → one bucket for everyone (a port
//!   ceiling). Named `policy/rule`.
//! - L7 rule (header selectors, or `count: Requests`): a notice. If it is keyed by the source
//!   address or by nothing and `kernelGuard` is not `Off`, it also yields a kernel
//!   `Connections` rule `policy/rule#guard` at the same rate and burst.
//! - Targets: the policy's `Port` targetRefs; none at all means every port. A policy whose
//!   targetRefs are all `HTTPRoute`/`Gateway` puts no rule in the kernel (until the listener
//!   map resolves them, the only kernel scope would be "every port", wider than asked).

use std::fmt;

use super::error::Location;
use super::model::*;
use crate::plan::{CountKind, KernelPlan, KernelRule, L7Plan, ListEntry, PortTarget, SourceSelector};

/// The compiler's output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub plan: KernelPlan,
    /// Rules answered by the L7 engine / rate limit service.
    pub l7: L7Plan,
    pub notices: Vec<Notice>,
    /// One per policy, in set order: what landed where (for `check` and logs).
    pub summaries: Vec<PolicySummary>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySummary {
    pub policy: String,
    /// Kernel rule names, derived guards included.
    pub kernel_rules: Vec<String>,
    /// Rules of the policy (by rule name) that no part of this agent enforces yet.
    pub not_enforced: Vec<String>,
}

impl fmt::Display for PolicySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} rule(s) in the kernel, {} not enforced",
            self.policy,
            self.kernel_rules.len(),
            self.not_enforced.len()
        )
    }
}

/// A warning: something accepted that is not (fully) enforced. Displayed like errors:
/// `FILE:LINE:COL[ (document N)]: FIELD.PATH: text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub location: Location,
    pub field: String,
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

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoticeKind {
    /// Header selectors or `count: Requests`; `guard` names the derived kernel rule, if any.
    #[error("rule {rule} is L7 ({reason}): enforced by the rate limit service, not available yet{}", guard_text(guard))]
    L7 { rule: String, reason: &'static str, guard: Option<String> },
    #[error("rule {rule}: global limits are enforced per node only until Redis sync lands")]
    GlobalPerNode { rule: String },
    #[error(
        "rule {rule}: several sourceCIDR selectors in one rule are not enforceable in the kernel yet; not enforced"
    )]
    SeveralSourceSelectors { rule: String },
    #[error(
        "rule {rule}: the policy targets only HTTPRoute/Gateway, resolved by the listener map, not enforced in the kernel yet"
    )]
    RouteTargetedRule { rule: String },
    #[error("{kind} {name}: resolved by the listener map, not enforced in the kernel yet")]
    RouteTarget { kind: RouteKind, name: String },
    #[error("penalty escalation is parsed but not enforced yet")]
    Penalty,
    /// A field of a gateway kind accepted but enforced by no layer ([`Policy::not_enforced`]).
    #[error("{what}")]
    NotEnforced { what: String },
}

fn guard_text(guard: &Option<String>) -> String {
    match guard {
        Some(g) => format!("; the kernel guard {g} limits new connections at the same rate"),
        None => String::new(),
    }
}

/// Compiles a validated set.
pub fn compile(set: &PolicySet) -> Compiled {
    let mut out = Compiled::default();
    for p in &set.policies {
        compile_policy(p, &mut out);
    }
    out
}

fn compile_policy(p: &Policy, out: &mut Compiled) {
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
    if let Some(pen) = &p.penalty {
        out.notices.push(notice(&pen.at, None, NoticeKind::Penalty));
    }
    let mut ports: Vec<PortTarget> = Vec::new();
    let mut routes = 0;
    for t in &p.targets {
        match &t.kind {
            TargetKind::Port(pt) => {
                if !ports.contains(pt) {
                    ports.push(*pt);
                }
            }
            TargetKind::Route { kind, name, .. } => {
                routes += 1;
                let kind = NoticeKind::RouteTarget { kind: *kind, name: name.clone() };
                out.notices.push(notice(&t.at, None, kind));
            }
        }
    }
    let routes_only = routes > 0 && ports.is_empty();
    let shadow = p.mode == Mode::Shadow;
    for r in &p.rules {
        let full = format!("{}/{}", p.name, r.name);
        let rule_notice = |kind| notice(&r.at, Some(&r.name), kind);
        if routes_only {
            out.notices.push(rule_notice(NoticeKind::RouteTargetedRule { rule: full }));
            summary.not_enforced.push(r.name.clone());
            continue;
        }
        let sources: Vec<&SourceCidr> = r.source_selectors().collect();
        if sources.len() > 1 && !r.has_headers() {
            out.notices.push(rule_notice(NoticeKind::SeveralSourceSelectors { rule: full }));
            summary.not_enforced.push(r.name.clone());
            continue;
        }
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
        };
        let landed = match r.count {
            Count::Kernel(count) => {
                out.plan.rules.push(kernel_rule(full.clone(), count));
                summary.kernel_rules.push(full.clone());
                true
            }
            Count::Requests => {
                let reason = if r.has_headers() { "selects on headers" } else { "counts Requests" };
                let guard = (r.kernel_guard && !r.has_headers()).then(|| format!("{full}#guard"));
                if let Some(g) = &guard {
                    out.plan.rules.push(kernel_rule(g.clone(), CountKind::Connections));
                    summary.kernel_rules.push(g.clone());
                }
                let kind = NoticeKind::L7 { rule: full.clone(), reason, guard: guard.clone() };
                out.notices.push(rule_notice(kind));
                summary.not_enforced.push(r.name.clone());
                guard.is_some()
            }
        };
        if landed && r.scope == Scope::Global {
            out.notices.push(rule_notice(NoticeKind::GlobalPerNode { rule: full }));
        }
    }
    out.summaries.push(summary);
}
