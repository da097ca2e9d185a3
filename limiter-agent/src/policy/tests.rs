//! Loader, validation and compiler tests: exact `file:line:col: field: message` output.

use std::path::{Path, PathBuf};

use super::*;
use crate::plan::{CountKind, PortTarget, Protocol, SourceSelector, Unit};

const HEAD: &str = "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\n";

/// Errors of one file's text, one string each.
fn errors(text: &str) -> Vec<String> {
    match load_str(Path::new("p.yaml"), text) {
        Ok(p) => panic!("expected errors, loaded {p:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn one_error(text: &str) -> String {
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.into_iter().next().unwrap()
}

fn load(text: &str) -> PolicySet {
    match load_str(Path::new("p.yaml"), text) {
        Ok(policies) => PolicySet { policies, ..Default::default() },
        Err(e) => panic!("{e}"),
    }
}

/// A policy document with `rules` under `spec.rateLimit.local.rules` (indented 8).
fn with_rules(name: &str, rules: &str) -> String {
    format!("{HEAD}metadata: {{name: {name}}}\nspec:\n  rateLimit:\n    local:\n      rules:\n{rules}")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("limiter-policy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unknown_unit_points_at_value() {
    let text = with_rules("a", "        - name: r\n          limit: {requests: 1, unit: Minuets}\n");
    assert_eq!(
        one_error(&text),
        "p.yaml:9:38: spec.rateLimit.local.rules[0].limit.unit: unknown unit \"Minuets\" (expected Second, Minute, Hour or Day)"
    );
}

#[test]
fn units_plural_and_any_case() {
    let text = with_rules(
        "a",
        "        - name: a\n          limit: {requests: 1, unit: seconds}\n\
         \x20       - name: b\n          limit: {requests: 1, unit: Minutes}\n\
         \x20       - name: c\n          limit: {requests: 1, unit: HOUR}\n\
         \x20       - name: d\n          limit: {requests: 1, unit: day}\n",
    );
    let set = load(&text);
    let units: Vec<Unit> = set.policies[0].rules.iter().map(|r| r.limit.unit).collect();
    assert_eq!(units, [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day]);
}

#[test]
fn syntax_error() {
    let text = format!("{HEAD}metadata: {{name: x\nspec: {{}}\n");
    assert_eq!(
        one_error(&text),
        "p.yaml:4:5: YAML syntax error: while parsing a flow mapping, did not find expected ',' or '}'"
    );
}

#[test]
fn wrong_type() {
    let text = with_rules("a", "        - name: r\n          limit: {requests: many, unit: Second}\n");
    assert_eq!(one_error(&text), "p.yaml:9:29: spec.rateLimit.local.rules[0].limit.requests: expected an integer");
    let text = format!("{HEAD}metadata: {{name: a}}\nspec:\n  allow: 10.0.0.0/8\n");
    let e = one_error(&text);
    assert!(e.starts_with("p.yaml:5:10: spec.allow: "), "{e}");
}

#[test]
fn unknown_fields() {
    let text = with_rules("a", "        - name: r\n          limit: {requests: 1, unit: Second}\n          burst: 3\n");
    assert_eq!(
        one_error(&text),
        "p.yaml:10:11: spec.rateLimit.local.rules[0].burst: unknown field `burst`, expected one of name, clientSelectors, count, limit, kernelGuard"
    );
    let text = format!("{HEAD}metadata: {{name: a}}\nspec: {{}}\nstatus: {{}}\n");
    assert!(one_error(&text).starts_with("p.yaml:5:1: status: unknown field `status`"));
    // Inside sourceCIDR, whose own field is called `value`.
    let text = with_rules(
        "a",
        "        - name: r\n          clientSelectors: [{sourceCIDR: {value: 10.0.0.0/8, typ: Exact}}]\n          limit: {requests: 1, unit: Second}\n",
    );
    let e = one_error(&text);
    assert!(
        e.starts_with("p.yaml:9:62: spec.rateLimit.local.rules[0].clientSelectors[0].sourceCIDR.typ: unknown field"),
        "{e}"
    );
}

#[test]
fn own_value_field_keeps_its_name_in_paths() {
    let text = with_rules(
        "a",
        "        - name: r\n          clientSelectors: [{sourceCIDR: {value: [x]}}]\n          limit: {requests: 1, unit: Second}\n",
    );
    let e = one_error(&text);
    assert!(e.starts_with("p.yaml:9:50: spec.rateLimit.local.rules[0].clientSelectors[0].sourceCIDR.value: "), "{e}");
}

#[test]
fn missing_field() {
    let text = with_rules("a", "        - name: r\n          count: Packets\n");
    assert_eq!(one_error(&text), "p.yaml:9:11: spec.rateLimit.local.rules[0]: missing field `limit`");
}

#[test]
fn zero_and_negative_requests_and_burst() {
    let text = with_rules(
        "a",
        "        - name: a\n          limit: {requests: 0, unit: Second}\n\
         \x20       - name: b\n          limit: {requests: -5, unit: Second, burst: -1}\n",
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:9:29: spec.rateLimit.local.rules[0].limit.requests: must be at least 1, got 0",
            "p.yaml:11:29: spec.rateLimit.local.rules[1].limit.requests: must be at least 1, got -5",
            "p.yaml:11:54: spec.rateLimit.local.rules[1].limit.burst: must be at least 0, got -1",
        ]
    );
}

#[test]
fn bad_cidrs_all_reported() {
    let text = format!(
        "{HEAD}metadata: {{name: a}}\nspec:\n  allow: [10.0.0.0/8, 10.0.0.300]\n  deny:\n    - 10.1.2.3/8\n    - fd00::/200\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:5:23: spec.allow[1]: invalid CIDR \"10.0.0.300\": not an IPv4 or IPv6 address or CIDR",
            "p.yaml:7:7: spec.deny[0]: invalid CIDR \"10.1.2.3/8\": host bits set (did you mean 10.0.0.0/8?)",
            "p.yaml:8:7: spec.deny[1]: invalid CIDR \"fd00::/200\": not an IPv4 or IPv6 address or CIDR",
        ]
    );
}

#[test]
fn bare_addresses_and_ipv6() {
    let text = format!("{HEAD}metadata: {{name: a}}\nspec:\n  allow: [192.0.2.1, \"2001:db8::1\", \"fd00::/8\"]\n");
    let set = load(&text);
    let nets: Vec<String> = set.policies[0].allow.iter().map(|e| e.value.to_string()).collect();
    assert_eq!(nets, ["192.0.2.1/32", "2001:db8::1/128", "fd00::/8"]);
}

#[test]
fn duplicate_rule_names_across_local_and_global() {
    let text = format!(
        "{HEAD}metadata: {{name: a}}\nspec:\n  rateLimit:\n    local:\n      rules:\n        - name: r\n          limit: {{requests: 1, unit: Second}}\n    global:\n      rules:\n        - name: r\n          limit: {{requests: 1, unit: Second}}\n"
    );
    assert_eq!(
        one_error(&text),
        "p.yaml:12:17: spec.rateLimit.global.rules[0].name: duplicate rule name \"r\" (first used on line 8)"
    );
}

#[test]
fn duplicate_policy_names_across_files() {
    let dir = TempDir::new("dup");
    std::fs::write(dir.0.join("a.yaml"), format!("{HEAD}metadata: {{name: same}}\nspec: {{}}\n")).unwrap();
    std::fs::write(dir.0.join("b.yml"), format!("{HEAD}metadata:\n  name: same\nspec: {{}}\n")).unwrap();
    let e = load_paths(std::slice::from_ref(&dir.0)).unwrap_err();
    let a = dir.0.join("a.yaml").display().to_string();
    let b = dir.0.join("b.yml").display().to_string();
    assert_eq!(
        e.to_string(),
        format!("{b}:4:9: metadata.name: duplicate policy name \"same\" (first defined at {a}:3:18)")
    );
}

#[test]
fn empty_selectors() {
    let text = with_rules(
        "a",
        "        - name: r\n          clientSelectors:\n            - {}\n            - headers: []\n          limit: {requests: 1, unit: Second}\n",
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:10:15: spec.rateLimit.local.rules[0].clientSelectors[0]: empty client selector: give sourceCIDR and/or headers",
            "p.yaml:11:15: spec.rateLimit.local.rules[0].clientSelectors[1].headers: empty headers list: give at least one header match",
        ]
    );
}

#[test]
fn bad_words() {
    let text = format!(
        "{HEAD}metadata: {{name: a}}\nspec:\n  mode: Enforcing\n  targetRefs: [{{kind: Port, port: 70000, protocol: SCTP}}, {{kind: Service, name: x}}]\n  rateLimit:\n    local:\n      rules:\n        - name: r\n          count: Pakets\n          kernelGuard: maybe\n          clientSelectors: [{{sourceCIDR: {{type: Some, value: 10.0.0.0/8}}}}]\n          limit: {{requests: 1, unit: Second}}\n        - name: h\n          count: Packets\n          clientSelectors: [{{headers: [{{name: x-user, type: Exact}}]}}]\n          limit: {{requests: 1, unit: Second}}\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:5:9: spec.mode: unknown mode \"Enforcing\" (expected Enforce or Shadow)",
            "p.yaml:6:35: spec.targetRefs[0].port: must be at most 65535, got 70000",
            "p.yaml:6:52: spec.targetRefs[0].protocol: unknown protocol \"SCTP\" (expected TCP or UDP)",
            "p.yaml:6:66: spec.targetRefs[1].kind: unknown targetRef kind \"Service\" (expected Port, HTTPRoute or Gateway)",
            "p.yaml:13:49: spec.rateLimit.local.rules[0].clientSelectors[0].sourceCIDR.type: unknown type \"Some\" (expected Exact or Distinct)",
            "p.yaml:11:18: spec.rateLimit.local.rules[0].count: unknown count \"Pakets\" (expected Packets, Bytes, Connections or Requests)",
            "p.yaml:12:24: spec.rateLimit.local.rules[0].kernelGuard: unknown kernelGuard \"maybe\" (expected On or Off)",
            "p.yaml:17:47: spec.rateLimit.local.rules[1].clientSelectors[0].headers[0]: header match with type Exact needs a value",
            "p.yaml:16:18: spec.rateLimit.local.rules[1].count: rules that select on headers count Requests, not Packets",
        ]
    );
}

#[test]
fn unsupported_kind_and_api_version() {
    let text =
        "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: SecurityPolicy\nmetadata: {name: b}\nspec: {anything: 1}\n";
    assert_eq!(
        one_error(text),
        "p.yaml:2:7: kind: kind SecurityPolicy is not supported (supported: RateLimitPolicy, ListenerMap, BackendTrafficPolicy, RateLimitFilter, TrafficPolicy, AgentgatewayPolicy, GatewayExtension, and envoyproxy/ratelimit configs)"
    );
    let text = "apiVersion: limiter.dev/v9\nkind: RateLimitPolicy\nmetadata: {name: b}\nspec: {}\n";
    assert_eq!(
        one_error(text),
        "p.yaml:1:13: apiVersion: unsupported apiVersion \"limiter.dev/v9\" for kind RateLimitPolicy (expected limiter.dev/v1alpha1)"
    );
    assert_eq!(one_error("metadata: {name: b}\n"), "p.yaml:1:1: missing field `kind`");
}

#[test]
fn multi_document_errors_name_the_document_and_all_are_collected() {
    let text = format!(
        "# leading comment\n{HEAD}metadata: {{name: one}}\nspec: {{}}\n---\n{HEAD}metadata: {{name: two}}\nspec:\n  mode: Loud\n---\n# empty\n---\n{HEAD}metadata: {{name: three}}\nspec:\n  allow: [nope]\n"
    );
    assert_eq!(
        errors(&text),
        [
            "p.yaml:11:9 (document 2): spec.mode: unknown mode \"Loud\" (expected Enforce or Shadow)",
            "p.yaml:19:11 (document 4): spec.allow[0]: invalid CIDR \"nope\": not an IPv4 or IPv6 address or CIDR",
        ]
    );
    let ok =
        format!("{HEAD}metadata: {{name: one}}\nspec: {{}}\n---\n{HEAD}metadata: {{name: two}}\nspec: {{}}\n---\n");
    let set = load(&ok);
    let docs: Vec<_> = set.policies.iter().map(|p| (p.name.as_str(), p.source.document)).collect();
    assert_eq!(docs, [("one", Some(1)), ("two", Some(2))]);
}

#[test]
fn syntax_error_in_a_later_document_keeps_earlier_ones_checked() {
    let text = format!("{HEAD}metadata: {{name: one}}\nspec: {{mode: Nope}}\n---\nfoo: [\n");
    assert_eq!(
        errors(&text),
        [
            "p.yaml:4:14 (document 1): spec.mode: unknown mode \"Nope\" (expected Enforce or Shadow)",
            "p.yaml:6:6 (document 2): YAML syntax error: unclosed bracket '['",
        ]
    );
}

#[test]
fn single_document_with_leading_separator_has_no_document_tag() {
    let text = format!("---\n{HEAD}metadata: {{name: one}}\nspec: {{mode: Nope}}\n");
    assert_eq!(one_error(&text), "p.yaml:5:14: spec.mode: unknown mode \"Nope\" (expected Enforce or Shadow)");
}

#[test]
fn directory_with_configmap_layout() {
    let dir = TempDir::new("cm");
    let data = dir.0.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("b.yaml"), format!("{HEAD}metadata: {{name: b}}\nspec: {{}}\n")).unwrap();
    std::fs::write(data.join("a.yml"), format!("{HEAD}metadata: {{name: a}}\nspec: {{}}\n")).unwrap();
    std::fs::write(data.join("notes.txt"), "not yaml").unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.000000001", dir.0.join("..data")).unwrap();
    for f in ["b.yaml", "a.yml", "notes.txt"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.0.join(f)).unwrap();
    }
    std::fs::write(dir.0.join(".hidden.yaml"), "not: [valid").unwrap();
    std::fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    let set = load_paths(std::slice::from_ref(&dir.0)).unwrap();
    let names: Vec<&str> = set.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(set.policies[0].source.file, dir.0.join("a.yml"));
}

#[test]
fn missing_path_is_an_error() {
    let e = load_paths(&[PathBuf::from("/nonexistent/limiter.yaml")]).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/limiter.yaml:0:0: cannot read: "), "{e}");
}

#[test]
fn every_example_loads_and_compiles() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3);
    for f in &files {
        let set = load_paths(std::slice::from_ref(f)).unwrap_or_else(|e| panic!("{e}"));
        assert!(!set.policies.is_empty(), "{}", f.display());
        let compiled = compile(&set);
        assert!(!compiled.plan.rules.is_empty(), "{}", f.display());
    }
    // The whole directory is one consistent set (names unique).
    load_paths(&[examples()]).unwrap();
}

#[test]
fn every_invalid_example_fails_with_its_message() {
    let expected = [
        ("bad-api-version.yaml", "1:13: apiVersion: unsupported apiVersion \"limiter.dev/v2\""),
        ("bad-cidr.yaml", "5:23: spec.allow[1]: invalid CIDR \"10.0.0.300/32\""),
        ("bad-unit.yaml", "15:19: spec.rateLimit.local.rules[2].limit.unit: unknown unit \"Minuets\""),
        ("duplicate-rule.yaml", "12:17: spec.rateLimit.global.rules[0].name: duplicate rule name \"a\""),
        ("empty-selector.yaml", "10:15: spec.rateLimit.local.rules[0].clientSelectors[0]: empty client selector"),
        ("listener-port.yaml", "8:56: spec.gateways[0].listeners[1].port: must be at least 1, got 0"),
        (
            "listener-protocol.yaml",
            "9:42: spec.gateways[0].listeners[0].protocol: unknown protocol \"SCTP\" (expected TCP, UDP, HTTP, HTTPS or TLS)",
        ),
        ("syntax.yaml", "4:5: YAML syntax error: "),
        ("unknown-field.yaml", "10:11: spec.rateLimit.local.rules[0].burst: unknown field `burst`"),
        (
            "unknown-kind.yaml",
            "2:7: kind: kind SecurityPolicy is not supported (supported: RateLimitPolicy, ListenerMap, BackendTrafficPolicy, RateLimitFilter, TrafficPolicy, AgentgatewayPolicy, GatewayExtension, and envoyproxy/ratelimit configs)",
        ),
        ("wrong-type.yaml", "9:29: spec.rateLimit.local.rules[0].limit.requests: expected an integer"),
        ("zero-requests.yaml", "9:29: spec.rateLimit.local.rules[0].limit.requests: must be at least 1, got 0"),
    ];
    let dir = examples().join("invalid");
    let mut on_disk: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    on_disk.sort();
    let listed: Vec<&str> = expected.iter().map(|(f, _)| *f).collect();
    assert_eq!(on_disk, listed, "every invalid example needs an expected message");
    for (file, msg) in expected {
        let path = dir.join(file);
        let e = load_paths(std::slice::from_ref(&path)).unwrap_err();
        assert_eq!(e.len(), 1, "{e}");
        let want = format!("{}:{msg}", path.display());
        assert!(e.to_string().starts_with(&want), "{file}: got {e}\nwant {want}");
    }
}

fn rule<'a>(c: &'a Compiled, name: &str) -> &'a crate::plan::KernelRule {
    c.plan.rules.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {:#?}", c.plan.rules))
}

#[test]
fn compile_kernel_rules_selectors_and_shadow() {
    let text = format!(
        "{HEAD}metadata: {{name: p}}\nspec:\n  mode: shadow\n  targetRefs: [{{kind: Port, port: 53, protocol: udp}}, {{kind: Port, port: 80}}, {{kind: port, port: 80}}]\n  allow: [10.0.0.0/8]\n  deny: [192.0.2.0/24]\n  rateLimit:\n    local:\n      rules:\n        - name: per-source\n          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 0.0.0.0/0}}}}]\n          limit: {{requests: 10, unit: Second, burst: 5}}\n        - name: shared-net\n          clientSelectors: [{{sourceCIDR: {{value: 198.51.100.0/24, invert: true}}}}]\n          count: Bytes\n          limit: {{requests: 1000000, unit: Second}}\n        - name: ceiling\n          count: connections\n          limit: {{requests: 100, unit: Minute}}\n"
    );
    let c = compile(&load(&text));
    assert!(c.notices.is_empty(), "{:?}", c.notices);
    assert_eq!(c.plan.rules.len(), 3);
    let targets =
        vec![PortTarget { port: 53, protocol: Protocol::Udp }, PortTarget { port: 80, protocol: Protocol::Tcp }];
    let per_source = rule(&c, "p/per-source");
    assert_eq!(
        per_source.source,
        SourceSelector { nets: vec!["0.0.0.0/0".parse().unwrap()], distinct: true, invert: false }
    );
    assert!(per_source.per_source());
    assert_eq!(per_source.count, CountKind::Packets, "default count without headers");
    assert_eq!((per_source.limit.requests, per_source.limit.burst), (10, 5));
    assert_eq!(per_source.targets, targets);
    assert!(per_source.shadow);
    let shared = rule(&c, "p/shared-net");
    assert_eq!(
        shared.source,
        SourceSelector { nets: vec!["198.51.100.0/24".parse().unwrap()], distinct: false, invert: true }
    );
    assert_eq!(shared.count, CountKind::Bytes);
    let ceiling = rule(&c, "p/ceiling");
    assert_eq!(ceiling.source, SourceSelector::everyone(false));
    assert_eq!(ceiling.count, CountKind::Connections);
    assert_eq!(ceiling.limit.unit, Unit::Minute);
    assert_eq!(c.plan.allow.len(), 1);
    assert_eq!(c.plan.deny[0].policy, "p");
    assert_eq!(c.summaries[0].to_string(), "p: 3 rule(s) in the kernel, 0 L7, 0 not enforced");
}

#[test]
fn compile_l7_rules_guards_and_notices() {
    let text = format!(
        "{HEAD}metadata: {{name: p}}\nspec:\n  penalty: {{overLimitEvents: 20, within: 10s, block: 1m}}\n  rateLimit:\n    local:\n      rules:\n        - name: per-user\n          clientSelectors: [{{headers: [{{name: x-user-id, type: Distinct}}]}}]\n          limit: {{requests: 100, unit: Minute}}\n        - name: per-client\n          clientSelectors: [{{sourceCIDR: {{type: Distinct, value: 10.0.0.0/8}}}}]\n          count: Requests\n          limit: {{requests: 5, unit: Second, burst: 2}}\n        - name: everyone\n          count: Requests\n          kernelGuard: Off\n          limit: {{requests: 5, unit: Second}}\n    global:\n      rules:\n        - name: budget\n          limit: {{requests: 1000, unit: Hour}}\n        - name: all-requests\n          count: Requests\n          limit: {{requests: 1000, unit: Hour}}\n"
    );
    let set = load(&text);
    let p = &set.policies[0];
    assert_eq!(p.penalty.as_ref().map(|x| (x.over_limit_events, x.block.as_secs())), Some((20, 60)));
    let c = compile(&set);
    let names: Vec<&str> = c.plan.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["p/per-client#guard", "p/budget", "p/all-requests#guard"]);
    let guard = rule(&c, "p/per-client#guard");
    assert_eq!(guard.count, CountKind::Connections);
    assert_eq!((guard.limit.requests, guard.limit.burst), (5, 2));
    assert!(guard.source.distinct);
    // Only the kernel-counted global rule is shared across nodes; guards never are.
    let global: Vec<(&str, bool)> = c.plan.rules.iter().map(|r| (r.name.as_str(), r.global)).collect();
    assert_eq!(global, [("p/per-client#guard", false), ("p/budget", true), ("p/all-requests#guard", false)]);
    // The penalty counts denials of the policy's L7 rules only (kernel rules drop already).
    assert_eq!(c.penalties.len(), 1);
    let pen = &c.penalties[0];
    assert_eq!(
        (pen.policy.as_str(), pen.over_limit_events, pen.within.as_secs(), pen.block.as_secs()),
        ("p", 20, 10, 60)
    );
    assert_eq!(pen.rules, ["p/per-user", "p/per-client", "p/everyone", "p/all-requests"]);
    let notices: Vec<String> = c.notices.iter().map(ToString::to_string).collect();
    assert_eq!(
        notices,
        [
            "p.yaml:9:11: spec.rateLimit.local.rules[0]: rule p/per-user is L7 (selects on request attributes): answered by the rate limit service (`limiter-agent run --rls-listen`, domain limiter) when the gateway sends its descriptor, see `limiter-agent explain`",
            "p.yaml:12:11: spec.rateLimit.local.rules[1]: rule p/per-client is L7 (counts Requests): answered by the rate limit service (`limiter-agent run --rls-listen`, domain limiter) when the gateway sends its descriptor, see `limiter-agent explain`; the kernel guard p/per-client#guard limits new connections at the same rate",
            "p.yaml:16:11: spec.rateLimit.local.rules[2]: rule p/everyone is L7 (counts Requests): answered by the rate limit service (`limiter-agent run --rls-listen`, domain limiter) when the gateway sends its descriptor, see `limiter-agent explain`; no kernel guard: kernelGuard is Off",
            "p.yaml:22:11: spec.rateLimit.global.rules[0]: rule p/budget: global scope: with --rls-backend redis the kernel limit is shared across the live nodes (each enforces a share following its demand), else counted on this node only",
            "p.yaml:24:11: spec.rateLimit.global.rules[1]: rule p/all-requests is L7 (counts Requests): answered by the rate limit service (`limiter-agent run --rls-listen`, domain limiter) when the gateway sends its descriptor, see `limiter-agent explain`; the kernel guard p/all-requests#guard limits new connections at the same rate",
            "p.yaml:24:11: spec.rateLimit.global.rules[1]: rule p/all-requests: global: shared through Redis when the agent runs with --rls-backend redis, else per node",
            "p.yaml:5:12: spec.penalty: escalation: a source the rate limit service denies 20 times within 10s (rules p/per-user, p/per-client, p/everyone, p/all-requests) is put in the XDP block list for 60s (`limiter-agent run --iface`)",
        ]
    );
    assert_eq!(c.summaries[0].l7_rules, ["p/per-user", "p/per-client", "p/everyone", "p/all-requests"]);
    assert!(c.summaries[0].not_enforced.is_empty());
}

#[test]
fn compile_route_targets_and_several_source_selectors() {
    let text = format!(
        "{HEAD}metadata: {{name: r}}\nspec:\n  targetRefs: [{{kind: HTTPRoute, name: api}}, {{kind: Gateway, name: gw}}]\n  rateLimit:\n    local:\n      rules:\n        - name: c\n          limit: {{requests: 1, unit: Second}}\n---\n{HEAD}metadata: {{name: s}}\nspec:\n  rateLimit:\n    local:\n      rules:\n        - name: two\n          clientSelectors: [{{sourceCIDR: {{value: 10.0.0.0/8}}}}, {{sourceCIDR: {{value: 10.1.0.0/16}}}}]\n          limit: {{requests: 1, unit: Second}}\n"
    );
    let c = compile(&load(&text));
    assert!(c.plan.rules.is_empty(), "{:?}", c.plan.rules);
    let notices: Vec<String> = c.notices.iter().map(ToString::to_string).collect();
    assert_eq!(
        notices,
        [
            "p.yaml:5:16 (document 1): spec.targetRefs[0]: HTTPRoute api: not resolved to ports (add it to a ListenerMap), so kernel rules do not cover it; L7 rules apply to its requests",
            "p.yaml:5:46 (document 1): spec.targetRefs[1]: Gateway gw: not resolved to ports (add it to a ListenerMap), so kernel rules do not cover it; L7 rules apply to its requests",
            "p.yaml:9:11 (document 1): spec.rateLimit.local.rules[0]: rule r/c: the policy's HTTPRoute/Gateway targets are not resolved to ports (add them to a ListenerMap), so it is not enforced in the kernel",
            "p.yaml:19:11 (document 2): spec.rateLimit.local.rules[0]: rule s/two: several sourceCIDR selectors in one rule are not enforceable in the kernel yet; not enforced",
        ]
    );
}
