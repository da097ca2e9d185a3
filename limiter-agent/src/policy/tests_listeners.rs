//! `ListenerMap`: loading, every error class (with file, line, column and field), set-level
//! clashes naming both places, and how the compiler resolves `Gateway` / `HTTPRoute` targets
//! through it.

use std::path::{Path, PathBuf};

use super::compile::{NoticeKind, compile};
use super::listeners::{ListenerIndex, Ref, Resolution};
use super::*;
use crate::plan::{CountKind, KernelRule, PortTarget, Protocol};

const MAP: &str = "apiVersion: limiter.dev/v1alpha1\nkind: ListenerMap\n";
const EG: &str = "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: BackendTrafficPolicy\n";

fn tcp(port: u16) -> PortTarget {
    PortTarget { port, protocol: Protocol::Tcp }
}

fn set_of(files: &[(&str, &str)]) -> PolicySet {
    let mut set = PolicySet::default();
    for (name, text) in files {
        set.extend(load_file_set(Path::new(name), text).unwrap_or_else(|e| panic!("{e}")));
    }
    set
}

fn errors(text: &str) -> Vec<String> {
    match load_file_set(Path::new("m.yaml"), text) {
        Ok(s) => panic!("expected errors, loaded {s:?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn set_errors(files: &[(&str, &str)]) -> Vec<String> {
    let c = compile(&set_of(files));
    c.errors.iter().map(ToString::to_string).collect()
}

fn notices(c: &Compiled) -> Vec<String> {
    c.notices.iter().map(ToString::to_string).collect()
}

fn kernel<'a>(c: &'a Compiled, name: &str) -> &'a KernelRule {
    c.plan.rules.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {:#?}", c.plan.rules))
}

/// Two gateways, one route on both, one on the first.
fn node_map() -> String {
    format!(
        "{MAP}metadata: {{name: node}}\nspec:\n  gateways:\n    - name: eg\n      namespace: default\n      listeners: [{{name: https, port: 443, protocol: HTTPS}}, {{name: http, port: 80, protocol: http}}, {{port: 443}}]\n    - name: internal\n      namespace: infra\n      listeners: [{{port: 8443}}, {{port: 5353, protocol: UDP}}]\n  routes:\n    - {{name: api, namespace: default, gateways: [eg, infra/internal]}}\n    - {{name: web, namespace: default, gateways: [eg]}}\n"
    )
}

/// An Envoy Gateway policy on `target_kind target_name` (namespace default) with `rules`.
fn eg_policy(name: &str, target: &str, rules: &str) -> String {
    format!(
        "{EG}metadata: {{name: {name}, namespace: default}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, {target}}}]\n  rateLimit:\n    type: Local\n    local:\n      rules:\n{rules}"
    )
}

#[test]
fn a_map_loads_into_runtime_types() {
    let set = set_of(&[("m.yaml", &node_map())]);
    assert!(set.policies.is_empty() && set.ratelimit_configs.is_empty());
    let [m] = set.listener_maps.as_slice() else { panic!("{set:?}") };
    assert_eq!((m.name.as_str(), m.at.pos.line), ("node", 3));
    assert_eq!(m.gateways[0].id, Ref { name: "eg".into(), namespace: Some("default".into()) });
    let ports: Vec<PortTarget> = m.gateways[1].listeners.iter().map(|l| l.port).collect();
    assert_eq!(ports, [tcp(8443), PortTarget { port: 5353, protocol: Protocol::Udp }]);
    assert_eq!(m.gateways[0].listeners[0].name.as_deref(), Some("https"));
    // A route's gateway without a namespace is in the route's (Gateway API parentRef default).
    let refs: Vec<String> = m.routes[0].gateways.iter().map(|g| g.value.to_string()).collect();
    assert_eq!(refs, ["default/eg", "infra/internal"]);
    assert_eq!(m.routes[0].gateways[1].at.field, "spec.routes[0].gateways[1]");

    // load_file_str predates maps: it validates them and leaves them out.
    let docs = load_file_str(Path::new("m.yaml"), &node_map()).unwrap();
    assert!(docs.is_empty());
    let bad = format!("{MAP}metadata: {{name: m}}\nspec:\n  gateways: [{{name: g, listeners: [{{port: 0}}]}}]\n");
    assert!(load_file_str(Path::new("m.yaml"), &bad).is_err());
}

#[test]
fn every_document_error_names_file_line_column_and_field() {
    let head = format!("{MAP}metadata: {{name: m}}\nspec:\n");
    let cases: [(&str, &str); 11] = [
        (
            "  gateways:\n    - {name: g, listeners: [{port: 0}]}\n",
            "m.yaml:6:36: spec.gateways[0].listeners[0].port: must be at least 1, got 0",
        ),
        (
            "  gateways:\n    - {name: g, listeners: [{port: 65536}]}\n",
            "m.yaml:6:36: spec.gateways[0].listeners[0].port: must be at most 65535, got 65536",
        ),
        (
            "  gateways:\n    - {name: g, listeners: [{port: 80, protocol: SCTP}]}\n",
            "m.yaml:6:50: spec.gateways[0].listeners[0].protocol: unknown protocol \"SCTP\" (expected TCP, UDP, HTTP, HTTPS or TLS)",
        ),
        (
            "  gateways:\n    - {name: g, listeners: [{port: 80, hostname: a.example}]}\n",
            "m.yaml:6:40: spec.gateways[0].listeners[0].hostname: unknown field `hostname`, expected one of name, port, protocol",
        ),
        (
            "  gateways:\n    - {name: g, listeners: [{port: eighty}]}\n",
            "m.yaml:6:36: spec.gateways[0].listeners[0].port: expected an integer",
        ),
        ("  gateways:\n    - {name: g, listeners: []}\n", "m.yaml:6:7: spec.gateways[0].listeners: must not be empty"),
        (
            "  gateways:\n    - {name: g, listeners: [{name: a, port: 80}, {name: a, port: 81}]}\n",
            "m.yaml:6:57: spec.gateways[0].listeners[1].name: duplicate rule name \"a\" (first used on line 6)",
        ),
        ("  routes:\n    - {name: r, gateways: []}\n", "m.yaml:6:7: spec.routes[0].gateways: must not be empty"),
        (
            "  routes:\n    - {name: r, gateways: [a/b/c]}\n",
            "m.yaml:6:28: spec.routes[0].gateways[0]: invalid name \"a/b/c\": expected a gateway name, or namespace/name",
        ),
        (
            "  routes:\n    - {name: '', gateways: [g]}\n",
            "m.yaml:6:14: spec.routes[0].name: invalid name \"\": must not be empty",
        ),
        ("  colour: blue\n", "m.yaml:5:3: spec.colour: unknown field `colour`, expected one of gateways, routes"),
    ];
    for (body, want) in cases {
        assert_eq!(errors(&format!("{head}{body}")), [want], "{body}");
    }
    // Every bad value of a document is reported, not only the first.
    let all =
        errors(&format!("{head}  gateways:\n    - {{name: g, listeners: [{{port: 0}}, {{port: 1, protocol: x}}]}}\n"));
    assert_eq!(all.len(), 2, "{all:#?}");
    let wrong_api = "apiVersion: limiter.dev/v1\nkind: ListenerMap\nmetadata: {name: m}\nspec: {}\n";
    assert_eq!(
        errors(wrong_api),
        [
            "m.yaml:1:13: apiVersion: unsupported apiVersion \"limiter.dev/v1\" for kind ListenerMap (expected limiter.dev/v1alpha1)"
        ]
    );
}

#[test]
fn set_level_clashes_name_both_places() {
    let map = |name: &str, body: &str| format!("{MAP}metadata: {{name: {name}}}\nspec:\n{body}");
    let eg = "  gateways:\n    - {name: eg, namespace: default, listeners: [{port: 80}]}\n";
    // The same gateway in two maps; the second also reuses the first map's name.
    let errors = set_errors(&[("a.yaml", &map("node", eg)), ("b.yaml", &map("node", eg))]);
    assert_eq!(
        errors,
        [
            "b.yaml:3:18: metadata.name: duplicate ListenerMap name \"node\" (first defined at a.yaml:3:18)",
            "b.yaml:6:7: spec.gateways[0]: gateway default/eg is listed twice in the policy set's ListenerMaps (first at a.yaml:6:7)",
        ]
    );
    // A gateway without a namespace matches targets in every namespace: it overlaps default/eg.
    let loose = "  gateways:\n    - {name: eg, listeners: [{port: 81}]}\n";
    let errors = set_errors(&[("a.yaml", &map("a", eg)), ("b.yaml", &map("b", loose))]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].starts_with("b.yaml:6:7: spec.gateways[0]: gateway eg is listed twice"), "{errors:#?}");
    // ... while the same name in another namespace is another gateway.
    let other = "  gateways:\n    - {name: eg, namespace: infra, listeners: [{port: 81}]}\n";
    assert!(set_errors(&[("a.yaml", &map("a", eg)), ("b.yaml", &map("b", other))]).is_empty());
    // The same route twice in one map, and a route on a gateway no map lists.
    let routes = format!(
        "{eg}  routes:\n    - {{name: api, namespace: default, gateways: [eg]}}\n    - {{name: api, namespace: default, gateways: [eg, infra/eg]}}\n"
    );
    assert_eq!(
        set_errors(&[("a.yaml", &map("a", &routes))]),
        [
            "a.yaml:9:7: spec.routes[1]: route default/api is listed twice in the policy set's ListenerMaps (first at a.yaml:8:7)",
            "a.yaml:9:54: spec.routes[1].gateways[1]: route default/api attaches to gateway infra/eg, which no ListenerMap of the policy set lists",
        ]
    );
    // A route may use a gateway another map lists.
    let route_only = "  routes:\n    - {name: api, namespace: default, gateways: [eg]}\n";
    assert!(set_errors(&[("a.yaml", &map("a", eg)), ("b.yaml", &map("b", route_only))]).is_empty());

    // The loader checks the set too: load_paths rejects it whole, before compiling.
    let dir = std::env::temp_dir().join(format!("limiter-listeners-clash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), map("node", eg)).unwrap();
    std::fs::write(dir.join("b.yaml"), map("node", route_only)).unwrap();
    let result = load_paths(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    let e = result.expect_err("two maps named node");
    assert_eq!(e.len(), 1, "{e}");
    assert!(e.to_string().contains("duplicate ListenerMap name \"node\" (first defined at "), "{e}");
}

#[test]
fn gateway_targets_get_their_listeners_ports_and_routes_their_gateways() {
    let set = set_of(&[("m.yaml", &node_map())]);
    let index = ListenerIndex { maps: &set.listener_maps };
    let ports = |r: Resolution| match r {
        Resolution::Ports { ports, via } => (ports, via),
        other => panic!("{other:?}"),
    };
    // Listeners in map order, a port listed twice (two hostnames on 443) once.
    assert_eq!(ports(index.gateway("eg", Some("default"), None)), (vec![tcp(443), tcp(80)], "ListenerMap node".into()));
    // A policy without a namespace matches by name.
    assert_eq!(ports(index.gateway("eg", None, None)).0, [tcp(443), tcp(80)]);
    assert_eq!(index.gateway("eg", Some("other"), None), Resolution::Unmapped);
    assert_eq!(index.gateway("nope", None, None), Resolution::Unmapped);
    // sectionName picks the listener of that name.
    assert_eq!(ports(index.gateway("eg", Some("default"), Some("http"))).0, [tcp(80)]);
    assert_eq!(
        index.gateway("eg", Some("default"), Some("grpc")),
        Resolution::NoListener { gateway: "default/eg".into(), section: "grpc".into(), map: "node".into() }
    );
    // A route: the ports of every gateway it is attached to.
    let (api, via) = ports(index.route("api", Some("default")));
    assert_eq!(api, [tcp(443), tcp(80), tcp(8443), PortTarget { port: 5353, protocol: Protocol::Udp }]);
    assert_eq!(via, "gateway default/eg of ListenerMap node, gateway infra/internal of ListenerMap node");
    assert_eq!(ports(index.route("web", None)).0, [tcp(443), tcp(80)]);
    assert_eq!(index.route("web", Some("shop")), Resolution::Unmapped);
}

#[test]
fn guards_appear_for_gateway_kinds_keyed_by_source_or_nothing() {
    let rules = "        - clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]\n          limit: {requests: 20, unit: Second}\n        - limit: {requests: 500, unit: Second}\n        - clientSelectors: [{headers: [{name: x-user-id, type: Distinct}]}]\n          limit: {requests: 5, unit: Minute}\n";
    let route = eg_policy("route-level", "kind: HTTPRoute, name: web", rules);
    let gateway = eg_policy("gw-level", "kind: Gateway, name: eg, sectionName: https", rules);
    let without = compile(&set_of(&[("r.yaml", &route), ("g.yaml", &gateway)]));
    let with = compile(&set_of(&[("r.yaml", &route), ("g.yaml", &gateway), ("m.yaml", &node_map())]));
    assert!(with.errors.is_empty(), "{:?}", with.errors);
    // Without a map nothing reaches the kernel; the L7 plan is the same either way.
    assert!(without.plan.rules.is_empty(), "{:#?}", without.plan.rules);
    assert_eq!(with.l7, without.l7);
    let guards: Vec<(&str, &[PortTarget], bool)> =
        with.plan.rules.iter().map(|r| (r.name.as_str(), r.targets.as_slice(), r.source.distinct)).collect();
    assert_eq!(
        guards,
        [("gw-level/rule-0#guard", &[tcp(443)][..], true), ("gw-level/rule-1#guard", &[tcp(443)][..], false)],
        "the header rule (rule-2) stays L7 only; the route-level rules get none (their gateway's \
         ports carry other routes' connections too)"
    );
    assert!(
        notices(&with).iter().any(|n| n.contains("rule route-level/rule-1 is L7")
            && n.contains("no kernel guard: the policy targets an HTTPRoute")),
        "{:#?}",
        with.notices
    );
    let g = kernel(&with, "gw-level/rule-0#guard");
    assert_eq!((g.count, g.limit.requests), (CountKind::Connections, 20));
    // The summaries count the guards and show the ports.
    assert_eq!(
        with.summaries[0].to_string(),
        "route-level: 0 rule(s) in the kernel, 3 L7, 0 not enforced; HTTPRoute web on 443/TCP,80/TCP"
    );
    assert_eq!(
        with.listener_maps[0].to_string(),
        "ListenerMap node: 2 gateway(s), 2 route(s), resolving 2 policy target(s)"
    );
    // The route's notice says both levels apply on the shared ports.
    let n = notices(&with);
    assert!(
        n.contains(&"r.yaml:5:16: spec.targetRefs[0]: HTTPRoute web: resolved to ports 443/TCP,80/TCP by gateway default/eg of ListenerMap node; the kernel cannot tell routes apart on a port, so the policy's kernel rules count all traffic to these ports and its L7 rules get no connection guard there, and the rules of policies targeting the gateway apply there too (every matching rule applies, the first exhausted drops); a route's rules win over its gateway's at L7 only".to_owned()),
        "{n:#?}"
    );
    assert!(
        n.contains(&"g.yaml:5:16: spec.targetRefs[0]: Gateway eg: resolved to ports 443/TCP by ListenerMap node; the policy's kernel rules and guards count all traffic to them".to_owned()),
        "{n:#?}"
    );
    let header_rule = with.notices.iter().find_map(|n| match &n.kind {
        NoticeKind::L7 { rule, guard, no_guard, .. } if rule == "route-level/rule-2" => Some((guard, no_guard)),
        _ => None,
    });
    assert_eq!(header_rule, Some((&None, &None)));
}

#[test]
fn native_kernel_rules_on_mapped_targets_and_unmapped_ones_keep_their_notice() {
    let policy = "apiVersion: limiter.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  targetRefs:\n    - {kind: HTTPRoute, name: api, namespace: default}\n    - {kind: Gateway, name: ghost}\n    - {kind: Gateway, name: eg, sectionName: grpc}\n    - {kind: Port, port: 8080}\n  rateLimit:\n    local:\n      rules:\n        - name: syn\n          count: Connections\n          limit: {requests: 100, unit: Second}\n";
    let c = compile(&set_of(&[("p.yaml", policy), ("m.yaml", &node_map())]));
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    let syn = kernel(&c, "p/syn");
    let udp = PortTarget { port: 5353, protocol: Protocol::Udp };
    assert_eq!(syn.targets, [tcp(443), tcp(80), tcp(8443), udp, tcp(8080)]);
    let n = notices(&c);
    assert_eq!(n.len(), 3, "{n:#?}");
    assert!(n[0].starts_with("p.yaml:6:7: spec.targetRefs[0]: HTTPRoute api: resolved to ports 443/TCP,80/TCP,8443/TCP,5353/UDP by gateway default/eg of ListenerMap node, gateway infra/internal of ListenerMap node;"), "{n:#?}");
    assert_eq!(
        n[1],
        "p.yaml:7:7: spec.targetRefs[1]: Gateway ghost: not resolved to ports (add it to a ListenerMap), so kernel rules do not cover it; L7 rules apply to its requests"
    );
    assert_eq!(
        n[2],
        "p.yaml:8:7: spec.targetRefs[2]: Gateway default/eg: no listener named grpc in ListenerMap node (name its listeners there), so kernel rules do not cover it; L7 rules apply to its requests"
    );

    // Only unmapped route targets: no kernel rule, as without any map.
    let only_ghost = policy
        .replace("    - {kind: HTTPRoute, name: api, namespace: default}\n", "")
        .replace("    - {kind: Gateway, name: eg, sectionName: grpc}\n    - {kind: Port, port: 8080}\n", "");
    let c = compile(&set_of(&[("p.yaml", &only_ghost), ("m.yaml", &node_map())]));
    assert!(c.plan.rules.is_empty(), "{:#?}", c.plan.rules);
    assert_eq!(c.summaries[0].not_enforced, ["syn"]);
    assert!(notices(&c).iter().any(|n| n.ends_with("rule p/syn: the policy's HTTPRoute/Gateway targets are not resolved to ports (add them to a ListenerMap), so it is not enforced in the kernel")));
}

fn examples(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(rel)
}

const GATEWAY_DIRS: [&str; 5] =
    ["gateways/envoy-gateway", "gateways/teg", "gateways/agentgateway", "gateways/kgateway", "gateways/ratelimit"];

#[test]
fn the_examples_behave_as_before_without_the_map_and_get_guards_with_it() {
    let dirs: Vec<PathBuf> = GATEWAY_DIRS.iter().map(|d| examples(d)).collect();
    let without = load_and_compile(&dirs).unwrap_or_else(|e| panic!("{e}"));
    assert!(without.plan.rules.is_empty(), "{:#?}", without.plan.rules);
    assert!(without.listener_maps.is_empty() && without.summaries.iter().all(|s| s.resolved.is_empty()));
    assert!(!notices(&without).iter().any(|n| n.contains(": resolved to ports")), "{:#?}", without.notices);

    let mut paths = vec![examples("gateways/listeners.yaml")];
    paths.extend(dirs);
    let with = load_and_compile(&paths).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(with.l7, without.l7, "the map changes only the kernel");
    let guards: Vec<(&str, String)> =
        with.plan.rules.iter().map(|r| (r.name.as_str(), super::listeners::ports_text(&r.targets))).collect();
    let want: Vec<(&str, String)> = [
        // Gateway-level policies only: the HTTPRoute-level ones (eg-all-requests,
        // eg-regex-header, agw-local-ratelimit, petstore-local) get no guard.
        ("eg-source-ip/rule-0#guard", "80/TCP,443/TCP"),
        ("agw-two-windows/local-0#guard", "3000/TCP"),
        ("agw-two-windows/local-1#guard", "3000/TCP"),
        ("edge-defaults/local#guard", "8443/TCP"),
    ]
    .into_iter()
    .map(|(n, p)| (n, p.to_owned()))
    .collect();
    assert_eq!(guards, want);
    // Every Gateway/HTTPRoute target of the examples is mapped: none is left unresolved.
    assert!(!notices(&with).iter().any(|n| n.contains("not resolved to ports")), "{:#?}", with.notices);
}
