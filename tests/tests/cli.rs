//! `limiter-agent check` and `limiter-agent explain`, run as the built binary on the shipped
//! examples and on broken sets: exit codes, messages, the plan table, and the Envoy
//! `rate_limits` actions (validated by a real Envoy, `envoy --mode validate`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use limiter_tests::agent::{TempDir, agent_binary};
use limiter_tests::envoy::{EnvoyConfig, Route, bootstrap, envoy_binary};
use serde_json::Value;

fn examples(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(rel)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn agent(args: &[&str], paths: &[PathBuf]) -> Run {
    let Output { status, stdout, stderr } =
        Command::new(agent_binary()).args(args).args(paths).output().expect("run limiter-agent");
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    }
}

const GATEWAY_DIRS: [&str; 5] =
    ["gateways/envoy-gateway", "gateways/teg", "gateways/agentgateway", "gateways/kgateway", "gateways/ratelimit"];

fn all_valid_examples() -> Vec<PathBuf> {
    let mut paths = vec![examples("policies")];
    paths.extend(GATEWAY_DIRS.iter().map(|d| examples(d)));
    paths
}

#[test]
fn check_accepts_every_kind_at_once_and_lists_warnings_from_each() {
    let run = agent(&["check"], &all_valid_examples());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // One summary per policy and config, from every kind.
    for line in [
        "task-api: 3 rule(s) in the kernel, 4 L7, 0 not enforced",
        "eg-anonymous: 0 rule(s) in the kernel, 2 L7, 0 not enforced",
        "ratelimit-all-requests: 0 rule(s) in the kernel, 2 L7, 0 not enforced",
        "agw-two-windows: 0 rule(s) in the kernel, 2 L7, 0 not enforced",
        "petstore-local: 0 rule(s) in the kernel, 1 L7, 0 not enforced",
        "ratelimit config shop: 0 rule(s) in the kernel, 5 L7, 0 not enforced",
    ] {
        assert!(run.stdout.lines().any(|l| l == line), "missing {line:?} in\n{}", run.stdout);
    }
    let ok = run.stdout.lines().last().unwrap_or_default();
    assert!(ok.starts_with("ok: ") && ok.contains(" 9 kernel rules, "), "{ok}");
    // Every stderr line is a warning with FILE:LINE:COL, and each kind contributes.
    assert!(run.stderr.lines().all(|l| l.starts_with("warning: ")), "{}", run.stderr);
    // (file, field, text): the line is `warning: FILE:LINE:COL: FIELD: TEXT...`.
    for (file, field, text) in [
        ("envoy-gateway/anonymous-users.yaml", "spec.retry", "not enforced"),
        ("kgateway/gateway-wide.yaml", "spec.timeouts", "not enforced"),
        ("agentgateway/two-windows.yaml", "spec.traffic.timeouts", "not enforced"),
        ("teg/ratelimitfilter.yaml", "spec.global.rules[0]", "rule ratelimit-all-requests/rule-0 is L7"),
        ("policies/task-api.yaml", "spec.penalty", "escalation: a source the rate limit service denies 20 times"),
        ("ratelimit/nested.yaml", "domain", "the rules of domain shop: global: shared through Redis"),
        (
            "policies/task-api.yaml",
            "spec.rateLimit.local.rules[2]",
            "rule task-api/per-user is L7 (selects on request attributes): answered by the rate limit service (`limiter-agent run --rls-listen`",
        ),
    ] {
        let found = run.stderr.lines().any(|l| {
            l.split_once(&format!("{file}:")).and_then(|(_, rest)| rest.split_once(": ")).is_some_and(|(pos, rest)| {
                pos.split(':').take(2).all(|n| n.split(' ').next().is_some_and(|d| d.parse::<u64>().is_ok()))
                    && rest.starts_with(&format!("{field}: {text}"))
            })
        });
        assert!(found, "no warning for {file} {field} in\n{}", run.stderr);
    }
}

#[test]
fn check_rejects_each_invalid_example_with_file_line_column_and_field() {
    for dir in
        ["policies/invalid", "gateways/envoy-gateway/invalid", "gateways/teg/invalid", "gateways/kgateway/invalid"]
    {
        let path = examples(dir);
        let run = agent(&["check"], std::slice::from_ref(&path));
        assert_eq!(run.code, Some(1), "{dir}: {}", run.stdout);
        assert!(run.stdout.is_empty(), "{dir}: {}", run.stdout);
        let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert!(!errors.is_empty(), "{dir}: {}", run.stderr);
        for e in &errors {
            // error: /path/file.yaml:LINE:COL[ (document N)]: ...
            let rest = e.strip_prefix("error: ").unwrap_or_default();
            let after_file = rest.split_once(".yaml:").map(|(_, r)| r).unwrap_or_else(|| panic!("{e}"));
            let mut parts = after_file.splitn(3, ':');
            let line: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("line in {e}"));
            let col = parts.next().unwrap_or_default();
            let col: u64 =
                col.split(' ').next().and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("column in {e}"));
            assert!(line > 0 && col > 0, "{e}");
        }
        assert!(run.stderr.ends_with(&format!("{} error(s); policy set rejected\n", errors.len())), "{}", run.stderr);
    }
    let run = agent(&["check"], &[examples("policies/invalid/bad-unit.yaml")]);
    assert!(
        run.stderr.contains(
            "bad-unit.yaml:15:19: spec.rateLimit.local.rules[2].limit.unit: unknown unit \"Minuets\" (expected Second, Minute, Hour or Day)"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn check_fails_on_any_bad_path_among_good_ones() {
    let mut paths = all_valid_examples();
    paths.push(examples("gateways/agentgateway/invalid/bad-unit.yaml"));
    let run = agent(&["check"], &paths);
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("agentgateway/invalid/bad-unit.yaml:"), "{}", run.stderr);

    let run = agent(&["check"], &[examples("policies"), PathBuf::from("/nonexistent/limiter.yaml")]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("error: /nonexistent/limiter.yaml:0:0: cannot read: "), "{}", run.stderr);

    // No path at all: a usage error from the argument parser.
    let run = agent(&["check"], &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[test]
fn check_rejects_set_level_clashes_naming_both_places() {
    let dir = TempDir::with_files(
        "clash",
        &[
            (
                "a.yaml",
                "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {name: per-key, unit: second, requests_per_unit: 1}\n",
            ),
            (
                "b.yaml",
                "domain: b\ndescriptors:\n  - key: k\n    rate_limit: {name: per-key, unit: minute, requests_per_unit: 9}\n",
            ),
            ("c.yaml", "domain: a\ndescriptors:\n  - key: j\n    rate_limit: {unit: second, requests_per_unit: 1}\n"),
        ],
    );
    // Same domain in two files.
    let run = agent(&["check"], &[dir.path("a.yaml"), dir.path("c.yaml")]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let a = dir.path("a.yaml").display().to_string();
    let c = dir.path("c.yaml").display().to_string();
    let error = run.stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(error.starts_with(&format!("error: {c}:1:9: domain: ")), "{}", run.stderr);
    assert!(error.contains(&format!("{a}:1:9")) && error.contains("\"a\""), "{error}");

    // One rule name in two configs.
    let run = agent(&["check"], &[dir.path("a.yaml"), dir.path("b.yaml")]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let b = dir.path("b.yaml").display().to_string();
    assert!(
        run.stderr.contains(&format!(
            "error: {b}:3:5: descriptors[0]: duplicate L7 rule name \"per-key\" (first at {a}:3:5)"
        )),
        "{}",
        run.stderr
    );
    assert!(run.stderr.ends_with("1 error(s); policy set rejected\n"), "{}", run.stderr);
}

/// The gateway examples with their listener map: the Gateway/HTTPRoute targets resolve to
/// ports, the guards of L7 rules keyed by source or by nothing appear in the kernel on them.
#[test]
fn a_listener_map_puts_gateway_kind_guards_in_the_kernel() {
    let mut paths = vec![examples("gateways/listeners.yaml")];
    paths.extend(GATEWAY_DIRS.iter().map(|d| examples(d)));
    let run = agent(&["check"], &paths);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for line in [
        "eg-source-ip: 1 rule(s) in the kernel, 1 L7, 0 not enforced; Gateway eg on 80/TCP,443/TCP",
        "eg-anonymous: 0 rule(s) in the kernel, 2 L7, 0 not enforced; HTTPRoute http-ratelimit on 80/TCP,443/TCP",
        "edge-defaults: 1 rule(s) in the kernel, 1 L7, 0 not enforced; Gateway http on 8443/TCP",
        "ListenerMap node-listeners: 3 gateway(s), 5 route(s), resolving 12 policy target(s)",
    ] {
        assert!(run.stdout.lines().any(|l| l == line), "missing {line:?} in\n{}", run.stdout);
    }
    let ok = run.stdout.lines().last().unwrap_or_default();
    assert!(ok.starts_with("ok: 18 policies and configs, 1 listener map(s), 4 kernel rules, "), "{ok}");
    assert!(!run.stderr.contains("not resolved to ports"), "{}", run.stderr);

    let run = agent(&["explain"], &paths);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let row = run.stdout.lines().find(|l| l.starts_with("edge-defaults/local#guard ")).unwrap_or_default();
    let cells: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(
        cells,
        [
            "edge-defaults/local#guard",
            "kernel guard",
            "shared",
            "connections",
            "10/100ms",
            "90",
            "local",
            "enforce",
            "-",
            "8443/TCP"
        ],
        "{}",
        run.stdout
    );
    // Header-keyed rules stay L7 only, and so do route-level ones (their gateway's ports carry
    // other routes): no guard row.
    assert!(!run.stdout.contains("eg-distinct-users/rule-0#guard"), "{}", run.stdout);
    assert!(!run.stdout.contains("petstore-local/local#guard"), "{}", run.stdout);
}

#[test]
fn check_rejects_listener_map_clashes_naming_both_places() {
    let map = |name: &str, body: &str| {
        format!("apiVersion: limiter.dev/v1alpha1\nkind: ListenerMap\nmetadata: {{name: {name}}}\nspec:\n{body}")
    };
    let eg = "  gateways:\n    - {name: eg, listeners: [{port: 443}]}\n";
    let route = "  routes:\n    - {name: api, gateways: [edge]}\n";
    let dir = TempDir::with_files(
        "listeners",
        &[("a.yaml", &map("node", eg)), ("b.yaml", &map("node", &format!("{eg}{route}")))],
    );
    let run = agent(&["check"], &[dir.root().to_path_buf()]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let a = dir.path("a.yaml").display().to_string();
    let b = dir.path("b.yaml").display().to_string();
    for expected in [
        format!("error: {b}:3:18: metadata.name: duplicate ListenerMap name \"node\" (first defined at {a}:3:18)"),
        format!(
            "error: {b}:6:7: spec.gateways[0]: gateway eg is listed twice in the policy set's ListenerMaps (first at {a}:6:7)"
        ),
        format!(
            "error: {b}:8:30: spec.routes[0].gateways[0]: route api attaches to gateway edge, which no ListenerMap of the policy set lists"
        ),
    ] {
        assert!(run.stderr.lines().any(|l| l == expected), "missing {expected:?} in\n{}", run.stderr);
    }
    assert!(run.stderr.ends_with("3 error(s); policy set rejected\n"), "{}", run.stderr);
}

#[test]
fn explain_prints_the_plan_table() {
    let run = agent(&["explain"], &all_valid_examples());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let header = run.stdout.lines().next().unwrap_or_default();
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(columns, ["RULE", "LAYER", "KEY", "COUNTS", "RATE", "BURST", "SCOPE", "MODE", "DOMAIN", "TARGETS"]);
    let row = |rule: &str| -> Vec<String> {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{rule} ")))
            .unwrap_or_else(|| panic!("no row {rule} in\n{}", run.stdout));
        line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
    };
    let expected: [(&str, [&str; 10]); 7] = [
        (
            "shield/syn-per-source",
            [
                "shield/syn-per-source",
                "kernel",
                "per source (IPv4)",
                "connections",
                "100/Second",
                "50",
                "local",
                "enforce",
                "-",
                "443/TCP",
            ],
        ),
        (
            "task-api/per-client#guard",
            [
                "task-api/per-client#guard",
                "kernel guard",
                "per source (IPv4)",
                "connections",
                "50/Second",
                "10",
                "local",
                "enforce",
                "-",
                "8080/TCP",
            ],
        ),
        (
            "eg-distinct-users/rule-0",
            [
                "eg-distinct-users/rule-0",
                "L7",
                "per header x-user-id",
                "requests, token bucket",
                "3/Hour",
                "0",
                "global",
                "enforce",
                "limiter",
                "HTTPRoute http-ratelimit",
            ],
        ),
        (
            "ratelimit-all-requests/rule-1",
            [
                "ratelimit-all-requests/rule-1",
                "L7",
                "shared",
                "requests, token bucket",
                "20/Minute",
                "0",
                "global",
                "enforce",
                "limiter",
                "all requests",
            ],
        ),
        (
            "agw-local-ratelimit/local-0",
            [
                "agw-local-ratelimit/local-0",
                "L7",
                "shared",
                "requests, token bucket",
                "10/Second",
                "20",
                "local",
                "enforce",
                "limiter",
                "HTTPRoute mcp-route",
            ],
        ),
        (
            "shop/path=/api/v1/*",
            [
                "shop/path=/api/v1/*",
                "L7",
                "per descriptor path matching /api/v1/*",
                "requests, fixed window",
                "50/Second",
                "-",
                "global",
                "shadow",
                "shop",
                "all requests",
            ],
        ),
        (
            "shop/authenticated=false/remote_address=10.0.0.5",
            [
                "shop/authenticated=false/remote_address=10.0.0.5",
                "L7",
                "shared, authenticated=false, remote_address=10.0.0.5",
                "requests, fixed window",
                "unlimited",
                "-",
                "global",
                "enforce",
                "shop",
                "all requests",
            ],
        ),
    ];
    for (rule, cells) in expected {
        assert_eq!(row(rule), cells, "{rule}");
    }
    // Warnings stay on stderr, as with check.
    assert!(run.stderr.lines().all(|l| l.starts_with("warning: ")), "{}", run.stderr);
}

#[test]
fn explain_prints_envoy_rate_limits_actions() {
    let run = agent(&["explain"], &[examples("gateways/envoy-gateway"), examples("gateways/kgateway")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let yaml = run.stdout.split_once("\n---\n").map(|(_, y)| y).unwrap_or_else(|| panic!("{}", run.stdout));
    for expected in [
        // Distinct header: request_headers under the header's name.
        "  # eg-distinct-users/rule-0\n  - actions:\n      - {generic_key: {descriptor_value: \"eg-distinct-users/rule-0\"}}\n      - {request_headers: {descriptor_key: \"x-user-id\", header_name: \"x-user-id\"}}\n",
        // invert: header_value_match with expect_match false.
        "      - {header_value_match: {descriptor_value: \"no x-user-id\", expect_match: false, headers: [{name: \"x-user-id\", present_match: true}]}}\n",
        // An exact value.
        "      - {header_value_match: {descriptor_value: \"x-user-id=one\", headers: [{name: \"x-user-id\", string_match: {exact: \"one\"}}]}}\n",
        // sourceCIDR: the client address.
        "  # eg-source-ip/rule-0\n  - actions:\n      - {generic_key: {descriptor_value: \"eg-source-ip/rule-0\"}}\n      - {remote_address: {}}\n",
        // kgateway global descriptors: the config's keys, linked to their sources.
        "# domain: api-gateway; HTTPRoute api\nrate_limits:\n",
        "      - {request_headers: {descriptor_key: \"X-User-ID\", header_name: \"x-user-id\"}}\n      - {request_headers: {descriptor_key: \"path\", header_name: \":path\"}}\n",
    ] {
        assert!(yaml.contains(expected), "missing\n{expected}\nin\n{yaml}");
    }
    assert!(yaml.contains("# domain: limiter; Gateway eg\n"), "{yaml}");
}

/// `explain --json` gives the same plan to machines, and its `rate_limits` are valid Envoy
/// route config: a real Envoy validates a bootstrap with one route per printed group.
#[test]
fn explain_json_rate_limits_are_valid_envoy_config() {
    let run = agent(&["explain", "--json"], &all_valid_examples());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.is_empty(), "warnings go into the JSON: {}", run.stderr);
    let plan: Value = serde_json::from_str(&run.stdout).expect("JSON on stdout");
    let rules = plan["rules"].as_array().expect("rules");
    let per_user = rules.iter().find(|r| r["rule"] == "task-api/per-user").expect("task-api/per-user");
    assert_eq!(per_user["layer"], "L7");
    assert_eq!(per_user["key"], "per header x-user-id");
    assert_eq!(per_user["rate"], "100/Minute");
    assert!(
        plan["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().is_some_and(|w| w.contains("spec.retry"))))
    );
    let groups = plan["rate_limits"].as_array().expect("rate_limits");
    assert!(groups.len() >= 8, "{groups:#?}");

    let routes: Vec<Route> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let rate_limits: Vec<Value> = g["rate_limits"]
                .as_array()
                .expect("descriptors")
                .iter()
                .map(|d| serde_json::json!({"actions": d["actions"]}))
                .collect();
            Route { prefix: format!("/group{i}"), rate_limits: Value::Array(rate_limits) }
        })
        .collect();
    let config = EnvoyConfig {
        rls: "127.0.0.1:8081".parse().expect("address"),
        domain: "limiter".into(),
        routes,
        failure_mode_deny: false,
        rls_tls: None,
    };
    let dir = TempDir::with_files("envoy", &[]);
    let path = dir.path("envoy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&bootstrap(&config, 10000, 10001, 10002)).expect("json"))
        .expect("write bootstrap");
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy --mode validate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn explain_rejects_a_broken_set_like_check() {
    let run = agent(&["explain"], &[examples("policies"), examples("policies/invalid/zero-requests.yaml")]);
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(
            "zero-requests.yaml:9:29: spec.rateLimit.local.rules[0].limit.requests: must be at least 1, got 0"
        ),
        "{}",
        run.stderr
    );
    let run = agent(&["explain", "--json"], &[examples("policies/invalid/zero-requests.yaml")]);
    assert_eq!(run.code, Some(1));
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(run.stderr.contains("error: "), "{}", run.stderr);
}

/// `run` with TLS flags that cannot work stops at start with the reason, before serving: a
/// certificate without its key is a usage error; a key file that is missing is named.
#[test]
fn run_refuses_unusable_rls_tls_flags_naming_the_flag_and_the_file() {
    let dir = TempDir::with_files("tls-flags", &[("cert.pem", "-----BEGIN CERTIFICATE-----\n")]);
    let policy = examples("policies");
    let common = ["run", "--no-metrics", "--rls-listen", "127.0.0.1:0", "--policy", policy.to_str().unwrap()];
    let socket = dir.path("agent.sock");
    let cert = dir.path("cert.pem");
    let missing = dir.path("missing.key");

    let run = agent(&[&common[..], &["--rls-tls-cert", cert.to_str().unwrap()]].concat(), &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--rls-tls-key"), "{}", run.stderr);

    let flags = ["--rls-tls-cert", cert.to_str().unwrap(), "--rls-tls-key", missing.to_str().unwrap()];
    let run = agent(&[&common[..], &flags, &["--control-socket", socket.to_str().unwrap()]].concat(), &[]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let want = format!("--rls-tls-key {}: No such file", missing.display());
    assert!(run.stderr.contains(&want), "{}", run.stderr);
    assert!(!run.stderr.contains("rate limit service listening"), "{}", run.stderr);
}
