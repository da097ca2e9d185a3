//! envoyproxy/ratelimit configs and kgateway `TrafficPolicy`: every example under
//! `examples/gateways/{ratelimit,kgateway}` is loaded and what it means is checked (the rules
//! it compiles to, the descriptors it sends), plus the errors and warnings of bad input.

use std::path::{Path, PathBuf};

use super::ratelimit_config::compile;
use crate::plan::{Algorithm, Attribute, EntryMatch, EntryValue, L7Rule, Limit, Scope as L7Scope, Unit};
use crate::policy::error::{ErrorKind, PolicyError, Pos};
use crate::policy::model::*;
use crate::policy::source::{Document, load_file_str};

const DAY_NS: u64 = 86_400_000_000_000;

fn examples(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateways").join(dir)
}

/// The valid example files of a directory (not `invalid/`), by file name.
fn example_files(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(examples(dir))
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn load(path: &Path) -> Result<Vec<Document>, Vec<PolicyError>> {
    let text = std::fs::read_to_string(path).expect("readable");
    load_file_str(path, &text).map_err(|e| e.0)
}

fn one_config(path: &Path) -> RatelimitConfig {
    match load(path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display())).as_slice() {
        [Document::RatelimitConfig(c)] => c.clone(),
        other => panic!("{}: expected one ratelimit config, got {other:?}", path.display()),
    }
}

fn one_policy(path: &Path) -> Policy {
    match load(path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display())).as_slice() {
        [Document::Policy(p)] => p.clone(),
        other => panic!("{}: expected one policy, got {other:?}", path.display()),
    }
}

fn config_str(text: &str) -> Result<RatelimitConfig, Vec<PolicyError>> {
    match load_file_str(Path::new("t.yaml"), text).map_err(|e| e.0)?.as_slice() {
        [Document::RatelimitConfig(c)] => Ok(c.clone()),
        other => panic!("expected one ratelimit config, got {other:?}"),
    }
}

fn policy_str(text: &str) -> Result<Policy, Vec<PolicyError>> {
    match load_file_str(Path::new("t.yaml"), text).map_err(|e| e.0)?.as_slice() {
        [Document::Policy(p)] => Ok(p.clone()),
        other => panic!("expected one policy, got {other:?}"),
    }
}

/// `(line, field, kind)` of each error, in order.
fn errs(e: &[PolicyError]) -> Vec<(u64, &str, &ErrorKind)> {
    e.iter().map(|e| (e.location.pos.line, e.field.as_str(), &e.kind)).collect()
}

fn warnings(w: &[Located<String>]) -> Vec<(u64, &str)> {
    w.iter().map(|l| (l.at.pos.line, l.at.field.as_str())).collect()
}

fn exact(key: &str, value: &str) -> EntryMatch {
    EntryMatch { key: key.into(), attribute: Attribute::Descriptor, value: EntryValue::Exact(value.into()) }
}

fn any(key: &str) -> EntryMatch {
    EntryMatch { key: key.into(), attribute: Attribute::Descriptor, value: EntryValue::Distinct }
}

fn rule(domain: &str, name: &str, entries: Vec<EntryMatch>, limit: Option<(u64, Unit)>) -> L7Rule {
    L7Rule {
        name: name.into(),
        domain: domain.into(),
        entries,
        // Unnamed limits report an empty name, as the reference service.
        limit_name: Some(String::new()),
        limit: limit.map(|(requests, unit)| Limit { requests, unit, burst: 0 }),
        algorithm: Algorithm::FixedWindow,
        scope: L7Scope::Global,
        shadow: false,
        replaces: Vec::new(),
        targets: Vec::new(),
        ..L7Rule::default()
    }
}

// ---------------------------------------------------------------------------------------
// envoyproxy/ratelimit examples

#[test]
fn ratelimit_examples_are_all_checked() {
    assert_eq!(example_files("ratelimit"), ["nested.yaml", "per-header.yaml", "per-remote-address.yaml"]);
}

#[test]
fn ratelimit_per_remote_address() {
    let c = one_config(&examples("ratelimit").join("per-remote-address.yaml"));
    assert_eq!(c.domain, "edge");
    assert_eq!(c.at.pos, Pos::new(7, 9));
    assert!(c.not_enforced.is_empty());
    assert_eq!(
        compile(&c),
        [rule("edge", "edge/remote_address", vec![any("remote_address")], Some((10, Unit::Second)))]
    );
}

#[test]
fn ratelimit_per_header() {
    let c = one_config(&examples("ratelimit").join("per-header.yaml"));
    assert_eq!(
        compile(&c),
        [
            rule("apis", "apis/api_key", vec![any("api_key")], Some((100, Unit::Minute))),
            rule(
                "apis",
                "apis/api_key=partner-7d1e",
                vec![exact("api_key", "partner-7d1e")],
                Some((1000, Unit::Minute))
            ),
        ]
    );
}

#[test]
fn ratelimit_nested_wildcard_unlimited_shadow_replaces() {
    let c = one_config(&examples("ratelimit").join("nested.yaml"));
    assert!(c.not_enforced.is_empty(), "{:?}", c.not_enforced);
    // The model keeps the tree.
    assert_eq!(c.descriptors.len(), 3);
    assert_eq!(c.descriptors[0].descriptors.len(), 2);
    assert_eq!(c.descriptors[0].descriptors[1].at.field, "descriptors[0].descriptors[1]");
    assert!(c.descriptors[0].descriptors[1].rate_limit.as_ref().is_some_and(|r| r.unlimited && r.limit.is_none()));
    assert!(c.descriptors[2].descriptors[0].detailed_metric);

    let mut path_rule = rule("shop", "shop/path=/api/v1/*", vec![], Some((50, Unit::Second)));
    path_rule.entries = vec![EntryMatch {
        key: "path".into(),
        attribute: Attribute::Descriptor,
        value: EntryValue::Wildcard("/api/v1/*".into()),
    }];
    path_rule.shadow = true;
    let mut weekly = rule(
        "shop",
        "trial-weekly",
        vec![any("client_id"), exact("plan", "trial")],
        Some((2000, Unit::Interval { ns: 7 * DAY_NS })),
    );
    weekly.replaces = vec!["client-daily".into()];
    weekly.limit_name = Some("trial-weekly".into());
    let mut daily = rule("shop", "client-daily", vec![any("client_id")], Some((5000, Unit::Day)));
    daily.limit_name = Some("client-daily".into());
    assert_eq!(
        compile(&c),
        [
            rule(
                "shop",
                "shop/authenticated=false/remote_address",
                vec![exact("authenticated", "false"), any("remote_address")],
                Some((30, Unit::Minute)),
            ),
            rule(
                "shop",
                "shop/authenticated=false/remote_address=10.0.0.5",
                vec![exact("authenticated", "false"), exact("remote_address", "10.0.0.5")],
                None,
            ),
            path_rule,
            daily,
            weekly,
        ]
    );
}

#[test]
fn ratelimit_invalid_example_reports_every_mistake() {
    let e = load(&examples("ratelimit").join("invalid/bad-values.yaml")).expect_err("invalid");
    let unit = ErrorKind::UnknownValue {
        what: "unit",
        value: "minutes".into(),
        expected: "second, minute, hour, day, week, month or year",
    };
    let schema = |m: &str| ErrorKind::Schema { message: m.into() };
    assert_eq!(
        errs(&e),
        [
            (6, "descriptors[0].rate_limit.unit", &unit),
            (8, "descriptors[1]", &schema("missing field `key`")),
            (
                14,
                "descriptors[2].descriptors[0].rate_limit.requests_per_unit",
                &ErrorKind::TooSmall { value: -1, min: 0 }
            ),
            (
                15,
                "descriptors[2].descriptors[1]",
                &ErrorKind::DuplicateDescriptor { key: "method".into(), value: Some("GET".into()), first_line: 12 }
            ),
            (19, "descriptors[2].descriptors[2].rate_limit.unit", &ErrorKind::Conflict { other: "unlimited: true" }),
            (
                21,
                "descriptors[2].descriptors[3].rate_limit.requests_per_unit",
                &schema("expected an integer, found a string")
            ),
        ]
    );
    // Rendered with file, line, column and field path.
    assert!(e[0].to_string().ends_with(
        "bad-values.yaml:6:13: descriptors[0].rate_limit.unit: unknown unit \"minutes\" (expected second, minute, hour, day, week, month or year)"
    ), "{}", e[0]);
}

#[test]
fn ratelimit_unknown_keys_are_errors_as_in_the_reference() {
    let e = config_str(
        "domain: d\nfuture_option: 1\ndescriptors:\n  - key: k\n    quota_mode: true\n    rate_limit: {unit: Hour, requests_per_unit: 3, extra: x}\n",
    )
    .expect_err("unknown keys");
    let fields: Vec<(u64, &str)> = e.iter().map(|e| (e.location.pos.line, e.field.as_str())).collect();
    assert_eq!(fields, [(2, "future_option"), (6, "descriptors[0].rate_limit.extra")]);
    let c = config_str(
        "domain: d\ndescriptors:\n  - key: k\n    quota_mode: true\n    value_to_metric: true\n    metadata: {a: b}\n    rate_limit: {unit: Hour}\n",
    )
    .expect("known keys");
    assert!(c.not_enforced.is_empty(), "{:?}", c.not_enforced);
    let mut want = rule("d", "d/k", vec![any("k")], Some((0, Unit::Hour)));
    want.quota_mode = true;
    assert_eq!(compile(&c), [want]);
}

#[test]
fn ratelimit_type_and_shape_errors() {
    let e = config_str("domain: \"\"\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 5}\n  - key: [a]\n  - key: k2\n    shadow_mode: maybe\n    descriptors: {key: x}\n")
        .expect_err("invalid");
    let schema = |m: &str| ErrorKind::Schema { message: m.into() };
    assert_eq!(
        errs(&e),
        [
            (4, "descriptors[0].rate_limit", &schema("missing field `unit`")),
            (5, "descriptors[1].key", &schema("expected a string, found a list")),
            (7, "descriptors[2].shadow_mode", &schema("expected a boolean, found a string")),
            (8, "descriptors[2].descriptors", &schema("expected a list, found a mapping")),
            (1, "domain", &ErrorKind::EmptyValue),
        ]
    );
}

#[test]
fn ratelimit_same_key_different_values_are_not_duplicates() {
    // Only identical (key, value) siblings clash; the same pair at another depth is fine.
    let c = config_str(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n    descriptors:\n      - key: k\n        rate_limit: {unit: second, requests_per_unit: 2}\n  - key: k\n    value: v\n    rate_limit: {unit: second, requests_per_unit: 3}\n",
    )
    .expect("loads");
    let names: Vec<String> = compile(&c).into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["d/k", "d/k/k", "d/k=v"]);
    // `value: ""` is key-only, as the service reads it.
    let e = config_str("domain: d\ndescriptors:\n  - key: k\n  - key: k\n    value: \"\"\n").expect_err("dup");
    assert_eq!(
        errs(&e),
        [(4, "descriptors[1]", &ErrorKind::DuplicateDescriptor { key: "k".into(), value: None, first_line: 3 })]
    );
}

#[test]
fn ratelimit_month_and_year_are_fixed_windows_of_days() {
    let c = config_str("domain: d\ndescriptors:\n  - {key: m, rate_limit: {unit: MONTH, requests_per_unit: 1}}\n  - {key: y, rate_limit: {unit: year, requests_per_unit: 2}}\n").expect("loads");
    let limits: Vec<_> = compile(&c).into_iter().map(|r| r.limit.map(|l| l.unit)).collect();
    assert_eq!(limits, [Some(Unit::Interval { ns: 30 * DAY_NS }), Some(Unit::Interval { ns: 365 * DAY_NS })]);
}

// ---------------------------------------------------------------------------------------
// kgateway examples

#[test]
fn kgateway_examples_are_all_checked() {
    assert_eq!(
        example_files("kgateway"),
        ["gateway-wide.yaml", "global-descriptors.yaml", "local-token-bucket.yaml", "ratelimit-config.yaml"]
    );
}

#[test]
fn kgateway_local_token_bucket() {
    let p = one_policy(&examples("kgateway").join("local-token-bucket.yaml"));
    assert_eq!(p.kind, PolicyKind::TrafficPolicy);
    assert_eq!((p.name.as_str(), p.namespace.as_deref()), ("petstore-local", Some("shop")));
    assert_eq!(
        p.targets.iter().map(|t| &t.kind).collect::<Vec<_>>(),
        [&TargetKind::Route {
            kind: RouteKind::HttpRoute,
            name: "petstore".into(),
            namespace: Some("shop".into()),
            section_name: None
        }]
    );
    assert_eq!(p.rules.len(), 1);
    let r = &p.rules[0];
    assert_eq!((r.name.as_str(), r.scope, r.count), ("local", Scope::Local, Count::Requests));
    assert!(r.selectors.is_empty());
    // 5 tokens every 10 s, depth 20.
    assert_eq!(r.limit, Limit { requests: 5, unit: Unit::Interval { ns: 10_000_000_000 }, burst: 15 });
    assert_eq!(r.at.field, "spec.rateLimit.local.tokenBucket");
    assert!(p.descriptor_actions.is_empty());
    assert!(p.not_enforced.is_empty(), "{:?}", p.not_enforced);
}

#[test]
fn kgateway_gateway_wide_with_not_enforced_fields() {
    let p = one_policy(&examples("kgateway").join("gateway-wide.yaml"));
    assert_eq!(p.namespace, None);
    assert_eq!(
        p.targets.iter().map(|t| &t.kind).collect::<Vec<_>>(),
        [&TargetKind::Route {
            kind: RouteKind::Gateway,
            name: "http".into(),
            namespace: None,
            section_name: Some("https".into())
        }]
    );
    // 10 tokens per 100 ms, depth 100.
    assert_eq!(p.rules[0].limit, Limit { requests: 10, unit: Unit::Interval { ns: 100_000_000 }, burst: 90 });
    assert_eq!(warnings(&p.not_enforced), [(18, "spec.timeouts"), (20, "spec.cors")]);
}

#[test]
fn kgateway_global_descriptors_and_matching_config() {
    let p = one_policy(&examples("kgateway").join("global-descriptors.yaml"));
    assert!(p.rules.is_empty());
    let actions: Vec<_> = p.descriptor_actions.iter().map(|d| (d.domain.as_deref(), d.entries.clone())).collect();
    assert_eq!(
        actions,
        [
            (
                None,
                vec![
                    ActionEntry::Generic { key: "generic_key".into(), value: "api".into() },
                    ActionEntry::RemoteAddress
                ]
            ),
            (
                None,
                vec![
                    ActionEntry::Header { name: "x-user-id".into(), descriptor_key: "X-User-ID".into() },
                    ActionEntry::Path
                ]
            ),
        ]
    );
    assert_eq!(p.descriptor_actions[1].at.field, "spec.rateLimit.global.descriptors[1]");

    // The service config next to it answers exactly those descriptors.
    let c = one_config(&examples("kgateway").join("ratelimit-config.yaml"));
    assert_eq!(
        compile(&c),
        [
            rule(
                "api-gateway",
                "api-gateway/generic_key=api/remote_address",
                vec![exact("generic_key", "api"), any("remote_address")],
                Some((60, Unit::Minute)),
            ),
            rule(
                "api-gateway",
                "api-gateway/X-User-ID/path",
                vec![any("X-User-ID"), any("path")],
                Some((10, Unit::Second)),
            ),
        ]
    );
    // Keys line up entry by entry (case-sensitively) with what the policy sends.
    let sent_keys = |entries: &[ActionEntry]| -> Vec<String> {
        entries
            .iter()
            .map(|e| match e {
                ActionEntry::RemoteAddress => "remote_address".to_owned(),
                ActionEntry::Path => "path".to_owned(),
                ActionEntry::Header { descriptor_key, .. } => descriptor_key.clone(),
                ActionEntry::Generic { key, .. } => key.clone(),
            })
            .collect()
    };
    for (actions, rule) in p.descriptor_actions.iter().zip(compile(&c)) {
        let config_keys: Vec<String> = rule.entries.iter().map(|e| e.key.clone()).collect();
        assert_eq!(sent_keys(&actions.entries), config_keys);
    }
}

#[test]
fn kgateway_invalid_example_reports_every_mistake() {
    let e = load(&examples("kgateway").join("invalid/bad-bucket.yaml")).expect_err("invalid");
    assert_eq!(
        errs(&e),
        [
            (13, "spec.rateLimit.local.tokenBucket.fillInterval", &ErrorKind::InvalidDuration { value: "soon".into() }),
            (12, "spec.rateLimit.local.tokenBucket.tokensPerFill", &ErrorKind::TooLarge { value: 10, max: 5 }),
            (
                17,
                "spec.rateLimit.global.descriptors[0].entries[0].type",
                &ErrorKind::UnknownValue {
                    what: "descriptor entry type",
                    value: "Cookie".into(),
                    expected: "RemoteAddress, Path, Header or Generic"
                }
            ),
        ]
    );
}

#[test]
fn kgateway_schema_errors_and_warnings() {
    let head = "apiVersion: gateway.kgateway.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n";
    let e = policy_str(&format!(
        "{head}  targetRefs: [{{kind: Pod, name: s}}, {{kind: HTTPRoute}}]\n  rateLimit:\n    local: {{tokenBucket: {{maxTokens: 0, fillInterval: 1s}}}}\n    global:\n      descriptors: [{{entries: [{{type: Header}}, {{type: Generic, generic: {{key: k}}}}]}}]\n"
    ))
    .expect_err("invalid");
    let schema = |m: &str| ErrorKind::Schema { message: m.into() };
    assert_eq!(
        errs(&e),
        [
            (
                5,
                "spec.targetRefs[0].kind",
                &ErrorKind::UnknownValue { what: "target kind", value: "Pod".into(), expected: "HTTPRoute or Gateway" }
            ),
            (5, "spec.targetRefs[1]", &ErrorKind::TargetRefIncomplete { kind: "HTTPRoute".into(), needs: "a name" }),
            (7, "spec.rateLimit.local.tokenBucket.maxTokens", &ErrorKind::TooSmall { value: 0, min: 1 }),
            (9, "spec.rateLimit.global.descriptors[0].entries[0]", &schema("missing field `header`")),
            (9, "spec.rateLimit.global.descriptors[0].entries[1].generic", &schema("missing field `value`")),
            (9, "spec.rateLimit.global", &schema("missing field `extensionRef`")),
        ]
    );

    let p = policy_str(&format!(
        "{head}  rateLimit:\n    local:\n      tokenBucket: {{maxTokens: 60, tokensPerFill: 60, fillInterval: 1m, jitter: 1}}\n  retry: {{attempts: 3}}\n"
    ))
    .expect("loads");
    assert_eq!(p.rules[0].limit, Limit { requests: 60, unit: Unit::Minute, burst: 0 });
    assert_eq!(warnings(&p.not_enforced), [(7, "spec.rateLimit.local.tokenBucket.jitter"), (8, "spec.retry")]);

    let e = policy_str("apiVersion: gateway.kgateway.dev/v1\nkind: TrafficPolicy\nmetadata: {name: a/b}\nspec: {}\n")
        .expect_err("invalid");
    assert_eq!(e.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["apiVersion", "metadata.name"]);
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    // The generic tree recurses per level; the YAML reader's depth limit must stop it first.
    let deep = format!("domain: d\ndescriptors: {}", "[".repeat(100_000));
    assert!(config_str(&deep).is_err());
    let mut nested = String::from("domain: d\ndescriptors:\n");
    for depth in 0..2_000 {
        let pad = "  ".repeat(depth * 2);
        nested.push_str(&format!("{pad}  - key: k{depth}\n{pad}    descriptors:\n"));
    }
    // Either loads whole or is refused for its depth; never overflows the stack.
    match config_str(&nested) {
        Ok(c) => {
            let mut depth = 0;
            let mut level = &c.descriptors;
            while let [d] = level.as_slice() {
                depth += 1;
                level = &d.descriptors;
            }
            assert_eq!(depth, 2_000);
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

#[test]
fn policy_and_its_config_in_one_file() {
    let text = "apiVersion: gateway.kgateway.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  rateLimit:\n    global:\n      descriptors: [{entries: [{type: RemoteAddress}]}]\n      extensionRef: {name: rl}\n---\ndomain: d\ndescriptors:\n  - key: remote_address\n    rate_limit: {unit: second, requests_per_unit: 2}\n";
    let docs = load_file_str(Path::new("both.yaml"), text).expect("loads");
    let [Document::Policy(p), Document::RatelimitConfig(c)] = docs.as_slice() else { panic!("{docs:?}") };
    assert_eq!(p.descriptor_actions[0].entries, [ActionEntry::RemoteAddress]);
    assert_eq!((c.source.document, c.at.pos), (Some(2), Pos::new(10, 9)));
    assert_eq!(compile(c)[0].entries, [any("remote_address")]);

    // An error in the second document names it, with the file's line.
    let bad = text.replace("unit: second", "unit: fortnight");
    let e = load_file_str(Path::new("both.yaml"), &bad).expect_err("invalid").0;
    assert_eq!(e.len(), 1);
    assert!(
        e[0].to_string().starts_with("both.yaml:13:24 (document 2): descriptors[0].rate_limit.unit: unknown unit"),
        "{}",
        e[0]
    );
}
