//! The rate limit rules of a `BackendTrafficPolicy` (shared with TEG's `RateLimitFilter`):
//! `rateLimit` with its `local` / `global` blocks, each rule's name, limit and `shadowMode`,
//! and Envoy Gateway's units. A rule's `clientSelectors` are read in [`super::selectors`].

use std::collections::HashMap;

use super::selectors::{Selector, selector};
use crate::plan::l7::HitsAddend;
use crate::plan::{Limit, Unit};
use crate::policy::error::{ErrorKind, FieldError};
use crate::policy::model::{At, Count, Located, Mode, Rule, RuleCost, Scope};
use crate::policy::reader::{Node, Reader};
use crate::policy::spec::{S, pos_of};
use crate::policy::validate::{name_problem, parse_unit};

const NS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// Rules read so far: names must be unique in the policy; unnamed rules are numbered.
#[derive(Default)]
pub(in crate::policy::kinds) struct Rules {
    pub out: Vec<Rule>,
    /// Rules read with `shadowMode: true`, and where that was written.
    shadow: Vec<(String, At)>,
    /// Rule name → line it was first used on.
    seen: HashMap<String, u64>,
    /// Rules read so far, kept or not: the next unnamed rule is `rule-{next}`.
    next: usize,
}

impl Rules {
    /// Envoy Gateway's per-rule `shadowMode` (count, never deny). When every rule has it the
    /// policy runs in `Shadow` mode, which means exactly that; otherwise the shadow rules are
    /// dropped with a warning, since enforcing them would deny what the gateway only counts.
    pub fn apply_shadow_mode(&mut self, r: &mut Reader, mode: &mut Mode) {
        if self.shadow.is_empty() {
            return;
        }
        if self.shadow.len() == self.out.len() {
            *mode = Mode::Shadow;
            return;
        }
        for (name, at) in self.shadow.drain(..) {
            let value = format!(
                "not enforced: rule {name} is in shadow mode beside enforced rules; this agent shadows whole \
                 policies only (the rule is dropped)"
            );
            self.out.retain(|rule| rule.name != name);
            r.warnings.push(Located { value, at });
        }
    }

    /// Claims `name` for the rule at `n`; false (and an error) when it is already taken.
    pub fn claim(&mut self, r: &mut Reader, name: &str, n: &S<Node>, field: &str) -> bool {
        if let Some(first_line) = self.seen.get(name) {
            let err = ErrorKind::DuplicateRule { name: name.to_owned(), first_line: *first_line };
            r.errors.push(FieldError::new(pos_of(n), field, err));
            return false;
        }
        self.seen.insert(name.to_owned(), pos_of(n).line);
        true
    }
}

/// `rateLimit` of a `BackendTrafficPolicy`, or the whole `spec` of a `RateLimitFilter`:
/// `type`, `local`, `global`; any other key is unknown.
pub(in crate::policy::kinds) fn rate_limit(r: &mut Reader, n: &S<Node>, field: &str, rules: &mut Rules) {
    let Some(entries) = r.map(n, field) else { return };
    let (mut declared, mut local, mut global) = (None, None, None);
    let mut type_ok = true;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "type" => match r.opt_string(v, &f) {
                None => type_ok = v.value.is_null(),
                Some(t) if t.eq_ignore_ascii_case("local") => declared = Some(Scope::Local),
                Some(t) if t.eq_ignore_ascii_case("global") => declared = Some(Scope::Global),
                Some(t) => {
                    let err = ErrorKind::UnknownValue { what: "type", value: t, expected: "Global or Local" };
                    r.errors.push(FieldError::new(pos_of(v), f, err));
                    type_ok = false;
                }
            },
            "local" => local = Some(v),
            "global" => global = Some(v),
            _ => r.unknown_field(v, &f),
        }
    }
    if !type_ok {
        return;
    }
    for (scope, block, key) in [(Scope::Local, local, "local"), (Scope::Global, global, "global")] {
        let f = format!("{field}.{key}");
        match (declared, block) {
            (Some(d), None) if d == scope => r.missing(n, field, key),
            (Some(d), Some(v)) if d != scope => {
                r.warn(v, &f, "not enforced: ignored because `type` selects the other block");
            }
            (_, Some(v)) => rule_block(r, v, &f, scope, rules),
            (_, None) => {}
        }
    }
}

/// `{rules: [...]}`.
fn rule_block(r: &mut Reader, n: &S<Node>, field: &str, scope: Scope, rules: &mut Rules) {
    let Some(entries) = r.map(n, field) else { return };
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        if k != "rules" {
            r.unknown_field(v, &f);
            continue;
        }
        let Some(items) = r.seq(v, &f) else { continue };
        for (i, item) in items.iter().enumerate() {
            rule(r, item, &format!("{f}[{i}]"), scope, rules);
        }
    }
}

fn rule(r: &mut Reader, n: &S<Node>, field: &str, scope: Scope, rules: &mut Rules) {
    let index = rules.next;
    rules.next += 1;
    let Some(entries) = r.map(n, field) else { return };
    let before = r.errors.len();
    let (mut name, mut limit, mut has_limit) = (None, None, false);
    let mut shadow = None;
    let mut selectors = Vec::new();
    let mut enforceable = true;
    let mut cost = None;
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "name" => {
                if let Some(s) = r.string(v, &f) {
                    if let Some(reason) = name_problem(&s) {
                        let err = ErrorKind::InvalidName { name: s.clone(), reason };
                        r.errors.push(FieldError::new(pos_of(v), &f, err));
                    }
                    name = Some((s, v, f));
                }
            }
            "clientSelectors" => {
                let Some(items) = r.seq(v, &f) else { continue };
                for (i, item) in items.iter().enumerate() {
                    match selector(r, item, &format!("{f}[{i}]")) {
                        Selector::Ok(s) => selectors.push(s),
                        Selector::Unenforceable => enforceable = false,
                        Selector::Invalid => {}
                    }
                }
            }
            "limit" => {
                has_limit = true;
                limit = read_limit(r, v, &f);
            }
            "cost" => cost = read_cost(r, v, &f).map(|c| (c, v, f)),
            // One counter per rule across its targets is this agent's only way to count, which
            // is what `shared: true` asks for; `false` (per-target counters) is not.
            "shared" => {
                if r.opt_bool(v, &f) == Some(false) {
                    r.warn(v, &f, "not enforced: the rule's counter is shared across its targets (as shared: true)");
                }
            }
            "shadowMode" => {
                if r.opt_bool(v, &f) == Some(true) {
                    shadow = Some(At::new(pos_of(v), &f));
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has_limit {
        r.missing(n, field, "limit");
    }
    let name = match name {
        Some((s, v, f)) => rules.claim(r, &s, v, &f).then_some(s),
        None => {
            let s = format!("rule-{index}");
            rules.claim(r, &s, n, field).then_some(s)
        }
    };
    if r.errors.len() > before {
        return;
    }
    let (Some(name), Some(limit)) = (name, limit) else { return };
    if !enforceable {
        r.warn(n, field, &format!("not enforced: rule {name} selects on a condition this agent cannot match"));
        return;
    }
    if let Some(at) = shadow {
        rules.shadow.push((name.clone(), at));
    }
    let cost = match cost {
        // Envoy Gateway sends costs to the rate limit service only: a local rule is counted in
        // the proxy, which has no hits_addend.
        Some((_, v, f)) if scope == Scope::Local => {
            let message = "cost applies to global rules only (a local rule is counted in the proxy)".to_owned();
            r.schema(pos_of(v), &f, message);
            return;
        }
        Some((c, _, _)) => c,
        None => RuleCost::default(),
    };
    rules.out.push(Rule {
        name,
        scope,
        selectors,
        count: Count::Requests,
        limit,
        kernel_guard: true,
        cost,
        at: At::new(pos_of(n), field),
    });
}

/// `cost: {request: {from: Number | Metadata, number, metadata: {namespace, key}}, response:
/// ...}`.
fn read_cost(r: &mut Reader, n: &S<Node>, field: &str) -> Option<RuleCost> {
    let entries = r.map(n, field)?;
    let before = r.errors.len();
    let mut cost = RuleCost::default();
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "request" => cost.request = cost_spec(r, v, &f),
            "response" => cost.response = cost_spec(r, v, &f),
            _ => r.unknown_field(v, &f),
        }
    }
    (r.errors.len() == before).then_some(cost)
}

fn cost_spec(r: &mut Reader, n: &S<Node>, field: &str) -> Option<HitsAddend> {
    let entries = r.map(n, field)?;
    let (mut from, mut number, mut metadata) = (None, None, None);
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "from" => from = r.string(v, &f).map(|s| (s, v)),
            "number" => number = r.int_in(v, &f, 0, i64::from(u32::MAX)).and_then(|x| u64::try_from(x).ok()),
            "metadata" => {
                let Some(m) = r.map(v, &f) else { continue };
                let (mut ns, mut key) = (None, None);
                for (mk, mv) in m {
                    let mf = format!("{f}.{mk}");
                    match mk.as_str() {
                        "namespace" => ns = r.string(mv, &mf),
                        "key" => key = r.string(mv, &mf),
                        _ => r.unknown_field(mv, &mf),
                    }
                }
                match (ns, key) {
                    (Some(namespace), Some(key)) => metadata = Some(HitsAddend::Metadata { namespace, key }),
                    (None, _) => r.missing(v, &f, "namespace"),
                    (_, None) => r.missing(v, &f, "key"),
                }
            }
            _ => r.unknown_field(v, &f),
        }
    }
    match from {
        Some((f, _)) if f.eq_ignore_ascii_case("number") => match number {
            Some(n) => Some(HitsAddend::Number(n)),
            None => {
                r.missing(n, field, "number");
                None
            }
        },
        Some((f, _)) if f.eq_ignore_ascii_case("metadata") => {
            if metadata.is_none() && !entries.iter().any(|(k, _)| k == "metadata") {
                r.missing(n, field, "metadata");
            }
            metadata
        }
        Some((f, at)) => {
            let err = ErrorKind::UnknownValue { what: "from", value: f, expected: "Number or Metadata" };
            r.errors.push(FieldError::new(pos_of(at), format!("{field}.from"), err));
            None
        }
        None => {
            r.missing(n, field, "from");
            None
        }
    }
}

/// `{requests, unit}`.
fn read_limit(r: &mut Reader, n: &S<Node>, field: &str) -> Option<Limit> {
    let entries = r.map(n, field)?;
    let (mut requests, mut unit, mut has) = (None, None, (false, false));
    for (k, v) in entries {
        let f = format!("{field}.{k}");
        match k.as_str() {
            "requests" => {
                has.0 = true;
                // 0 denies every request the rule selects, as Envoy Gateway allows.
                requests = r.int_in(v, &f, 0, i64::MAX).and_then(|x| u64::try_from(x).ok());
            }
            "unit" => {
                has.1 = true;
                unit = r.string(v, &f).and_then(|s| match eg_unit(&s) {
                    Some(u) => Some(u),
                    None => {
                        r.errors.push(FieldError::new(pos_of(v), f, ErrorKind::UnknownUnit { value: s }));
                        None
                    }
                });
            }
            _ => r.unknown_field(v, &f),
        }
    }
    if !has.0 {
        r.missing(n, field, "requests");
    }
    if !has.1 {
        r.missing(n, field, "unit");
    }
    Some(Limit { requests: requests?, unit: unit?, burst: 0 })
}

/// The native units plus Envoy Gateway's `Week`, `Month` and `Year` (7, 30 and 365 days, as
/// Envoy's rate limit service counts them).
fn eg_unit(s: &str) -> Option<Unit> {
    if let Some(u) = parse_unit(s) {
        return Some(u);
    }
    let lower = s.trim().to_ascii_lowercase();
    match lower.strip_suffix('s').unwrap_or(&lower) {
        "week" => Some(Unit::Interval { ns: 7 * NS_PER_DAY }),
        "month" => Some(Unit::Interval { ns: 30 * NS_PER_DAY }),
        "year" => Some(Unit::Interval { ns: 365 * NS_PER_DAY }),
        _ => None,
    }
}
