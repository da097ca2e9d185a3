//! Envoy Gateway, TEG and agentgateway kinds: every example under `examples/gateways/`
//! loads to exactly what it means, every invalid one fails with its `line:col field: message`
//! errors, and the shapes the examples do not cover.

use std::path::{Path, PathBuf};

use super::super::model::*;
use super::super::{PolicyKind, load_file_str, load_paths, load_str};

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateways").join(kind)
}

/// `*.yaml` files of a directory, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// One line per rule: `name Scope requests/Unit+burst [selectors]`.
fn rule_line(r: &Rule) -> String {
    let mut sels = Vec::new();
    for s in &r.selectors {
        if let Some(c) = &s.source {
            sels.push(format!("src {}{}", c.net, if c.distinct { " distinct" } else { "" }));
        }
        for h in &s.headers {
            let m = match (&h.value, h.distinct) {
                (_, true) => "distinct".to_owned(),
                (Some(v), false) => format!("= {v}"),
                (None, false) => "?".to_owned(),
            };
            sels.push(format!("hdr {} {m}{}", h.name, if h.invert { " invert" } else { "" }));
        }
        for h in &s.http {
            match crate::policy::compile::l7::http_entry(h).value {
                crate::plan::EntryValue::Exact(v) => sels.push(v),
                other => sels.push(format!("{other:?}")),
            }
        }
    }
    assert_eq!(r.count, Count::Requests, "{}", r.name);
    assert!(r.kernel_guard, "{}", r.name);
    format!("{} {:?} {}/{}+{} [{}]", r.name, r.scope, r.limit.requests, r.limit.unit, r.limit.burst, sels.join(", "))
}

fn target_line(t: &Target) -> String {
    match &t.kind {
        TargetKind::Route { kind, name, namespace, section_name } => {
            format!("{kind} {}/{name}{}", namespace.as_deref().unwrap_or("-"), section_name.as_deref().unwrap_or(""))
        }
        TargetKind::Port(p) => format!("port {p:?}"),
    }
}

/// `line field: message` of each warning.
fn warning_lines(p: &Policy) -> Vec<String> {
    p.not_enforced.iter().map(|w| format!("{} {}: {}", w.at.pos.line, w.at.field, w.value)).collect()
}

/// Loads one file that must hold exactly one policy.
fn load_one(path: &Path) -> Policy {
    let text = std::fs::read_to_string(path).unwrap();
    let mut docs = load_str(path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs.remove(0)
}

/// `line:col field: message` of every error of one file.
fn error_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    match load_file_str(path, &text) {
        Ok(d) => panic!("{}: expected errors, loaded {d:?}", path.display()),
        Err(e) => e
            .iter()
            .map(|e| {
                assert_eq!(e.location.file, path);
                format!("{}:{} {}: {}", e.location.pos.line, e.location.pos.column, e.field, e.kind)
            })
            .collect(),
    }
}

struct Expect {
    file: &'static str,
    kind: PolicyKind,
    name: &'static str,
    targets: &'static [&'static str],
    rules: &'static [&'static str],
    warnings: &'static [&'static str],
}

fn check_dir(kind: &str, expected: &[Expect], invalid: &[(&str, &[&str])]) {
    let files = yaml_files(&dir(kind));
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let mut want: Vec<&str> = expected.iter().map(|e| e.file).collect();
    want.sort();
    assert_eq!(names, want, "every example of {kind} has an expectation");
    for e in expected {
        let p = load_one(&dir(kind).join(e.file));
        assert_eq!(p.kind, e.kind, "{}", e.file);
        assert_eq!(p.name, e.name, "{}", e.file);
        assert_eq!(p.mode, Mode::Enforce);
        assert!(p.allow.is_empty() && p.deny.is_empty() && p.penalty.is_none() && p.descriptor_actions.is_empty());
        assert_eq!(p.targets.iter().map(target_line).collect::<Vec<_>>(), e.targets, "{}", e.file);
        assert_eq!(p.rules.iter().map(rule_line).collect::<Vec<_>>(), e.rules, "{}", e.file);
        assert_eq!(warning_lines(&p), e.warnings, "{}", e.file);
    }
    // The whole directory is one valid set (names unique across it).
    let set = load_paths(&[dir(kind)]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.policies.len(), expected.len());

    let files = yaml_files(&dir(kind).join("invalid"));
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let mut want: Vec<&str> = invalid.iter().map(|e| e.0).collect();
    want.sort();
    assert_eq!(names, want, "every invalid example of {kind} has an expectation");
    for (file, errors) in invalid {
        assert_eq!(error_lines(&dir(kind).join("invalid").join(file)), *errors, "{file}");
    }
}

#[test]
fn envoy_gateway_examples() {
    use PolicyKind::BackendTrafficPolicy as K;
    let route: &[&str] = &["HTTPRoute default/http-ratelimit"];
    check_dir(
        "envoy-gateway",
        &[
            Expect {
                file: "anonymous-users.yaml",
                kind: K,
                name: "eg-anonymous",
                targets: route,
                rules: &[
                    "rule-0 Global 100/Minute+0 [hdr x-user-id distinct]",
                    "rule-1 Global 10/Minute+0 [hdr x-user-id distinct invert]",
                ],
                warnings: &[
                    "17 spec.timeout: not enforced by this agent (the gateway does it)",
                    "20 spec.retry: not enforced by this agent (the gateway does it)",
                    "36 spec.rateLimit.global.rules[1].clientSelectors[0].headers[0].invert: read as: requests without this header (Envoy Gateway itself refuses invert with type Distinct)",
                ],
            },
            Expect {
                file: "distinct-users.yaml",
                kind: K,
                name: "eg-distinct-users",
                targets: route,
                rules: &["rule-0 Global 3/Hour+0 [hdr x-user-id distinct]"],
                warnings: &[],
            },
            Expect {
                file: "global-all-requests.yaml",
                kind: K,
                name: "eg-all-requests",
                targets: route,
                rules: &["rule-0 Global 1000/Minute+0 []"],
                warnings: &[],
            },
            Expect {
                file: "regex-header.yaml",
                kind: K,
                name: "eg-regex-header",
                targets: route,
                rules: &[
                    "rule-0 Global 5/Minute+0 [x-user-id~=^test-.*]",
                    "per-source Global 50/Second+0 [src 0.0.0.0/0 distinct]",
                ],
                warnings: &[],
            },
            Expect {
                file: "llm-path-method.yaml",
                kind: K,
                name: "eg-llm",
                targets: &["HTTPRoute default/llm-route"],
                rules: &[
                    "chat Global 3/Minute+0 [path^=/llm/v1/chat, method=POST]",
                    "no-debug Global 0/Hour+0 [?debug=1]",
                    "models Global 1000/168h+0 [path~=/llm/v1/models(\\?.*)?, not method=GET]",
                ],
                warnings: &[],
            },
            Expect {
                file: "source-ip.yaml",
                kind: K,
                name: "eg-source-ip",
                targets: &["Gateway default/eg"],
                rules: &["rule-0 Local 20/Second+0 [src 192.168.0.0/16 distinct]"],
                warnings: &[],
            },
            Expect {
                file: "specific-user.yaml",
                kind: K,
                name: "eg-specific-user",
                targets: route,
                rules: &["rule-0 Global 3/Hour+0 [hdr x-user-id = one]"],
                warnings: &[],
            },
        ],
        &[
            (
                "bad-cidr.yaml",
                &[
                    "13:51 spec.rateLimit.local.rules[0].clientSelectors[0].sourceCIDR.value: invalid CIDR \"10.0.0.1/8\": host bits set (did you mean 10.0.0.0/8?)",
                ],
            ),
            (
                "bad-unit.yaml",
                &[
                    "14:19 spec.rateLimit.global.rules[0].limit.unit: unknown unit \"Minuets\" (expected Second, Minute, Hour or Day)",
                ],
            ),
            (
                "duplicate-rule.yaml",
                &["12:17 spec.rateLimit.global.rules[1].name: duplicate rule name \"rule-0\" (first used on line 11)"],
            ),
            (
                "empty-selector.yaml",
                &[
                    "11:29 spec.rateLimit.global.rules[0].clientSelectors[0]: empty client selector: give sourceCIDR and/or headers",
                ],
            ),
            ("missing-limit.yaml", &["11:11 spec.rateLimit.global.rules[0]: missing field `limit`"]),
            ("missing-name.yaml", &["4:3 metadata: missing field `name`"]),
            (
                "wrong-type.yaml",
                &["11:29 spec.rateLimit.global.rules[0].limit.requests: expected an integer, found a string"],
            ),
            (
                "bad-limits.yaml",
                &[
                    "11:38 spec.rateLimit.local.rules[0].limit.unit: unknown unit \"Fortnight\" (expected Second, Minute, Hour or Day)",
                    "12:29 spec.rateLimit.local.rules[1].limit.requests: must be at least 0, got -5",
                ],
            ),
        ],
    );
}

#[test]
fn teg_examples() {
    use PolicyKind::RateLimitFilter as K;
    check_dir(
        "teg",
        &[
            Expect {
                file: "per-user.yaml",
                kind: K,
                name: "ratelimit-per-user",
                targets: &[],
                rules: &[
                    "rule-0 Global 5/Minute+0 [hdr x-user-id distinct]",
                    "rule-1 Global 100/Second+0 [src 10.0.0.0/8]",
                ],
                warnings: &[],
            },
            Expect {
                file: "ratelimitfilter.yaml",
                kind: K,
                name: "ratelimit-all-requests",
                targets: &[],
                rules: &["rule-0 Global 1/Second+0 []", "rule-1 Global 20/Minute+0 []"],
                warnings: &[],
            },
        ],
        &[
            ("bad-type.yaml", &["6:9 spec.type: unknown type \"Globle\" (expected Global or Local)"]),
            (
                "bad-unit.yaml",
                &[
                    "9:36 spec.global.rules[0].limit.unit: unknown unit \"Fortnight\" (expected Second, Minute, Hour or Day)",
                ],
            ),
            ("missing-global.yaml", &["6:3 spec: missing field `global`"]),
        ],
    );
}

#[test]
fn agentgateway_examples() {
    use PolicyKind::AgentgatewayPolicy as K;
    check_dir(
        "agentgateway",
        &[
            Expect {
                file: "local-burst.yaml",
                kind: K,
                name: "agw-local-ratelimit",
                targets: &["HTTPRoute default/mcp-route"],
                rules: &["local-0 Local 10/Second+20 []"],
                warnings: &[],
            },
            Expect {
                file: "two-windows.yaml",
                kind: K,
                name: "agw-two-windows",
                targets: &["Gateway default/agentgateway"],
                rules: &["local-0 Local 100/Minute+0 []", "local-1 Local 1000/Hour+0 []"],
                warnings: &["15 spec.traffic.timeouts: not enforced by this agent (the gateway does it)"],
            },
        ],
        &[
            (
                "bad-unit.yaml",
                &[
                    "11:32 spec.traffic.rateLimit.local[0].unit: unknown unit \"Fortnights\" (expected Second, Minute, Hour or Day)",
                ],
            ),
            (
                "negative-burst.yaml",
                &[
                    "11:22 spec.traffic.rateLimit.local[0].requests: must be at least 1, got 0",
                    "11:47 spec.traffic.rateLimit.local[0].burst: must be at least 0, got -1",
                    "12:11 spec.traffic.rateLimit.local[1]: missing field `requests`",
                ],
            ),
        ],
    );
}

#[test]
fn not_enforced_fields_become_compiler_notices() {
    let set = load_paths(&[dir("envoy-gateway").join("anonymous-users.yaml")]).unwrap_or_else(|e| panic!("{e}"));
    let c = super::super::compile(&set);
    let lines: Vec<String> = c
        .notices
        .iter()
        .filter(|n| matches!(n.kind, super::super::NoticeKind::NotEnforced { .. }))
        .map(|n| format!("{}:{} {}", n.location.pos.line, n.location.pos.column, n.kind))
        .collect();
    assert_eq!(
        lines,
        [
            "17:5 not enforced by this agent (the gateway does it)",
            "20:5 not enforced by this agent (the gateway does it)",
            "36:27 read as: requests without this header (Envoy Gateway itself refuses invert with type Distinct)"
        ]
    );
}

const EG: &str =
    "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: BackendTrafficPolicy\nmetadata: {name: p, namespace: ns}\n";

fn load_text(text: &str) -> Policy {
    let mut p = load_str(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.len(), 1);
    p.remove(0)
}

fn errors_of(text: &str) -> Vec<String> {
    match load_str(Path::new("p.yaml"), text) {
        Ok(p) => panic!("expected errors, loaded {p:?}"),
        Err(e) => e
            .iter()
            .map(|e| format!("{}:{} {}: {}", e.location.pos.line, e.location.pos.column, e.field, e.kind))
            .collect(),
    }
}

#[test]
fn envoy_gateway_shapes() {
    // Old shape: `type` picks the block; the other one is reported, not read.
    let p = load_text(&format!(
        "{EG}spec:\n  targetRefs: [{{kind: HTTPRoute, name: r}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n        - limit: {{requests: 1, unit: Month}}\n    global:\n      rules:\n        - limit: {{requests: 2, unit: years}}\n"
    ));
    assert_eq!(p.rules.iter().map(rule_line).collect::<Vec<_>>(), ["rule-0 Local 1/720h+0 []"]);
    assert_eq!(
        warning_lines(&p),
        ["12 spec.rateLimit.global: not enforced: ignored because `type` selects the other block"]
    );
    // New shape: both blocks, numbered across them; `value: "*"` is Distinct.
    let p = load_text(&format!(
        "{EG}spec:\n  targetRefs: [{{kind: Gateway, name: g, sectionName: http}}]\n  rateLimit:\n    local:\n      rules:\n        - clientSelectors: [{{headers: [{{name: x-k, value: \"*\"}}]}}]\n          limit: {{requests: 1, unit: Second}}\n    global:\n      rules:\n        - limit: {{requests: 2, unit: years}}\n"
    ));
    assert_eq!(
        p.rules.iter().map(rule_line).collect::<Vec<_>>(),
        ["rule-0 Local 1/Second+0 [hdr x-k distinct]", "rule-1 Global 2/8760h+0 []"]
    );
    assert_eq!(p.targets.iter().map(target_line).collect::<Vec<_>>(), ["Gateway ns/ghttp"]);
    // A path selector (PathPrefix by default) is enforced; cost is reported, the rule kept.
    let p = load_text(&format!(
        "{EG}spec:\n  targetRefs: [{{kind: HTTPRoute, name: r}}]\n  rateLimit:\n    global:\n      rules:\n        - clientSelectors: [{{path: {{value: /x}}}}]\n          limit: {{requests: 1, unit: Second}}\n        - limit: {{requests: 2, unit: Second}}\n          cost: {{request: {{from: Number, number: 1}}}}\n"
    ));
    assert_eq!(
        p.rules.iter().map(rule_line).collect::<Vec<_>>(),
        ["rule-0 Global 1/Second+0 [path^=/x]", "rule-1 Global 2/Second+0 []"]
    );
    assert_eq!(warning_lines(&p), Vec::<String>::new(), "a cost on a global rule is read");
}

#[test]
fn envoy_gateway_errors() {
    assert_eq!(
        errors_of(
            "apiVersion: gateway.envoyproxy.io/v1\nkind: BackendTrafficPolicy\nmetadata: {name: a/b}\nspec:\n  targetSelectors: [{matchLabels: {a: b}}]\n  targetRefs: [{kind: Pod, name: t}]\n"
        ),
        [
            "1:13 apiVersion: unknown apiVersion \"gateway.envoyproxy.io/v1\" (expected gateway.envoyproxy.io/v1alpha1)",
            "3:18 metadata.name: invalid name \"a/b\": must not contain '/' or '#' (they separate policy, rule and guard)",
            "6:23 spec.targetRefs[0].kind: unknown targetRef kind \"Pod\" (expected Gateway or HTTPRoute)",
        ]
    );
    assert_eq!(errors_of(EG), ["1:1 : missing field `spec`"]);
    assert_eq!(
        errors_of(&format!(
            "{EG}spec:\n  rateLimit:\n    global:\n      rules:\n        - clientSelectors: [{{headers: [], sourceCIDR: {{type: Some, value: x}}}}, {{headers: [{{name: a}}]}}]\n          limit: 5\n"
        )),
        [
            "8:39 spec.rateLimit.global.rules[0].clientSelectors[0].headers: empty headers list: give at least one header match",
            "8:62 spec.rateLimit.global.rules[0].clientSelectors[0].sourceCIDR.type: unknown type \"Some\" (expected Exact or Distinct)",
            "8:75 spec.rateLimit.global.rules[0].clientSelectors[0].sourceCIDR.value: invalid CIDR \"x\": not an IPv4 or IPv6 address or CIDR",
            "8:91 spec.rateLimit.global.rules[0].clientSelectors[1].headers[0]: header match with type Exact needs a value",
            "9:18 spec.rateLimit.global.rules[0].limit: expected a mapping, found an integer",
        ]
    );
}

#[test]
fn agentgateway_tokens_and_global_are_reported() {
    let p = load_text(
        "apiVersion: agentgateway.dev/v1alpha1\nkind: AgentgatewayPolicy\nmetadata: {name: a}\nspec:\n  traffic:\n    rateLimit:\n      local:\n        - {tokens: 100, unit: Minutes}\n        - {requests: 5, unit: second}\n      global: {domain: agw}\n  backend: {}\n",
    );
    assert!(p.targets.is_empty());
    assert_eq!(p.rules.iter().map(rule_line).collect::<Vec<_>>(), ["local-1 Local 5/Second+0 []"]);
    assert_eq!(
        warning_lines(&p),
        [
            "8 spec.traffic.rateLimit.local[0].tokens: not enforced: LLM token limits are counted by agentgateway (the entry is dropped)",
            "10 spec.traffic.rateLimit.global.domain: read: agentgateway computes the descriptors  and sends them to domain `agw`; the limits are the envoyproxy/ratelimit config with `domain: agw` (not enforced from this policy)",
            "11 spec.backend: not enforced by this agent (the gateway does it)",
        ]
    );
}

#[test]
fn kgateway_gateway_extension_and_agentgateway_global_are_read_and_explained() {
    let ext = "apiVersion: gateway.kgateway.dev/v1alpha1\nkind: GatewayExtension\nmetadata: {name: rls, namespace: kgateway-system}\nspec:\n  type: RateLimit\n  rateLimit:\n    grpcService: {backendRef: {name: limiter, port: 8081}}\n    domain: api-gateway\n    failOpen: true\n    timeout: 100ms\n";
    let p = load_text(ext);
    assert_eq!(p.kind, PolicyKind::GatewayExtension);
    assert!(p.rules.is_empty());
    let w = warning_lines(&p);
    assert!(
        w.iter().any(|l| l.starts_with("8 spec.rateLimit.domain: read:") && l.contains("`domain: api-gateway`")),
        "{w:?}"
    );
    assert!(
        w.iter().any(|l| l.starts_with("9 spec.rateLimit.failOpen:") && l.contains("failure_mode_deny: false")),
        "{w:?}"
    );
    assert!(w.iter().any(|l| l.starts_with("10 spec.rateLimit.timeout:") && l.contains("100ms")), "{w:?}");
    // failOpen defaults to false: denied when the service fails, as kgateway.
    let p = load_text(&ext.replace("    failOpen: true\n", ""));
    assert!(warning_lines(&p).iter().any(|l| l.contains("failure_mode_deny: true")), "{:?}", warning_lines(&p));
    assert_eq!(
        errors_of(&ext.replace("100ms", "soon")),
        ["10:14 spec.rateLimit.timeout: invalid duration \"soon\" (expected e.g. 500ms, 10s, 1m, 1h30m)"]
    );

    let agw = "apiVersion: agentgateway.dev/v1alpha1\nkind: AgentgatewayPolicy\nmetadata: {name: g, namespace: default}\nspec:\n  targetRefs: [{kind: Gateway, name: agw}]\n  traffic:\n    rateLimit:\n      global:\n        backendRef: {name: limiter, port: 8081}\n        domain: agentgateway\n        descriptors:\n          - entries: [{name: remote_address, expression: source.address}, {name: user, expression: jwt.sub}]\n";
    let p = load_text(agw);
    assert!(p.rules.is_empty());
    let w = warning_lines(&p);
    assert!(
        w.iter().any(|l| l.starts_with("10 spec.traffic.rateLimit.global.domain: read:")
            && l.contains("[remote_address, user]")
            && l.contains("`domain: agentgateway`")),
        "{w:?}"
    );
    assert_eq!(
        errors_of(&agw.replace(", expression: jwt.sub", "")),
        ["12:75 spec.traffic.rateLimit.global.descriptors[0].entries[1]: missing field `expression`"]
    );
}

#[test]
fn impossible_selectors_and_costs_are_errors_naming_the_field() {
    let rule = |body: &str| {
        format!(
            "{EG}spec:\n  targetRefs: [{{kind: HTTPRoute, name: r}}]\n  rateLimit:\n    local:\n      rules:\n{body}"
        )
    };
    assert_eq!(
        errors_of(&rule(
            "        - clientSelectors: [{headers: [{name: x, type: RegularExpression, value: \"a(b\"}]}]\n          limit: {requests: 1, unit: Second}\n"
        )),
        [
            "9:82 spec.rateLimit.local.rules[0].clientSelectors[0].headers[0].value: invalid regular expression \"a(b\": unclosed group"
        ]
    );
    assert_eq!(
        errors_of(&rule(
            "        - clientSelectors: [{path: {type: Glob, value: /x}}]\n          limit: {requests: 1, unit: Second}\n"
        )),
        [
            "9:43 spec.rateLimit.local.rules[0].clientSelectors[0].path.type: unknown type \"Glob\" (expected Exact, PathPrefix or RegularExpression)"
        ]
    );
    assert_eq!(
        errors_of(&rule(
            "        - limit: {requests: 1, unit: Second}\n          cost: {request: {from: Number, number: 10}}\n"
        )),
        [
            "10:17 spec.rateLimit.local.rules[0].cost: cost applies to global rules only (a local rule is counted in the proxy)"
        ]
    );
    assert_eq!(
        errors_of(&rule(
            "        - clientSelectors: [{methods: [{value: GET}, {value: POST, invert: true}]}]\n          limit: {requests: 1, unit: Second}\n"
        )),
        [
            "9:76 spec.rateLimit.local.rules[0].clientSelectors[0].methods: mixes inverted and plain methods: give all of them `invert: true`, or none"
        ]
    );
}
