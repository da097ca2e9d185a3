//! HTTP requests judged by the engine: the request's attributes, the verdict, and
//! [`Engine::check_request`] (gateway-kind rules, all-or-nothing charging; see the module docs
//! of [`super`]).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::counters::{Charge, Now};
use super::matching::{CompiledPlan, Value, http_value};
use super::{Code, Engine, ReportedLimit, saturate_u32, whole_seconds_up};
use crate::plan::l7::L7Rule;

/// An HTTP request's attributes.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub remote: IpAddr,
    pub path: &'a str,
    pub method: &'a str,
    /// Lower-case names.
    pub headers: &'a [(&'a str, &'a str)],
    pub route: Option<&'a str>,
    pub gateway: Option<&'a str>,
}

/// The decision for an HTTP request.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub allowed: bool,
    /// One per applied rule.
    pub statuses: Vec<RuleStatus>,
}

/// One applied rule's decision for an HTTP request.
#[derive(Clone, Debug)]
pub struct RuleStatus {
    pub rule: String,
    pub code: Code,
    pub limit: ReportedLimit,
    pub remaining: u32,
    pub reset: Duration,
    pub shadow: bool,
}

impl Engine {
    /// Gateway-kind semantics for an HTTP request: every rule whose entries the request
    /// produces (and whose targets select it, route-level rules winning over gateway-level
    /// ones on their routes) applies, in plan order; `replaces` drops replaced rules as in
    /// the RLS. Rules matched only over RLS ([`crate::plan::l7::Attribute::Descriptor`]
    /// entries) and `unlimited` rules give no status.
    ///
    /// All-or-nothing charging (see the module docs): the request is allowed if no non-shadow
    /// rule refuses it, and only an allowed request keeps its charges. A shadow rule that
    /// would refuse reports `code: OverLimit` with `shadow: true` and does not deny. After a
    /// denial, `remaining` of the rules whose charge was given back counts that refund.
    pub fn check_request(&self, req: &HttpRequest<'_>, now: Instant) -> Verdict {
        let now = self.clock.at(now);
        self.with_plan(|plan| self.decide_http(plan, req, now))
    }

    fn decide_http(&self, plan: &CompiledPlan, req: &HttpRequest<'_>, now: Now) -> Verdict {
        let produces =
            |rule: &L7Rule| plan.targets_select(rule, req) && rule.entries.iter().all(|e| http_value(e, req).is_some());
        // Names replaced by a rule that applies to this request (rarely any: skipped then).
        let replaced: Vec<&str> = if plan.http_replaces {
            plan.http_rules
                .iter()
                .map(|&i| &plan.rules[i].rule)
                .filter(|r| !r.replaces.is_empty() && produces(r))
                .flat_map(|r| r.replaces.iter().map(String::as_str))
                .collect()
        } else {
            Vec::new()
        };
        let applies = |rule: &L7Rule| produces(rule) && !replaced.contains(&rule.name.as_str());

        let mut statuses = Vec::new();
        let mut allowed = true;
        for &index in &plan.http_rules {
            let rule = &plan.rules[index];
            let (Some(meter), Some(reported)) = (&rule.meter, &rule.reported) else { continue };
            if !applies(&rule.rule) {
                continue;
            }
            let values = rule.rule.entries.iter().map(|e| http_value(e, req).unwrap_or(Value::Str("")));
            let outcome = self.charge(rule, meter, values, now, 1, Charge::IfConforms);
            allowed &= outcome.conforms || rule.rule.shadow;
            statuses.push(RuleStatus {
                rule: rule.rule.name.clone(),
                code: if outcome.conforms { Code::Ok } else { Code::OverLimit },
                limit: reported.clone(),
                remaining: if outcome.conforms { saturate_u32(outcome.remaining) } else { 0 },
                reset: whole_seconds_up(outcome.reset_ns),
                shadow: rule.rule.shadow,
            });
        }

        if !allowed {
            // Give back what the conforming rules took. Statuses are in the order of the
            // applicable rules, and a status is Ok exactly when its charge was taken.
            let applied =
                plan.http_rules.iter().map(|&i| &plan.rules[i]).filter(|r| r.meter.is_some() && applies(&r.rule));
            for (rule, status) in applied.zip(&mut statuses) {
                let Some(meter) = &rule.meter else { continue };
                if status.code != Code::Ok {
                    continue;
                }
                let values = rule.rule.entries.iter().map(|e| http_value(e, req).unwrap_or(Value::Str("")));
                self.refund(rule, meter, values, now, 1);
                status.remaining = status.remaining.saturating_add(1);
            }
        }
        Verdict { allowed, statuses }
    }
}
