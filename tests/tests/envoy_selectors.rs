//! Envoy Gateway selectors beyond headers, through a real Envoy 1.40: path, method, query
//! parameter and regular-expression header rules, and a request cost, each on a route carrying
//! exactly the `rate_limits` entries `limiter-agent explain --json` prints for the policy. The
//! agent's rate limit service answers in this process; its clock stands still (as in
//! `envoy.rs`), so token buckets do not refill mid-scenario.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use limiter_agent::l7::{Engine, EngineConfig};
use limiter_tests::envoy::{
    Counting, Envoy, EnvoyConfig, HttpBackend, RateLimitService, Route, bootstrap, envoy_binary, send,
};
use limiter_tests::redis::free_port;
use serde_json::{Value, json};

/// 30 s into a unix minute.
const T: u64 = 1_700_000_010;

fn examples(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(rel)
}

/// The `rate_limits` entries `explain --json` prints for `paths` (one domain, `limiter`), each
/// as Envoy takes it (the `rules` comment dropped), and the engine for their plan.
fn explained(paths: &[PathBuf]) -> (Value, Engine) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = limiter_agent::cli::explain::report(paths, true, &mut out, &mut err).expect("explain runs");
    assert_eq!(code, std::process::ExitCode::SUCCESS, "{}", String::from_utf8_lossy(&err));
    let v: Value = serde_json::from_slice(&out).expect("explain --json prints JSON");
    let groups = v["rate_limits"].as_array().expect("rate_limits");
    assert_eq!(groups.len(), 1, "{groups:#?}");
    assert_eq!(groups[0]["domain"], "limiter");
    let mut entries = groups[0]["rate_limits"].clone();
    for e in entries.as_array_mut().expect("entries") {
        e.as_object_mut().expect("entry").remove("rules");
    }
    let compiled = limiter_agent::policy::load_and_compile(paths).unwrap_or_else(|e| panic!("{e}"));
    let engine =
        Engine::with_clock(compiled.l7, EngineConfig::default(), Instant::now() + Duration::from_secs(3600), secs(T));
    (entries, engine)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Envoy (one catch-all route to the backend) in front of the agent's rate limit service.
/// With `per_route`, the entries go in the route's `typed_per_filter_config` (`RateLimitPerRoute`),
/// where Envoy honours `hits_addend`; otherwise in the route's `rate_limits`.
struct Stack {
    envoy: Envoy,
    _rls: RateLimitService,
    backend: HttpBackend,
}

impl Stack {
    fn start(entries: Value, engine: Engine, per_route: bool) -> Stack {
        Stack::start_with(entries, engine, per_route, None)
    }

    /// [`Stack::start`] with an HTTP filter put before the rate limit filter.
    fn start_with(entries: Value, engine: Engine, per_route: bool, first_filter: Option<Value>) -> Stack {
        let backend = HttpBackend::start().expect("HTTP backend");
        let rls = RateLimitService::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), engine, Counting::Local)
            .expect("rate limit service");
        let routes =
            vec![Route { prefix: "/".into(), rate_limits: if per_route { json!([]) } else { entries.clone() } }];
        let config =
            EnvoyConfig { rls: rls.addr(), domain: "limiter".into(), routes, failure_mode_deny: false, rls_tls: None };
        let (port, admin_port) = (free_port().expect("free port"), free_port().expect("free port"));
        let mut b = bootstrap(&config, port, admin_port, backend.port());
        if let Some(filter) = first_filter {
            let filters =
                b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
                    .as_array_mut()
                    .expect("http_filters");
            filters.insert(0, filter);
        }
        if per_route {
            let route = &mut b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
                ["virtual_hosts"][0]["routes"][0];
            route["typed_per_filter_config"] = json!({"envoy.filters.http.ratelimit": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
                "rate_limits": entries,
            }});
        }
        let text = serde_json::to_string_pretty(&b).expect("bootstrap JSON");
        validate(&text);
        let envoy = Envoy::start_bootstrap(&text, "json", port, admin_port).expect("envoy starts");
        Stack { envoy, _rls: rls, backend }
    }

    /// The status codes of `n` requests in a row.
    fn statuses(&self, n: usize, method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u16> {
        (0..n)
            .map(|_| {
                send(method, self.envoy.port(), path, headers)
                    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}\n{}", self.envoy.log()))
                    .status
            })
            .collect()
    }
}

/// `envoy --mode validate` accepts the bootstrap (so the printed actions are real Envoy config).
fn validate(bootstrap_json: &str) {
    let dir = std::env::temp_dir().join(format!(
        "limiter-envoy-validate-{}-{}",
        std::process::id(),
        free_port().unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, bootstrap_json).expect("write bootstrap");
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy --mode validate");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "envoy --mode validate: {}", String::from_utf8_lossy(&out.stderr));
}

/// The issue's seed: an LLM endpoint limited by path and method. `POST /llm/v1/chat...` gets 3 a
/// minute (200, 200, 200, 429); GET on the same path and POST elsewhere are not limited by it; a
/// `?debug=1` query parameter rule with `requests: 0` refuses at once.
#[test]
fn llm_chat_posts_get_three_a_minute_other_paths_and_methods_do_not_count() {
    let (entries, engine) = explained(&[examples("gateways/envoy-gateway/llm-path-method.yaml")]);
    let actions = entries[0]["actions"].to_string();
    assert!(actions.contains(r#"{"header_value_match":{"descriptor_value":"path^=/llm/v1/chat","headers":[{"name":":path","string_match":{"prefix":"/llm/v1/chat"}}]}}"#), "{actions}");
    assert!(actions.contains(r#"{"header_value_match":{"descriptor_value":"method=POST","headers":[{"name":":method","string_match":{"exact":"POST"}}]}}"#), "{actions}");
    let stack = Stack::start(entries, engine, false);

    assert_eq!(stack.statuses(4, "POST", "/llm/v1/chat/completions", &[]), [200, 200, 200, 429]);
    assert_eq!(stack.statuses(2, "GET", "/llm/v1/chat/completions", &[]), [200, 200], "GET is not limited");
    assert_eq!(stack.statuses(2, "POST", "/llm/v1/embeddings", &[]), [200, 200], "another path is not limited");
    assert_eq!(stack.statuses(1, "POST", "/llm/v1/chat", &[]), [429], "the prefix itself shares the bucket");
    // Query parameter rule at 0 requests: refused whatever the path and method.
    assert_eq!(stack.statuses(2, "GET", "/llm/v1/embeddings?debug=1", &[]), [429, 429]);
    assert_eq!(stack.statuses(1, "GET", "/llm/v1/embeddings?debug=0", &[]), [200]);
    assert_eq!(stack.backend.requests(), 3 + 2 + 2 + 1);
}

/// A `RegularExpression` header rule (RE2, the whole value): `x-user-id` values matching
/// `^test-.*` share 5 a minute; other values are not selected.
#[test]
fn a_regex_header_rule_limits_matching_values_only() {
    let (entries, engine) = explained(&[examples("gateways/envoy-gateway/regex-header.yaml")]);
    assert!(entries.to_string().contains(r#""safe_regex":{"regex":"^test-.*"}"#), "{entries}");
    let stack = Stack::start(entries, engine, false);
    assert_eq!(stack.statuses(3, "GET", "/", &[("x-user-id", "test-a")]), [200, 200, 200]);
    assert_eq!(stack.statuses(3, "GET", "/", &[("x-user-id", "test-b")]), [200, 200, 429], "one shared bucket");
    assert_eq!(stack.statuses(2, "GET", "/", &[("x-user-id", "alice-test-1")]), [200, 200], "full match only");
    assert_eq!(stack.statuses(1, "GET", "/", &[]), [200]);
}

const COST: &str = "\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: eg-cost, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
  rateLimit:
    global:
      rules:
        - clientSelectors: [{queryParams: [{name: model, type: Distinct}]}]
          limit: {requests: 30, unit: Minute}
          cost: {request: {from: Number, number: 10}}
";

/// A cost of 10 per request against 30 a minute: three requests per model, then 429. Envoy
/// sends `hits_addend: 10` from the entry `explain` prints (in the route's
/// `RateLimitPerRoute`, where Envoy honours `hits_addend`), and the service counts what it is
/// sent. The model comes from a `Distinct` query parameter: each model has its own budget.
#[test]
fn a_cost_of_ten_per_request_allows_three_of_thirty() {
    let dir = std::env::temp_dir().join(format!("limiter-envoy-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let policy = dir.join("cost.yaml");
    std::fs::write(&policy, COST).expect("write policy");
    let (entries, engine) = explained(std::slice::from_ref(&policy));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(entries[0]["hits_addend"], json!({"number": 10}), "{entries}");
    assert!(
        entries
            .to_string()
            .contains(r#"{"query_parameters":{"descriptor_key":"query.model","query_parameter_name":"model"}}"#),
        "{entries}"
    );
    let stack = Stack::start(entries, engine, true);
    assert_eq!(stack.statuses(4, "POST", "/v1/complete?model=small", &[]), [200, 200, 200, 429]);
    assert_eq!(stack.statuses(1, "POST", "/v1/complete?model=large", &[]), [200], "another model, another budget");
    assert_eq!(stack.statuses(2, "POST", "/v1/complete", &[]), [200, 200], "no model, no descriptor");
}

/// A per-request limit override, as Envoy sends it for a route's `limit: {dynamic_metadata}`
/// (how Envoy Gateway passes a limit read from metadata): a Lua filter writes
/// `{requests_per_unit: 2, unit: HOUR}` into the request's dynamic metadata, Envoy attaches it to
/// the descriptor, and the service applies it instead of the configured limit (as the
/// reference does): 2 × 200, then 429, with the override in `x-ratelimit-limit`.
#[test]
fn a_limit_override_from_metadata_replaces_the_configured_limit() {
    let (_, engine) = explained(&[examples("gateways/envoy-gateway/llm-path-method.yaml")]);
    let entries = json!([{
        "actions": [{"generic_key": {"descriptor_value": "override-demo"}}],
        "limit": {"dynamic_metadata": {"metadata_key": {"key": "limiter.test", "path": [{"key": "limit"}]}}},
    }]);
    let lua = json!({
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string":
                "function envoy_on_request(h)\n  h:streamInfo():dynamicMetadata():set('limiter.test', 'limit', {requests_per_unit = 2, unit = 'HOUR'})\nend\n"},
        },
    });
    let stack = Stack::start_with(entries, engine, false, Some(lua));
    assert_eq!(stack.statuses(3, "GET", "/anything", &[]), [200, 200, 429]);
    let r = send("GET", stack.envoy.port(), "/anything", &[]).expect("GET");
    assert_eq!(r.header("x-ratelimit-limit"), Some("2, 2;w=3600"), "{:?}", r.headers);
    assert_eq!(stack.backend.requests(), 2);
}
