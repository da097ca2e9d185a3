//! `explain` against the examples: the printed `rate_limits` actions make Envoy send the
//! descriptors the plan expects, the table and listener list read as documented, and the
//! YAML stays valid.

use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use super::actions::{Action, entry_action, flow};
use super::*;
use crate::l7::{DescriptorEntry, Engine, EngineConfig, HttpRequest, RequestDescriptor, RlsRequest};
use crate::plan::{Attribute, L7Plan, L7Rule};
use crate::policy::load_and_compile;

/// A request attribute by name (a header, or a query parameter).
type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What Envoy's actions send for a request (its `rate_limits` semantics): the descriptor,
/// or `None` when an action produces nothing (a missing `request_headers` header, a
/// `header_value_match` whose outcome is not `expect_match`).
fn envoy_descriptor(
    actions: &[Action],
    remote: IpAddr,
    (path, method): (&str, &str),
    headers: &[(&str, &str)],
) -> Option<Vec<DescriptorEntry>> {
    let header = |name: &str| match name {
        ":path" => Some(path.to_owned()),
        ":method" => Some(method.to_owned()),
        _ => headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| (*v).to_owned()),
    };
    let query = |name: &str| {
        path.split_once('?')?.1.split('&').find_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k == name).then(|| v.to_owned())
        })
    };
    // Envoy's StringMatcher: exact, prefix, or safe_regex (RE2, the whole value).
    let string_match = |m: &Value, value: Option<String>| {
        let Some(value) = value else { return false };
        if let Some(v) = m["exact"].as_str() {
            value == v
        } else if let Some(p) = m["prefix"].as_str() {
            value.starts_with(p)
        } else if let Some(re) = m["safe_regex"]["regex"].as_str() {
            crate::plan::l7::FullRegex::new(re).expect("valid regex").is_match(&value)
        } else {
            panic!("unexpected string_match {m}")
        }
    };
    let text = |v: &Value, field: &str| v.get(field).and_then(Value::as_str).map(str::to_owned);
    let mut entries = Vec::new();
    for a in actions {
        let (kind, body) = a.action.as_object().and_then(|m| m.iter().next()).expect("one action per object");
        let (key, value) = match kind.as_str() {
            "generic_key" => {
                (text(body, "descriptor_key").unwrap_or_else(|| "generic_key".into()), text(body, "descriptor_value")?)
            }
            "remote_address" => ("remote_address".to_owned(), remote.to_string()),
            "request_headers" => {
                let name = text(body, "header_name")?;
                (text(body, "descriptor_key")?, header(&name)?)
            }
            "query_parameters" => {
                let name = text(body, "query_parameter_name")?;
                (text(body, "descriptor_key")?, query(&name)?)
            }
            "header_value_match" | "query_parameter_value_match" => {
                let (list, lookup, default_key): (_, Lookup<'_>, _) = match kind.as_str() {
                    "header_value_match" => ("headers", &header, "header_match"),
                    _ => ("query_parameters", &query, "query_match"),
                };
                let condition = &body[list][0];
                let name = text(condition, "name")?;
                let matched = match condition.get("string_match") {
                    Some(m) => string_match(m, lookup(&name)),
                    None => lookup(&name).is_some(),
                };
                let expect = body.get("expect_match").and_then(Value::as_bool).unwrap_or(true);
                if matched != expect {
                    return None;
                }
                (text(body, "descriptor_key").unwrap_or_else(|| default_key.into()), text(body, "descriptor_value")?)
            }
            other => panic!("unexpected action {other}"),
        };
        entries.push(DescriptorEntry { key, value });
    }
    Some(entries)
}

/// For every L7 rule whose entries all have an HTTP source, and a spread of requests: the
/// rule applies to the request over HTTP exactly when the `rate_limits` actions `explain`
/// prints make Envoy send a descriptor the engine answers with that rule. That is, the
/// printed gateway config and the plan agree.
#[test]
fn printed_actions_send_the_descriptors_the_plan_expects() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let paths: Vec<PathBuf> =
        ["policies", "gateways/envoy-gateway", "gateways/teg", "gateways/agentgateway", "gateways/kgateway"]
            .iter()
            .map(|d| root.join(d))
            .collect();
    let compiled = load_and_compile(&paths).unwrap_or_else(|e| panic!("{e}"));
    let remotes: [IpAddr; 4] = ["192.168.1.1", "10.1.2.3", "203.0.113.9", "2001:db8::1"].map(|s| s.parse().unwrap());
    let header_sets: [&[(&str, &str)]; 6] = [
        &[],
        &[("x-user-id", "alice")],
        &[("x-user-id", "test-7")],
        &[("x-user-id", "one")],
        &[("X-User-ID", "bob"), ("x-plan", "gold")],
        &[("x-plan", "silver")],
    ];
    // Paths and methods the path, method and query rules tell apart.
    let targets = [
        ("/api/v1/x", "GET"),
        ("/llm/v1/chat/completions", "POST"),
        ("/llm/v1/chat", "GET"),
        ("/llm/v1/models?debug=1", "POST"),
    ];
    let now = Instant::now();
    let mut checked = 0;
    for rule in compiled.l7.rules.iter().filter(|r| r.limit.is_some()) {
        if rule.entries.iter().any(|e| e.attribute == Attribute::Descriptor) {
            continue;
        }
        let actions: Vec<Action> = rule.entries.iter().map(entry_action).collect();
        assert!(actions.iter().all(|a| a.note.is_none()), "{}: every action known", rule.name);
        // The rule alone, untargeted: HTTP tells whether its descriptor is produced.
        let alone = L7Rule { targets: Vec::new(), ..rule.clone() };
        let engine = Engine::new(L7Plan { rules: vec![alone] }, EngineConfig::default());
        let mut applied = 0;
        for (remote, (path, method)) in remotes.into_iter().flat_map(|r| targets.map(|t| (r, t))) {
            for headers in header_sets {
                let req = HttpRequest { remote, path, method, headers, route: None, gateway: None };
                let over_http = !engine.check_request(&req, now).statuses.is_empty();
                let over_rls = envoy_descriptor(&actions, remote, (path, method), headers).is_some_and(|entries| {
                    let request = RlsRequest {
                        domain: rule.domain.clone(),
                        descriptors: vec![RequestDescriptor { entries, hits_addend: Some(0), limit: None }],
                        hits_addend: 1,
                    };
                    let response = engine.should_rate_limit(&request, now).expect("valid request");
                    response.statuses[0].rule.as_deref() == Some(rule.name.as_str())
                });
                assert_eq!(over_http, over_rls, "{} for {remote} {headers:?}", rule.name);
                applied += usize::from(over_http);
            }
        }
        assert!(applied > 0, "{}: no request variant selects it; add one", rule.name);
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} rules checked");
}

#[test]
fn resolved_targets_follow_the_table_and_the_guards_cover_their_ports() {
    let gateways = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateways");
    let paths = [gateways.join("listeners.yaml"), gateways.join("envoy-gateway")];
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(report(&paths, false, &mut out, &mut err).unwrap(), ExitCode::SUCCESS);
    let out = String::from_utf8(out).unwrap();
    let guard = out.lines().find(|l| l.starts_with("eg-source-ip/rule-0#guard ")).unwrap_or_else(|| panic!("{out}"));
    assert!(guard.contains(" kernel guard ") && guard.ends_with(" 80/TCP,443/TCP"), "{guard}");
    assert!(out.contains("\nTargets resolved by the listener map"), "{out}");
    let listed = out.lines().find(|l| l.trim_start().starts_with("eg-source-ip ")).unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = listed.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells, ["eg-source-ip", "Gateway eg", "80/TCP,443/TCP", "via ListenerMap node-listeners"]);
    assert!(out.contains("The kernel cannot tell routes apart on a port"), "{out}");

    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(report(&paths, true, &mut out, &mut err).unwrap(), ExitCode::SUCCESS);
    let v: Value = serde_json::from_slice(&out).unwrap();
    let listeners = v["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 7, "{listeners:#?}");
    assert_eq!(
        listeners[0],
        json!({"policy": "eg-anonymous", "target": "HTTPRoute http-ratelimit", "ports": "80/TCP,443/TCP", "via": "gateway default/eg of ListenerMap node-listeners"})
    );
}

#[test]
fn yaml_flow_quotes_every_string() {
    let v = json!({"generic_key": {"descriptor_value": "a: b # c"}, "n": [true, 1]});
    assert_eq!(flow(&v), "{generic_key: {descriptor_value: \"a: b # c\"}, n: [true, 1]}");
}

#[test]
fn table_and_actions_for_the_native_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = report(&[root], false, &mut out, &mut err).unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    let out = String::from_utf8(out).unwrap();
    let row = |rule: &str| -> Vec<String> {
        let line = out.lines().find(|l| l.starts_with(&format!("{rule} "))).unwrap_or_else(|| panic!("{out}"));
        line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
    };
    assert_eq!(
        row("task-api/per-client#guard"),
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
            "8080/TCP"
        ]
    );
    assert_eq!(
        row("task-api/anonymous"),
        [
            "task-api/anonymous",
            "L7",
            "shared, without header x-user-id",
            "requests, token bucket",
            "10/Minute",
            "0",
            "local",
            "enforce",
            "limiter",
            "HTTPRoute task-api-route"
        ]
    );
    assert_eq!(row("task-api-trial/tighter-ceiling")[7], "shadow");
    assert!(out.contains(
        "      - {header_value_match: {descriptor_value: \"no x-user-id\", expect_match: false, headers: [{name: \"x-user-id\", present_match: true}]}}\n"
    ), "{out}");
    assert!(out.contains("# domain: limiter; HTTPRoute task-api-route\nrate_limits:\n  # task-api/per-user\n  - actions:\n      - {generic_key: {descriptor_value: \"task-api/per-user\"}}\n"), "{out}");
}
