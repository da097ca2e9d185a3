//! Every error class in every gateway kind, rendered as the user sees it
//! (`FILE:LINE:COL[ (document N)]: field.path: message`): bad unit, zero or negative requests,
//! bad CIDR, duplicates, empty selectors, wrong types, YAML syntax errors, missing required
//! fields; and unknown fields, which are warnings in these kinds but errors in the native one.

use std::path::{Path, PathBuf};

use super::super::source::{Document, load_file_str, load_paths};

const EG: &str = "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: p}\nspec:\n";
const TEG: &str = "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: RateLimitFilter\nmetadata: {name: f}\nspec:\n";
const KGW: &str = "apiVersion: gateway.kgateway.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: k}\nspec:\n";
const AGW: &str = "apiVersion: agentgateway.dev/v1alpha1\nkind: AgentgatewayPolicy\nmetadata: {name: a}\nspec:\n";

/// Every error of one file's text, as printed.
fn errors(text: &str) -> Vec<String> {
    match load_file_str(Path::new("p.yaml"), text) {
        Ok(docs) => panic!("expected errors, loaded {docs:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

/// `line:col field: message` of every warning of one file that must load.
fn warnings(text: &str) -> Vec<String> {
    let docs = load_file_str(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for d in &docs {
        let w = match d {
            Document::Policy(p) => &p.not_enforced,
            Document::RatelimitConfig(c) => &c.not_enforced,
        };
        out.extend(w.iter().map(|w| format!("{}:{} {}: {}", w.at.pos.line, w.at.pos.column, w.at.field, w.value)));
    }
    out
}

#[test]
fn teg_error_classes() {
    let rules = |body: &str| format!("{TEG}  type: Global\n  global:\n    rules:\n{body}");
    // Lines 5-7 are `type`, `global`, `rules`; the first rule is on line 8.
    assert_eq!(
        errors(&rules("      - limit: {requests: 0, unit: Second}\n      - limit: {requests: -1, unit: Secs}\n")),
        [
            // 0 denies every request (Envoy Gateway allows it); below 0 is an error.
            "p.yaml:9:27: spec.global.rules[1].limit.requests: must be at least 0, got -1",
            "p.yaml:9:37: spec.global.rules[1].limit.unit: unknown unit \"Secs\" (expected Second, Minute, Hour or Day)",
        ]
    );
    assert_eq!(
        errors(&rules(
            "      - clientSelectors: [{sourceCIDR: {type: Distinct, value: 10.0.0.0/33}}]\n        limit: {requests: 1, unit: Second}\n"
        )),
        [
            "p.yaml:8:64: spec.global.rules[0].clientSelectors[0].sourceCIDR.value: invalid CIDR \"10.0.0.0/33\": not an IPv4 or IPv6 address or CIDR",
        ]
    );
    assert_eq!(
        errors(&rules(
            "      - name: per-ip\n        limit: {requests: 1, unit: Second}\n      - name: per-ip\n        limit: {requests: 2, unit: Second}\n"
        )),
        ["p.yaml:10:15: spec.global.rules[1].name: duplicate rule name \"per-ip\" (first used on line 8)"]
    );
    assert_eq!(
        errors(&rules("      - clientSelectors: [{}, {headers: []}]\n        limit: {requests: 1, unit: Second}\n")),
        [
            "p.yaml:8:27: spec.global.rules[0].clientSelectors[0]: empty client selector: give sourceCIDR and/or headers",
            "p.yaml:8:41: spec.global.rules[0].clientSelectors[1].headers: empty headers list: give at least one header match",
        ]
    );
    // Wrong types.
    assert_eq!(
        errors(&format!("{TEG}  type: Global\n  global:\n    rules: {{limit: 1}}\n")),
        ["p.yaml:7:12: spec.global.rules: expected a list, found a mapping"]
    );
    assert_eq!(
        errors(&rules("      - limit: {requests: [1], unit: 7}\n")),
        [
            "p.yaml:8:27: spec.global.rules[0].limit.requests: expected an integer, found a list",
            "p.yaml:8:38: spec.global.rules[0].limit.unit: unknown unit \"7\" (expected Second, Minute, Hour or Day)",
        ]
    );
    // Missing required fields.
    assert_eq!(
        errors(&rules("      - clientSelectors: []\n      - limit: {unit: Hour}\n")),
        [
            "p.yaml:8:9: spec.global.rules[0]: missing field `limit`",
            "p.yaml:9:16: spec.global.rules[1].limit: missing field `requests`",
        ]
    );
    assert_eq!(
        errors(
            "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: RateLimitFilter\nspec: {type: Global, global: {rules: []}}\n"
        ),
        ["p.yaml:1:1: missing field `metadata`"]
    );
    // YAML syntax.
    assert_eq!(
        errors(&format!("{TEG}  type: Global\n  global: {{rules: [\n")),
        ["p.yaml:6:19: YAML syntax error: unclosed bracket '['"]
    );
    // Unknown fields: warnings, the rule still enforced.
    let text = rules("      - limit: {requests: 5, unit: Minute}\n        weight: 3\n");
    assert_eq!(warnings(&text), ["9:17 spec.global.rules[0].weight: unknown field, ignored"]);
}

#[test]
fn envoy_gateway_syntax_and_unknown_fields() {
    assert_eq!(
        errors(&format!(
            "{EG}  rateLimit:\n    type: Global\n    global:\n      rules:\n        - limit: {{requests: 1, unit: \"Second}}\n"
        )),
        ["p.yaml:9:38: YAML syntax error: unclosed quote"]
    );
    let text = format!(
        "{EG}  targetRefs: [{{kind: HTTPRoute, name: r, weight: 1}}]\n  rateLimit:\n    global:\n      rules:\n        - limit: {{requests: 5, unit: Minute, perHour: 2}}\n  futureFeature: {{}}\n"
    );
    assert_eq!(
        warnings(&text),
        [
            "5:51 spec.targetRefs[0].weight: unknown field, ignored",
            "9:55 spec.rateLimit.global.rules[0].limit.perHour: unknown field, ignored",
            "10:18 spec.futureFeature: unknown field, ignored",
        ]
    );
}

#[test]
fn kgateway_error_classes() {
    let bucket = |b: &str| format!("{KGW}  rateLimit:\n    local:\n      tokenBucket: {b}\n");
    // Bad unit: the fill interval is a duration.
    assert_eq!(
        errors(&bucket("{maxTokens: 10, fillInterval: 1 fortnight}")),
        [
            "p.yaml:7:50: spec.rateLimit.local.tokenBucket.fillInterval: invalid duration \"1 fortnight\" (expected e.g. 500ms, 10s, 1m, 1h30m)",
        ]
    );
    // Zero and negative counts; more tokens per fill than the bucket holds.
    assert_eq!(
        errors(&bucket("{maxTokens: 0, tokensPerFill: -2, fillInterval: 1s}")),
        [
            "p.yaml:7:32: spec.rateLimit.local.tokenBucket.maxTokens: must be at least 1, got 0",
            "p.yaml:7:50: spec.rateLimit.local.tokenBucket.tokensPerFill: must be at least 1, got -2",
        ]
    );
    assert_eq!(
        errors(&bucket("{maxTokens: 5, tokensPerFill: 6, fillInterval: 1s}")),
        ["p.yaml:7:50: spec.rateLimit.local.tokenBucket.tokensPerFill: must be at most 5, got 6"]
    );
    // Wrong types and missing fields.
    assert_eq!(
        errors(&bucket("[10]")),
        ["p.yaml:7:20: spec.rateLimit.local.tokenBucket: expected a mapping, found a list"]
    );
    assert_eq!(
        errors(&bucket("{maxTokens: ten}")),
        [
            "p.yaml:7:32: spec.rateLimit.local.tokenBucket.maxTokens: expected an integer, found a string",
            "p.yaml:7:20: spec.rateLimit.local.tokenBucket: missing field `fillInterval`",
        ]
    );
    // Empty descriptor lists: nothing to send, so nothing would be limited.
    assert_eq!(
        errors(&format!("{KGW}  rateLimit:\n    global:\n      descriptors: []\n      extensionRef: {{name: rl}}\n")),
        ["p.yaml:7:20: spec.rateLimit.global.descriptors: must not be empty"]
    );
    assert_eq!(
        errors(&format!(
            "{KGW}  rateLimit:\n    global:\n      descriptors: [{{entries: []}}]\n      extensionRef: {{name: rl}}\n"
        )),
        ["p.yaml:7:31: spec.rateLimit.global.descriptors[0].entries: must not be empty"]
    );
    assert_eq!(
        errors(&format!("{KGW}  rateLimit:\n    local:\n      tokenBucket: {{maxTokens: 10, fillInterval: 1s\n")),
        ["p.yaml:7:20: YAML syntax error: unclosed bracket '{'"]
    );
    // Unknown fields: warnings.
    assert_eq!(
        warnings(&format!(
            "{KGW}  rateLimit:\n    local:\n      tokenBucket: {{maxTokens: 10, fillInterval: 1s}}\n    burstMode: x\n"
        )),
        ["8:16 spec.rateLimit.burstMode: unknown field, ignored"]
    );
}

#[test]
fn agentgateway_error_classes() {
    let local = |body: &str| format!("{AGW}  traffic:\n    rateLimit:\n      local:\n{body}");
    assert_eq!(
        errors(&local("        - {requests: -10, unit: Seconds}\n")),
        ["p.yaml:8:22: spec.traffic.rateLimit.local[0].requests: must be at least 1, got -10"]
    );
    assert_eq!(
        errors(&format!("{AGW}  traffic:\n    rateLimit:\n      local: {{requests: 1, unit: Seconds}}\n")),
        ["p.yaml:7:14: spec.traffic.rateLimit.local: expected a list, found a mapping"]
    );
    assert_eq!(
        errors(&local("        - {requests: \"10\", unit: Seconds, burst: lots}\n        - {requests: 3}\n")),
        [
            "p.yaml:8:22: spec.traffic.rateLimit.local[0].requests: expected an integer, found a string",
            "p.yaml:8:50: spec.traffic.rateLimit.local[0].burst: expected an integer, found a string",
            "p.yaml:9:11: spec.traffic.rateLimit.local[1]: missing field `unit`",
        ]
    );
    assert_eq!(
        errors(&local("        - requests: 1\n          unit: Seconds\n         burst: 2\n")),
        ["p.yaml:10:10: YAML syntax error: while parsing a block collection, did not find expected '-' indicator"]
    );
    assert_eq!(
        warnings(&local("        - {requests: 1, unit: Seconds, jitter: 2}\n")),
        ["8:48 spec.traffic.rateLimit.local[0].jitter: unknown field, ignored"]
    );
}

#[test]
fn ratelimit_config_error_classes() {
    let rl = |body: &str| format!("domain: d\ndescriptors:\n{body}");
    assert_eq!(
        errors(&rl("  - key: k\n    rate_limit: {unit: SECOND, requests_per_unit: -3}\n")),
        ["p.yaml:4:51: descriptors[0].rate_limit.requests_per_unit: must be at least 0, got -3"]
    );
    assert_eq!(
        errors(&rl(
            "  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, replaces: [{name: a}, {name: \"\"}]}\n"
        )),
        ["p.yaml:4:83: descriptors[0].rate_limit.replaces[1].name: must not be empty"]
    );
    assert_eq!(
        errors(&rl(
            "  - key: k\n    rate_limit: {name: a, unit: second, requests_per_unit: 1, replaces: [{name: a}]}\n"
        )),
        [
            "p.yaml:4:81: descriptors[0].rate_limit.replaces[0].name: a limit cannot replace itself (`a` is this limit's name)",
        ]
    );
    assert_eq!(errors("domain: [d]\ndescriptors: []\n"), ["p.yaml:1:9: domain: expected a string, found a list"]);
    assert_eq!(
        errors(&rl("  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1\n  - key: j\n")),
        ["p.yaml:5:8: YAML syntax error: while parsing a flow mapping, did not find expected ',' or '}'"]
    );
    // The service ignores a count beside `unlimited: true`; a unit beside it, it refuses.
    assert_eq!(
        warnings(&rl("  - key: k\n    rate_limit: {unlimited: true, requests_per_unit: 5}\n")),
        ["4:54 descriptors[0].rate_limit.requests_per_unit: ignored: the limit is `unlimited: true`"]
    );
    assert_eq!(
        errors(&rl("  - key: k\n    rate_limit: {unlimited: true, unit: minute}\n")),
        ["p.yaml:4:41: descriptors[0].rate_limit.unit: cannot be combined with unlimited: true"]
    );
}

/// A directory removed when the test ends, pass or fail.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("limiter-kinds-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn duplicates_across_documents_and_files() {
    let dir = TempDir::new("dups");
    // Two configs for one domain, in two files: the service refuses that, so does the agent.
    std::fs::write(
        dir.0.join("a.yaml"),
        "domain: api\ndescriptors: [{key: k, rate_limit: {unit: second, requests_per_unit: 1}}]\n",
    )
    .unwrap();
    std::fs::write(
        dir.0.join("b.yaml"),
        "# second config\ndomain: api\ndescriptors: [{key: j, rate_limit: {unit: second, requests_per_unit: 1}}]\n",
    )
    .unwrap();
    // Two gateway policies of one name in one file (policy names prefix rule names).
    std::fs::write(
        dir.0.join("c.yaml"),
        format!(
            "{KGW}  rateLimit: {{local: {{tokenBucket: {{maxTokens: 1, fillInterval: 1s}}}}}}\n---\n{TEG}  type: Global\n  global: {{rules: [{{limit: {{requests: 1, unit: Second}}}}]}}\n"
        )
        .replace("name: f", "name: k"),
    )
    .unwrap();
    let e = load_paths(std::slice::from_ref(&dir.0)).expect_err("duplicates");
    let lines: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    let d = dir.0.display();
    assert_eq!(
        lines,
        [
            format!(
                "{d}/c.yaml:9:18 (document 2): metadata.name: duplicate policy name \"k\" (first defined at {d}/c.yaml:3:18 (document 1))"
            ),
            format!(
                "{d}/b.yaml:2:9: domain: duplicate ratelimit config domain \"api\" (first defined at {d}/a.yaml:1:9)"
            ),
        ]
    );
}

#[test]
fn unknown_fields_are_errors_in_the_native_kind_and_ratelimit_configs() {
    let native =
        "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: n}\nspec:\n  futureFeature: 1\n";
    let e = errors(native);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("p.yaml:5:3: spec.futureFeature: unknown field `futureFeature`"), "{}", e[0]);
    for head in [EG, TEG, KGW, AGW] {
        let text = format!("{head}  futureFeature: 1\n");
        let text =
            if head == TEG { text.replace("spec:\n", "spec:\n  type: Global\n  global: {rules: []}\n") } else { text };
        let w = warnings(&text);
        assert!(w.iter().any(|w| w.contains("spec.futureFeature")), "{head}: {w:?}");
    }
    // envoyproxy/ratelimit refuses unknown keys, so a config does too.
    assert_eq!(
        errors("domain: d\nfutureFeature: 1\ndescriptors: []\n"),
        ["p.yaml:2:16: futureFeature: unknown key (envoyproxy/ratelimit refuses keys it does not know)"]
    );
}

/// Rules of the one policy in `text` as `name requests/unit`, and its warnings.
fn rules_and_warnings(text: &str) -> (Vec<String>, Vec<String>) {
    let docs = load_file_str(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    let [Document::Policy(p)] = docs.as_slice() else { panic!("{docs:?}") };
    let rules = p.rules.iter().map(|r| format!("{} {}/{}", r.name, r.limit.requests, r.limit.unit)).collect();
    (rules, warnings(text))
}

#[test]
fn targets_this_agent_cannot_resolve_are_skipped_not_fatal() {
    let rule = "  rateLimit:\n    global:\n      rules:\n        - limit: {requests: 5, unit: Second}\n";
    // Alone, an unresolved target would leave the policy applying everywhere: rules dropped.
    let (rules, w) = rules_and_warnings(&format!("{EG}  targetRefs: [{{kind: TCPRoute, name: t}}]\n{rule}"));
    assert!(rules.is_empty());
    assert_eq!(
        w,
        [
            "5:23 spec.targetRefs[0].kind: not enforced: TCPRoute targets are not resolved by this agent",
            "5:3 spec: not enforced: no target this agent can resolve (Gateway or HTTPRoute), so rules rule-0 are dropped",
        ]
    );
    // Beside a resolvable target, only the reference is skipped.
    let (rules, w) = rules_and_warnings(&format!(
        "{EG}  targetRefs: [{{kind: GRPCRoute, name: g}}, {{kind: HTTPRoute, name: h}}]\n{rule}"
    ));
    assert_eq!(rules, ["rule-0 5/Second"]);
    assert_eq!(w, ["5:23 spec.targetRefs[0].kind: not enforced: GRPCRoute targets are not resolved by this agent"]);
    // Label selectors alone: the same.
    let (rules, w) =
        rules_and_warnings(&format!("{EG}  targetSelectors: [{{kind: HTTPRoute, matchLabels: {{a: b}}}}]\n{rule}"));
    assert!(rules.is_empty());
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].starts_with("5:20 spec.targetSelectors: not enforced"), "{}", w[0]);
    // agentgateway and kgateway read targets the same way.
    let (rules, w) = rules_and_warnings(&format!(
        "{AGW}  targetRefs: [{{group: gateway.networking.x-k8s.io, kind: XListenerSet, name: l}}]\n  traffic:\n    rateLimit:\n      local: [{{requests: 1, unit: Seconds}}]\n"
    ));
    assert!(rules.is_empty());
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[1].ends_with("so rules local-0 are dropped"), "{}", w[1]);
    let (rules, w) = rules_and_warnings(&format!(
        "{KGW}  targetRefs: [{{kind: GRPCRoute, name: g}}]\n  rateLimit:\n    local:\n      tokenBucket: {{maxTokens: 5, fillInterval: 1s}}\n"
    ));
    assert!(rules.is_empty());
    assert_eq!(
        w,
        [
            "5:23 spec.targetRefs[0].kind: not enforced: GRPCRoute targets are not resolved by this agent",
            "5:3 spec: not enforced: no target this agent can resolve (Gateway or HTTPRoute), so rules local are dropped",
        ]
    );
}

#[test]
fn kgateway_reads_its_schema_limits() {
    let bucket = |b: &str| format!("{KGW}  rateLimit:\n    local:\n{b}");
    // Envoy's local rate limit refuses fill intervals under 50ms, and so does kgateway.
    assert_eq!(
        errors(&bucket("      tokenBucket: {maxTokens: 10, fillInterval: 10ms}\n")),
        ["p.yaml:7:50: spec.rateLimit.local.tokenBucket.fillInterval: must be at least 50ms, got 10ms"]
    );
    let (rules, _) = rules_and_warnings(&bucket("      tokenBucket: {maxTokens: 10, fillInterval: 50ms}\n"));
    assert_eq!(rules, ["local 1/50ms"]);
    // Runtime fractions are reported; a block without a bucket limits nothing.
    let (rules, w) = rules_and_warnings(&bucket(
        "      percentEnforced: 0\n      tokenBucket: {maxTokens: 10, tokensPerFill: 10, fillInterval: 1s}\n",
    ));
    assert_eq!(rules, ["local 10/Second"]);
    assert_eq!(
        w,
        ["7:24 spec.rateLimit.local.percentEnforced: not enforced: the bucket applies to every request (100%)"]
    );
    let (rules, w) = rules_and_warnings(&bucket("      percentEnabled: 50\n"));
    assert!(rules.is_empty());
    assert_eq!(
        w,
        [
            "7:23 spec.rateLimit.local.percentEnabled: not enforced: the bucket applies to every request (100%)",
            "7:7 spec.rateLimit.local: no tokenBucket: nothing to enforce",
        ]
    );
    // Generic entries need a key and a value, both non-empty.
    assert_eq!(
        errors(&format!(
            "{KGW}  rateLimit:\n    global:\n      descriptors: [{{entries: [{{type: Generic, generic: {{key: \"\", value: v}}}}]}}]\n      extensionRef: {{name: rl}}\n"
        )),
        ["p.yaml:7:63: spec.rateLimit.global.descriptors[0].entries[0].generic.key: must not be empty"]
    );
}

#[test]
fn agentgateway_requests_and_tokens_exclude_each_other() {
    assert_eq!(
        errors(&format!(
            "{AGW}  traffic:\n    rateLimit:\n      local:\n        - {{requests: 5, tokens: 100, unit: Minutes}}\n"
        )),
        ["p.yaml:8:33: spec.traffic.rateLimit.local[0].tokens: cannot be combined with requests"]
    );
}

#[test]
fn envoy_gateway_shadow_mode() {
    use super::super::model::Mode;
    let policy = |rules: &str| {
        let text = format!(
            "{EG}  targetRefs: [{{kind: HTTPRoute, name: r}}]\n  rateLimit:\n    global:\n      rules:\n{rules}"
        );
        let docs = load_file_str(Path::new("p.yaml"), &text).unwrap_or_else(|e| panic!("{e}"));
        let [Document::Policy(p)] = docs.as_slice() else { panic!("{docs:?}") };
        (p.mode, p.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>(), warnings(&text))
    };
    // Every rule shadowed: the policy counts and never denies, i.e. Shadow mode.
    let (mode, rules, w) = policy(
        "        - limit: {requests: 1, unit: Second}\n          shadowMode: true\n        - limit: {requests: 9, unit: Hour}\n          shadowMode: true\n",
    );
    assert_eq!((mode, rules, w), (Mode::Shadow, vec!["rule-0".to_owned(), "rule-1".to_owned()], vec![]));
    // Mixed: the enforced rule stays enforced; the shadow one is dropped, never enforced.
    let (mode, rules, w) = policy(
        "        - limit: {requests: 1, unit: Second}\n          shadowMode: true\n        - limit: {requests: 9, unit: Hour}\n          shadowMode: false\n",
    );
    assert_eq!((mode, rules), (Mode::Enforce, vec!["rule-1".to_owned()]));
    assert_eq!(
        w,
        [
            "10:23 spec.rateLimit.global.rules[0].shadowMode: not enforced: rule rule-0 is in shadow mode beside enforced rules; this agent shadows whole policies only (the rule is dropped)"
        ]
    );
}

#[test]
fn envoy_gateway_distinct_takes_no_value() {
    let text = |value: &str| {
        format!(
            "{EG}  targetRefs: [{{kind: HTTPRoute, name: r}}]\n  rateLimit:\n    global:\n      rules:\n        - clientSelectors: [{{headers: [{{name: x-user-id, type: Distinct, value: {value}}}]}}]\n          limit: {{requests: 1, unit: Second}}\n"
        )
    };
    assert_eq!(
        errors(&text("alice")),
        [
            "p.yaml:9:81: spec.rateLimit.global.rules[0].clientSelectors[0].headers[0].value: a Distinct match takes no value (every value gets its own bucket); use type Exact",
        ]
    );
    // `*` is "any value" (POLICY.md), the same as no value.
    let (rules, w) = rules_and_warnings(&text("\"*\""));
    assert_eq!((rules, w), (vec!["rule-0 1/Second".to_owned()], vec![]));
}
