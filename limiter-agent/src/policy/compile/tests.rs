//! Compiler tests: every kind into one plan, judged where it matters by the real L7 engine.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;
use crate::l7::{Code, DescriptorEntry, Engine, EngineConfig, HttpRequest, RequestDescriptor, RlsRequest};
use crate::plan::{Algorithm, Attribute, EntryMatch, EntryValue, L7Rule, Limit, Scope as PlanScope, Unit};
use crate::policy::source::{Document, load_file_str};

const NATIVE: &str = "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\n";
const EG: &str = "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: BackendTrafficPolicy\n";

/// A set from named files' texts, in order (policies and ratelimit configs).
fn set_of(files: &[(&str, &str)]) -> PolicySet {
    let mut set = PolicySet::default();
    for (name, text) in files {
        let docs = load_file_str(Path::new(name), text).unwrap_or_else(|e| panic!("{e}"));
        for d in docs {
            match d {
                Document::Policy(p) => set.policies.push(p),
                Document::RatelimitConfig(c) => set.ratelimit_configs.push(c),
            }
        }
    }
    set
}

fn compile_text(text: &str) -> Compiled {
    let c = compile(&set_of(&[("p.yaml", text)]));
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    c
}

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(dir)
}

fn compile_paths(paths: &[PathBuf]) -> Compiled {
    load_and_compile(paths).unwrap_or_else(|e| panic!("{e}"))
}

fn l7<'a>(c: &'a Compiled, name: &str) -> &'a L7Rule {
    c.l7.rules.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no L7 rule {name} in {:#?}", c.l7.rules))
}

fn notices(c: &Compiled) -> Vec<String> {
    c.notices.iter().map(ToString::to_string).collect()
}

fn generic(name: &str) -> EntryMatch {
    EntryMatch { key: "generic_key".into(), attribute: Attribute::Fixed, value: EntryValue::Exact(name.into()) }
}

fn header_match(attribute: Attribute, value: &str) -> EntryMatch {
    EntryMatch { key: "header_match".into(), attribute, value: EntryValue::Exact(value.into()) }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn http<'a>(remote: &str, headers: &'a [(&'a str, &'a str)], route: Option<&'a str>) -> HttpRequest<'a> {
    HttpRequest { remote: ip(remote), path: "/", method: "GET", headers, route, gateway: Some("gw") }
}

/// Names of the rules that applied to a request, and whether it was allowed.
fn judge(engine: &Engine, req: &HttpRequest<'_>, now: Instant) -> (bool, Vec<String>) {
    let v = engine.check_request(req, now);
    (v.allowed, v.statuses.into_iter().map(|s| s.rule).collect())
}

fn rls(domain: &str, entries: &[(&str, &str)]) -> RlsRequest {
    RlsRequest {
        domain: domain.into(),
        descriptors: vec![RequestDescriptor {
            entries: entries.iter().map(|(k, v)| DescriptorEntry { key: (*k).into(), value: (*v).into() }).collect(),
            hits_addend: None,
            limit: None,
        }],
        hits_addend: 1,
    }
}

#[test]
fn native_l7_rules_map_every_selector_to_descriptor_entries() {
    let text = format!(
        "{NATIVE}metadata: {{name: p}}\nspec:\n  mode: Shadow\n  targetRefs: [{{kind: HTTPRoute, name: api}}, {{kind: Gateway, name: gw}}]\n  rateLimit:\n    local:\n      rules:\n        - name: per-user\n          clientSelectors: [{{headers: [{{name: X-User-ID, type: Distinct}}]}}]\n          limit: {{requests: 100, unit: Minute}}\n        - name: anonymous\n          clientSelectors: [{{headers: [{{name: x-user-id, type: Distinct, invert: true}}]}}]\n          limit: {{requests: 10, unit: Minute}}\n        - name: vip\n          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 10.0.0.0/8}}, headers: [{{name: x-plan, value: gold}}]}}]\n          limit: {{requests: 5, unit: Second, burst: 5}}\n        - name: not-gold\n          clientSelectors: [{{sourceCIDR: {{value: 192.0.2.0/24, invert: true}}}}, {{headers: [{{name: x-plan, value: gold, invert: true}}]}}]\n          count: Requests\n          limit: {{requests: 1, unit: Second}}\n    global:\n      rules:\n        - name: budget\n          count: Requests\n          limit: {{requests: 1000, unit: Hour}}\n"
    );
    let c = compile_text(&text);
    let names: Vec<&str> = c.l7.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["p/per-user", "p/anonymous", "p/vip", "p/not-gold", "p/budget"]);

    let per_user = l7(&c, "p/per-user");
    assert_eq!(
        per_user.entries,
        [
            generic("p/per-user"),
            EntryMatch {
                key: "x-user-id".into(),
                attribute: Attribute::Header("x-user-id".into()),
                value: EntryValue::Distinct
            },
        ]
    );
    assert_eq!(per_user.domain, crate::plan::l7::DEFAULT_DOMAIN);
    assert_eq!(per_user.algorithm, Algorithm::TokenBucket);
    assert_eq!(per_user.scope, PlanScope::Local);
    assert_eq!(per_user.limit, Some(Limit { requests: 100, unit: Unit::Minute, burst: 0 }));
    assert!(per_user.shadow, "mode: Shadow");
    assert_eq!(per_user.targets, [L7Target::Route("api".into()), L7Target::Gateway("gw".into())]);
    assert!(per_user.replaces.is_empty());

    assert_eq!(
        l7(&c, "p/anonymous").entries,
        [generic("p/anonymous"), header_match(Attribute::HeaderAbsent("x-user-id".into()), "no x-user-id")]
    );
    let vip = l7(&c, "p/vip");
    assert_eq!(
        vip.entries,
        [
            generic("p/vip"),
            EntryMatch {
                key: "remote_address".into(),
                attribute: Attribute::RemoteAddress,
                value: EntryValue::Cidr { nets: vec!["10.0.0.0/8".parse().unwrap()], distinct: true, invert: false },
            },
            header_match(Attribute::HeaderEquals { name: "x-plan".into(), value: "gold".into() }, "x-plan=gold"),
        ]
    );
    assert_eq!(vip.limit.map(|l| l.burst), Some(5));
    assert_eq!(
        l7(&c, "p/not-gold").entries,
        [
            generic("p/not-gold"),
            EntryMatch {
                key: "remote_address".into(),
                attribute: Attribute::RemoteAddress,
                value: EntryValue::Cidr { nets: vec!["192.0.2.0/24".parse().unwrap()], distinct: false, invert: true },
            },
            header_match(Attribute::HeaderNotEquals { name: "x-plan".into(), value: "gold".into() }, "x-plan!=gold"),
        ]
    );
    let budget = l7(&c, "p/budget");
    assert_eq!(budget.scope, PlanScope::Global);
    assert_eq!(budget.entries, [generic("p/budget")]);
    // Route-only policy: no kernel rule and no guard at all.
    assert!(c.plan.rules.is_empty(), "{:?}", c.plan.rules);
    assert_eq!(c.summaries[0].l7_rules.len(), 5);
    assert!(c.summaries[0].not_enforced.is_empty());
    let n = notices(&c);
    assert!(
        n.contains(&"p.yaml:25:11: spec.rateLimit.global.rules[0]: rule p/budget: global: shared through Redis when the agent runs with --rls-backend redis, else per node".to_owned()),
        "{n:#?}"
    );
    assert!(
        n.contains(&"p.yaml:25:11: spec.rateLimit.global.rules[0]: rule p/budget is L7 (counts Requests): answered by the rate limit service (`limiter-agent run --rls-listen`, domain limiter) when the gateway sends its descriptor, see `limiter-agent explain`; no kernel guard: the policy's HTTPRoute/Gateway targets are not in a ListenerMap, so the kernel has no ports for them".to_owned()),
        "{n:#?}"
    );
    assert_eq!(n.len(), 8, "two targets, five L7 rules, one global: {n:#?}");
}

#[test]
fn invert_selects_requests_without_the_header_or_value() {
    let text = format!(
        "{NATIVE}metadata: {{name: p}}\nspec:\n  rateLimit:\n    local:\n      rules:\n        - name: anonymous\n          clientSelectors: [{{headers: [{{name: x-user-id, type: Distinct, invert: true}}]}}]\n          limit: {{requests: 1, unit: Minute}}\n        - name: not-gold\n          clientSelectors: [{{headers: [{{name: x-plan, value: gold, invert: true}}]}}]\n          limit: {{requests: 1, unit: Minute}}\n"
    );
    let c = compile_text(&text);
    let engine = Engine::new(c.l7.clone(), EngineConfig::default());
    let now = Instant::now();
    // No header at all: both inverted rules apply.
    assert_eq!(
        judge(&engine, &http("192.0.2.1", &[], None), now),
        (true, vec!["p/anonymous".into(), "p/not-gold".into()])
    );
    // Identified, gold: neither applies (and nothing limits it).
    let gold = [("x-user-id", "alice"), ("x-plan", "gold")];
    for _ in 0..3 {
        assert_eq!(judge(&engine, &http("192.0.2.1", &gold, None), now), (true, vec![]));
    }
    // Identified, another plan: only not-gold, whose single token the first request took.
    let silver = [("x-user-id", "bob"), ("x-plan", "silver")];
    assert_eq!(judge(&engine, &http("192.0.2.1", &silver, None), now), (false, vec!["p/not-gold".into()]));
    // Anonymous again: its bucket is spent too.
    assert!(!engine.check_request(&http("192.0.2.1", &[], None), now).allowed);

    // The same rules answer over RLS for the descriptors the gateway's actions send.
    let r = engine
        .should_rate_limit(&rls("limiter", &[("generic_key", "p/anonymous"), ("header_match", "no x-user-id")]), now);
    let r = r.unwrap();
    assert_eq!((r.overall, r.statuses[0].rule.as_deref()), (Code::OverLimit, Some("p/anonymous")));
}

#[test]
fn route_level_policies_override_gateway_level_ones() {
    let gateway = format!(
        "{EG}metadata: {{name: gw-wide, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: gw}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n        - limit: {{requests: 1, unit: Minute}}\n"
    );
    let route = format!(
        "{EG}metadata: {{name: checkout, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: checkout}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n        - limit: {{requests: 3, unit: Minute}}\n"
    );
    let c = compile(&set_of(&[("gw.yaml", &gateway), ("route.yaml", &route)]));
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert_eq!(l7(&c, "gw-wide/rule-0").targets, [L7Target::Gateway("gw".into())]);
    assert_eq!(l7(&c, "checkout/rule-0").targets, [L7Target::Route("checkout".into())]);
    assert!(c.plan.rules.is_empty(), "route/gateway targets: no kernel guard");

    let engine = Engine::new(c.l7.clone(), EngineConfig::default());
    let now = Instant::now();
    // On the checkout route only the route's policy applies: 3 per minute, not the gateway's 1.
    for i in 0..3 {
        let (allowed, rules) = judge(&engine, &http("192.0.2.1", &[], Some("checkout")), now);
        assert!(allowed, "request {i}");
        assert_eq!(rules, ["checkout/rule-0"]);
    }
    assert!(!engine.check_request(&http("192.0.2.1", &[], Some("checkout")), now).allowed);
    // Elsewhere on the gateway, the gateway's policy.
    assert_eq!(judge(&engine, &http("192.0.2.1", &[], Some("other")), now), (true, vec!["gw-wide/rule-0".into()]));
    assert!(!engine.check_request(&http("192.0.2.1", &[], Some("other")), now).allowed);
}

#[test]
fn kernel_guard_only_where_the_kernel_knows_the_ports() {
    let text = format!(
        "{NATIVE}metadata: {{name: n}}\nspec:\n  targetRefs: [{{kind: Port, port: 8080}}]\n  rateLimit:\n    local:\n      rules:\n        - name: per-client\n          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]\n          count: Requests\n          limit: {{requests: 5, unit: Second, burst: 2}}\n        - name: off\n          count: Requests\n          kernelGuard: Off\n          limit: {{requests: 5, unit: Second}}\n        - name: two-ranges\n          clientSelectors: [{{sourceCIDR: {{value: 10.0.0.0/8}}}}, {{sourceCIDR: {{value: 10.1.0.0/16}}}}]\n          count: Requests\n          limit: {{requests: 5, unit: Second}}\n        - name: per-user\n          clientSelectors: [{{headers: [{{name: x-user-id, type: Distinct}}]}}]\n          limit: {{requests: 5, unit: Second}}\n---\napiVersion: gateway.envoyproxy.io/v1alpha1\nkind: RateLimitFilter\nmetadata: {{name: teg}}\nspec:\n  type: Global\n  global:\n    rules:\n      - limit: {{requests: 1, unit: Second}}\n"
    );
    let c = compile_text(&text);
    let kernel: Vec<(&str, CountKind, u64)> =
        c.plan.rules.iter().map(|r| (r.name.as_str(), r.count, r.limit.burst)).collect();
    assert_eq!(kernel, [("n/per-client#guard", CountKind::Connections, 2)]);
    assert_eq!(c.plan.rules[0].targets, [PortTarget { port: 8080, protocol: crate::plan::Protocol::Tcp }]);
    assert!(c.plan.rules[0].source.distinct);
    // Every rule is in the L7 plan, guard or not.
    assert_eq!(c.l7.rules.len(), 5);
    let guard_reasons: Vec<String> = c
        .notices
        .iter()
        .filter_map(|n| match &n.kind {
            NoticeKind::L7 { rule, guard, no_guard, .. } => Some(format!("{rule}: {guard:?} {no_guard:?}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        guard_reasons,
        [
            "n/per-client: Some(\"n/per-client#guard\") None",
            "n/off: None Some(Off)",
            "n/two-ranges: None Some(SeveralSources)",
            "n/per-user: None None",
            "teg/rule-0: None Some(NoPorts)",
        ]
    );
    // Two sourceCIDR selectors are both in the L7 descriptor (all must match).
    assert_eq!(l7(&c, "n/two-ranges").entries.len(), 3);
}

#[test]
fn not_enforced_fields_are_warnings_naming_the_field() {
    let c = compile_paths(&[examples("gateways/envoy-gateway/anonymous-users.yaml")]);
    let fields: Vec<(&str, &NoticeKind)> = c
        .notices
        .iter()
        .filter(|n| matches!(n.kind, NoticeKind::NotEnforced { .. }))
        .map(|n| (n.field.as_str(), &n.kind))
        .collect();
    let names: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
    assert!(names.starts_with(&["spec.timeout", "spec.retry"]), "{names:?}");
    // The rules themselves are enforced: in the L7 plan, with the documented limits.
    assert_eq!(l7(&c, "eg-anonymous/rule-0").limit, Some(Limit { requests: 100, unit: Unit::Minute, burst: 0 }));
    assert_eq!(l7(&c, "eg-anonymous/rule-1").limit, Some(Limit { requests: 10, unit: Unit::Minute, burst: 0 }));
    assert_eq!(l7(&c, "eg-anonymous/rule-1").scope, PlanScope::Global);
}

#[test]
fn ratelimit_config_nesting_wildcard_unlimited_replaces_shadow() {
    let c = compile_paths(&[examples("gateways/ratelimit/nested.yaml")]);
    let rules: Vec<(&str, Option<u64>, bool, &[String])> =
        c.l7.rules
            .iter()
            .map(|r| (r.name.as_str(), r.limit.map(|l| l.requests), r.shadow, r.replaces.as_slice()))
            .collect();
    let replaced = ["client-daily".to_owned()];
    assert_eq!(
        rules,
        [
            ("shop/authenticated=false/remote_address", Some(30), false, &[][..]),
            ("shop/authenticated=false/remote_address=10.0.0.5", None, false, &[][..]),
            ("shop/path=/api/v1/*", Some(50), true, &[][..]),
            ("client-daily", Some(5000), false, &[][..]),
            ("trial-weekly", Some(2000), false, &replaced[..]),
        ]
    );
    for r in &c.l7.rules {
        assert_eq!((r.domain.as_str(), r.algorithm, r.scope), ("shop", Algorithm::FixedWindow, PlanScope::Global));
        assert!(r.entries.iter().all(|e| e.attribute == Attribute::Descriptor), "{r:?}");
        assert!(r.targets.is_empty());
    }
    let entry = |k: &str, v: EntryValue| EntryMatch { key: k.into(), attribute: Attribute::Descriptor, value: v };
    assert_eq!(
        l7(&c, "shop/authenticated=false/remote_address=10.0.0.5").entries,
        [
            entry("authenticated", EntryValue::Exact("false".into())),
            entry("remote_address", EntryValue::Exact("10.0.0.5".into()))
        ]
    );
    assert_eq!(l7(&c, "shop/path=/api/v1/*").entries, [entry("path", EntryValue::Wildcard("/api/v1/*".into()))]);
    assert_eq!(
        l7(&c, "trial-weekly").entries,
        [entry("client_id", EntryValue::Distinct), entry("plan", EntryValue::Exact("trial".into()))]
    );
    assert_eq!(l7(&c, "trial-weekly").limit.map(|l| l.unit), Some(Unit::Interval { ns: 7 * 86_400 * 1_000_000_000 }));
    assert_eq!(c.summaries[0].policy, "ratelimit config shop");
    assert_eq!(c.summaries[0].l7_rules.len(), 5);
    assert!(notices(&c).iter().any(|n| n.contains("the rules of domain shop: global:")), "{:#?}", c.notices);

    // The engine reads them as the reference service does: unlimited override, shadow.
    let engine = Engine::new(c.l7.clone(), EngineConfig::default());
    let now = Instant::now();
    let health = rls("shop", &[("authenticated", "false"), ("remote_address", "10.0.0.5")]);
    for _ in 0..40 {
        assert_eq!(engine.should_rate_limit(&health, now).unwrap().overall, Code::Ok);
    }
    let orders = rls("shop", &[("path", "/api/v1/orders")]);
    for _ in 0..60 {
        let r = engine.should_rate_limit(&orders, now).unwrap();
        assert_eq!((r.overall, r.statuses[0].rule.as_deref()), (Code::Ok, Some("shop/path=/api/v1/*")));
    }
}

#[test]
fn kgateway_descriptors_link_to_the_config_rules_that_answer_them() {
    let c = compile_paths(&[
        examples("gateways/kgateway/global-descriptors.yaml"),
        examples("gateways/kgateway/ratelimit-config.yaml"),
    ]);
    let by_ip = l7(&c, "api-gateway/generic_key=api/remote_address");
    let attrs: Vec<&Attribute> = by_ip.entries.iter().map(|e| &e.attribute).collect();
    assert_eq!(attrs, [&Attribute::Fixed, &Attribute::RemoteAddress]);
    assert_eq!(by_ip.targets, [L7Target::Route("api".into())]);
    let by_user = l7(&c, "api-gateway/X-User-ID/path");
    let attrs: Vec<&Attribute> = by_user.entries.iter().map(|e| &e.attribute).collect();
    assert_eq!(attrs, [&Attribute::Header("x-user-id".into()), &Attribute::Path]);
    // Keys stay as the config writes them (RLS matching is case-sensitive).
    assert_eq!(by_user.entries[0].key, "X-User-ID");
    assert!(!c.notices.iter().any(|n| matches!(n.kind, NoticeKind::UnmatchedDescriptor { .. })), "{:#?}", c.notices);

    // Linked, the rules also judge HTTP requests on the route: 60/min per client address.
    let engine = Engine::new(c.l7.clone(), EngineConfig::default());
    let now = Instant::now();
    let (allowed, rules) = judge(&engine, &http("192.0.2.7", &[], Some("api")), now);
    assert!(allowed);
    assert_eq!(rules, ["api-gateway/generic_key=api/remote_address"]);
    let with_user = [("x-user-id", "alice")];
    let (_, rules) = judge(&engine, &http("192.0.2.7", &with_user, Some("api")), now);
    assert_eq!(rules, ["api-gateway/generic_key=api/remote_address", "api-gateway/X-User-ID/path"]);

    // Without the config, each descriptor the policy sends is a warning.
    let c = compile_paths(&[examples("gateways/kgateway/global-descriptors.yaml")]);
    let unmatched: Vec<String> = c
        .notices
        .iter()
        .filter(|n| matches!(n.kind, NoticeKind::UnmatchedDescriptor { .. }))
        .map(|n| format!("{}: {}", n.field, n.kind))
        .collect();
    assert_eq!(
        unmatched,
        [
            "spec.rateLimit.global.descriptors[0]: descriptor [(generic_key, api), (remote_address, *)] matches no rule of any envoyproxy/ratelimit config of this policy set: the rate limit service answers it OK without a limit",
            "spec.rateLimit.global.descriptors[1]: descriptor [(X-User-ID, *), (path, *)] matches no rule of any envoyproxy/ratelimit config of this policy set: the rate limit service answers it OK without a limit",
        ]
    );
}

#[test]
fn a_generic_value_the_config_does_not_know_is_unmatched() {
    let policy = "apiVersion: gateway.kgateway.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]\n  rateLimit:\n    global:\n      descriptors:\n        - entries: [{type: Generic, generic: {key: tier, value: gold}}]\n        - entries: [{type: Generic, generic: {key: tier, value: silver}}]\n      extensionRef: {name: rl}\n";
    let config = "domain: d\ndescriptors:\n  - key: tier\n    value: gol*\n    rate_limit: {unit: second, requests_per_unit: 1}\n";
    let c = compile(&set_of(&[("t.yaml", policy), ("d.yaml", config)]));
    let unmatched: Vec<&str> = c
        .notices
        .iter()
        .filter(|n| matches!(n.kind, NoticeKind::UnmatchedDescriptor { .. }))
        .map(|n| n.field.as_str())
        .collect();
    assert_eq!(unmatched, ["spec.rateLimit.global.descriptors[1]"]);
    assert_eq!(c.l7.rules[0].entries[0].attribute, Attribute::Fixed);
}

#[test]
fn duplicate_l7_rule_names_are_errors_naming_both_places() {
    let a = "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {name: shared-name, unit: second, requests_per_unit: 1}\n";
    let b = "domain: b\ndescriptors:\n  - key: x\n  - key: k\n    rate_limit: {name: shared-name, unit: minute, requests_per_unit: 1}\n";
    let c = compile(&set_of(&[("a.yaml", a), ("b.yaml", b)]));
    let errors: Vec<String> = c.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "b.yaml:4:5: descriptors[1]: duplicate L7 rule name \"shared-name\" (first at a.yaml:3:5): rule names key counters, metrics and x-ratelimit-limit"
        ]
    );
    assert!(c.into_result().is_err());

    // A native rule and a config path can collide too: policy `api` rule `x` vs domain `api` key `x`.
    let native = format!(
        "{NATIVE}metadata: {{name: api}}\nspec:\n  rateLimit:\n    local:\n      rules:\n        - name: x\n          count: Requests\n          limit: {{requests: 1, unit: Second}}\n"
    );
    let config = "domain: api\ndescriptors:\n  - key: x\n    rate_limit: {unit: second, requests_per_unit: 1}\n";
    let c = compile(&set_of(&[("p.yaml", &native), ("c.yaml", config)]));
    let errors: Vec<String> = c.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("c.yaml:3:5: descriptors[0]: duplicate L7 rule name \"api/x\" (first at p.yaml:8:11)"),
        "{errors:#?}"
    );

    // `run` refuses such a set before attaching anything, like a load error.
    let dir = std::env::temp_dir().join(format!("limiter-compile-dup-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), &native).unwrap();
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    let result = crate::cli::run::load_plan(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    let text = result.expect_err("duplicate L7 rule names").to_string();
    assert!(text.contains("duplicate L7 rule name \"api/x\""), "{text}");
}

#[test]
fn one_domain_in_two_configs_is_an_error_naming_both() {
    let a = "domain: same\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n";
    let b = "# another team's file\ndomain: same\ndescriptors:\n  - key: j\n    rate_limit: {unit: second, requests_per_unit: 1}\n";
    // Built in code, the compiler catches it.
    let c = compile(&set_of(&[("a.yaml", a), ("b.yaml", b)]));
    let errors: Vec<String> = c.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].starts_with("b.yaml:2:9: domain: "), "{errors:#?}");
    assert!(errors[0].contains("\"same\"") && errors[0].contains("a.yaml:1:9"), "{errors:#?}");

    // From files, the loader does (and load_and_compile reports it).
    let dir = std::env::temp_dir().join(format!("limiter-compile-domains-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), a).unwrap();
    std::fs::write(dir.join("b.yaml"), b).unwrap();
    let result = load_and_compile(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    let e = result.expect_err("two configs for one domain");
    assert_eq!(e.len(), 1, "{e}");
    let text = e.to_string();
    assert!(text.contains("b.yaml:2:9") && text.contains("a.yaml:1:9") && text.contains("same"), "{text}");
}

#[test]
fn every_gateway_kind_lands_in_one_plan() {
    let dirs =
        ["gateways/envoy-gateway", "gateways/teg", "gateways/agentgateway", "gateways/kgateway", "gateways/ratelimit"];
    let paths: Vec<PathBuf> = dirs.iter().map(|d| examples(d)).collect();
    let c = compile_paths(&paths);
    let kinds = [
        ("eg-distinct-users/rule-0", Some(Limit { requests: 3, unit: Unit::Hour, burst: 0 })),
        ("ratelimit-all-requests/rule-0", Some(Limit { requests: 1, unit: Unit::Second, burst: 0 })),
        ("ratelimit-all-requests/rule-1", Some(Limit { requests: 20, unit: Unit::Minute, burst: 0 })),
        ("agw-local-ratelimit/local-0", Some(Limit { requests: 10, unit: Unit::Second, burst: 20 })),
        ("petstore-local/local", Some(Limit { requests: 5, unit: Unit::Interval { ns: 10_000_000_000 }, burst: 15 })),
        ("edge/remote_address", Some(Limit { requests: 10, unit: Unit::Second, burst: 0 })),
    ];
    for (name, limit) in kinds {
        assert_eq!(l7(&c, name).limit, limit, "{name}");
    }
    assert_eq!(
        l7(&c, "eg-specific-user/rule-0").entries[1],
        header_match(Attribute::HeaderEquals { name: "x-user-id".into(), value: "one".into() }, "x-user-id=one")
    );
    // TEG filters have no targets: they apply wherever a route references them.
    assert!(l7(&c, "ratelimit-all-requests/rule-0").targets.is_empty());
    assert_eq!(l7(&c, "agw-two-windows/local-1").targets, [L7Target::Gateway("agentgateway".into())]);
    // Unique names across kinds, one summary per policy and config.
    let mut names: Vec<&str> = c.l7.rules.iter().map(|r| r.name.as_str()).collect();
    let before = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), before);
    assert_eq!(
        c.summaries.len(),
        c.summaries.iter().map(|s| &s.policy).collect::<std::collections::HashSet<_>>().len()
    );
    // Gateway kinds put nothing in the kernel without ports.
    assert!(c.plan.rules.is_empty(), "{:?}", c.plan.rules);
}
